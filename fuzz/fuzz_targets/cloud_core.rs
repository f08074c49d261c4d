//! Fuzz target: a sequence of down messages (topic kind + bytes, some signed by the trusted
//! key) and clock steps into the sync core over a fresh database file (snapshots stream into
//! the apply engine on a second connection, so the store cannot be in memory).
//! Checks: no panic; the core's output stays bounded.
#![no_main]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use keyway::acl::Store;
use keyway::cloud::core::{Core, CoreConfig, Now};
use keyway::cloud::msg::{TopicKind, Topics};
use keyway::cloud::sign::{BackendSigner, TrustedKey, TrustedKeys};
use keyway::cloud::store::StoreSync;
use libfuzzer_sys::fuzz_target;

/// Removes one input's database files.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm", "-acl-stage"] {
            let mut p = self.0.clone().into_os_string();
            p.push(suffix);
            let _ = std::fs::remove_file(p);
        }
    }
}

fuzz_target!(|input: &[u8]| {
    let signer = BackendSigner::from_hex("k1", &format!("{:064x}", 7)).expect("fixed key");
    let keys = TrustedKeys::new(vec![TrustedKey {
        kid: "k1".into(),
        key: signer.verifying_key(),
    }]);
    let topics = Topics::new("kw", "s1", "gw1").expect("valid ids");
    let t0 = Instant::now();
    let mut core = Core::new(CoreConfig::new(topics.clone(), "s1", "gw1", 2), keys, 1, None, 1, t0);
    static RUN: AtomicU64 = AtomicU64::new(0);
    let db = std::env::temp_dir().join(format!(
        "keyway-fuzz-{}-{}.db",
        std::process::id(),
        RUN.fetch_add(1, Ordering::Relaxed)
    ));
    let _cleanup = Cleanup(db.clone());
    let Ok(store) = Store::open(&db) else {
        return;
    };
    let mut store = StoreSync::new(store);
    let mut now = Now { mono: t0, unix_ms: 1_800_000_000_000 };
    let _ = core.poll_connect(now);
    core.handle_connected(false, now, &mut store);
    // Records: [op, len_lo, len_hi, bytes...].
    let mut rest = input;
    while let [op, lo, hi, tail @ ..] = rest {
        let len = usize::from(u16::from_le_bytes([*lo, *hi])).min(tail.len());
        let (payload, next) = tail.split_at(len);
        rest = next;
        let kind = TopicKind::DOWN[usize::from(op % 8) % TopicKind::DOWN.len()];
        match op >> 3 {
            0 => {
                let step = Duration::from_millis(u64::from(*lo) * 500);
                now = Now { mono: now.mono + step, unix_ms: now.unix_ms + step.as_millis() as i64 };
                core.handle_timeout(now, &mut store);
            }
            1 => core.handle_connection_lost(now),
            2 => {
                if core.poll_connect(now).is_some() {
                    core.handle_connected(*hi & 1 == 1, now, &mut store);
                }
            }
            3..=15 => {
                let _ = core.handle_message(&topics.topic(kind), &signer.sign(payload), now, &mut store);
            }
            _ => {
                let _ = core.handle_message(&topics.topic(kind), payload, now, &mut store);
            }
        }
        let mut n = 0;
        while core.poll_transmit().is_some() {
            n += 1;
        }
        assert!(n <= 1024, "{n} transmits from one input");
        while core.poll_effect().is_some() {}
    }
});
