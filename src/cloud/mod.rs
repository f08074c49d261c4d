//! The cloud link: ACL down, events and health up, over MQTT to any standard broker.
//!
//! - [`msg`]: topics and JSON payloads (the contract in docs/mqtt-api.md) and their parsers.
//! - [`sign`]: COSE_Sign1 ES256 signatures on ACL updates and commands, trusted backend keys.
//! - [`store`]: the `AclSink` / `Outbox` traits the core needs, over today's `acl::Store`;
//!   [`stream`]: a snapshot streamed into the apply engine chunk by chunk.
//! - [`contact`]: when the link last heard from the cloud (the doors' offline policy).
//! - [`core`]: the sans-IO sync core (connection, backoff, snapshot assembly, deltas, commands,
//!   outbox cursor, birth/death, heartbeat).
//! - [`link`]: the rumqttc adapter task (TLS, failover, backoff, manual acks); [`config`]: `[cloud]`.
//! - [`backend`]: the backend side shipped as `keyway cloud …` (signed messages, a small client).
//!
//! Standalone keyway (no `[cloud]` in the configuration) never touches this module.

pub mod backend;
pub mod config;
pub mod contact;
pub mod core;
pub mod link;
pub mod msg;
pub mod sign;
pub mod store;
pub mod stream;
