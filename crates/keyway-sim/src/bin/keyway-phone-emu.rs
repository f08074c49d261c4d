//! keyway-phone-emu: an emulated Aliro phone for benches and hardware-in-the-loop tests.
//!
//! It plays the User Device behind vsmartcard's virtual reader (vpcd), so the real pcscd and
//! keyway's PC/SC code see a phone tap:
//!
//! ```text
//! keyway-phone-emu keygen --out phone.pem            # prints the public key (hex, 04||X||Y)
//! keyway-phone-emu pubkey --key phone.pem
//! keyway-phone-emu tap --vpcd 127.0.0.1:35963 --endpoint-key phone.pem \
//!     --reader-group-id 00112233445566778899aabbccddeeff --reader-group-key 04ab... --json
//! keyway-phone-emu card --vpcd 127.0.0.1:35963 --uid 04A1B2C3D4E5F6   # UID-only card
//! keyway-phone-emu acl-file --count 5000000 --out acl.json   # synthetic ACL (benchmarks)
//! ```
//!
//! `tap --user-verified` reports biometric/PIN verification (sensitive doors).
//!
//! Key files: the endpoint private key is PEM PKCS#8 (`-----BEGIN PRIVATE KEY-----`), written
//! with mode 0600 by `keygen`; SEC1 PEM (`BEGIN EC PRIVATE KEY`) and a bare 32-byte hex scalar
//! are accepted on input too. A reader group public key is given as hex of the uncompressed
//! SEC1 point, or as a file holding that hex or a PEM `PUBLIC KEY`.
//!
//! `tap` prints one line per tap (`--json`: one JSON object per line, e.g.
//! `{"tap":1,"result":"completed","reader_status":"0101","fast":false,...}`). Exit status: 0 the
//! reader completed the transaction (any reader status), 2 the reader ended it with CONTROL
//! FLOW, 3 the phone refused a command (e.g. bad reader signature), 4 the reader never finished
//! before the timeout or hung up, 1 any other error. With `--count N` the first tap that did not
//! complete decides the status.

use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use keyway_sim::vpcd::{self, ServeEnd, TapOptions, VirtualCard};
use keyway_sim::{Endpoint, EndpointConfig, OsRandom, Outcome, ReaderGroupCredential};
use p256::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, LineEnding};
use p256::{PublicKey, SecretKey};
use serde_json::json;
use zeroize::Zeroizing;

#[derive(Parser)]
#[command(
    name = "keyway-phone-emu",
    version,
    about = "Emulated Aliro phone on vpcd"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a new endpoint (phone) P-256 key; prints its public key in hex.
    Keygen {
        /// Where to write the PEM PKCS#8 private key (mode 0600).
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Print the public key (hex, uncompressed) of an endpoint key file.
    Pubkey {
        /// Endpoint private key file.
        #[arg(long)]
        key: PathBuf,
    },
    /// Put the phone on the reader once and report how the reader's transaction ended.
    Tap(Box<TapArgs>),
    /// Write a synthetic ACL file (benchmarks): `count` distinct valid keys `k·G` from
    /// `first`, all at `door`; `.csv` or `.json` (version 1) by the file name, streamed.
    AclFile {
        #[arg(long)]
        count: u64,
        #[arg(long, default_value_t = 1)]
        first: u64,
        #[arg(long, default_value = "front")]
        door: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Present a physical card without Aliro (UID only, for cutover doors): it refuses the
    /// Aliro SELECT and answers GET DATA with its UID. Exit 0 when the reader read the UID.
    Card {
        /// vpcd address (host:port) of the virtual reader slot.
        #[arg(long, default_value = "127.0.0.1:35963")]
        vpcd: String,
        /// Card UID, hex (4, 7 or 10 bytes).
        #[arg(long)]
        uid: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 10)]
        timeout_s: u64,
    },
}

