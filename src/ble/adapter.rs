//! The BlueZ adapter (the I/O side of the BLE transport), on `bluer`.
//!
//! One [`serve`] call per door: it powers nothing itself (bluetoothd does), waits for the
//! adapter, then registers the advertisement (Aliro service FFF2 with the reader-group service
//! data), the GATT application (reader characteristic = SPSM + versions; device characteristic
//! = selected version) and the L2CAP LE credit-based channel listener, and accepts connections.
//! Each connection runs in its own task around a sans-IO [`ReaderSession`], bounded by the
//! Aliro timeout; at most `max_connections` run at once and extra ones are closed at once.
//!
//! Recovery: a watchdog asks BlueZ every [`HEALTH_INTERVAL`] whether the adapter is still
//! there and powered, and BlueZ's adapter announcements are watched (a bluetoothd restarted
//! between two polls announces the adapter anew). When bluetoothd restarts, the adapter is
//! removed or powered off, the registrations are dropped and made again once the adapter is
//! back, with a log line for each step.

use std::collections::BTreeMap;
use std::future::Future;
use std::num::NonZeroU16;
use std::sync::atomic::{AtomicI16, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bluer::adv::Advertisement;
use bluer::gatt::local::{
    Application, Characteristic, CharacteristicRead, CharacteristicWrite,
    CharacteristicWriteMethod, ReqError, Service,
};
use bluer::l2cap::{SocketAddr, Stream, StreamListener};
use bluer::SessionEvent;
use futures_util::{FutureExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{watch, Semaphore};

use crate::aliro::AuthenticatedEndpoint;

use super::discovery::{self, ReaderInfo};
use super::policy::Policy;
use super::rssi;
use super::session::{BleError, Event, ReaderSession, SessionOutcome};

/// How often the watchdog checks the adapter.
pub const HEALTH_INTERVAL: Duration = Duration::from_millis(500);
/// Wait before retrying a failed registration.
const RETRY: Duration = Duration::from_secs(1);
/// First handle of keyway's GATT service (service, 2 x declaration + value: 5 handles), above
/// BlueZ's own GAP/GATT/DIS services.
const GATT_SERVICE_HANDLE: u16 = 0x0030;
/// Longest wait for the controller's RSSI of a new connection.
const RSSI_WAIT: Duration = Duration::from_millis(300);
/// Largest read from the channel at once.
const READ_CHUNK: usize = 1024;
/// After the completion notification: how long the phone gets to close the channel itself
/// (closing first could drop the notification still queued in the kernel).
const LINGER: Duration = Duration::from_millis(1000);

/// Static settings of one door's BLE side.
#[derive(Debug, Clone)]
pub struct AdapterConfig {
    /// Door id (logs).
    pub door: String,
    /// `hci0`, ...; `None`: BlueZ's default adapter.
    pub adapter: Option<String>,
    pub group_id: [u8; 16],
    pub sub_id: [u8; 16],
    pub spsm: u16,
    /// Concurrent connections served; more are closed on accept.
    pub max_connections: usize,
    /// Advertised TX power at 1 m (dBm).
    pub tx_power: i8,
    /// Range and intent: which connected phones are served.
    pub policy: Policy,
}

/// What the daemon plugs in: a fresh session per connection and the access decision.
pub trait ConnectionHandler: Clone + Send + Sync + 'static {
    /// What the decision produced (the daemon's ACL decision, or an error).
    type Verdict: Send + 'static;
    /// A new session for a connection accepted at `now`.
    fn session(&self, now: Instant) -> ReaderSession;
    /// The decision for an authenticated phone (ACL; a grant's card handed to the panel).
    fn decide(
        &self,
        endpoint: &AuthenticatedEndpoint,
        started: Instant,
    ) -> impl Future<Output = Self::Verdict> + Send;
    /// After the decision is timed, before the phone is told: waits (bounded) for what the
    /// panel says about it.
    fn confirm(&self, verdict: &mut Self::Verdict) -> impl Future<Output = ()> + Send;
    /// Whether `verdict` opens the door (what the phone is told).
    fn granted(verdict: &Self::Verdict) -> bool;
    /// Called once per connection with what happened.
    fn finished(&self, report: ConnectionReport<Self::Verdict>) -> impl Future<Output = ()> + Send;
}

/// What one connection produced.
#[derive(Debug)]
pub struct ConnectionReport<V> {
    pub peer: String,
    pub endpoint_key: Option<[u8; 65]>,
    pub verdict: Option<V>,
    pub outcome: Option<SessionOutcome>,
    pub error: Option<BleError>,
    /// The channel closed before the session ended (phone walked away).
    pub closed_early: bool,
    /// From accept to the access decision.
    pub to_decision: Option<Duration>,
    pub total: Duration,
}

/// Live numbers (for tests and status).
#[derive(Debug, Default)]
pub struct AdapterStats {
    pub registrations: AtomicUsize,
    /// Times a working registration was lost (bluetoothd gone, adapter removed or off).
    pub losses: AtomicUsize,
    pub accepted: AtomicUsize,
    pub refused_over_limit: AtomicUsize,
    pub refused_by_policy: AtomicUsize,
    pub active: AtomicUsize,
    /// Most connections served at once since start.
    pub peak_active: AtomicUsize,
    /// Links whose RSSI the controller reported (walk-up doors measure every link).
    pub rssi_measured: AtomicUsize,
    /// The last of those readings (dBm).
    pub last_rssi_dbm: AtomicI16,
}

/// Why registering on the adapter failed.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("bluez: {0}")]
    Bluez(#[from] bluer::Error),
    #[error("l2cap listener: {0}")]
    Listen(std::io::Error),
    #[error("adapter not powered")]
    NotPowered,
    /// BlueZ announced the adapter again: a new bluetoothd that knows nothing of keyway's
    /// advertisement, GATT application or anything else registered with the old one.
    #[error("bluetoothd announced {0} again (restarted)")]
    Announced(String),
    /// BlueZ removed the adapter.
    #[error("bluetoothd removed {0}")]
    Removed(String),
    /// The D-Bus signal stream of the session ended.
    #[error("D-Bus session events ended")]
    EventsEnded,
}

/// What a BlueZ session event means for a registration made on adapter `ours`: `None` while
/// it still stands. The health poll alone misses a bluetoothd restart that completes between
/// two polls (the new daemon answers `Powered` like the old one, but keyway's registrations
/// died with the old one); the new daemon's announcement of the adapter does not go unseen.
fn registration_lost(ours: &str, event: Option<SessionEvent>) -> Option<AdapterError> {
    match event {
        Some(SessionEvent::AdapterAdded(name)) if name == ours => {
            Some(AdapterError::Announced(name))
        }
        Some(SessionEvent::AdapterRemoved(name)) if name == ours => {
            Some(AdapterError::Removed(name))
        }
        Some(_) => None,
        None => Some(AdapterError::EventsEnded),
    }
}

/// Serves the door on BlueZ until `shutdown` turns true, re-registering after every loss of
/// bluetoothd or the adapter.
pub async fn serve<H: ConnectionHandler>(
    cfg: AdapterConfig,
    handler: H,
    stats: Arc<AdapterStats>,
    mut shutdown: watch::Receiver<bool>,
) {
    let limit = Arc::new(Semaphore::new(cfg.max_connections));
    let door = cfg.door.as_str();
    let mut was_up = false;
    let mut warned = false;
    loop {
        if *shutdown.borrow() {
            return;
        }
        // serve_once returns Ok only on shutdown.
        match serve_once(&cfg, &handler, &stats, &limit, &mut shutdown, &mut was_up).await {
            Ok(()) => return,
            Err(e) => {
                if was_up {
                    stats.losses.fetch_add(1, Ordering::SeqCst);
                    log::warn!(target: "keyway::ble", door = door;
                        "door {door}: BLE lost ({e}); re-registering when the adapter is back");
                    warned = true;
                } else if !warned {
                    // Once, then quietly: a door configured for BLE on a box without bluetoothd
                    // must not flood the journal.
                    log::warn!(target: "keyway::ble", door = door;
                        "door {door}: BLE not available yet ({e}); retrying every {RETRY:?}");
                    warned = true;
                } else {
                    log::debug!(target: "keyway::ble", door = door; "door {door}: BLE not ready: {e}");
                }
                was_up = false;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(RETRY) => {}
            _ = shutdown.changed() => return,
        }
    }
}

async fn serve_once<H: ConnectionHandler>(
    cfg: &AdapterConfig,
    handler: &H,
    stats: &Arc<AdapterStats>,
    limit: &Arc<Semaphore>,
    shutdown: &mut watch::Receiver<bool>,
    was_up: &mut bool,
) -> Result<(), AdapterError> {
    let door = cfg.door.as_str();
    let session = bluer::Session::new().await?;
    let adapter = match &cfg.adapter {
        Some(name) => session.adapter(name)?,
        None => session.default_adapter().await?,
    };
    // Subscribed before registering, so a restart during the registration is seen too.
    let mut events = Box::pin(session.events().await?);
    // bluetoothd powers adapters itself; setting Powered meanwhile gives org.bluez.Error.Busy.
    if !adapter.is_powered().await? {
        return Err(AdapterError::NotPowered);
    }
    let addr = adapter.address().await?;
    let addr_type = adapter.address_type().await?;

    let listener = StreamListener::bind(SocketAddr::new(addr, addr_type, cfg.spsm))
        .await
        .map_err(AdapterError::Listen)?;
    let app = adapter.serve_gatt_application(application(cfg)).await?;
    let adv = adapter.advertise(advertisement(cfg)).await?;
    stats.registrations.fetch_add(1, Ordering::SeqCst);
    *was_up = true;
    log::info!(target: "keyway::ble", door = door, adapter = adapter.name(), spsm = cfg.spsm;
        "door {door}: BLE advertising on {} ({addr}), L2CAP SPSM 0x{:04X}", adapter.name(), cfg.spsm);

    let mut health = tokio::time::interval(HEALTH_INTERVAL);
    loop {
        tokio::select! {
            _ = shutdown.changed() => {
                drop(adv);
                drop(app);
                return Ok(());
            }
            _ = health.tick() => {
                // Fails when bluetoothd is gone or the adapter was removed.
                if !adapter.is_powered().await? {
                    return Err(AdapterError::NotPowered);
                }
            }
            ev = events.next() => {
                if let Some(lost) = registration_lost(adapter.name(), ev) {
                    return Err(lost);
                }
            }
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(v) => v,
                    Err(e) => return Err(AdapterError::Listen(e)),
                };
                let Ok(permit) = limit.clone().try_acquire_owned() else {
                    stats.refused_over_limit.fetch_add(1, Ordering::SeqCst);
                    log::warn!(target: "keyway::ble", door = door;
                        "door {door}: connection from {} refused: {} connections already served",
                        peer.addr, cfg.max_connections);
                    drop(stream);
                    continue;
                };
                let (handler, stats) = (handler.clone(), stats.clone());
                let (policy, door, dev) = (cfg.policy, cfg.door.clone(), adapter.name().to_string());
                // In the connection's own task: the RSSI question must not hold up accepts.
                tokio::spawn(async move {
                    let peer = peer.addr.to_string();
                    // Range/intent: only walk-up doors need the link's signal.
                    let rssi = if policy.needs_rssi() {
                        link_rssi(&door, &dev, &stream, &peer).await
                    } else {
                        None
                    };
                    if let Some(r) = rssi {
                        stats.last_rssi_dbm.store(r, Ordering::SeqCst);
                        stats.rssi_measured.fetch_add(1, Ordering::SeqCst);
                    }
                    if let Err(refusal) = policy.admit(rssi) {
                        stats.refused_by_policy.fetch_add(1, Ordering::SeqCst);
                        log::info!(target: "keyway::ble", door = door.as_str(), reason = refusal.code();
                            "door {door}: connection from {peer} not served: {refusal}");
                        drop(stream);
                        drop(permit);
                        return;
                    }
                    stats.accepted.fetch_add(1, Ordering::SeqCst);
                    let now_active = stats.active.fetch_add(1, Ordering::SeqCst) + 1;
                    stats.peak_active.fetch_max(now_active, Ordering::SeqCst);
                    let report = connection(stream, peer, &handler).await;
                    handler.finished(report).await;
                    stats.active.fetch_sub(1, Ordering::SeqCst);
                    drop(permit);
                });
            }
        }
    }
}

