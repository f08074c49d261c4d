//! The daemon: wires config, store, NFC readers and OSDP buses together on tokio.
//!
//! Tasks: one store thread (the only SQLite writer), one OSDP bus task per serial port (each
//! serving the PD addresses of the doors on that bus), one NFC reader loop per door. A tap runs
//! inside its door's reader loop, so one door never waits for another's phone. Every
//! transport goes through the one access pipeline ([`access`]).

pub mod access;
pub mod ble;
mod cloud;
pub mod door;
pub mod health;
pub mod store;
pub mod supervise;
pub mod tap;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{oneshot, watch};

use crate::aliro::reader::ReaderIdentity;
use crate::card::WiegandBits;
use crate::config::{self, Door, Validated};
use crate::osdp::{AttemptId, PdConfig, PdEvent, PdIdentity, RawCard, RawFormat, Verdict};
use crate::serial::{self, BusConfig, BusEvent, BusHandle};

pub use access::{shared_limiter, PanelSink, SharedLimiter, VerdictWait};
pub use door::{run_door, run_door_observed, DoorRuntime};
pub use store::{StoreError, StoreHandle, StoreOptions};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("door \"{door}\": reader key: {source}")]
    Key {
        door: String,
        source: config::KeyFileError,
    },
    #[error("OSDP bus {port}: {message}")]
    Bus { port: String, message: String },
    #[error("signal handler: {0}")]
    Signal(std::io::Error),
    #[error("{0}")]
    TaskDied(#[from] supervise::Fatal),
    #[error("cloud link: {0}")]
    Cloud(String),
}

