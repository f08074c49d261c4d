//! Cloud-link test helpers shared by tests/cloud_sync.rs, tests/cloud_cluster.rs and the
//! cloud benches (the broker itself is in `mqtt`): the backend's client with waits that keep
//! what they skipped, signed snapshots and deltas, a gateway running the link on a database of
//! its own, and `keyway run` as a child. Missing brokers FAIL (never skip).

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use keyway::acl::Store;
use keyway::cloud::backend::{self, Backend, Target};
use keyway::cloud::config::{parse_broker, CloudSettings};
use keyway::cloud::link::{Connector, Link, LinkError};
use keyway::cloud::msg::{SnapshotFormat, TopicKind, Topics};
use keyway::cloud::sign::BackendSigner;
use keyway::cloud::store::StoreSync;
use keyway::events::{AccessEvent, Transport};
use serde_json::{json, Value};
use tokio::sync::watch;

// Each test binary uses its own subset.
#[allow(unused_imports)]
pub use super::mqtt::{free_port, need, write_private, Mosquitto};

pub const STEP: Duration = Duration::from_secs(20);

pub const SITE: &str = "s1";

pub const GW: &str = "gw1";

pub fn signer() -> BackendSigner {
    BackendSigner::from_hex("backend-1", &format!("{:064x}", 0x1234_5678u64)).unwrap()
}

pub fn settings(broker: &str, extra: &str) -> CloudSettings {
    let text = format!(
        "brokers = [{broker:?}]\nsite = \"{SITE}\"\ngateway = \"{GW}\"\nheartbeat_s = 5\n{extra}\n\
         [[trusted_keys]]\nkid = \"backend-1\"\npublic_key = \"{}\"\n",
        signer().public_hex()
    );
    let raw: keyway::cloud::config::CloudConfig = toml::from_str(&text).unwrap();
    keyway::cloud::config::validate(raw, |p: &Path| p.to_path_buf()).unwrap()
}

pub struct Gateway {
    pub db: PathBuf,
    pub stop: watch::Sender<bool>,
    pub task: tokio::task::JoinHandle<Result<(), LinkError>>,
    pub _dir: tempfile::TempDir,
}

impl Gateway {
    pub fn start(s: CloudSettings) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("keyway.db");
        let store = StoreSync::open(&db).unwrap();
        let (stop, rx) = watch::channel(false);
        let link = Link::new(s).unwrap();
        let task = tokio::spawn(link.run(store, rx));
        Gateway {
            db,
            stop,
            task,
            _dir: dir,
        }
    }

    pub fn store(&self) -> Store {
        Store::open(&self.db).unwrap()
    }

    pub fn record(&self, n: usize) {
        let mut s = self.store();
        for i in 0..n {
            s.record_event(&AccessEvent::error(
                1_800_000_000_000 + i as i64,
                "d1",
                Transport::Nfc,
                None,
                "timeout",
                1,
            ))
            .unwrap();
        }
    }

    pub fn grants(&self, seed: u16) -> bool {
        self.store()
            .decide(&key(seed), "d1", time::OffsetDateTime::now_utc())
            .unwrap()
            .is_grant()
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let r = tokio::time::timeout(STEP, self.task).await;
        assert!(matches!(r, Ok(Ok(Ok(())))), "link ended badly: {r:?}");
    }
}

pub fn key(seed: u16) -> [u8; 65] {
    use p256::elliptic_curve::sec1::ToEncodedPoint;
    let mut scalar = [0u8; 32];
    scalar[0] = 1;
    scalar[30..].copy_from_slice(&seed.to_be_bytes());
    let sk = p256::SecretKey::from_slice(&scalar).unwrap();
    sk.public_key()
        .to_encoded_point(false)
        .as_bytes()
        .try_into()
        .unwrap()
}

pub fn cred(seed: u16) -> Value {
    json!({"endpoint_key": hex::encode(key(seed)), "person_id": format!("p-{seed}"),
        "card_format": "h10301", "facility_code": 1, "card_number": seed, "doors": ["*"]})
}

pub fn target() -> Target {
    Target {
        site: SITE.into(),
        gateway: GW.into(),
        ttl_s: 300,
    }
}

pub fn topics() -> Topics {
    Topics::new("keyway", SITE, GW).unwrap()
}

pub fn now_s() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

