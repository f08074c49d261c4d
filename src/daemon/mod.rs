//! The daemon: wires config, store, NFC readers and OSDP buses together on tokio.
//!
//! Tasks: one store thread (the only SQLite writer), one OSDP bus task per serial port (each
//! serving the PD addresses of the doors on that bus), one NFC reader loop per door. A tap runs
//! inside its door's reader loop, so one door never waits for another's phone.

mod store;
pub mod tap;

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;

use crate::aliro::reader::{Randomness, ReaderIdentity, TransactionParams};
use crate::config::{self, Door, Validated};
use crate::events::{self, AccessEvent, Decision as EventDecision, Transport};
use crate::nfc::{ReaderEvent, ReaderLoop, ReaderLoopConfig};
use crate::osdp::{PdConfig, PdEvent, RawCard};
use crate::serial::{self, BusConfig, BusHandle};

pub use store::{StoreError, StoreHandle};
use tap::{run_tap, TapContext, TapReport};

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
    let mut buses: Vec<(std::path::PathBuf, BusHandle)> = Vec::new();
    for (port, doors) in cfg.buses() {
        let pds = doors
            .iter()
            .map(|d| PdConfig {
                address: d.address,
                vendor_code: cfg.vendor_code,
                model: cfg.model,
                version: 1,
                serial_number: cfg.serial_number,
                firmware: firmware_version(),
                outputs: d.outputs,
            })
            .collect();
        let bus_cfg = BusConfig {
            path: port.clone(),
            baud: doors.first().map(|d| d.baud).unwrap_or(9600),
            pds,
        };
        let (handle, mut events, task) = serial::spawn_bus(bus_cfg, shutdown_rx.clone())
            .map_err(|e| DaemonError::Bus {
                port: port.display().to_string(),
                message: e.to_string(),
            })?;
        tasks.spawn(async move {
            let _ = task.await;
        });
        let port_name = port.display().to_string();
        tasks.spawn(async move {
            while let Some((address, event)) = events.recv().await {
                log_bus_event(&port_name, address, &event);
            }
        });
        buses.push((port, handle));
    }

    for door in &cfg.doors {
        let key =
            config::load_private_key(&door.private_key_file).map_err(|source| DaemonError::Key {
                door: door.id.clone(),
                source,
            })?;
        let identity = Arc::new(ReaderIdentity::new(door.group_id, door.sub_id, key));
        let bus = buses
            .iter()
            .find(|(p, _)| *p == door.port)
            .map(|(_, h)| h.clone())
            .ok_or_else(|| DaemonError::Bus {
                port: door.port.display().to_string(),
                message: "no bus task for this door".into(),
            })?;
        let loop_cfg = ReaderLoopConfig {
            door: door.id.clone(),
            pattern: door.reader_pattern.clone(),
            apdu_timeout: cfg.nfc.apdu_timeout(),
            retry: cfg.nfc.reader_retry(),
        };
        let door = Arc::new(door.clone());
        let store = store.clone();
        let shutdown = shutdown_rx.clone();
        let txn_timeout = cfg.nfc.transaction_timeout();
        tasks.spawn(async move {
            let door_for_events = door.id.clone();
            ReaderLoop::new(loop_cfg)
                .run(
                    shutdown,
                    |link| {
                        let door = door.clone();
                        let identity = identity.clone();
                        let store = store.clone();
                        let bus = bus.clone();
                        async move {
                            let started = Instant::now();
                            let ctx = TapContext {
                                door: &door.id,
                                identity: &identity,
                                params: TransactionParams::nfc(door.auth_policy.code()),
                                store: &store,
                                transaction_timeout: txn_timeout,
                            };
                            let randomness = Randomness::generate(&mut rand_core::OsRng);
                            let report = run_tap(&ctx, &link, randomness, started, |bits| {
                                let raw = RawCard::wiegand(bits.bit_count, bits.data);
                                if let Err(e) = bus.send_card(door.address, raw, started) {
                                    log::error!(target: "keyway::osdp",
                                        door = door.id.as_str();
                                        "door {}: card not queued for the panel: {e}", door.id);
                                }
                            })
                            .await;
                            record(&store, &door, report).await;
                        }
                    },
                    |ev| log_reader_event(&door_for_events, &ev),
                )
                .await;
        });
    }

    notify_ready();
    log::info!(target: "keyway::daemon", doors = cfg.doors.len(); "keyway {} running with {} door(s)", env!("CARGO_PKG_VERSION"), cfg.doors.len());

    wait_for_signal().await?;
    log::info!(target: "keyway::daemon", "stopping");
    let _ = shutdown_tx.send(true);
    // Readers notice shutdown within one status poll; bound the wait anyway.
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(std::time::Duration::from_secs(5), drain)
        .await
        .is_err()
    {
        log::warn!(target: "keyway::daemon", "some tasks did not stop within 5 s");
        tasks.abort_all();
    }
    drop(buses);
    drop(store);
    // The store thread finishes queued writes, then ends.
    let _ = tokio::task::spawn_blocking(move || store_thread.join()).await;
    Ok(())
}

