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

pub use apply::BATCH_ROWS;
pub use apply::{Applied, ApplyError, ApplySummary, CredentialState, DeltaOp, SnapshotApply};
pub use decision::{evaluate, CredentialRecord, Decision, DenyReason, Grant, ALL_DOORS};
pub use import::{load_file, read_file};
pub use record::{CredentialSpec, FileKind, ImportError, ImportMode, ImportSummary};

use crate::card::CardFormat;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use rusqlite::{Connection, OptionalExtension};
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
}

/// The SQLite-backed credential store and event outbox. Not `Sync`: the daemon keeps it
/// behind a mutex or on a dedicated thread.
#[derive(Debug)]
pub struct Store {
    pub(crate) conn: Connection,
    path: PathBuf,
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
        };
        store.configure_and_migrate()?;
        Ok(store)
    }

    /// A private in-memory store (tests, dry runs). Same schema, no file.
    pub fn open_in_memory() -> Result<Store, AclError> {
        let path = PathBuf::from(":memory:");
        let conn = Connection::open_in_memory().map_err(|source| AclError::Open {
            path: path.clone(),
            source,
        })?;
        let mut store = Store { conn, path };
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
        let record = self.lookup(endpoint_key, door)?;
        Ok(evaluate(record.as_ref(), now_unix))
    }

    /// Fetches the credential for `endpoint_key` with `door_allowed` computed for `door`.
    ///
    /// No curve check here: a key that is not a stored (validated) point simply is not found.
    pub fn lookup(
        &self,
        endpoint_key: &[u8],
        door: &str,
    ) -> Result<Option<CredentialRecord>, AclError> {
        let Some(key) = lookup_key(endpoint_key) else {
            return Ok(None);
        };
        self.query_credential(BY_KEY, key.as_slice(), door)
    }

    /// Runs `SELECT <credential columns> <from_where>` with `?1` = `value`: the one way a
    /// credential is read for a decision (by endpoint key or by card UID).
    /// Looks one credential up by the `from_where` of [`BY_KEY`] or [`BY_CARD_UID`].
    pub(crate) fn query_credential(
        &self,
        from_where: &str,
        value: &[u8],
        door: &str,
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
        row.map(|r| credential_record(r, door)).transpose()
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
            events_total: count("SELECT count(*) FROM events")?,
            events_undelivered: count("SELECT count(*) FROM events WHERE delivered_at IS NULL")?,
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

/// Checks a stored row and turns it into a [`CredentialRecord`] for `door`.
pub(crate) fn credential_record(
    row: CredentialRow,
    door: &str,
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
    let door_allowed = row.doors.split(';').any(|d| d == door || d == ALL_DOORS);
    Ok(CredentialRecord {
        credential_id,
        person_id: row.person_id,
        card_format,
        facility_code,
        card_number,
        valid_from: row.valid_from,
        valid_until: row.valid_until,
        door_allowed,
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
/// status probe) uses, so a schema change cannot leave one of them counting a dropped table.
pub fn credential_count(conn: &rusqlite::Connection) -> Result<u64, rusqlite::Error> {
    let n: i64 = conn.query_row("SELECT count(*) FROM acl", [], |r| r.get(0))?;
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
        let id1 = s.lookup(&key(1), "a").unwrap().unwrap().credential_id;
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
        let r1 = s.lookup(&key(1), "b").unwrap().unwrap();
        assert_eq!(r1.credential_id, id1);
        assert!(r1.door_allowed);
        assert!(!s.lookup(&key(1), "a").unwrap().unwrap().door_allowed);
        assert!(s.lookup(&key(2), "a").unwrap().is_none());
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
