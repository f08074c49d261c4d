//! How a phone finds and opens a keyway door over BLE, as bytes (sans-IO): the Aliro service
//! UUID, the advertisement's service data (reader group information), the GATT reader
//! characteristic (L2CAP SPSM + supported versions) and the device characteristic (selected
//! version). The UUIDs and layouts follow aliro-access-control/aliro-actuator's reader.

use uuid::Uuid;

/// The Aliro GATT service, 16-bit UUID FFF2.
pub const SERVICE_UUID: Uuid = Uuid::from_u128(0x0000_fff2_0000_1000_8000_0080_5f9b_34fb);
/// Reader characteristic (read): SPSM (2, big-endian) || versions length (1) || versions.
pub const READER_CHARACTERISTIC_UUID: Uuid =
    Uuid::from_u128(0xd3b5_a130_9e23_4b3a_8be4_6b1e_e5f9_80a3);
/// Device characteristic (write): the protocol version the phone selected (2 bytes).
pub const DEVICE_CHARACTERISTIC_UUID: Uuid =
    Uuid::from_u128(0xbd4b_9502_3f54_11ec_b919_0242_ac12_0005);
/// The L2CAP LE credit-based channel PSM keyway listens on (dynamic range 0x80..=0xFF).
pub const DEFAULT_SPSM: u16 = 0x0080;
/// Advertisement format version in the service data's first byte (low 3 bits).
const ADVERTISEMENT_VERSION: u8 = 0;

/// Why a characteristic or advertisement value is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiscoveryError {
    #[error("reader characteristic value malformed ({0} bytes)")]
    ReaderCharacteristic(usize),
    #[error("advertisement service data malformed ({0} bytes)")]
    Advertisement(usize),
    #[error("too many versions")]
    TooManyVersions,
}

/// What the reader characteristic publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReaderInfo {
    pub spsm: u16,
    pub versions: Vec<[u8; 2]>,
}

impl ReaderInfo {
    pub fn encode(&self) -> Result<Vec<u8>, DiscoveryError> {
        let vlen =
            u8::try_from(self.versions.len() * 2).map_err(|_| DiscoveryError::TooManyVersions)?;
        let mut out = Vec::with_capacity(3 + usize::from(vlen));
        out.extend_from_slice(&self.spsm.to_be_bytes());
        out.push(vlen);
        for v in &self.versions {
            out.extend_from_slice(v);
        }
        Ok(out)
    }

    pub fn parse(value: &[u8]) -> Result<Self, DiscoveryError> {
        let bad = || DiscoveryError::ReaderCharacteristic(value.len());
        let (Some(&hi), Some(&lo), Some(&vlen)) = (value.first(), value.get(1), value.get(2))
        else {
            return Err(bad());
        };
        let body = value.get(3..).ok_or_else(bad)?;
        if usize::from(vlen) != body.len() || vlen % 2 != 0 {
            return Err(bad());
        }
        Ok(Self {
            spsm: u16::from_be_bytes([hi, lo]),
            versions: body
                .chunks_exact(2)
                .filter_map(|c| <[u8; 2]>::try_from(c).ok())
                .collect(),
        })
    }
}

/// The reader-group part of the advertisement (service data of UUID FFF2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advertisement {
    /// Set when the reader has a notification pending for phones (not used by keyway: 0).
    pub notification: bool,
    /// TX power at 1 m as advertised (dBm); lets a phone estimate distance.
    pub tx_power: i8,
    /// First 8 bytes of the reader group identifier.
    pub group_prefix: [u8; 8],
    /// First 2 bytes of the reader group sub-identifier.
    pub sub_prefix: [u8; 2],
}

/// Service-data length: flags, tx power, group (8), sub (2), tag timestamp (4), RFU, tag (7).
pub const ADVERTISEMENT_LEN: usize = 24;

impl Advertisement {
    pub fn new(group_id: &[u8; 16], sub_id: &[u8; 16], tx_power: i8) -> Self {
        let mut group_prefix = [0u8; 8];
        group_prefix.copy_from_slice(&group_id[..8]);
        let mut sub_prefix = [0u8; 2];
        sub_prefix.copy_from_slice(&sub_id[..2]);
        Self {
            notification: false,
            tx_power,
            group_prefix,
            sub_prefix,
        }
    }

