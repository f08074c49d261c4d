//! Typed parsing of CP-to-PD command data (OSDP 2.2, chapter "Commands"), with length checks.
//!
//! Parsing is total: any byte string yields either a [`Command`] or a [`CommandError`] that
//! maps to the NAK code the spec asks for (length errors → 0x02, unknown codes → 0x03).

use self::code as c;
use super::reply::NakCode;
use super::sc::Scbk;

/// Command codes (OSDP 2.2 Table 5; verified against libosdp's `osdp_common.h`).
pub mod code {
    pub const POLL: u8 = 0x60;
    pub const ID: u8 = 0x61;
    pub const CAP: u8 = 0x62;
    pub const LSTAT: u8 = 0x64;
    pub const ISTAT: u8 = 0x65;
    pub const OSTAT: u8 = 0x66;
    pub const RSTAT: u8 = 0x67;
    pub const OUT: u8 = 0x68;
    pub const LED: u8 = 0x69;
    pub const BUZ: u8 = 0x6A;
    pub const TEXT: u8 = 0x6B;
    pub const RMODE: u8 = 0x6C;
    pub const TDSET: u8 = 0x6D;
    pub const COMSET: u8 = 0x6E;
    pub const BIOREAD: u8 = 0x73;
    pub const BIOMATCH: u8 = 0x74;
    pub const KEYSET: u8 = 0x75;
    pub const CHLNG: u8 = 0x76;
    pub const SCRYPT: u8 = 0x77;
    pub const ACURXSIZE: u8 = 0x7B;
    pub const FILETRANSFER: u8 = 0x7C;
    pub const MFG: u8 = 0x80;
    pub const XWR: u8 = 0xA1;
    pub const ABORT: u8 = 0xA2;
    pub const PIVDATA: u8 = 0xA3;
    pub const GENAUTH: u8 = 0xA4;
    pub const CRAUTH: u8 = 0xA5;
    pub const KEEPACTIVE: u8 = 0xA7;
}

/// Why command data could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("command {code:#04x}: data length {len} invalid")]
    Length { code: u8, len: usize },
    #[error("unknown command code {0:#04x}")]
    Unknown(u8),
}

impl CommandError {
    /// The NAK code the spec assigns to this error.
    pub fn nak(&self) -> NakCode {
        match self {
            CommandError::Length { .. } => NakCode::CmdLength,
            CommandError::Unknown(_) => NakCode::UnknownCommand,
        }
    }
}

/// One LED setting (temporary or permanent part of an osdp_LED record).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LedParams {
    /// Temporary: 0 NOP, 1 cancel temporary, 2 set temporary. Permanent: 0 NOP, 1 set.
    pub control: u8,
    /// On time in units of 100 ms.
    pub on_time: u8,
    /// Off time in units of 100 ms.
    pub off_time: u8,
    pub on_color: u8,
    pub off_color: u8,
    /// Temporary only: duration in units of 100 ms.
    pub timer: u16,
}

/// One osdp_LED record (14 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedRecord {
    pub reader: u8,
    pub led: u8,
    pub temporary: LedParams,
    pub permanent: LedParams,
}

/// One osdp_BUZ record (5 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuzzerRecord {
    pub reader: u8,
    /// 0 no tone, 1 off, 2 default tone, others reserved.
    pub tone: u8,
    pub on_time: u8,
    pub off_time: u8,
    /// 0 = repeat until told otherwise.
    pub count: u8,
}

/// One osdp_OUT record (4 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputRecord {
    pub output: u8,
    /// 0 NOP, 1/2 permanent off/on aborting a timed operation, 3/4 permanent off/on after it,
    /// 5/6 temporary on/off for `timer`.
    pub control: u8,
    /// Units of 100 ms.
    pub timer: u16,
}

/// A parsed command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Poll,
    Id {
        reply_type: u8,
    },
    Cap {
        reply_type: u8,
    },
    LocalStatus,
    InputStatus,
    OutputStatus,
    ReaderStatus,
    Output(Vec<OutputRecord>),
    Led(Vec<LedRecord>),
    Buzzer(Vec<BuzzerRecord>),
    Text {
        reader: u8,
        control: u8,
        temp_time: u8,
        row: u8,
        col: u8,
        text: Vec<u8>,
    },
    ComSet {
        address: u8,
        baud: u32,
    },
    AcuRxSize(u16),
    KeepActive(u16),
    Abort,
    Mfg {
        vendor: [u8; 3],
        data: Vec<u8>,
    },
    /// osdp_CHLNG: the CP's random number, starting a secure-channel handshake.
    Challenge([u8; 8]),
    /// osdp_SCRYPT: the CP's ("server") cryptogram.
    ServerCryptogram([u8; 16]),
    /// osdp_KEYSET: a new key (type 1 = SCBK). The key is redacted in `Debug`.
    KeySet {
        key_type: u8,
        key: Scbk,
    },
    /// A defined command this PD does not implement (RMODE, TDSET, BIO*, FILETRANSFER, ...).
    Unsupported {
        code: u8,
    },
}

