//! keyway: the edge gateway that lets a phone open a door.
//!
//! Sans-IO protocol cores (no ports, sockets or timers inside):
//! - [`aliro`]: the Aliro 1.0 reader transaction (SELECT, AUTH0, AUTH1, EXCHANGE).
//! - [`osdp`]: the OSDP Peripheral Device (framing, commands, replies).
//!
//! Thin async adapters that own the I/O:
//! - [`nfc`]: PC/SC readers through pcscd.
//! - [`ble`]: the Aliro BLE transport (sans-IO framing/session core + BlueZ adapter).
//! - [`serial`]: the RS-485 OSDP bus over tokio-serial.
//!
//! State and policy:
//! - [`acl`]: the credential store in SQLite and the access decision.
//! - [`card`]: card-number encodings handed to the panel (Wiegand formats).
//! - [`events`]: access events (SQLite outbox row + journald entry).
//! - [`cloud`]: the MQTT cloud link (sans-IO sync core, signed formats, rumqttc adapter).
//! - [`config`]: the TOML configuration and its validation.
//! - [`logging`]: journald (structured fields) or stderr.
//! - [`daemon`]: wires the rooms together on tokio.
//!
//! Test peers written in this project:
//! - [`sim`]: the phone side of Aliro (an endpoint emulator) on vpcd's socket.

pub mod acl;
pub mod aliro;
pub mod ble;
pub mod card;
pub mod cloud;
pub mod config;
pub mod daemon;
pub mod doctor;
pub mod events;
pub mod logging;
pub mod nfc;
pub mod osdp;
pub mod serial;
pub mod status;
