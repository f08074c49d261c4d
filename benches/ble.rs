//! The reader's own compute for one BLE connection (STANDARD, interface C3): the
//! INITIATE_ACCESS_PROTOCOL, AUTH0, AUTH1, the URSK EXCHANGE and the encrypted completion
//! notification, including the BLE key derivation (one extra ECDH, see docs/ble.md). The phone's
//! frames are recorded once from the project's BLE phone emulator and replayed into a fresh
//! session, so each iteration is only keyway's work. Compare with
//! `aliro_reader_standard_transaction` (the same over NFC) in `benches/aliro.rs`.
//!
//! Run: `cargo bench --bench ble`. Results: docs/benchmarks.md.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use keyway::aliro::consts::INTERFACE_BLE;
use keyway::aliro::reader::{Randomness, ReaderIdentity, TransactionParams};
use keyway::ble::hci::{parse_rssi_reply, read_rssi_command};
use keyway::ble::{BleVersions, Event, ReaderSession, SessionOutcome};
use keyway_sim::ble_phone::{BlePhone, PhoneEvent};
use keyway_sim::{EndpointConfig, OsRandom, ReaderGroupCredential};
use p256::SecretKey;
use rand_core::OsRng;

struct Setup {
    identity: ReaderIdentity,
    ephemeral: SecretKey,
}

fn session(s: &Setup) -> ReaderSession {
    let params = TransactionParams {
        interface: INTERFACE_BLE,
        ..TransactionParams::default()
    };
    // Fixed randomness: the reader's frames (ECDSA is deterministic) are the same every time,
    // so the recorded phone frames stay valid.
    let rnd = Randomness {
        ephemeral: s.ephemeral.clone(),
        transaction_id: [7; 16],
    };
    ReaderSession::new(
        &s.identity,
        params,
        rnd,
        BleVersions::default(),
        Instant::now(),
        Duration::from_secs(5),
    )
}

/// Runs a granted connection against the emulator; returns the frames the phone sent.
fn record(s: &Setup) -> Vec<Vec<u8>> {
    let cred = ReaderGroupCredential {
        group_id: [1; 16],
        reader_group_key: s.identity.private_key.public_key(),
    };
    let key = SecretKey::random(&mut OsRng);
    let mut phone = BlePhone::new(
        EndpointConfig::new(key, vec![cred]),
        Box::new(OsRandom),
        BleVersions::default(),
    );
    let mut reader = session(s);
    let mut inbox = phone.initiate().expect("initiate");
    let mut sent = Vec::new();
    for _ in 0..10 {
        sent.push(inbox.clone());
        let mut events = reader.on_bytes(&inbox, Instant::now()).expect("reader");
        inbox.clear();
        while !events.is_empty() {
            match events.remove(0) {
                Event::Send(frame) => {
                    for ev in phone.on_bytes(&frame).expect("phone") {
                        match ev {
                            PhoneEvent::Send(r) => inbox.extend(r),
                            PhoneEvent::Completed { reader_state } => assert_eq!(reader_state, 1),
                        }
                    }
                }
                Event::Authenticated(_) => {
                    events.extend(reader.decide(true, Instant::now()).expect("decide"))
                }
                Event::Done(_) => return sent,
            }
        }
    }
    panic!("the recorded connection did not finish");
}

/// Replays the phone's frames through a fresh session; returns the outcome.
fn replay(mut reader: ReaderSession, frames: &[Vec<u8>]) -> SessionOutcome {
    for f in frames {
        let mut events = reader.on_bytes(f, Instant::now()).expect("replay");
        while !events.is_empty() {
            match events.remove(0) {
                Event::Send(_) => {}
                Event::Authenticated(_) => {
                    events.extend(reader.decide(true, Instant::now()).expect("decide"))
                }
                Event::Done(o) => return o,
            }
        }
    }
    panic!("the replayed connection did not finish");
}

fn bench(c: &mut Criterion) {
    let s = Setup {
        identity: ReaderIdentity::new([1; 16], [2; 16], SecretKey::random(&mut OsRng)),
        ephemeral: SecretKey::random(&mut OsRng),
    };
    let frames = record(&s);
    assert!(matches!(
        replay(session(&s), &frames),
        SessionOutcome::Completed { reader_state: 1 }
    ));
    c.bench_function("ble_reader_standard_connection", |b| {
        b.iter_batched(
            || session(&s),
            |reader| replay(reader, &frames),
            BatchSize::SmallInput,
        )
    });
    // A walk-up door's extra work per connection besides the syscalls: the Read RSSI
    // command and its reply parsed.
    let reply = [0x04, 0x0E, 7, 1, 0x05, 0x14, 0, 0x40, 0, 0xC4];
    c.bench_function("ble_rssi_command_and_reply", |b| {
        b.iter(|| {
            let cmd = read_rssi_command(std::hint::black_box(0x40));
            parse_rssi_reply(std::hint::black_box(&reply), u16::from(cmd[4]))
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
