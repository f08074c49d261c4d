//! The cloud link's numbers with real peers (docs/benchmarks.md, "Cloud link"): a bench
//! binary, not a timed test. Each scenario starts its own mosquitto on loopback.
//!
//! ```text
//! cargo bench --bench cloud_fleet -- revocation [ROUNDS]  # real door: pcscd + vpcd + libosdp panel
//!                                                         # (run under flock /tmp/keyway-pcscd.lock)
//! cargo bench --bench cloud_fleet -- fleet [N]            # N `keyway run` processes, readers absent
//! cargo bench --bench cloud_fleet -- snapshot [N]         # N credentials, publish → applied
//! cargo bench --bench cloud_fleet -- outbox [N]           # N events queued offline, then drained
//! ```
//!
//! Without a scenario (as `cargo test --all-targets` runs it) it prints this and exits.
// Test code: a failed unwrap is a failed bench.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use keyway::cloud::backend::{self, Backend, Target};
use keyway::cloud::config::parse_broker;
use keyway::cloud::link::Connector;
use keyway::cloud::msg::{SnapshotFormat, TopicKind, Topics};
use serde_json::{json, Value};
use support::cloud::*;

#[path = "../tests/support/mod.rs"]
mod support;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let n = |default: usize| args.get(1).and_then(|v| v.parse().ok()).unwrap_or(default);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    match args.first().map(String::as_str) {
        Some("revocation") => rt.block_on(revocation(n(20))),
        Some("fleet") => rt.block_on(fleet(n(50))),
        Some("snapshot") => rt.block_on(snapshot(n(1_000_000))),
        Some("outbox") => rt.block_on(outbox(n(1_000_000))),
        _ => eprintln!(
            "cloud_fleet: give a scenario: revocation [rounds] | fleet [n] | snapshot [n] | outbox [n]"
        ),
    }
}

/// "p50 … p99 … max …" of `v` (sorted here), in ms.
fn summary(v: &mut [Duration]) -> String {
    v.sort();
    let at = |p: f64| v[((v.len() as f64 * p) as usize).min(v.len() - 1)];
    format!(
        "n {} p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        v.len(),
        at(0.5).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
        v[v.len() - 1].as_secs_f64() * 1e3
    )
}

fn target_all() -> Target {
    Target {
        gateway: "*".into(),
        ..target()
    }
}

fn plain_broker(extra: &str) -> (Mosquitto, String) {
    let m = Mosquitto::start(&format!("allow_anonymous true\n{extra}"));
    let url = format!("mqtt://127.0.0.1:{}", m.port);
    (m, url)
}

