//! The Peripheral Device state machine for one address (OSDP 2.2), sans-IO.
//!
//! Input: decoded frames addressed to this PD and the current time. Output: reply packets
//! (bytes to write at once) and [`PdEvent`]s for the daemon. No port, timer or clock inside.
//!
//! Split along its seams, as quinn-proto splits its connection: this file holds the
//! configuration, the events and the dispatcher (`handle_frame` → security checks →
//! `execute`); [`sequence`] the sequence numbers and retries, [`secure`] the secure channel,
//! [`outputs`] the LED/buzzer/output state, [`cards`] the card queue.

mod cards;
mod outputs;
mod secure;
mod sequence;
#[cfg(test)]
mod test_util;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::command::{self, BuzzerRecord, Command, LedParams};
use super::phy::{Frame, BROADCAST_ADDR, MAX_PACKET_LEN, REPLY_BIT};
use super::reply::{cap, Capability, NakCode, PdIdentity, RawCard, Reply};
use super::sc::{scs, Scbk};
use super::verdict::{Verdict, VerdictWindow, DEFAULT_VERDICT_WINDOW};

use cards::Queued;
pub use cards::{DropReason, MAX_CARD_BYTES};
pub use outputs::{LedState, OutputState};
use secure::ScState;
pub use secure::{KeyStore, PdDeps, ScEndReason, SecureConfig, SC_TIMEOUT};
use sequence::{SeqCheck, Sequence};

/// Baud rates a PD accepts in osdp_COMSET (the usual OSDP speeds).
pub const COMSET_BAUDS: [u32; 6] = [9600, 19_200, 38_400, 57_600, 115_200, 230_400];

/// Events queued per PD before the oldest are dropped (the adapter drains them after every
/// chunk, so this only fills when the daemon stalls).
const EVENT_QUEUE_CAP: usize = 64;

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

/// What the PD reports to the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PdEvent {
    /// A valid command arrived after silence (or for the first time).
    Online,
    /// No valid command for `offline_after`.
    Offline,
    /// The card is leaving as osdp_RAW in reply to this POLL (the tap-to-RAW moment), with
    /// the attempt it was queued for ([`Pd::queue_attempt`]).
    CardSent {
        card: RawCard,
        attempt: Option<AttemptId>,
    },
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
        /// The attempt the card was queued for: whose event this verdict belongs to.
        attempt: Option<AttemptId>,
    },
}

/// The caller's id for one card hand-off, carried with the card from [`Pd::queue_attempt`]
/// to its [`PdEvent::CardSent`] and [`PdEvent::PanelVerdict`], so a verdict reaches the
/// attempt it is about even when several cards of one door are in flight.
pub type AttemptId = u64;

/// One Peripheral Device.
#[derive(Debug)]
pub struct Pd {
    cfg: PdConfig,
    sequence: Sequence,
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
    verdict: VerdictWindow<(RawCard, Option<AttemptId>)>,
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
            sequence: Sequence::new(),
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

    /// When the last valid command for this PD arrived (for `keyway status`).
    pub fn last_command_at(&self) -> Option<Instant> {
        self.last_rx
    }

    /// A secure session is up.
    pub fn secure_session_active(&self) -> bool {
        matches!(self.sc, ScState::Active { .. })
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
        offline
            .into_iter()
            .chain(self.output_deadlines())
            .chain(self.session_deadline())
            .chain(self.verdict.deadline())
            .min()
    }

    /// Advance timers: offline detection, end of temporary LED and output settings.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(((card, attempt), verdict)) = self.verdict.expire(now) {
            self.emit(PdEvent::PanelVerdict {
                card,
                verdict,
                attempt,
            });
        }
        self.expire_session(now);
        if self.online {
            if let Some(last) = self.last_rx {
                if now.saturating_duration_since(last) > self.cfg.offline_after {
                    self.online = false;
                    self.emit(PdEvent::Offline);
                }
            }
        }
        self.expire_outputs(now);
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
        match self.sequence.check(s, frame.code) {
            SeqCheck::Restart => {
                // New session: a card sent in the old one may never have arrived, and the CP
                // has dropped any secure session (it restarts the link before a handshake).
                if let Some(q) = self.in_flight.take() {
                    self.cards.push_front(q);
                }
                self.end_session(ScEndReason::Restart);
            }
            SeqCheck::Retry(bytes) => return Some(bytes),
            SeqCheck::OutOfOrder => {
                let reply = Reply::Nak(NakCode::SequenceNumber);
                self.emit(PdEvent::NakSent {
                    command: frame.code,
                    code: NakCode::SequenceNumber,
                });
                return self.encode(frame, &reply, Wrap::Plain);
            }
            SeqCheck::Advanced => {
                if let Some(q) = self.in_flight.take() {
                    // The CP advanced: it got the osdp_RAW.
                    self.emit(PdEvent::CardDelivered(q.card));
                }
            }
            SeqCheck::Other => {}
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
        self.sequence.record(s, frame.code, bytes.clone());
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
            Wrap::Secure => self.seal(&mut frame)?,
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
}

#[cfg(test)]
mod tests {
    use super::sequence::next_sqn;
    use super::test_util::*;
    use super::*;
    use crate::osdp::phy::Check;
    use crate::osdp::reply::code as rc;

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
