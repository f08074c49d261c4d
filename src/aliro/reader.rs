//! The sans-IO Aliro 1.0 reader transaction (NFC, expedited phase, STANDARD and FAST flows).
//!
//! STANDARD: `SELECT (expedited AID) -> AUTH0 -> AUTH1 -> [caller decides] -> EXCHANGE {97}`.
//! FAST (opt-in with [`ReaderTransaction::with_fast`]): AUTH0 asks for a cryptogram; if one of
//! the supplied Kpersistent values opens it, the endpoint is identified without AUTH1 and the
//! EXCHANGE runs under the FAST keys; otherwise the reader continues with AUTH1 in the same
//! session or aborts with CONTROL FLOW, as configured ([`FastFallback`]).
//! LOAD CERT (opt-in with [`ReaderTransaction::with_certificate`]): between AUTH0 and AUTH1
//! the reader sends its certificate and signs AUTH1 with the certificate subject key.
//! The state machine only turns R-APDU bytes into C-APDU bytes and [`Action`]s. It owns no
//! I/O, no clock and no RNG: the ephemeral key and transaction identifier are injected
//! ([`Randomness`]), and the adapter applies [`STEP_TIMEOUT`] around each exchange.
//!
//! Failure handling (what the reader sends after a failure):
//! * Error status word from the endpoint (SELECT, AUTH0, AUTH1, EXCHANGE): the endpoint has
//!   terminated its session, so nothing more is sent; `on_response` returns the error.
//! * No common protocol version in the SELECT FCI: CONTROL FLOW {S1 00, S2 27} (no Le), as an
//!   aliro-actuator reader does, instead of AUTH0.
//! * Malformed AUTH0 response (no secure channel yet): CONTROL FLOW {S1 00, S2 00}.
//! * AUTH1 response fails AES-GCM: EXCHANGE {97 0007} (invalid data content) under
//!   ExchangeSKReader, as aliro-actuator does.
//! * AUTH1 response decrypts but is malformed / lacks the key or the signature: EXCHANGE with
//!   0006 / 0022 / 0023.
//! * Device signature does not verify: EXCHANGE {97 0001} (public key not found). The vectors'
//!   README (disagreement 6) shows kormax sends 0001 and aliro-actuator 0004. We choose 0001:
//!   an endpoint that fails authentication is treated exactly like an unknown key, so the phone
//!   learns nothing beyond "not admitted", and the bytes match the kormax reference reader.
//!
//! After a failure report has been sent, the next response ends the transaction with
//! [`Outcome::Failed`] carrying the original error.

use std::time::Duration;

use p256::{PublicKey, SecretKey};
use rand_core::CryptoRngCore;
use thiserror::Error;

use crate::aliro::apdu::{ApduError, CommandApdu, ResponseApdu, NE_SHORT_MAX};
use crate::aliro::consts::{
    self, sw, tag, ReaderStatus, AID_EXPEDITED, AUTH0_STANDARD, AUTH1_REQUEST_PUBLIC_KEY, CLA_ISO,
    CLA_PROPRIETARY, CONTROL_FLOW_S1_FAILURE, CONTROL_FLOW_S2_NONE,
    CONTROL_FLOW_S2_VERSION_NOT_SUPPORTED, INS_AUTH0, INS_AUTH1, INS_CONTROL_FLOW, INS_EXCHANGE,
    INS_GET_RESPONSE, INS_SELECT, PROTOCOL_VERSION_1_0, SELECT_P1_BY_NAME, SELECT_P2_FIRST,
};
use crate::aliro::crypto::{self, CryptoError, Role, SecureChannel, SymmetricKey};
use crate::aliro::keys::{self, Signer, TranscriptContext};
use crate::aliro::tlv::{self, Tlv, TlvError};

/// Per-APDU deadline hint for the adapter (a phone answers each command well within this).
pub const STEP_TIMEOUT: Duration = Duration::from_millis(1500);
/// Whole-transaction deadline hint for the adapter.
pub const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest response (after GET RESPONSE chaining) the reader accepts.
pub const MAX_RESPONSE_LEN: usize = 4096;
/// Largest number of GET RESPONSE rounds for one command.
const MAX_GET_RESPONSE_ROUNDS: usize = 32;

/// The reader command a failure belongs to (errors while chaining a response with GET
/// RESPONSE belong to the command whose response it is).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Select,
    Auth0,
    LoadCert,
    Auth1,
    Exchange,
    ControlFlow,
    /// SELECT of the step-up application.
    SelectStepUp,
    Envelope,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Step::Select => "SELECT",
            Step::Auth0 => "AUTH0",
            Step::LoadCert => "LOAD CERT",
            Step::Auth1 => "AUTH1",
            Step::Exchange => "EXCHANGE",
            Step::ControlFlow => "CONTROL FLOW",
            Step::SelectStepUp => "SELECT (step-up)",
            Step::Envelope => "ENVELOPE",
        })
    }
}

/// Why a reader transaction failed. Messages carry no key material.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AliroError {
    /// Fewer than two bytes came back: the phone left the field or the link broke.
    #[error("card gone: response of {len} bytes")]
    CardGone { len: usize },
    /// The endpoint answered with an error status word.
    #[error("{step} rejected by endpoint with status word {sw:04X}")]
    BadStatus { step: Step, sw: u16 },
    /// A response whose TLV structure does not parse.
    #[error("malformed TLV in {step} response: {source}")]
    MalformedTlv {
        step: Step,
        #[source]
        source: TlvError,
    },
    /// A response that parses but misses or misuses a field.
    #[error("malformed {step} response: {detail}")]
    MalformedResponse { step: Step, detail: &'static str },
    /// The endpoint does not offer the protocol version this reader speaks.
    #[error("endpoint does not support protocol version {wanted:04X}")]
    UnsupportedVersion { wanted: u16 },
    /// Decryption, key parsing or key derivation failed.
    #[error("cryptographic failure in {step}: {source}")]
    Crypto {
        step: Step,
        #[source]
        source: CryptoError,
    },
    /// The endpoint's signature over the transaction does not verify.
    #[error("endpoint signature invalid")]
    SignatureInvalid,
    /// A method was called in a state where it is not allowed.
    #[error("{call} not allowed in state {state}")]
    UnexpectedState {
        call: &'static str,
        state: &'static str,
    },
    /// A (chained) response longer than [`MAX_RESPONSE_LEN`] or too many GET RESPONSE rounds.
    #[error("response too long ({len} bytes)")]
    ResponseTooLong { len: usize },
    /// The endpoint decrypted our EXCHANGE but reported a non-zero status.
    #[error("endpoint reported EXCHANGE status {status:04X}")]
    EndpointStatus { status: u16 },
    /// FAST was requested, no stored Kpersistent opened the cryptogram, and the policy is to
    /// abort.
    #[error("FAST cryptogram matches no stored credential")]
    FastNoMatch,
    /// A command could not be encoded (caller-supplied data too long).
    #[error("cannot build command: {0}")]
    Apdu(#[from] ApduError),
}

impl AliroError {
    /// Stable snake_case code for events, journald fields and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            AliroError::CardGone { .. } => "card_gone",
            AliroError::BadStatus { .. } => "endpoint_status",
            AliroError::MalformedTlv { .. } | AliroError::MalformedResponse { .. } => {
                "malformed_response"
            }
            AliroError::UnsupportedVersion { .. } => "unsupported_version",
            AliroError::Crypto { .. } => "crypto_failure",
            AliroError::SignatureInvalid => "signature_invalid",
            AliroError::UnexpectedState { .. } => "unexpected_state",
            AliroError::ResponseTooLong { .. } => "response_too_long",
            AliroError::EndpointStatus { .. } => "exchange_rejected",
            AliroError::FastNoMatch => "fast_no_match",
            AliroError::Apdu(_) => "apdu_encoding",
        }
    }
}

/// The reader's long-term identity: the reader group key and identifiers.
pub struct ReaderIdentity {
    pub group_id: [u8; 16],
    pub sub_id: [u8; 16],
    /// Reader long-term (group) private key: signs AUTH1, its X enters every salt.
    pub private_key: SecretKey,
}

impl std::fmt::Debug for ReaderIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReaderIdentity")
            .field("group_id", &hex::encode(self.group_id))
            .field("sub_id", &hex::encode(self.sub_id))
            .field("private_key", &"<redacted>")
            .finish()
    }
}

