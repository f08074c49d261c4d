//! Cryptographic primitives of the Aliro access protocol, shared by the reader core and the
//! endpoint emulator: P-256 ECDH (X coordinate), ANSI X9.63 KDF and HKDF with SHA-256,
//! ECDSA-P256-SHA256 with raw `r||s` signatures (RFC 6979 deterministic nonces), and the
//! AES-256-GCM secure channel with Aliro's IV rule.
//!
//! Secret values live in [`SymmetricKey`] / [`SecretBytes`], which zeroize on drop and print
//! `<redacted>` in Debug output, so they cannot leak through logs.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use p256::ecdsa::signature::{Signer, Verifier};
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use p256::elliptic_curve::sec1::ToEncodedPoint;
use p256::{PublicKey, SecretKey};
use sha2::{Digest, Sha256};
use thiserror::Error;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// Length of an uncompressed SEC1 P-256 public key (`04 || X || Y`).
pub const PUBLIC_KEY_LEN: usize = 65;
/// Length of a raw `r || s` P-256 signature.
pub const SIGNATURE_LEN: usize = 64;
/// AES-GCM tag length appended to every ciphertext.
pub const GCM_TAG_LEN: usize = 16;
/// Largest HKDF / X9.63 output this module produces (the Aliro key schedule needs 160).
pub const MAX_KDF_OUTPUT: usize = 1024;

/// Why a cryptographic operation failed. Messages never include key material.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CryptoError {
    /// Bytes that are not a valid P-256 point (or not uncompressed SEC1).
    #[error("invalid P-256 public key")]
    InvalidPublicKey,
    /// A scalar that is not a valid P-256 private key.
    #[error("invalid P-256 private key")]
    InvalidPrivateKey,
    /// A signature of the wrong length or with out-of-range r/s.
    #[error("malformed ECDSA signature")]
    MalformedSignature,
    /// A well-formed signature that does not verify.
    #[error("ECDSA signature does not verify")]
    BadSignature,
    /// AES-GCM authentication failed (wrong key, counter or tampered data).
    #[error("AES-GCM authentication failed")]
    Decrypt,
    /// AES-GCM encryption failed (input too long).
    #[error("AES-GCM encryption failed")]
    Encrypt,
    /// A KDF asked for more output than allowed.
    #[error("KDF output length {0} not supported")]
    KdfLength(usize),
    /// The per-direction message counter is exhausted.
    #[error("secure channel counter exhausted")]
    CounterExhausted,
}

/// A 32-byte symmetric key (AES-256 key, HKDF input key material, Kpersistent, ...).
#[derive(Clone)]
pub struct SymmetricKey([u8; 32]);

impl PartialEq for SymmetricKey {
    /// Constant-time comparison: key equality must not leak where two keys first differ.
    fn eq(&self, other: &Self) -> bool {
        self.0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

impl Eq for SymmetricKey {}

impl Drop for SymmetricKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl ZeroizeOnDrop for SymmetricKey {}

impl SymmetricKey {
    /// Wraps raw key bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Copies a key from a slice that must be exactly 32 bytes long.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let arr: [u8; 32] = bytes.try_into().ok()?;
        Some(Self(arr))
    }

    /// The raw key bytes (for feeding into the next KDF or cipher; never log them).
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl std::fmt::Debug for SymmetricKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SymmetricKey(<redacted>)")
    }
}

/// Variable-length secret bytes (KDF output before it is split); zeroized on drop.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretBytes(Vec<u8>);

impl Drop for SecretBytes {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl ZeroizeOnDrop for SecretBytes {}

impl SecretBytes {
    /// The secret bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.0
    }

    /// Copies the 32 bytes at `offset` into a key (None if out of range).
    pub fn key_at(&self, offset: usize) -> Option<SymmetricKey> {
        let end = offset.checked_add(32)?;
        SymmetricKey::from_slice(self.0.get(offset..end)?)
    }
}

impl std::fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretBytes(<{} bytes redacted>)", self.0.len())
    }
}

/// Parses an uncompressed SEC1 P-256 public key (65 bytes, `04 || X || Y`).
pub fn public_key_from_sec1(bytes: &[u8]) -> Result<PublicKey, CryptoError> {
    if bytes.len() != PUBLIC_KEY_LEN || bytes.first() != Some(&0x04) {
        return Err(CryptoError::InvalidPublicKey);
    }
    PublicKey::from_sec1_bytes(bytes).map_err(|_| CryptoError::InvalidPublicKey)
}

