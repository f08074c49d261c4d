//! Fuzz target: arbitrary bytes from a "phone", arbitrarily chunked, on the BLE L2CAP channel
//! into the reader session (deframer, INITIATE_ACCESS_PROTOCOL, AP_RS handling).
//! Checks: no panic, the deframer stays bounded, and once the session ends it stays ended.
#![no_main]

use std::time::{Duration, Instant};

use keyway::aliro::consts::INTERFACE_BLE;
use keyway::aliro::reader::{Randomness, ReaderIdentity, TransactionParams};
use keyway::ble::message::{Deframer, HEADER_LEN, MAX_PAYLOAD};
use keyway::ble::{BleVersions, Event, ReaderSession};
use libfuzzer_sys::fuzz_target;
use p256::SecretKey;

fuzz_target!(|input: &[u8]| {
    let (chunk, data) = match input {
        [a, rest @ ..] => (usize::from(*a).max(1), rest),
        _ => return,
    };
    // Fixed keys: the fuzzer explores the parsers, not the key space.
    let key = |b: u8| SecretKey::from_slice(&[b; 32]).expect("valid scalar");
    let identity = ReaderIdentity::new([1; 16], [2; 16], key(3));
    let rnd = Randomness { ephemeral: key(4), transaction_id: [5; 16] };
    let params = TransactionParams { interface: INTERFACE_BLE, ..TransactionParams::default() };
    let now = Instant::now();
    let mut s = ReaderSession::new(
        &identity,
        params,
        rnd,
        BleVersions::default(),
        now,
        Duration::from_secs(5),
    );
    // The plain deframer too, on the same chunks: bounded whatever arrives.
    let mut d = Deframer::new();
    for piece in data.chunks(chunk) {
        let _ = d.push(piece);
        assert!(d.pending() <= HEADER_LEN + MAX_PAYLOAD);
        if s.is_done() {
            continue;
        }
        match s.on_bytes(piece, now) {
            Ok(events) => {
                for ev in events {
                    if let Event::Authenticated(_) = ev {
                        let _ = s.decide(true, now);
                    }
                }
            }
            Err(_) => break,
        }
    }
});
