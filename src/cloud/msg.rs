//! The MQTT API's topics and payloads (docs/mqtt-api.md is the contract; the JSON Schemas in
//! docs/schemas/ are checked against what this module writes).
//!
//! Every payload is JSON (UTF-8), with `"type"` and `"v": 1`. Down messages that change what
//! keyway does (ACL snapshot manifest, ACL delta, command) are wrapped in a COSE_Sign1
//! ([`super::sign`]); snapshot chunks are covered by the signed manifest's SHA-256, and event
//! acks only let keyway forget rows it has delivered. Parsers here take untrusted bytes: sizes
//! are checked first, nothing panics, and every refusal carries a stable [`RejectCode`].

use serde::{Deserialize, Serialize};
use std::path::Path;

use crate::acl::import::{self, CredentialSpec, FileKind};
use crate::acl::{normalize_endpoint_key, ENDPOINT_KEY_LEN};

/// Largest MQTT payload keyway accepts or sends (AWS IoT Core's limit; mosquitto and
/// RabbitMQ take it too).
pub const MAX_MESSAGE_BYTES: usize = 128 * 1024;
/// Largest snapshot chunk (raw bytes before base64): base64 grows it by 4/3, so a 64 KiB
/// chunk is ~87 KiB on the wire, well under [`MAX_MESSAGE_BYTES`].
pub const MAX_CHUNK_BYTES: u32 = 64 * 1024;
/// Chunk size the backend tool uses by default.
pub const DEFAULT_CHUNK_BYTES: u32 = 48 * 1024;
/// Largest snapshot: the ACL file import's limit.
pub const MAX_SNAPSHOT_BYTES: u64 = import::MAX_FILE_BYTES;
/// Longest command request id.
pub const MAX_REQUEST_ID_BYTES: usize = 64;
/// Longest validity window a signed message may claim (issued → expires). Bounds how long a
/// captured command could be replayed after a restart forgets the ids already seen.
pub const MAX_VALIDITY_S: i64 = 24 * 3600;
/// Most topic levels keyway uses (AWS IoT Core allows 8 levels, i.e. 7 slashes).
pub const MAX_TOPIC_LEVELS: usize = 7;
/// Levels keyway adds under the prefix: site / gateway / up to two of its own.
const OWN_LEVELS: usize = 4;
/// The payload format version this build reads and writes.
pub const VERSION: u32 = 1;

/// Stable reason codes for refused down messages (logged, counted, and reported up on
/// `rejected`). Never rename one: backends match on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectCode {
    /// A message that must be signed is not a COSE_Sign1, or has no signature or payload.
    Unsigned,
    /// Wrong algorithm, or the signature does not verify with the key its kid names.
    BadSignature,
    /// The kid names no trusted key.
    UnknownKey,
    /// Version or request id already applied / seen.
    Replayed,
    /// A delta whose base version is not the applied one, or a chunk of another snapshot.
    OutOfOrder,
    /// Past its `expires_at`, or a validity window longer than allowed.
    Expired,
    /// Larger than the limits (message, chunk, snapshot).
    Oversized,
    /// Not valid JSON of the expected shape, or invalid field values.
    Malformed,
    /// Addressed to another site or gateway.
    WrongTarget,
    /// `v` is not a version this build reads.
    UnsupportedVersion,
    /// A snapshot chunk went missing (more chunks came ahead of it than are held, or an index
    /// past the end); the snapshot is abandoned.
    ChunkGap,
    /// The assembled snapshot's size or SHA-256 differs from its manifest.
    HashMismatch,
    /// No chunk arrived for too long; the snapshot is abandoned.
    SnapshotTimeout,
    /// The content verified but could not be applied (invalid ACL rows, database error).
    ApplyFailed,
    /// The command name is not one keyway knows.
    UnknownCommand,
}

impl RejectCode {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectCode::Unsigned => "unsigned",
            RejectCode::BadSignature => "bad_signature",
            RejectCode::UnknownKey => "unknown_key",
            RejectCode::Replayed => "replayed",
            RejectCode::OutOfOrder => "out_of_order",
            RejectCode::Expired => "expired",
            RejectCode::Oversized => "oversized",
            RejectCode::Malformed => "malformed",
            RejectCode::WrongTarget => "wrong_target",
            RejectCode::UnsupportedVersion => "unsupported_version",
            RejectCode::ChunkGap => "chunk_gap",
            RejectCode::HashMismatch => "hash_mismatch",
            RejectCode::SnapshotTimeout => "snapshot_timeout",
            RejectCode::ApplyFailed => "apply_failed",
            RejectCode::UnknownCommand => "unknown_command",
        }
    }

    /// Every code, for docs and schema tests.
    pub const ALL: [RejectCode; 15] = [
        RejectCode::Unsigned,
        RejectCode::BadSignature,
        RejectCode::UnknownKey,
        RejectCode::Replayed,
        RejectCode::OutOfOrder,
        RejectCode::Expired,
        RejectCode::Oversized,
        RejectCode::Malformed,
        RejectCode::WrongTarget,
        RejectCode::UnsupportedVersion,
        RejectCode::ChunkGap,
        RejectCode::HashMismatch,
        RejectCode::SnapshotTimeout,
        RejectCode::ApplyFailed,
        RejectCode::UnknownCommand,
    ];
}