impl ReaderIdentity {
    /// An identity from the configured group id, sub id and reader group private key.
    pub fn new(group_id: [u8; 16], sub_id: [u8; 16], private_key: SecretKey) -> Self {
        Self {
            group_id,
            sub_id,
            private_key,
        }
    }

    /// Reader identifier as sent in AUTH0 tag 4D: group id || sub id.
    pub fn reader_identifier(&self) -> [u8; 32] {
        let mut id = [0u8; 32];
        id[..16].copy_from_slice(&self.group_id);
        id[16..].copy_from_slice(&self.sub_id);
        id
    }

    /// The reader group public key (uncompressed SEC1), as provisioned into credentials.
    pub fn public_key_sec1(&self) -> [u8; crypto::PUBLIC_KEY_LEN] {
        crypto::public_key_sec1(&self.private_key.public_key())
    }
}

/// Per-transaction protocol parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransactionParams {
    /// Interface byte entering the salts: [`consts::INTERFACE_NFC`] (5E) or BLE (C3).
    pub interface: u8,
    /// AUTH0 tag 42: 01 user-device setting, 02 secure action, 03 force user authentication.
    pub auth_policy: u8,
    /// Protocol version to select (must be offered in the SELECT FCI).
    pub protocol_version: [u8; 2],
}

impl TransactionParams {
    /// NFC, protocol version 1.0, with the given AUTH0 authentication policy (tag 42).
    pub fn nfc(auth_policy: u8) -> Self {
        Self {
            auth_policy,
            ..Self::default()
        }
    }
}

impl Default for TransactionParams {
    fn default() -> Self {
        Self {
            interface: consts::INTERFACE_NFC,
            auth_policy: consts::AUTH_POLICY_USER_DEVICE_SETTING,
            protocol_version: PROTOCOL_VERSION_1_0,
        }
    }
}

/// Injected randomness of one transaction.
pub struct Randomness {
    /// Reader ephemeral key pair (fresh per transaction).
    pub ephemeral: SecretKey,
    /// Transaction identifier (AUTH0 tag 4C).
    pub transaction_id: [u8; 16],
}

impl std::fmt::Debug for Randomness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Randomness")
            .field("ephemeral", &"<redacted>")
            .field("transaction_id", &hex::encode(self.transaction_id))
            .finish()
    }
}

impl Randomness {
    /// Draws a fresh ephemeral key and transaction identifier (for the daemon).
    pub fn generate(rng: &mut impl CryptoRngCore) -> Self {
        let ephemeral = SecretKey::random(rng);
        let mut transaction_id = [0u8; 16];
        rng.fill_bytes(&mut transaction_id);
        Self {
            ephemeral,
            transaction_id,
        }
    }
}

/// A reader certificate for LOAD CERT: the reader signs AUTH1 with a key certified by the
/// reader group key instead of the group key itself.
pub struct ReaderCertificate {
    /// The compressed certificate (profile 0000) issued by the reader group key, sent as is.
    pub certificate: Vec<u8>,
    /// Private key of the certificate subject: signs AUTH1.
    pub subject_key: SecretKey,
    /// Reader group public key: its X enters the salts. This follows aliro-actuator's
    /// endpoint; kormax's reader would put the subject key X there (vectors README,
    /// disagreement 3), which an actuator endpoint cannot decrypt against.
    pub group_public_key: PublicKey,
}

impl std::fmt::Debug for ReaderCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReaderCertificate")
            .field("certificate_len", &self.certificate.len())
            .field("subject_key", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// A Kpersistent the reader stored after an earlier STANDARD transaction with an endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FastCredential {
    /// Endpoint long-term public key, uncompressed SEC1.
    pub endpoint_public_key: [u8; crypto::PUBLIC_KEY_LEN],
    /// The Kpersistent derived in that transaction (Debug-redacted).
    pub k_persistent: SymmetricKey,
}

/// What the reader does when FAST was requested but no stored credential matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FastFallback {
    /// Continue with AUTH1 in the same session (first contact, or Kpersistent lost).
    Standard,
    /// Report failure with CONTROL FLOW {S1 00, S2 00} and stop.
    Abort,
}

/// FAST configuration of one transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FastConfig {
    /// Candidates tried in order against the cryptogram (one HKDF + one AES-GCM each).
    pub credentials: Vec<FastCredential>,
    pub on_no_match: FastFallback,
}

/// An endpoint authenticated in this transaction: by its signature (STANDARD) or by a
/// cryptogram only a holder of the stored Kpersistent can produce (FAST).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthenticatedEndpoint {
    /// Endpoint long-term public key, uncompressed SEC1 (tag 5A): the ACL lookup key.
    pub public_key: [u8; crypto::PUBLIC_KEY_LEN],
    /// Signaling bitmap (tag 5E), if sent.
    pub signaling_bitmap: Option<u16>,
    /// Credential signed timestamp (tag 91, 20-byte tdate), if sent.
    pub credential_timestamp: Option<Vec<u8>>,
    /// Revocation signed timestamp (tag 92), if sent.
    pub revocation_timestamp: Option<Vec<u8>>,
    /// Transaction identifier of this transaction.
    pub transaction_id: [u8; 16],
    /// Kpersistent for a later FAST transaction with this endpoint (Debug-redacted).
    pub k_persistent: SymmetricKey,
    /// True when identified by the FAST cryptogram (no AUTH1 in this transaction).
    pub fast: bool,
}

impl AuthenticatedEndpoint {
    /// The endpoint long-term public key, uncompressed SEC1 (the ACL lookup key).
    pub fn public_key_sec1(&self) -> [u8; crypto::PUBLIC_KEY_LEN] {
        self.public_key
    }
}

/// Decrypted EXCHANGE response: read data blocks and the endpoint status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExchangeResponse {
    pub read_data: Vec<Vec<u8>>,
    pub status: u16,
}

/// How a transaction ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The final EXCHANGE carrying `status` was acknowledged with endpoint status 0000.
    Completed { status: ReaderStatus },
    /// The transaction failed with `error`; `reported` was sent to the endpoint, and
    /// `acknowledged` says whether the endpoint confirmed it.
    Failed {
        error: AliroError,
        reported: ReaderStatus,
        acknowledged: bool,
    },
}

/// What the adapter must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send this C-APDU and feed the R-APDU back to [`ReaderTransaction::on_response`].
    Transmit(Vec<u8>),
    /// Mutual authentication succeeded; decide access, then call
    /// [`ReaderTransaction::complete`] (or [`ReaderTransaction::exchange`] first).
    Authenticated(AuthenticatedEndpoint),
    /// A non-final EXCHANGE was answered; the transaction is back in the authenticated state.
    Exchanged(ExchangeResponse),
    /// The step-up ENVELOPE was answered: the decrypted DeviceResponse (CBOR), to verify with
    /// [`crate::aliro::document::verify_access_document`]. The transaction is authenticated
    /// again; [`ReaderTransaction::complete`] now runs on the step-up channel.
    StepUpResponse(Vec<u8>),
    /// The transaction is over.
    Done(Outcome),
}

enum State {
    Idle,
    AwaitSelect,
    AwaitAuth0 {
        fci_proprietary_tlv: Vec<u8>,
    },
    AwaitLoadCert {
        ctx: Box<TranscriptContext>,
        ikm: SymmetricKey,
        channel: SecureChannel,
        auth1: Vec<u8>,
        step_up_ikm: SymmetricKey,
    },
    AwaitAuth1 {
        ctx: Box<TranscriptContext>,
        ikm: SymmetricKey,
        channel: SecureChannel,
        step_up_ikm: SymmetricKey,
    },
    Authenticated {
        channel: SecureChannel,
        /// Step-up input key material (STANDARD only; FAST derives none).
        step_up_ikm: Option<SymmetricKey>,
    },
    AwaitStepUpSelect {
        step_up: SecureChannel,
        device_request: Vec<u8>,
    },
    AwaitEnvelope {
        step_up: SecureChannel,
    },
    AwaitExchange {
        channel: SecureChannel,
        final_status: Option<ReaderStatus>,
    },
    AwaitReport {
        error: AliroError,
        reported: ReaderStatus,
        channel: Option<SecureChannel>,
    },
    Done,
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::Idle => "idle",
            State::AwaitSelect => "awaiting SELECT response",
            State::AwaitAuth0 { .. } => "awaiting AUTH0 response",
            State::AwaitLoadCert { .. } => "awaiting LOAD CERT response",
            State::AwaitAuth1 { .. } => "awaiting AUTH1 response",
            State::Authenticated { .. } => "authenticated",
            State::AwaitStepUpSelect { .. } => "awaiting step-up SELECT response",
            State::AwaitEnvelope { .. } => "awaiting ENVELOPE response",
            State::AwaitExchange { .. } => "awaiting EXCHANGE response",
            State::AwaitReport { .. } => "awaiting failure-report response",
            State::Done => "done",
        }
    }
}

