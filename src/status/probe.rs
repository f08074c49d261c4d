//! Read-only samples for status and health: the database (ACL, outbox, recent decisions), the
//! disk holding it, the clock, reader certificates. Blocking; the daemon runs them on tokio's
//! blocking pool.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension};

use super::model::{AclStatus, DecisionSummary, DiskStatus, OutboxStatus};

/// How many recent decisions per door `status` shows.
pub const LAST_DECISIONS: usize = 5;

/// What one database sample found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DbSample {
    pub acl: AclStatus,
    pub outbox: OutboxStatus,
    /// Per door id: decisions since `since_event_id`, and the newest ones.
    pub doors: Vec<(String, u64, Vec<DecisionSummary>)>,
}

/// A read-only connection beside the store thread's (WAL lets it read while that one writes).
pub fn open_read_only(path: &Path) -> rusqlite::Result<Connection> {
    // Also on a read-only file system (the daemon then serves read-only and says so).
    let conn = crate::acl::open_read_only_connection(path)?;
    // Never wait long on a writer: a status answer is better late by a sample than stuck.
    conn.busy_timeout(Duration::from_millis(500))?;
    Ok(conn)
}

/// The highest event id now: decisions after it are "since start".
pub fn last_event_id(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("SELECT coalesce(max(id), 0) FROM events", [], |r| r.get(0))
}

fn meta(conn: &Connection, key: &str) -> rusqlite::Result<Option<String>> {
    conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()
}

