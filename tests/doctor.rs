//! `keyway doctor` against real peers: libosdp's control panel polling on a socat pty (the
//! serial check sniffs its POLLs), a port with nobody polling, a missing port, a damaged
//! database. pcscd is not started here, so its check must fail with a hint (not pass).
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use support::{pty_pair, Cp};

fn config(dir: &Path, port: &Path, address: u8) -> PathBuf {
    support::one_door_site(dir, port, address)
}

fn doctor(config: &Path) -> (Output, String, serde_json::Value) {
    let o = Command::new(env!("CARGO_BIN_EXE_keyway"))
        .arg("--config")
        .arg(config)
        .args(["doctor", "--sniff-secs", "2", "--json"])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!text.contains("panicked"), "{text}");
    let v = serde_json::from_slice(&o.stdout).unwrap_or(serde_json::Value::Null);
    (o, text, v)
}

fn outcome<'a>(v: &'a serde_json::Value, name: &str) -> &'a str {
    v.as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name} in {v}"))["outcome"]
        .as_str()
        .unwrap()
}

#[test]
fn doctor_sees_libosdp_polling_the_door_and_not_another_address() {
    let pty = pty_pair();
    let mut cp = Cp::start(&pty.cp, &[5]);
    let dir = tempfile::tempdir().unwrap();
    // Polled: the CP polls address 5 (and, getting no answer, keeps retrying it).
    let (o, text, v) = doctor(&config(dir.path(), &pty.pd, 5));
    assert_eq!(outcome(&v, "config"), "pass", "{text}");
    assert_eq!(
        outcome(&v, &format!("serial {}", pty.pd.display())),
        "pass",
        "{text}"
    );
    assert_eq!(outcome(&v, "door front: panel polling"), "pass", "{text}");
    assert_eq!(outcome(&v, "database"), "warn", "{text}"); // not created yet
    assert_eq!(outcome(&v, "bluetooth"), "skip", "{text}");
    assert_eq!(outcome(&v, "secure channel"), "skip", "{text}");
    // Without pcscd running here, the NFC side fails with a hint: the exit code says so.
    assert_eq!(o.status.code(), Some(1), "{text}");
    drop(cp.seen.drain(..));

    // The same line, a door at another address: nothing addressed to it.
    let dir = tempfile::tempdir().unwrap();
    let (_, text, v) = doctor(&config(dir.path(), &pty.pd, 9));
    assert_eq!(outcome(&v, "door front: panel polling"), "fail", "{text}");
}

#[test]
fn doctor_fails_a_missing_port_and_a_damaged_database_with_hints() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &dir.path().join("no-tty"), 1);
    std::fs::write(dir.path().join("keyway.db"), vec![0x42u8; 8192]).unwrap();
    let (o, text, v) = doctor(&cfg);
    assert_eq!(o.status.code(), Some(1), "{text}");
    assert_eq!(outcome(&v, "database"), "fail", "{text}");
    let serial = format!("serial {}", dir.path().join("no-tty").display());
    assert_eq!(outcome(&v, &serial), "fail", "{text}");
    for c in v.as_array().unwrap() {
        if c["outcome"] == "fail" {
            assert!(c["hint"].is_string(), "every failure has a fix: {c}");
        }
    }
}

#[test]
fn doctor_on_a_broken_config_names_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("keyway.toml");
    std::fs::write(&cfg, "[daemon]\nnope = 1\n").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_keyway"))
        .arg("--config")
        .arg(&cfg)
        .arg("doctor")
        .output()
        .unwrap();
    let t = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(t.contains("[FAIL] config:") && t.contains("nope"), "{t}");
}
