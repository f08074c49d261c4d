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

use keyway::aliro::apdu::{CommandApdu, ResponseApdu};
use keyway::aliro::consts::{self, sw, tag, INTERFACE_BLE};
use keyway::aliro::crypto::{self, Role};
use keyway::aliro::keys::TranscriptContext;
use keyway::aliro::tlv;
use keyway::ble::keys::{BleVersions, NotificationChannel};
use keyway::ble::message::{
    self, Deframer, FrameError, Message, ATTR_READER_INFORMATION, NOTIFY_ACCESS_PROTOCOL_COMPLETED,
    NOTIFY_INITIATE_ACCESS_PROTOCOL, PROTOCOL_AP, PROTOCOL_NOTIFICATION,
};
use keyway::ble::session::initiate_payload;

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
        .with_le(keyway::aliro::apdu::NE_SHORT_MAX)
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

/// The phone as a `bluer` central on a BlueZ adapter.
pub mod central {
    use std::time::{Duration, Instant};

    use bluer::l2cap::{SocketAddr, Stream};
    use bluer::{Adapter, AdapterEvent, Address, DiscoveryFilter, DiscoveryTransport};
    use futures_util::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::{BlePhone, PhoneBleError, PhoneEvent};
    use keyway::ble::discovery::{
        Advertisement, ReaderInfo, DEVICE_CHARACTERISTIC_UUID, READER_CHARACTERISTIC_UUID,
        SERVICE_UUID,
    };

