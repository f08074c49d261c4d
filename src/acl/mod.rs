//! The credential store (SQLite) and the access decision.
//!
//! One database file holds the ACL (`credentials`, `credential_doors`), the access-event
//! outbox (`events`, written by [`crate::events`]) and `meta`. The schema is versioned with
//! `PRAGMA user_version` and migrated forward on [`Store::open`].
//!
//! A decision is one unique-index lookup on the endpoint key plus a primary-key probe of the
//! door list; the rules themselves live in [`decision`] as a pure function.

pub mod apply;
pub mod cards;
mod csv_file;
pub mod decision;
pub mod fast;
pub mod import;
mod json_file;
pub mod record;
pub mod schedule;

pub use apply::BATCH_ROWS;
pub use apply::{Applied, ApplyError, ApplySummary, CredentialState, DeltaOp, SnapshotApply};
pub use decision::{
    evaluate, CredentialRecord, Decision, DenyReason, DoorAccess, Grant, ALL_DOORS,
};
pub use import::{load_file, read_file};
pub use record::{CredentialSpec, FileKind, ImportError, ImportMode, ImportSummary};

use crate::card::CardFormat;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use rusqlite::{Connection, OptionalExtension};
use schedule::{Schedule, Target};
use sha2::{Digest, Sha256};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Length of an uncompressed SEC1 P-256 point (`04 || X || Y`).
pub const ENDPOINT_KEY_LEN: usize = 65;
/// Length of a compressed SEC1 P-256 point (`02/03 || X`): how the ACL stores keys.
pub const COMPRESSED_KEY_LEN: usize = 33;

/// How long a writer waits for another connection's lock before failing (the CLI may import
/// while the daemon runs).
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Schema migrations; entry `i` takes `user_version` from `i` to `i + 1`. Never edit a
/// shipped entry: append a new one.
const MIGRATIONS: &[&str] = &[
    // v1
    "CREATE TABLE credentials (
        id            INTEGER PRIMARY KEY,
        endpoint_key  BLOB    NOT NULL
                      CHECK (length(endpoint_key) = 65 AND substr(endpoint_key, 1, 1) = x'04'),
        person_id     TEXT    NOT NULL CHECK (length(person_id) BETWEEN 1 AND 128),
        card_format   TEXT    NOT NULL,
        facility_code INTEGER NOT NULL CHECK (facility_code >= 0),
        card_number   INTEGER NOT NULL CHECK (card_number >= 0),
        valid_from    INTEGER,
        valid_until   INTEGER,
        created_at    INTEGER NOT NULL,
        updated_at    INTEGER NOT NULL
    ) STRICT;
    CREATE UNIQUE INDEX credentials_endpoint_key ON credentials (endpoint_key);
    CREATE INDEX credentials_person_id ON credentials (person_id);
    CREATE TABLE credential_doors (
        credential_id INTEGER NOT NULL REFERENCES credentials (id) ON DELETE CASCADE,
        door          TEXT    NOT NULL CHECK (length(door) BETWEEN 1 AND 64),
        PRIMARY KEY (credential_id, door)
    ) STRICT, WITHOUT ROWID;
    -- AUTOINCREMENT: ids are never reused, even after delivered rows are pruned, so the id
    -- order is the delivery order for the cloud sync.
    CREATE TABLE events (
        id                   INTEGER PRIMARY KEY AUTOINCREMENT,
        time_ms              INTEGER NOT NULL,
        door                 TEXT    NOT NULL,
        transport            TEXT    NOT NULL,
        endpoint_fingerprint TEXT,
        person_id            TEXT,
        credential_id        INTEGER,
        decision             TEXT    NOT NULL,
        reason               TEXT    NOT NULL,
        latency_ms           INTEGER NOT NULL,
        delivered_at         INTEGER
    ) STRICT;
    CREATE INDEX events_undelivered ON events (id) WHERE delivered_at IS NULL;
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) STRICT, WITHOUT ROWID;",
    // v2: Kpersistent per (reader identifier, endpoint key) for Aliro FAST (see `fast`).
    // Rows hang off a credential: removing it (an import without it) wipes its keys by
    // cascade; changing its validity (a revocation by end date) wipes them by trigger.
    "CREATE TABLE fast_keys (
        id            INTEGER PRIMARY KEY,
        reader_id     BLOB    NOT NULL CHECK (length(reader_id) = 32),
        credential_id INTEGER NOT NULL REFERENCES credentials (id) ON DELETE CASCADE,
        endpoint_key  BLOB    NOT NULL CHECK (length(endpoint_key) = 65),
        k_persistent  BLOB    NOT NULL CHECK (length(k_persistent) = 32),
        used_at       INTEGER NOT NULL
    ) STRICT;
    CREATE UNIQUE INDEX fast_keys_reader_endpoint ON fast_keys (reader_id, endpoint_key);
    CREATE INDEX fast_keys_reader_used ON fast_keys (reader_id, used_at);
    CREATE INDEX fast_keys_credential ON fast_keys (credential_id);
    CREATE TRIGGER fast_keys_wipe_on_validity_change
    AFTER UPDATE OF valid_from, valid_until ON credentials
    WHEN OLD.valid_from IS NOT NEW.valid_from OR OLD.valid_until IS NOT NEW.valid_until
    BEGIN
        DELETE FROM fast_keys WHERE credential_id = NEW.id;
    END;",
    // v3: physical card UIDs of a credential (cutover: old cards keep working at doors that
    // accept them, see `cards`). A UID belongs to at most one credential.
    "CREATE TABLE card_uids (
        uid           BLOB    PRIMARY KEY CHECK (length(uid) IN (4, 7, 10)),
        credential_id INTEGER NOT NULL REFERENCES credentials (id) ON DELETE CASCADE
    ) STRICT;
    CREATE INDEX card_uids_credential ON card_uids (credential_id);",
    // v4: the access panel's own verdict on a granted card (read from its LED commands after
    // the osdp_RAW): 'granted', 'denied' or 'unknown'; NULL until it is known.
    "ALTER TABLE events ADD COLUMN panel_verdict TEXT
        CHECK (panel_verdict IN ('granted', 'denied', 'unknown'));",
    // v5: the attempt id a granted card was handed to the panel under; the panel's verdict
    // is stored on the row with its attempt, never guessed by door and time.
    "ALTER TABLE events ADD COLUMN attempt_id INTEGER;
    CREATE UNIQUE INDEX events_attempt ON events (attempt_id) WHERE attempt_id IS NOT NULL;",
    // v6: the compact ACL (see `apply`): one WITHOUT ROWID table keyed by the compressed key
    // (240 -> under 100 bytes a credential), doors inline, a state; card UIDs and FAST keys
    // refer to the key (the apply engine keeps them consistent: a swap by rename cannot carry
    // foreign keys). A credential's id is now derived from its key (`credential_id`).
    "CREATE TABLE acl (
        key         BLOB    PRIMARY KEY CHECK (length(key) = 33),
        person_id   TEXT    NOT NULL,
        format      INTEGER NOT NULL,
        fc          INTEGER NOT NULL,
        cn          INTEGER NOT NULL,
        valid_from  INTEGER,
        valid_until INTEGER,
        state       INTEGER NOT NULL DEFAULT 0,
        doors       TEXT    NOT NULL
    ) STRICT, WITHOUT ROWID;
    INSERT INTO acl (key, person_id, format, fc, cn, valid_from, valid_until, state, doors)
    SELECT unhex(CASE WHEN substr(hex(substr(c.endpoint_key, 65, 1)), 2, 1) IN
                     ('1', '3', '5', '7', '9', 'B', 'D', 'F')
                THEN '03' ELSE '02' END || hex(substr(c.endpoint_key, 2, 32))),
           c.person_id, CASE c.card_format WHEN 'h10304' THEN 1 ELSE 0 END,
           c.facility_code, c.card_number, c.valid_from, c.valid_until, 0,
           coalesce((SELECT group_concat(d.door, ';') FROM credential_doors d
                     WHERE d.credential_id = c.id), '')
    FROM credentials c;
    CREATE TABLE card_uids_v6 (
        uid BLOB PRIMARY KEY CHECK (length(uid) IN (4, 7, 10)),
        key BLOB NOT NULL
    ) STRICT, WITHOUT ROWID;
    INSERT INTO card_uids_v6 (uid, key)
    SELECT u.uid, a.key FROM card_uids u JOIN credentials c ON c.id = u.credential_id
    JOIN acl a ON a.key = unhex(CASE WHEN substr(hex(substr(c.endpoint_key, 65, 1)), 2, 1) IN
                     ('1', '3', '5', '7', '9', 'B', 'D', 'F')
                THEN '03' ELSE '02' END || hex(substr(c.endpoint_key, 2, 32)));
    CREATE TABLE fast_keys_v6 (
        id            INTEGER PRIMARY KEY,
        reader_id     BLOB    NOT NULL CHECK (length(reader_id) = 32),
        key           BLOB    NOT NULL CHECK (length(key) = 33),
        endpoint_key  BLOB    NOT NULL CHECK (length(endpoint_key) = 65),
        k_persistent  BLOB    NOT NULL CHECK (length(k_persistent) = 32),
        used_at       INTEGER NOT NULL
    ) STRICT;
    INSERT INTO fast_keys_v6 (id, reader_id, key, endpoint_key, k_persistent, used_at)
    SELECT f.id, f.reader_id,
           unhex(CASE WHEN substr(hex(substr(f.endpoint_key, 65, 1)), 2, 1) IN
                     ('1', '3', '5', '7', '9', 'B', 'D', 'F')
                THEN '03' ELSE '02' END || hex(substr(f.endpoint_key, 2, 32))),
           f.endpoint_key, f.k_persistent, f.used_at
    FROM fast_keys f;
    DROP TABLE fast_keys;
    DROP TABLE card_uids;
    DROP TABLE credential_doors;
    DROP TABLE credentials;
    ALTER TABLE card_uids_v6 RENAME TO card_uids;
    CREATE INDEX card_uids_key ON card_uids (key);
    ALTER TABLE fast_keys_v6 RENAME TO fast_keys;
    CREATE UNIQUE INDEX fast_keys_reader_endpoint ON fast_keys (reader_id, endpoint_key);
    CREATE INDEX fast_keys_reader_used ON fast_keys (reader_id, used_at);
    CREATE INDEX fast_keys_key ON fast_keys (key);",
    // v7: each event's stable unique id for the cloud outbox: 16 random bytes (SQLite's
    // randomblob, seeded from the OS), so it stays unique across a rebuilt database, where
    // the sequence (`id`) starts again. No index: nothing looks an event up by it locally.
    "ALTER TABLE events ADD COLUMN uid BLOB CHECK (uid IS NULL OR length(uid) = 16);
    UPDATE events SET uid = randomblob(16);",
    // v8: notes on events for the cloud, kept and acked like events but never by editing an
    // event row that may have gone up: a panel verdict that came after its event was written,
    // and the first grant of a credential (issued -> active). `credential_first_use` makes
    // the latter once per credential, across restarts; credentials granted before this
    // version count as used already.
    "CREATE TABLE event_notes (
        seq           INTEGER PRIMARY KEY AUTOINCREMENT,
        uid           BLOB    NOT NULL CHECK (length(uid) = 16),
        event_id      INTEGER NOT NULL,
        event_uid     BLOB    CHECK (event_uid IS NULL OR length(event_uid) = 16),
        kind          TEXT    NOT NULL,
        value         TEXT,
        door          TEXT    NOT NULL,
        credential_id INTEGER,
        person_id     TEXT,
        time_ms       INTEGER NOT NULL,
        delivered_at  INTEGER
    ) STRICT;
    CREATE INDEX event_notes_event ON event_notes (event_id);
    CREATE INDEX event_notes_undelivered ON event_notes (seq) WHERE delivered_at IS NULL;
    CREATE TABLE credential_first_use (
        credential_id INTEGER PRIMARY KEY,
        event_id      INTEGER NOT NULL,
        time_ms       INTEGER NOT NULL
    ) STRICT;
    INSERT OR IGNORE INTO credential_first_use (credential_id, event_id, time_ms)
    SELECT credential_id, min(id), min(time_ms) FROM events
    WHERE decision = 'granted' AND credential_id IS NOT NULL GROUP BY credential_id;",
    // v9: door groups, schedules (compiled day programs, see `schedule`) and holidays, named
    // by credentials' door entries (`@group`, `door=schedule`); written with the ACL by the
    // apply engine.
    "CREATE TABLE door_groups (
        grp  TEXT NOT NULL,
        door TEXT NOT NULL,
        PRIMARY KEY (grp, door)
    ) STRICT, WITHOUT ROWID;
    CREATE TABLE schedules (
        id      TEXT PRIMARY KEY,
        program TEXT NOT NULL
    ) STRICT, WITHOUT ROWID;
    CREATE TABLE holidays (
        date TEXT PRIMARY KEY CHECK (length(date) = 10)
    ) STRICT, WITHOUT ROWID;
    INSERT OR REPLACE INTO meta (key, value)
        SELECT 'acl_credentials', CAST(count(*) AS TEXT) FROM acl;",
];

