//! The RS-485 OSDP bus adapter: owns the serial port (tokio-serial) and drives the sans-IO
//! [`crate::osdp::Bus`] with the bytes it reads and the current time.
//!
//! Replies are written as soon as the command that asked for them is decoded (no sleeps, no
//! batching): the CP allows 200 ms, keyway aims at a few. If the port cannot be opened or
//! goes away, the task reports it, retries with exponential backoff and keeps the core's
//! state (queued cards, LED state) across reconnects. It never panics on line data.
//!
//! The daemon talks to the task through a cheap, cloneable [`BusHandle`] and receives
//! [`BusEvent`]s on a broadcast channel (a slow subscriber loses old events; it never stalls
//! the bus).

mod comfile;

use crate::logging::catalog;
mod keyfile;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_serial::{SerialPort, SerialPortBuilderExt, SerialStream};

use crate::osdp::phy::{DecoderStats, FrameDecoder};
use crate::osdp::{AttemptId, Bus, KeyStore, Pd, PdConfig, PdDeps, PdError, PdEvent, RawCard};

pub use comfile::{load_com_settings, store_com_settings, ComFileError, ComSetting, ComSettings};
pub use keyfile::{load_scbk, store_scbk, FileKeyStore, KeyFileError};

/// Events buffered per subscriber before the oldest are lost.
const EVENT_CHANNEL_CAP: usize = 256;
/// Requests (cards) waiting for the bus task.
const REQUEST_CHANNEL_CAP: usize = 64;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Upper bound on how long the task sleeps when the core has no timer (so a stalled clock
/// source cannot park it forever).
const IDLE_TICK: Duration = Duration::from_secs(1);

/// Errors of the serial adapter.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("bus configuration: {0}")]
    Config(#[from] PdError),
    #[error("invalid serial settings: {0}")]
    Settings(&'static str),
    #[error("card refused: {0}")]
    Card(PdError),
    #[error("the bus task has stopped")]
    Stopped,
    #[error("serial port {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: tokio_serial::Error,
    },
    #[error("serial I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("serial port closed")]
    Eof,
    #[error("stored COMSET settings: {0}")]
    ComFile(#[from] ComFileError),
}

/// One serial line and the PDs (doors) keyway serves on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusConfig {
    pub path: PathBuf,
    pub baud: u32,
    pub pds: Vec<PdConfig>,
    /// Where osdp_KEYSET stores each secure PD's new SCBK (by address). A secure PD without
    /// an entry NAKs KEYSET (it could not keep the key).
    pub key_files: BTreeMap<u8, PathBuf>,
    /// Where accepted osdp_COMSET changes are kept (JSON, by configured address) and read
    /// back at start. `None`: changes apply until restart only.
    pub com_file: Option<PathBuf>,
}

/// What the bus task reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusEvent {
    /// An event of the PD at `addr`.
    Pd {
        addr: u8,
        event: PdEvent,
    },
    PortOpened {
        path: PathBuf,
    },
    /// The port could not be opened or failed; the task retries after `retry_in`.
    PortError {
        path: PathBuf,
        error: String,
        retry_in: Duration,
    },
}

enum Request {
    SendCard {
        addr: u8,
        card: RawCard,
        attempt: Option<AttemptId>,
        done: oneshot::Sender<Result<(), PdError>>,
    },
    Stats(oneshot::Sender<DecoderStats>),
    Health(oneshot::Sender<Vec<PdHealth>>),
}

/// One PD's live state, for `keyway status` (and a proof that the bus task answers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PdHealth {
    pub address: u8,
    pub online: bool,
    /// Time since the last valid command addressed to this PD.
    pub since_last_command: Option<Duration>,
    pub secure_session: bool,
}

/// Handle to a running bus task.
#[derive(Debug, Clone)]
pub struct BusHandle {
    requests: mpsc::Sender<Request>,
    events: broadcast::Sender<BusEvent>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Request::SendCard { addr, .. } => write!(f, "SendCard({addr})"),
            Request::Stats(_) => write!(f, "Stats"),
            Request::Health(_) => write!(f, "Health"),
        }
    }
}

