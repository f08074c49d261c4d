//! The store actor: one thread owns the writing SQLite connection; decisions read through a
//! connection of their own.
//!
//! A tap never waits on a write: decisions and FAST-key reads go to the read connection (on
//! tokio's blocking pool; WAL lets it read beside any writer, this one or a CLI import), while
//! events and FAST-key writes queue to the writer thread. An event write that finds the
//! database busy (an import holding the lock) is retried until it is stored, never dropped.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::acl::{AclError, Decision, Store};
use crate::aliro::crypto::SymmetricKey;
use crate::aliro::reader::FastCredential;
use crate::events::{unix_ms, AccessEvent, Retention};
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
    Record {
        event: Box<AccessEvent>,
        attempt: Option<i64>,
        reply: oneshot::Sender<Result<i64, AclError>>,
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

/// Cheap handle to the store thread and the read connection.
#[derive(Clone)]
pub struct StoreHandle {
    tx: mpsc::Sender<Request>,
    reader: Arc<Mutex<Store>>,
    /// Event writes that failed since start (disk full, I/O error, damage).
    write_failures: Arc<AtomicU64>,
    /// The cloud link's contact, when `[cloud]` is configured: how stale the cached ACL may be.
    cloud: Option<Arc<crate::cloud::contact::CloudContact>>,
}

/// How the store thread runs.
#[derive(Debug, Clone, Copy)]
pub struct StoreOptions {
    /// The writer's busy timeout (a busy event write is retried after it, never dropped).
    pub busy_timeout: Duration,
    /// How many events the outbox keeps.
    pub retention: Retention,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            busy_timeout: crate::acl::BUSY_TIMEOUT,
            retention: Retention::default(),
        }
    }
}

/// Pruning steps run at start before serving writes (a lowered bound catches up over the
/// next events after that, one step per event).
const PRUNE_STEPS_AT_START: usize = 100;

/// Longest pause between retries of an event write that found the database busy.
const RETRY_MAX: Duration = Duration::from_secs(2);

