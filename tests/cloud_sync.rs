//! The cloud link against a real mosquitto (started by each test on 127.0.0.1 with a free
//! port, config in a tempdir): plain, password, TLS, mTLS; signed snapshot and delta applied to
//! the store; events delivered and forgotten only on the backend's ack, also across a broker
//! killed mid-upload; bad messages refused and reported with their reason.
//!
//! Needs `mosquitto`, `mosquitto_passwd` and `openssl` (scripts/setup installs them). A missing
//! one FAILS the test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use keyway::acl::Store;
use keyway::cloud::backend::{self, Backend, Target};
use keyway::cloud::config::{parse_broker, CloudSettings};
use keyway::cloud::link::Connector;
use keyway::cloud::msg::{self, TopicKind};
use keyway::cloud::sign::BackendSigner;
use keyway::events::{AccessEvent, Transport};
use serde_json::{json, Value};

mod support;
use support::cloud::*;
use support::mqtt::{make_certs, password_file, tls_broker};

/// Birth, snapshot, delta applied to the store; the same delta replayed is refused.
async fn sync_round(broker: &str, s: CloudSettings, backend_conn: Option<Connector>) {
    let mut b = backend(broker, backend_conn).await;
    let gw = Gateway::start(s);
    let birth = expect(&mut b, "state", |v| v["state"] == "online").await;
    assert_eq!(birth["bd_seq"], 1);
    expect(&mut b, "acl/request", |v| v["reason"] == "startup").await;
    snapshot(&mut b, 1, &[1, 2]).await;
    assert!(gw.grants(1) && gw.grants(2));
    let d = delta(&b, 1, 2, &[1]).await;
    expect(&mut b, "acl/applied", |v| {
        v["version"] == 2 && v["source"] == "delta"
    })
    .await;
    assert!(!gw.grants(1) && gw.grants(2));
    b.publish(&topics().topic(TopicKind::AclDelta), d, false)
        .await
        .unwrap();
    expect(&mut b, "rejected", |v| v["reason"] == "replayed").await;
    gw.stop().await;
    expect(&mut b, "state", |v| v["state"] == "offline").await;
}

