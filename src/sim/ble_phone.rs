//! Test peer: the phone side of Aliro over BLE.
//!
//! [`BlePhone`] is sans-IO: it wraps the NFC endpoint emulator ([`Endpoint`], interface byte
//! C3) in BLE messages. It opens with INITIATE_ACCESS_PROTOCOL carrying the A5 TLV its own
//! SELECT FCI would carry, answers every AP_RQ with an AP_RS, derives BleSKReader/BleSKDevice
//! once AUTH1 succeeded, and decrypts the reader's "access protocol completed" notification.
//! The endpoint's ephemeral key is observed through its injected randomness (the endpoint keeps
//! its transcript private), so the BLE keys are derived here from the same values.
//!
//! [`central`] runs it as a `bluer` central: scan for a keyway door of a reader group, read the
//! GATT reader characteristic, write the selected version, open the L2CAP channel, exchange.

use std::sync::{Arc, Mutex};

use p256::{PublicKey, SecretKey};
use thiserror::Error;

use crate::aliro::apdu::{CommandApdu, ResponseApdu};
use crate::aliro::consts::{self, sw, tag, INTERFACE_BLE};
use crate::aliro::crypto::{self, Role};
use crate::aliro::keys::TranscriptContext;
use crate::aliro::tlv;
use crate::ble::keys::{BleVersions, NotificationChannel};
use crate::ble::message::{
    self, Deframer, FrameError, Message, ATTR_READER_INFORMATION, NOTIFY_ACCESS_PROTOCOL_COMPLETED,
    NOTIFY_INITIATE_ACCESS_PROTOCOL, PROTOCOL_AP, PROTOCOL_NOTIFICATION,
};
use crate::ble::session::initiate_payload;

use super::phone::{Endpoint, EndpointConfig};
use super::random::EndpointRandom;

/// Why the phone side gave up.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PhoneBleError {
    #[error("framing: {0}")]
    Frame(#[from] FrameError),
    #[error("the endpoint's SELECT answer has no A5 template")]
    NoTemplate,
    #[error("unexpected message {0:02X}/{1:02X}")]
    Unexpected(u8, u8),
    #[error("completion notification before the BLE keys exist")]
    NoKeys,
    #[error("completion notification does not decrypt or parse")]
    BadNotification,
}

/// What the phone must do or learned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PhoneEvent {
    /// Write this frame to the channel.
    Send(Vec<u8>),
    /// The reader finished; `reader_state` 01 = unsecured (door opens), 00 = secured.
    Completed { reader_state: u8 },
}

/// Hands the endpoint its randomness and keeps a copy of the last ephemeral key.
struct Observed {
    inner: Box<dyn EndpointRandom + Send>,
    last: Arc<Mutex<Option<SecretKey>>>,
}

impl EndpointRandom for Observed {
    fn ephemeral_key(&mut self) -> Option<SecretKey> {
        let k = self.inner.ephemeral_key()?;
        if let Ok(mut last) = self.last.lock() {
            *last = Some(k.clone());
        }
        Some(k)
    }

    fn fill_bytes(&mut self, out: &mut [u8]) -> Option<()> {
        self.inner.fill_bytes(out)
    }
}

/// AUTH0 fields that enter the BLE key schedule.
struct Auth0Seen {
    command_parameters: u8,
    auth_policy: u8,
    protocol_version: [u8; 2],
    reader_ephemeral: PublicKey,
    transaction_id: [u8; 16],
    reader_identifier: [u8; 32],
}

/// The phone side of one BLE connection.
pub struct BlePhone {
    endpoint: Endpoint,
    ephemeral: Arc<Mutex<Option<SecretKey>>>,
    versions: BleVersions,
    a5: Vec<u8>,
    deframer: Deframer,
    auth0: Option<Auth0Seen>,
    notifications: Option<NotificationChannel>,
}

impl std::fmt::Debug for BlePhone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlePhone")
            .field("authenticated", &self.endpoint.is_authenticated())
            .finish_non_exhaustive()
    }
}

