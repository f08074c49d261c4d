//! `keyway doctor` against real peers: libosdp's control panel polling on a socat pty (the
//! serial check sniffs its POLLs), a port with nobody polling, a missing port, a damaged
//! database, and the broker check against a real mosquitto (plain, password, TLS, mTLS; and
//! nothing listening, a wrong password, an unknown CA, no client certificate). pcscd is not
//! started here, so its check must fail with a hint (not pass); its pass path is in
//! tests/nfc_hil.rs, Bluetooth's in tests/ble_hil.rs.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::mqtt::{free_port, make_certs, password_file, tls_broker, write_private, Mosquitto};
use support::{doctor, doctor_outcome as outcome, pty_pair, Cp};

fn config(dir: &Path, port: &Path, address: u8) -> PathBuf {
    support::one_door_site(dir, port, address)
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

/// The one-door site in `dir` (its serial port missing, so doctor does not sniff) with a
/// `[cloud]` table on `brokers`; `extra`: more `[cloud]` keys.
fn cloud_site(dir: &Path, brokers: &[&str], extra: &str) -> PathBuf {
    let cfg = config(dir, &dir.join("no-tty"), 1);
    let pk = keyway::cloud::sign::BackendSigner::from_hex("k1", &format!("{:064x}", 7))
        .unwrap()
        .public_hex();
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str(&format!(
        "\n[cloud]\nbrokers = {brokers:?}\nsite = \"s1\"\ngateway = \"gw1\"\n{extra}\n\n\
         [[cloud.trusted_keys]]\nkid = \"k1\"\npublic_key = \"{pk}\"\n"
    ));
    std::fs::write(&cfg, text).unwrap();
    cfg
}

/// The check named `broker URL`: outcome, detail, hint.
fn broker<'a>(v: &'a serde_json::Value, url: &str) -> (&'a str, &'a str, &'a str) {
    let c = support::doctor_check(v, &format!("broker {url}"));
    (
        c["outcome"].as_str().unwrap(),
        c["detail"].as_str().unwrap(),
        c["hint"].as_str().unwrap_or(""),
    )
}

