//! A physical contactless card without the Aliro application, for cutover tests: it refuses
//! every SELECT (6A82) and answers the PC/SC GET DATA for its UID (`FF CA 00 00 00`), as a
//! PC/SC reader does for a MIFARE Classic or similar card.

use super::vpcd::VirtualCard;

/// PC/SC part 3 ATR of a MIFARE Classic 1K as a contactless reader reports it.
pub const MIFARE_1K_ATR: [u8; 20] = [
    0x3B, 0x8F, 0x80, 0x01, 0x80, 0x4F, 0x0C, 0xA0, 0x00, 0x00, 0x03, 0x06, 0x03, 0x00, 0x01, 0x00,
    0x00, 0x00, 0x00, 0x6A,
];

/// A card known only by its UID.
#[derive(Debug, Clone)]
pub struct UidCard {
    uid: Vec<u8>,
    /// C-APDUs received, in order.
    pub seen: Vec<Vec<u8>>,
    uid_read: bool,
}

impl UidCard {
    pub fn new(uid: &[u8]) -> Self {
        Self {
            uid: uid.to_vec(),
            seen: Vec::new(),
            uid_read: false,
        }
    }

    /// True once the reader has read the UID.
    pub fn uid_read(&self) -> bool {
        self.uid_read
    }
}

impl VirtualCard for UidCard {
    fn power_event(&mut self, _code: u8) {}

    fn transmit(&mut self, c_apdu: &[u8]) -> Vec<u8> {
        self.seen.push(c_apdu.to_vec());
        match c_apdu {
            // GET DATA, P1 00 = UID; Le 00 = all of it.
            [0xFF, 0xCA, 0x00, 0x00, rest @ ..] if rest.len() <= 1 => {
                self.uid_read = true;
                let mut r = self.uid.clone();
                r.extend_from_slice(&[0x90, 0x00]);
                r
            }
            // SELECT: no such application.
            [_, 0xA4, ..] => vec![0x6A, 0x82],
            _ => vec![0x6D, 0x00],
        }
    }

    fn transaction_finished(&self) -> bool {
        self.uid_read
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_select_and_gives_its_uid() {
        let mut c = UidCard::new(&[1, 2, 3, 4]);
        assert_eq!(
            c.transmit(&[0x00, 0xA4, 0x04, 0x00, 0x02, 0xA0, 0x00, 0x00]),
            vec![0x6A, 0x82]
        );
        assert!(!c.transaction_finished());
        assert_eq!(c.transmit(&[0x80, 0x80, 0, 0]), vec![0x6D, 0x00]);
        assert_eq!(
            c.transmit(&[0xFF, 0xCA, 0x00, 0x00, 0x00]),
            vec![1, 2, 3, 4, 0x90, 0x00]
        );
        assert!(c.transaction_finished());
        // Other GET DATA (P1 01 = historical bytes) is not supported here.
        assert_eq!(
            c.transmit(&[0xFF, 0xCA, 0x01, 0x00, 0x00]),
            vec![0x6D, 0x00]
        );
    }
}
