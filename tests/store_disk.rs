//! The store on a disk that misbehaves, on a real file system: a small tmpfs (needs root to
//! mount; a test that cannot mount fails, it is not skipped).
//!
//! - Disk full: every tap keeps its grant from the cached ACL, the failed event writes are
//!   counted and logged, and once space is back the count reaches the database.
//! - Read-only file system: the store starts read-only and grants, loudly; once the file
//!   system is writable again it stores events again.
//! - Damaged pages: reported at start as a damaged database (also by `keyway acl import`, which
//!   must not blame the file).
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keyway::acl::{CredentialSpec, ImportMode, Store};
use keyway::card::CardFormat;
use keyway::config::Door;
use keyway::daemon::access::{self, Access, PanelSink, RateLimitConfig, Subject, VerdictWait};
use keyway::daemon::{StoreHandle, StoreOptions};
use keyway::events::Transport;

/// A tmpfs of `size` mounted on a fresh directory; unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs and needs root (mount -t tmpfs): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn remount(&self, mode: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,{mode}")])
            .arg(self.dir.path())
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "remount {mode}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Writes a file until the file system says it is full; returns its path.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0xA5u8; 4096];
    loop {
        match f.write_all(&chunk).and_then(|()| f.sync_all()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(28) => return path, // ENOSPC
            Err(e) => panic!("filling the disk: {e}"),
        }
    }
}

fn logged(target: &str, text: &str) -> usize {
    ERRORS
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|(t, m)| t == target && m.contains(text))
        .count()
}

/// Error records logged (target, message): this test binary owns the logger.
struct Errors(std::sync::Mutex<Vec<(String, String)>>);

impl log::Log for Errors {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::Level::Error
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            self.0
                .lock()
                .unwrap()
                .push((r.target().to_owned(), r.args().to_string()));
        }
    }
    fn flush(&self) {}
}

static ERRORS: Errors = Errors(std::sync::Mutex::new(Vec::new()));

/// Installs [`ERRORS`] once.
fn capture_errors() {
    if log::set_logger(&ERRORS).is_ok() {
        log::set_max_level(log::LevelFilter::Error);
    }
}

/// A panel that takes cards and never answers (the verdict is not what this test is about).
#[derive(Clone)]
struct SilentPanel;

impl PanelSink for SilentPanel {
    fn send_card(
        &self,
        _door: &Door,
        _bits: keyway::card::WiegandBits,
        _attempt: access::AttemptId,
        _started: Instant,
    ) -> Option<VerdictWait> {
        None
    }
}

fn door() -> Door {
    let text = r#"
[[door]]
id = "front"
osdp = { port = "/dev/ttyUSB0", address = 1 }
nfc = { reader = "Virtual PCD 00 00" }
aliro = { group_id = "00112233445566778899aabbccddeeff", sub_id = "ffeeddccbbaa99887766554433221100", private_key_file = "reader.pem" }
"#;
    keyway::config::parse(text, Path::new("/k.toml"))
        .unwrap()
        .doors
        .remove(0)
}

fn phone() -> [u8; 65] {
    let mut key = [0u8; 65];
    keyway_sim::acl::for_each_key(7, 1, |_, k| key = k);
    key
}

/// A database with one phone allowed at "front".
fn enrolled_db(dir: &Path) -> PathBuf {
    let db = dir.join("keyway.db");
    let spec = CredentialSpec {
        state: keyway::acl::CredentialState::Active,
        line: 1,
        endpoint_key: phone(),
        person_id: "p-1".into(),
        card_format: CardFormat::H10301,
        facility_code: 1,
        card_number: 7,
        valid_from: None,
        valid_until: None,
        doors: vec!["front".into()],
        card_uids: vec![],
    };
    Store::open(&db)
        .unwrap()
        .import_specs(&[spec], ImportMode::Replace, "t")
        .unwrap();
    db
}

/// One tap through the access pipeline: the decision and whether the phone was granted.
async fn tap(access: &Access<SilentPanel>) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut att = access.begin(Transport::Nfc, Instant::now(), deadline);
    access
        .decide(
            &mut att,
            Subject::Endpoint {
                key: phone(),
                signaling_bitmap: None,
            },
        )
        .await
        .unwrap();
    access.finish(&att, None, None).await;
    att.granted()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_never_stops_grants_and_failed_event_writes_are_counted() {
    capture_errors();
    let fs = Tmpfs::mount("2m");
    let db = enrolled_db(fs.path());
    let (store, _thread) = StoreHandle::open(&db).unwrap();
    let access = Access::new(
        Arc::new(door()),
        store.clone(),
        SilentPanel,
        access::shared_limiter(RateLimitConfig::default()),
    );
    assert!(tap(&access).await);
    assert_eq!(store.event_write_failures(), 0);

    let filler = fill(fs.path());
    // Taps go on; event writes start failing once the WAL needs a page the disk lacks.
    let mut taps = 0;
    while store.event_write_failures() == 0 {
        assert!(
            tap(&access).await,
            "tap {taps} on a full disk was not granted"
        );
        taps += 1;
        assert!(taps < 5_000, "no event write failed on a full disk");
    }
    eprintln!("first failed event write after {taps} taps on the full disk");
    for i in 0..20 {
        assert!(
            tap(&access).await,
            "tap {i} after a failed write was not granted"
        );
    }
    let failed = store.event_write_failures();
    assert!(
        failed >= 20,
        "every tap on the full disk failed to store: {failed}"
    );
    // Loud: an error naming the lost event and the running count, from the store.
    let loud = ERRORS
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|(t, m)| {
            t == "keyway::store" && m.contains("EVENT NOT STORED") && m.contains("disk is full")
        })
        .count();
    assert_eq!(loud as u64, failed);

    // Space again: the next event is stored, and the count reaches the database with it.
    std::fs::remove_file(filler).unwrap();
    assert!(tap(&access).await);
    assert_eq!(store.event_write_failures(), failed);
    drop(access);
    drop(store);
    let stats = Store::open(&db).unwrap().stats().unwrap();
    assert_eq!(stats.events_write_failed, failed);
    assert!(stats.events_total >= 2, "{stats:?}");
}

