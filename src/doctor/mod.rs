//! `keyway doctor`: an installer's checklist. Each check passes, warns, fails or is skipped,
//! with a fix hint for anything that is not a pass; the exit code is non-zero when one fails.
//!
//! The serial check listens to the line as the panel drives it: [`PollSniffer`] (sans-IO, the
//! OSDP frame decoder) counts the panel's commands addressed to each door's PD. Run it with
//! the daemon stopped (it owns the port while it runs); the secure channel can only be seen
//! by the running daemon, so that check asks its status socket. The broker check connects to
//! each `[cloud]` broker with the link's own setup ([`Connector::probe`]); with the daemon
//! running it is skipped, as the probe's client id would take over the daemon's session.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::cloud::config::{BrokerUrl, CloudSettings};
use crate::cloud::link::{ConnectError, Connector, CONNECT_TIMEOUT};
use crate::config::Validated;
use crate::osdp::FrameDecoder;
use crate::status::model::{SecureChannel, Snapshot};
use crate::status::server::ClientError;
use crate::status::{probe, server};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Pass,
    Warn,
    Fail,
    Skip,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub outcome: Outcome,
    pub detail: String,
    /// What to do, for anything but a pass.
    pub hint: Option<String>,
}

fn check(name: &str, outcome: Outcome, detail: impl Into<String>, hint: Option<&str>) -> Check {
    Check {
        name: name.into(),
        outcome,
        detail: detail.into(),
        hint: hint.map(str::to_string),
    }
}

/// Counts the panel's commands (CP to PD frames) per PD address in the bytes of the line.
pub struct PollSniffer {
    decoder: FrameDecoder,
    seen: BTreeMap<u8, u32>,
}

impl Default for PollSniffer {
    fn default() -> Self {
        Self {
            decoder: FrameDecoder::new(Duration::from_millis(100)),
            seen: BTreeMap::new(),
        }
    }
}

impl PollSniffer {
    pub fn push(&mut self, bytes: &[u8], now: Instant) {
        let mut rest = bytes;
        // The decoder takes what fits its bounded buffer; feed the rest after draining.
        while !rest.is_empty() {
            let n = self.decoder.push(rest, now);
            while let Some(frame) = self.decoder.poll() {
                if let Ok(f) = frame {
                    if !f.is_reply() {
                        *self.seen.entry(f.address()).or_default() += 1;
                    }
                }
            }
            if n == 0 {
                break;
            }
            rest = rest.get(n..).unwrap_or_default();
        }
    }

    /// Commands seen for `address` (0x7F, broadcast, counts for every PD).
    pub fn commands_to(&self, address: u8) -> u32 {
        self.seen.get(&address).copied().unwrap_or(0) + self.seen.get(&0x7f).copied().unwrap_or(0)
    }
}

/// How long the serial check listens for the panel.
pub const SNIFF_FOR: Duration = Duration::from_secs(3);

/// Every check, in the order an installer fixes things.
pub async fn run(cfg: &Validated, sniff_for: Duration) -> Vec<Check> {
    let mut out = vec![check(
        "config",
        Outcome::Pass,
        format!(
            "{}: {} door(s); key files readable by keyway only",
            cfg.source.display(),
            cfg.doors.len()
        ),
        None,
    )];
    out.push(database(&cfg.daemon.database));
    out.extend(pcsc(cfg).await);
    out.extend(serial(cfg, sniff_for).await);
    // Some checks depend on whether keyway is running: ask it once.
    let daemon = server::query(&cfg.daemon.status_socket, Duration::from_secs(3)).await;
    out.extend(secure_channel(cfg, &daemon));
    out.extend(bluetooth(cfg).await);
    out.push(clock());
    out.push(disk(&cfg.daemon.database));
    out.extend(cloud(cfg, &daemon).await);
    out
}

