//! Helpers shared by the PD's unit tests: frames as a CP would send them, a deterministic RNG,
//! an in-memory key store, and the CP side of the secure channel.

use std::time::Instant;

use rand_core::RngCore;

use super::*;
use crate::osdp::phy::{Check, FrameDecoder};
use crate::osdp::reply::RawFormat;
use crate::osdp::sc::{Direction, Scbk, Session, SessionKeys};

pub(super) const ADDR: u8 = 0x65;

pub(super) fn cmd(sqn: u8, code: u8, data: &[u8]) -> Frame {
    Frame {
        mark: true,
        addr_byte: ADDR,
        sqn,
        check: Check::Crc16,
        scb: None,
        code,
        data: data.to_vec(),
    }
}

pub(super) fn decode(bytes: &[u8]) -> Frame {
    let mut d = FrameDecoder::default();
    assert_eq!(d.push(bytes, Instant::now()), bytes.len());
    let f = d.poll().expect("a frame").expect("valid frame");
    assert!(d.poll().is_none());
    f
}

pub(super) fn run(pd: &mut Pd, f: Frame, now: Instant) -> Frame {
    let bytes = pd.handle_frame(&f, now).expect("a reply");
    decode(&bytes)
}

pub(super) fn events(pd: &mut Pd) -> Vec<PdEvent> {
    std::iter::from_fn(|| pd.poll_event()).collect()
}

pub(super) fn card26() -> RawCard {
    RawCard {
        reader: 0,
        format: RawFormat::Wiegand,
        bit_count: 26,
        data: vec![0x12, 0x34, 0x56, 0x40],
    }
}

pub(super) fn led_data(reader: u8, led: u8, perm_ctl: u8, color: u8) -> Vec<u8> {
    vec![reader, led, 0, 0, 0, 0, 0, 0, 0, perm_ctl, 1, 0, color, 0]
}

/// Deterministic "random" source for tests.
pub(super) struct CountingRng(u8);

impl RngCore for CountingRng {
    fn next_u32(&mut self) -> u32 {
        rand_core::impls::next_u32_via_fill(self)
    }
    fn next_u64(&mut self) -> u64 {
        rand_core::impls::next_u64_via_fill(self)
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

pub(super) type Stored = std::sync::Arc<std::sync::Mutex<Vec<(u8, Scbk)>>>;

pub(super) struct MemStore(Stored, bool);

impl KeyStore for MemStore {
    fn store(&mut self, address: u8, key: &Scbk) -> Result<(), String> {
        if self.1 {
            return Err("disk full".into());
        }
        self.0.lock().unwrap().push((address, key.clone()));
        Ok(())
    }
}

pub(super) const KEY: [u8; 16] = [0x11; 16];

pub(super) fn secure_pd(scbk: Option<[u8; 16]>, install: bool, enforce: bool) -> (Pd, Stored) {
    secure_pd_store(scbk, install, enforce, false)
}

pub(super) fn secure_pd_store(
    scbk: Option<[u8; 16]>,
    install: bool,
    enforce: bool,
    failing_store: bool,
) -> (Pd, Stored) {
    let mut cfg = PdConfig::new(ADDR);
    cfg.secure = Some(SecureConfig {
        scbk: scbk.map(Scbk::new),
        install_mode: install,
        enforce_secure: enforce,
    });
    let stored = Stored::default();
    let deps = PdDeps {
        rng: Some(Box::new(CountingRng(0))),
        key_store: Some(Box::new(MemStore(stored.clone(), failing_store))),
    };
    (Pd::with_deps(cfg, deps).unwrap(), stored)
}

/// The CP side of a handshake, driven by the test through `sc` directly.
pub(super) fn handshake(pd: &mut Pd, key: &Scbk, use_default: bool, now: Instant) -> Session {
    let cp_random = [0xC0, 0xC1, 0xC2, 0xC3, 0xC4, 0xC5, 0xC6, 0xC7];
    let mut c = cmd(0, 0x76, &cp_random);
    c.scb = Some(vec![3, 0x11, u8::from(!use_default)]);
    let r = run(pd, c, now);
    assert_eq!(r.code, 0x76, "CCRYPT expected, got {r:?}");
    assert_eq!(r.scb, Some(vec![3, 0x12, u8::from(!use_default)]));
    assert_eq!(r.data.len(), 32);
    let pd_random: [u8; 8] = r.data[8..16].try_into().unwrap();
    let keys = SessionKeys::derive(key, &cp_random);
    assert_eq!(
        r.data[16..],
        keys.client_cryptogram(&cp_random, &pd_random)[..],
        "PD cryptogram"
    );
    let server = keys.server_cryptogram(&cp_random, &pd_random);
    let mut c = cmd(1, 0x77, &server);
    c.scb = Some(vec![3, 0x13, u8::from(!use_default)]);
    let r = run(pd, c, now);
    assert_eq!(r.code, 0x78, "RMAC_I expected, got {r:?}");
    assert_eq!(r.scb, Some(vec![3, 0x14, 1]));
    let rmac: [u8; 16] = r.data.clone().try_into().unwrap();
    assert_eq!(rmac, keys.initial_rmac(&server));
    assert!(pd.secure_session());
    Session::new(keys, rmac)
}

pub(super) fn secure_cmd(cp: &mut Session, sqn: u8, code: u8, data: &[u8]) -> Frame {
    let (ty, payload) = if data.is_empty() {
        (0x15, vec![])
    } else {
        (0x17, cp.encrypt(Direction::Command, data))
    };
    let mut f = cmd(sqn, code, &payload);
    f.scb = Some(vec![2, ty]);
    f.data.extend_from_slice(&[0; 4]);
    let mac = cp.sign(Direction::Command, &f.mac_input().unwrap());
    let n = f.data.len() - 4;
    f.data[n..].copy_from_slice(&mac);
    f
}

/// Verify and decrypt a secure reply as the CP would; returns (code, data).
pub(super) fn open_reply(cp: &mut Session, r: &Frame) -> (u8, Vec<u8>) {
    let ty = match r.scb.as_deref() {
        Some(&[2, t @ (0x16 | 0x18)]) => t,
        other => panic!("not a secure reply: scb {other:?}, code {:#04x}", r.code),
    };
    let n = r.data.len() - 4;
    cp.verify(Direction::Reply, &r.mac_input().unwrap(), &r.data[n..])
        .expect("reply MAC");
    let data = if ty == 0x18 {
        cp.decrypt(Direction::Reply, &r.data[..n]).unwrap()
    } else {
        assert_eq!(n, 0, "SCS_16 carries no data");
        vec![]
    };
    (r.code, data)
}
