//! What the sync core needs from local storage, as two small traits, and their implementation
//! over today's [`acl::Store`](crate::acl::Store).
//!
//! The core talks only to [`AclSink`] (apply snapshots and deltas) and [`Outbox`] (the event
//! outbox with application-level acks). [`StoreSync`] writes through the ACL's one apply
//! engine ([`crate::acl::apply`]), the same path as `keyway acl import`: staged, checked and
//! swapped atomically, with the applied version persisted in the same transaction, so an old
//! update cannot be replayed. The cloud's own content hash (the chain the backend can
//! recompute, docs/mqtt-api.md) is kept beside it under `cloud_*` keys in `meta`, written
//! right after the apply; after a power cut between the two, the version is right and the
//! hash is the engine's until the next update.

use rusqlite::OptionalExtension;
use sha2::{Digest, Sha256};
use std::path::Path;

use super::msg::{AclReport, Delta, EventOut, OutboxReport, SnapshotFormat};
use super::stream::{version_error, SnapshotStream};
use crate::acl::apply::{ApplyError, DeltaOp};
use crate::acl::import;
use crate::acl::{AclError, Store, ENDPOINT_KEY_LEN};
use crate::events::notes::StoredNote;
use crate::events::StoredEvent;

/// Errors of the storage side. The core reports them up as `apply_failed`.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("database: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("{0}")]
    Acl(#[from] AclError),
    #[error("{0}")]
    Apply(#[from] ApplyError),
    #[error("snapshot content rejected: {0}")]
    Content(String),
    #[error("applied version is {have:?}, the update needs {need}")]
    VersionMismatch { have: Option<u64>, need: u64 },
    #[error("no snapshot in progress")]
    NoSnapshot,
    #[error("snapshot content exceeds its announced size")]
    TooLong,
}

/// Where verified ACL updates go.
pub trait AclSink {
    /// The applied cloud ACL version and hash (`None` before the first cloud apply).
    fn applied(&mut self) -> Result<Option<AclReport>, SinkError>;
    /// Starts receiving a snapshot of `size` bytes. An unfinished earlier one is dropped.
    fn snapshot_begin(
        &mut self,
        version: u64,
        format: SnapshotFormat,
        size: u64,
    ) -> Result<(), SinkError>;
    /// The next bytes of the snapshot, in order.
    fn snapshot_push(&mut self, bytes: &[u8]) -> Result<(), SinkError>;
    /// The content is complete and its SHA-256 verified: replace the ACL with it and persist
    /// `report` in the same transaction. Refused unless `report.version` is above the applied
    /// one. Returns the number of credentials.
    fn snapshot_commit(&mut self, report: &AclReport) -> Result<usize, SinkError>;
    /// Drops an unfinished snapshot; the ACL is untouched.
    fn snapshot_abort(&mut self);
    /// Applies a delta on top of `delta.base_version` and persists `report` atomically.
    fn apply_delta(&mut self, delta: &Delta, report: &AclReport) -> Result<(), SinkError>;
    /// Removes one credential now (`revoke_now` command); whether it existed.
    fn revoke_now(&mut self, key: &[u8; ENDPOINT_KEY_LEN]) -> Result<bool, SinkError>;
}

/// The event outbox as the core sees it.
pub trait Outbox {
    /// A random id of this outbox (created once per database): with the sequence it makes
    /// event ids unique across gateways and across a rebuilt database.
    fn instance(&mut self) -> Result<String, SinkError>;
    /// Up to `limit` unacked events with `seq > after`, oldest first.
    fn batch(&mut self, after: i64, limit: usize) -> Result<Vec<EventOut>, SinkError>;
    /// The backend stored everything up to `seq`: forget those rows' pending state.
    fn ack_through(&mut self, seq: i64, now_ms: i64) -> Result<usize, SinkError>;
    fn depth(&mut self) -> Result<OutboxReport, SinkError>;
    /// Up to `limit` unacked notes with `seq > after` whose events were acked, oldest first.
    fn notes(&mut self, after: i64, limit: usize) -> Result<Vec<StoredNote>, SinkError>;
    /// The backend stored every note up to `seq`.
    fn ack_notes_through(&mut self, seq: i64, now_ms: i64) -> Result<usize, SinkError>;
}

const META_VERSION: &str = "cloud_acl_version";
const META_HASH: &str = "cloud_acl_hash";
const META_APPLIED_AT: &str = "cloud_acl_applied_at_ms";
const META_INSTANCE: &str = "cloud_outbox_instance";
const META_BOOT: &str = "cloud_boot";
/// Unix ms when the link was last connected (the offline policy's clock across restarts).
const META_LAST_CONTACT: &str = "cloud_last_contact_ms";

/// [`AclSink`] + [`Outbox`] over [`Store`]. A snapshot is streamed into the apply engine as
/// its chunks come ([`SnapshotStream`]): memory does not grow with its size.
pub struct StoreSync {
    store: Store,
    pending: Option<Pending>,
}

struct Pending {
    version: u64,
    size: u64,
    received: u64,
    stream: SnapshotStream,
}

fn meta_get(conn: &rusqlite::Connection, key: &str) -> Result<Option<String>, rusqlite::Error> {
    conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()
}

fn meta_set(conn: &rusqlite::Connection, key: &str, value: &str) -> Result<(), rusqlite::Error> {
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2) \
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        [key, value],
    )?;
    Ok(())
}

