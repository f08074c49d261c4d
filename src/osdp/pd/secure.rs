//! The secure channel of one PD (OSDP 2.2 secure channel annex): settings, injected
//! dependencies, session state, and the handshake (osdp_CHLNG → osdp_CCRYPT, osdp_SCRYPT →
//! osdp_RMAC_I), secure commands (MAC check, decryption) and osdp_KEYSET. The crypto itself is
//! in `super::super::sc`.

use std::time::{Duration, Instant};

use rand_core::RngCore;
use zeroize::Zeroize;

use super::{Pd, PdEvent, Wrap};
use crate::osdp::command::{self, Command};
use crate::osdp::phy::Frame;
use crate::osdp::reply::{NakCode, Reply};
use crate::osdp::sc::{self, scs, Direction, Scbk, Session, SessionKeys, MAC_LEN};

/// A secure session with no valid secure command for this long is dropped (libosdp's PD and
/// the spec's secure-channel session timeout use the same 8 s).
pub const SC_TIMEOUT: Duration = Duration::from_secs(8);

/// Secure-channel settings of one PD (OSDP 2.2 secure channel).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecureConfig {
    /// The installed Secure Channel Base Key, if any.
    pub scbk: Option<Scbk>,
    /// Accept handshakes with SCBK-D (the published default key) until an osdp_KEYSET
    /// installs a key; afterwards SCBK-D is refused.
    pub install_mode: bool,
    /// Outside a secure session, answer only ID, CAP and the handshake in clear; every other
    /// command (a clear COMSET too) gets NAK 0x06. Inside a session nothing clear is accepted,
    /// enforced or not.
    pub enforce_secure: bool,
}

/// Durable storage for a key installed by osdp_KEYSET. Called before the PD acknowledges
/// the key, so an ACKed key survives a restart. Implemented by the adapter (file I/O stays
/// out of the core).
pub trait KeyStore: Send {
    fn store(&mut self, address: u8, key: &Scbk) -> Result<(), String>;
}

/// What a PD needs from outside for the secure channel: randomness (the PD's challenge
/// random) and key storage. Both injected so the core stays deterministic under test.
#[derive(Default)]
pub struct PdDeps {
    pub rng: Option<Box<dyn RngCore + Send>>,
    pub key_store: Option<Box<dyn KeyStore>>,
}

impl std::fmt::Debug for PdDeps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PdDeps")
            .field("rng", &self.rng.is_some())
            .field("key_store", &self.key_store.is_some())
            .finish()
    }
}

/// Why a secure session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScEndReason {
    /// The CP restarted the link (sequence 0) or started a new handshake.
    Restart,
    /// No valid secure command for [`SC_TIMEOUT`].
    Timeout,
    /// A secure command failed MAC verification or decryption.
    BadMac,
    /// osdp_KEYSET installed a new key; the CP must handshake again with it.
    KeyChanged,
    /// A command arrived in clear during the session (a CP that lost the session, or
    /// someone else on the line): refused, and the session is over.
    PlainCommand,
}

/// Secure-channel state of one PD.
pub(super) enum ScState {
    Idle,
    /// CCRYPT sent; waiting for SCRYPT.
    Challenged {
        keys: SessionKeys,
        cp_random: [u8; 8],
        pd_random: [u8; 8],
        default_key: bool,
    },
    Active {
        session: Session,
        last: Instant,
    },
}

impl std::fmt::Debug for ScState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ScState::Idle => "Idle",
            ScState::Challenged { .. } => "Challenged",
            ScState::Active { .. } => "Active",
        })
    }
}

impl Pd {
    /// When the secure session times out, if one is up.
    pub(super) fn session_deadline(&self) -> Option<Instant> {
        match &self.sc {
            ScState::Active { last, .. } => last.checked_add(SC_TIMEOUT),
            _ => None,
        }
    }