/// Parses a 32-byte big-endian P-256 private scalar.
pub fn secret_key_from_bytes(bytes: &[u8]) -> Result<SecretKey, CryptoError> {
    if bytes.len() != 32 {
        return Err(CryptoError::InvalidPrivateKey);
    }
    SecretKey::from_slice(bytes).map_err(|_| CryptoError::InvalidPrivateKey)
}

/// The uncompressed SEC1 encoding (`04 || X || Y`) of a public key.
pub fn public_key_sec1(key: &PublicKey) -> [u8; PUBLIC_KEY_LEN] {
    let point = key.to_encoded_point(false);
    let mut out = [0u8; PUBLIC_KEY_LEN];
    // An uncompressed point of a valid PublicKey is always 65 bytes.
    out.copy_from_slice(point.as_bytes());
    out
}

/// The X coordinate of a public key (32 bytes), as it enters Aliro preimages and salts.
pub fn public_key_x(key: &PublicKey) -> [u8; 32] {
    let sec1 = public_key_sec1(key);
    let mut x = [0u8; 32];
    x.copy_from_slice(&sec1[1..33]);
    x
}

/// ECDH on P-256; returns the shared secret's X coordinate (Z), zeroized on drop.
pub fn ecdh_x(own: &SecretKey, peer: &PublicKey) -> SymmetricKey {
    let shared = p256::ecdh::diffie_hellman(own.to_nonzero_scalar(), peer.as_affine());
    let mut z = [0u8; 32];
    z.copy_from_slice(shared.raw_secret_bytes());
    let key = SymmetricKey(z);
    z.zeroize();
    key
}

/// ANSI X9.63 KDF with SHA-256: `Hash(Z || counter_be32 || SharedInfo)` for counter = 1, 2, ...
pub fn x963_kdf_sha256(
    z: &[u8],
    shared_info: &[u8],
    out_len: usize,
) -> Result<SecretBytes, CryptoError> {
    if out_len == 0 || out_len > MAX_KDF_OUTPUT {
        return Err(CryptoError::KdfLength(out_len));
    }
    let mut out = Vec::with_capacity(out_len + 32);
    let mut counter: u32 = 1;
    while out.len() < out_len {
        let mut h = Sha256::new();
        h.update(z);
        h.update(counter.to_be_bytes());
        h.update(shared_info);
        let block = Zeroizing::new(h.finalize());
        out.extend_from_slice(&block);
        counter = counter
            .checked_add(1)
            .ok_or(CryptoError::KdfLength(out_len))?;
    }
    out.truncate(out_len);
    Ok(SecretBytes(out))
}

/// HKDF-SHA256 (extract and expand) to `out_len` bytes.
pub fn hkdf_sha256(
    ikm: &[u8],
    salt: &[u8],
    info: &[u8],
    out_len: usize,
) -> Result<SecretBytes, CryptoError> {
    if out_len == 0 || out_len > MAX_KDF_OUTPUT {
        return Err(CryptoError::KdfLength(out_len));
    }
    let hk = hkdf::Hkdf::<Sha256>::new(Some(salt), ikm);
    let mut out = vec![0u8; out_len];
    hk.expand(info, &mut out)
        .map_err(|_| CryptoError::KdfLength(out_len))?;
    Ok(SecretBytes(out))
}

/// HKDF-SHA256 to exactly one 32-byte key.
pub fn hkdf_key(ikm: &[u8], salt: &[u8], info: &[u8]) -> Result<SymmetricKey, CryptoError> {
    hkdf_sha256(ikm, salt, info, 32)?
        .key_at(0)
        .ok_or(CryptoError::KdfLength(32))
}

/// ECDSA-P256-SHA256 over `msg` with an RFC 6979 deterministic nonce; raw `r || s`.
pub fn sign(key: &SecretKey, msg: &[u8]) -> [u8; SIGNATURE_LEN] {
    let signing = SigningKey::from(key);
    let sig: Signature = signing.sign(msg);
    let mut out = [0u8; SIGNATURE_LEN];
    out.copy_from_slice(&sig.to_bytes());
    out
}

/// Verifies a raw `r || s` ECDSA-P256-SHA256 signature over `msg`.
pub fn verify(key: &PublicKey, msg: &[u8], sig: &[u8]) -> Result<(), CryptoError> {
    if sig.len() != SIGNATURE_LEN {
        return Err(CryptoError::MalformedSignature);
    }
    let sig = Signature::from_slice(sig).map_err(|_| CryptoError::MalformedSignature)?;
    VerifyingKey::from(key)
        .verify(msg, &sig)
        .map_err(|_| CryptoError::BadSignature)
}

