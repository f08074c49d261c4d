//! A power cut during an ACL import: the `keyway acl import` process is SIGKILLed at spread
//! points of its run, 20 times; after each, the database passes `PRAGMA integrity_check` and
//! holds exactly the old ACL or exactly the new one, never a mix, and the next import works.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use keyway::acl::{Decision, Store};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

const N: u64 = 6_000;

fn config(dir: &Path) -> std::path::PathBuf {
    use p256::pkcs8::{EncodePrivateKey, LineEnding};
    let key = p256::SecretKey::random(&mut rand_core::OsRng);
    let key_path = dir.join("reader.pem");
    std::fs::write(&key_path, key.to_pkcs8_pem(LineEnding::LF).unwrap()).unwrap();
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = dir.join("keyway.toml");
    std::fs::write(
        &config,
        r#"
[daemon]
database = "keyway.db"

[[door]]
id = "front"
osdp = { port = "/dev/ttyUSB0", address = 1 }
nfc = { reader = "Virtual PCD 00 00" }
aliro = { group_id = "00112233445566778899aabbccddeeff", sub_id = "ffeeddccbbaa99887766554433221100", private_key_file = "reader.pem" }
"#,
    )
    .unwrap();
    config
}

fn import(config: &Path, file: &Path) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_keyway"))
        .arg("--config")
        .arg(config)
        .args(["acl", "import"])
        .arg(file)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run keyway")
}

/// Which of the two ACLs the database holds: `Some(first key)` when consistent.
fn which(db: &Path, keys: &[[u8; 65]; 3]) -> u64 {
    let store = Store::open(db).unwrap();
    let raw = rusqlite::Connection::open(db).unwrap();
    let check: String = raw
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    assert_eq!(
        store.stats().unwrap().credentials,
        N,
        "a whole ACL, not a mix"
    );
    let now = time::OffsetDateTime::now_utc();
    // keys[0] only in the ACL starting at 1, keys[2] only in the one starting at N/2+1,
    // keys[1] in both (its card number tells which file wrote it).
    let d: Vec<Decision> = keys
        .iter()
        .map(|k| store.decide(k, "front", now).unwrap())
        .collect();
    let fc = |d: &Decision| match d {
        Decision::Grant(g) => Some(g.facility_code),
        Decision::Deny(_) => None,
    };
    match (fc(&d[0]), fc(&d[1]), fc(&d[2])) {
        (Some(_), Some(1), None) => 1,
        (None, Some(2), Some(_)) => 2,
        other => panic!("a mixed ACL: {other:?}"),
    }
}

/// Rewrites every row's facility code, so a decision tells which file wrote the row.
fn set_facility_code(path: &Path, fc: u32) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut out = String::new();
    for (i, line) in text.lines().enumerate() {
        if i == 0 {
            out.push_str(line);
        } else {
            let f: Vec<&str> = line.split(',').collect();
            out.push_str(&format!("{},{},{},{fc},{},,,front", f[0], f[1], f[2], f[4]));
        }
        out.push('\n');
    }
    std::fs::write(path, out).unwrap();
}

#[test]
fn sigkill_during_import_leaves_old_or_new_acl() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let db = dir.path().join("keyway.db");
    let a = dir.path().join("a.csv");
    let b = dir.path().join("b.csv");
    // Two ACLs of N credentials overlapping by half; facility code 1 in A, 2 in B.
    keyway_sim::acl::write_csv(&a, 1, N, "front").unwrap();
    keyway_sim::acl::write_csv(&b, N / 2 + 1, N, "front").unwrap();
    set_facility_code(&a, 1);
    set_facility_code(&b, 2);
    let mut keys = [[0u8; 65]; 3];
    keyway_sim::acl::for_each_key(1, 1, |_, k| keys[0] = k);
    keyway_sim::acl::for_each_key(N / 2 + 1, 1, |_, k| keys[1] = k);
    keyway_sim::acl::for_each_key(N + N / 2, 1, |_, k| keys[2] = k);

    // A full run of each, timed, so the kills spread over a whole import.
    let started = Instant::now();
    assert!(import(&config, &a).wait().unwrap().success());
    let full = started.elapsed();
    assert_eq!(which(&db, &keys), 1);
    assert!(import(&config, &b).wait().unwrap().success());
    assert_eq!(which(&db, &keys), 2);

    let mut seen = [0u32; 3];
    let mut current = 2;
    for run in 0..20u32 {
        let file = if current == 1 { &b } else { &a };
        let mut child = import(&config, file);
        // Spread over 0..2x the measured duration (the later ones let imports finish).
        let at = full.mul_f64(f64::from(run) * 2.0 / 20.0);
        std::thread::sleep(at);
        let _ = child.kill();
        let status = child.wait().unwrap();
        let now = which(&db, &keys);
        seen[now as usize] += 1;
        if status.success() {
            assert_ne!(now, current, "a finished import is in force");
        }
        current = now;
    }
    // The database stays usable: a complete import after all the kills works.
    let file = if current == 1 { &b } else { &a };
    assert!(import(&config, file).wait().unwrap().success());
    assert_ne!(which(&db, &keys), current);
    assert!(
        !dir.path().join("keyway.db-acl-stage").exists(),
        "a finished import removes its stage"
    );
    eprintln!("after kills: old/new states seen {seen:?}, full import {full:?}");
}
