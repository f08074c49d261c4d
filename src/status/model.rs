//! The status snapshot: what `keyway status --json` prints, and its human rendering.
//! Ids only (door, person, key fingerprint): never keys or personal data beyond ids.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Snapshot {
    pub version: String,
    pub pid: u32,
    pub uptime_s: u64,
    /// Wall clock of the daemon when the snapshot was taken (Unix ms).
    pub now_ms: i64,
    pub doors: Vec<DoorStatus>,
    pub acl: Option<AclStatus>,
    pub outbox: Option<OutboxStatus>,
    pub disk: Option<DiskStatus>,
    /// The database's own state (writable, integrity, failed event writes).
    #[serde(default)]
    pub database: Option<DatabaseStatus>,
    /// The MQTT link; `None` while keyway has no cloud link configured.
    pub cloud: Option<CloudStatus>,
    pub tasks: Vec<TaskStatus>,
    /// Everything that stops (or will soon stop) a door from serving phones.
    pub problems: Vec<Problem>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DoorStatus {
    pub id: String,
    pub reader: ReaderStatus,
    /// Decisions recorded for this door since the daemon started.
    pub phones_served: u64,
    /// The most recent decisions, newest first (ids only).
    pub last_decisions: Vec<DecisionSummary>,
    pub osdp: OsdpStatus,
    pub ble: Option<BleStatus>,
    /// Days until the reader certificate (LOAD CERT) expires; negative: expired.
    pub certificate_expires_in_days: Option<i64>,
    /// The door's offline policy (`cloud_offline`), when it has one.
    #[serde(default)]
    pub cloud_offline: Option<OfflineStatus>,
}

