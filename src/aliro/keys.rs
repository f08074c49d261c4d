//! The Aliro transaction key schedule, computed identically by the reader and the endpoint:
//! signature preimages, the volatile / persistent / FAST salts, the HKDF info, and the split of
//! the derived output into session keys (expedited, step-up, BLE, URSK, Kpersistent).
//!
//! Every function here is pure; the caller supplies the transcript values in a
//! [`TranscriptContext`]. The interface byte, protocol version, command parameters and policy
//! are parameters so the same code serves NFC and BLE, STANDARD and FAST.

use crate::aliro::consts::{
    tag, INFO_BLE_SK_DEVICE, INFO_BLE_SK_READER, INFO_SK_DEVICE, INFO_SK_READER, LABEL_PERSISTENT,
    LABEL_VOLATILE, LABEL_VOLATILE_FAST, USAGE_DEVICE_SIGNATURE, USAGE_READER_SIGNATURE,
};
use crate::aliro::crypto::{self, CryptoError, SymmetricKey};
use p256::{PublicKey, SecretKey};

/// Output length of the volatile and FAST HKDF expansions (five 32-byte keys).
pub const SESSION_OKM_LEN: usize = 160;

/// Which party signs a preimage (selects the tag-93 usage constant).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signer {
    Reader,
    Device,
}

/// Everything the salts and the HKDF info are built from, as both sides saw it on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TranscriptContext {
    /// X coordinate of the reader key that enters the salts (the reader group key; with
    /// aliro-actuator also after LOAD CERT).
    pub reader_key_x: [u8; 32],
    /// Reader identifier: group id (16) || sub id (16).
    pub reader_identifier: [u8; 32],
    /// Interface byte: `5E` NFC, `C3` BLE.
    pub interface: u8,
    /// Protocol version selected in AUTH0 (tag 5C).
    pub protocol_version: [u8; 2],
    /// X coordinate of the reader ephemeral key.
    pub reader_ephemeral_x: [u8; 32],
    /// X coordinate of the endpoint ephemeral key.
    pub endpoint_ephemeral_x: [u8; 32],
    /// Transaction identifier (AUTH0 tag 4C).
    pub transaction_id: [u8; 16],
    /// AUTH0 command parameters (tag 41).
    pub command_parameters: u8,
    /// AUTH0 authentication policy (tag 42).
    pub auth_policy: u8,
    /// The FCI proprietary template TLV (`A5 len value`) that enters every salt.
    pub fci_proprietary_tlv: Vec<u8>,
    /// Vendor extension data appended to the HKDF info (empty when none).
    pub vendor_extension: Vec<u8>,
}

impl TranscriptContext {
    /// The common salt body after the 12-byte label position, preceded by the reader key X.
    fn salt_with_label(&self, label: &[u8; 12]) -> Vec<u8> {
        let mut s = Vec::with_capacity(
            32 + 12 + 32 + 1 + 4 + 32 + 16 + 2 + self.fci_proprietary_tlv.len() + 32,
        );
        s.extend_from_slice(&self.reader_key_x);
        s.extend_from_slice(label);
        s.extend_from_slice(&self.reader_identifier);
        s.push(self.interface);
        // 5C 02 <version>: the selected version as a TLV.
        s.push(tag::PROTOCOL_VERSIONS as u8);
        s.push(2);
        s.extend_from_slice(&self.protocol_version);
        s.extend_from_slice(&self.reader_ephemeral_x);
        s.extend_from_slice(&self.transaction_id);
        s.push(self.command_parameters);
        s.push(self.auth_policy);
        s.extend_from_slice(&self.fci_proprietary_tlv);
        s
    }

    /// Salt of the volatile (per-transaction) key derivation.
    pub fn volatile_salt(&self) -> Vec<u8> {
        self.salt_with_label(LABEL_VOLATILE)
    }

    /// Salt of the Kpersistent derivation (needs the endpoint long-term key X).
    pub fn persistent_salt(&self, endpoint_long_term_x: &[u8; 32]) -> Vec<u8> {
        let mut s = self.salt_with_label(LABEL_PERSISTENT);
        s.extend_from_slice(endpoint_long_term_x);
        s
    }