/// The applied version is the engine's (authoritative: it moves with the ACL); hash and time
/// are the cloud's for that version when recorded, else the engine's.
fn read_applied(store: &Store) -> Result<Option<AclReport>, SinkError> {
    let engine = store.applied()?;
    let Some(version) = engine.version else {
        return Ok(None);
    };
    let conn = &store.conn;
    let recorded = meta_get(conn, META_VERSION)?.and_then(|v| v.parse::<u64>().ok());
    if recorded == Some(version) {
        return Ok(Some(AclReport {
            version,
            hash: meta_get(conn, META_HASH)?.unwrap_or_default(),
            applied_at_ms: meta_get(conn, META_APPLIED_AT)?
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        }));
    }
    Ok(Some(AclReport {
        version,
        hash: engine.hash,
        applied_at_ms: engine.applied_at.saturating_mul(1000),
    }))
}

fn record_applied(conn: &rusqlite::Connection, r: &AclReport) -> Result<(), rusqlite::Error> {
    let tx = conn.unchecked_transaction()?;
    meta_set(&tx, META_VERSION, &r.version.to_string())?;
    meta_set(&tx, META_HASH, &r.hash)?;
    meta_set(&tx, META_APPLIED_AT, &r.applied_at_ms.to_string())?;
    tx.commit()
}

impl StoreSync {
    pub fn new(store: Store) -> StoreSync {
        StoreSync {
            store,
            pending: None,
        }
    }

    pub fn open(path: &Path) -> Result<StoreSync, AclError> {
        Ok(StoreSync::new(Store::open(path)?))
    }

    pub fn store(&mut self) -> &mut Store {
        &mut self.store
    }

    /// Counts this process start and returns the new boot number (birth/death `boot`).
    pub fn next_boot(&mut self) -> Result<u64, SinkError> {
        let tx = self.store.conn.transaction()?;
        let boot = meta_get(&tx, META_BOOT)?
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            .saturating_add(1);
        meta_set(&tx, META_BOOT, &boot.to_string())?;
        tx.commit()?;
        Ok(boot)
    }
}

impl StoreSync {
    /// When the link was last connected to a broker (unix ms), if ever.
    pub fn last_contact_ms(&mut self) -> Result<Option<i64>, SinkError> {
        Ok(meta_get(&self.store.conn, META_LAST_CONTACT)?.and_then(|v| v.parse().ok()))
    }

