//! Notes on events: what the cloud learns about an event after it was written, sent as
//! messages of their own that name the event's `uid` (docs/mqtt-api.md, `notes`), so an event
//! row that may already have gone up is never edited.
//!
//! - `panel_verdict`: the panel's verdict came after the event row was written.
//! - `first_use`: the first grant of a credential (a backend moves it from issued to active);
//!   once per credential, durable (`credential_first_use`).
//!
//! Notes are kept in `event_notes` until the backend acks them, like events, and go up only
//! once their event has been acked (or pruned), so a backend always has the event first. They
//! are bounded by the events retention: a note is pruned with its event.

use rusqlite::{Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use super::Store;
use crate::acl::AclError;

/// `meta` key: notes deleted by retention after their event was delivered but before they
/// were (a running total; a note on an undelivered event is counted as that event).
pub const META_PRUNED_UNDELIVERED: &str = "notes_pruned_undelivered";

/// A note's kind.
pub const KIND_PANEL_VERDICT: &str = "panel_verdict";
pub const KIND_FIRST_USE: &str = "first_use";

/// A note as stored, ready to go up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredNote {
    /// The notes' own sequence (acked with `notes/ack`).
    pub seq: i64,
    /// The note's stable id (32 hex digits): dedupe on it.
    pub uid: String,
    /// `panel_verdict` or `first_use`.
    pub kind: String,
    /// The event it is about.
    pub event_uid: String,
    pub door: String,
    /// Unix ms: when the verdict came; for `first_use`, the event's time.
    pub time_ms: i64,
    /// `panel_verdict`: the verdict (`granted`, `denied`, `unknown`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub panel_verdict: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub credential_id: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub person_id: Option<String>,
}

/// Adds a note of `kind` on event `event_id`, copying what identifies it from the row.
fn add(
    conn: &Connection,
    event_id: i64,
    kind: &str,
    value: Option<&str>,
    time_ms: i64,
) -> Result<(), AclError> {
    conn.prepare_cached(
        "INSERT INTO event_notes (uid, event_id, event_uid, kind, value, door, credential_id, \
         person_id, time_ms) \
         SELECT randomblob(16), id, uid, ?2, ?3, door, credential_id, person_id, ?4 \
         FROM events WHERE id = ?1",
    )?
    .execute(rusqlite::params![event_id, kind, value, time_ms])?;
    Ok(())
}

/// In the event's write transaction: a `first_use` note when `credential` was never granted
/// before.
pub(super) fn first_use(
    conn: &Connection,
    event_id: i64,
    credential: i64,
    time_ms: i64,
) -> Result<(), AclError> {
    let new = conn
        .prepare_cached(
            "INSERT OR IGNORE INTO credential_first_use (credential_id, event_id, time_ms) \
             VALUES (?1, ?2, ?3)",
        )?
        .execute([credential, event_id, time_ms])?;
    if new == 1 {
        add(conn, event_id, KIND_FIRST_USE, None, time_ms)?;
    }
    Ok(())
}

/// A verdict that came after its event row: one note per event (the first verdict wins).
pub(super) fn late_verdict(
    conn: &Connection,
    event_id: i64,
    verdict: &str,
    time_ms: i64,
) -> Result<(), AclError> {
    let had: Option<i64> = conn
        .query_row(
            "SELECT seq FROM event_notes WHERE event_id = ?1 AND kind = ?2",
            rusqlite::params![event_id, KIND_PANEL_VERDICT],
            |r| r.get(0),
        )
        .optional()?;
    if had.is_none() {
        add(conn, event_id, KIND_PANEL_VERDICT, Some(verdict), time_ms)?;
    }
    Ok(())
}

/// Deletes the notes of events with id below `cut` (retention, in its transaction, before
/// the events go). Returns how many of them count as dropped: undelivered notes on events
/// that were delivered (a note on an undelivered event goes with it, counted as that event).
pub(super) fn prune(conn: &Connection, cut: i64) -> Result<i64, AclError> {
    let lost: i64 = conn.query_row(
        "SELECT count(*) FROM event_notes n WHERE n.event_id < ?1 AND n.delivered_at IS NULL \
         AND EXISTS (SELECT 1 FROM events e WHERE e.id = n.event_id \
                     AND e.delivered_at IS NOT NULL)",
        [cut],
        |r| r.get(0),
    )?;
    conn.execute("DELETE FROM event_notes WHERE event_id < ?1", [cut])?;
    Ok(lost)
}

