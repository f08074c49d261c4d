//! Card-number encodings handed to the access panel (Wiegand formats).
//!
//! The panel does not know phones: it knows card numbers. A granted credential carries a
//! format, a facility code and a card number; [`encode`] turns them into the Wiegand bit
//! string the OSDP layer reports in `osdp_RAW`, and [`decode`] does the reverse with parity
//! checks (used by tests and by physical-card support).
//!
//! Bit positions below are 0-based from the first transmitted bit (MSB first).
//!
//! | format   | bits | even parity        | facility code | card number  | odd parity          |
//! |----------|------|--------------------|---------------|--------------|---------------------|
//! | `h10301` | 26   | bit 0 over 1..=12  | 1..=8 (8 b)   | 9..=24 (16 b)| bit 25 over 13..=24 |
//! | `h10304` | 37   | bit 0 over 1..=18  | 1..=16 (16 b) | 17..=35 (19 b)| bit 36 over 18..=35 |
//!
//! H10304's two parity ranges share bit 18 (HID's definition, also used by Proxmark3).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A supported Wiegand card format. Serialised as lowercase strings (`"h10301"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CardFormat {
    /// HID 26-bit standard: 8-bit facility code, 16-bit card number.
    H10301,
    /// HID 37-bit with facility code: 16-bit facility code, 19-bit card number.
    H10304,
}

/// Where each field and parity bit sits in a format. Positions are 0-based, MSB first.
struct Layout {
    bit_count: u16,
    fc_start: u16,
    fc_len: u16,
    cn_start: u16,
    cn_len: u16,
    /// (first, last) inclusive data range covered by the leading even parity bit (bit 0).
    even_range: (u16, u16),
    /// (first, last) inclusive data range covered by the trailing odd parity bit.
    odd_range: (u16, u16),
}

const H10301_LAYOUT: Layout = Layout {
    bit_count: 26,
    fc_start: 1,
    fc_len: 8,
    cn_start: 9,
    cn_len: 16,
    even_range: (1, 12),
    odd_range: (13, 24),
};

const H10304_LAYOUT: Layout = Layout {
    bit_count: 37,
    fc_start: 1,
    fc_len: 16,
    cn_start: 17,
    cn_len: 19,
    even_range: (1, 18),
    odd_range: (18, 35),
};

impl CardFormat {
    /// Every supported format, for help texts and exhaustive tests.
    pub const ALL: [CardFormat; 2] = [CardFormat::H10301, CardFormat::H10304];

    /// The stable lowercase name used in config and ACL files.
    pub fn as_str(self) -> &'static str {
        match self {
            CardFormat::H10301 => "h10301",
            CardFormat::H10304 => "h10304",
        }
    }

    fn layout(self) -> &'static Layout {
        match self {
            CardFormat::H10301 => &H10301_LAYOUT,
            CardFormat::H10304 => &H10304_LAYOUT,
        }
    }

    /// Number of Wiegand bits on the wire, parity included.
    pub fn bit_count(self) -> u16 {
        self.layout().bit_count
    }

    /// Largest encodable facility code.
    pub fn max_facility_code(self) -> u32 {
        low_mask(self.layout().fc_len)
    }

    /// Largest encodable card number.
    pub fn max_card_number(self) -> u32 {
        low_mask(self.layout().cn_len)
    }

    /// Checks that `facility_code` and `card_number` fit this format.
    pub fn check_range(self, facility_code: u32, card_number: u32) -> Result<(), CardError> {
        let max_fc = self.max_facility_code();
        if facility_code > max_fc {
            return Err(CardError::FacilityCodeTooLarge {
                format: self,
                value: facility_code,
                max: max_fc,
            });
        }
        let max_cn = self.max_card_number();
        if card_number > max_cn {
            return Err(CardError::CardNumberTooLarge {
                format: self,
                value: card_number,
                max: max_cn,
            });
        }
        Ok(())
    }

    fn from_bit_count(bit_count: u16) -> Option<CardFormat> {
        CardFormat::ALL
            .into_iter()
            .find(|f| f.bit_count() == bit_count)
    }
}

impl fmt::Display for CardFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CardFormat {
    type Err = CardError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CardFormat::ALL
            .into_iter()
            .find(|f| f.as_str() == s)
            .ok_or_else(|| CardError::UnknownFormat(s.chars().take(32).collect()))
    }
}

