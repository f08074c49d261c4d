//! The cloud link on a real clustered broker: Debian 12's RabbitMQ (3.10, MQTT plugin), two
//! nodes clustered on loopback, started by each test without systemd (private epmd, cookie,
//! ports and data directory in a tempdir). keyway lists both nodes; the node it is connected
//! to is killed (SIGKILL) in the middle of an event upload, and in the middle of a snapshot;
//! keyway carries on through the other node and nothing is lost.
//!
//! The broker's quirks these tests pin down (docs/mqtt-api.md, "Clustered brokers"):
//! - a session lives on the node that made it: after that node dies, RabbitMQ accepts the
//!   CONNECT of the same client id on the other node but closes the connection at its
//!   SUBSCRIBE, for as long as the dead node is down: keyway moves to a fresh client id;
//! - messages sent to the old session while keyway reconnects are gone: unacked events are
//!   sent again (same ids), a snapshot in progress is asked for again;
//! - retained messages are node-local: keyway publishes its birth again on every connect.
//!
//! Needs `rabbitmq-server` (scripts/setup installs it); a missing broker FAILS the test.
//! Start-up: ~15 s for two nodes and the join on a 2-core machine (printed by each test).
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use keyway::cloud::backend::Backend;
use keyway::cloud::link::Connector;
use keyway::cloud::msg::TopicKind;
use serde_json::{json, Value};
use support::cloud::*;

mod support;

const RABBIT_BIN: &str = "/usr/lib/rabbitmq/bin";
/// Erlang's distribution binds here only (never 0.0.0.0).
const ERL_LOOPBACK: &str = "-kernel inet_dist_use_interface {127,0,0,1}";

struct Node {
    name: String,
    mqtt: u16,
    dir: PathBuf,
    /// The start script, leader of its own process group (beam and its helpers).
    child: Option<Child>,
}

/// Two RabbitMQ nodes joined in one cluster, killed (whole process groups) on drop.
struct Cluster {
    dir: tempfile::TempDir,
    epmd_port: u16,
    epmd: Option<Child>,
    nodes: Vec<Node>,
}

impl Cluster {
    fn start() -> Cluster {
        let t0 = Instant::now();
        let server = Path::new(RABBIT_BIN).join("rabbitmq-server");
        assert!(
            server.exists(),
            "{} not found: run scripts/setup (apt-get install rabbitmq-server)",
            server.display()
        );
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        std::fs::create_dir_all(&home).unwrap();
        // One cookie for the nodes and the CLI (mode 0400, or Erlang refuses it).
        let cookie = home.join(".erlang.cookie");
        std::fs::write(&cookie, format!("KEYWAYTEST{}", free_port())).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&cookie, std::fs::Permissions::from_mode(0o400)).unwrap();
        std::fs::write(dir.path().join("enabled_plugins"), "[rabbitmq_mqtt].\n").unwrap();
        std::fs::write(dir.path().join("rabbitmq-env.conf"), "").unwrap();
        // A private epmd: otherwise the first node or CLI call starts a global one on
        // 0.0.0.0:4369 that outlives the test.
        let epmd_port = free_port();
        let epmd = Command::new(need("epmd"))
            .args(["-port", &epmd_port.to_string(), "-address", "127.0.0.1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting epmd");
        let mut c = Cluster {
            dir,
            epmd_port,
            epmd: Some(epmd),
            nodes: Vec::new(),
        };
        for i in 1..=2 {
            let node_dir = c.dir.path().join(format!("n{i}"));
            std::fs::create_dir_all(node_dir.join("mnesia")).unwrap();
            std::fs::create_dir_all(node_dir.join("log")).unwrap();
            let (amqp, mqtt) = (free_port(), free_port());
            std::fs::write(
                node_dir.join("rabbitmq.conf"),
                format!(
                    "listeners.tcp.default = 127.0.0.1:{amqp}\n\
                     mqtt.listeners.tcp.default = 127.0.0.1:{mqtt}\n\
                     mqtt.allow_anonymous = true\nloopback_users = none\n"
                ),
            )
            .unwrap();
            c.nodes.push(Node {
                // Unique per cluster: tests run clusters side by side.
                name: format!("k{epmd_port}n{i}@localhost"),
                mqtt,
                dir: node_dir,
                child: None,
            });
        }
        for i in 0..2 {
            c.spawn_node(i);
        }
        for i in 0..2 {
            let pid = c.nodes[i].dir.join("pid");
            c.ctl(i, &["wait", pid.to_str().unwrap(), "--timeout", "90"]);
        }
        c.ctl(1, &["stop_app"]);
        c.ctl(1, &["join_cluster", &c.nodes[0].name.clone()]);
        c.ctl(1, &["start_app"]);
        let status = c.ctl(0, &["cluster_status", "--formatter", "json"]);
        let status: Value = serde_json::from_slice(&status.stdout).unwrap();
        assert_eq!(
            status["running_nodes"].as_array().map(|a| a.len()),
            Some(2),
            "{status}"
        );
        for i in 0..2 {
            c.wait_listening(i);
        }
        eprintln!(
            "RabbitMQ cluster of 2 nodes up in {:.1} s",
            t0.elapsed().as_secs_f64()
        );
        c
    }

