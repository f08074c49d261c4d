//! `keyway status`: what the running daemon knows about each door, the ACL, the outbox, the
//! disk and its own tasks, and every problem that stops a door from serving phones.
//!
//! - [`model`]: the snapshot (serde, the `--json` output) and its human rendering.
//! - [`registry`]: the live state the daemon's tasks update; builds snapshots.
//! - [`health`]: the checks ("never silent"): problems with stable `MESSAGE_ID`s, logged on
//!   change, summarised for systemd's `STATUS=` line.
//! - [`probe`]: read-only samples of the database, the disk, the clock and certificates.
//! - [`proto`]: the socket protocol, sans-IO (one request line, one JSON reply).
//! - [`server`]: the Unix socket in the RuntimeDirectory and the client `keyway status` uses.

pub mod health;
pub mod model;
pub mod probe;
pub mod proto;
pub mod registry;
pub mod server;

pub use model::{Problem, Severity, Snapshot};
pub use registry::Registry;