/// Runs until SIGTERM or SIGINT, then stops every task and returns.
pub async fn run(cfg: Validated) -> Result<(), DaemonError> {
    let (store, store_thread) = StoreHandle::open_with(
        &cfg.daemon.database,
        store::StoreOptions {
            retention: cfg.events,
            time_zone: Some(cfg.time_zone.clone()),
            ..store::StoreOptions::default()
        },
    )?;
    // The cloud link's contact, shared with every door's pipeline (offline policy).
    let contact = cloud::contact(&cfg)?;
    let store = store.with_cloud_contact(contact.clone());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let registry = crate::status::Registry::new(&cfg);
    registry.set_cloud_contact(contact.clone());
    let watchdog = health::watchdog_interval();
    let mut supervisor = supervise::Supervisor::new(watchdog.is_some());
    // The store thread is watched through a blocking-pool task that joins it.
    let store_beat = supervise::Heartbeat::default();
    let store_done = tokio::task::spawn_blocking(move || store_thread.join());
    supervisor.watch(
        "store",
        tokio::spawn(async move {
            let _ = store_done.await;
        }),
        store_beat.clone(),
        Some(health::PROBE_STALL),
    );
    let mut probed_buses = Vec::new();

    // One bus per serial port; doors find their bus handle by port.
    let mut buses: Vec<(std::path::PathBuf, BusHandle, Pending)> = Vec::new();
    for (port, doors) in cfg.buses() {
        let mut key_files = std::collections::BTreeMap::new();
        let mut pds = Vec::with_capacity(doors.len());
        for d in &doors {
            let mut pd = PdConfig::new(d.address);
            pd.identity = PdIdentity {
                vendor_code: u32::from_le_bytes([
                    cfg.vendor_code[2],
                    cfg.vendor_code[1],
                    cfg.vendor_code[0],
                    0,
                ]),
                model: cfg.model,
                version: 1,
                serial: cfg.serial_number,
                firmware: firmware_version(),
            };
            pd.outputs = d.outputs;
            pd.baud = d.baud;
            pd.secure = secure_config(d, &d.osdp, &mut key_files)?;
            pd.verdict_window = d.osdp.verdict_window;
            pds.push(pd);
        }
        let bus_cfg = BusConfig {
            path: port.clone(),
            baud: doors.first().map(|d| d.baud).unwrap_or(9600),
            pds,
            key_files,
            // Beside the database: a panel's osdp_COMSET survives restarts.
            com_file: Some(com_file_for(&cfg.daemon.database, &port)),
        };
        let (handle, mut events, task) =
            serial::spawn_bus(bus_cfg, shutdown_rx.clone()).map_err(|e| DaemonError::Bus {
                port: port.display().to_string(),
                message: e.to_string(),
            })?;
        let port_name = port.display().to_string();
        let bus_beat = supervise::Heartbeat::default();
        supervisor.watch(
            &format!("osdp bus {port_name}"),
            tokio::spawn(async move {
                let _ = task.await;
            }),
            bus_beat.clone(),
            Some(health::PROBE_STALL),
        );
        probed_buses.push((port_name.clone(), handle.clone(), bus_beat));
        let pending = Pending::default();
        let delivered = pending.clone();
        let verdicts = store.clone();
        let seen = registry.clone();
        tasks.spawn(async move {
            loop {
                match events.recv().await {
                    Ok(event) => {
                        seen.bus_event(&port_name, &event);
                        on_bus_event(&port_name, &event, &delivered, &verdicts).await;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        log::warn!(target: "keyway::osdp", port = port_name.as_str();
                            "osdp {port_name}: {n} bus events not logged (logger fell behind)")
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                }
            }
        });
        buses.push((port, handle, pending));
    }

    for door in cfg.doors.iter().filter(|d| d.accept_cards) {
        log::warn!(target: "keyway::daemon", door = door.id.as_str();
            "door {}: accepts physical cards identified by UID only; a UID is readable and \
             clonable by anyone with a reader, so keep this to the cutover", door.id);
    }
    for door in &cfg.doors {
        let key = config::load_private_key(&door.private_key_file).map_err(|source| {
            DaemonError::Key {
                door: door.id.clone(),
                source,
            }
        })?;
        let identity = Arc::new(ReaderIdentity::new(door.group_id, door.sub_id, key));
        let (bus, pending) = buses
            .iter()
            .find(|(p, _, _)| *p == door.port)
            .map(|(_, h, pending)| (h.clone(), pending.clone()))
            .ok_or_else(|| DaemonError::Bus {
                port: door.port.display().to_string(),
                message: "no bus task for this door".into(),
            })?;
        let rt = DoorRuntime {
            door: Arc::new(door.clone()),
            identity,
            store: store.clone(),
            nfc: cfg.nfc.clone(),
            limiter: shared_limiter(access::RateLimitConfig::default()),
        };
        let panel = BusPanel {
            bus,
            pending: pending.clone(),
        };
        // The same door over BLE, when configured: same identity, store, panel and limiter.
        // Its adapter task may idle for ever, so only its end is watched.
        if door.ble.is_some() {
            let ble_rt = ble::BleDoorRuntime {
                door: rt.door.clone(),
                identity: rt.identity.clone(),
                store: store.clone(),
                stats: Arc::default(),
                limiter: rt.limiter.clone(),
            };
            registry.ble_stats(&door.id, ble_rt.stats.clone());
            let (panel, shutdown) = (panel.clone(), shutdown_rx.clone());
            supervisor.spawn_restartable(
                &format!("door {} ble", door.id),
                None,
                Box::new(move || {
                    let rt = ble::BleDoorRuntime {
                        door: ble_rt.door.clone(),
                        identity: ble_rt.identity.clone(),
                        store: ble_rt.store.clone(),
                        stats: ble_rt.stats.clone(),
                        limiter: ble_rt.limiter.clone(),
                    };
                    Box::pin(ble::run_ble_door(rt, panel.clone(), shutdown.clone()))
                }),
            );
        }
        let (shutdown, seen) = (shutdown_rx.clone(), registry.clone());
        supervisor.spawn_restartable(
            &format!("door {}", door.id),
            Some(door_stall_limit(&cfg.nfc)),
            Box::new(move || {
                let rt = DoorRuntime {
                    door: rt.door.clone(),
                    identity: rt.identity.clone(),
                    store: rt.store.clone(),
                    nfc: rt.nfc.clone(),
                    limiter: rt.limiter.clone(),
                };
                let seen = seen.clone();
                let id = rt.door.id.clone();
                Box::pin(run_door_observed(
                    rt,
                    panel.clone(),
                    shutdown.clone(),
                    move |ev| seen.reader_event(&id, ev),
                ))
            }),
        );
    }

    let health_inputs = health::HealthInputs {
        registry: registry.clone(),
        buses: probed_buses,
        store: store.clone(),
        store_beat,
        database: cfg.daemon.database.clone(),
        limits: crate::status::health::Limits {
            acl_max_age: cfg
                .daemon
                .acl_max_age_hours
                .map(|h| std::time::Duration::from_secs(u64::from(h) * 3600)),
        },
    };
    let shutdown = shutdown_rx.clone();
    supervisor.spawn_restartable(
        "health",
        Some(health::PROBE_STALL),
        Box::new(move || Box::pin(health::run(health_inputs.clone(), shutdown.clone()))),
    );
    if let Some(h) = health::spawn_status_socket(
        cfg.daemon.status_socket.clone(),
        registry.clone(),
        shutdown_rx.clone(),
    ) {
        tasks.spawn(async move {
            let _ = h.await;
        });
    }
    cloud::spawn(
        &cfg,
        contact,
        registry.clone(),
        &mut tasks,
        shutdown_rx.clone(),
    )?;

    let database = cfg.daemon.database.display().to_string();
    // A second, short-lived connection (the store thread owns the first): the ACL's size for
    // the start-up line and STATUS=, so an empty ACL is visible at once. Read-only (the disk
    // may take no writes) and the kept count (not a count of millions of rows).
    let acl = match crate::acl::Store::open_read_only(&cfg.daemon.database)
        .and_then(|s| Ok(crate::acl::credential_count(&s.conn)?))
    {
        Ok(0) => "ACL empty (keyway acl import FILE)".to_string(),
        Ok(n) => format!("ACL {n} credential(s)"),
        Err(e) => format!("ACL size unknown: {e}"),
    };
    let status = format!(
        "serving {} door(s), database {database}, {acl}",
        cfg.doors.len()
    );
    notify_ready(&status);
    log::info!(target: "keyway::daemon", doors = cfg.doors.len(), database = database.as_str();
        "keyway {} {status}", env!("CARGO_PKG_VERSION"));

    let outcome = supervise_until_signal(&mut supervisor, &registry, watchdog).await;
    log::info!(target: "keyway::daemon", "stopping");
    let _ = shutdown_tx.send(true);
    // Each bus's event logger ends when its broadcast channel closes: when the bus task and
    // every handle (these, and the doors' as they stop) are gone.
    drop(buses);
    // The store thread's watcher ends only once the store handle is dropped (below).
    let mut handles = supervisor.into_handles();
    let store_watch = handles.remove(0);
    for h in handles {
        tasks.spawn(async move {
            let _ = h.await;
        });
    }
    // Readers notice shutdown within one status poll; bound the wait anyway.
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(std::time::Duration::from_secs(5), drain)
        .await
        .is_err()
    {
        log::warn!(target: "keyway::daemon", "some tasks did not stop within 5 s");
        tasks.abort_all();
    }
    drop(store);
    // The store thread finishes queued writes, then ends.
    let _ = store_watch.await;
    outcome
}

/// The main loop: checks every task each second and pings systemd's watchdog while all are
/// alive (this loop being wedged stops the pings too). Ends on SIGTERM/SIGINT, or with the
/// error of a task that died for good.
async fn supervise_until_signal(
    supervisor: &mut supervise::Supervisor,
    registry: &crate::status::Registry,
    watchdog: Option<std::time::Duration>,
) -> Result<(), DaemonError> {
    let signal = wait_for_signal();
    tokio::pin!(signal);
    let tick = watchdog
        .unwrap_or(std::time::Duration::from_secs(1))
        .min(std::time::Duration::from_secs(1));
    let mut ticks = tokio::time::interval(tick);
    loop {
        tokio::select! {
            r = &mut signal => return r,
            _ = ticks.tick() => {
                let checked = supervisor.check();
                registry.set_tasks(supervisor.statuses());
                checked?;
                if watchdog.is_some() && supervisor.healthy() {
                    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
                }
            }
        }
    }
}

/// How long a door's reader loop may go without being polled: its longest bounded wait (a
/// whole tap, a reader retry, the failure pause) plus pcscd's slack, with a margin.
fn door_stall_limit(nfc: &config::NfcConfig) -> std::time::Duration {
    let longest = nfc
        .transaction_timeout()
        .max(nfc.reader_retry())
        .max(access::RateLimitConfig::default().max_penalty);
    longest + std::time::Duration::from_secs(20)
}

/// The door's secure-channel settings with its SCBK loaded (never logged). Install mode
/// applies only while no key is stored: once KEYSET wrote the file, SCBK-D is refused.
fn secure_config(
    door: &Door,
    opts: &config::OsdpDoorOptions,
    key_files: &mut std::collections::BTreeMap<u8, std::path::PathBuf>,
) -> Result<Option<crate::osdp::SecureConfig>, DaemonError> {
    let Some(path) = &opts.scbk_file else {
        return Ok(None);
    };
    let scbk = serial::load_scbk(path).map_err(|e| DaemonError::Bus {
        port: door.port.display().to_string(),
        message: format!("door \"{}\": {e}", door.id),
    })?;
    if scbk.is_none() && !opts.install_mode {
        return Err(DaemonError::Bus {
            port: door.port.display().to_string(),
            message: format!(
                "door \"{}\": no SCBK in {} and install_mode is off",
                door.id,
                path.display()
            ),
        });
    }
    let install_mode = opts.install_mode && scbk.is_none();
    log::info!(target: "keyway::osdp", door = door.id.as_str(), install_mode, enforce_secure = opts.enforce_secure;
        "door {}: OSDP secure channel {}", door.id, if install_mode { "in install mode (SCBK-D until KEYSET)" } else { "with stored SCBK" });
    key_files.insert(door.address, path.clone());
    Ok(Some(crate::osdp::SecureConfig {
        scbk,
        install_mode,
        enforce_secure: opts.enforce_secure,
    }))
}

/// `<database dir>/osdp-<port file name>.com.json`, one per serial line.
fn com_file_for(database: &std::path::Path, port: &std::path::Path) -> std::path::PathBuf {
    let name = port
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "bus".into());
    database
        .parent()
        .unwrap_or(std::path::Path::new("."))
        .join(format!("osdp-{name}.com.json"))
}