/// Errors from encoding or decoding Wiegand bits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CardError {
    /// The format name is not one we support (the name is truncated to 32 characters).
    #[error("unknown card format '{0}' (supported: h10301, h10304)")]
    UnknownFormat(String),
    /// The facility code does not fit the format's field.
    #[error("facility code {value} is too large for {format} (maximum {max})")]
    FacilityCodeTooLarge {
        format: CardFormat,
        value: u32,
        max: u32,
    },
    /// The card number does not fit the format's field.
    #[error("card number {value} is too large for {format} (maximum {max})")]
    CardNumberTooLarge {
        format: CardFormat,
        value: u32,
        max: u32,
    },
    /// No supported format has this many bits.
    #[error("no supported card format has {0} bits (supported: 26 = h10301, 37 = h10304)")]
    UnsupportedBitCount(u16),
    /// `data` is not exactly `ceil(bit_count / 8)` bytes long.
    #[error("{bit_count} Wiegand bits need {expected} data bytes, got {actual}")]
    DataLength {
        bit_count: u16,
        expected: usize,
        actual: usize,
    },
    /// The unused low bits of the last byte are not zero.
    #[error("padding bits after bit {bit_count} are not zero")]
    NonZeroPadding { bit_count: u16 },
    /// The leading even parity bit does not match.
    #[error("{format} even parity (bit 0) does not match")]
    EvenParity { format: CardFormat },
    /// The trailing odd parity bit does not match.
    #[error("{format} odd parity (last bit) does not match")]
    OddParity { format: CardFormat },
}

/// A Wiegand bit string, packed MSB first; the last byte is padded with zero bits.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WiegandBits {
    /// Number of meaningful bits.
    pub bit_count: u16,
    /// `ceil(bit_count / 8)` bytes, first bit in the MSB of `data[0]`.
    pub data: Vec<u8>,
}

impl WiegandBits {
    /// Bit `index` (0 = first transmitted), or `None` past the end or if `data` is short.
    pub fn bit(&self, index: u16) -> Option<bool> {
        if index >= self.bit_count {
            return None;
        }
        let byte = self.data.get(usize::from(index / 8))?;
        Some(byte & (0x80 >> (index % 8)) != 0)
    }

    /// The bits as a `'0'`/`'1'` string, for diagnostics and tests.
    pub fn to_bit_string(&self) -> String {
        (0..self.bit_count)
            .map(|i| if self.bit(i) == Some(true) { '1' } else { '0' })
            .collect()
    }

    /// Packs the low `bit_count` bits of `value` (bit_count <= 64), first bit = most significant.
    fn from_u64(value: u64, bit_count: u16) -> WiegandBits {
        let bytes = usize::from(bit_count.div_ceil(8));
        // Left-align into 64 bits so the first Wiegand bit is bit 63; then take whole bytes.
        let aligned = value << (64 - u32::from(bit_count));
        let data = aligned.to_be_bytes().into_iter().take(bytes).collect();
        WiegandBits { bit_count, data }
    }

    /// Unpacks into a `u64` (first bit = most significant), checking length and padding.
    fn to_u64(&self) -> Result<u64, CardError> {
        if self.bit_count == 0 || self.bit_count > 64 {
            return Err(CardError::UnsupportedBitCount(self.bit_count));
        }
        let expected = usize::from(self.bit_count.div_ceil(8));
        if self.data.len() != expected {
            return Err(CardError::DataLength {
                bit_count: self.bit_count,
                expected,
                actual: self.data.len(),
            });
        }
        let mut buf = [0u8; 8];
        for (dst, src) in buf.iter_mut().zip(self.data.iter()) {
            *dst = *src;
        }
        let aligned = u64::from_be_bytes(buf);
        let shift = 64 - u32::from(self.bit_count);
        // Anything below the meaningful bits is padding and must be zero.
        if shift > 0 && aligned & ((1u64 << shift) - 1) != 0 {
            return Err(CardError::NonZeroPadding {
                bit_count: self.bit_count,
            });
        }
        Ok(aligned >> shift)
    }
}

fn low_mask(len: u16) -> u32 {
    // Field widths are at most 19 bits, so this never overflows.
    (1u32 << len) - 1
}

