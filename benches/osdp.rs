//! keyway's in-process cost per OSDP command: bytes in → decoded, checked, answered → bytes
//! out, through the same `Bus` the serial adapter drives. No port, no scheduler: the numbers
//! are the PD's own work, to set beside the pty wake-up floor (~0.1 ms) and libosdp's ~3 µs.
//!
//! - `poll_ack_plain`: a plaintext POLL answered with ACK.
//! - `poll_ack_secure`: a secure-channel POLL (MAC verify) answered with a MAC'd ACK. The CP's
//!   part (signing the command, verifying the reply) runs in the loop too, to keep the MAC
//!   chain in step: the PD's own share is about half of the figure (two of the four MACs).
//! - `led_secure`: an encrypted osdp_LED (MAC verify, decrypt, parse, apply, MAC'd ACK).
//! - `handshake`: CHLNG → CCRYPT and SCRYPT → RMAC_I (key derivation, cryptograms).
//!
//! Run: `cargo bench --bench osdp`. Results: docs/benchmarks.md.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};
use keyway::osdp::phy::FrameDecoder;
use keyway::osdp::sc::{Direction, Session, SessionKeys};
use keyway::osdp::{Bus, Check, Frame, Pd, PdConfig, PdDeps, Scbk, SecureConfig};
use rand_core::OsRng;

const ADDR: u8 = 1;
const KEY: [u8; 16] = [0x42; 16];

fn frame(sqn: u8, code: u8, data: Vec<u8>, scb: Option<Vec<u8>>) -> Frame {
    Frame {
        mark: true,
        addr_byte: ADDR,
        sqn,
        check: Check::Crc16,
        scb,
        code,
        data,
    }
}

fn decode(bytes: &[u8]) -> Frame {
    let mut d = FrameDecoder::default();
    d.push(bytes, Instant::now());
    d.poll().expect("one frame").expect("valid frame")
}

fn secure_bus() -> Bus {
    let mut cfg = PdConfig::new(ADDR);
    cfg.secure = Some(SecureConfig {
        scbk: Some(Scbk::new(KEY)),
        install_mode: false,
        enforce_secure: true,
    });
    let deps = PdDeps {
        rng: Some(Box::new(OsRng)),
        key_store: None,
    };
    let pd = Pd::with_deps(cfg, deps).expect("pd");
    Bus::with_pds(vec![pd], FrameDecoder::default()).expect("bus")
}

/// Run the handshake as the CP; returns the CP's session.
fn handshake(bus: &mut Bus) -> Session {
    let now = Instant::now();
    let cp_random = [1, 2, 3, 4, 5, 6, 7, 8];
    let chlng = frame(0, 0x76, cp_random.to_vec(), Some(vec![3, 0x11, 1]));
    let r = bus.receive(&chlng.encode().expect("encode"), now);
    let ccrypt = decode(r.first().expect("CCRYPT"));
    let pd_random: [u8; 8] = ccrypt.data[8..16].try_into().expect("random");
    let keys = SessionKeys::derive(&Scbk::new(KEY), &cp_random);
    let server = keys.server_cryptogram(&cp_random, &pd_random);
    let scrypt = frame(1, 0x77, server.to_vec(), Some(vec![3, 0x13, 1]));
    let r = bus.receive(&scrypt.encode().expect("encode"), now);
    let rmac: [u8; 16] = decode(r.first().expect("RMAC_I"))
        .data
        .try_into()
        .expect("rmac");
    Session::new(keys, rmac)
}

fn secure_command(cp: &mut Session, sqn: u8, code: u8, data: &[u8]) -> Vec<u8> {
    let (ty, payload) = if data.is_empty() {
        (0x15, vec![])
    } else {
        (0x17, cp.encrypt(Direction::Command, data))
    };
    let mut f = frame(sqn, code, payload, Some(vec![2, ty]));
    f.data.extend_from_slice(&[0; 4]);
    let mac = cp.sign(Direction::Command, &f.mac_input().expect("mac input"));
    let n = f.data.len() - 4;
    f.data[n..].copy_from_slice(&mac);
    f.encode().expect("encode")
}

fn check_reply(cp: &mut Session, bytes: &[u8]) {
    let r = decode(bytes);
    let n = r.data.len() - 4;
    cp.verify(
        Direction::Reply,
        &r.mac_input().expect("mac input"),
        &r.data[n..],
    )
    .expect("reply MAC");
}

fn next(sqn: &mut u8) -> u8 {
    *sqn = if *sqn >= 3 { 1 } else { *sqn + 1 };
    *sqn
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("osdp");

    let mut bus = Bus::new(vec![PdConfig::new(ADDR)]).expect("bus");
    let now = Instant::now();
    bus.receive(&frame(0, 0x60, vec![], None).encode().expect("encode"), now);
    let polls: Vec<Vec<u8>> = (1..=3)
        .map(|s| frame(s, 0x60, vec![], None).encode().expect("encode"))
        .collect();
    let mut i = 0usize;
    g.bench_function("poll_ack_plain", |b| {
        b.iter(|| {
            let r = bus.receive(&polls[i % 3], now);
            i += 1;
            assert_eq!(r.len(), 1);
            r
        })
    });

    let mut bus = secure_bus();
    let mut cp = handshake(&mut bus);
    let mut sqn = 1u8;
    g.bench_function("poll_ack_secure", |b| {
        b.iter(|| {
            let cmd = secure_command(&mut cp, next(&mut sqn), 0x60, &[]);
            let r = bus.receive(&cmd, now);
            check_reply(&mut cp, &r[0]);
        })
    });

    let led = [0u8, 0, 2, 5, 5, 2, 0, 30, 0, 1, 1, 0, 1, 0];
    g.bench_function("led_secure", |b| {
        b.iter(|| {
            let cmd = secure_command(&mut cp, next(&mut sqn), 0x69, &led);
            let r = bus.receive(&cmd, now);
            check_reply(&mut cp, &r[0]);
        })
    });

    g.bench_function("handshake", |b| {
        b.iter(|| handshake(&mut bus));
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(50)
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
