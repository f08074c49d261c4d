//! A multi-drop bus: one frame decoder for the line and one [`Pd`] per door address.
//!
//! Frames for addresses this bus does not own, and replies from other PDs on the line, are
//! ignored. The broadcast address reaches a PD only when the bus owns exactly one (otherwise
//! several PDs would answer at once and collide).

use std::time::Instant;

use super::pd::{Pd, PdConfig, PdError, PdEvent};
use super::phy::{DecoderStats, FrameDecoder, PhyError, BROADCAST_ADDR};
use super::reply::RawCard;

/// All PDs served on one serial line.
#[derive(Debug)]
pub struct Bus {
    decoder: FrameDecoder,
    pds: Vec<Pd>,
    /// Round-robin start for `poll_event`, so one busy PD cannot starve the others.
    next_event_pd: usize,
    last_phy_error: Option<PhyError>,
}

impl Bus {
    pub fn new(configs: Vec<PdConfig>) -> Result<Self, PdError> {
        Self::with_decoder(configs, FrameDecoder::default())
    }

    pub fn with_decoder(configs: Vec<PdConfig>, decoder: FrameDecoder) -> Result<Self, PdError> {
        let pds = configs
            .into_iter()
            .map(Pd::new)
            .collect::<Result<Vec<_>, _>>()?;
        Self::with_pds(pds, decoder)
    }

    /// A bus of ready-made PDs (e.g. built with [`Pd::with_deps`] for the secure channel).
    pub fn with_pds(pds: Vec<Pd>, decoder: FrameDecoder) -> Result<Self, PdError> {
        if pds.is_empty() {
            return Err(PdError::NoPds);
        }
        for (i, p) in pds.iter().enumerate() {
            if pds
                .iter()
                .skip(i + 1)
                .any(|q| q.address() == p.address() || q.bus_address() == p.bus_address())
            {
                return Err(PdError::DuplicateAddress(p.address()));
            }
        }
        let mut bus = Self {
            decoder,
            pds,
            next_event_pd: 0,
            last_phy_error: None,
        };
        bus.refresh_neighbours();
        Ok(bus)
    }

    /// Tell every PD which addresses the others answer on (for osdp_COMSET).
    fn refresh_neighbours(&mut self) {
        let all: Vec<u8> = self.pds.iter().map(Pd::bus_address).collect();
        let alone = self.pds.len() == 1;
        for pd in &mut self.pds {
            let me = pd.bus_address();
            pd.set_neighbours(all.iter().copied().filter(|&a| a != me).collect(), alone);
        }
    }

    pub fn addresses(&self) -> Vec<u8> {
        self.pds.iter().map(Pd::address).collect()
    }

    pub fn pd(&self, addr: u8) -> Option<&Pd> {
        self.pds.iter().find(|p| p.address() == addr)
    }

    pub fn pd_mut(&mut self, addr: u8) -> Option<&mut Pd> {
        self.pds.iter_mut().find(|p| p.address() == addr)
    }

    pub fn decoder_stats(&self) -> DecoderStats {
        self.decoder.stats()
    }

    /// The most recent framing error (for logs), cleared when read.
    pub fn take_phy_error(&mut self) -> Option<PhyError> {
        self.last_phy_error.take()
    }

    /// Queue a card on the PD at `addr`.
    pub fn queue_card(&mut self, addr: u8, card: RawCard, now: Instant) -> Result<(), PdError> {
        self.queue_attempt(addr, card, None, now)
    }

    /// Queue a card for `attempt` on the PD at `addr` (see [`Pd::queue_attempt`]).
    pub fn queue_attempt(
        &mut self,
        addr: u8,
        card: RawCard,
        attempt: Option<super::pd::AttemptId>,
        now: Instant,
    ) -> Result<(), PdError> {
        self.pd_mut(addr)
            .ok_or(PdError::UnknownAddress(addr))?
            .queue_attempt(card, attempt, now)
    }

    /// Feed bytes read from the line at `now`; returns the reply packets to write, in order.
    pub fn receive(&mut self, bytes: &[u8], now: Instant) -> Vec<Vec<u8>> {
        let mut replies = Vec::new();
        let mut rest = bytes;
        loop {
            let n = self.decoder.push(rest, now);
            rest = rest.get(n..).unwrap_or_default();
            self.drain_decoder(now, &mut replies);
            if rest.is_empty() {
                return replies;
            }
        }
    }

    fn drain_decoder(&mut self, now: Instant, replies: &mut Vec<Vec<u8>>) {
        while let Some(item) = self.decoder.poll() {
            let frame = match item {
                Ok(frame) => frame,
                Err(e) => {
                    self.last_phy_error = Some(e);
                    continue;
                }
            };
            if frame.is_reply() {
                continue;
            }
            let target = if frame.address() == BROADCAST_ADDR {
                if self.pds.len() == 1 {
                    self.pds.first_mut()
                } else {
                    None
                }
            } else {
                self.pds
                    .iter_mut()
                    .find(|p| p.bus_address() == frame.address())
            };
            let Some(pd) = target else { continue };
            let before = pd.bus_address();
            let reply = pd.handle_frame(&frame, now);
            let moved = pd.bus_address() != before;
            if let Some(reply) = reply {
                replies.push(reply);
            }
            if moved {
                self.refresh_neighbours();
            }
        }
    }