/// One reader-side Aliro transaction.
///
/// The adapter's loop (the ACL lookup and the transport are the caller's):
///
/// ```no_run
/// use keyway::aliro::{Action, ReaderStatus, ReaderTransaction};
/// # fn transmit(_c: &[u8]) -> Vec<u8> { unimplemented!() }
/// # fn admitted(_key: &[u8; 65]) -> bool { unimplemented!() }
/// # fn run(mut tx: ReaderTransaction) -> Result<(), keyway::aliro::AliroError> {
/// let mut c_apdu = tx.start();
/// let outcome = loop {
///     let r_apdu = transmit(&c_apdu); // bounded by STEP_TIMEOUT in the adapter
///     match tx.on_response(&r_apdu)? {
///         Action::Transmit(next) => c_apdu = next,
///         Action::Authenticated(ep) => {
///             let status = if admitted(&ep.public_key) {
///                 ReaderStatus::StateUnsecured
///             } else {
///                 ReaderStatus::PublicKeyNotFound
///             };
///             c_apdu = tx.complete(status)?;
///         }
///         Action::Exchanged(_) => unreachable!("only after ReaderTransaction::exchange"),
///         Action::Done(outcome) => break outcome,
///     }
/// };
/// # let _ = outcome; Ok(()) }
/// ```
pub struct ReaderTransaction {
    reader_identifier: [u8; 32],
    reader_key_x: [u8; 32],
    signing_key: SecretKey,
    params: TransactionParams,
    rnd: Randomness,
    fast: Option<FastConfig>,
    certificate: Option<ReaderCertificate>,
    state: State,
    /// Data of a response being assembled with GET RESPONSE.
    chained: Vec<u8>,
    chain_rounds: usize,
}

impl std::fmt::Debug for ReaderTransaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReaderTransaction")
            .field("transaction_id", &hex::encode(self.rnd.transaction_id))
            .field("state", &self.state.name())
            .finish_non_exhaustive()
    }
}

fn ok_or_status(step: Step, sw_value: u16) -> Result<(), AliroError> {
    if sw_value == sw::OK {
        Ok(())
    } else {
        Err(AliroError::BadStatus { step, sw: sw_value })
    }
}

fn tlvs_of(step: Step, data: &[u8]) -> Result<Vec<Tlv<'_>>, AliroError> {
    tlv::parse_all(data).map_err(|source| AliroError::MalformedTlv { step, source })
}

fn push(out: &mut Vec<u8>, t: u32, v: &[u8]) {
    // Only fixed, short protocol fields are pushed here, so encoding cannot fail; a
    // failure would drop the field and the peer would reject the command.
    let _ = tlv::push_tlv(out, t, v);
}

impl ReaderTransaction {
    /// Prepares a transaction; nothing is sent until [`ReaderTransaction::start`].
    pub fn new(identity: &ReaderIdentity, params: TransactionParams, rnd: Randomness) -> Self {
        Self {
            reader_identifier: identity.reader_identifier(),
            reader_key_x: crypto::public_key_x(&identity.private_key.public_key()),
            signing_key: identity.private_key.clone(),
            params,
            rnd,
            fast: None,
            certificate: None,
            state: State::Idle,
            chained: Vec::new(),
            chain_rounds: 0,
        }
    }

    /// Requests FAST in AUTH0 and tries `fast.credentials` against the cryptogram.
    pub fn with_fast(mut self, fast: FastConfig) -> Self {
        self.fast = Some(fast);
        self
    }

    /// Sends `cert` with LOAD CERT before AUTH1 and signs AUTH1 with its subject key.
    pub fn with_certificate(mut self, cert: ReaderCertificate) -> Self {
        self.reader_key_x = crypto::public_key_x(&cert.group_public_key);
        self.certificate = Some(cert);
        self
    }

    /// AUTH0 command parameters (tag 41), which also enter every salt.
    fn command_parameters(&self) -> u8 {
        if self.fast.is_some() {
            consts::AUTH0_FAST
        } else {
            AUTH0_STANDARD
        }
    }

    /// The transaction identifier (for events and logs).
    pub fn transaction_id(&self) -> [u8; 16] {
        self.rnd.transaction_id
    }

    /// True once the transaction has ended (successfully or not).
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// The SELECT C-APDU for the expedited AID. Call once: a new tap (or a retry after the
    /// phone left the field) needs a new `ReaderTransaction` with fresh [`Randomness`], so no
    /// ephemeral key or transaction identifier is ever used twice.
    pub fn start(&mut self) -> Vec<u8> {
        self.state = State::AwaitSelect;
        self.chained.clear();
        self.chain_rounds = 0;
        encode_or_empty(
            CommandApdu::new(CLA_ISO, INS_SELECT, SELECT_P1_BY_NAME, SELECT_P2_FIRST)
                .with_data(AID_EXPEDITED.to_vec())
                .with_le(NE_SHORT_MAX),
        )
    }

    /// Feeds one R-APDU (data || SW1 SW2). An `Err` ends the transaction.
    pub fn on_response(&mut self, r_apdu: &[u8]) -> Result<Action, AliroError> {
        let resp = match ResponseApdu::parse(r_apdu) {
            Ok(r) => r,
            Err(_) => {
                self.state = State::Done;
                return Err(AliroError::CardGone { len: r_apdu.len() });
            }
        };
        let result = self.dispatch(resp);
        if result.is_err() {
            self.state = State::Done;
        }
        result
    }

    fn dispatch(&mut self, resp: ResponseApdu<'_>) -> Result<Action, AliroError> {
        // Refuse input when no command is outstanding.
        self.current_step()?;
        // 61xx: more data; fetch it with GET RESPONSE before interpreting anything.
        if resp.sw1() == sw::MORE_DATA_SW1 {
            let len = self.chained.len().saturating_add(resp.data.len());
            self.chain_rounds += 1;
            if len > MAX_RESPONSE_LEN || self.chain_rounds > MAX_GET_RESPONSE_ROUNDS {
                return Err(AliroError::ResponseTooLong { len });
            }
            self.chained.extend_from_slice(resp.data);
            let ne = match resp.sw2() {
                0 => NE_SHORT_MAX,
                n => u32::from(n),
            };
            return Ok(Action::Transmit(encode_or_empty(
                CommandApdu::new(CLA_ISO, INS_GET_RESPONSE, 0, 0).with_le(ne),
            )));
        }
        let data: Vec<u8> = if self.chained.is_empty() {
            resp.data.to_vec()
        } else {
            let mut d = std::mem::take(&mut self.chained);
            d.extend_from_slice(resp.data);
            if d.len() > MAX_RESPONSE_LEN {
                return Err(AliroError::ResponseTooLong { len: d.len() });
            }
            d
        };
        self.chain_rounds = 0;

        let state = std::mem::replace(&mut self.state, State::Done);
        match state {
            State::AwaitSelect => self.on_select(&data, resp.sw),
            State::AwaitAuth0 {
                fci_proprietary_tlv,
            } => self.on_auth0(&data, resp.sw, fci_proprietary_tlv),
            State::AwaitLoadCert {
                ctx,
                ikm,
                channel,
                auth1,
                step_up_ikm,
            } => {
                // An error SW: the endpoint refused the certificate and ended its session.
                ok_or_status(Step::LoadCert, resp.sw)?;
                self.state = State::AwaitAuth1 {
                    ctx,
                    ikm,
                    channel,
                    step_up_ikm,
                };
                Ok(Action::Transmit(auth1))
            }
            State::AwaitAuth1 {
                ctx,
                ikm,
                channel,
                step_up_ikm,
            } => self.on_auth1(&data, resp.sw, &ctx, &ikm, channel, step_up_ikm),
            State::AwaitStepUpSelect {
                step_up,
                device_request,
            } => self.on_step_up_select(&data, resp.sw, step_up, &device_request),
            State::AwaitEnvelope { step_up } => self.on_envelope(&data, resp.sw, step_up),
            State::AwaitExchange {
                channel,
                final_status,
            } => self.on_exchange(&data, resp.sw, channel, final_status),
            State::AwaitReport {
                error,
                reported,
                channel,
            } => {
                let acknowledged = resp.sw == sw::OK
                    && match channel {
                        // EXCHANGE report: the endpoint's answer must decrypt to status 0000.
                        Some(mut ch) => ch
                            .open(&data)
                            .ok()
                            .and_then(|pt| parse_exchange_response(&pt).ok())
                            .is_some_and(|r| r.status == 0),
                        // CONTROL FLOW report: 9000 is the acknowledgement.
                        None => true,
                    };
                Ok(Action::Done(Outcome::Failed {
                    error,
                    reported,
                    acknowledged,
                }))
            }
            other @ (State::Idle | State::Authenticated { .. } | State::Done) => {
                let name = other.name();
                Err(AliroError::UnexpectedState {
                    call: "on_response",
                    state: name,
                })
            }
        }
    }

