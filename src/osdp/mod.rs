//! OSDP Peripheral Device, sans-IO (OSDP 2.2 / IEC 60839-11-5), split like libosdp:
//!
//! - [`phy`]: packet framing, CRC-16/checksum, a resynchronising decoder (the secure channel
//!   will slot in here: security block, MAC, encryption).
//! - [`command`]: typed parsing of command data.
//! - [`reply`]: reply encoders, capability and NAK codes.
//! - [`pd`]: the state machine of one PD, one file per concern (sequence numbers and retries,
//!   secure channel, LED/buzzer/output state, card queue) around the dispatcher.
//! - [`sc`]: secure channel cryptography (session keys, cryptograms, MAC chain, data blocks).
//! - [`verdict`]: the panel's grant/deny read from its LED commands after a card read.
//! - [`bus`]: several PDs on one line, routed by address.
//!
//! Nothing here touches a port or reads the clock: callers pass bytes and `Instant`s in and
//! write the returned replies out (see `crate::serial`).

pub mod bus;
pub mod command;
pub mod pd;
pub mod phy;
pub mod reply;
#[cfg(test)]
mod robustness;
pub mod sc;
pub mod verdict;

pub use bus::Bus;
pub use command::{BuzzerRecord, Command, LedParams, LedRecord, OutputRecord};
pub use pd::{
    AttemptId, DropReason, KeyStore, LedState, OutputState, Pd, PdConfig, PdDeps, PdError, PdEvent,
    ScEndReason, SecureConfig,
};
pub use phy::{Check, DecoderStats, Frame, FrameDecoder, PhyError};
pub use reply::{NakCode, PdIdentity, RawCard, RawFormat, Reply};
pub use sc::Scbk;
pub use verdict::Verdict;