impl BusHandle {
    /// Queue a card on the door at `addr`; it goes out as osdp_RAW at the next POLL.
    /// Returns once the core accepted (or refused) it, not when the panel received it
    /// (watch for [`PdEvent::CardDelivered`]).
    pub async fn send_card(&self, addr: u8, card: RawCard) -> Result<(), SerialError> {
        self.send_attempt(addr, card, None).await
    }

    /// [`send_card`](Self::send_card) for `attempt`: the PD's `CardSent` and `PanelVerdict`
    /// events about this card carry the id.
    pub async fn send_attempt(
        &self,
        addr: u8,
        card: RawCard,
        attempt: Option<AttemptId>,
    ) -> Result<(), SerialError> {
        let (done, rx) = oneshot::channel();
        self.requests
            .send(Request::SendCard {
                addr,
                card,
                attempt,
                done,
            })
            .await
            .map_err(|_| SerialError::Stopped)?;
        rx.await
            .map_err(|_| SerialError::Stopped)?
            .map_err(SerialError::Card)
    }

    /// Framing counters of the line (noise, bad checks, resynchronisations).
    pub async fn stats(&self) -> Result<DecoderStats, SerialError> {
        let (done, rx) = oneshot::channel();
        self.requests
            .send(Request::Stats(done))
            .await
            .map_err(|_| SerialError::Stopped)?;
        rx.await.map_err(|_| SerialError::Stopped)
    }

    /// Every PD's live state; answered between two reads of the line.
    pub async fn health(&self) -> Result<Vec<PdHealth>, SerialError> {
        let (done, rx) = oneshot::channel();
        self.requests
            .send(Request::Health(done))
            .await
            .map_err(|_| SerialError::Stopped)?;
        rx.await.map_err(|_| SerialError::Stopped)
    }

    /// A new receiver of bus events (from now on).
    pub fn subscribe(&self) -> broadcast::Receiver<BusEvent> {
        self.events.subscribe()
    }
}