    pub fn set_last_contact_ms(&mut self, ms: i64) -> Result<(), SinkError> {
        Ok(meta_set(
            &self.store.conn,
            META_LAST_CONTACT,
            &ms.to_string(),
        )?)
    }
}

impl AclSink for StoreSync {
    fn applied(&mut self) -> Result<Option<AclReport>, SinkError> {
        read_applied(&self.store)
    }

    fn snapshot_begin(
        &mut self,
        version: u64,
        format: SnapshotFormat,
        size: u64,
    ) -> Result<(), SinkError> {
        if size > import::MAX_FILE_BYTES {
            return Err(SinkError::TooLong);
        }
        // An unfinished earlier one goes first (its stage is dropped before the next starts).
        self.pending = None;
        if self.store.path() == Path::new(":memory:") {
            return Err(SinkError::Content(
                "a snapshot needs the database in a file".into(),
            ));
        }
        let stream = SnapshotStream::start(self.store.path().to_owned(), version, format)?;
        self.pending = Some(Pending {
            version,
            size,
            received: 0,
            stream,
        });
        Ok(())
    }

    fn snapshot_push(&mut self, bytes: &[u8]) -> Result<(), SinkError> {
        let p = self.pending.as_mut().ok_or(SinkError::NoSnapshot)?;
        if p.received + bytes.len() as u64 > p.size {
            return Err(SinkError::TooLong);
        }
        p.received += bytes.len() as u64;
        p.stream.push(bytes.to_vec())
    }

    fn snapshot_commit(&mut self, report: &AclReport) -> Result<usize, SinkError> {
        let p = self.pending.take().ok_or(SinkError::NoSnapshot)?;
        if p.version != report.version || p.received != p.size {
            return Err(SinkError::NoSnapshot);
        }
        let n = p.stream.commit()?;
        record_applied(&self.store.conn, report)?;
        Ok(n)
    }

    fn snapshot_abort(&mut self) {
        self.pending = None;
    }

    fn apply_delta(&mut self, delta: &Delta, report: &AclReport) -> Result<(), SinkError> {
        if report.version != delta.version {
            return Err(SinkError::VersionMismatch {
                have: None,
                need: delta.version,
            });
        }
        let ops: Vec<DeltaOp> = delta
            .upsert
            .iter()
            .cloned()
            .map(DeltaOp::Upsert)
            .chain(delta.suspend.iter().copied().map(DeltaOp::Suspend))
            .chain(delta.revoke.iter().copied().map(DeltaOp::Revoke))
            .collect();
        let source = format!("cloud delta v{}", delta.version);
        self.store
            .apply_delta(delta.base_version, delta.version, &ops, &source)
            .map_err(|e| version_error(e, delta.base_version))?;
        record_applied(&self.store.conn, report)?;
        Ok(())
    }

    fn revoke_now(&mut self, key: &[u8; ENDPOINT_KEY_LEN]) -> Result<bool, SinkError> {
        Ok(self.store.revoke_now(key)?)
    }
}

impl Outbox for StoreSync {
    fn notes(&mut self, after: i64, limit: usize) -> Result<Vec<StoredNote>, SinkError> {
        Ok(self.store.undelivered_notes(after, limit)?)
    }

    fn ack_notes_through(&mut self, seq: i64, now_ms: i64) -> Result<usize, SinkError> {
        Ok(self.store.mark_notes_delivered(seq, now_ms)?)
    }

