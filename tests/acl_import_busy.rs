//! A big ACL import while a door is busy: `keyway acl import` (the real CLI, its own process
//! and connection) replaces the ACL with `KEYWAY_BUSY_IMPORT_N` credentials (default
//! 1,000,000) while taps go through the access pipeline of a running store. Every tap is
//! decided (granted: the phone is in both ACLs), every tap's event is stored (none dropped for
//! a busy database), and the import completes. The CSV is generated once into
//! `target/acl-scale-<n>.csv`.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keyway::acl::{ImportMode, Store};
use keyway::config::Door;
use keyway::daemon::access::{self, Access, PanelSink, RateLimitConfig, Subject, VerdictWait};
use keyway::daemon::StoreHandle;
use keyway::events::Transport;

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

const DOOR: &str = r#"
[daemon]
database = "keyway.db"

[[door]]
id = "front"
osdp = { port = "/dev/ttyUSB0", address = 1 }
nfc = { reader = "Virtual PCD 00 00" }
aliro = { group_id = "00112233445566778899aabbccddeeff", sub_id = "ffeeddccbbaa99887766554433221100", private_key_file = "reader.pem" }
"#;

fn size() -> u64 {
    std::env::var("KEYWAY_BUSY_IMPORT_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_import_while_taps_run_loses_no_event_and_grants_every_tap() {
    let n = size();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("keyway.toml");
    std::fs::write(&config, DOOR).unwrap();
    let key_path = dir.path().join("reader.pem");
    std::fs::write(&key_path, "11".repeat(32)).unwrap();
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let db = dir.path().join("keyway.db");
    let small = dir.path().join("small.csv");
    keyway_sim::acl::write_csv(&small, 1, 100, "front").unwrap();
    // Kept in target/ (shared with the acl_scale bench): generating a million keys takes
    // longer than importing them in a debug build.
    let big = keyway_sim::acl::cached_csv(&Path::new(env!("CARGO_MANIFEST_DIR")).join("target"), n)
        .unwrap();
    Store::open(&db)
        .unwrap()
        .import_file(&small, ImportMode::Replace)
        .unwrap();
    let mut phone = [0u8; 65];
    keyway_sim::acl::for_each_key(1, 1, |_, k| phone = k);

    let (store, _thread) = StoreHandle::open(&db).unwrap();
    let door = keyway::config::parse(DOOR, &config)
        .unwrap()
        .doors
        .remove(0);
    let access = Access::new(
        Arc::new(door),
        store.clone(),
        SilentPanel,
        access::shared_limiter(RateLimitConfig::default()),
    );

    let mut import = Command::new(env!("CARGO_BIN_EXE_keyway"))
        .arg("--config")
        .arg(&config)
        .args(["acl", "import"])
        .arg(&big)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("run keyway acl import");
    let started = Instant::now();
    let mut decisions = Vec::new();
    let status = loop {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let mut att = access.begin(Transport::Nfc, Instant::now(), deadline);
        let t = Instant::now();
        access
            .decide(
                &mut att,
                Subject::Endpoint {
                    key: phone,
                    signaling_bitmap: None,
                },
            )
            .await
            .unwrap();
        decisions.push(t.elapsed());
        assert!(att.granted(), "tap {} during the import", decisions.len());
        access.finish(&att, None, None).await;
        if let Some(status) = import.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1800),
            "the import did not finish"
        );
        // A door at its busiest: a tap every 20 ms.
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "the import failed: {status}");
    let taps = decisions.len() as u64;
    decisions.sort();
    eprintln!(
        "{taps} taps during an import of {n} taking {:?}: decision p50 {:?} p99 {:?} max {:?}",
        started.elapsed(),
        decisions[decisions.len() / 2],
        decisions[(decisions.len() * 99 / 100).min(decisions.len() - 1)],
        decisions[decisions.len() - 1]
    );
    assert!(
        taps >= 10,
        "the import ended before the taps could overlap it"
    );
    assert_eq!(store.event_write_failures(), 0);
    drop(access);
    drop(store);
    let stats = Store::open(&db).unwrap().stats().unwrap();
    assert_eq!(stats.credentials, n);
    assert_eq!(stats.events_total, taps, "every tap's event is stored");
}