/// A refused message: the code and a short human detail (no key material).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {detail}", code.as_str())]
pub struct Reject {
    pub code: RejectCode,
    pub detail: String,
    /// The command's request id, when it was read from a verified payload.
    pub request_id: Option<String>,
    /// Already logged, counted and reported up (the core's bookkeeping).
    pub reported: bool,
}

impl Reject {
    pub fn new(code: RejectCode, detail: impl Into<String>) -> Reject {
        let mut detail: String = detail.into();
        if detail.len() > 200 {
            let mut cut = 200;
            while !detail.is_char_boundary(cut) {
                cut -= 1;
            }
            detail.truncate(cut);
        }
        Reject {
            code,
            detail,
            request_id: None,
            reported: false,
        }
    }

    pub fn with_request_id(mut self, request_id: Option<String>) -> Reject {
        self.request_id = request_id;
        self
    }

    pub fn reported(mut self) -> Reject {
        self.reported = true;
        self
    }
}

fn malformed(detail: impl Into<String>) -> Reject {
    Reject::new(RejectCode::Malformed, detail)
}

// ---------------------------------------------------------------------------------------
// Topics.

/// What a topic carries. `Down` kinds are subscribed to; `Up` kinds are published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TopicKind {
    // Up.
    State,
    Heartbeat,
    Events,
    AclApplied,
    AclRequest,
    CommandStatus,
    Rejected,
    Notes,
    // Down.
    AclSnapshot,
    AclChunk,
    AclDelta,
    Command,
    EventsAck,
    NotesAck,
}

impl TopicKind {
    /// The suffix under `<prefix>/<site>/<gateway>/`.
    pub fn suffix(self) -> &'static str {
        match self {
            TopicKind::State => "state",
            TopicKind::Heartbeat => "heartbeat",
            TopicKind::Events => "events",
            TopicKind::AclApplied => "acl/applied",
            TopicKind::AclRequest => "acl/request",
            TopicKind::CommandStatus => "cmd/status",
            TopicKind::Rejected => "rejected",
            TopicKind::Notes => "notes",
            TopicKind::AclSnapshot => "acl/snapshot",
            TopicKind::AclChunk => "acl/chunk",
            TopicKind::AclDelta => "acl/delta",
            TopicKind::Command => "cmd",
            TopicKind::EventsAck => "events/ack",
            TopicKind::NotesAck => "notes/ack",
        }
    }

    pub const UP: [TopicKind; 8] = [
        TopicKind::State,
        TopicKind::Heartbeat,
        TopicKind::Events,
        TopicKind::AclApplied,
        TopicKind::AclRequest,
        TopicKind::CommandStatus,
        TopicKind::Rejected,
        TopicKind::Notes,
    ];
    pub const DOWN: [TopicKind; 6] = [
        TopicKind::AclSnapshot,
        TopicKind::AclChunk,
        TopicKind::AclDelta,
        TopicKind::Command,
        TopicKind::EventsAck,
        TopicKind::NotesAck,
    ];

    /// Only the birth/death state is retained; commands never are.
    pub fn retained(self) -> bool {
        self == TopicKind::State
    }
}

/// Why a prefix, site or gateway id cannot be used in topics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("must be 1..=64 bytes of A-Z a-z 0-9 _ - (no / + # or spaces)")]
    Id,
    #[error("prefix levels must be 1..=64 bytes of A-Z a-z 0-9 _ -, separated by '/'")]
    Prefix,
    #[error("prefix has {0} levels; at most {max} fit under the {MAX_TOPIC_LEVELS}-level limit", max = MAX_TOPIC_LEVELS - OWN_LEVELS)]
    TooDeep(usize),
}

fn topic_id_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Checks a site or gateway id.
pub fn check_id(s: &str) -> Result<(), TopicError> {
    if topic_id_ok(s) {
        Ok(())
    } else {
        Err(TopicError::Id)
    }
}

/// Checks a topic prefix (`keyway`, `acme/doors`, ...).
pub fn check_prefix(p: &str) -> Result<(), TopicError> {
    let levels: Vec<&str> = p.split('/').collect();
    if !levels.iter().all(|l| topic_id_ok(l)) {
        return Err(TopicError::Prefix);
    }
    if levels.len() > MAX_TOPIC_LEVELS - OWN_LEVELS {
        return Err(TopicError::TooDeep(levels.len()));
    }
    Ok(())
}

/// The topics of one gateway: `<prefix>/<site>/<gateway>/<suffix>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    base: String,
}

impl Topics {
    pub fn new(prefix: &str, site: &str, gateway: &str) -> Result<Topics, TopicError> {
        check_prefix(prefix)?;
        check_id(site)?;
        check_id(gateway)?;
        Ok(Topics {
            base: format!("{prefix}/{site}/{gateway}"),
        })
    }

    pub fn topic(&self, kind: TopicKind) -> String {
        format!("{}/{}", self.base, kind.suffix())
    }

    /// The down kind a received topic is, if it is one of this gateway's.
    pub fn classify(&self, topic: &str) -> Option<TopicKind> {
        let rest = topic.strip_prefix(&self.base)?.strip_prefix('/')?;
        TopicKind::DOWN.into_iter().find(|k| k.suffix() == rest)
    }

    /// Every topic of every site and gateway under `prefix` of one kind (the backend tool's
    /// subscriptions): `<prefix>/+/+/<suffix>`.
    pub fn fleet_filter(prefix: &str, kind: TopicKind) -> String {
        format!("{prefix}/+/+/{}", kind.suffix())
    }

