//! Aliro BLE messages on the L2CAP channel: `protocol type (1) | id (1) | length (2, BE) |
//! payload`, payload attributes `id (1) | length (1) | value`, and a bounded streaming
//! deframer (an L2CAP stream may split or merge messages).
//!
//! Everything parsed here comes from a phone: lengths are checked before use and bounded by
//! [`MAX_PAYLOAD`]; errors, never panics.

use thiserror::Error;

/// Protocol type: the access protocol (AP_RQ / AP_RS carry APDUs).
pub const PROTOCOL_AP: u8 = 0x00;
/// Protocol type: notifications (INITIATE_ACCESS_PROTOCOL, reader status, ...).
pub const PROTOCOL_NOTIFICATION: u8 = 0x02;
/// Largest protocol type value defined by Aliro 1.0 (third-party app).
const PROTOCOL_MAX: u8 = 0x04;

/// AP message id: request (reader -> device), carries a C-APDU.
pub const AP_RQ: u8 = 0x00;
/// AP message id: response (device -> reader), carries an R-APDU.
pub const AP_RS: u8 = 0x01;

/// Notification id: reader status changed.
pub const NOTIFY_READER_STATUS_CHANGED: u8 = 0x02;
/// Notification id: reader status, access protocol completed (reader -> device, encrypted).
pub const NOTIFY_ACCESS_PROTOCOL_COMPLETED: u8 = 0x03;
/// Notification id: initiate access protocol (device -> reader, replaces SELECT on BLE).
pub const NOTIFY_INITIATE_ACCESS_PROTOCOL: u8 = 0x05;

/// Attribute of INITIATE_ACCESS_PROTOCOL: proprietary info (the A5 TLV of the SELECT FCI).
pub const ATTR_PROPRIETARY_INFO: u8 = 0x00;
/// Attribute of ACCESS_PROTOCOL_COMPLETED: reader information.
pub const ATTR_READER_INFORMATION: u8 = 0x00;

/// Frame header length (type, id, 2-byte length).
pub const HEADER_LEN: usize = 4;
/// Largest payload accepted. An APDU exchange never needs more (the reader core caps a chained
/// response at 4096 bytes; GCM adds 16); anything larger is a broken or hostile peer.
pub const MAX_PAYLOAD: usize = 4096 + 64;

/// Why bytes are not a valid BLE message.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    #[error("frame truncated: {have} of {need} bytes")]
    Truncated { have: usize, need: usize },
    #[error("frame length field {len} exceeds the limit of {MAX_PAYLOAD}")]
    TooLong { len: usize },
    #[error("{extra} bytes after the frame")]
    Trailing { extra: usize },
    #[error("unknown protocol type 0x{0:02X}")]
    UnknownProtocol(u8),
    #[error("attribute truncated at offset {offset}")]
    AttributeTruncated { offset: usize },
    #[error("attribute value of {len} bytes does not fit the 1-byte length")]
    AttributeTooLong { len: usize },
}

/// One Aliro BLE message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub protocol: u8,
    pub id: u8,
    pub payload: Vec<u8>,
}

impl Message {
    pub fn new(protocol: u8, id: u8, payload: Vec<u8>) -> Self {
        Self {
            protocol,
            id,
            payload,
        }
    }

    /// AP_RQ carrying a C-APDU.
    pub fn ap_request(c_apdu: Vec<u8>) -> Self {
        Self::new(PROTOCOL_AP, AP_RQ, c_apdu)
    }

    /// AP_RS carrying an R-APDU.
    pub fn ap_response(r_apdu: Vec<u8>) -> Self {
        Self::new(PROTOCOL_AP, AP_RS, r_apdu)
    }

    pub fn is(&self, protocol: u8, id: u8) -> bool {
        self.protocol == protocol && self.id == id
    }

    /// Header bytes for a payload of `len` bytes (also the AAD prefix of encrypted messages).
    pub fn header(protocol: u8, id: u8, len: usize) -> Result<[u8; HEADER_LEN], FrameError> {
        if len > MAX_PAYLOAD {
            return Err(FrameError::TooLong { len });
        }
        let l = u16::try_from(len).map_err(|_| FrameError::TooLong { len })?;
        let [hi, lo] = l.to_be_bytes();
        Ok([protocol, id, hi, lo])
    }