    /// Earliest time `handle_timeout` has work to do.
    pub fn next_timeout(&self) -> Option<Instant> {
        self.pds
            .iter()
            .filter_map(Pd::next_timeout)
            .chain(self.decoder.next_timeout())
            .min()
    }

    /// Advance timers. Dropping a stale partial packet can expose a complete command
    /// behind it, so this may return replies to write, like `receive`.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<Vec<u8>> {
        self.decoder.handle_timeout(now);
        let mut replies = Vec::new();
        self.drain_decoder(now, &mut replies);
        for pd in &mut self.pds {
            pd.handle_timeout(now);
        }
        replies
    }

    /// Next `(address, event)` from any PD.
    pub fn poll_event(&mut self) -> Option<(u8, PdEvent)> {
        let n = self.pds.len();
        for i in 0..n {
            let idx = (self.next_event_pd + i) % n;
            if let Some(pd) = self.pds.get_mut(idx) {
                if let Some(ev) = pd.poll_event() {
                    self.next_event_pd = (idx + 1) % n;
                    return Some((pd.address(), ev));
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::osdp::phy::{Check, Frame};
    use crate::osdp::reply::{code as rc, RawFormat};
    use std::time::Duration;

    fn poll(addr: u8, sqn: u8) -> Vec<u8> {
        Frame {
            mark: true,
            addr_byte: addr,
            sqn,
            check: Check::Crc16,
            scb: None,
            code: 0x60,
            data: vec![],
        }
        .encode()
        .unwrap()
    }

    fn reply_of(bytes: &[u8]) -> Frame {
        let mut d = FrameDecoder::default();
        d.push(bytes, Instant::now());
        d.poll().unwrap().unwrap()
    }

    #[test]
    fn routes_by_address_and_ignores_others() {
        let mut bus = Bus::new(vec![PdConfig::new(1), PdConfig::new(2)]).unwrap();
        let now = Instant::now();
        let r = bus.receive(&poll(1, 0), now);
        assert_eq!(r.len(), 1);
        assert_eq!(reply_of(&r[0]).addr_byte, 0x81);
        let r = bus.receive(&poll(2, 0), now);
        assert_eq!(reply_of(&r[0]).addr_byte, 0x82);
        assert!(bus.receive(&poll(3, 0), now).is_empty());
        // Another PD's reply on the line is not a command.
        let other_reply = Frame {
            mark: false,
            addr_byte: 0x83,
            sqn: 0,
            check: Check::Crc16,
            scb: None,
            code: rc::ACK,
            data: vec![],
        }
        .encode()
        .unwrap();
        assert!(bus.receive(&other_reply, now).is_empty());
        let evs: Vec<_> = std::iter::from_fn(|| bus.poll_event()).collect();
        assert_eq!(evs, vec![(1, PdEvent::Online), (2, PdEvent::Online)]);
    }

    #[test]
    fn answers_libosdp_poll_byte_for_byte() {
        // libosdp's CP POLL to PD 0x65, SQN 0, CRC, with its mark byte (from libosdp's
        // tests/unit-tests/test-cp-phy.c). The expected ACK was computed outside this code
        // (Python binascii.crc_hqx with init 0x1D0F over 53 e5 08 00 04 40).
        let poll = [0xFF, 0x53, 0x65, 0x08, 0x00, 0x04, 0x60, 0x60, 0x90];
        let ack = vec![0xFF, 0x53, 0xE5, 0x08, 0x00, 0x04, 0x40, 0xD2, 0x96];
        let mut bus = Bus::new(vec![PdConfig::new(0x65)]).unwrap();
        assert_eq!(bus.receive(&poll, Instant::now()), vec![ack]);
    }

    #[test]
    fn two_commands_in_one_chunk_get_two_replies() {
        let mut bus = Bus::new(vec![PdConfig::new(1), PdConfig::new(2)]).unwrap();
        let bytes = [poll(1, 0), poll(2, 0)].concat();
        assert_eq!(bus.receive(&bytes, Instant::now()).len(), 2);
    }

    #[test]
    fn broadcast_only_with_a_single_pd() {
        let id = Frame {
            mark: false,
            addr_byte: 0x7F,
            sqn: 0,
            check: Check::Crc16,
            scb: None,
            code: 0x61,
            data: vec![0],
        }
        .encode()
        .unwrap();
        let mut one = Bus::new(vec![PdConfig::new(5)]).unwrap();
        assert_eq!(one.receive(&id, Instant::now()).len(), 1);
        let mut two = Bus::new(vec![PdConfig::new(5), PdConfig::new(6)]).unwrap();
        assert!(two.receive(&id, Instant::now()).is_empty());
    }

    #[test]
    fn command_hidden_behind_a_stale_false_som_is_answered_on_timeout() {
        let mut bus = Bus::new(vec![PdConfig::new(1)]).unwrap();
        let now = Instant::now();
        // Noise: SOM with a plausible length (200) swallows the POLL that follows. The POLL
        // uses the checksum: a complete CRC packet would be found at once (decoder lookahead).
        let cksum_poll = Frame {
            mark: false,
            addr_byte: 1,
            sqn: 0,
            check: Check::Checksum,
            scb: None,
            code: 0x60,
            data: vec![],
        }
        .encode()
        .unwrap();
        let bytes = [vec![0x53, 0x01, 200, 0x00, 0x04], cksum_poll].concat();
        assert!(bus.receive(&bytes, now).is_empty());
        let t = bus.next_timeout().expect("decoder timer");
        let replies = bus.handle_timeout(t + Duration::from_millis(1));
        assert_eq!(replies.len(), 1);
        assert_eq!(reply_of(&replies[0]).code, rc::ACK);
    }

    #[test]
    fn crc_command_behind_a_false_som_is_answered_at_once() {
        let mut bus = Bus::new(vec![PdConfig::new(1)]).unwrap();
        let bytes = [vec![0x53, 0x01, 200, 0x00, 0x04], poll(1, 0)].concat();
        let replies = bus.receive(&bytes, Instant::now());
        assert_eq!(replies.len(), 1);
        assert_eq!(reply_of(&replies[0]).code, rc::ACK);
        assert_eq!(bus.decoder_stats().false_som, 1);
    }

    #[test]
    fn config_errors() {
        assert_eq!(Bus::new(vec![]).err(), Some(PdError::NoPds));
        assert_eq!(
            Bus::new(vec![PdConfig::new(1), PdConfig::new(1)]).err(),
            Some(PdError::DuplicateAddress(1))
        );
        let mut bus = Bus::new(vec![PdConfig::new(1)]).unwrap();
        let card = RawCard {
            reader: 0,
            format: RawFormat::Wiegand,
            bit_count: 8,
            data: vec![1],
        };
        assert_eq!(
            bus.queue_card(9, card, Instant::now()),
            Err(PdError::UnknownAddress(9))
        );
    }

    #[test]
    fn comset_on_a_shared_bus_keeps_addresses_unique() {
        let mut bus = Bus::new(vec![PdConfig::new(1), PdConfig::new(2)]).unwrap();
        let now = Instant::now();
        let comset = |addr: u8, sqn: u8, new: u8| {
            Frame {
                mark: false,
                addr_byte: addr,
                sqn,
                check: Check::Crc16,
                scb: None,
                code: 0x6E,
                // Same speed: a speed change is refused on a shared line anyway.
                data: vec![new, 0x00, 0xC2, 0x01, 0x00],
            }
            .encode()
            .unwrap()
        };
        // PD 1 cannot take PD 2's address.
        let r = bus.receive(&comset(1, 0, 2), now);
        assert_eq!(reply_of(&r[0]).data[0], 1);
        // It can move to 3; then 3 reaches it, 1 reaches nobody, and PD 2 cannot take 3.
        let r = bus.receive(&comset(1, 1, 3), now);
        assert_eq!(reply_of(&r[0]).data[0], 3);
        assert_eq!(bus.pd(1).map(Pd::bus_address), Some(3));
        assert!(bus.receive(&poll(1, 2), now).is_empty());
        assert_eq!(reply_of(&bus.receive(&poll(3, 2), now)[0]).addr_byte, 0x83);
        let r = bus.receive(&comset(2, 0, 3), now);
        assert_eq!(reply_of(&r[0]).data[0], 2);
        // Cards still go to the door by its configured address.
        let card = RawCard {
            reader: 0,
            format: RawFormat::Wiegand,
            bit_count: 8,
            data: vec![0x5A],
        };
        bus.queue_card(1, card, now).unwrap();
        assert_eq!(reply_of(&bus.receive(&poll(3, 3), now)[0]).code, rc::RAW);
    }

    #[test]
    fn timeouts_reach_the_pds() {
        let mut bus = Bus::new(vec![PdConfig::new(1)]).unwrap();
        let now = Instant::now();
        bus.receive(&poll(1, 0), now);
        let t = bus.next_timeout().unwrap();
        assert_eq!(t, now + Duration::from_secs(3));
        assert!(bus.handle_timeout(t + Duration::from_millis(1)).is_empty());
        let evs: Vec<_> = std::iter::from_fn(|| bus.poll_event()).collect();
        assert_eq!(evs, vec![(1, PdEvent::Online), (1, PdEvent::Offline)]);
    }
}
