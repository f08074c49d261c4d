//! The access pipeline's transactions against in-memory peers: the emulated phone
//! (keyway-sim's sans-IO endpoint, on tokio's clock), an in-memory ACL store and a scripted
//! panel. These run everywhere, fast; the same flows against real pcscd, BlueZ and libosdp are
//! in nfc_hil.rs, ble_hil.rs and osdp_interop.rs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

/// BLE: one connection's transaction through the shared pipeline (daemon::ble).
mod ble_link;
/// The BLE session's framing and key schedule around the Aliro transaction (ble::session).
mod ble_session;
/// NFC: one tap, from SELECT to the phone being told (daemon::tap).
mod nfc_tap;
/// The door's offline policy (cloud_offline) in the access pipeline.
mod offline_policy;
/// The panel's verdicts reaching the right event (daemon's bus loop).
mod panel_verdicts;
