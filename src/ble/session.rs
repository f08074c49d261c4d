//! The reader side of one Aliro BLE connection, sans-IO: bytes from the L2CAP channel and the
//! current time in, frames to send and events out. It owns no socket, timer or RNG.
//!
//! Flow (vectors: `ble_standard_expedited.json`):
//! 1. The phone sends INITIATE_ACCESS_PROTOCOL (unencrypted notification) carrying the A5 TLV
//!    it would have returned in the SELECT FCI. BLE has no SELECT, so the session hands the
//!    shared reader core ([`ReaderTransaction`]) the FCI it would have received and sends the
//!    core's AUTH0 as AP_RQ: the same APDUs as NFC, with interface byte C3 in every salt.
//! 2. AP_RS / AP_RQ pairs carry AUTH0, AUTH1 (and nothing else) until the core reports
//!    [`Event::Authenticated`]; the session then derives the BLE notification keys.
//! 3. The caller decides (ACL) and calls [`ReaderSession::decide`]. Granted: EXCHANGE {98 00}
//!    (URSK request, as the vectors' reader does; a BLE endpoint rejects the NFC-style tag 97),
//!    then the encrypted "access protocol completed" notification with reader state
//!    "unsecured" (01). Denied: the notification with "secured" (00) straight away.
//!
//! The whole connection has one deadline (`timeout` from creation): a phone that connects and
//! goes silent is dropped by [`ReaderSession::poll`].

use std::time::{Duration, Instant};

use p256::{PublicKey, SecretKey};
use thiserror::Error;

use crate::aliro::apdu::ResponseApdu;
use crate::aliro::consts::{self, sw, tag};
use crate::aliro::crypto::{self, CryptoError, Role};
use crate::aliro::keys::TranscriptContext;
use crate::aliro::reader::{
    Action, AliroError, AuthenticatedEndpoint, Outcome, Randomness, ReaderIdentity,
    ReaderTransaction, TransactionParams,
};
use crate::aliro::tlv;

use super::keys::{BleVersions, NotificationChannel, NotificationError};
use super::message::{
    self, Deframer, FrameError, Message, ATTR_PROPRIETARY_INFO, ATTR_READER_INFORMATION,
    NOTIFY_ACCESS_PROTOCOL_COMPLETED, NOTIFY_INITIATE_ACCESS_PROTOCOL, PROTOCOL_AP,
    PROTOCOL_NOTIFICATION,
};

/// Reader state reported in the completion notification: the door stays locked.
pub const READER_STATE_SECURED: u8 = 0x00;
/// Reader state reported in the completion notification: the door opens.
pub const READER_STATE_UNSECURED: u8 = 0x01;
/// URSK request, the EXCHANGE payload a BLE reader sends after a grant.
const URSK_REQUEST: [u8; 2] = [0x98, 0x00];

/// Why a BLE session ended without completing.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BleError {
    #[error("framing: {0}")]
    Frame(#[from] FrameError),
    #[error("aliro: {0}")]
    Aliro(#[from] AliroError),
    #[error("notification: {0}")]
    Notification(#[from] NotificationError),
    #[error("BLE keys: {0}")]
    Keys(CryptoError),
    #[error("unexpected message {protocol:02X}/{id:02X} while {state}")]
    Unexpected {
        protocol: u8,
        id: u8,
        state: &'static str,
    },
    #[error("INITIATE_ACCESS_PROTOCOL without a valid A5 proprietary-info attribute")]
    BadInitiate,
    #[error("{0} not allowed while {1}")]
    State(&'static str, &'static str),
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
}

impl BleError {
    /// Stable snake_case code for events and logs.
    pub fn code(&self) -> &'static str {
        match self {
            BleError::Frame(_) => "ble_framing",
            BleError::Aliro(e) => e.code(),
            BleError::Notification(_) | BleError::Keys(_) => "crypto_failure",
            BleError::Unexpected { .. } => "ble_unexpected_message",
            BleError::BadInitiate => "ble_bad_initiate",
            BleError::State(..) => "internal_error",
            BleError::TimedOut(_) => "timeout",
        }
    }
}

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionOutcome {
    /// The completion notification went out with this reader state.
    Completed { reader_state: u8 },
    /// The reader core ended the transaction with a failure (reported to the phone).
    Failed(Outcome),
}

/// What the adapter must do.
#[derive(Debug)]
pub enum Event {
    /// Write this frame to the L2CAP channel.
    Send(Vec<u8>),
    /// The phone proved its key; decide and call [`ReaderSession::decide`].
    Authenticated(AuthenticatedEndpoint),
    /// The session is over; close the channel.
    Done(SessionOutcome),
}

enum State {
    AwaitInitiate,
    AwaitResponse { auth0: bool },
    AwaitDecision,
    AwaitUrsk,
    Done,
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::AwaitInitiate => "awaiting INITIATE_ACCESS_PROTOCOL",
            State::AwaitResponse { .. } => "awaiting AP_RS",
            State::AwaitDecision => "awaiting the access decision",
            State::AwaitUrsk => "awaiting the EXCHANGE response",
            State::Done => "done",
        }
    }
}

