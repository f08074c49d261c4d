//! A cloud snapshot streamed into the ACL apply engine as its chunks arrive.
//!
//! The engine's parsers read (`std::io::Read`); chunks are pushed. A thread of its own owns a
//! second connection to the database and a [`SnapshotApply`]: it reads the chunks from a
//! bounded channel, parses and stages each record as it comes, and commits only when told,
//! after the whole content's SHA-256 matched the signed manifest. So memory stays bounded
//! whatever the snapshot's size (a few chunks in the channel plus the parser's buffers), and
//! a bad hash, a timeout or a newer manifest drops the stage: the live ACL never changes.
//!
//! Content errors do not stop the chunks: the hash decides first whether the bytes are the
//! backend's (a corrupted transfer is `hash_mismatch` and asked again), then the content's
//! error is reported at commit (`apply_failed`).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::msg::SnapshotFormat;
use super::store::SinkError;
use crate::acl::apply::{ApplyError, SnapshotApply};
use crate::acl::import::{self, ImportMode};
use crate::acl::Store;

/// Chunks queued for the apply thread at most (64 KiB each at most).
const QUEUED_CHUNKS: usize = 4;
/// Longest wait for the apply thread to take a chunk (it stages as fast as SQLite writes).
const PUSH_WAIT: Duration = Duration::from_secs(30);
/// Longest wait for the commit of a whole snapshot (millions of credentials take a while).
const COMMIT_WAIT: Duration = Duration::from_secs(600);

/// What the apply thread ends with: records applied, or why not.
type Outcome = Result<usize, SinkError>;

pub struct SnapshotStream {
    /// Dropped: the content is complete (or abandoned).
    bytes: Option<SyncSender<Vec<u8>>>,
    /// `true`: commit. Dropped without a word: abandon.
    decide: Option<SyncSender<bool>>,
    outcome: Receiver<Outcome>,
    thread: Option<JoinHandle<()>>,
}

/// The pushed chunks as a byte stream; ends when the sender is dropped.
struct ChunkReader {
    rx: Receiver<Vec<u8>>,
    buf: Vec<u8>,
    pos: usize,
}

impl Read for ChunkReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos >= self.buf.len() {
            match self.rx.recv() {
                Ok(b) => {
                    self.buf = b;
                    self.pos = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let rest = self.buf.get(self.pos..).unwrap_or_default();
        let n = rest.len().min(out.len());
        if let (Some(dst), Some(src)) = (out.get_mut(..n), rest.get(..n)) {
            dst.copy_from_slice(src);
        }
        self.pos += n;
        Ok(n)
    }
}

/// The engine refuses replays itself; the core gets them as version mismatches.
pub(crate) fn version_error(e: ApplyError, need: u64) -> SinkError {
    match e {
        ApplyError::Replay { applied, .. } => SinkError::VersionMismatch {
            have: Some(applied),
            need,
        },
        ApplyError::BaseMismatch { applied, .. } => SinkError::VersionMismatch {
            have: applied,
            need,
        },
        other => SinkError::Apply(other),
    }
}

fn apply_thread(
    db: &Path,
    version: u64,
    format: SnapshotFormat,
    bytes: Receiver<Vec<u8>>,
    decide: &Receiver<bool>,
) -> Outcome {
    // The apply yields the CPU to the doors' decisions (as `keyway acl import` does).
    crate::acl::apply::background_priority();
    let mut store = Store::open(db)?;
    let source = format!("cloud snapshot v{version}");
    let mut apply = SnapshotApply::begin(&mut store, Some(version), ImportMode::Replace, &source)
        .map_err(|e| version_error(e, version))?;
    let reader = ChunkReader {
        rx: bytes,
        buf: Vec::new(),
        pos: 0,
    };
    let staged = import::stream_into(&mut apply, reader, format.file_kind(), Path::new(&source))
        .map_err(|e| SinkError::Content(e.to_string()));
    // Parsed (or refused): wait for the verdict on the hash before saying anything, so a
    // corrupted transfer is reported as such rather than as bad content.
    if decide.recv() != Ok(true) {
        return Err(SinkError::NoSnapshot);
    }
    let staged = staged?;
    apply.commit()?;
    Ok(staged)
}

impl SnapshotStream {
    /// Starts the apply thread for snapshot `version` of database `db`.
    pub fn start(db: PathBuf, version: u64, format: SnapshotFormat) -> Result<Self, SinkError> {
        let (bytes_tx, bytes_rx) = mpsc::sync_channel(QUEUED_CHUNKS);
        let (decide_tx, decide_rx) = mpsc::sync_channel(1);
        let (outcome_tx, outcome) = mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("keyway-snapshot".into())
            .spawn(move || {
                let r = apply_thread(&db, version, format, bytes_rx, &decide_rx);
                let _ = outcome_tx.send(r);
            })
            .map_err(|e| SinkError::Content(format!("apply thread: {e}")))?;
        Ok(SnapshotStream {
            bytes: Some(bytes_tx),
            decide: Some(decide_tx),
            outcome,
            thread: Some(thread),
        })
    }