    /// The frame bytes.
    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        let header = Self::header(self.protocol, self.id, self.payload.len())?;
        let mut out = Vec::with_capacity(HEADER_LEN + self.payload.len());
        out.extend_from_slice(&header);
        out.extend_from_slice(&self.payload);
        Ok(out)
    }

    /// Parses exactly one frame (no trailing bytes).
    pub fn parse(bytes: &[u8]) -> Result<Self, FrameError> {
        match split_frame(bytes)? {
            Some((msg, used)) if used == bytes.len() => Ok(msg),
            Some((_, used)) => Err(FrameError::Trailing {
                extra: bytes.len().saturating_sub(used),
            }),
            None => Err(FrameError::Truncated {
                have: bytes.len(),
                need: needed(bytes),
            }),
        }
    }
}

/// How many bytes the frame starting at `bytes` needs in total (header only if unknown).
fn needed(bytes: &[u8]) -> usize {
    match (bytes.get(2), bytes.get(3)) {
        (Some(&hi), Some(&lo)) => HEADER_LEN + usize::from(u16::from_be_bytes([hi, lo])),
        _ => HEADER_LEN,
    }
}

/// One frame from the front of `bytes`, with the number of bytes it used, or `None` if more
/// bytes are needed.
fn split_frame(bytes: &[u8]) -> Result<Option<(Message, usize)>, FrameError> {
    let (Some(&protocol), Some(&id), Some(&hi), Some(&lo)) =
        (bytes.first(), bytes.get(1), bytes.get(2), bytes.get(3))
    else {
        return Ok(None);
    };
    if protocol > PROTOCOL_MAX {
        return Err(FrameError::UnknownProtocol(protocol));
    }
    let len = usize::from(u16::from_be_bytes([hi, lo]));
    if len > MAX_PAYLOAD {
        return Err(FrameError::TooLong { len });
    }
    let end = HEADER_LEN + len;
    match bytes.get(HEADER_LEN..end) {
        Some(payload) => Ok(Some((Message::new(protocol, id, payload.to_vec()), end))),
        None => Ok(None),
    }
}

/// Reassembles messages from a byte stream; holds at most one frame's worth of bytes.
#[derive(Debug, Default)]
pub struct Deframer {
    buf: Vec<u8>,
}

impl Deframer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes and returns every complete message. An error poisons the
    /// stream (framing is lost): the caller drops the connection.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<Message>, FrameError> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        let mut start = 0;
        while let Some(rest) = self.buf.get(start..) {
            match split_frame(rest) {
                Ok(Some((msg, used))) => {
                    out.push(msg);
                    start += used;
                }
                Ok(None) => break,
                Err(e) => {
                    self.buf.clear();
                    return Err(e);
                }
            }
        }
        self.buf.drain(..start.min(self.buf.len()));
        Ok(out)
    }

    /// Bytes of an incomplete frame held back.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

/// One payload attribute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attribute<'a> {
    pub id: u8,
    pub value: &'a [u8],
}

/// Parses a payload made of attributes.
pub fn parse_attributes(payload: &[u8]) -> Result<Vec<Attribute<'_>>, FrameError> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < payload.len() {
        let (Some(&id), Some(&len)) = (payload.get(pos), payload.get(pos + 1)) else {
            return Err(FrameError::AttributeTruncated { offset: pos });
        };
        let start = pos + 2;
        let end = start + usize::from(len);
        let value = payload
            .get(start..end)
            .ok_or(FrameError::AttributeTruncated { offset: pos })?;
        out.push(Attribute { id, value });
        pos = end;
    }
    Ok(out)
}

