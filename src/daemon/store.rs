//! The store actor: one thread owns the SQLite connection and is the only writer.
//!
//! Taps ask it for decisions and hand it events over a channel; SQLite's blocking calls never
//! run on the async workers, and writes are serialised without a lock around the connection.

use std::path::Path;

use tokio::sync::{mpsc, oneshot};

use crate::acl::{AclError, Decision, Store};
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
    Record {
        event: Box<AccessEvent>,
        reply: oneshot::Sender<Result<i64, AclError>>,
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
                        Request::Record { event, reply } => {
                            let _ = reply.send(store.record_event(&event));
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
}
