//! Test peer: the phone side of Aliro 1.0 (an endpoint / User Device emulator).
//!
//! - [`phone`]: the sans-IO endpoint state machine (C-APDU in, R-APDU out).
//! - [`vpcd`]: the async adapter that puts a [`vpcd::VirtualCard`] behind vsmartcard's virtual
//!   reader, so the real pcscd (and keyway's PC/SC code) talks to it.

pub mod vpcd;