pub async fn backend(broker: &str, connector: Option<Connector>) -> Peer {
    let connector = connector.unwrap_or(Connector {
        client_id: format!("backend-{}", free_port()),
        tls: None,
        credentials: None,
    });
    let b = Backend::connect(&connector, &parse_broker(broker).unwrap(), STEP)
        .await
        .expect("backend connects");
    for k in TopicKind::UP {
        b.subscribe(&topics().topic(k)).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    Peer {
        b,
        backlog: Default::default(),
    }
}

/// The backend's client with the messages a wait skipped, so a later wait still sees them.
pub struct Peer {
    pub b: Backend,
    pub backlog: std::collections::VecDeque<(String, Value)>,
}

impl std::ops::Deref for Peer {
    type Target = Backend;
    fn deref(&self) -> &Backend {
        &self.b
    }
}

/// The next message on `suffix` matching `pred`, within STEP (earlier skipped ones first).
pub async fn expect(p: &mut Peer, suffix: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let topic = topics().topic_suffix(suffix);
    if let Some(i) = p.backlog.iter().position(|(t, v)| *t == topic && pred(v)) {
        if let Some((_, v)) = p.backlog.remove(i) {
            return v;
        }
    }
    let deadline = Instant::now() + STEP;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let Some((t, payload)) = p.b.recv(left).await else {
            break;
        };
        let v: Value = serde_json::from_slice(&payload).unwrap_or(Value::Null);
        if t == topic && pred(&v) {
            return v;
        }
        // Bounded: heartbeats are dropped first when a test waits long.
        if p.backlog.len() > 10_000 {
            p.backlog.pop_front();
        }
        p.backlog.push_back((t, v));
    }
    let seen: Vec<String> = p.backlog.iter().map(|(t, v)| format!("{t} {v}")).collect();
    panic!("no {suffix} message matching; saw:\n{}", seen.join("\n"));
}

pub trait Suffix {
    fn topic_suffix(&self, s: &str) -> String;
}

impl Suffix for Topics {
    fn topic_suffix(&self, s: &str) -> String {
        format!("keyway/{SITE}/{GW}/{s}")
    }
}

/// The signed manifest and 256-byte chunks of `content` as snapshot `version`.
pub fn snapshot_of(version: u64, content: &[u8]) -> (Vec<u8>, Vec<Vec<u8>>) {
    backend::snapshot_messages(
        &signer(),
        &target(),
        version,
        SnapshotFormat::Json,
        content,
        256,
        now_s(),
    )
    .unwrap()
}

pub async fn snapshot(b: &mut Peer, version: u64, seeds: &[u16]) {
    let creds: Vec<Value> = seeds.iter().map(|s| cred(*s)).collect();
    let content = serde_json::to_vec(&json!({"version": 1, "credentials": creds})).unwrap();
    // Small chunks so the test crosses chunk boundaries.
    let (m, chunks) = snapshot_of(version, &content);
    assert!(chunks.len() > 1);
    b.publish_snapshot(&topics(), m, chunks).await.unwrap();
    let v = expect(b, "acl/applied", |v| v["version"] == version).await;
    assert_eq!(v["source"], "snapshot");
}

pub async fn delta(b: &Peer, base: u64, version: u64, revoke: &[u16]) -> Vec<u8> {
    let m = backend::delta_message(
        &signer(),
        &target(),
        base,
        version,
        Vec::new(),
        Vec::new(),
        revoke.iter().map(|s| hex::encode(key(*s))).collect(),
        now_s(),
    );
    b.publish(&topics().topic(TopicKind::AclDelta), m.clone(), false)
        .await
        .unwrap();
    m
}

