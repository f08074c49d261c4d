//! Access events: one row in the SQLite outbox (`events`, delivered later to the cloud in id
//! order) and one structured `log` record (journald fields via systemd-journal-logger).
//!
//! Events carry ids only: the endpoint key's fingerprint and the person id, never the key
//! itself or the card number (a card number is enough to clone a card).

pub mod notes;

use crate::acl::{fingerprint, AclError, Decision, Store};
use rusqlite::OptionalExtension;
use serde::{Deserialize, Serialize};
use std::fmt;

/// `log` target of access records (journald field `TARGET`).
pub const LOG_TARGET: &str = "keyway::access";
/// Reason stored for granted accesses.
pub const REASON_GRANTED: &str = "granted";
/// Longest accepted reason code.
pub const MAX_REASON_BYTES: usize = 64;

/// How the phone reached the reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Nfc,
    Ble,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Nfc => "nfc",
            Transport::Ble => "ble",
        }
    }

    fn parse(s: &str) -> Option<Transport> {
        match s {
            "nfc" => Some(Transport::Nfc),
            "ble" => Some(Transport::Ble),
            _ => None,
        }
    }
}

/// The outcome recorded for an access attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventDecision {
    Granted,
    Denied,
    /// The attempt failed before a decision (protocol error, timeout, panel unreachable...).
    Error,
}

impl EventDecision {
    pub fn as_str(self) -> &'static str {
        match self {
            EventDecision::Granted => "granted",
            EventDecision::Denied => "denied",
            EventDecision::Error => "error",
        }
    }

    fn parse(s: &str) -> Option<EventDecision> {
        match s {
            "granted" => Some(EventDecision::Granted),
            "denied" => Some(EventDecision::Denied),
            "error" => Some(EventDecision::Error),
            _ => None,
        }
    }
}

impl fmt::Display for EventDecision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One access attempt. Serialises to JSON for the cloud sync (field names as below).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessEvent {
    /// Unix milliseconds when the attempt started.
    pub time_ms: i64,
    /// Door id from the configuration.
    pub door: String,
    pub transport: Transport,
    /// [`crate::acl::fingerprint`] of the endpoint key, if the phone got far enough to send one.
    pub endpoint_fingerprint: Option<String>,
    /// Set when the key matched a credential.
    pub person_id: Option<String>,
    /// Set when the key matched a credential.
    pub credential_id: Option<i64>,
    pub decision: EventDecision,
    /// `granted`, a deny code (`unknown_key`, `expired`, `not_yet_valid`, `wrong_door`) or a
    /// snake_case error code.
    pub reason: String,
    /// From the first reader contact to the decision (or error).
    pub latency_ms: u32,
}

impl AccessEvent {
    /// The event for an ACL decision about `endpoint_key`.
    pub fn from_decision(
        time_ms: i64,
        door: &str,
        transport: Transport,
        endpoint_key: &[u8],
        decision: &Decision,
        latency_ms: u32,
    ) -> AccessEvent {
        let (decision, reason, person_id, credential_id) = match decision {
            Decision::Grant(g) => (
                EventDecision::Granted,
                REASON_GRANTED.to_owned(),
                Some(g.person_id.clone()),
                Some(g.credential_id),
            ),
            Decision::Deny(r) => (EventDecision::Denied, r.as_str().to_owned(), None, None),
        };
        AccessEvent {
            time_ms,
            door: door.to_owned(),
            transport,
            endpoint_fingerprint: Some(fingerprint(endpoint_key)),
            person_id,
            credential_id,
            decision,
            reason,
            latency_ms,
        }
    }

    /// The event for an attempt that failed with `code` (snake_case) before a decision.
    pub fn error(
        time_ms: i64,
        door: &str,
        transport: Transport,
        endpoint_key: Option<&[u8]>,
        code: &str,
        latency_ms: u32,
    ) -> AccessEvent {
        AccessEvent {
            time_ms,
            door: door.to_owned(),
            transport,
            endpoint_fingerprint: endpoint_key.map(fingerprint),
            person_id: None,
            credential_id: None,
            decision: EventDecision::Error,
            reason: code.to_owned(),
            latency_ms,
        }
    }