/// Value of bits `first..=last` (0-based from the first transmitted bit) of a `total`-bit word.
fn field(word: u64, total: u16, first: u16, len: u16) -> u64 {
    let shift = total - first - len;
    (word >> shift) & ((1u64 << len) - 1)
}

/// Number of one bits in the inclusive range `(first, last)`.
fn ones_in(word: u64, total: u16, range: (u16, u16)) -> u32 {
    field(word, total, range.0, range.1 - range.0 + 1).count_ones()
}

fn is_odd(n: u32) -> bool {
    n & 1 == 1
}

/// Encodes a facility code and card number into Wiegand bits, parity included.
pub fn encode(
    format: CardFormat,
    facility_code: u32,
    card_number: u32,
) -> Result<WiegandBits, CardError> {
    format.check_range(facility_code, card_number)?;
    let l = format.layout();
    let total = l.bit_count;
    let mut word = 0u64;
    word |= u64::from(facility_code) << (total - l.fc_start - l.fc_len);
    word |= u64::from(card_number) << (total - l.cn_start - l.cn_len);
    // Even parity: the parity bit makes the count of ones over bit 0 plus its range even.
    if is_odd(ones_in(word, total, l.even_range)) {
        word |= 1u64 << (total - 1);
    }
    // Odd parity: the parity bit makes the count of ones over its range plus itself odd.
    if !is_odd(ones_in(word, total, l.odd_range)) {
        word |= 1;
    }
    Ok(WiegandBits::from_u64(word, total))
}