    fn current_step(&self) -> Result<Step, AliroError> {
        Ok(match &self.state {
            State::AwaitSelect => Step::Select,
            State::AwaitAuth0 { .. } => Step::Auth0,
            State::AwaitLoadCert { .. } => Step::LoadCert,
            State::AwaitAuth1 { .. } => Step::Auth1,
            State::AwaitExchange { .. } => Step::Exchange,
            State::AwaitStepUpSelect { .. } => Step::SelectStepUp,
            State::AwaitEnvelope { .. } => Step::Envelope,
            State::AwaitReport { channel, .. } => {
                if channel.is_some() {
                    Step::Exchange
                } else {
                    Step::ControlFlow
                }
            }
            other => {
                return Err(AliroError::UnexpectedState {
                    call: "on_response",
                    state: other.name(),
                })
            }
        })
    }

    fn on_select(&mut self, data: &[u8], sw_value: u16) -> Result<Action, AliroError> {
        ok_or_status(Step::Select, sw_value)?;
        let a5 = match parse_fci(data) {
            Ok(a5) => a5,
            Err(e) => return Ok(self.report_control_flow(e, CONTROL_FLOW_S2_NONE)),
        };
        if !a5.versions.contains(&self.params.protocol_version) {
            let e = AliroError::UnsupportedVersion {
                wanted: u16::from_be_bytes(self.params.protocol_version),
            };
            return Ok(self.report_control_flow(e, CONTROL_FLOW_S2_VERSION_NOT_SUPPORTED));
        }
        // The A5 TLV enters the salts exactly as received (kormax behaviour; aliro-actuator's
        // endpoint rebuilds it without 7F66 — identical for endpoints that send no 7F66).
        let fci_proprietary_tlv = a5.raw;

        let mut body = Vec::with_capacity(160);
        push(
            &mut body,
            tag::COMMAND_PARAMETERS,
            &[self.command_parameters()],
        );
        push(&mut body, tag::AUTH_POLICY, &[self.params.auth_policy]);
        push(
            &mut body,
            tag::PROTOCOL_VERSIONS,
            &self.params.protocol_version,
        );
        push(
            &mut body,
            tag::READER_EPHEMERAL,
            &crypto::public_key_sec1(&self.rnd.ephemeral.public_key()),
        );
        push(&mut body, tag::TRANSACTION_ID, &self.rnd.transaction_id);
        push(&mut body, tag::READER_ID, &self.reader_identifier);
        let cmd = CommandApdu::new(CLA_PROPRIETARY, INS_AUTH0, 0, 0)
            .with_data(body)
            .with_le(NE_SHORT_MAX)
            .encode()?;
        self.state = State::AwaitAuth0 {
            fci_proprietary_tlv,
        };
        Ok(Action::Transmit(cmd))
    }

    fn on_auth0(
        &mut self,
        data: &[u8],
        sw_value: u16,
        fci_proprietary_tlv: Vec<u8>,
    ) -> Result<Action, AliroError> {
        ok_or_status(Step::Auth0, sw_value)?;
        let (endpoint_ephemeral, cryptogram) = match parse_auth0_response(data) {
            Ok(k) => k,
            Err(e) => return Ok(self.report_control_flow(e, CONTROL_FLOW_S2_NONE)),
        };
        let ctx = TranscriptContext {
            reader_key_x: self.reader_key_x,
            reader_identifier: self.reader_identifier,
            interface: self.params.interface,
            protocol_version: self.params.protocol_version,
            reader_ephemeral_x: crypto::public_key_x(&self.rnd.ephemeral.public_key()),
            endpoint_ephemeral_x: crypto::public_key_x(&endpoint_ephemeral),
            transaction_id: self.rnd.transaction_id,
            command_parameters: self.command_parameters(),
            auth_policy: self.params.auth_policy,
            fci_proprietary_tlv,
            vendor_extension: Vec::new(),
        };
        let crypto_err = |source| AliroError::Crypto {
            step: Step::Auth0,
            source,
        };
        if let Some(fast) = &self.fast {
            match try_fast(fast, &ctx, cryptogram.as_deref()) {
                Ok(Some((channel, endpoint))) => {
                    self.state = State::Authenticated {
                        channel,
                        step_up_ikm: None,
                    };
                    return Ok(Action::Authenticated(endpoint));
                }
                Ok(None) if fast.on_no_match == FastFallback::Abort => {
                    return Ok(
                        self.report_control_flow(AliroError::FastNoMatch, CONTROL_FLOW_S2_NONE)
                    );
                }
                Ok(None) => {}
                Err(source) => {
                    return Err(AliroError::Crypto {
                        step: Step::Auth0,
                        source,
                    })
                }
            }
        }
        let ikm = keys::transaction_ikm(
            &self.rnd.ephemeral,
            &endpoint_ephemeral,
            &self.rnd.transaction_id,
        )
        .map_err(crypto_err)?;
        let session = keys::derive_volatile(&ikm, &ctx).map_err(crypto_err)?;
        let channel = SecureChannel::new(
            Role::Reader,
            session.exchange_sk_reader.clone(),
            session.exchange_sk_device.clone(),
        );
        let signing_key = match &self.certificate {
            Some(cert) => &cert.subject_key,
            None => &self.signing_key,
        };
        let signature = crypto::sign(signing_key, &ctx.signature_preimage(Signer::Reader));
        let mut body = Vec::with_capacity(70);
        push(
            &mut body,
            tag::COMMAND_PARAMETERS,
            &[AUTH1_REQUEST_PUBLIC_KEY],
        );
        push(&mut body, tag::SIGNATURE, &signature);
        let cmd = CommandApdu::new(CLA_PROPRIETARY, INS_AUTH1, 0, 0)
            .with_data(body)
            .with_le(NE_SHORT_MAX)
            .encode()?;
        if let Some(cert) = &self.certificate {
            let load_cert = CommandApdu::new(CLA_PROPRIETARY, consts::INS_LOAD_CERT, 0, 0)
                .with_data(cert.certificate.clone())
                .with_le(NE_SHORT_MAX)
                .encode()?;
            self.state = State::AwaitLoadCert {
                ctx: Box::new(ctx),
                ikm,
                channel,
                auth1: cmd,
                step_up_ikm: session.step_up_ikm.clone(),
            };
            return Ok(Action::Transmit(load_cert));
        }
        self.state = State::AwaitAuth1 {
            ctx: Box::new(ctx),
            ikm,
            channel,
            step_up_ikm: session.step_up_ikm.clone(),
        };
        Ok(Action::Transmit(cmd))
    }

    fn on_auth1(
        &mut self,
        data: &[u8],
        sw_value: u16,
        ctx: &TranscriptContext,
        ikm: &SymmetricKey,
        mut channel: SecureChannel,
        step_up_ikm: SymmetricKey,
    ) -> Result<Action, AliroError> {
        // An error SW means the endpoint rejected us and dropped its keys: nothing to report to.
        ok_or_status(Step::Auth1, sw_value)?;
        let plaintext = match channel.open(data) {
            Ok(p) => p,
            Err(source) => {
                let e = AliroError::Crypto {
                    step: Step::Auth1,
                    source,
                };
                return self.report_exchange(channel, e, ReaderStatus::InvalidDataContent);
            }
        };
        let parsed = match parse_auth1_plaintext(&plaintext) {
            Ok(p) => p,
            Err((e, status)) => return self.report_exchange(channel, e, status),
        };
        let preimage = ctx.signature_preimage(Signer::Device);
        if crypto::verify(&parsed.public_key, &preimage, &parsed.signature).is_err() {
            // See the module comment: 0001, not 0004.
            return self.report_exchange(
                channel,
                AliroError::SignatureInvalid,
                ReaderStatus::PublicKeyNotFound,
            );
        }
        let endpoint_x = crypto::public_key_x(&parsed.public_key);
        let k_persistent = keys::derive_persistent(ikm, ctx, &endpoint_x).map_err(|source| {
            AliroError::Crypto {
                step: Step::Auth1,
                source,
            }
        })?;
        self.state = State::Authenticated {
            channel,
            step_up_ikm: Some(step_up_ikm),
        };
        Ok(Action::Authenticated(AuthenticatedEndpoint {
            public_key: crypto::public_key_sec1(&parsed.public_key),
            signaling_bitmap: parsed.signaling_bitmap,
            credential_timestamp: parsed.credential_timestamp,
            revocation_timestamp: parsed.revocation_timestamp,
            transaction_id: self.rnd.transaction_id,
            k_persistent,
            fast: false,
        }))
    }