/// Direction field of the Aliro GCM IV (first 8 bytes, big-endian).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Reader -> endpoint: direction `0000000000000000`, key SKReader.
    ReaderToEndpoint,
    /// Endpoint -> reader: direction `0000000000000001`, key SKDevice.
    EndpointToReader,
}

impl Direction {
    fn value(self) -> u64 {
        match self {
            Direction::ReaderToEndpoint => 0,
            Direction::EndpointToReader => 1,
        }
    }
}

/// The Aliro IV: 8-byte direction || 4-byte big-endian counter.
pub fn aliro_iv(direction: Direction, counter: u32) -> [u8; 12] {
    let mut iv = [0u8; 12];
    iv[..8].copy_from_slice(&direction.value().to_be_bytes());
    iv[8..].copy_from_slice(&counter.to_be_bytes());
    iv
}

/// AES-256-GCM encryption; returns ciphertext || 16-byte tag.
pub fn gcm_seal(
    key: &SymmetricKey,
    iv: &[u8; 12],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let cipher = Aes256Gcm::new(key.as_bytes().into());
    cipher
        .encrypt(
            &Nonce::from(*iv),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .map_err(|_| CryptoError::Encrypt)
}

/// AES-256-GCM decryption of ciphertext || tag; fails on any authentication error.
pub fn gcm_open(
    key: &SymmetricKey,
    iv: &[u8; 12],
    aad: &[u8],
    ciphertext_and_tag: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    if ciphertext_and_tag.len() < GCM_TAG_LEN {
        return Err(CryptoError::Decrypt);
    }
    let cipher = Aes256Gcm::new(key.as_bytes().into());
    cipher
        .decrypt(
            &Nonce::from(*iv),
            Payload {
                msg: ciphertext_and_tag,
                aad,
            },
        )
        .map_err(|_| CryptoError::Decrypt)
}

/// Which side of the secure channel this object is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Reader,
    Endpoint,
}

/// One Aliro secure channel (expedited, step-up or BLE): two keys and one counter per
/// direction, each counter starting at 1 and advancing after every successful operation.
///
/// The reader seals with SKReader (direction 0) and opens with SKDevice (direction 1); the
/// endpoint does the reverse. Every `open` consumes one inbound counter value, even when it
/// fails: after a tampered AUTH1 response the reader must still read the endpoint's next
/// message at counter 2 (as the endpoint sent it).
pub struct SecureChannel {
    role: Role,
    sk_reader: SymmetricKey,
    sk_device: SymmetricKey,
    reader_counter: u32,
    device_counter: u32,
}

impl std::fmt::Debug for SecureChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecureChannel")
            .field("role", &self.role)
            .field("keys", &"<redacted>")
            .field("reader_counter", &self.reader_counter)
            .field("device_counter", &self.device_counter)
            .finish()
    }
}

impl SecureChannel {
    /// A fresh channel for `role`, both counters at 1.
    pub fn new(role: Role, sk_reader: SymmetricKey, sk_device: SymmetricKey) -> Self {
        Self {
            role,
            sk_reader,
            sk_device,
            reader_counter: 1,
            device_counter: 1,
        }
    }

    fn outbound(&self) -> Direction {
        match self.role {
            Role::Reader => Direction::ReaderToEndpoint,
            Role::Endpoint => Direction::EndpointToReader,
        }
    }

    fn inbound(&self) -> Direction {
        match self.role {
            Role::Reader => Direction::EndpointToReader,
            Role::Endpoint => Direction::ReaderToEndpoint,
        }
    }

    fn key_and_counter(&mut self, dir: Direction) -> (&SymmetricKey, &mut u32) {
        match dir {
            Direction::ReaderToEndpoint => (&self.sk_reader, &mut self.reader_counter),
            Direction::EndpointToReader => (&self.sk_device, &mut self.device_counter),
        }
    }

    /// Counter the next outbound message will use.
    pub fn next_send_counter(&self) -> u32 {
        match self.outbound() {
            Direction::ReaderToEndpoint => self.reader_counter,
            Direction::EndpointToReader => self.device_counter,
        }
    }

    /// Counter the next inbound message must use.
    pub fn next_receive_counter(&self) -> u32 {
        match self.inbound() {
            Direction::ReaderToEndpoint => self.reader_counter,
            Direction::EndpointToReader => self.device_counter,
        }
    }