    fn instance(&mut self) -> Result<String, SinkError> {
        if let Some(i) = meta_get(&self.store.conn, META_INSTANCE)? {
            return Ok(i);
        }
        let mut raw = [0u8; 8];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut raw);
        let id = hex::encode(raw);
        // INSERT OR IGNORE + re-read: another connection may have raced us.
        self.store.conn.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES (?1, ?2)",
            [META_INSTANCE, id.as_str()],
        )?;
        Ok(meta_get(&self.store.conn, META_INSTANCE)?.unwrap_or(id))
    }

    fn batch(&mut self, after: i64, limit: usize) -> Result<Vec<EventOut>, SinkError> {
        let rows = self.store.undelivered_events(after, limit)?;
        Ok(rows
            .into_iter()
            .map(|r: StoredEvent| EventOut {
                // The row's own random uid: unique across a rebuilt database, where the
                // instance and seq alone could repeat if the instance was copied with a backup.
                uid: r.uid,
                seq: r.id,
                event: r.event,
                // Only what the row had when written: a later verdict is a note, so a replay
                // of this event is always identical to the first send.
                panel_verdict: r.recorded_verdict,
            })
            .collect())
    }

    fn ack_through(&mut self, seq: i64, now_ms: i64) -> Result<usize, SinkError> {
        Ok(self.store.mark_delivered(seq, now_ms)?)
    }

    fn depth(&mut self) -> Result<OutboxReport, SinkError> {
        let (depth, oldest_ms) = crate::events::outbox_depth(&self.store.conn)?;
        // One mechanism bounds the outbox: the events retention ([events] max_rows /
        // max_age_days) prunes the oldest rows (and their notes) and counts the undelivered
        // ones; failed writes are counted beside it. Their sum is what the backend never got.
        let dropped = self
            .store
            .events_pruned_undelivered()?
            .saturating_add(self.store.notes_pruned_undelivered()?)
            .saturating_add(self.store.events_write_failed()?);
        Ok(OutboxReport {
            depth,
            oldest_ms,
            dropped,
        })
    }
}

/// SHA-256 chain step for a delta: SHA-256(previous hash bytes ‖ SHA-256(payload)).
pub fn chain_hash(previous_hex: &str, payload: &[u8]) -> String {
    let prev = hex::decode(previous_hex).unwrap_or_default();
    let mut h = Sha256::new();
    h.update(&prev);
    h.update(Sha256::digest(payload));
    hex::encode(h.finalize())
}