    /// Bounds and character checks so the outbox and journald never get junk.
    pub fn validate(&self) -> Result<(), AclError> {
        let bad = |m: String| Err(AclError::InvalidEvent(m));
        if self.door.is_empty()
            || self.door.len() > crate::acl::import::MAX_DOOR_ID_BYTES
            || !self.door.bytes().all(crate::acl::import::is_door_byte)
        {
            return bad(format!(
                "door id {:?} is not a valid door id",
                trunc(&self.door)
            ));
        }
        if self.reason.is_empty()
            || self.reason.len() > MAX_REASON_BYTES
            || !self
                .reason
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return bad(format!(
                "reason {:?} is not a snake_case code of at most {MAX_REASON_BYTES} bytes",
                trunc(&self.reason)
            ));
        }
        if let Some(fp) = &self.endpoint_fingerprint {
            if fp.is_empty() || fp.len() > 64 || !fp.bytes().all(|b| b.is_ascii_hexdigit()) {
                return bad(format!("fingerprint {:?} is not short hex", trunc(fp)));
            }
        }
        if let Some(p) = &self.person_id {
            if p.is_empty()
                || p.len() > crate::acl::import::MAX_PERSON_ID_BYTES
                || p.chars().any(char::is_control)
            {
                return bad(format!("person id {:?} is not valid", trunc(p)));
            }
        }
        Ok(())
    }
}

fn trunc(s: &str) -> String {
    s.chars().take(40).collect()
}

/// Milliseconds since the Unix epoch of `t`, saturating (for [`AccessEvent::time_ms`]).
pub fn unix_ms(t: time::OffsetDateTime) -> i64 {
    let ms = t.unix_timestamp_nanos() / 1_000_000;
    i64::try_from(ms).unwrap_or(if ms < 0 { i64::MIN } else { i64::MAX })
}

/// An event as stored in the outbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoredEvent {
    /// The gateway's sequence number: strictly increasing, never reused (also after pruning),
    /// so a gap is a pruned row; the delivery order.
    pub id: i64,
    /// Stable unique id: 16 random bytes as 32 lowercase hex digits, unique across databases
    /// (a rebuilt database starts `id` again, never this).
    pub uid: String,
    #[serde(flatten)]
    pub event: AccessEvent,
    /// Unix milliseconds of delivery to the cloud; `None` = still to send.
    pub delivered_at_ms: Option<i64>,
    /// The access panel's verdict on a granted card (`granted`, `denied`, `unknown`), once
    /// known; `None` for denials and before the panel answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub panel_verdict: Option<String>,
    /// The verdict as it was when the row was written (what the cloud gets in the event
    /// itself; a later one goes up as a note, [`notes`]).
    #[serde(skip)]
    pub recorded_verdict: Option<String>,
}

/// Panel verdicts keyway stores (see [`Store::set_panel_verdict`]).
pub const PANEL_VERDICTS: [&str; 3] = ["granted", "denied", "unknown"];

fn check_verdict(verdict: &str) -> Result<(), AclError> {
    if PANEL_VERDICTS.contains(&verdict) {
        return Ok(());
    }
    Err(AclError::InvalidEvent(format!(
        "panel verdict {verdict:?} is not one of {PANEL_VERDICTS:?}"
    )))
}

/// A verdict that came after its row was written is a note ([`notes`]): shown with the event
/// locally, never written into the row.
const EVENT_COLUMNS: &str = "id, time_ms, door, transport, endpoint_fingerprint, person_id, \
                             credential_id, decision, reason, latency_ms, delivered_at, \
                             coalesce(panel_verdict, (SELECT n.value FROM event_notes n \
                             WHERE n.event_id = events.id AND n.kind = 'panel_verdict')), \
                             lower(hex(uid)), panel_verdict";

/// `meta` key: events deleted by retention before they were delivered (a running total).
const META_PRUNED_UNDELIVERED: &str = "events_pruned_undelivered";
/// `meta` key: event writes that failed (disk full, I/O error), as far as they could be
/// counted in the database afterwards.
const META_WRITE_FAILED: &str = "events_write_failed";

/// How many events the outbox keeps (`[events]` in the configuration). The oldest go first,
/// delivered or not; undelivered ones pruned are counted ([`Store::events_pruned_undelivered`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Most rows kept. Pruning starts above this and goes 1% below it, so it runs once per
    /// 1% of new events rather than at every insert.
    pub max_rows: u64,
    /// Rows older than this (by `time_ms`) are pruned; `None`: no age limit.
    pub max_age_ms: Option<i64>,
}

/// Default [`Retention::max_rows`]: at least a million events kept while offline.
pub const DEFAULT_MAX_EVENTS: u64 = 1_000_000;

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_rows: DEFAULT_MAX_EVENTS,
            max_age_ms: None,
        }
    }
}

/// Most rows one pruning step deletes: one short write transaction (tens of milliseconds), so
/// a big backlog of pruning never holds the writer long.
pub const PRUNE_BATCH: i64 = 10_000;

