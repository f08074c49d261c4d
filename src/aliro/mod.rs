//! Sans-IO Aliro 1.0 access protocol core.
//!
//! Shared primitives (used by the reader here and by the endpoint emulator in `sim`):
//! - [`tlv`]: bounded BER-TLV parsing and encoding.
//! - [`apdu`]: command / response APDUs.
//! - [`crypto`]: ECDH, X9.63 KDF, HKDF, ECDSA (raw r||s, RFC 6979), AES-GCM secure channel.
//! - [`keys`]: the transaction key schedule (preimages, salts, session keys).
//! - [`consts`]: AIDs, instructions, tags, reader status codes, status words.
//!
//! Reader side:
//! - [`reader`]: the transaction state machine (NFC expedited phase: STANDARD, FAST with
//!   fallback, LOAD CERT, step-up ENVELOPE); it takes R-APDU bytes and returns C-APDU bytes
//!   and actions; it owns no I/O, clock or RNG (randomness is injected). BLE is not
//!   implemented yet; its key schedule is already in [`keys`].
//! - [`document`]: the step-up Access Document (mdoc DeviceRequest / DeviceResponse,
//!   COSE_Sign1 issuer signature, digests, device-key binding, validity).

pub mod apdu;
pub mod consts;
pub mod crypto;
pub mod document;
pub mod keys;
pub mod reader;
pub mod tlv;

pub use consts::ReaderStatus;
pub use reader::{
    Action, AliroError, AuthenticatedEndpoint, ExchangeResponse, FastConfig, FastCredential,
    FastFallback, Outcome, Randomness, ReaderCertificate, ReaderIdentity, ReaderTransaction, Step,
    TransactionParams, STEP_TIMEOUT, TRANSACTION_TIMEOUT,
};
