//! The store actor: one thread owns the SQLite connection and is the only writer.
//!
//! Taps ask it for decisions and hand it events over a channel; SQLite's blocking calls never
//! run on the async workers, and writes are serialised without a lock around the connection.

use std::path::Path;

use tokio::sync::{mpsc, oneshot};

use crate::acl::{AclError, Decision, Store};
use crate::aliro::crypto::SymmetricKey;
use crate::aliro::reader::FastCredential;
use crate::events::AccessEvent;

/// Requests queue here while a slow disk catches up; a full queue delays taps, never drops events.
const QUEUE: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Acl(#[from] AclError),
    #[error("the store thread has stopped")]
    Gone,
    #[error("cannot start the store thread: {0}")]
    Thread(std::io::Error),
}

enum Request {
    Decide {
        endpoint_key: Vec<u8>,
        door: String,
        now: time::OffsetDateTime,
        reply: oneshot::Sender<Result<Decision, AclError>>,
    },
    DecideCard {
        uid: Vec<u8>,
        door: String,
        now: time::OffsetDateTime,
        reply: oneshot::Sender<Result<Decision, AclError>>,
    },
    Record {
        event: Box<AccessEvent>,
        reply: oneshot::Sender<Result<i64, AclError>>,
    },
    FastKeys {
        reader_id: [u8; 32],
        reply: oneshot::Sender<Result<Vec<FastCredential>, AclError>>,
    },
    SaveFastKey {
        reader_id: [u8; 32],
        endpoint_key: [u8; 65],
        /// `None`: the key is already stored and only its use time changes (FAST tap).
        k_persistent: Option<SymmetricKey>,
        reply: oneshot::Sender<Result<bool, AclError>>,
    },
}

/// Cheap handle to the store thread.
#[derive(Clone)]
pub struct StoreHandle {
    tx: mpsc::Sender<Request>,
}

impl StoreHandle {
    /// Opens the database and starts the thread that owns it. The thread ends when every handle
    /// is dropped, after finishing what is queued.
    pub fn open(path: &Path) -> Result<(Self, std::thread::JoinHandle<()>), StoreError> {
        let mut store = Store::open(path)?;
        let (tx, mut rx) = mpsc::channel::<Request>(QUEUE);
        let thread = std::thread::Builder::new()
            .name("keyway-store".into())
            .spawn(move || {
                while let Some(req) = rx.blocking_recv() {
                    match req {
                        Request::Decide {
                            endpoint_key,
                            door,
                            now,
                            reply,
                        } => {
                            let _ = reply.send(store.decide(&endpoint_key, &door, now));
                        }
                        Request::DecideCard {
                            uid,
                            door,
                            now,
                            reply,
                        } => {
                            let _ = reply.send(store.decide_card(&uid, &door, now));
                        }
                        Request::Record { event, reply } => {
                            let _ = reply.send(store.record_event(&event));
                        }
                        Request::FastKeys { reader_id, reply } => {
                            let _ = reply.send(store.fast_keys(&reader_id));
                        }
                        Request::SaveFastKey {
                            reader_id,
                            endpoint_key,
                            k_persistent,
                            reply,
                        } => {
                            let now = crate::events::unix_ms(time::OffsetDateTime::now_utc());
                            let r = match &k_persistent {
                                None => store
                                    .touch_fast_key(&reader_id, &endpoint_key, now)
                                    .map(|()| true),
                                Some(k) => store.save_fast_key(&reader_id, &endpoint_key, k, now),
                            };
                            let _ = reply.send(r);
                        }
                    }
                }
            })
            .map_err(StoreError::Thread)?;
        Ok((Self { tx }, thread))
    }

    pub async fn decide(
        &self,
        endpoint_key: &[u8],
        door: &str,
        now: time::OffsetDateTime,
    ) -> Result<Decision, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request::Decide {
                endpoint_key: endpoint_key.to_vec(),
                door: door.to_owned(),
                now,
                reply,
            })
            .await
            .map_err(|_| StoreError::Gone)?;
        Ok(rx.await.map_err(|_| StoreError::Gone)??)
    }

    /// Decides for a physical card by its UID.
    pub async fn decide_card(
        &self,
        uid: &[u8],
        door: &str,
        now: time::OffsetDateTime,
    ) -> Result<Decision, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request::DecideCard {
                uid: uid.to_vec(),
                door: door.to_owned(),
                now,
                reply,
            })
            .await
            .map_err(|_| StoreError::Gone)?;
        Ok(rx.await.map_err(|_| StoreError::Gone)??)
    }

    /// Durably records an event; returns its id (the outbox order).
    pub async fn record(&self, event: AccessEvent) -> Result<i64, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request::Record {
                event: Box::new(event),
                reply,
            })
            .await
            .map_err(|_| StoreError::Gone)?;
        Ok(rx.await.map_err(|_| StoreError::Gone)??)
    }

    /// The FAST keys stored for a reader identifier (most recently used first).
    pub async fn fast_keys(&self, reader_id: [u8; 32]) -> Result<Vec<FastCredential>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request::FastKeys { reader_id, reply })
            .await
            .map_err(|_| StoreError::Gone)?;
        Ok(rx.await.map_err(|_| StoreError::Gone)??)
    }

    /// Stores the Kpersistent of a STANDARD transaction, or (`None`) marks the stored one as
    /// used by a FAST tap. `Ok(false)`: no credential has this key.
    pub async fn save_fast_key(
        &self,
        reader_id: [u8; 32],
        endpoint_key: [u8; 65],
        k_persistent: Option<SymmetricKey>,
    ) -> Result<bool, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request::SaveFastKey {
                reader_id,
                endpoint_key,
                k_persistent,
                reply,
            })
            .await
            .map_err(|_| StoreError::Gone)?;
        Ok(rx.await.map_err(|_| StoreError::Gone)??)
    }
}
