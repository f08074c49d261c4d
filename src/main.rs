//! `keyway`: the command line. Errors here are `anyhow`; the library has typed errors.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use keyway::acl::{ImportMode, Store};
use keyway::{config, daemon, logging};

mod cloud_cli;

#[derive(Parser)]
#[command(
    name = "keyway",
    version,
    about = "Phones open doors: Aliro over NFC, ACL in SQLite, OSDP to the panel"
)]
struct Cli {
    /// Configuration file.
    #[arg(long, short, global = true, default_value = config::DEFAULT_PATH)]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway daemon (foreground; systemd supervises it).
    #[command(after_help = "Example:\n  keyway --config /etc/keyway/keyway.toml run --log stderr")]
    Run {
        /// Where logs go: auto = journald under systemd, stderr otherwise.
        #[arg(long, value_enum, default_value = "auto")]
        log: LogTarget,
    },
    /// Validate the configuration file, the key files it names, the serial ports and that the
    /// database and OSDP key directories can be written; non-zero exit when anything is wrong.
    #[command(after_help = "Example:\n  keyway --config /etc/keyway/keyway.toml check-config")]
    CheckConfig,
    /// Create a door's reader identity: a P-256 reader key (PKCS#8 PEM, mode 0600) and the
    /// Aliro group_id/sub_id; prints the door's `aliro` line for keyway.toml and what the
    /// credential issuer needs (docs/provisioning.md).
    #[command(after_help = "Examples:\n  \
        keyway keygen --door front --out /etc/keyway/keys/front.pem\n  \
        # a second reader of the same group (same key and group_id, its own sub_id):\n  \
        keyway keygen --door back --key /etc/keyway/keys/front.pem --group-id <32 hex>")]
    Keygen {
        /// The door id the snippet is for (as in keyway.toml and the ACL).
        #[arg(long)]
        door: String,
        /// Write a new reader key here (refuses to overwrite an existing file).
        #[arg(long, conflicts_with = "key", required_unless_present = "key")]
        out: Option<PathBuf>,
        /// Reuse this existing reader key (a reader of an existing group).
        #[arg(long, requires = "group_id")]
        key: Option<PathBuf>,
        /// The reader group's id (32 hex digits); default: a new random one.
        #[arg(long)]
        group_id: Option<String>,
    },
    /// Manage the local access-control list.
    #[command(after_help = "Example:\n  keyway acl import credentials.json")]
    Acl {
        #[command(subcommand)]
        command: AclCommand,
    },
    /// Show the most recent access events from the local store.
    #[command(
        after_help = "Examples:\n  keyway events --limit 50\n  keyway events --json | jq .event.decision"
    )]
    Events {
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Ask the running daemon for its live state (doors, ACL, outbox, problems); non-zero
    /// exit when it is not running or reports a problem.
    ///
    /// Example: `keyway status` (human), `keyway status --json | jq .problems`
    Status {
        /// The snapshot as JSON, for scripts.
        #[arg(long)]
        json: bool,
        /// Socket to ask (default: daemon.status_socket from the configuration).
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// An installer's checklist: config, keys, database, pcscd and readers, serial port and
    /// panel polling, secure channel, Bluetooth, clock, disk. Non-zero exit when a check fails.
    /// Stop keyway first: doctor listens on the serial port itself.
    ///
    /// Example: `systemctl stop keyway && keyway doctor; systemctl start keyway`
    Doctor {
        /// Seconds to listen for the panel's polls on each serial port.
        #[arg(long, default_value_t = 3)]
        sniff_secs: u64,
        /// The checklist as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The backend tool: signing keys, signed ACL snapshots/deltas and commands over MQTT,
    /// event tail with acks, fleet state (docs/mqtt-api.md).
    Cloud {
        #[command(subcommand)]
        command: Box<cloud_cli::CloudCommand>,
    },
    /// Print the version.
    #[command(after_help = "Example:\n  keyway version")]
    Version,
}

#[derive(Subcommand)]
enum AclCommand {
    /// How many credentials are loaded, when and from what the ACL last changed, and the event
    /// store's size.
    #[command(after_help = "Example:\n  keyway acl show")]
    Show,
    /// Load credentials from a JSON or CSV file (see docs/acl-format.md), in one transaction.
    #[command(
        after_help = "Examples:\n  keyway acl import credentials.json\n  keyway acl import --merge new-hires.csv"
    )]
    Import {
        file: PathBuf,
        /// Add to / update the current ACL instead of replacing it.
        #[arg(long)]
        merge: bool,
        /// Import even if the file names doors this configuration does not have (an ACL
        /// shared by several gateways); they are listed as a warning. Without it such a file
        /// is refused.
        #[arg(long)]
        allow_unknown_doors: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum LogTarget {
    Auto,
    Journal,
    Stderr,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("keyway: {}", render_error(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each said once: many library errors already print their source
/// in their own message ("cannot read config file x: No such file (os error 2)"), and `{:#}`
/// would repeat it.
fn render_error(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Version => {
            println!("keyway {}", env!("CARGO_PKG_VERSION"));
            Ok(ExitCode::SUCCESS)
        }
        Command::Keygen {
            door,
            out,
            key,
            group_id,
        } => keygen(&door, out.as_deref(), key.as_deref(), group_id.as_deref()),
        Command::Cloud { command } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            rt.block_on(cloud_cli::run(*command))
        }
        Command::CheckConfig => {
            let cfg = config::load(&cli.config)?;
            let problems = config::preflight::check(&cfg);
            for p in &problems {
                let what = if p.fatal { "" } else { "warning: " };
                eprintln!("keyway: {what}config file {}: {p}", cli.config.display());
            }
            if problems.iter().any(|p| p.fatal) {
                return Ok(ExitCode::FAILURE);
            }
            println!(
                "{}: ok ({} door{}, database {})",
                cli.config.display(),
                cfg.doors.len(),
                if cfg.doors.len() == 1 { "" } else { "s" },
                cfg.daemon.database.display()
            );
            if let Some(c) = &cfg.cloud {
                println!(
                    "cloud: {}/{} on {} broker{} (prefix {})",
                    c.site,
                    c.gateway,
                    c.brokers.len(),
                    if c.brokers.len() == 1 { "" } else { "s" },
                    c.prefix
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Acl {
            command:
                AclCommand::Import {
                    file,
                    merge,
                    allow_unknown_doors,
                },
        } => {
            let cfg = config::load(&cli.config)?;
            // Beside a running daemon the import yields the CPU to taps.
            keyway::acl::apply::background_priority();
            let mut store = open_store(&cfg.daemon.database)?;
            let mode = if merge {
                ImportMode::Merge
            } else {
                ImportMode::Replace
            };
            let options = keyway::acl::import::ImportOptions {
                known_doors: Some(cfg.doors.iter().map(|d| d.id.clone()).collect()),
                allow_unknown_doors,
            };
            let summary = match store.import_file_with(&file, mode, &options) {
                Ok(s) => s,
                Err(e) if e.is_file_problem() => {
                    return Err(anyhow::Error::new(e).context(format!(
                        "ACL file {} rejected, nothing changed",
                        file.display()
                    )))
                }
                // The file was fine: the database is to blame (busy, damaged, full).
                Err(e) => {
                    return Err(anyhow::Error::new(e)
                        .context("the ACL was not applied, the previous one stays in force"))
                }
            };
            println!(
                "{}: {} credentials ({} mode): {} added, {} updated, {} removed",
                file.display(),
                summary.credentials,
                summary.mode.as_str(),
                summary.inserted,
                summary.updated,
                summary.removed
            );
            if !summary.unknown_doors.is_empty() {
                eprintln!(
                    "keyway: warning: {} names doors that are not in {}: {} (imported: \
                     --allow-unknown-doors; those entries never match a tap here)",
                    file.display(),
                    cli.config.display(),
                    summary.unknown_doors
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Acl {
            command: AclCommand::Show,
        } => {
            let cfg = config::load(&cli.config)?;
            let store = open_existing_store(&cfg.daemon.database)?;
            let st = store.stats()?;
            println!("database     {}", cfg.daemon.database.display());
            println!(
                "credentials  {} ({} persons, {} door grants)",
                st.credentials, st.persons, st.door_grants
            );
            match &st.last_import {
                Some(li) => println!(
                    "last import  {} from {} ({} mode, {} credentials)",
                    format_ms(li.at.saturating_mul(1000)),
                    li.source,
                    li.mode,
                    li.count
                ),
                None => println!("last import  never (keyway acl import FILE)"),
            }
            println!(
                "events       {} stored, {} not yet delivered",
                st.events_total, st.events_undelivered
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Events { limit, json } => {
            let cfg = config::load(&cli.config)?;
            let store = open_existing_store(&cfg.daemon.database)?;
            let events = store.recent_events(limit as usize)?;
            if events.is_empty() {
                // stderr: stdout stays empty for scripts reading --json.
                eprintln!("keyway: no events yet in {}", cfg.daemon.database.display());
            }
            // Oldest first, like a log.
            for stored in events.iter().rev() {
                if json {
                    println!("{}", serde_json::to_string(stored)?);
                } else {
                    let e = &stored.event;
                    println!(
                        "{:>6}  {}  {:<12} {:<4} {:<8} {:<14} key {:<16} person {:<12} {:>5} ms  panel {}",
                        stored.id,
                        format_ms(e.time_ms),
                        e.door,
                        e.transport.as_str(),
                        e.decision.as_str(),
                        e.reason,
                        e.endpoint_fingerprint.as_deref().unwrap_or("-"),
                        e.person_id.as_deref().unwrap_or("-"),
                        e.latency_ms,
                        stored.panel_verdict.as_deref().unwrap_or("-")
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { json, socket } => {
            let path = match socket {
                Some(p) => p,
                // Not `load`: a member of group keyway may not read the daemon's keys.
                None => match config::read(&cli.config) {
                    Ok(c) => c.daemon.status_socket,
                    Err(config::ConfigError::Read { path, source })
                        if source.kind() == std::io::ErrorKind::PermissionDenied =>
                    {
                        anyhow::bail!(
                            "permission denied reading {}: keyway status is for root and members of group keyway (sudo usermod -aG keyway $USER, then log in again)",
                            path.display()
                        )
                    }
                    Err(e) => return Err(e.into()),
                },
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let snapshot = rt.block_on(keyway::status::server::query(
                &path,
                std::time::Duration::from_secs(5),
            ))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&snapshot)?);
            } else {
                print!("{}", snapshot.render());
            }
            // Scripts and monitoring: 2 = running but something stops a door.
            Ok(if snapshot.problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
        Command::Doctor { sniff_secs, json } => {
            // An invalid config is the first failure, with its own message and fix.
            let cfg = match config::load(&cli.config) {
                Ok(c) => c,
                Err(e) => {
                    println!("[FAIL] config: {e}");
                    println!("       fix: correct the field named above, then keyway check-config");
                    return Ok(ExitCode::FAILURE);
                }
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let checks = rt.block_on(keyway::doctor::run(
                &cfg,
                std::time::Duration::from_secs(sniff_secs.clamp(1, 60)),
            ));
            if json {
                println!("{}", serde_json::to_string_pretty(&checks)?);
            } else {
                print!("{}", keyway::doctor::render(&checks));
            }
            let failed = checks
                .iter()
                .any(|c| c.outcome == keyway::doctor::Outcome::Fail);
            Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Run { log } => {
            let cfg = config::load(&cli.config)?;
            let target = match log {
                LogTarget::Auto => logging::Target::Auto,
                LogTarget::Journal => logging::Target::Journal,
                LogTarget::Stderr => logging::Target::Stderr,
            };
            logging::init(target, cfg.log_level);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            rt.block_on(daemon::run(cfg))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `keyway keygen`: see docs/provisioning.md for what the ids mean and who needs them.
fn keygen(
    door: &str,
    out: Option<&Path>,
    key: Option<&Path>,
    group_id: Option<&str>,
) -> anyhow::Result<ExitCode> {
    use p256::pkcs8::{EncodePrivateKey, LineEnding};
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if !config::valid_door_id(door) {
        anyhow::bail!(
            "--door {door:?}: must be 1-64 characters of letters, digits, '-', '_', '.' or ':'"
        );
    }
    let group_id = match group_id {
        Some(g) => {
            let bytes = hex::decode(g.trim())
                .ok()
                .filter(|b| b.len() == 16)
                .ok_or_else(|| anyhow::anyhow!("--group-id: must be 32 hex digits"))?;
            hex::encode(bytes)
        }
        None => hex::encode(random16()),
    };
    let sub_id = hex::encode(random16());
    let (secret, path) = match (out, key) {
        (_, Some(existing)) => (config::load_private_key(existing)?, existing),
        (Some(out), None) => {
            let secret = p256::SecretKey::random(&mut rand_core::OsRng);
            let pem = secret
                .to_pkcs8_pem(LineEnding::LF)
                .map_err(|_| anyhow::anyhow!("encoding the new key failed"))?;
            // create_new: never overwrite a reader key (phones trust it).
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(out)
                .with_context(|| format!("--out {}: cannot create the key file", out.display()))?;
            f.write_all(pem.as_bytes())
                .and_then(|()| f.sync_all())
                .with_context(|| format!("--out {}: writing the key", out.display()))?;
            (secret, out)
        }
        (None, None) => anyhow::bail!("give --out FILE (new key) or --key FILE (existing key)"),
    };
    let public = hex::encode(
        p256::elliptic_curve::sec1::ToEncodedPoint::to_encoded_point(&secret.public_key(), false)
            .as_bytes(),
    );
    // stdout is the keyway.toml snippet; stderr says what goes to the credential issuer.
    println!("[[door]]\nid = {door:?}");
    println!(
        "aliro = {{ group_id = \"{group_id}\", sub_id = \"{sub_id}\", private_key_file = {:?} }}",
        path.display().to_string()
    );
    eprintln!(
        "keyway: door {door:?}: reader group id {group_id}, reader public key {public}\n\
         keyway: give both to the credential issuer: phones accept a reader that signs with \
         this key for this group id (docs/provisioning.md). If keyway runs as user keyway: \
         chown keyway {}",
        path.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn random16() -> [u8; 16] {
    use rand_core::RngCore;
    let mut b = [0u8; 16];
    rand_core::OsRng.fill_bytes(&mut b);
    b
}

/// For read-only commands: a wrong path must not create a new, empty database.
fn open_existing_store(path: &Path) -> anyhow::Result<Store> {
    if !path.exists() {
        anyhow::bail!(
            "no database at {} (daemon.database in the config): keyway creates it on its first \
             `run` or `acl import`; is --config the file the daemon uses?",
            path.display()
        );
    }
    open_store(path)
}

fn open_store(path: &Path) -> anyhow::Result<Store> {
    Store::open(path).with_context(|| format!("opening the store {}", path.display()))
}

fn format_ms(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000);
    match t {
        Ok(t) => {
            let f = time::macros::format_description!(
                "[year]-[month]-[day] [hour]:[minute]:[second].[subsecond digits:3]Z"
            );
            t.format(&f).unwrap_or_else(|_| ms.to_string())
        }
        Err(_) => ms.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// clap's own consistency checks over every subcommand (unique argument ids, valid
    /// defaults): a clash panics only when that subcommand is parsed in a debug build, so
    /// `keyway cloud revoke` once died on its own `key` argument.
    #[test]
    fn every_subcommand_is_consistent() {
        Cli::command().debug_assert();
    }
}