/// Decodes Wiegand bits into `(format, facility_code, card_number)`, checking both parities.
/// The format is chosen by bit count.
pub fn decode(bits: &WiegandBits) -> Result<(CardFormat, u32, u32), CardError> {
    let format = CardFormat::from_bit_count(bits.bit_count)
        .ok_or(CardError::UnsupportedBitCount(bits.bit_count))?;
    let word = bits.to_u64()?;
    let l = format.layout();
    let total = l.bit_count;
    let even_bit = u32::from(field(word, total, 0, 1) == 1);
    if is_odd(ones_in(word, total, l.even_range) + even_bit) {
        return Err(CardError::EvenParity { format });
    }
    let odd_bit = u32::from(word & 1 == 1);
    if !is_odd(ones_in(word, total, l.odd_range) + odd_bit) {
        return Err(CardError::OddParity { format });
    }
    // Field widths are <= 19 bits, so the casts cannot truncate.
    let fc = field(word, total, l.fc_start, l.fc_len) as u32;
    let cn = field(word, total, l.cn_start, l.cn_len) as u32;
    Ok((format, fc, cn))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits_from_str(s: &str) -> WiegandBits {
        // Independent packer for tests: builds the bytes bit by bit from a '0'/'1' string.
        let mut data = vec![0u8; s.len().div_ceil(8)];
        for (i, c) in s.chars().enumerate() {
            if c == '1' {
                data[i / 8] |= 0x80 >> (i % 8);
            }
        }
        WiegandBits {
            bit_count: s.len() as u16,
            data,
        }
    }

    #[test]
    fn h10301_fc1_card1_known_bits() {
        // FC 1 = 00000001, card 1 = 0000000000000001.
        // Even parity over bits 1..=12 = 00000001 0000 -> one 1 -> parity 1.
        // Odd parity over bits 13..=24 = 0000 00000001 -> one 1 (already odd) -> parity 0.
        // 1 00000001 0000000000000001 0 -> packed: 10000000 10000000 00000000 10|000000
        let b = encode(CardFormat::H10301, 1, 1).unwrap();
        assert_eq!(b.bit_count, 26);
        assert_eq!(b.data, vec![0x80, 0x80, 0x00, 0x80]);
        assert_eq!(b.to_bit_string(), "10000000100000000000000010");
        assert_eq!(decode(&b).unwrap(), (CardFormat::H10301, 1, 1));
    }

    #[test]
    fn h10301_fc123_card4567_known_bits() {
        // FC 123 = 0x7B = 01111011, card 4567 = 0x11D7 = 0001000111010111.
        // Even range (bits 1..=12) = 01111011 0001 -> 6 + 1 = 7 ones -> parity 1.
        // Odd range (bits 13..=24) = 000111010111 -> 7 ones (odd) -> parity 0.
        // As a 26-bit number: 1<<25 | 123<<17 | 4567<<1 = 0x2F623AE.
        let expected = "1".to_string() + "01111011" + "0001000111010111" + "0";
        let b = encode(CardFormat::H10301, 123, 4567).unwrap();
        assert_eq!(b.to_bit_string(), expected);
        assert_eq!(b, bits_from_str(&expected));
        // 0x2F623AE << 6 = 0xBD88EB80
        assert_eq!(b.data, vec![0xBD, 0x88, 0xEB, 0x80]);
        assert_eq!(decode(&b).unwrap(), (CardFormat::H10301, 123, 4567));
    }

    #[test]
    fn h10301_all_zero_and_all_ones() {
        // FC 0, card 0: even range has 0 ones -> 0; odd range 0 ones -> parity 1.
        let b = encode(CardFormat::H10301, 0, 0).unwrap();
        assert_eq!(b.to_bit_string(), "00000000000000000000000001");
        // FC 255, card 65535: even range 12 ones -> 0; odd range 12 ones -> 1.
        let b = encode(CardFormat::H10301, 255, 65535).unwrap();
        assert_eq!(b.to_bit_string(), "01111111111111111111111111");
    }

    #[test]
    fn h10304_known_bits() {
        // FC 1 = 0000000000000001, card 1 = 0000000000000000001.
        // Even range bits 1..=18 = FC(16) + first 2 card bits = ...01 00 -> one 1 -> parity 1.
        // Odd range bits 18..=35 = last 18 card bits = ...0001 -> one 1 -> parity 0.
        let expected = "1".to_string() + "0000000000000001" + "0000000000000000001" + "0";
        let b = encode(CardFormat::H10304, 1, 1).unwrap();
        assert_eq!(b.bit_count, 37);
        assert_eq!(b.to_bit_string(), expected);
        assert_eq!(b, bits_from_str(&expected));

        // FC 0, card 0x40000 (only the top card bit, position 17, set): inside the even range
        // only -> even parity 1; odd range 18..=35 is all zero -> odd parity 1.
        let expected = "1".to_string() + "0000000000000000" + "1000000000000000000" + "1";
        assert_eq!(
            encode(CardFormat::H10304, 0, 0x40000)
                .unwrap()
                .to_bit_string(),
            expected
        );

        // FC 0, card 0x20000 (card bit at position 18, shared by both ranges): even range has
        // one 1 -> parity 1; odd range has one 1 -> parity 0.
        let expected = "1".to_string() + "0000000000000000" + "0100000000000000000" + "0";
        assert_eq!(
            encode(CardFormat::H10304, 0, 0x20000)
                .unwrap()
                .to_bit_string(),
            expected
        );
    }

    #[test]
    fn range_limits_are_named() {
        assert_eq!(CardFormat::H10301.max_facility_code(), 255);
        assert_eq!(CardFormat::H10301.max_card_number(), 65535);
        assert_eq!(CardFormat::H10304.max_facility_code(), 65535);
        assert_eq!(CardFormat::H10304.max_card_number(), 524_287);
        let e = encode(CardFormat::H10301, 256, 1).unwrap_err();
        assert!(e.to_string().contains("maximum 255"), "{e}");
        let e = encode(CardFormat::H10301, 1, 65536).unwrap_err();
        assert!(e.to_string().contains("maximum 65535"), "{e}");
        let e = encode(CardFormat::H10304, 65536, 1).unwrap_err();
        assert!(e.to_string().contains("maximum 65535"), "{e}");
        let e = encode(CardFormat::H10304, 1, 524_288).unwrap_err();
        assert!(e.to_string().contains("maximum 524287"), "{e}");
        assert!(encode(CardFormat::H10304, 65535, 524_287).is_ok());
    }

    /// Parity computed independently from the bit string, per the format table.
    fn parity_holds(s: &str, even: (usize, usize), odd: (usize, usize)) -> bool {
        let ones = |a: usize, b: usize| s[a..=b].chars().filter(|&c| c == '1').count();
        let last = s.len() - 1;
        (ones(even.0, even.1) + ones(0, 0)) % 2 == 0
            && (ones(odd.0, odd.1) + ones(last, last)) % 2 == 1
    }

    #[test]
    fn h10301_parity_exhaustive_over_fields() {
        // Every facility code with a spread of card numbers, and every card number with a
        // spread of facility codes; parity checked from the bit string, not the encoder.
        let mut cases = Vec::new();
        for fc in 0..=255u32 {
            for cn in [0u32, 1, 2, 0x00FF, 0x0F0F, 0x8000, 0xFFFF] {
                cases.push((fc, cn));
            }
        }
        for cn in 0..=65535u32 {
            for fc in [0u32, 0x81, 255] {
                cases.push((fc, cn));
            }
        }
        for (fc, cn) in cases {
            let b = encode(CardFormat::H10301, fc, cn).unwrap();
            let s = b.to_bit_string();
            assert!(parity_holds(&s, (1, 12), (13, 24)), "fc {fc} cn {cn}: {s}");
            assert_eq!(u32::from_str_radix(&s[1..9], 2).unwrap(), fc);
            assert_eq!(u32::from_str_radix(&s[9..25], 2).unwrap(), cn);
            assert_eq!(decode(&b).unwrap(), (CardFormat::H10301, fc, cn));
        }
    }

    #[test]
    fn h10304_parity_exhaustive_over_card_numbers() {
        for cn in (0..=524_287u32).step_by(7).chain([524_287]) {
            for fc in [0u32, 1, 0x8001, 65535] {
                let b = encode(CardFormat::H10304, fc, cn).unwrap();
                let s = b.to_bit_string();
                assert!(parity_holds(&s, (1, 18), (18, 35)), "fc {fc} cn {cn}: {s}");
                assert_eq!(u32::from_str_radix(&s[1..17], 2).unwrap(), fc);
                assert_eq!(u32::from_str_radix(&s[17..36], 2).unwrap(), cn);
                assert_eq!(decode(&b).unwrap(), (CardFormat::H10304, fc, cn));
            }
        }
    }

    #[test]
    fn every_single_bit_flip_is_rejected() {
        for (format, fc, cn) in [
            (CardFormat::H10301, 123, 4567),
            (CardFormat::H10301, 0, 0),
            (CardFormat::H10304, 1234, 300_000),
            (CardFormat::H10304, 65535, 524_287),
        ] {
            let good = encode(format, fc, cn).unwrap();
            for i in 0..usize::from(good.bit_count) {
                let mut bad = good.clone();
                bad.data[i / 8] ^= 0x80 >> (i % 8);
                let err = decode(&bad).unwrap_err();
                assert!(
                    matches!(
                        err,
                        CardError::EvenParity { .. } | CardError::OddParity { .. }
                    ),
                    "{format} bit {i}: {err:?}"
                );
            }
        }
    }

    #[test]
    fn decode_rejects_bad_shapes() {
        let good = encode(CardFormat::H10301, 1, 1).unwrap();
        let mut padded = good.clone();
        padded.data[3] |= 0x01;
        assert_eq!(
            decode(&padded),
            Err(CardError::NonZeroPadding { bit_count: 26 })
        );
        let mut short = good.clone();
        short.data.pop();
        assert!(matches!(
            decode(&short),
            Err(CardError::DataLength {
                expected: 4,
                actual: 3,
                ..
            })
        ));
        let odd = WiegandBits {
            bit_count: 34,
            data: vec![0; 5],
        };
        assert_eq!(decode(&odd), Err(CardError::UnsupportedBitCount(34)));
        let zero = WiegandBits {
            bit_count: 0,
            data: vec![],
        };
        assert_eq!(decode(&zero), Err(CardError::UnsupportedBitCount(0)));
    }

    #[test]
    fn names_round_trip_and_serde_is_lowercase() {
        for f in CardFormat::ALL {
            assert_eq!(f.as_str().parse::<CardFormat>().unwrap(), f);
        }
        assert_eq!(
            serde_json::to_string(&CardFormat::H10304).unwrap(),
            "\"h10304\""
        );
        assert_eq!(
            serde_json::from_str::<CardFormat>("\"h10301\"").unwrap(),
            CardFormat::H10301
        );
        assert!(serde_json::from_str::<CardFormat>("\"H10301\"").is_err());
        assert!("wiegand26".parse::<CardFormat>().is_err());
    }
}
