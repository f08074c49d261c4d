//! BER-TLV parsing and encoding for Aliro APDU payloads (ISO/IEC 7816-4 style).
//!
//! Everything parsed here comes from a phone, so the parser is bounded and returns
//! [`TlvError`] instead of panicking: tags of up to three bytes (Aliro uses one- and
//! two-byte tags such as `7F66`), definite lengths in short form or `81`/`82` long form.
//! Values are borrowed from the input; nothing is copied while parsing.

use thiserror::Error;

/// Why a TLV byte string could not be parsed or encoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TlvError {
    /// The input ended inside a tag, a length or a value.
    #[error("TLV truncated at offset {offset}")]
    Truncated { offset: usize },
    /// A tag longer than the three bytes this parser accepts.
    #[error("TLV tag too long at offset {offset}")]
    TagTooLong { offset: usize },
    /// Indefinite length (`80`) or a long form other than `81`/`82`.
    #[error("unsupported TLV length form 0x{first:02X} at offset {offset}")]
    BadLength { offset: usize, first: u8 },
    /// A value longer than 65535 bytes cannot be encoded with the `82` form.
    #[error("TLV value too long to encode ({len} bytes)")]
    ValueTooLong { len: usize },
    /// A tag number that is not a valid 1..=3 byte BER tag.
    #[error("invalid TLV tag 0x{tag:X}")]
    BadTag { tag: u32 },
}

/// One parsed TLV, borrowing from the input buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tlv<'a> {
    /// Tag bytes packed big-endian (`0x5A`, `0x7F66`, ...).
    pub tag: u32,
    /// The value bytes.
    pub value: &'a [u8],
    /// The whole TLV (tag, length and value) as it appeared in the input.
    pub raw: &'a [u8],
}

impl<'a> Tlv<'a> {
    /// True when the tag's constructed bit (b6 of the first tag byte) is set.
    pub fn is_constructed(&self) -> bool {
        first_tag_byte(self.tag) & 0x20 != 0
    }

    /// Parses the value of a constructed TLV as a sequence of TLVs.
    pub fn children(&self) -> Result<Vec<Tlv<'a>>, TlvError> {
        parse_all(self.value)
    }
}

fn first_tag_byte(tag: u32) -> u8 {
    let bytes = tag.to_be_bytes();
    // The first non-zero byte is the first tag byte (tag 0x00 is not valid BER anyway).
    bytes.iter().copied().find(|b| *b != 0).unwrap_or(0)
}

/// Iterator over consecutive TLVs in a buffer; yields an error once and then stops.
pub struct TlvIter<'a> {
    buf: &'a [u8],
    pos: usize,
    failed: bool,
}

impl<'a> TlvIter<'a> {
    /// Starts iterating over `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self {
            buf,
            pos: 0,
            failed: false,
        }
    }
}

impl<'a> Iterator for TlvIter<'a> {
    type Item = Result<Tlv<'a>, TlvError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.pos >= self.buf.len() {
            return None;
        }
        match parse_one(self.buf, self.pos) {
            Ok((tlv, next)) => {
                self.pos = next;
                Some(Ok(tlv))
            }
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

/// Parses one TLV starting at `start`; returns it and the offset just past it.
fn parse_one(buf: &[u8], start: usize) -> Result<(Tlv<'_>, usize), TlvError> {
    let mut pos = start;
    let byte_at = |p: usize| buf.get(p).copied().ok_or(TlvError::Truncated { offset: p });

    let first = byte_at(pos)?;
    pos += 1;
    let mut tag = u32::from(first);
    if first & 0x1F == 0x1F {
        // Subsequent tag bytes: continue while b8 is set; at most two more bytes.
        let mut extra = 0;
        loop {
            let b = byte_at(pos)?;
            pos += 1;
            extra += 1;
            if extra > 2 {
                return Err(TlvError::TagTooLong { offset: start });
            }
            tag = (tag << 8) | u32::from(b);
            if b & 0x80 == 0 {
                break;
            }
        }
    }

    let len_first = byte_at(pos)?;
    let len_offset = pos;
    pos += 1;
    let len: usize = match len_first {
        0x00..=0x7F => usize::from(len_first),
        0x81 => {
            let l = byte_at(pos)?;
            pos += 1;
            usize::from(l)
        }
        0x82 => {
            let hi = byte_at(pos)?;
            let lo = byte_at(pos + 1)?;
            pos += 2;
            usize::from(u16::from_be_bytes([hi, lo]))
        }
        other => {
            return Err(TlvError::BadLength {
                offset: len_offset,
                first: other,
            })
        }
    };

    let end = pos
        .checked_add(len)
        .ok_or(TlvError::Truncated { offset: pos })?;
    let value = buf
        .get(pos..end)
        .ok_or(TlvError::Truncated { offset: pos })?;
    let raw = buf
        .get(start..end)
        .ok_or(TlvError::Truncated { offset: start })?;
    Ok((Tlv { tag, value, raw }, end))
}

/// Parses a buffer that must consist of complete TLVs only.
pub fn parse_all(buf: &[u8]) -> Result<Vec<Tlv<'_>>, TlvError> {
    TlvIter::new(buf).collect()
}