    /// Hands the next bytes to the apply thread, waiting (bounded) while it is behind. Once
    /// the parser has stopped on bad content the rest is dropped here: the hash is checked
    /// by the core anyway.
    pub fn push(&mut self, chunk: Vec<u8>) -> Result<(), SinkError> {
        let Some(tx) = &self.bytes else {
            return Err(SinkError::NoSnapshot);
        };
        let deadline = Instant::now() + PUSH_WAIT;
        let mut chunk = chunk;
        loop {
            match tx.try_send(chunk) {
                Ok(()) | Err(TrySendError::Disconnected(_)) => return Ok(()),
                Err(TrySendError::Full(back)) => {
                    if Instant::now() >= deadline {
                        return Err(SinkError::Content("the apply engine stalled".into()));
                    }
                    chunk = back;
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        }
    }

    /// The content is complete and verified: commit, and wait for the result.
    pub fn commit(mut self) -> Outcome {
        self.bytes = None;
        if let Some(d) = self.decide.take() {
            let _ = d.send(true);
        }
        let r = self
            .outcome
            .recv_timeout(COMMIT_WAIT)
            .unwrap_or_else(|_| Err(SinkError::Content("the apply engine did not finish".into())));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        r
    }
}

impl Drop for SnapshotStream {
    /// Abandoned: the thread sees the end of the content and no commit, and drops its stage.
    fn drop(&mut self) {
        self.bytes = None;
        self.decide = None;
        if let Some(t) = self.thread.take() {
            // Joined, so the next snapshot's stage never meets this one's: the thread parses
            // at most the few queued chunks, then drops its stage.
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloud::msg::tests::cred;

    fn content(seeds: std::ops::RangeInclusive<u16>) -> Vec<u8> {
        let creds: Vec<_> = seeds.map(cred).collect();
        serde_json::to_vec(&serde_json::json!({"version": 1, "credentials": creds})).unwrap()
    }

    fn db() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("k.db");
        Store::open(&db).unwrap();
        (dir, db)
    }

    fn stage(db: &Path) -> PathBuf {
        let mut p = db.as_os_str().to_owned();
        p.push("-acl-stage");
        PathBuf::from(p)
    }

    /// Many more chunks than the channel holds go through: the thread stages them as they
    /// come (a push would stall otherwise), and the commit applies them all.
    #[test]
    fn chunks_are_staged_as_they_come_and_committed() {
        let (_dir, db) = db();
        let body = content(1..=2000);
        let mut s = SnapshotStream::start(db.clone(), 5, SnapshotFormat::Json).unwrap();
        let chunks = body.chunks(1024);
        assert!(chunks.len() > 20 * QUEUED_CHUNKS);
        for c in chunks {
            s.push(c.to_vec()).unwrap();
        }
        assert_eq!(s.commit().unwrap(), 2000);
        let store = Store::open(&db).unwrap();
        assert_eq!(store.stats().unwrap().credentials, 2000);
        assert_eq!(store.applied().unwrap().version, Some(5));
        assert!(!stage(&db).exists(), "the stage is gone after the swap");
    }

    /// A version-2 snapshot's door groups (and schedules, holidays) go in with its
    /// credentials, as from a file: a credential granted through a group opens its doors.
    #[test]
    fn a_snapshot_s_door_groups_are_applied_with_it() {
        let (_dir, db) = db();
        let mut c = cred(1);
        c["doors"] = serde_json::json!(["@staff"]);
        // Written out: "version": 2 must come first (serde_json would sort the keys).
        let body = format!(
            r#"{{"version": 2, "door_groups": {{"staff": ["front", "side"]}}, "credentials": [{c}]}}"#
        )
        .into_bytes();
        let mut s = SnapshotStream::start(db.clone(), 5, SnapshotFormat::Json).unwrap();
        s.push(body).unwrap();
        assert_eq!(s.commit().unwrap(), 1);
        let store = Store::open(&db).unwrap();
        let key = crate::acl::test_key(1);
        let now = time::OffsetDateTime::now_utc();
        for (door, granted) in [("front", true), ("side", true), ("back", false)] {
            let d = store.decide(&key, door, now).unwrap();
            assert_eq!(
                matches!(d, crate::acl::Decision::Grant(_)),
                granted,
                "{door}: {d:?}"
            );
        }
    }

    /// Abandoned half way (a bad hash, a timeout, a newer manifest): nothing changes and the
    /// stage is dropped before the stream is.
    #[test]
    fn an_abandoned_stream_changes_nothing() {
        let (_dir, db) = db();
        let body = content(1..=500);
        let mut s = SnapshotStream::start(db.clone(), 5, SnapshotFormat::Json).unwrap();
        for c in body.chunks(1024).take(10) {
            s.push(c.to_vec()).unwrap();
        }
        drop(s);
        let store = Store::open(&db).unwrap();
        assert_eq!(store.stats().unwrap().credentials, 0);
        assert_eq!(store.applied().unwrap().version, None);
        assert!(!stage(&db).exists());
    }

    /// Bad content never fails a push (the hash is checked first, by the core): the error
    /// comes at the commit, and the ACL is unchanged.
    #[test]
    fn bad_content_is_reported_at_the_commit() {
        let (_dir, db) = db();
        let mut body = content(1..=200);
        body.truncate(body.len() / 2);
        body.extend_from_slice(b"garbage}}}");
        body.extend(std::iter::repeat_n(b' ', 64 * 1024));
        let mut s = SnapshotStream::start(db.clone(), 5, SnapshotFormat::Json).unwrap();
        for c in body.chunks(1024) {
            s.push(c.to_vec()).unwrap();
        }
        assert!(matches!(s.commit(), Err(SinkError::Content(_))));
        assert_eq!(Store::open(&db).unwrap().stats().unwrap().credentials, 0);
    }
}