    /// Encrypts an outbound message with additional data (BLE uses AAD; APDUs use none).
    pub fn seal_with_aad(&mut self, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let dir = self.outbound();
        let (key, counter) = self.key_and_counter(dir);
        let next = counter
            .checked_add(1)
            .ok_or(CryptoError::CounterExhausted)?;
        let out = gcm_seal(key, &aliro_iv(dir, *counter), aad, plaintext)?;
        *counter = next;
        Ok(out)
    }

    /// Decrypts an inbound message with additional data.
    pub fn open_with_aad(&mut self, aad: &[u8], ciphertext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let dir = self.inbound();
        let (key, counter) = self.key_and_counter(dir);
        let next = counter
            .checked_add(1)
            .ok_or(CryptoError::CounterExhausted)?;
        let out = gcm_open(key, &aliro_iv(dir, *counter), aad, ciphertext);
        // The peer consumed this counter value whether or not its message survived transit,
        // so the next message from it uses the next value (and a counter is never retried).
        *counter = next;
        out
    }

    /// Encrypts an outbound APDU payload (no AAD).
    pub fn seal(&mut self, plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        self.seal_with_aad(&[], plaintext)
    }

    /// Decrypts an inbound APDU payload (no AAD).
    pub fn open(&mut self, ciphertext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        self.open_with_aad(&[], ciphertext)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(s: &str) -> Vec<u8> {
        hex::decode(s).unwrap()
    }

    #[test]
    fn hkdf_rfc5869_case1() {
        // RFC 5869 appendix A.1.
        let okm = hkdf_sha256(
            &h("0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b"),
            &h("000102030405060708090a0b0c"),
            &h("f0f1f2f3f4f5f6f7f8f9"),
            42,
        )
        .unwrap();
        assert_eq!(
            okm.as_slice(),
            &h("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865")[..]
        );
        assert!(hkdf_sha256(b"k", b"", b"", 0).is_err());
        assert!(hkdf_sha256(b"k", b"", b"", MAX_KDF_OUTPUT + 1).is_err());
    }

    #[test]
    fn x963_matches_definition() {
        // Independent computation of the definition with sha2 directly, two blocks.
        let z = [7u8; 32];
        let info = b"shared";
        let out = x963_kdf_sha256(&z, info, 40).unwrap();
        let mut b1 = Sha256::new();
        b1.update(z);
        b1.update([0, 0, 0, 1]);
        b1.update(info);
        let mut b2 = Sha256::new();
        b2.update(z);
        b2.update([0, 0, 0, 2]);
        b2.update(info);
        let mut expect = b1.finalize().to_vec();
        expect.extend_from_slice(&b2.finalize()[..8]);
        assert_eq!(out.as_slice(), &expect[..]);
    }

    #[test]
    fn x963_known_answer() {
        // NIST CAVS ansx963_2001 SHA-256 test (192-bit shared secret, no SharedInfo, 128-bit key).
        let z = h("96c05619d56c328ab95fe84b18264b08725b85e33fd34f08");
        let out = x963_kdf_sha256(&z, &[], 16).unwrap();
        assert_eq!(out.as_slice(), &h("443024c3dae66b95e6f5670601558f71")[..]);
    }

    #[test]
    fn ecdsa_rfc6979_p256_sha256_sample() {
        // RFC 6979 A.2.5, P-256, SHA-256, message "sample".
        let sk = secret_key_from_bytes(&h(
            "C9AFA9D845BA75166B5C215767B1D6934E50C3DB36E89B127B8A622B120F6721",
        ))
        .unwrap();
        let sig = sign(&sk, b"sample");
        assert_eq!(
            sig.to_vec(),
            h("EFD48B2AACB6A8FD1140DD9CD45E81D69D2C877B56AAF991C34D0EA84EAF3716F7CB1C942D657C41D436C7A1B6E29F65F3E900DBB9AFF4064DC4AB2F843ACDA8")
        );
        let pk = sk.public_key();
        verify(&pk, b"sample", &sig).unwrap();
        assert_eq!(verify(&pk, b"sampl3", &sig), Err(CryptoError::BadSignature));
        assert_eq!(
            verify(&pk, b"sample", &sig[..63]),
            Err(CryptoError::MalformedSignature)
        );
        assert_eq!(
            verify(&pk, b"sample", &[0u8; 64]),
            Err(CryptoError::MalformedSignature)
        );
    }

    #[test]
    fn ecdh_is_symmetric_and_keys_parse() {
        let a = secret_key_from_bytes(&[0x11; 32]).unwrap();
        let b = secret_key_from_bytes(&[0x22; 32]).unwrap();
        let za = ecdh_x(&a, &b.public_key());
        let zb = ecdh_x(&b, &a.public_key());
        assert_eq!(za, zb);
        let sec1 = public_key_sec1(&a.public_key());
        assert_eq!(sec1[0], 0x04);
        assert_eq!(public_key_from_sec1(&sec1).unwrap(), a.public_key());
        assert_eq!(&public_key_x(&a.public_key())[..], &sec1[1..33]);
        assert!(public_key_from_sec1(&sec1[..64]).is_err());
        let mut bad = sec1;
        bad[64] ^= 1;
        assert!(public_key_from_sec1(&bad).is_err());
        assert!(secret_key_from_bytes(&[0u8; 32]).is_err());
        assert!(secret_key_from_bytes(&[1u8; 31]).is_err());
    }

    #[test]
    fn gcm_known_answer() {
        // NIST GCM test case 14 (AES-256, zero key, zero IV, one zero block).
        let key = SymmetricKey::from_bytes([0u8; 32]);
        let ct = gcm_seal(&key, &[0u8; 12], &[], &[0u8; 16]).unwrap();
        assert_eq!(
            ct,
            h("cea7403d4d606b6e074ec5d3baf39d18d0d1c8a799996bf0265b98b5d48ab919")
        );
        assert_eq!(gcm_open(&key, &[0u8; 12], &[], &ct).unwrap(), vec![0u8; 16]);
        assert_eq!(
            gcm_open(&key, &[0u8; 12], &[], &ct[..15]),
            Err(CryptoError::Decrypt)
        );
    }

    #[test]
    fn iv_layout() {
        assert_eq!(
            aliro_iv(Direction::ReaderToEndpoint, 1).to_vec(),
            h("000000000000000000000001")
        );
        assert_eq!(
            aliro_iv(Direction::EndpointToReader, 0x0102_0304).to_vec(),
            h("000000000000000101020304")
        );
    }

    #[test]
    fn channel_round_trip_counters_and_replay() {
        let skr = SymmetricKey::from_bytes([1; 32]);
        let skd = SymmetricKey::from_bytes([2; 32]);
        let mut reader = SecureChannel::new(Role::Reader, skr.clone(), skd.clone());
        let mut ep = SecureChannel::new(Role::Endpoint, skr.clone(), skd.clone());

        let c1 = reader.seal(b"hello").unwrap();
        // Uses SKReader, direction 0, counter 1.
        assert_eq!(
            c1,
            gcm_seal(
                &skr,
                &aliro_iv(Direction::ReaderToEndpoint, 1),
                &[],
                b"hello"
            )
            .unwrap()
        );
        assert_eq!(ep.open(&c1).unwrap(), b"hello");
        // Replay of the same ciphertext fails: the endpoint now expects counter 2.
        assert_eq!(ep.open(&c1), Err(CryptoError::Decrypt));
        assert_eq!(ep.next_receive_counter(), 3);

        let r1 = ep.seal(b"world").unwrap();
        assert_eq!(
            r1,
            gcm_seal(
                &skd,
                &aliro_iv(Direction::EndpointToReader, 1),
                &[],
                b"world"
            )
            .unwrap()
        );
        assert_eq!(reader.open(&r1).unwrap(), b"world");
        let mut tampered = ep.seal(b"again").unwrap();
        tampered[0] ^= 1;
        assert_eq!(reader.open(&tampered), Err(CryptoError::Decrypt));
        // The failed message still consumed counter 2; the next one is read at counter 3.
        assert_eq!(reader.next_receive_counter(), 3);
        let r3 = ep.seal(b"third").unwrap();
        assert_eq!(reader.open(&r3).unwrap(), b"third");
        assert_eq!(reader.next_send_counter(), 2);
    }

    #[test]
    fn debug_is_redacted() {
        let k = SymmetricKey::from_bytes([0xAB; 32]);
        let s = format!("{k:?}");
        assert!(!s.to_lowercase().contains("ab, ") && !s.contains("171"));
        let ch = SecureChannel::new(Role::Reader, k.clone(), k);
        let s = format!("{ch:?}");
        assert!(s.contains("redacted") && !s.contains("171"));
        let sb = hkdf_sha256(b"ikm", b"", b"", 32).unwrap();
        assert!(format!("{sb:?}").contains("redacted"));
    }
}
