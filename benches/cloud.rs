//! The cloud link's own work, without a broker: draining the event outbox through the sync
//! core (read batch → JSON → ack → mark delivered, SQLite file in WAL with synchronous=FULL,
//! as the daemon runs it), and checking a signed delta (COSE_Sign1 ES256 verify + parse).
//!
//! Run: `cargo bench --bench cloud`. Results: docs/benchmarks.md.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::Instant;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use keyway::acl::Store;
use keyway::cloud::backend::{self, Target};
use keyway::cloud::core::{Core, CoreConfig, Now};
use keyway::cloud::msg::{self, TopicKind, Topics};
use keyway::cloud::sign::{BackendSigner, TrustedKey, TrustedKeys};
use keyway::cloud::store::{Outbox, StoreSync};
use keyway::events::{AccessEvent, Transport};

const EVENTS: usize = 5_000;

fn signer() -> BackendSigner {
    BackendSigner::from_hex("k1", &format!("{:064x}", 7)).unwrap()
}

fn keys() -> TrustedKeys {
    TrustedKeys::new(vec![TrustedKey {
        kid: "k1".into(),
        key: signer().verifying_key(),
    }])
}

fn outbox(c: &mut Criterion) {
    let mut g = c.benchmark_group("cloud");
    g.sample_size(10);
    g.throughput(Throughput::Elements(EVENTS as u64));
    g.bench_function("outbox_drain_5000_events", |b| {
        b.iter_batched(
            || {
                let dir = tempfile::tempdir().unwrap();
                let mut store = Store::open(&dir.path().join("k.db")).unwrap();
                let tx_events: Vec<AccessEvent> = (0..EVENTS)
                    .map(|i| {
                        AccessEvent::error(i as i64, "front", Transport::Nfc, None, "timeout", 3)
                    })
                    .collect();
                for e in &tx_events {
                    store.record_event(e).unwrap();
                }
                let topics = Topics::new("kw", "s1", "gw1").unwrap();
                let t0 = Instant::now();
                let mut core = Core::new(
                    CoreConfig::new(topics, "s1", "gw1", 1),
                    keys(),
                    1,
                    None,
                    1,
                    t0,
                );
                let mut sync = StoreSync::new(store);
                let now = Now {
                    mono: t0,
                    unix_ms: 1_800_000_000_000,
                };
                let _ = core.poll_connect(now);
                (dir, core, sync_instance(&mut sync), sync, now)
            },
            |(_dir, mut core, instance, mut sync, now)| {
                let ack_topic = Topics::new("kw", "s1", "gw1")
                    .unwrap()
                    .topic(TopicKind::EventsAck);
                core.handle_connected(true, now, &mut sync);
                let mut delivered = 0;
                while delivered < EVENTS {
                    let mut last = None;
                    while let Some(t) = core.poll_transmit() {
                        if t.topic.ends_with("/events") {
                            let m: msg::EventsMsg = serde_json::from_slice(&t.payload).unwrap();
                            delivered += m.events.len();
                            last = m.events.last().map(|e| e.seq);
                        }
                    }
                    let Some(seq) = last else { break };
                    let ack = msg::to_json(&msg::EventsAck {
                        kind: msg::TYPE_ACK.into(),
                        v: 1,
                        instance: instance.clone(),
                        through_seq: seq,
                    });
                    core.handle_message(&ack_topic, &ack, now, &mut sync)
                        .unwrap();
                }
                assert_eq!(delivered, EVENTS);
                assert_eq!(sync.depth().unwrap().depth, 0);
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

fn sync_instance(s: &mut StoreSync) -> String {
    s.instance().unwrap()
}

fn delta_check(c: &mut Criterion) {
    let t = Target {
        site: "s1".into(),
        gateway: "gw1".into(),
        ttl_s: 300,
    };
    let now = 1_800_000_000;
    let key = "04".to_owned() + "6b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c2964fe342e2fe1a7f9b8ee7eb4a7c0f9e162bce33576b315ececbb6406837bf51f5";
    let d = backend::delta_message(&signer(), &t, 1, 2, Vec::new(), Vec::new(), vec![key], now);
    let keys = keys();
    c.bench_function("cloud/delta_verify_and_parse_one_revoke", |b| {
        b.iter(|| {
            let (_, body) = keys.verify(&d).unwrap();
            msg::parse_delta(&body, "s1", "gw1", now).unwrap()
        })
    });
}

criterion_group!(benches, outbox, delta_check);
criterion_main!(benches);
