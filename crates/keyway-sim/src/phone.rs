//! Sans-IO Aliro 1.0 endpoint ("User Device", the phone) for benches and HIL tests.
//!
//! Behaviour follows aliro-actuator's `UserDevice` as captured by the interoperability vectors
//! (`tests/vectors/aliro/README.md`): expedited SELECT, AUTH0 (standard, and FAST with a stored
//! Kpersistent or a random decoy cryptogram), AUTH1 (reader signature check, key derivation,
//! encrypted response), EXCHANGE on the expedited secure channel, CONTROL FLOW, strict Le
//! checks. Not emulated: LOAD CERT, step-up (SELECT 5502 / ENVELOPE / GET RESPONSE), BLE.
//!
//! The endpoint takes C-APDU bytes and returns R-APDU bytes (data || SW1 SW2); it never panics
//! on malformed input and owns no socket, clock or RNG (randomness is injected).

use std::collections::VecDeque;

use p256::{PublicKey, SecretKey};
use zeroize::Zeroizing;

use keyway::aliro::apdu::{encode_response, CommandApdu, NE_EXTENDED_MAX, NE_SHORT_MAX};
use keyway::aliro::consts::{
    tag, AID_EXPEDITED, AUTH0_FAST, AUTH1_REQUEST_PUBLIC_KEY, CLA_ISO, CLA_PROPRIETARY, INS_AUTH0,
    INS_AUTH1, INS_CONTROL_FLOW, INS_ENVELOPE, INS_EXCHANGE, INS_GET_RESPONSE, INS_LOAD_CERT,
    INS_SELECT, INTERFACE_NFC, PROTOCOL_VERSION_1_0, SELECT_P1_BY_NAME, SELECT_P2_FIRST,
};
use keyway::aliro::crypto::{
    self, public_key_from_sec1, public_key_sec1, public_key_x, Role, SecureChannel, SymmetricKey,
};
use keyway::aliro::keys::{self, Signer, TranscriptContext};
use keyway::aliro::tlv::{self, Tlv};

use super::random::EndpointRandom;
use super::vpcd::VirtualCard;

/// Status words the endpoint returns (aliases of `aliro::consts::sw`, plus two ISO words).
pub mod sw {
    use keyway::aliro::consts::sw as c;
    /// Success.
    pub const OK: u16 = c::OK;
    /// Wrong length (malformed APDU length fields).
    pub const WRONG_LENGTH: u16 = 0x6700;
    /// Command not compliant (bad TLVs, wrong Le, unknown reader group).
    pub const NOT_COMPLIANT: u16 = c::COMMAND_NOT_COMPLIANT;
    /// Security status not satisfied (reader signature, GCM failure).
    pub const SECURITY: u16 = c::SECURITY_STATUS_NOT_SATISFIED;
    /// Conditions of use not satisfied (unsupported protocol version).
    pub const CONDITIONS: u16 = c::CONDITIONS_NOT_SATISFIED;
    /// Application not found.
    pub const NOT_FOUND: u16 = c::APPLICATION_NOT_FOUND;
    /// Incorrect P1/P2.
    pub const WRONG_P1P2: u16 = c::INCORRECT_P1P2;
    /// Instruction not valid (unknown, unsupported or out of sequence).
    pub const INS_INVALID: u16 = c::INS_NOT_SUPPORTED;
    /// Class not supported.
    pub const CLA_INVALID: u16 = c::CLA_NOT_SUPPORTED;
    /// No precise diagnosis (internal failure, e.g. randomness exhausted).
    pub const UNKNOWN: u16 = 0x6F00;
}

/// Most Kpersistent entries remembered (one per reader); oldest evicted first.
const MAX_PERSISTENT_KEYS: usize = 64;
/// Most outcomes remembered.
const MAX_OUTCOMES: usize = 64;

/// A reader group this endpoint holds an access credential for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReaderGroupCredential {
    /// Reader group identifier (first 16 bytes of the reader identifier, AUTH0 tag 4D).
    pub group_id: [u8; 16],
    /// Reader group public key: verifies the AUTH1 reader signature and enters every salt.
    pub reader_group_key: PublicKey,
}

/// Deliberate misbehaviour, so benches can exercise the reader's error paths.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Faults {
    /// Sign the AUTH1 device authentication data over this transaction identifier instead of
    /// the real one (the reader must reject the device signature).
    pub device_signature_transaction_id: Option<[u8; 16]>,
}

/// Static configuration of the emulated phone.
#[derive(Clone)]
pub struct EndpointConfig {
    /// Endpoint long-term private key (its public key is what the reader's ACL knows).
    pub long_term_key: SecretKey,
    /// Reader groups the phone holds credentials for.
    pub credentials: Vec<ReaderGroupCredential>,
    /// Supported protocol versions, offered in the SELECT FCI (tag 5C).
    pub protocol_versions: Vec<[u8; 2]>,
    /// Signaling bitmap (tag 5E) in the AUTH1 response and the FAST cryptogram.
    pub signaling_bitmap: u16,
    /// Credential signed timestamp (tag 91, 20-byte tdate) added to the AUTH1 response.
    pub credential_timestamp: Option<[u8; 20]>,
    /// Revocation signed timestamp (tag 92) inside the FAST cryptogram (zeros when absent).
    pub revocation_timestamp: Option<[u8; 20]>,
    /// Key slot (tag 4E) returned when AUTH1 asks for the slot instead of the public key.
    pub key_slot: [u8; 8],
    /// Interface byte in the salts: 5E for NFC.
    pub interface_byte: u8,
    /// Enforce aliro-actuator's Le rules (Le=00 on SELECT/AUTH0/AUTH1/EXCHANGE, none on
    /// CONTROL FLOW; violations answered 6701). Off: any Le accepted.
    pub strict_le: bool,
    /// Answer FAST with a real cryptogram when a Kpersistent is stored for the reader. Off:
    /// always the random decoy (as on first contact), forcing the reader to fall back.
    pub fast_enabled: bool,
    /// Deliberate faults.
    pub faults: Faults,
    /// The DeviceResponse (an Access Document, see [`crate::issuer`]) returned in
    /// step-up. `None`: step-up (SELECT 5502) is refused with 6A82.
    pub access_document: Option<Vec<u8>>,
}

impl EndpointConfig {
    /// Defaults: protocol 0100, bitmap 0000, no timestamps, NFC, strict Le, FAST enabled.
    /// The key slot defaults to the first 8 bytes of SHA-256 over the public key (an emulator
    /// choice; the reader only has to find it again).
    pub fn new(long_term_key: SecretKey, credentials: Vec<ReaderGroupCredential>) -> Self {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(public_key_sec1(&long_term_key.public_key()));
        let mut key_slot = [0u8; 8];
        key_slot
            .iter_mut()
            .zip(digest.iter())
            .for_each(|(o, i)| *o = *i);
        Self {
            long_term_key,
            credentials,
            protocol_versions: vec![PROTOCOL_VERSION_1_0],
            signaling_bitmap: 0,
            credential_timestamp: None,
            revocation_timestamp: None,
            key_slot,
            interface_byte: INTERFACE_NFC,
            strict_le: true,
            fast_enabled: true,
            faults: Faults::default(),
            access_document: None,
        }
    }

    /// Uncompressed SEC1 public key of the endpoint (what the bench enrolls in the ACL).
    pub fn public_key_sec1(&self) -> [u8; 65] {
        public_key_sec1(&self.long_term_key.public_key())
    }
}