fn read_note(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredNote> {
    let kind: String = r.get(2)?;
    let value: Option<String> = r.get(6)?;
    Ok(StoredNote {
        seq: r.get(0)?,
        uid: r.get(1)?,
        panel_verdict: if kind == KIND_PANEL_VERDICT {
            value
        } else {
            None
        },
        kind,
        event_uid: r.get::<_, Option<String>>(3)?.unwrap_or_default(),
        door: r.get(4)?,
        time_ms: r.get(5)?,
        credential_id: r.get(7)?,
        person_id: r.get(8)?,
    })
}

impl Store {
    /// Up to `limit` unacked notes with `seq > after`, oldest first, whose events have been
    /// acked (or pruned): the cloud's next notes batch.
    pub fn undelivered_notes(&self, after: i64, limit: usize) -> Result<Vec<StoredNote>, AclError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut stmt = self.conn.prepare_cached(
            "SELECT n.seq, lower(hex(n.uid)), n.kind, lower(hex(n.event_uid)), n.door, \
             n.time_ms, n.value, n.credential_id, n.person_id FROM event_notes n \
             WHERE n.delivered_at IS NULL AND n.seq > ?1 \
             AND NOT EXISTS (SELECT 1 FROM events e WHERE e.id = n.event_id \
                             AND e.delivered_at IS NULL) \
             ORDER BY n.seq LIMIT ?2",
        )?;
        let rows = stmt.query_map([after, limit], read_note)?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Marks every undelivered note with `seq <= through` as delivered at `at_ms`.
    pub fn mark_notes_delivered(&mut self, through: i64, at_ms: i64) -> Result<usize, AclError> {
        Ok(self.conn.execute(
            "UPDATE event_notes SET delivered_at = ?2 WHERE delivered_at IS NULL AND seq <= ?1",
            [through, at_ms],
        )?)
    }

    /// Notes dropped by retention before they were delivered, ever (persistent).
    pub fn notes_pruned_undelivered(&self) -> Result<u64, AclError> {
        self.counter(META_PRUNED_UNDELIVERED)
    }

    /// Notes not yet acked (waiting for their events included).
    pub fn notes_undelivered(&self) -> Result<u64, AclError> {
        let n: i64 = self.conn.query_row(
            "SELECT count(*) FROM event_notes WHERE delivered_at IS NULL",
            [],
            |r| r.get(0),
        )?;
        Ok(u64::try_from(n).unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{AccessEvent, EventDecision, Transport};

    fn grant(cred: i64) -> AccessEvent {
        AccessEvent {
            time_ms: 1000 + cred,
            door: "front".into(),
            transport: Transport::Nfc,
            endpoint_fingerprint: Some("00112233".into()),
            person_id: Some(format!("p{cred}")),
            credential_id: Some(cred),
            decision: EventDecision::Granted,
            reason: "granted".into(),
            latency_ms: 5,
        }
    }

    fn kinds(s: &Store) -> Vec<(String, String)> {
        s.undelivered_notes(0, 100)
            .unwrap()
            .into_iter()
            .map(|n| (n.kind, n.event_uid))
            .collect()
    }

    /// The first grant of a credential is a note, once, also after a restart (a reopened
    /// database); denials and errors are not uses. Notes wait for their event's ack.
    #[test]
    fn first_use_once_per_credential_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("k.db");
        let mut s = Store::open(&db).unwrap();
        let a = s.record_event(&grant(1)).unwrap();
        s.record_event(&grant(1)).unwrap();
        s.record_event(&AccessEvent::error(
            1,
            "front",
            Transport::Nfc,
            None,
            "timeout",
            1,
        ))
        .unwrap();
        assert!(kinds(&s).is_empty(), "the event is not acked yet");
        s.mark_delivered(a + 2, 9).unwrap();
        let uid = s.recent_events(3).unwrap()[2].uid.clone();
        assert_eq!(kinds(&s), vec![(KIND_FIRST_USE.to_owned(), uid)]);
        let n = &s.undelivered_notes(0, 10).unwrap()[0];
        assert_eq!(
            (n.credential_id, n.person_id.as_deref()),
            (Some(1), Some("p1"))
        );
        drop(s);
        let mut s = Store::open(&db).unwrap();
        s.record_event(&grant(1)).unwrap();
        let b = s.record_event(&grant(2)).unwrap();
        s.mark_delivered(b, 10).unwrap();
        let notes = s.undelivered_notes(0, 10).unwrap();
        assert_eq!(notes.len(), 2, "credential 1 once, credential 2 once");
        assert_eq!(notes[1].credential_id, Some(2));
        assert_eq!(s.mark_notes_delivered(notes[1].seq, 11).unwrap(), 2);
        assert!(s.undelivered_notes(0, 10).unwrap().is_empty());
        assert_eq!(s.notes_undelivered().unwrap(), 0);
    }

    /// A verdict known when the row is written is part of the event; one that comes later
    /// leaves the row as it was (it may have gone up) and becomes a note, shown locally with
    /// the event. Only the first late verdict counts.
    #[test]
    fn a_late_verdict_is_a_note_and_never_edits_the_row() {
        let mut s = Store::open_in_memory().unwrap();
        let mut e = grant(1);
        e.credential_id = None;
        let early = s
            .record_with_verdict(&e, Some(11), Some("granted"))
            .unwrap();
        let late = s.record_attempt(&e, Some(12)).unwrap();
        s.mark_delivered(late, 5).unwrap();
        let before = s.recent_events(1).unwrap()[0].clone();
        assert_eq!(s.set_panel_verdict(12, "denied").unwrap(), Some(late));
        assert_eq!(s.set_panel_verdict(12, "granted").unwrap(), Some(late));
        // The early one already has its verdict: no note.
        assert_eq!(s.set_panel_verdict(11, "denied").unwrap(), Some(early));
        assert_eq!(s.set_panel_verdict(13, "denied").unwrap(), None);
        let rows = s.recent_events(2).unwrap();
        assert_eq!(rows[0].recorded_verdict, None, "the row is unchanged");
        assert_eq!(rows[0].delivered_at_ms, before.delivered_at_ms);
        assert_eq!(
            rows[0].panel_verdict.as_deref(),
            Some("denied"),
            "shown locally"
        );
        assert_eq!(rows[1].recorded_verdict.as_deref(), Some("granted"));
        let notes = s.undelivered_notes(0, 10).unwrap();
        assert_eq!(notes.len(), 1);
        assert_eq!(
            (notes[0].kind.as_str(), notes[0].panel_verdict.as_deref()),
            (KIND_PANEL_VERDICT, Some("denied"))
        );
        assert_eq!(notes[0].event_uid, rows[0].uid);
        assert_eq!(notes[0].uid.len(), 32);
    }
}