/// What one [`Store::prune_events`] step deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub rows: u64,
    /// Of those, rows not yet delivered.
    pub undelivered: u64,
    /// More is over the bound: call again.
    pub more: bool,
}

fn read_event(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredEvent> {
    let id: i64 = r.get(0)?;
    let transport: String = r.get(3)?;
    let decision: String = r.get(7)?;
    let bad = |col: usize, what: &str| {
        rusqlite::Error::FromSqlConversionFailure(
            col,
            rusqlite::types::Type::Text,
            format!("event {id}: unknown {what}").into(),
        )
    };
    Ok(StoredEvent {
        id,
        event: AccessEvent {
            time_ms: r.get(1)?,
            door: r.get(2)?,
            transport: Transport::parse(&transport).ok_or_else(|| bad(3, "transport"))?,
            endpoint_fingerprint: r.get(4)?,
            person_id: r.get(5)?,
            credential_id: r.get(6)?,
            decision: EventDecision::parse(&decision).ok_or_else(|| bad(7, "decision"))?,
            reason: r.get(8)?,
            latency_ms: r.get(9)?,
        },
        delivered_at_ms: r.get(10)?,
        panel_verdict: r.get(11)?,
        uid: r.get::<_, Option<String>>(12)?.unwrap_or_default(),
        recorded_verdict: r.get(13)?,
    })
}

impl Store {
    /// Appends `event` to the outbox; returns its id (strictly increasing).
    pub fn record_event(&mut self, event: &AccessEvent) -> Result<i64, AclError> {
        self.record_attempt(event, None)
    }

    /// [`record_event`](Self::record_event) for the attempt whose card went to the panel under
    /// `attempt` (its verdict is then stored with [`set_panel_verdict`](Self::set_panel_verdict)).
    pub fn record_attempt(
        &mut self,
        event: &AccessEvent,
        attempt: Option<i64>,
    ) -> Result<i64, AclError> {
        self.record_with_verdict(event, attempt, None)
    }

    /// [`record_attempt`](Self::record_attempt) with the panel's verdict when it came before
    /// the row (it is then part of the event as it goes up). A grant that is its credential's
    /// first also gets a `first_use` note, in the same transaction.
    pub fn record_with_verdict(
        &mut self,
        event: &AccessEvent,
        attempt: Option<i64>,
        verdict: Option<&str>,
    ) -> Result<i64, AclError> {
        event.validate()?;
        if let Some(v) = verdict {
            check_verdict(v)?;
        }
        let tx = self.conn.transaction()?;
        let id = {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO events (time_ms, door, transport, endpoint_fingerprint, person_id, \
                 credential_id, decision, reason, latency_ms, attempt_id, uid, panel_verdict) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, randomblob(16), ?11)",
            )?;
            stmt.execute(rusqlite::params![
                event.time_ms,
                event.door,
                event.transport.as_str(),
                event.endpoint_fingerprint,
                event.person_id,
                event.credential_id,
                event.decision.as_str(),
                event.reason,
                event.latency_ms,
                attempt,
                verdict,
            ])?;
            tx.last_insert_rowid()
        };
        if let (EventDecision::Granted, Some(cred)) = (event.decision, event.credential_id) {
            notes::first_use(&tx, id, cred, event.time_ms)?;
        }
        tx.commit()?;
        Ok(id)
    }

    /// Records the panel's `verdict` on the event of `attempt`, unless it has one already;
    /// returns that event's id, or `None` when no such event is stored (yet). The row itself
    /// is never edited (it may have gone up to the cloud): the verdict becomes a note on it.
    pub fn set_panel_verdict(
        &mut self,
        attempt: i64,
        verdict: &str,
    ) -> Result<Option<i64>, AclError> {
        check_verdict(verdict)?;
        let tx = self.conn.transaction()?;
        let row: Option<(i64, Option<String>)> = tx
            .query_row(
                "SELECT id, panel_verdict FROM events WHERE attempt_id = ?1",
                [attempt],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((id, recorded)) = row else {
            return Ok(None);
        };
        if recorded.is_none() {
            notes::late_verdict(&tx, id, verdict, unix_ms(time::OffsetDateTime::now_utc()))?;
        }
        tx.commit()?;
        Ok(Some(id))
    }

    /// The newest `limit` events, newest first.
    pub fn recent_events(&self, limit: usize) -> Result<Vec<StoredEvent>, AclError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {EVENT_COLUMNS} FROM events ORDER BY id DESC LIMIT ?1"
        ))?;
        let rows = stmt.query_map([limit], read_event)?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Up to `limit` undelivered events with id greater than `after_id`, oldest first (the
    /// cloud sync's next batch).
    pub fn undelivered_events(
        &self,
        after_id: i64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, AclError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE delivered_at IS NULL AND id > ?1 \
             ORDER BY id LIMIT ?2"
        ))?;
        let rows = stmt.query_map([after_id, limit], read_event)?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Marks every undelivered event with id `<= up_to_id` as delivered at `at_ms`; returns
    /// how many rows changed.
    pub fn mark_delivered(&mut self, up_to_id: i64, at_ms: i64) -> Result<usize, AclError> {
        Ok(self.conn.execute(
            "UPDATE events SET delivered_at = ?2 WHERE delivered_at IS NULL AND id <= ?1",
            [up_to_id, at_ms],
        )?)
    }

    /// One step of retention: deletes the oldest rows (by id, so the ids left stay one
    /// contiguous run) beyond `retention`, at most [`PRUNE_BATCH`] of them, in one transaction
    /// that also adds the undelivered ones among them to the persistent counter. Cheap when
    /// nothing is over the bound (three index probes).
    pub fn prune_events(&mut self, retention: &Retention, now_ms: i64) -> Result<Pruned, AclError> {
        let (first, last, oldest_ms): (Option<i64>, Option<i64>, Option<i64>) =
            self.conn.query_row(
                "SELECT (SELECT min(id) FROM events), (SELECT max(id) FROM events),
                        (SELECT time_ms FROM events ORDER BY id LIMIT 1)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )?;
        let (Some(first), Some(last)) = (first, last) else {
            return Ok(Pruned::default());
        };
        let max_rows = i64::try_from(retention.max_rows).unwrap_or(i64::MAX);
        // Ids are contiguous (only the oldest are ever deleted), so the row count is a span.
        let rows = last - first + 1;
        // The first id to keep; `first` = nothing to prune.
        let mut keep_from = first;
        if rows > max_rows {
            keep_from = last - (max_rows - max_rows / 100) + 1;
        }
        if let (Some(age), Some(oldest)) = (retention.max_age_ms, oldest_ms) {
            let cutoff = now_ms.saturating_sub(age);
            if oldest < cutoff {
                // 1% deeper, so the next age prune is due only after 1% of the age passed.
                let deeper = cutoff.saturating_add(age / 100);
                let until: i64 = self.conn.query_row(
                    // None young enough within the batch: past it (the batch goes, more
                    // may follow).
                    "SELECT coalesce((SELECT id FROM events WHERE id >= ?1 AND id < ?2
                                      AND time_ms >= ?3 ORDER BY id LIMIT 1), ?2 + 1)",
                    [first, first.saturating_add(PRUNE_BATCH), deeper],
                    |r| r.get(0),
                )?;
                keep_from = keep_from.max(until);
            }
        }
        if keep_from <= first {
            return Ok(Pruned::default());
        }
        let more = keep_from > first.saturating_add(PRUNE_BATCH);
        let cut = keep_from.min(first.saturating_add(PRUNE_BATCH));
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let undelivered: i64 = tx.query_row(
            "SELECT count(*) FROM events WHERE delivered_at IS NULL AND id < ?1",
            [cut],
            |r| r.get(0),
        )?;
        // Notes go with their events (one bound for both), counted on their own.
        let notes_lost = notes::prune(&tx, cut)?;
        if notes_lost > 0 {
            add_counter(&tx, notes::META_PRUNED_UNDELIVERED, notes_lost)?;
        }
        let rows = tx.execute("DELETE FROM events WHERE id < ?1", [cut])?;
        if undelivered > 0 {
            add_counter(&tx, META_PRUNED_UNDELIVERED, undelivered)?;
        }
        tx.commit()?;
        Ok(Pruned {
            rows: rows as u64,
            undelivered: u64::try_from(undelivered).unwrap_or(0),
            more,
        })
    }

    /// Events deleted by retention before delivery, ever (persistent).
    pub fn events_pruned_undelivered(&self) -> Result<u64, AclError> {
        self.counter(META_PRUNED_UNDELIVERED)
    }

    /// Event writes that failed, as far as they were counted afterwards (persistent; the
    /// daemon adds its in-memory count at the next write that succeeds).
    pub fn events_write_failed(&self) -> Result<u64, AclError> {
        self.counter(META_WRITE_FAILED)
    }

    /// Adds `n` to the persistent count of failed event writes.
    pub fn add_events_write_failed(&mut self, n: u64) -> Result<(), AclError> {
        add_counter(
            &self.conn,
            META_WRITE_FAILED,
            i64::try_from(n).unwrap_or(i64::MAX),
        )?;
        Ok(())
    }

    pub(crate) fn counter(&self, key: &str) -> Result<u64, AclError> {
        let v: Option<i64> = self
            .conn
            .query_row(
                "SELECT CAST(value AS INTEGER) FROM meta WHERE key = ?1",
                [key],
                |r| r.get(0),
            )
            .optional()?;
        Ok(v.and_then(|v| u64::try_from(v).ok()).unwrap_or(0))
    }
}