fn firmware_version() -> [u8; 3] {
    let v = |s: &str| s.parse::<u8>().unwrap_or(0);
    [
        v(env!("CARGO_PKG_VERSION_MAJOR")),
        v(env!("CARGO_PKG_VERSION_MINOR")),
        v(env!("CARGO_PKG_VERSION_PATCH")),
    ]
}

/// Turns a tap report into an event row (durable first) and a journald entry.
async fn record(store: &StoreHandle, door: &Door, report: TapReport) {
    let (decision, reason, person) = match (&report.decision, &report.error) {
        (Some(crate::acl::Decision::Grant(g)), _) => {
            (EventDecision::Granted, "granted".to_string(), Some(g.person_id.clone()))
        }
        (Some(crate::acl::Decision::Deny(r)), _) => {
            (EventDecision::Denied, r.as_str().to_string(), None)
        }
        (None, Some(e)) => (EventDecision::Error, e.code().to_string(), None),
        (None, None) => (EventDecision::Error, "no_decision".to_string(), None),
    };
    if let Some(e) = &report.error {
        log::warn!(target: "keyway::nfc", door = door.id.as_str(), error = e.code();
            "door {}: tap ended: {e}", door.id);
    }
    let latency = report.to_decision.unwrap_or(report.total);
    let event = AccessEvent {
        time_ms: unix_ms(),
        door: door.id.clone(),
        transport: Transport::Nfc,
        endpoint_fingerprint: report.fingerprint.clone(),
        person_id: person,
        decision,
        reason,
        latency_ms: u32::try_from(latency.as_millis()).unwrap_or(u32::MAX),
    };
    match store.record(event.clone()).await {
        Ok(id) => events::log_event(&event, id),
        Err(e) => {
            log::error!(target: "keyway::daemon", door = door.id.as_str();
                "door {}: event could not be stored: {e}", door.id);
            events::log_event(&event, -1);
        }
    }
}

fn unix_ms() -> i64 {
    let now = time::OffsetDateTime::now_utc();
    i64::try_from(now.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

fn log_reader_event(door: &str, ev: &ReaderEvent) {
    match ev {
        ReaderEvent::ReaderFound(name) => {
            log::info!(target: "keyway::nfc", door = door, reader = name.as_str(); "door {door}: reader found: {name}")
        }
        ReaderEvent::ReaderLost(name) => {
            log::warn!(target: "keyway::nfc", door = door, reader = name.as_str(); "door {door}: reader lost: {name}")
        }
        ReaderEvent::ServiceDown(msg) => {
            log::warn!(target: "keyway::nfc", door = door; "door {door}: PC/SC unavailable: {msg}")
        }
    }
}

fn log_bus_event(port: &str, address: u8, event: &PdEvent) {
    log::info!(target: "keyway::osdp", port = port, address = address; "osdp {port} pd {address}: {event}");
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
