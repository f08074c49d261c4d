//! Encoders for PD-to-CP reply data (OSDP 2.2, chapter "Replies"). Each reply yields its code and data
//! bytes; the packet layer ([`super::phy`]) wraps them.

/// Reply codes (OSDP 2.2 Table 6; verified against libosdp's `osdp_common.h`).
pub mod code {
    pub const ACK: u8 = 0x40;
    pub const NAK: u8 = 0x41;
    pub const PDID: u8 = 0x45;
    pub const PDCAP: u8 = 0x46;
    pub const LSTATR: u8 = 0x48;
    pub const ISTATR: u8 = 0x49;
    pub const OSTATR: u8 = 0x4A;
    pub const RSTATR: u8 = 0x4B;
    pub const RAW: u8 = 0x50;
    pub const COM: u8 = 0x54;
    pub const CCRYPT: u8 = 0x76;
    pub const RMAC_I: u8 = 0x78;
    pub const BUSY: u8 = 0x79;
}

/// NAK error codes (osdp_NAK data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum NakCode {
    /// Message check character(s) error.
    CheckCharacter = 0x01,
    /// Command length error.
    CmdLength = 0x02,
    /// Unknown command code / not implemented by this PD.
    UnknownCommand = 0x03,
    /// Unexpected sequence number.
    SequenceNumber = 0x04,
    /// Secure channel not supported by this PD.
    ScUnsupported = 0x05,
    /// Unsupported security block or security conditions not met.
    ScConditions = 0x06,
    BioTypeUnsupported = 0x07,
    BioFormatUnsupported = 0x08,
    /// Unable to process the command record.
    Record = 0x09,
}

/// Capability function codes (OSDP 2.2 Annex B; libosdp `enum osdp_pd_cap_function_code_e`).
pub mod cap {
    pub const CONTACT_STATUS: u8 = 1;
    pub const OUTPUT_CONTROL: u8 = 2;
    pub const CARD_DATA_FORMAT: u8 = 3;
    pub const LED_CONTROL: u8 = 4;
    pub const AUDIBLE_OUTPUT: u8 = 5;
    pub const TEXT_OUTPUT: u8 = 6;
    pub const TIME_KEEPING: u8 = 7;
    pub const CHECK_CHARACTER: u8 = 8;
    pub const COMMUNICATION_SECURITY: u8 = 9;
    pub const RECEIVE_BUFFER: u8 = 10;
    pub const LARGEST_COMBINED_MESSAGE: u8 = 11;
    pub const SMART_CARD: u8 = 12;
    pub const READERS: u8 = 13;
    pub const BIOMETRICS: u8 = 14;
    pub const SECURE_PIN_ENTRY: u8 = 15;
    pub const OSDP_VERSION: u8 = 16;
}

/// One osdp_PDCAP entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capability {
    pub function: u8,
    pub compliance: u8,
    pub count: u8,
}

/// osdp_PDID contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PdIdentity {
    /// IEEE OUI, 24 bits (sent little-endian).
    pub vendor_code: u32,
    pub model: u8,
    pub version: u8,
    pub serial: u32,
    /// Firmware major, minor, build (sent in that order).
    pub firmware: [u8; 3],
}

/// Card data format of osdp_RAW.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawFormat {
    NotSpecified = 0,
    Wiegand = 1,
}

/// A card read to deliver as osdp_RAW: `bit_count` bits packed MSB first into `data`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawCard {
    pub reader: u8,
    pub format: RawFormat,
    pub bit_count: u16,
    pub data: Vec<u8>,
}

impl RawCard {
    /// The bytes needed for `bit_count` bits.
    pub fn byte_len(&self) -> usize {
        usize::from(self.bit_count).div_ceil(8)
    }
}

/// A reply with its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Ack,
    Nak(NakCode),
    PdId(PdIdentity),
    PdCap(Vec<Capability>),
    LocalStatus {
        tamper: bool,
        power_fail: bool,
    },
    OutputStatus(Vec<bool>),
    Raw(RawCard),
    Com {
        address: u8,
        baud: u32,
    },
    Busy,
    /// osdp_CCRYPT: client UID, PD random, client cryptogram.
    Ccrypt {
        uid: [u8; 8],
        pd_random: [u8; 8],
        cryptogram: [u8; 16],
    },
    /// osdp_RMAC_I: the initial R-MAC.
    RmacI([u8; 16]),
}