    /// Splits a fleet topic into (site, gateway, kind).
    pub fn parse_fleet(prefix: &str, topic: &str) -> Option<(String, String, TopicKind)> {
        let rest = topic.strip_prefix(prefix)?.strip_prefix('/')?;
        let mut it = rest.splitn(3, '/');
        let site = it.next()?;
        let gw = it.next()?;
        let suffix = it.next()?;
        let kind = TopicKind::UP
            .into_iter()
            .chain(TopicKind::DOWN)
            .find(|k| k.suffix() == suffix)?;
        Some((site.to_owned(), gw.to_owned(), kind))
    }
}

// ---------------------------------------------------------------------------------------
// Down payloads.

/// The fields every signed message has: who it is for and when it is valid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    #[serde(rename = "type")]
    pub kind: String,
    pub v: u32,
    pub site: String,
    /// The gateway id, or `*` for every gateway of the site.
    pub gateway: String,
    /// Unix seconds.
    pub issued_at: i64,
    /// Unix seconds; the message is refused at or after this instant.
    pub expires_at: i64,
}

impl Envelope {
    /// Type, version, target and validity window at `now_s` (unix seconds).
    pub fn check(&self, kind: &str, site: &str, gateway: &str, now_s: i64) -> Result<(), Reject> {
        if self.kind != kind {
            return Err(malformed(format!(
                "type {:?} where {kind:?} belongs",
                trunc(&self.kind)
            )));
        }
        if self.v != VERSION {
            return Err(Reject::new(
                RejectCode::UnsupportedVersion,
                format!("v {} (this keyway reads {VERSION})", self.v),
            ));
        }
        if self.site != site || (self.gateway != gateway && self.gateway != "*") {
            return Err(Reject::new(
                RejectCode::WrongTarget,
                format!("for {}/{}", trunc(&self.site), trunc(&self.gateway)),
            ));
        }
        if self.expires_at <= self.issued_at
            || self.expires_at.saturating_sub(self.issued_at) > MAX_VALIDITY_S
        {
            return Err(Reject::new(
                RejectCode::Expired,
                format!("validity window must be 1..={MAX_VALIDITY_S} s"),
            ));
        }
        if now_s >= self.expires_at {
            return Err(Reject::new(
                RejectCode::Expired,
                format!("expired at {}, now {now_s}", self.expires_at),
            ));
        }
        Ok(())
    }
}

/// Syntax of a snapshot's content: exactly what `keyway acl import` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotFormat {
    Json,
    Csv,
}

impl SnapshotFormat {
    pub fn file_kind(self) -> FileKind {
        match self {
            SnapshotFormat::Json => FileKind::Json,
            SnapshotFormat::Csv => FileKind::Csv,
        }
    }
}

/// A signed ACL snapshot manifest (`acl/snapshot`). The chunks follow on `acl/chunk`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    #[serde(flatten)]
    pub env: Envelope,
    /// The ACL version this snapshot sets; must be above the applied one.
    pub version: u64,
    pub format: SnapshotFormat,
    /// Bytes of the whole content.
    pub size: u64,
    /// SHA-256 of the whole content, hex.
    pub sha256: String,
    pub chunks: u32,
    /// Bytes per chunk (all but the last are exactly this long).
    pub chunk_size: u32,
}

pub const TYPE_SNAPSHOT: &str = "acl_snapshot";
pub const TYPE_DELTA: &str = "acl_delta";
pub const TYPE_COMMAND: &str = "command";
pub const TYPE_CHUNK: &str = "acl_chunk";
pub const TYPE_ACK: &str = "events_ack";
pub const TYPE_NOTES: &str = "notes";
pub const TYPE_NOTES_ACK: &str = "notes_ack";

/// A manifest with its digest decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedManifest {
    pub m: Manifest,
    pub sha256: [u8; 32],
}

fn json<'a, T: Deserialize<'a>>(payload: &'a [u8]) -> Result<T, Reject> {
    if payload.len() > MAX_MESSAGE_BYTES {
        return Err(Reject::new(
            RejectCode::Oversized,
            format!("{} bytes > {MAX_MESSAGE_BYTES}", payload.len()),
        ));
    }
    serde_json::from_slice(payload).map_err(|e| malformed(e.to_string()))
}

/// Parses and checks a manifest's (already verified) JSON.
pub fn parse_manifest(
    payload: &[u8],
    site: &str,
    gateway: &str,
    now_s: i64,
) -> Result<CheckedManifest, Reject> {
    let m: Manifest = json(payload)?;
    m.env.check(TYPE_SNAPSHOT, site, gateway, now_s)?;
    if m.version == 0 {
        return Err(malformed("version must be at least 1"));
    }
    if m.size == 0 {
        return Err(malformed("size must be at least 1"));
    }
    if m.size > MAX_SNAPSHOT_BYTES {
        return Err(Reject::new(
            RejectCode::Oversized,
            format!("snapshot of {} bytes > {MAX_SNAPSHOT_BYTES}", m.size),
        ));
    }
    if m.chunk_size == 0 || m.chunk_size > MAX_CHUNK_BYTES {
        return Err(Reject::new(
            RejectCode::Oversized,
            format!("chunk_size must be 1..={MAX_CHUNK_BYTES}"),
        ));
    }
    let expected = m.size.div_ceil(u64::from(m.chunk_size));
    if u64::from(m.chunks) != expected {
        return Err(malformed(format!(
            "chunks {} does not match size / chunk_size ({expected})",
            m.chunks
        )));
    }
    let mut sha256 = [0u8; 32];
    hex::decode_to_slice(&m.sha256, &mut sha256)
        .map_err(|_| malformed("sha256 must be 64 hex digits"))?;
    Ok(CheckedManifest { m, sha256 })
}