    /// End the session if it saw no valid secure command for [`SC_TIMEOUT`].
    pub(super) fn expire_session(&mut self, now: Instant) {
        if let ScState::Active { last, .. } = &self.sc {
            if now.saturating_duration_since(*last) >= SC_TIMEOUT {
                self.end_session(ScEndReason::Timeout);
            }
        }
    }

    /// Wrap a reply for the secure session: encrypted data (SCS_18) or none (SCS_16), then
    /// the MAC. Leaves the frame as it is without a session; `None` if it cannot be built.
    pub(super) fn seal(&mut self, frame: &mut Frame) -> Option<()> {
        if let ScState::Active { session, .. } = &mut self.sc {
            let ty = if frame.data.is_empty() {
                scs::SCS_16
            } else {
                frame.data = session.encrypt(Direction::Reply, &frame.data);
                scs::SCS_18
            };
            frame.scb = Some(vec![2, ty]);
            frame.data.extend_from_slice(&[0; MAC_LEN]);
            let input = frame.mac_input().ok()?;
            let mac = session.sign(Direction::Reply, &input);
            let n = frame.data.len().saturating_sub(MAC_LEN);
            frame.data.get_mut(n..)?.copy_from_slice(&mac);
        }
        Some(())
    }

    /// True while a secure session is established.
    pub fn secure_session(&self) -> bool {
        matches!(self.sc, ScState::Active { .. })
    }

    /// True while SCBK-D is still accepted (install mode, no key installed by KEYSET yet).
    pub fn in_install_mode(&self) -> bool {
        self.install_mode
    }

    pub(super) fn end_session(&mut self, reason: ScEndReason) {
        let was_active = self.secure_session();
        self.sc = ScState::Idle;
        if was_active {
            self.emit(PdEvent::SecureChannelDown { reason });
        }
    }

    /// cUID sent in osdp_CCRYPT: vendor code (3, LE), model, serial number (4, LE).
    pub(super) fn client_uid(&self) -> [u8; 8] {
        let id = &self.cfg.identity;
        let v = id.vendor_code.to_le_bytes();
        let s = id.serial.to_le_bytes();
        [v[0], v[1], v[2], id.model, s[0], s[1], s[2], s[3]]
    }

    /// osdp_CHLNG → osdp_CCRYPT. `asks_default`: the CP asked for SCBK-D (key byte 0).
    pub(super) fn challenge(&mut self, data: &[u8], asks_default: bool) -> (Reply, Wrap) {
        let nak = |c| (Reply::Nak(c), Wrap::Plain);
        let cp_random = match command::parse(command::code::CHLNG, data) {
            Ok(Command::Challenge(r)) => r,
            Ok(_) => return nak(NakCode::UnknownCommand),
            Err(e) => return nak(e.nak()),
        };
        self.end_session(ScEndReason::Restart);
        // SCBK-D only in install mode. Outside it, a request for SCBK-D is answered with the
        // installed key and CCRYPT says so (key byte 1), as libosdp's PD does: some CPs
        // (PyPI `osdp` 1.6) ask for SCBK-D in every CHLNG but follow the PD's answer; a
        // CP that really holds only SCBK-D fails the cryptogram check at SCRYPT.
        let default_key = asks_default && self.install_mode;
        let key = if default_key {
            Scbk::default_key()
        } else {
            // No key yet: NAK makes libosdp's CP retry with SCBK-D (install mode).
            match &self.scbk {
                Some(k) => k.clone(),
                None => return nak(NakCode::ScConditions),
            }
        };
        let mut pd_random = [0u8; 8];
        let Some(rng) = self.deps.rng.as_mut() else {
            return nak(NakCode::ScConditions);
        };
        if rng.try_fill_bytes(&mut pd_random).is_err() {
            return nak(NakCode::ScConditions);
        }
        let keys = SessionKeys::derive(&key, &cp_random);
        let cryptogram = keys.client_cryptogram(&cp_random, &pd_random);
        self.sc = ScState::Challenged {
            keys,
            cp_random,
            pd_random,
            default_key,
        };
        let reply = Reply::Ccrypt {
            uid: self.client_uid(),
            pd_random,
            cryptogram,
        };
        (
            reply,
            Wrap::Handshake([3, scs::SCS_12, u8::from(!default_key)]),
        )
    }