/// Bytes of WAL kept after a checkpoint.
pub const JOURNAL_SIZE_LIMIT: i64 = 16 * 1024 * 1024;

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Errors from the store.
#[derive(Debug, thiserror::Error)]
pub enum AclError {
    #[error("{}: cannot create the database directory: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: cannot create or secure the database file: {source}", path.display())]
    CreateFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: cannot open the database: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("{}: journal mode WAL is not available (SQLite kept '{mode}')", path.display())]
    NoWal { path: PathBuf, mode: String },
    #[error(
        "{}: database schema version {found} is newer than this keyway supports ({supported}); \
         upgrade keyway",
        path.display()
    )]
    SchemaTooNew {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error("{}: schema migration to version {version} failed: {source}", path.display())]
    Migration {
        path: PathBuf,
        version: i64,
        #[source]
        source: rusqlite::Error,
    },
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("credential {id} is corrupt in the database: {what}")]
    Corrupt { id: i64, what: String },
    #[error("invalid event: {0}")]
    InvalidEvent(String),
    #[error("cannot start the integrity check's watchdog thread: {0}")]
    CheckThread(std::io::Error),
    /// The database is served read-only (its disk takes no writes): nothing can be stored.
    #[error("{}: the database is read-only ({reason}); nothing can be stored", path.display())]
    ReadOnly { path: PathBuf, reason: String },
    #[error(
        "{}: database schema version {found} needs migrating to {supported}, which a read-only \
         database cannot",
        path.display()
    )]
    ReadOnlyNeedsMigration {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
}