    /// Salt of the FAST key derivation (from Kpersistent).
    pub fn fast_salt(&self, endpoint_long_term_x: &[u8; 32]) -> Vec<u8> {
        let mut s = self.salt_with_label(LABEL_VOLATILE_FAST);
        s.extend_from_slice(endpoint_long_term_x);
        s
    }

    /// HKDF info: endpoint ephemeral X followed by any vendor extension.
    pub fn hkdf_info(&self) -> Vec<u8> {
        let mut info = Vec::with_capacity(32 + self.vendor_extension.len());
        info.extend_from_slice(&self.endpoint_ephemeral_x);
        info.extend_from_slice(&self.vendor_extension);
        info
    }

    /// The signature preimage `4D 20 <reader id> 86 20 <endpoint eph X> 87 20 <reader eph X>
    /// 4C 10 <transaction id> 93 04 <usage>` for `who`.
    pub fn signature_preimage(&self, who: Signer) -> Vec<u8> {
        signature_preimage(
            who,
            &self.reader_identifier,
            &self.endpoint_ephemeral_x,
            &self.reader_ephemeral_x,
            &self.transaction_id,
        )
    }
}

/// Builds a signature preimage from its parts (see [`TranscriptContext::signature_preimage`]).
pub fn signature_preimage(
    who: Signer,
    reader_identifier: &[u8; 32],
    endpoint_ephemeral_x: &[u8; 32],
    reader_ephemeral_x: &[u8; 32],
    transaction_id: &[u8; 16],
) -> Vec<u8> {
    let usage = match who {
        Signer::Reader => USAGE_READER_SIGNATURE,
        Signer::Device => USAGE_DEVICE_SIGNATURE,
    };
    let mut p = Vec::with_capacity(2 + 32 + 2 + 32 + 2 + 32 + 2 + 16 + 2 + 4);
    for (t, v) in [
        (tag::READER_ID, &reader_identifier[..]),
        (tag::ENDPOINT_EPHEMERAL, &endpoint_ephemeral_x[..]),
        (tag::READER_EPHEMERAL, &reader_ephemeral_x[..]),
        (tag::TRANSACTION_ID, &transaction_id[..]),
        (tag::USAGE, &usage[..]),
    ] {
        // All single-byte tags with lengths < 128.
        p.push(t as u8);
        p.push(v.len() as u8);
        p.extend_from_slice(v);
    }
    p
}

/// The shared transaction secret: X9.63-KDF(SHA-256, Z = ECDH X, SharedInfo = transaction id).
/// This is the HKDF input keying material of the volatile and persistent derivations.
pub fn transaction_ikm(
    own_ephemeral: &SecretKey,
    peer_ephemeral: &PublicKey,
    transaction_id: &[u8; 16],
) -> Result<SymmetricKey, CryptoError> {
    let z = crypto::ecdh_x(own_ephemeral, peer_ephemeral);
    crypto::x963_kdf_sha256(z.as_bytes(), transaction_id, 32)?
        .key_at(0)
        .ok_or(CryptoError::KdfLength(32))
}

/// The five keys of the volatile (STANDARD) derivation, in output order.
#[derive(Debug, Clone)]
pub struct VolatileKeys {
    pub exchange_sk_reader: SymmetricKey,
    pub exchange_sk_device: SymmetricKey,
    pub step_up_ikm: SymmetricKey,
    pub ble_ikm: SymmetricKey,
    pub ursk: SymmetricKey,
}

/// HKDF(IKM = transaction IKM, salt = volatile salt, info) -> 160 bytes, split in five keys.
pub fn derive_volatile(
    ikm: &SymmetricKey,
    ctx: &TranscriptContext,
) -> Result<VolatileKeys, CryptoError> {
    let [exchange_sk_reader, exchange_sk_device, step_up_ikm, ble_ikm, ursk] =
        session_keys(ikm, &ctx.volatile_salt(), &ctx.hkdf_info())?;
    Ok(VolatileKeys {
        exchange_sk_reader,
        exchange_sk_device,
        step_up_ikm,
        ble_ikm,
        ursk,
    })
}

/// HKDF-SHA256 to 160 bytes, split in five 32-byte keys in output order: the shape both the
/// volatile and the FAST derivations share.
fn session_keys(
    ikm: &SymmetricKey,
    salt: &[u8],
    info: &[u8],
) -> Result<[SymmetricKey; 5], CryptoError> {
    let okm = crypto::hkdf_sha256(ikm.as_bytes(), salt, info, SESSION_OKM_LEN)?;
    let k = |i: usize| {
        okm.key_at(i * 32)
            .ok_or(CryptoError::KdfLength(SESSION_OKM_LEN))
    };
    Ok([k(0)?, k(1)?, k(2)?, k(3)?, k(4)?])
}