fn firmware_version() -> [u8; 3] {
    let v = |s: &str| s.parse::<u8>().unwrap_or(0);
    [
        v(env!("CARGO_PKG_VERSION_MAJOR")),
        v(env!("CARGO_PKG_VERSION_MINOR")),
        v(env!("CARGO_PKG_VERSION_PATCH")),
    ]
}

/// The cards in flight on one bus, by attempt id: when each was presented (so the bus can
/// report tap-to-RAW) and the attempt waiting for the panel's verdict on it. Several attempts
/// of one door (BLE phones and an NFC tap at once) each get their own verdict.
#[derive(Clone, Default)]
pub struct Pending(Arc<Mutex<PendingState>>);

#[derive(Default)]
struct PendingState {
    started: HashMap<AttemptId, Instant>,
    verdicts: HashMap<AttemptId, oneshot::Sender<Verdict>>,
}

/// How many cards of one bus may be in flight; the PDs' own queues are bounded too.
const MAX_PENDING: usize = 64;

impl Pending {
    /// Attempt `attempt`'s card is on its way; its verdict goes to the returned receiver.
    pub fn push(&self, attempt: AttemptId, started: Instant) -> Option<oneshot::Receiver<Verdict>> {
        let mut st = self.0.lock().ok()?;
        // Attempts that stopped waiting (or whose card never left) go first.
        st.verdicts.retain(|_, tx| !tx.is_closed());
        if st.started.len() >= MAX_PENDING {
            let oldest = st.started.iter().min_by_key(|(_, t)| **t).map(|(a, _)| *a);
            if let Some(a) = oldest {
                st.started.remove(&a);
            }
        }
        if st.verdicts.len() >= MAX_PENDING {
            return None;
        }
        st.started.insert(attempt, started);
        let (tx, rx) = oneshot::channel();
        st.verdicts.insert(attempt, tx);
        Some(rx)
    }