    /// Service data bytes. The dynamic tag (a rotating value phones with the group resolving
    /// key can check) is left zero: keyway does not implement it yet (docs/ble.md).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(ADVERTISEMENT_LEN);
        out.push((u8::from(self.notification) << 3) | ADVERTISEMENT_VERSION);
        out.push(self.tx_power.to_be_bytes()[0]);
        out.extend_from_slice(&self.group_prefix);
        out.extend_from_slice(&self.sub_prefix);
        out.resize(ADVERTISEMENT_LEN, 0);
        out
    }

    pub fn parse(data: &[u8]) -> Result<Self, DiscoveryError> {
        let bad = || DiscoveryError::Advertisement(data.len());
        if data.len() != ADVERTISEMENT_LEN {
            return Err(bad());
        }
        let flags = *data.first().ok_or_else(bad)?;
        let tx = *data.get(1).ok_or_else(bad)?;
        let mut group_prefix = [0u8; 8];
        group_prefix.copy_from_slice(data.get(2..10).ok_or_else(bad)?);
        let mut sub_prefix = [0u8; 2];
        sub_prefix.copy_from_slice(data.get(10..12).ok_or_else(bad)?);
        Ok(Self {
            notification: flags & 0x08 != 0,
            tx_power: i8::from_be_bytes([tx]),
            group_prefix,
            sub_prefix,
        })
    }

    /// Whether this advertisement belongs to a reader of `group_id` (what a phone checks
    /// before connecting).
    pub fn matches_group(&self, group_id: &[u8; 16]) -> bool {
        group_id.starts_with(&self.group_prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_info_round_trip() {
        let r = ReaderInfo {
            spsm: 0x0081,
            versions: vec![[1, 0], [2, 0]],
        };
        let b = r.encode().unwrap();
        assert_eq!(b, [0x00, 0x81, 0x04, 1, 0, 2, 0]);
        assert_eq!(ReaderInfo::parse(&b).unwrap(), r);
        for bad in [&[][..], &[0, 0x80], &[0, 0x80, 2, 1], &[0, 0x80, 1, 1]] {
            assert!(ReaderInfo::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn advertisement_round_trip_and_group_match() {
        let g = [0x11u8; 16];
        let mut other = g;
        other[3] = 0;
        let a = Advertisement::new(&g, &[0x22; 16], -8);
        let b = a.encode();
        assert_eq!(b.len(), ADVERTISEMENT_LEN);
        assert_eq!(b[1], 0xF8);
        let p = Advertisement::parse(&b).unwrap();
        assert_eq!(p, a);
        assert!(p.matches_group(&g));
        assert!(!p.matches_group(&other));
        assert!(Advertisement::parse(&b[..23]).is_err());
    }

    /// The bytes aliro-access-control/aliro-actuator's reader (the Aliro reference
    /// implementation, `hw_driver/murata_driver`) puts on the air, written out by hand from its
    /// source rather than produced by our own encoder: the reader characteristic is
    /// `spsm || 02 01 00` (SPSM big-endian, one version 0100), and the service data of FFF2 is
    /// `(notification << 3 | version) || tx power || group[..8] || sub[..2] || dynamic-tag
    /// timestamp (4) || RFU (1) || dynamic tag (7)`. keyway does not rotate the dynamic tag yet
    /// (docs/ble.md), so its last 12 bytes are zero where the reference has timestamp and tag.
    #[test]
    fn layouts_match_the_reference_readers_bytes() {
        let reader = ReaderInfo {
            spsm: DEFAULT_SPSM,
            versions: vec![crate::ble::BLE_PROTOCOL_VERSION],
        };
        assert_eq!(reader.encode().unwrap(), [0x00, 0x80, 0x02, 0x01, 0x00]);

        let group: [u8; 16] = core::array::from_fn(|i| 0xA0 + i as u8);
        let sub: [u8; 16] = core::array::from_fn(|i| 0xB0 + i as u8);
        let reference: [u8; 24] = [
            0x00, // notification 0, advertisement version 0
            0x00, // tx power 0 dBm
            0xA0, 0xA1, 0xA2, 0xA3, 0xA4, 0xA5, 0xA6, 0xA7, // reader group identifier[..8]
            0xB0, 0xB1, // reader group sub-identifier[..2]
            0x7A, 0x4B, 0x85, 0x00, // dynamic tag timestamp (the reference's default)
            0x00, // RFU
            0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, // dynamic tag
        ];
        let ours = Advertisement::new(&group, &sub, 0).encode();
        assert_eq!(ours.len(), reference.len());
        assert_eq!(ours[..12], reference[..12], "flags, tx power, group, sub");
        assert_eq!(ours[12..], [0u8; 12], "timestamp, RFU and tag not set yet");
        // What a phone does with the reference reader's advertisement: parse and match it.
        let theirs = Advertisement::parse(&reference).unwrap();
        assert!(theirs.matches_group(&group));
        assert_eq!(theirs.sub_prefix, [0xB0, 0xB1]);
    }

    #[test]
    fn service_uuid_is_the_16_bit_fff2() {
        assert_eq!(
            SERVICE_UUID.to_string(),
            "0000fff2-0000-1000-8000-00805f9b34fb"
        );
    }
}