/// The RSSI the controller measures on this phone's link right now; `None` (logged) when it
/// cannot be read, which a walk-up door treats as "too far to vouch for".
async fn link_rssi(door: &str, dev: &str, stream: &Stream, peer: &str) -> Option<i16> {
    let read = async {
        let handle = stream
            .as_ref()
            .conn_info()
            .map_err(rssi::RssiError::Io)?
            .hci_handle;
        rssi::read(rssi::adapter_index(dev)?, handle, RSSI_WAIT).await
    };
    match read.await {
        Ok(r) => {
            log::debug!(target: "keyway::ble", door = door, rssi = r;
                "door {door}: connection from {peer} at {r} dBm");
            Some(i16::from(r))
        }
        Err(e) => {
            log::info!(target: "keyway::ble", door = door;
                "door {door}: RSSI of {peer} unavailable: {e}");
            None
        }
    }
}

fn advertisement(cfg: &AdapterConfig) -> Advertisement {
    let data = discovery::Advertisement::new(&cfg.group_id, &cfg.sub_id, cfg.tx_power).encode();
    // Flags (3 bytes) + service data FFF2 (28 bytes) fill the 31-byte legacy advertisement;
    // a separate service UUID list does not fit (the service data names the UUID anyway).
    Advertisement {
        service_data: BTreeMap::from([(discovery::SERVICE_UUID, data)]),
        discoverable: Some(true),
        ..Default::default()
    }
}