impl AclError {
    /// An error that says the database cannot be written here (read-only file system,
    /// permissions, a full disk), as opposed to a damaged, busy or unreadable one: the store
    /// can still serve decisions read-only.
    pub fn is_unwritable(&self) -> bool {
        let io = |e: &std::io::Error| {
            matches!(
                e.raw_os_error(),
                Some(libc::EROFS | libc::EACCES | libc::EPERM | libc::ENOSPC)
            )
        };
        let sql = |e: &rusqlite::Error| {
            matches!(
                e.sqlite_error_code(),
                Some(
                    rusqlite::ErrorCode::ReadOnly
                        | rusqlite::ErrorCode::CannotOpen
                        | rusqlite::ErrorCode::PermissionDenied
                        | rusqlite::ErrorCode::DiskFull
                )
            )
        };
        match self {
            AclError::CreateDir { source, .. } | AclError::CreateFile { source, .. } => io(source),
            AclError::Open { source, .. } | AclError::Migration { source, .. } => sql(source),
            AclError::Sqlite(e) => sql(e),
            AclError::ReadOnly { .. } => true,
            _ => false,
        }
    }
}

/// What [`Store::quick_check`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuickCheck {
    Ok,
    /// SQLite's own words for each problem (at most [`QUICK_CHECK_LINES`]).
    Damaged(Vec<String>),
    /// The time budget ran out first.
    Unfinished,
}

/// Problems a quick check lists at most.
pub const QUICK_CHECK_LINES: u32 = 20;

/// The SQLite-backed credential store and event outbox. Not `Sync`: the daemon keeps it
/// behind a mutex or on a dedicated thread.
#[derive(Debug)]
pub struct Store {
    pub(crate) conn: Connection,
    path: PathBuf,
    /// The site's time zone: schedules are its wall-clock times (default: the system's).
    tz: jiff::tz::TimeZone,
}

/// Counts for `keyway status` and config checks.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StoreStats {
    pub schema_version: i64,
    pub credentials: u64,
    /// Distinct `person_id`s.
    pub persons: u64,
    /// Rows in `credential_doors`.
    pub door_grants: u64,
    pub events_total: u64,
    pub events_undelivered: u64,
    /// Events deleted by retention before they were delivered, ever.
    pub events_pruned_undelivered: u64,
    /// Event writes that failed (disk full, I/O), as far as they were counted afterwards.
    pub events_write_failed: u64,
    pub last_import: Option<LastImport>,
}

/// What the last successful import recorded in `meta`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LastImport {
    /// Unix seconds.
    pub at: i64,
    /// File name the ACL came from.
    pub source: String,
    /// `replace` or `merge`.
    pub mode: String,
    /// Credentials in that file.
    pub count: u64,
}

