//! `keyway status` against a running `keyway run`, and systemd's notify protocol as the daemon
//! speaks it (READY=1, STATUS=, WATCHDOG=1) read from a datagram socket standing in for
//! systemd's. The door has no reader, no serial port: status must say so. Who may ask: the
//! daemon as a service user, `keyway status` as another user (refused) and as a member of the
//! daemon's group (served), switched with setpriv (needs root).
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod support;
use support::{keyway, text};

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

struct Site {
    dir: tempfile::TempDir,
    config: PathBuf,
    socket: PathBuf,
}

fn site() -> Site {
    let dir = tempfile::tempdir().unwrap();
    let config = support::one_door_site(dir.path(), &dir.path().join("no-tty"), 1);
    let socket = dir.path().join("status.sock");
    Site {
        dir,
        config,
        socket,
    }
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn status_with_no_daemon_says_so_and_fails() {
    let s = site();
    let o = keyway(&s.config, &["status"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("keyway is not running"), "{t}");
    assert!(t.contains(&s.socket.display().to_string()), "{t}");
    assert!(!t.contains("panicked"), "{t}");
}

#[test]
fn running_daemon_answers_status_and_speaks_sd_notify() {
    let s = site();
    let notify_path = s.dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let log_path = s.dir.path().join("run.log");
    let daemon = Daemon(
        Command::new(env!("CARGO_BIN_EXE_keyway"))
            .arg("--config")
            .arg(&s.config)
            .args(["run", "--log", "stderr"])
            .env("NOTIFY_SOCKET", &notify_path)
            // As systemd sets it for WatchdogSec=3s (no WATCHDOG_PID: any pid, per
            // sd_watchdog_enabled(3)).
            .env("WATCHDOG_USEC", "3000000")
            .env_remove("WATCHDOG_PID")
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .unwrap(),
    );
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();

    // READY=1, then a STATUS= line naming the problems, then watchdog pings.
    let mut messages = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = notify.recv(&mut buf) {
            messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        let all = messages.join("\n");
        // READY=1 comes with the start-up STATUS= in one datagram; the line naming problems
        // follows when the health loop has looked, so wait for that one.
        if all.contains("READY=1") && all.contains("WATCHDOG=1") && problems_line(&all).is_some() {
            break;
        }
    }
    let all = messages.join("\n");
    assert!(all.contains("READY=1"), "{all}\n{}", log());
    assert!(all.contains("WATCHDOG=1"), "{all}\n{}", log());
    let status_line =
        problems_line(&all).unwrap_or_else(|| panic!("no STATUS= with problems: {all}"));
    assert!(status_line.contains("1 door(s)"), "{status_line}");
    assert!(status_line.contains("problem(s)"), "{status_line}");
    assert!(
        status_line.contains("serial port") || status_line.contains("not polling"),
        "{status_line}"
    );

    // Human form: the missing reader and serial port are there, and the exit code is 2.
    let o = keyway(&s.config, &["status"]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(2), "{t}\n{}", log());
    assert!(t.contains("door front"), "{t}");
    assert!(
        t.contains("MISSING (configured: No Such Reader)") || t.contains("pcscd unavailable"),
        "{t}"
    );
    assert!(t.contains("OFFLINE"), "{t}");
    assert!(t.contains("tasks        store ok"), "{t}");
    assert!(t.contains("door front ok"), "{t}");

    // JSON: the same, for scripts.
    let o = keyway(&s.config, &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    assert_eq!(v["doors"][0]["id"], "front");
    assert_eq!(v["doors"][0]["osdp"]["online"], false);
    assert_eq!(v["acl"]["credentials"], 0);
    assert_eq!(v["outbox"]["undelivered"], 0);
    assert!(v["disk"]["free_bytes"].as_u64().unwrap() > 0);
    assert_eq!(v["cloud"], serde_json::Value::Null);
    let codes: Vec<&str> = v["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["code"].as_str().unwrap())
        .collect();
    assert!(codes.contains(&"serial_port_failed"), "{codes:?}");
    assert!(
        codes.contains(&"reader_missing") || codes.contains(&"pcsc_unavailable"),
        "{codes:?}"
    );

    // The socket is group-only, and goes away with the daemon.
    let mode = std::fs::metadata(&s.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    // SAFETY: signals our own child, not yet reaped.
    assert_eq!(
        unsafe { libc::kill(daemon.0.id() as i32, libc::SIGTERM) },
        0
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut daemon = daemon;
    let st = loop {
        if let Some(st) = daemon.0.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "no exit on SIGTERM\n{}", log());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(st.success(), "{st}\n{}", log());
    assert!(!s.socket.exists(), "socket removed at exit");
    assert!(!log().contains("did not stop"), "{}", log());
}

/// The newest `STATUS=` line that reports problems, from sd_notify datagrams joined by newlines.
fn problems_line(all: &str) -> Option<&str> {
    all.lines()
        .rfind(|l| l.starts_with("STATUS=") && l.contains("problem(s)"))
}

/// Runs `keyway ARGS` as `uid`/`gid` with exactly `groups` as supplementary groups (setpriv,
/// util-linux).
fn keyway_as(uid: u32, gid: u32, groups: &[u32], args: &[&str]) -> Output {
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"));
    if groups.is_empty() {
        cmd.arg("--clear-groups");
    } else {
        let list: Vec<String> = groups.iter().map(u32::to_string).collect();
        cmd.arg(format!("--groups={}", list.join(",")));
    }
    cmd.arg("--")
        .arg(env!("CARGO_BIN_EXE_keyway"))
        .args(args)
        .output()
        .expect("run setpriv (util-linux)")
}

/// Every directory above `path` must let other users through, or they cannot run it.
fn reachable_by_others(path: &Path) -> Result<(), String> {
    for dir in path.ancestors().skip(1) {
        let mode = std::fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        if mode.permissions().mode() & 0o001 == 0 {
            return Err(format!(
                "{} (mode {:o}) is not searchable by other users",
                dir.display(),
                mode.permissions().mode() & 0o777
            ));
        }
    }
    Ok(())
}

/// The status socket is 0660 in the daemon's group, as the package runs it (User=keyway,
/// Group=keyway): a user outside the group is refused with a clear message and a non-zero
/// exit; a member of the group is served, although it cannot read the daemon's private key.
/// Root is needed to switch users (scripts/test runs as root); as another user this test
/// fails and says so, it never passes without having looked.
#[test]
fn status_is_refused_to_others_and_served_to_the_daemons_group() {
    // Numeric ids with no passwd entry: the service user (uid = gid, like `adduser --system
    // --group keyway`) and another local user.
    const SERVICE: u32 = 64_901;
    const OTHER: u32 = 64_902;
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test runs keyway as other users with setpriv and needs root (scripts/test runs as \
         root; by hand: sudo -E cargo test --test status)"
    );
    let exe = Path::new(env!("CARGO_BIN_EXE_keyway"));
    if let Err(e) = reachable_by_others(exe) {
        panic!("the keyway binary must be reachable by unprivileged users: {e}");
    }
    let s = site();
    let chown = |p: &Path, uid: u32, gid: u32, mode: u32| {
        std::os::unix::fs::chown(p, Some(uid), Some(gid)).unwrap();
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    // As packaged: the key is the service user's alone, the config root's and readable by the
    // group; the daemon writes its database and socket in its own directory, which others
    // may pass through (so a refusal below comes from the socket's own mode).
    chown(s.dir.path(), SERVICE, SERVICE, 0o755);
    chown(&s.dir.path().join("reader.pem"), SERVICE, SERVICE, 0o600);
    chown(&s.config, 0, SERVICE, 0o640);
    let logs = tempfile::tempdir().unwrap();
    let log_path = logs.path().join("run.log");
    let _daemon = Daemon(
        Command::new("setpriv")
            .arg(format!("--reuid={SERVICE}"))
            .arg(format!("--regid={SERVICE}"))
            .arg("--clear-groups")
            .arg("--")
            .arg(exe)
            .arg("--config")
            .arg(&s.config)
            .args(["run", "--log", "stderr"])
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .unwrap(),
    );
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let socket = s.socket.display().to_string();
    // Up when root is answered (2: running, with problems: no reader, no serial port).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let o = keyway(&s.config, &["status", "--socket", &socket]);
        if o.status.code() == Some(2) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "daemon never answered: {}\n{}",
            text(&o),
            log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let meta = std::fs::metadata(&s.socket).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        (meta.mode() & 0o777, meta.uid(), meta.gid()),
        (0o660, SERVICE, SERVICE),
        "socket owned by the service user and group, 0660"
    );
    let cfg = s.config.display().to_string();

    // Not in the group: refused, saying who may ask, exit 1 (never "not running").
    let o = keyway_as(
        OTHER,
        OTHER,
        &[],
        &["--config", &cfg, "status", "--socket", &socket],
    );
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(
        t.contains(&format!("permission denied on {socket}")) && t.contains("group keyway"),
        "{t}"
    );
    assert!(!t.contains("not running") && !t.contains("panicked"), "{t}");
    // Through the config (0640, group only): the same clear refusal, naming the file.
    let o = keyway_as(OTHER, OTHER, &[], &["--config", &cfg, "status"]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(
        t.contains(&format!("permission denied reading {cfg}")) && t.contains("group keyway"),
        "{t}"
    );

    // A member of the group is served, through the config it may read (the key it may not).
    let o = keyway_as(OTHER, OTHER, &[SERVICE], &["--config", &cfg, "status"]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(2), "{t}\n{}", log());
    assert!(t.contains("door front"), "{t}");
    let o = keyway_as(
        OTHER,
        OTHER,
        &[SERVICE],
        &["--config", &cfg, "status", "--json"],
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    assert_eq!(v["doors"][0]["id"], "front", "{}", text(&o));
}
