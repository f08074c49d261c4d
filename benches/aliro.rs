//! The Aliro reader's own compute for a STANDARD transaction next to a FAST one, and FAST's
//! cost per stored key. As in `benches/tap.rs`, the phone's answers are recorded once from the
//! project's phone emulator and replayed, so each iteration is only the reader's real work.
//!
//! Run: `cargo bench --bench aliro`. Results: docs/benchmarks.md.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use keyway::aliro::crypto::SymmetricKey;
use keyway::aliro::reader::{
    Action, FastConfig, FastCredential, FastFallback, Randomness, ReaderIdentity,
    ReaderTransaction, TransactionParams,
};
use keyway::aliro::ReaderStatus;
use keyway_sim::{Endpoint, EndpointConfig, ReaderGroupCredential, ScriptedRandom};
use p256::SecretKey;
use rand_core::{OsRng, RngCore};

struct Setup {
    identity: ReaderIdentity,
    phone_key: SecretKey,
    group_id: [u8; 16],
    ephemeral: SecretKey,
}

fn rnd(s: &Setup) -> Randomness {
    Randomness {
        ephemeral: s.ephemeral.clone(),
        transaction_id: [9; 16],
    }
}

/// Drives `tx` against `phone`, recording the phone's answers; returns them and the Kpersistent.
fn record(mut tx: ReaderTransaction, phone: &mut Endpoint) -> (Vec<Vec<u8>>, SymmetricKey, bool) {
    let mut responses = Vec::new();
    let mut c = tx.start();
    let mut learned = None;
    loop {
        let r = phone.handle(&c);
        responses.push(r.clone());
        match tx.on_response(&r).expect("recorded transaction") {
            Action::Transmit(next) => c = next,
            Action::Authenticated(ep) => {
                learned = Some((ep.k_persistent.clone(), ep.fast));
                c = tx.complete(ReaderStatus::AccessGranted).expect("complete");
            }
            Action::Done(_) => break,
            Action::Exchanged(_) | Action::StepUpResponse(_) => unreachable!("no exchange() here"),
        }
    }
    let (k, fast) = learned.expect("authenticated");
    (responses, k, fast)
}

/// Replays recorded answers through a fresh reader transaction; returns whether it was FAST.
fn replay(tx: &mut ReaderTransaction, responses: &[Vec<u8>]) -> bool {
    let _select = tx.start();
    let mut fast = false;
    for r in responses {
        match tx.on_response(r).expect("replay") {
            Action::Transmit(_) => {}
            Action::Authenticated(ep) => {
                fast = ep.fast;
                let _exchange = tx.complete(ReaderStatus::AccessGranted).expect("complete");
            }
            Action::Done(_) => break,
            Action::Exchanged(_) | Action::StepUpResponse(_) => unreachable!(),
        }
    }
    fast
}

fn other_keys(n: usize) -> Vec<FastCredential> {
    (0..n)
        .map(|_| {
            let mut k = [0u8; 32];
            OsRng.fill_bytes(&mut k);
            FastCredential {
                endpoint_public_key: SecretKey::random(&mut OsRng)
                    .public_key()
                    .to_sec1_bytes()
                    .as_ref()
                    .try_into()
                    .expect("65"),
                k_persistent: SymmetricKey::from_bytes(k),
            }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut group_id = [0u8; 16];
    OsRng.fill_bytes(&mut group_id);
    let s = Setup {
        identity: ReaderIdentity::new(group_id, [7; 16], SecretKey::random(&mut OsRng)),
        phone_key: SecretKey::random(&mut OsRng),
        group_id,
        ephemeral: SecretKey::random(&mut OsRng),
    };
    let mut script = ScriptedRandom::new();
    script.push_key(SecretKey::random(&mut OsRng));
    script.push_key(SecretKey::random(&mut OsRng));
    let mut phone = Endpoint::new(
        EndpointConfig::new(
            s.phone_key.clone(),
            vec![ReaderGroupCredential {
                group_id: s.group_id,
                reader_group_key: s.identity.private_key.public_key(),
            }],
        ),
        Box::new(script),
    );
    let params = TransactionParams::nfc(1);
    let (standard, k_persistent, _) = record(
        ReaderTransaction::new(&s.identity, params, rnd(&s)),
        &mut phone,
    );
    let own = FastCredential {
        endpoint_public_key: s
            .phone_key
            .public_key()
            .to_sec1_bytes()
            .as_ref()
            .try_into()
            .expect("65"),
        k_persistent,
    };
    let fast_cfg = |creds: Vec<FastCredential>| FastConfig {
        credentials: creds,
        on_no_match: FastFallback::Standard,
    };
    let (fast, _, was_fast) = record(
        ReaderTransaction::new(&s.identity, params, rnd(&s)).with_fast(fast_cfg(vec![own.clone()])),
        &mut phone,
    );
    assert!(was_fast, "the recorded second transaction is FAST");

    c.bench_function("aliro_reader_standard_transaction", |b| {
        b.iter_batched(
            || ReaderTransaction::new(&s.identity, params, rnd(&s)),
            |mut tx| assert!(!replay(&mut tx, &standard)),
            BatchSize::SmallInput,
        )
    });
    c.bench_function("aliro_reader_fast_transaction", |b| {
        b.iter_batched(
            || {
                ReaderTransaction::new(&s.identity, params, rnd(&s))
                    .with_fast(fast_cfg(vec![own.clone()]))
            },
            |mut tx| assert!(replay(&mut tx, &fast)),
            BatchSize::SmallInput,
        )
    });
    // Worst case with a full table (256 keys per reader): the phone's key is tried last.
    let mut full = other_keys(255);
    full.push(own.clone());
    c.bench_function("aliro_reader_fast_transaction_256_keys_match_last", |b| {
        b.iter_batched(
            || {
                ReaderTransaction::new(&s.identity, params, rnd(&s))
                    .with_fast(fast_cfg(full.clone()))
            },
            |mut tx| assert!(replay(&mut tx, &fast)),
            BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