impl Store {
    /// The single number a `SELECT count(...)` query returns.
    pub(crate) fn count(&self, sql: &str) -> Result<u64, rusqlite::Error> {
        let n: i64 = self.conn.query_row(sql, [], |r| r.get(0))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Opens (creating if missing, with mode 0600 and a 0700 parent directory) and migrates
    /// the database at `path`.
    ///
    /// Pragmas: WAL so the daemon's reads never block on a CLI import; `synchronous=FULL`
    /// because the event table is an audit trail and an import reported as done must survive
    /// a power cut (a box on a wall loses power); at a few taps per minute the extra fsync per
    /// commit costs nothing noticeable. Foreign keys on (door lists cascade), and a busy
    /// timeout for concurrent writers.
    pub fn open(path: &Path) -> Result<Store, AclError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            if !parent.exists() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(parent)
                    .map_err(|source| AclError::CreateDir {
                        path: parent.to_path_buf(),
                        source,
                    })?;
            }
        }
        let create_err = |source| AclError::CreateFile {
            path: path.to_path_buf(),
            source,
        };
        // Create the file ourselves so it never exists with umask-default permissions;
        // SQLite gives its -wal and -shm files the database file's mode.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(create_err)?;
        let perms = file.metadata().map_err(create_err)?.permissions();
        if perms.mode() & 0o077 != 0 {
            log::warn!(
                target: "keyway::acl",
                "{}: database was readable by others (mode {:o}); setting 0600",
                path.display(),
                perms.mode() & 0o777
            );
            file.set_permissions(std::fs::Permissions::from_mode(0o600))
                .map_err(create_err)?;
        }
        drop(file);

        let open_err = |source| AclError::Open {
            path: path.to_path_buf(),
            source,
        };
        let conn = Connection::open(path).map_err(open_err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(open_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(AclError::NoWal {
                path: path.to_path_buf(),
                mode,
            });
        }
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(open_err)?;
        // After a big apply the WAL is truncated to this (see `checkpoint`), so it does not
        // keep the size of the largest transaction on a small SD card.
        conn.pragma_update(None, "journal_size_limit", JOURNAL_SIZE_LIMIT)
            .map_err(open_err)?;
        let mut store = Store {
            conn,
            path: path.to_path_buf(),
            tz: jiff::tz::TimeZone::system(),
        };
        store.configure_and_migrate()?;
        Ok(store)
    }

    /// Opens an existing database for reading only, on a disk that takes no writes: no file is
    /// created and nothing migrated (see [`open_read_only_connection`]).
    pub fn open_read_only(path: &Path) -> Result<Store, AclError> {
        let open_err = |source| AclError::Open {
            path: path.to_path_buf(),
            source,
        };
        let conn = open_read_only_connection(path).map_err(open_err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
        let found: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(open_err)?;
        if found > SCHEMA_VERSION {
            return Err(AclError::SchemaTooNew {
                path: path.to_path_buf(),
                found,
                supported: SCHEMA_VERSION,
            });
        }
        if found < SCHEMA_VERSION {
            return Err(AclError::ReadOnlyNeedsMigration {
                path: path.to_path_buf(),
                found,
                supported: SCHEMA_VERSION,
            });
        }
        Ok(Store {
            conn,
            path: path.to_path_buf(),
            tz: jiff::tz::TimeZone::system(),
        })
    }

    /// `PRAGMA quick_check`, stopped when `budget` runs out: every page of a large database is
    /// read, which takes seconds on an SD card.
    pub fn quick_check(&self, budget: Duration) -> Result<QuickCheck, AclError> {
        // A watchdog interrupts the check when the budget runs out; told to stand down when
        // it finishes first.
        let interrupt = self.conn.get_interrupt_handle();
        let (done, finished) = std::sync::mpsc::channel::<()>();
        let watchdog = std::thread::Builder::new()
            .name("keyway-check".into())
            .spawn(move || {
                if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    finished.recv_timeout(budget)
                {
                    interrupt.interrupt();
                }
            })
            .map_err(AclError::CheckThread)?;
        let lines: Result<Vec<String>, rusqlite::Error> = self
            .conn
            .prepare(&format!("PRAGMA quick_check({QUICK_CHECK_LINES})"))
            .and_then(|mut stmt| {
                stmt.query_map([], |r| r.get::<_, String>(0))?
                    .collect::<Result<Vec<_>, _>>()
            });
        let _ = done.send(());
        let _ = watchdog.join();
        match lines {
            Ok(l) if l.len() == 1 && l.first().map(String::as_str) == Some("ok") => {
                Ok(QuickCheck::Ok)
            }
            Ok(l) => Ok(QuickCheck::Damaged(l)),
            Err(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::OperationInterrupted) => {
                Ok(QuickCheck::Unfinished)
            }
            Err(e) if is_damage(&e) => Ok(QuickCheck::Damaged(vec![e.to_string()])),
            Err(e) => Err(e.into()),
        }
    }

    /// A private in-memory store (tests, dry runs). Same schema, no file.
    pub fn open_in_memory() -> Result<Store, AclError> {
        let path = PathBuf::from(":memory:");
        let conn = Connection::open_in_memory().map_err(|source| AclError::Open {
            path: path.clone(),
            source,
        })?;
        let mut store = Store {
            conn,
            path,
            tz: jiff::tz::TimeZone::system(),
        };
        store.configure_and_migrate()?;
        Ok(store)
    }

    fn configure_and_migrate(&mut self) -> Result<(), AclError> {
        let open_err = |source| AclError::Open {
            path: self.path.clone(),
            source,
        };
        self.conn
            .pragma_update(None, "foreign_keys", true)
            .map_err(open_err)?;
        let found: i64 = self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(open_err)?;
        if !(0..=SCHEMA_VERSION).contains(&found) {
            return Err(AclError::SchemaTooNew {
                path: self.path.clone(),
                found,
                supported: SCHEMA_VERSION,
            });
        }
        for (from, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
            let version = from as i64 + 1;
            let mig_err = |source| AclError::Migration {
                path: self.path.clone(),
                version,
                source,
            };
            // Schema change and version bump commit together, so a crash mid-way leaves
            // the previous version intact.
            let tx = self.conn.transaction().map_err(mig_err)?;
            tx.execute_batch(sql).map_err(mig_err)?;
            tx.pragma_update(None, "user_version", version)
                .map_err(mig_err)?;
            tx.commit().map_err(mig_err)?;
        }
        self.drop_leftovers();
        Ok(())
    }

    /// Drops what an apply interrupted by a crash left behind (a half-built or an old
    /// generation). Only writes when there is something to drop, so a read-only database
    /// opens as before.
    fn drop_leftovers(&self) {
        let left: Result<i64, _> = self.conn.query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table'
             AND name IN ('acl_next', 'acl_old', 'card_uids_next', 'card_uids_old')",
            [],
            |r| r.get(0),
        );
        if matches!(left, Ok(n) if n > 0) {
            if let Err(e) = self.conn.execute_batch(
                "BEGIN IMMEDIATE;
                 DROP TABLE IF EXISTS acl_next; DROP TABLE IF EXISTS acl_old;
                 DROP TABLE IF EXISTS card_uids_next; DROP TABLE IF EXISTS card_uids_old;
                 COMMIT;",
            ) {
                let _ = self.conn.execute_batch("ROLLBACK");
                log::warn!(target: "keyway::acl",
                    "{}: leftovers of an interrupted ACL apply not dropped: {e}",
                    self.path.display());
            }
        }
    }

    /// How long a write waits for another connection's lock before failing with "busy".
    pub fn set_busy_timeout(&self, timeout: Duration) -> Result<(), AclError> {
        Ok(self.conn.busy_timeout(timeout)?)
    }

    /// Sets the site's time zone, in which schedules are read.
    pub fn set_time_zone(&mut self, tz: jiff::tz::TimeZone) {
        self.tz = tz;
    }

    /// The site's time zone.
    pub fn time_zone(&self) -> &jiff::tz::TimeZone {
        &self.tz
    }

    /// The database path given to [`Store::open`].
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Decides whether `endpoint_key` may open `door` at `now`.
    pub fn decide(
        &self,
        endpoint_key: &[u8],
        door: &str,
        now: time::OffsetDateTime,
    ) -> Result<Decision, AclError> {
        self.decide_at(endpoint_key, door, now.unix_timestamp())
    }

    /// [`Store::decide`] with `now` in unix seconds.
    ///
    /// `endpoint_key` is the phone's public key, uncompressed (65 bytes) or compressed (33);
    /// anything that is not a valid P-256 point cannot be stored, so it is an unknown key.
    pub fn decide_at(
        &self,
        endpoint_key: &[u8],
        door: &str,
        now_unix: i64,
    ) -> Result<Decision, AclError> {
        let record = self.lookup(endpoint_key, door, now_unix)?;
        Ok(evaluate(record.as_ref(), now_unix))
    }

    /// Fetches the credential for `endpoint_key` with its access to `door` at `now_unix`.
    ///
    /// No curve check here: a key that is not a stored (validated) point simply is not found.
    pub fn lookup(
        &self,
        endpoint_key: &[u8],
        door: &str,
        now_unix: i64,
    ) -> Result<Option<CredentialRecord>, AclError> {
        let Some(key) = lookup_key(endpoint_key) else {
            return Ok(None);
        };
        self.query_credential(BY_KEY, key.as_slice(), door, now_unix)
    }

    /// Runs `SELECT <credential columns> <from_where>` with `?1` = `value`: the one way a
    /// credential is read for a decision (by endpoint key or by card UID).
    /// Looks one credential up by the `from_where` of [`BY_KEY`] or [`BY_CARD_UID`].
    pub(crate) fn query_credential(
        &self,
        from_where: &str,
        value: &[u8],
        door: &str,
        now_unix: i64,
    ) -> Result<Option<CredentialRecord>, AclError> {
        let mut stmt = self.conn.prepare_cached(&credential_sql(from_where))?;
        let row = stmt
            .query_row([value], |r| {
                Ok(CredentialRow {
                    key: r.get(0)?,
                    person_id: r.get(1)?,
                    format: r.get(2)?,
                    fc: r.get(3)?,
                    cn: r.get(4)?,
                    valid_from: r.get(5)?,
                    valid_until: r.get(6)?,
                    state: r.get(7)?,
                    doors: r.get(8)?,
                })
            })
            .optional()?;
        let Some(row) = row else {
            return Ok(None);
        };
        let access = self.door_access(&row.doors, door, now_unix)?;
        credential_record(row, access).map(Some)
    }

    /// What a credential's door entries give at `door` at `now_unix`: the first entry naming
    /// the door (itself, a group holding it, or `*`) with no schedule or an open one opens
    /// it; named only by closed schedules, it is outside its schedule. An undefined group or
    /// schedule (the engine refuses them; a hand-edited database) names nothing / is closed.
    fn door_access(&self, doors: &str, door: &str, now_unix: i64) -> Result<DoorAccess, AclError> {
        let mut listed = false;
        let mut local = None;
        let mut holiday = None;
        for entry in doors.split(';') {
            let Ok(e) = schedule::parse_entry(entry) else {
                continue;
            };
            let names_door = match e.target {
                Target::All => true,
                Target::Door(d) => d == door,
                Target::Group(g) => self
                    .conn
                    .prepare_cached("SELECT 1 FROM door_groups WHERE grp = ?1 AND door = ?2")?
                    .exists([g, door])?,
            };
            if !names_door {
                continue;
            }
            listed = true;
            let Some(id) = e.schedule else {
                return Ok(DoorAccess::Open);
            };
            let program: Option<String> = self
                .conn
                .prepare_cached("SELECT program FROM schedules WHERE id = ?1")?
                .query_row([id], |r| r.get(0))
                .optional()?;
            let Some(sch) = program.as_deref().and_then(Schedule::decode) else {
                continue;
            };
            let Some(t) = *local.get_or_insert_with(|| schedule::local_time(now_unix, &self.tz))
            else {
                continue;
            };
            let on_holiday = match (sch.cares_about_holidays(), holiday) {
                (false, _) => false,
                (true, Some(h)) => h,
                (true, None) => {
                    let h = self
                        .conn
                        .prepare_cached("SELECT 1 FROM holidays WHERE date = ?1")?
                        .exists([t.date.to_string()])?;
                    holiday = Some(h);
                    h
                }
            };
            if sch.is_open(&t, on_holiday) {
                return Ok(DoorAccess::Open);
            }
        }
        Ok(if listed {
            DoorAccess::OutsideSchedule
        } else {
            DoorAccess::NotListed
        })
    }

    /// Writes the WAL back into the database and truncates it (after a big apply), so the
    /// WAL does not keep the size of the largest transaction. Best effort: a reader holding
    /// an old snapshot only delays it to the next automatic checkpoint.
    pub fn checkpoint(&self) {
        if let Err(e) = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        {
            log::debug!(target: "keyway::acl", "checkpoint skipped: {e}");
        }
    }

    /// Counts for status output.
    pub fn stats(&self) -> Result<StoreStats, AclError> {
        let count = |sql: &str| self.count(sql);
        let meta = |key: &str| -> Result<Option<String>, rusqlite::Error> {
            self.conn
                .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                .optional()
        };
        let last_import = match meta("last_import_at")? {
            None => None,
            Some(at) => Some(LastImport {
                at: at.parse().unwrap_or(0),
                source: meta("last_import_source")?.unwrap_or_default(),
                mode: meta("last_import_mode")?.unwrap_or_default(),
                count: meta("last_import_count")?
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(0),
            }),
        };
        Ok(StoreStats {
            schema_version: self
                .conn
                .query_row("PRAGMA user_version", [], |r| r.get(0))?,
            credentials: credential_count(&self.conn)?,
            persons: count("SELECT count(DISTINCT person_id) FROM acl")?,
            door_grants: count(
                "SELECT coalesce(sum(length(doors) - length(replace(doors, ';', '')) + 1), 0)
                 FROM acl",
            )?,
            events_total: crate::events::event_count(&self.conn)?,
            events_undelivered: crate::events::outbox_depth(&self.conn)?.0,
            events_pruned_undelivered: self.events_pruned_undelivered()?,
            events_write_failed: self.events_write_failed()?,
            last_import,
        })
    }
}