#[derive(Args)]
struct TapArgs {
    /// vpcd address (host:port) of the virtual reader slot.
    #[arg(long, default_value = "127.0.0.1:35963")]
    vpcd: String,
    /// Endpoint private key file (PEM PKCS#8, SEC1 PEM or 32-byte hex).
    #[arg(long)]
    endpoint_key: PathBuf,
    /// Reader group public key: hex of the uncompressed point, or a file (hex or PEM).
    /// Repeat together with --reader-group-id for several groups.
    #[arg(long, required = true)]
    reader_group_key: Vec<String>,
    /// Reader group identifier (16 bytes hex), one per --reader-group-key, same order.
    #[arg(long, required = true)]
    reader_group_id: Vec<String>,
    /// How long the phone stays on the reader after the transaction, in ms.
    #[arg(long, default_value_t = 200)]
    hold_ms: u64,
    /// Give up when the reader has not finished within this many seconds (connecting included).
    #[arg(long, default_value_t = 10)]
    timeout_s: u64,
    /// Tap this many times in a row (one phone: keys learned in a tap serve FAST in the next).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    count: u32,
    /// Pause between taps, in ms.
    #[arg(long, default_value_t = 500)]
    gap_ms: u64,
    /// Print one JSON line per tap instead of text.
    #[arg(long)]
    json: bool,
    /// Print every C-APDU / R-APDU to stderr.
    #[arg(long)]
    trace: bool,
    /// Protocol version the phone supports (2 bytes hex); repeat for several. Default 0100.
    #[arg(long)]
    protocol_version: Vec<String>,
    /// Signaling bitmap (2 bytes hex) sent in the AUTH1 response.
    #[arg(long, default_value = "0000")]
    signaling_bitmap: String,
    /// Report user verification (biometric/PIN) in the signaling bitmap, as sensitive doors
    /// require (sets keyway::aliro::consts::SIGNALING_USER_VERIFIED_BIT).
    #[arg(long)]
    user_verified: bool,
    /// Credential signed timestamp (tag 91): exactly 20 ASCII characters, e.g.
    /// 2026-03-01T00:00:00Z.
    #[arg(long)]
    credential_timestamp: Option<String>,
    /// Accept any Le (kormax-style readers send Le on CONTROL FLOW).
    #[arg(long)]
    lenient_le: bool,
    /// Never answer FAST with a real cryptogram (forces the reader to fall back).
    #[arg(long)]
    no_fast: bool,
    /// Fault: sign the device authentication data over an all-zero transaction identifier.
    #[arg(long)]
    fault_device_signature: bool,
    /// ATR presented to the reader (hex); default is the PC/SC contactless `3B8080 0101`.
    #[arg(long)]
    atr: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("keyway-phone-emu: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::AclFile {
            count,
            first,
            door,
            out,
        } => {
            let ext = out.extension().and_then(|e| e.to_str()).unwrap_or_default();
            let write = match ext.to_ascii_lowercase().as_str() {
                "csv" => keyway_sim::acl::write_csv,
                "json" => keyway_sim::acl::write_json,
                _ => bail!("{}: the name must end in .csv or .json", out.display()),
            };
            write(&out, first, count, &door).with_context(|| format!("{}", out.display()))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Keygen { out, force } => {
            keygen(&out, force)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Pubkey { key } => {
            let key = load_secret_key(&key)?;
            println!("{}", hex::encode(sec1(&key.public_key())));
            Ok(ExitCode::SUCCESS)
        }
        Command::Card {
            vpcd,
            uid,
            timeout_s,
        } => {
            let uid = hex::decode(uid.trim()).map_err(|_| anyhow!("--uid: not hex"))?;
            if !keyway::acl::cards::is_valid_uid(&uid) {
                bail!("--uid: a card UID is 4, 7 or 10 bytes");
            }
            let addr = resolve(&vpcd)?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let mut card = keyway_sim::UidCard::new(&uid);
            let opts = TapOptions {
                timeout: Duration::from_secs(timeout_s),
                hold: Duration::from_millis(200),
                atr: keyway_sim::card::MIFARE_1K_ATR.to_vec(),
                ..TapOptions::default()
            };
            let summary = runtime
                .block_on(vpcd::tap(addr, &mut card, &opts))
                .context("presenting the card")?;
            println!(
                "card {}: uid {}",
                hex::encode(&uid),
                if card.uid_read() { "read" } else { "not read" }
            );
            Ok(if summary.finished {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(4)
            })
        }
        Command::Tap(args) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(tap(*args))
        }
    }
}

fn sec1(key: &PublicKey) -> [u8; 65] {
    keyway::aliro::crypto::public_key_sec1(key)
}

fn keygen(out: &Path, force: bool) -> Result<()> {
    let key = SecretKey::random(&mut rand_core::OsRng);
    let pem = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| anyhow!("encoding the key: {e}"))?;
    write_private(out, pem.as_bytes(), force)?;
    println!("{}", hex::encode(sec1(&key.public_key())));
    Ok(())
}

/// Write a secret file readable by its owner only, created with that mode (no window where
/// it is world-readable).
fn write_private(path: &Path, bytes: &[u8], force: bool) -> Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true);
    if force {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        opts.mode(0o600);
        let mut f = opts
            .open(path)
            .with_context(|| format!("creating {}", path.display()))?;
        // An existing file keeps its old mode through truncate: force 0600.
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("chmod 600 {}", path.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("writing {}", path.display()))?;
        f.sync_all()?;
    }
    #[cfg(not(unix))]
    {
        let mut f = opts
            .open(path)
            .with_context(|| format!("creating {}", path.display()))?;
        f.write_all(bytes)?;
    }
    Ok(())
}

