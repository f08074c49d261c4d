//! Never silent: every state that stops a door from serving phones, read off a [`Snapshot`]
//! as a [`Problem`] with the stable `MESSAGE_ID` of `logging::catalog`. Pure: the daemon's
//! health task feeds it snapshots, logs what [`Tracker`] says appeared or cleared, and puts
//! [`status_line`] into systemd's `STATUS=`.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::logging::catalog;

use super::model::{Problem, SecureChannel, Severity, Snapshot, TaskState};
use super::probe;

/// Certificates this close to expiry are reported.
pub const CERT_WARN_DAYS: i64 = 30;
/// Below this much free space (or [`DISK_MIN_FREE_PERCENT`] of the file system, whichever is
/// smaller) event writes are at risk.
pub const DISK_MIN_FREE_BYTES: u64 = 100 << 20;
pub const DISK_MIN_FREE_PERCENT: u64 = 2;

/// Free space below [`DISK_MIN_FREE_BYTES`] or [`DISK_MIN_FREE_PERCENT`], whichever is smaller.
pub fn disk_nearly_full(disk: &super::model::DiskStatus) -> bool {
    disk.free_bytes < DISK_MIN_FREE_BYTES.min(disk.total_bytes / 100 * DISK_MIN_FREE_PERCENT)
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    /// `[daemon] acl_max_age_hours`; `None`: the ACL's age is not checked.
    pub acl_max_age: Option<Duration>,
}

fn problem(code: &str, id: &str, severity: Severity, door: Option<&str>, text: String) -> Problem {
    Problem {
        code: code.into(),
        message_id: id.into(),
        severity,
        door: door.map(str::to_string),
        text,
    }
}