/// The outbox in three index probes, whatever its size: how many events are not delivered yet
/// and the time of the oldest. Delivery (`mark_delivered`) and retention both act on a prefix
/// of the ids, so the undelivered rows are the ids from the first undelivered one to the last.
pub fn outbox_depth(conn: &rusqlite::Connection) -> rusqlite::Result<(u64, Option<i64>)> {
    let first: Option<(i64, i64)> = conn
        .query_row(
            "SELECT id, time_ms FROM events WHERE delivered_at IS NULL ORDER BY id LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let Some((first, oldest_ms)) = first else {
        return Ok((0, None));
    };
    let last: i64 = conn.query_row("SELECT max(id) FROM events", [], |r| r.get(0))?;
    Ok((
        u64::try_from(last.saturating_sub(first).saturating_add(1)).unwrap_or(0),
        Some(oldest_ms),
    ))
}

/// Rows in the outbox in two index probes (ids are one contiguous run, see [`outbox_depth`]).
pub fn event_count(conn: &rusqlite::Connection) -> rusqlite::Result<u64> {
    let (first, last): (Option<i64>, Option<i64>) = conn.query_row(
        "SELECT (SELECT min(id) FROM events), (SELECT max(id) FROM events)",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    Ok(match (first, last) {
        (Some(a), Some(b)) => u64::try_from(b.saturating_sub(a).saturating_add(1)).unwrap_or(0),
        _ => 0,
    })
}

/// Adds `n` to the integer kept in `meta` under `key`.
fn add_counter(conn: &rusqlite::Connection, key: &str, n: i64) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?1, CAST(?2 AS TEXT))
         ON CONFLICT (key) DO UPDATE SET value = CAST(CAST(value AS INTEGER) + ?2 AS TEXT)",
        rusqlite::params![key, n],
    )?;
    Ok(())
}

