//! The daemon: wires config, store, NFC readers and OSDP buses together on tokio.
//!
//! Tasks: one store thread (the only SQLite writer), one OSDP bus task per serial port (each
//! serving the PD addresses of the doors on that bus), one NFC reader loop per door. A tap runs
//! inside its door's reader loop, so one door never waits for another's phone.

pub mod ble;
pub mod door;
mod store;
pub mod tap;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{oneshot, watch};

use crate::aliro::reader::ReaderIdentity;
use crate::card::WiegandBits;
use crate::config::{self, Door, Validated};
use crate::osdp::{PdConfig, PdEvent, PdIdentity, RawCard, RawFormat, Verdict};
use crate::serial::{self, BusConfig, BusEvent, BusHandle};

pub use door::{run_door, shared_limiter, DoorRuntime, PanelSink, SharedLimiter};
pub use store::{StoreError, StoreHandle};
pub use tap::VerdictWait;

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
}

/// Runs until SIGTERM or SIGINT, then stops every task and returns.
pub async fn run(cfg: Validated) -> Result<(), DaemonError> {
    let (store, store_thread) = StoreHandle::open(&cfg.daemon.database)?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();

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
            if let Some(opts) = cfg.osdp_options.get(&d.id) {
                pd.secure = secure_config(d, opts, &mut key_files)?;
                pd.verdict_window = opts.verdict_window;
            }
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
        tasks.spawn(async move {
            let _ = task.await;
        });
        let port_name = port.display().to_string();
        let pending = Pending::default();
        let delivered = pending.clone();
        let door_of: HashMap<u8, String> =
            doors.iter().map(|d| (d.address, d.id.clone())).collect();
        let verdicts = store.clone();
        tasks.spawn(async move {
            loop {
                match events.recv().await {
                    Ok(event) => {
                        log_bus_event(&port_name, &event, &delivered);
                        if let BusEvent::Pd {
                            addr,
                            event: PdEvent::PanelVerdict { verdict, .. },
                        } = &event
                        {
                            if let Some(door) = door_of.get(addr) {
                                // Recorded with the door's latest granted event.
                                if let Err(e) = verdicts.panel_verdict(door, verdict.as_str()).await
                                {
                                    log::warn!(target: "keyway::osdp", door = door.as_str();
                                        "door {door}: panel verdict not stored: {e}");
                                }
                            }
                        }
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
            limiter: door::shared_limiter(crate::nfc::ratelimit::RateLimitConfig::default()),
        };
        let panel = BusPanel {
            bus,
            pending: pending.clone(),
        };
        // The same door over BLE, when configured: same identity, store and panel.
        if let Some((_, b)) = cfg.ble.iter().find(|(id, _)| *id == door.id) {
            let ble_rt = ble::BleDoorRuntime {
                door: rt.door.clone(),
                identity: rt.identity.clone(),
                store: store.clone(),
                ble: b.clone(),
                stats: Arc::default(),
                limiter: rt.limiter.clone(),
            };
            tasks.spawn(ble::run_ble_door(
                ble_rt,
                panel.clone(),
                shutdown_rx.clone(),
            ));
        }
        tasks.spawn(run_door(rt, panel, shutdown_rx.clone()));
    }

    notify_ready();
    log::info!(target: "keyway::daemon", doors = cfg.doors.len(); "keyway {} running with {} door(s)", env!("CARGO_PKG_VERSION"), cfg.doors.len());

    wait_for_signal().await?;
    log::info!(target: "keyway::daemon", "stopping");
    let _ = shutdown_tx.send(true);
    // Each bus's event logger ends when its broadcast channel closes: when the bus task and
    // every handle (these, and the doors' as they stop) are gone.
    drop(buses);
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
    let _ = tokio::task::spawn_blocking(move || store_thread.join()).await;
    Ok(())
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

/// Per PD address: when each queued card was presented (so the bus can report tap-to-RAW),
/// and the tap waiting for the panel's verdict on its card.
#[derive(Clone, Default)]
struct Pending(Arc<Mutex<PendingState>>);

#[derive(Default)]
struct PendingState {
    started: HashMap<u8, VecDeque<Instant>>,
    /// The waiting tap, and whether its card has left yet (`CardSent`): only verdicts after
    /// that are about its card; earlier ones close the previous card.
    verdicts: HashMap<u8, (oneshot::Sender<Verdict>, bool)>,
}

/// How many undelivered cards one door may have queued; the PD's own queue is bounded too.
const MAX_PENDING: usize = 16;

impl Pending {
    fn push(&self, address: u8, started: Instant) {
        if let Ok(mut st) = self.0.lock() {
            let q = st.started.entry(address).or_default();
            if q.len() >= MAX_PENDING {
                q.pop_front();
            }
            q.push_back(started);
        }
    }
    fn pop(&self, address: u8) -> Option<Instant> {
        self.0.lock().ok()?.started.get_mut(&address)?.pop_front()
    }
    /// The next verdict of `address` goes to the returned receiver (replacing an older wait:
    /// one tap at a time per door).
    fn wait_verdict(&self, address: u8) -> Option<oneshot::Receiver<Verdict>> {
        let (tx, rx) = oneshot::channel();
        self.0.lock().ok()?.verdicts.insert(address, (tx, false));
        Some(rx)
    }
    /// The card of `address` went out: the waiting tap's verdict is the next one.
    fn card_sent(&self, address: u8) {
        if let Ok(mut st) = self.0.lock() {
            if let Some((_, sent)) = st.verdicts.get_mut(&address) {
                *sent = true;
            }
        }
    }
    fn verdict(&self, address: u8, verdict: Verdict) {
        let Ok(mut st) = self.0.lock() else { return };
        if !matches!(st.verdicts.get(&address), Some((_, true))) {
            return; // about an earlier card
        }
        if let Some((tx, _)) = st.verdicts.remove(&address) {
            // The tap may have stopped waiting; then only the event row gets the verdict.
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
    fn await_verdict(&self, door: &Door) -> Option<VerdictWait> {
        self.pending.wait_verdict(door.address)
    }

    fn send_card(&self, door: &Door, bits: WiegandBits, started: Instant) {
        let raw = RawCard {
            reader: 0,
            format: RawFormat::Wiegand,
            bit_count: bits.bit_count,
            data: bits.data,
        };
        self.pending.push(door.address, started);
        let (bus, address, id) = (self.bus.clone(), door.address, door.id.clone());
        // The bus task answers within one poll; the tap need not wait for it.
        tokio::spawn(async move {
            if let Err(e) = bus.send_card(address, raw).await {
                log::error!(target: "keyway::osdp", door = id.as_str();
                    "door {id}: card not queued for the panel: {e}");
            }
        });
    }
}

fn log_bus_event(port: &str, event: &BusEvent, pending: &Pending) {
    let (address, event) = match event {
        BusEvent::Pd { addr, event } => (*addr, event),
        BusEvent::PortOpened { .. } => {
            log::info!(target: "keyway::osdp", port = port; "osdp {port}: port open");
            return;
        }
        BusEvent::PortError {
            error, retry_in, ..
        } => {
            log::warn!(target: "keyway::osdp", port = port;
                "osdp {port}: {error}; retrying in {retry_in:?}");
            return;
        }
    };
    if let PdEvent::CardSent(_) = event {
        pending.card_sent(address);
        let ms = pending
            .pop(address)
            .map(|t| t.elapsed().as_secs_f64() * 1000.0)
            .unwrap_or(-1.0);
        log::info!(target: "keyway::osdp", port = port, address = address, tap_to_raw_ms = ms;
            "osdp {port} pd {address}: raw sent, {ms:.1} ms after the tap");
        return;
    }
    if let PdEvent::PanelVerdict { verdict, .. } = event {
        pending.verdict(address, *verdict);
        let verdict = verdict.as_str();
        log::info!(target: "keyway::osdp", port = port, address = address, verdict = verdict;
            "osdp {port} pd {address}: panel verdict {verdict}");
        return;
    }
    log::info!(target: "keyway::osdp", port = port, address = address; "osdp {port} pd {address}: {event:?}");
}

fn notify_ready() {
    // Only under systemd (Type=notify); elsewhere NOTIFY_SOCKET is unset and this is a no-op.
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tap_hears_only_the_verdict_on_its_own_card() {
        let p = Pending::default();
        let mut rx = p.wait_verdict(1).unwrap();
        // The previous card is closed as unknown before ours goes out: not ours.
        p.verdict(1, Verdict::Unknown);
        // Another door's card going out does not arm ours.
        p.card_sent(2);
        p.verdict(1, Verdict::Granted);
        assert!(
            rx.try_recv().is_err(),
            "a verdict before our card left was taken"
        );
        p.card_sent(1);
        p.verdict(1, Verdict::Denied);
        assert_eq!(rx.try_recv().unwrap(), Verdict::Denied);
        // Delivered once; later verdicts go nowhere.
        p.verdict(1, Verdict::Granted);
    }
}