/// Every problem visible in `s`.
pub fn evaluate(s: &Snapshot, limits: Limits) -> Vec<Problem> {
    use Severity::{Error, Warning};
    let mut out = Vec::new();
    if !probe::clock_plausible(s.now_ms) {
        out.push(problem(
            "clock_unset",
            catalog::CLOCK_UNSET,
            Error,
            None,
            "system clock is not set (before 2024): credential validity cannot be checked".into(),
        ));
    }
    for d in &s.doors {
        let id = Some(d.id.as_str());
        let door = &d.id;
        match (&d.reader.present, &d.reader.pcsc_error) {
            (_, Some(e)) => out.push(problem(
                "pcsc_unavailable",
                catalog::PCSC_UNAVAILABLE,
                Error,
                id,
                format!("door {door}: pcscd unavailable: {e}"),
            )),
            (None, None) => out.push(problem(
                "reader_missing",
                catalog::READER_MISSING,
                Error,
                id,
                format!("door {door}: NFC reader {} not connected", d.reader.pattern),
            )),
            (Some(_), None) => {}
        }
        if let Some(e) = &d.osdp.port_error {
            out.push(problem(
                "serial_port_failed",
                catalog::SERIAL_PORT_FAILED,
                Error,
                id,
                format!("door {door}: serial port {}: {e}", d.osdp.port),
            ));
        } else if !d.osdp.online {
            out.push(problem(
                "osdp_offline",
                catalog::OSDP_OFFLINE,
                Error,
                id,
                format!(
                    "door {door}: panel not polling address {} on {}",
                    d.osdp.address, d.osdp.port
                ),
            ));
        }
        if d.osdp.secure_channel == SecureChannel::Refused {
            out.push(problem(
                "secure_channel_refused",
                catalog::SECURE_CHANNEL_REFUSED,
                Error,
                id,
                format!("door {door}: OSDP secure channel refused"),
            ));
        }
        if let Some(p) = d.cloud_offline.as_ref().filter(|p| p.exceeded) {
            let (severity, then) = if p.fail_secure {
                (Error, "denying (fail secure)")
            } else {
                (Warning, "granting from the cached ACL")
            };
            out.push(problem(
                "cloud_offline",
                catalog::CLOUD_OFFLINE,
                severity,
                id,
                format!("door {door}: no cloud for over {} s: {then}", p.limit_s),
            ));
        }
        match d.certificate_expires_in_days {
            Some(days) if days < 0 => out.push(problem(
                "certificate_expired",
                catalog::CERTIFICATE_EXPIRED,
                Error,
                id,
                format!(
                    "door {door}: reader certificate expired {} day(s) ago",
                    -days
                ),
            )),
            Some(days) if days < CERT_WARN_DAYS => out.push(problem(
                "certificate_expiring",
                catalog::CERTIFICATE_EXPIRING,
                Warning,
                id,
                format!("door {door}: reader certificate expires in {days} day(s)"),
            )),
            _ => {}
        }
    }
    if let (Some(max), Some(acl)) = (limits.acl_max_age, &s.acl) {
        let stale = match acl.age_s {
            Some(age) => age > max.as_secs(),
            None => true,
        };
        if stale {
            let age = acl
                .age_s
                .map(|a| format!("{} h old", a / 3600))
                .unwrap_or_else(|| "never imported".into());
            out.push(problem(
                "acl_stale",
                catalog::ACL_STALE,
                Warning,
                None,
                format!("ACL {age}, maximum {} h", max.as_secs() / 3600),
            ));
        }
    }
    if let Some(disk) = &s.disk {
        if disk_nearly_full(disk) {
            out.push(problem(
                "disk_nearly_full",
                catalog::DISK_NEARLY_FULL,
                Warning,
                None,
                format!(
                    "{} MiB free on {}: events may not be stored",
                    disk.free_bytes >> 20,
                    disk.path
                ),
            ));
        }
    }
    if let Some(db) = &s.database {
        if let Some(why) = &db.read_only {
            out.push(problem(
                "database_read_only",
                catalog::DATABASE_READ_ONLY,
                Error,
                None,
                format!("database takes no writes ({why}): grants go on, events are not stored"),
            ));
        }
        if db.integrity == "damaged" {
            out.push(problem(
                "database_damaged",
                catalog::DATABASE_DAMAGED,
                Error,
                None,
                format!(
                    "database failed its integrity check: {}",
                    db.integrity_detail.join("; ")
                ),
            ));
        }
        if db.events_not_stored > 0 {
            out.push(problem(
                "events_not_stored",
                catalog::EVENT_NOT_STORED,
                Warning,
                None,
                format!(
                    "{} access event(s) could not be stored since start",
                    db.events_not_stored
                ),
            ));
        }
    }
    for t in &s.tasks {
        let what = match t.state {
            TaskState::Running => continue,
            TaskState::Restarting => "ended, restarting",
            TaskState::Stalled => "stalled",
            TaskState::Died => "died",
        };
        out.push(problem(
            "task_died",
            catalog::TASK_DIED,
            Error,
            None,
            format!("task {} {what}", t.name),
        ));
    }
    out
}

/// Problems this module logs itself. Reader, pcscd, serial port, OSDP offline and secure
/// channel are logged with their MESSAGE_ID where they happen (NFC loop, bus task), once.
fn logged_here(code: &str) -> bool {
    matches!(
        code,
        "clock_unset"
            | "certificate_expired"
            | "certificate_expiring"
            | "acl_stale"
            | "disk_nearly_full"
            | "cloud_offline"
    )
}

/// Remembers the problems of the last evaluation, to log each one when it appears and when
/// it clears, not every time it is seen.
#[derive(Debug, Default)]
pub struct Tracker {
    active: BTreeMap<(String, Option<String>), Problem>,
}

/// What changed since the last evaluation.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub appeared: Vec<Problem>,
    pub cleared: Vec<Problem>,
}

impl Tracker {
    pub fn update(&mut self, now: &[Problem]) -> Changes {
        let key = |p: &Problem| (p.code.clone(), p.door.clone());
        let mut next = BTreeMap::new();
        let mut changes = Changes::default();
        for p in now {
            if !self.active.contains_key(&key(p)) {
                changes.appeared.push(p.clone());
            }
            next.insert(key(p), p.clone());
        }
        for (k, p) in &self.active {
            if !next.contains_key(k) {
                changes.cleared.push(p.clone());
            }
        }
        self.active = next;
        changes
    }
}