    /// Why the phone could not complete.
    #[derive(Debug, thiserror::Error)]
    pub enum CentralError {
        #[error("bluez: {0}")]
        Bluez(#[from] bluer::Error),
        #[error("l2cap: {0}")]
        Io(#[from] std::io::Error),
        #[error("no reader of the group advertised within {0:?}")]
        NotFound(Duration),
        #[error("GATT: {0}")]
        Gatt(&'static str),
        #[error("phone: {0}")]
        Phone(#[from] PhoneBleError),
        #[error("timed out: {0}")]
        Timeout(&'static str),
    }

    /// How the phone behaves.
    #[derive(Debug, Clone)]
    pub struct CentralOptions {
        /// Open the channel and then say nothing (the reader must drop it).
        pub silent: bool,
        /// Bound on every step (connect, GATT, the exchange).
        pub step_timeout: Duration,
        /// Drop the LE link at the end (off: leave it to another transaction on it).
        pub disconnect: bool,
    }

    impl Default for CentralOptions {
        fn default() -> Self {
            Self {
                silent: false,
                step_timeout: Duration::from_secs(20),
                disconnect: true,
            }
        }
    }

    /// What happened on the phone's side.
    #[derive(Debug, Clone)]
    pub struct CentralReport {
        /// The reader's verdict: 01 unsecured (open), 00 secured; `None` if none came.
        pub reader_state: Option<u8>,
        /// From the L2CAP channel being open to the verdict.
        pub channel_to_verdict: Option<Duration>,
        /// The reader closed the channel (silent phone).
        pub closed_by_reader: bool,
        /// From the channel open to the reader closing it.
        pub channel_to_close: Option<Duration>,
        /// When the L2CAP channel opened (to time what a peer saw against it).
        pub channel_opened: Option<Instant>,
    }

    /// Scans in short rounds (btvirt reports an advertiser once per scan start) until a reader
    /// of `group_id` advertises; returns its address and the RSSI seen.
    pub async fn find_reader(
        adapter: &Adapter,
        group_id: &[u8; 16],
        within: Duration,
    ) -> Result<(Address, Option<i16>), CentralError> {
        let deadline = Instant::now() + within;
        // No UUID filter: the reader's advertisement carries FFF2 as service data only.
        let filter = DiscoveryFilter {
            transport: DiscoveryTransport::Le,
            duplicate_data: true,
            ..Default::default()
        };
        let _ = adapter.set_discovery_filter(filter).await;
        while Instant::now() < deadline {
            // Boxed so that dropping it really ends the discovery session (a central still
            // discovering connects up to 10 s late).
            let mut events = Box::pin(adapter.discover_devices().await?);
            let round_end = tokio::time::Instant::now() + Duration::from_secs(2);
            loop {
                let ev = match tokio::time::timeout_at(round_end, events.next()).await {
                    Ok(Some(ev)) => ev,
                    Ok(None) | Err(_) => break,
                };
                if let AdapterEvent::DeviceAdded(addr) = ev {
                    let dev = adapter.device(addr)?;
                    let data = dev.service_data().await?.unwrap_or_default();
                    let ours = data
                        .get(&SERVICE_UUID)
                        .and_then(|d| Advertisement::parse(d).ok())
                        .is_some_and(|a| a.matches_group(group_id));
                    if ours {
                        let rssi = dev.rssi().await.ok().flatten();
                        drop(events);
                        return Ok((addr, rssi));
                    }
                }
            }
            drop(events);
        }
        Err(CentralError::NotFound(within))
    }

    async fn bounded<T, E>(
        what: &'static str,
        limit: Duration,
        f: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, CentralError>
    where
        CentralError: From<E>,
    {
        match tokio::time::timeout(limit, f).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(CentralError::Timeout(what)),
        }
    }

    /// Connects to the reader at `addr`, reads the SPSM, selects the version, opens the
    /// channel and runs one transaction with `phone`.
    pub async fn transact(
        adapter: &Adapter,
        addr: Address,
        phone: &mut BlePhone,
        opts: &CentralOptions,
    ) -> Result<CentralReport, CentralError> {
        let t = opts.step_timeout;
        let dev = adapter.device(addr)?;
        let mut tries = 0;
        while !dev.is_connected().await? {
            match bounded("LE connect", t, dev.connect()).await {
                Ok(()) => {}
                Err(e) if tries < 3 => {
                    tries += 1;
                    log::debug!("phone: connect attempt {tries} failed: {e}");
                }
                Err(e) => return Err(e),
            }
        }
        let resolved = async {
            while !dev.is_services_resolved().await? {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok::<_, bluer::Error>(())
        };
        bounded("GATT discovery", t, resolved).await?;
        let (mut reader_char, mut device_char) = (None, None);
        for service in dev.services().await? {
            if service.uuid().await? != SERVICE_UUID {
                continue;
            }
            for c in service.characteristics().await? {
                match c.uuid().await? {
                    u if u == READER_CHARACTERISTIC_UUID => reader_char = Some(c),
                    u if u == DEVICE_CHARACTERISTIC_UUID => device_char = Some(c),
                    _ => {}
                }
            }
        }
        let reader_char = reader_char.ok_or(CentralError::Gatt("no reader characteristic"))?;
        let device_char = device_char.ok_or(CentralError::Gatt("no device characteristic"))?;
        let value = bounded("GATT read", t, reader_char.read()).await?;
        let info = ReaderInfo::parse(&value).map_err(|_| CentralError::Gatt("bad reader value"))?;
        let version = *info
            .versions
            .first()
            .ok_or(CentralError::Gatt("no version offered"))?;
        bounded("GATT write", t, device_char.write(&version)).await?;
        let sa = SocketAddr::new(addr, dev.address_type().await?, info.spsm);
        let mut stream = bounded("L2CAP connect", t, Stream::connect(sa)).await?;
        let opened = Instant::now();
        let mut report = CentralReport {
            reader_state: None,
            channel_to_verdict: None,
            closed_by_reader: false,
            channel_to_close: None,
            channel_opened: Some(opened),
        };
        let mut buf = vec![0u8; 1024];
        if opts.silent {
            let read = tokio::time::timeout(t, stream.read(&mut buf)).await;
            if matches!(read, Ok(Ok(0)) | Ok(Err(_))) {
                report.closed_by_reader = true;
                report.channel_to_close = Some(opened.elapsed());
            }
        } else {
            let first = phone.initiate()?;
            // A reader over its connection limit accepts and closes at once.
            if let Err(e) = bounded("L2CAP write", t, stream.write_all(&first)).await {
                log::info!("phone: first write failed: {e}");
                report.closed_by_reader = true;
                report.channel_to_close = Some(opened.elapsed());
            }
            'exchange: while !report.closed_by_reader {
                let n = match bounded("reader answer", t, stream.read(&mut buf)).await {
                    Err(CentralError::Io(e)) => {
                        log::info!("phone: read failed: {e}");
                        0
                    }
                    other => other?,
                };
                if n == 0 {
                    report.closed_by_reader = true;
                    report.channel_to_close = Some(opened.elapsed());
                    break;
                }
                for ev in phone.on_bytes(buf.get(..n).unwrap_or_default())? {
                    match ev {
                        PhoneEvent::Send(frame) => {
                            bounded("L2CAP write", t, stream.write_all(&frame)).await?
                        }
                        PhoneEvent::Completed { reader_state } => {
                            report.reader_state = Some(reader_state);
                            report.channel_to_verdict = Some(opened.elapsed());
                            break 'exchange;
                        }
                    }
                }
            }
        }
        drop(stream);
        if opts.disconnect {
            // Wait until the link is really down, so the next transaction does not start on a
            // link that is about to go away.
            let down = async {
                let _ = dev.disconnect().await;
                while dev.is_connected().await.unwrap_or(false) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            };
            let _ = tokio::time::timeout(t, down).await;
        }
        Ok(report)
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
    use crate::{OsRandom, ReaderGroupCredential};
    use keyway::aliro::reader::{Randomness, ReaderIdentity, TransactionParams};
    use keyway::ble::session::{Event, ReaderSession, SessionOutcome};
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