    fn on_exchange(
        &mut self,
        data: &[u8],
        sw_value: u16,
        mut channel: SecureChannel,
        final_status: Option<ReaderStatus>,
    ) -> Result<Action, AliroError> {
        ok_or_status(Step::Exchange, sw_value)?;
        let plaintext = channel.open(data).map_err(|source| AliroError::Crypto {
            step: Step::Exchange,
            source,
        })?;
        let response = parse_exchange_response(&plaintext)?;
        match final_status {
            Some(status) => {
                if response.status != 0 {
                    return Err(AliroError::EndpointStatus {
                        status: response.status,
                    });
                }
                self.state = State::Done;
                Ok(Action::Done(Outcome::Completed { status }))
            }
            None => {
                // The step-up material is consumed by a step-up before any EXCHANGE on it;
                // after a plain EXCHANGE no step-up follows.
                self.state = State::Authenticated {
                    channel,
                    step_up_ikm: None,
                };
                Ok(Action::Exchanged(response))
            }
        }
    }

    /// Sends a failure report in CONTROL FLOW (no secure channel): S1 = 00 (failure), no Le.
    fn report_control_flow(&mut self, error: AliroError, s2: u8) -> Action {
        let mut body = Vec::with_capacity(6);
        push(
            &mut body,
            tag::COMMAND_PARAMETERS,
            &[CONTROL_FLOW_S1_FAILURE],
        );
        push(&mut body, tag::AUTH_POLICY, &[s2]);
        let cmd = encode_or_empty(
            CommandApdu::new(CLA_PROPRIETARY, INS_CONTROL_FLOW, 0, 0).with_data(body),
        );
        self.state = State::AwaitReport {
            error,
            reported: ReaderStatus::from_code(u16::from(s2)),
            channel: None,
        };
        Action::Transmit(cmd)
    }

    /// Sends a failure report as an encrypted EXCHANGE {97 status}.
    fn report_exchange(
        &mut self,
        mut channel: SecureChannel,
        error: AliroError,
        status: ReaderStatus,
    ) -> Result<Action, AliroError> {
        let cmd = exchange_apdu(&mut channel, &status_tlv(status))?;
        self.state = State::AwaitReport {
            error,
            reported: status,
            channel: Some(channel),
        };
        Ok(Action::Transmit(cmd))
    }

    /// Ends an authenticated transaction: encrypted EXCHANGE {97 `status`}. Use a reader-state
    /// code (e.g. [`ReaderStatus::StateUnsecured`]) to grant, or e.g.
    /// [`ReaderStatus::PublicKeyNotFound`] for an endpoint not in the ACL.
    pub fn complete(&mut self, status: ReaderStatus) -> Result<Vec<u8>, AliroError> {
        self.send_exchange("complete", &status_tlv(status), Some(status))
    }

    /// Sends a non-final encrypted EXCHANGE with caller-built TLVs (e.g. `98 00`, mailbox);
    /// the answer comes back as [`Action::Exchanged`].
    pub fn exchange(&mut self, payload: &[u8]) -> Result<Vec<u8>, AliroError> {
        self.send_exchange("exchange", payload, None)
    }

    /// Starts the step-up phase after a STANDARD authentication: SELECT the step-up
    /// application, then ENVELOPE `device_request` (an mdoc DeviceRequest, e.g. from
    /// [`crate::aliro::document::device_request`]) under the step-up keys. The answer comes
    /// back as [`Action::StepUpResponse`]. Not available after FAST (it derives no step-up
    /// keys) or after an EXCHANGE.
    pub fn step_up(&mut self, device_request: &[u8]) -> Result<Vec<u8>, AliroError> {
        match std::mem::replace(&mut self.state, State::Done) {
            State::Authenticated {
                step_up_ikm: Some(ikm),
                ..
            } => {
                let (sk_reader, sk_device) =
                    keys::derive_step_up(&ikm).map_err(|source| AliroError::Crypto {
                        step: Step::SelectStepUp,
                        source,
                    })?;
                let cmd = CommandApdu::new(CLA_ISO, INS_SELECT, SELECT_P1_BY_NAME, SELECT_P2_FIRST)
                    .with_data(consts::AID_STEP_UP.to_vec())
                    .with_le(NE_SHORT_MAX)
                    .encode()?;
                self.state = State::AwaitStepUpSelect {
                    step_up: SecureChannel::new(Role::Reader, sk_reader, sk_device),
                    device_request: device_request.to_vec(),
                };
                Ok(cmd)
            }
            other => {
                let state = other.name();
                self.state = other;
                Err(AliroError::UnexpectedState {
                    call: "step_up",
                    state,
                })
            }
        }
    }

    fn on_step_up_select(
        &mut self,
        data: &[u8],
        sw_value: u16,
        mut step_up: SecureChannel,
        device_request: &[u8],
    ) -> Result<Action, AliroError> {
        ok_or_status(Step::SelectStepUp, sw_value)?;
        check_step_up_fci(data)?;
        let ct = step_up
            .seal(device_request)
            .map_err(|source| AliroError::Crypto {
                step: Step::Envelope,
                source,
            })?;
        let body = crate::aliro::document::session_data(&ct).map_err(|_| {
            AliroError::MalformedResponse {
                step: Step::Envelope,
                detail: "DeviceRequest too large for one ENVELOPE",
            }
        })?;
        let mut data = Vec::with_capacity(body.len() + 4);
        tlv::push_tlv(&mut data, tag::SESSION_DATA, &body).map_err(|source| {
            AliroError::MalformedTlv {
                step: Step::Envelope,
                source,
            }
        })?;
        let cmd = CommandApdu::new(CLA_ISO, consts::INS_ENVELOPE, 0, 0)
            .with_data(data)
            .with_le(NE_SHORT_MAX)
            .encode()?;
        self.state = State::AwaitEnvelope { step_up };
        Ok(Action::Transmit(cmd))
    }

    fn on_envelope(
        &mut self,
        data: &[u8],
        sw_value: u16,
        mut step_up: SecureChannel,
    ) -> Result<Action, AliroError> {
        let step = Step::Envelope;
        ok_or_status(step, sw_value)?;
        let items = tlvs_of(step, data)?;
        let body = tlv::find(&items, tag::SESSION_DATA).ok_or(AliroError::MalformedResponse {
            step,
            detail: "no session data (53)",
        })?;
        let ct = crate::aliro::document::session_data_payload(body.value).map_err(|_| {
            AliroError::MalformedResponse {
                step,
                detail: "session data is not CBOR {\"data\": bstr}",
            }
        })?;
        let device_response = step_up
            .open(&ct)
            .map_err(|source| AliroError::Crypto { step, source })?;
        self.state = State::Authenticated {
            channel: step_up,
            step_up_ikm: None,
        };
        Ok(Action::StepUpResponse(device_response))
    }

    fn send_exchange(
        &mut self,
        call: &'static str,
        payload: &[u8],
        final_status: Option<ReaderStatus>,
    ) -> Result<Vec<u8>, AliroError> {
        match std::mem::replace(&mut self.state, State::Done) {
            State::Authenticated { mut channel, .. } => {
                let cmd = exchange_apdu(&mut channel, payload)?;
                self.state = State::AwaitExchange {
                    channel,
                    final_status,
                };
                Ok(cmd)
            }
            other => {
                let state = other.name();
                self.state = other;
                Err(AliroError::UnexpectedState { call, state })
            }
        }
    }
}

fn encode_or_empty(cmd: CommandApdu) -> Vec<u8> {
    // Only used for commands with fixed, short bodies that always encode.
    cmd.encode().unwrap_or_default()
}

fn status_tlv(status: ReaderStatus) -> Vec<u8> {
    let mut out = Vec::with_capacity(4);
    push(&mut out, tag::READER_STATUS, &status.code().to_be_bytes());
    out
}

