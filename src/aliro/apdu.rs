//! ISO/IEC 7816-4 command and response APDUs, as used by Aliro over NFC (and inside BLE frames).
//!
//! The reader builds C-APDUs and splits R-APDUs; the endpoint emulator parses C-APDUs and
//! builds R-APDUs. Short and extended length forms are both handled; parsing is bounded and
//! returns [`ApduError`] on any malformed input.

use thiserror::Error;

/// `Le` byte `00` in short form: "up to 256 bytes", which Aliro readers send as "give me all".
pub const NE_SHORT_MAX: u32 = 256;
/// `Le` `0000` in extended form.
pub const NE_EXTENDED_MAX: u32 = 65_536;

/// Why an APDU could not be parsed or built.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ApduError {
    /// R-APDU with fewer than the two status bytes: the card went away mid-exchange.
    #[error("response shorter than a status word ({len} bytes)")]
    ShortResponse { len: usize },
    /// C-APDU shorter than its 4-byte header.
    #[error("command shorter than its header ({len} bytes)")]
    ShortCommand { len: usize },
    /// Lc/Le fields inconsistent with the command length.
    #[error("command length fields inconsistent with {len} bytes")]
    BadCommandLength { len: usize },
    /// Data longer than an extended APDU can carry.
    #[error("command data too long ({len} bytes)")]
    DataTooLong { len: usize },
    /// `Ne` outside 1..=65536.
    #[error("invalid expected response length {ne}")]
    BadLe { ne: u32 },
}

/// A command APDU. `le` is `Ne`, the maximum response length expected (None = no Le field).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandApdu {
    pub cla: u8,
    pub ins: u8,
    pub p1: u8,
    pub p2: u8,
    pub data: Vec<u8>,
    pub le: Option<u32>,
}

impl CommandApdu {
    /// A command with no data and no Le.
    pub fn new(cla: u8, ins: u8, p1: u8, p2: u8) -> Self {
        Self {
            cla,
            ins,
            p1,
            p2,
            data: Vec::new(),
            le: None,
        }
    }

    /// Sets the command data.
    pub fn with_data(mut self, data: Vec<u8>) -> Self {
        self.data = data;
        self
    }

    /// Sets `Ne` (256 is encoded as short `Le = 00`).
    pub fn with_le(mut self, ne: u32) -> Self {
        self.le = Some(ne);
        self
    }

    /// Encodes the command; short form when it fits, extended form otherwise.
    pub fn encode(&self) -> Result<Vec<u8>, ApduError> {
        let lc = self.data.len();
        if lc > 65_535 {
            return Err(ApduError::DataTooLong { len: lc });
        }
        if let Some(ne) = self.le {
            if ne == 0 || ne > NE_EXTENDED_MAX {
                return Err(ApduError::BadLe { ne });
            }
        }
        let extended = lc > 255 || self.le.is_some_and(|ne| ne > NE_SHORT_MAX);
        let mut out = Vec::with_capacity(4 + 3 + lc + 3);
        out.extend_from_slice(&[self.cla, self.ins, self.p1, self.p2]);
        if extended {
            if lc > 0 {
                out.push(0x00);
                out.extend_from_slice(&(lc as u16).to_be_bytes());
                out.extend_from_slice(&self.data);
            }
            if let Some(ne) = self.le {
                if lc == 0 {
                    out.push(0x00);
                }
                // Ne 65536 encodes as 0000 (truncation to u16 is the encoding).
                out.extend_from_slice(&((ne % NE_EXTENDED_MAX) as u16).to_be_bytes());
            }
        } else {
            if lc > 0 {
                out.push(lc as u8);
                out.extend_from_slice(&self.data);
            }
            if let Some(ne) = self.le {
                // Ne 256 encodes as 00.
                out.push((ne % NE_SHORT_MAX) as u8);
            }
        }
        Ok(out)
    }

    /// Parses a C-APDU (endpoint side): cases 1, 2, 3 and 4 in short and extended form.
    pub fn parse(bytes: &[u8]) -> Result<Self, ApduError> {
        let len = bytes.len();
        let ([cla, ins, p1, p2], body) = match bytes.split_first_chunk::<4>() {
            Some((h, b)) => (*h, b),
            None => return Err(ApduError::ShortCommand { len }),
        };
        let mut cmd = Self::new(cla, ins, p1, p2);
        let bad = ApduError::BadCommandLength { len };
        match body {
            [] => {}
            // Case 2S: Le only.
            [le] => cmd.le = Some(short_ne(*le)),
            [0x00, hi, lo, after @ ..] => {
                // Extended: 00 then either Le(2) or Lc(2) data [Le(2)].
                let n = usize::from(u16::from_be_bytes([*hi, *lo]));
                if after.is_empty() {
                    cmd.le = Some(extended_ne(n));
                } else {
                    if n == 0 {
                        return Err(bad);
                    }
                    if after.len() < n {
                        return Err(bad);
                    }
                    let (data, tail) = after.split_at(n);
                    cmd.data = data.to_vec();
                    match tail {
                        [] => {}
                        [a, b] => {
                            cmd.le = Some(extended_ne(usize::from(u16::from_be_bytes([*a, *b]))))
                        }
                        _ => return Err(bad),
                    }
                }
            }
            [lc, rest @ ..] => {
                let n = usize::from(*lc);
                if n == 0 {
                    return Err(bad);
                }
                if rest.len() < n {
                    return Err(bad);
                }
                let (data, tail) = rest.split_at(n);
                cmd.data = data.to_vec();
                match tail {
                    [] => {}
                    [le] => cmd.le = Some(short_ne(*le)),
                    _ => return Err(bad),
                }
            }
        }
        Ok(cmd)
    }
}