/// One snapshot chunk (`acl/chunk`, unsigned: the manifest's SHA-256 covers it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkMsg {
    #[serde(rename = "type")]
    pub kind: String,
    pub v: u32,
    /// The snapshot version it belongs to.
    pub version: u64,
    /// 0-based.
    pub index: u32,
    /// The bytes, standard base64 with padding.
    pub data: String,
}

/// A chunk with its bytes decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub version: u64,
    pub index: u32,
    pub data: Vec<u8>,
}

pub fn parse_chunk(payload: &[u8]) -> Result<Chunk, Reject> {
    let c: ChunkMsg = json(payload)?;
    if c.kind != TYPE_CHUNK {
        return Err(malformed("type is not acl_chunk"));
    }
    if c.v != VERSION {
        return Err(Reject::new(RejectCode::UnsupportedVersion, "chunk v"));
    }
    // Checked before decoding so a huge string is never decoded.
    if c.data.len() > (MAX_CHUNK_BYTES as usize).div_ceil(3) * 4 {
        return Err(Reject::new(RejectCode::Oversized, "chunk data too long"));
    }
    use base64ct::Encoding;
    let data =
        base64ct::Base64::decode_vec(&c.data).map_err(|_| malformed("data is not base64"))?;
    Ok(Chunk {
        version: c.version,
        index: c.index,
        data,
    })
}

/// Encodes a chunk (backend tool).
pub fn chunk_json(version: u64, index: u32, data: &[u8]) -> Vec<u8> {
    use base64ct::Encoding;
    to_json(&ChunkMsg {
        kind: TYPE_CHUNK.into(),
        v: VERSION,
        version,
        index,
        data: base64ct::Base64::encode_string(data),
    })
}

/// A signed ACL delta (`acl/delta`): applies only on top of `base_version`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeltaMsg {
    #[serde(flatten)]
    pub env: Envelope,
    pub base_version: u64,
    pub version: u64,
    /// Credential objects exactly as in the JSON ACL file's `credentials` array.
    #[serde(default)]
    pub upsert: Vec<serde_json::Value>,
    /// Endpoint keys (hex) whose validity ends now; an upsert re-enables them.
    #[serde(default)]
    pub suspend: Vec<String>,
    /// Endpoint keys (hex) removed from the ACL.
    #[serde(default)]
    pub revoke: Vec<String>,
}

/// A checked delta.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delta {
    pub base_version: u64,
    pub version: u64,
    pub upsert: Vec<CredentialSpec>,
    pub suspend: Vec<[u8; ENDPOINT_KEY_LEN]>,
    pub revoke: Vec<[u8; ENDPOINT_KEY_LEN]>,
}

fn keys(list: &[String], field: &str) -> Result<Vec<[u8; ENDPOINT_KEY_LEN]>, Reject> {
    list.iter()
        .enumerate()
        .map(|(i, h)| {
            let raw = hex::decode(h).map_err(|_| malformed(format!("{field}[{i}] is not hex")))?;
            normalize_endpoint_key(&raw).map_err(|e| malformed(format!("{field}[{i}]: {e}")))
        })
        .collect()
}

pub fn parse_delta(payload: &[u8], site: &str, gateway: &str, now_s: i64) -> Result<Delta, Reject> {
    let d: DeltaMsg = json(payload)?;
    d.env.check(TYPE_DELTA, site, gateway, now_s)?;
    if d.version <= d.base_version {
        return Err(malformed("version must be above base_version"));
    }
    // The upserts go through the file importer's validation, so a delta can carry exactly
    // what a file can, with the same rules.
    let upsert = if d.upsert.is_empty() {
        Vec::new()
    } else {
        let wrapped =
            serde_json::json!({ "version": import::JSON_FORMAT_VERSION, "credentials": d.upsert });
        let bytes = serde_json::to_vec(&wrapped).map_err(|e| malformed(e.to_string()))?;
        import::parse_bytes(&bytes, FileKind::Json, Path::new("delta upsert"))
            .map_err(|e| malformed(e.to_string()))?
            .credentials
    };
    let suspend = keys(&d.suspend, "suspend")?;
    let revoke = keys(&d.revoke, "revoke")?;
    if upsert.is_empty() && suspend.is_empty() && revoke.is_empty() {
        return Err(malformed("empty delta"));
    }
    Ok(Delta {
        base_version: d.base_version,
        version: d.version,
        upsert,
        suspend,
        revoke,
    })
}

/// Commands keyway runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandKind {
    /// Ask the backend for a full snapshot now; done when it is applied.
    Resync,
    /// Remove one credential at once (no version change: the backend's next snapshot or delta
    /// must not list it).
    RevokeNow([u8; ENDPOINT_KEY_LEN]),
    SetLogLevel(log::LevelFilter),
    /// Reply with the heartbeat's diagnostics in the `done` status.
    ReportDiagnostics,
}