impl std::fmt::Debug for EndpointConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointConfig")
            .field("long_term_key", &"<redacted>")
            .field("public_key", &hex::encode(self.public_key_sec1()))
            .field("credentials", &self.credentials.len())
            .field("protocol_versions", &self.protocol_versions)
            .field("signaling_bitmap", &self.signaling_bitmap)
            .field("strict_le", &self.strict_le)
            .field("fast_enabled", &self.fast_enabled)
            .field("faults", &self.faults)
            .finish()
    }
}

/// How a transaction with a reader ended, as seen by the phone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The reader sent its status (EXCHANGE tag 97), e.g. `0101` "unsecured" = granted.
    Completed {
        /// Reader status, big-endian.
        reader_status: u16,
        /// The secure channel came from FAST (no AUTH1).
        fast: bool,
    },
    /// The reader ended the transaction with CONTROL FLOW.
    ControlFlow {
        /// S1 (00 = finished with failure).
        s1: u8,
        /// S2 (reason, e.g. 27 = protocol version not supported).
        s2: u8,
    },
    /// The endpoint refused a command and terminated the session.
    Rejected {
        /// Status word returned.
        sw: u16,
        /// Why.
        reason: &'static str,
    },
}

impl Outcome {
    /// Short machine-readable name.
    pub fn kind(&self) -> &'static str {
        match self {
            Outcome::Completed { .. } => "completed",
            Outcome::ControlFlow { .. } => "control_flow",
            Outcome::Rejected { .. } => "rejected",
        }
    }
}

/// Per-transaction values kept between AUTH0 and AUTH1.
struct Auth0Context {
    /// Everything the salts, the HKDF info and the signature preimages are built from.
    transcript: TranscriptContext,
    reader_group_key: PublicKey,
    reader_eph: PublicKey,
    eph_key: SecretKey,
    /// Channel keyed from Kpersistent when FAST matched: EXCHANGE may follow directly.
    fast_channel: Option<SecureChannel>,
}

enum State {
    /// Not selected (power-up, after a terminated session).
    Idle,
    /// Expedited AID selected.
    Selected,
    /// AUTH0 answered.
    Auth0(Box<Auth0Context>),
    /// Secure channel established (AUTH1, or FAST + first EXCHANGE). `step_up_ikm` is
    /// present after AUTH1 until a step-up or an EXCHANGE.
    Secure {
        channel: SecureChannel,
        fast: bool,
        step_up_ikm: Option<SymmetricKey>,
    },
    /// Step-up AID selected after AUTH1: ENVELOPE expected.
    StepUp { channel: SecureChannel },
    /// ENVELOPE answered in part: the rest goes out with GET RESPONSE.
    StepUpSending {
        channel: SecureChannel,
        rest: Vec<u8>,
    },
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::Idle => "idle",
            State::Selected => "selected",
            State::Auth0(_) => "auth0",
            State::Secure { .. } => "secure",
            State::StepUp { .. } => "step-up",
            State::StepUpSending { .. } => "step-up (chaining)",
        }
    }
}

/// A refused command: status word, why, and whether the session is over.
struct Reject {
    sw: u16,
    reason: &'static str,
    terminate: bool,
}

impl Reject {
    fn fatal(sw: u16, reason: &'static str) -> Self {
        Self {
            sw,
            reason,
            terminate: true,
        }
    }

    fn soft(sw: u16, reason: &'static str) -> Self {
        Self {
            sw,
            reason,
            terminate: false,
        }
    }
}

type Handled = Result<Vec<u8>, Reject>;

/// The emulated phone.
pub struct Endpoint {
    config: EndpointConfig,
    random: Box<dyn EndpointRandom + Send>,
    state: State,
    /// Kpersistent per reader identifier; survives power cycles like a phone's keychain.
    persistent: VecDeque<([u8; 32], SymmetricKey)>,
    outcomes: VecDeque<Outcome>,
    /// Status word of the next successful answer when not 9000 (61xx while chaining).
    next_sw: Option<u16>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("config", &self.config)
            .field("state", &self.state.name())
            .field("persistent_keys", &self.persistent.len())
            .field("outcomes", &self.outcomes)
            .finish()
    }
}