impl BlePhone {
    /// A phone with `config` (its interface byte is forced to C3) and injected randomness.
    pub fn new(
        mut config: EndpointConfig,
        random: Box<dyn EndpointRandom + Send>,
        versions: BleVersions,
    ) -> Self {
        config.interface_byte = INTERFACE_BLE;
        let ephemeral = Arc::new(Mutex::new(None));
        let observed = Observed {
            inner: random,
            last: ephemeral.clone(),
        };
        Self {
            endpoint: Endpoint::new(config, Box::new(observed)),
            ephemeral,
            versions,
            a5: Vec::new(),
            deframer: Deframer::new(),
            auth0: None,
            notifications: None,
        }
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Starts a transaction: the INITIATE_ACCESS_PROTOCOL frame to send first.
    pub fn initiate(&mut self) -> Result<Vec<u8>, PhoneBleError> {
        // The endpoint emulator opens its session on SELECT; BLE has none on the wire, so the
        // phone selects itself and sends the A5 template it would have answered with.
        let select = CommandApdu::new(
            consts::CLA_ISO,
            consts::INS_SELECT,
            consts::SELECT_P1_BY_NAME,
            consts::SELECT_P2_FIRST,
        )
        .with_data(consts::AID_EXPEDITED.to_vec())
        .with_le(crate::aliro::apdu::NE_SHORT_MAX)
        .encode()
        .map_err(|_| PhoneBleError::NoTemplate)?;
        let r = self.endpoint.handle(&select);
        self.a5 = a5_of(&r).ok_or(PhoneBleError::NoTemplate)?;
        self.auth0 = None;
        self.notifications = None;
        Ok(Message::new(
            PROTOCOL_NOTIFICATION,
            NOTIFY_INITIATE_ACCESS_PROTOCOL,
            initiate_payload(&self.a5)?,
        )
        .encode()?)
    }

    /// Feeds bytes read from the channel.
    pub fn on_bytes(&mut self, bytes: &[u8]) -> Result<Vec<PhoneEvent>, PhoneBleError> {
        let mut out = Vec::new();
        for msg in self.deframer.push(bytes)? {
            out.push(self.on_message(&msg)?);
        }
        Ok(out)
    }

    fn on_message(&mut self, msg: &Message) -> Result<PhoneEvent, PhoneBleError> {
        if msg.is(PROTOCOL_AP, message::AP_RQ) {
            let cmd = CommandApdu::parse(&msg.payload).ok();
            if let Some(c) = cmd.as_ref().filter(|c| c.ins == consts::INS_AUTH0) {
                self.auth0 = auth0_seen(&c.data);
            }
            let r = self.endpoint.handle(&msg.payload);
            let ok = ResponseApdu::parse(&r).is_ok_and(|resp| resp.sw == sw::OK);
            if ok && cmd.is_some_and(|c| c.ins == consts::INS_AUTH1) {
                self.notifications = self.derive();
            }
            return Ok(PhoneEvent::Send(Message::ap_response(r).encode()?));
        }
        if msg.is(PROTOCOL_NOTIFICATION, NOTIFY_ACCESS_PROTOCOL_COMPLETED) {
            let channel = self.notifications.as_mut().ok_or(PhoneBleError::NoKeys)?;
            let plain = channel
                .open(msg)
                .map_err(|_| PhoneBleError::BadNotification)?;
            let attrs =
                message::parse_attributes(&plain).map_err(|_| PhoneBleError::BadNotification)?;
            let info = attrs
                .iter()
                .find(|a| a.id == ATTR_READER_INFORMATION)
                .ok_or(PhoneBleError::BadNotification)?;
            let reader_state = *info.value.get(1).ok_or(PhoneBleError::BadNotification)?;
            return Ok(PhoneEvent::Completed { reader_state });
        }
        Err(PhoneBleError::Unexpected(msg.protocol, msg.id))
    }

    fn derive(&self) -> Option<NotificationChannel> {
        let a = self.auth0.as_ref()?;
        let own = self.ephemeral.lock().ok()?.clone()?;
        let group: [u8; 16] = a.reader_identifier.get(..16)?.try_into().ok()?;
        let reader_key = self
            .endpoint
            .config()
            .credentials
            .iter()
            .find(|c| c.group_id == group)?
            .reader_group_key;
        let ctx = TranscriptContext {
            reader_key_x: crypto::public_key_x(&reader_key),
            reader_identifier: a.reader_identifier,
            interface: INTERFACE_BLE,
            protocol_version: a.protocol_version,
            reader_ephemeral_x: crypto::public_key_x(&a.reader_ephemeral),
            endpoint_ephemeral_x: crypto::public_key_x(&own.public_key()),
            transaction_id: a.transaction_id,
            command_parameters: a.command_parameters,
            auth_policy: a.auth_policy,
            fci_proprietary_tlv: self.a5.clone(),
            vendor_extension: Vec::new(),
        };
        NotificationChannel::derive(
            Role::Endpoint,
            &own,
            &a.reader_ephemeral,
            &ctx,
            &self.versions,
        )
        .ok()
    }
}

fn a5_of(r_apdu: &[u8]) -> Option<Vec<u8>> {
    let resp = ResponseApdu::parse(r_apdu).ok()?;
    if resp.sw != sw::OK {
        return None;
    }
    let fci = tlv::parse_all(resp.data).ok()?;
    let children = tlv::find(&fci, tag::FCI)?.children().ok()?;
    Some(tlv::find(&children, tag::FCI_PROPRIETARY)?.raw.to_vec())
}

fn auth0_seen(data: &[u8]) -> Option<Auth0Seen> {
    let tlvs = tlv::parse_all(data).ok()?;
    let get = |t: u32| tlv::find(&tlvs, t).map(|x| x.value);
    Some(Auth0Seen {
        command_parameters: *get(tag::COMMAND_PARAMETERS)?.first()?,
        auth_policy: *get(tag::AUTH_POLICY)?.first()?,
        protocol_version: get(tag::PROTOCOL_VERSIONS)?.try_into().ok()?,
        reader_ephemeral: crypto::public_key_from_sec1(get(tag::READER_EPHEMERAL)?).ok()?,
        transaction_id: get(tag::TRANSACTION_ID)?.try_into().ok()?,
        reader_identifier: get(tag::READER_ID)?.try_into().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aliro::reader::{Randomness, ReaderIdentity, TransactionParams};
    use crate::ble::session::{Event, ReaderSession, SessionOutcome};
    use crate::sim::{OsRandom, ReaderGroupCredential};
    use rand_core::OsRng;
    use std::time::{Duration, Instant};

    /// Reader session and BLE phone against each other in memory.
    fn exchange(granted: bool, phone_group_key: Option<PublicKey>) -> (Option<u8>, bool) {
        let id = ReaderIdentity::new([3; 16], [4; 16], SecretKey::random(&mut OsRng));
        let cred = ReaderGroupCredential {
            group_id: id.group_id,
            reader_group_key: phone_group_key.unwrap_or(id.private_key.public_key()),
        };
        let mut phone = BlePhone::new(
            EndpointConfig::new(SecretKey::random(&mut OsRng), vec![cred]),
            Box::new(OsRandom),
            BleVersions::default(),
        );
        let now = Instant::now();
        let mut reader = ReaderSession::new(
            &id,
            TransactionParams {
                interface: INTERFACE_BLE,
                ..TransactionParams::default()
            },
            Randomness::generate(&mut OsRng),
            BleVersions::default(),
            now,
            Duration::from_secs(5),
        );
        let mut to_reader = phone.initiate().unwrap();
        let mut authenticated = false;
        for _ in 0..10 {
            let events = match reader.on_bytes(&to_reader, now) {
                Ok(e) => e,
                Err(_) => return (None, authenticated),
            };
            to_reader.clear();
            let mut queue: std::collections::VecDeque<Event> = events.into();
            while let Some(ev) = queue.pop_front() {
                match ev {
                    Event::Send(f) => {
                        for pe in phone.on_bytes(&f).unwrap() {
                            match pe {
                                PhoneEvent::Send(b) => to_reader.extend(b),
                                PhoneEvent::Completed { reader_state } => {
                                    return (Some(reader_state), authenticated)
                                }
                            }
                        }
                    }
                    Event::Authenticated(_) => {
                        authenticated = true;
                        queue.extend(reader.decide(granted, now).unwrap());
                    }
                    Event::Done(SessionOutcome::Failed(_)) => return (None, authenticated),
                    Event::Done(_) => {}
                }
            }
        }
        panic!("no completion");
    }

    #[test]
    fn phone_decrypts_the_reader_verdict() {
        assert_eq!(exchange(true, None), (Some(1), true));
        assert_eq!(exchange(false, None), (Some(0), true));
    }

    #[test]
    fn phone_with_a_foreign_group_key_never_authenticates() {
        let other = SecretKey::random(&mut OsRng).public_key();
        let (state, authenticated) = exchange(true, Some(other));
        assert_eq!(state, None);
        assert!(!authenticated);
    }

    #[test]
    fn stray_messages_are_refused() {
        let mut phone = BlePhone::new(
            EndpointConfig::new(SecretKey::random(&mut OsRng), vec![]),
            Box::new(OsRandom),
            BleVersions::default(),
        );
        let n = Message::new(
            PROTOCOL_NOTIFICATION,
            NOTIFY_ACCESS_PROTOCOL_COMPLETED,
            vec![0; 20],
        )
        .encode()
        .unwrap();
        assert_eq!(phone.on_bytes(&n), Err(PhoneBleError::NoKeys));
        let x = Message::new(PROTOCOL_NOTIFICATION, 0x01, vec![])
            .encode()
            .unwrap();
        assert_eq!(phone.on_bytes(&x), Err(PhoneBleError::Unexpected(2, 1)));
    }
}
