//! The Aliro BLE transport.
//!
//! Sans-IO (bytes and a clock in, bytes and events out; no socket, timer or RNG):
//! - [`message`]: BLE message framing (`type | id | length | payload`), attributes, a bounded
//!   stream deframer.
//! - [`keys`]: BleSKReader / BleSKDevice and the encrypted notifications.
//! - [`session`]: the reader side of one connection around the shared Aliro reader core
//!   (INITIATE_ACCESS_PROTOCOL, AP_RQ/AP_RS, completion notification, deadline).
//! - [`discovery`]: service UUID, advertisement service data, GATT characteristic values.
//! - [`policy`]: who may connect (RSSI threshold, tap vs walk-up, connection limit).
//! - [`hci`]: HCI Read RSSI (command bytes, reply parser) for a live connection's signal.
//!
//! The adapter, apart: [`adapter`] runs it on BlueZ with `bluer` (advertisement, GATT
//! application, L2CAP LE credit-based channel listener, one task per connection), and
//! [`rssi`] asks the controller for a connection's RSSI on a raw HCI socket.

pub mod adapter;
pub mod discovery;
pub mod hci;
pub mod keys;
pub mod message;
pub mod policy;
pub mod rssi;
pub mod session;

/// The BLE transport protocol version keyway offers (and the only one it knows).
pub const BLE_PROTOCOL_VERSION: [u8; 2] = [0x01, 0x00];

pub use keys::{BleVersions, NotificationChannel};
pub use message::{Deframer, FrameError, Message};
pub use session::{BleError, Event, ReaderSession, SessionOutcome};
