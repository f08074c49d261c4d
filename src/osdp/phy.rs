//! OSDP packet layer (OSDP 2.2 message structure): framing, check characters and a resynchronising decoder.
//!
//! Wire layout of one packet (little-endian length, which counts the whole packet from SOM to
//! the last check byte, without the optional leading mark byte 0xFF):
//!
//! ```text
//! [0xFF] 0x53 ADDR LEN_LSB LEN_MSB CTRL [SCB...] CODE DATA... (CRC_LSB CRC_MSB | CKSUM)
//! ```
//!
//! CTRL bits 0-1 carry the sequence number, bit 2 selects CRC-16 (1) or the 8-bit checksum (0),
//! bit 3 says a security block follows the header. A PD replies with bit 7 of ADDR set.
//! The security block is kept as raw bytes; the PD ([`super::pd`]) checks the MAC over
//! [`Frame::mac_input`] and decrypts with [`super::sc`] before parsing the command.

use std::time::{Duration, Instant};

/// Start of message.
pub const SOM: u8 = 0x53;
/// Optional byte before SOM (libosdp's CP sends it by default; a PD mirrors what it received).
pub const MARK: u8 = 0xFF;
/// Broadcast / configuration address.
pub const BROADCAST_ADDR: u8 = 0x7F;
/// Bit 7 of the address byte: set on replies (PD to CP).
pub const REPLY_BIT: u8 = 0x80;

const CTRL_SQN: u8 = 0x03;
const CTRL_CRC: u8 = 0x04;
const CTRL_SCB: u8 = 0x08;

/// SOM, ADDR, LEN (2), CTRL.
pub const HEADER_LEN: usize = 5;
/// Smallest valid packet: header, a command/reply code and a one-byte checksum.
pub const MIN_PACKET_LEN: usize = HEADER_LEN + 2;
/// Largest packet this implementation accepts or builds. Advertised in osdp_PDCAP
/// (receive buffer size) so a CP never sends more.
pub const MAX_PACKET_LEN: usize = 1024;

/// Errors of the packet layer. The decoder reports them and carries on (resynchronises).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PhyError {
    #[error("packet length {0} outside {MIN_PACKET_LEN}..={MAX_PACKET_LEN}")]
    BadLength(usize),
    #[error("check character mismatch (computed {computed:#06x}, received {received:#06x})")]
    BadCheck { computed: u16, received: u16 },
    #[error("malformed security block")]
    BadSecurityBlock,
    #[error("packet would exceed {MAX_PACKET_LEN} bytes")]
    TooLong,
    #[error("sequence number {0} out of range 0..=3")]
    BadSequence(u8),
}

/// Which check character protects a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// 8-bit two's-complement checksum (every PD must support it).
    Checksum,
    /// CRC-16/AUG-CCITT (poly 0x1021, init 0x1D0F), stored little-endian.
    Crc16,
}

impl Check {
    fn len(self) -> usize {
        match self {
            Check::Checksum => 1,
            Check::Crc16 => 2,
        }
    }
}

/// One decoded (or to-be-encoded) packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// A mark byte 0xFF preceded SOM.
    pub mark: bool,
    /// The raw address byte (bit 7 = reply direction).
    pub addr_byte: u8,
    /// Sequence number 0..=3.
    pub sqn: u8,
    pub check: Check,
    /// Security block including its length and type bytes, if CTRL bit 3 was set.
    pub scb: Option<Vec<u8>>,
    /// Command or reply code.
    pub code: u8,
    /// Everything between the code and the check character (for secure packets this still
    /// includes the MAC: the secure channel layer strips it).
    pub data: Vec<u8>,
}

impl Frame {
    /// The 7-bit device address.
    pub fn address(&self) -> u8 {
        self.addr_byte & !REPLY_BIT
    }

    /// True for PD-to-CP packets.
    pub fn is_reply(&self) -> bool {
        self.addr_byte & REPLY_BIT != 0
    }

