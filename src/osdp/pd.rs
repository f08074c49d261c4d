//! The Peripheral Device state machine for one address (OSDP 2.2), sans-IO.
//!
//! Input: decoded frames addressed to this PD and the current time. Output: reply packets
//! (bytes to write at once) and [`PdEvent`]s for the daemon. No port, timer or clock inside.
//!
//! Sequence numbers (message control, CTRL.SQN): a command with SQN 0 starts a session; the PD then expects
//! 1, 2, 3, 1, ... A command repeating the last SQN with the same code is a CP retry: the PD
//! resends its previous reply byte for byte (a card read is not consumed twice). Any other
//! SQN gets NAK 0x04. One deliberate leniency: a PD that has not seen any command since it
//! started adopts whatever SQN arrives first, so restarting keyway under a running CP does not
//! cost a NAK (which libosdp's CP answers by taking the PD offline for 300 s).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rand_core::RngCore;
use zeroize::Zeroize;

use super::command::{self, BuzzerRecord, Command, LedParams, LedRecord, OutputRecord};
use super::phy::{Frame, BROADCAST_ADDR, MAX_PACKET_LEN, REPLY_BIT};
use super::reply::{cap, Capability, NakCode, PdIdentity, RawCard, Reply};
use super::sc::{self, scs, Direction, Scbk, Session, SessionKeys, MAC_LEN};
use super::verdict::{Verdict, VerdictWindow, DEFAULT_VERDICT_WINDOW};

/// Baud rates a PD accepts in osdp_COMSET (the usual OSDP speeds).
pub const COMSET_BAUDS: [u32; 6] = [9600, 19_200, 38_400, 57_600, 115_200, 230_400];

/// Events queued per PD before the oldest are dropped (the adapter drains them after every
/// chunk, so this only fills when the daemon stalls).
const EVENT_QUEUE_CAP: usize = 64;
/// Largest card (bytes of data) accepted for osdp_RAW.
pub const MAX_CARD_BYTES: usize = 64;
/// A secure session with no valid secure command for this long is dropped (libosdp's PD and
/// the spec's secure-channel session timeout use the same 8 s).
pub const SC_TIMEOUT: Duration = Duration::from_secs(8);

/// Secure-channel settings of one PD (OSDP 2.2 secure channel).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecureConfig {
    /// The installed Secure Channel Base Key, if any.
    pub scbk: Option<Scbk>,
    /// Accept handshakes with SCBK-D (the published default key) until an osdp_KEYSET
    /// installs a key; afterwards SCBK-D is refused.
    pub install_mode: bool,
    /// Outside a secure session, answer only ID, CAP and the handshake in clear; every other
    /// command (a clear COMSET too) gets NAK 0x06. Inside a session nothing clear is accepted,
    /// enforced or not.
    pub enforce_secure: bool,
}

/// Durable storage for a key installed by osdp_KEYSET. Called before the PD acknowledges
/// the key, so an ACKed key survives a restart. Implemented by the adapter (file I/O stays
/// out of the core).
pub trait KeyStore: Send {
    fn store(&mut self, address: u8, key: &Scbk) -> Result<(), String>;
}

/// What a PD needs from outside for the secure channel: randomness (the PD's challenge
/// random) and key storage. Both injected so the core stays deterministic under test.
#[derive(Default)]
pub struct PdDeps {
    pub rng: Option<Box<dyn RngCore + Send>>,
    pub key_store: Option<Box<dyn KeyStore>>,
}

impl std::fmt::Debug for PdDeps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PdDeps")
            .field("rng", &self.rng.is_some())
            .field("key_store", &self.key_store.is_some())
            .finish()
    }
}

/// Why a secure session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScEndReason {
    /// The CP restarted the link (sequence 0) or started a new handshake.
    Restart,
    /// No valid secure command for [`SC_TIMEOUT`].
    Timeout,
    /// A secure command failed MAC verification or decryption.
    BadMac,
    /// osdp_KEYSET installed a new key; the CP must handshake again with it.
    KeyChanged,
    /// A command arrived in clear during the session (a CP that lost the session, or
    /// someone else on the line): refused, and the session is over.
    PlainCommand,
}

/// Secure-channel state of one PD.
enum ScState {
    Idle,
    /// CCRYPT sent; waiting for SCRYPT.
    Challenged {
        keys: SessionKeys,
        cp_random: [u8; 8],
        pd_random: [u8; 8],
        default_key: bool,
    },
    Active {
        session: Session,
        last: Instant,
    },
}

impl std::fmt::Debug for ScState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ScState::Idle => "Idle",
            ScState::Challenged { .. } => "Challenged",
            ScState::Active { .. } => "Active",
        })
    }
}

/// How a reply is wrapped.
enum Wrap {
    Plain,
    /// Handshake reply: plaintext with this security block.
    Handshake([u8; 3]),
    /// Inside the secure session: MAC, and encrypted data when there is data.
    Secure,
}

/// Errors of the PD core (configuration and the card API; bus bytes never produce these).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PdError {
    #[error("PD address {0} outside 0..=126")]
    BadAddress(u8),
    #[error("two PDs configured with address {0}")]
    DuplicateAddress(u8),
    #[error("no PD configured on the bus")]
    NoPds,
    #[error("no PD with address {0} on this bus")]
    UnknownAddress(u8),
    #[error("invalid card: {0}")]
    InvalidCard(&'static str),
    #[error("card queue full ({0} cards waiting)")]
    QueueFull(usize),
    #[error("invalid configuration: {0}")]
    Config(&'static str),
}

/// Static configuration of one PD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PdConfig {
    /// Bus address 0..=126 (0x7F is the broadcast address).
    pub address: u8,
    pub identity: PdIdentity,
    /// Readers behind this PD (card sources, LED and buzzer owners). At least 1.
    pub readers: u8,
    /// LEDs per reader the CP may control. At least 1.
    pub leds_per_reader: u8,
    /// Whether the CP may drive a buzzer (advertised as audible output).
    pub buzzer: bool,
    /// Outputs (relays) the CP may drive. 0 = not advertised.
    pub outputs: u8,
    /// Baud rate reported in osdp_COM (the adapter's actual speed).
    pub baud: u32,
    /// Cards waiting for a POLL before `queue_card` refuses more.
    pub card_queue_len: usize,
    /// A queued card older than this is dropped instead of sent: a late card would open a
    /// door long after the person left.
    pub card_ttl: Duration,
    /// No valid command for this long → offline.
    pub offline_after: Duration,
    /// Secure channel; `None` = plaintext only (not advertised, SC commands NAK 0x05).
    pub secure: Option<SecureConfig>,
    /// After a card goes out, LED commands within this window are read as the panel's
    /// verdict ([`PdEvent::PanelVerdict`]).
    pub verdict_window: Duration,
}

impl PdConfig {
    /// Defaults for one door at `address`.
    pub fn new(address: u8) -> Self {
        Self {
            address,
            identity: PdIdentity {
                vendor_code: 0,
                model: 1,
                version: 1,
                serial: 0,
                firmware: [0, 1, 0],
            },
            readers: 1,
            leds_per_reader: 1,
            buzzer: true,
            outputs: 0,
            baud: 115_200,
            card_queue_len: 8,
            card_ttl: Duration::from_secs(5),
            offline_after: Duration::from_secs(3),
            secure: None,
            verdict_window: DEFAULT_VERDICT_WINDOW,
        }
    }

    fn validate(&self) -> Result<(), PdError> {
        if self.address >= BROADCAST_ADDR {
            return Err(PdError::BadAddress(self.address));
        }
        if self.readers == 0 {
            return Err(PdError::Config("readers must be at least 1"));
        }
        if self.leds_per_reader == 0 {
            return Err(PdError::Config("leds_per_reader must be at least 1"));
        }
        if self.card_queue_len == 0 {
            return Err(PdError::Config("card_queue_len must be at least 1"));
        }
        if let Some(sec) = &self.secure {
            if sec.scbk.is_none() && !sec.install_mode {
                return Err(PdError::Config(
                    "secure channel needs an SCBK or install mode",
                ));
            }
        }
        Ok(())
    }
}

/// Current state of one LED as the CP set it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedState {
    pub reader: u8,
    pub led: u8,
    pub permanent: LedParams,
    /// The temporary setting and when it ends (then the permanent one shows again).
    pub temporary: Option<(LedParams, Instant)>,
}

impl LedState {
    /// The setting visible now.
    pub fn effective(&self) -> LedParams {
        self.temporary.map_or(self.permanent, |(t, _)| t)
    }
}

/// Current state of one output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputState {
    pub active: bool,
    /// For a temporary command: when it ends and the state it returns to.
    pub until: Option<(Instant, bool)>,
}

/// Why a queued card was not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Older than `card_ttl` when a POLL came.
    Expired,
}