fn exchange_apdu(channel: &mut SecureChannel, payload: &[u8]) -> Result<Vec<u8>, AliroError> {
    let ct = channel.seal(payload).map_err(|source| AliroError::Crypto {
        step: Step::Exchange,
        source,
    })?;
    Ok(CommandApdu::new(CLA_PROPRIETARY, INS_EXCHANGE, 0, 0)
        .with_data(ct)
        .with_le(NE_SHORT_MAX)
        .encode()?)
}

/// The parts of the SELECT FCI the reader needs.
struct Fci {
    /// The A5 TLV as received (tag, length, value).
    raw: Vec<u8>,
    versions: Vec<[u8; 2]>,
}

fn parse_fci(data: &[u8]) -> Result<Fci, AliroError> {
    let step = Step::Select;
    let bad = |detail| AliroError::MalformedResponse { step, detail };
    let top = tlvs_of(step, data)?;
    let fci = tlv::find(&top, tag::FCI).ok_or(bad("no FCI template (6F)"))?;
    let inner = fci
        .children()
        .map_err(|source| AliroError::MalformedTlv { step, source })?;
    if let Some(aid) = tlv::find(&inner, tag::DF_NAME) {
        if aid.value != AID_EXPEDITED {
            return Err(bad("FCI names another application"));
        }
    }
    let a5 = tlv::find(&inner, tag::FCI_PROPRIETARY).ok_or(bad("no proprietary template (A5)"))?;
    let a5_items = a5
        .children()
        .map_err(|source| AliroError::MalformedTlv { step, source })?;
    let versions = tlv::find(&a5_items, tag::PROTOCOL_VERSIONS)
        .ok_or(bad("no supported versions (5C)"))?
        .value;
    if versions.is_empty() || versions.len() % 2 != 0 {
        return Err(bad("supported versions (5C) not a list of 2-byte versions"));
    }
    Ok(Fci {
        raw: a5.raw.to_vec(),
        versions: versions
            .chunks_exact(2)
            .filter_map(|c| <[u8; 2]>::try_from(c).ok())
            .collect(),
    })
}

/// The step-up SELECT answer must be an FCI naming the step-up application (if it names one).
fn check_step_up_fci(data: &[u8]) -> Result<(), AliroError> {
    let step = Step::SelectStepUp;
    let top = tlvs_of(step, data)?;
    let fci = tlv::find(&top, tag::FCI).ok_or(AliroError::MalformedResponse {
        step,
        detail: "no FCI template (6F)",
    })?;
    let inner = fci
        .children()
        .map_err(|source| AliroError::MalformedTlv { step, source })?;
    match tlv::find(&inner, tag::DF_NAME) {
        Some(aid) if aid.value != consts::AID_STEP_UP => Err(AliroError::MalformedResponse {
            step,
            detail: "FCI names another application",
        }),
        _ => Ok(()),
    }
}

/// Endpoint ephemeral key (86) and, if present, the FAST cryptogram (9D).
fn parse_auth0_response(data: &[u8]) -> Result<(PublicKey, Option<Vec<u8>>), AliroError> {
    let step = Step::Auth0;
    let items = tlvs_of(step, data)?;
    let key = tlv::find(&items, tag::ENDPOINT_EPHEMERAL).ok_or(AliroError::MalformedResponse {
        step,
        detail: "no endpoint ephemeral key (86)",
    })?;
    let key = crypto::public_key_from_sec1(key.value)
        .map_err(|source| AliroError::Crypto { step, source })?;
    let cryptogram = tlv::find(&items, tag::CRYPTOGRAM).map(|t| t.value.to_vec());
    Ok((key, cryptogram))
}

/// Length of the FAST cryptogram: 48 bytes of TLVs + 16-byte tag.
const CRYPTOGRAM_LEN: usize = 64;

/// Tries every stored credential against the cryptogram. `Ok(None)`: no match (including a
/// missing or wrongly sized cryptogram, which is what a phone without Kpersistent may send).
fn try_fast(
    fast: &FastConfig,
    ctx: &TranscriptContext,
    cryptogram: Option<&[u8]>,
) -> Result<Option<(SecureChannel, AuthenticatedEndpoint)>, CryptoError> {
    let Some(cryptogram) = cryptogram.filter(|c| c.len() == CRYPTOGRAM_LEN) else {
        return Ok(None);
    };
    for cred in &fast.credentials {
        let Ok(endpoint_key) = crypto::public_key_from_sec1(&cred.endpoint_public_key) else {
            continue;
        };
        let endpoint_x = crypto::public_key_x(&endpoint_key);
        let keys = keys::derive_fast(&cred.k_persistent, ctx, &endpoint_x)?;
        // The cryptogram key is used once per transaction, hence the fixed zero IV.
        let Ok(plaintext) = crypto::gcm_open(&keys.cryptogram_sk, &[0u8; 12], &[], cryptogram)
        else {
            continue;
        };
        let items = tlv::parse_all(&plaintext).unwrap_or_default();
        let signaling_bitmap =
            tlv::find(&items, tag::SIGNALING_BITMAP).and_then(|t| match t.value {
                [a, b] => Some(u16::from_be_bytes([*a, *b])),
                _ => None,
            });
        let channel = SecureChannel::new(
            Role::Reader,
            keys.exchange_sk_reader.clone(),
            keys.exchange_sk_device.clone(),
        );
        return Ok(Some((
            channel,
            AuthenticatedEndpoint {
                public_key: cred.endpoint_public_key,
                signaling_bitmap,
                credential_timestamp: tlv::find(&items, tag::CREDENTIAL_TIMESTAMP)
                    .map(|t| t.value.to_vec()),
                revocation_timestamp: tlv::find(&items, tag::REVOCATION_TIMESTAMP)
                    .map(|t| t.value.to_vec()),
                transaction_id: ctx.transaction_id,
                k_persistent: cred.k_persistent.clone(),
                fast: true,
            },
        )));
    }
    Ok(None)
}

struct Auth1Plaintext {
    public_key: PublicKey,
    signature: Vec<u8>,
    signaling_bitmap: Option<u16>,
    credential_timestamp: Option<Vec<u8>>,
    revocation_timestamp: Option<Vec<u8>>,
}

/// Parses the decrypted AUTH1 response; on failure also returns the status to report.
fn parse_auth1_plaintext(pt: &[u8]) -> Result<Auth1Plaintext, (AliroError, ReaderStatus)> {
    let step = Step::Auth1;
    let items = tlv::parse_all(pt).map_err(|source| {
        (
            AliroError::MalformedTlv { step, source },
            ReaderStatus::InvalidDataFormat,
        )
    })?;
    let malformed = |detail, status| (AliroError::MalformedResponse { step, detail }, status);
    let key = tlv::find(&items, tag::ENDPOINT_PUBLIC_KEY).ok_or(malformed(
        "no endpoint public key (5A)",
        ReaderStatus::NoPublicKeyInResponse,
    ))?;
    let public_key = crypto::public_key_from_sec1(key.value).map_err(|source| {
        (
            AliroError::Crypto { step, source },
            ReaderStatus::InvalidDataFormat,
        )
    })?;
    let signature = tlv::find(&items, tag::SIGNATURE)
        .ok_or(malformed(
            "no endpoint signature (9E)",
            ReaderStatus::NoSignaturePresent,
        ))?
        .value
        .to_vec();
    let signaling_bitmap = match tlv::find(&items, tag::SIGNALING_BITMAP) {
        None => None,
        Some(t) => match t.value {
            [a, b] => Some(u16::from_be_bytes([*a, *b])),
            _ => {
                return Err(malformed(
                    "signaling bitmap (5E) not 2 bytes",
                    ReaderStatus::InvalidDataFormat,
                ))
            }
        },
    };
    Ok(Auth1Plaintext {
        public_key,
        signature,
        signaling_bitmap,
        credential_timestamp: tlv::find(&items, tag::CREDENTIAL_TIMESTAMP)
            .map(|t| t.value.to_vec()),
        revocation_timestamp: tlv::find(&items, tag::REVOCATION_TIMESTAMP)
            .map(|t| t.value.to_vec()),
    })
}

