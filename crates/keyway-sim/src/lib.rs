//! keyway's test peers, in their own crate so the shipped library carries none of them: the
//! phone side of Aliro 1.0 (an endpoint / User Device emulator), a UID-only card, and the
//! in-memory doubles a door's access pipeline is tested against.
//!
//! - [`door`]: an in-memory door (ACL store, panel) for tests of the access pipeline.
//! - [`acl`]: synthetic ACLs of any size, for the scale benches.
//! - [`issuer`]: builds step-up Access Documents (mdoc DeviceResponse) for the phone.
//! - [`card`]: a physical card without Aliro (UID only), for cutover tests.
//! - [`phone`]: the sans-IO endpoint state machine (C-APDU in, R-APDU out).
//! - [`ble_phone`]: the same endpoint over Aliro BLE messages (sans-IO), and a `bluer` central.
//! - [`random`]: injected randomness (OS RNG for the binary, scripted for vector replay).
//! - [`vpcd`]: the async adapter that puts a [`vpcd::VirtualCard`] behind vsmartcard's virtual
//!   reader, so the real pcscd (and keyway's PC/SC code) talks to it.

pub mod acl;
pub mod ble_phone;
pub mod card;
pub mod door;
pub mod issuer;
pub mod phone;
pub mod random;
pub mod vpcd;

pub use card::UidCard;
pub use phone::{Endpoint, EndpointConfig, Faults, Outcome, ReaderGroupCredential};
pub use random::{EndpointRandom, OsRandom, ScriptedRandom};