    /// Serialise with the check character the frame asks for.
    pub fn encode(&self) -> Result<Vec<u8>, PhyError> {
        let body = self.body()?;
        let mut out = Vec::with_capacity(body.len() + 3);
        if self.mark {
            out.push(MARK);
        }
        out.extend_from_slice(&body);
        match self.check {
            Check::Crc16 => out.extend_from_slice(&crc16(&body).to_le_bytes()),
            Check::Checksum => out.push(checksum(&body)),
        }
        Ok(out)
    }

    /// The bytes a secure-channel MAC covers: SOM through the end of the data, without the
    /// trailing 4-byte MAC that `data` carries (the length field counts MAC and check).
    pub fn mac_input(&self) -> Result<Vec<u8>, PhyError> {
        if self.data.len() < crate::osdp::sc::MAC_LEN {
            return Err(PhyError::BadSecurityBlock);
        }
        let mut body = self.body()?;
        body.truncate(body.len().saturating_sub(crate::osdp::sc::MAC_LEN));
        Ok(body)
    }

    /// SOM through the end of the data (no mark, no check character), length field final.
    fn body(&self) -> Result<Vec<u8>, PhyError> {
        if self.sqn > CTRL_SQN {
            return Err(PhyError::BadSequence(self.sqn));
        }
        let scb_len = self.scb.as_ref().map_or(0, Vec::len);
        let len = HEADER_LEN
            .checked_add(scb_len)
            .and_then(|n| n.checked_add(1))
            .and_then(|n| n.checked_add(self.data.len()))
            .and_then(|n| n.checked_add(self.check.len()))
            .ok_or(PhyError::TooLong)?;
        if len > MAX_PACKET_LEN {
            return Err(PhyError::TooLong);
        }
        let len16 = u16::try_from(len).map_err(|_| PhyError::TooLong)?;
        let mut out = Vec::with_capacity(len + 1);
        let mut ctrl = self.sqn;
        if self.check == Check::Crc16 {
            ctrl |= CTRL_CRC;
        }
        if self.scb.is_some() {
            ctrl |= CTRL_SCB;
        }
        out.push(SOM);
        out.push(self.addr_byte);
        out.extend_from_slice(&len16.to_le_bytes());
        out.push(ctrl);
        if let Some(scb) = &self.scb {
            out.extend_from_slice(scb);
        }
        out.push(self.code);
        out.extend_from_slice(&self.data);
        Ok(out)
    }
}

/// CRC-16/AUG-CCITT as OSDP uses it (Annex: poly 0x1021, init 0x1D0F, no reflection, no xorout).
pub fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0x1D0F;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The 8-bit checksum: two's complement of the byte sum.
pub fn checksum(data: &[u8]) -> u8 {
    data.iter()
        .fold(0u8, |acc, &b| acc.wrapping_add(b))
        .wrapping_neg()
}

/// Counters kept by the decoder (for logs and tests).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DecoderStats {
    pub frames: u64,
    pub skipped_bytes: u64,
    pub bad_length: u64,
    pub bad_check: u64,
    pub bad_scb: u64,
    pub stale_drops: u64,
    /// Incomplete head candidates abandoned because a complete packet followed them.
    pub false_som: u64,
}

/// Turns a byte stream into frames. Accepts any chunking (one byte at a time or many packets
/// at once), skips garbage before SOM, and resynchronises after a bad length, a bad check or
/// a partial packet that went stale: the decoder then drops only the SOM byte it had locked on
/// and rescans the bytes after it, so a real packet hidden behind a false SOM is still found.
///
/// The buffer never holds more than one maximum-size packet plus a mark byte.
/// Usage: `push` bytes (it returns how many it took), then `poll` until `None`, repeat.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    last_rx: Option<Instant>,
    stale_after: Duration,
    stats: DecoderStats,
}

const BUF_CAP: usize = MAX_PACKET_LEN + 1;
/// Silence after which a partial packet is abandoned. A CP writes a packet in one go; even a
/// USB RS-485 adapter's latency timer (16 ms) stays well below this.
pub const DEFAULT_STALE_AFTER: Duration = Duration::from_millis(50);

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new(DEFAULT_STALE_AFTER)
    }
}