impl CommandKind {
    pub fn name(&self) -> &'static str {
        match self {
            CommandKind::Resync => "resync",
            CommandKind::RevokeNow(_) => "revoke_now",
            CommandKind::SetLogLevel(_) => "set_log_level",
            CommandKind::ReportDiagnostics => "report_diagnostics",
        }
    }
}

/// A signed command (`cmd`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandMsg {
    #[serde(flatten)]
    pub env: Envelope,
    pub request_id: String,
    pub name: String,
    #[serde(default)]
    pub args: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub request_id: String,
    pub expires_at: i64,
    pub kind: CommandKind,
}

fn request_id_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_REQUEST_ID_BYTES
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'))
}

/// The request id of a command payload, if it has a usable one (so a rejection can name it).
pub fn peek_request_id(payload: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Peek {
        request_id: String,
    }
    let p: Peek = serde_json::from_slice(payload).ok()?;
    request_id_ok(&p.request_id).then_some(p.request_id)
}

pub fn parse_command(
    payload: &[u8],
    site: &str,
    gateway: &str,
    now_s: i64,
) -> Result<Command, Reject> {
    let c: CommandMsg = json(payload)?;
    c.env.check(TYPE_COMMAND, site, gateway, now_s)?;
    if !request_id_ok(&c.request_id) {
        return Err(malformed(format!(
            "request_id must be 1..={MAX_REQUEST_ID_BYTES} bytes of A-Z a-z 0-9 . _ - :"
        )));
    }
    let arg = |name: &str| -> Result<&str, Reject> {
        c.args
            .get(name)
            .and_then(|v| v.as_str())
            .ok_or_else(|| malformed(format!("args.{name} (string) is required")))
    };
    let kind = match c.name.as_str() {
        "resync" => CommandKind::Resync,
        "report_diagnostics" => CommandKind::ReportDiagnostics,
        "revoke_now" => {
            let k = keys(&[arg("endpoint_key")?.to_owned()], "args.endpoint_key")?;
            match k.first() {
                Some(k) => CommandKind::RevokeNow(*k),
                None => return Err(malformed("args.endpoint_key")),
            }
        }
        "set_log_level" => {
            let level: log::LevelFilter = arg("level")?
                .parse()
                .map_err(|_| malformed("args.level must be error, warn, info, debug or trace"))?;
            CommandKind::SetLogLevel(level)
        }
        other => {
            return Err(Reject::new(
                RejectCode::UnknownCommand,
                format!("command {:?}", trunc(other)),
            ))
        }
    };
    Ok(Command {
        request_id: c.request_id,
        expires_at: c.env.expires_at,
        kind,
    })
}

/// The backend's application-level ack of delivered events (`events/ack`) or notes
/// (`notes/ack`, type `notes_ack`); unsigned: it can only make keyway forget rows it has sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventsAck {
    #[serde(rename = "type")]
    pub kind: String,
    pub v: u32,
    /// The outbox instance the sequence numbers belong to.
    pub instance: String,
    /// Every event with `seq` up to and including this one is stored by the backend.
    pub through_seq: i64,
}

/// Parses an ack of type `kind` ([`TYPE_ACK`] or [`TYPE_NOTES_ACK`]).
pub fn parse_ack(payload: &[u8], kind: &str) -> Result<EventsAck, Reject> {
    let a: EventsAck = json(payload)?;
    if a.kind != kind {
        return Err(malformed(format!("type is not {kind}")));
    }
    if a.v != VERSION {
        return Err(Reject::new(RejectCode::UnsupportedVersion, "ack v"));
    }
    if a.through_seq < 0 {
        return Err(malformed("through_seq must not be negative"));
    }
    Ok(a)
}

// ---------------------------------------------------------------------------------------
// Up payloads.

/// Birth / death (`state`, retained). The Will carries the same `boot` and `bd_seq` as the
/// birth of that connection, so a stale "offline" can be told from a live one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateMsg {
    #[serde(rename = "type")]
    pub kind: String,
    pub v: u32,
    /// `online` or `offline`.
    pub state: String,
    /// Process starts of this gateway (persisted).
    pub boot: u64,
    /// Connections since this process started (Sparkplug's bdSeq).
    pub bd_seq: u64,
    /// Unix ms when written (the Will: when the connection was made).
    pub ts_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub software: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub acl_version: Option<u64>,
}

/// The applied ACL as reported up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AclReport {
    pub version: u64,
    /// SHA-256 chain (hex): a snapshot's content hash, then for each delta
    /// SHA-256(previous hash ‖ SHA-256(delta payload)).
    pub hash: String,
    /// Unix ms of the apply.
    pub applied_at_ms: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxReport {
    /// Events not yet acked by the backend.
    pub depth: u64,
    /// `time_ms` of the oldest of them.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub oldest_ms: Option<i64>,
    /// Events dropped before the backend acked them, a running total kept in the database:
    /// pruned by the `[events]` bounds (size, age) while undelivered, or never stored (a
    /// failed write: disk full).
    #[serde(default)]
    pub dropped: u64,
}

/// One door as the heartbeat reports it (ids and states only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DoorHealth {
    pub id: String,
    /// `present`, `missing` or `pcscd_down`.
    pub reader: String,
    /// `online`, `offline` or `port_error`.
    pub osdp: String,
    /// `off`, `waiting`, `up` or `refused`.
    pub secure_channel: String,
    /// `registered` or `unregistered`; absent when the door has no BLE side.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ble: Option<String>,
    /// Days until the reader certificate expires (negative: expired); absent without one.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub certificate_days: Option<i64>,
    /// The door's offline policy; absent when it has none (grants never expire offline).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub offline_policy: Option<OfflinePolicyReport>,
}