pub fn sample_db(
    conn: &Connection,
    doors: &[String],
    since_event_id: i64,
    now_ms: i64,
) -> rusqlite::Result<DbSample> {
    let credentials = crate::acl::credential_count(conn)?;
    // Unix seconds, written by every import (and by cloud snapshots and deltas).
    let changed_ms = meta(conn, "last_import_at")?
        .and_then(|s| s.parse::<i64>().ok())
        .map(|s| s.saturating_mul(1000));
    let acl = AclStatus {
        credentials,
        version: meta(conn, "acl_version")?,
        hash: meta(conn, "acl_hash")?,
        changed_ms,
        age_s: changed_ms.map(|t| u64::try_from(now_ms.saturating_sub(t) / 1000).unwrap_or(0)),
    };
    // Index probes, not a count of a million undelivered rows every sample.
    let (undelivered, oldest_ms) = crate::events::outbox_depth(conn)?;
    let outbox = OutboxStatus {
        undelivered,
        oldest_ms,
    };
    let mut count =
        conn.prepare_cached("SELECT count(*) FROM events WHERE id > ?1 AND door = ?2")?;
    let mut recent = conn.prepare_cached(
        "SELECT id, time_ms, transport, decision, reason, person_id, panel_verdict
         FROM events WHERE door = ?1 ORDER BY id DESC LIMIT ?2",
    )?;
    let mut per_door = Vec::with_capacity(doors.len());
    for door in doors {
        let served: i64 = count.query_row(rusqlite::params![since_event_id, door], |r| r.get(0))?;
        let rows = recent
            .query_map(rusqlite::params![door, LAST_DECISIONS as i64], |r| {
                Ok(DecisionSummary {
                    event_id: r.get(0)?,
                    time_ms: r.get(1)?,
                    transport: r.get(2)?,
                    decision: r.get(3)?,
                    reason: r.get(4)?,
                    person_id: r.get(5)?,
                    panel_verdict: r.get(6)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        per_door.push((door.clone(), u64::try_from(served).unwrap_or(0), rows));
    }
    Ok(DbSample {
        acl,
        outbox,
        doors: per_door,
    })
}

/// Free and total bytes of the file system holding `path` (statvfs).
pub fn disk(path: &Path) -> std::io::Result<DiskStatus> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statvfs writes into the zeroed struct we own; `c` is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let frsize = st.f_frsize as u64;
    Ok(DiskStatus {
        path: path.display().to_string(),
        // Blocks available to an unprivileged user: what keyway (not root) can still write.
        free_bytes: (st.f_bavail as u64).saturating_mul(frsize),
        total_bytes: (st.f_blocks as u64).saturating_mul(frsize),
    })
}

/// Before this (2024-01-01T00:00:00Z) the clock was never set: an RTC-less board after boot
/// without NTP. Validity checks and event times cannot be trusted.
pub const CLOCK_FLOOR_MS: i64 = 1_704_067_200_000;

pub fn clock_plausible(now_ms: i64) -> bool {
    now_ms >= CLOCK_FLOOR_MS
}

/// The `notAfter` of a compressed Aliro reader certificate (profile 0000): `30 { 04 profile,
/// 30 { 80 serial, 81 issuer, 82 notBefore, 83 notAfter, ... } }`, times as UTCTime
/// `YYMMDDHHMMSSZ` (or GeneralizedTime `YYYYMMDDHHMMSSZ`). Unix seconds.
pub fn certificate_not_after(cert: &[u8]) -> Option<i64> {
    use crate::aliro::tlv::parse_all;
    let outer = parse_all(cert).ok()?;
    let seq = outer.first()?.children().ok()?;
    let body = seq.iter().find(|t| t.tag == 0x30)?.children().ok()?;
    let not_after = body.iter().find(|t| t.tag == 0x83)?;
    parse_time(not_after.value)
}

fn parse_time(v: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(v).ok()?.strip_suffix('Z')?;
    if !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (year, rest) = match s.len() {
        // UTCTime: 50..99 are 1950..1999 (RFC 5280).
        12 => {
            let yy: i32 = s.get(..2)?.parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, s.get(2..)?)
        }
        14 => (s.get(..4)?.parse().ok()?, s.get(4..)?),
        _ => return None,
    };
    let n = |r: std::ops::Range<usize>| rest.get(r).and_then(|x| x.parse::<u8>().ok());
    let month = time::Month::try_from(n(0..2)?).ok()?;
    let date = time::Date::from_calendar_date(year, month, n(2..4)?).ok()?;
    let t = time::Time::from_hms(n(4..6)?, n(6..8)?, n(8..10)?).ok()?;
    Some(
        time::PrimitiveDateTime::new(date, t)
            .assume_utc()
            .unix_timestamp(),
    )
}

/// Whole days from `now_s` to `not_after_s` (negative once expired).
pub fn days_left(not_after_s: i64, now_s: i64) -> i64 {
    not_after_s.saturating_sub(now_s).div_euclid(86_400)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The profile-0000 certificate of the nfc_load_cert vector: valid 2025-01-01 to
    /// 2030-01-01.
    const CERT: &str = "3081c7040200003081c08001038106497373756572820d3235303130313030303030305a830d3330303130313030303030305a84075375626a6563748542000407cef4c14280233d1fd2d47ef59e0db51515fac3db76b18ec0509cf5ba389df43ea238ba2a4b6706d88bc7b8141a6f59e2053ebf9693862fe2c32639097680da8648003045022052f2de3745c6c55658cff110c680a8bc4d9d13b7139412732177916a846dbeb50221009bd6d875bb54aae690061570a353893cb3d9758d033be4a35c6a2637002468c1";

    #[test]
    fn reads_the_certificate_expiry() {
        let cert = hex::decode(CERT).unwrap();
        let t = certificate_not_after(&cert).unwrap();
        assert_eq!(t, 1_893_456_000); // 2030-01-01T00:00:00Z
        assert_eq!(days_left(t, t - 29 * 86_400 - 1), 29);
        assert_eq!(days_left(t, t + 1), -1);
    }

    #[test]
    fn garbage_certificates_have_no_expiry() {
        for bad in [&b""[..], b"\x30", b"\x30\x02\x04\x00", &[0xffu8; 40]] {
            assert_eq!(certificate_not_after(bad), None);
        }
        assert_eq!(parse_time(b"301301000000Z"), None); // month 13
        assert_eq!(parse_time(b"20300101000000Z"), Some(1_893_456_000));
    }

    #[test]
    fn clock_floor() {
        assert!(!clock_plausible(0));
        assert!(clock_plausible(CLOCK_FLOOR_MS));
    }

    #[test]
    fn disk_of_a_real_directory_and_a_missing_one() {
        let d = tempfile::tempdir().unwrap();
        let s = disk(d.path()).unwrap();
        assert!(s.total_bytes > 0 && s.free_bytes <= s.total_bytes);
        assert!(disk(&d.path().join("nope")).is_err());
    }

    #[test]
    fn samples_a_real_store() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("k.db");
        drop(crate::acl::Store::open(&path).unwrap());
        let conn = open_read_only(&path).unwrap();
        let s = sample_db(&conn, &["front".to_string()], 0, CLOCK_FLOOR_MS).unwrap();
        assert_eq!(s.acl.credentials, 0);
        assert_eq!(s.acl.changed_ms, None);
        assert_eq!(s.outbox.undelivered, 0);
        assert_eq!(s.doors, vec![("front".to_string(), 0, vec![])]);
    }
}