async fn listener(url: &str, filters: &[&str]) -> Peer {
    let b = Backend::connect(
        &Connector {
            client_id: format!("bench-{}", free_port()),
            tls: None,
            credentials: None,
        },
        &parse_broker(url).unwrap(),
        STEP,
    )
    .await
    .unwrap();
    for f in filters {
        b.subscribe(f).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    Peer {
        b,
        backlog: Default::default(),
    }
}

// ---------------------------------------------------------------------------------------------
// Revocation at a real door.

/// Rounds of: a delta revoking the enrolled phone is published while the phone is already on
/// its way to the reader (its tap starts at the publish); publish → `acl/applied` and
/// publish → the phone told "denied"; then a delta enabling it again and a granted tap (so the
/// rate limiter never sees denials in a row).
async fn revocation(rounds: usize) {
    let (_broker, url) = plain_broker("");
    let mut b = listener(&url, &[&topics().topic(TopicKind::AclApplied)]).await;
    let u = url.clone();
    let door = tokio::task::spawn_blocking(move || CloudDoor::start(&u))
        .await
        .unwrap();
    let phone = p256::SecretKey::random(&mut rand_core::OsRng);
    let phone_hex = hex::encode(phone.public_key().to_sec1_bytes());
    let cred = cred_for(&phone, "p-phone", 1001);
    let content =
        serde_json::to_vec(&json!({"version": 1, "credentials": [cred.clone()]})).unwrap();
    let (m, chunks) = snapshot_of(1, &content);
    b.publish_snapshot(&topics(), m, chunks).await.unwrap();
    expect(&mut b, "acl/applied", |v| v["version"] == 1).await;
    assert_eq!(door.tap(&phone).await, Some(0x0101));
    let (mut applied, mut denied) = (Vec::new(), Vec::new());
    let mut version = 1u64;
    for _ in 0..rounds {
        door.reader_free().await;
        let revoke = backend::delta_message(
            &signer(),
            &target(),
            version,
            version + 1,
            Vec::new(),
            Vec::new(),
            vec![phone_hex.clone()],
            now_s(),
        );
        version += 1;
        let t0 = Instant::now();
        let publish_and_report = async {
            b.b.publish(&topics().topic(TopicKind::AclDelta), revoke, false)
                .await
                .unwrap();
            let v = version;
            expect(&mut b, "acl/applied", |m| m["version"] == v).await;
            t0.elapsed()
        };
        let tap = async {
            // A tap that started before the apply may still be granted: tap again.
            loop {
                if door.tap(&phone).await != Some(0x0101) {
                    return t0.elapsed();
                }
                door.reader_free().await;
            }
        };
        let (a, d) = tokio::join!(publish_and_report, tap);
        assert_eq!(
            door.last_decision(),
            Some(("denied".into(), "revoked".into()))
        );
        eprintln!(
            "round {}: applied {:.1} ms, denied {:.1} ms",
            applied.len() + 1,
            a.as_secs_f64() * 1e3,
            d.as_secs_f64() * 1e3
        );
        applied.push(a);
        denied.push(d);
        let enable = backend::delta_message(
            &signer(),
            &target(),
            version,
            version + 1,
            vec![cred.clone()],
            Vec::new(),
            Vec::new(),
            now_s(),
        );
        version += 1;
        b.b.publish(&topics().topic(TopicKind::AclDelta), enable, false)
            .await
            .unwrap();
        let v = version;
        expect(&mut b, "acl/applied", |m| m["version"] == v).await;
        door.reader_free().await;
        assert_eq!(door.tap(&phone).await, Some(0x0101));
    }
    println!(
        "revocation, publish → acl/applied: {}",
        summary(&mut applied)
    );
    println!(
        "revocation, publish → phone told denied (tap begun at the publish): {}",
        summary(&mut denied)
    );
}

// ---------------------------------------------------------------------------------------------
// A fleet on one broker.

/// `n` `keyway run` processes (one door each, reader and panel absent) on one mosquitto: the
/// time until all have applied a delta, and the reconnect storm after a broker restart.
async fn fleet(n: usize) {
    let (mut broker, url) = plain_broker("max_connections -1");
    let mut b = listener(&url, &["keyway/s1/+/state", "keyway/s1/+/acl/applied"]).await;
    let dir = tempfile::tempdir().unwrap();
    let t_start = Instant::now();
    let mut daemons = Vec::new();
    for i in 0..n {
        let d = dir.path().join(format!("g{i}"));
        std::fs::create_dir_all(&d).unwrap();
        let config = run_config(&d, &url, &format!("g{i}"), "");
        daemons.push(run_daemon(&config, &d.join("keyway.log")));
    }
    let online = collect(&mut b, n, "state", |v| v["state"] == "online").await;
    println!(
        "fleet n={n}: all online {:.1} s after the first start",
        t_start.elapsed().as_secs_f64()
    );
    drop(online);
    // Version 1 everywhere (one credential), then the measured delta.
    let content = serde_json::to_vec(&json!({"version": 1, "credentials": [cred(1)]})).unwrap();
    let (m, chunks) = backend::snapshot_messages(
        &signer(),
        &target_all(),
        1,
        SnapshotFormat::Json,
        &content,
        48 * 1024,
        now_s(),
    )
    .unwrap();
    for i in 0..n {
        let t = gw_topics(i);
        b.b.publish_snapshot(&t, m.clone(), chunks.clone())
            .await
            .unwrap();
    }
    collect(&mut b, n, "acl/applied", |v| v["version"] == 1).await;
    let acked = delta_to_all(&mut b, n, 1, 2).await;
    let mut lat: Vec<Duration> = acked.into_values().collect();
    println!(
        "fleet n={n}: delta publish → acl/applied from all: {}",
        summary(&mut lat)
    );

    // The reconnect storm: the broker restarts; every gateway backs off (jittered) and comes
    // back with a new birth. Settled = every gateway online again and applying a delta.
    broker.kill();
    let t_down = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    // From the restart command: gateways may connect before `restart` sees the port open.
    let t_up = Instant::now();
    let up_ms = keyway::events::unix_ms(time::OffsetDateTime::now_utc());
    broker.restart();
    let births = collect(&mut b, n, "state", |v| {
        v["state"] == "online" && v["bd_seq"].as_u64() >= Some(2)
    })
    .await;
    // The births' own time: the listener may get some only as retained messages after it has
    // reconnected itself.
    let mut back: Vec<Duration> = births
        .into_values()
        .map(|(_, v)| {
            Duration::from_millis(
                v["ts_ms"]
                    .as_i64()
                    .unwrap_or(up_ms)
                    .saturating_sub(up_ms)
                    .max(0) as u64,
            )
        })
        .collect();
    println!(
        "fleet n={n}: after a broker restart (down {:.1} s), births: {}",
        (t_up - t_down).as_secs_f64(),
        summary(&mut back)
    );
    let acked = delta_to_all(&mut b, n, 2, 3).await;
    println!(
        "fleet n={n}: storm settled (all back and a delta applied by all) {:.1} s after the restart",
        t_up.elapsed().as_secs_f64()
    );
    let mut lat: Vec<Duration> = acked.into_values().collect();
    println!(
        "fleet n={n}: delta after the storm, publish → acl/applied from all: {}",
        summary(&mut lat)
    );
    drop(daemons);
}

fn gw_topics(i: usize) -> Topics {
    Topics::new("keyway", SITE, &format!("g{i}")).unwrap()
}

/// Publishes one signed delta (for every gateway) to each gateway's topic; when each one's
/// `acl/applied` arrived, from the first publish.
async fn delta_to_all(
    b: &mut Peer,
    n: usize,
    base: u64,
    version: u64,
) -> HashMap<String, Duration> {
    let d = backend::delta_message(
        &signer(),
        &target_all(),
        base,
        version,
        Vec::new(),
        vec![hex::encode(key(1))],
        Vec::new(),
        now_s(),
    );
    let t0 = Instant::now();
    for i in 0..n {
        b.b.publish(&gw_topics(i).topic(TopicKind::AclDelta), d.clone(), false)
            .await
            .unwrap();
    }
    collect(b, n, "acl/applied", |v| v["version"] == version)
        .await
        .into_iter()
        .map(|(g, (t, _))| (g, t - t0))
        .collect()
}

/// The first message on `keyway/s1/<gw>/<suffix>` matching `pred` from each of `n` gateways,
/// with when it arrived; fails after 120 s naming who is missing.
async fn collect(
    b: &mut Peer,
    n: usize,
    suffix: &str,
    pred: impl Fn(&Value) -> bool,
) -> HashMap<String, (Instant, Value)> {
    let mut seen = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while seen.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some((t, payload)) = b.b.recv(left).await else {
            let missing: Vec<String> = (0..n)
                .map(|i| format!("g{i}"))
                .filter(|g| !seen.contains_key(g))
                .collect();
            panic!("{suffix}: {} of {n}; missing {missing:?}", seen.len());
        };
        let parts: Vec<&str> = t.splitn(4, '/').collect();
        if parts.len() < 4 || parts[3] != suffix {
            continue;
        }
        let v: Value = serde_json::from_slice(&payload).unwrap_or(Value::Null);
        if pred(&v) {
            seen.entry(parts[2].to_owned())
                .or_insert_with(|| (Instant::now(), v));
        }
    }
    seen
}