/// Kpersistent = HKDF(transaction IKM, persistent salt, info, 32).
pub fn derive_persistent(
    ikm: &SymmetricKey,
    ctx: &TranscriptContext,
    endpoint_long_term_x: &[u8; 32],
) -> Result<SymmetricKey, CryptoError> {
    crypto::hkdf_key(
        ikm.as_bytes(),
        &ctx.persistent_salt(endpoint_long_term_x),
        &ctx.hkdf_info(),
    )
}

/// The five keys of the FAST derivation, in output order.
#[derive(Debug, Clone)]
pub struct FastKeys {
    pub cryptogram_sk: SymmetricKey,
    pub exchange_sk_reader: SymmetricKey,
    pub exchange_sk_device: SymmetricKey,
    pub ble_ikm: SymmetricKey,
    pub ursk: SymmetricKey,
}

/// HKDF(Kpersistent, FAST salt, info) -> 160 bytes, split in five keys.
pub fn derive_fast(
    k_persistent: &SymmetricKey,
    ctx: &TranscriptContext,
    endpoint_long_term_x: &[u8; 32],
) -> Result<FastKeys, CryptoError> {
    let [cryptogram_sk, exchange_sk_reader, exchange_sk_device, ble_ikm, ursk] = session_keys(
        k_persistent,
        &ctx.fast_salt(endpoint_long_term_x),
        &ctx.hkdf_info(),
    )?;
    Ok(FastKeys {
        cryptogram_sk,
        exchange_sk_reader,
        exchange_sk_device,
        ble_ikm,
        ursk,
    })
}

/// Step-up channel keys (SKReader, SKDevice) from the step-up IKM. Salt is empty, which for
/// HKDF-SHA256 equals 32 zero bytes (the two implementations differ only in spelling).
pub fn derive_step_up(
    step_up_ikm: &SymmetricKey,
) -> Result<(SymmetricKey, SymmetricKey), CryptoError> {
    Ok((
        crypto::hkdf_key(step_up_ikm.as_bytes(), &[], INFO_SK_READER)?,
        crypto::hkdf_key(step_up_ikm.as_bytes(), &[], INFO_SK_DEVICE)?,
    ))
}

