//! HCI Read RSSI, sans-IO: the command packet and the parser for the controller's answer.
//!
//! A walk-up door needs the signal strength of the *live* connection (the phone is a central
//! that connects to keyway, so BlueZ never scanned its advertisements and knows no RSSI for
//! it). The controller measures it per connection handle: HCI Read RSSI (Core 5.x, Vol 4,
//! Part E, 7.5.4). [`crate::ble::rssi`] sends these bytes on a raw HCI socket.
//!
//! Every byte read here comes from the kernel's HCI socket and so from the controller:
//! untrusted, parsed without panicking (see the `hci_events` fuzz target).

/// HCI packet indicator of a command.
const COMMAND_PKT: u8 = 0x01;
/// HCI packet indicator of an event.
const EVENT_PKT: u8 = 0x04;
/// Command Complete / Command Status event codes.
pub const EVT_COMMAND_COMPLETE: u8 = 0x0E;
pub const EVT_COMMAND_STATUS: u8 = 0x0F;
/// Read RSSI: OGF 0x05 (status parameters), OCF 0x0005.
pub const OP_READ_RSSI: u16 = 0x1405;
/// Connection handles are 12 bits; the top bits of the field are flags.
const HANDLE_MASK: u16 = 0x0FFF;

/// What the controller said about a Read RSSI for our handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RssiReply {
    /// The RSSI of the connection in dBm (127: not available).
    Rssi(i8),
    /// The controller refused the command (HCI error code, e.g. 0x01 unknown command,
    /// 0x02 unknown connection).
    Failed(u8),
}

/// The Read RSSI command for `handle`, with its packet indicator (as written to a raw socket).
pub fn read_rssi_command(handle: u16) -> [u8; 6] {
    let [op_lo, op_hi] = OP_READ_RSSI.to_le_bytes();
    let [h_lo, h_hi] = (handle & HANDLE_MASK).to_le_bytes();
    [COMMAND_PKT, op_lo, op_hi, 2, h_lo, h_hi]
}

/// Parses one packet read from a raw HCI socket. `Some` when it answers a Read RSSI for
/// `handle`; `None` for anything else (other events, other commands, other handles, short or
/// malformed packets), which the caller skips.
pub fn parse_rssi_reply(packet: &[u8], handle: u16) -> Option<RssiReply> {
    let (&kind, rest) = packet.split_first()?;
    if kind != EVENT_PKT {
        return None;
    }
    let (&code, rest) = rest.split_first()?;
    let (&len, rest) = rest.split_first()?;
    let params = rest.get(..usize::from(len))?;
    match code {
        EVT_COMMAND_COMPLETE => {
            // ncmd (1) | opcode (2) | status (1) | handle (2) | rssi (1)
            if le16(params.get(1..3)?) != OP_READ_RSSI {
                return None;
            }
            let status = *params.get(3)?;
            match params.get(4..6).map(le16) {
                Some(h) if h & HANDLE_MASK != handle & HANDLE_MASK => None,
                Some(_) if status == 0 => Some(RssiReply::Rssi(*params.get(6)? as i8)),
                // An error, with or without the handle echoed: ours is the only question
                // this socket asked.
                _ if status != 0 => Some(RssiReply::Failed(status)),
                _ => None,
            }
        }
        EVT_COMMAND_STATUS => {
            // status (1) | ncmd (1) | opcode (2): only sent for Read RSSI when it failed.
            let status = *params.first()?;
            (le16(params.get(2..4)?) == OP_READ_RSSI && status != 0)
                .then_some(RssiReply::Failed(status))
        }
        _ => None,
    }
}

fn le16(b: &[u8]) -> u16 {
    match b {
        [lo, hi, ..] => u16::from_le_bytes([*lo, *hi]),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(status: u8, handle: u16, rssi: i8) -> Vec<u8> {
        let h = handle.to_le_bytes();
        vec![0x04, 0x0E, 7, 1, 0x05, 0x14, status, h[0], h[1], rssi as u8]
    }

    #[test]
    fn command_bytes() {
        assert_eq!(
            read_rssi_command(0x0040),
            [0x01, 0x05, 0x14, 0x02, 0x40, 0x00]
        );
        // Flag bits never leak into the handle field.
        assert_eq!(
            read_rssi_command(0xF201),
            [0x01, 0x05, 0x14, 0x02, 0x01, 0x02]
        );
    }

    #[test]
    fn answers_for_our_handle() {
        assert_eq!(
            parse_rssi_reply(&complete(0, 0x40, -57), 0x40),
            Some(RssiReply::Rssi(-57))
        );
        assert_eq!(
            parse_rssi_reply(&complete(0, 0x40, 127), 0x40),
            Some(RssiReply::Rssi(127))
        );
        assert_eq!(
            parse_rssi_reply(&complete(0x02, 0x40, 0), 0x40),
            Some(RssiReply::Failed(0x02))
        );
        // Unknown command (an LE-only emulated controller): Command Status.
        let status = [0x04, 0x0F, 4, 0x01, 1, 0x05, 0x14];
        assert_eq!(
            parse_rssi_reply(&status, 0x40),
            Some(RssiReply::Failed(0x01))
        );
    }

    #[test]
    fn skips_what_is_not_ours() {
        // Another connection's answer (a concurrent query on another socket).
        assert_eq!(parse_rssi_reply(&complete(0, 0x41, -40), 0x40), None);
        // Another command's completion.
        let mut other = complete(0, 0x40, -40);
        other[4] = 0x06;
        assert_eq!(parse_rssi_reply(&other, 0x40), None);
        // A pending (successful) Command Status.
        assert_eq!(
            parse_rssi_reply(&[0x04, 0x0F, 4, 0x00, 1, 0x05, 0x14], 0x40),
            None
        );
        // Not an event, another event, truncated, lying length.
        assert_eq!(parse_rssi_reply(&[0x02, 0, 0], 0x40), None);
        assert_eq!(
            parse_rssi_reply(&[0x04, 0x05, 4, 0, 0x40, 0, 0x13], 0x40),
            None
        );
        let full = complete(0, 0x40, -57);
        for n in 0..full.len() {
            assert_eq!(parse_rssi_reply(&full[..n], 0x40), None, "{n} bytes");
        }
        let mut short = full.clone();
        short[2] = 5;
        assert_eq!(parse_rssi_reply(&short[..8], 0x40), None);
        assert_eq!(parse_rssi_reply(&[], 0x40), None);
    }
}