// ---------------------------------------------------------------------------------------------
// A big snapshot.

/// `n` credentials (the CSV the ACL bench writes, cached in target/) as one snapshot of 48 KiB
/// chunks (the backend tool's default), to a gateway running the link in this process.
async fn snapshot(n: usize) {
    // The backend publishes faster than the gateway applies: the broker queues the chunks for
    // it, and mosquitto's default (1000 queued messages per client) drops the rest (docs/
    // benchmarks.md). A queue as deep as the snapshot has chunks, as a deployment needs.
    let (_broker, url) = plain_broker("max_queued_messages 10000");
    let target_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    let csv = keyway_sim::acl::cached_csv(&target_dir, n as u64).unwrap();
    let content = std::fs::read(&csv).unwrap();
    let mut b = listener(
        &url,
        &[
            &topics().topic(TopicKind::AclApplied),
            &topics().topic(TopicKind::State),
            &topics().topic(TopicKind::Rejected),
            &topics().topic(TopicKind::AclRequest),
        ],
    )
    .await;
    let gw = Gateway::start(settings(&url, ""));
    // Subscribed once it says it is online (its birth follows the SUBSCRIBE).
    expect(&mut b, "state", |v| v["state"] == "online").await;
    const CHUNK: u32 = 48 * 1024;
    let (m, chunks) = backend::snapshot_messages(
        &signer(),
        &target(),
        1,
        SnapshotFormat::Csv,
        &content,
        CHUNK,
        now_s(),
    )
    .unwrap();
    let count = chunks.len();
    let t0 = Instant::now();
    b.b.publish_snapshot(&topics(), m, chunks).await.unwrap();
    let published = t0.elapsed();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let (_, p) = b.b.recv(left).await.expect("acl/applied in 10 min");
        let v: Value = serde_json::from_slice(&p).unwrap_or(Value::Null);
        if v["version"] == 1 {
            break;
        }
        assert!(
            v["type"] != "rejected" && v["reason"] != "snapshot_failed",
            "the snapshot failed: {v}"
        );
    }
    let total = t0.elapsed();
    let granted = gw
        .store()
        .decide(&first_key(), "front", time::OffsetDateTime::now_utc())
        .unwrap()
        .is_grant();
    assert!(granted, "the snapshot's first credential opens the door");
    println!(
        "snapshot n={n}: {} bytes CSV in {count} chunks of {CHUNK} bytes: publish → applied {:.1} s (all chunks published after {:.1} s)",
        content.len(),
        total.as_secs_f64(),
        published.as_secs_f64()
    );
    gw.stop().await;
}

