//! `keyway cloud …`: the backend tool (docs/mqtt-api.md, "The backend tool").

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};

use keyway::cloud::backend::{self, Backend, Target};
use keyway::cloud::config::{parse_broker, read_password};
use keyway::cloud::link::{tls_config, Connector};
use keyway::cloud::msg::{self, SnapshotFormat, TopicKind, Topics};
use keyway::cloud::sign::BackendSigner;

#[derive(Subcommand)]
pub enum CloudCommand {
    /// Create a backend signing key (P-256, 64 hex digits, mode 0600); prints the public key
    /// for `[[cloud.trusted_keys]]`.
    Keygen {
        #[arg(long)]
        out: PathBuf,
        /// Overwrite an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Publish a signed ACL snapshot from a file `keyway acl import` reads (.json or .csv).
    PublishSnapshot {
        file: PathBuf,
        /// The ACL version it sets (must be above the gateway's applied version).
        #[arg(long = "acl-version")]
        acl_version: u64,
        #[arg(long, default_value_t = msg::DEFAULT_CHUNK_BYTES)]
        chunk_size: u32,
        #[command(flatten)]
        sign: SignArgs,
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Publish a signed ACL delta on top of `--base`.
    PublishDelta {
        #[arg(long)]
        base: u64,
        #[arg(long = "acl-version")]
        acl_version: u64,
        /// Credentials to add or update (a .json or .csv ACL file).
        #[arg(long)]
        upsert: Option<PathBuf>,
        /// Endpoint key (hex) whose validity ends now.
        #[arg(long)]
        suspend: Vec<String>,
        /// Endpoint key (hex) to remove.
        #[arg(long)]
        revoke: Vec<String>,
        #[command(flatten)]
        sign: SignArgs,
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Revoke one credential now (the `revoke_now` command) and wait for the result.
    Revoke {
        /// Endpoint key, hex (not `key`: `--key` is the signing key).
        endpoint_key: String,
        #[command(flatten)]
        sign: SignArgs,
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Send a signed command: resync, revoke_now, set_log_level, report_diagnostics.
    Command {
        name: String,
        /// Argument `key=value` (repeatable), e.g. `--arg level=debug`.
        #[arg(long = "arg")]
        args: Vec<String>,
        /// Wait for done / failed / rejected.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        sign: SignArgs,
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Print events as JSON lines (optionally acking them so gateways can forget them).
    Events {
        /// Keep running; otherwise stop after `--idle` seconds without events.
        #[arg(long)]
        follow: bool,
        /// Send the application-level ack after printing each batch.
        #[arg(long)]
        ack: bool,
        #[arg(long, default_value_t = 5)]
        idle: u64,
        #[command(flatten)]
        scope: ScopeArgs,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Show the fleet's birth/death and heartbeat state seen within `--listen` seconds
    /// (states are retained, heartbeats periodic).
    Fleet {
        #[arg(long, default_value_t = 3)]
        listen: u64,
        #[command(flatten)]
        scope: ScopeArgs,
        #[command(flatten)]
        conn: ConnArgs,
    },
}

#[derive(Args)]
pub struct SignArgs {
    /// Backend signing key (from `keyway cloud keygen`).
    #[arg(long)]
    key: PathBuf,
    /// Its key id, as listed in the gateways' trusted_keys.
    #[arg(long)]
    kid: String,
}

#[derive(Args)]
pub struct TargetArgs {
    #[arg(long, default_value = "keyway")]
    prefix: String,
    #[arg(long)]
    site: String,
    #[arg(long)]
    gateway: String,
    /// Seconds until the message expires.
    #[arg(long, default_value_t = 300)]
    ttl: i64,
    /// Wait for the gateway's answer (applied / rejected), at most this many seconds; 0 = no.
    #[arg(long, default_value_t = 30)]
    wait_s: u64,
}

#[derive(Args)]
pub struct ScopeArgs {
    #[arg(long, default_value = "keyway")]
    prefix: String,
}

#[derive(Args)]
pub struct ConnArgs {
    #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
    broker: String,
    #[arg(long)]
    ca_file: Option<PathBuf>,
    #[arg(long)]
    client_cert: Option<PathBuf>,
    #[arg(long)]
    client_key: Option<PathBuf>,
    #[arg(long)]
    username: Option<String>,
    /// Password file (mode 0600).
    #[arg(long)]
    password_file: Option<PathBuf>,
}

/// `v.a.b…`, or null when absent (received JSON is untrusted: no indexing).
fn at<'a>(v: &'a serde_json::Value, path: &[&str]) -> &'a serde_json::Value {
    path.iter()
        .try_fold(v, |v, k| v.get(*k))
        .unwrap_or(&serde_json::Value::Null)
}

fn now_s() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

async fn connect(c: &ConnArgs) -> anyhow::Result<Backend> {
    let broker = parse_broker(&c.broker).map_err(anyhow::Error::msg)?;
    let tls = match &c.ca_file {
        Some(ca) => Some(tls_config(
            ca,
            c.client_cert.as_deref().zip(c.client_key.as_deref()),
        )?),
        None if broker.tls => bail!("--ca-file is required for mqtts://"),
        None => None,
    };
    let credentials = match (&c.username, &c.password_file) {
        (Some(u), Some(p)) => Some((u.clone(), read_password(p)?)),
        (Some(u), None) => Some((u.clone(), zeroize::Zeroizing::new(String::new()))),
        (None, Some(_)) => bail!("--password-file needs --username"),
        (None, None) => None,
    };
    let mut rnd = [0u8; 4];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut rnd);
    let connector = Connector {
        client_id: format!("keyway-backend-{}", hex::encode(rnd)),
        tls,
        credentials,
    };
    Ok(Backend::connect(&connector, &broker, Duration::from_secs(10)).await?)
}

fn signer(s: &SignArgs) -> anyhow::Result<BackendSigner> {
    let key = keyway::config::load_private_key(&s.key)?;
    Ok(BackendSigner::new(
        &s.kid,
        p256::ecdsa::SigningKey::from(key),
    )?)
}

fn target(t: &TargetArgs) -> anyhow::Result<(Target, Topics)> {
    let topics = Topics::new(&t.prefix, &t.site, &t.gateway).with_context(|| {
        format!(
            "--prefix/--site/--gateway {}/{}/{}",
            t.prefix, t.site, t.gateway
        )
    })?;
    Ok((
        Target {
            site: t.site.clone(),
            gateway: t.gateway.clone(),
            ttl_s: t.ttl,
        },
        topics,
    ))
}

/// Waits for the gateway's answer on `acl/applied` (version) or `rejected`.
async fn wait_applied(b: &mut Backend, version: u64, wait_s: u64) -> anyhow::Result<ExitCode> {
    let deadline = Instant::now() + Duration::from_secs(wait_s);
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let Some((topic, payload)) = b.recv(left).await else {
            break;
        };
        let v: serde_json::Value = serde_json::from_slice(&payload).unwrap_or_default();
        println!("{topic} {v}");
        if at(&v, &["type"]) == "acl_applied" && at(&v, &["version"]).as_u64() == Some(version) {
            return Ok(ExitCode::SUCCESS);
        }
        if at(&v, &["type"]) == "rejected"
            && at(&v, &["topic"])
                .as_str()
                .is_some_and(|t| t.starts_with("acl/"))
        {
            return Ok(ExitCode::FAILURE);
        }
    }
    bail!("no answer from the gateway within {wait_s} s")
}

async fn subscribe_answers(
    b: &Backend,
    topics: &Topics,
    kinds: &[TopicKind],
) -> anyhow::Result<()> {
    for k in kinds {
        b.subscribe(&topics.topic(*k)).await?;
    }
    // The SUBACK is not surfaced by the client: give it a moment before publishing.
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}

async fn send_command(
    name: &str,
    args: serde_json::Map<String, serde_json::Value>,
    wait: bool,
    sign: &SignArgs,
    t: &TargetArgs,
    conn: &ConnArgs,
) -> anyhow::Result<ExitCode> {
    let signer = signer(sign)?;
    let (target, topics) = target(t)?;
    let mut b = connect(conn).await?;
    if wait {
        subscribe_answers(
            &b,
            &topics,
            &[TopicKind::CommandStatus, TopicKind::Rejected],
        )
        .await?;
    }
    let mut rnd = [0u8; 8];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut rnd);
    let request_id = hex::encode(rnd);
    let m = backend::command_message(&signer, &target, &request_id, name, args, now_s());
    b.publish(&topics.topic(TopicKind::Command), m, false)
        .await?;
    println!("sent {name} request_id {request_id}");
    if !wait {
        b.disconnect().await;
        return Ok(ExitCode::SUCCESS);
    }
    let deadline = Instant::now() + Duration::from_secs(t.wait_s.max(1));
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let Some((topic, payload)) = b.recv(left).await else {
            break;
        };
        let v: serde_json::Value = serde_json::from_slice(&payload).unwrap_or_default();
        let ours = at(&v, &["request_id"]).as_str() == Some(request_id.as_str());
        if at(&v, &["type"]) == "rejected"
            && at(&v, &["topic"]) == "cmd"
            && (ours || at(&v, &["request_id"]).is_null())
        {
            println!("{topic} {v}");
            return Ok(ExitCode::FAILURE);
        }
        if !ours {
            continue;
        }
        println!("{topic} {v}");
        match at(&v, &["status"]).as_str() {
            Some("done") => return Ok(ExitCode::SUCCESS),
            Some("failed" | "rejected") => return Ok(ExitCode::FAILURE),
            _ => {}
        }
    }
    bail!("no final status for {request_id} within {} s", t.wait_s)
}