/// BLE channel keys (BleSKReader, BleSKDevice) from the BLE IKM with the given salt.
/// aliro-actuator uses supported versions || selected version (e.g. `0100 0100`); kormax uses
/// 32 zero bytes. The salt is a parameter because the two disagree.
pub fn derive_ble(
    ble_ikm: &SymmetricKey,
    salt: &[u8],
) -> Result<(SymmetricKey, SymmetricKey), CryptoError> {
    Ok((
        crypto::hkdf_key(ble_ikm.as_bytes(), salt, INFO_BLE_SK_READER)?,
        crypto::hkdf_key(ble_ikm.as_bytes(), salt, INFO_BLE_SK_DEVICE)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> TranscriptContext {
        TranscriptContext {
            reader_key_x: [0x01; 32],
            reader_identifier: [0x02; 32],
            interface: 0x5E,
            protocol_version: [0x01, 0x00],
            reader_ephemeral_x: [0x03; 32],
            endpoint_ephemeral_x: [0x04; 32],
            transaction_id: [0x05; 16],
            command_parameters: 0x00,
            auth_policy: 0x01,
            fci_proprietary_tlv: vec![0xA5, 0x02, 0x80, 0x00],
            vendor_extension: vec![],
        }
    }

    #[test]
    fn volatile_salt_layout() {
        let s = ctx().volatile_salt();
        let mut expect = vec![0x01; 32];
        expect.extend_from_slice(b"Volatile****");
        expect.extend_from_slice(&[0x02; 32]);
        expect.extend_from_slice(&[0x5E, 0x5C, 0x02, 0x01, 0x00]);
        expect.extend_from_slice(&[0x03; 32]);
        expect.extend_from_slice(&[0x05; 16]);
        expect.extend_from_slice(&[0x00, 0x01, 0xA5, 0x02, 0x80, 0x00]);
        assert_eq!(s, expect);

        let p = ctx().persistent_salt(&[0x09; 32]);
        assert_eq!(&p[32..44], b"Persistent**");
        assert_eq!(&p[44..s.len()], &s[44..]);
        assert_eq!(&p[s.len()..], &[0x09; 32]);
        let f = ctx().fast_salt(&[0x09; 32]);
        assert_eq!(&f[32..44], b"VolatileFast");
    }

    #[test]
    fn info_and_preimage_layout() {
        let mut c = ctx();
        assert_eq!(c.hkdf_info(), vec![0x04; 32]);
        c.vendor_extension = vec![0xEE];
        assert_eq!(c.hkdf_info().len(), 33);
        let p = c.signature_preimage(Signer::Reader);
        assert_eq!(p.len(), 2 + 32 + 2 + 32 + 2 + 32 + 2 + 16 + 2 + 4);
        assert_eq!(&p[..2], &[0x4D, 0x20]);
        assert_eq!(&p[34..36], &[0x86, 0x20]);
        assert_eq!(&p[36..68], &[0x04; 32]);
        assert_eq!(&p[68..70], &[0x87, 0x20]);
        assert_eq!(&p[102..104], &[0x4C, 0x10]);
        assert_eq!(&p[120..], &[0x93, 0x04, 0x41, 0x5D, 0x95, 0x69]);
        let d = c.signature_preimage(Signer::Device);
        assert_eq!(&d[..120], &p[..120]);
        assert_eq!(&d[120..], &[0x93, 0x04, 0x4E, 0x88, 0x7B, 0x4C]);
    }

    #[test]
    fn both_sides_derive_the_same_keys() {
        let reader_eph = crypto::secret_key_from_bytes(&[0x31; 32]).unwrap();
        let ep_eph = crypto::secret_key_from_bytes(&[0x32; 32]).unwrap();
        let tid = [0x07; 16];
        let a = transaction_ikm(&reader_eph, &ep_eph.public_key(), &tid).unwrap();
        let b = transaction_ikm(&ep_eph, &reader_eph.public_key(), &tid).unwrap();
        assert_eq!(a, b);
        let c = transaction_ikm(&ep_eph, &reader_eph.public_key(), &[0x08; 16]).unwrap();
        assert_ne!(a, c);

        let ka = derive_volatile(&a, &ctx()).unwrap();
        // Output split matches one direct HKDF call.
        let okm = crypto::hkdf_sha256(
            a.as_bytes(),
            &ctx().volatile_salt(),
            &ctx().hkdf_info(),
            160,
        )
        .unwrap();
        assert_eq!(ka.exchange_sk_reader.as_bytes(), &okm.as_slice()[..32]);
        assert_eq!(ka.exchange_sk_device.as_bytes(), &okm.as_slice()[32..64]);
        assert_eq!(ka.step_up_ikm.as_bytes(), &okm.as_slice()[64..96]);
        assert_eq!(ka.ble_ikm.as_bytes(), &okm.as_slice()[96..128]);
        assert_eq!(ka.ursk.as_bytes(), &okm.as_slice()[128..160]);

        let mut other = ctx();
        other.interface = 0xC3;
        let kb = derive_volatile(&a, &other).unwrap();
        assert_ne!(ka.exchange_sk_reader, kb.exchange_sk_reader);

        let kp = derive_persistent(&a, &ctx(), &[0x09; 32]).unwrap();
        let fast = derive_fast(&kp, &ctx(), &[0x09; 32]).unwrap();
        assert_ne!(fast.exchange_sk_reader, ka.exchange_sk_reader);
    }

    #[test]
    fn step_up_empty_salt_equals_zero_salt() {
        let ikm = SymmetricKey::from_bytes([0x42; 32]);
        let (r, d) = derive_step_up(&ikm).unwrap();
        assert_eq!(
            r,
            crypto::hkdf_key(&[0x42; 32], &[0u8; 32], b"SKReader").unwrap()
        );
        assert_eq!(
            d,
            crypto::hkdf_key(&[0x42; 32], &[0u8; 32], b"SKDevice").unwrap()
        );
        let (br, bd) = derive_ble(&ikm, &[1, 0, 1, 0]).unwrap();
        assert_ne!(br, bd);
    }
}