/// Start the bus task. The returned receiver sees every event from the start (including the
/// first `PortOpened`); more receivers come from [`BusHandle::subscribe`]. The task ends when
/// `shutdown` becomes `true` or its sender is dropped.
pub fn spawn_bus(
    cfg: BusConfig,
    shutdown: watch::Receiver<bool>,
) -> Result<(BusHandle, broadcast::Receiver<BusEvent>, JoinHandle<()>), SerialError> {
    if cfg.baud == 0 {
        return Err(SerialError::Settings("baud rate must be positive"));
    }
    if cfg.path.as_os_str().is_empty() {
        return Err(SerialError::Settings("empty serial port path"));
    }
    let pds = cfg
        .pds
        .iter()
        .map(|p| {
            let deps = if p.secure.is_some() {
                PdDeps {
                    // The OS RNG lives here, in the adapter; the core only sees the trait.
                    rng: Some(Box::new(rand_core::OsRng)),
                    key_store: cfg.key_files.get(&p.address).map(|path| {
                        Box::new(FileKeyStore { path: path.clone() }) as Box<dyn KeyStore>
                    }),
                }
            } else {
                PdDeps::default()
            };
            Pd::with_deps(p.clone(), deps)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut pds = pds;
    let mut baud = cfg.baud;
    let com = match &cfg.com_file {
        Some(path) => load_com_settings(path)?,
        None => ComSettings::new(),
    };
    for pd in &mut pds {
        if let Some(c) = com.get(&pd.address()) {
            pd.set_bus_address(c.address)?;
            pd.set_baud(c.baud);
            log::info!(addr = pd.address(), bus_address = c.address, baud = c.baud;
                "OSDP PD uses its stored COMSET settings");
            // One speed per line; a stored speed exists only for a PD alone on its line.
            baud = c.baud;
        }
    }
    let bus = Bus::with_pds(pds, FrameDecoder::default())?;
    let (req_tx, req_rx) = mpsc::channel(REQUEST_CHANNEL_CAP);
    let (ev_tx, ev_rx) = broadcast::channel(EVENT_CHANNEL_CAP);
    let task = BusTask {
        path: cfg.path,
        baud,
        com_file: cfg.com_file,
        com,
        bus,
        requests: Some(req_rx),
        events: ev_tx.clone(),
        shutdown,
    };
    let join = tokio::spawn(task.run());
    Ok((
        BusHandle {
            requests: req_tx,
            events: ev_tx,
        },
        ev_rx,
        join,
    ))
}

struct BusTask {
    path: PathBuf,
    baud: u32,
    com_file: Option<PathBuf>,
    com: ComSettings,
    bus: Bus,
    /// `None` once every handle is dropped: the bus keeps answering polls.
    requests: Option<mpsc::Receiver<Request>>,
    events: broadcast::Sender<BusEvent>,
    shutdown: watch::Receiver<bool>,
}

/// Why serving a port stopped.
enum Stop {
    Shutdown,
    Failed(SerialError),
}

async fn recv_request(rx: &mut Option<mpsc::Receiver<Request>>) -> Option<Request> {
    match rx {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

impl BusTask {
    async fn run(mut self) {
        let mut backoff = BACKOFF_MIN;
        loop {
            if self.shutting_down() {
                return;
            }
            let failure = match self.open() {
                Ok(port) => {
                    backoff = BACKOFF_MIN;
                    log::info!(path:? = self.path; "OSDP serial port open");
                    self.emit(BusEvent::PortOpened {
                        path: self.path.clone(),
                    });
                    match self.serve(port).await {
                        Stop::Shutdown => return,
                        Stop::Failed(e) => e,
                    }
                }
                Err(e) => e,
            };
            // Logged once, by whoever receives the event (the daemon names the port there).
            self.emit(BusEvent::PortError {
                path: self.path.clone(),
                error: failure.to_string(),
                retry_in: backoff,
            });
            if self.idle(backoff).await {
                return;
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    fn shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    fn open(&self) -> Result<SerialStream, SerialError> {
        use tokio_serial::SerialPort;
        let path = self.path.to_string_lossy().into_owned();
        let port = tokio_serial::new(path.clone(), self.baud)
            .data_bits(tokio_serial::DataBits::Eight)
            .parity(tokio_serial::Parity::None)
            .stop_bits(tokio_serial::StopBits::One)
            .flow_control(tokio_serial::FlowControl::None)
            .open_native_async()
            .map_err(|source| SerialError::Open { path, source })?;
        // Bytes queued before the open (a pty or a serial server buffers while keyway is
        // down) are commands the panel has already given up on. Answering them puts a stale
        // sequence number on the line: the panel NAKs it and libosdp's panel then goes
        // offline for 300 s. Only commands sent after the open are served.
        if let Err(e) = port.clear(tokio_serial::ClearBuffer::Input) {
            log::warn!(path:? = self.path, error:% = e; "OSDP serial port: stale input not discarded");
        }
        Ok(port)
    }

    fn emit(&self, ev: BusEvent) {
        // No subscriber is fine: events are also logged.
        let _ = self.events.send(ev);
    }

    /// Log and publish PD events. Returns a new line speed if an osdp_COMSET changed it.
    fn drain_events(&mut self) -> Option<u32> {
        let mut new_baud = None;
        while let Some((addr, event)) = self.bus.poll_event() {
            if let PdEvent::ComSetApplied { address, baud } = &event {
                log::info!(addr, bus_address = *address, baud = *baud; "OSDP COMSET applied");
                self.com.insert(
                    addr,
                    ComSetting {
                        address: *address,
                        baud: *baud,
                    },
                );
                if let Some(path) = &self.com_file {
                    if let Err(e) = store_com_settings(path, &self.com) {
                        log::error!(addr, error:% = e; "OSDP COMSET not persisted");
                    }
                }
                if *baud != self.baud {
                    new_baud = Some(*baud);
                }
            }
            match &event {
                PdEvent::Online => log::info!(addr; "OSDP PD online"),
                PdEvent::Offline => {
                    log::warn!(addr, message_id = catalog::OSDP_OFFLINE; "OSDP PD offline")
                }
                PdEvent::NakSent { command, code } if refuses_secure_channel(*command, *code) => {
                    log::warn!(addr, command, code:? = code, message_id = catalog::SECURE_CHANNEL_REFUSED;
                        "OSDP secure channel refused (panel key does not match, or SCBK-D outside install mode)")
                }
                PdEvent::NakSent { command, code } => {
                    log::warn!(addr, command, code:? = code; "OSDP NAK sent")
                }
                PdEvent::CardDelivered(card) => {
                    log::info!(addr, bits = card.bit_count; "OSDP card delivered")
                }
                PdEvent::CardDropped { reason, .. } => {
                    log::warn!(addr, reason:? = reason; "OSDP card dropped")
                }
                PdEvent::SecureChannelUp { install_key } => {
                    if *install_key {
                        log::warn!(addr; "OSDP secure channel up with SCBK-D (install mode)")
                    } else {
                        log::info!(addr; "OSDP secure channel up")
                    }
                }
                PdEvent::SecureChannelDown { reason } => {
                    log::info!(addr, reason:? = reason; "OSDP secure channel down")
                }
                PdEvent::KeyInstalled => log::info!(addr; "OSDP new SCBK installed"),
                // The daemon logs the verdict with its door and stores it with the event.
                PdEvent::PanelVerdict { .. } => {}
                PdEvent::KeyStoreFailed(e) => {
                    log::error!(addr, error = e.as_str(), message_id = catalog::SECURE_CHANNEL_REFUSED;
                        "OSDP KEYSET refused: key not stored")
                }
                other => log::debug!(addr, event:? = other; "OSDP PD event"),
            }
            self.emit(BusEvent::Pd { addr, event });
        }
        new_baud
    }

    /// Switch the line speed after the osdp_COM reply (written at the old speed) has left.
    async fn switch_baud(&mut self, port: &mut SerialStream, baud: u32) -> Result<(), SerialError> {
        // No portable tcdrain here: wait for the reply's bytes to leave at the old speed
        // (10 bits per byte, a max-size reply) plus a margin.
        let drain_us = 1_000_000u64 * 10 * 64 / u64::from(self.baud.max(1)) + 2_000;
        tokio::time::sleep(Duration::from_micros(drain_us)).await;
        port.set_baud_rate(baud)
            .map_err(|e| SerialError::Io(std::io::Error::other(e)))?;
        log::info!(baud, old = self.baud; "OSDP line speed changed by COMSET");
        self.baud = baud;
        Ok(())
    }

    fn handle_request(&mut self, req: Request) {
        match req {
            Request::SendCard {
                addr,
                card,
                attempt,
                done,
            } => {
                let r = self.bus.queue_attempt(addr, card, attempt, Instant::now());
                let _ = done.send(r);
            }
            Request::Stats(done) => {
                let _ = done.send(self.bus.decoder_stats());
            }
            Request::Health(done) => {
                let now = Instant::now();
                let health = self
                    .bus
                    .addresses()
                    .into_iter()
                    .filter_map(|a| self.bus.pd(a))
                    .map(|pd| PdHealth {
                        address: pd.address(),
                        online: pd.is_online(),
                        since_last_command: pd
                            .last_command_at()
                            .map(|t| now.saturating_duration_since(t)),
                        secure_session: pd.secure_session_active(),
                    })
                    .collect();
                let _ = done.send(health);
            }
        }
    }

    fn deadline(&self) -> tokio::time::Instant {
        let now = Instant::now();
        let t = self
            .bus
            .next_timeout()
            .unwrap_or(now + IDLE_TICK)
            .min(now + IDLE_TICK);
        tokio::time::Instant::from_std(t)
    }

    /// Serve requests and timers without a port for `wait`. True when shutting down.
    async fn idle(&mut self, wait: Duration) -> bool {
        let until = tokio::time::Instant::now() + wait;
        loop {
            let deadline = self.deadline().min(until);
            tokio::select! {
                biased;
                r = self.shutdown.changed() => {
                    if r.is_err() || self.shutting_down() {
                        return true;
                    }
                }
                req = recv_request(&mut self.requests) => match req {
                    Some(req) => self.handle_request(req),
                    None => self.requests = None,
                },
                _ = tokio::time::sleep_until(deadline) => {
                    // No port: nothing to write; replies to bytes from a dead port are moot.
                    let _ = self.bus.handle_timeout(Instant::now());
                    // No port: a speed change applies at the next open (`self.baud`).
                    if let Some(baud) = self.drain_events() {
                        self.baud = baud;
                    }
                    if tokio::time::Instant::now() >= until {
                        return false;
                    }
                }
            }
        }
    }

    async fn serve(&mut self, mut port: SerialStream) -> Stop {
        let mut buf = [0u8; 512];
        loop {
            let deadline = self.deadline();
            tokio::select! {
                biased;
                r = self.shutdown.changed() => {
                    if r.is_err() || self.shutting_down() {
                        return Stop::Shutdown;
                    }
                }
                r = port.read(&mut buf) => {
                    let n = match r {
                        Ok(0) => return Stop::Failed(SerialError::Eof),
                        Ok(n) => n,
                        Err(e) => return Stop::Failed(SerialError::Io(e)),
                    };
                    let replies = self.bus.receive(buf.get(..n).unwrap_or_default(), Instant::now());
                    for reply in replies {
                        if let Err(e) = port.write_all(&reply).await {
                            return Stop::Failed(SerialError::Io(e));
                        }
                    }
                    if let Some(e) = self.bus.take_phy_error() {
                        log::debug!(error:% = e; "OSDP framing error (resynchronised)");
                    }
                    if let Some(baud) = self.drain_events() {
                        if let Err(e) = self.switch_baud(&mut port, baud).await {
                            return Stop::Failed(e);
                        }
                    }
                }
                req = recv_request(&mut self.requests) => match req {
                    Some(req) => self.handle_request(req),
                    None => self.requests = None,
                },
                _ = tokio::time::sleep_until(deadline) => {
                    let replies = self.bus.handle_timeout(Instant::now());
                    for reply in replies {
                        if let Err(e) = port.write_all(&reply).await {
                            return Stop::Failed(SerialError::Io(e));
                        }
                    }
                    if let Some(baud) = self.drain_events() {
                        if let Err(e) = self.switch_baud(&mut port, baud).await {
                            return Stop::Failed(e);
                        }
                    }
                }
            }
        }
    }
}

/// A NAK to the secure-channel handshake: the panel cannot open a secure session.
pub fn refuses_secure_channel(command: u8, code: crate::osdp::NakCode) -> bool {
    use crate::osdp::command::code;
    matches!(command, code::CHLNG | code::SCRYPT)
        && matches!(
            code,
            crate::osdp::NakCode::ScConditions | crate::osdp::NakCode::ScUnsupported
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn config_errors_are_reported_synchronously() {
        let (_tx, rx) = watch::channel(false);
        let cfg = BusConfig {
            path: "/dev/null".into(),
            baud: 0,
            pds: vec![PdConfig::new(1)],
            key_files: BTreeMap::new(),
            com_file: None,
        };
        assert!(matches!(
            spawn_bus(cfg, rx.clone()),
            Err(SerialError::Settings(_))
        ));
        let cfg = BusConfig {
            path: "/dev/null".into(),
            baud: 9600,
            pds: vec![],
            key_files: BTreeMap::new(),
            com_file: None,
        };
        assert!(matches!(
            spawn_bus(cfg, rx),
            Err(SerialError::Config(PdError::NoPds))
        ));
    }

    #[tokio::test]
    async fn missing_port_is_retried_and_shutdown_ends_the_task() {
        let (tx, rx) = watch::channel(false);
        let cfg = BusConfig {
            path: "/nonexistent/keyway-test-tty".into(),
            baud: 9600,
            pds: vec![PdConfig::new(1)],
            key_files: BTreeMap::new(),
            com_file: None,
        };
        let (handle, mut events, join) = spawn_bus(cfg, rx).unwrap();
        // Two failures in a row: the task keeps trying, with a growing delay.
        let mut delays = Vec::new();
        while delays.len() < 2 {
            let ev = tokio::time::timeout(Duration::from_secs(5), events.recv())
                .await
                .expect("an event")
                .expect("channel open");
            if let BusEvent::PortError { retry_in, .. } = ev {
                delays.push(retry_in);
            }
        }
        assert!(delays[1] > delays[0]);
        // Cards are still accepted (and validated) while the port is down.
        let card = RawCard {
            reader: 0,
            format: crate::osdp::RawFormat::Wiegand,
            bit_count: 8,
            data: vec![0xAB],
        };
        handle.send_card(1, card.clone()).await.unwrap();
        assert!(matches!(
            handle.send_card(2, card).await,
            Err(SerialError::Card(PdError::UnknownAddress(2)))
        ));
        tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), join)
            .await
            .expect("task ends on shutdown")
            .expect("task did not panic");
    }
}