fn database(path: &Path) -> Check {
    let name = "database";
    let hint_perm = "the directory and file must be writable by user keyway (packaged: /var/lib/keyway, StateDirectory)";
    if !path.exists() {
        let dir = path.parent().unwrap_or(Path::new("."));
        let probe = dir.join(".keyway-doctor-probe");
        let writable = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&probe)
            .is_ok();
        let _ = std::fs::remove_file(&probe);
        return if writable {
            check(
                name,
                Outcome::Warn,
                format!(
                    "{} does not exist yet (created at first start)",
                    path.display()
                ),
                Some("keyway acl import FILE creates it with the ACL"),
            )
        } else {
            check(
                name,
                Outcome::Fail,
                format!(
                    "{} missing and {} not writable",
                    path.display(),
                    dir.display()
                ),
                Some(hint_perm),
            )
        };
    }
    let conn = match rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE,
    ) {
        Ok(c) => c,
        Err(e) => {
            return check(
                name,
                Outcome::Fail,
                format!("{}: {e}", path.display()),
                Some(hint_perm),
            )
        }
    };
    let _ = conn.busy_timeout(Duration::from_secs(2));
    // Bounded: quick_check stops at the first 10 errors; a huge store still reads every page,
    // which is what "intact" means.
    match conn.query_row("PRAGMA quick_check(10)", [], |r| r.get::<_, String>(0)) {
        Ok(s) if s == "ok" => {}
        Ok(s) => return check(
            name,
            Outcome::Fail,
            format!("{} is damaged: {s}", path.display()),
            Some("stop keyway, move the file aside and re-import the ACL (events in it are lost)"),
        ),
        Err(e) => {
            return check(
                name,
                Outcome::Fail,
                format!("{}: {e}", path.display()),
                Some(hint_perm),
            )
        }
    }
    // Writable: an immediate transaction takes the write lock without changing anything.
    match conn.execute_batch("BEGIN IMMEDIATE; ROLLBACK;") {
        Ok(()) => check(
            name,
            Outcome::Pass,
            format!("{} intact and writable", path.display()),
            None,
        ),
        Err(e) => check(
            name,
            Outcome::Fail,
            format!("{} not writable: {e}", path.display()),
            Some(hint_perm),
        ),
    }
}

async fn pcsc(cfg: &Validated) -> Vec<Check> {
    let patterns: Vec<(String, String)> = cfg
        .doors
        .iter()
        .map(|d| (d.id.clone(), d.reader_pattern.clone()))
        .collect();
    let listed = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::task::spawn_blocking(|| {
            let ctx = pcsc::Context::establish(pcsc::Scope::User)?;
            match ctx.list_readers_owned() {
                Ok(r) => Ok(r),
                Err(pcsc::Error::NoReadersAvailable) => Ok(Vec::new()),
                Err(e) => Err(e),
            }
        }),
    )
    .await;
    let readers: Vec<String> = match listed {
        Ok(Ok(Ok(r))) => r.iter().map(|n| n.to_string_lossy().into_owned()).collect(),
        Ok(Ok(Err(e))) => {
            return vec![check(
                "pcscd",
                Outcome::Fail,
                format!("cannot reach pcscd: {e}"),
                Some("systemctl enable --now pcscd.socket; check with pcsc_scan"),
            )]
        }
        _ => {
            return vec![check(
                "pcscd",
                Outcome::Fail,
                "pcscd did not answer within 5 s",
                Some("systemctl restart pcscd"),
            )]
        }
    };
    let mut out = vec![check(
        "pcscd",
        Outcome::Pass,
        format!(
            "reachable; readers: {}",
            if readers.is_empty() {
                "none".to_string()
            } else {
                readers.join(", ")
            }
        ),
        None,
    )];
    for (door, pattern) in patterns {
        let found = readers
            .iter()
            .find(|r| crate::config::reader_matches(&pattern, r));
        out.push(match found {
            Some(r) => check(&format!("door {door}: reader"), Outcome::Pass, format!("{r} matches {pattern:?}"), None),
            None => check(&format!("door {door}: reader"), Outcome::Fail, format!("no reader matches {pattern:?}"), Some("plug the reader in; or set nfc.reader to a name listed above (a '*' pattern works)")),
        });
    }
    out
}