/// Records `n` error events (unit tests of the cloud room).
#[cfg(test)]
pub(crate) fn record_test_events(store: &mut Store, n: usize, time_ms: i64) {
    use crate::events::{AccessEvent, Transport};
    for _ in 0..n {
        store
            .record_event(&AccessEvent::error(
                time_ms,
                "d1",
                Transport::Nfc,
                None,
                "timeout",
                1,
            ))
            .unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acl::test_key;
    use crate::cloud::msg;

    /// A store in a temporary file (snapshots stream on a second connection); keep the dir.
    fn file_store() -> (StoreSync, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        (StoreSync::open(&dir.path().join("k.db")).unwrap(), dir)
    }

    fn report(version: u64) -> AclReport {
        AclReport {
            version,
            hash: "ab".repeat(32),
            applied_at_ms: 1_800_000_000_000,
        }
    }

    fn snapshot_json(seeds: &[u16]) -> Vec<u8> {
        let creds: Vec<_> = seeds.iter().map(|s| msg::tests::cred(*s)).collect();
        serde_json::to_vec(&serde_json::json!({"version": 1, "credentials": creds})).unwrap()
    }

    fn load(s: &mut StoreSync, version: u64, body: &[u8]) -> Result<usize, SinkError> {
        s.snapshot_begin(version, SnapshotFormat::Json, body.len() as u64)?;
        for part in body.chunks(7) {
            s.snapshot_push(part)?;
        }
        s.snapshot_commit(&report(version))
    }

    #[test]
    fn snapshot_replaces_and_persists_version_and_refuses_rollback() {
        let (mut s, _dir) = file_store();
        assert_eq!(s.applied().unwrap(), None);
        assert_eq!(load(&mut s, 2, &snapshot_json(&[1, 2])).unwrap(), 2);
        assert_eq!(s.applied().unwrap(), Some(report(2)));
        // Same or older version: refused, ACL unchanged.
        assert!(matches!(
            load(&mut s, 2, &snapshot_json(&[3])),
            Err(SinkError::VersionMismatch { .. })
        ));
        assert_eq!(s.store().stats().unwrap().credentials, 2);
        // Bad content: refused, ACL and version unchanged.
        assert!(matches!(
            load(&mut s, 3, b"{\"version\":1}"),
            Err(SinkError::Content(_))
        ));
        assert_eq!(s.applied().unwrap().unwrap().version, 2);
        // Longer than announced.
        s.snapshot_begin(4, SnapshotFormat::Json, 3).unwrap();
        assert!(matches!(s.snapshot_push(b"1234"), Err(SinkError::TooLong)));
        assert_eq!(load(&mut s, 5, &snapshot_json(&[3])).unwrap(), 1);
        let now = time::OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        assert!(!s.store().decide(&test_key(1), "d", now).unwrap().is_grant());
        assert!(s.store().decide(&test_key(3), "d", now).unwrap().is_grant());
    }

    #[test]
    fn delta_applies_only_on_its_base() {
        let (mut s, _dir) = file_store();
        load(&mut s, 1, &snapshot_json(&[1, 2, 3])).unwrap();
        let d = Delta {
            base_version: 1,
            version: 2,
            upsert: Vec::new(),
            suspend: vec![test_key(2)],
            revoke: vec![test_key(3)],
        };
        let wrong = Delta {
            base_version: 0,
            ..d.clone()
        };
        assert!(matches!(
            s.apply_delta(&wrong, &report(2)),
            Err(SinkError::VersionMismatch { .. })
        ));
        s.apply_delta(&d, &report(2)).unwrap();
        assert_eq!(s.applied().unwrap().unwrap().version, 2);
        // Applied twice: the base no longer matches.
        assert!(s.apply_delta(&d, &report(2)).is_err());
        let later = time::OffsetDateTime::from_unix_timestamp(1_800_000_001).unwrap();
        assert!(s
            .store()
            .decide(&test_key(1), "d", later)
            .unwrap()
            .is_grant());
        assert!(!s
            .store()
            .decide(&test_key(2), "d", later)
            .unwrap()
            .is_grant());
        assert!(!s
            .store()
            .decide(&test_key(3), "d", later)
            .unwrap()
            .is_grant());
        assert!(s.revoke_now(&test_key(1)).unwrap());
        assert!(!s.revoke_now(&test_key(1)).unwrap());
    }

    #[test]
    fn outbox_ids_and_acks() {
        use crate::events::{AccessEvent, Transport};
        let (mut s, _dir) = file_store();
        let inst = s.instance().unwrap();
        assert_eq!(inst.len(), 16);
        assert_eq!(s.instance().unwrap(), inst);
        for _ in 0..3 {
            s.store()
                .record_event(&AccessEvent::error(
                    5,
                    "d1",
                    Transport::Nfc,
                    None,
                    "timeout",
                    1,
                ))
                .unwrap();
        }
        let b = s.batch(0, 2).unwrap();
        assert_eq!(b.len(), 2);
        // The row's stable uid, not derived from the sequence.
        let stored = s.store().recent_events(3).unwrap();
        assert_eq!(b[0].uid, stored[2].uid);
        assert_eq!(b[0].uid.len(), 32);
        assert_ne!(b[0].uid, b[1].uid);
        assert_eq!(s.depth().unwrap().depth, 3);
        assert_eq!(s.ack_through(b[1].seq, 9).unwrap(), 2);
        assert_eq!(
            s.depth().unwrap(),
            OutboxReport {
                depth: 1,
                oldest_ms: Some(5),
                dropped: 0,
            }
        );
        assert_eq!(s.batch(0, 10).unwrap().len(), 1);
        assert_eq!(s.next_boot().unwrap() + 1, s.next_boot().unwrap());
    }
}
