//! The store actor: one thread owns the writing SQLite connection; decisions read through a
//! connection of their own.
//!
//! A tap never waits on a write: decisions and FAST-key reads go to the read connection (on
//! tokio's blocking pool; WAL lets it read beside any writer, this one or a CLI import), while
//! events and FAST-key writes queue to the writer thread. An event write that finds the
//! database busy (an import holding the lock) is retried until it is stored, never dropped.
//!
//! At start the database is checked (`PRAGMA quick_check`, a bounded part at once, the rest in
//! the background) and a damaged one is reported loudly. A database that takes no writes (a
//! read-only file system, wrong permissions, a full disk) is served read-only: grants go on
//! from the cached ACL, every write fails loudly and is counted, and the writer tries again
//! every [`WRITABLE_RETRY`] until the database takes writes.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::acl::{AclError, Decision, QuickCheck, Store};
use crate::aliro::crypto::SymmetricKey;
use crate::aliro::reader::FastCredential;
use crate::events::{unix_ms, AccessEvent, Retention};
use crate::logging::catalog;
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
    health: Arc<Mutex<StoreHealth>>,
    /// The cloud link's contact, when `[cloud]` is configured: how stale the cached ACL may be.
    cloud: Option<Arc<crate::cloud::contact::CloudContact>>,
}

/// What the store knows about the database's state, for status and logs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreHealth {
    /// Why the database takes no writes now; `None`: it does.
    pub read_only: Option<String>,
    pub integrity: Integrity,
}

/// The start-up integrity check.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Integrity {
    /// Still running (in the background, past the start-up budget).
    #[default]
    Checking,
    Ok,
    /// What `quick_check` found.
    Damaged(Vec<String>),
    /// The check itself failed (or was cut short by its budget); not known to be damaged.
    Unknown(String),
}

/// The part of the integrity check done before the store starts serving.
pub const START_CHECK_BUDGET: Duration = Duration::from_secs(2);
/// The rest, in the background.
const BACKGROUND_CHECK_BUDGET: Duration = Duration::from_secs(600);
/// How often a read-only store tries to open the database for writing again.
pub const WRITABLE_RETRY: Duration = Duration::from_secs(30);