fn exact(code: u8, data: &[u8], n: usize) -> Result<(), CommandError> {
    if data.len() == n {
        Ok(())
    } else {
        Err(CommandError::Length {
            code,
            len: data.len(),
        })
    }
}

fn records<const N: usize, T>(
    code: u8,
    data: &[u8],
    f: impl Fn(&[u8; N]) -> T,
) -> Result<Vec<T>, CommandError> {
    // At least one record, and a whole number of them.
    if data.is_empty() || !data.len().is_multiple_of(N) {
        return Err(CommandError::Length {
            code,
            len: data.len(),
        });
    }
    let mut out = Vec::with_capacity(data.len() / N);
    for chunk in data.chunks_exact(N) {
        let rec: &[u8; N] = chunk.try_into().map_err(|_| CommandError::Length {
            code,
            len: data.len(),
        })?;
        out.push(f(rec));
    }
    Ok(out)
}

/// Parse the data of command `code`.
pub fn parse(code: u8, data: &[u8]) -> Result<Command, CommandError> {
    Ok(match code {
        c::POLL => {
            exact(code, data, 0)?;
            Command::Poll
        }
        c::ID | c::CAP => {
            exact(code, data, 1)?;
            let reply_type = data.first().copied().unwrap_or(0);
            if code == c::ID {
                Command::Id { reply_type }
            } else {
                Command::Cap { reply_type }
            }
        }
        c::LSTAT => {
            exact(code, data, 0)?;
            Command::LocalStatus
        }
        c::ISTAT => {
            exact(code, data, 0)?;
            Command::InputStatus
        }
        c::OSTAT => {
            exact(code, data, 0)?;
            Command::OutputStatus
        }
        c::RSTAT => {
            exact(code, data, 0)?;
            Command::ReaderStatus
        }
        c::OUT => Command::Output(records::<4, _>(code, data, |r| OutputRecord {
            output: r[0],
            control: r[1],
            timer: u16::from_le_bytes([r[2], r[3]]),
        })?),
        c::LED => Command::Led(records::<14, _>(code, data, |r| LedRecord {
            reader: r[0],
            led: r[1],
            temporary: LedParams {
                control: r[2],
                on_time: r[3],
                off_time: r[4],
                on_color: r[5],
                off_color: r[6],
                timer: u16::from_le_bytes([r[7], r[8]]),
            },
            permanent: LedParams {
                control: r[9],
                on_time: r[10],
                off_time: r[11],
                on_color: r[12],
                off_color: r[13],
                timer: 0,
            },
        })?),
        c::BUZ => Command::Buzzer(records::<5, _>(code, data, |r| BuzzerRecord {
            reader: r[0],
            tone: r[1],
            on_time: r[2],
            off_time: r[3],
            count: r[4],
        })?),
        c::TEXT => match data {
            [reader, control, temp_time, row, col, len, text @ ..]
                if usize::from(*len) == text.len() =>
            {
                Command::Text {
                    reader: *reader,
                    control: *control,
                    temp_time: *temp_time,
                    row: *row,
                    col: *col,
                    text: text.to_vec(),
                }
            }
            _ => {
                return Err(CommandError::Length {
                    code,
                    len: data.len(),
                })
            }
        },
        c::COMSET => match data {
            [address, b0, b1, b2, b3] => Command::ComSet {
                address: *address,
                baud: u32::from_le_bytes([*b0, *b1, *b2, *b3]),
            },
            _ => {
                return Err(CommandError::Length {
                    code,
                    len: data.len(),
                })
            }
        },
        c::ACURXSIZE => match data {
            [lo, hi] => Command::AcuRxSize(u16::from_le_bytes([*lo, *hi])),
            _ => {
                return Err(CommandError::Length {
                    code,
                    len: data.len(),
                })
            }
        },
        c::KEEPACTIVE => match data {
            [lo, hi] => Command::KeepActive(u16::from_le_bytes([*lo, *hi])),
            _ => {
                return Err(CommandError::Length {
                    code,
                    len: data.len(),
                })
            }
        },
        c::ABORT => {
            exact(code, data, 0)?;
            Command::Abort
        }
        c::MFG => match data {
            [v0, v1, v2, rest @ ..] => Command::Mfg {
                vendor: [*v0, *v1, *v2],
                data: rest.to_vec(),
            },
            _ => {
                return Err(CommandError::Length {
                    code,
                    len: data.len(),
                })
            }
        },
        c::CHLNG => {
            let r: [u8; 8] = data.try_into().map_err(|_| CommandError::Length {
                code,
                len: data.len(),
            })?;
            Command::Challenge(r)
        }
        c::SCRYPT => {
            let r: [u8; 16] = data.try_into().map_err(|_| CommandError::Length {
                code,
                len: data.len(),
            })?;
            Command::ServerCryptogram(r)
        }
        // Key type, key length (16 for AES-128), key.
        c::KEYSET => match data {
            [key_type, 16, key @ ..] if key.len() == 16 => Command::KeySet {
                key_type: *key_type,
                key: Scbk::from_slice(key).map_err(|_| CommandError::Length {
                    code,
                    len: data.len(),
                })?,
            },
            _ => {
                return Err(CommandError::Length {
                    code,
                    len: data.len(),
                })
            }
        },
        c::RMODE
        | c::TDSET
        | c::BIOREAD
        | c::BIOMATCH
        | c::FILETRANSFER
        | c::XWR
        | c::PIVDATA
        | c::GENAUTH
        | c::CRAUTH => Command::Unsupported { code },
        other => return Err(CommandError::Unknown(other)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_length_commands() {
        assert_eq!(parse(0x60, &[]), Ok(Command::Poll));
        assert_eq!(
            parse(0x60, &[0]),
            Err(CommandError::Length { code: 0x60, len: 1 })
        );
        assert_eq!(parse(0x61, &[0]), Ok(Command::Id { reply_type: 0 }));
        assert!(parse(0x61, &[]).is_err());
        assert!(parse(0x62, &[0, 0]).is_err());
        assert_eq!(parse(0x64, &[]), Ok(Command::LocalStatus));
    }

    #[test]
    fn led_record_layout() {
        // reader 0, LED 0, temporary: set, 5/5 x100ms, red on, off black, timer 30 (LE);
        // permanent: set, on 1, off 0, green, black.
        let data = [0, 0, 2, 5, 5, 1, 0, 30, 0, 1, 1, 0, 2, 0];
        let cmd = parse(0x69, &data).unwrap();
        let Command::Led(recs) = cmd else {
            panic!("not LED")
        };
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0].temporary.control, 2);
        assert_eq!(recs[0].temporary.on_color, 1);
        assert_eq!(recs[0].temporary.timer, 30);
        assert_eq!(recs[0].permanent.control, 1);
        assert_eq!(recs[0].permanent.on_color, 2);
        // Two records are fine, 13 or 15 bytes are not.
        assert!(matches!(parse(0x69, &[data, data].concat()), Ok(Command::Led(r)) if r.len() == 2));
        assert_eq!(
            parse(0x69, &data[..13]).unwrap_err().nak(),
            NakCode::CmdLength
        );
        assert!(parse(0x69, &[]).is_err());
    }

    #[test]
    fn out_and_buz_layout() {
        let Command::Output(o) = parse(0x68, &[1, 5, 0x10, 0x01]).unwrap() else {
            panic!()
        };
        assert_eq!(
            o[0],
            OutputRecord {
                output: 1,
                control: 5,
                timer: 0x0110
            }
        );
        let Command::Buzzer(b) = parse(0x6A, &[0, 2, 1, 1, 3]).unwrap() else {
            panic!()
        };
        assert_eq!(
            b[0],
            BuzzerRecord {
                reader: 0,
                tone: 2,
                on_time: 1,
                off_time: 1,
                count: 3
            }
        );
        assert!(parse(0x6A, &[0, 2, 1, 1]).is_err());
        assert!(parse(0x68, &[1, 5, 0x10]).is_err());
    }

    #[test]
    fn text_length_must_match() {
        assert!(parse(0x6B, &[0, 1, 0, 1, 1, 2, b'h', b'i']).is_ok());
        assert!(parse(0x6B, &[0, 1, 0, 1, 1, 3, b'h', b'i']).is_err());
        assert!(parse(0x6B, &[0, 1]).is_err());
    }

    #[test]
    fn comset_and_unknown() {
        assert_eq!(
            parse(0x6E, &[5, 0x00, 0xC2, 0x01, 0x00]),
            Ok(Command::ComSet {
                address: 5,
                baud: 115_200
            })
        );
        assert_eq!(parse(0x42, &[]).unwrap_err().nak(), NakCode::UnknownCommand);
        assert_eq!(parse(0x76, &[7; 8]), Ok(Command::Challenge([7; 8])));
        assert!(parse(0x76, &[7; 9]).is_err());
        assert_eq!(
            parse(0x77, &[9; 16]),
            Ok(Command::ServerCryptogram([9; 16]))
        );
        assert!(parse(0x77, &[9; 15]).is_err());
        let mut ks = vec![1, 16];
        ks.extend_from_slice(&[0x42; 16]);
        assert_eq!(
            parse(0x75, &ks),
            Ok(Command::KeySet {
                key_type: 1,
                key: Scbk::new([0x42; 16])
            })
        );
        // Key length byte must say 16 and match the data.
        ks[1] = 15;
        assert!(parse(0x75, &ks).is_err());
        assert!(parse(0x75, &ks[..17]).is_err());
        assert_eq!(parse(0x7C, &[]), Ok(Command::Unsupported { code: 0x7C }));
    }
}
