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
use crate::events::AccessEvent;
use crate::osdp::AttemptId;

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
        attempt: Option<i64>,
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
    /// Liveness probe for the supervisor: answered in queue order.
    Ping(oneshot::Sender<Result<(), AclError>>),
    /// The panel's verdict on the card of `attempt`.
    Verdict {
        attempt: i64,
        verdict: &'static str,
        reply: oneshot::Sender<Result<Option<i64>, AclError>>,
    },
}

/// How long a verdict that arrived before its event row waits for it (the panel can answer
/// before the phone has finished).
const VERDICT_REACH: Duration = Duration::from_secs(60);

/// Most verdicts waiting for their event rows at once (oldest dropped first).
const MAX_PENDING_VERDICTS: usize = 256;

/// Verdicts waiting for their event row, by attempt id.
#[derive(Default)]
struct PendingVerdicts(HashMap<i64, (&'static str, Instant)>);

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
                        Request::Record {
                            event,
                            attempt,
                            reply,
                        } => {
                            let r = store.record_attempt(&event, attempt);
                            if let (Ok(_), Some(a)) = (&r, attempt) {
                                pending.apply(&mut store, a, &event.door);
                            }
                            let _ = reply.send(r);
                        }
                        Request::Verdict {
                            attempt,
                            verdict,
                            reply,
                        } => {
                            let r = store.set_panel_verdict(attempt, verdict);
                            if let Ok(None) = r {
                                pending.hold(attempt, verdict);
                            }
                            let _ = reply.send(r);
                        }
                        Request::Ping(reply) => {
                            let _ = reply.send(Ok(()));
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

    /// Answers once the store thread has worked through what was queued before: it is alive.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.ask(Request::Ping).await
    }

    /// Records the panel's verdict on the event of `attempt` (or keeps it until that event
    /// is stored). Returns the event id when one was updated now.
    pub async fn panel_verdict(
        &self,
        attempt: AttemptId,
        verdict: &'static str,
    ) -> Result<Option<i64>, StoreError> {
        let attempt = attempt_column(attempt);
        self.ask(|reply| Request::Verdict {
            attempt,
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

    /// Durably records an event (with the attempt its card went to the panel under, if any);
    /// returns its id (the outbox order).
    pub async fn record(
        &self,
        event: AccessEvent,
        attempt: Option<AttemptId>,
    ) -> Result<i64, StoreError> {
        self.ask(|reply| Request::Record {
            event: Box::new(event),
            attempt: attempt.map(attempt_column),
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

/// Attempt ids are 63-bit (see [`crate::daemon::access::new_attempt_id`]): the SQLite
/// integer holds them as they are.
fn attempt_column(a: AttemptId) -> i64 {
    i64::try_from(a).unwrap_or(i64::MAX)
}

impl PendingVerdicts {
    /// Keeps a verdict whose event row is not stored yet (bounded: stale ones go first, then
    /// the oldest).
    fn hold(&mut self, attempt: i64, verdict: &'static str) {
        self.0.retain(|_, (_, at)| at.elapsed() < VERDICT_REACH);
        if self.0.len() >= MAX_PENDING_VERDICTS {
            if let Some(oldest) = self
                .0
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(a, _)| *a)
            {
                self.0.remove(&oldest);
            }
        }
        self.0.insert(attempt, (verdict, Instant::now()));
    }

    /// Puts a waiting verdict on the event of `attempt` just stored.
    fn apply(&mut self, store: &mut Store, attempt: i64, door: &str) {
        if let Some((verdict, _)) = self.0.remove(&attempt) {
            if let Err(e) = store.set_panel_verdict(attempt, verdict) {
                log::warn!(target: "keyway::daemon", door = door;
                    "door {door}: panel verdict not stored: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{unix_ms, EventDecision, Transport};

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
        let a = h.record(granted("front"), Some(1)).await.unwrap();
        assert_eq!(h.panel_verdict(1, "granted").await.unwrap(), Some(a));
        // Before: the panel answered before the phone finished; held until the row comes.
        assert_eq!(h.panel_verdict(2, "denied").await.unwrap(), None);
        // Another attempt of the same door stored meanwhile does not take it.
        let c = h.record(granted("front"), Some(3)).await.unwrap();
        let b = h.record(granted("front"), Some(2)).await.unwrap();
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