    /// osdp_SCRYPT → osdp_RMAC_I; the session starts.
    pub(super) fn server_cryptogram(&mut self, data: &[u8], now: Instant) -> (Reply, Wrap) {
        let nak = |c| (Reply::Nak(c), Wrap::Plain);
        let theirs = match command::parse(command::code::SCRYPT, data) {
            Ok(Command::ServerCryptogram(c)) => c,
            Ok(_) => return nak(NakCode::UnknownCommand),
            Err(e) => return nak(e.nak()),
        };
        let ScState::Challenged {
            keys,
            cp_random,
            pd_random,
            default_key,
        } = std::mem::replace(&mut self.sc, ScState::Idle)
        else {
            return nak(NakCode::ScConditions);
        };
        let ours = keys.server_cryptogram(&cp_random, &pd_random);
        if !sc::ct_eq(&ours, &theirs) {
            // Wrong key on the CP side (or an attacker): no session.
            return nak(NakCode::ScConditions);
        }
        let rmac = keys.initial_rmac(&theirs);
        self.sc = ScState::Active {
            session: Session::new(keys, rmac),
            last: now,
        };
        self.emit(PdEvent::SecureChannelUp {
            install_key: default_key,
        });
        (Reply::RmacI(rmac), Wrap::Handshake([3, scs::SCS_14, 1]))
    }

    /// A command inside the secure session: MAC check, decryption, then the command.
    pub(super) fn secure_command(
        &mut self,
        frame: &Frame,
        scs_type: u8,
        now: Instant,
    ) -> (Reply, Wrap) {
        let nak = |c| (Reply::Nak(c), Wrap::Plain);
        let ScState::Active { session, last, .. } = &mut self.sc else {
            return nak(NakCode::ScConditions);
        };
        let Ok(input) = frame.mac_input() else {
            return nak(NakCode::ScConditions);
        };
        let split = frame.data.len().saturating_sub(MAC_LEN);
        let (body, mac) = frame.data.split_at(split);
        if session.verify(Direction::Command, &input, mac).is_err() {
            self.end_session(ScEndReason::BadMac);
            return nak(NakCode::ScConditions);
        }
        let mut data = if scs_type == scs::SCS_17 && !body.is_empty() {
            match session.decrypt(Direction::Command, body) {
                Ok(d) => d,
                Err(_) => {
                    self.end_session(ScEndReason::BadMac);
                    return nak(NakCode::ScConditions);
                }
            }
        } else {
            body.to_vec()
        };
        *last = now;
        let parsed = command::parse(frame.code, &data);
        // KEYSET data is key material.
        data.zeroize();
        let reply = match parsed {
            Ok(Command::KeySet { key_type, key }) => self.key_set(key_type, key),
            Ok(Command::Challenge(_) | Command::ServerCryptogram(_)) => {
                Reply::Nak(NakCode::ScConditions)
            }
            Ok(cmd) => self.execute(cmd, now),
            Err(e) => Reply::Nak(e.nak()),
        };
        (reply, Wrap::Secure)
    }