fn toml_path(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

#[test]
fn doctor_without_cloud_skips_the_broker_check() {
    let dir = tempfile::tempdir().unwrap();
    let (_, text, v) = doctor(&config(dir.path(), &dir.path().join("no-tty"), 1));
    assert_eq!(outcome(&v, "cloud"), "skip", "{text}");
}

#[test]
fn doctor_connects_to_a_plain_broker_and_names_one_with_nothing_listening() {
    let m = Mosquitto::start("allow_anonymous true");
    let good = format!("mqtt://127.0.0.1:{}", m.port);
    let dead_port = free_port();
    let dead = format!("mqtt://127.0.0.1:{dead_port}");
    let dir = tempfile::tempdir().unwrap();
    let (o, text, v) = doctor(&cloud_site(dir.path(), &[&good, &dead], ""));
    let (out, detail, _) = broker(&v, &good);
    assert_eq!(out, "pass", "{text}");
    assert!(
        detail.contains("CONNACK accepted") && detail.contains("plain TCP"),
        "{text}"
    );
    assert!(detail.contains("client id keyway-s1-gw1"), "{text}");
    let (out, detail, hint) = broker(&v, &dead);
    assert_eq!(out, "fail", "{text}");
    assert!(
        detail.contains(&dead) && detail.contains("connection refused"),
        "{text}"
    );
    assert!(hint.contains(&format!("127.0.0.1:{dead_port}")), "{text}");
    assert!(!text.contains("[skip] cloud"), "{text}");
    assert_eq!(o.status.code(), Some(1), "{text}");
    // The probe is a real MQTT session with keyway's client id, seen by the broker.
    assert!(m.log().contains("keyway-s1-gw1"), "{}", m.log());
}

#[test]
fn doctor_checks_the_broker_password() {
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("passwd");
    password_file(&users, &[("gw1", "right-pw")]);
    let m = Mosquitto::start(&format!(
        "allow_anonymous false\npassword_file {}",
        users.display()
    ));
    let url = format!("mqtt://127.0.0.1:{}", m.port);
    let pw = dir.path().join("cloud-password");
    let extra = format!("username = \"gw1\"\npassword_file = {}", toml_path(&pw));

    write_private(&pw, "wrong-pw\n");
    let site = tempfile::tempdir().unwrap();
    let (_, text, v) = doctor(&cloud_site(site.path(), &[&url], &extra));
    let (out, detail, hint) = broker(&v, &url);
    assert_eq!(out, "fail", "{text}");
    assert!(detail.contains("refused the credentials"), "{text}");
    assert!(
        hint.contains("gw1") && hint.contains(&pw.display().to_string()),
        "{text}"
    );
    assert!(
        !text.contains("wrong-pw"),
        "the password is never shown: {text}"
    );

    write_private(&pw, "right-pw\n");
    let (_, text, v) = doctor(&cloud_site(site.path(), &[&url], &extra));
    let (out, detail, _) = broker(&v, &url);
    assert_eq!(out, "pass", "{text}");
    assert!(detail.contains("user gw1"), "{text}");
}

#[test]
fn doctor_verifies_the_broker_over_tls_and_names_an_unknown_ca() {
    let m = tls_broker(false);
    let url = format!("mqtts://127.0.0.1:{}", m.port);
    let site = tempfile::tempdir().unwrap();
    let extra = format!("ca_file = {}", toml_path(&m.path("ca.pem")));
    let (_, text, v) = doctor(&cloud_site(site.path(), &[&url], &extra));
    let (out, detail, _) = broker(&v, &url);
    assert_eq!(out, "pass", "{text}");
    assert!(detail.contains("TLS verified"), "{text}");

    // Another CA: the broker's certificate must not verify.
    let other = tempfile::tempdir().unwrap();
    make_certs(other.path());
    let other_ca = other.path().join("ca.pem");
    let extra = format!("ca_file = {}", toml_path(&other_ca));
    let (_, text, v) = doctor(&cloud_site(site.path(), &[&url], &extra));
    let (out, detail, hint) = broker(&v, &url);
    assert_eq!(out, "fail", "{text}");
    // (BadSignature here: both test CAs have the same name; UnknownIssuer otherwise.)
    assert!(detail.contains("does not verify"), "{text}");
    assert!(
        hint.contains(&other_ca.display().to_string()) && hint.contains(&url),
        "{text}"
    );
}

#[test]
fn doctor_presents_the_client_certificate_to_a_mutual_tls_broker() {
    let m = tls_broker(true);
    let url = format!("mqtts://127.0.0.1:{}", m.port);
    let site = tempfile::tempdir().unwrap();
    let ca = format!("ca_file = {}", toml_path(&m.path("ca.pem")));
    let extra = format!(
        "{ca}\nclient_cert_file = {}\nclient_key_file = {}",
        toml_path(&m.path("client.pem")),
        toml_path(&m.path("client.key"))
    );
    let (_, text, v) = doctor(&cloud_site(site.path(), &[&url], &extra));
    let (out, detail, _) = broker(&v, &url);
    assert_eq!(out, "pass", "{text}");
    assert!(detail.contains("client certificate"), "{text}");

    // Without one, the broker refuses the handshake.
    let (_, text, v) = doctor(&cloud_site(site.path(), &[&url], &ca));
    let (out, detail, hint) = broker(&v, &url);
    assert_eq!(out, "fail", "{text}");
    assert!(
        detail.contains("TLS: the broker refused the handshake"),
        "{text}"
    );
    assert!(hint.contains("client certificate"), "{text}");
}

/// With keyway running, its brokers are not probed: the probe's client id is the daemon's,
/// and the broker would drop the daemon's connection for it.
#[test]
fn doctor_leaves_a_running_daemons_broker_session_alone() {
    let m = Mosquitto::start("allow_anonymous true");
    let url = format!("mqtt://127.0.0.1:{}", m.port);
    let dir = tempfile::tempdir().unwrap();
    let cfg = cloud_site(dir.path(), &[&url], "");
    let daemon = support::KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_keyway"))
            .arg("--config")
            .arg(&cfg)
            .args(["run", "--log", "stderr"])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Running once its status socket answers (2: with problems, no reader or serial port).
    let deadline = std::time::Instant::now() + support::STEP_TIMEOUT;
    while Command::new(env!("CARGO_BIN_EXE_keyway"))
        .arg("--config")
        .arg(&cfg)
        .arg("status")
        .output()
        .unwrap()
        .status
        .code()
        != Some(2)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "keyway run never answered status"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // ... and its link is connected.
    let as_keyway = "as keyway-s1-gw1";
    while !m.log().contains(as_keyway) {
        assert!(std::time::Instant::now() < deadline, "no link: {}", m.log());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let (_, text, v) = doctor(&cfg);
    assert_eq!(outcome(&v, "cloud"), "skip", "{text}");
    assert!(text.contains("keyway is running"), "{text}");
    assert!(!text.contains(&format!("broker {url}")), "{text}");
    // The daemon's own connection is the only one the broker saw with its client id.
    assert_eq!(m.log().matches(as_keyway).count(), 1, "{}", m.log());
    drop(daemon);
}