pub async fn wait_for(mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + STEP;
    while !f() {
        assert!(Instant::now() < deadline, "condition not met in {STEP:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `keyway run`, killed when dropped.
pub struct Daemon(pub Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `keyway run --config CONFIG`, its log in `log`.
pub fn run_daemon(config: &Path, log: &Path) -> Daemon {
    Daemon(
        Command::new(env!("CARGO_BIN_EXE_keyway"))
            .arg("--config")
            .arg(config)
            .args(["run", "--log", "stderr"])
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap(),
    )
}

/// A real door with the cloud link: our own pcscd with vpcd (reader slot 0), libosdp's
/// control panel on a pty (it flashes green after each card, like a panel that grants), and
/// `keyway run` with `[cloud]` on `broker` between them. The ACL comes from the cloud.
/// Only one pcscd per machine: run under `flock /tmp/keyway-pcscd.lock`.
pub struct CloudDoor {
    pub daemon: Daemon,
    pub cp: super::Cp,
    pub db: PathBuf,
    pub log: PathBuf,
    reader_key: p256::SecretKey,
    group_id: [u8; 16],
    /// Taps made: each one stores one event.
    taps: std::cell::Cell<usize>,
    _pty: super::PtyPair,
    _pcscd: super::pcscd::Pcscd,
    _dir: tempfile::TempDir,
}

impl CloudDoor {
    pub fn start(broker: &str) -> CloudDoor {
        let dir = tempfile::tempdir().unwrap();
        let pcscd = super::pcscd::Pcscd::start(dir.path());
        let pty = super::pty_pair();
        let mut group_id = [0u8; 16];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut group_id);
        let (config, reader_key) = door_config(
            dir.path(),
            &format!(
                "osdp = {{ port = {:?}, baud = 115200, address = 1 }}\nnfc = {{ reader = {:?} }}",
                pty.pd.display().to_string(),
                super::pcscd::READERS[0]
            ),
            &hex::encode(group_id),
            broker,
            GW,
            "",
        );
        let mut cp = super::Cp::start_with(&pty.cp, &[1], &["--grant-led"]);
        let log = dir.path().join("keyway.log");
        let daemon = run_daemon(&config, &log);
        cp.wait_online(1);
        let deadline = Instant::now() + STEP;
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("reader found")
        {
            assert!(
                Instant::now() < deadline,
                "keyway did not find the reader: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        CloudDoor {
            daemon,
            cp,
            db: dir.path().join("keyway.db"),
            log,
            reader_key,
            group_id,
            taps: Default::default(),
            _pty: pty,
            _pcscd: pcscd,
            _dir: dir,
        }
    }

    /// A phone provisioned for this door's reader group.
    pub fn phone(&self, key: &p256::SecretKey) -> keyway_sim::Endpoint {
        let cred = keyway_sim::ReaderGroupCredential {
            group_id: self.group_id,
            reader_group_key: self.reader_key.public_key(),
        };
        keyway_sim::Endpoint::new(
            keyway_sim::EndpointConfig::new(key.clone(), vec![cred]),
            Box::new(keyway_sim::OsRandom),
        )
    }

    /// One tap of `key`'s phone (a fresh session, as a phone taps anew); the reader status
    /// the phone was told. Between taps, wait for [`CloudDoor::reader_free`].
    pub async fn tap(&self, key: &p256::SecretKey) -> Option<u16> {
        let mut phone = self.phone(key);
        self.taps.set(self.taps.get() + 1);
        let opts = keyway_sim::vpcd::TapOptions {
            timeout: Duration::from_secs(10),
            hold: Duration::from_millis(100),
            ..Default::default()
        };
        let s = keyway_sim::vpcd::tap(super::pcscd::addr(0), &mut phone, &opts)
            .await
            .expect("tap");
        assert!(s.finished, "the reader finished the transaction: {s:?}");
        super::pcscd::reader_status(&phone)
    }

    /// Until the reader can see a new tap (the phone taken away).
    pub async fn reader_free(&self) {
        super::pcscd::wait_reader_empty(0).await;
    }

    /// The decision of the last tap: (decision, reason). The event row is written just after
    /// the phone is answered: waits (bounded) until there is one per tap.
    pub fn last_decision(&self) -> Option<(String, String)> {
        let taps = self.taps.get();
        let deadline = Instant::now() + STEP;
        loop {
            let events = Store::open(&self.db).unwrap().recent_events(taps).unwrap();
            if events.len() >= taps || Instant::now() > deadline {
                return events
                    .into_iter()
                    .next()
                    .map(|s| (s.event.decision.as_str().to_owned(), s.event.reason));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A credential (JSON ACL file entry) for `key` at every door.
pub fn cred_for(key: &p256::SecretKey, person: &str, card_number: u32) -> Value {
    json!({"endpoint_key": hex::encode(key.public_key().to_sec1_bytes()), "person_id": person,
        "card_format": "h10301", "facility_code": 1, "card_number": card_number, "doors": ["*"]})
}

/// A daemon configuration with one (unreachable) door and `[cloud]` on `url` as `gateway`,
/// in `dir`; `extra` TOML goes at the end (e.g. an `[events]` table).
pub fn run_config(dir: &Path, url: &str, gateway: &str, extra: &str) -> PathBuf {
    // check-config wants the serial port to exist; a plain file stands in for it (the
    // daemon's bus retries it in the background; the cloud link does not care).
    let tty = dir.join("no-tty");
    std::fs::write(&tty, "").unwrap();
    let door = format!(
        "osdp = {{ port = {:?}, address = 1 }}\nnfc = {{ reader = \"No Such Reader\" }}",
        tty.display().to_string()
    );
    door_config(
        dir,
        &door,
        "00112233445566778899aabbccddeeff",
        url,
        gateway,
        extra,
    )
    .0
}

/// `dir/keyway.toml`: one door `front` (its `osdp`/`nfc` lines given, a fresh reader key in
/// `reader.pem`, `group_id`) and `[cloud]` on `url` as `gateway` trusting [`signer`]; `extra`
/// TOML at the end. Returns the config path and the reader key.
fn door_config(
    dir: &Path,
    door: &str,
    group_id: &str,
    url: &str,
    gateway: &str,
    extra: &str,
) -> (PathBuf, p256::SecretKey) {
    use p256::pkcs8::{EncodePrivateKey, LineEnding};
    let reader_key = p256::SecretKey::random(&mut rand_core::OsRng);
    write_private(
        &dir.join("reader.pem"),
        &reader_key.to_pkcs8_pem(LineEnding::LF).unwrap(),
    );
    let config = dir.join("keyway.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[daemon]
database = "keyway.db"

[[door]]
id = "front"
{door}
aliro = {{ group_id = "{group_id}", sub_id = "ffeeddccbbaa99887766554433221100", private_key_file = "reader.pem" }}

[cloud]
brokers = ["{url}"]
site = "{SITE}"
gateway = "{gateway}"

[[cloud.trusted_keys]]
kid = "backend-1"
public_key = "{}"
{extra}
"#,
            signer().public_hex(),
        ),
    )
    .unwrap();
    (config, reader_key)
}

/// Every event of a batch into `got` (by uid); a uid seen before must carry the same event.
/// Returns the batch's last seq and how many were duplicates.
pub fn take(batch: &Value, got: &mut std::collections::HashMap<String, Value>) -> (i64, usize) {
    let mut dups = 0;
    let events = batch["events"].as_array().unwrap();
    for e in events {
        let uid = e["uid"].as_str().unwrap().to_owned();
        if let Some(prev) = got.insert(uid, e.clone()) {
            assert_eq!(&prev, e, "a duplicate must be the same event");
            dups += 1;
        }
    }
    (events.last().unwrap()["seq"].as_i64().unwrap(), dups)
}

/// Takes `events` batches and acks each until `n` distinct events are in `got` (60 s at
/// most), then checks their seqs are exactly 1..=n. Returns (a replay was seen, duplicates,
/// acks sent).
pub async fn ack_until(
    b: &mut Peer,
    instance: &str,
    got: &mut std::collections::HashMap<String, Value>,
    n: usize,
) -> (bool, usize, usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut replay_seen, mut dups, mut acks) = (false, 0, 0);
    while got.len() < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} events arrived",
            got.len()
        );
        let batch = expect(b, "events", |_| true).await;
        replay_seen |= batch["replay"] == true;
        let (last, d) = take(&batch, got);
        dups += d;
        b.ack_events(&topics(), instance, last).await.unwrap();
        acks += 1;
    }
    let seqs: std::collections::BTreeSet<i64> =
        got.values().map(|e| e["seq"].as_i64().unwrap()).collect();
    assert_eq!(
        (seqs.len(), seqs.first(), seqs.last()),
        (n, Some(&1), Some(&(n as i64)))
    );
    (replay_seen, dups, acks)
}

/// An upload in the middle: `n` events recorded, two batches received, the first acked.
/// Returns the outbox instance and the events received so far (by uid).
pub async fn mid_upload(
    b: &mut Peer,
    gw: &Gateway,
    n: usize,
) -> (String, std::collections::HashMap<String, Value>) {
    gw.record(n);
    let mut got = Default::default();
    let first = expect(b, "events", |_| true).await;
    let instance = first["instance"].as_str().unwrap().to_owned();
    let (first_last, _) = take(&first, &mut got);
    let second = expect(b, "events", |_| true).await;
    take(&second, &mut got);
    b.ack_events(&topics(), &instance, first_last)
        .await
        .unwrap();
    (instance, got)
}