    /// The card of `attempt` could not be queued: nothing will come.
    fn forget(&self, attempt: AttemptId) {
        if let Ok(mut st) = self.0.lock() {
            st.started.remove(&attempt);
            st.verdicts.remove(&attempt);
        }
    }

    /// The card of `attempt` went out: when it was presented.
    fn sent(&self, attempt: AttemptId) -> Option<Instant> {
        self.0.lock().ok()?.started.remove(&attempt)
    }

    /// The panel's verdict on the card of `attempt`, to the attempt if it still waits.
    fn verdict(&self, attempt: AttemptId, verdict: Verdict) {
        let tx = self
            .0
            .lock()
            .ok()
            .and_then(|mut st| st.verdicts.remove(&attempt));
        if let Some(tx) = tx {
            // The attempt may have stopped waiting; then only the event row gets the verdict.
            let _ = tx.send(verdict);
        }
    }
}

/// The daemon's [`PanelSink`]: the door's PD on its OSDP bus.
#[derive(Clone)]
struct BusPanel {
    bus: BusHandle,
    pending: Pending,
}

impl PanelSink for BusPanel {
    fn send_card(
        &self,
        door: &Door,
        bits: WiegandBits,
        attempt: AttemptId,
        started: Instant,
    ) -> Option<VerdictWait> {
        let raw = RawCard {
            reader: 0,
            format: RawFormat::Wiegand,
            bit_count: bits.bit_count,
            data: bits.data,
        };
        let wait = self.pending.push(attempt, started);
        let (bus, pending, address, id) = (
            self.bus.clone(),
            self.pending.clone(),
            door.address,
            door.id.clone(),
        );
        // The bus task answers within one poll; the attempt need not wait for it.
        tokio::spawn(async move {
            if let Err(e) = bus.send_attempt(address, raw, Some(attempt)).await {
                pending.forget(attempt);
                log::error!(target: "keyway::osdp", door = id.as_str();
                    "door {id}: card not queued for the panel: {e}");
            }
        });
        wait
    }
}