/// A door's offline policy (a heartbeat is only sent while connected, so the limit is never
/// passed in one: the door's own events say `cloud_offline` when it denied).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfflinePolicyReport {
    /// Seconds cached grants stay valid without the cloud.
    pub limit_s: u64,
    /// After the limit: deny (`true`) or keep granting and log it.
    pub fail_secure: bool,
}

/// Free space on the database's file system.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskReport {
    pub free_bytes: u64,
    pub total_bytes: u64,
}

/// What the gateway knows about itself beyond the cloud link: given to the core by the
/// adapter (from the status registry) before heartbeats.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalHealth {
    pub doors: Vec<DoorHealth>,
    pub disk: Option<DiskReport>,
}

/// Periodic health (`heartbeat`), also the `report_diagnostics` result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    #[serde(rename = "type")]
    pub kind: String,
    pub v: u32,
    pub boot: u64,
    pub bd_seq: u64,
    pub ts_ms: i64,
    pub uptime_s: u64,
    /// `null` until a cloud ACL has been applied.
    pub acl: Option<AclReport>,
    /// Seconds since `acl.applied_at_ms`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub acl_age_s: Option<u64>,
    pub outbox: OutboxReport,
    /// Down messages refused since start.
    pub rejected: u64,
    /// Each door's reader / OSDP / BLE state, certificate and offline policy.
    pub doors: Vec<DoorHealth>,
    /// `null` when it could not be read.
    pub disk: Option<DiskReport>,
}

/// One event in an `events` batch: the outbox row plus its stable id and sequence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventOut {
    /// The event row's stable id (32 hex digits, random): unique across gateways and rebuilt
    /// databases; what a backend dedupes on.
    pub uid: String,
    /// The gateway's outbox sequence (increasing, gaps allowed).
    pub seq: i64,
    #[serde(flatten)]
    pub event: crate::events::AccessEvent,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub panel_verdict: Option<String>,
}

/// A batch of events (`events`), oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventsMsg {
    #[serde(rename = "type")]
    pub kind: String,
    pub v: u32,
    pub instance: String,
    /// True when some of these may have been sent before (after a reconnect or an ack
    /// timeout): dedupe by `uid`.
    pub replay: bool,
    pub events: Vec<EventOut>,
}

/// Notes on events already sent (`notes`), oldest first: a late panel verdict, the first use
/// of a credential. Each names its event's `uid`; a note goes up only after its event was
/// acked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotesMsg {
    #[serde(rename = "type")]
    pub kind: String,
    pub v: u32,
    pub instance: String,
    /// Some of these may have been sent before: dedupe by `uid`.
    pub replay: bool,
    pub notes: Vec<crate::events::notes::StoredNote>,
}

/// After every apply (`acl/applied`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedMsg {
    #[serde(rename = "type")]
    pub kind: String,
    pub v: u32,
    /// `snapshot` or `delta`.
    pub source: String,
    #[serde(flatten)]
    pub acl: AclReport,
}

/// keyway asks for a snapshot (`acl/request`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AclRequestMsg {
    #[serde(rename = "type")]
    pub kind: String,
    pub v: u32,
    /// The applied version, `null` when none.
    pub have_version: Option<u64>,
    /// `startup`, `delta_gap`, `snapshot_failed` or `command`.
    pub reason: String,
    pub ts_ms: i64,
}

/// Status of a command (`cmd/status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandStatusMsg {
    #[serde(rename = "type")]
    pub kind: String,
    pub v: u32,
    pub request_id: String,
    /// `accepted`, `done`, `failed` or `rejected`.
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub result: Option<serde_json::Value>,
    pub ts_ms: i64,
}

/// A refused down message (`rejected`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectedMsg {
    #[serde(rename = "type")]
    pub kind: String,
    pub v: u32,
    /// The suffix of the topic it came on (`acl/delta`, `cmd`, ...).
    pub topic: String,
    pub reason: RejectCode,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub request_id: Option<String>,
    pub ts_ms: i64,
}

/// Serialises an up message. Our own types always serialise.
pub fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