/// Returns the first TLV with `tag` among `tlvs`.
pub fn find<'a, 'b>(tlvs: &'b [Tlv<'a>], tag: u32) -> Option<&'b Tlv<'a>> {
    tlvs.iter().find(|t| t.tag == tag)
}

/// Number of bytes of a tag when encoded.
fn tag_bytes(tag: u32) -> Result<Vec<u8>, TlvError> {
    let out: Vec<u8> = match tag {
        0x00..=0xFF => vec![tag as u8],
        0x100..=0xFFFF => (tag as u16).to_be_bytes().to_vec(),
        0x1_0000..=0xFF_FFFF => tag.to_be_bytes()[1..].to_vec(),
        _ => return Err(TlvError::BadTag { tag }),
    };
    // A multi-byte tag must announce itself in its first byte, a single-byte one must not.
    let first = out.first().copied().unwrap_or(0);
    let multi = out.len() > 1;
    if (first & 0x1F == 0x1F) != multi {
        return Err(TlvError::BadTag { tag });
    }
    Ok(out)
}

/// Appends the BER length encoding of `len` (short form, `81` or `82`).
pub fn encode_len(out: &mut Vec<u8>, len: usize) -> Result<(), TlvError> {
    match len {
        0..=0x7F => out.push(len as u8),
        0x80..=0xFF => {
            out.push(0x81);
            out.push(len as u8);
        }
        0x100..=0xFFFF => {
            out.push(0x82);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => return Err(TlvError::ValueTooLong { len }),
    }
    Ok(())
}

/// Appends one TLV to `out`.
pub fn push_tlv(out: &mut Vec<u8>, tag: u32, value: &[u8]) -> Result<(), TlvError> {
    out.extend_from_slice(&tag_bytes(tag)?);
    encode_len(out, value.len())?;
    out.extend_from_slice(value);
    Ok(())
}

/// Encodes one TLV into a new buffer.
pub fn encode(tag: u32, value: &[u8]) -> Result<Vec<u8>, TlvError> {
    let mut out = Vec::with_capacity(value.len() + 4);
    push_tlv(&mut out, tag, value)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_short_and_two_byte_tags() {
        // 5C 02 0100, 7F66 08 (02 02 0400 02 02 0400)
        let buf = [
            0x5C, 0x02, 0x01, 0x00, 0x7F, 0x66, 0x08, 0x02, 0x02, 0x04, 0x00, 0x02, 0x02, 0x04,
            0x00,
        ];
        let tlvs = parse_all(&buf).unwrap();
        assert_eq!(tlvs.len(), 2);
        assert_eq!(tlvs[0].tag, 0x5C);
        assert_eq!(tlvs[0].value, &[0x01, 0x00]);
        assert_eq!(tlvs[1].tag, 0x7F66);
        assert!(tlvs[1].is_constructed());
        let kids = tlvs[1].children().unwrap();
        assert_eq!(kids.len(), 2);
        assert_eq!(kids[1].value, &[0x04, 0x00]);
        assert_eq!(tlvs[1].raw, &buf[4..]);
    }

    #[test]
    fn parses_long_lengths() {
        let mut buf = vec![0x53, 0x81, 0x80];
        buf.extend(std::iter::repeat_n(0xAA, 0x80));
        let t = parse_all(&buf).unwrap();
        assert_eq!(t[0].value.len(), 0x80);

        let mut buf = vec![0x53, 0x82, 0x01, 0x00];
        buf.extend(std::iter::repeat_n(0xBB, 0x100));
        let t = parse_all(&buf).unwrap();
        assert_eq!(t[0].value.len(), 0x100);
    }

    #[test]
    fn rejects_malformed_input_without_panicking() {
        assert!(matches!(
            parse_all(&[0x5A]),
            Err(TlvError::Truncated { .. })
        ));
        assert!(matches!(
            parse_all(&[0x5A, 0x05, 1, 2]),
            Err(TlvError::Truncated { .. })
        ));
        assert!(matches!(
            parse_all(&[0x5A, 0x80]),
            Err(TlvError::BadLength { .. })
        ));
        assert!(matches!(
            parse_all(&[0x5A, 0x83, 0, 0, 1]),
            Err(TlvError::BadLength { .. })
        ));
        assert!(matches!(
            parse_all(&[0x5A, 0x82, 0xFF]),
            Err(TlvError::Truncated { .. })
        ));
        assert!(matches!(
            parse_all(&[0x7F, 0xFF, 0xFF, 0x01, 0x00]),
            Err(TlvError::TagTooLong { .. })
        ));
        assert!(matches!(
            parse_all(&[0x7F]),
            Err(TlvError::Truncated { .. })
        ));
        // Every prefix of a valid buffer either parses or errors; none panics.
        let good = encode(0x7F66, &[0x02, 0x02, 0x04, 0x00]).unwrap();
        for n in 0..good.len() {
            assert!(parse_all(&good[..n]).is_err() || n == 0);
        }
    }

    #[test]
    fn encode_round_trips() {
        for len in [0usize, 1, 0x7F, 0x80, 0xFF, 0x100, 0x1234] {
            let value = vec![0x42; len];
            for tag in [0x41u32, 0x9E, 0x7F66, 0xBF_8101] {
                let enc = encode(tag, &value).unwrap();
                let t = parse_all(&enc).unwrap();
                assert_eq!(t.len(), 1);
                assert_eq!(t[0].tag, tag);
                assert_eq!(t[0].value, &value[..]);
                assert_eq!(t[0].raw, &enc[..]);
            }
        }
        assert_eq!(encode(0x41, &[0x00]).unwrap(), vec![0x41, 0x01, 0x00]);
        assert_eq!(encode(0x53, &[0; 0x80]).unwrap()[..3], [0x53, 0x81, 0x80]);
        assert_eq!(
            encode(0x53, &[0; 0x100]).unwrap()[..4],
            [0x53, 0x82, 0x01, 0x00]
        );
    }

    #[test]
    fn encode_rejects_bad_input() {
        assert!(matches!(
            encode(0x41, &vec![0; 0x1_0000]),
            Err(TlvError::ValueTooLong { .. })
        ));
        // 0x1F as a single byte announces a multi-byte tag.
        assert!(matches!(encode(0x1F, &[]), Err(TlvError::BadTag { .. })));
        // 0x4142 is two bytes but its first byte does not announce a multi-byte tag.
        assert!(matches!(encode(0x4142, &[]), Err(TlvError::BadTag { .. })));
    }

    #[test]
    fn find_returns_first_match() {
        let buf = [0x41, 0x01, 0x01, 0x42, 0x01, 0x02, 0x41, 0x01, 0x03];
        let tlvs = parse_all(&buf).unwrap();
        assert_eq!(find(&tlvs, 0x41).unwrap().value, &[0x01]);
        assert!(find(&tlvs, 0x43).is_none());
    }
}