fn application(cfg: &AdapterConfig) -> Application {
    let info = ReaderInfo {
        spsm: cfg.spsm,
        versions: vec![super::BLE_PROTOCOL_VERSION],
    };
    // A handful of bytes that always encode; an empty value would make the phone give up.
    let value = info.encode().unwrap_or_default();
    // Fixed handles: bluer exports the characteristics in no fixed order, so without them a
    // re-registration (after a bluetoothd restart) could swap their handles under a phone's
    // GATT cache, and the phone would read the write-only characteristic.
    let h = |v: u16| NonZeroU16::new(v);
    Application {
        services: vec![Service {
            uuid: discovery::SERVICE_UUID,
            handle: h(GATT_SERVICE_HANDLE),
            primary: true,
            characteristics: vec![
                Characteristic {
                    uuid: discovery::READER_CHARACTERISTIC_UUID,
                    handle: h(GATT_SERVICE_HANDLE + 2),
                    read: Some(CharacteristicRead {
                        read: true,
                        fun: Box::new(move |_req| {
                            let value = value.clone();
                            async move { Ok(value) }.boxed()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                Characteristic {
                    uuid: discovery::DEVICE_CHARACTERISTIC_UUID,
                    handle: h(GATT_SERVICE_HANDLE + 4),
                    write: Some(CharacteristicWrite {
                        write: true,
                        method: CharacteristicWriteMethod::Fun(Box::new(move |value, _req| {
                            // keyway speaks one BLE version; anything else is refused here so
                            // the phone does not open a channel we would not understand.
                            let ok = value.as_slice() == super::BLE_PROTOCOL_VERSION;
                            async move {
                                if ok {
                                    Ok(())
                                } else {
                                    Err(ReqError::NotSupported)
                                }
                            }
                            .boxed()
                        })),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Runs a step of `session` on tokio's blocking pool and gives the session back. AUTH0 and
/// AUTH1 cost P-256 work (ECDH, a signature check, key derivation); polled on an async worker
/// such a step holds up the runtime's I/O for as long as it computes, and on a slow CPU that
/// is long enough for the OSDP bus's replies to miss the panel's 200 ms limit (libosdp's
/// panel then NAKs and goes offline for 300 s). Fails only if the step panicked.
async fn off_worker<T: Send + 'static>(
    mut session: ReaderSession,
    step: impl FnOnce(&mut ReaderSession) -> T + Send + 'static,
) -> Result<(ReaderSession, T), tokio::task::JoinError> {
    tokio::task::spawn_blocking(move || {
        let out = step(&mut session);
        (session, out)
    })
    .await
}

/// Runs one connection to its end.
async fn connection<H: ConnectionHandler>(
    mut stream: Stream,
    peer: String,
    handler: &H,
) -> ConnectionReport<H::Verdict> {
    let started = Instant::now();
    let new_session = {
        let handler = handler.clone();
        // The reader's ephemeral key is P-256 work too (see `off_worker`).
        tokio::task::spawn_blocking(move || handler.session(started)).await
    };
    let mut report = ConnectionReport {
        peer,
        endpoint_key: None,
        verdict: None,
        outcome: None,
        error: None,
        closed_early: false,
        to_decision: None,
        total: Duration::ZERO,
    };
    let mut session = match new_session {
        Ok(session) => session,
        Err(e) => {
            log::error!(target: "keyway::ble", "connection from {}: session setup failed: {e}", report.peer);
            report.closed_early = true;
            report.total = started.elapsed();
            return report;
        }
    };
    let mut buf = vec![0u8; READ_CHUNK];
    'conn: loop {
        let deadline = tokio::time::Instant::from_std(session.deadline());
        let read = tokio::time::timeout_at(deadline, stream.read(&mut buf)).await;
        let mut events = match read {
            Err(_) => match session.poll(Instant::now()) {
                Err(e) => {
                    report.error = Some(e);
                    break;
                }
                Ok(()) => continue,
            },
            Ok(Ok(0)) | Ok(Err(_)) => {
                report.closed_early = true;
                break;
            }
            Ok(Ok(n)) => {
                let bytes = buf.get(..n).unwrap_or_default().to_vec();
                match off_worker(session, move |s| s.on_bytes(&bytes, Instant::now())).await {
                    Ok((s, Ok(ev))) => {
                        session = s;
                        ev
                    }
                    Ok((_, Err(e))) => {
                        report.error = Some(e);
                        break;
                    }
                    Err(e) => {
                        log::error!(target: "keyway::ble", "connection from {}: session step failed: {e}", report.peer);
                        report.closed_early = true;
                        break;
                    }
                }
            }
        };
        while !events.is_empty() {
            let ev = events.remove(0);
            match ev {
                Event::Send(frame) => {
                    let write = tokio::time::timeout_at(deadline, stream.write_all(&frame)).await;
                    if !matches!(write, Ok(Ok(()))) {
                        report.closed_early = true;
                        break 'conn;
                    }
                }
                Event::Authenticated(endpoint) => {
                    report.endpoint_key = Some(endpoint.public_key);
                    let mut verdict = handler.decide(&endpoint, started).await;
                    report.to_decision = Some(started.elapsed());
                    handler.confirm(&mut verdict).await;
                    let granted = H::granted(&verdict);
                    report.verdict = Some(verdict);
                    match session.decide(granted, Instant::now()) {
                        Ok(more) => events.extend(more),
                        Err(e) => {
                            report.error = Some(e);
                            break 'conn;
                        }
                    }
                }
                Event::Done(outcome) => {
                    report.outcome = Some(outcome);
                    // Let the phone read the last frame and close first (bounded).
                    let _ = tokio::time::timeout(LINGER, stream.read(&mut buf)).await;
                    break 'conn;
                }
            }
        }
    }
    report.total = started.elapsed();
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_announcement_of_our_adapter_ends_the_registration() {
        let added = |n: &str| Some(SessionEvent::AdapterAdded(n.into()));
        let removed = |n: &str| Some(SessionEvent::AdapterRemoved(n.into()));
        assert!(matches!(
            registration_lost("hci0", added("hci0")),
            Some(AdapterError::Announced(n)) if n == "hci0"
        ));
        assert!(matches!(
            registration_lost("hci0", removed("hci0")),
            Some(AdapterError::Removed(n)) if n == "hci0"
        ));
        assert!(matches!(
            registration_lost("hci0", None),
            Some(AdapterError::EventsEnded)
        ));
        // Other adapters come and go without touching this door.
        assert!(registration_lost("hci0", added("hci1")).is_none());
        assert!(registration_lost("hci0", removed("hci1")).is_none());
    }

    /// On a one-thread runtime a step polled inline would keep every other task (the OSDP
    /// bus among them) from running until it ends; run by `off_worker`, the step sees
    /// another task run while it is still computing.
    #[tokio::test(flavor = "current_thread")]
    async fn session_steps_leave_the_async_worker_free() {
        use crate::aliro::consts::INTERFACE_BLE;
        use crate::aliro::reader::{Randomness, ReaderIdentity, TransactionParams};
        use rand_core::OsRng;
        use std::sync::atomic::AtomicBool;

        let id = ReaderIdentity::new([1; 16], [2; 16], p256::SecretKey::random(&mut OsRng));
        let params = TransactionParams {
            interface: INTERFACE_BLE,
            ..TransactionParams::default()
        };
        let session = ReaderSession::new(
            &id,
            params,
            Randomness::generate(&mut OsRng),
            super::super::BleVersions::default(),
            Instant::now(),
            Duration::from_secs(5),
        );
        let ran = Arc::new(AtomicBool::new(false));
        let other = tokio::spawn({
            let ran = ran.clone();
            async move { ran.store(true, Ordering::SeqCst) }
        });
        // Stands for a long computation: ends when the other task has run (bounded).
        let step = move |_: &mut ReaderSession| {
            let limit = Instant::now() + Duration::from_secs(10);
            while !ran.load(Ordering::SeqCst) {
                if Instant::now() > limit {
                    return false;
                }
                std::thread::yield_now();
            }
            true
        };
        let (_, other_ran) = off_worker(session, step).await.unwrap();
        assert!(
            other_ran,
            "the session step held the runtime's only worker: nothing else ran meanwhile"
        );
        other.await.unwrap();
    }
}