async fn serial(cfg: &Validated, sniff_for: Duration) -> Vec<Check> {
    let mut out = Vec::new();
    for (port, doors) in cfg.buses() {
        let name = format!("serial {}", port.display());
        let baud = doors.first().map(|d| d.baud).unwrap_or(9600);
        let opened = tokio_serial::SerialPortBuilderExt::open_native_async(tokio_serial::new(
            port.to_string_lossy(),
            baud,
        ));
        let mut stream = match opened {
            Ok(s) => s,
            Err(e) => {
                out.push(check(&name, Outcome::Fail, format!("cannot open: {e}"), Some("check the RS-485 adapter is plugged in (ls -l /dev/ttyUSB*), the path in osdp.port, and that user keyway is in group dialout; stop keyway while doctor runs")));
                continue;
            }
        };
        out.push(check(
            &name,
            Outcome::Pass,
            format!("opens at {baud} baud"),
            None,
        ));
        let mut sniffer = PollSniffer::default();
        let until = tokio::time::Instant::now() + sniff_for;
        let mut buf = [0u8; 512];
        loop {
            use tokio::io::AsyncReadExt;
            match tokio::time::timeout_at(until, stream.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => {
                    sniffer.push(buf.get(..n).unwrap_or_default(), Instant::now())
                }
                Ok(Ok(_)) | Err(_) => break,
                Ok(Err(_)) => break,
            }
        }
        for d in doors {
            let n = sniffer.commands_to(d.address);
            out.push(if n > 0 {
                check(&format!("door {}: panel polling", d.id), Outcome::Pass, format!("{n} command(s) to address {} in {} s", d.address, sniff_for.as_secs()), None)
            } else {
                check(&format!("door {}: panel polling", d.id), Outcome::Fail, format!("no command to address {} in {} s", d.address, sniff_for.as_secs()), Some("configure this reader on the panel with the same address and baud; check A/B wiring and termination"))
            });
        }
    }
    out
}

fn secure_channel(cfg: &Validated, daemon: &Result<Snapshot, ClientError>) -> Vec<Check> {
    let secured: Vec<&str> = cfg
        .doors
        .iter()
        .filter(|d| d.osdp.scbk_file.is_some())
        .map(|d| d.id.as_str())
        .collect();
    if secured.is_empty() {
        return vec![check(
            "secure channel",
            Outcome::Skip,
            "no door uses the OSDP secure channel",
            None,
        )];
    }
    match daemon {
        Err(e) => vec![check("secure channel", Outcome::Skip, format!("only the running daemon knows: {e}"), Some("start keyway, then run doctor again or keyway status"))],
        Ok(s) => s
            .doors
            .iter()
            .filter(|d| secured.contains(&d.id.as_str()))
            .map(|d| {
                let name = format!("door {}: secure channel", d.id);
                match d.osdp.secure_channel {
                    SecureChannel::Up => check(&name, Outcome::Pass, "established", None),
                    SecureChannel::Refused => check(&name, Outcome::Fail, "refused", Some("the panel's key does not match the SCBK file: install it again (install_mode = true, then KEYSET from the panel)")),
                    _ => check(&name, Outcome::Fail, "not established", Some("enable secure channel for this reader on the panel")),
                }
            })
            .collect(),
    }
}

