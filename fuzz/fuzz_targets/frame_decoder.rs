//! Fuzz target: arbitrary bytes, arbitrarily chunked, into the OSDP frame decoder.
//! Checks: no panic, the buffer stays bounded, every decoded frame re-encodes to a packet that
//! decodes to the same frame.
#![no_main]

use std::time::{Duration, Instant};

use keyway::osdp::phy::{FrameDecoder, MAX_PACKET_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    // First byte picks the chunk size, second the time step between chunks.
    let (chunk, step, data) = match input {
        [a, b, rest @ ..] => (usize::from(*a).max(1), u64::from(*b), rest),
        _ => return,
    };
    let mut d = FrameDecoder::new(Duration::from_millis(50));
    let mut now = Instant::now();
    for piece in data.chunks(chunk) {
        let mut rest = piece;
        loop {
            let n = d.push(rest, now);
            rest = &rest[n..];
            while let Some(item) = d.poll() {
                if let Ok(frame) = item {
                    let bytes = frame.encode().expect("a decoded frame re-encodes");
                    let mut again = FrameDecoder::default();
                    again.push(&bytes, now);
                    assert_eq!(again.poll(), Some(Ok(frame)));
                }
            }
            assert!(d.buffered() <= MAX_PACKET_LEN + 1);
            if rest.is_empty() {
                break;
            }
        }
        now += Duration::from_millis(step);
        d.handle_timeout(now);
    }
});