impl Reply {
    pub fn code(&self) -> u8 {
        match self {
            Reply::Ack => code::ACK,
            Reply::Nak(_) => code::NAK,
            Reply::PdId(_) => code::PDID,
            Reply::PdCap(_) => code::PDCAP,
            Reply::LocalStatus { .. } => code::LSTATR,
            Reply::OutputStatus(_) => code::OSTATR,
            Reply::Raw(_) => code::RAW,
            Reply::Com { .. } => code::COM,
            Reply::Busy => code::BUSY,
            Reply::Ccrypt { .. } => code::CCRYPT,
            Reply::RmacI(_) => code::RMAC_I,
        }
    }

    /// The data bytes after the reply code.
    pub fn data(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Reply::Ack | Reply::Busy => {}
            Reply::Nak(c) => out.push(*c as u8),
            Reply::PdId(id) => {
                out.extend_from_slice(&id.vendor_code.to_le_bytes()[..3]);
                out.push(id.model);
                out.push(id.version);
                out.extend_from_slice(&id.serial.to_le_bytes());
                out.extend_from_slice(&id.firmware);
            }
            Reply::PdCap(caps) => {
                for c in caps {
                    out.extend_from_slice(&[c.function, c.compliance, c.count]);
                }
            }
            Reply::LocalStatus { tamper, power_fail } => {
                out.push(u8::from(*tamper));
                out.push(u8::from(*power_fail));
            }
            Reply::OutputStatus(states) => out.extend(states.iter().map(|&s| u8::from(s))),
            Reply::Raw(card) => {
                out.push(card.reader);
                out.push(card.format as u8);
                out.extend_from_slice(&card.bit_count.to_le_bytes());
                // Exactly ceil(bits/8) bytes: the CP checks this against the bit count.
                let n = card.byte_len();
                out.extend(
                    card.data
                        .iter()
                        .copied()
                        .chain(std::iter::repeat(0))
                        .take(n),
                );
            }
            Reply::Com { address, baud } => {
                out.push(*address);
                out.extend_from_slice(&baud.to_le_bytes());
            }
            Reply::Ccrypt {
                uid,
                pd_random,
                cryptogram,
            } => {
                out.extend_from_slice(uid);
                out.extend_from_slice(pd_random);
                out.extend_from_slice(cryptogram);
            }
            Reply::RmacI(mac) => out.extend_from_slice(mac),
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pdid_layout_matches_spec() {
        // osdp_PDID: vendor code 3 bytes LSB first, model, version, serial 4 bytes LSB first,
        // firmware major, minor, build.
        let id = PdIdentity {
            vendor_code: 0x00A1B2C3,
            model: 7,
            version: 2,
            serial: 0x11223344,
            firmware: [1, 2, 3],
        };
        assert_eq!(
            Reply::PdId(id).data(),
            vec![0xC3, 0xB2, 0xA1, 7, 2, 0x44, 0x33, 0x22, 0x11, 1, 2, 3]
        );
    }

    #[test]
    fn raw_layout_matches_spec() {
        // osdp_RAW: reader, format, bit count LSB first, data.
        let card = RawCard {
            reader: 0,
            format: RawFormat::Wiegand,
            bit_count: 26,
            data: vec![0xAA, 0xBB, 0xCC, 0xC0],
        };
        assert_eq!(
            Reply::Raw(card).data(),
            vec![0x00, 0x01, 26, 0x00, 0xAA, 0xBB, 0xCC, 0xC0]
        );
        assert_eq!(
            Reply::Raw(RawCard {
                reader: 1,
                format: RawFormat::NotSpecified,
                bit_count: 9,
                data: vec![0xFF],
            })
            .data(),
            vec![1, 0, 9, 0, 0xFF, 0x00]
        );
    }

    #[test]
    fn nak_and_caps() {
        assert_eq!(Reply::Nak(NakCode::SequenceNumber).data(), vec![0x04]);
        assert_eq!(Reply::Nak(NakCode::Record).data(), vec![0x09]);
        let caps = vec![Capability {
            function: 8,
            compliance: 1,
            count: 0,
        }];
        assert_eq!(Reply::PdCap(caps).data(), vec![8, 1, 0]);
        assert_eq!(
            Reply::Com {
                address: 3,
                baud: 9600
            }
            .data(),
            vec![3, 0x80, 0x25, 0, 0]
        );
    }
}