fn trunc(s: &str) -> String {
    s.chars().take(40).collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const NOW: i64 = 1_800_000_000;

    pub(crate) fn env(kind: &str) -> serde_json::Value {
        serde_json::json!({"type": kind, "v": 1, "site": "s1", "gateway": "gw1",
            "issued_at": NOW - 10, "expires_at": NOW + 300})
    }

    fn with(mut base: serde_json::Value, extra: serde_json::Value) -> Vec<u8> {
        if let (Some(b), Some(e)) = (base.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                b.insert(k.clone(), v.clone());
            }
        }
        serde_json::to_vec(&base).unwrap()
    }

    pub(crate) fn key_hex(seed: u16) -> String {
        hex::encode(crate::acl::test_key(seed))
    }

    fn manifest(extra: serde_json::Value) -> Vec<u8> {
        let base = with(
            env(TYPE_SNAPSHOT),
            serde_json::json!({"version": 3, "format": "json", "size": 100,
                "sha256": "00".repeat(32), "chunks": 2, "chunk_size": 64}),
        );
        with(serde_json::from_slice(&base).unwrap(), extra)
    }

    fn code<T: std::fmt::Debug>(r: Result<T, Reject>) -> RejectCode {
        r.unwrap_err().code
    }

    #[test]
    fn topics_are_per_gateway_and_bounded() {
        let t = Topics::new("acme/doors", "s1", "gw1").unwrap();
        assert_eq!(t.topic(TopicKind::AclDelta), "acme/doors/s1/gw1/acl/delta");
        assert_eq!(
            t.classify("acme/doors/s1/gw1/cmd"),
            Some(TopicKind::Command)
        );
        assert_eq!(t.classify("acme/doors/s1/gw2/cmd"), None);
        // Up topics are never treated as input.
        assert_eq!(t.classify("acme/doors/s1/gw1/state"), None);
        for k in TopicKind::UP.into_iter().chain(TopicKind::DOWN) {
            let topic = Topics::new("a/b/c", "s", "g").unwrap().topic(k);
            assert!(topic.split('/').count() <= MAX_TOPIC_LEVELS, "{topic}");
            assert_eq!(k.retained(), k == TopicKind::State);
        }
        assert_eq!(check_prefix("a/b/c/d"), Err(TopicError::TooDeep(4)));
        assert_eq!(check_prefix("a/+"), Err(TopicError::Prefix));
        assert_eq!(check_prefix(""), Err(TopicError::Prefix));
        assert_eq!(check_id("gw#1"), Err(TopicError::Id));
        assert_eq!(
            Topics::parse_fleet("acme/doors", "acme/doors/s1/gw1/heartbeat"),
            Some(("s1".into(), "gw1".into(), TopicKind::Heartbeat))
        );
    }

    #[test]
    fn manifest_checks() {
        let ok = parse_manifest(&manifest(serde_json::json!({})), "s1", "gw1", NOW).unwrap();
        assert_eq!((ok.m.version, ok.m.chunks), (3, 2));
        let bad = |extra| code(parse_manifest(&manifest(extra), "s1", "gw1", NOW));
        assert_eq!(bad(serde_json::json!({"chunks": 3})), RejectCode::Malformed);
        assert_eq!(
            bad(serde_json::json!({"sha256": "zz"})),
            RejectCode::Malformed
        );
        assert_eq!(
            bad(serde_json::json!({"version": 0})),
            RejectCode::Malformed
        );
        assert_eq!(
            bad(serde_json::json!({"format": "xml"})),
            RejectCode::Malformed
        );
        assert_eq!(
            bad(serde_json::json!({"size": MAX_SNAPSHOT_BYTES + 1, "chunks": 1})),
            RejectCode::Oversized
        );
        assert_eq!(
            bad(serde_json::json!({"chunk_size": MAX_CHUNK_BYTES + 1, "chunks": 1})),
            RejectCode::Oversized
        );
        assert_eq!(
            bad(serde_json::json!({"v": 2})),
            RejectCode::UnsupportedVersion
        );
        assert_eq!(
            bad(serde_json::json!({"gateway": "gw2"})),
            RejectCode::WrongTarget
        );
        assert_eq!(
            bad(serde_json::json!({"site": "s2"})),
            RejectCode::WrongTarget
        );
        assert_eq!(
            bad(serde_json::json!({"expires_at": NOW})),
            RejectCode::Expired
        );
        assert_eq!(
            bad(serde_json::json!({"expires_at": NOW - 10 + MAX_VALIDITY_S + 1})),
            RejectCode::Expired
        );
        assert_eq!(
            bad(serde_json::json!({"type": "acl_delta"})),
            RejectCode::Malformed
        );
        // Site-wide manifests are for every gateway of the site.
        assert!(parse_manifest(
            &manifest(serde_json::json!({"gateway": "*"})),
            "s1",
            "gw1",
            NOW
        )
        .is_ok());
        let huge = vec![b' '; MAX_MESSAGE_BYTES + 1];
        assert_eq!(
            code(parse_manifest(&huge, "s1", "gw1", NOW)),
            RejectCode::Oversized
        );
        assert_eq!(
            code(parse_manifest(b"{", "s1", "gw1", NOW)),
            RejectCode::Malformed
        );
    }

    #[test]
    fn chunk_round_trip_and_checks() {
        let c = parse_chunk(&chunk_json(4, 1, b"hello")).unwrap();
        assert_eq!(
            c,
            Chunk {
                version: 4,
                index: 1,
                data: b"hello".to_vec()
            }
        );
        let bad = |v: serde_json::Value| code(parse_chunk(&serde_json::to_vec(&v).unwrap()));
        assert_eq!(
            bad(serde_json::json!({"type":"acl_chunk","v":1,"version":1,"index":0,"data":"!!"})),
            RejectCode::Malformed
        );
        let long = "A".repeat((MAX_CHUNK_BYTES as usize).div_ceil(3) * 4 + 4);
        assert_eq!(
            bad(serde_json::json!({"type":"acl_chunk","v":1,"version":1,"index":0,"data":long})),
            RejectCode::Oversized
        );
        assert_eq!(
            bad(serde_json::json!({"type":"acl_chunk","v":9,"version":1,"index":0,"data":""})),
            RejectCode::UnsupportedVersion
        );
        assert_eq!(
            bad(serde_json::json!({"type":"acl_chunk","v":1})),
            RejectCode::Malformed
        );
    }

    pub(crate) fn cred(seed: u16) -> serde_json::Value {
        serde_json::json!({"endpoint_key": key_hex(seed), "person_id": format!("p-{seed}"),
            "card_format": "h10301", "facility_code": 1, "card_number": seed, "doors": ["*"]})
    }

    #[test]
    fn delta_checks() {
        let d = |extra: serde_json::Value| {
            with(env(TYPE_DELTA), {
                let mut b = serde_json::json!({"base_version": 3, "version": 4});
                for (k, v) in extra.as_object().unwrap() {
                    b[k] = v.clone();
                }
                b
            })
        };
        let ok = parse_delta(
            &d(serde_json::json!({"upsert": [cred(1)], "suspend": [key_hex(2)], "revoke": [key_hex(3)]})),
            "s1",
            "gw1",
            NOW,
        )
        .unwrap();
        assert_eq!(ok.upsert.len(), 1);
        assert_eq!(ok.suspend, vec![crate::acl::test_key(2)]);
        assert_eq!(ok.revoke, vec![crate::acl::test_key(3)]);
        let bad = |extra| code(parse_delta(&d(extra), "s1", "gw1", NOW));
        assert_eq!(bad(serde_json::json!({})), RejectCode::Malformed);
        assert_eq!(
            bad(serde_json::json!({"revoke": ["04zz"]})),
            RejectCode::Malformed
        );
        assert_eq!(
            bad(serde_json::json!({"revoke": ["04"]})),
            RejectCode::Malformed
        );
        assert_eq!(
            bad(serde_json::json!({"revoke": [key_hex(1)], "version": 3})),
            RejectCode::Malformed
        );
        let mut bad_cred = cred(1);
        bad_cred["card_format"] = "h99".into();
        assert_eq!(
            bad(serde_json::json!({"upsert": [bad_cred]})),
            RejectCode::Malformed
        );
        assert_eq!(
            bad(serde_json::json!({"upsert": [cred(1), cred(1)]})),
            RejectCode::Malformed
        );
        assert_eq!(
            bad(serde_json::json!({"revoke": [key_hex(1)], "expires_at": NOW - 1})),
            RejectCode::Expired
        );
    }

    #[test]
    fn command_checks() {
        let c = |name: &str, args: serde_json::Value| {
            with(
                env(TYPE_COMMAND),
                serde_json::json!({"request_id": "r-1", "name": name, "args": args}),
            )
        };
        let p = |b: Vec<u8>| parse_command(&b, "s1", "gw1", NOW);
        assert_eq!(
            p(c("resync", serde_json::json!({}))).unwrap().kind,
            CommandKind::Resync
        );
        assert_eq!(
            p(c(
                "revoke_now",
                serde_json::json!({"endpoint_key": key_hex(5)})
            ))
            .unwrap()
            .kind,
            CommandKind::RevokeNow(crate::acl::test_key(5))
        );
        assert_eq!(
            p(c("set_log_level", serde_json::json!({"level": "debug"})))
                .unwrap()
                .kind,
            CommandKind::SetLogLevel(log::LevelFilter::Debug)
        );
        assert_eq!(
            code(p(c("open_door", serde_json::json!({})))),
            RejectCode::UnknownCommand
        );
        assert_eq!(
            code(p(c("set_log_level", serde_json::json!({"level": "loud"})))),
            RejectCode::Malformed
        );
        assert_eq!(
            code(p(c("revoke_now", serde_json::json!({})))),
            RejectCode::Malformed
        );
        let bad_id = with(
            env(TYPE_COMMAND),
            serde_json::json!({"request_id": "a b", "name": "resync"}),
        );
        assert_eq!(code(p(bad_id.clone())), RejectCode::Malformed);
        assert_eq!(peek_request_id(&bad_id), None);
        assert_eq!(
            peek_request_id(&c("x", serde_json::json!({}))),
            Some("r-1".into())
        );
    }

    #[test]
    fn ack_checks() {
        let a = parse_ack(
            br#"{"type":"events_ack","v":1,"instance":"ab","through_seq":7}"#,
            TYPE_ACK,
        )
        .unwrap();
        assert_eq!(a.through_seq, 7);
        let n = br#"{"type":"notes_ack","v":1,"instance":"ab","through_seq":3}"#;
        assert_eq!(parse_ack(n, TYPE_NOTES_ACK).unwrap().through_seq, 3);
        // An events ack is not a notes ack, nor the other way round.
        assert_eq!(code(parse_ack(n, TYPE_ACK)), RejectCode::Malformed);
        assert_eq!(
            code(parse_ack(
                br#"{"type":"events_ack","v":1,"instance":"ab","through_seq":-1}"#,
                TYPE_ACK
            )),
            RejectCode::Malformed
        );
        assert_eq!(
            code(parse_ack(
                br#"{"type":"x","v":1,"instance":"ab","through_seq":1}"#,
                TYPE_ACK
            )),
            RejectCode::Malformed
        );
        assert_eq!(code(parse_ack(b"[]", TYPE_ACK)), RejectCode::Malformed);
    }

    #[test]
    fn reject_codes_are_stable_strings() {
        for c in RejectCode::ALL {
            assert_eq!(serde_json::to_value(c).unwrap(), c.as_str());
        }
        let r = Reject::new(RejectCode::Malformed, "é".repeat(300));
        assert!(r.detail.len() <= 200);
    }
}