/// Stores `event`, retrying for as long as the database is busy (another writer holds the
/// lock past the busy timeout): an access event is an audit record and is never dropped for
/// that. Other errors (disk full, damage) are returned at once.
fn record_retrying(
    store: &mut Store,
    event: &AccessEvent,
    attempt: Option<i64>,
    verdict: Option<&str>,
) -> Result<i64, AclError> {
    let mut pause = Duration::from_millis(20);
    let mut attempts = 0u32;
    loop {
        match store.record_with_verdict(event, attempt, verdict) {
            Err(AclError::Sqlite(e)) if is_busy(&e) => {
                attempts += 1;
                if attempts == 1 || attempts.is_multiple_of(10) {
                    log::warn!(target: "keyway::daemon", door = event.door.as_str();
                        "event write waits for the database (busy, attempt {attempts}); retrying");
                }
                std::thread::sleep(pause);
                pause = (pause * 2).min(RETRY_MAX);
            }
            other => return other,
        }
    }
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

impl StoreHandle {
    /// Opens the database and starts the thread that owns it. The thread ends when every handle
    /// is dropped, after finishing what is queued.
    pub fn open(path: &Path) -> Result<(Self, std::thread::JoinHandle<()>), StoreError> {
        Self::open_with(path, StoreOptions::default())
    }

    /// [`StoreHandle::open`] with options (the configured retention; tests shorten the busy
    /// timeout).
    pub fn open_with(
        path: &Path,
        options: StoreOptions,
    ) -> Result<(Self, std::thread::JoinHandle<()>), StoreError> {
        let mut store = Store::open(path)?;
        store.set_busy_timeout(options.busy_timeout)?;
        let reader = Arc::new(Mutex::new(Store::open(path)?));
        let write_failures = Arc::new(AtomicU64::new(0));
        let failures = write_failures.clone();
        let (tx, mut rx) = mpsc::channel::<Request>(QUEUE);
        let thread = std::thread::Builder::new()
            .name("keyway-store".into())
            .spawn(move || {
                let mut pending = PendingVerdicts::default();
                let mut outbox = Outbox {
                    retention: options.retention,
                    failures,
                    uncounted_failures: 0,
                };
                for _ in 0..PRUNE_STEPS_AT_START {
                    if !outbox.prune(&mut store) {
                        break;
                    }
                }
                while let Some(req) = rx.blocking_recv() {
                    match req {
                        Request::Record {
                            event,
                            attempt,
                            reply,
                        } => {
                            // A verdict that came first is written with the row: part of
                            // the event as it goes up, never a later edit.
                            let held = attempt.and_then(|a| pending.take(a));
                            let r = record_retrying(&mut store, &event, attempt, held);
                            match &r {
                                Ok(_) => outbox.stored(&mut store),
                                Err(e) => outbox.failed(&event, e),
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
        Ok((
            Self {
                tx,
                reader,
                write_failures,
                cloud: None,
            },
            thread,
        ))
    }

    /// Attaches the cloud link's contact (before the handle is cloned for the doors).
    pub fn with_cloud_contact(
        mut self,
        contact: Option<Arc<crate::cloud::contact::CloudContact>>,
    ) -> Self {
        self.cloud = contact;
        self
    }

    pub fn cloud_contact(&self) -> Option<&crate::cloud::contact::CloudContact> {
        self.cloud.as_deref()
    }

    /// Event writes that failed since this handle's store was opened.
    pub fn event_write_failures(&self) -> u64 {
        self.write_failures.load(Ordering::Relaxed)
    }

    /// Runs a read on the read connection, off the async workers. Never queued behind a
    /// write: the only lock is this connection's own, held for one lookup.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, AclError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            let store = reader.lock().map_err(|_| StoreError::Gone)?;
            Ok(f(&store)?)
        })
        .await
        .map_err(|_| StoreError::Gone)?
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
        let (key, door) = (endpoint_key.to_vec(), door.to_owned());
        self.read(move |s| s.decide(&key, &door, now)).await
    }

    /// Decides for a physical card by its UID.
    pub async fn decide_card(
        &self,
        uid: &[u8],
        door: &str,
        now: time::OffsetDateTime,
    ) -> Result<Decision, StoreError> {
        let (uid, door) = (uid.to_vec(), door.to_owned());
        self.read(move |s| s.decide_card(&uid, &door, now)).await
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
        self.read(move |s| s.fast_keys(&reader_id)).await
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

/// The store thread's outbox bookkeeping: retention after each stored event, and failed
/// writes counted (in memory at once, in the database when it takes writes again).
struct Outbox {
    retention: Retention,
    failures: Arc<AtomicU64>,
    uncounted_failures: u64,
}

impl Outbox {
    /// An event was stored: the database takes writes, so failures not counted there yet
    /// are added, and one retention step runs.
    fn stored(&mut self, store: &mut Store) {
        if self.uncounted_failures > 0 {
            match store.add_events_write_failed(self.uncounted_failures) {
                Ok(()) => self.uncounted_failures = 0,
                Err(e) => log::warn!(target: "keyway::store",
                    "failed event writes not counted in the database yet: {e}"),
            }
        }
        self.prune(store);
    }

    /// An event could not be stored: loud (error log with the running count) and counted.
    /// Its journald record still follows from the caller.
    fn failed(&mut self, event: &AccessEvent, e: &AclError) {
        let total = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        self.uncounted_failures += 1;
        log::error!(target: "keyway::store", door = event.door.as_str(),
            event_write_failures = total;
            "EVENT NOT STORED (door {}, {}): {e}; {total} event write(s) failed since start; \
             grants continue from the cached ACL", event.door, event.decision);
    }

    /// One retention step; whether more is over the bound.
    fn prune(&mut self, store: &mut Store) -> bool {
        let now = unix_ms(time::OffsetDateTime::now_utc());
        match store.prune_events(&self.retention, now) {
            Ok(p) => {
                if p.undelivered > 0 {
                    let total = store.events_pruned_undelivered().unwrap_or(0);
                    log::warn!(target: "keyway::store", pruned_undelivered = total;
                        "retention pruned {} event(s) before they were delivered \
                         ({total} in all); raise [events] max_rows / max_age_days to keep more",
                        p.undelivered);
                }
                p.more
            }
            Err(e) => {
                log::warn!(target: "keyway::store", "event retention step failed: {e}");
                false
            }
        }
    }
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

    /// The verdict waiting for the event of `attempt`, about to be stored.
    fn take(&mut self, attempt: i64) -> Option<&'static str> {
        self.0.remove(&attempt).map(|(verdict, _)| verdict)
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

    /// While another connection (a CLI import) holds the write lock longer than the busy
    /// timeout, the event write waits and is stored afterwards (it used to fail and be lost),
    /// and a decision does not queue behind it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn busy_database_delays_events_never_drops_them_nor_decisions() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("k.db");
        {
            let mut s = Store::open(&db).unwrap();
            s.import_specs(
                &[crate::acl::CredentialSpec {
                    line: 1,
                    endpoint_key: crate::acl::test_key(1),
                    person_id: "p".into(),
                    card_format: crate::card::CardFormat::H10301,
                    facility_code: 1,
                    card_number: 1,
                    valid_from: None,
                    valid_until: None,
                    doors: vec!["*".into()],
                    card_uids: vec![],
                }],
                crate::acl::ImportMode::Replace,
                "t",
            )
            .unwrap();
        }
        let (h, _t) = StoreHandle::open_with(
            &db,
            StoreOptions {
                busy_timeout: Duration::from_millis(50),
                ..StoreOptions::default()
            },
        )
        .unwrap();
        let locker = rusqlite::Connection::open(&db).unwrap();
        locker.execute_batch("BEGIN IMMEDIATE").unwrap();
        let h2 = h.clone();
        let write = tokio::spawn(async move { h2.record(granted("front"), Some(7)).await });
        // The writer thread is now stuck on the lock; a decision still answers. The timeout
        // only keeps a regression from hanging the test.
        let d = tokio::time::timeout(
            Duration::from_secs(20),
            h.decide(
                &crate::acl::test_key(1),
                "front",
                time::OffsetDateTime::now_utc(),
            ),
        )
        .await
        .expect("a decision must not wait for the writer")
        .unwrap();
        assert!(d.is_grant());
        // Hold the lock well past the writer's busy timeout (SQLite's own real-time wait,
        // which no test clock can advance): the write must still be pending, not failed.
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(
            !write.is_finished(),
            "the event write gave up while the lock was held"
        );
        locker.execute_batch("COMMIT").unwrap();
        let id = write
            .await
            .unwrap()
            .expect("the event is stored once the lock is free");
        drop(h);
        let events = Store::open(&db).unwrap().recent_events(5).unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].id, id);
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
