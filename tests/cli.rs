//! The `keyway` binary as an installer uses it: check-config, acl import, events, version.
//! Broken input must give a clear message and a non-zero exit, never a panic.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Output};

mod support;
use support::{keyway, text};

fn no_panic(o: &Output) {
    let t = text(o);
    assert!(!t.contains("panicked"), "keyway panicked:\n{t}");
    assert_ne!(o.status.code(), Some(101), "exit code 101 is a panic:\n{t}");
}

struct Site {
    dir: tempfile::TempDir,
    config: PathBuf,
}

fn site(mode: u32) -> Site {
    let dir = tempfile::tempdir().unwrap();
    // check-config wants the serial port to exist; a plain file stands in for it.
    let port = dir.path().join("ttyUSB0");
    std::fs::write(&port, "").unwrap();
    let config = support::one_door_site_with_reader(dir.path(), &port, 1, "Virtual PCD 00 00");
    let key_path = dir.path().join("reader.pem");
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(mode)).unwrap();
    Site { dir, config }
}

#[test]
fn check_config_accepts_a_good_site() {
    let s = site(0o600);
    let o = keyway(&s.config, &["check-config"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("ok (1 door"), "{}", text(&o));
}

#[test]
fn check_config_refuses_a_missing_port_and_an_unwritable_database() {
    let s = site(0o600);
    let good = std::fs::read_to_string(&s.config).unwrap();
    // A regular file where the database directory should be: unwritable for root too.
    std::fs::write(s.dir.path().join("file"), "").unwrap();
    let broken = good
        .replace("ttyUSB0", "ttyUSB9")
        .replace("\"keyway.db\"", "\"file/keyway.db\"");
    std::fs::write(&s.config, broken).unwrap();
    let o = keyway(&s.config, &["check-config"]);
    no_panic(&o);
    assert!(!o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("daemon.database"), "{t}");
    assert!(t.contains("/var/lib/keyway"), "hint missing: {t}");
    assert!(t.contains("door \"front\": osdp.port"), "{t}");
    assert!(t.contains("ttyUSB9 does not exist"), "{t}");
    assert!(t.contains("/dev/serial/by-id"), "hint missing: {t}");
}

#[test]
fn check_config_refuses_a_key_others_can_read() {
    let s = site(0o644);
    let o = keyway(&s.config, &["check-config"]);
    no_panic(&o);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(t.contains("door \"front\": aliro.private_key_file"), "{t}");
    assert!(t.contains("readable by group or others"), "{t}");
    assert!(!t.contains("BEGIN PRIVATE KEY"), "key material leaked: {t}");
}

#[test]
fn check_config_names_the_broken_field() {
    let s = site(0o600);
    let good = std::fs::read_to_string(&s.config).unwrap();
    for (broken, expect) in [
        (
            good.replace("address = 1", "address = 200"),
            "osdp.address: 200 is out of range",
        ),
        (
            good.replace("ffeeddccbbaa99887766554433221100", "ff"),
            "aliro.sub_id: must be 16 bytes",
        ),
        (good.replace("[daemon]", "[deamon]"), "deamon"),
        (
            good.replace("id = \"front\"", "id = \"front door\""),
            "door \"front door\": id",
        ),
        (
            good.replace("reader.pem", "missing.pem"),
            "cannot read key file",
        ),
        ("\u{0}\u{1}garbage = = =".to_string(), "config file"),
        (String::new(), "no door configured"),
    ] {
        std::fs::write(&s.config, &broken).unwrap();
        let o = keyway(&s.config, &["check-config"]);
        no_panic(&o);
        assert!(!o.status.success(), "accepted:\n{broken}");
        assert!(
            text(&o).contains(expect),
            "want {expect:?} in:\n{}",
            text(&o)
        );
    }
    let o = keyway(&s.dir.path().join("nope.toml"), &["check-config"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("cannot read config file"), "{}", text(&o));
    // The cause is said once, not once per error in the chain.
    assert_eq!(text(&o).matches("(os error 2)").count(), 1, "{}", text(&o));
}

#[test]
fn acl_import_bad_file_names_the_line_and_keeps_the_old_acl() {
    let s = site(0o600);
    let key = p256::SecretKey::random(&mut rand_core::OsRng);
    let pubhex = hex::encode(key.public_key().to_sec1_bytes());
    let good = s.dir.path().join("good.csv");
    std::fs::write(
        &good,
        format!(
            "endpoint_key,person_id,card_format,facility_code,card_number,valid_from,valid_until,doors\n\
             {pubhex},p-1,h10301,1,100,,,front\n"
        ),
    )
    .unwrap();
    let o = keyway(&s.config, &["acl", "import", good.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));

    let bad = s.dir.path().join("bad.csv");
    std::fs::write(
        &bad,
        format!(
            "endpoint_key,person_id,card_format,facility_code,card_number,valid_from,valid_until,doors\n\
             {pubhex},p-1,h10301,1,100,,,front\n\
             {pubhex}00,p-2,h10301,1,101,,,front\n"
        ),
    )
    .unwrap();
    let o = keyway(&s.config, &["acl", "import", bad.to_str().unwrap()]);
    no_panic(&o);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(t.contains("line 3"), "{t}");
    assert!(t.contains("nothing changed"), "{t}");

    // The previous ACL is intact.
    let store = keyway::acl::Store::open(&s.dir.path().join("keyway.db")).unwrap();
    let d = store
        .decide(
            &key.public_key().to_sec1_bytes(),
            "front",
            time::OffsetDateTime::now_utc(),
        )
        .unwrap();
    assert!(d.is_grant(), "{d:?}");
}

/// A file naming a door the configuration does not have is refused with the ids, counts and
/// lines, and the flag that imports it anyway (with the same list as a warning).
#[test]
fn acl_import_reports_doors_not_in_the_configuration() {
    let s = site(0o600);
    let keys: Vec<String> = (0..3)
        .map(|_| {
            hex::encode(
                p256::SecretKey::random(&mut rand_core::OsRng)
                    .public_key()
                    .to_sec1_bytes(),
            )
        })
        .collect();
    let file = s.dir.path().join("typo.csv");
    std::fs::write(
        &file,
        format!(
            "endpoint_key,person_id,card_format,facility_code,card_number,valid_from,valid_until,doors\n\
             {},p-1,h10301,1,100,,,front\n\
             {},p-2,h10301,1,101,,,frnt;front\n\
             {},p-3,h10301,1,102,,,frnt;lab-9\n",
            keys[0], keys[1], keys[2]
        ),
    )
    .unwrap();
    let o = keyway(&s.config, &["acl", "import", file.to_str().unwrap()]);
    no_panic(&o);
    assert!(!o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("'frnt' (2, first on line 3), 'lab-9' (1, first on line 4)"),
        "{t}"
    );
    assert!(
        t.contains("--allow-unknown-doors") && t.contains("nothing changed"),
        "{t}"
    );
    assert!(
        !s.dir.path().join("keyway.db").exists() || {
            let st = keyway::acl::Store::open(&s.dir.path().join("keyway.db")).unwrap();
            st.stats().unwrap().credentials == 0
        }
    );
    let o = keyway(
        &s.config,
        &[
            "acl",
            "import",
            "--allow-unknown-doors",
            file.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("warning") && err.contains("'frnt' (2"),
        "{err}"
    );
    let st = keyway::acl::Store::open(&s.dir.path().join("keyway.db")).unwrap();
    assert_eq!(st.stats().unwrap().credentials, 3);
}

#[test]
fn version_and_events_on_an_empty_store() {
    let s = site(0o600);
    let o = keyway(&s.config, &["version"]);
    assert!(o.status.success());
    assert!(text(&o).starts_with("keyway "), "{}", text(&o));
    // A wrong database path is an error, and does not create a database.
    let o = keyway(&s.config, &["events"]);
    no_panic(&o);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("no database at"), "{}", text(&o));
    assert!(!s.dir.path().join("keyway.db").exists());
    let o = keyway(&s.config, &["acl", "show"]);
    assert!(!o.status.success(), "{}", text(&o));
    // Once the database exists (an import), an empty event store says so, on stderr.
    let acl = s.dir.path().join("acl.json");
    std::fs::write(&acl, r#"{"version": 1, "credentials": []}"#).unwrap();
    let o = keyway(&s.config, &["acl", "import", acl.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let o = keyway(&s.config, &["events", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no events yet"),
        "{}",
        text(&o)
    );
    let o = keyway(&s.config, &["acl", "show"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("credentials  0"), "{}", text(&o));
    assert!(
        text(&o).contains("from acl.json (replace mode"),
        "{}",
        text(&o)
    );
}

/// `keyway run` stops promptly and cleanly on SIGTERM (what systemd sends), every task with
/// it, even with nothing to talk to: no serial port, no reader, no bluetoothd.
#[test]
fn run_stops_cleanly_on_sigterm() {
    use std::io::Read;
    use std::time::{Duration, Instant};
    let s = site(0o600);
    let text = std::fs::read_to_string(&s.config)
        .unwrap()
        .replace("Virtual PCD 00 00", "No Such Reader")
        .replace("ttyUSB0", "no-tty");
    std::fs::write(&s.config, format!("{text}ble = {{}}\n")).unwrap();
    let log_path = s.dir.path().join("run.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_keyway"))
        .arg("--config")
        .arg(&s.config)
        .args(["run", "--log", "stderr"])
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .expect("start keyway run");
    let read_log = || {
        let mut t = String::new();
        if let Ok(mut f) = std::fs::File::open(&log_path) {
            let _ = f.read_to_string(&mut t);
        }
        t
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !read_log().contains("serving 1 door(s), database ") {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("keyway run did not start:\n{}", read_log());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: signals our own child, which has not been reaped yet.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("keyway run ignored SIGTERM:\n{}", read_log());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = read_log();
    assert!(status.success(), "exit {status}:\n{log}");
    assert!(log.contains("stopping"), "{log}");
    // The start-up line says how big the ACL is (here: nothing imported yet).
    assert!(log.contains("ACL empty (keyway acl import FILE)"), "{log}");
    assert!(
        !log.contains("did not stop"),
        "every task stops on shutdown:\n{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
    // The missing serial port: said once per retry, with the catalog id, path unquoted.
    let serial_id = format!(
        "message_id={}",
        keyway::logging::catalog::SERIAL_PORT_FAILED
    );
    let first = log
        .lines()
        .find(|l| l.contains("no-tty"))
        .unwrap_or_else(|| panic!("no serial failure logged:\n{log}"));
    assert!(first.contains(&serial_id), "{first}");
    assert!(!first.contains("\"/"), "quoted path: {first}");
    let retries = log.lines().filter(|l| l.contains("no-tty")).count();
    let with_id = log.lines().filter(|l| l.contains(&serial_id)).count();
    assert_eq!(retries, with_id, "a retry logged twice:\n{log}");
}

/// `keyway keygen` writes a usable 0600 key, never overwrites one, and prints a door snippet
/// that check-config accepts plus the group id and public key for the credential issuer.
#[test]
fn keygen_makes_a_door_identity_that_check_config_accepts() {
    let s = site(0o600);
    let key = s.dir.path().join("front.pem");
    let o = keyway(
        &s.config,
        &[
            "keygen",
            "--door",
            "hq:front",
            "--out",
            key.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let snippet = String::from_utf8_lossy(&o.stdout).to_string();
    let stderr = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(snippet.contains("id = \"hq:front\""), "{snippet}");
    assert!(stderr.contains("reader public key 04"), "{stderr}");
    // The snippet replaces the site's door identity; check-config accepts the result.
    let port = s.dir.path().join("ttyUSB0");
    std::fs::write(
        &s.config,
        format!(
            "{snippet}osdp = {{ port = \"{}\", address = 1 }}\nnfc = {{ reader = \"r\" }}\n",
            port.display()
        ),
    )
    .unwrap();
    let o = keyway(&s.config, &["check-config"]);
    assert!(o.status.success(), "{}", text(&o));
    // Never overwrites a reader key.
    let before = std::fs::read(&key).unwrap();
    let o = keyway(
        &s.config,
        &["keygen", "--door", "back", "--out", key.to_str().unwrap()],
    );
    no_panic(&o);
    assert!(!o.status.success());
    assert_eq!(std::fs::read(&key).unwrap(), before);
    // Same group, existing key: a new sub id, the group id given.
    let group = snippet
        .split("group_id = \"")
        .nth(1)
        .and_then(|r| r.get(..32))
        .unwrap()
        .to_string();
    let o = keyway(
        &s.config,
        &[
            "keygen",
            "--door",
            "back",
            "--key",
            key.to_str().unwrap(),
            "--group-id",
            &group,
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let second = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(second.contains(&group), "{second}");
    assert_ne!(second, snippet);
}