/// Parses `[2-byte length || data]* || 00 02 || status` (the last block is the status).
fn parse_exchange_response(pt: &[u8]) -> Result<ExchangeResponse, AliroError> {
    let bad = |detail| AliroError::MalformedResponse {
        step: Step::Exchange,
        detail,
    };
    let mut blocks: Vec<&[u8]> = Vec::new();
    let mut rest = pt;
    while !rest.is_empty() {
        let (len_bytes, tail) = rest
            .split_first_chunk::<2>()
            .ok_or(bad("truncated block length"))?;
        let len = usize::from(u16::from_be_bytes(*len_bytes));
        if tail.len() < len {
            return Err(bad("truncated block"));
        }
        let (block, tail) = tail.split_at(len);
        blocks.push(block);
        rest = tail;
    }
    let status = match blocks.pop() {
        Some([a, b]) => u16::from_be_bytes([*a, *b]),
        _ => return Err(bad("no 2-byte status block")),
    };
    Ok(ExchangeResponse {
        read_data: blocks.into_iter().map(<[u8]>::to_vec).collect(),
        status,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> ReaderIdentity {
        ReaderIdentity {
            group_id: [0x11; 16],
            sub_id: [0x22; 16],
            private_key: crypto::secret_key_from_bytes(&[0x33; 32]).unwrap(),
        }
    }

    fn rnd() -> Randomness {
        Randomness {
            ephemeral: crypto::secret_key_from_bytes(&[0x44; 32]).unwrap(),
            transaction_id: [0x55; 16],
        }
    }

    fn fci(versions: &[u8]) -> Vec<u8> {
        let mut a5 = Vec::new();
        tlv::push_tlv(&mut a5, 0x80, &[0, 0]).unwrap();
        tlv::push_tlv(&mut a5, 0x5C, versions).unwrap();
        let mut inner = Vec::new();
        tlv::push_tlv(&mut inner, 0x84, &AID_EXPEDITED).unwrap();
        tlv::push_tlv(&mut inner, 0xA5, &a5).unwrap();
        let mut out = tlv::encode(0x6F, &inner).unwrap();
        out.extend_from_slice(&[0x90, 0x00]);
        out
    }

    fn tx() -> ReaderTransaction {
        ReaderTransaction::new(&identity(), TransactionParams::default(), rnd())
    }

    #[test]
    fn select_then_auth0_shape() {
        let mut t = tx();
        let sel = t.start();
        assert_eq!(&sel[..5], &[0x00, 0xA4, 0x04, 0x00, 0x09]);
        assert_eq!(&sel[5..14], &AID_EXPEDITED);
        assert_eq!(sel[14], 0x00);
        let Action::Transmit(auth0) = t.on_response(&fci(&[1, 0, 2, 0])).unwrap() else {
            panic!("expected AUTH0");
        };
        let cmd = CommandApdu::parse(&auth0).unwrap();
        assert_eq!((cmd.cla, cmd.ins), (0x80, 0x80));
        assert_eq!(cmd.le, Some(256));
        let items = tlv::parse_all(&cmd.data).unwrap();
        let tags: Vec<u32> = items.iter().map(|t| t.tag).collect();
        assert_eq!(tags, vec![0x41, 0x42, 0x5C, 0x87, 0x4C, 0x4D]);
        assert_eq!(items[3].value.len(), 65);
        assert_eq!(items[4].value, &[0x55; 16]);
        assert_eq!(&items[5].value[..16], &[0x11; 16]);
    }

    #[test]
    fn fci_with_extended_length_info_enters_salt_as_received() {
        // A phone-style FCI with 7F66 and a vendor TLV: accepted, and the whole A5 TLV is what
        // AUTH0 processing keeps (checked through the salt the endpoint would compute).
        let mut a5 = Vec::new();
        tlv::push_tlv(&mut a5, 0x80, &[0, 0]).unwrap();
        tlv::push_tlv(&mut a5, 0x5C, &[1, 0]).unwrap();
        tlv::push_tlv(
            &mut a5,
            0x7F66,
            &[0x02, 0x02, 0x04, 0x00, 0x02, 0x02, 0x04, 0x00],
        )
        .unwrap();
        let mut inner = Vec::new();
        tlv::push_tlv(&mut inner, 0x84, &AID_EXPEDITED).unwrap();
        tlv::push_tlv(&mut inner, 0xA5, &a5).unwrap();
        let mut r = tlv::encode(0x6F, &inner).unwrap();
        r.extend_from_slice(&[0x90, 0x00]);
        let mut t = tx();
        t.start();
        assert!(matches!(t.on_response(&r), Ok(Action::Transmit(_))));
        match &t.state {
            State::AwaitAuth0 {
                fci_proprietary_tlv,
            } => assert_eq!(fci_proprietary_tlv, &tlv::encode(0xA5, &a5).unwrap()),
            _ => panic!("expected AUTH0 state"),
        }
    }

    #[test]
    fn fci_naming_another_application_is_refused() {
        let mut r = fci(&[1, 0]);
        // The AID sits right after 6F len 84 len.
        r[4 + AID_EXPEDITED.len() - 1] ^= 0x07;
        let mut t = tx();
        t.start();
        assert!(matches!(
            t.on_response(&r),
            Ok(Action::Transmit(cf)) if cf[1] == 0x3C
        ));
    }

    #[test]
    fn generated_randomness_is_fresh() {
        let a = Randomness::generate(&mut rand_core::OsRng);
        let b = Randomness::generate(&mut rand_core::OsRng);
        assert_ne!(a.transaction_id, b.transaction_id);
        assert_ne!(a.ephemeral.to_bytes(), b.ephemeral.to_bytes());
    }

    #[test]
    fn error_codes_are_distinct() {
        let errors = [
            AliroError::CardGone { len: 0 },
            AliroError::BadStatus {
                step: Step::Auth0,
                sw: 0x6701,
            },
            AliroError::MalformedResponse {
                step: Step::Select,
                detail: "x",
            },
            AliroError::UnsupportedVersion { wanted: 0x0100 },
            AliroError::Crypto {
                step: Step::Auth1,
                source: CryptoError::Decrypt,
            },
            AliroError::SignatureInvalid,
            AliroError::UnexpectedState {
                call: "c",
                state: "s",
            },
            AliroError::ResponseTooLong { len: 1 },
            AliroError::EndpointStatus { status: 1 },
            AliroError::FastNoMatch,
            AliroError::Apdu(ApduError::BadLe { ne: 0 }),
        ];
        let mut codes: Vec<&str> = errors.iter().map(AliroError::code).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), errors.len());
        // Messages carry the status word for diagnosis.
        assert!(errors[1].to_string().contains("6701"));
    }

    #[test]
    fn constructors_match_fields() {
        let id = ReaderIdentity::new([1; 16], [2; 16], identity().private_key);
        assert_eq!(&id.reader_identifier()[..16], &[1; 16]);
        assert_eq!(&id.reader_identifier()[16..], &[2; 16]);
        let p = TransactionParams::nfc(consts::AUTH_POLICY_FORCE_USER_AUTH);
        assert_eq!(p.auth_policy, 0x03);
        assert_eq!(p.interface, 0x5E);
        assert_eq!(p.protocol_version, [1, 0]);
    }

    #[test]
    fn short_response_is_card_gone() {
        let mut t = tx();
        t.start();
        assert_eq!(t.on_response(&[0x90]), Err(AliroError::CardGone { len: 1 }));
        assert!(t.is_done());
        let mut t = tx();
        t.start();
        assert_eq!(t.on_response(&[]), Err(AliroError::CardGone { len: 0 }));
    }

    #[test]
    fn error_status_word_ends_transaction() {
        let mut t = tx();
        t.start();
        assert_eq!(
            t.on_response(&[0x6A, 0x82]),
            Err(AliroError::BadStatus {
                step: Step::Select,
                sw: 0x6A82
            })
        );
        // Further input is refused rather than misinterpreted.
        assert!(matches!(
            t.on_response(&[0x90, 0x00]),
            Err(AliroError::UnexpectedState { .. })
        ));
    }

    #[test]
    fn unsupported_version_sends_control_flow_without_le() {
        let mut t = tx();
        t.start();
        let Action::Transmit(cf) = t.on_response(&fci(&[2, 0])).unwrap() else {
            panic!("expected CONTROL FLOW");
        };
        assert_eq!(cf, vec![0x80, 0x3C, 0, 0, 6, 0x41, 1, 0x00, 0x42, 1, 0x27]);
        match t.on_response(&[0x90, 0x00]).unwrap() {
            Action::Done(Outcome::Failed {
                error,
                reported,
                acknowledged,
            }) => {
                assert_eq!(error, AliroError::UnsupportedVersion { wanted: 0x0100 });
                assert_eq!(reported, ReaderStatus::ProtocolVersionNotSupported);
                assert!(acknowledged);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn malformed_fci_is_reported_not_panicking() {
        for bad in [
            vec![0x6F, 0x05, 0x84, 0x01, 0x00, 0x90, 0x00],
            vec![0x6F, 0x90, 0x00],
            vec![0x90, 0x00],
            vec![0x6F, 0x03, 0xA5, 0x01, 0x5C, 0x90, 0x00],
        ] {
            let mut t = tx();
            t.start();
            let r = t.on_response(&bad);
            match r {
                Err(AliroError::MalformedTlv { .. })
                | Err(AliroError::MalformedResponse { .. }) => {}
                Ok(Action::Transmit(cf)) => assert_eq!(&cf[..2], &[0x80, 0x3C]),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn get_response_chaining_reassembles() {
        let full = fci(&[1, 0]);
        let body = &full[..full.len() - 2];
        let (a, b) = body.split_at(10);
        let mut t = tx();
        t.start();
        let mut first = a.to_vec();
        first.extend_from_slice(&[0x61, b.len() as u8]);
        let Action::Transmit(gr) = t.on_response(&first).unwrap() else {
            panic!("expected GET RESPONSE");
        };
        assert_eq!(gr, vec![0x00, 0xC0, 0, 0, b.len() as u8]);
        let mut second = b.to_vec();
        second.extend_from_slice(&[0x90, 0x00]);
        let Action::Transmit(auth0) = t.on_response(&second).unwrap() else {
            panic!("expected AUTH0");
        };
        assert_eq!(auth0[1], 0x80);
    }

    #[test]
    fn endless_chaining_is_bounded() {
        let mut t = tx();
        t.start();
        let mut last = Ok(Action::Transmit(vec![]));
        for _ in 0..100 {
            last = t.on_response(&[0x61, 0x00]);
            if last.is_err() {
                break;
            }
        }
        assert!(matches!(last, Err(AliroError::ResponseTooLong { .. })));
    }

    #[test]
    fn complete_before_authentication_is_refused() {
        let mut t = tx();
        assert!(matches!(
            t.complete(ReaderStatus::StateUnsecured),
            Err(AliroError::UnexpectedState { .. })
        ));
        t.start();
        assert!(matches!(
            t.complete(ReaderStatus::StateUnsecured),
            Err(AliroError::UnexpectedState { .. })
        ));
        // The refused call left the transaction usable.
        assert!(t.on_response(&fci(&[1, 0])).is_ok());
    }

    #[test]
    fn auth0_response_without_key_is_reported() {
        let mut t = tx();
        t.start();
        t.on_response(&fci(&[1, 0])).unwrap();
        let Action::Transmit(cf) = t.on_response(&[0x9D, 0x01, 0x00, 0x90, 0x00]).unwrap() else {
            panic!("expected CONTROL FLOW");
        };
        assert_eq!(cf, vec![0x80, 0x3C, 0, 0, 6, 0x41, 1, 0x00, 0x42, 1, 0x00]);
        // An invalid curve point is rejected too.
        let mut t = tx();
        t.start();
        t.on_response(&fci(&[1, 0])).unwrap();
        let mut r = tlv::encode(0x86, &[0x04; 65]).unwrap();
        r.extend_from_slice(&[0x90, 0x00]);
        assert!(matches!(t.on_response(&r), Ok(Action::Transmit(_))));
    }

    #[test]
    fn auth1_garbage_triggers_invalid_data_content_report() {
        let ep_eph = crypto::secret_key_from_bytes(&[0x66; 32]).unwrap();
        let mut t = tx();
        t.start();
        t.on_response(&fci(&[1, 0])).unwrap();
        let mut r = tlv::encode(0x86, &crypto::public_key_sec1(&ep_eph.public_key())).unwrap();
        r.extend_from_slice(&[0x90, 0x00]);
        let Action::Transmit(auth1) = t.on_response(&r).unwrap() else {
            panic!("expected AUTH1");
        };
        assert_eq!(&auth1[..8], &[0x80, 0x81, 0, 0, 0x45, 0x41, 0x01, 0x01]);
        let Action::Transmit(report) = t
            .on_response(&[[0xAA; 40].as_slice(), &[0x90, 0x00]].concat())
            .unwrap()
        else {
            panic!("expected EXCHANGE report");
        };
        assert_eq!(&report[..2], &[0x80, 0xC9]);
        // Endpoint answers something undecryptable: still a failure outcome, not acknowledged.
        match t.on_response(&[1, 2, 3, 0x90, 0x00]).unwrap() {
            Action::Done(Outcome::Failed {
                error,
                reported,
                acknowledged,
            }) => {
                assert!(matches!(
                    error,
                    AliroError::Crypto {
                        step: Step::Auth1,
                        ..
                    }
                ));
                assert_eq!(reported, ReaderStatus::InvalidDataContent);
                assert!(!acknowledged);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn exchange_response_parsing() {
        assert_eq!(
            parse_exchange_response(&[0, 2, 0, 0]).unwrap(),
            ExchangeResponse {
                read_data: vec![],
                status: 0
            }
        );
        let r = parse_exchange_response(&[0, 1, 0xAB, 0, 2, 0x12, 0x34]).unwrap();
        assert_eq!(r.read_data, vec![vec![0xAB]]);
        assert_eq!(r.status, 0x1234);
        assert!(parse_exchange_response(&[]).is_err());
        assert!(parse_exchange_response(&[0, 3, 0, 0]).is_err());
        assert!(parse_exchange_response(&[0]).is_err());
        assert!(parse_exchange_response(&[0, 1, 0]).is_err());
    }

    /// Tiny deterministic generator for the robustness test (no RNG dependency in tests).
    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn bytes(&mut self, max: usize) -> Vec<u8> {
            let n = (self.next() as usize) % (max + 1);
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    /// Random R-APDUs in every reachable state never panic, and every error ends the
    /// transaction (no further input accepted).
    #[test]
    fn random_responses_never_panic() {
        let ep_eph = crypto::secret_key_from_bytes(&[0x66; 32]).unwrap();
        let mut auth0_ok =
            tlv::encode(0x86, &crypto::public_key_sec1(&ep_eph.public_key())).unwrap();
        auth0_ok.extend_from_slice(&[0x90, 0x00]);
        let mut rng = XorShift(0x1234_5678_9ABC_DEF1);
        for round in 0..450 {
            let mut t = tx();
            t.start();
            // Reach a state: 0 = SELECT, 1 = AUTH0, 2 = AUTH1.
            let depth = round % 3;
            if depth >= 1 {
                t.on_response(&fci(&[1, 0])).unwrap();
            }
            if depth >= 2 {
                t.on_response(&auth0_ok).unwrap();
            }
            for _ in 0..4 {
                let mut r = rng.bytes(300);
                // Bias towards plausible status words so deeper parsing is exercised.
                match rng.next() % 4 {
                    0 => r.extend_from_slice(&[0x90, 0x00]),
                    1 => r.extend_from_slice(&[0x61, rng.next() as u8]),
                    _ => {}
                }
                match t.on_response(&r) {
                    Ok(Action::Transmit(c)) => assert!(c.len() >= 4),
                    Ok(_) => {}
                    Err(_) => {
                        assert!(t.is_done());
                        break;
                    }
                }
            }
        }
    }

    #[test]
    fn debug_output_redacts_secrets() {
        let id = identity();
        let s = format!("{id:?} {:?} {:?}", rnd(), tx());
        assert!(s.contains("redacted"));
        assert!(!s.contains("3333333333"));
        assert!(!s.contains("4444444444"));
    }
    #[test]
    fn step_up_only_after_standard_authentication() {
        let identity =
            ReaderIdentity::new([1; 16], [2; 16], SecretKey::from_slice(&[3; 32]).unwrap());
        let rnd = Randomness {
            ephemeral: SecretKey::from_slice(&[4; 32]).unwrap(),
            transaction_id: [5; 16],
        };
        let mut tx = ReaderTransaction::new(&identity, TransactionParams::default(), rnd);
        assert!(matches!(
            tx.step_up(&[0xa0]),
            Err(AliroError::UnexpectedState {
                call: "step_up",
                ..
            })
        ));
        let _ = tx.start();
        assert!(matches!(
            tx.step_up(&[0xa0]),
            Err(AliroError::UnexpectedState {
                call: "step_up",
                ..
            })
        ));
        // Still waiting for SELECT: the refused call did not disturb the transaction.
        assert_eq!(tx.current_step().unwrap(), Step::Select);
    }
}
