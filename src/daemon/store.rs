//! The store actor: one thread owns the SQLite connection and is the only writer.
//!
//! Taps ask it for decisions and hand it events over a channel; SQLite's blocking calls never
//! run on the async workers, and writes are serialised without a lock around the connection.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::acl::{AclError, Decision, Store};
use crate::aliro::crypto::SymmetricKey;
use crate::aliro::reader::FastCredential;
use crate::events::{unix_ms, AccessEvent, EventDecision};

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
    /// The panel's verdict on the latest card of `door`.
    Verdict {
        door: String,
        verdict: &'static str,
        reply: oneshot::Sender<Result<Option<i64>, AclError>>,
    },
}

/// How far back a verdict looks for its granted event, and how long a verdict that arrived
/// before its event row waits for it (the panel can answer before the phone has finished).
const VERDICT_REACH: Duration = Duration::from_secs(60);

/// Verdicts waiting for their event row, per door; bounded by the number of doors.
#[derive(Default)]
struct PendingVerdicts(HashMap<String, (&'static str, Instant)>);

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
                let mut pending = PendingVerdicts::default();
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
                            let r = store.record_event(&event);
                            if r.is_ok() && event.decision == EventDecision::Granted {
                                pending.apply(&mut store, &event);
                            }
                            let _ = reply.send(r);
                        }
                        Request::Verdict {
                            door,
                            verdict,
                            reply,
                        } => {
                            let since = unix_ms_ago(VERDICT_REACH);
                            let r = store.set_panel_verdict(&door, verdict, since);
                            if let Ok(None) = r {
                                pending.0.insert(door, (verdict, Instant::now()));
                            }
                            let _ = reply.send(r);
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

    /// Sends a request and waits for the store thread's answer.
    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, AclError>>) -> Request,
    ) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| StoreError::Gone)?;
        Ok(rx.await.map_err(|_| StoreError::Gone)??)
    }

    /// Records the panel's verdict on the latest granted card of `door` (or keeps it until
    /// that event is stored). Returns the event id when one was updated now.
    pub async fn panel_verdict(
        &self,
        door: &str,
        verdict: &'static str,
    ) -> Result<Option<i64>, StoreError> {
        let door = door.to_owned();
        self.ask(|reply| Request::Verdict {
            door,
            verdict,
            reply,
        })
        .await
    }

    pub async fn decide(
        &self,
        endpoint_key: &[u8],
        door: &str,
        now: time::OffsetDateTime,
    ) -> Result<Decision, StoreError> {
        self.ask(|reply| Request::Decide {
            endpoint_key: endpoint_key.to_vec(),
            door: door.to_owned(),
            now,
            reply,
        })
        .await
    }

    /// Decides for a physical card by its UID.
    pub async fn decide_card(
        &self,
        uid: &[u8],
        door: &str,
        now: time::OffsetDateTime,
    ) -> Result<Decision, StoreError> {
        self.ask(|reply| Request::DecideCard {
            uid: uid.to_vec(),
            door: door.to_owned(),
            now,
            reply,
        })
        .await
    }

    /// Durably records an event; returns its id (the outbox order).
    pub async fn record(&self, event: AccessEvent) -> Result<i64, StoreError> {
        self.ask(|reply| Request::Record {
            event: Box::new(event),
            reply,
        })
        .await
    }

    /// The FAST keys stored for a reader identifier (most recently used first).
    pub async fn fast_keys(&self, reader_id: [u8; 32]) -> Result<Vec<FastCredential>, StoreError> {
        self.ask(|reply| Request::FastKeys { reader_id, reply })
            .await
    }

    /// Stores the Kpersistent of a STANDARD transaction, or (`None`) marks the stored one as
    /// used by a FAST tap. `Ok(false)`: no credential has this key.
    pub async fn save_fast_key(
        &self,
        reader_id: [u8; 32],
        endpoint_key: [u8; 65],
        k_persistent: Option<SymmetricKey>,
    ) -> Result<bool, StoreError> {
        self.ask(|reply| Request::SaveFastKey {
            reader_id,
            endpoint_key,
            k_persistent,
            reply,
        })
        .await
    }
}

impl PendingVerdicts {
    /// Puts a waiting verdict on the granted `event` just stored for its door.
    fn apply(&mut self, store: &mut Store, event: &AccessEvent) {
        self.0.retain(|_, (_, at)| at.elapsed() < VERDICT_REACH);
        if let Some((verdict, _)) = self.0.remove(&event.door) {
            if let Err(e) = store.set_panel_verdict(&event.door, verdict, event.time_ms) {
                log::warn!(target: "keyway::daemon", door = event.door.as_str();
                    "door {}: panel verdict not stored: {e}", event.door);
            }
        }
    }
}

fn unix_ms_ago(d: Duration) -> i64 {
    let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    unix_ms(time::OffsetDateTime::now_utc()).saturating_sub(ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Transport;

    fn granted(door: &str) -> AccessEvent {
        AccessEvent {
            time_ms: unix_ms(time::OffsetDateTime::now_utc()),
            door: door.into(),
            transport: Transport::Nfc,
            endpoint_fingerprint: Some("0011223344556677".into()),
            person_id: Some("p-1".into()),
            credential_id: Some(1),
            decision: EventDecision::Granted,
            reason: "granted".into(),
            latency_ms: 90,
        }
    }

    #[tokio::test]
    async fn verdict_before_or_after_its_event_row_lands_on_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("k.db");
        let (h, _t) = StoreHandle::open(&db).unwrap();
        // After: the row exists, the verdict lands at once.
        let a = h.record(granted("front")).await.unwrap();
        assert_eq!(h.panel_verdict("front", "granted").await.unwrap(), Some(a));
        // Before: the panel answered before the phone finished; held until the row comes.
        assert_eq!(h.panel_verdict("front", "denied").await.unwrap(), None);
        let b = h.record(granted("front")).await.unwrap();
        // Another door's verdict waiting does not touch this door.
        assert_eq!(h.panel_verdict("back", "unknown").await.unwrap(), None);
        let c = h.record(granted("front")).await.unwrap();
        drop(h);

        let store = Store::open(&db).unwrap();
        let v: HashMap<i64, Option<String>> = store
            .recent_events(10)
            .unwrap()
            .into_iter()
            .map(|e| (e.id, e.panel_verdict))
            .collect();
        assert_eq!(v[&a].as_deref(), Some("granted"));
        assert_eq!(v[&b].as_deref(), Some("denied"));
        assert_eq!(v[&c], None);
    }
}
