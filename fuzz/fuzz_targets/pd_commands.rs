//! Fuzz target: arbitrary bytes into a two-PD bus (decoder + PD state machines).
//! Checks: no panic, every reply is one valid reply packet.
#![no_main]

use std::time::{Duration, Instant};

use keyway::osdp::phy::{Check, Frame, FrameDecoder};
use keyway::osdp::{Bus, PdConfig, RawCard, RawFormat};
use libfuzzer_sys::fuzz_target;

fn check_reply(bytes: &[u8], now: Instant) {
    let mut d = FrameDecoder::default();
    assert_eq!(d.push(bytes, now), bytes.len());
    let f = d.poll().expect("complete").expect("valid");
    assert!(f.is_reply());
    assert!(d.poll().is_none());
}

fuzz_target!(|input: &[u8]| {
    let mut a = PdConfig::new(1);
    a.outputs = 2;
    let Ok(mut bus) = Bus::new(vec![a, PdConfig::new(2)]) else {
        return;
    };
    let mut now = Instant::now();
    let card = RawCard {
        reader: 0,
        format: RawFormat::Wiegand,
        bit_count: 26,
        data: vec![1, 2, 3, 0x40],
    };
    let _ = bus.queue_card(1, card, now);
    // Records of [addr, ctrl, code, len, data...] become well-framed commands, so the fuzzer
    // reaches the command parsers without having to guess CRCs; the raw input goes in too.
    let mut rest = input;
    while let [addr, ctrl, code, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let frame = Frame {
            mark: ctrl & 0x10 != 0,
            addr_byte: *addr,
            sqn: ctrl & 0x03,
            check: if ctrl & 0x04 != 0 {
                Check::Crc16
            } else {
                Check::Checksum
            },
            scb: if ctrl & 0x08 != 0 {
                Some(vec![2, 0x15])
            } else {
                None
            },
            code: *code,
            data: tail[..n].to_vec(),
        };
        if let Ok(bytes) = frame.encode() {
            for r in bus.receive(&bytes, now) {
                check_reply(&r, now);
            }
        }
        now += Duration::from_millis(u64::from(ctrl >> 5) * 40);
        for r in bus.handle_timeout(now) {
            check_reply(&r, now);
        }
        while bus.poll_event().is_some() {}
        rest = &tail[n..];
    }
    for r in bus.receive(input, now) {
        check_reply(&r, now);
    }
});