/// One `acl` row as selected by [`Store::query_credential`].
pub(crate) struct CredentialRow {
    key: Vec<u8>,
    person_id: String,
    format: i64,
    fc: i64,
    cn: i64,
    valid_from: Option<i64>,
    valid_until: Option<i64>,
    state: i64,
    doors: String,
}

/// The stored code of a card format.
pub(crate) fn format_code(f: CardFormat) -> i64 {
    match f {
        CardFormat::H10301 => 0,
        CardFormat::H10304 => 1,
    }
}

/// Checks a stored row and turns it into a [`CredentialRecord`] with its `door` access.
pub(crate) fn credential_record(
    row: CredentialRow,
    door: DoorAccess,
) -> Result<CredentialRecord, AclError> {
    let credential_id = credential_id(&row.key);
    // The importer validated these; re-check so a hand-edited database cannot make us
    // send a truncated card number to the panel.
    let corrupt = |what: String| AclError::Corrupt {
        id: credential_id,
        what,
    };
    let card_format = match row.format {
        0 => CardFormat::H10301,
        1 => CardFormat::H10304,
        other => return Err(corrupt(format!("card format code {other}"))),
    };
    let (fc, cn) = (row.fc, row.cn);
    let facility_code =
        u32::try_from(fc).map_err(|_| corrupt(format!("facility_code {fc} out of range")))?;
    let card_number =
        u32::try_from(cn).map_err(|_| corrupt(format!("card_number {cn} out of range")))?;
    card_format
        .check_range(facility_code, card_number)
        .map_err(|e| corrupt(e.to_string()))?;
    let state = CredentialState::from_code(row.state)
        .ok_or_else(|| corrupt(format!("state code {}", row.state)))?;
    Ok(CredentialRecord {
        credential_id,
        person_id: row.person_id,
        card_format,
        facility_code,
        card_number,
        valid_from: row.valid_from,
        valid_until: row.valid_until,
        door,
        state,
    })
}

/// A credential's id in events: the first 63 bits of SHA-256 of its compressed key. Stable
/// across imports, rebuilt databases and gateways (the same phone key is the same id
/// everywhere); 5 million keys collide with probability about 1e-6, and an id is only a
/// label in events (decisions use the key itself).
pub fn credential_id(compressed_key: &[u8]) -> i64 {
    let d = Sha256::digest(compressed_key);
    let mut b = [0u8; 8];
    b.copy_from_slice(d.get(..8).unwrap_or(&[0; 8]));
    (u64::from_be_bytes(b) >> 1) as i64
}

/// The compressed form (`02/03 || X`) of a validated uncompressed key.
pub fn compress_key(key: &[u8; ENDPOINT_KEY_LEN]) -> [u8; COMPRESSED_KEY_LEN] {
    let mut out = [0u8; COMPRESSED_KEY_LEN];
    out[0] = 0x02 | (key[ENDPOINT_KEY_LEN - 1] & 1);
    out[1..].copy_from_slice(&key[1..COMPRESSED_KEY_LEN]);
    out
}

/// The stored form of a key presented at a door (uncompressed or compressed), without the
/// curve check: only validated keys are stored, so anything else is simply not found.
fn lookup_key(raw: &[u8]) -> Option<[u8; COMPRESSED_KEY_LEN]> {
    match (raw.len(), raw.first()) {
        (ENDPOINT_KEY_LEN, Some(0x04)) => {
            let k: &[u8; ENDPOINT_KEY_LEN] = raw.try_into().ok()?;
            Some(compress_key(k))
        }
        (COMPRESSED_KEY_LEN, Some(0x02 | 0x03)) => raw.try_into().ok(),
        _ => None,
    }
}

/// A read-only connection to an existing database, also on a disk that takes no writes.
/// `mode=ro` first (it sees what a writer left in the WAL); where SQLite cannot read a WAL
/// database that way (no `-shm` file and no way to create one on a read-only file system),
/// `immutable=1`, which takes no locks: right because nothing can write a read-only file
/// system. Such a connection does not see later writes: reopen it once the disk takes writes.
pub fn open_read_only_connection(path: &Path) -> Result<Connection, rusqlite::Error> {
    use rusqlite::OpenFlags;
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY
        | OpenFlags::SQLITE_OPEN_URI
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let uri = |extra: &str| {
        let mut u = String::from("file:");
        for b in path.as_os_str().as_encoded_bytes() {
            // The path as a URI: everything but unreserved characters and '/' escaped.
            if b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'_' | b'.' | b'~') {
                u.push(char::from(*b));
            } else {
                u.push_str(&format!("%{b:02X}"));
            }
        }
        u.push_str("?mode=ro");
        u.push_str(extra);
        u
    };
    let try_open = |extra: &str| -> Result<Connection, rusqlite::Error> {
        let conn = Connection::open_with_flags(uri(extra), flags)?;
        // A read that needs the WAL index fails here, not at the first decision.
        conn.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))?;
        Ok(conn)
    };
    // Only where the file system is the reason: a busy or damaged database is not opened
    // immutable (it would never see the writer's changes).
    try_open("").or_else(|e| match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::CannotOpen | rusqlite::ErrorCode::ReadOnly) => {
            try_open("&immutable=1")
        }
        _ => Err(e),
    })
}

/// SQLite errors that mean the database file itself is damaged (not the input, not busy).
pub fn is_damage(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase)
    )
}