/// Appends one attribute.
pub fn push_attribute(out: &mut Vec<u8>, id: u8, value: &[u8]) -> Result<(), FrameError> {
    let len =
        u8::try_from(value.len()).map_err(|_| FrameError::AttributeTooLong { len: value.len() })?;
    out.push(id);
    out.push(len);
    out.extend_from_slice(value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_parse_round_trip_and_layout() {
        let m = Message::ap_request(vec![0x80, 0x80, 0x00, 0x00]);
        let b = m.encode().unwrap();
        assert_eq!(b, [0x00, 0x00, 0x00, 0x04, 0x80, 0x80, 0x00, 0x00]);
        assert_eq!(Message::parse(&b).unwrap(), m);
        let long = Message::new(PROTOCOL_NOTIFICATION, 0x03, vec![7; 0x0FF0]);
        let b = long.encode().unwrap();
        assert_eq!(&b[..4], &[0x02, 0x03, 0x0F, 0xF0]);
        assert_eq!(Message::parse(&b).unwrap(), long);
    }

    #[test]
    fn parse_rejects_bad_frames() {
        assert!(matches!(
            Message::parse(&[0x00, 0x01, 0x00]),
            Err(FrameError::Truncated { have: 3, need: 4 })
        ));
        assert!(matches!(
            Message::parse(&[0x00, 0x01, 0x00, 0x03, 1, 2]),
            Err(FrameError::Truncated { have: 6, need: 7 })
        ));
        assert!(matches!(
            Message::parse(&[0x00, 0x01, 0x00, 0x01, 1, 2]),
            Err(FrameError::Trailing { extra: 1 })
        ));
        assert!(matches!(
            Message::parse(&[0x05, 0x01, 0x00, 0x00]),
            Err(FrameError::UnknownProtocol(5))
        ));
        assert!(matches!(
            Message::parse(&[0x00, 0x01, 0xFF, 0xFF]),
            Err(FrameError::TooLong { len: 0xFFFF })
        ));
        assert!(Message::new(0, 0, vec![0; MAX_PAYLOAD + 1])
            .encode()
            .is_err());
    }

    #[test]
    fn deframer_splits_and_merges() {
        let a = Message::ap_response(vec![1, 2, 3]).encode().unwrap();
        let b = Message::new(PROTOCOL_NOTIFICATION, 5, vec![9; 300])
            .encode()
            .unwrap();
        let mut stream = a.clone();
        stream.extend_from_slice(&b);
        // Every split point yields the same two messages.
        for cut in 0..=stream.len() {
            let mut d = Deframer::new();
            let mut got = d.push(&stream[..cut]).unwrap();
            got.extend(d.push(&stream[cut..]).unwrap());
            assert_eq!(got.len(), 2, "cut {cut}");
            assert_eq!(got[0].payload, vec![1, 2, 3]);
            assert_eq!(got[1].payload.len(), 300);
            assert_eq!(d.pending(), 0);
        }
        // Byte by byte.
        let mut d = Deframer::new();
        let mut n = 0;
        for byte in &stream {
            n += d.push(std::slice::from_ref(byte)).unwrap().len();
        }
        assert_eq!(n, 2);
    }

    #[test]
    fn deframer_refuses_oversized_and_garbage() {
        let mut d = Deframer::new();
        assert!(d.push(&[0x00, 0x01, 0x20, 0x00]).is_err());
        assert_eq!(d.pending(), 0);
        assert!(d.push(&[0xFF, 0x00, 0x00, 0x00]).is_err());
        // Arbitrary bytes never panic.
        let mut seed = 0x1234_5678u32;
        for _ in 0..2000 {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let len = (seed >> 24) as usize % 16;
            let bytes: Vec<u8> = (0..len)
                .map(|i| (seed >> (i % 4 * 8)) as u8 & 0x07)
                .collect();
            let _ = d.push(&bytes);
            let _ = parse_attributes(&bytes);
            let _ = Message::parse(&bytes);
        }
    }

    #[test]
    fn attributes() {
        let mut p = Vec::new();
        push_attribute(&mut p, 0x00, &[0xA5, 0x00]).unwrap();
        push_attribute(&mut p, 0x07, &[]).unwrap();
        assert_eq!(p, [0x00, 0x02, 0xA5, 0x00, 0x07, 0x00]);
        let a = parse_attributes(&p).unwrap();
        assert_eq!(a.len(), 2);
        assert_eq!(a[0].value, &[0xA5, 0x00]);
        assert_eq!(a[1].id, 7);
        assert!(parse_attributes(&[0x00]).is_err());
        assert!(parse_attributes(&[0x00, 0x03, 1, 2]).is_err());
        assert!(push_attribute(&mut p, 0, &[0; 256]).is_err());
    }
}