async fn bluetooth(cfg: &Validated) -> Vec<Check> {
    let adapters: Vec<(String, Option<String>)> = cfg
        .doors
        .iter()
        .filter_map(|d| d.ble.as_ref().map(|b| (d.id.clone(), b.adapter.clone())))
        .collect();
    if adapters.is_empty() {
        return vec![check(
            "bluetooth",
            Outcome::Skip,
            "not configured (no door has ble)",
            None,
        )];
    }
    let probe = async {
        let session = bluer::Session::new().await?;
        let mut out = Vec::new();
        for (door, name) in &adapters {
            let adapter = match name {
                Some(n) => session.adapter(n),
                None => session.default_adapter().await,
            };
            let state = match adapter {
                Ok(a) => a.is_powered().await.map(|p| (a.name().to_string(), p)),
                Err(e) => Err(e),
            };
            out.push((door.clone(), name.clone(), state));
        }
        Ok::<_, bluer::Error>(out)
    };
    match tokio::time::timeout(Duration::from_secs(5), probe).await {
        Err(_) => vec![check(
            "bluetooth",
            Outcome::Fail,
            "bluetoothd did not answer within 5 s",
            Some("systemctl restart bluetooth"),
        )],
        Ok(Err(e)) => vec![check(
            "bluetooth",
            Outcome::Fail,
            format!("cannot reach bluetoothd: {e}"),
            Some("apt-get install bluez; systemctl enable --now bluetooth"),
        )],
        Ok(Ok(rows)) => rows
            .into_iter()
            .map(|(door, name, state)| {
                let n = format!("door {door}: bluetooth");
                match state {
                    Ok((a, true)) => {
                        check(&n, Outcome::Pass, format!("{a} present and powered"), None)
                    }
                    Ok((a, false)) => check(
                        &n,
                        Outcome::Fail,
                        format!("{a} is off"),
                        Some("bluetoothctl power on; check rfkill list"),
                    ),
                    Err(e) => check(
                        &n,
                        Outcome::Fail,
                        format!("adapter {}: {e}", name.unwrap_or_else(|| "default".into())),
                        Some("check the adapter is present: bluetoothctl list"),
                    ),
                }
            })
            .collect(),
    }
}

/// The broker check: every configured broker, probed concurrently, as the daemon's link connects
/// (its own TLS and MQTT setup, [`Connector::probe`]).
async fn cloud(cfg: &Validated, daemon: &Result<Snapshot, ClientError>) -> Vec<Check> {
    let Some(s) = &cfg.cloud else {
        return vec![check(
            "cloud",
            Outcome::Skip,
            "no cloud link configured (no [cloud]: standalone)",
            None,
        )];
    };
    if let Ok(snap) = daemon {
        // The probe uses keyway's client id: the broker would disconnect the running daemon.
        let link = snap
            .cloud
            .as_ref()
            .map(|c| {
                let at = c
                    .broker
                    .as_deref()
                    .map(|b| format!(" to {b}"))
                    .unwrap_or_default();
                format!("; its link: {}{at}", c.state)
            })
            .unwrap_or_default();
        return vec![check(
            "cloud",
            Outcome::Skip,
            format!("keyway is running{link}: brokers not probed (the probe would take over its MQTT session)"),
            Some("keyway status shows the link; stop keyway to check the brokers from here"),
        )];
    }
    let connector = match Connector::from_settings(s) {
        Ok(c) => c,
        Err(e) => {
            return vec![check(
                "cloud",
                Outcome::Fail,
                e.to_string(),
                Some("fix the file named above, then keyway check-config"),
            )]
        }
    };
    let probes = s.brokers.iter().map(|b| {
        let connector = connector.clone();
        async move { (b, connector.probe(b, CONNECT_TIMEOUT).await) }
    });
    futures_util::future::join_all(probes)
        .await
        .into_iter()
        .map(|(b, r)| broker_check(s, b, r))
        .collect()
}

fn broker_check(s: &CloudSettings, b: &BrokerUrl, r: Result<Duration, ConnectError>) -> Check {
    let name = format!("broker {b}");
    let took = match r {
        Ok(t) => t,
        Err(e) => {
            let hint = broker_hint(s, b, &e);
            return check(&name, Outcome::Fail, format!("{b}: {e}"), Some(&hint));
        }
    };
    let mut how = vec![if b.tls {
        "TLS verified".to_string()
    } else {
        "plain TCP".to_string()
    }];
    if b.tls && s.client_cert.is_some() {
        how.push("client certificate".into());
    }
    how.push(match &s.username {
        Some(u) => format!("user {u}"),
        None => "no user name".into(),
    });
    check(
        &name,
        Outcome::Pass,
        format!(
            "CONNACK accepted in {} ms ({}; client id {})",
            took.as_millis(),
            how.join(", "),
            s.client_id
        ),
        None,
    )
}