fn access(store: &StoreHandle) -> Access<SilentPanel> {
    Access::new(
        Arc::new(door()),
        store.clone(),
        SilentPanel,
        access::shared_limiter(RateLimitConfig::default()),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_file_system_serves_grants_read_only_loudly() {
    capture_errors();
    let fs = Tmpfs::mount("8m");
    let db = enrolled_db(fs.path());
    fs.remount("ro");
    let before = logged("keyway::store", "DATABASE READ-ONLY");
    let (store, _thread) = StoreHandle::open_with(
        &db,
        StoreOptions {
            // Try to write again at every write (the default waits 30 s between tries).
            writable_retry: Duration::ZERO,
            ..StoreOptions::default()
        },
    )
    .expect("a read-only database still serves");
    let status = store.status();
    assert!(
        status
            .read_only
            .as_deref()
            .unwrap_or("")
            .contains("Read-only file system"),
        "{status:?}"
    );
    assert_eq!(status.integrity, "ok");
    assert_eq!(logged("keyway::store", "DATABASE READ-ONLY"), before + 1);
    // check-config (the unit's ExecStartPre) lets it start: a warning, not a refusal.
    let cfg_dir = tempfile::tempdir().unwrap();
    let config = write_config(
        cfg_dir.path(),
        &db,
        Path::new("/dev/null"),
        "Virtual PCD 00 00",
    );
    let out = support::keyway(&config, &["check-config"]);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("warning") && text.contains("READ-ONLY"),
        "{text}"
    );
    let a = access(&store);
    for _ in 0..3 {
        assert!(tap(&a).await, "granted from the read-only ACL");
    }
    assert_eq!(store.event_write_failures(), 3, "every event write failed");
    assert!(logged("keyway::store", "the database is read-only") >= 3);

    // Writable again: the next event is stored, with the count of those that were not.
    fs.remount("rw");
    assert!(tap(&a).await);
    let status = store.status();
    assert_eq!(status.read_only, None, "{status:?}");
    assert_eq!(status.events_not_stored, 3);
    assert!(tap(&a).await, "decisions after the reader was reopened");
    drop(a);
    drop(store);
    let stats = Store::open(&db).unwrap().stats().unwrap();
    assert_eq!((stats.events_total, stats.events_write_failed), (2, 3));
}

/// A database with 3,000 credentials and garbage over a stretch of its pages (not the first,
/// which holds the header: a file whose header is gone does not open at all).
fn damaged_db(dir: &Path) -> PathBuf {
    let db = dir.join("keyway.db");
    let specs: Vec<CredentialSpec> = (0..3000u64)
        .map(|i| {
            let mut key = [0u8; 65];
            keyway_sim::acl::for_each_key(i + 10, 1, |_, k| key = k);
            CredentialSpec {
                line: i + 2,
                endpoint_key: key,
                person_id: format!("p-{i}"),
                card_format: CardFormat::H10301,
                facility_code: 1,
                card_number: (i % 60_000) as u32,
                valid_from: None,
                valid_until: None,
                doors: vec!["front".into()],
                card_uids: vec![],
                state: keyway::acl::CredentialState::Active,
            }
        })
        .collect();
    Store::open(&db)
        .unwrap()
        .import_specs(&specs, ImportMode::Replace, "t")
        .unwrap();
    let mut bytes = std::fs::read(&db).unwrap();
    assert!(bytes.len() > 40 * 4096, "{}", bytes.len());
    for b in &mut bytes[20 * 4096..30 * 4096] {
        *b = 0x5A;
    }
    std::fs::write(&db, bytes).unwrap();
    db
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_database_is_reported_at_start_and_not_blamed_on_the_acl_file() {
    capture_errors();
    let dir = tempfile::tempdir().unwrap();
    let db = damaged_db(dir.path());
    let before = logged("keyway::store", "DATABASE DAMAGED");
    let (store, _thread) = StoreHandle::open(&db).expect("a damaged database is still served");
    let status = store.status();
    assert_eq!(status.integrity, "damaged", "{status:?}");
    assert!(!status.integrity_detail.is_empty());
    assert_eq!(logged("keyway::store", "DATABASE DAMAGED"), before + 1);
    drop(store);

    // An import into it (a good file, either syntax, replace or merge) says the database is
    // damaged, not that the file is bad.
    let config = write_config(dir.path(), &db, Path::new("/dev/null"), "Virtual PCD 00 00");
    let csv = dir.path().join("acl.csv");
    keyway_sim::acl::write_csv(&csv, 5000, 10, "front").unwrap();
    let json = dir.path().join("acl.json");
    keyway_sim::acl::write_json(&json, 5000, 10, "front").unwrap();
    for (acl, merge) in [(&csv, false), (&json, false), (&csv, true)] {
        let acl = acl.to_str().unwrap();
        let args = if merge {
            vec!["acl", "import", "--merge", acl]
        } else {
            vec!["acl", "import", acl]
        };
        let out = support::keyway(&config, &args);
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{text}");
        assert!(
            text.contains("database") && text.contains("damaged"),
            "{text}"
        );
        assert!(
            !text.contains("rejected"),
            "the file is not to blame: {text}"
        );
    }
}

/// A configuration in `dir` with door "front" (`port`, `reader`) on the database `db`.
fn write_config(dir: &Path, db: &Path, port: &Path, reader: &str) -> PathBuf {
    let config = support::one_door_site_with_reader(dir, port, 1, reader);
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "database = \"keyway.db\"",
        &format!("database = \"{}\"", db.display()),
    );
    assert!(text.contains(&db.display().to_string()), "{text}");
    std::fs::write(&config, text).unwrap();
    config
}

/// `keyway run` on `db` (a door with no reader and no serial port: the doors retry; the
/// store is what is tested), logging to a file; killed when dropped.
struct Daemon {
    child: std::process::Child,
    config: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    fn start(db: &Path) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let port = dir.path().join("no-tty");
        let config = write_config(dir.path(), db, &port, "No Such Reader");
        let log = dir.path().join("run.log");
        let child = Command::new(env!("CARGO_BIN_EXE_keyway"))
            .arg("--config")
            .arg(&config)
            .args(["run", "--log", "stderr"])
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start keyway run");
        let mut d = Daemon {
            child,
            config,
            log,
            _dir: dir,
        };
        d.wait_for_log("serving 1 door(s)");
        d
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_for_log(&mut self, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.log().contains(text) {
            if Instant::now() > deadline || self.child.try_wait().unwrap().is_some() {
                panic!("no {text:?} from keyway run:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `keyway status --json` once the health task has reported the database.
    fn status(&self) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = support::keyway(&self.config, &["status", "--json"]);
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
                if !v["database"].is_null() && v["database"]["integrity"] != "checking" {
                    return v;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no database in keyway status: {}{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// SIGTERM, and the exit status; the log.
    fn stop(mut self) -> (std::process::ExitStatus, String) {
        // SAFETY: signals our own child, which has not been reaped yet.
        assert_eq!(
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) },
            0
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return (st, self.log());
            }
            assert!(
                Instant::now() < deadline,
                "keyway run ignored SIGTERM:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn problem_codes(status: &serde_json::Value) -> Vec<String> {
    status["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["code"].as_str().unwrap().to_string())
        .collect()
}

/// `keyway run` itself on a database whose file system is read-only: it starts, serves, says
/// so in the log and in `keyway status`, and stops cleanly.
#[test]
fn keyway_run_starts_on_a_read_only_database_and_says_so() {
    let fs = Tmpfs::mount("8m");
    let db = enrolled_db(fs.path());
    fs.remount("ro");
    let daemon = Daemon::start(&db);
    let status = daemon.status();
    assert!(
        status["database"]["read_only"]
            .as_str()
            .unwrap_or("")
            .contains("Read-only file system"),
        "{status}"
    );
    assert!(
        problem_codes(&status).contains(&"database_read_only".to_string()),
        "{status}"
    );
    // The status sample reads the read-only database too.
    assert_eq!(status["acl"]["credentials"], 1, "{status}");
    let (st, log) = daemon.stop();
    assert!(st.success(), "exit {st}:\n{log}");
    assert!(log.contains("DATABASE READ-ONLY"), "{log}");
    assert!(log.contains("ACL 1 credential(s)"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

/// `keyway run` on a damaged database: it starts (what can be read is served), and the log
/// and `keyway status` say the database is damaged.
#[test]
fn keyway_run_reports_a_damaged_database_in_status() {
    let dir = tempfile::tempdir().unwrap();
    let db = damaged_db(dir.path());
    let daemon = Daemon::start(&db);
    let status = daemon.status();
    assert_eq!(status["database"]["integrity"], "damaged", "{status}");
    assert!(
        problem_codes(&status).contains(&"database_damaged".to_string()),
        "{status}"
    );
    let (st, log) = daemon.stop();
    assert!(st.success(), "exit {st}:\n{log}");
    assert!(log.contains("DATABASE DAMAGED"), "{log}");
}
