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

// ---- secure channel ----

use super::pd::{Pd, PdDeps, SecureConfig};
use super::phy::FrameDecoder as Decoder;
use super::sc::{Direction, Scbk, Session, SessionKeys};

const SC_KEY: [u8; 16] = [0x3C; 16];

impl rand_core::RngCore for Rng {
    fn next_u32(&mut self) -> u32 {
        (Rng::next(self) >> 32) as u32
    }
    fn next_u64(&mut self) -> u64 {
        Rng::next(self)
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for b in dest {
            *b = self.byte();
        }
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

fn secure_bus(seed: u64) -> Bus {
    let mut cfg = PdConfig::new(1);
    cfg.secure = Some(SecureConfig {
        scbk: Some(Scbk::new(SC_KEY)),
        install_mode: false,
        enforce_secure: true,
    });
    let deps = PdDeps {
        rng: Some(Box::new(Rng(seed | 1))),
        key_store: None,
    };
    let pd = Pd::with_deps(cfg, deps).unwrap_or_else(|e| panic!("{e}"));
    Bus::with_pds(vec![pd], Decoder::default()).unwrap_or_else(|e| panic!("{e}"))
}

fn frame(sqn: u8, code: u8, data: Vec<u8>, scb: Option<Vec<u8>>) -> Frame {
    Frame {
        mark: false,
        addr_byte: 1,
        sqn,
        check: Check::Crc16,
        scb,
        code,
        data,
    }
}

fn one_reply(bus: &mut Bus, pkt: &[u8], now: Instant) -> Frame {
    let r = bus.receive(pkt, now);
    assert_eq!(r.len(), 1, "one reply expected");
    assert_valid_reply(&r[0])
}

/// CP side of the handshake; `None` if the PD refused.
fn try_handshake(bus: &mut Bus, now: Instant) -> Option<Session> {
    let cp_random = [1, 2, 3, 4, 5, 6, 7, 8];
    let chlng = frame(0, 0x76, cp_random.to_vec(), Some(vec![3, 0x11, 1]));
    let r = one_reply(bus, &chlng.encode().ok()?, now);
    if r.code != 0x76 {
        return None;
    }
    let pd_random: [u8; 8] = r.data.get(8..16)?.try_into().ok()?;
    let keys = SessionKeys::derive(&Scbk::new(SC_KEY), &cp_random);
    let server = keys.server_cryptogram(&cp_random, &pd_random);
    let scrypt = frame(1, 0x77, server.to_vec(), Some(vec![3, 0x13, 1]));
    let r = one_reply(bus, &scrypt.encode().ok()?, now);
    let rmac: [u8; 16] = r.data.try_into().ok()?;
    Some(Session::new(keys, rmac))
}

fn secure_frame(cp: &mut Session, sqn: u8, code: u8, data: &[u8]) -> Frame {
    let (ty, payload) = if data.is_empty() {
        (0x15, vec![])
    } else {
        (0x17, cp.encrypt(Direction::Command, data))
    };
    let mut f = frame(sqn, code, payload, Some(vec![2, ty]));
    f.data.extend_from_slice(&[0; 4]);
    let mac = cp.sign(Direction::Command, &f.mac_input().unwrap_or_default());
    let n = f.data.len().saturating_sub(4);
    if let Some(tail) = f.data.get_mut(n..) {
        tail.copy_from_slice(&mac);
    }
    f
}

#[test]
fn mangled_secure_packets_never_panic_and_the_pd_recovers() {
    // Valid framing (CRC recomputed), corrupted security: bit flips in the SCB, the data,
    // the MAC; truncation; random SCB types; random commands with SCB. After each, a fresh
    // handshake and a secure POLL must still work.
    let mut rng = Rng(0x5EC0_5EC0_1234_5678);
    let mut bus = secure_bus(7);
    let now = Instant::now();
    let codes = [
        0x60, 0x61, 0x62, 0x64, 0x69, 0x6A, 0x6E, 0x75, 0x76, 0x77, 0xA7,
    ];
    for round in 0..400 {
        let mut cp = try_handshake(&mut bus, now).unwrap_or_else(|| panic!("round {round}"));
        let code = codes[rng.below(codes.len())];
        let len = rng.below(40);
        let data = rng.bytes(len);
        let mut f = secure_frame(&mut cp, 2, code, &data);
        match rng.below(6) {
            0 => {
                if let Some(scb) = f.scb.as_mut() {
                    let i = rng.below(scb.len());
                    scb[i] ^= 1 << rng.below(8);
                }
            }
            1 | 2 => {
                if !f.data.is_empty() {
                    let i = rng.below(f.data.len());
                    f.data[i] ^= 1 << rng.below(8);
                }
            }
            3 => f.data.truncate(rng.below(f.data.len() + 1)),
            4 => f.scb = Some(vec![2 + rng.below(2) as u8, rng.byte()]),
            _ => f.code = rng.byte(),
        }
        if let Ok(pkt) = f.encode() {
            for reply in bus.receive(&pkt, now) {
                let r = assert_valid_reply(&reply);
                // Anything refused comes back as a plaintext NAK; the session is gone.
                if r.code == rc::NAK {
                    assert!(r.scb.is_none(), "round {round}: {r:?}");
                }
            }
        }
        while bus.poll_event().is_some() {}
        let mut cp = try_handshake(&mut bus, now).unwrap_or_else(|| panic!("round {round}"));
        let poll = secure_frame(&mut cp, 2, 0x60, &[]);
        let r = one_reply(&mut bus, &poll.encode().unwrap_or_default(), now);
        let n = r.data.len().saturating_sub(4);
        cp.verify(
            Direction::Reply,
            &r.mac_input().unwrap_or_default(),
            r.data.get(n..).unwrap_or_default(),
        )
        .unwrap_or_else(|e| panic!("round {round}: {e}"));
    }
}

#[test]
fn secure_commands_between_noise_keep_the_session() {
    // Line noise is rejected by the check character before the secure channel sees it: the
    // MAC chain stays in step and every secure POLL is answered.
    for seed in 1..=20u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut bus = secure_bus(seed);
        let mut now = Instant::now();
        let mut cp = try_handshake(&mut bus, now).unwrap_or_else(|| panic!("seed {seed}"));
        let mut sqn = 1u8;
        for i in 0..25 {
            sqn = if sqn >= 3 { 1 } else { sqn + 1 };
            let n = rng.below(40);
            let noise = rng.bytes(n);
            let pkt = secure_frame(&mut cp, sqn, 0x60, &[])
                .encode()
                .unwrap_or_default();
            let stream = [noise, pkt].concat();
            let mut replies = bus.receive(&stream, now);
            now += Duration::from_millis(60);
            replies.extend(bus.handle_timeout(now));
            assert_eq!(replies.len(), 1, "seed {seed} step {i}");
            let r = assert_valid_reply(&replies[0]);
            let n = r.data.len().saturating_sub(4);
            cp.verify(
                Direction::Reply,
                &r.mac_input().unwrap_or_default(),
                r.data.get(n..).unwrap_or_default(),
            )
            .unwrap_or_else(|e| panic!("seed {seed} step {i}: {e} {r:?}"));
        }
    }
}
