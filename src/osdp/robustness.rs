//! Deterministic pseudo-random robustness tests for the decoder and the PD (the stable-Rust
//! counterpart of the cargo-fuzz targets in `fuzz/`): no panic, bounded buffers, every reply a
//! valid packet, and real commands still answered when noise surrounds them.

use std::time::{Duration, Instant};

use super::bus::Bus;
use super::pd::{PdConfig, PdEvent};
use super::phy::{Check, Frame, FrameDecoder, MAX_PACKET_LEN, SOM};
use super::reply::{code as rc, RawCard, RawFormat};

/// xorshift64*: small, deterministic, good enough to spread inputs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn byte(&mut self) -> u8 {
        (self.next() >> 56) as u8
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }
}

fn command(addr: u8, sqn: u8, code: u8, data: Vec<u8>, rng: &mut Rng) -> Vec<u8> {
    Frame {
        mark: rng.below(2) == 0,
        addr_byte: addr,
        sqn,
        check: if rng.below(4) == 0 {
            Check::Checksum
        } else {
            Check::Crc16
        },
        scb: None,
        code,
        data,
    }
    .encode()
    .unwrap_or_default()
}

fn assert_valid_reply(bytes: &[u8]) -> Frame {
    let mut d = FrameDecoder::default();
    assert_eq!(d.push(bytes, Instant::now()), bytes.len());
    let f = d.poll().expect("complete reply").expect("valid reply");
    assert!(d.poll().is_none(), "exactly one packet per reply");
    assert!(f.is_reply());
    f
}

fn bus(rng: &mut Rng) -> Bus {
    let mut a = PdConfig::new(1);
    a.outputs = 2;
    let b = PdConfig::new(2);
    let mut bus = Bus::new(vec![a, b]).unwrap_or_else(|e| panic!("{e}"));
    let card = RawCard {
        reader: 0,
        format: RawFormat::Wiegand,
        bit_count: 26,
        data: rng.bytes(4),
    };
    let _ = bus.queue_card(1, card, Instant::now());
    bus
}

#[test]
fn random_bytes_never_panic_and_stay_bounded() {
    let mut rng = Rng(0x0123_4567_89AB_CDEF);
    let mut bus = bus(&mut rng);
    let mut now = Instant::now();
    for _ in 0..3000 {
        let len = rng.below(300);
        let mut chunk = rng.bytes(len);
        // Sprinkle SOMs so the decoder locks onto false candidates often.
        for _ in 0..rng.below(4) {
            let i = rng.below(chunk.len());
            if let Some(b) = chunk.get_mut(i) {
                *b = SOM;
            }
        }
        for reply in bus.receive(&chunk, now) {
            assert_valid_reply(&reply);
        }
        now += Duration::from_millis(rng.below(120) as u64);
        for reply in bus.handle_timeout(now) {
            assert_valid_reply(&reply);
        }
        while bus.poll_event().is_some() {}
    }
}

#[test]
fn random_commands_with_valid_checks_get_valid_replies() {
    // Right framing, random content: exercises command parsing and the PD, not the CRC.
    let mut rng = Rng(0xFEED_FACE_CAFE_BEEF);
    let mut bus = bus(&mut rng);
    let now = Instant::now();
    let codes = [
        0x60, 0x61, 0x62, 0x64, 0x65, 0x66, 0x67, 0x68, 0x69, 0x6A, 0x6B, 0x6E, 0x75, 0x76, 0x7B,
        0x80, 0xA2, 0xA7,
    ];
    for _ in 0..5000 {
        let code = if rng.below(5) == 0 {
            rng.byte()
        } else {
            codes[rng.below(codes.len())]
        };
        let len = match rng.below(3) {
            0 => rng.below(4),
            1 => 14 * (1 + rng.below(3)),
            _ => rng.below(64),
        };
        let data = rng.bytes(len);
        let addr = [1u8, 2, 3, 0x7F][rng.below(4)];
        let sqn = rng.below(4) as u8;
        let pkt = command(addr, sqn, code, data, &mut rng);
        for reply in bus.receive(&pkt, now) {
            let f = assert_valid_reply(&reply);
            assert_eq!(f.sqn, sqn);
        }
        while bus.poll_event().is_some() {}
    }
}

#[test]
fn commands_between_noise_are_all_answered() {
    for seed in 1..=40u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut bus = Bus::new(vec![PdConfig::new(1)]).unwrap_or_else(|e| panic!("{e}"));
        let mut now = Instant::now();
        let mut replies = Vec::new();
        let mut sqn = 0u8;
        let mut sent = Vec::new();
        for _ in 0..25 {
            // Noise could in principle form a valid packet by chance; with the check
            // character and the address check these fixed seeds do not.
            let n = rng.below(40);
            let mut noise = rng.bytes(n);
            if rng.below(2) == 0 {
                // A false header with a plausible length.
                let len = 7 + rng.below(MAX_PACKET_LEN - 7);
                noise.extend_from_slice(&[SOM, 0x01, (len & 0xFF) as u8, (len >> 8) as u8]);
            }
            let pkt = command(1, sqn, 0x60, vec![], &mut rng);
            sent.push(sqn);
            let stream = [noise, pkt].concat();
            // Random chunking.
            let mut rest = &stream[..];
            while !rest.is_empty() {
                let n = 1 + rng.below(rest.len());
                let (a, b) = rest.split_at(n);
                replies.extend(bus.receive(a, now));
                rest = b;
            }
            // The CP waits for the reply: silence lets stale false candidates go.
            now += Duration::from_millis(60);
            replies.extend(bus.handle_timeout(now));
            sqn = if sqn >= 3 { 1 } else { sqn + 1 };
        }
        let got: Vec<(u8, u8)> = replies
            .iter()
            .map(|r| {
                let f = assert_valid_reply(r);
                (f.code, f.sqn)
            })
            .collect();
        let want: Vec<(u8, u8)> = sent.iter().map(|&s| (rc::ACK, s)).collect();
        assert_eq!(got, want, "seed {seed}");
        let events: Vec<_> = std::iter::from_fn(|| bus.poll_event()).collect();
        assert!(
            !events
                .iter()
                .any(|(_, e)| matches!(e, PdEvent::NakSent { .. })),
            "seed {seed}"
        );
    }
}
