//! The ACL at scale: apply time and bytes per credential (printed), and the lookup a tap makes
//! (criterion). The bench builds its own database: `KEYWAY_ACL_SCALE` credentials (default
//! 20,000 so `cargo test --all-targets` stays fast; 5000000 for the documented numbers), the
//! CSV cached in `target/acl-scale-<n>.csv`. See docs/benchmarks.md.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use criterion::{criterion_group, criterion_main, Criterion};
use keyway::acl::{ImportMode, Store};
use std::path::PathBuf;
use std::time::Instant;

fn scale() -> u64 {
    std::env::var("KEYWAY_ACL_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

fn bench(c: &mut Criterion) {
    let n = scale();
    let target = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target");
    let csv = keyway::sim::acl::cached_csv(&target, n).unwrap();
    let dir = tempfile::tempdir_in(&target).unwrap();
    let db = dir.path().join("scale.db");
    let mut store = Store::open(&db).unwrap();
    let t = Instant::now();
    store.import_file(&csv, ImportMode::Replace).unwrap();
    let apply = t.elapsed();
    let bytes = std::fs::metadata(&db).unwrap().len()
        + std::fs::metadata(db.with_file_name("scale.db-wal"))
            .map(|m| m.len())
            .unwrap_or(0);
    let acl_bytes: i64 = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row(
            "SELECT sum(pgsize) FROM dbstat WHERE name = 'acl'",
            [],
            |r| r.get(0),
        )
        .unwrap_or(0);
    eprintln!(
        "acl_scale n={n}: apply {:.1} s, database {} bytes ({:.0} bytes/credential; acl table {:.0})",
        apply.as_secs_f64(),
        bytes,
        bytes as f64 / n as f64,
        acl_bytes as f64 / n as f64
    );
    // Lookups spread over the whole key space, as taps of random people.
    let mut keys = Vec::new();
    let step = (n / 1000).max(1);
    let mut i = 1;
    while i <= n && keys.len() < 1000 {
        keyway::sim::acl::for_each_key(i, 1, |_, k| keys.push(k));
        i += step;
    }
    let now = time::OffsetDateTime::now_utc();
    let mut lat = Vec::with_capacity(20_000);
    for j in 0..20_000 {
        let k = &keys[j % keys.len()];
        let t = Instant::now();
        assert!(store.decide(k, "front", now).unwrap().is_grant());
        lat.push(t.elapsed());
    }
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    eprintln!(
        "acl_scale n={n}: decide p50 {:?} p99 {:?} max {:?}",
        pct(0.5),
        pct(0.99),
        lat[lat.len() - 1]
    );
    let mut j = 0usize;
    c.bench_function(&format!("acl_decide_{n}"), |b| {
        b.iter(|| {
            j += 1;
            store.decide(&keys[j % keys.len()], "front", now).unwrap()
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