/// Validates a SEC1-encoded P-256 public key (compressed or uncompressed) and returns it
/// uncompressed (`04 || X || Y`). The error says what is wrong, for import messages.
pub fn normalize_endpoint_key(raw: &[u8]) -> Result<[u8; ENDPOINT_KEY_LEN], String> {
    let shape_ok = matches!(
        (raw.len(), raw.first()),
        (ENDPOINT_KEY_LEN, Some(0x04)) | (33, Some(0x02 | 0x03))
    );
    if !shape_ok {
        return Err(format!(
            "expected 65 bytes starting 04 or 33 bytes starting 02/03, got {} bytes{}",
            raw.len(),
            raw.first()
                .map(|b| format!(" starting {b:02x}"))
                .unwrap_or_default()
        ));
    }
    let key = p256::PublicKey::from_sec1_bytes(raw)
        .map_err(|_| "not a point on the P-256 curve".to_string())?;
    let point = key.to_encoded_point(false);
    point
        .as_bytes()
        .try_into()
        .map_err(|_| "could not re-encode the point".to_string())
}

/// The lookup a tap makes: by the endpoint's compressed key.
pub(crate) const BY_KEY: &str = "FROM acl a WHERE a.key = ?1";
/// The lookup of a physical card (doors with `accept_cards`): by its UID.
pub(crate) const BY_CARD_UID: &str =
    "FROM card_uids u JOIN acl a ON a.key = u.key WHERE u.uid = ?1";

/// The SQL of a credential lookup: one place, so the query-plan test checks what runs.
pub(crate) fn credential_sql(from_where: &str) -> String {
    format!(
        "SELECT a.key, a.person_id, a.format, a.fc, a.cn, a.valid_from, a.valid_until,
                a.state, a.doors
         {from_where}"
    )
}

/// How many credentials the ACL holds: the one query every reader of the store (stats, the
/// status probe every 2 s) uses. The apply engine keeps the number in `meta` in the same
/// transaction as the change, so this is one probe: counting 5M rows took ~70 ms and read the
/// whole table each time.
pub fn credential_count(conn: &rusqlite::Connection) -> Result<u64, rusqlite::Error> {
    let n: i64 = conn.query_row(
        "SELECT coalesce((SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'acl_credentials'),
                         (SELECT count(*) FROM acl))",
        [],
        |r| r.get(0),
    )?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// Short stable id of an endpoint key for logs and events: the first 8 bytes of SHA-256 of
/// the uncompressed key, in hex (16 characters). Compressed input gives the same id.
pub fn fingerprint(endpoint_key: &[u8]) -> String {
    let digest = match normalize_endpoint_key(endpoint_key) {
        Ok(k) => Sha256::digest(k),
        // Not a valid key: still give a stable id, of the bytes as they came.
        Err(_) => Sha256::digest(endpoint_key),
    };
    hex::encode(digest.get(..8).unwrap_or_default())
}