/// What to do about a broker that failed, naming the broker and the setting involved.
fn broker_hint(s: &CloudSettings, b: &BrokerUrl, e: &ConnectError) -> String {
    let path = |p: Option<&std::path::Path>| {
        p.map(|p| p.display().to_string())
            .unwrap_or_else(|| "(not set)".into())
    };
    match e {
        ConnectError::Resolve { host, .. } => format!(
            "{host} does not resolve: check the host name in cloud.brokers and DNS (resolvectl query {host})"
        ),
        ConnectError::Refused => format!(
            "nothing accepts connections on {}:{}: is the broker running, is the port in cloud.brokers right (mqtt 1883, mqtts 8883), does a firewall reject it?",
            b.host, b.port
        ),
        ConnectError::Timeout(t) => format!(
            "{}:{} did not answer within {} s: check the network route and that outbound TCP {} is allowed",
            b.host, b.port, t.as_secs(), b.port
        ),
        ConnectError::TlsVerify(_) => format!(
            "put the CA that signed {b}'s certificate in cloud.ca_file ({}); the certificate must name {} and be valid now (check the clock)",
            path(s.ca_file.as_deref()),
            b.host
        ),
        // A broker that wants a client certificate may just hang up on one without it.
        ConnectError::TlsRejected(_) | ConnectError::Closed(_)
            if b.tls && s.client_cert.is_none() =>
        {
            format!(
                "{b} refused keyway's TLS: it may want a client certificate (set cloud.client_cert_file and client_key_file) signed by a CA it trusts; see the broker's log"
            )
        }
        ConnectError::TlsRejected(_) => format!(
            "{b} refused keyway's TLS handshake: the broker must trust the CA that signed cloud.client_cert_file ({}), and the certificate must be valid now; see the broker's log",
            path(s.client_cert.as_ref().map(|(c, _)| c.as_path()))
        ),
        ConnectError::BadCredentials(_) => format!(
            "{b} refused user {:?}: check cloud.username and the password in cloud.password_file ({}), and the broker's ACL for client id {}",
            s.username.as_deref().unwrap_or(""),
            path(s.password_file.as_deref()),
            s.client_id
        ),
        ConnectError::Rejected(_) => format!(
            "{b} refused client id {}: set cloud.client_id to one the broker accepts",
            s.client_id
        ),
        ConnectError::Tls(_) | ConnectError::Closed(_) | ConnectError::Other(_) => format!(
            "check that {b} is an MQTT {} listener (see the broker's log)",
            if b.tls { "TLS" } else { "plain" }
        ),
    }
}

fn clock() -> Check {
    let now = crate::events::unix_ms(time::OffsetDateTime::now_utc());
    if !probe::clock_plausible(now) {
        return check(
            "clock",
            Outcome::Fail,
            "the system clock is before 2024: not set",
            Some("enable NTP: timedatectl set-ntp true (or fit an RTC)"),
        );
    }
    // adjtimex reports whether the kernel clock is synchronised (NTP or chrony set it).
    // SAFETY: a zeroed timex with modes 0 only reads.
    let mut tx: libc::timex = unsafe { std::mem::zeroed() };
    let state = unsafe { libc::adjtimex(&mut tx) };
    if state == libc::TIME_ERROR {
        check(
            "clock",
            Outcome::Warn,
            "plausible, but not synchronised",
            Some("timedatectl set-ntp true; a drifting clock skews credential validity"),
        )
    } else {
        check("clock", Outcome::Pass, "plausible and synchronised", None)
    }
}