/// A plain broker, the backend's client, and a gateway that has said it is online.
async fn online(gateway_extra: &str) -> (Mosquitto, String, Peer, Gateway) {
    let broker = Mosquitto::start("allow_anonymous true");
    let url = format!("mqtt://127.0.0.1:{}", broker.port);
    let mut b = backend(&url, None).await;
    let gw = Gateway::start(settings(&url, gateway_extra));
    expect(&mut b, "state", |v| v["state"] == "online").await;
    (broker, url, b, gw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_sync_events_and_rejections() {
    let (_broker, _url, mut b, gw) = online("outbox_batch = 10").await;
    snapshot(&mut b, 1, &[1, 2, 3]).await;

    // Every kind of bad message is refused and reported with its reason; nothing applies.
    let body = serde_json::to_vec(
        &json!({"type": "acl_delta", "v": 1, "site": SITE, "gateway": GW,
        "issued_at": now_s(), "expires_at": now_s() + 60, "base_version": 1, "version": 2,
        "revoke": [hex::encode(key(1))]}),
    )
    .unwrap();
    let other = BackendSigner::from_hex("backend-1", &format!("{:064x}", 99)).unwrap();
    let stranger = BackendSigner::from_hex("stranger", &format!("{:064x}", 99)).unwrap();
    let expired = backend::delta_message(
        &signer(),
        &Target {
            ttl_s: 1,
            ..target()
        },
        1,
        2,
        Vec::new(),
        Vec::new(),
        vec![hex::encode(key(1))],
        now_s() - 10,
    );
    let gap = backend::delta_message(
        &signer(),
        &target(),
        5,
        6,
        Vec::new(),
        Vec::new(),
        vec![hex::encode(key(1))],
        now_s(),
    );
    let wrong_gw = backend::delta_message(
        &signer(),
        &Target {
            gateway: "gw9".into(),
            ..target()
        },
        1,
        2,
        Vec::new(),
        Vec::new(),
        vec![hex::encode(key(1))],
        now_s(),
    );
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (body.clone(), "unsigned"),
        (other.sign(&body), "bad_signature"),
        (stranger.sign(&body), "unknown_key"),
        (expired, "expired"),
        (gap, "out_of_order"),
        (wrong_gw, "wrong_target"),
        (b"\x01\x02garbage".to_vec(), "malformed"),
        (vec![b' '; msg::MAX_MESSAGE_BYTES + 1], "oversized"),
    ];
    for (payload, reason) in cases {
        b.publish(&topics().topic(TopicKind::AclDelta), payload, false)
            .await
            .unwrap();
        let r = expect(&mut b, "rejected", |v| v["topic"] == "acl/delta").await;
        assert_eq!(r["reason"], reason, "{r}");
    }
    // The gap asked for a snapshot.
    expect(&mut b, "acl/request", |v| v["reason"] == "delta_gap").await;
    // A bad command: answered on cmd/status with the reason.
    let cmd = backend::command_message(
        &signer(),
        &target(),
        "r-1",
        "open_door",
        Default::default(),
        now_s(),
    );
    b.publish(&topics().topic(TopicKind::Command), cmd, false)
        .await
        .unwrap();
    let st = expect(&mut b, "cmd/status", |v| v["request_id"] == "r-1").await;
    assert_eq!(
        (st["status"].as_str(), st["reason"].as_str()),
        (Some("rejected"), Some("unknown_command"))
    );
    // A bad chunk.
    b.publish(&topics().topic(TopicKind::AclChunk), b"{}".to_vec(), false)
        .await
        .unwrap();
    expect(&mut b, "rejected", |v| {
        v["topic"] == "acl/chunk" && v["reason"] == "malformed"
    })
    .await;
    assert!(gw.grants(1));
    assert_eq!(gw.store().stats().unwrap().credentials, 3);

    // Events: sent in order, kept until the application ack.
    gw.record(25);
    let mut seqs = Vec::new();
    let mut instance = String::new();
    while seqs.len() < 25 {
        let batch = expect(&mut b, "events", |_| true).await;
        instance = batch["instance"].as_str().unwrap().to_owned();
        for e in batch["events"].as_array().unwrap() {
            assert_eq!(e["uid"].as_str().map(str::len), Some(32), "{e}");
            seqs.push(e["seq"].as_i64().unwrap());
        }
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    // Not acked yet: still in the outbox.
    assert_eq!(gw.store().stats().unwrap().events_undelivered, 25);
    b.ack_events(&topics(), &instance, seqs[9]).await.unwrap();
    wait_for(|| gw.store().stats().unwrap().events_undelivered == 15).await;
    b.ack_events(&topics(), &instance, *seqs.last().unwrap())
        .await
        .unwrap();
    wait_for(|| gw.store().stats().unwrap().events_undelivered == 0).await;

    // Heartbeat with the applied version and an empty outbox.
    let hb = expect(&mut b, "heartbeat", |v| v["outbox"]["depth"] == 0).await;
    assert_eq!(hb["acl"]["version"], 1);
    assert_eq!(hb["rejected"].as_u64().map(|n| n >= 10), Some(true));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_auth() {
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("passwd");
    password_file(&users, &[("gw1", "s3cret-pw"), ("backend", "backend-pw")]);
    let broker = Mosquitto::start(&format!(
        "allow_anonymous false\npassword_file {}",
        users.display()
    ));
    let url = format!("mqtt://127.0.0.1:{}", broker.port);
    let gw_pw = dir.path().join("gw-password");
    write_private(&gw_pw, "s3cret-pw\n");
    let backend_conn = Connector {
        client_id: "backend-pw".into(),
        tls: None,
        credentials: Some((
            "backend".into(),
            zeroize::Zeroizing::new("backend-pw".into()),
        )),
    };
    // Anonymous is refused (the test's broker really checks).
    let anon = Backend::connect(
        &Connector {
            client_id: "anon".into(),
            tls: None,
            credentials: None,
        },
        &parse_broker(&url).unwrap(),
        STEP,
    )
    .await;
    assert!(anon.is_err());
    sync_round(
        &url,
        settings(
            &url,
            &format!(
                "username = \"gw1\"\npassword_file = {:?}",
                gw_pw.display().to_string()
            ),
        ),
        Some(backend_conn),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_server_verified() {
    let broker = tls_broker(false);
    let url = format!("mqtts://127.0.0.1:{}", broker.port);
    let ca = broker.path("ca.pem");
    let backend_conn = Connector {
        client_id: "backend-tls".into(),
        tls: Some(keyway::cloud::link::tls_config(&ca, None).unwrap()),
        credentials: None,
    };
    sync_round(
        &url,
        settings(&url, &format!("ca_file = {:?}", ca.display().to_string())),
        Some(backend_conn),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_refuses_an_unknown_server() {
    let broker = tls_broker(false);
    let url = format!("mqtts://127.0.0.1:{}", broker.port);
    // Another CA: the server must not verify.
    let other = tempfile::tempdir().unwrap();
    make_certs(other.path());
    let c = Connector {
        client_id: "x".into(),
        tls: Some(keyway::cloud::link::tls_config(&other.path().join("ca.pem"), None).unwrap()),
        credentials: None,
    };
    assert!(Backend::connect(&c, &parse_broker(&url).unwrap(), STEP)
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_client_certificate() {
    let broker = tls_broker(true);
    let url = format!("mqtts://127.0.0.1:{}", broker.port);
    let (ca, cert, key) = (
        broker.path("ca.pem"),
        broker.path("client.pem"),
        broker.path("client.key"),
    );
    // Without a client certificate the broker refuses.
    let no_cert = Connector {
        client_id: "nocert".into(),
        tls: Some(keyway::cloud::link::tls_config(&ca, None).unwrap()),
        credentials: None,
    };
    assert!(
        Backend::connect(&no_cert, &parse_broker(&url).unwrap(), STEP)
            .await
            .is_err()
    );
    let backend_conn = Connector {
        client_id: "backend-mtls".into(),
        tls: Some(keyway::cloud::link::tls_config(&ca, Some((&cert, &key))).unwrap()),
        credentials: None,
    };
    let extra = format!(
        "ca_file = {:?}\nclient_cert_file = {:?}\nclient_key_file = {:?}",
        ca.display().to_string(),
        cert.display().to_string(),
        key.display().to_string()
    );
    sync_round(&url, settings(&url, &extra), Some(backend_conn)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_killed_mid_upload_loses_nothing() {
    let (mut broker, url, mut b, gw) = online("outbox_batch = 20").await;
    const N: usize = 400;
    let (instance, mut got) = mid_upload(&mut b, &gw, N).await;
    broker.kill();
    drop(b);
    tokio::time::sleep(Duration::from_millis(300)).await;
    broker.restart();
    let mut b = backend(&url, None).await;
    // The gateway reconnects (backoff), replays what was not acked, and we ack as we go.
    let (replay_seen, dups, _) = ack_until(&mut b, &instance, &mut got, N).await;
    assert!(replay_seen, "resent batches are flagged replay");
    wait_for(|| gw.store().stats().unwrap().events_undelivered == 0).await;
    eprintln!("{N} events, {dups} duplicates (same uid, same content)");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_tool_binary_publishes_a_delta_and_runs_a_command() {
    let (_broker, url, mut b, gw) = online("").await;
    snapshot(&mut b, 1, &[1, 2]).await;
    let dir = tempfile::tempdir().unwrap();
    let keyfile = dir.path().join("backend.key");
    write_private(&keyfile, &format!("{:064x}\n", 0x1234_5678u64));
    let exe = env!("CARGO_BIN_EXE_keyway");
    let common = |cmd: &mut Command| {
        cmd.args([
            "--broker",
            &url,
            "--site",
            SITE,
            "--gateway",
            GW,
            "--kid",
            "backend-1",
            "--key",
        ])
        .arg(&keyfile);
    };
    let mut c = Command::new(exe);
    c.args([
        "cloud",
        "publish-delta",
        "--base",
        "1",
        "--acl-version",
        "2",
        "--revoke",
        &hex::encode(key(2)),
    ]);
    common(&mut c);
    let out = tokio::task::spawn_blocking(move || c.output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!gw.grants(2) && gw.grants(1));
    let mut c = Command::new(exe);
    c.args(["cloud", "command", "report_diagnostics", "--wait"]);
    common(&mut c);
    let out = tokio::task::spawn_blocking(move || c.output())
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("\"done\""), "{stdout}");
    // keygen writes a private key and prints the public one.
    let k2 = dir.path().join("new.key");
    let out = Command::new(exe)
        .args(["cloud", "keygen", "--out"])
        .arg(&k2)
        .output()
        .unwrap();
    assert!(out.status.success());
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&k2).unwrap().mode() & 0o777, 0o600);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim().len(), 130);
    gw.stop().await;
}

fn grants_in(db: &Path, seed: u16) -> bool {
    Store::open(db)
        .unwrap()
        .decide(&key(seed), "front", time::OffsetDateTime::now_utc())
        .unwrap()
        .is_grant()
}

/// `keyway run` with `[cloud]` starts the link: birth on connect, a signed delta applied to the
/// daemon's database, and a clean `offline` state on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyway_run_starts_the_link_from_config() {
    let broker = Mosquitto::start("allow_anonymous true");
    let url = format!("mqtt://127.0.0.1:{}", broker.port);
    let mut b = backend(&url, None).await;
    let dir = tempfile::tempdir().unwrap();
    let config = run_config(dir.path(), &url, GW, "");
    let out = Command::new(env!("CARGO_BIN_EXE_keyway"))
        .arg("--config")
        .arg(&config)
        .arg("check-config")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("cloud: s1/gw1 on 1 broker"));
    let log_path = dir.path().join("run.log");
    let mut child = run_daemon(&config, &log_path);
    expect(&mut b, "state", |v| v["state"] == "online").await;
    snapshot(&mut b, 1, &[1, 2]).await;
    let db = dir.path().join("keyway.db");
    assert!(grants_in(&db, 1));
    delta(&b, 1, 2, &[1]).await;
    expect(&mut b, "acl/applied", |v| v["version"] == 2).await;
    assert!(!grants_in(&db, 1) && grants_in(&db, 2));
    // SAFETY: signals our own child, which has not been reaped yet.
    assert_eq!(
        unsafe { libc::kill(child.0.id() as libc::pid_t, libc::SIGTERM) },
        0
    );
    expect(&mut b, "state", |v| v["state"] == "offline").await;
    let status = tokio::task::spawn_blocking(move || child.0.wait())
        .await
        .unwrap()
        .unwrap();
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(status.success(), "{log}");
    assert!(
        !log.contains("did not stop") && !log.contains("panicked"),
        "{log}"
    );
}

/// keyway SIGKILLed in the middle of a snapshot: the old ACL is intact and serving, the Will
/// says offline, and after a restart (boot + 1) the next snapshot completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_snapshot_keeps_the_old_acl_and_the_next_sync_completes() {
    let broker = Mosquitto::start("allow_anonymous true");
    let url = format!("mqtt://127.0.0.1:{}", broker.port);
    let mut b = backend(&url, None).await;
    let dir = tempfile::tempdir().unwrap();
    let config = run_config(dir.path(), &url, GW, "");
    let db = dir.path().join("keyway.db");
    let log_path = dir.path().join("run.log");
    let daemon = run_daemon(&config, &log_path);
    let birth = expect(&mut b, "state", |v| v["state"] == "online").await;
    snapshot(&mut b, 1, &[1, 2]).await;

    let seeds: Vec<u16> = (3..60).collect();
    let creds: Vec<Value> = seeds.iter().map(|s| cred(*s)).collect();
    let content = serde_json::to_vec(&json!({"version": 1, "credentials": creds})).unwrap();
    let (m, chunks) = snapshot_of(2, &content);
    assert!(chunks.len() > 10);
    b.publish(&topics().topic(TopicKind::AclSnapshot), m, false)
        .await
        .unwrap();
    for c in &chunks[..chunks.len() / 2] {
        b.publish(&topics().topic(TopicKind::AclChunk), c.clone(), false)
            .await
            .unwrap();
    }
    drop(daemon); // SIGKILL
    expect(&mut b, "state", |v| {
        v["state"] == "offline" && v["bd_seq"] == birth["bd_seq"]
    })
    .await;
    assert!(grants_in(&db, 1) && grants_in(&db, 2) && !grants_in(&db, 3));

    let _daemon = run_daemon(&config, &log_path);
    let rebirth = expect(&mut b, "state", |v| v["state"] == "online").await;
    assert_eq!(
        rebirth["boot"].as_u64(),
        birth["boot"].as_u64().map(|n| n + 1)
    );
    assert_eq!(rebirth["acl_version"], 1);
    let (m, chunks) = snapshot_of(2, &content);
    b.publish_snapshot(&topics(), m, chunks).await.unwrap();
    expect(&mut b, "acl/applied", |v| v["version"] == 2).await;
    assert!(!grants_in(&db, 1) && grants_in(&db, 3) && grants_in(&db, 59));
}

/// A grant of credential `cred` whose card went to the panel under `attempt`.
fn grant_event(cred: i64) -> AccessEvent {
    AccessEvent {
        credential_id: Some(cred),
        person_id: Some(format!("p{cred}")),
        decision: keyway::events::EventDecision::Granted,
        reason: "granted".into(),
        ..AccessEvent::error(1_800_000_000_000, "d1", Transport::Nfc, None, "x", 1)
    }
}

/// Through a real broker: a verdict that comes after its event went up never changes the
/// event (a replay would differ from what the backend stored): it follows as a note naming
/// the event's uid, with the credential's first use, once the event is acked; notes are kept
/// until their own ack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_verdict_and_first_use_go_up_as_notes_after_their_event() {
    let (_broker, _url, mut b, gw) = online("").await;
    gw.store()
        .record_attempt(&grant_event(5), Some(41))
        .unwrap();
    let batch = expect(&mut b, "events", |_| true).await;
    let event = batch["events"][0].clone();
    assert!(event.get("panel_verdict").is_none(), "{event}");
    let instance = batch["instance"].as_str().unwrap().to_owned();
    // The panel answers late.
    gw.store().set_panel_verdict(41, "denied").unwrap();
    b.ack_events(&topics(), &instance, event["seq"].as_i64().unwrap())
        .await
        .unwrap();
    let notes = expect(&mut b, "notes", |_| true).await;
    let list = notes["notes"].as_array().unwrap();
    let kinds: Vec<&str> = list.iter().map(|n| n["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["first_use", "panel_verdict"], "{notes}");
    assert!(list.iter().all(|n| n["event_uid"] == event["uid"]));
    assert_eq!(list[1]["panel_verdict"], "denied");
    assert_eq!(list[0]["credential_id"], 5);
    // Not forgotten before the backend's own ack.
    assert_eq!(gw.store().notes_undelivered().unwrap(), 2);
    let last = list[1]["seq"].as_i64().unwrap();
    b.ack_notes(&topics(), &instance, last).await.unwrap();
    wait_for(|| gw.store().notes_undelivered().unwrap() == 0).await;
    // A second grant of the same credential is no first use.
    gw.store().record_event(&grant_event(5)).unwrap();
    let batch = expect(&mut b, "events", |_| true).await;
    b.ack_events(
        &topics(),
        &instance,
        batch["events"][0]["seq"].as_i64().unwrap(),
    )
    .await
    .unwrap();
    wait_for(|| gw.store().stats().unwrap().events_undelivered == 0).await;
    assert_eq!(gw.store().notes_undelivered().unwrap(), 0);
    gw.stop().await;
}

/// `keyway run`: the heartbeat carries each door's state (no reader here, OSDP not
/// polled), its offline policy and the disk; `keyway status` shows the link connected to
/// the broker with its outbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyway_run_heartbeat_has_the_doors_and_status_shows_the_link() {
    let broker = Mosquitto::start("allow_anonymous true");
    let url = format!("mqtt://127.0.0.1:{}", broker.port);
    let mut b = backend(&url, None).await;
    let dir = tempfile::tempdir().unwrap();
    let config = run_config(dir.path(), &url, GW, "");
    let sock = dir.path().join("status.sock");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(
            "database = \"keyway.db\"",
            &format!(
                "database = \"keyway.db\"\nstatus_socket = {:?}",
                sock.display().to_string()
            ),
        )
        .replace(
            "aliro = {",
            "cloud_offline = { limit_s = 3600, fail_secure = true }\naliro = {",
        )
        .replace("gateway = \"gw1\"", "gateway = \"gw1\"\nheartbeat_s = 5");
    std::fs::write(&config, text).unwrap();
    let log_path = dir.path().join("run.log");
    let _child = run_daemon(&config, &log_path);
    expect(&mut b, "state", |v| v["state"] == "online").await;
    let hb = expect(&mut b, "heartbeat", |v| v["doors"][0]["id"] == "front").await;
    let door = &hb["doors"][0];
    // No reader here: missing, or pcscd down when no pcscd runs.
    assert!(
        door["reader"] == "missing" || door["reader"] == "pcscd_down",
        "{hb}"
    );
    assert_ne!(door["osdp"], "online", "{hb}");
    assert_eq!(door["offline_policy"]["limit_s"], 3600, "{hb}");
    assert_eq!(door["offline_policy"]["fail_secure"], true, "{hb}");
    assert!(hb["disk"]["free_bytes"].as_u64().unwrap() > 0, "{hb}");
    assert_eq!(hb["outbox"]["dropped"], 0, "{hb}");

    let status = || {
        let out = Command::new(env!("CARGO_BIN_EXE_keyway"))
            .arg("--config")
            .arg(&config)
            .args(["status", "--json"])
            .output()
            .unwrap();
        serde_json::from_slice::<Value>(&out.stdout).unwrap_or(Value::Null)
    };
    let deadline = Instant::now() + STEP;
    let mut s = status();
    while s["cloud"]["state"] != "connected" && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        s = status();
    }
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert_eq!(s["cloud"]["state"], "connected", "{s}\n{log}");
    assert!(
        s["cloud"]["broker"]
            .as_str()
            .unwrap()
            .contains(&broker.port.to_string()),
        "{s}"
    );
    assert_eq!(s["cloud"]["outbox_depth"], 0, "{s}");
    assert_eq!(s["doors"][0]["cloud_offline"]["exceeded"], false, "{s}");
    assert!(log.contains("cached grants valid for 3600 s"), "{log}");
}

/// Through a real broker: snapshot chunks published out of order (pairs swapped) are held
/// and applied in order; a snapshot whose content was changed on the way is refused at the
/// end (`hash_mismatch`), its staged apply dropped, the old ACL serving, and a new snapshot
/// asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_chunks_apply_and_a_bad_hash_keeps_the_old_acl() {
    let (_broker, _url, mut b, gw) = online("").await;
    let creds: Vec<Value> = (1..=40).map(cred).collect();
    let content = serde_json::to_vec(&json!({"version": 1, "credentials": creds})).unwrap();
    let (m, mut chunks) = snapshot_of(1, &content);
    assert!(chunks.len() > 8);
    for pair in chunks.chunks_mut(2) {
        pair.reverse();
    }
    b.publish_snapshot(&topics(), m, chunks).await.unwrap();
    expect(&mut b, "acl/applied", |v| v["version"] == 1).await;
    assert!(gw.grants(40));

    let other: Vec<Value> = (41..=80).map(cred).collect();
    let content = serde_json::to_vec(&json!({"version": 1, "credentials": other})).unwrap();
    let (m, mut chunks) = snapshot_of(2, &content);
    // One byte of the last chunk's data changed (still valid base64 of the same length).
    let last = chunks.last_mut().unwrap();
    let mut c: Value = serde_json::from_slice(last).unwrap();
    let data = c["data"].as_str().unwrap().to_owned();
    let flipped = if data.starts_with('A') { "B" } else { "A" };
    c["data"] = Value::from(format!("{flipped}{}", &data[1..]));
    *last = serde_json::to_vec(&c).unwrap();
    b.publish_snapshot(&topics(), m, chunks).await.unwrap();
    expect(&mut b, "rejected", |v| {
        v["topic"] == "acl/chunk" && v["reason"] == "hash_mismatch"
    })
    .await;
    expect(&mut b, "acl/request", |v| v["reason"] == "snapshot_failed").await;
    assert!(gw.grants(40) && !gw.grants(41));
    assert_eq!(gw.store().applied().unwrap().version, Some(1));
    gw.stop().await;
}

/// End to end through the real door: pcscd + vpcd + the phone emulator, libosdp's panel on a
/// pty, `keyway run` with the cloud link on mosquitto. An enrolled phone is granted (its card
/// reaches the panel); a signed delta revoking it is published with the backend tool; the
/// next tap of that phone is denied (revoked) while another phone is still granted. Prints
/// publish → applied (keyway's `acl/applied` report) and → first denial; the numbers over
/// many runs are in docs/benchmarks.md (`cargo bench --bench cloud_fleet -- revocation`).
/// Starts pcscd: run under `flock /tmp/keyway-pcscd.lock`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_phone_is_denied_at_the_real_door() {
    let broker = Mosquitto::start("allow_anonymous true");
    let url = format!("mqtt://127.0.0.1:{}", broker.port);
    let mut b = backend(&url, None).await;
    let u = url.clone();
    let mut door = tokio::task::spawn_blocking(move || CloudDoor::start(&u))
        .await
        .unwrap();
    expect(&mut b, "state", |v| v["state"] == "online").await;
    let phone = p256::SecretKey::random(&mut rand_core::OsRng);
    let other = p256::SecretKey::random(&mut rand_core::OsRng);
    let content = serde_json::to_vec(&json!({"version": 1, "credentials": [
        cred_for(&phone, "p-phone", 1001), cred_for(&other, "p-other", 1002)]}))
    .unwrap();
    let (m, chunks) = snapshot_of(1, &content);
    b.publish_snapshot(&topics(), m, chunks).await.unwrap();
    expect(&mut b, "acl/applied", |v| v["version"] == 1).await;

    assert_eq!(
        door.tap(&phone).await,
        Some(0x0101),
        "{:?}",
        door.last_decision()
    );
    assert_eq!(
        door.last_decision(),
        Some(("granted".into(), "granted".into()))
    );
    let card = door.cp.wait_for("the card", |v| v["event"] == "card");
    assert_eq!(card["bits"], 26);
    door.reader_free().await;

    let revoke = backend::delta_message(
        &signer(),
        &target(),
        1,
        2,
        Vec::new(),
        Vec::new(),
        vec![hex::encode(phone.public_key().to_sec1_bytes())],
        now_s(),
    );
    let t0 = Instant::now();
    b.publish(&topics().topic(TopicKind::AclDelta), revoke, false)
        .await
        .unwrap();
    let applied = expect(&mut b, "acl/applied", |v| v["version"] == 2).await;
    let to_applied = t0.elapsed();
    assert_eq!(applied["source"], "delta");
    let status = door.tap(&phone).await;
    let to_denial = t0.elapsed();
    assert_ne!(status, Some(0x0101), "a revoked phone must not open");
    assert_eq!(
        door.last_decision(),
        Some(("denied".into(), "revoked".into()))
    );
    door.reader_free().await;
    assert_eq!(door.tap(&other).await, Some(0x0101));
    eprintln!(
        "revocation: publish → applied {:.1} ms, → first denial (a tap begun after the applied report) {:.1} ms",
        to_applied.as_secs_f64() * 1e3,
        to_denial.as_secs_f64() * 1e3
    );
    drop(door);
}

/// A snapshot of more chunks than the backend client's inbox holds (1,024), through a
/// broker that queues them all for the gateway (`max_queued_messages 10000`): the backend
/// tool publishes every chunk and the gateway applies the snapshot, within a bounded time.
/// Small chunks: the count matters, not the size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_of_many_chunks_is_published_and_applied() {
    let broker = Mosquitto::start("allow_anonymous true\nmax_queued_messages 10000");
    let url = format!("mqtt://127.0.0.1:{}", broker.port);
    let mut b = backend(&url, None).await;
    let gw = Gateway::start(settings(&url, ""));
    expect(&mut b, "state", |v| v["state"] == "online").await;
    let creds: Vec<Value> = (1..=1700).map(cred).collect();
    let content = serde_json::to_vec(&json!({"version": 1, "credentials": creds})).unwrap();
    let (m, chunks) = snapshot_of(1, &content);
    assert!(chunks.len() > 1_500, "{} chunks", chunks.len());
    tokio::time::timeout(
        Duration::from_secs(60),
        b.publish_snapshot(&topics(), m, chunks),
    )
    .await
    .expect("all chunks published within 60 s")
    .unwrap();
    expect(&mut b, "acl/applied", |v| v["version"] == 1).await;
    assert!(gw.grants(1) && gw.grants(1700));
    // Every chunk was acked: the broker's window is free and the next update goes through.
    delta(&b, 1, 2, &[1]).await;
    expect(&mut b, "acl/applied", |v| v["version"] == 2).await;
    assert!(!gw.grants(1) && gw.grants(2));
    gw.stop().await;
}