/// A door's offline policy and where it stands.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct OfflineStatus {
    /// Seconds cached grants stay valid without the cloud.
    pub limit_s: u64,
    /// After the limit: deny (`true`) or keep granting and report it.
    pub fail_secure: bool,
    /// The limit has passed (keyway has been without the cloud for longer).
    pub exceeded: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ReaderStatus {
    /// The configured name or pattern.
    pub pattern: String,
    /// The reader in use, when found.
    pub present: Option<String>,
    /// pcscd unreachable: its error.
    pub pcsc_error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DecisionSummary {
    pub event_id: i64,
    pub time_ms: i64,
    pub transport: String,
    pub decision: String,
    pub reason: String,
    pub person_id: Option<String>,
    pub panel_verdict: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SecureChannel {
    /// Not configured for this door.
    #[default]
    Off,
    /// Configured, no session yet.
    Waiting,
    Up,
    /// The panel's handshake was refused or its key could not be stored.
    Refused,
}

impl SecureChannel {
    pub fn as_str(self) -> &'static str {
        match self {
            SecureChannel::Off => "off",
            SecureChannel::Waiting => "waiting",
            SecureChannel::Up => "up",
            SecureChannel::Refused => "refused",
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct OsdpStatus {
    pub port: String,
    pub address: u8,
    pub online: bool,
    pub secure_channel: SecureChannel,
    /// Milliseconds since the panel's last valid command to this door.
    pub last_poll_ms_ago: Option<u64>,
    /// The serial port's last error, while it cannot be used.
    pub port_error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct BleStatus {
    pub adapter: String,
    pub registered: bool,
    pub connections: usize,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct AclStatus {
    pub credentials: u64,
    /// The applied ACL version and hash, when the ACL came with them (cloud snapshots/deltas).
    pub version: Option<String>,
    pub hash: Option<String>,
    /// When the ACL last changed (Unix ms).
    pub changed_ms: Option<i64>,
    pub age_s: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct OutboxStatus {
    /// Events not yet delivered to the cloud.
    pub undelivered: u64,
    /// Time of the oldest of them (Unix ms).
    pub oldest_ms: Option<i64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DatabaseStatus {
    /// Why the database takes no writes (served read-only); `None`: writable.
    pub read_only: Option<String>,
    /// The start-up check: `checking`, `ok`, `damaged`, `unknown`.
    pub integrity: String,
    /// What the check found (damaged) or why it could not tell (unknown).
    pub integrity_detail: Vec<String>,
    /// Access events not stored since the daemon started.
    pub events_not_stored: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DiskStatus {
    /// The database's directory.
    pub path: String,
    pub free_bytes: u64,
    pub total_bytes: u64,
}

/// The cloud link, filled in by the MQTT task once keyway has one.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CloudStatus {
    /// `connected`, `connecting` or `offline`.
    pub state: String,
    /// The broker connected to (or being tried).
    pub broker: Option<String>,
    /// Since when `state` holds (Unix ms).
    pub since_ms: Option<i64>,
    /// The backend's last application-level ack of events (Unix ms), this process.
    #[serde(default)]
    pub last_ack_ms: Option<i64>,
    /// Events not yet acked by the backend, and the oldest of them (Unix ms).
    #[serde(default)]
    pub outbox_depth: u64,
    #[serde(default)]
    pub outbox_oldest_ms: Option<i64>,
    /// Events (and notes) dropped before the backend acked them: the `[events]` bounds, or
    /// failed writes (a running total).
    #[serde(default)]
    pub outbox_dropped: u64,
    /// Down messages refused since start (logged and reported up with their reason).
    #[serde(default)]
    pub rejected: u64,
    /// The applied cloud ACL version.
    #[serde(default)]
    pub acl_version: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TaskStatus {
    pub name: String,
    pub state: TaskState,
    pub restarts: u32,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    #[default]
    Running,
    /// Ended unexpectedly; restarting after a pause.
    Restarting,
    /// Not heard from for too long: the watchdog pings have stopped.
    Stalled,
    /// Ended and not restarted: keyway exits so systemd restarts it.
    Died,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Warning,
    Error,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Problem {
    /// Stable short code (`reader_missing`, `osdp_offline`, ...).
    pub code: String,
    /// The journald MESSAGE_ID of the same state (`journalctl -x` explains it).
    pub message_id: String,
    pub severity: Severity,
    pub door: Option<String>,
    pub text: String,
}

impl Snapshot {
    /// The human-readable form `keyway status` prints.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "keyway {} (pid {}), up {}",
            self.version,
            self.pid,
            duration(self.uptime_s)
        );
        if self.problems.is_empty() {
            let _ = writeln!(o, "health: ok");
        } else {
            let _ = writeln!(o, "health: {} problem(s)", self.problems.len());
            for p in &self.problems {
                let sev = match p.severity {
                    Severity::Warning => "WARNING",
                    Severity::Error => "ERROR",
                };
                let _ = writeln!(o, "  {sev:<7} {}: {}", p.code, p.text);
            }
        }
        for d in &self.doors {
            let _ = writeln!(o, "door {}", d.id);
            let reader = match (&d.reader.present, &d.reader.pcsc_error) {
                (_, Some(e)) => format!("pcscd unavailable ({e})"),
                (Some(name), None) => format!("present: {name}"),
                (None, None) => format!("MISSING (configured: {})", d.reader.pattern),
            };
            let _ = writeln!(o, "  nfc reader   {reader}");
            let poll = d
                .osdp
                .last_poll_ms_ago
                .map(|ms| format!("last poll {:.1} s ago", ms as f64 / 1000.0))
                .unwrap_or_else(|| "never polled".into());
            let _ = writeln!(
                o,
                "  osdp         {} address {}: {}, {poll}, secure channel {}{}",
                d.osdp.port,
                d.osdp.address,
                if d.osdp.online { "online" } else { "OFFLINE" },
                d.osdp.secure_channel.as_str(),
                d.osdp
                    .port_error
                    .as_deref()
                    .map(|e| format!(", port error: {e}"))
                    .unwrap_or_default()
            );
            if let Some(b) = &d.ble {
                let _ = writeln!(
                    o,
                    "  ble          {}: {}, {} connection(s)",
                    b.adapter,
                    if b.registered {
                        "registered"
                    } else {
                        "NOT registered"
                    },
                    b.connections
                );
            }
            if let Some(p) = &d.cloud_offline {
                let _ = writeln!(
                    o,
                    "  offline      grants valid {} s without the cloud, then {}{}",
                    p.limit_s,
                    if p.fail_secure { "denied" } else { "reported" },
                    if p.exceeded { ": LIMIT PASSED" } else { "" }
                );
            }
            if let Some(days) = d.certificate_expires_in_days {
                let _ = writeln!(o, "  certificate  expires in {days} day(s)");
            }
            let _ = writeln!(o, "  phones       {} since start", d.phones_served);
            for e in &d.last_decisions {
                let _ = writeln!(
                    o,
                    "    #{} {} {:<4} {:<7} {:<14} person {:<12} panel {}",
                    e.event_id,
                    ago(self.now_ms, e.time_ms),
                    e.transport,
                    e.decision,
                    e.reason,
                    e.person_id.as_deref().unwrap_or("-"),
                    e.panel_verdict.as_deref().unwrap_or("-")
                );
            }
        }
        match &self.acl {
            Some(a) => {
                let _ = writeln!(
                    o,
                    "acl          {} credential(s), version {}, changed {}",
                    a.credentials,
                    a.version.as_deref().unwrap_or("-"),
                    a.age_s
                        .map(|s| format!("{} ago", duration(s)))
                        .unwrap_or_else(|| "never".into())
                );
            }
            None => {
                let _ = writeln!(o, "acl          unknown (database not readable)");
            }
        }
        if let Some(db) = &self.database {
            let _ = writeln!(
                o,
                "database     {}, integrity {}{}, {} event(s) not stored since start",
                match &db.read_only {
                    Some(why) => format!("READ-ONLY ({why})"),
                    None => "writable".into(),
                },
                db.integrity,
                if db.integrity_detail.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", db.integrity_detail.join("; "))
                },
                db.events_not_stored
            );
        }
        if let Some(ob) = &self.outbox {
            let oldest = ob
                .oldest_ms
                .map(|t| format!(", oldest {}", ago(self.now_ms, t)))
                .unwrap_or_default();
            let _ = writeln!(o, "outbox       {} undelivered{oldest}", ob.undelivered);
        }
        if let Some(dk) = &self.disk {
            let _ = writeln!(
                o,
                "disk         {} MiB free of {} MiB ({})",
                dk.free_bytes / (1024 * 1024),
                dk.total_bytes / (1024 * 1024),
                dk.path
            );
        }
        match &self.cloud {
            Some(c) => {
                let ago = |ms: i64| format!("{} s ago", (self.now_ms - ms).max(0) / 1000);
                let _ = writeln!(
                    o,
                    "cloud        {}{}{}, last ack {}, outbox {}{}, {} dropped, {} rejected",
                    c.state,
                    c.broker
                        .as_deref()
                        .map(|b| format!(" ({b})"))
                        .unwrap_or_default(),
                    c.since_ms
                        .map(|ms| format!(" since {}", ago(ms)))
                        .unwrap_or_default(),
                    c.last_ack_ms.map(ago).unwrap_or_else(|| "never".into()),
                    c.outbox_depth,
                    c.outbox_oldest_ms
                        .map(|ms| format!(" (oldest {})", ago(ms)))
                        .unwrap_or_default(),
                    c.outbox_dropped,
                    c.rejected
                );
            }
            None => {
                let _ = writeln!(o, "cloud        not configured");
            }
        }
        let tasks: Vec<String> = self
            .tasks
            .iter()
            .map(|t| {
                let state = match t.state {
                    TaskState::Running => "ok",
                    TaskState::Restarting => "restarting",
                    TaskState::Stalled => "STALLED",
                    TaskState::Died => "DIED",
                };
                if t.restarts > 0 {
                    format!("{} {state} ({} restarts)", t.name, t.restarts)
                } else {
                    format!("{} {state}", t.name)
                }
            })
            .collect();
        let _ = writeln!(o, "tasks        {}", tasks.join(", "));
        o
    }
}

fn duration(s: u64) -> String {
    match s {
        0..=119 => format!("{s} s"),
        120..=7199 => format!("{} min", s / 60),
        7200..=172_799 => format!("{} h", s / 3600),
        _ => format!("{} days", s / 86_400),
    }
}

fn ago(now_ms: i64, t_ms: i64) -> String {
    let s = u64::try_from(now_ms.saturating_sub(t_ms) / 1000).unwrap_or(0);
    format!("{} ago", duration(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        Snapshot {
            version: "0.1.0".into(),
            pid: 42,
            uptime_s: 3700,
            now_ms: 1_800_000_000_000,
            doors: vec![DoorStatus {
                id: "front".into(),
                reader: ReaderStatus {
                    pattern: "ACS*".into(),
                    present: None,
                    pcsc_error: None,
                },
                phones_served: 3,
                last_decisions: vec![DecisionSummary {
                    event_id: 7,
                    time_ms: 1_800_000_000_000 - 5_000,
                    transport: "nfc".into(),
                    decision: "granted".into(),
                    reason: "ok".into(),
                    person_id: Some("p-1".into()),
                    panel_verdict: Some("granted".into()),
                }],
                osdp: OsdpStatus {
                    port: "/dev/ttyUSB0".into(),
                    address: 1,
                    online: false,
                    secure_channel: SecureChannel::Refused,
                    last_poll_ms_ago: None,
                    port_error: None,
                },
                ble: Some(BleStatus {
                    adapter: "hci0".into(),
                    registered: true,
                    connections: 1,
                }),
                certificate_expires_in_days: Some(12),
                cloud_offline: None,
            }],
            acl: Some(AclStatus {
                credentials: 10,
                version: Some("41".into()),
                hash: None,
                changed_ms: Some(1_800_000_000_000 - 7_200_000),
                age_s: Some(7200),
            }),
            outbox: Some(OutboxStatus {
                undelivered: 2,
                oldest_ms: Some(1_800_000_000_000 - 60_000),
            }),
            disk: Some(DiskStatus {
                path: "/var/lib/keyway".into(),
                free_bytes: 512 << 20,
                total_bytes: 1024 << 20,
            }),
            database: Some(DatabaseStatus {
                read_only: None,
                integrity: "ok".into(),
                integrity_detail: Vec::new(),
                events_not_stored: 0,
            }),
            cloud: None,
            tasks: vec![TaskStatus {
                name: "door front".into(),
                state: TaskState::Running,
                restarts: 1,
            }],
            problems: vec![Problem {
                code: "reader_missing".into(),
                message_id: crate::logging::catalog::READER_MISSING.into(),
                severity: Severity::Error,
                door: Some("front".into()),
                text: "door front: NFC reader ACS* not connected".into(),
            }],
        }
    }

    #[test]
    fn json_round_trips() {
        let s = sample();
        let json = serde_json::to_string(&s).unwrap();
        let back: Snapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        // Scripts key on these names: keep them stable.
        for key in [
            "\"secure_channel\":\"refused\"",
            "\"last_poll_ms_ago\":null",
            "\"severity\":\"error\"",
            "\"certificate_expires_in_days\":12",
            "\"cloud\":null",
        ] {
            assert!(json.contains(key), "{key} in {json}");
        }
    }

    #[test]
    fn human_form_shows_the_cloud_link_and_offline_policy() {
        let mut s = sample();
        let now = s.now_ms;
        s.cloud = Some(CloudStatus {
            state: "connected".into(),
            broker: Some("mqtts://mqtt-a:8883".into()),
            since_ms: Some(now - 5_000),
            last_ack_ms: Some(now - 2_000),
            outbox_depth: 3,
            outbox_oldest_ms: Some(now - 60_000),
            outbox_dropped: 1,
            rejected: 4,
            acl_version: Some(41),
        });
        s.doors[0].cloud_offline = Some(OfflineStatus {
            limit_s: 3600,
            fail_secure: true,
            exceeded: true,
        });
        let t = s.render();
        for want in [
            "cloud        connected (mqtts://mqtt-a:8883) since 5 s ago, last ack 2 s ago, \
             outbox 3 (oldest 60 s ago), 1 dropped, 4 rejected",
            "offline      grants valid 3600 s without the cloud, then denied: LIMIT PASSED",
        ] {
            assert!(t.contains(want), "{want:?} in\n{t}");
        }
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Snapshot>(&json).unwrap(), s);
    }

    #[test]
    fn human_form_says_what_is_wrong() {
        let t = sample().render();
        for want in [
            "keyway 0.1.0 (pid 42), up 61 min",
            "ERROR   reader_missing: door front: NFC reader ACS* not connected",
            "nfc reader   MISSING (configured: ACS*)",
            "address 1: OFFLINE, never polled, secure channel refused",
            "ble          hci0: registered, 1 connection(s)",
            "certificate  expires in 12 day(s)",
            "#7 5 s ago nfc  granted",
            "acl          10 credential(s), version 41, changed 2 h ago",
            "outbox       2 undelivered, oldest 60 s ago",
            "disk         512 MiB free of 1024 MiB",
            "cloud        not configured",
            "tasks        door front ok (1 restarts)",
        ] {
            assert!(t.contains(want), "{want:?} in\n{t}");
        }
    }
}
