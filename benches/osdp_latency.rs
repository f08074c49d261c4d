//! Reply latency over a pty, side by side: keyway's PD (the real serial adapter) and libosdp's
//! own PD (`tests/peers/osdp_pd.py`, PyPI `libosdp`), answered to the same poller in the same
//! run. The poller is a minimal CP in this file (hand-built packets, keyway's secure-channel
//! code for the CP side of the handshake and MACs); it measures from the write of a command to
//! the last byte of the decoded reply.
//!
//! Run: `cargo bench --bench osdp_latency` (needs socat and the venv with libosdp, as the
//! interop tests do; prints what is missing otherwise). Prints median/p90/p99 per PD for a
//! plaintext POLL and a secure-channel POLL. Results: docs/benchmarks.md. Never asserted.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keyway::osdp::phy::FrameDecoder;
use keyway::osdp::sc::{Direction, Session, SessionKeys};
use keyway::osdp::{Check, Frame, PdConfig, Scbk, SecureConfig};
use keyway::serial::{spawn_bus, BusConfig};

#[path = "../tests/support/mod.rs"]
mod support;
use support::{python, require_socat, try_socat, KillOnDrop};

/// Rounds per measurement under `cargo bench`; `cargo test --benches` runs a short smoke pass.
const ROUNDS: usize = 2000;
const SMOKE_ROUNDS: usize = 20;
const KEY_HEX: &str = "000102030405060708090a0b0c0d0e0f";

fn key() -> Scbk {
    Scbk::from_slice(&hex::decode(KEY_HEX).expect("hex")).expect("key")
}

fn socat(dir: &Path) -> Option<(KillOnDrop, PathBuf, PathBuf)> {
    let (pd, cp) = (dir.join("pd"), dir.join("cp"));
    Some((try_socat(&pd, &cp)?, pd, cp))
}

struct Poller {
    port: std::fs::File,
    decoder: FrameDecoder,
    sqn: u8,
    session: Option<Session>,
}

impl Poller {
    fn open(path: &Path) -> Poller {
        let port = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .expect("open CP side");
        Poller {
            port,
            decoder: FrameDecoder::default(),
            sqn: 0,
            session: None,
        }
    }

    fn frame(&self, code: u8, data: Vec<u8>, scb: Option<Vec<u8>>) -> Frame {
        Frame {
            mark: true,
            addr_byte: 1,
            sqn: self.sqn,
            check: Check::Crc16,
            scb,
            code,
            data,
        }
    }

    /// Send one command, return (reply, elapsed from write to decoded reply).
    fn exchange(&mut self, f: &Frame) -> (Frame, Duration) {
        let bytes = f.encode().expect("encode");
        let t = Instant::now();
        self.port.write_all(&bytes).expect("write");
        let mut buf = [0u8; 512];
        loop {
            if let Some(r) = self.decoder.poll() {
                if let Ok(frame) = r {
                    let dt = t.elapsed();
                    self.sqn = if self.sqn >= 3 { 1 } else { self.sqn + 1 };
                    return (frame, dt);
                }
                continue;
            }
            let n = self.port.read(&mut buf).expect("read");
            self.decoder.push(&buf[..n], Instant::now());
        }
    }

    fn handshake(&mut self) {
        self.sqn = 0;
        let cp_random = [0x10, 0x21, 0x32, 0x43, 0x54, 0x65, 0x76, 0x87];
        let f = self.frame(0x76, cp_random.to_vec(), Some(vec![3, 0x11, 1]));
        let (r, _) = self.exchange(&f);
        assert_eq!(r.code, 0x76, "CCRYPT expected: {r:?}");
        let pd_random: [u8; 8] = r.data[8..16].try_into().expect("random");
        let keys = SessionKeys::derive(&key(), &cp_random);
        assert_eq!(
            r.data[16..],
            keys.client_cryptogram(&cp_random, &pd_random)[..],
            "PD cryptogram"
        );
        let server = keys.server_cryptogram(&cp_random, &pd_random);
        let f = self.frame(0x77, server.to_vec(), Some(vec![3, 0x13, 1]));
        let (r, _) = self.exchange(&f);
        assert_eq!(r.code, 0x78, "RMAC_I expected: {r:?}");
        let rmac: [u8; 16] = r.data.try_into().expect("rmac");
        self.session = Some(Session::new(keys, rmac));
    }

    fn poll_plain(&mut self) -> Duration {
        let f = self.frame(0x60, vec![], None);
        let (r, dt) = self.exchange(&f);
        assert_eq!(r.code, 0x40, "ACK expected: {r:?}");
        dt
    }