/// A valid endpoint key for tests, the same for the same `seed` (the ACL modules' tests).
#[cfg(test)]
pub(crate) fn test_key(seed: u16) -> [u8; ENDPOINT_KEY_LEN] {
    use p256::elliptic_curve::sec1::ToEncodedPoint;
    let mut scalar = [0u8; 32];
    scalar[0] = 1;
    scalar[30..].copy_from_slice(&seed.to_be_bytes());
    let sk = p256::SecretKey::from_slice(&scalar).expect("nonzero scalar below the order");
    sk.public_key()
        .to_encoded_point(false)
        .as_bytes()
        .try_into()
        .expect("65-byte uncompressed point")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> [u8; ENDPOINT_KEY_LEN] {
        test_key(seed.into())
    }

    fn spec(seed: u8, doors: &[&str], from: Option<i64>, until: Option<i64>) -> CredentialSpec {
        CredentialSpec {
            state: crate::acl::CredentialState::Active,
            line: 1,
            endpoint_key: key(seed),
            person_id: format!("person-{seed}"),
            card_format: CardFormat::H10301,
            facility_code: 10,
            card_number: u32::from(seed) * 100,
            valid_from: from,
            valid_until: until,
            doors: doors.iter().map(|d| d.to_string()).collect(),
            card_uids: Vec::new(),
        }
    }

    /// A site: door groups, a weekday schedule with a holiday, in Berlin.
    fn site() -> record::Definitions {
        let defs = serde_json::json!({
            "door_groups": {"lobby": ["front", "side"], "dock": ["loading-dock"]},
            "schedules": {
                "weekdays": {"weekly": [{"days": "mon-fri", "from": "07:00", "until": "19:00"}]},
                "nights": {
                    "weekly": [{"days": "daily", "from": "22:00", "until": "06:00"}],
                    "holidays": "as_weekday"
                }
            },
            "holidays": ["2026-12-25"]
        });
        record::Definitions {
            door_groups: Some(
                record::parse_door_groups(&defs["door_groups"])
                    .ok()
                    .unwrap(),
            ),
            schedules: Some(record::parse_schedules(&defs["schedules"]).ok().unwrap()),
            holidays: Some(record::parse_holidays(&defs["holidays"]).ok().unwrap()),
        }
    }

    fn apply_with(
        s: &mut Store,
        defs: record::Definitions,
        specs: &[CredentialSpec],
        mode: ImportMode,
    ) -> Result<ApplySummary, ApplyError> {
        let mut a = SnapshotApply::begin(s, None, mode, "t")?;
        for spec in specs {
            a.push(spec)?;
        }
        a.define(defs);
        a.commit()
    }

    #[test]
    fn groups_and_schedules_decide_in_the_site_time_zone() {
        let mut s = Store::open_in_memory().unwrap();
        let berlin = jiff::tz::TimeZone::get("Europe/Berlin").unwrap();
        s.set_time_zone(berlin.clone());
        let at = |m: i8, d: i8, h: i8, mi: i8| {
            jiff::civil::date(2026, m, d)
                .at(h, mi, 0, 0)
                .to_zoned_datetime(berlin.clone())
                .unwrap()
                .timestamp()
                .as_second()
        };
        apply_with(
            &mut s,
            site(),
            &[
                // A contractor: the dock on weekdays 07-19, the lobby any time.
                spec(1, &["loading-dock=weekdays", "@lobby"], None, None),
                // A guard: every door at night.
                spec(2, &["*=nights"], None, None),
            ],
            ImportMode::Replace,
        )
        .unwrap();
        let d = |s: &Store, seed, door: &str, t| s.decide_at(&key(seed), door, t).unwrap();
        let wed_noon = at(6, 3, 12, 0);
        assert!(d(&s, 1, "loading-dock", wed_noon).is_grant());
        assert!(d(&s, 1, "side", wed_noon).is_grant(), "through the group");
        assert_eq!(
            d(&s, 1, "loading-dock", at(6, 3, 19, 0)),
            Decision::Deny(DenyReason::OutsideSchedule)
        );
        assert_eq!(
            d(&s, 1, "loading-dock", at(6, 6, 12, 0)),
            Decision::Deny(DenyReason::OutsideSchedule),
            "Saturday"
        );
        assert_eq!(
            d(&s, 1, "loading-dock", at(12, 25, 12, 0)),
            Decision::Deny(DenyReason::OutsideSchedule),
            "a Friday that is a holiday"
        );
        assert!(
            d(&s, 1, "front", at(12, 25, 12, 0)).is_grant(),
            "no schedule"
        );
        assert_eq!(
            d(&s, 1, "server-room", wed_noon),
            Decision::Deny(DenyReason::WrongDoor)
        );
        assert!(d(&s, 2, "server-room", at(12, 25, 23, 0)).is_grant());
        assert_eq!(
            d(&s, 2, "front", wed_noon),
            Decision::Deny(DenyReason::OutsideSchedule)
        );
        // The same instant is another wall-clock time elsewhere: 07:00 in Berlin (summer) is
        // 05:00 in UTC, before the window.
        assert!(d(&s, 1, "loading-dock", at(6, 3, 7, 0)).is_grant());
        s.set_time_zone(jiff::tz::TimeZone::UTC);
        assert_eq!(
            d(&s, 1, "loading-dock", at(6, 3, 7, 0)),
            Decision::Deny(DenyReason::OutsideSchedule)
        );
        // Expired comes before the schedule.
        apply_with(
            &mut s,
            record::Definitions::default(),
            &[spec(1, &["loading-dock=weekdays"], None, Some(10))],
            ImportMode::Merge,
        )
        .unwrap();
        assert_eq!(
            d(&s, 1, "loading-dock", wed_noon),
            Decision::Deny(DenyReason::Expired)
        );
    }

    #[test]
    fn undefined_groups_and_schedules_are_refused_with_the_line() {
        let mut s = Store::open_in_memory().unwrap();
        let mut bad = spec(1, &["@nowhere"], None, None);
        bad.line = 7;
        let e = apply_with(&mut s, site(), &[bad], ImportMode::Replace).unwrap_err();
        assert!(
            matches!(&e, ApplyError::Record { line: 7, field: "doors", message }
                if message.contains("door group 'nowhere' is not defined")),
            "{e}"
        );
        let e = apply_with(
            &mut s,
            site(),
            &[spec(1, &["front=always"], None, None)],
            ImportMode::Replace,
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("schedule 'always' is not defined"),
            "{e}"
        );
        assert_eq!(s.stats().unwrap().credentials, 0, "nothing applied");
        // Definitions stay when a source without them (a CSV) replaces the credentials...
        apply_with(&mut s, site(), &[], ImportMode::Replace).unwrap();
        apply_with(
            &mut s,
            record::Definitions::default(),
            &[spec(1, &["@lobby=weekdays"], None, None)],
            ImportMode::Replace,
        )
        .unwrap();
        // ...and a replace that carries them checks against what it carries.
        let e = apply_with(
            &mut s,
            record::Definitions {
                schedules: Some(Default::default()),
                ..Default::default()
            },
            &[spec(1, &["@lobby=weekdays"], None, None)],
            ImportMode::Replace,
        )
        .unwrap_err();
        assert!(e.to_string().contains("schedule 'weekdays'"), "{e}");
        // A delta upsert is checked too.
        let e = s
            .apply_delta(
                0,
                1,
                &[DeltaOp::Upsert(spec(3, &["@nowhere"], None, None))],
                "cloud",
            )
            .unwrap_err();
        assert!(
            !matches!(e, ApplyError::Record { .. }),
            "base mismatch first: {e}"
        );
    }

    #[test]
    fn merge_updates_definitions_by_id_and_states_come_from_the_file() {
        let mut s = Store::open_in_memory().unwrap();
        apply_with(&mut s, site(), &[], ImportMode::Replace).unwrap();
        let mut suspended = spec(1, &["@lobby"], None, None);
        suspended.state = CredentialState::Suspended;
        let groups = serde_json::json!({"lobby": ["back"]});
        apply_with(
            &mut s,
            record::Definitions {
                door_groups: Some(record::parse_door_groups(&groups).ok().unwrap()),
                ..Default::default()
            },
            &[suspended, spec(2, &["@lobby", "@dock"], None, None)],
            ImportMode::Merge,
        )
        .unwrap();
        assert_eq!(
            s.decide_at(&key(1), "back", 0).unwrap(),
            Decision::Deny(DenyReason::Suspended)
        );
        // lobby replaced (back only), dock kept.
        assert!(s.decide_at(&key(2), "back", 0).unwrap().is_grant());
        assert_eq!(
            s.decide_at(&key(2), "front", 0).unwrap(),
            Decision::Deny(DenyReason::WrongDoor)
        );
        assert!(s.decide_at(&key(2), "loading-dock", 0).unwrap().is_grant());
    }

    #[test]
    fn fingerprint_is_sha256_prefix_and_form_independent() {
        let k = key(3);
        let expected = hex::encode(&Sha256::digest(k)[..8]);
        assert_eq!(fingerprint(&k), expected);
        assert_eq!(fingerprint(&k).len(), 16);
        let compressed = p256::PublicKey::from_sec1_bytes(&k)
            .unwrap()
            .to_encoded_point(true);
        assert_eq!(fingerprint(compressed.as_bytes()), expected);
        assert_ne!(fingerprint(&key(4)), expected);
    }

    #[test]
    fn normalize_rejects_bad_shapes_and_points() {
        let k = key(5);
        assert_eq!(normalize_endpoint_key(&k).unwrap(), k);
        let mut bad = k;
        bad[64] ^= 1;
        assert!(normalize_endpoint_key(&bad).unwrap_err().contains("P-256"));
        let mut wrong_tag = k;
        wrong_tag[0] = 0x05;
        assert!(normalize_endpoint_key(&wrong_tag).is_err());
        assert!(normalize_endpoint_key(&[]).is_err());
        assert!(normalize_endpoint_key(&k[..64]).is_err());
        // An all-0xff X is larger than the field prime p, so it is no coordinate at all.
        let mut big_x = [0xffu8; 33];
        big_x[0] = 0x02;
        assert!(normalize_endpoint_key(&big_x).is_err());
    }

    #[test]
    fn decide_all_outcomes_in_memory() {
        let mut s = Store::open_in_memory().unwrap();
        let specs = vec![
            spec(1, &["front"], None, None),
            spec(2, &["*"], Some(1000), Some(2000)),
            spec(3, &["front", "back"], None, None),
        ];
        s.import_specs(&specs, ImportMode::Replace, "t").unwrap();
        let d = s.decide_at(&key(1), "front", 0).unwrap();
        match d {
            Decision::Grant(g) => {
                assert_eq!(g.person_id, "person-1");
                assert_eq!(g.card_number, 100);
                assert_eq!(g.facility_code, 10);
                assert_eq!(g.card_format, CardFormat::H10301);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            s.decide_at(&key(1), "back", 0).unwrap(),
            Decision::Deny(DenyReason::WrongDoor)
        );
        assert_eq!(
            s.decide_at(&key(9), "front", 0).unwrap(),
            Decision::Deny(DenyReason::UnknownKey)
        );
        assert_eq!(
            s.decide_at(&[1, 2, 3], "front", 0).unwrap(),
            Decision::Deny(DenyReason::UnknownKey)
        );
        assert!(s.decide_at(&key(2), "anything", 1500).unwrap().is_grant());
        assert_eq!(
            s.decide_at(&key(2), "front", 999).unwrap(),
            Decision::Deny(DenyReason::NotYetValid)
        );
        assert_eq!(
            s.decide_at(&key(2), "front", 2000).unwrap(),
            Decision::Deny(DenyReason::Expired)
        );
        assert!(s.decide_at(&key(3), "back", 0).unwrap().is_grant());
        // A door literally named like a SQL wildcard does not match everything.
        assert_eq!(
            s.decide_at(&key(3), "%", 0).unwrap(),
            Decision::Deny(DenyReason::WrongDoor)
        );
    }

    #[test]
    fn lookups_are_index_searches() {
        let s = Store::open_in_memory().unwrap();
        // The SQL the code runs, not a copy: a changed query is checked as it is.
        for (from_where, index) in [(BY_KEY, "PRIMARY KEY"), (BY_CARD_UID, "PRIMARY KEY")] {
            let mut stmt = s
                .conn
                .prepare(&format!(
                    "EXPLAIN QUERY PLAN {}",
                    credential_sql(from_where)
                ))
                .unwrap();
            let plan: Vec<String> = stmt
                .query_map([vec![2u8; 33]], |r| r.get::<_, String>(3))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            let plan = plan.join(" | ");
            assert!(
                !plan.contains("SCAN") && plan.contains("SEARCH") && plan.contains(index),
                "{from_where}: {plan}"
            );
        }
    }

    /// A database written by the previous schema (v5) opens, keeps deciding the same, keeps
    /// its card UIDs and FAST keys, and shrinks to the compact table.
    #[test]
    fn v5_database_migrates_to_the_compact_acl() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("old.db");
        {
            let conn = Connection::open(&db).unwrap();
            for (i, sql) in MIGRATIONS.iter().take(5).enumerate() {
                conn.execute_batch(sql).unwrap();
                conn.pragma_update(None, "user_version", i as i64 + 1)
                    .unwrap();
            }
            let ins = "INSERT INTO credentials (id, endpoint_key, person_id, card_format,
                       facility_code, card_number, valid_from, valid_until, created_at, updated_at)
                       VALUES (?1, ?2, ?3, ?4, 7, ?5, ?6, NULL, 0, 0)";
            for (id, seed, fmt, from) in [(1, 1u16, "h10301", None), (2, 2, "h10304", Some(100))] {
                conn.execute(
                    ins,
                    rusqlite::params![
                        id,
                        test_key(seed).as_slice(),
                        format!("p{seed}"),
                        fmt,
                        i64::from(seed) * 10,
                        from
                    ],
                )
                .unwrap();
            }
            conn.execute_batch(
                "INSERT INTO credential_doors VALUES (1, 'front'), (1, 'back'), (2, '*');
                 INSERT INTO card_uids VALUES (x'01020304', 2);
                 INSERT INTO events (time_ms, door, transport, decision, reason, latency_ms)
                 VALUES (1, 'front', 'nfc', 'granted', 'granted', 5),
                        (2, 'front', 'nfc', 'granted', 'granted', 5);",
            )
            .unwrap();
            conn.execute(
                "INSERT INTO fast_keys (reader_id, credential_id, endpoint_key, k_persistent, used_at)
                 VALUES (?1, 1, ?2, ?3, 5)",
                rusqlite::params![[9u8; 32].as_slice(), test_key(1).as_slice(), [7u8; 32].as_slice()],
            )
            .unwrap();
        }
        let s = Store::open(&db).unwrap();
        assert_eq!(s.stats().unwrap().schema_version, SCHEMA_VERSION);
        // Events written before v7 get their own uid.
        let uids: Vec<String> = s
            .recent_events(5)
            .unwrap()
            .into_iter()
            .map(|e| e.uid)
            .collect();
        assert!(uids.len() == 2 && uids[0].len() == 32 && uids[0] != uids[1]);
        match s.decide_at(&test_key(1), "back", 0).unwrap() {
            Decision::Grant(g) => {
                assert_eq!(
                    (g.person_id.as_str(), g.card_format, g.card_number),
                    ("p1", CardFormat::H10301, 10)
                );
                assert_eq!(g.credential_id, credential_id(&compress_key(&test_key(1))));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            s.decide_at(&test_key(1), "side", 0).unwrap(),
            Decision::Deny(DenyReason::WrongDoor)
        );
        assert_eq!(
            s.decide_at(&test_key(2), "x", 50).unwrap(),
            Decision::Deny(DenyReason::NotYetValid)
        );
        match s
            .decide_card(
                &[1, 2, 3, 4],
                "x",
                time::OffsetDateTime::from_unix_timestamp(200).unwrap(),
            )
            .unwrap()
        {
            Decision::Grant(g) => {
                assert_eq!((g.card_format, g.card_number), (CardFormat::H10304, 20))
            }
            other => panic!("{other:?}"),
        }
        let fast = s.fast_keys(&[9u8; 32]).unwrap();
        assert_eq!(fast.len(), 1);
        assert_eq!(fast[0].endpoint_public_key, test_key(1));
        let old_tables: i64 = s.conn.query_row(
            "SELECT count(*) FROM sqlite_master WHERE name IN ('credentials', 'credential_doors')",
            [], |r| r.get(0)).unwrap();
        assert_eq!(old_tables, 0);
    }

    #[test]
    fn corrupt_rows_are_reported_not_sent() {
        let mut s = Store::open_in_memory().unwrap();
        s.import_specs(&[spec(1, &["*"], None, None)], ImportMode::Replace, "t")
            .unwrap();
        s.conn.execute("UPDATE acl SET cn = 70000", []).unwrap();
        assert!(matches!(
            s.decide_at(&key(1), "x", 0),
            Err(AclError::Corrupt { .. })
        ));
        s.conn
            .execute("UPDATE acl SET cn = 1, format = 7", [])
            .unwrap();
        assert!(matches!(
            s.decide_at(&key(1), "x", 0),
            Err(AclError::Corrupt { .. })
        ));
    }

    #[test]
    fn merge_and_replace_keep_ids_and_count() {
        let mut s = Store::open_in_memory().unwrap();
        let sum = s
            .import_specs(
                &[spec(1, &["a"], None, None), spec(2, &["a"], None, None)],
                ImportMode::Replace,
                "one.csv",
            )
            .unwrap();
        assert_eq!((sum.inserted, sum.updated, sum.removed), (2, 0, 0));
        let id1 = s.lookup(&key(1), "a", 0).unwrap().unwrap().credential_id;
        let sum = s
            .import_specs(&[spec(3, &["a"], None, None)], ImportMode::Merge, "m.csv")
            .unwrap();
        assert_eq!((sum.inserted, sum.updated, sum.removed), (1, 0, 0));
        assert_eq!(s.stats().unwrap().credentials, 3);
        let sum = s
            .import_specs(
                &[spec(1, &["b"], None, None), spec(4, &["a"], None, None)],
                ImportMode::Replace,
                "two.json",
            )
            .unwrap();
        assert_eq!((sum.inserted, sum.updated, sum.removed), (1, 1, 2));
        let r1 = s.lookup(&key(1), "b", 0).unwrap().unwrap();
        assert_eq!(r1.credential_id, id1);
        assert_eq!(r1.door, DoorAccess::Open);
        assert_eq!(
            s.lookup(&key(1), "a", 0).unwrap().unwrap().door,
            DoorAccess::NotListed
        );
        assert!(s.lookup(&key(2), "a", 0).unwrap().is_none());
        let st = s.stats().unwrap();
        assert_eq!(st.credentials, 2);
        assert_eq!(st.door_grants, 2);
        assert_eq!(st.schema_version, SCHEMA_VERSION);
        let li = st.last_import.unwrap();
        assert_eq!(
            (li.source.as_str(), li.mode.as_str(), li.count),
            ("two.json", "replace", 2)
        );
    }
}
