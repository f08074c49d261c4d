//! Fuzz target: the secure channel. The harness runs a real handshake with a secure PD, then
//! turns input records into commands signed (and encrypted) in the session, so the fuzzer
//! reaches the command parsers behind the MAC; a flag byte lets it corrupt the packet after
//! signing. Checks: no panic, every reply is one valid reply packet.
#![no_main]

use std::time::Instant;

use keyway::osdp::phy::{Check, Frame, FrameDecoder};
use keyway::osdp::sc::{Direction, Session, SessionKeys};
use keyway::osdp::{Bus, Pd, PdConfig, PdDeps, Scbk, SecureConfig};
use libfuzzer_sys::fuzz_target;
use rand_core::{impls, RngCore};

const KEY: [u8; 16] = [0x24; 16];

struct Counter(u8);

impl RngCore for Counter {
    fn next_u32(&mut self) -> u32 {
        impls::next_u32_via_fill(self)
    }
    fn next_u64(&mut self) -> u64 {
        impls::next_u64_via_fill(self)
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for b in dest {
            self.0 = self.0.wrapping_add(1);
            *b = self.0;
        }
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
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

fn replies(bus: &mut Bus, bytes: &[u8], now: Instant) -> Vec<Frame> {
    bus.receive(bytes, now)
        .iter()
        .map(|r| {
            let mut d = FrameDecoder::default();
            assert_eq!(d.push(r, now), r.len());
            let f = d.poll().expect("complete").expect("valid");
            assert!(f.is_reply());
            assert!(d.poll().is_none());
            f
        })
        .collect()
}

fn handshake(bus: &mut Bus, now: Instant) -> Option<Session> {
    let cp_random = [9, 8, 7, 6, 5, 4, 3, 2];
    let chlng = frame(0, 0x76, cp_random.to_vec(), Some(vec![3, 0x11, 1]));
    let r = replies(bus, &chlng.encode().ok()?, now).pop()?;
    let pd_random: [u8; 8] = r.data.get(8..16)?.try_into().ok()?;
    let keys = SessionKeys::derive(&Scbk::new(KEY), &cp_random);
    let server = keys.server_cryptogram(&cp_random, &pd_random);
    let scrypt = frame(1, 0x77, server.to_vec(), Some(vec![3, 0x13, 1]));
    let r = replies(bus, &scrypt.encode().ok()?, now).pop()?;
    Some(Session::new(keys, r.data.try_into().ok()?))
}

fuzz_target!(|input: &[u8]| {
    let mut cfg = PdConfig::new(1);
    cfg.secure = Some(SecureConfig {
        scbk: Some(Scbk::new(KEY)),
        install_mode: true,
        enforce_secure: true,
    });
    let deps = PdDeps {
        rng: Some(Box::new(Counter(0))),
        key_store: None,
    };
    let Ok(pd) = Pd::with_deps(cfg, deps) else {
        return;
    };
    let Ok(mut bus) = Bus::with_pds(vec![pd], FrameDecoder::default()) else {
        return;
    };
    let now = Instant::now();
    let Some(mut cp) = handshake(&mut bus, now) else {
        return;
    };
    let mut sqn = 1u8;
    // Records: [flags, code, len, data...]. flags bit 0: flip a byte after signing;
    // bit 1: send in clear; bits 2-7: which byte.
    let mut rest = input;
    while let [flags, code, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let data = &tail[..n];
        sqn = if sqn >= 3 { 1 } else { sqn + 1 };
        let mut f = if flags & 2 != 0 {
            frame(sqn, *code, data.to_vec(), None)
        } else {
            let (ty, payload) = if data.is_empty() {
                (0x15, vec![])
            } else {
                (0x17, cp.encrypt(Direction::Command, data))
            };
            let mut f = frame(sqn, *code, payload, Some(vec![2, ty]));
            f.data.extend_from_slice(&[0; 4]);
            let mac = cp.sign(Direction::Command, &f.mac_input().unwrap_or_default());
            let k = f.data.len() - 4;
            f.data[k..].copy_from_slice(&mac);
            f
        };
        if flags & 1 != 0 && !f.data.is_empty() {
            let i = usize::from(flags >> 2) % f.data.len();
            f.data[i] ^= 0x5A;
        }
        if let Ok(bytes) = f.encode() {
            for r in replies(&mut bus, &bytes, now) {
                // Keep the CP's chain in step when the PD answered inside the session.
                if let Some(&[2, 0x16 | 0x18]) = r.scb.as_deref() {
                    let k = r.data.len().saturating_sub(4);
                    let _ = cp.verify(
                        Direction::Reply,
                        &r.mac_input().unwrap_or_default(),
                        &r.data[k..],
                    );
                }
            }
        }
        while bus.poll_event().is_some() {}
        rest = &tail[n..];
    }
    let _ = replies(&mut bus, input, now);
});
