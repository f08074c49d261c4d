//! The daemon's health task and status socket: every [`PROBE_EVERY`] it asks each bus task and
//! the store thread whether they are alive (their heartbeats), samples the database and the
//! disk into the status [`Registry`], evaluates the problems ("never silent": logged on change
//! with their MESSAGE_ID) and keeps systemd's `STATUS=` line current.

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::watch;

use crate::serial::BusHandle;
use crate::status::health::{self as checks, Limits, Tracker};
use crate::status::{probe, server, Registry};

use super::store::StoreHandle;
use super::supervise::Heartbeat;

/// How often the health task looks.
pub const PROBE_EVERY: Duration = Duration::from_secs(2);
/// A bus or the store not answering a probe for this long is stalled.
pub const PROBE_STALL: Duration = Duration::from_secs(30);
/// Longest wait for one probe's answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the health task watches.
#[derive(Clone)]
pub struct HealthInputs {
    pub registry: Registry,
    pub buses: Vec<(String, BusHandle, Heartbeat)>,
    pub store: StoreHandle,
    pub store_beat: Heartbeat,
    pub database: PathBuf,
    pub limits: Limits,
}

pub fn now_ms() -> i64 {
    crate::events::unix_ms(time::OffsetDateTime::now_utc())
}

/// Runs until `shutdown`.
pub async fn run(inputs: HealthInputs, mut shutdown: watch::Receiver<bool>) {
    let HealthInputs {
        registry,
        buses,
        store,
        store_beat,
        database,
        limits,
    } = inputs;
    let doors = registry.door_ids();
    // Decisions after this event id are "since start".
    let db = database.clone();
    let since = tokio::task::spawn_blocking(move || {
        probe::open_read_only(&db).and_then(|c| probe::last_event_id(&c))
    })
    .await
    .ok()
    .and_then(Result::ok)
    .unwrap_or(0);
    let mut tracker = Tracker::default();
    let mut last_status = String::new();
    let mut conn: Option<rusqlite::Connection> = None;
    let mut read_only = store.health().read_only.is_some();
    loop {
        for (port, bus, beat) in &buses {
            if let Ok(Ok(h)) = tokio::time::timeout(PROBE_TIMEOUT, bus.health()).await {
                registry.bus_health(port, &h);
                beat.beat();
            }
        }
        if let Ok(Ok(())) = tokio::time::timeout(PROBE_TIMEOUT, store.ping()).await {
            store_beat.beat();
        }
        let database_status = store.status();
        if database_status.read_only.is_some() != read_only {
            // Opened while the disk took no writes, the sample connection may be immutable
            // (blind to writes): a fresh one when that changes.
            read_only = database_status.read_only.is_some();
            conn = None;
        }
        registry.database(database_status);
        // The database sample on the blocking pool, with one read connection kept between
        // samples (reopened after an error).
        let (doors2, db) = (doors.clone(), database.clone());
        let now = now_ms();
        let kept = conn.take();
        let sampled = tokio::time::timeout(
            PROBE_TIMEOUT,
            tokio::task::spawn_blocking(move || {
                let c = match kept {
                    Some(c) => c,
                    None => probe::open_read_only(&db)?,
                };
                let s = probe::sample_db(&c, &doors2, since, now)?;
                Ok::<_, rusqlite::Error>((c, s))
            }),
        )
        .await;
        match sampled {
            Ok(Ok(Ok((c, s)))) => {
                conn = Some(c);
                registry.db_sample(s);
            }
            Ok(Ok(Err(e))) => {
                log::debug!(target: "keyway::health", "status sample of the database failed: {e}")
            }
            // Timed out or the worker failed: the connection is gone with it; reopened next time.
            _ => {}
        }
        let dir = database
            .parent()
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("."));
        registry.disk(probe::disk(&dir).ok());

        let snapshot = registry.snapshot(now_ms());
        let problems = checks::evaluate(&snapshot, limits);
        checks::log_changes(&tracker.update(&problems));
        let line = checks::status_line(&snapshot, &problems);
        registry.set_problems(problems);
        if line != last_status {
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Status(&line)]);
            last_status = line;
        }
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(PROBE_EVERY) => {}
        }
    }
}

/// Binds the status socket and serves it until `shutdown`. A socket that cannot be bound is
/// logged (keyway still opens doors; `keyway status` will say the daemon is not reachable).
pub fn spawn_status_socket(
    path: PathBuf,
    registry: Registry,
    shutdown: watch::Receiver<bool>,
) -> Option<tokio::task::JoinHandle<()>> {
    match server::bind(&path) {
        Ok(listener) => {
            log::info!(target: "keyway::status", socket:% = path.display(); "status socket {}", path.display());
            let answer = move || {
                let r = registry.clone();
                async move { r.snapshot(now_ms()) }
            };
            Some(tokio::spawn(server::serve(
                listener, path, answer, shutdown,
            )))
        }
        Err(e) => {
            log::error!(target: "keyway::status", "{e}; keyway status will not reach this daemon");
            None
        }
    }
}

/// systemd's watchdog: `WATCHDOG_USEC` set for us (`WATCHDOG_PID` ours or absent, as
/// sd_watchdog_enabled(3) reads it). Ping every third of it.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec) / 3)
}