fn load_secret_key(path: &Path) -> Result<SecretKey> {
    let text = Zeroizing::new(
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
    );
    let t = text.trim();
    if t.contains("BEGIN PRIVATE KEY") {
        return SecretKey::from_pkcs8_pem(t)
            .map_err(|_| anyhow!("{}: not a valid PKCS#8 P-256 key", path.display()));
    }
    if t.contains("BEGIN EC PRIVATE KEY") {
        return SecretKey::from_sec1_pem(t)
            .map_err(|_| anyhow!("{}: not a valid SEC1 P-256 key", path.display()));
    }
    let raw = Zeroizing::new(
        hex::decode(t).map_err(|_| anyhow!("{}: neither PEM nor hex", path.display()))?,
    );
    if raw.len() != 32 {
        bail!("{}: a hex key must be 32 bytes", path.display());
    }
    SecretKey::from_slice(&raw).map_err(|_| anyhow!("{}: invalid P-256 scalar", path.display()))
}

fn parse_public_key(arg: &str) -> Result<PublicKey> {
    let path = Path::new(arg);
    let text = if path.is_file() {
        std::fs::read_to_string(path).with_context(|| format!("reading {arg}"))?
    } else {
        arg.to_owned()
    };
    let t = text.trim();
    if t.contains("BEGIN PUBLIC KEY") {
        return PublicKey::from_public_key_pem(t)
            .map_err(|_| anyhow!("{arg}: not a P-256 public key"));
    }
    let raw = hex::decode(t).map_err(|_| anyhow!("reader group key: not hex, PEM or a file"))?;
    if raw.len() != 65 || raw.first() != Some(&0x04) {
        bail!(
            "reader group key: expected 65 bytes 04||X||Y, got {}",
            raw.len()
        );
    }
    PublicKey::from_sec1_bytes(&raw).map_err(|_| anyhow!("reader group key: not on P-256"))
}

fn parse_hex_array<const N: usize>(what: &str, s: &str) -> Result<[u8; N]> {
    let raw = hex::decode(s.trim()).map_err(|_| anyhow!("{what}: not hex"))?;
    <[u8; N]>::try_from(raw.as_slice())
        .map_err(|_| anyhow!("{what}: expected {N} bytes, got {}", raw.len()))
}