pub async fn run(cmd: CloudCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        CloudCommand::Keygen { out, force } => {
            let key = p256::SecretKey::random(&mut rand_core::OsRng);
            let hex_key = zeroize::Zeroizing::new(hex::encode(key.to_bytes()));
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .create_new(!force)
                .truncate(true)
                .mode(0o600)
                .open(&out)
                .with_context(|| format!("creating {}", out.display()))?;
            writeln!(f, "{}", hex_key.as_str())?;
            let pk = BackendSigner::from_hex("k", &hex_key)?.public_hex();
            println!("{pk}");
            Ok(ExitCode::SUCCESS)
        }
        CloudCommand::PublishSnapshot {
            file,
            acl_version,
            chunk_size,
            sign,
            target: t,
            conn,
        } => {
            let format = match keyway::acl::FileKind::from_path(&file) {
                Some(keyway::acl::FileKind::Json) => SnapshotFormat::Json,
                Some(keyway::acl::FileKind::Csv) => SnapshotFormat::Csv,
                None => bail!("{}: the name must end in .json or .csv", file.display()),
            };
            let content = read_bounded(&file)?;
            // Validated here exactly as the gateway will, so a bad file never goes out.
            let kind = format.file_kind();
            let specs = keyway::acl::import::parse_bytes(&content, kind, &file)?;
            let signer = signer(&sign)?;
            let (target, topics) = target(&t)?;
            let (manifest, chunks) = backend::snapshot_messages(
                &signer,
                &target,
                acl_version,
                format,
                &content,
                chunk_size,
                now_s(),
            )?;
            let b = connect(&conn).await?;
            if t.wait_s > 0 {
                subscribe_answers(&b, &topics, &[TopicKind::AclApplied, TopicKind::Rejected])
                    .await?;
            }
            let n = chunks.len();
            b.publish_snapshot(&topics, manifest, chunks).await?;
            println!(
                "snapshot v{acl_version}: {} credentials, {} bytes in {n} chunks",
                specs.credentials.len(),
                content.len()
            );
            finish(b, acl_version, t.wait_s).await
        }
        CloudCommand::PublishDelta {
            base,
            acl_version,
            upsert,
            suspend,
            revoke,
            sign,
            target: t,
            conn,
        } => {
            let upsert = match upsert {
                Some(f) => backend::upserts_from_file(&f)?,
                None => Vec::new(),
            };
            let signer = signer(&sign)?;
            let (target, topics) = target(&t)?;
            let m = backend::delta_message(
                &signer,
                &target,
                base,
                acl_version,
                upsert,
                suspend,
                revoke,
                now_s(),
            );
            if m.len() > msg::MAX_MESSAGE_BYTES {
                bail!(
                    "the delta is {} bytes, over the {} byte limit: use a snapshot",
                    m.len(),
                    msg::MAX_MESSAGE_BYTES
                );
            }
            let b = connect(&conn).await?;
            if t.wait_s > 0 {
                subscribe_answers(&b, &topics, &[TopicKind::AclApplied, TopicKind::Rejected])
                    .await?;
            }
            b.publish(&topics.topic(TopicKind::AclDelta), m, false)
                .await?;
            println!("delta v{base} -> v{acl_version} sent");
            finish(b, acl_version, t.wait_s).await
        }
        CloudCommand::Revoke {
            endpoint_key,
            sign,
            target: t,
            conn,
        } => {
            let mut args = serde_json::Map::new();
            args.insert("endpoint_key".into(), endpoint_key.into());
            send_command("revoke_now", args, true, &sign, &t, &conn).await
        }
        CloudCommand::Command {
            name,
            args,
            wait,
            sign,
            target: t,
            conn,
        } => {
            let mut map = serde_json::Map::new();
            for a in args {
                let Some((k, v)) = a.split_once('=') else {
                    bail!("--arg {a:?}: expected key=value");
                };
                map.insert(k.to_owned(), v.into());
            }
            send_command(&name, map, wait, &sign, &t, &conn).await
        }
        CloudCommand::Events {
            follow,
            ack,
            idle,
            scope,
            conn,
        } => {
            let mut b = connect(&conn).await?;
            b.subscribe(&Topics::fleet_filter(&scope.prefix, TopicKind::Events))
                .await?;
            b.subscribe(&Topics::fleet_filter(&scope.prefix, TopicKind::Notes))
                .await?;
            let idle = Duration::from_secs(idle.max(1));
            loop {
                let got = if follow {
                    b.recv(Duration::from_secs(3600)).await
                } else {
                    b.recv(idle).await
                };
                let Some((topic, payload)) = got else {
                    if follow {
                        continue;
                    }
                    break;
                };
                let Some((site, gw, kind)) = Topics::parse_fleet(&scope.prefix, &topic) else {
                    continue;
                };
                if kind == TopicKind::Notes {
                    let Ok(batch) = serde_json::from_slice::<msg::NotesMsg>(&payload) else {
                        eprintln!("{topic}: not a notes batch");
                        continue;
                    };
                    print_lines(&batch.notes, &site, &gw, ("note", true))?;
                    if let (true, Some(last)) = (ack, batch.notes.last()) {
                        let topics = Topics::new(&scope.prefix, &site, &gw)?;
                        b.ack_notes(&topics, &batch.instance, last.seq).await?;
                    }
                    continue;
                }
                let Ok(batch) = serde_json::from_slice::<msg::EventsMsg>(&payload) else {
                    eprintln!("{topic}: not an events batch");
                    continue;
                };
                print_lines(&batch.events, &site, &gw, ("replay", batch.replay))?;
                if ack {
                    if let Some(last) = batch.events.last() {
                        let topics = Topics::new(&scope.prefix, &site, &gw)?;
                        b.ack_events(&topics, &batch.instance, last.seq).await?;
                    }
                }
            }
            b.disconnect().await;
            Ok(ExitCode::SUCCESS)
        }
        CloudCommand::Fleet {
            listen,
            scope,
            conn,
        } => {
            let mut b = connect(&conn).await?;
            for k in [
                TopicKind::State,
                TopicKind::Heartbeat,
                TopicKind::AclApplied,
            ] {
                b.subscribe(&Topics::fleet_filter(&scope.prefix, k)).await?;
            }
            let mut fleet: std::collections::BTreeMap<(String, String), serde_json::Value> =
                Default::default();
            let deadline = Instant::now() + Duration::from_secs(listen);
            while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                let Some((topic, payload)) = b.recv(left).await else {
                    break;
                };
                let Some((site, gw, kind)) = Topics::parse_fleet(&scope.prefix, &topic) else {
                    continue;
                };
                let v: serde_json::Value = serde_json::from_slice(&payload).unwrap_or_default();
                let entry = fleet
                    .entry((site, gw))
                    .or_insert_with(|| serde_json::json!({}));
                if let Some(o) = entry.as_object_mut() {
                    o.insert(kind.suffix().into(), v);
                }
            }
            for ((site, gw), v) in &fleet {
                let state = at(v, &["state"]);
                println!(
                    "{site}/{gw}: {} boot {} bd_seq {} acl v{} outbox {} rejected {}",
                    at(state, &["state"]).as_str().unwrap_or("?"),
                    at(state, &["boot"]),
                    at(state, &["bd_seq"]),
                    at(v, &["heartbeat", "acl", "version"])
                        .as_u64()
                        .or(at(v, &["acl/applied", "version"]).as_u64())
                        .or(at(state, &["acl_version"]).as_u64())
                        .map(|x| x.to_string())
                        .unwrap_or_else(|| "-".into()),
                    at(v, &["heartbeat", "outbox", "depth"]),
                    at(v, &["heartbeat", "rejected"]),
                );
            }
            b.disconnect().await;
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn finish(mut b: Backend, version: u64, wait_s: u64) -> anyhow::Result<ExitCode> {
    let code = if wait_s > 0 {
        wait_applied(&mut b, version, wait_s).await?
    } else {
        ExitCode::SUCCESS
    };
    b.disconnect().await;
    Ok(code)
}

fn read_bounded(path: &Path) -> anyhow::Result<Vec<u8>> {
    use std::io::Read;
    let mut buf = Vec::new();
    std::fs::File::open(path)?
        .take(msg::MAX_SNAPSHOT_BYTES + 1)
        .read_to_end(&mut buf)?;
    if buf.len() as u64 > msg::MAX_SNAPSHOT_BYTES {
        bail!(
            "{} is larger than {} bytes",
            path.display(),
            msg::MAX_SNAPSHOT_BYTES
        );
    }
    Ok(buf)
}

/// One JSON line per item, with its site, gateway and one flag (`keyway cloud events`).
fn print_lines<T: serde::Serialize>(
    items: &[T],
    site: &str,
    gateway: &str,
    flag: (&str, bool),
) -> Result<(), serde_json::Error> {
    for item in items {
        let mut v = serde_json::to_value(item)?;
        if let Some(o) = v.as_object_mut() {
            o.insert("site".into(), site.into());
            o.insert("gateway".into(), gateway.into());
            o.insert(flag.0.into(), flag.1.into());
        }
        println!("{v}");
    }
    Ok(())
}