/// One BLE connection, reader side.
pub struct ReaderSession {
    tx: ReaderTransaction,
    reader_key_x: [u8; 32],
    reader_identifier: [u8; 32],
    params: TransactionParams,
    ephemeral: SecretKey,
    transaction_id: [u8; 16],
    versions: BleVersions,
    deframer: Deframer,
    fci_a5: Vec<u8>,
    endpoint_ephemeral: Option<PublicKey>,
    notifications: Option<NotificationChannel>,
    state: State,
    deadline: Instant,
    timeout: Duration,
}

impl std::fmt::Debug for ReaderSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReaderSession")
            .field("transaction_id", &hex::encode(self.transaction_id))
            .field("state", &self.state.name())
            .finish_non_exhaustive()
    }
}

impl ReaderSession {
    /// A session for a connection accepted at `now`; `params.interface` should be C3.
    pub fn new(
        identity: &ReaderIdentity,
        params: TransactionParams,
        rnd: Randomness,
        versions: BleVersions,
        now: Instant,
        timeout: Duration,
    ) -> Self {
        let ephemeral = rnd.ephemeral.clone();
        let transaction_id = rnd.transaction_id;
        Self {
            tx: ReaderTransaction::new(identity, params, rnd),
            reader_key_x: crypto::public_key_x(&identity.private_key.public_key()),
            reader_identifier: identity.reader_identifier(),
            params,
            ephemeral,
            transaction_id,
            versions,
            deframer: Deframer::new(),
            fci_a5: Vec::new(),
            endpoint_ephemeral: None,
            notifications: None,
            state: State::AwaitInitiate,
            deadline: now + timeout,
            timeout,
        }
    }

    /// The transaction identifier (for events and logs).
    pub fn transaction_id(&self) -> [u8; 16] {
        self.transaction_id
    }

    /// When the connection must be dropped if it has not completed.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// Checks the deadline: past it, the session ends with [`BleError::TimedOut`].
    pub fn poll(&mut self, now: Instant) -> Result<(), BleError> {
        if !self.is_done() && now >= self.deadline {
            self.state = State::Done;
            return Err(BleError::TimedOut(self.timeout));
        }
        Ok(())
    }

    /// Feeds bytes read from the channel. An `Err` ends the session (drop the connection).
    pub fn on_bytes(&mut self, bytes: &[u8], now: Instant) -> Result<Vec<Event>, BleError> {
        self.poll(now)?;
        let result = self.handle_bytes(bytes);
        if result.is_err() {
            self.state = State::Done;
        }
        result
    }

    fn handle_bytes(&mut self, bytes: &[u8]) -> Result<Vec<Event>, BleError> {
        let mut events = Vec::new();
        for msg in self.deframer.push(bytes)? {
            if self.is_done() {
                break;
            }
            events.extend(self.on_message(msg)?);
        }
        Ok(events)
    }

