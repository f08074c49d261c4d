//! Sans-IO Aliro 1.0 access protocol core.
//!
//! Shared primitives (used by the reader here and by the endpoint emulator in `sim`):
//! - [`tlv`]: bounded BER-TLV parsing and encoding.
//! - [`apdu`]: command / response APDUs.
//! - [`crypto`]: ECDH, X9.63 KDF, HKDF, ECDSA (raw r||s, RFC 6979), AES-GCM secure channel.
//! - [`keys`]: the transaction key schedule (preimages, salts, session keys).
//! - [`consts`]: AIDs, instructions, tags, reader status codes, status words.
//!
//! The reader transaction state machine takes R-APDU bytes and returns C-APDU bytes and
//! actions; it owns no I/O, clock or RNG (randomness is injected).

pub mod apdu;
pub mod consts;
pub mod crypto;
pub mod keys;
pub mod tlv;