/// A key-value field of the access log record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FieldValue {
    Str(String),
    Int(i64),
}

impl fmt::Display for FieldValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FieldValue::Str(s) => f.write_str(s),
            FieldValue::Int(i) => write!(f, "{i}"),
        }
    }
}

/// The structured fields of the log record for `event`, in order. Absent values are left
/// out rather than logged as "None". systemd-journal-logger upper-cases the keys into
/// journald fields (`door` -> `DOOR`).
pub fn log_fields(event: &AccessEvent, event_id: i64) -> Vec<(&'static str, FieldValue)> {
    let mut f = vec![
        ("event_id", FieldValue::Int(event_id)),
        ("door", FieldValue::Str(event.door.clone())),
        ("decision", FieldValue::Str(event.decision.as_str().into())),
        ("reason", FieldValue::Str(event.reason.clone())),
        (
            "transport",
            FieldValue::Str(event.transport.as_str().into()),
        ),
        ("latency_ms", FieldValue::Int(i64::from(event.latency_ms))),
    ];
    if let Some(fp) = &event.endpoint_fingerprint {
        f.push(("fingerprint", FieldValue::Str(fp.clone())));
    }
    if let Some(p) = &event.person_id {
        f.push(("person", FieldValue::Str(p.clone())));
    }
    if let Some(c) = event.credential_id {
        f.push(("credential_id", FieldValue::Int(c)));
    }
    f
}

/// The human-readable message of the log record (journald `MESSAGE`).
pub fn log_message(event: &AccessEvent, event_id: i64) -> String {
    let mut m = format!("access {} door={}", event.decision, event.door);
    if event.decision != EventDecision::Granted {
        m.push_str(&format!(" reason={}", event.reason));
    }
    if let Some(p) = &event.person_id {
        m.push_str(&format!(" person={p}"));
    }
    if let Some(fp) = &event.endpoint_fingerprint {
        m.push_str(&format!(" fp={fp}"));
    }
    m.push_str(&format!(
        " via {} in {} ms (event {event_id})",
        event.transport.as_str(),
        event.latency_ms
    ));
    m
}

