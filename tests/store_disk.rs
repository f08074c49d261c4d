//! The store on a disk that misbehaves, on a real file system: a small tmpfs (needs root to
//! mount; a test that cannot mount fails, it is not skipped).
//!
//! - Disk full: every tap keeps its grant from the cached ACL, the failed event writes are
//!   counted and logged, and once space is back the count reaches the database.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keyway::acl::{CredentialSpec, ImportMode, Store};
use keyway::card::CardFormat;
use keyway::config::Door;
use keyway::daemon::access::{self, Access, PanelSink, RateLimitConfig, Subject, VerdictWait};
use keyway::daemon::StoreHandle;
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
        .filter(|(t, m)| t == "keyway::store" && m.contains("EVENT NOT STORED"))
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