/// How the store thread runs.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// The writer's busy timeout (a busy event write is retried after it, never dropped).
    pub busy_timeout: Duration,
    /// How many events the outbox keeps.
    pub retention: Retention,
    /// The site's time zone for schedules; `None`: the system's.
    pub time_zone: Option<jiff::tz::TimeZone>,
    /// The part of the integrity check done before serving ([`START_CHECK_BUDGET`]).
    pub start_check_budget: Duration,
    /// How often a read-only store tries to write again ([`WRITABLE_RETRY`]).
    pub writable_retry: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            busy_timeout: crate::acl::BUSY_TIMEOUT,
            retention: Retention::default(),
            time_zone: None,
            start_check_budget: START_CHECK_BUDGET,
            writable_retry: WRITABLE_RETRY,
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
        let health = Arc::new(Mutex::new(StoreHealth::default()));
        let (store, mut reader) = match Store::open(path) {
            Ok(w) => {
                w.set_busy_timeout(options.busy_timeout)?;
                (Some(w), Store::open(path)?)
            }
            // Grants must not depend on the disk taking writes.
            Err(e) if e.is_unwritable() => {
                let r = match Store::open_read_only(path) {
                    Ok(r) => r,
                    Err(ro) => {
                        log::error!(target: "keyway::store",
                            "{}: cannot open for writing ({e}) nor read-only: {ro}",
                            path.display());
                        return Err(e.into());
                    }
                };
                announce_read_only(path, &e.to_string());
                set(&health, |h| h.read_only = Some(e.to_string()));
                (None, r)
            }
            Err(e) => return Err(e.into()),
        };
        if let Some(tz) = &options.time_zone {
            reader.set_time_zone(tz.clone());
        }
        check_integrity(path, &reader, &health, options.start_check_budget);
        let reader = Arc::new(Mutex::new(reader));
        let write_failures = Arc::new(AtomicU64::new(0));
        let failures = write_failures.clone();
        let (tx, mut rx) = mpsc::channel::<Request>(QUEUE);
        let mut writer = Writer {
            store,
            path: path.to_path_buf(),
            options: options.clone(),
            retry_at: Instant::now() + options.writable_retry,
            reader: reader.clone(),
            health: health.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("keyway-store".into())
            .spawn(move || {
                let mut pending = PendingVerdicts::default();
                let mut outbox = Outbox {
                    retention: options.retention,
                    failures,
                    uncounted_failures: 0,
                };
                if let Some(store) = writer.store.as_mut() {
                    for _ in 0..PRUNE_STEPS_AT_START {
                        if !outbox.prune(store) {
                            break;
                        }
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
                            let r = writer
                                .get()
                                .and_then(|store| record_retrying(store, &event, attempt, held));
                            match (&r, writer.store.as_mut()) {
                                (Ok(_), Some(store)) => outbox.stored(store),
                                (Err(e), _) => outbox.failed(&event, e),
                                (Ok(_), None) => {}
                            }
                            let _ = reply.send(r);
                        }
                        Request::Verdict {
                            attempt,
                            verdict,
                            reply,
                        } => {
                            let r = writer
                                .get()
                                .and_then(|store| store.set_panel_verdict(attempt, verdict));
                            if let Ok(None) = r {
                                pending.hold(attempt, verdict);
                            }
                            let _ = reply.send(r);
                        }
                        Request::Ping(reply) => {
                            // The health task pings every 2 s: a read-only store finds out
                            // that it can write again without waiting for a tap.
                            writer.retry_if_due();
                            let _ = reply.send(Ok(()));
                        }
                        Request::SaveFastKey {
                            reader_id,
                            endpoint_key,
                            k_persistent,
                            reply,
                        } => {
                            let now = crate::events::unix_ms(time::OffsetDateTime::now_utc());
                            let r = writer.get().and_then(|store| match &k_persistent {
                                None => store
                                    .touch_fast_key(&reader_id, &endpoint_key, now)
                                    .map(|()| true),
                                Some(k) => store.save_fast_key(&reader_id, &endpoint_key, k, now),
                            });
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
                health,
                cloud: None,
            },
            thread,
        ))
    }

    /// The database's state: read-only or not, and what the integrity check found.
    pub fn health(&self) -> StoreHealth {
        self.health.lock().map(|h| h.clone()).unwrap_or_default()
    }

    /// [`health`](Self::health) and the failed event writes, as `keyway status` shows them.
    pub fn status(&self) -> crate::status::model::DatabaseStatus {
        let h = self.health();
        let (integrity, detail) = match h.integrity {
            Integrity::Checking => ("checking", Vec::new()),
            Integrity::Ok => ("ok", Vec::new()),
            Integrity::Damaged(lines) => ("damaged", lines),
            Integrity::Unknown(why) => ("unknown", vec![why]),
        };
        crate::status::model::DatabaseStatus {
            read_only: h.read_only,
            integrity: integrity.into(),
            integrity_detail: detail,
            events_not_stored: self.event_write_failures(),
        }
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

fn set(health: &Mutex<StoreHealth>, f: impl FnOnce(&mut StoreHealth)) {
    if let Ok(mut h) = health.lock() {
        f(&mut h);
    }
}

fn announce_read_only(path: &Path, why: &str) {
    log::error!(target: "keyway::store", message_id = catalog::DATABASE_READ_ONLY;
        "DATABASE READ-ONLY: {}: {why}. Serving grants from the cached ACL; events are NOT \
         stored (journald only), FAST keys and panel verdicts are not kept. Retrying every {} s.",
        path.display(), WRITABLE_RETRY.as_secs());
}

/// The start-up check: a bounded part now, on the read connection; the rest in the
/// background on a connection of its own, at the apply's background priority.
fn check_integrity(
    path: &Path,
    reader: &Store,
    health: &Arc<Mutex<StoreHealth>>,
    budget: Duration,
) {
    let started = Instant::now();
    match reader.quick_check(budget) {
        Ok(QuickCheck::Unfinished) => {
            log::info!(target: "keyway::store",
                "{}: integrity check goes on in the background (large database)",
                path.display());
            let (path, shared) = (path.to_path_buf(), health.clone());
            let spawned = std::thread::Builder::new()
                .name("keyway-integrity".into())
                .spawn(move || {
                    crate::acl::apply::background_priority();
                    let r = Store::open_read_only(&path)
                        .and_then(|s| s.quick_check(BACKGROUND_CHECK_BUDGET));
                    report_integrity(&path, r, &shared, started);
                });
            if let Err(e) = spawned {
                set(health, |h| h.integrity = Integrity::Unknown(e.to_string()));
            }
        }
        r => report_integrity(path, r, health, started),
    }
}

fn report_integrity(
    path: &Path,
    r: Result<QuickCheck, AclError>,
    health: &Mutex<StoreHealth>,
    started: Instant,
) {
    let took = started.elapsed().as_millis();
    let integrity = match r {
        Ok(QuickCheck::Ok) => {
            log::info!(target: "keyway::store",
                "{}: integrity check ok ({took} ms)", path.display());
            Integrity::Ok
        }
        Ok(QuickCheck::Damaged(lines)) => {
            log::error!(target: "keyway::store", message_id = catalog::DATABASE_DAMAGED;
                "DATABASE DAMAGED: {}: {}. Credentials on damaged pages cannot be read (denied \
                 or refused with store_error). Fix: stop keyway, move the file aside, start it \
                 and import the ACL again (events not yet delivered in it are lost); \
                 `keyway doctor` checks it again.",
                path.display(), lines.join("; "));
            Integrity::Damaged(lines)
        }
        Ok(QuickCheck::Unfinished) => {
            log::warn!(target: "keyway::store",
                "{}: integrity check did not finish in {took} ms", path.display());
            Integrity::Unknown("not finished".into())
        }
        Err(e) => {
            log::warn!(target: "keyway::store",
                "{}: integrity check failed: {e}", path.display());
            Integrity::Unknown(e.to_string())
        }
    };
    set(health, |h| h.integrity = integrity);
}

/// The writing connection, absent while the database takes no writes.
struct Writer {
    store: Option<Store>,
    path: std::path::PathBuf,
    options: StoreOptions,
    /// When a read-only store next tries to write again.
    retry_at: Instant,
    reader: Arc<Mutex<Store>>,
    health: Arc<Mutex<StoreHealth>>,
}

impl Writer {
    /// The writing connection, or why there is none. A read-only store tries to open the
    /// database for writing again every [`WRITABLE_RETRY`]; when it can, the read connection
    /// is reopened normally too (a read-only one may have been opened `immutable`, which
    /// would not see the writes).
    fn get(&mut self) -> Result<&mut Store, AclError> {
        self.retry_if_due();
        let reason = self
            .health
            .lock()
            .ok()
            .and_then(|h| h.read_only.clone())
            .unwrap_or_default();
        self.store.as_mut().ok_or_else(|| AclError::ReadOnly {
            path: self.path.clone(),
            reason,
        })
    }

    /// A read-only store tries to open the database for writing, at most every
    /// `writable_retry`.
    fn retry_if_due(&mut self) {
        if self.store.is_none() && Instant::now() >= self.retry_at {
            self.retry_at = Instant::now() + self.options.writable_retry;
            if let Ok(w) = self.reopen() {
                self.store = Some(w);
                set(&self.health, |h| h.read_only = None);
                log::warn!(target: "keyway::store",
                    "{}: the database takes writes again: events are stored from now on",
                    self.path.display());
            }
        }
    }

    fn reopen(&self) -> Result<Store, AclError> {
        let w = Store::open(&self.path)?;
        w.set_busy_timeout(self.options.busy_timeout)?;
        let mut r = Store::open(&self.path)?;
        if let Some(tz) = &self.options.time_zone {
            r.set_time_zone(tz.clone());
        }
        if let Ok(mut reader) = self.reader.lock() {
            *reader = r;
        }
        Ok(w)
    }
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
        log::error!(target: "keyway::store", message_id = catalog::EVENT_NOT_STORED,
            door = event.door.as_str(), event_write_failures = total;
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
                    state: crate::acl::CredentialState::Active,
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
