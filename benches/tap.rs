//! keyway's own compute per tap: the Aliro reader's crypto, the ACL lookup and the OSDP
//! encoding of the card for the panel. The phone's work and the radio are not keyway's, so
//! the phone's answers are recorded once and replayed: the reader does all of its real work
//! (ECDH, X9.63, HKDF, AES-GCM, both ECDSA operations) on every iteration.
//!
//! Run: `cargo bench --bench tap`. Results: docs/benchmarks.md.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::Instant;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use keyway::acl::{CredentialSpec, ImportMode, Store};
use keyway::aliro::reader::{
    Action, Randomness, ReaderIdentity, ReaderTransaction, TransactionParams,
};
use keyway::aliro::ReaderStatus;
use keyway::card::{self, CardFormat};
use keyway::osdp::{Bus, Check, Frame, PdConfig, RawCard, RawFormat};
use keyway_sim::{Endpoint, EndpointConfig, ReaderGroupCredential, ScriptedRandom};
use p256::SecretKey;
use rand_core::{OsRng, RngCore};

struct Recorded {
    identity: ReaderIdentity,
    ephemeral: SecretKey,
    transaction_id: [u8; 16],
    responses: Vec<Vec<u8>>,
    endpoint_key: [u8; 65],
}

fn randomness(r: &Recorded) -> Randomness {
    Randomness {
        ephemeral: r.ephemeral.clone(),
        transaction_id: r.transaction_id,
    }
}

/// One real transaction against the emulator, with fixed randomness on both sides.
fn record() -> Recorded {
    let mut group_id = [0u8; 16];
    OsRng.fill_bytes(&mut group_id);
    let reader_key = SecretKey::random(&mut OsRng);
    let identity = ReaderIdentity::new(group_id, [7; 16], reader_key.clone());
    let phone_key = SecretKey::random(&mut OsRng);
    let mut script = ScriptedRandom::new();
    script.push_key(SecretKey::random(&mut OsRng));
    let mut phone = Endpoint::new(
        EndpointConfig::new(
            phone_key.clone(),
            vec![ReaderGroupCredential {
                group_id,
                reader_group_key: reader_key.public_key(),
            }],
        ),
        Box::new(script),
    );
    let rec = Recorded {
        identity,
        ephemeral: SecretKey::random(&mut OsRng),
        transaction_id: [9; 16],
        responses: Vec::new(),
        endpoint_key: phone_key
            .public_key()
            .to_sec1_bytes()
            .as_ref()
            .try_into()
            .expect("65-byte key"),
    };
    let mut responses = Vec::new();
    let mut tx = ReaderTransaction::new(&rec.identity, TransactionParams::nfc(1), randomness(&rec));
    let mut c = tx.start();
    loop {
        let r = phone.handle(&c);
        responses.push(r.clone());
        match tx.on_response(&r).expect("recorded transaction") {
            Action::Transmit(next) => c = next,
            Action::Authenticated(_) => {
                c = tx.complete(ReaderStatus::AccessGranted).expect("complete")
            }
            Action::Done(_) => break,
            Action::Exchanged(_) | Action::StepUpResponse(_) => {
                unreachable!("no exchange() or step_up() in a plain tap")
            }
        }
    }
    Recorded { responses, ..rec }
}

/// The reader side of one standard transaction, replaying the phone's answers.
fn reader_transaction(rec: &Recorded, rnd: Randomness) -> [u8; 65] {
    let mut tx = ReaderTransaction::new(&rec.identity, TransactionParams::nfc(1), rnd);
    let _select = tx.start();
    let mut key = [0u8; 65];
    for r in &rec.responses {
        match tx.on_response(r).expect("replay") {
            Action::Transmit(_) => {}
            Action::Authenticated(ep) => {
                key = ep.public_key_sec1();
                let _exchange = tx.complete(ReaderStatus::AccessGranted).expect("complete");
            }
            Action::Done(_) => break,
            Action::Exchanged(_) | Action::StepUpResponse(_) => unreachable!(),
        }
    }
    key
}

/// An ACL of `n` credentials, the bench's phone among them.
fn store_with(n: usize, phone: &[u8; 65], dir: &std::path::Path) -> Store {
    let mut store = Store::open(&dir.join("bench.db")).expect("store");
    let mut specs = Vec::with_capacity(n);
    for i in 0..n {
        let key: [u8; 65] = if i == n / 2 {
            *phone
        } else {
            SecretKey::random(&mut OsRng)
                .public_key()
                .to_sec1_bytes()
                .as_ref()
                .try_into()
                .expect("65")
        };
        specs.push(CredentialSpec {
            state: keyway::acl::CredentialState::Active,
            line: i as u64 + 1,
            endpoint_key: key,
            person_id: format!("p-{i}"),
            card_format: CardFormat::H10301,
            facility_code: 1,
            card_number: (i % 65536) as u32,
            valid_from: None,
            valid_until: None,
            doors: vec!["front".into()],
            card_uids: Vec::new(),
        });
    }
    store
        .import_specs(&specs, ImportMode::Replace, "bench")
        .expect("import");
    store
}

fn poll(sqn: u8) -> Vec<u8> {
    Frame {
        mark: false,
        addr_byte: 1,
        sqn,
        check: Check::Crc16,
        scb: None,
        code: 0x60,
        data: Vec::new(),
    }
    .encode()
    .expect("poll")
}

fn bench(c: &mut Criterion) {
    let rec = record();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = store_with(10_000, &rec.endpoint_key, dir.path());
    let now = time::OffsetDateTime::now_utc();

    c.bench_function("aliro_reader_standard_transaction", |b| {
        b.iter_batched(
            || randomness(&rec),
            |rnd| reader_transaction(&rec, rnd),
            BatchSize::SmallInput,
        )
    });
    c.bench_function("aliro_randomness_generate", |b| {
        b.iter(|| Randomness::generate(&mut OsRng))
    });
    c.bench_function("acl_decide_10k", |b| {
        b.iter(|| {
            store
                .decide(&rec.endpoint_key, "front", now)
                .expect("decide")
        })
    });

    // Bring a PD online (sequence 0), then time queue + POLL → RAW.
    let mut bus = Bus::new(vec![PdConfig::new(1)]).expect("bus");
    let t0 = Instant::now();
    bus.receive(&poll(0), t0);
    let mut sqn = 1u8;
    c.bench_function("osdp_card_to_raw_reply", |b| {
        b.iter(|| {
            let bits = card::encode(CardFormat::H10301, 123, 4567).expect("encode");
            let raw = RawCard {
                reader: 0,
                format: RawFormat::Wiegand,
                bit_count: bits.bit_count,
                data: bits.data,
            };
            let now = Instant::now();
            bus.queue_card(1, raw, now).expect("queue");
            let replies = bus.receive(&poll(sqn), now);
            sqn = if sqn == 3 { 1 } else { sqn + 1 };
            while bus.poll_event().is_some() {}
            replies
        })
    });

    c.bench_function("per_tap_total", |b| {
        b.iter_batched(
            || randomness(&rec),
            |rnd| {
                let key = reader_transaction(&rec, rnd);
                let d = store.decide(&key, "front", now).expect("decide");
                let g = match d {
                    keyway::acl::Decision::Grant(g) => g,
                    other => panic!("bench phone not granted: {other:?}"),
                };
                card::encode(g.card_format, g.facility_code, g.card_number).expect("encode")
            },
            BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