fn build_config(args: &TapArgs) -> Result<EndpointConfig> {
    if args.reader_group_key.len() != args.reader_group_id.len() {
        bail!("give one --reader-group-id per --reader-group-key");
    }
    let credentials = args
        .reader_group_id
        .iter()
        .zip(&args.reader_group_key)
        .map(|(id, key)| {
            Ok(ReaderGroupCredential {
                group_id: parse_hex_array::<16>("reader group id", id)?,
                reader_group_key: parse_public_key(key)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let mut config = EndpointConfig::new(load_secret_key(&args.endpoint_key)?, credentials);
    if !args.protocol_version.is_empty() {
        config.protocol_versions = args
            .protocol_version
            .iter()
            .map(|v| parse_hex_array::<2>("protocol version", v))
            .collect::<Result<Vec<_>>>()?;
    }
    config.signaling_bitmap = u16::from_be_bytes(parse_hex_array::<2>(
        "signaling bitmap",
        &args.signaling_bitmap,
    )?);
    if args.user_verified {
        config.signaling_bitmap |= keyway::aliro::consts::SIGNALING_USER_VERIFIED_BIT;
    }
    if let Some(ts) = &args.credential_timestamp {
        config.credential_timestamp = Some(
            <[u8; 20]>::try_from(ts.as_bytes())
                .map_err(|_| anyhow!("credential timestamp must be 20 characters"))?,
        );
    }
    config.strict_le = !args.lenient_le;
    config.fast_enabled = !args.no_fast;
    if args.fault_device_signature {
        config.faults.device_signature_transaction_id = Some([0u8; 16]);
    }
    Ok(config)
}

/// Prints the APDU traffic to stderr around the real endpoint.
struct Traced<'a> {
    inner: &'a mut Endpoint,
    start: Instant,
}

impl VirtualCard for Traced<'_> {
    fn power_event(&mut self, code: u8) {
        eprintln!(
            "{:>6} ms  power {code:02X}",
            self.start.elapsed().as_millis()
        );
        self.inner.power_event(code);
    }

    fn transmit(&mut self, c_apdu: &[u8]) -> Vec<u8> {
        let ms = self.start.elapsed().as_millis();
        eprintln!("{ms:>6} ms  C: {}", hex::encode(c_apdu));
        let r = self.inner.transmit(c_apdu);
        eprintln!(
            "{:>6} ms  R: {}",
            self.start.elapsed().as_millis(),
            hex::encode(&r)
        );
        r
    }

    fn transaction_finished(&self) -> bool {
        self.inner.transaction_finished()
    }
}

fn resolve(addr: &str) -> Result<SocketAddr> {
    addr.to_socket_addrs()
        .with_context(|| format!("resolving {addr}"))?
        .next()
        .ok_or_else(|| anyhow!("{addr} resolves to nothing"))
}

async fn tap(args: TapArgs) -> Result<ExitCode> {
    let config = build_config(&args)?;
    let public_key = hex::encode(config.public_key_sec1());
    let addr = resolve(&args.vpcd)?;
    let mut opts = TapOptions {
        timeout: Duration::from_secs(args.timeout_s),
        hold: Duration::from_millis(args.hold_ms),
        ..TapOptions::default()
    };
    if let Some(atr) = &args.atr {
        opts.atr = hex::decode(atr).map_err(|_| anyhow!("--atr: not hex"))?;
    }
    let mut endpoint = Endpoint::new(config, Box::new(OsRandom));
    // The exit status is the first tap that did not complete, else success.
    let mut exit = 0u8;
    for n in 1..=args.count {
        if n > 1 {
            tokio::time::sleep(Duration::from_millis(args.gap_ms)).await;
        }
        let code = tap_once(&args, addr, &opts, &mut endpoint, &public_key, n).await?;
        if exit == 0 {
            exit = code;
        }
    }
    Ok(ExitCode::from(exit))
}

/// One tap; prints its report and returns its exit code.
async fn tap_once(
    args: &TapArgs,
    addr: SocketAddr,
    opts: &TapOptions,
    endpoint: &mut Endpoint,
    public_key: &str,
    n: u32,
) -> Result<u8> {
    let start = Instant::now();
    let summary = if args.trace {
        let mut traced = Traced {
            inner: endpoint,
            start,
        };
        vpcd::tap(addr, &mut traced, opts).await
    } else {
        vpcd::tap(addr, endpoint, opts).await
    }
    .with_context(|| format!("tap on vpcd {addr}"))?;
    let elapsed_ms = start.elapsed().as_millis();

    // The outcome that finished the tap is the first one; later ones came during the hold.
    let outcomes = endpoint.take_outcomes();
    let first = outcomes.first();
    let (result, code) = match first {
        Some(Outcome::Completed { .. }) => ("completed", 0u8),
        Some(Outcome::ControlFlow { .. }) => ("control_flow", 2),
        Some(Outcome::Rejected { .. }) => ("rejected", 3),
        None => ("no_transaction", 4),
    };
    let end = match summary.end {
        ServeEnd::Finished => "finished",
        ServeEnd::Stopped => "timeout",
        ServeEnd::PeerClosed => "reader_closed",
    };
    let mut report = json!({
        "tap": n,
        "result": result,
        "end": end,
        "apdus": summary.apdus,
        "power_events": summary.power_events,
        "elapsed_ms": elapsed_ms,
        "endpoint_public_key": public_key,
        "outcomes": outcomes.iter().map(outcome_json).collect::<Vec<_>>(),
    });
    if let (Some(first), Some(obj)) = (first, report.as_object_mut()) {
        if let Some(fields) = outcome_json(first).as_object() {
            for (k, v) in fields {
                if k != "kind" {
                    obj.insert(k.clone(), v.clone());
                }
            }
        }
    }
    if args.json {
        println!("{report}");
    } else {
        let detail = first
            .map(describe)
            .unwrap_or_else(|| "no outcome".to_owned());
        println!(
            "tap {n}: {result}: {detail} ({} APDUs, {elapsed_ms} ms, end: {end})",
            summary.apdus
        );
    }
    Ok(code)
}

fn outcome_json(o: &Outcome) -> serde_json::Value {
    match o {
        Outcome::Completed {
            reader_status,
            fast,
        } => json!({
            "kind": o.kind(),
            "reader_status": format!("{reader_status:04X}"),
            "fast": fast,
        }),
        Outcome::ControlFlow { s1, s2 } => json!({
            "kind": o.kind(),
            "s1": format!("{s1:02X}"),
            "s2": format!("{s2:02X}"),
        }),
        Outcome::Rejected { sw, reason } => json!({
            "kind": o.kind(),
            "sw": format!("{sw:04X}"),
            "reason": reason,
        }),
    }
}

fn describe(o: &Outcome) -> String {
    match o {
        Outcome::Completed {
            reader_status,
            fast,
        } => format!(
            "reader status {reader_status:04X}{}",
            if *fast { " (FAST)" } else { "" }
        ),
        Outcome::ControlFlow { s1, s2 } => format!("CONTROL FLOW S1={s1:02X} S2={s2:02X}"),
        Outcome::Rejected { sw, reason } => format!("phone answered {sw:04X}: {reason}"),
    }
}