fn first_key() -> [u8; 65] {
    let mut k = [0u8; 65];
    keyway_sim::acl::for_each_key(1, 1, |_, key| k = key);
    k
}

// ---------------------------------------------------------------------------------------------
// The outbox after an outage.

/// `n` events recorded while offline (one transaction, as if a week at a busy door), then
/// `keyway run` connects and the backend acks every batch: the drain rate, and the door's
/// decision latency (the daemon's read path, from another process) idle vs during the drain.
async fn outbox(n: usize) {
    let (_broker, url) = plain_broker("");
    let dir = tempfile::tempdir().unwrap();
    let config = run_config(dir.path(), &url, GW, "\n[events]\nmax_rows = 10000000\n");
    let db = dir.path().join("keyway.db");
    // The ACL a tap looks up, and the outbox, before the daemon starts.
    let target_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    let csv = keyway_sim::acl::cached_csv(&target_dir, 20_000).unwrap();
    keyway::acl::Store::open(&db)
        .unwrap()
        .import_file(&csv, keyway::acl::ImportMode::Replace)
        .unwrap();
    fill_outbox(&db, n);
    let mut keys = Vec::new();
    keyway_sim::acl::for_each_key(1, 1000, |_, k| keys.push(k));
    let (handle, _thread) = keyway::daemon::StoreHandle::open(&db).unwrap();
    let mut idle = decisions(&handle, &keys, Duration::from_secs(5)).await;

    let mut b = listener(&url, &[&topics().topic(TopicKind::Events)]).await;
    let _daemon = run_daemon(&config, &dir.path().join("keyway.log"));
    let drain = async {
        let mut got = 0usize;
        let mut t_first = None;
        while got < n {
            let (_, p) = b.b.recv(Duration::from_secs(60)).await.expect("events");
            let v: Value = serde_json::from_slice(&p).unwrap();
            let events = v["events"].as_array().unwrap();
            t_first.get_or_insert_with(Instant::now);
            got += events.len();
            let last = events.last().unwrap()["seq"].as_i64().unwrap();
            b.b.ack_events(&topics(), v["instance"].as_str().unwrap(), last)
                .await
                .unwrap();
        }
        t_first.unwrap().elapsed()
    };
    let (took, mut busy) = tokio::join!(drain, decisions_until(&handle, &keys, &db));
    println!(
        "outbox n={n}: drained in {:.1} s from the first batch: {:.0} events/s",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64()
    );
    println!("outbox: door decision idle: {}", summary(&mut idle));
    println!(
        "outbox: door decision during the drain: {}",
        summary(&mut busy)
    );
}

/// `n` error events in one transaction (the outbox of a long outage), in the daemon's schema.
fn fill_outbox(db: &Path, n: usize) {
    let c = rusqlite::Connection::open(db).unwrap();
    c.execute(
        "WITH RECURSIVE s(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM s WHERE x < ?1) \
         INSERT INTO events (time_ms, door, transport, decision, reason, latency_ms, uid) \
         SELECT 1800000000000 + x, 'front', 'nfc', 'error', 'timeout', 3, randomblob(16) FROM s",
        [n as i64],
    )
    .unwrap();
}

/// One decision per millisecond for `d`, as a busy door; each one's latency.
async fn decisions(
    h: &keyway::daemon::StoreHandle,
    keys: &[[u8; 65]],
    d: Duration,
) -> Vec<Duration> {
    let end = Instant::now() + d;
    let mut lat = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while Instant::now() < end {
        tick.tick().await;
        let k = &keys[lat.len() % keys.len()];
        let t = Instant::now();
        let r = h
            .decide(k, "front", time::OffsetDateTime::now_utc())
            .await
            .unwrap();
        lat.push(t.elapsed());
        assert!(r.is_grant());
    }
    lat
}

/// [`decisions`] in 1 s rounds until the outbox of `db` is empty (or 10 min).
async fn decisions_until(
    h: &keyway::daemon::StoreHandle,
    keys: &[[u8; 65]],
    db: &Path,
) -> Vec<Duration> {
    let mut all = Vec::new();
    let end = Instant::now() + Duration::from_secs(600);
    while Instant::now() < end {
        all.extend(decisions(h, keys, Duration::from_secs(1)).await);
        let left = keyway::acl::Store::open(db)
            .unwrap()
            .stats()
            .unwrap()
            .events_undelivered;
        if left == 0 {
            break;
        }
    }
    all
}