impl FrameDecoder {
    /// `stale_after`: a partial packet with no new byte for this long is abandoned (a CP
    /// sends a packet in one go; a long gap means the bytes were noise or the CP gave up).
    pub fn new(stale_after: Duration) -> Self {
        Self {
            buf: Vec::with_capacity(BUF_CAP),
            last_rx: None,
            stale_after,
            stats: DecoderStats::default(),
        }
    }

    pub fn stats(&self) -> DecoderStats {
        self.stats
    }

    /// Bytes currently buffered (a partial packet).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Append bytes received at `now`. Returns how many were taken: fewer than offered only
    /// when the buffer is full, in which case call `poll` until `None` and push the rest.
    pub fn push(&mut self, bytes: &[u8], now: Instant) -> usize {
        if let Some(last) = self.last_rx {
            if !self.buf.is_empty() && now.saturating_duration_since(last) > self.stale_after {
                self.drop_stale();
            }
        }
        if !bytes.is_empty() {
            self.last_rx = Some(now);
        }
        let room = BUF_CAP.saturating_sub(self.buf.len());
        let n = room.min(bytes.len());
        self.buf
            .extend_from_slice(bytes.get(..n).unwrap_or_default());
        n
    }

    /// Abandon a partial packet after `stale_after` of silence, even if no new byte comes.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(last) = self.last_rx {
            if !self.buf.is_empty() && now.saturating_duration_since(last) > self.stale_after {
                self.drop_stale();
            }
        }
    }

    /// When a partial packet should be abandoned, if one is buffered.
    pub fn next_timeout(&self) -> Option<Instant> {
        if self.buf.is_empty() {
            None
        } else {
            self.last_rx.and_then(|t| t.checked_add(self.stale_after))
        }
    }

    /// Drop incomplete candidates left from before a silence; keep complete ones for `poll`.
    fn drop_stale(&mut self) {
        loop {
            self.skip_to_som();
            match self.candidate_len() {
                Some(Ok(len)) if self.buf.len() >= self.som_pos() + len => return,
                None if self.buf.is_empty() => return,
                _ => {
                    self.stats.stale_drops += 1;
                    self.drop_som();
                }
            }
        }
    }

    /// Position of SOM in the buffer after `skip_to_som` (1 when a mark precedes it).
    fn som_pos(&self) -> usize {
        usize::from(self.buf.first() == Some(&MARK))
    }

    /// Discard bytes until the buffer starts with SOM or MARK SOM (or a lone trailing MARK).
    fn skip_to_som(&mut self) {
        let mut i = 0;
        while i < self.buf.len() {
            match (self.buf.get(i), self.buf.get(i + 1)) {
                (Some(&SOM), _) => break,
                (Some(&MARK), Some(&SOM)) | (Some(&MARK), None) => break,
                _ => i += 1,
            }
        }
        if i > 0 {
            // Mark bytes are idle-line filler, not noise worth counting.
            let noise = self
                .buf
                .get(..i)
                .map_or(0, |s| s.iter().filter(|&&b| b != MARK).count());
            self.stats.skipped_bytes += noise as u64;
            self.buf.drain(..i);
        }
    }

    /// Drop the locked-on SOM (and its mark) so the rescan starts just after it.
    fn drop_som(&mut self) {
        let n = (self.som_pos() + 1).min(self.buf.len());
        self.buf.drain(..n);
    }

    /// The declared packet length of the candidate at the buffer head: `None` if the header is
    /// not complete yet, `Some(Err)` if it is impossible.
    fn candidate_len(&self) -> Option<Result<usize, PhyError>> {
        let s = self.som_pos();
        if self.buf.get(s) != Some(&SOM) {
            return None;
        }
        let lo = *self.buf.get(s + 2)?;
        let hi = *self.buf.get(s + 3)?;
        let len = usize::from(u16::from_le_bytes([lo, hi]));
        if !(MIN_PACKET_LEN..=MAX_PACKET_LEN).contains(&len) {
            return Some(Err(PhyError::BadLength(len)));
        }
        // The CTRL byte also tells whether a CRC packet is long enough to hold the CRC.
        if let Some(&ctrl) = self.buf.get(s + 4) {
            if ctrl & CTRL_CRC != 0 && len < MIN_PACKET_LEN + 1 {
                return Some(Err(PhyError::BadLength(len)));
            }
        }
        Some(Ok(len))
    }

    /// The next complete packet or error, or `None` when more bytes are needed.
    pub fn poll(&mut self) -> Option<Result<Frame, PhyError>> {
        loop {
            self.skip_to_som();
            let len = match self.candidate_len()? {
                Ok(len) => len,
                Err(e) => {
                    self.stats.bad_length += 1;
                    self.drop_som();
                    return Some(Err(e));
                }
            };
            let s = self.som_pos();
            let end = s.checked_add(len)?;
            let Some(pkt) = self.buf.get(s..end) else {
                // Incomplete. A CP writes a packet in one go, so a complete, CRC-valid packet
                // further on means the head was a false SOM: skip to it now rather than wait
                // for the head to fill up or go stale (noise can keep it alive).
                let i = self.complete_packet_later()?;
                let cut = if self.buf.get(i.wrapping_sub(1)) == Some(&MARK) {
                    i.saturating_sub(1)
                } else {
                    i
                };
                self.stats.false_som += 1;
                self.buf.drain(..cut);
                continue;
            };
            return match parse_packet(pkt, s == 1) {
                Ok(frame) => {
                    self.buf.drain(..end);
                    self.stats.frames += 1;
                    Some(Ok(frame))
                }
                Err(e) => {
                    match e {
                        PhyError::BadCheck { .. } => self.stats.bad_check += 1,
                        PhyError::BadSecurityBlock => self.stats.bad_scb += 1,
                        _ => self.stats.bad_length += 1,
                    }
                    self.drop_som();
                    Some(Err(e))
                }
            };
        }
    }

    /// Start of a complete CRC-16 packet that passes all checks and begins after the head
    /// candidate's SOM. Only CRC packets: an 8-bit checksum matches random bytes too often.
    fn complete_packet_later(&self) -> Option<usize> {
        let first = self.som_pos().checked_add(1)?;
        (first..self.buf.len()).find(|&i| {
            if self.buf.get(i) != Some(&SOM) {
                return false;
            }
            let (Some(&lo), Some(&hi), Some(&ctrl)) = (
                self.buf.get(i + 2),
                self.buf.get(i + 3),
                self.buf.get(i + 4),
            ) else {
                return false;
            };
            let len = usize::from(u16::from_le_bytes([lo, hi]));
            ctrl & CTRL_CRC != 0
                && (MIN_PACKET_LEN + 1..=MAX_PACKET_LEN).contains(&len)
                && self
                    .buf
                    .get(i..i + len)
                    .is_some_and(|pkt| parse_packet(pkt, false).is_ok())
        })
    }
}

