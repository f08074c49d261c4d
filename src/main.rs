//! `keyway`: the command line. Errors here are `anyhow`; the library has typed errors.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use keyway::acl::{ImportMode, Store};
use keyway::{config, daemon, logging};

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
    Run {
        /// Where logs go: auto = journald under systemd, stderr otherwise.
        #[arg(long, value_enum, default_value = "auto")]
        log: LogTarget,
    },
    /// Validate the configuration file and the key files it names; non-zero exit when invalid.
    CheckConfig,
    /// Manage the local access-control list.
    Acl {
        #[command(subcommand)]
        command: AclCommand,
    },
    /// Show the most recent access events from the local store.
    Events {
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print the version.
    Version,
}

#[derive(Subcommand)]
enum AclCommand {
    /// Load credentials from a JSON or CSV file (see docs/acl-format.md), in one transaction.
    Import {
        file: PathBuf,
        /// Add to / update the current ACL instead of replacing it.
        #[arg(long)]
        merge: bool,
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
            eprintln!("keyway: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Version => {
            println!("keyway {}", env!("CARGO_PKG_VERSION"));
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig => {
            let cfg = config::load(&cli.config)?;
            println!(
                "{}: ok ({} door{}, database {})",
                cli.config.display(),
                cfg.doors.len(),
                if cfg.doors.len() == 1 { "" } else { "s" },
                cfg.daemon.database.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Acl {
            command: AclCommand::Import { file, merge },
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
            let summary = match store.import_file(&file, mode) {
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
            Ok(ExitCode::SUCCESS)
        }
        Command::Events { limit, json } => {
            let cfg = config::load(&cli.config)?;
            let store = open_store(&cfg.daemon.database)?;
            let events = store.recent_events(limit as usize)?;
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