impl Endpoint {
    /// A powered-off phone with the given configuration and randomness source.
    pub fn new(config: EndpointConfig, random: Box<dyn EndpointRandom + Send>) -> Self {
        Self {
            config,
            random,
            state: State::Idle,
            persistent: VecDeque::new(),
            outcomes: VecDeque::new(),
            next_sw: None,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &EndpointConfig {
        &self.config
    }

    /// Card powered on, off or reset: any session is lost (stored keys and outcomes are kept).
    pub fn on_power(&mut self) {
        self.state = State::Idle;
    }

    /// Pre-provision a Kpersistent for a reader (normally learned in a STANDARD transaction).
    pub fn store_k_persistent(&mut self, reader_id: [u8; 32], key: [u8; 32]) {
        self.remember_k_persistent(reader_id, SymmetricKey::from_bytes(key));
    }

    /// The Kpersistent stored for a reader, if any (tests compare it with the reader's).
    pub fn k_persistent(&self, reader_id: &[u8; 32]) -> Option<&SymmetricKey> {
        self.persistent
            .iter()
            .find(|(id, _)| id == reader_id)
            .map(|(_, k)| k)
    }

    /// Every outcome since creation or the last [`Endpoint::take_outcomes`], oldest first.
    pub fn outcomes(&self) -> impl Iterator<Item = &Outcome> {
        self.outcomes.iter()
    }

    /// The most recent outcome.
    pub fn last_outcome(&self) -> Option<&Outcome> {
        self.outcomes.back()
    }

    /// Remove and return the recorded outcomes (between taps).
    pub fn take_outcomes(&mut self) -> Vec<Outcome> {
        self.outcomes.drain(..).collect()
    }

    /// Whether the session is in the secure (post-authentication) state.
    pub fn is_authenticated(&self) -> bool {
        matches!(self.state, State::Secure { .. })
    }

    /// Process one C-APDU and return the R-APDU (response data || SW1 SW2).
    pub fn handle(&mut self, c_apdu: &[u8]) -> Vec<u8> {
        let result = match CommandApdu::parse(c_apdu) {
            Ok(cmd) => self.dispatch(&cmd),
            Err(_) => Err(Reject::fatal(sw::WRONG_LENGTH, "malformed APDU")),
        };
        match result {
            Ok(data) => encode_response(&data, self.next_sw.take().unwrap_or(sw::OK)),
            Err(rej) => {
                log::debug!(sw = rej.sw, state = self.state.name(); "endpoint refused: {}", rej.reason);
                // A refusal before any session exists (wrong AID, stray command) is no
                // transaction outcome; inside a session it is, and fatal ones end the session.
                let in_session = !matches!(self.state, State::Idle);
                if rej.terminate && in_session {
                    self.record(Outcome::Rejected {
                        sw: rej.sw,
                        reason: rej.reason,
                    });
                    self.state = State::Idle;
                }
                encode_response(&[], rej.sw)
            }
        }
    }

    fn record(&mut self, outcome: Outcome) {
        if self.outcomes.len() >= MAX_OUTCOMES {
            self.outcomes.pop_front();
        }
        self.outcomes.push_back(outcome);
    }

    fn remember_k_persistent(&mut self, reader_id: [u8; 32], key: SymmetricKey) {
        self.persistent.retain(|(id, _)| *id != reader_id);
        if self.persistent.len() >= MAX_PERSISTENT_KEYS {
            self.persistent.pop_front();
        }
        self.persistent.push_back((reader_id, key));
    }

    fn dispatch(&mut self, cmd: &CommandApdu) -> Handled {
        match (cmd.cla, cmd.ins) {
            (CLA_ISO, INS_SELECT) => self.select(cmd),
            (CLA_PROPRIETARY, INS_AUTH0) => self.auth0(cmd),
            (CLA_PROPRIETARY, INS_AUTH1) => self.auth1(cmd),
            (CLA_PROPRIETARY, INS_EXCHANGE) => self.exchange(cmd),
            (CLA_PROPRIETARY, INS_CONTROL_FLOW) => self.control_flow(cmd),
            (CLA_ISO, INS_ENVELOPE) => self.envelope(cmd),
            (CLA_ISO, INS_GET_RESPONSE) => self.get_response(cmd),
            (CLA_PROPRIETARY, INS_LOAD_CERT) => {
                Err(Reject::soft(sw::INS_INVALID, "command not emulated"))
            }
            (
                _,
                INS_SELECT | INS_AUTH0 | INS_AUTH1 | INS_EXCHANGE | INS_CONTROL_FLOW
                | INS_LOAD_CERT | INS_ENVELOPE | INS_GET_RESPONSE,
            ) => Err(Reject::soft(sw::CLA_INVALID, "class not supported")),
            _ => Err(Reject::soft(sw::INS_INVALID, "unknown instruction")),
        }
    }

    /// Le must be present and "00" (maximum) when strict.
    fn require_le_max(&self, cmd: &CommandApdu) -> Result<(), Reject> {
        if self.config.strict_le && !matches!(cmd.le, Some(NE_SHORT_MAX | NE_EXTENDED_MAX)) {
            return Err(Reject::fatal(sw::NOT_COMPLIANT, "Le must be 00"));
        }
        Ok(())
    }

    fn require_p1p2(cmd: &CommandApdu, p1: u8, p2: u8) -> Result<(), Reject> {
        if cmd.p1 != p1 || cmd.p2 != p2 {
            return Err(Reject::fatal(sw::WRONG_P1P2, "incorrect P1/P2"));
        }
        Ok(())
    }

    /// Proprietary template A5: application type 0000 and the supported versions.
    fn proprietary_template(&self) -> Result<Vec<u8>, Reject> {
        let versions: Vec<u8> = self.config.protocol_versions.concat();
        let mut inner = Vec::new();
        tlv::push_tlv(&mut inner, tag::APPLICATION_TYPE, &[0x00, 0x00]).map_err(internal)?;
        tlv::push_tlv(&mut inner, tag::PROTOCOL_VERSIONS, &versions).map_err(internal)?;
        tlv::encode(tag::FCI_PROPRIETARY, &inner).map_err(internal)
    }

    fn select(&mut self, cmd: &CommandApdu) -> Handled {
        if cmd.p1 != SELECT_P1_BY_NAME || cmd.p2 != SELECT_P2_FIRST {
            return Err(Reject::soft(
                sw::WRONG_P1P2,
                "SELECT must be by name, first",
            ));
        }
        if cmd.data.as_slice() == keyway::aliro::consts::AID_STEP_UP {
            return self.select_step_up();
        }
        if cmd.data.as_slice() != AID_EXPEDITED {
            return Err(Reject::soft(sw::NOT_FOUND, "application not found"));
        }
        // A new SELECT starts a new session whatever came before.
        self.state = State::Idle;
        if self.config.strict_le && !matches!(cmd.le, Some(NE_SHORT_MAX | NE_EXTENDED_MAX)) {
            return Err(Reject::soft(sw::NOT_COMPLIANT, "Le must be 00"));
        }
        let mut fci_inner = Vec::new();
        tlv::push_tlv(&mut fci_inner, tag::DF_NAME, &AID_EXPEDITED).map_err(internal)?;
        fci_inner.extend_from_slice(&self.proprietary_template()?);
        let fci = tlv::encode(tag::FCI, &fci_inner).map_err(internal)?;
        self.state = State::Selected;
        Ok(fci)
    }

    fn auth0(&mut self, cmd: &CommandApdu) -> Handled {
        if !matches!(self.state, State::Selected) {
            return Err(Reject::fatal(sw::INS_INVALID, "AUTH0 out of sequence"));
        }
        Self::require_p1p2(cmd, 0, 0)?;
        self.require_le_max(cmd)?;
        let tlvs = tlv::parse_all(&cmd.data)
            .map_err(|_| Reject::fatal(sw::NOT_COMPLIANT, "AUTH0 data is not TLV"))?;
        let [command_parameters] = fixed::<1>(&tlvs, tag::COMMAND_PARAMETERS, "AUTH0 tag 41")?;
        let [auth_policy] = fixed::<1>(&tlvs, tag::AUTH_POLICY, "AUTH0 tag 42")?;
        let protocol_version = fixed::<2>(&tlvs, tag::PROTOCOL_VERSIONS, "AUTH0 tag 5C")?;
        let reader_eph_bytes = fixed::<65>(&tlvs, tag::READER_EPHEMERAL, "AUTH0 tag 87")?;
        let transaction_id = fixed::<16>(&tlvs, tag::TRANSACTION_ID, "AUTH0 tag 4C")?;
        let reader_identifier = fixed::<32>(&tlvs, tag::READER_ID, "AUTH0 tag 4D")?;
        let vendor_extension = tlv::find(&tlvs, tag::AUTH0_VENDOR_EXTENSION)
            .map(|t| t.value.to_vec())
            .unwrap_or_default();
        let reader_eph = public_key_from_sec1(&reader_eph_bytes).map_err(|_| {
            Reject::fatal(
                sw::NOT_COMPLIANT,
                "reader ephemeral key is not a P-256 point",
            )
        })?;
        if !self.config.protocol_versions.contains(&protocol_version) {
            return Err(Reject::fatal(
                sw::CONDITIONS,
                "protocol version not supported",
            ));
        }
        let reader_group_key = self
            .config
            .credentials
            .iter()
            .find(|c| reader_identifier.get(..16) == Some(&c.group_id[..]))
            .map(|c| c.reader_group_key)
            .ok_or(Reject::fatal(
                sw::NOT_COMPLIANT,
                "reader group identifier unknown to access credential",
            ))?;

        let eph_key = self
            .random
            .ephemeral_key()
            .ok_or(Reject::fatal(sw::UNKNOWN, "no ephemeral key available"))?;
        let eph_pub = eph_key.public_key();
        let transcript = TranscriptContext {
            reader_key_x: public_key_x(&reader_group_key),
            reader_identifier,
            interface: self.config.interface_byte,
            protocol_version,
            reader_ephemeral_x: public_key_x(&reader_eph),
            endpoint_ephemeral_x: public_key_x(&eph_pub),
            transaction_id,
            command_parameters,
            auth_policy,
            fci_proprietary_tlv: self.proprietary_template()?,
            vendor_extension,
        };
        let mut ctx = Auth0Context {
            transcript,
            reader_group_key,
            reader_eph,
            eph_key,
            fast_channel: None,
        };

        let mut response = Vec::with_capacity(2 + 65 + 2 + 64);
        tlv::push_tlv(
            &mut response,
            tag::ENDPOINT_EPHEMERAL,
            &public_key_sec1(&eph_pub),
        )
        .map_err(internal)?;
        if command_parameters & AUTH0_FAST != 0 {
            let cryptogram = self.fast_cryptogram(&mut ctx)?;
            tlv::push_tlv(&mut response, tag::CRYPTOGRAM, &cryptogram).map_err(internal)?;
        }
        self.state = State::Auth0(Box::new(ctx));
        Ok(response)
    }

    /// FAST: the real cryptogram when a Kpersistent is stored for this reader (and the
    /// channel keys that go with it), else 64 random bytes the reader cannot match.
    fn fast_cryptogram(&mut self, ctx: &mut Auth0Context) -> Result<Vec<u8>, Reject> {
        let stored = if self.config.fast_enabled {
            self.k_persistent(&ctx.transcript.reader_identifier)
                .cloned()
        } else {
            None
        };
        let Some(k_persistent) = stored else {
            let mut decoy = vec![0u8; 64];
            self.random
                .fill_bytes(&mut decoy)
                .ok_or(Reject::fatal(sw::UNKNOWN, "no random bytes available"))?;
            return Ok(decoy);
        };
        let fast = keys::derive_fast(&k_persistent, &ctx.transcript, &self.endpoint_x())
            .map_err(internal)?;
        let zeros = [0u8; 20];
        let mut plain = Vec::with_capacity(48);
        let bitmap = self.config.signaling_bitmap.to_be_bytes();
        tlv::push_tlv(&mut plain, tag::SIGNALING_BITMAP, &bitmap).map_err(internal)?;
        let ts = self.config.credential_timestamp.unwrap_or(zeros);
        tlv::push_tlv(&mut plain, tag::CREDENTIAL_TIMESTAMP, &ts).map_err(internal)?;
        let rts = self.config.revocation_timestamp.unwrap_or(zeros);
        tlv::push_tlv(&mut plain, tag::REVOCATION_TIMESTAMP, &rts).map_err(internal)?;
        // The cryptogram key serves once, so the fixed all-zero IV is safe (and what Aliro uses).
        let cryptogram =
            crypto::gcm_seal(&fast.cryptogram_sk, &[0u8; 12], &[], &plain).map_err(internal)?;
        ctx.fast_channel = Some(SecureChannel::new(
            Role::Endpoint,
            fast.exchange_sk_reader,
            fast.exchange_sk_device,
        ));
        Ok(cryptogram)
    }

    fn endpoint_x(&self) -> [u8; 32] {
        public_key_x(&self.config.long_term_key.public_key())
    }

    fn auth1(&mut self, cmd: &CommandApdu) -> Handled {
        let State::Auth0(ctx) = &self.state else {
            return Err(Reject::fatal(sw::INS_INVALID, "AUTH1 out of sequence"));
        };
        Self::require_p1p2(cmd, 0, 0)?;
        self.require_le_max(cmd)?;
        let tlvs = tlv::parse_all(&cmd.data)
            .map_err(|_| Reject::fatal(sw::NOT_COMPLIANT, "AUTH1 data is not TLV"))?;
        let [parameters] = fixed::<1>(&tlvs, tag::COMMAND_PARAMETERS, "AUTH1 tag 41")?;
        let reader_sig = tlv::find(&tlvs, tag::SIGNATURE)
            .ok_or(Reject::fatal(sw::NOT_COMPLIANT, "AUTH1 tag 9E missing"))?;
        if tlv::find(&tlvs, tag::READER_CERTIFICATE).is_some() {
            return Err(Reject::fatal(
                sw::NOT_COMPLIANT,
                "AUTH1 certificate not emulated",
            ));
        }
        let t = &ctx.transcript;
        crypto::verify(
            &ctx.reader_group_key,
            &t.signature_preimage(Signer::Reader),
            reader_sig.value,
        )
        .map_err(|_| {
            Reject::fatal(
                sw::SECURITY,
                "reader authentication data verification failed",
            )
        })?;

        let ikm = keys::transaction_ikm(&ctx.eph_key, &ctx.reader_eph, &t.transaction_id)
            .map_err(internal)?;
        let session = keys::derive_volatile(&ikm, t).map_err(internal)?;
        let k_persistent =
            keys::derive_persistent(&ikm, t, &self.endpoint_x()).map_err(internal)?;

        let signed_tid = self
            .config
            .faults
            .device_signature_transaction_id
            .unwrap_or(t.transaction_id);
        let device_preimage = keys::signature_preimage(
            Signer::Device,
            &t.reader_identifier,
            &t.endpoint_ephemeral_x,
            &t.reader_ephemeral_x,
            &signed_tid,
        );
        let device_sig = crypto::sign(&self.config.long_term_key, &device_preimage);

        let mut plain = Zeroizing::new(Vec::with_capacity(200));
        if parameters & AUTH1_REQUEST_PUBLIC_KEY != 0 {
            tlv::push_tlv(
                &mut plain,
                tag::ENDPOINT_PUBLIC_KEY,
                &self.config.public_key_sec1(),
            )
            .map_err(internal)?;
        } else {
            tlv::push_tlv(&mut plain, tag::KEY_SLOT, &self.config.key_slot).map_err(internal)?;
        }
        tlv::push_tlv(&mut plain, tag::SIGNATURE, &device_sig).map_err(internal)?;
        let bitmap = self.config.signaling_bitmap.to_be_bytes();
        tlv::push_tlv(&mut plain, tag::SIGNALING_BITMAP, &bitmap).map_err(internal)?;
        if let Some(ts) = self.config.credential_timestamp {
            tlv::push_tlv(&mut plain, tag::CREDENTIAL_TIMESTAMP, &ts).map_err(internal)?;
        }
        let mut channel = SecureChannel::new(
            Role::Endpoint,
            session.exchange_sk_reader,
            session.exchange_sk_device,
        );
        let encrypted = channel.seal(&plain).map_err(internal)?;
        let reader_id = t.reader_identifier;
        self.remember_k_persistent(reader_id, k_persistent);
        self.state = State::Secure {
            channel,
            fast: false,
            step_up_ikm: Some(session.step_up_ikm),
        };
        Ok(encrypted)
    }

    /// SELECT 5502: only inside a session authenticated by AUTH1, and only with a document.
    fn select_step_up(&mut self) -> Handled {
        let ikm = match &mut self.state {
            State::Secure { step_up_ikm, .. } if self.config.access_document.is_some() => {
                step_up_ikm.take()
            }
            _ => None,
        };
        let Some(ikm) = ikm else {
            return Err(Reject::soft(sw::NOT_FOUND, "step-up not available"));
        };
        let (sk_reader, sk_device) = keys::derive_step_up(&ikm).map_err(internal)?;
        let mut fci_inner = Vec::new();
        tlv::push_tlv(
            &mut fci_inner,
            tag::DF_NAME,
            &keyway::aliro::consts::AID_STEP_UP,
        )
        .map_err(internal)?;
        fci_inner.extend_from_slice(&self.proprietary_template()?);
        let fci = tlv::encode(tag::FCI, &fci_inner).map_err(internal)?;
        self.state = State::StepUp {
            channel: SecureChannel::new(Role::Endpoint, sk_reader, sk_device),
        };
        Ok(fci)
    }

    /// ENVELOPE: 53 { {"data": DeviceRequest sealed} } in, the Access Document out (chained).
    fn envelope(&mut self, cmd: &CommandApdu) -> Handled {
        let State::StepUp { channel } = &mut self.state else {
            return Err(Reject::fatal(sw::INS_INVALID, "ENVELOPE out of sequence"));
        };
        let tlvs = tlv::parse_all(&cmd.data)
            .map_err(|_| Reject::fatal(sw::NOT_COMPLIANT, "ENVELOPE data is not TLV"))?;
        let body = tlv::find(&tlvs, tag::SESSION_DATA)
            .ok_or(Reject::fatal(sw::NOT_COMPLIANT, "ENVELOPE without tag 53"))?;
        let ct = keyway::aliro::document::session_data_payload(body.value)
            .map_err(|_| Reject::fatal(sw::NOT_COMPLIANT, "session data is not CBOR"))?;
        let request = channel
            .open(&ct)
            .map_err(|_| Reject::fatal(sw::SECURITY, "ENVELOPE decryption failed"))?;
        // Any well-formed DeviceRequest gets the one document this phone holds.
        ciborium::de::from_reader::<ciborium::value::Value, _>(request.as_slice())
            .map_err(|_| Reject::fatal(sw::NOT_COMPLIANT, "DeviceRequest is not CBOR"))?;
        let doc = self.config.access_document.clone().unwrap_or_default();
        let sealed = channel.seal(&doc).map_err(internal)?;
        let wrapped = keyway::aliro::document::session_data(&sealed).map_err(internal)?;
        let mut out = Vec::new();
        tlv::push_tlv(&mut out, tag::SESSION_DATA, &wrapped).map_err(internal)?;
        let State::StepUp { channel } = std::mem::replace(&mut self.state, State::Idle) else {
            return Err(Reject::fatal(sw::INS_INVALID, "ENVELOPE out of sequence"));
        };
        Ok(self.send_chunk(channel, out))
    }

    fn get_response(&mut self, _cmd: &CommandApdu) -> Handled {
        match std::mem::replace(&mut self.state, State::Idle) {
            State::StepUpSending { channel, rest } => Ok(self.send_chunk(channel, rest)),
            other => {
                self.state = other;
                Err(Reject::soft(sw::INS_INVALID, "no response data pending"))
            }
        }
    }

    /// Short APDUs carry at most 256 bytes: send that much, announce the rest with 61xx.
    fn send_chunk(&mut self, channel: SecureChannel, mut data: Vec<u8>) -> Vec<u8> {
        const CHUNK: usize = 254;
        if data.len() <= CHUNK {
            // Done: the final EXCHANGE runs on the step-up channel.
            self.state = State::Secure {
                channel,
                fast: false,
                step_up_ikm: None,
            };
            return data;
        }
        let rest = data.split_off(CHUNK);
        let announce = u8::try_from(rest.len()).unwrap_or(0);
        self.next_sw = Some(u16::from_be_bytes([
            keyway::aliro::consts::sw::MORE_DATA_SW1,
            announce,
        ]));
        self.state = State::StepUpSending { channel, rest };
        data
    }

    fn exchange(&mut self, cmd: &CommandApdu) -> Handled {
        // FAST matched: the first EXCHANGE moves the session onto the FAST channel.
        if let State::Auth0(ctx) = &mut self.state {
            if let Some(channel) = ctx.fast_channel.take() {
                self.state = State::Secure {
                    channel,
                    fast: true,
                    step_up_ikm: None,
                };
            }
        }
        let strict_le = self.config.strict_le;
        let State::Secure { channel, fast, .. } = &mut self.state else {
            return Err(Reject::fatal(
                sw::INS_INVALID,
                "EXCHANGE before authentication",
            ));
        };
        let fast = *fast;
        Self::require_p1p2(cmd, 0, 0)?;
        if strict_le && !matches!(cmd.le, Some(NE_SHORT_MAX | NE_EXTENDED_MAX)) {
            return Err(Reject::fatal(sw::NOT_COMPLIANT, "Le must be 00"));
        }
        let plain = Zeroizing::new(
            channel
                .open(&cmd.data)
                .map_err(|_| Reject::fatal(sw::SECURITY, "EXCHANGE decryption failed"))?,
        );
        let tlvs = tlv::parse_all(&plain)
            .map_err(|_| Reject::fatal(sw::NOT_COMPLIANT, "EXCHANGE plaintext is not TLV"))?;
        let status = match tlv::find(&tlvs, tag::READER_STATUS) {
            Some(t) => Some(
                <[u8; 2]>::try_from(t.value)
                    .map(u16::from_be_bytes)
                    .map_err(|_| Reject::fatal(sw::NOT_COMPLIANT, "reader status length"))?,
            ),
            None => None,
        };
        // No mailbox emulated: reply "no read data, status 0000".
        let response = channel.seal(&[0x00, 0x02, 0x00, 0x00]).map_err(internal)?;
        if let Some(reader_status) = status {
            self.record(Outcome::Completed {
                reader_status,
                fast,
            });
        }
        Ok(response)
    }

    fn control_flow(&mut self, cmd: &CommandApdu) -> Handled {
        if matches!(self.state, State::Idle) {
            return Err(Reject::soft(
                sw::INS_INVALID,
                "CONTROL FLOW outside a session",
            ));
        }
        Self::require_p1p2(cmd, 0, 0)?;
        if self.config.strict_le && cmd.le.is_some() {
            return Err(Reject::fatal(
                sw::NOT_COMPLIANT,
                "CONTROL FLOW must not carry Le",
            ));
        }
        let tlvs = tlv::parse_all(&cmd.data)
            .map_err(|_| Reject::fatal(sw::NOT_COMPLIANT, "CONTROL FLOW data is not TLV"))?;
        let [s1] = fixed::<1>(&tlvs, tag::COMMAND_PARAMETERS, "CONTROL FLOW tag 41")?;
        let [s2] = fixed::<1>(&tlvs, tag::AUTH_POLICY, "CONTROL FLOW tag 42")?;
        self.record(Outcome::ControlFlow { s1, s2 });
        // The reader is done with this session either way.
        self.state = State::Idle;
        Ok(Vec::new())
    }
}

/// The value of a mandatory TLV with an exact length.
fn fixed<const N: usize>(
    tlvs: &[Tlv<'_>],
    tag: u32,
    what: &'static str,
) -> Result<[u8; N], Reject> {
    tlv::find(tlvs, tag)
        .and_then(|t| <[u8; N]>::try_from(t.value).ok())
        .ok_or(Reject::fatal(sw::NOT_COMPLIANT, what))
}

/// A failure that valid input cannot cause (encoding limits, KDF lengths).
fn internal<E>(_: E) -> Reject {
    Reject::fatal(sw::UNKNOWN, "internal error")
}

impl VirtualCard for Endpoint {
    fn power_event(&mut self, _code: u8) {
        self.on_power();
    }

    fn transmit(&mut self, c_apdu: &[u8]) -> Vec<u8> {
        self.handle(c_apdu)
    }

    fn transaction_finished(&self) -> bool {
        !self.outcomes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    //! A minimal reader built from the shared primitives drives the endpoint with fresh random
    //! keys, so these checks are independent of the vector files.
    use super::*;
    use crate::random::ScriptedRandom;
    use keyway::aliro::crypto::gcm_open;
    use rand_core::OsRng;

    struct TestReader {
        group_key: SecretKey,
        reader_id: [u8; 32],
        eph: SecretKey,
        transaction_id: [u8; 16],
    }

    impl TestReader {
        fn new() -> Self {
            let mut reader_id = [0u8; 32];
            reader_id[..16].copy_from_slice(&[0x11; 16]);
            reader_id[16..].copy_from_slice(&[0x22; 16]);
            Self {
                group_key: SecretKey::random(&mut OsRng),
                reader_id,
                eph: SecretKey::random(&mut OsRng),
                transaction_id: [0x33; 16],
            }
        }

        fn credential(&self) -> ReaderGroupCredential {
            let mut group_id = [0u8; 16];
            group_id.copy_from_slice(&self.reader_id[..16]);
            ReaderGroupCredential {
                group_id,
                reader_group_key: self.group_key.public_key(),
            }
        }

        fn select() -> Vec<u8> {
            CommandApdu::new(CLA_ISO, INS_SELECT, 4, 0)
                .with_data(AID_EXPEDITED.to_vec())
                .with_le(256)
                .encode()
                .unwrap()
        }

        fn auth0(&self, parameters: u8, version: [u8; 2]) -> Vec<u8> {
            let mut d = Vec::new();
            tlv::push_tlv(&mut d, 0x41, &[parameters]).unwrap();
            tlv::push_tlv(&mut d, 0x42, &[0x01]).unwrap();
            tlv::push_tlv(&mut d, 0x5C, &version).unwrap();
            tlv::push_tlv(&mut d, 0x87, &public_key_sec1(&self.eph.public_key())).unwrap();
            tlv::push_tlv(&mut d, 0x4C, &self.transaction_id).unwrap();
            tlv::push_tlv(&mut d, 0x4D, &self.reader_id).unwrap();
            CommandApdu::new(CLA_PROPRIETARY, INS_AUTH0, 0, 0)
                .with_data(d)
                .with_le(256)
                .encode()
                .unwrap()
        }

        fn transcript(&self, endpoint_eph: &PublicKey, parameters: u8) -> TranscriptContext {
            TranscriptContext {
                reader_key_x: public_key_x(&self.group_key.public_key()),
                reader_identifier: self.reader_id,
                interface: INTERFACE_NFC,
                protocol_version: PROTOCOL_VERSION_1_0,
                reader_ephemeral_x: public_key_x(&self.eph.public_key()),
                endpoint_ephemeral_x: public_key_x(endpoint_eph),
                transaction_id: self.transaction_id,
                command_parameters: parameters,
                auth_policy: 0x01,
                // What the endpoint's SELECT answered: A5 { 80 0000, 5C 0100 }.
                fci_proprietary_tlv: vec![0xA5, 0x08, 0x80, 0x02, 0, 0, 0x5C, 0x02, 0x01, 0x00],
                vendor_extension: vec![],
            }
        }

        fn auth1(&self, t: &TranscriptContext, signer: &SecretKey, parameters: u8) -> Vec<u8> {
            let sig = crypto::sign(signer, &t.signature_preimage(Signer::Reader));
            let mut d = Vec::new();
            tlv::push_tlv(&mut d, 0x41, &[parameters]).unwrap();
            tlv::push_tlv(&mut d, 0x9E, &sig).unwrap();
            CommandApdu::new(CLA_PROPRIETARY, INS_AUTH1, 0, 0)
                .with_data(d)
                .with_le(256)
                .encode()
                .unwrap()
        }

        fn exchange(channel: &mut SecureChannel, plain: &[u8]) -> Vec<u8> {
            CommandApdu::new(CLA_PROPRIETARY, INS_EXCHANGE, 0, 0)
                .with_data(channel.seal(plain).unwrap())
                .with_le(256)
                .encode()
                .unwrap()
        }
    }

    fn split(r: &[u8]) -> (&[u8], u16) {
        let (data, sw) = r.split_at(r.len() - 2);
        (data, u16::from_be_bytes([sw[0], sw[1]]))
    }

    fn endpoint_for(reader: &TestReader) -> (Endpoint, SecretKey) {
        let long_term = SecretKey::random(&mut OsRng);
        let config = EndpointConfig::new(long_term.clone(), vec![reader.credential()]);
        let mut random = ScriptedRandom::new();
        for _ in 0..4 {
            random.push_key(SecretKey::random(&mut OsRng));
        }
        random.push_bytes(&[0xC5; 256]);
        (Endpoint::new(config, Box::new(random)), long_term)
    }

    /// What a STANDARD transaction left the reader with.
    struct Standard {
        channel: SecureChannel,
        t: TranscriptContext,
        plain: Vec<u8>,
        endpoint_eph: PublicKey,
    }

    /// SELECT + AUTH0 + AUTH1 with an honest reader.
    fn standard(reader: &TestReader, ep: &mut Endpoint, auth1_parameters: u8) -> Standard {
        assert_eq!(split(&ep.handle(&TestReader::select())).1, 0x9000);
        let r = ep.handle(&reader.auth0(0x00, PROTOCOL_VERSION_1_0));
        let (data, sw) = split(&r);
        assert_eq!(sw, 0x9000);
        let tlvs = tlv::parse_all(data).unwrap();
        let eph = public_key_from_sec1(tlv::find(&tlvs, 0x86).unwrap().value).unwrap();
        assert!(
            tlv::find(&tlvs, 0x9D).is_none(),
            "no cryptogram in STANDARD"
        );
        let t = reader.transcript(&eph, 0x00);
        let r = ep.handle(&reader.auth1(&t, &reader.group_key, auth1_parameters));
        let (data, sw) = split(&r);
        assert_eq!(sw, 0x9000);
        let ikm = keys::transaction_ikm(&reader.eph, &eph, &reader.transaction_id).unwrap();
        let k = keys::derive_volatile(&ikm, &t).unwrap();
        let mut channel =
            SecureChannel::new(Role::Reader, k.exchange_sk_reader, k.exchange_sk_device);
        let plain = channel.open(data).unwrap();
        Standard {
            channel,
            t,
            plain,
            endpoint_eph: eph,
        }
    }

    #[test]
    fn full_standard_transaction_with_an_independent_reader() {
        let reader = TestReader::new();
        let (mut ep, long_term) = endpoint_for(&reader);
        let Standard {
            mut channel,
            t,
            plain,
            endpoint_eph,
        } = standard(&reader, &mut ep, 0x01);
        let tlvs = tlv::parse_all(&plain).unwrap();
        let pk = tlv::find(&tlvs, 0x5A).unwrap().value;
        assert_eq!(pk, public_key_sec1(&long_term.public_key()));
        let sig = tlv::find(&tlvs, 0x9E).unwrap().value;
        crypto::verify(
            &long_term.public_key(),
            &t.signature_preimage(Signer::Device),
            sig,
        )
        .unwrap();
        assert_eq!(tlv::find(&tlvs, 0x5E).unwrap().value, [0, 0]);
        assert!(ep.is_authenticated());
        assert!(ep.last_outcome().is_none());

        let r = ep.handle(&TestReader::exchange(
            &mut channel,
            &[0x97, 0x02, 0x01, 0x01],
        ));
        let (data, sw) = split(&r);
        assert_eq!(sw, 0x9000);
        assert_eq!(channel.open(data).unwrap(), [0x00, 0x02, 0x00, 0x00]);
        assert_eq!(
            ep.last_outcome(),
            Some(&Outcome::Completed {
                reader_status: 0x0101,
                fast: false
            })
        );
        assert!(ep.transaction_finished());
        // The endpoint learned the same Kpersistent the reader derives.
        let ikm =
            keys::transaction_ikm(&reader.eph, &endpoint_eph, &reader.transaction_id).unwrap();
        let reader_side =
            keys::derive_persistent(&ikm, &t, &public_key_x(&long_term.public_key())).unwrap();
        assert_eq!(ep.k_persistent(&reader.reader_id), Some(&reader_side));
    }

    #[test]
    fn key_slot_is_returned_when_asked() {
        let reader = TestReader::new();
        let (mut ep, _) = endpoint_for(&reader);
        let slot = ep.config().key_slot;
        let plain = standard(&reader, &mut ep, 0x00).plain;
        let tlvs = tlv::parse_all(&plain).unwrap();
        assert!(tlv::find(&tlvs, 0x5A).is_none());
        assert_eq!(tlv::find(&tlvs, 0x4E).unwrap().value, slot);
    }

    #[test]
    fn fast_after_standard_uses_the_learned_key() {
        let reader = TestReader::new();
        let (mut ep, long_term) = endpoint_for(&reader);
        let first = standard(&reader, &mut ep, 0x01);
        let t1 = first.t;
        // The reader's own Kpersistent from the first transaction keys the FAST check below.
        let ikm = keys::transaction_ikm(&reader.eph, &first.endpoint_eph, &reader.transaction_id)
            .unwrap();
        let eph1 =
            keys::derive_persistent(&ikm, &t1, &public_key_x(&long_term.public_key())).unwrap();
        ep.on_power();
        assert!(
            ep.k_persistent(&reader.reader_id).is_some(),
            "survives power"
        );

        let reader2 = TestReader {
            eph: SecretKey::random(&mut OsRng),
            transaction_id: [0x44; 16],
            group_key: reader.group_key.clone(),
            reader_id: reader.reader_id,
        };
        assert_eq!(split(&ep.handle(&TestReader::select())).1, 0x9000);
        let r = ep.handle(&reader2.auth0(0x01, PROTOCOL_VERSION_1_0));
        let (data, sw) = split(&r);
        assert_eq!(sw, 0x9000);
        let tlvs = tlv::parse_all(data).unwrap();
        let eph = public_key_from_sec1(tlv::find(&tlvs, 0x86).unwrap().value).unwrap();
        let cryptogram = tlv::find(&tlvs, 0x9D).unwrap().value;
        assert_eq!(cryptogram.len(), 64);
        let t = reader2.transcript(&eph, 0x01);
        let fast = keys::derive_fast(&eph1, &t, &public_key_x(&long_term.public_key())).unwrap();
        let plain = gcm_open(&fast.cryptogram_sk, &[0u8; 12], &[], cryptogram).unwrap();
        let ptlvs = tlv::parse_all(&plain).unwrap();
        assert_eq!(tlv::find(&ptlvs, 0x5E).unwrap().value, [0, 0]);
        assert_eq!(tlv::find(&ptlvs, 0x91).unwrap().value, [0u8; 20]);
        let mut channel = SecureChannel::new(
            Role::Reader,
            fast.exchange_sk_reader,
            fast.exchange_sk_device,
        );
        let r = ep.handle(&TestReader::exchange(
            &mut channel,
            &[0x97, 0x02, 0x01, 0x00],
        ));
        let (data, sw) = split(&r);
        assert_eq!(sw, 0x9000);
        assert_eq!(channel.open(data).unwrap(), [0x00, 0x02, 0x00, 0x00]);
        assert_eq!(
            ep.last_outcome(),
            Some(&Outcome::Completed {
                reader_status: 0x0100,
                fast: true
            })
        );
    }

    #[test]
    fn fast_without_key_gives_random_cryptogram_then_standard_works() {
        let reader = TestReader::new();
        let (mut ep, _) = endpoint_for(&reader);
        assert_eq!(split(&ep.handle(&TestReader::select())).1, 0x9000);
        let r = ep.handle(&reader.auth0(0x01, PROTOCOL_VERSION_1_0));
        let (data, sw) = split(&r);
        assert_eq!(sw, 0x9000);
        let tlvs = tlv::parse_all(data).unwrap();
        assert_eq!(tlv::find(&tlvs, 0x9D).unwrap().value, [0xC5; 64]);
        let eph = public_key_from_sec1(tlv::find(&tlvs, 0x86).unwrap().value).unwrap();
        // Fallback: AUTH1 in the same session, salts carry command parameters 01.
        let t = reader.transcript(&eph, 0x01);
        let r = ep.handle(&reader.auth1(&t, &reader.group_key, 0x01));
        let (data, sw) = split(&r);
        assert_eq!(sw, 0x9000);
        let ikm = keys::transaction_ikm(&reader.eph, &eph, &reader.transaction_id).unwrap();
        let k = keys::derive_volatile(&ikm, &t).unwrap();
        let mut channel =
            SecureChannel::new(Role::Reader, k.exchange_sk_reader, k.exchange_sk_device);
        assert!(channel.open(data).is_ok());
    }

    #[test]
    fn wrong_reader_signature_terminates_the_session() {
        let reader = TestReader::new();
        let (mut ep, _) = endpoint_for(&reader);
        assert_eq!(split(&ep.handle(&TestReader::select())).1, 0x9000);
        let r = ep.handle(&reader.auth0(0x00, PROTOCOL_VERSION_1_0));
        let (data, _) = split(&r);
        let tlvs = tlv::parse_all(data).unwrap();
        let eph = public_key_from_sec1(tlv::find(&tlvs, 0x86).unwrap().value).unwrap();
        let t = reader.transcript(&eph, 0x00);
        let impostor = SecretKey::random(&mut OsRng);
        let r = ep.handle(&reader.auth1(&t, &impostor, 0x01));
        assert_eq!(r, [0x69, 0x82]);
        assert!(matches!(
            ep.last_outcome(),
            Some(Outcome::Rejected { sw: 0x6982, .. })
        ));
        // Session gone: a correctly signed AUTH1 now is out of sequence.
        let r = ep.handle(&reader.auth1(&t, &reader.group_key, 0x01));
        assert_eq!(split(&r).1, sw::INS_INVALID);
    }

    #[test]
    fn auth0_refusals() {
        let reader = TestReader::new();
        // Before SELECT: not a session, no outcome.
        let (mut ep, _) = endpoint_for(&reader);
        assert_eq!(
            split(&ep.handle(&reader.auth0(0, PROTOCOL_VERSION_1_0))).1,
            0x6D00
        );
        assert!(ep.last_outcome().is_none());
        // Unsupported version.
        ep.handle(&TestReader::select());
        assert_eq!(ep.handle(&reader.auth0(0, [0x02, 0x00])), [0x69, 0x85]);
        // Unknown group.
        let stranger = TestReader {
            reader_id: [0x77; 32],
            ..TestReader::new()
        };
        ep.handle(&TestReader::select());
        assert_eq!(
            ep.handle(&stranger.auth0(0, PROTOCOL_VERSION_1_0)),
            [0x67, 0x01]
        );
        // Missing tag / invalid point.
        ep.handle(&TestReader::select());
        let mut bad = reader.auth0(0, PROTOCOL_VERSION_1_0);
        let pos = bad.windows(2).position(|w| w == [0x87, 0x41]).unwrap();
        bad[pos + 3] ^= 0xFF; // corrupt X: no longer on the curve (overwhelmingly likely)
        assert_eq!(split(&ep.handle(&bad)).1, 0x6701);
        let outcomes: Vec<u16> = ep
            .outcomes()
            .map(|o| match o {
                Outcome::Rejected { sw, .. } => *sw,
                _ => 0,
            })
            .collect();
        assert_eq!(outcomes, vec![0x6985, 0x6701, 0x6701]);
    }

    #[test]
    fn le_rules() {
        let reader = TestReader::new();
        let (mut ep, _) = endpoint_for(&reader);
        let no_le = CommandApdu::new(CLA_ISO, INS_SELECT, 4, 0)
            .with_data(AID_EXPEDITED.to_vec())
            .encode()
            .unwrap();
        assert_eq!(ep.handle(&no_le), [0x67, 0x01]);
        let le_10 = CommandApdu::new(CLA_ISO, INS_SELECT, 4, 0)
            .with_data(AID_EXPEDITED.to_vec())
            .with_le(0x10)
            .encode()
            .unwrap();
        assert_eq!(ep.handle(&le_10), [0x67, 0x01]);
        // CONTROL FLOW: with Le refused, without accepted.
        ep.handle(&TestReader::select());
        let cf = |le: Option<u32>| {
            let mut c = CommandApdu::new(CLA_PROPRIETARY, INS_CONTROL_FLOW, 0, 0)
                .with_data(vec![0x41, 0x01, 0x00, 0x42, 0x01, 0x27]);
            c.le = le;
            c.encode().unwrap()
        };
        assert_eq!(ep.handle(&cf(Some(256))), [0x67, 0x01]);
        ep.handle(&TestReader::select());
        assert_eq!(ep.handle(&cf(None)), [0x90, 0x00]);
        assert_eq!(
            ep.last_outcome(),
            Some(&Outcome::ControlFlow { s1: 0x00, s2: 0x27 })
        );
        // Lenient mode accepts what kormax sends.
        let mut config = ep.config().clone();
        config.strict_le = false;
        let mut lenient = Endpoint::new(config, Box::new(ScriptedRandom::new()));
        assert_eq!(split(&lenient.handle(&no_le)).1, 0x9000);
        assert_eq!(lenient.handle(&cf(Some(256))), [0x90, 0x00]);
    }

    #[test]
    fn exchange_replay_and_tampering_are_refused() {
        let reader = TestReader::new();
        let (mut ep, _) = endpoint_for(&reader);
        let mut channel = standard(&reader, &mut ep, 0x01).channel;
        let cmd = TestReader::exchange(&mut channel, &[0x97, 0x02, 0x01, 0x01]);
        assert_eq!(split(&ep.handle(&cmd)).1, 0x9000);
        assert_eq!(ep.handle(&cmd), [0x69, 0x82]);
        assert!(!ep.is_authenticated());

        let (mut ep, _) = endpoint_for(&reader);
        let mut channel = standard(&reader, &mut ep, 0x01).channel;
        let mut cmd = TestReader::exchange(&mut channel, &[0x97, 0x02, 0x01, 0x01]);
        let n = cmd.len();
        cmd[n - 3] ^= 0x01; // last tag byte (before Le)
        assert_eq!(ep.handle(&cmd), [0x69, 0x82]);
        assert!(!ep
            .outcomes()
            .any(|o| matches!(o, Outcome::Completed { .. })));
    }

    #[test]
    fn step_up_select_and_unemulated_commands() {
        let reader = TestReader::new();
        let (mut ep, _) = endpoint_for(&reader);
        standard(&reader, &mut ep, 0x01);
        let step_up = CommandApdu::new(CLA_ISO, INS_SELECT, 4, 0)
            .with_data(keyway::aliro::consts::AID_STEP_UP.to_vec())
            .with_le(256)
            .encode()
            .unwrap();
        assert_eq!(ep.handle(&step_up), [0x6A, 0x82]);
        // Soft refusals keep the session.
        assert!(ep.is_authenticated());
        assert_eq!(
            ep.handle(&[0x80, 0xD1, 0x00, 0x00, 0x01, 0x00, 0x00]),
            [0x6D, 0x00]
        );
        assert_eq!(ep.handle(&[0x80, 0x01, 0x00, 0x00]), [0x6D, 0x00]);
        assert_eq!(ep.handle(&[0x84, 0x80, 0x00, 0x00]), [0x6E, 0x00]);
        assert!(ep.is_authenticated());
    }

    #[test]
    fn device_signature_fault_is_applied() {
        let reader = TestReader::new();
        let (mut ep, long_term) = endpoint_for(&reader);
        ep.config.faults.device_signature_transaction_id = Some([0u8; 16]);
        let Standard { t, plain, .. } = standard(&reader, &mut ep, 0x01);
        let tlvs = tlv::parse_all(&plain).unwrap();
        let sig = tlv::find(&tlvs, 0x9E).unwrap().value;
        let pk = long_term.public_key();
        assert!(crypto::verify(&pk, &t.signature_preimage(Signer::Device), sig).is_err());
        let mut faulty = t.clone();
        faulty.transaction_id = [0u8; 16];
        assert!(crypto::verify(&pk, &faulty.signature_preimage(Signer::Device), sig).is_ok());
    }

    #[test]
    fn garbage_never_panics_and_always_has_a_status_word() {
        let reader = TestReader::new();
        let (mut ep, _) = endpoint_for(&reader);
        let mut seed = 0x1234_5678u32;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        for i in 0..3000 {
            let len = (next() % 80) as usize;
            let mut apdu: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            // Steer a share of the inputs into the real commands.
            if len >= 4 && i % 2 == 0 {
                let ins = [
                    INS_SELECT,
                    INS_AUTH0,
                    INS_AUTH1,
                    INS_EXCHANGE,
                    INS_CONTROL_FLOW,
                ];
                apdu[0] = if i % 4 == 0 { CLA_ISO } else { CLA_PROPRIETARY };
                apdu[1] = ins[(next() % 5) as usize];
                apdu[2] = 0;
                apdu[3] = 0;
            }
            if i % 7 == 0 {
                ep.handle(&TestReader::select());
            }
            let r = ep.handle(&apdu);
            assert!(r.len() >= 2);
        }
    }

    #[test]
    fn power_resets_the_session_and_debug_redacts_secrets() {
        let reader = TestReader::new();
        let (mut ep, long_term) = endpoint_for(&reader);
        standard(&reader, &mut ep, 0x01);
        assert!(ep.is_authenticated());
        ep.power_event(0x01);
        assert!(!ep.is_authenticated());
        let dbg = format!("{ep:?}");
        assert!(!dbg.contains(&hex::encode(long_term.to_bytes())));
        assert!(dbg.contains("redacted"));
    }

    #[test]
    fn outcome_history_is_bounded() {
        let reader = TestReader::new();
        let (mut ep, _) = endpoint_for(&reader);
        for _ in 0..(MAX_OUTCOMES + 10) {
            ep.handle(&TestReader::select());
            ep.handle(&[
                0x80, 0x3C, 0x00, 0x00, 0x06, 0x41, 0x01, 0x00, 0x42, 0x01, 0x00,
            ]);
        }
        assert_eq!(ep.outcomes().count(), MAX_OUTCOMES);
        assert_eq!(ep.take_outcomes().len(), MAX_OUTCOMES);
        assert!(ep.last_outcome().is_none());
    }
}