    fn poll_secure(&mut self) -> Duration {
        let mut f = self.frame(0x60, vec![0; 4], Some(vec![2, 0x15]));
        let session = self.session.as_mut().expect("session");
        let mac = session.sign(Direction::Command, &f.mac_input().expect("mac"));
        f.data.copy_from_slice(&mac);
        let (r, dt) = self.exchange(&f);
        assert_eq!(r.code, 0x40, "ACK expected: {r:?}");
        let n = r.data.len() - 4;
        let session = self.session.as_mut().expect("session");
        session
            .verify(Direction::Reply, &r.mac_input().expect("mac"), &r.data[n..])
            .expect("reply MAC");
        dt
    }
}

fn stats(mut v: Vec<Duration>) -> String {
    v.sort();
    let q = |p: f64| {
        let i = ((v.len() as f64 - 1.0) * p).round() as usize;
        v[i].as_secs_f64() * 1e6
    };
    format!(
        "median {:7.1} µs  p90 {:7.1} µs  p99 {:7.1} µs  (n={})",
        q(0.5),
        q(0.9),
        q(0.99),
        v.len()
    )
}

fn measure(poller: &mut Poller, rounds: usize) -> (Vec<Duration>, Vec<Duration>) {
    // Sequence 0 first (libosdp expects it), then a warm-up.
    poller.sqn = 0;
    let f = poller.frame(0x61, vec![0], None);
    poller.exchange(&f);
    for _ in 0..50 {
        poller.poll_plain();
    }
    let plain: Vec<Duration> = (0..rounds).map(|_| poller.poll_plain()).collect();
    poller.handshake();
    for _ in 0..50 {
        poller.poll_secure();
    }
    let secure: Vec<Duration> = (0..rounds).map(|_| poller.poll_secure()).collect();
    (plain, secure)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // `cargo bench` passes --bench; without it (cargo test --all-targets) run a short pass.
    let rounds = if std::env::args().any(|a| a == "--bench") {
        ROUNDS
    } else {
        SMOKE_ROUNDS
    };
    // Reads below block; a PD that never answers must not hang the run.
    std::thread::spawn(|| {
        std::thread::sleep(Duration::from_secs(300));
        eprintln!("osdp_latency: no progress for 300 s, giving up");
        std::process::exit(2);
    });
    // A missing peer fails the run (also under `cargo test --all-targets`), as the HIL tests do.
    let py = python();
    let dir = tempfile::tempdir().expect("tempdir");

    // keyway: the real serial adapter on a tokio runtime.
    let k = dir.path().join("k");
    std::fs::create_dir(&k).expect("dir");
    require_socat();
    let (_socat_k, pd_k, cp_k) = socat(&k).expect("socat pty pair");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut cfg = PdConfig::new(1);
    cfg.secure = Some(SecureConfig {
        scbk: Some(key()),
        install_mode: false,
        enforce_secure: false,
    });
    let bus = BusConfig {
        path: pd_k,
        baud: 115_200,
        pds: vec![cfg],
        key_files: Default::default(),
        com_file: None,
    };
    let _guard = rt.enter();
    let (_handle, _events, _join) = spawn_bus(bus, stop_rx).expect("bus");
    std::thread::sleep(Duration::from_millis(200));
    let mut poller = Poller::open(&cp_k);
    let (k_plain, k_secure) = measure(&mut poller, rounds);

    // libosdp's PD on its own pty pair.
    let l = dir.path().join("l");
    std::fs::create_dir(&l).expect("dir");
    let (_socat_l, pd_l, cp_l) = socat(&l).expect("socat");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/osdp_pd.py");
    let mut child = Command::new(py)
        .arg("-u")
        .arg(script)
        .args(["--port"])
        .arg(&pd_l)
        .args(["--addr", "1", "--scbk", KEY_HEX])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn libosdp PD");
    let stdout = child.stdout.take().expect("stdout");
    let _pd = KillOnDrop(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).expect("ready");
    assert!(line.contains("ready"), "libosdp PD: {line}");
    let mut poller = Poller::open(&cp_l);
    let (l_plain, l_secure) = measure(&mut poller, rounds);

    println!(
        "OSDP reply latency over a pty (write of the command → reply decoded), {rounds} each:"
    );
    println!("  keyway   POLL→ACK        {}", stats(k_plain));
    println!("  libosdp  POLL→ACK        {}", stats(l_plain));
    println!("  keyway   secure POLL→ACK {}", stats(k_secure));
    println!("  libosdp  secure POLL→ACK {}", stats(l_secure));
    let _ = stop_tx.send(true);
}