/// What the PD reports to the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PdEvent {
    /// A valid command arrived after silence (or for the first time).
    Online,
    /// No valid command for `offline_after`.
    Offline,
    /// The card is leaving as osdp_RAW in reply to this POLL (the tap-to-RAW moment).
    CardSent(RawCard),
    /// The card went out as osdp_RAW and the CP moved on to its next sequence number, which
    /// it only does after receiving the reply.
    CardDelivered(RawCard),
    CardDropped {
        card: RawCard,
        reason: DropReason,
    },
    /// An LED changed (after an osdp_LED record or when a temporary setting ended).
    Led(LedState),
    Buzzer(BuzzerRecord),
    Output {
        output: u8,
        state: OutputState,
    },
    /// osdp_COMSET accepted: after its osdp_COM reply went out the PD answers on `address`
    /// at `baud` (the adapter switches the port's speed and persists both).
    ComSetApplied {
        address: u8,
        baud: u32,
    },
    /// osdp_COMSET refused (address taken or out of range, baud not supported or, on a bus
    /// with several PDs, a speed change): osdp_COM reported the unchanged settings.
    ComSetRefused {
        address: u8,
        baud: u32,
    },
    /// A NAK went out (useful in logs: a NAK makes many CPs drop the PD).
    NakSent {
        command: u8,
        code: NakCode,
    },
    /// A secure session is up (`install_key`: with SCBK-D, in install mode).
    SecureChannelUp {
        install_key: bool,
    },
    SecureChannelDown {
        reason: ScEndReason,
    },
    /// osdp_KEYSET installed a new SCBK (stored before the ACK; the key is not in the event).
    KeyInstalled,
    /// osdp_KEYSET could not be stored; it was NAKed.
    KeyStoreFailed(String),
    /// The panel's decision on a card, read from its LED commands after the osdp_RAW
    /// (green = granted, red = denied; unknown when the window closed without either).
    PanelVerdict {
        card: RawCard,
        verdict: Verdict,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seq {
    /// No command accepted since start.
    Fresh,
    Last(u8),
}

fn next_sqn(s: u8) -> u8 {
    if s >= 3 {
        1
    } else {
        s + 1
    }
}

#[derive(Debug)]
struct Queued {
    card: RawCard,
    at: Instant,
}

/// One Peripheral Device.
#[derive(Debug)]
pub struct Pd {
    cfg: PdConfig,
    seq: Seq,
    /// (command code, reply bytes) of the last reply, for retries.
    last_reply: Option<(u8, Vec<u8>)>,
    cards: VecDeque<Queued>,
    in_flight: Option<Queued>,
    events: VecDeque<PdEvent>,
    events_dropped: u64,
    online: bool,
    last_rx: Option<Instant>,
    leds: Vec<LedState>,
    buzzers: Vec<Option<BuzzerRecord>>,
    outputs: Vec<OutputState>,
    deps: PdDeps,
    sc: ScState,
    /// Current SCBK (from config, then from osdp_KEYSET).
    scbk: Option<Scbk>,
    install_mode: bool,
    /// A key ACKed in the reply being built; becomes current once the reply is out.
    pending_key: Option<Scbk>,
    verdict: VerdictWindow<RawCard>,
    /// Address the PD answers on (starts as `cfg.address`, changed by osdp_COMSET).
    /// `cfg.address` stays the PD's identity for the card API and events.
    bus_address: u8,
    /// Bus addresses of the other PDs on this line (kept by the `Bus`).
    taken: Vec<u8>,
    /// A speed change would move every PD on the line: only allowed when alone.
    baud_change_allowed: bool,
    /// osdp_COMSET accepted in the reply being built; applied once the reply is out.
    pending_com: Option<(u8, u32)>,
}

impl Pd {
    /// A PD without injected dependencies: fine for plaintext; a secure configuration needs
    /// [`Pd::with_deps`] (an RNG at least).
    pub fn new(cfg: PdConfig) -> Result<Self, PdError> {
        Self::with_deps(cfg, PdDeps::default())
    }

    pub fn with_deps(cfg: PdConfig, deps: PdDeps) -> Result<Self, PdError> {
        cfg.validate()?;
        if cfg.secure.is_some() && deps.rng.is_none() {
            return Err(PdError::Config(
                "secure channel needs a random number source",
            ));
        }
        let scbk = cfg.secure.as_ref().and_then(|s| s.scbk.clone());
        let install_mode = cfg.secure.as_ref().is_some_and(|s| s.install_mode);
        let cfg_verdict_window = cfg.verdict_window;
        let cfg_address = cfg.address;
        let mut leds = Vec::new();
        for reader in 0..cfg.readers {
            for led in 0..cfg.leds_per_reader {
                leds.push(LedState {
                    reader,
                    led,
                    permanent: LedParams::default(),
                    temporary: None,
                });
            }
        }
        let off = OutputState {
            active: false,
            until: None,
        };
        Ok(Self {
            buzzers: vec![None; usize::from(cfg.readers)],
            outputs: vec![off; usize::from(cfg.outputs)],
            leds,
            cfg,
            seq: Seq::Fresh,
            last_reply: None,
            cards: VecDeque::new(),
            in_flight: None,
            events: VecDeque::new(),
            events_dropped: 0,
            online: false,
            last_rx: None,
            deps,
            sc: ScState::Idle,
            scbk,
            install_mode,
            pending_key: None,
            verdict: VerdictWindow::new(cfg_verdict_window),
            bus_address: cfg_address,
            taken: Vec::new(),
            baud_change_allowed: true,
            pending_com: None,
        })
    }

    /// True while a secure session is established.
    pub fn secure_session(&self) -> bool {
        matches!(self.sc, ScState::Active { .. })
    }

    /// True while SCBK-D is still accepted (install mode, no key installed by KEYSET yet).
    pub fn in_install_mode(&self) -> bool {
        self.install_mode
    }

    fn end_session(&mut self, reason: ScEndReason) {
        let was_active = self.secure_session();
        self.sc = ScState::Idle;
        if was_active {
            self.emit(PdEvent::SecureChannelDown { reason });
        }
    }

    /// cUID sent in osdp_CCRYPT: vendor code (3, LE), model, serial number (4, LE).
    fn client_uid(&self) -> [u8; 8] {
        let id = &self.cfg.identity;
        let v = id.vendor_code.to_le_bytes();
        let s = id.serial.to_le_bytes();
        [v[0], v[1], v[2], id.model, s[0], s[1], s[2], s[3]]
    }

    /// The PD's identity: its configured address (stable across osdp_COMSET).
    pub fn address(&self) -> u8 {
        self.cfg.address
    }

    /// The address the PD currently answers on.
    pub fn bus_address(&self) -> u8 {
        self.bus_address
    }

    /// Answer on `addr` from now on (e.g. a persisted osdp_COMSET applied at start-up).
    pub fn set_bus_address(&mut self, addr: u8) -> Result<(), PdError> {
        if addr >= BROADCAST_ADDR {
            return Err(PdError::BadAddress(addr));
        }
        self.bus_address = addr;
        Ok(())
    }

    /// The speed reported in osdp_COM (set after a persisted osdp_COMSET at start-up).
    pub fn set_baud(&mut self, baud: u32) {
        self.cfg.baud = baud;
    }

    /// Called by the `Bus`: other PDs' addresses, and whether this PD is alone on the line.
    pub fn set_neighbours(&mut self, taken: Vec<u8>, alone: bool) {
        self.taken = taken;
        self.baud_change_allowed = alone;
    }

    pub fn config(&self) -> &PdConfig {
        &self.cfg
    }

    pub fn is_online(&self) -> bool {
        self.online
    }

    pub fn leds(&self) -> &[LedState] {
        &self.leds
    }

    pub fn buzzer(&self, reader: u8) -> Option<BuzzerRecord> {
        self.buzzers.get(usize::from(reader)).copied().flatten()
    }

    pub fn outputs(&self) -> &[OutputState] {
        &self.outputs
    }

    /// Cards waiting for a POLL (not counting one sent but not yet confirmed).
    pub fn queued_cards(&self) -> usize {
        self.cards.len()
    }

    /// Events lost because nobody drained them.
    pub fn events_dropped(&self) -> u64 {
        self.events_dropped
    }

    /// The capabilities sent in osdp_PDCAP: only what this PD really handles.
    pub fn capabilities(&self) -> Vec<Capability> {
        let c = |function, compliance, count| Capability {
            function,
            compliance,
            count,
        };
        let [rx_lo, rx_hi] = u16::try_from(MAX_PACKET_LEN)
            .unwrap_or(u16::MAX)
            .to_le_bytes();
        let mut caps = Vec::new();
        if self.cfg.outputs > 0 {
            // 1: on/off on command (timed codes are accepted and tracked too).
            caps.push(c(cap::OUTPUT_CONTROL, 1, self.cfg.outputs));
        }
        // 1: card data as an array of bits (osdp_RAW).
        caps.push(c(cap::CARD_DATA_FORMAT, 1, 0));
        // 4: timed, multi-colour LEDs: every field of osdp_LED is kept and reported.
        caps.push(c(cap::LED_CONTROL, 4, self.cfg.leds_per_reader));
        if self.cfg.buzzer {
            // 2: timed on/off.
            caps.push(c(cap::AUDIBLE_OUTPUT, 2, 1));
        }
        caps.push(c(cap::CHECK_CHARACTER, 1, 0));
        // Compliance bit 0: AES-128 secure channel; count bit 0: SCBK-D accepted (install
        // mode). Not claimed without configuration, so a CP never starts a handshake we NAK.
        if self.cfg.secure.is_some() {
            caps.push(c(
                cap::COMMUNICATION_SECURITY,
                1,
                u8::from(self.install_mode),
            ));
        } else {
            caps.push(c(cap::COMMUNICATION_SECURITY, 0, 0));
        }
        caps.push(c(cap::RECEIVE_BUFFER, rx_lo, rx_hi));
        caps.push(c(cap::LARGEST_COMBINED_MESSAGE, rx_lo, rx_hi));
        caps.push(c(cap::READERS, 0, self.cfg.readers));
        // 2: SIA OSDP 2.2.
        caps.push(c(cap::OSDP_VERSION, 2, 0));
        caps
    }

    /// Queue a card for the next POLL. `now` starts its time-to-live.
    pub fn queue_card(&mut self, card: RawCard, now: Instant) -> Result<(), PdError> {
        if card.bit_count == 0 {
            return Err(PdError::InvalidCard("zero bits"));
        }
        if card.byte_len() > MAX_CARD_BYTES {
            return Err(PdError::InvalidCard("too many bits"));
        }
        if card.data.len() != card.byte_len() {
            return Err(PdError::InvalidCard("data length does not match bit count"));
        }
        if card.reader >= self.cfg.readers {
            return Err(PdError::InvalidCard("no such reader"));
        }
        if self.cards.len() >= self.cfg.card_queue_len {
            return Err(PdError::QueueFull(self.cards.len()));
        }
        self.cards.push_back(Queued { card, at: now });
        Ok(())
    }

    /// Next event for the daemon.
    pub fn poll_event(&mut self) -> Option<PdEvent> {
        self.events.pop_front()
    }

    fn emit(&mut self, ev: PdEvent) {
        if self.events.len() >= EVENT_QUEUE_CAP {
            self.events.pop_front();
            self.events_dropped += 1;
        }
        self.events.push_back(ev);
    }

    /// When `handle_timeout` has work to do.
    pub fn next_timeout(&self) -> Option<Instant> {
        let offline = if self.online {
            self.last_rx
                .and_then(|t| t.checked_add(self.cfg.offline_after))
        } else {
            None
        };
        let leds = self.leds.iter().filter_map(|l| l.temporary.map(|(_, t)| t));
        let outs = self.outputs.iter().filter_map(|o| o.until.map(|(t, _)| t));
        let sc = match &self.sc {
            ScState::Active { last, .. } => last.checked_add(SC_TIMEOUT),
            _ => None,
        };
        offline
            .into_iter()
            .chain(leds)
            .chain(outs)
            .chain(sc)
            .chain(self.verdict.deadline())
            .min()
    }

    /// Advance timers: offline detection, end of temporary LED and output settings.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some((card, verdict)) = self.verdict.expire(now) {
            self.emit(PdEvent::PanelVerdict { card, verdict });
        }
        if let ScState::Active { last, .. } = &self.sc {
            if now.saturating_duration_since(*last) >= SC_TIMEOUT {
                self.end_session(ScEndReason::Timeout);
            }
        }
        if self.online {
            if let Some(last) = self.last_rx {
                if now.saturating_duration_since(last) > self.cfg.offline_after {
                    self.online = false;
                    self.emit(PdEvent::Offline);
                }
            }
        }
        let mut changed = Vec::new();
        for led in &mut self.leds {
            if matches!(led.temporary, Some((_, end)) if end <= now) {
                led.temporary = None;
                changed.push(PdEvent::Led(*led));
            }
        }
        for (i, out) in self.outputs.iter_mut().enumerate() {
            if let Some((end, after)) = out.until {
                if end <= now {
                    *out = OutputState {
                        active: after,
                        until: None,
                    };
                    let output = u8::try_from(i).unwrap_or(u8::MAX);
                    changed.push(PdEvent::Output {
                        output,
                        state: *out,
                    });
                }
            }
        }
        for ev in changed {
            self.emit(ev);
        }
    }

    /// Handle a command frame addressed to this PD (or broadcast). Returns the reply packet
    /// to write now, or `None` when the PD must stay silent.
    pub fn handle_frame(&mut self, frame: &Frame, now: Instant) -> Option<Vec<u8>> {
        if frame.is_reply() {
            return None;
        }
        let broadcast = frame.address() == BROADCAST_ADDR;
        if frame.address() != self.bus_address && !broadcast {
            return None;
        }
        // Only configuration commands make sense on the broadcast address; answering
        // others could collide with a real PD's reply.
        if broadcast
            && !matches!(
                frame.code,
                command::code::ID | command::code::CAP | command::code::COMSET
            )
        {
            return None;
        }
        self.last_rx = Some(now);
        if !self.online {
            self.online = true;
            self.emit(PdEvent::Online);
        }

        let s = frame.sqn;
        if s == 0 {
            // New session: a card sent in the old one may never have arrived, and the CP
            // has dropped any secure session (it restarts the link before a handshake).
            if let Some(q) = self.in_flight.take() {
                self.cards.push_front(q);
            }
            self.last_reply = None;
            self.end_session(ScEndReason::Restart);
        } else if let Seq::Last(last) = self.seq {
            if s == last {
                if let Some((code, bytes)) = &self.last_reply {
                    if *code == frame.code {
                        // Byte for byte: under secure channel the MAC chain has moved on,
                        // so the reply must not be rebuilt.
                        return Some(bytes.clone());
                    }
                }
                // Same SQN, different command: treat as a fresh command with this SQN.
            } else if s != next_sqn(last) {
                let reply = Reply::Nak(NakCode::SequenceNumber);
                self.emit(PdEvent::NakSent {
                    command: frame.code,
                    code: NakCode::SequenceNumber,
                });
                return self.encode(frame, &reply, Wrap::Plain);
            } else if let Some(q) = self.in_flight.take() {
                // The CP advanced: it got the osdp_RAW.
                self.emit(PdEvent::CardDelivered(q.card));
            }
        }

        let (reply, wrap) = self.process(frame, now);
        if let Reply::Nak(code) = reply {
            self.emit(PdEvent::NakSent {
                command: frame.code,
                code,
            });
        }
        let bytes = self.encode(frame, &reply, wrap);
        if let Some((address, baud)) = self.pending_com.take() {
            // The osdp_COM went out from the old address; the CP follows to the new one.
            if bytes.is_some() {
                self.bus_address = address;
                self.cfg.baud = baud;
                self.emit(PdEvent::ComSetApplied { address, baud });
            }
        }
        if let Some(key) = self.pending_key.take() {
            // The ACK went out under the old session; from now on only the new key.
            if bytes.is_some() {
                self.scbk = Some(key);
                self.install_mode = false;
                self.end_session(ScEndReason::KeyChanged);
                self.emit(PdEvent::KeyInstalled);
            }
        }
        let bytes = bytes?;
        self.seq = Seq::Last(s);
        self.last_reply = Some((frame.code, bytes.clone()));
        Some(bytes)
    }

    /// Security checks, then the command itself.
    fn process(&mut self, frame: &Frame, now: Instant) -> (Reply, Wrap) {
        let nak = |c| (Reply::Nak(c), Wrap::Plain);
        let Some(enforce) = self.cfg.secure.as_ref().map(|s| s.enforce_secure) else {
            // Plaintext-only PD.
            if frame.scb.is_some() {
                return nak(NakCode::ScUnsupported);
            }
            return match command::parse(frame.code, &frame.data) {
                Ok(Command::Challenge(_) | Command::ServerCryptogram(_))
                | Ok(Command::KeySet { .. }) => nak(NakCode::ScUnsupported),
                Ok(cmd) => (self.execute(cmd, now), Wrap::Plain),
                Err(e) => nak(e.nak()),
            };
        };
        match frame.scb.as_deref() {
            None => {
                if self.secure_session() {
                    // Nothing clear inside a session (libosdp's PD: "plain-text message in
                    // SC", NAK 0x06). It comes from a CP that lost the session or from
                    // someone else on the line; either way the session is over (in libosdp
                    // the MAC chains part here), so end it and say so.
                    self.end_session(ScEndReason::PlainCommand);
                    return nak(NakCode::ScConditions);
                }
                // Enforced: only what the handshake needs may be clear (libosdp: ID, CAP,
                // CHLNG, SCRYPT; the last two carry their own security blocks, below). Not
                // COMSET: anyone on the line could readdress the reader, durably.
                let clear_ok = matches!(frame.code, command::code::ID | command::code::CAP);
                if enforce && !clear_ok {
                    return nak(NakCode::ScConditions);
                }
                match command::parse(frame.code, &frame.data) {
                    // The handshake and KEYSET need their security blocks / a session.
                    Ok(Command::Challenge(_) | Command::ServerCryptogram(_))
                    | Ok(Command::KeySet { .. }) => nak(NakCode::ScConditions),
                    Ok(cmd) => (self.execute(cmd, now), Wrap::Plain),
                    Err(e) => nak(e.nak()),
                }
            }
            Some(&[3, scs::SCS_11, key]) if frame.code == command::code::CHLNG => {
                self.challenge(&frame.data, key == 0)
            }
            Some(&[3, scs::SCS_13, _]) if frame.code == command::code::SCRYPT => {
                self.server_cryptogram(&frame.data, now)
            }
            Some(&[2, t @ (scs::SCS_15 | scs::SCS_17)]) => self.secure_command(frame, t, now),
            Some(_) => nak(NakCode::ScConditions),
        }
    }

    /// osdp_CHLNG → osdp_CCRYPT. `asks_default`: the CP asked for SCBK-D (key byte 0).
    fn challenge(&mut self, data: &[u8], asks_default: bool) -> (Reply, Wrap) {
        let nak = |c| (Reply::Nak(c), Wrap::Plain);
        let cp_random = match command::parse(command::code::CHLNG, data) {
            Ok(Command::Challenge(r)) => r,
            Ok(_) => return nak(NakCode::UnknownCommand),
            Err(e) => return nak(e.nak()),
        };
        self.end_session(ScEndReason::Restart);
        // SCBK-D only in install mode. Outside it, a request for SCBK-D is answered with the
        // installed key and CCRYPT says so (key byte 1), as libosdp's PD does: some CPs
        // (PyPI `osdp` 1.6) ask for SCBK-D in every CHLNG but follow the PD's answer; a
        // CP that really holds only SCBK-D fails the cryptogram check at SCRYPT.
        let default_key = asks_default && self.install_mode;
        let key = if default_key {
            Scbk::default_key()
        } else {
            // No key yet: NAK makes libosdp's CP retry with SCBK-D (install mode).
            match &self.scbk {
                Some(k) => k.clone(),
                None => return nak(NakCode::ScConditions),
            }
        };
        let mut pd_random = [0u8; 8];
        let Some(rng) = self.deps.rng.as_mut() else {
            return nak(NakCode::ScConditions);
        };
        if rng.try_fill_bytes(&mut pd_random).is_err() {
            return nak(NakCode::ScConditions);
        }
        let keys = SessionKeys::derive(&key, &cp_random);
        let cryptogram = keys.client_cryptogram(&cp_random, &pd_random);
        self.sc = ScState::Challenged {
            keys,
            cp_random,
            pd_random,
            default_key,
        };
        let reply = Reply::Ccrypt {
            uid: self.client_uid(),
            pd_random,
            cryptogram,
        };
        (
            reply,
            Wrap::Handshake([3, scs::SCS_12, u8::from(!default_key)]),
        )
    }

    /// osdp_SCRYPT → osdp_RMAC_I; the session starts.
    fn server_cryptogram(&mut self, data: &[u8], now: Instant) -> (Reply, Wrap) {
        let nak = |c| (Reply::Nak(c), Wrap::Plain);
        let theirs = match command::parse(command::code::SCRYPT, data) {
            Ok(Command::ServerCryptogram(c)) => c,
            Ok(_) => return nak(NakCode::UnknownCommand),
            Err(e) => return nak(e.nak()),
        };
        let ScState::Challenged {
            keys,
            cp_random,
            pd_random,
            default_key,
        } = std::mem::replace(&mut self.sc, ScState::Idle)
        else {
            return nak(NakCode::ScConditions);
        };
        let ours = keys.server_cryptogram(&cp_random, &pd_random);
        if !sc::ct_eq(&ours, &theirs) {
            // Wrong key on the CP side (or an attacker): no session.
            return nak(NakCode::ScConditions);
        }
        let rmac = keys.initial_rmac(&theirs);
        self.sc = ScState::Active {
            session: Session::new(keys, rmac),
            last: now,
        };
        self.emit(PdEvent::SecureChannelUp {
            install_key: default_key,
        });
        (Reply::RmacI(rmac), Wrap::Handshake([3, scs::SCS_14, 1]))
    }

    /// A command inside the secure session: MAC check, decryption, then the command.
    fn secure_command(&mut self, frame: &Frame, scs_type: u8, now: Instant) -> (Reply, Wrap) {
        let nak = |c| (Reply::Nak(c), Wrap::Plain);
        let ScState::Active { session, last, .. } = &mut self.sc else {
            return nak(NakCode::ScConditions);
        };
        let Ok(input) = frame.mac_input() else {
            return nak(NakCode::ScConditions);
        };
        let split = frame.data.len().saturating_sub(MAC_LEN);
        let (body, mac) = frame.data.split_at(split);
        if session.verify(Direction::Command, &input, mac).is_err() {
            self.end_session(ScEndReason::BadMac);
            return nak(NakCode::ScConditions);
        }
        let mut data = if scs_type == scs::SCS_17 && !body.is_empty() {
            match session.decrypt(Direction::Command, body) {
                Ok(d) => d,
                Err(_) => {
                    self.end_session(ScEndReason::BadMac);
                    return nak(NakCode::ScConditions);
                }
            }
        } else {
            body.to_vec()
        };
        *last = now;
        let parsed = command::parse(frame.code, &data);
        // KEYSET data is key material.
        data.zeroize();
        let reply = match parsed {
            Ok(Command::KeySet { key_type, key }) => self.key_set(key_type, key),
            Ok(Command::Challenge(_) | Command::ServerCryptogram(_)) => {
                Reply::Nak(NakCode::ScConditions)
            }
            Ok(cmd) => self.execute(cmd, now),
            Err(e) => Reply::Nak(e.nak()),
        };
        (reply, Wrap::Secure)
    }

    /// osdp_KEYSET inside a session: store durably first, then ACK; the key takes effect
    /// once the ACK is out (see `handle_frame`).
    fn key_set(&mut self, key_type: u8, key: Scbk) -> Reply {
        // Type 1 = SCBK; nothing else is defined for a PD.
        if key_type != 1 {
            return Reply::Nak(NakCode::Record);
        }
        let Some(store) = self.deps.key_store.as_mut() else {
            return Reply::Nak(NakCode::ScConditions);
        };
        if let Err(e) = store.store(self.cfg.address, &key) {
            self.emit(PdEvent::KeyStoreFailed(e));
            return Reply::Nak(NakCode::ScConditions);
        }
        self.pending_key = Some(key);
        Reply::Ack
    }

    fn encode(&mut self, cmd: &Frame, reply: &Reply, wrap: Wrap) -> Option<Vec<u8>> {
        let mut frame = Frame {
            mark: cmd.mark,
            addr_byte: cmd.address() | REPLY_BIT,
            sqn: cmd.sqn,
            // Answer with the check character the CP used.
            check: cmd.check,
            scb: None,
            code: reply.code(),
            data: reply.data(),
        };
        match wrap {
            Wrap::Plain => {}
            Wrap::Handshake(scb) => frame.scb = Some(scb.to_vec()),
            Wrap::Secure => {
                if let ScState::Active { session, .. } = &mut self.sc {
                    let ty = if frame.data.is_empty() {
                        scs::SCS_16
                    } else {
                        frame.data = session.encrypt(Direction::Reply, &frame.data);
                        scs::SCS_18
                    };
                    frame.scb = Some(vec![2, ty]);
                    frame.data.extend_from_slice(&[0; MAC_LEN]);
                    let input = frame.mac_input().ok()?;
                    let mac = session.sign(Direction::Reply, &input);
                    let n = frame.data.len().saturating_sub(MAC_LEN);
                    frame.data.get_mut(n..)?.copy_from_slice(&mac);
                }
            }
        }
        // Only fails for oversized data, which no reply of ours can reach.
        frame.encode().ok()
    }

    fn execute(&mut self, cmd: Command, now: Instant) -> Reply {
        match cmd {
            Command::Poll => self.poll_reply(now),
            Command::Id { .. } => Reply::PdId(self.cfg.identity),
            Command::Cap { .. } => Reply::PdCap(self.capabilities()),
            Command::LocalStatus => Reply::LocalStatus {
                tamper: false,
                power_fail: false,
            },
            Command::OutputStatus if self.cfg.outputs > 0 => {
                Reply::OutputStatus(self.outputs.iter().map(|o| o.active).collect())
            }
            Command::Led(recs) => self.apply_led(&recs, now),
            Command::Buzzer(recs) => self.apply_buzzer(&recs),
            Command::Output(recs) => self.apply_output(&recs, now),
            Command::ComSet { address, baud } => {
                let address_ok = address < BROADCAST_ADDR
                    && (address == self.bus_address || !self.taken.contains(&address));
                let baud_ok = COMSET_BAUDS.contains(&baud)
                    && (baud == self.cfg.baud || self.baud_change_allowed);
                if address_ok && baud_ok {
                    self.pending_com = Some((address, baud));
                    Reply::Com { address, baud }
                } else {
                    self.emit(PdEvent::ComSetRefused { address, baud });
                    Reply::Com {
                        address: self.bus_address,
                        baud: self.cfg.baud,
                    }
                }
            }
            Command::AcuRxSize(_) | Command::KeepActive(_) | Command::Abort => Reply::Ack,
            // Reached only through the secure-channel paths in `process`.
            Command::Challenge(_) | Command::ServerCryptogram(_) | Command::KeySet { .. } => {
                Reply::Nak(NakCode::ScConditions)
            }
            Command::OutputStatus
            | Command::InputStatus
            | Command::ReaderStatus
            | Command::Text { .. }
            | Command::Mfg { .. }
            | Command::Unsupported { .. } => Reply::Nak(NakCode::UnknownCommand),
        }
    }

    fn poll_reply(&mut self, now: Instant) -> Reply {
        while let Some(q) = self.cards.pop_front() {
            if now.saturating_duration_since(q.at) > self.cfg.card_ttl {
                self.emit(PdEvent::CardDropped {
                    card: q.card,
                    reason: DropReason::Expired,
                });
                continue;
            }
            let reply = Reply::Raw(q.card.clone());
            // The previous card's story ends (undecided) before this one's begins, so a
            // listener can tell a verdict on this card from a late one on the last.
            if let Some((card, verdict)) = self.verdict.card_sent(q.card.clone(), now) {
                self.emit(PdEvent::PanelVerdict { card, verdict });
            }
            self.emit(PdEvent::CardSent(q.card.clone()));
            self.in_flight = Some(q);
            return reply;
        }
        Reply::Ack
    }

    fn apply_led(&mut self, recs: &[LedRecord], now: Instant) -> Reply {
        // Validate every record first so a command is applied whole or not at all.
        let valid = recs.iter().all(|r| {
            r.reader < self.cfg.readers
                && r.led < self.cfg.leds_per_reader
                && r.temporary.control <= 2
                && r.permanent.control <= 1
        });
        if !valid {
            return Reply::Nak(NakCode::Record);
        }
        for r in recs {
            let idx =
                usize::from(r.reader) * usize::from(self.cfg.leds_per_reader) + usize::from(r.led);
            let Some(led) = self.leds.get_mut(idx) else {
                continue;
            };
            if r.permanent.control == 1 {
                led.permanent = r.permanent;
            }
            match r.temporary.control {
                1 => led.temporary = None,
                2 => {
                    let dur = Duration::from_millis(u64::from(r.temporary.timer) * 100);
                    led.temporary = now.checked_add(dur).map(|end| (r.temporary, end));
                }
                _ => {}
            }
            let state = *led;
            self.emit(PdEvent::Led(state));
        }
        if let Some((card, verdict)) = self.verdict.led(recs, now) {
            self.emit(PdEvent::PanelVerdict { card, verdict });
        }
        Reply::Ack
    }

    fn apply_buzzer(&mut self, recs: &[BuzzerRecord]) -> Reply {
        if !self.cfg.buzzer {
            return Reply::Nak(NakCode::UnknownCommand);
        }
        if !recs
            .iter()
            .all(|r| r.reader < self.cfg.readers && r.tone <= 2)
        {
            return Reply::Nak(NakCode::Record);
        }
        for r in recs {
            if let Some(slot) = self.buzzers.get_mut(usize::from(r.reader)) {
                *slot = Some(*r);
            }
            self.emit(PdEvent::Buzzer(*r));
        }
        Reply::Ack
    }

    fn apply_output(&mut self, recs: &[OutputRecord], now: Instant) -> Reply {
        if !recs
            .iter()
            .all(|r| r.output < self.cfg.outputs && r.control <= 6)
        {
            return Reply::Nak(NakCode::Record);
        }
        for r in recs {
            let Some(out) = self.outputs.get_mut(usize::from(r.output)) else {
                continue;
            };
            let timed = now.checked_add(Duration::from_millis(u64::from(r.timer) * 100));
            let prev = *out;
            *out = match r.control {
                0 => prev,
                1 => OutputState {
                    active: false,
                    until: None,
                },
                2 => OutputState {
                    active: true,
                    until: None,
                },
                // 3/4: permanent state applies once a running timer ends.
                3 | 4 => {
                    let want = r.control == 4;
                    match prev.until {
                        Some((end, _)) => OutputState {
                            active: prev.active,
                            until: Some((end, want)),
                        },
                        None => OutputState {
                            active: want,
                            until: None,
                        },
                    }
                }
                5 => OutputState {
                    active: true,
                    until: timed.map(|t| (t, prev.active)),
                },
                _ => OutputState {
                    active: false,
                    until: timed.map(|t| (t, prev.active)),
                },
            };
            let state = *out;
            self.emit(PdEvent::Output {
                output: r.output,
                state,
            });
        }
        Reply::Ack
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::osdp::phy::{Check, FrameDecoder};
    use crate::osdp::reply::{code as rc, RawFormat};

    const ADDR: u8 = 0x65;

    fn cmd(sqn: u8, code: u8, data: &[u8]) -> Frame {
        Frame {
            mark: true,
            addr_byte: ADDR,
            sqn,
            check: Check::Crc16,
            scb: None,
            code,
            data: data.to_vec(),
        }
    }

    fn decode(bytes: &[u8]) -> Frame {
        let mut d = FrameDecoder::default();
        assert_eq!(d.push(bytes, Instant::now()), bytes.len());
        let f = d.poll().expect("a frame").expect("valid frame");
        assert!(d.poll().is_none());
        f
    }

    fn run(pd: &mut Pd, f: Frame, now: Instant) -> Frame {
        let bytes = pd.handle_frame(&f, now).expect("a reply");
        decode(&bytes)
    }

    fn events(pd: &mut Pd) -> Vec<PdEvent> {
        std::iter::from_fn(|| pd.poll_event()).collect()
    }

    fn card26() -> RawCard {
        RawCard {
            reader: 0,
            format: RawFormat::Wiegand,
            bit_count: 26,
            data: vec![0x12, 0x34, 0x56, 0x40],
        }
    }

    fn led_data(reader: u8, led: u8, perm_ctl: u8, color: u8) -> Vec<u8> {
        vec![reader, led, 0, 0, 0, 0, 0, 0, 0, perm_ctl, 1, 0, color, 0]
    }

    #[test]
    fn reply_header_mirrors_command() {
        let mut pd = Pd::new(PdConfig::new(ADDR)).unwrap();
        let now = Instant::now();
        let r = run(&mut pd, cmd(0, 0x60, &[]), now);
        assert_eq!(r.addr_byte, ADDR | 0x80);
        assert_eq!(r.sqn, 0);
        assert!(r.mark);
        assert_eq!(r.check, Check::Crc16);
        assert_eq!(r.code, rc::ACK);
        let mut c = cmd(1, 0x60, &[]);
        c.mark = false;
        c.check = Check::Checksum;
        let r = run(&mut pd, c, now);
        assert!(!r.mark);
        assert_eq!(r.check, Check::Checksum);
        assert_eq!(r.sqn, 1);
        assert_eq!(events(&mut pd), vec![PdEvent::Online]);
    }

    #[test]
    fn id_reply_carries_configured_identity() {
        let mut cfg = PdConfig::new(ADDR);
        cfg.identity = PdIdentity {
            vendor_code: 0x0A0B0C,
            model: 3,
            version: 4,
            serial: 0xDEADBEEF,
            firmware: [5, 6, 7],
        };
        let mut pd = Pd::new(cfg).unwrap();
        let r = run(&mut pd, cmd(0, 0x61, &[0]), Instant::now());
        assert_eq!(r.code, rc::PDID);
        assert_eq!(
            r.data,
            vec![0x0C, 0x0B, 0x0A, 3, 4, 0xEF, 0xBE, 0xAD, 0xDE, 5, 6, 7]
        );
    }

    #[test]
    fn sequence_progression_and_wrap() {
        let mut pd = Pd::new(PdConfig::new(ADDR)).unwrap();
        let now = Instant::now();
        for s in [0u8, 1, 2, 3, 1, 2, 3, 1] {
            let r = run(&mut pd, cmd(s, 0x60, &[]), now);
            assert_eq!((r.code, r.sqn), (rc::ACK, s));
        }
    }

    #[test]
    fn out_of_order_sequence_gets_nak_4_and_state_is_kept() {
        let mut pd = Pd::new(PdConfig::new(ADDR)).unwrap();
        let now = Instant::now();
        run(&mut pd, cmd(0, 0x60, &[]), now);
        run(&mut pd, cmd(1, 0x60, &[]), now);
        let r = run(&mut pd, cmd(3, 0x60, &[]), now);
        assert_eq!((r.code, r.data.clone(), r.sqn), (rc::NAK, vec![0x04], 3));
        // The expected number still works.
        assert_eq!(run(&mut pd, cmd(2, 0x60, &[]), now).code, rc::ACK);
        assert!(events(&mut pd).contains(&PdEvent::NakSent {
            command: 0x60,
            code: NakCode::SequenceNumber
        }));
    }

    #[test]
    fn sqn_zero_restarts_session() {
        let mut pd = Pd::new(PdConfig::new(ADDR)).unwrap();
        let now = Instant::now();
        run(&mut pd, cmd(0, 0x60, &[]), now);
        run(&mut pd, cmd(1, 0x60, &[]), now);
        assert_eq!(run(&mut pd, cmd(0, 0x61, &[0]), now).code, rc::PDID);
        assert_eq!(run(&mut pd, cmd(1, 0x62, &[0]), now).code, rc::PDCAP);
    }

    #[test]
    fn fresh_pd_adopts_first_sequence_number() {
        let mut pd = Pd::new(PdConfig::new(ADDR)).unwrap();
        let now = Instant::now();
        assert_eq!(run(&mut pd, cmd(2, 0x60, &[]), now).code, rc::ACK);
        assert_eq!(run(&mut pd, cmd(3, 0x60, &[]), now).code, rc::ACK);
        assert_eq!(run(&mut pd, cmd(3 - 1, 0x60, &[]), now).code, rc::NAK);
    }

    #[test]
    fn retry_resends_card_byte_for_byte_and_delivery_is_confirmed_by_next_sqn() {
        let mut pd = Pd::new(PdConfig::new(ADDR)).unwrap();
        let now = Instant::now();
        run(&mut pd, cmd(0, 0x60, &[]), now);
        pd.queue_card(card26(), now).unwrap();
        let first = pd.handle_frame(&cmd(1, 0x60, &[]), now).unwrap();
        let f = decode(&first);
        assert_eq!(f.code, rc::RAW);
        // reader 0, Wiegand, 26 bits LE, then the 4 data bytes.
        assert_eq!(f.data, vec![0, 1, 26, 0, 0x12, 0x34, 0x56, 0x40]);
        assert_eq!(events(&mut pd).last(), Some(&PdEvent::CardSent(card26())));
        // The CP did not get it and retries with the same SQN: identical bytes, queue empty.
        let again = pd.handle_frame(&cmd(1, 0x60, &[]), now).unwrap();
        assert_eq!(first, again);
        assert!(events(&mut pd).is_empty());
        // Next SQN: plain ACK, and the card counts as delivered.
        assert_eq!(run(&mut pd, cmd(2, 0x60, &[]), now).code, rc::ACK);
        assert_eq!(events(&mut pd), vec![PdEvent::CardDelivered(card26())]);
    }

    #[test]
    fn same_sqn_different_command_is_processed_not_replayed() {
        let mut pd = Pd::new(PdConfig::new(ADDR)).unwrap();
        let now = Instant::now();
        run(&mut pd, cmd(0, 0x60, &[]), now);
        assert_eq!(run(&mut pd, cmd(0, 0x61, &[0]), now).code, rc::PDID);
        let mut p = Pd::new(PdConfig::new(ADDR)).unwrap();
        run(&mut p, cmd(0, 0x60, &[]), now);
        run(&mut p, cmd(1, 0x60, &[]), now);
        assert_eq!(run(&mut p, cmd(1, 0x64, &[]), now).code, rc::LSTATR);
    }

    #[test]
    fn card_sent_in_a_dropped_session_is_resent_after_restart() {
        let mut pd = Pd::new(PdConfig::new(ADDR)).unwrap();
        let now = Instant::now();
        run(&mut pd, cmd(0, 0x60, &[]), now);
        pd.queue_card(card26(), now).unwrap();
        assert_eq!(run(&mut pd, cmd(1, 0x60, &[]), now).code, rc::RAW);
        // CP gave up and restarts with ID at SQN 0.
        run(&mut pd, cmd(0, 0x61, &[0]), now);
        assert_eq!(run(&mut pd, cmd(1, 0x60, &[]), now).code, rc::RAW);
    }

    #[test]
    fn stale_cards_are_dropped_not_sent() {
        let mut pd = Pd::new(PdConfig::new(ADDR)).unwrap();
        let now = Instant::now();
        pd.queue_card(card26(), now).unwrap();
        let later = now + Duration::from_secs(6);
        assert_eq!(run(&mut pd, cmd(0, 0x60, &[]), later).code, rc::ACK);
        assert!(events(&mut pd).contains(&PdEvent::CardDropped {
            card: card26(),
            reason: DropReason::Expired
        }));
    }

    #[test]
    fn card_queue_is_bounded_and_validated() {
        let mut cfg = PdConfig::new(ADDR);
        cfg.card_queue_len = 2;
        let mut pd = Pd::new(cfg).unwrap();
        let now = Instant::now();
        pd.queue_card(card26(), now).unwrap();
        pd.queue_card(card26(), now).unwrap();
        assert_eq!(pd.queue_card(card26(), now), Err(PdError::QueueFull(2)));
        let bad = RawCard {
            data: vec![0; 3],
            ..card26()
        };
        assert!(matches!(
            pd.queue_card(bad, now),
            Err(PdError::InvalidCard(_))
        ));
        let bad = RawCard {
            reader: 1,
            ..card26()
        };
        assert!(matches!(
            pd.queue_card(bad, now),
            Err(PdError::InvalidCard(_))
        ));
        let bad = RawCard {
            bit_count: 0,
            data: vec![],
            ..card26()
        };
        assert!(matches!(
            pd.queue_card(bad, now),
            Err(PdError::InvalidCard(_))
        ));
    }

    #[test]
    fn nak_codes() {
        let mut pd = Pd::new(PdConfig::new(ADDR)).unwrap();
        let now = Instant::now();
        run(&mut pd, cmd(0, 0x60, &[]), now);
        // Unknown command.
        let r = run(&mut pd, cmd(1, 0x42, &[]), now);
        assert_eq!((r.code, r.data), (rc::NAK, vec![0x03]));
        // Bad length.
        let r = run(&mut pd, cmd(2, 0x69, &[0; 13]), now);
        assert_eq!((r.code, r.data), (rc::NAK, vec![0x02]));
        // LED that does not exist.
        let r = run(&mut pd, cmd(3, 0x69, &led_data(0, 1, 1, 2)), now);
        assert_eq!((r.code, r.data), (rc::NAK, vec![0x09]));
        // No outputs configured: any output is out of range.
        let r = run(&mut pd, cmd(1, 0x68, &[0, 2, 0, 0]), now);
        assert_eq!((r.code, r.data), (rc::NAK, vec![0x09]));
        // Secure channel.
        let r = run(&mut pd, cmd(2, 0x76, &[0; 8]), now);
        assert_eq!((r.code, r.data), (rc::NAK, vec![0x05]));
        // A security block in a plaintext PD.
        let mut f = cmd(3, 0x60, &[]);
        f.scb = Some(vec![2, 0x15]);
        let r = run(&mut pd, f, now);
        assert_eq!((r.code, r.data), (rc::NAK, vec![0x05]));
    }

    #[test]
    fn led_buzzer_output_state_is_tracked() {
        let mut cfg = PdConfig::new(ADDR);
        cfg.outputs = 2;
        let mut pd = Pd::new(cfg).unwrap();
        let now = Instant::now();
        run(&mut pd, cmd(0, 0x60, &[]), now);
        events(&mut pd);
        // Permanent green.
        assert_eq!(
            run(&mut pd, cmd(1, 0x69, &led_data(0, 0, 1, 2)), now).code,
            rc::ACK
        );
        assert_eq!(pd.leds()[0].effective().on_color, 2);
        // Temporary red for 1 s.
        let temp = [0, 0, 2, 3, 3, 1, 0, 10, 0, 0, 0, 0, 0, 0];
        assert_eq!(run(&mut pd, cmd(2, 0x69, &temp), now).code, rc::ACK);
        assert_eq!(pd.leds()[0].effective().on_color, 1);
        assert_eq!(pd.leds()[0].permanent.on_color, 2);
        let evs = events(&mut pd);
        assert_eq!(evs.len(), 2);
        assert!(matches!(evs[1], PdEvent::Led(s) if s.temporary.is_some()));
        assert_eq!(pd.next_timeout(), Some(now + Duration::from_secs(1)));
        pd.handle_timeout(now + Duration::from_secs(1));
        assert_eq!(pd.leds()[0].effective().on_color, 2);
        assert!(matches!(events(&mut pd)[..], [PdEvent::Led(s)] if s.temporary.is_none()));
        // Buzzer.
        assert_eq!(
            run(&mut pd, cmd(3, 0x6A, &[0, 2, 1, 1, 2]), now).code,
            rc::ACK
        );
        assert_eq!(pd.buzzer(0).map(|b| b.count), Some(2));
        // Output 1 on, then temporary off for 0.5 s.
        assert_eq!(run(&mut pd, cmd(1, 0x68, &[1, 2, 0, 0]), now).code, rc::ACK);
        assert!(pd.outputs()[1].active);
        assert_eq!(run(&mut pd, cmd(2, 0x68, &[1, 6, 5, 0]), now).code, rc::ACK);
        assert!(!pd.outputs()[1].active);
        pd.handle_timeout(now + Duration::from_millis(500));
        assert!(pd.outputs()[1].active);
        // OSTAT reports both outputs.
        let r = run(&mut pd, cmd(3, 0x66, &[]), now);
        assert_eq!((r.code, r.data), (rc::OSTATR, vec![0, 1]));
        // A multi-record command with one bad record changes nothing.
        let mut data = led_data(0, 0, 1, 5);
        data.extend(led_data(0, 9, 1, 5));
        assert_eq!(run(&mut pd, cmd(1, 0x69, &data), now).code, rc::NAK);
        assert_eq!(pd.leds()[0].permanent.on_color, 2);
    }

    #[test]
    fn caps_are_honest() {
        // Whatever PDCAP advertises must be accepted; what it does not must not be claimed.
        for (buzzer, outputs) in [(true, 0u8), (false, 3)] {
            let mut cfg = PdConfig::new(ADDR);
            cfg.buzzer = buzzer;
            cfg.outputs = outputs;
            let mut pd = Pd::new(cfg).unwrap();
            let now = Instant::now();
            let r = run(&mut pd, cmd(0, 0x62, &[0]), now);
            assert_eq!(r.code, rc::PDCAP);
            assert_eq!(r.data.len() % 3, 0);
            let caps: Vec<(u8, u8, u8)> =
                r.data.chunks_exact(3).map(|c| (c[0], c[1], c[2])).collect();
            let find = |f: u8| caps.iter().find(|c| c.0 == f).copied();
            let mut sqn = 0;
            let mut next = || {
                sqn = next_sqn(sqn);
                sqn
            };
            // Check character: CRC claimed, and CRC commands are answered (all of ours are).
            assert_eq!(find(8), Some((8, 1, 0)));
            // No secure channel claimed.
            assert_eq!(find(9).map(|c| c.1), Some(0));
            // Receive buffer: as many bytes as the decoder accepts.
            let rx = find(10).map(|c| usize::from(c.1) | usize::from(c.2) << 8);
            assert_eq!(rx, Some(MAX_PACKET_LEN));
            // Every advertised LED is accepted.
            let (_, _, leds) = find(4).expect("LED cap");
            for led in 0..leds {
                let r = run(&mut pd, cmd(next(), 0x69, &led_data(0, led, 1, 1)), now);
                assert_eq!(r.code, rc::ACK);
            }
            // Buzzer accepted iff advertised.
            let r = run(&mut pd, cmd(next(), 0x6A, &[0, 2, 1, 1, 1]), now);
            assert_eq!(r.code == rc::ACK, find(5).is_some());
            // Outputs: every advertised one is accepted.
            let n = find(2).map_or(0, |c| c.2);
            assert_eq!(n, outputs);
            for o in 0..n {
                let r = run(&mut pd, cmd(next(), 0x68, &[o, 2, 0, 0]), now);
                assert_eq!(r.code, rc::ACK);
            }
            // No text output, no contact inputs claimed: those are NAKed (never sent by a CP
            // that reads our caps).
            assert!(find(6).is_none() && find(1).is_none());
        }
    }

    #[test]
    fn other_addresses_and_replies_are_ignored() {
        let mut pd = Pd::new(PdConfig::new(ADDR)).unwrap();
        let now = Instant::now();
        let mut f = cmd(0, 0x60, &[]);
        f.addr_byte = 0x01;
        assert!(pd.handle_frame(&f, now).is_none());
        f.addr_byte = ADDR | 0x80;
        assert!(pd.handle_frame(&f, now).is_none());
        assert!(events(&mut pd).is_empty());
    }

    #[test]
    fn broadcast_only_for_id_and_cap() {
        let mut pd = Pd::new(PdConfig::new(ADDR)).unwrap();
        let now = Instant::now();
        let mut f = cmd(0, 0x61, &[0]);
        f.addr_byte = 0x7F;
        let r = run(&mut pd, f.clone(), now);
        assert_eq!((r.addr_byte, r.code), (0xFF, rc::PDID));
        f.code = 0x60;
        f.data.clear();
        f.sqn = 1;
        assert!(pd.handle_frame(&f, now).is_none());
    }

    #[test]
    fn online_offline_from_clock() {
        let mut pd = Pd::new(PdConfig::new(ADDR)).unwrap();
        let now = Instant::now();
        assert!(!pd.is_online());
        assert_eq!(pd.next_timeout(), None);
        run(&mut pd, cmd(0, 0x60, &[]), now);
        assert!(pd.is_online());
        pd.handle_timeout(now + Duration::from_secs(2));
        assert!(pd.is_online());
        pd.handle_timeout(now + Duration::from_secs(4));
        assert!(!pd.is_online());
        assert_eq!(events(&mut pd), vec![PdEvent::Online, PdEvent::Offline]);
        run(&mut pd, cmd(1, 0x60, &[]), now + Duration::from_secs(5));
        assert_eq!(events(&mut pd), vec![PdEvent::Online]);
    }

    #[test]
    fn comset_applies_after_the_reply_and_refuses_bad_settings() {
        let mut pd = Pd::new(PdConfig::new(ADDR)).unwrap();
        pd.set_neighbours(vec![9], true);
        let now = Instant::now();
        // Taken address: refused, current settings reported.
        let r = run(&mut pd, cmd(0, 0x6E, &[9, 0x80, 0x25, 0, 0]), now);
        assert_eq!((r.code, r.data), (0x54, vec![ADDR, 0x00, 0xC2, 0x01, 0x00]));
        // Unsupported baud: refused.
        let r = run(&mut pd, cmd(1, 0x6E, &[7, 0x10, 0x27, 0, 0]), now);
        assert_eq!(r.data, vec![ADDR, 0x00, 0xC2, 0x01, 0x00]);
        assert!(events(&mut pd)
            .iter()
            .any(|e| matches!(e, PdEvent::ComSetRefused { address: 7, .. })));
        // Valid: the reply (from the old address) carries the new settings...
        let r = run(&mut pd, cmd(2, 0x6E, &[7, 0x80, 0x25, 0, 0]), now);
        assert_eq!(r.addr_byte, ADDR | 0x80);
        assert_eq!(r.data, vec![7, 0x80, 0x25, 0x00, 0x00]);
        assert!(events(&mut pd).contains(&PdEvent::ComSetApplied {
            address: 7,
            baud: 9600
        }));
        // ...then the PD answers on the new address only; its identity is unchanged.
        assert_eq!((pd.bus_address(), pd.address()), (7, ADDR));
        assert!(pd.handle_frame(&cmd(3, 0x60, &[]), now).is_none());
        let mut f = cmd(3, 0x60, &[]);
        f.addr_byte = 7;
        assert_eq!(run(&mut pd, f, now).addr_byte, 0x87);
        // With other PDs on the line a speed change is refused (it would move them all).
        let mut pd = Pd::new(PdConfig::new(ADDR)).unwrap();
        pd.set_neighbours(vec![9], false);
        let r = run(&mut pd, cmd(0, 0x6E, &[ADDR, 0x80, 0x25, 0, 0]), now);
        assert_eq!(r.data, vec![ADDR, 0x00, 0xC2, 0x01, 0x00]);
        assert_eq!(pd.set_bus_address(0x7F), Err(PdError::BadAddress(0x7F)));
    }

    #[test]
    fn undecided_previous_card_is_closed_before_the_next_card_is_sent() {
        let mut pd = Pd::new(PdConfig::new(ADDR)).unwrap();
        let now = Instant::now();
        run(&mut pd, cmd(0, 0x60, &[]), now);
        let first = card26();
        let mut second = card26();
        second.data[3] ^= 0x40;
        pd.queue_card(first.clone(), now).unwrap();
        assert_eq!(run(&mut pd, cmd(1, 0x60, &[]), now).code, rc::RAW);
        events(&mut pd);
        pd.queue_card(second.clone(), now).unwrap();
        assert_eq!(run(&mut pd, cmd(2, 0x60, &[]), now).code, rc::RAW);
        let evs: Vec<_> = events(&mut pd)
            .into_iter()
            .filter(|e| matches!(e, PdEvent::PanelVerdict { .. } | PdEvent::CardSent(_)))
            .collect();
        assert_eq!(
            evs,
            vec![
                PdEvent::PanelVerdict {
                    card: first,
                    verdict: Verdict::Unknown
                },
                PdEvent::CardSent(second)
            ]
        );
    }

    #[test]
    fn panel_verdict_from_led_after_raw() {
        let mut pd = Pd::new(PdConfig::new(ADDR)).unwrap();
        let now = Instant::now();
        run(&mut pd, cmd(0, 0x60, &[]), now);
        pd.queue_card(card26(), now).unwrap();
        assert_eq!(run(&mut pd, cmd(1, 0x60, &[]), now).code, rc::RAW);
        // Temporary green flash 300 ms later → granted.
        let green = [0, 0, 2, 5, 5, 2, 0, 30, 0, 0, 0, 0, 0, 0];
        let t = now + Duration::from_millis(300);
        assert_eq!(run(&mut pd, cmd(2, 0x69, &green), t).code, rc::ACK);
        let evs = events(&mut pd);
        assert!(evs.contains(&PdEvent::PanelVerdict {
            card: card26(),
            verdict: Verdict::Granted
        }));
        // Next card: nothing conclusive → unknown when the window closes.
        pd.queue_card(card26(), t).unwrap();
        assert_eq!(run(&mut pd, cmd(3, 0x60, &[]), t).code, rc::RAW);
        events(&mut pd);
        pd.handle_timeout(t + Duration::from_millis(1999));
        assert!(events(&mut pd).is_empty());
        pd.handle_timeout(t + DEFAULT_VERDICT_WINDOW);
        assert_eq!(
            events(&mut pd),
            vec![PdEvent::PanelVerdict {
                card: card26(),
                verdict: Verdict::Unknown
            }]
        );
        // Red permanent after a third card → denied.
        pd.queue_card(card26(), t).unwrap();
        assert_eq!(run(&mut pd, cmd(1, 0x60, &[]), t).code, rc::RAW);
        assert_eq!(
            run(&mut pd, cmd(2, 0x69, &led_data(0, 0, 1, 1)), t).code,
            rc::ACK
        );
        assert!(events(&mut pd).contains(&PdEvent::PanelVerdict {
            card: card26(),
            verdict: Verdict::Denied
        }));
    }

    // ---- secure channel ----

    /// Deterministic "random" source for tests.
    struct CountingRng(u8);

    impl RngCore for CountingRng {
        fn next_u32(&mut self) -> u32 {
            rand_core::impls::next_u32_via_fill(self)
        }
        fn next_u64(&mut self) -> u64 {
            rand_core::impls::next_u64_via_fill(self)
        }
        fn fill_bytes(&mut self, dest: &mut [u8]) {
            for b in dest {
                self.0 = self.0.wrapping_add(1);
                *b = self.0;
            }
        }
        fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
            self.fill_bytes(dest);
            Ok(())
        }
    }

    type Stored = std::sync::Arc<std::sync::Mutex<Vec<(u8, Scbk)>>>;

    struct MemStore(Stored, bool);

    impl KeyStore for MemStore {
        fn store(&mut self, address: u8, key: &Scbk) -> Result<(), String> {
            if self.1 {
                return Err("disk full".into());
            }
            self.0.lock().unwrap().push((address, key.clone()));
            Ok(())
        }
    }

    const KEY: [u8; 16] = [0x11; 16];

    fn secure_pd(scbk: Option<[u8; 16]>, install: bool, enforce: bool) -> (Pd, Stored) {
        secure_pd_store(scbk, install, enforce, false)
    }

    fn secure_pd_store(
        scbk: Option<[u8; 16]>,
        install: bool,
        enforce: bool,
        failing_store: bool,
    ) -> (Pd, Stored) {
        let mut cfg = PdConfig::new(ADDR);
        cfg.secure = Some(SecureConfig {
            scbk: scbk.map(Scbk::new),
            install_mode: install,
            enforce_secure: enforce,
        });
        let stored = Stored::default();
        let deps = PdDeps {
            rng: Some(Box::new(CountingRng(0))),
            key_store: Some(Box::new(MemStore(stored.clone(), failing_store))),
        };
        (Pd::with_deps(cfg, deps).unwrap(), stored)
    }

    /// The CP side of a handshake, driven by the test through `sc` directly.
    fn handshake(pd: &mut Pd, key: &Scbk, use_default: bool, now: Instant) -> Session {
        let cp_random = [0xC0, 0xC1, 0xC2, 0xC3, 0xC4, 0xC5, 0xC6, 0xC7];
        let mut c = cmd(0, 0x76, &cp_random);
        c.scb = Some(vec![3, 0x11, u8::from(!use_default)]);
        let r = run(pd, c, now);
        assert_eq!(r.code, 0x76, "CCRYPT expected, got {r:?}");
        assert_eq!(r.scb, Some(vec![3, 0x12, u8::from(!use_default)]));
        assert_eq!(r.data.len(), 32);
        let pd_random: [u8; 8] = r.data[8..16].try_into().unwrap();
        let keys = SessionKeys::derive(key, &cp_random);
        assert_eq!(
            r.data[16..],
            keys.client_cryptogram(&cp_random, &pd_random)[..],
            "PD cryptogram"
        );
        let server = keys.server_cryptogram(&cp_random, &pd_random);
        let mut c = cmd(1, 0x77, &server);
        c.scb = Some(vec![3, 0x13, u8::from(!use_default)]);
        let r = run(pd, c, now);
        assert_eq!(r.code, 0x78, "RMAC_I expected, got {r:?}");
        assert_eq!(r.scb, Some(vec![3, 0x14, 1]));
        let rmac: [u8; 16] = r.data.clone().try_into().unwrap();
        assert_eq!(rmac, keys.initial_rmac(&server));
        assert!(pd.secure_session());
        Session::new(keys, rmac)
    }

    fn secure_cmd(cp: &mut Session, sqn: u8, code: u8, data: &[u8]) -> Frame {
        let (ty, payload) = if data.is_empty() {
            (0x15, vec![])
        } else {
            (0x17, cp.encrypt(Direction::Command, data))
        };
        let mut f = cmd(sqn, code, &payload);
        f.scb = Some(vec![2, ty]);
        f.data.extend_from_slice(&[0; 4]);
        let mac = cp.sign(Direction::Command, &f.mac_input().unwrap());
        let n = f.data.len() - 4;
        f.data[n..].copy_from_slice(&mac);
        f
    }

    /// Verify and decrypt a secure reply as the CP would; returns (code, data).
    fn open_reply(cp: &mut Session, r: &Frame) -> (u8, Vec<u8>) {
        let ty = match r.scb.as_deref() {
            Some(&[2, t @ (0x16 | 0x18)]) => t,
            other => panic!("not a secure reply: scb {other:?}, code {:#04x}", r.code),
        };
        let n = r.data.len() - 4;
        cp.verify(Direction::Reply, &r.mac_input().unwrap(), &r.data[n..])
            .expect("reply MAC");
        let data = if ty == 0x18 {
            cp.decrypt(Direction::Reply, &r.data[..n]).unwrap()
        } else {
            assert_eq!(n, 0, "SCS_16 carries no data");
            vec![]
        };
        (r.code, data)
    }

    #[test]
    fn secure_session_with_known_key() {
        let (mut pd, _) = secure_pd(Some(KEY), false, true);
        let now = Instant::now();
        // CAP in clear advertises AES-128, no SCBK-D.
        let r = run(&mut pd, cmd(0, 0x62, &[0]), now);
        let caps: Vec<&[u8]> = r.data.chunks(3).collect();
        assert!(caps.contains(&&[9u8, 1, 0][..]), "{caps:?}");
        let mut cp = handshake(&mut pd, &Scbk::new(KEY), false, now);
        assert!(events(&mut pd).contains(&PdEvent::SecureChannelUp { install_key: false }));

        // POLL (MAC only) → ACK (MAC only), chain verified over several packets.
        for sqn in [2u8, 3, 1] {
            let r = run(&mut pd, secure_cmd(&mut cp, sqn, 0x60, &[]), now);
            assert_eq!(open_reply(&mut cp, &r), (rc::ACK, vec![]));
        }
        // Encrypted LED command → ACK; the LED state changed.
        let r = run(
            &mut pd,
            secure_cmd(&mut cp, 2, 0x69, &led_data(0, 0, 1, 2)),
            now,
        );
        assert_eq!(open_reply(&mut cp, &r).0, rc::ACK);
        assert_eq!(pd.leds()[0].permanent.on_color, 2);
        // A card goes out as an encrypted RAW.
        pd.queue_card(card26(), now).unwrap();
        let r = run(&mut pd, secure_cmd(&mut cp, 3, 0x60, &[]), now);
        assert_eq!(r.scb, Some(vec![2, 0x18]));
        // The card bits are not visible on the wire.
        assert!(!r.data.windows(4).any(|w| w == [0x12, 0x34, 0x56, 0x40]));
        assert_eq!(
            open_reply(&mut cp, &r),
            (rc::RAW, vec![0, 1, 26, 0, 0x12, 0x34, 0x56, 0x40])
        );
        // Retry of the same SQN: the identical bytes (not a second MAC step).
        let again = secure_cmd(&mut cp.clone(), 3, 0x60, &[]);
        assert_eq!(pd.handle_frame(&again, now).map(|b| decode(&b)), Some(r));
        // Next command still verifies: the chain did not move on the retry.
        let r = run(&mut pd, secure_cmd(&mut cp, 1, 0x60, &[]), now);
        assert_eq!(open_reply(&mut cp, &r), (rc::ACK, vec![]));
        assert!(events(&mut pd).contains(&PdEvent::CardDelivered(card26())));
    }

    #[test]
    fn enforce_secure_answers_only_id_cap_and_handshake_in_clear() {
        let (mut pd, _) = secure_pd(Some(KEY), false, true);
        let now = Instant::now();
        assert_eq!(run(&mut pd, cmd(0, 0x61, &[0]), now).code, rc::PDID);
        assert_eq!(run(&mut pd, cmd(1, 0x62, &[0]), now).code, rc::PDCAP);
        for (sqn, code, data) in [
            (2u8, 0x60u8, vec![]),
            (3, 0x64, vec![]),
            (1, 0x69, led_data(0, 0, 1, 2)),
            // A clear COMSET would let anyone on the line readdress the reader.
            (2, 0x6E, vec![7, 0x80, 0x25, 0x00, 0x00]),
        ] {
            let r = run(&mut pd, cmd(sqn, code, &data), now);
            assert_eq!((r.code, r.data), (rc::NAK, vec![0x06]), "code {code:#04x}");
        }
        assert_eq!((pd.bus_address(), pd.config().baud), (ADDR, 115_200));
        assert!(!events(&mut pd)
            .iter()
            .any(|e| matches!(e, PdEvent::ComSetApplied { .. })));
        // Broadcast COMSET too.
        let mut f = cmd(3, 0x6E, &[7, 0x80, 0x25, 0x00, 0x00]);
        f.addr_byte = BROADCAST_ADDR;
        assert_eq!(run(&mut pd, f, now).data, vec![0x06]);
        assert_eq!(pd.bus_address(), ADDR);
        // CHLNG without its security block is refused.
        let r = run(&mut pd, cmd(1, 0x76, &[1; 8]), now);
        assert_eq!(r.data, vec![0x06]);
        // Without enforcement, plaintext POLL is fine while no session exists...
        let (mut lax, _) = secure_pd(Some(KEY), false, false);
        assert_eq!(run(&mut lax, cmd(0, 0x60, &[]), now).code, rc::ACK);
        // ...but not once a session is up.
        let _cp = handshake(&mut lax, &Scbk::new(KEY), false, now);
        let r = run(&mut lax, cmd(2, 0x60, &[]), now);
        assert_eq!((r.code, r.data), (rc::NAK, vec![0x06]));
    }

    #[test]
    fn nothing_clear_is_accepted_inside_a_session() {
        let now = Instant::now();
        // Enforced or not: once a session is up, a clear command (even ID, CAP, COMSET) is
        // refused with NAK 0x06 in clear and ends the session, as libosdp's PD does.
        for enforce in [true, false] {
            for (code, data) in [
                (0x6Eu8, vec![7u8, 0x80, 0x25, 0x00, 0x00]),
                (0x61, vec![0]),
                (0x62, vec![0]),
                (0x60, vec![]),
            ] {
                let (mut pd, _) = secure_pd(Some(KEY), false, enforce);
                let _cp = handshake(&mut pd, &Scbk::new(KEY), false, now);
                events(&mut pd);
                let r = run(&mut pd, cmd(2, code, &data), now);
                assert_eq!(
                    (r.code, r.data, r.scb),
                    (rc::NAK, vec![0x06], None),
                    "code {code:#04x} enforce {enforce}"
                );
                assert!(!pd.secure_session(), "code {code:#04x}");
                let evs = events(&mut pd);
                assert!(evs.contains(&PdEvent::SecureChannelDown {
                    reason: ScEndReason::PlainCommand
                }));
                assert!(!evs
                    .iter()
                    .any(|e| matches!(e, PdEvent::ComSetApplied { .. })));
                assert_eq!((pd.bus_address(), pd.config().baud), (ADDR, 115_200));
            }
        }
        // The same COMSET inside the session is applied.
        let (mut pd, _) = secure_pd(Some(KEY), false, true);
        let mut cp = handshake(&mut pd, &Scbk::new(KEY), false, now);
        let r = run(
            &mut pd,
            secure_cmd(&mut cp, 2, 0x6E, &[7, 0x80, 0x25, 0x00, 0x00]),
            now,
        );
        assert_eq!(
            open_reply(&mut cp, &r),
            (0x54, vec![7, 0x80, 0x25, 0x00, 0x00])
        );
        assert_eq!((pd.bus_address(), pd.config().baud), (7, 9600));
    }

    #[test]
    fn a_cp_asking_for_scbk_d_gets_the_installed_key_outside_install_mode() {
        // Such CPs (PyPI `osdp` 1.6) ask for SCBK-D in every osdp_CHLNG but take the key
        // the PD names in osdp_CCRYPT. libosdp's PD answers with its installed key there.
        let (mut pd, _) = secure_pd(Some(KEY), false, true);
        let now = Instant::now();
        let cp_random = [0xC0, 0xC1, 0xC2, 0xC3, 0xC4, 0xC5, 0xC6, 0xC7];
        let mut c = cmd(0, 0x76, &cp_random);
        c.scb = Some(vec![3, 0x11, 0]);
        let r = run(&mut pd, c, now);
        assert_eq!(r.code, 0x76, "CCRYPT expected, got {r:?}");
        // Key byte 1: the PD used its SCBK, not SCBK-D.
        assert_eq!(r.scb, Some(vec![3, 0x12, 1]));
        let pd_random: [u8; 8] = r.data[8..16].try_into().unwrap();
        let keys = SessionKeys::derive(&Scbk::new(KEY), &cp_random);
        assert_eq!(
            r.data[16..],
            keys.client_cryptogram(&cp_random, &pd_random)[..]
        );
        let server = keys.server_cryptogram(&cp_random, &pd_random);
        let mut c = cmd(1, 0x77, &server);
        c.scb = Some(vec![3, 0x13, 0]);
        let r = run(&mut pd, c, now);
        assert_eq!((r.code, r.scb), (0x78, Some(vec![3, 0x14, 1])));
        assert!(pd.secure_session());
        assert!(events(&mut pd).contains(&PdEvent::SecureChannelUp { install_key: false }));
        let mut cp = Session::new(keys, r.data.clone().try_into().unwrap());
        let r = run(&mut pd, secure_cmd(&mut cp, 2, 0x60, &[]), now);
        assert_eq!(open_reply(&mut cp, &r), (rc::ACK, vec![]));

        // A CP that really computes with SCBK-D gets no session.
        scbk_d_gets_no_session(&mut pd, now);
    }

    /// A CP asking for and computing with SCBK-D (SQN 0, 1): the PD answers with its own
    /// key (CCRYPT key byte 1), so the CP's cryptogram fails: NAK 0x06, no session.
    fn scbk_d_gets_no_session(pd: &mut Pd, now: Instant) {
        let cp_random = [0x5D; 8];
        let mut c = cmd(0, 0x76, &cp_random);
        c.scb = Some(vec![3, 0x11, 0]);
        let r = run(pd, c, now);
        assert_eq!(
            (r.code, r.scb.clone()),
            (0x76, Some(vec![3, 0x12, 1])),
            "{r:?}"
        );
        let pd_random: [u8; 8] = r.data[8..16].try_into().unwrap();
        let default = SessionKeys::derive(&Scbk::default_key(), &cp_random);
        let mut c = cmd(1, 0x77, &default.server_cryptogram(&cp_random, &pd_random));
        c.scb = Some(vec![3, 0x13, 0]);
        assert_eq!(run(pd, c, now).data, vec![0x06]);
        assert!(!pd.secure_session());
        assert!(!events(pd).contains(&PdEvent::SecureChannelUp { install_key: true }));
    }

    #[test]
    fn bad_mac_or_ciphertext_ends_the_session_with_nak_6() {
        let (mut pd, _) = secure_pd(Some(KEY), false, true);
        let now = Instant::now();
        let mut cp = handshake(&mut pd, &Scbk::new(KEY), false, now);
        let mut f = secure_cmd(&mut cp, 2, 0x60, &[]);
        let n = f.data.len() - 1;
        f.data[n] ^= 0x01;
        let r = run(&mut pd, f, now);
        assert_eq!((r.code, r.data, r.scb), (rc::NAK, vec![0x06], None));
        assert!(!pd.secure_session());
        assert!(events(&mut pd).contains(&PdEvent::SecureChannelDown {
            reason: ScEndReason::BadMac
        }));
        // Ciphertext that is not whole blocks (valid MAC over it): also refused.
        let mut cp = handshake(&mut pd, &Scbk::new(KEY), false, now);
        let mut f = cmd(2, 0x69, &[0xAA; 15]);
        f.scb = Some(vec![2, 0x17]);
        f.data.extend_from_slice(&[0; 4]);
        let mac = cp.sign(Direction::Command, &f.mac_input().unwrap());
        let n = f.data.len() - 4;
        f.data[n..].copy_from_slice(&mac);
        assert_eq!(run(&mut pd, f, now).data, vec![0x06]);
        assert!(!pd.secure_session());
        // Secure packet without any session, and a too-short one.
        let mut f = cmd(3, 0x60, &[1, 2]);
        f.scb = Some(vec![2, 0x15]);
        assert_eq!(run(&mut pd, f, now).data, vec![0x06]);
        // Unknown security block type.
        let mut f = cmd(1, 0x60, &[]);
        f.scb = Some(vec![2, 0x19]);
        assert_eq!(run(&mut pd, f, now).data, vec![0x06]);
    }

    #[test]
    fn wrong_key_at_the_cp_gets_no_session() {
        let (mut pd, _) = secure_pd(Some(KEY), false, true);
        let now = Instant::now();
        let cp_random = [9u8; 8];
        let mut c = cmd(0, 0x76, &cp_random);
        c.scb = Some(vec![3, 0x11, 1]);
        let r = run(&mut pd, c, now);
        let pd_random: [u8; 8] = r.data[8..16].try_into().unwrap();
        // CP computes with another key.
        let wrong = SessionKeys::derive(&Scbk::new([0x22; 16]), &cp_random);
        let mut c = cmd(1, 0x77, &wrong.server_cryptogram(&cp_random, &pd_random));
        c.scb = Some(vec![3, 0x13, 1]);
        let r = run(&mut pd, c, now);
        assert_eq!((r.code, r.data), (rc::NAK, vec![0x06]));
        assert!(!pd.secure_session());
        // SCRYPT without a preceding CHLNG.
        let mut c = cmd(2, 0x77, &[0; 16]);
        c.scb = Some(vec![3, 0x13, 1]);
        assert_eq!(run(&mut pd, c, now).data, vec![0x06]);
        // A CP that computes with SCBK-D gets no session outside install mode.
        scbk_d_gets_no_session(&mut pd, now);
    }

    #[test]
    fn install_mode_keyset_then_scbk_d_refused() {
        let (mut pd, stored) = secure_pd(None, true, true);
        let now = Instant::now();
        // CAP: AES-128 and SCBK-D accepted.
        let r = run(&mut pd, cmd(0, 0x62, &[0]), now);
        assert!(r.data.chunks(3).any(|c| c == [9, 1, 1]));
        // CP tries its key first: no key here → NAK 6 (libosdp's CP then retries SCBK-D).
        let mut c = cmd(1, 0x76, &[5; 8]);
        c.scb = Some(vec![3, 0x11, 1]);
        assert_eq!(run(&mut pd, c, now).data, vec![0x06]);
        let mut cp = handshake(&mut pd, &Scbk::default_key(), true, now);
        assert!(events(&mut pd).contains(&PdEvent::SecureChannelUp { install_key: true }));
        // KEYSET (encrypted) → ACK under the SCBK-D session, key stored first.
        let new_key = [0x5C; 16];
        let mut data = vec![1, 16];
        data.extend_from_slice(&new_key);
        let r = run(&mut pd, secure_cmd(&mut cp, 2, 0x75, &data), now);
        assert_eq!(open_reply(&mut cp, &r), (rc::ACK, vec![]));
        assert_eq!(
            stored.lock().unwrap().as_slice(),
            &[(ADDR, Scbk::new(new_key))]
        );
        assert!(!pd.secure_session() && !pd.in_install_mode());
        let evs = events(&mut pd);
        assert!(evs.contains(&PdEvent::KeyInstalled));
        assert!(evs.contains(&PdEvent::SecureChannelDown {
            reason: ScEndReason::KeyChanged
        }));
        // A retried KEYSET gets the same ACK bytes again.
        let retry = secure_cmd(&mut cp.clone(), 2, 0x75, &data);
        assert_eq!(pd.handle_frame(&retry, now).map(|b| decode(&b)), Some(r));
        // SCBK-D no longer accepted; the new key works.
        scbk_d_gets_no_session(&mut pd, now);
        let mut cp = handshake(&mut pd, &Scbk::new(new_key), false, now);
        let r = run(&mut pd, secure_cmd(&mut cp, 2, 0x60, &[]), now);
        assert_eq!(open_reply(&mut cp, &r), (rc::ACK, vec![]));
        // CAP no longer offers SCBK-D.
        let r = run(&mut pd, secure_cmd(&mut cp, 3, 0x62, &[0]), now);
        let (_, caps) = open_reply(&mut cp, &r);
        assert!(caps.chunks(3).any(|c| c == [9, 1, 0]));
    }

    #[test]
    fn keyset_refused_in_clear_or_when_it_cannot_be_stored() {
        let (mut pd, stored) = secure_pd_store(Some(KEY), false, false, true);
        let now = Instant::now();
        let mut data = vec![1, 16];
        data.extend_from_slice(&[0x77; 16]);
        // In clear: NAK 6.
        run(&mut pd, cmd(0, 0x60, &[]), now);
        assert_eq!(run(&mut pd, cmd(1, 0x75, &data), now).data, vec![0x06]);
        // In a session but the store fails: NAK 6, old key kept, event says why.
        let mut cp = handshake(&mut pd, &Scbk::new(KEY), false, now);
        let r = run(&mut pd, secure_cmd(&mut cp, 2, 0x75, &data), now);
        assert_eq!(open_reply(&mut cp, &r), (rc::NAK, vec![0x06]));
        assert!(stored.lock().unwrap().is_empty());
        assert!(events(&mut pd)
            .iter()
            .any(|e| matches!(e, PdEvent::KeyStoreFailed(_))));
        // Unknown key type: NAK 9 (record).
        data[0] = 2;
        let r = run(&mut pd, secure_cmd(&mut cp, 3, 0x75, &data), now);
        assert_eq!(open_reply(&mut cp, &r), (rc::NAK, vec![0x09]));
        // The old key still works after a restart of the session.
        let _ = handshake(&mut pd, &Scbk::new(KEY), false, now);
    }

    #[test]
    fn session_times_out_and_sqn_zero_ends_it() {
        let (mut pd, _) = secure_pd(Some(KEY), false, true);
        let now = Instant::now();
        let mut cp = handshake(&mut pd, &Scbk::new(KEY), false, now);
        let r = run(&mut pd, secure_cmd(&mut cp, 2, 0x60, &[]), now);
        open_reply(&mut cp, &r);
        let t = now + Duration::from_secs(7);
        pd.handle_timeout(t);
        assert!(pd.secure_session());
        assert!(pd.next_timeout().is_some_and(|t| t <= now + SC_TIMEOUT));
        pd.handle_timeout(now + SC_TIMEOUT);
        assert!(!pd.secure_session());
        assert!(events(&mut pd).contains(&PdEvent::SecureChannelDown {
            reason: ScEndReason::Timeout
        }));
        // A new session, then the CP restarts the link with SQN 0.
        let _cp = handshake(&mut pd, &Scbk::new(KEY), false, now);
        assert_eq!(run(&mut pd, cmd(0, 0x61, &[0]), now).code, rc::PDID);
        assert!(!pd.secure_session());
    }

    #[test]
    fn debug_output_of_a_secure_pd_shows_no_key_material() {
        let (mut pd, _) = secure_pd(Some([0xA7; 16]), false, true);
        let now = Instant::now();
        let _cp = handshake(&mut pd, &Scbk::new([0xA7; 16]), false, now);
        let text = format!("{pd:?}");
        assert!(text.contains("Active"), "{text}");
        // 0xA7 = 167 (decimal Debug of an array) or a7 (hex).
        assert!(!text.contains("167") && !text.to_lowercase().contains("a7, "));
    }

    #[test]
    fn secure_config_needs_a_key_or_install_mode_and_an_rng() {
        let mut cfg = PdConfig::new(ADDR);
        cfg.secure = Some(SecureConfig {
            scbk: None,
            install_mode: false,
            enforce_secure: false,
        });
        assert!(matches!(Pd::new(cfg.clone()), Err(PdError::Config(_))));
        cfg.secure = Some(SecureConfig {
            scbk: Some(Scbk::new(KEY)),
            install_mode: false,
            enforce_secure: false,
        });
        assert!(matches!(Pd::new(cfg), Err(PdError::Config(_))));
    }

    #[test]
    fn config_validation() {
        assert_eq!(
            Pd::new(PdConfig::new(0x7F)).err(),
            Some(PdError::BadAddress(0x7F))
        );
        let mut c = PdConfig::new(1);
        c.readers = 0;
        assert!(Pd::new(c).is_err());
    }
}
