//! The ACL at scale: apply time and bytes per credential (printed), the lookup a tap makes
//! (criterion), and the decision latency at the door idle vs during a full apply (printed). The bench builds its own database: `KEYWAY_ACL_SCALE` credentials (default
//! 20,000 so `cargo test --all-targets` stays fast; 5000000 for the documented numbers), the
//! CSV cached in `target/acl-scale-<n>.csv`. See docs/benchmarks.md.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use criterion::{criterion_group, criterion_main, Criterion};
use keyway::acl::{ImportMode, Store};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn scale() -> u64 {
    std::env::var("KEYWAY_ACL_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

fn bench(c: &mut Criterion) {
    let n = scale();
    let target = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target");
    let csv = keyway_sim::acl::cached_csv(&target, n).unwrap();
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
        keyway_sim::acl::for_each_key(i, 1, |_, k| keys.push(k));
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
    door_latency(&db, &csv, &keys, n);
    let mut j = 0usize;
    c.bench_function(&format!("acl_decide_{n}"), |b| {
        b.iter(|| {
            j += 1;
            store.decide(&keys[j % keys.len()], "front", now).unwrap()
        })
    });
}

/// Decision latency at the door (`StoreHandle::decide`: the read connection on tokio's
/// blocking pool, as a tap calls it), one decision every millisecond like a busy door: idle,
/// while another connection applies the whole ACL again (a full replace of the same `n`
/// credentials, as `keyway acl import` or a cloud snapshot does, at the apply's background
/// priority), and idle again (the two idle windows show the machine's own noise).
fn door_latency(db: &Path, csv: &Path, keys: &[[u8; 65]], n: u64) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (handle, _thread) = keyway::daemon::StoreHandle::open(db).unwrap();
    let sample = |until: &dyn Fn(usize) -> bool| -> Vec<Duration> {
        rt.block_on(async {
            let mut lat = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !until(lat.len()) {
                tick.tick().await;
                let k = &keys[lat.len() % keys.len()];
                let t = Instant::now();
                let d = handle
                    .decide(k, "front", time::OffsetDateTime::now_utc())
                    .await
                    .unwrap();
                lat.push(t.elapsed());
                assert!(d.is_grant());
            }
            lat
        })
    };
    let idle_samples = 20_000;
    let before = sample(&|done| done >= idle_samples);
    let applying = Arc::new(AtomicBool::new(true));
    let flag = applying.clone();
    let (db2, csv2) = (db.to_path_buf(), csv.to_path_buf());
    let apply = std::thread::spawn(move || {
        // As `keyway acl import` and the daemon's cloud apply do.
        keyway::acl::apply::background_priority();
        let t = Instant::now();
        let r = Store::open(&db2)
            .unwrap()
            .import_file(&csv2, ImportMode::Replace);
        flag.store(false, Ordering::SeqCst);
        r.unwrap();
        t.elapsed()
    });
    let busy = sample(&|_| !applying.load(Ordering::SeqCst));
    let took = apply.join().unwrap();
    let after = sample(&|done| done >= idle_samples);
    let line = |name: &str, mut lat: Vec<Duration>| {
        lat.sort();
        let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
        eprintln!(
            "acl_scale n={n}: door decision {name}: {} samples, p50 {:?} p99 {:?} p99.9 {:?} max {:?}",
            lat.len(),
            pct(0.5),
            pct(0.99),
            pct(0.999),
            lat[lat.len() - 1]
        );
        (pct(0.5).as_secs_f64() * 1e3, pct(0.99).as_secs_f64() * 1e3)
    };
    let b = line("idle before", before);
    let d = line(
        &format!("during a full apply ({:.1} s)", took.as_secs_f64()),
        busy,
    );
    let a = line("idle after", after);
    eprintln!(
        "acl_scale n={n}: during apply - idle (before / after): p50 {:+.3} / {:+.3} ms, \
         p99 {:+.3} / {:+.3} ms",
        d.0 - b.0,
        d.0 - a.0,
        d.1 - b.1,
        d.1 - a.1
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