/// Parse one complete packet (SOM .. check character).
fn parse_packet(pkt: &[u8], mark: bool) -> Result<Frame, PhyError> {
    let bad_len = || PhyError::BadLength(pkt.len());
    let addr_byte = *pkt.get(1).ok_or_else(bad_len)?;
    let ctrl = *pkt.get(4).ok_or_else(bad_len)?;
    let check = if ctrl & CTRL_CRC != 0 {
        Check::Crc16
    } else {
        Check::Checksum
    };
    let body_len = pkt.len().checked_sub(check.len()).ok_or_else(bad_len)?;
    let body = pkt.get(..body_len).ok_or_else(bad_len)?;
    let tail = pkt.get(body_len..).ok_or_else(bad_len)?;
    match check {
        Check::Crc16 => {
            let computed = crc16(body);
            let received = match tail {
                [lo, hi] => u16::from_le_bytes([*lo, *hi]),
                _ => return Err(bad_len()),
            };
            if computed != received {
                return Err(PhyError::BadCheck { computed, received });
            }
        }
        Check::Checksum => {
            let computed = checksum(body);
            let received = *tail.first().ok_or_else(bad_len)?;
            if computed != received {
                return Err(PhyError::BadCheck {
                    computed: computed.into(),
                    received: received.into(),
                });
            }
        }
    }
    let mut pos = HEADER_LEN;
    let scb = if ctrl & CTRL_SCB != 0 {
        let sb_len = usize::from(*body.get(pos).ok_or(PhyError::BadSecurityBlock)?);
        // A security block holds at least its length and type; a code byte must follow it.
        if sb_len < 2 || pos + sb_len >= body.len() {
            return Err(PhyError::BadSecurityBlock);
        }
        let sb = body
            .get(pos..pos + sb_len)
            .ok_or(PhyError::BadSecurityBlock)?;
        pos += sb_len;
        Some(sb.to_vec())
    } else {
        None
    };
    let code = *body.get(pos).ok_or_else(bad_len)?;
    let data = body.get(pos + 1..).ok_or_else(bad_len)?.to_vec();
    Ok(Frame {
        mark,
        addr_byte,
        sqn: ctrl & CTRL_SQN,
        check,
        scb,
        code,
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // Known packets from libosdp's unit tests (tests/unit-tests/test-cp-phy.c), built there by
    // libosdp's own CP encoder: POLL and ID to PD 0x65 with sequence 0 and CRC-16, an ACK reply
    // with sequence 1 and checksum, a NAK(1) reply with sequence 1 and CRC-16.
    const LIBOSDP_POLL: [u8; 8] = [0x53, 0x65, 0x08, 0x00, 0x04, 0x60, 0x60, 0x90];
    const LIBOSDP_ID: [u8; 9] = [0x53, 0x65, 0x09, 0x00, 0x04, 0x61, 0x00, 0xd9, 0x7a];
    const LIBOSDP_ACK: [u8; 7] = [0x53, 0xe5, 0x07, 0x00, 0x01, 0x40, 0x80];
    const LIBOSDP_NAK: [u8; 9] = [0x53, 0xe5, 0x09, 0x00, 0x05, 0x41, 0x01, 0x0e, 0x8f];

    fn t0() -> Instant {
        Instant::now()
    }

    fn decode_all(
        d: &mut FrameDecoder,
        bytes: &[u8],
        now: Instant,
    ) -> Vec<Result<Frame, PhyError>> {
        let mut out = Vec::new();
        let mut rest = bytes;
        loop {
            let n = d.push(rest, now);
            rest = rest.get(n..).unwrap_or_default();
            while let Some(r) = d.poll() {
                out.push(r);
            }
            if rest.is_empty() {
                return out;
            }
        }
    }

    #[test]
    fn crc16_matches_libosdp_packets() {
        assert_eq!(crc16(&LIBOSDP_POLL[..6]), 0x9060);
        assert_eq!(crc16(&LIBOSDP_ID[..7]), 0x7ad9);
        assert_eq!(crc16(&LIBOSDP_NAK[..7]), 0x8f0e);
        // CRC-16/AUG-CCITT standard check value over "123456789".
        assert_eq!(crc16(b"123456789"), 0xE5CC);
    }

    #[test]
    fn annex_e_crc_and_checksum_examples() {
        // SIA OSDP 2.2 Annex E, CRC examples 1-2 and checksum examples 1-2 (as reproduced in
        // libosdp's tests/unit-tests/test-sc-sia-vectors.c); re-typed as test data.
        let crc1 = [
            0x53, 0x7F, 0x0D, 0x00, 0x04, 0x6E, 0x00, 0x80, 0x25, 0x00, 0x00,
        ];
        assert_eq!(crc16(&crc1).to_le_bytes(), [0x6E, 0x38]);
        let crc2 = [0x53, 0x00, 0x09, 0x00, 0x04, 0x61, 0x00];
        assert_eq!(crc16(&crc2).to_le_bytes(), [0xC0, 0x66]);
        let sum1 = [
            0x53, 0x7F, 0x0C, 0x00, 0x00, 0x6E, 0x00, 0x80, 0x25, 0x00, 0x00,
        ];
        assert_eq!(checksum(&sum1), 0x0F);
        let sum2 = [0x53, 0x00, 0x08, 0x00, 0x00, 0x61, 0x00];
        assert_eq!(checksum(&sum2), 0x44);
    }

    #[test]
    fn mac_input_is_packet_without_mac_and_check() {
        let f = Frame {
            mark: true,
            addr_byte: 0x01,
            sqn: 2,
            check: Check::Crc16,
            scb: Some(vec![0x02, 0x15]),
            code: 0x60,
            data: vec![0xA1, 0xA2, 0xA3, 0xA4],
        };
        let wire = f.encode().unwrap();
        // Without the mark, without the MAC (4) and CRC (2).
        assert_eq!(f.mac_input().unwrap(), wire[1..wire.len() - 6].to_vec());
        let short = Frame {
            data: vec![1, 2, 3],
            ..f
        };
        assert_eq!(short.mac_input(), Err(PhyError::BadSecurityBlock));
    }

    #[test]
    fn checksum_matches_libosdp_ack() {
        assert_eq!(checksum(&LIBOSDP_ACK[..6]), 0x80);
        // Sum of all bytes including the checksum is zero mod 256.
        let sum = LIBOSDP_ACK.iter().fold(0u8, |a, &b| a.wrapping_add(b));
        assert_eq!(sum, 0);
    }

    #[test]
    fn decodes_libosdp_poll_and_id() {
        let mut d = FrameDecoder::default();
        let mut bytes = vec![MARK];
        bytes.extend_from_slice(&LIBOSDP_POLL);
        bytes.extend_from_slice(&LIBOSDP_ID);
        let got = decode_all(&mut d, &bytes, t0());
        assert_eq!(got.len(), 2);
        let poll = got[0].clone().unwrap();
        assert!(poll.mark);
        assert_eq!(poll.address(), 0x65);
        assert!(!poll.is_reply());
        assert_eq!(poll.sqn, 0);
        assert_eq!(poll.check, Check::Crc16);
        assert_eq!(poll.code, 0x60);
        assert!(poll.data.is_empty());
        let id = got[1].clone().unwrap();
        assert!(!id.mark);
        assert_eq!(id.code, 0x61);
        assert_eq!(id.data, vec![0x00]);
    }

    #[test]
    fn encodes_replies_byte_for_byte_like_libosdp() {
        let ack = Frame {
            mark: false,
            addr_byte: 0x65 | REPLY_BIT,
            sqn: 1,
            check: Check::Checksum,
            scb: None,
            code: 0x40,
            data: vec![],
        };
        assert_eq!(ack.encode().unwrap(), LIBOSDP_ACK.to_vec());
        let nak = Frame {
            check: Check::Crc16,
            code: 0x41,
            data: vec![0x01],
            ..ack.clone()
        };
        assert_eq!(nak.encode().unwrap(), LIBOSDP_NAK.to_vec());
        let marked = Frame { mark: true, ..ack };
        let bytes = marked.encode().unwrap();
        assert_eq!(bytes[0], MARK);
        assert_eq!(&bytes[1..], &LIBOSDP_ACK[..]);
    }

    #[test]
    fn one_byte_at_a_time() {
        let mut d = FrameDecoder::default();
        let now = t0();
        let mut frames = Vec::new();
        let stream: Vec<u8> = [&[MARK][..], &LIBOSDP_POLL, &[MARK], &LIBOSDP_ID].concat();
        for (i, b) in stream.iter().enumerate() {
            assert_eq!(d.push(&[*b], now), 1);
            while let Some(r) = d.poll() {
                frames.push((i, r.unwrap()));
            }
        }
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[0].0, LIBOSDP_POLL.len()); // complete exactly at its last byte
        assert_eq!(frames[1].1.code, 0x61);
        assert!(frames[1].1.mark);
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn garbage_before_som_is_skipped() {
        let mut d = FrameDecoder::default();
        let bytes: Vec<u8> = [&[0x00, 0x12, 0xFF, 0x99, 0x41][..], &LIBOSDP_POLL].concat();
        let got = decode_all(&mut d, &bytes, t0());
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].as_ref().unwrap().code, 0x60);
        assert_eq!(d.stats().skipped_bytes, 4);
    }

    #[test]
    fn bad_crc_reported_then_next_packet_decoded() {
        let mut d = FrameDecoder::default();
        let mut bad = LIBOSDP_POLL;
        bad[7] ^= 0x01;
        let bytes: Vec<u8> = [&bad[..], &LIBOSDP_ID].concat();
        let got = decode_all(&mut d, &bytes, t0());
        assert!(matches!(got[0], Err(PhyError::BadCheck { .. })));
        assert_eq!(got.last().unwrap().as_ref().unwrap().code, 0x61);
        assert_eq!(d.stats().bad_check, 1);
    }

    #[test]
    fn false_som_with_huge_length_does_not_hide_real_packet() {
        // 0x53 followed by a length of 0x0300 (valid range): the decoder waits for it, the
        // real (checksum) packet is swallowed, silence follows, and the stale candidate is
        // dropped. (A CRC packet is found at once: see the test below.)
        let mut d = FrameDecoder::new(Duration::from_millis(50));
        let now = t0();
        let bytes: Vec<u8> = [&[SOM, 0x01, 0x00, 0x03, 0x04][..], &LIBOSDP_ACK].concat();
        assert!(decode_all(&mut d, &bytes, now).is_empty());
        d.handle_timeout(now + Duration::from_millis(60));
        let got: Vec<_> = std::iter::from_fn(|| d.poll()).collect();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].as_ref().unwrap().code, 0x40);
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn false_som_kept_alive_by_noise_does_not_hide_a_complete_packet() {
        // A false SOM claims 0x300 bytes; a real POLL follows at once, then noise keeps
        // arriving faster than the stale timeout. The POLL is decoded without waiting.
        let mut d = FrameDecoder::new(Duration::from_millis(50));
        let now = t0();
        let bytes: Vec<u8> = [&[SOM, 0x01, 0x00, 0x03, 0x04][..], &[MARK], &LIBOSDP_POLL].concat();
        let got = decode_all(&mut d, &bytes, now);
        assert_eq!(got.len(), 1, "{got:?}");
        let poll = got[0].as_ref().unwrap();
        assert_eq!(poll.code, 0x60);
        assert!(poll.mark);
        assert_eq!(d.stats().false_som, 1);
        assert_eq!(d.buffered(), 0);
        // A checksum packet is not taken this way (8 bits match noise too often).
        let mut d = FrameDecoder::new(Duration::from_millis(50));
        let bytes: Vec<u8> = [&[SOM, 0x01, 0x00, 0x03, 0x04][..], &LIBOSDP_ACK].concat();
        assert!(decode_all(&mut d, &bytes, now).is_empty());
        // Partial packets are still waited for: no complete packet follows the head.
        let mut d = FrameDecoder::new(Duration::from_millis(50));
        assert!(decode_all(&mut d, &LIBOSDP_ID[..5], now).is_empty());
        assert_eq!(decode_all(&mut d, &LIBOSDP_ID[5..], now).len(), 1);
    }

    #[test]
    fn false_som_with_impossible_length_rescans() {
        let mut d = FrameDecoder::default();
        let bytes: Vec<u8> = [&[SOM, 0x01, 0xFF, 0xFF, 0x00][..], &LIBOSDP_POLL].concat();
        let got = decode_all(&mut d, &bytes, t0());
        assert!(matches!(got[0], Err(PhyError::BadLength(0xFFFF))));
        assert_eq!(got.last().unwrap().as_ref().unwrap().code, 0x60);
    }

    #[test]
    fn nested_packet_inside_false_candidate_found_on_check_failure() {
        // A false SOM claims 12 bytes; the real POLL starts 2 bytes later and is fully inside.
        let mut d = FrameDecoder::default();
        let bytes: Vec<u8> = [&[SOM, 0x22, 0x0C, 0x00][..], &LIBOSDP_POLL].concat();
        let got = decode_all(&mut d, &bytes, t0());
        assert!(got[0].is_err());
        assert_eq!(got.last().unwrap().as_ref().unwrap().code, 0x60);
    }

    #[test]
    fn partial_packet_then_slow_rest_within_timeout_is_kept() {
        let mut d = FrameDecoder::new(Duration::from_millis(50));
        let now = t0();
        assert!(decode_all(&mut d, &LIBOSDP_POLL[..3], now).is_empty());
        let got = decode_all(&mut d, &LIBOSDP_POLL[3..], now + Duration::from_millis(40));
        assert_eq!(got.len(), 1);
    }

    #[test]
    fn partial_packet_after_silence_is_dropped() {
        let mut d = FrameDecoder::new(Duration::from_millis(50));
        let now = t0();
        assert!(decode_all(&mut d, &LIBOSDP_POLL[..3], now).is_empty());
        let later = now + Duration::from_millis(200);
        let bytes: Vec<u8> = [&LIBOSDP_POLL[3..], &LIBOSDP_ID[..]].concat();
        let got = decode_all(&mut d, &bytes, later);
        let ok: Vec<_> = got.into_iter().filter_map(Result::ok).collect();
        assert_eq!(ok.len(), 1);
        assert_eq!(ok[0].code, 0x61);
        assert!(d.stats().stale_drops >= 1);
    }

    #[test]
    fn security_block_is_kept_raw() {
        let f = Frame {
            mark: false,
            addr_byte: 0x01,
            sqn: 1,
            check: Check::Crc16,
            scb: Some(vec![0x03, 0x11, 0x01]),
            code: 0x76,
            data: vec![1, 2, 3, 4, 5, 6, 7, 8],
        };
        let bytes = f.encode().unwrap();
        assert_eq!(bytes[4] & CTRL_SCB, CTRL_SCB);
        let got = decode_all(&mut FrameDecoder::default(), &bytes, t0());
        assert_eq!(got, vec![Ok(f)]);
    }

    #[test]
    fn security_block_too_long_is_rejected() {
        // SCB length claims to cover the code byte: malformed.
        let f = Frame {
            mark: false,
            addr_byte: 0x01,
            sqn: 1,
            check: Check::Crc16,
            scb: Some(vec![0x03, 0x15]),
            code: 0x60,
            data: vec![],
        };
        let bytes = f.encode().unwrap();
        let got = decode_all(&mut FrameDecoder::default(), &bytes, t0());
        assert_eq!(got, vec![Err(PhyError::BadSecurityBlock)]);
    }

    #[test]
    fn oversized_frames_refused_by_encoder() {
        let f = Frame {
            mark: false,
            addr_byte: 0x81,
            sqn: 1,
            check: Check::Crc16,
            scb: None,
            code: 0x50,
            data: vec![0; MAX_PACKET_LEN],
        };
        assert_eq!(f.encode(), Err(PhyError::TooLong));
        let f = Frame {
            sqn: 4,
            data: vec![],
            ..f
        };
        assert_eq!(f.encode(), Err(PhyError::BadSequence(4)));
    }

    #[test]
    fn buffer_stays_bounded() {
        let mut d = FrameDecoder::default();
        // A candidate declaring the maximum length, then endless filler.
        let hdr = [
            SOM,
            0x01,
            (MAX_PACKET_LEN & 0xFF) as u8,
            (MAX_PACKET_LEN >> 8) as u8,
            0x04,
        ];
        let mut taken = d.push(&hdr, t0());
        let filler = vec![0u8; 4096];
        taken += d.push(&filler, t0());
        assert!(taken <= BUF_CAP);
        assert!(d.buffered() <= BUF_CAP);
        // The candidate completes, fails its CRC and is dropped: the decoder can take more.
        assert!(matches!(d.poll(), Some(Err(PhyError::BadCheck { .. }))));
        while d.poll().is_some() {}
        assert!(d.push(&filler, t0()) > 0);
    }
}