struct Fields(Vec<(&'static str, FieldValue)>);

impl log::kv::Source for Fields {
    fn visit<'kvs>(
        &'kvs self,
        visitor: &mut dyn log::kv::VisitSource<'kvs>,
    ) -> Result<(), log::kv::Error> {
        for (k, v) in &self.0 {
            let value = match v {
                FieldValue::Str(s) => log::kv::Value::from(s.as_str()),
                FieldValue::Int(i) => log::kv::Value::from(*i),
            };
            visitor.visit_pair(log::kv::Key::from_str(k), value)?;
        }
        Ok(())
    }
}

/// Emits ONE `log` record for `event` on target [`LOG_TARGET`] with the fields of
/// [`log_fields`]: `info` for granted and denied, `warn` for errors.
///
/// Built with `Record::builder` rather than `log::info!` so absent fields are omitted
/// instead of appearing as `None` in journald.
pub fn log_event(event: &AccessEvent, event_id: i64) {
    let level = match event.decision {
        EventDecision::Granted | EventDecision::Denied => log::Level::Info,
        EventDecision::Error => log::Level::Warn,
    };
    if level > log::max_level() {
        return;
    }
    let fields = Fields(log_fields(event, event_id));
    let message = log_message(event, event_id);
    log::logger().log(
        &log::Record::builder()
            .level(level)
            .target(LOG_TARGET)
            .args(format_args!("{message}"))
            .key_values(&fields)
            .module_path_static(Some(module_path!()))
            .file_static(Some(file!()))
            .line(Some(line!()))
            .build(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acl::{DenyReason, Grant};
    use crate::card::CardFormat;

    fn ev(decision: EventDecision, reason: &str) -> AccessEvent {
        AccessEvent {
            time_ms: 1_700_000_000_123,
            door: "front".into(),
            transport: Transport::Nfc,
            endpoint_fingerprint: Some("0011223344556677".into()),
            person_id: Some("p-1".into()),
            credential_id: Some(3),
            decision,
            reason: reason.into(),
            latency_ms: 87,
        }
    }

    #[test]
    fn panel_verdict_goes_to_the_event_of_its_attempt() {
        let mut s = Store::open_in_memory().unwrap();
        let granted = || ev(EventDecision::Granted, "granted");
        // Two grants at one door, recorded in the other order than their cards left.
        let second = s.record_attempt(&granted(), Some(2)).unwrap();
        let first = s.record_attempt(&granted(), Some(1)).unwrap();
        let plain = s.record_event(&granted()).unwrap();
        let _denied = s
            .record_event(&ev(EventDecision::Denied, "expired"))
            .unwrap();
        assert_eq!(s.set_panel_verdict(1, "denied").unwrap(), Some(first));
        assert_eq!(s.set_panel_verdict(2, "granted").unwrap(), Some(second));
        // Once set, a verdict stays (the row is found, nothing changes); an attempt with no
        // row yet is reported as such.
        assert_eq!(s.set_panel_verdict(1, "granted").unwrap(), Some(first));
        assert_eq!(s.set_panel_verdict(3, "granted").unwrap(), None);
        assert!(s.set_panel_verdict(3, "green").is_err());
        // An attempt id names one event.
        assert!(s.record_attempt(&granted(), Some(2)).is_err());

        let by_id: std::collections::HashMap<i64, Option<String>> = s
            .recent_events(10)
            .unwrap()
            .into_iter()
            .map(|e| (e.id, e.panel_verdict))
            .collect();
        assert_eq!(by_id[&first].as_deref(), Some("denied"));
        assert_eq!(by_id[&second].as_deref(), Some("granted"));
        assert_eq!(by_id[&plain], None);
        // Serialized only when known.
        let json = serde_json::to_string(&s.recent_events(1).unwrap()[0]).unwrap();
        assert!(!json.contains("panel_verdict"), "{json}");
    }

    #[test]
    fn outbox_ids_increase_and_delivery_is_ordered() {
        let mut s = Store::open_in_memory().unwrap();
        let a = s
            .record_event(&ev(EventDecision::Granted, "granted"))
            .unwrap();
        let b = s
            .record_event(&ev(EventDecision::Denied, "expired"))
            .unwrap();
        let c = s
            .record_event(&ev(EventDecision::Error, "timeout"))
            .unwrap();
        assert!(a < b && b < c);
        let recent = s.recent_events(2).unwrap();
        assert_eq!(recent.iter().map(|e| e.id).collect::<Vec<_>>(), vec![c, b]);
        assert_eq!(recent[1].event, ev(EventDecision::Denied, "expired"));
        assert_eq!(recent[0].delivered_at_ms, None);
        assert_eq!(s.mark_delivered(b, 5).unwrap(), 2);
        let pending = s.undelivered_events(0, 10).unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].id, c);
        assert_eq!(s.stats().unwrap().events_undelivered, 1);
        // Pruning never lets a new event reuse an old id.
        s.conn.execute("DELETE FROM events", []).unwrap();
        let d = s
            .record_event(&ev(EventDecision::Granted, "granted"))
            .unwrap();
        assert!(d > c);
    }

    #[test]
    fn every_event_has_its_own_random_uid() {
        let mut s = Store::open_in_memory().unwrap();
        for _ in 0..50 {
            s.record_event(&ev(EventDecision::Granted, "granted"))
                .unwrap();
        }
        let mut other = Store::open_in_memory().unwrap();
        other
            .record_event(&ev(EventDecision::Granted, "granted"))
            .unwrap();
        let mut uids: Vec<String> = s
            .recent_events(100)
            .unwrap()
            .into_iter()
            .chain(other.recent_events(1).unwrap())
            .map(|e| e.uid)
            .collect();
        assert!(uids
            .iter()
            .all(|u| u.len() == 32 && u.bytes().all(|b| b.is_ascii_hexdigit())));
        uids.sort();
        uids.dedup();
        // Unique within a database and across databases (the other one's id is also 1).
        assert_eq!(uids.len(), 51);
        let json = serde_json::to_value(&other.recent_events(1).unwrap()[0]).unwrap();
        assert_eq!(json["uid"].as_str().map(str::len), Some(32));
    }

    fn events_at(s: &mut Store, times: impl IntoIterator<Item = i64>) -> Vec<i64> {
        times
            .into_iter()
            .map(|t| {
                s.record_event(&AccessEvent {
                    time_ms: t,
                    ..ev(EventDecision::Granted, "granted")
                })
                .unwrap()
            })
            .collect()
    }

    fn ids(s: &Store) -> Vec<i64> {
        let mut v: Vec<i64> = s
            .recent_events(usize::MAX)
            .unwrap()
            .iter()
            .map(|e| e.id)
            .collect();
        v.reverse();
        v
    }

    #[test]
    fn retention_by_rows_prunes_the_oldest_and_counts_the_undelivered() {
        let mut s = Store::open_in_memory().unwrap();
        let r = Retention {
            max_rows: 200,
            max_age_ms: None,
        };
        let all = events_at(&mut s, 0..200);
        // At the bound: nothing to do.
        assert_eq!(s.prune_events(&r, 0).unwrap(), Pruned::default());
        s.mark_delivered(all[2], 9).unwrap();
        events_at(&mut s, [200]);
        // Over by one: down to 1% under the bound (198), the oldest first.
        let p = s.prune_events(&r, 0).unwrap();
        assert_eq!(
            p,
            Pruned {
                rows: 3,
                undelivered: 0,
                more: false
            }
        );
        assert_eq!(ids(&s).first(), Some(&all[3]));
        assert_eq!(ids(&s).len(), 198);
        // Two more fit; the next is over the bound again and takes undelivered rows.
        events_at(&mut s, 201..203);
        assert_eq!(s.prune_events(&r, 0).unwrap().rows, 0);
        events_at(&mut s, [204]);
        let p = s.prune_events(&r, 0).unwrap();
        assert_eq!((p.rows, p.undelivered), (3, 3));
        assert_eq!(s.events_pruned_undelivered().unwrap(), 3);
        assert_eq!(s.stats().unwrap().events_pruned_undelivered, 3);
        assert_eq!(s.stats().unwrap().events_total, 198);
    }

    #[test]
    fn retention_prunes_in_bounded_steps() {
        let mut s = Store::open_in_memory().unwrap();
        let n = PRUNE_BATCH as usize * 2 + 10;
        events_at(&mut s, (0..n).map(|t| t as i64));
        let r = Retention {
            max_rows: 5,
            max_age_ms: None,
        };
        let mut steps = vec![];
        loop {
            let p = s.prune_events(&r, 0).unwrap();
            steps.push(p.rows);
            if !p.more {
                break;
            }
        }
        assert_eq!(
            steps,
            vec![PRUNE_BATCH as u64, PRUNE_BATCH as u64, 5],
            "each step at most one batch"
        );
        assert_eq!(ids(&s).len(), 5);
        assert_eq!(s.events_pruned_undelivered().unwrap(), n as u64 - 5);
    }

    #[test]
    fn retention_by_age_prunes_older_rows_with_slack() {
        let mut s = Store::open_in_memory().unwrap();
        let day = 86_400_000;
        let r = Retention {
            max_rows: 1_000_000,
            max_age_ms: Some(100 * day),
        };
        let kept = events_at(&mut s, [0, day, 2 * day, 50 * day, 120 * day]);
        // At day 100 nothing is older than 100 days.
        assert_eq!(s.prune_events(&r, 100 * day).unwrap().rows, 0);
        // At day 101 the first row is: it goes with everything within 1% (a day) after it.
        let p = s.prune_events(&r, 101 * day).unwrap();
        assert_eq!((p.rows, p.undelivered, p.more), (2, 2, false));
        assert_eq!(ids(&s), kept[2..].to_vec());
        // The next one is due only a day later.
        assert_eq!(s.prune_events(&r, 101 * day + 1).unwrap().rows, 0);
        assert_eq!(s.prune_events(&r, 102 * day + 1).unwrap().rows, 1);
    }

    #[test]
    fn invalid_events_are_refused() {
        let mut s = Store::open_in_memory().unwrap();
        for bad in [
            AccessEvent {
                door: "front door".into(),
                ..ev(EventDecision::Granted, "granted")
            },
            ev(EventDecision::Denied, "Not Valid"),
            ev(EventDecision::Denied, ""),
            AccessEvent {
                endpoint_fingerprint: Some("zz".into()),
                ..ev(EventDecision::Denied, "expired")
            },
            AccessEvent {
                person_id: Some("a\nb".into()),
                ..ev(EventDecision::Denied, "expired")
            },
        ] {
            assert!(matches!(
                s.record_event(&bad),
                Err(AclError::InvalidEvent(_))
            ));
        }
        assert_eq!(s.recent_events(10).unwrap().len(), 0);
    }

    #[test]
    fn from_decision_carries_ids_not_card_data() {
        let key = [9u8; 5];
        let g = Decision::Grant(Grant {
            credential_id: 12,
            person_id: "p-9".into(),
            card_format: CardFormat::H10301,
            facility_code: 1,
            card_number: 4242,
        });
        let e = AccessEvent::from_decision(1, "d1", Transport::Ble, &key, &g, 5);
        assert_eq!(e.decision, EventDecision::Granted);
        assert_eq!(e.reason, "granted");
        assert_eq!(e.person_id.as_deref(), Some("p-9"));
        assert_eq!(e.credential_id, Some(12));
        assert_eq!(e.endpoint_fingerprint, Some(fingerprint(&key)));
        let json = serde_json::to_string(&e).unwrap();
        assert!(!json.contains("4242"), "{json}");
        let d = AccessEvent::from_decision(
            1,
            "d1",
            Transport::Nfc,
            &key,
            &Decision::Deny(DenyReason::WrongDoor),
            5,
        );
        assert_eq!(
            (d.decision, d.reason.as_str()),
            (EventDecision::Denied, "wrong_door")
        );
        assert_eq!(d.person_id, None);
        let x = AccessEvent::error(1, "d1", Transport::Nfc, None, "auth_failed", 9);
        assert_eq!(x.endpoint_fingerprint, None);
        assert!(x.validate().is_ok());
    }

    #[test]
    fn serde_shape_is_stable() {
        let v = serde_json::to_value(ev(EventDecision::Denied, "expired")).unwrap();
        assert_eq!(v["transport"], "nfc");
        assert_eq!(v["decision"], "denied");
        assert_eq!(v["time_ms"], 1_700_000_000_123i64);
        assert_eq!(v["endpoint_fingerprint"], "0011223344556677");
        let back: AccessEvent = serde_json::from_value(v).unwrap();
        assert_eq!(back, ev(EventDecision::Denied, "expired"));
    }

    #[test]
    fn log_fields_omit_absent_values() {
        let e = AccessEvent::error(1, "d1", Transport::Nfc, None, "timeout", 9);
        let f = log_fields(&e, 44);
        let keys: Vec<_> = f.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            keys,
            vec![
                "event_id",
                "door",
                "decision",
                "reason",
                "transport",
                "latency_ms"
            ]
        );
        assert_eq!(f[0].1, FieldValue::Int(44));
        assert_eq!(f[3].1, FieldValue::Str("timeout".into()));
        let full = log_fields(&ev(EventDecision::Granted, "granted"), 1);
        assert!(full.contains(&("person", FieldValue::Str("p-1".into()))));
        assert!(full.contains(&("fingerprint", FieldValue::Str("0011223344556677".into()))));
        assert_eq!(
            log_message(&ev(EventDecision::Denied, "expired"), 7),
            "access denied door=front reason=expired person=p-1 fp=0011223344556677 via nfc in 87 ms (event 7)"
        );
    }

    #[test]
    fn unix_ms_converts() {
        let t = time::OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap()
            + time::Duration::milliseconds(123);
        assert_eq!(unix_ms(t), 1_700_000_000_123);
    }
}