    fn on_message(&mut self, msg: Message) -> Result<Vec<Event>, BleError> {
        let unexpected = |state: &State| BleError::Unexpected {
            protocol: msg.protocol,
            id: msg.id,
            state: state.name(),
        };
        match &self.state {
            State::AwaitInitiate => {
                if !msg.is(PROTOCOL_NOTIFICATION, NOTIFY_INITIATE_ACCESS_PROTOCOL) {
                    return Err(unexpected(&self.state));
                }
                self.fci_a5 = initiate_a5(&msg.payload)?;
                // The reader core starts with SELECT; BLE replaces SELECT by the notification,
                // so the core gets the FCI the phone's A5 TLV stands for.
                let _select = self.tx.start();
                let fci = fci_for(&self.fci_a5)?;
                let action = self.tx.on_response(&fci)?;
                self.on_action(action)
            }
            State::AwaitResponse { auth0 } => {
                if !msg.is(PROTOCOL_AP, message::AP_RS) {
                    return Err(unexpected(&self.state));
                }
                if *auth0 {
                    self.endpoint_ephemeral = auth0_endpoint_ephemeral(&msg.payload);
                }
                let action = self.tx.on_response(&msg.payload)?;
                self.on_action(action)
            }
            State::AwaitUrsk => {
                if !msg.is(PROTOCOL_AP, message::AP_RS) {
                    return Err(unexpected(&self.state));
                }
                match self.tx.on_response(&msg.payload)? {
                    // The URSK answer itself does not matter to a door without UWB.
                    Action::Exchanged(_) => self.complete(READER_STATE_UNSECURED),
                    other => self.on_action(other),
                }
            }
            State::AwaitDecision | State::Done => Err(unexpected(&self.state)),
        }
    }

    fn on_action(&mut self, action: Action) -> Result<Vec<Event>, BleError> {
        match action {
            Action::Transmit(c_apdu) => {
                let auth0 = c_apdu.get(1) == Some(&consts::INS_AUTH0);
                self.state = State::AwaitResponse { auth0 };
                Ok(vec![Event::Send(Message::ap_request(c_apdu).encode()?)])
            }
            Action::Authenticated(endpoint) => {
                self.notifications = Some(self.derive_notification_keys()?);
                self.state = State::AwaitDecision;
                Ok(vec![Event::Authenticated(endpoint)])
            }
            Action::Done(outcome) => {
                self.state = State::Done;
                Ok(vec![Event::Done(SessionOutcome::Failed(outcome))])
            }
            Action::Exchanged(_) => Err(BleError::State("EXCHANGE response", self.state.name())),
            // BLE doors run STANDARD only; step-up is never asked for here.
            Action::StepUpResponse(_) => {
                Err(BleError::State("step-up response", self.state.name()))
            }
        }
    }

    /// Tells the session the access decision. Granted: EXCHANGE {98 00} then the completion
    /// notification; denied: the completion notification only.
    pub fn decide(&mut self, granted: bool, now: Instant) -> Result<Vec<Event>, BleError> {
        self.poll(now)?;
        if !matches!(self.state, State::AwaitDecision) {
            return Err(BleError::State("decide", self.state.name()));
        }
        let result = if granted {
            self.tx
                .exchange(&URSK_REQUEST)
                .map_err(BleError::from)
                .and_then(|c_apdu| {
                    self.state = State::AwaitUrsk;
                    Ok(vec![Event::Send(Message::ap_request(c_apdu).encode()?)])
                })
        } else {
            self.complete(READER_STATE_SECURED)
        };
        if result.is_err() {
            self.state = State::Done;
        }
        result
    }

    fn complete(&mut self, reader_state: u8) -> Result<Vec<Event>, BleError> {
        let channel = self
            .notifications
            .as_mut()
            .ok_or(BleError::State("completion notification", "no BLE keys"))?;
        let frame = channel.seal(
            NOTIFY_ACCESS_PROTOCOL_COMPLETED,
            &completion_payload(reader_state)?,
        )?;
        self.state = State::Done;
        Ok(vec![
            Event::Send(frame),
            Event::Done(SessionOutcome::Completed { reader_state }),
        ])
    }

