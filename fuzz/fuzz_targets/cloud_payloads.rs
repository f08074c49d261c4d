//! Fuzz target: arbitrary bytes into every cloud payload parser (signature envelope, manifest,
//! chunk, delta, command, events ack), unsigned and behind a valid signature.
//! Checks: no panic; every refusal has a bounded detail.
#![no_main]

use keyway::cloud::msg;
use keyway::cloud::sign::{BackendSigner, TrustedKey, TrustedKeys};
use libfuzzer_sys::fuzz_target;

const NOW: i64 = 1_800_000_000;

fn ok<T>(r: Result<T, msg::Reject>) {
    if let Err(r) = r {
        assert!(r.detail.len() <= 200, "{r}");
    }
}

fuzz_target!(|input: &[u8]| {
    let signer = BackendSigner::from_hex("k1", &format!("{:064x}", 7)).expect("fixed key");
    let keys = TrustedKeys::new(vec![TrustedKey {
        kid: "k1".into(),
        key: signer.verifying_key(),
    }]);
    ok(keys.verify(input));
    // Behind a valid signature, so the JSON parsers are reached with arbitrary content.
    let (_, body) = keys.verify(&signer.sign(input)).expect("own signature verifies");
    for payload in [input, body.as_slice()] {
        ok(msg::parse_manifest(payload, "s1", "gw1", NOW));
        ok(msg::parse_delta(payload, "s1", "gw1", NOW));
        ok(msg::parse_command(payload, "s1", "gw1", NOW));
        ok(msg::parse_chunk(payload));
        ok(msg::parse_ack(payload, msg::TYPE_ACK));
        ok(msg::parse_ack(payload, msg::TYPE_NOTES_ACK));
        let _ = msg::peek_request_id(payload);
    }
});