fn disk(database: &Path) -> Check {
    let dir = database.parent().unwrap_or(Path::new("."));
    match probe::disk(dir) {
        Err(e) => check(
            "disk",
            Outcome::Fail,
            format!("{}: {e}", dir.display()),
            Some("create the database directory"),
        ),
        Ok(d) => {
            let detail = format!("{} MiB free on {}", d.free_bytes >> 20, d.path);
            if crate::status::health::disk_nearly_full(&d) {
                check(
                    "disk",
                    Outcome::Fail,
                    detail,
                    Some("free space: journalctl --vacuum-size=100M, remove old files"),
                )
            } else {
                check("disk", Outcome::Pass, detail, None)
            }
        }
    }
}

/// The checklist as a person reads it.
pub fn render(checks: &[Check]) -> String {
    let mut o = String::new();
    for c in checks {
        let tag = match c.outcome {
            Outcome::Pass => "ok  ",
            Outcome::Warn => "WARN",
            Outcome::Fail => "FAIL",
            Outcome::Skip => "skip",
        };
        o.push_str(&format!("[{tag}] {}: {}\n", c.name, c.detail));
        if let Some(h) = &c.hint {
            o.push_str(&format!("       fix: {h}\n"));
        }
    }
    let failed = checks.iter().filter(|c| c.outcome == Outcome::Fail).count();
    o.push_str(&if failed == 0 {
        "all checks passed\n".to_string()
    } else {
        format!("{failed} check(s) failed\n")
    });
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::osdp::phy::{Check as Chk, Frame};

    fn frame(addr_byte: u8, code: u8) -> Vec<u8> {
        Frame {
            mark: false,
            addr_byte,
            sqn: 1,
            check: Chk::Crc16,
            scb: None,
            code,
            data: vec![],
        }
        .encode()
        .unwrap()
    }

    #[test]
    fn sniffer_counts_commands_per_address_not_replies_or_noise() {
        let mut s = PollSniffer::default();
        let now = Instant::now();
        let mut line = vec![0x00, 0x13, 0x37]; // noise
        line.extend(frame(0x01, 0x60)); // POLL to 1
        line.extend(frame(0x81, 0x40)); // ACK from 1 (a reply)
        line.extend(frame(0x02, 0x60)); // POLL to 2
                                        // Split anywhere: partial frames are normal on a line.
        let (a, b) = line.split_at(7);
        s.push(a, now);
        s.push(b, now);
        assert_eq!(s.commands_to(1), 1);
        assert_eq!(s.commands_to(2), 1);
        assert_eq!(s.commands_to(3), 0);
        s.push(&frame(0x7f, 0x61), now); // broadcast ID
        assert_eq!(s.commands_to(3), 1);
    }

    #[test]
    fn database_check_passes_on_a_store_and_fails_on_garbage() {
        let d = tempfile::tempdir().unwrap();
        let db = d.path().join("k.db");
        drop(crate::acl::Store::open(&db).unwrap());
        assert_eq!(database(&db).outcome, Outcome::Pass);
        let junk = d.path().join("junk.db");
        std::fs::write(&junk, vec![0x55u8; 8192]).unwrap();
        let c = database(&junk);
        assert_eq!(c.outcome, Outcome::Fail, "{c:?}");
        assert!(c.hint.is_some());
        assert_eq!(database(&d.path().join("new.db")).outcome, Outcome::Warn);
        assert_eq!(
            database(&d.path().join("no/dir/x.db")).outcome,
            Outcome::Fail
        );
    }

    #[test]
    fn render_shows_hints_and_the_count() {
        let t = render(&[
            check("a", Outcome::Pass, "fine", None),
            check("b", Outcome::Fail, "broken", Some("do x")),
        ]);
        assert!(t.contains("[ok  ] a: fine"));
        assert!(t.contains("[FAIL] b: broken\n       fix: do x"));
        assert!(t.ends_with("1 check(s) failed\n"));
    }
}