    fn derive_notification_keys(&self) -> Result<NotificationChannel, BleError> {
        // The reader core keeps its transcript private, so the BLE keys are derived here from
        // the same public values (one extra ECDH per connection).
        let peer = self
            .endpoint_ephemeral
            .as_ref()
            .ok_or(BleError::Keys(CryptoError::InvalidPublicKey))?;
        let ctx = TranscriptContext {
            reader_key_x: self.reader_key_x,
            reader_identifier: self.reader_identifier,
            interface: self.params.interface,
            protocol_version: self.params.protocol_version,
            reader_ephemeral_x: crypto::public_key_x(&self.ephemeral.public_key()),
            endpoint_ephemeral_x: crypto::public_key_x(peer),
            transaction_id: self.transaction_id,
            command_parameters: consts::AUTH0_STANDARD,
            auth_policy: self.params.auth_policy,
            fci_proprietary_tlv: self.fci_a5.clone(),
            vendor_extension: Vec::new(),
        };
        NotificationChannel::derive(Role::Reader, &self.ephemeral, peer, &ctx, &self.versions)
            .map_err(BleError::Keys)
    }
}

/// The payload of the completion notification: attribute "reader information" with
/// `unsolicited status reporting (bits 7..5) = 0` and the reader state.
pub fn completion_payload(reader_state: u8) -> Result<Vec<u8>, FrameError> {
    let mut p = Vec::with_capacity(4);
    message::push_attribute(&mut p, ATTR_READER_INFORMATION, &[0x00, reader_state])?;
    Ok(p)
}

/// The payload of INITIATE_ACCESS_PROTOCOL for an A5 TLV.
pub fn initiate_payload(a5_tlv: &[u8]) -> Result<Vec<u8>, FrameError> {
    let mut p = Vec::with_capacity(a5_tlv.len() + 2);
    message::push_attribute(&mut p, ATTR_PROPRIETARY_INFO, a5_tlv)?;
    Ok(p)
}

/// The A5 TLV from an INITIATE_ACCESS_PROTOCOL payload (exactly one well-formed A5 TLV).
fn initiate_a5(payload: &[u8]) -> Result<Vec<u8>, BleError> {
    let attrs = message::parse_attributes(payload)?;
    let value = attrs
        .iter()
        .find(|a| a.id == ATTR_PROPRIETARY_INFO)
        .map(|a| a.value)
        .ok_or(BleError::BadInitiate)?;
    match tlv::parse_all(value).as_deref() {
        Ok([one]) if one.tag == tag::FCI_PROPRIETARY && one.raw.len() == value.len() => {
            Ok(value.to_vec())
        }
        _ => Err(BleError::BadInitiate),
    }
}

/// `6F { 84 <expedited AID>, <A5 TLV> } 90 00`: the SELECT response the A5 TLV stands for.
fn fci_for(a5: &[u8]) -> Result<Vec<u8>, BleError> {
    let mut inner = Vec::with_capacity(a5.len() + 11);
    tlv::push_tlv(&mut inner, tag::DF_NAME, &consts::AID_EXPEDITED)
        .map_err(|_| BleError::BadInitiate)?;
    inner.extend_from_slice(a5);
    let mut fci = tlv::encode(tag::FCI, &inner).map_err(|_| BleError::BadInitiate)?;
    fci.extend_from_slice(&sw::OK.to_be_bytes());
    Ok(fci)
}

/// Tag 86 of a successful AUTH0 response, if present and a valid point (the reader core
/// rejects the response otherwise, so `None` never reaches key derivation).
fn auth0_endpoint_ephemeral(r_apdu: &[u8]) -> Option<PublicKey> {
    let resp = ResponseApdu::parse(r_apdu).ok()?;
    if resp.sw != sw::OK {
        return None;
    }
    let tlvs = tlv::parse_all(resp.data).ok()?;
    let t = tlv::find(&tlvs, tag::ENDPOINT_EPHEMERAL)?;
    crypto::public_key_from_sec1(t.value).ok()
}