    /// osdp_KEYSET inside a session: store durably first, then ACK; the key takes effect
    /// once the ACK is out (see `handle_frame`).
    pub(super) fn key_set(&mut self, key_type: u8, key: Scbk) -> Reply {
        // Type 1 = SCBK; nothing else is defined for a PD.
        if key_type != 1 {
            return Reply::Nak(NakCode::Record);
        }
        let Some(store) = self.deps.key_store.as_mut() else {
            return Reply::Nak(NakCode::ScConditions);
        };
        if let Err(e) = store.store(self.cfg.address, &key) {
            self.emit(PdEvent::KeyStoreFailed(e));
            return Reply::Nak(NakCode::ScConditions);
        }
        self.pending_key = Some(key);
        Reply::Ack
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::super::*;
    use crate::osdp::reply::code as rc;
    use crate::osdp::sc::{Direction, Scbk, Session, SessionKeys};

    #[test]
    fn secure_session_with_known_key() {
        let (mut pd, _) = secure_pd(Some(KEY), false, true);
        let now = Instant::now();
        // CAP in clear advertises AES-128, no SCBK-D.
        let r = run(&mut pd, cmd(0, 0x62, &[0]), now);
        let caps: Vec<&[u8]> = r.data.chunks(3).collect();
        assert!(caps.contains(&&[9u8, 1, 0][..]), "{caps:?}");
        let mut cp = handshake(&mut pd, &Scbk::new(KEY), false, now);
        assert!(events(&mut pd).contains(&PdEvent::SecureChannelUp { install_key: false }));

        // POLL (MAC only) → ACK (MAC only), chain verified over several packets.
        for sqn in [2u8, 3, 1] {
            let r = run(&mut pd, secure_cmd(&mut cp, sqn, 0x60, &[]), now);
            assert_eq!(open_reply(&mut cp, &r), (rc::ACK, vec![]));
        }
        // Encrypted LED command → ACK; the LED state changed.
        let r = run(
            &mut pd,
            secure_cmd(&mut cp, 2, 0x69, &led_data(0, 0, 1, 2)),
            now,
        );
        assert_eq!(open_reply(&mut cp, &r).0, rc::ACK);
        assert_eq!(pd.leds()[0].permanent.on_color, 2);
        // A card goes out as an encrypted RAW.
        pd.queue_card(card26(), now).unwrap();
        let r = run(&mut pd, secure_cmd(&mut cp, 3, 0x60, &[]), now);
        assert_eq!(r.scb, Some(vec![2, 0x18]));
        // The card bits are not visible on the wire.
        assert!(!r.data.windows(4).any(|w| w == [0x12, 0x34, 0x56, 0x40]));
        assert_eq!(
            open_reply(&mut cp, &r),
            (rc::RAW, vec![0, 1, 26, 0, 0x12, 0x34, 0x56, 0x40])
        );
        // Retry of the same SQN: the identical bytes (not a second MAC step).
        let again = secure_cmd(&mut cp.clone(), 3, 0x60, &[]);
        assert_eq!(pd.handle_frame(&again, now).map(|b| decode(&b)), Some(r));
        // Next command still verifies: the chain did not move on the retry.
        let r = run(&mut pd, secure_cmd(&mut cp, 1, 0x60, &[]), now);
        assert_eq!(open_reply(&mut cp, &r), (rc::ACK, vec![]));
        assert!(events(&mut pd).contains(&PdEvent::CardDelivered(card26())));
    }

    #[test]
    fn enforce_secure_answers_only_id_cap_and_handshake_in_clear() {
        let (mut pd, _) = secure_pd(Some(KEY), false, true);
        let now = Instant::now();
        assert_eq!(run(&mut pd, cmd(0, 0x61, &[0]), now).code, rc::PDID);
        assert_eq!(run(&mut pd, cmd(1, 0x62, &[0]), now).code, rc::PDCAP);
        for (sqn, code, data) in [
            (2u8, 0x60u8, vec![]),
            (3, 0x64, vec![]),
            (1, 0x69, led_data(0, 0, 1, 2)),
            // A clear COMSET would let anyone on the line readdress the reader.
            (2, 0x6E, vec![7, 0x80, 0x25, 0x00, 0x00]),
        ] {
            let r = run(&mut pd, cmd(sqn, code, &data), now);
            assert_eq!((r.code, r.data), (rc::NAK, vec![0x06]), "code {code:#04x}");
        }
        assert_eq!((pd.bus_address(), pd.config().baud), (ADDR, 115_200));
        assert!(!events(&mut pd)
            .iter()
            .any(|e| matches!(e, PdEvent::ComSetApplied { .. })));
        // Broadcast COMSET too.
        let mut f = cmd(3, 0x6E, &[7, 0x80, 0x25, 0x00, 0x00]);
        f.addr_byte = BROADCAST_ADDR;
        assert_eq!(run(&mut pd, f, now).data, vec![0x06]);
        assert_eq!(pd.bus_address(), ADDR);
        // CHLNG without its security block is refused.
        let r = run(&mut pd, cmd(1, 0x76, &[1; 8]), now);
        assert_eq!(r.data, vec![0x06]);
        // Without enforcement, plaintext POLL is fine while no session exists...
        let (mut lax, _) = secure_pd(Some(KEY), false, false);
        assert_eq!(run(&mut lax, cmd(0, 0x60, &[]), now).code, rc::ACK);
        // ...but not once a session is up.
        let _cp = handshake(&mut lax, &Scbk::new(KEY), false, now);
        let r = run(&mut lax, cmd(2, 0x60, &[]), now);
        assert_eq!((r.code, r.data), (rc::NAK, vec![0x06]));
    }

    #[test]
    fn nothing_clear_is_accepted_inside_a_session() {
        let now = Instant::now();
        // Enforced or not: once a session is up, a clear command (even ID, CAP, COMSET) is
        // refused with NAK 0x06 in clear and ends the session, as libosdp's PD does.
        for enforce in [true, false] {
            for (code, data) in [
                (0x6Eu8, vec![7u8, 0x80, 0x25, 0x00, 0x00]),
                (0x61, vec![0]),
                (0x62, vec![0]),
                (0x60, vec![]),
            ] {
                let (mut pd, _) = secure_pd(Some(KEY), false, enforce);
                let _cp = handshake(&mut pd, &Scbk::new(KEY), false, now);
                events(&mut pd);
                let r = run(&mut pd, cmd(2, code, &data), now);
                assert_eq!(
                    (r.code, r.data, r.scb),
                    (rc::NAK, vec![0x06], None),
                    "code {code:#04x} enforce {enforce}"
                );
                assert!(!pd.secure_session(), "code {code:#04x}");
                let evs = events(&mut pd);
                assert!(evs.contains(&PdEvent::SecureChannelDown {
                    reason: ScEndReason::PlainCommand
                }));
                assert!(!evs
                    .iter()
                    .any(|e| matches!(e, PdEvent::ComSetApplied { .. })));
                assert_eq!((pd.bus_address(), pd.config().baud), (ADDR, 115_200));
            }
        }
        // The same COMSET inside the session is applied.
        let (mut pd, _) = secure_pd(Some(KEY), false, true);
        let mut cp = handshake(&mut pd, &Scbk::new(KEY), false, now);
        let r = run(
            &mut pd,
            secure_cmd(&mut cp, 2, 0x6E, &[7, 0x80, 0x25, 0x00, 0x00]),
            now,
        );
        assert_eq!(
            open_reply(&mut cp, &r),
            (0x54, vec![7, 0x80, 0x25, 0x00, 0x00])
        );
        assert_eq!((pd.bus_address(), pd.config().baud), (7, 9600));
    }

    #[test]
    fn a_cp_asking_for_scbk_d_gets_the_installed_key_outside_install_mode() {
        // Such CPs (PyPI `osdp` 1.6) ask for SCBK-D in every osdp_CHLNG but take the key
        // the PD names in osdp_CCRYPT. libosdp's PD answers with its installed key there.
        let (mut pd, _) = secure_pd(Some(KEY), false, true);
        let now = Instant::now();
        let cp_random = [0xC0, 0xC1, 0xC2, 0xC3, 0xC4, 0xC5, 0xC6, 0xC7];
        let mut c = cmd(0, 0x76, &cp_random);
        c.scb = Some(vec![3, 0x11, 0]);
        let r = run(&mut pd, c, now);
        assert_eq!(r.code, 0x76, "CCRYPT expected, got {r:?}");
        // Key byte 1: the PD used its SCBK, not SCBK-D.
        assert_eq!(r.scb, Some(vec![3, 0x12, 1]));
        let pd_random: [u8; 8] = r.data[8..16].try_into().unwrap();
        let keys = SessionKeys::derive(&Scbk::new(KEY), &cp_random);
        assert_eq!(
            r.data[16..],
            keys.client_cryptogram(&cp_random, &pd_random)[..]
        );
        let server = keys.server_cryptogram(&cp_random, &pd_random);
        let mut c = cmd(1, 0x77, &server);
        c.scb = Some(vec![3, 0x13, 0]);
        let r = run(&mut pd, c, now);
        assert_eq!((r.code, r.scb), (0x78, Some(vec![3, 0x14, 1])));
        assert!(pd.secure_session());
        assert!(events(&mut pd).contains(&PdEvent::SecureChannelUp { install_key: false }));
        let mut cp = Session::new(keys, r.data.clone().try_into().unwrap());
        let r = run(&mut pd, secure_cmd(&mut cp, 2, 0x60, &[]), now);
        assert_eq!(open_reply(&mut cp, &r), (rc::ACK, vec![]));

        // A CP that really computes with SCBK-D gets no session.
        scbk_d_gets_no_session(&mut pd, now);
    }

    /// A CP asking for and computing with SCBK-D (SQN 0, 1): the PD answers with its own
    /// key (CCRYPT key byte 1), so the CP's cryptogram fails: NAK 0x06, no session.
    fn scbk_d_gets_no_session(pd: &mut Pd, now: Instant) {
        let cp_random = [0x5D; 8];
        let mut c = cmd(0, 0x76, &cp_random);
        c.scb = Some(vec![3, 0x11, 0]);
        let r = run(pd, c, now);
        assert_eq!(
            (r.code, r.scb.clone()),
            (0x76, Some(vec![3, 0x12, 1])),
            "{r:?}"
        );
        let pd_random: [u8; 8] = r.data[8..16].try_into().unwrap();
        let default = SessionKeys::derive(&Scbk::default_key(), &cp_random);
        let mut c = cmd(1, 0x77, &default.server_cryptogram(&cp_random, &pd_random));
        c.scb = Some(vec![3, 0x13, 0]);
        assert_eq!(run(pd, c, now).data, vec![0x06]);
        assert!(!pd.secure_session());
        assert!(!events(pd).contains(&PdEvent::SecureChannelUp { install_key: true }));
    }

    #[test]
    fn bad_mac_or_ciphertext_ends_the_session_with_nak_6() {
        let (mut pd, _) = secure_pd(Some(KEY), false, true);
        let now = Instant::now();
        let mut cp = handshake(&mut pd, &Scbk::new(KEY), false, now);
        let mut f = secure_cmd(&mut cp, 2, 0x60, &[]);
        let n = f.data.len() - 1;
        f.data[n] ^= 0x01;
        let r = run(&mut pd, f, now);
        assert_eq!((r.code, r.data, r.scb), (rc::NAK, vec![0x06], None));
        assert!(!pd.secure_session());
        assert!(events(&mut pd).contains(&PdEvent::SecureChannelDown {
            reason: ScEndReason::BadMac
        }));
        // Ciphertext that is not whole blocks (valid MAC over it): also refused.
        let mut cp = handshake(&mut pd, &Scbk::new(KEY), false, now);
        let mut f = cmd(2, 0x69, &[0xAA; 15]);
        f.scb = Some(vec![2, 0x17]);
        f.data.extend_from_slice(&[0; 4]);
        let mac = cp.sign(Direction::Command, &f.mac_input().unwrap());
        let n = f.data.len() - 4;
        f.data[n..].copy_from_slice(&mac);
        assert_eq!(run(&mut pd, f, now).data, vec![0x06]);
        assert!(!pd.secure_session());
        // Secure packet without any session, and a too-short one.
        let mut f = cmd(3, 0x60, &[1, 2]);
        f.scb = Some(vec![2, 0x15]);
        assert_eq!(run(&mut pd, f, now).data, vec![0x06]);
        // Unknown security block type.
        let mut f = cmd(1, 0x60, &[]);
        f.scb = Some(vec![2, 0x19]);
        assert_eq!(run(&mut pd, f, now).data, vec![0x06]);
    }

    #[test]
    fn wrong_key_at_the_cp_gets_no_session() {
        let (mut pd, _) = secure_pd(Some(KEY), false, true);
        let now = Instant::now();
        let cp_random = [9u8; 8];
        let mut c = cmd(0, 0x76, &cp_random);
        c.scb = Some(vec![3, 0x11, 1]);
        let r = run(&mut pd, c, now);
        let pd_random: [u8; 8] = r.data[8..16].try_into().unwrap();
        // CP computes with another key.
        let wrong = SessionKeys::derive(&Scbk::new([0x22; 16]), &cp_random);
        let mut c = cmd(1, 0x77, &wrong.server_cryptogram(&cp_random, &pd_random));
        c.scb = Some(vec![3, 0x13, 1]);
        let r = run(&mut pd, c, now);
        assert_eq!((r.code, r.data), (rc::NAK, vec![0x06]));
        assert!(!pd.secure_session());
        // SCRYPT without a preceding CHLNG.
        let mut c = cmd(2, 0x77, &[0; 16]);
        c.scb = Some(vec![3, 0x13, 1]);
        assert_eq!(run(&mut pd, c, now).data, vec![0x06]);
        // A CP that computes with SCBK-D gets no session outside install mode.
        scbk_d_gets_no_session(&mut pd, now);
    }

    #[test]
    fn install_mode_keyset_then_scbk_d_refused() {
        let (mut pd, stored) = secure_pd(None, true, true);
        let now = Instant::now();
        // CAP: AES-128 and SCBK-D accepted.
        let r = run(&mut pd, cmd(0, 0x62, &[0]), now);
        assert!(r.data.chunks(3).any(|c| c == [9, 1, 1]));
        // CP tries its key first: no key here → NAK 6 (libosdp's CP then retries SCBK-D).
        let mut c = cmd(1, 0x76, &[5; 8]);
        c.scb = Some(vec![3, 0x11, 1]);
        assert_eq!(run(&mut pd, c, now).data, vec![0x06]);
        let mut cp = handshake(&mut pd, &Scbk::default_key(), true, now);
        assert!(events(&mut pd).contains(&PdEvent::SecureChannelUp { install_key: true }));
        // KEYSET (encrypted) → ACK under the SCBK-D session, key stored first.
        let new_key = [0x5C; 16];
        let mut data = vec![1, 16];
        data.extend_from_slice(&new_key);
        let r = run(&mut pd, secure_cmd(&mut cp, 2, 0x75, &data), now);
        assert_eq!(open_reply(&mut cp, &r), (rc::ACK, vec![]));
        assert_eq!(
            stored.lock().unwrap().as_slice(),
            &[(ADDR, Scbk::new(new_key))]
        );
        assert!(!pd.secure_session() && !pd.in_install_mode());
        let evs = events(&mut pd);
        assert!(evs.contains(&PdEvent::KeyInstalled));
        assert!(evs.contains(&PdEvent::SecureChannelDown {
            reason: ScEndReason::KeyChanged
        }));
        // A retried KEYSET gets the same ACK bytes again.
        let retry = secure_cmd(&mut cp.clone(), 2, 0x75, &data);
        assert_eq!(pd.handle_frame(&retry, now).map(|b| decode(&b)), Some(r));
        // SCBK-D no longer accepted; the new key works.
        scbk_d_gets_no_session(&mut pd, now);
        let mut cp = handshake(&mut pd, &Scbk::new(new_key), false, now);
        let r = run(&mut pd, secure_cmd(&mut cp, 2, 0x60, &[]), now);
        assert_eq!(open_reply(&mut cp, &r), (rc::ACK, vec![]));
        // CAP no longer offers SCBK-D.
        let r = run(&mut pd, secure_cmd(&mut cp, 3, 0x62, &[0]), now);
        let (_, caps) = open_reply(&mut cp, &r);
        assert!(caps.chunks(3).any(|c| c == [9, 1, 0]));
    }

    #[test]
    fn keyset_refused_in_clear_or_when_it_cannot_be_stored() {
        let (mut pd, stored) = secure_pd_store(Some(KEY), false, false, true);
        let now = Instant::now();
        let mut data = vec![1, 16];
        data.extend_from_slice(&[0x77; 16]);
        // In clear: NAK 6.
        run(&mut pd, cmd(0, 0x60, &[]), now);
        assert_eq!(run(&mut pd, cmd(1, 0x75, &data), now).data, vec![0x06]);
        // In a session but the store fails: NAK 6, old key kept, event says why.
        let mut cp = handshake(&mut pd, &Scbk::new(KEY), false, now);
        let r = run(&mut pd, secure_cmd(&mut cp, 2, 0x75, &data), now);
        assert_eq!(open_reply(&mut cp, &r), (rc::NAK, vec![0x06]));
        assert!(stored.lock().unwrap().is_empty());
        assert!(events(&mut pd)
            .iter()
            .any(|e| matches!(e, PdEvent::KeyStoreFailed(_))));
        // Unknown key type: NAK 9 (record).
        data[0] = 2;
        let r = run(&mut pd, secure_cmd(&mut cp, 3, 0x75, &data), now);
        assert_eq!(open_reply(&mut cp, &r), (rc::NAK, vec![0x09]));
        // The old key still works after a restart of the session.
        let _ = handshake(&mut pd, &Scbk::new(KEY), false, now);
    }

    #[test]
    fn session_times_out_and_sqn_zero_ends_it() {
        let (mut pd, _) = secure_pd(Some(KEY), false, true);
        let now = Instant::now();
        let mut cp = handshake(&mut pd, &Scbk::new(KEY), false, now);
        let r = run(&mut pd, secure_cmd(&mut cp, 2, 0x60, &[]), now);
        open_reply(&mut cp, &r);
        let t = now + Duration::from_secs(7);
        pd.handle_timeout(t);
        assert!(pd.secure_session());
        assert!(pd.next_timeout().is_some_and(|t| t <= now + SC_TIMEOUT));
        pd.handle_timeout(now + SC_TIMEOUT);
        assert!(!pd.secure_session());
        assert!(events(&mut pd).contains(&PdEvent::SecureChannelDown {
            reason: ScEndReason::Timeout
        }));
        // A new session, then the CP restarts the link with SQN 0.
        let _cp = handshake(&mut pd, &Scbk::new(KEY), false, now);
        assert_eq!(run(&mut pd, cmd(0, 0x61, &[0]), now).code, rc::PDID);
        assert!(!pd.secure_session());
    }

    #[test]
    fn debug_output_of_a_secure_pd_shows_no_key_material() {
        let (mut pd, _) = secure_pd(Some([0xA7; 16]), false, true);
        let now = Instant::now();
        let _cp = handshake(&mut pd, &Scbk::new([0xA7; 16]), false, now);
        let text = format!("{pd:?}");
        assert!(text.contains("Active"), "{text}");
        // 0xA7 = 167 (decimal Debug of an array) or a7 (hex).
        assert!(!text.contains("167") && !text.to_lowercase().contains("a7, "));
    }

    #[test]
    fn secure_config_needs_a_key_or_install_mode_and_an_rng() {
        let mut cfg = PdConfig::new(ADDR);
        cfg.secure = Some(SecureConfig {
            scbk: None,
            install_mode: false,
            enforce_secure: false,
        });
        assert!(matches!(Pd::new(cfg.clone()), Err(PdError::Config(_))));
        cfg.secure = Some(SecureConfig {
            scbk: Some(Scbk::new(KEY)),
            install_mode: false,
            enforce_secure: false,
        });
        assert!(matches!(Pd::new(cfg), Err(PdError::Config(_))));
    }
}