fn short_ne(le: u8) -> u32 {
    if le == 0 {
        NE_SHORT_MAX
    } else {
        u32::from(le)
    }
}

fn extended_ne(le: usize) -> u32 {
    if le == 0 {
        NE_EXTENDED_MAX
    } else {
        le as u32
    }
}

/// A response APDU split into data and status word, borrowing the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseApdu<'a> {
    pub data: &'a [u8],
    pub sw: u16,
}

impl<'a> ResponseApdu<'a> {
    /// Splits an R-APDU; fewer than two bytes means the card is gone.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, ApduError> {
        let len = bytes.len();
        let (data, sw) = bytes
            .split_last_chunk::<2>()
            .ok_or(ApduError::ShortResponse { len })?;
        Ok(Self {
            data,
            sw: u16::from_be_bytes(*sw),
        })
    }

    /// SW1 (the high byte).
    pub fn sw1(&self) -> u8 {
        (self.sw >> 8) as u8
    }

    /// SW2 (the low byte).
    pub fn sw2(&self) -> u8 {
        (self.sw & 0xFF) as u8
    }
}

/// Builds an R-APDU: data followed by the status word.
pub fn encode_response(data: &[u8], sw: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 2);
    out.extend_from_slice(data);
    out.extend_from_slice(&sw.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_all_short_cases() {
        let c1 = CommandApdu::new(0x80, 0x3C, 0, 0);
        assert_eq!(c1.encode().unwrap(), vec![0x80, 0x3C, 0, 0]);
        let c2 = CommandApdu::new(0x00, 0xC0, 0, 0).with_le(256);
        assert_eq!(c2.encode().unwrap(), vec![0x00, 0xC0, 0, 0, 0x00]);
        let c3 = CommandApdu::new(0x80, 0x3C, 0, 0).with_data(vec![0x41, 0x01, 0x00]);
        assert_eq!(
            c3.encode().unwrap(),
            vec![0x80, 0x3C, 0, 0, 3, 0x41, 0x01, 0x00]
        );
        let c4 = CommandApdu::new(0x00, 0xA4, 4, 0)
            .with_data(vec![0xA0, 0x00])
            .with_le(256);
        assert_eq!(
            c4.encode().unwrap(),
            vec![0x00, 0xA4, 4, 0, 2, 0xA0, 0x00, 0x00]
        );
        let c2b = CommandApdu::new(0x00, 0xC0, 0, 0).with_le(0x10);
        assert_eq!(c2b.encode().unwrap(), vec![0x00, 0xC0, 0, 0, 0x10]);
    }

    #[test]
    fn encodes_extended_forms() {
        let data = vec![0x11; 300];
        let c = CommandApdu::new(0x80, 0xD1, 0, 0)
            .with_data(data.clone())
            .with_le(256);
        let enc = c.encode().unwrap();
        assert_eq!(&enc[..7], &[0x80, 0xD1, 0, 0, 0x00, 0x01, 0x2C]);
        assert_eq!(&enc[enc.len() - 2..], &[0x01, 0x00]);
        assert_eq!(CommandApdu::parse(&enc).unwrap(), c);

        let c = CommandApdu::new(0x00, 0xC0, 0, 0).with_le(65_536);
        assert_eq!(c.encode().unwrap(), vec![0x00, 0xC0, 0, 0, 0, 0, 0]);
        assert_eq!(CommandApdu::parse(&c.encode().unwrap()).unwrap(), c);
    }

    #[test]
    fn parse_round_trips_short_forms() {
        for cmd in [
            CommandApdu::new(1, 2, 3, 4),
            CommandApdu::new(1, 2, 3, 4).with_le(256),
            CommandApdu::new(1, 2, 3, 4).with_le(7),
            CommandApdu::new(1, 2, 3, 4).with_data(vec![9; 255]),
            CommandApdu::new(1, 2, 3, 4)
                .with_data(vec![9; 5])
                .with_le(256),
        ] {
            assert_eq!(CommandApdu::parse(&cmd.encode().unwrap()).unwrap(), cmd);
        }
    }

    #[test]
    fn parse_rejects_malformed() {
        assert!(matches!(
            CommandApdu::parse(&[0x80, 0x80, 0]),
            Err(ApduError::ShortCommand { .. })
        ));
        // Lc says 5, only 2 bytes follow.
        assert!(matches!(
            CommandApdu::parse(&[0x80, 0x80, 0, 0, 5, 1, 2]),
            Err(ApduError::BadCommandLength { .. })
        ));
        // Two bytes after data where one Le byte was expected.
        assert!(matches!(
            CommandApdu::parse(&[0x80, 0x80, 0, 0, 1, 1, 0, 0]),
            Err(ApduError::BadCommandLength { .. })
        ));
        assert!(CommandApdu::new(0, 0, 0, 0).with_le(0).encode().is_err());
        assert!(CommandApdu::new(0, 0, 0, 0)
            .with_le(65_537)
            .encode()
            .is_err());
    }

    #[test]
    fn response_split() {
        assert_eq!(
            ResponseApdu::parse(&[0x90]),
            Err(ApduError::ShortResponse { len: 1 })
        );
        assert_eq!(
            ResponseApdu::parse(&[]),
            Err(ApduError::ShortResponse { len: 0 })
        );
        let r = ResponseApdu::parse(&[1, 2, 0x61, 0x10]).unwrap();
        assert_eq!(r.data, &[1, 2]);
        assert_eq!(r.sw, 0x6110);
        assert_eq!((r.sw1(), r.sw2()), (0x61, 0x10));
        assert_eq!(encode_response(&[1, 2], 0x9000), vec![1, 2, 0x90, 0x00]);
    }
}