    fn env(&self, cmd: &mut Command) {
        cmd.env("HOME", self.dir.path().join("home"))
            .env("ERL_EPMD_PORT", self.epmd_port.to_string())
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env(
                "RABBITMQ_CONF_ENV_FILE",
                self.dir.path().join("rabbitmq-env.conf"),
            )
            .env("RABBITMQ_CTL_ERL_ARGS", ERL_LOOPBACK)
            // A crashing CLI or node writes erl_crash.dump into its working directory.
            .env("ERL_CRASH_DUMP", self.dir.path().join("erl_crash.dump"))
            .current_dir(self.dir.path())
            // The CLI finds plugin commands (list_mqtt_connections) through this file.
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                self.dir.path().join("enabled_plugins"),
            );
    }

    fn spawn_node(&mut self, i: usize) {
        let n = &self.nodes[i];
        let dist = free_port();
        let log = std::fs::File::create(n.dir.join("stdout.log")).unwrap();
        let mut cmd = Command::new(Path::new(RABBIT_BIN).join("rabbitmq-server"));
        self.env(&mut cmd);
        cmd.env("RABBITMQ_NODENAME", &n.name)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_DIST_PORT", dist.to_string())
            .env("RABBITMQ_MNESIA_BASE", n.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", n.dir.join("log"))
            .env("RABBITMQ_CONFIG_FILE", n.dir.join("rabbitmq.conf"))
            .env("RABBITMQ_PID_FILE", n.dir.join("pid"))
            .env("RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS", ERL_LOOPBACK)
            // Its own process group: a kill reaches beam and its helper processes.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = cmd.spawn().expect("starting rabbitmq-server");
        self.nodes[i].child = Some(child);
    }

    /// `rabbitmqctl -n NODE ARGS`; fails the test (with the node's log) when it fails.
    fn ctl(&self, i: usize, args: &[&str]) -> Output {
        let mut cmd = Command::new(Path::new(RABBIT_BIN).join("rabbitmqctl"));
        self.env(&mut cmd);
        let out = cmd
            .arg("-n")
            .arg(&self.nodes[i].name)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running rabbitmqctl");
        assert!(
            out.status.success(),
            "rabbitmqctl {args:?} on {}: {}{}\n--- node log ---\n{}",
            self.nodes[i].name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log(i)
        );
        out
    }

    fn log(&self, i: usize) -> String {
        let n = &self.nodes[i];
        let log = std::fs::read_to_string(n.dir.join("log").join(format!("{}.log", n.name)))
            .unwrap_or_default();
        // The end is what explains a failure; crash reports are long, their first line says it.
        let tail: Vec<&str> = log
            .lines()
            .filter(|l| {
                !l.contains("[error] <")
                    || l.contains("error] <0") && l.len() < 400 && !l.contains("   ")
            })
            .rev()
            .take(60)
            .collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    fn wait_listening(&self, i: usize) {
        let deadline = Instant::now() + STEP;
        while std::net::TcpStream::connect(("127.0.0.1", self.nodes[i].mqtt)).is_err() {
            assert!(
                Instant::now() < deadline,
                "MQTT listener of {} not up: {}",
                self.nodes[i].name,
                self.log(i)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn url(&self, i: usize) -> String {
        format!("mqtt://127.0.0.1:{}", self.nodes[i].mqtt)
    }

    /// The client ids connected to node `i` over MQTT.
    fn mqtt_clients(&self, i: usize) -> Vec<String> {
        let out = self.ctl(
            i,
            &["list_mqtt_connections", "client_id", "--formatter", "json"],
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|c| c["client_id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// SIGKILL to node `i`'s whole process group: the node dies as in a power cut.
    fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let pgid = child.id() as libc::pid_t;
            // SAFETY: signals the process group we created for this child (not reaped yet).
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            let _ = child.wait();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for i in 0..self.nodes.len() {
                eprintln!("--- {} log (end) ---\n{}", self.nodes[i].name, self.log(i));
            }
        }
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
        if let Some(mut e) = self.epmd.take() {
            let _ = e.kill();
            let _ = e.wait();
        }
    }
}

/// A cluster, the backend's client on node 2 (the one that survives), and a gateway listing
/// node 1 then node 2, connected to node 1 and online.
async fn on_node1(gateway_extra: &str) -> (Cluster, Peer, Gateway) {
    keyway::logging::init(keyway::logging::Target::Stderr, log::LevelFilter::Info);
    let cluster = tokio::task::spawn_blocking(Cluster::start).await.unwrap();
    let mut b = backend(&cluster.url(1), None).await;
    let s = settings(&cluster.url(0), gateway_extra);
    let s = keyway::cloud::config::CloudSettings {
        brokers: vec![
            keyway::cloud::config::parse_broker(&cluster.url(0)).unwrap(),
            keyway::cloud::config::parse_broker(&cluster.url(1)).unwrap(),
        ],
        ..s
    };
    let client_id = s.client_id.clone();
    let gw = Gateway::start(s);
    let birth = expect(&mut b, "state", |v| v["state"] == "online").await;
    assert_eq!(birth["bd_seq"], 1);
    let cluster = tokio::task::spawn_blocking(move || {
        let on1 = cluster.mqtt_clients(0);
        assert!(
            on1.contains(&client_id),
            "{client_id} not on node 1: {on1:?}"
        );
        cluster
    })
    .await
    .unwrap();
    (cluster, b, gw)
}

async fn kill_node(cluster: Cluster, i: usize) -> Cluster {
    tokio::task::spawn_blocking(move || {
        let mut c = cluster;
        c.kill(i);
        c
    })
    .await
    .unwrap()
}

/// The node keyway is connected to dies in the middle of an event upload: keyway fails over
/// to the other node (fresh client id: the old one's session is stuck on the dead node),
/// says it is online there, sends again what was not acked, and every event reaches the
/// backend (duplicates only with the same id) and is acked. Down messages reach it there too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_killed_mid_upload_keyway_carries_on_through_the_other() {
    let (cluster, mut b, gw) = on_node1("outbox_batch = 20").await;
    const N: usize = 400;
    let (instance, mut got) = mid_upload(&mut b, &gw, N).await;
    // Mid-upload: two batches seen, one acked, the rest in the outbox or in flight.
    let _cluster = kill_node(cluster, 0).await;
    let t_kill = Instant::now();

    let rebirth = expect(&mut b, "state", |v| {
        v["state"] == "online" && v["bd_seq"].as_u64() > Some(1)
    })
    .await;
    eprintln!(
        "online again through node 2 after {:.1} s (bd_seq {})",
        t_kill.elapsed().as_secs_f64(),
        rebirth["bd_seq"]
    );
    let (replay_seen, dups, acks) = ack_until(&mut b, &instance, &mut got, N).await;
    assert!(replay_seen, "resent batches are flagged replay");
    wait_for(|| gw.store().stats().unwrap().events_undelivered == 0).await;
    // Subscribed again on node 2: a signed snapshot applies.
    snapshot(&mut b, 1, &[1, 2]).await;
    assert!(gw.grants(1) && gw.grants(2));
    eprintln!("{N} events through the failover, {acks} acks after it, {dups} duplicates (same uid, same content)");
    gw.stop().await;
}

/// The node keyway is connected to dies in the middle of a snapshot: the old ACL keeps
/// serving, keyway (on the other node, in a new session) asks for the snapshot again at once
/// instead of waiting for the chunk timeout, and the snapshot sent again applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_killed_mid_snapshot_the_snapshot_applies_through_the_other() {
    let (cluster, mut b, gw) = on_node1("").await;
    expect(&mut b, "acl/request", |v| v["reason"] == "startup").await;
    snapshot(&mut b, 1, &[1, 2]).await;

    let seeds: Vec<u16> = (3..80).collect();
    let creds: Vec<Value> = seeds.iter().map(|s| cred(*s)).collect();
    let content = serde_json::to_vec(&json!({"version": 1, "credentials": creds})).unwrap();
    let (m, chunks) = snapshot_of(2, &content);
    assert!(chunks.len() > 20);
    let half = chunks.len() / 2;
    // A publisher of its own: RabbitMQ 3.10 closes the connection of a publisher whose
    // message a queue on the dying node nacks (`mqtt_unexpected_msg basic.nack`), and the
    // listener `b` must not miss keyway's request meanwhile.
    let publisher = Backend::connect(
        &Connector {
            client_id: format!("publisher-{}", free_port()),
            tls: None,
            credentials: None,
        },
        &keyway::cloud::config::parse_broker(&cluster.url(1)).unwrap(),
        STEP,
    )
    .await
    .unwrap();
    publisher
        .publish(&topics().topic(TopicKind::AclSnapshot), m.clone(), false)
        .await
        .unwrap();
    for c in &chunks[..half] {
        publisher
            .publish(&topics().topic(TopicKind::AclChunk), c.clone(), false)
            .await
            .unwrap();
    }
    // Down messages are handled in order: once keyway answers a command sent after them, it
    // holds the manifest and half the chunks.
    let cmd = keyway::cloud::backend::command_message(
        &signer(),
        &target(),
        "mid-snapshot",
        "report_diagnostics",
        Default::default(),
        now_s(),
    );
    publisher
        .publish(&topics().topic(TopicKind::Command), cmd, false)
        .await
        .unwrap();
    expect(&mut b, "cmd/status", |v| v["request_id"] == "mid-snapshot").await;
    let _cluster = kill_node(cluster, 0).await;
    let t_kill = Instant::now();
    // The rest goes out while keyway has no session anywhere: lost for it.
    for c in &chunks[half..] {
        publisher
            .publish(&topics().topic(TopicKind::AclChunk), c.clone(), false)
            .await
            .unwrap();
    }
    assert!(
        gw.grants(1) && gw.grants(2) && !gw.grants(3),
        "old ACL serving"
    );
    let req = expect(&mut b, "acl/request", |v| v["reason"] == "snapshot_failed").await;
    assert_eq!(req["have_version"], 1);
    eprintln!(
        "snapshot asked for again {:.1} s after the kill",
        t_kill.elapsed().as_secs_f64()
    );
    let (m, chunks) = snapshot_of(2, &content);
    publisher
        .publish_snapshot(&topics(), m, chunks)
        .await
        .unwrap();
    let applied = expect(&mut b, "acl/applied", |v| v["version"] == 2).await;
    assert_eq!(applied["source"], "snapshot");
    assert!(!gw.grants(1) && gw.grants(3) && gw.grants(79));
    gw.stop().await;
}