/// Logs what appeared (warning/error with its MESSAGE_ID) and what cleared (info).
pub fn log_changes(changes: &Changes) {
    for p in changes.appeared.iter().filter(|p| logged_here(&p.code)) {
        let door = p.door.as_deref().unwrap_or("");
        let level = match p.severity {
            Severity::Warning => log::Level::Warn,
            Severity::Error => log::Level::Error,
        };
        log::log!(target: "keyway::health", level, message_id = p.message_id.as_str(), problem = p.code.as_str(), door = door; "{}", p.text);
    }
    for p in changes.cleared.iter().filter(|p| logged_here(&p.code)) {
        let door = p.door.as_deref().unwrap_or("");
        log::info!(target: "keyway::health", problem = p.code.as_str(), door = door; "cleared: {}", p.text);
    }
}

/// Longest `STATUS=` text; `systemctl status` shows one line.
const STATUS_MAX: usize = 200;

/// One line for `systemctl status`: all well, or how many problems and the first ones.
pub fn status_line(s: &Snapshot, problems: &[Problem]) -> String {
    // Starts as the READY line does ("serving N door(s)"): scripts/package-check reads it.
    let mut line = format!("serving {} door(s)", s.doors.len());
    if let Some(acl) = &s.acl {
        line.push_str(&format!(", ACL {} credential(s)", acl.credentials));
    }
    if problems.is_empty() {
        line.push_str(", no problems");
        return line;
    }
    line.push_str(&format!(", {} problem(s): ", problems.len()));
    let texts: Vec<&str> = problems.iter().map(|p| p.text.as_str()).collect();
    line.push_str(&texts.join("; "));
    if line.len() > STATUS_MAX {
        let mut cut = STATUS_MAX - 3;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        line.truncate(cut);
        line.push_str("...");
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::model::*;

    const NOW: i64 = 1_800_000_000_000;

    fn healthy() -> Snapshot {
        Snapshot {
            now_ms: NOW,
            doors: vec![DoorStatus {
                id: "front".into(),
                reader: ReaderStatus {
                    pattern: "ACS*".into(),
                    present: Some("ACS 1".into()),
                    pcsc_error: None,
                },
                osdp: OsdpStatus {
                    port: "/dev/ttyS0".into(),
                    address: 1,
                    online: true,
                    ..OsdpStatus::default()
                },
                certificate_expires_in_days: Some(400),
                ..DoorStatus::default()
            }],
            acl: Some(AclStatus {
                credentials: 3,
                age_s: Some(3600),
                ..AclStatus::default()
            }),
            disk: Some(DiskStatus {
                path: "/var/lib/keyway".into(),
                free_bytes: 1 << 30,
                total_bytes: 8 << 30,
            }),
            tasks: vec![TaskStatus {
                name: "door front".into(),
                ..TaskStatus::default()
            }],
            ..Snapshot::default()
        }
    }

    fn codes(s: &Snapshot, limits: Limits) -> Vec<String> {
        evaluate(s, limits).into_iter().map(|p| p.code).collect()
    }

    #[test]
    fn a_healthy_gateway_has_no_problem() {
        assert!(evaluate(&healthy(), Limits::default()).is_empty());
        assert_eq!(
            status_line(&healthy(), &[]),
            "serving 1 door(s), ACL 3 credential(s), no problems"
        );
    }

    #[test]
    fn each_state_that_stops_a_door_is_a_problem_with_its_message_id() {
        type Breaker = fn(&mut Snapshot);
        let cases: [(&str, &str, Breaker); 15] = [
            ("reader_missing", catalog::READER_MISSING, |s| {
                s.doors[0].reader.present = None
            }),
            ("pcsc_unavailable", catalog::PCSC_UNAVAILABLE, |s| {
                s.doors[0].reader.pcsc_error = Some("down".into())
            }),
            ("osdp_offline", catalog::OSDP_OFFLINE, |s| {
                s.doors[0].osdp.online = false
            }),
            ("serial_port_failed", catalog::SERIAL_PORT_FAILED, |s| {
                s.doors[0].osdp.online = false;
                s.doors[0].osdp.port_error = Some("gone".into());
            }),
            (
                "secure_channel_refused",
                catalog::SECURE_CHANNEL_REFUSED,
                |s| s.doors[0].osdp.secure_channel = SecureChannel::Refused,
            ),
            ("certificate_expiring", catalog::CERTIFICATE_EXPIRING, |s| {
                s.doors[0].certificate_expires_in_days = Some(29)
            }),
            ("certificate_expired", catalog::CERTIFICATE_EXPIRED, |s| {
                s.doors[0].certificate_expires_in_days = Some(-1)
            }),
            ("acl_stale", catalog::ACL_STALE, |s| {
                s.acl.as_mut().unwrap().age_s = Some(49 * 3600)
            }),
            ("clock_unset", catalog::CLOCK_UNSET, |s| s.now_ms = 1_000),
            ("disk_nearly_full", catalog::DISK_NEARLY_FULL, |s| {
                s.disk.as_mut().unwrap().free_bytes = 50 << 20
            }),
            ("task_died", catalog::TASK_DIED, |s| {
                s.tasks[0].state = TaskState::Stalled
            }),
            ("database_read_only", catalog::DATABASE_READ_ONLY, |s| {
                s.database = Some(DatabaseStatus {
                    read_only: Some("read-only file system".into()),
                    integrity: "ok".into(),
                    ..DatabaseStatus::default()
                })
            }),
            ("database_damaged", catalog::DATABASE_DAMAGED, |s| {
                s.database = Some(DatabaseStatus {
                    integrity: "damaged".into(),
                    integrity_detail: vec!["page 7: btreeInitPage() returns error code 11".into()],
                    ..DatabaseStatus::default()
                })
            }),
            ("events_not_stored", catalog::EVENT_NOT_STORED, |s| {
                s.database = Some(DatabaseStatus {
                    integrity: "ok".into(),
                    events_not_stored: 3,
                    ..DatabaseStatus::default()
                })
            }),
            ("cloud_offline", catalog::CLOUD_OFFLINE, |s| {
                s.doors[0].cloud_offline = Some(crate::status::model::OfflineStatus {
                    limit_s: 60,
                    fail_secure: true,
                    exceeded: true,
                })
            }),
        ];
        let limits = Limits {
            acl_max_age: Some(Duration::from_secs(48 * 3600)),
        };
        assert!(evaluate(&healthy(), limits).is_empty());
        for (code, id, breaker) in cases {
            let mut s = healthy();
            breaker(&mut s);
            let p = evaluate(&s, limits);
            assert_eq!(p.len(), 1, "{code}: {p:?}");
            assert_eq!((p[0].code.as_str(), p[0].message_id.as_str()), (code, id));
            let line = status_line(&s, &p);
            assert!(line.contains("1 problem(s)"), "{line}");
        }
    }

    #[test]
    fn acl_age_is_checked_only_when_configured_and_never_imported_counts() {
        let mut s = healthy();
        s.acl.as_mut().unwrap().age_s = None;
        assert!(codes(&s, Limits::default()).is_empty());
        let limits = Limits {
            acl_max_age: Some(Duration::from_secs(3600)),
        };
        assert_eq!(codes(&s, limits), ["acl_stale"]);
        // 29 days is not yet 30; a small disk uses the percentage.
        let mut s = healthy();
        s.doors[0].certificate_expires_in_days = Some(30);
        s.disk = Some(DiskStatus {
            path: "/".into(),
            free_bytes: 30 << 20,
            total_bytes: 1 << 30,
        });
        assert!(codes(&s, Limits::default()).is_empty());
    }

    #[test]
    fn tracker_reports_each_problem_once_and_its_clearing() {
        let mut t = Tracker::default();
        let mut s = healthy();
        s.doors[0].certificate_expires_in_days = Some(3);
        let p = evaluate(&s, Limits::default());
        assert_eq!(t.update(&p).appeared.len(), 1);
        assert_eq!(t.update(&p), Changes::default());
        let c = t.update(&[]);
        assert_eq!((c.appeared.len(), c.cleared.len()), (0, 1));
    }

    #[test]
    fn status_line_is_one_bounded_line() {
        let mut s = healthy();
        s.doors = (0..20)
            .map(|i| DoorStatus {
                id: format!("door-{i}"),
                ..DoorStatus::default()
            })
            .collect();
        let p = evaluate(&s, Limits::default());
        let line = status_line(&s, &p);
        assert!(line.len() <= STATUS_MAX && line.ends_with("..."), "{line}");
        assert!(!line.contains('\n'));
    }
}