/// One bus event: logged; a card's departure timed; a verdict handed to its attempt and
/// stored with its event row (by attempt id).
pub async fn on_bus_event(port: &str, event: &BusEvent, pending: &Pending, store: &StoreHandle) {
    let (address, event) = match event {
        BusEvent::Pd { addr, event } => (*addr, event),
        BusEvent::PortOpened { .. } => {
            log::info!(target: "keyway::osdp", port = port; "osdp {port}: port open");
            return;
        }
        BusEvent::PortError {
            error, retry_in, ..
        } => {
            log::warn!(target: "keyway::osdp", port = port, message_id = crate::logging::catalog::SERIAL_PORT_FAILED;
                "osdp {port}: {error}; retrying in {retry_in:?}");
            return;
        }
    };
    match event {
        PdEvent::CardSent { attempt, .. } => {
            let ms = attempt
                .and_then(|a| pending.sent(a))
                .map(|t| t.elapsed().as_secs_f64() * 1000.0)
                .unwrap_or(-1.0);
            log::info!(target: "keyway::osdp", port = port, address = address, tap_to_raw_ms = ms;
                "osdp {port} pd {address}: raw sent, {ms:.1} ms after the tap");
        }
        PdEvent::PanelVerdict {
            verdict, attempt, ..
        } => {
            let v = verdict.as_str();
            log::info!(target: "keyway::osdp", port = port, address = address, verdict = v;
                "osdp {port} pd {address}: panel verdict {v}");
            // A card queued by something other than an access attempt has no event row.
            let Some(a) = *attempt else { return };
            pending.verdict(a, *verdict);
            if let Err(e) = store.panel_verdict(a, v).await {
                log::warn!(target: "keyway::osdp", port = port, address = address;
                    "osdp {port} pd {address}: panel verdict not stored: {e}");
            }
        }
        other => {
            log::info!(target: "keyway::osdp", port = port, address = address;
                "osdp {port} pd {address}: {other:?}")
        }
    }
}

fn notify_ready(status: &str) {
    // Only under systemd (Type=notify); elsewhere NOTIFY_SOCKET is unset and this is a no-op.
    // STATUS= is what `systemctl status keyway` shows.
    let _ = sd_notify::notify(
        false,
        &[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(status),
        ],
    );
}

async fn wait_for_signal() -> Result<(), DaemonError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Signal)?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
