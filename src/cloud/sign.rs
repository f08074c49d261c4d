//! Signatures on down messages: COSE_Sign1 (RFC 9052), ES256 (P-256, SHA-256), by a backend
//! key keyway trusts.
//!
//! An ACL manifest, an ACL delta and a command travel as the CBOR of a COSE_Sign1 whose
//! payload is the message's JSON. The protected header holds `alg` = ES256 (-7) and `kid`
//! (the UTF-8 bytes of the key id configured in `[cloud] trusted_keys`); the external AAD is
//! empty. Several keys may be trusted at once, so a backend can rotate: sign with the new key
//! once every gateway trusts it, then drop the old one from the configuration.
//!
//! TLS protects the link; these signatures are what stop a compromised broker from granting
//! anyone access.

use coset::{
    iana, CborSerializable, CoseSign1, CoseSign1Builder, HeaderBuilder, RegisteredLabelWithPrivate,
};
use p256::ecdsa::signature::{Signer, Verifier};
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};

use super::msg::{Reject, RejectCode};

/// Longest accepted key id, in bytes.
pub const MAX_KID_BYTES: usize = 64;

/// One backend public key keyway trusts.
#[derive(Debug, Clone)]
pub struct TrustedKey {
    pub kid: String,
    pub key: VerifyingKey,
}

/// The set of trusted backend keys (rotation: several at once).
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys(Vec<TrustedKey>);

/// Why a key could not be loaded (configuration and CLI).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key id must be 1..={MAX_KID_BYTES} bytes of A-Z a-z 0-9 . _ -")]
    Kid,
    #[error(
        "public key must be hex of a SEC1 P-256 point (65 bytes uncompressed or 33 compressed)"
    )]
    PublicKey,
    #[error("private key must be 64 hex digits (a P-256 scalar)")]
    PrivateKey,
    #[error("key id {0:?} is listed twice")]
    DuplicateKid(String),
}

/// Checks a key id: short and printable, so it can appear in logs and topics of reports.
pub fn check_kid(kid: &str) -> Result<(), KeyError> {
    let ok = !kid.is_empty()
        && kid.len() <= MAX_KID_BYTES
        && kid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(KeyError::Kid)
    }
}

/// Parses a hex SEC1 P-256 public key.
pub fn parse_public_key(hex_key: &str) -> Result<VerifyingKey, KeyError> {
    let raw = hex::decode(hex_key.trim()).map_err(|_| KeyError::PublicKey)?;
    VerifyingKey::from_sec1_bytes(&raw).map_err(|_| KeyError::PublicKey)
}

impl TrustedKeys {
    /// Builds the set from `(kid, hex public key)` pairs; kids must be unique.
    pub fn from_hex<'a>(
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<TrustedKeys, (usize, KeyError)> {
        let mut keys: Vec<TrustedKey> = Vec::new();
        for (i, (kid, hex_key)) in pairs.into_iter().enumerate() {
            check_kid(kid).map_err(|e| (i, e))?;
            if keys.iter().any(|k| k.kid == kid) {
                return Err((i, KeyError::DuplicateKid(kid.to_owned())));
            }
            let key = parse_public_key(hex_key).map_err(|e| (i, e))?;
            keys.push(TrustedKey {
                kid: kid.to_owned(),
                key,
            });
        }
        Ok(TrustedKeys(keys))
    }

    pub fn new(keys: Vec<TrustedKey>) -> TrustedKeys {
        TrustedKeys(keys)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Verifies a COSE_Sign1 and returns (kid, payload). Rejections: `unsigned` (not a
    /// COSE_Sign1 at all, or one without a signature or payload), `unknown_key` (kid not
    /// trusted), `bad_signature` (wrong algorithm or the signature does not verify).
    pub fn verify(&self, bytes: &[u8]) -> Result<(String, Vec<u8>), Reject> {
        let sign1 = match CoseSign1::from_slice(bytes) {
            Ok(s) => s,
            Err(_) => {
                // Plain JSON where a signed message belongs is the likeliest mistake (or
                // attack): say so rather than "malformed".
                let code = if serde_json::from_slice::<serde_json::Value>(bytes).is_ok() {
                    RejectCode::Unsigned
                } else {
                    RejectCode::Malformed
                };
                return Err(Reject::new(code, "not a COSE_Sign1 message"));
            }
        };
        if sign1.signature.is_empty() {
            return Err(Reject::new(RejectCode::Unsigned, "empty signature"));
        }
        let payload = match sign1.payload.as_ref() {
            Some(p) => p,
            None => return Err(Reject::new(RejectCode::Unsigned, "detached payload")),
        };
        if sign1.protected.header.alg
            != Some(RegisteredLabelWithPrivate::Assigned(iana::Algorithm::ES256))
        {
            return Err(Reject::new(
                RejectCode::BadSignature,
                "protected alg is not ES256",
            ));
        }
        // Only the protected kid counts: an unprotected one could be swapped in transit.
        let kid = String::from_utf8_lossy(&sign1.protected.header.key_id).into_owned();
        let key = match self
            .0
            .iter()
            .find(|k| k.kid.as_bytes() == sign1.protected.header.key_id)
        {
            Some(k) => k,
            None => {
                return Err(Reject::new(
                    RejectCode::UnknownKey,
                    format!("key id {:?} is not trusted", trunc(&kid)),
                ))
            }
        };
        sign1
            .verify_signature(b"", |sig, data| {
                let sig = Signature::from_slice(sig).map_err(|_| ())?;
                key.key.verify(data, &sig).map_err(|_| ())
            })
            .map_err(|_| Reject::new(RejectCode::BadSignature, "signature does not verify"))?;
        Ok((kid, payload.clone()))
    }
}

fn trunc(s: &str) -> String {
    s.chars().take(40).collect()
}

/// A backend signing key (the shipped backend tool and tests).
pub struct BackendSigner {
    pub kid: String,
    key: SigningKey,
}

impl BackendSigner {
    pub fn new(kid: &str, key: SigningKey) -> Result<BackendSigner, KeyError> {
        check_kid(kid)?;
        Ok(BackendSigner {
            kid: kid.to_owned(),
            key,
        })
    }

    /// From 64 hex digits (the key file `keyway cloud keygen` writes).
    pub fn from_hex(kid: &str, hex_scalar: &str) -> Result<BackendSigner, KeyError> {
        let raw = zeroize::Zeroizing::new(
            hex::decode(hex_scalar.trim()).map_err(|_| KeyError::PrivateKey)?,
        );
        let key = SigningKey::from_slice(&raw).map_err(|_| KeyError::PrivateKey)?;
        BackendSigner::new(kid, key)
    }

    /// The public key, hex SEC1 uncompressed (what goes in `[cloud] trusted_keys`).
    pub fn public_hex(&self) -> String {
        hex::encode(self.key.verifying_key().to_encoded_point(false).as_bytes())
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        *self.key.verifying_key()
    }

    /// Signs `payload` (the JSON) into a COSE_Sign1.
    pub fn sign(&self, payload: &[u8]) -> Vec<u8> {
        let sign1 = CoseSign1Builder::new()
            .protected(
                HeaderBuilder::new()
                    .algorithm(iana::Algorithm::ES256)
                    .key_id(self.kid.as_bytes().to_vec())
                    .build(),
            )
            .payload(payload.to_vec())
            .create_signature(b"", |data| {
                let sig: Signature = self.key.sign(data);
                sig.to_bytes().to_vec()
            })
            .build();
        // Serialising a COSE_Sign1 we just built cannot fail (no I/O, well-formed values).
        sign1.to_vec().unwrap_or_default()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn signer(seed: u8, kid: &str) -> BackendSigner {
        let mut scalar = [0u8; 32];
        scalar[0] = 1;
        scalar[31] = seed;
        BackendSigner::from_hex(kid, &hex::encode(scalar)).unwrap()
    }

    pub(crate) fn trusted(signers: &[&BackendSigner]) -> TrustedKeys {
        TrustedKeys::new(
            signers
                .iter()
                .map(|s| TrustedKey {
                    kid: s.kid.clone(),
                    key: s.verifying_key(),
                })
                .collect(),
        )
    }

    #[test]
    fn signed_payload_verifies_with_either_rotated_key() {
        let old = signer(1, "2026-a");
        let new = signer(2, "2026-b");
        let keys = trusted(&[&old, &new]);
        for s in [&old, &new] {
            let (kid, payload) = keys.verify(&s.sign(b"{\"x\":1}")).unwrap();
            assert_eq!(
                (kid.as_str(), payload.as_slice()),
                (s.kid.as_str(), &b"{\"x\":1}"[..])
            );
        }
    }

    #[test]
    fn rejections_have_their_codes() {
        let good = signer(1, "k1");
        let keys = trusted(&[&good]);
        let code = |b: &[u8]| keys.verify(b).unwrap_err().code;
        assert_eq!(code(b"{\"type\":\"acl_delta\"}"), RejectCode::Unsigned);
        assert_eq!(code(b"\xff\x00garbage"), RejectCode::Malformed);
        assert_eq!(code(b""), RejectCode::Malformed);
        // Unknown kid.
        assert_eq!(
            code(&signer(3, "other").sign(b"{}")),
            RejectCode::UnknownKey
        );
        // Right kid, wrong key (an attacker reusing a trusted kid).
        assert_eq!(code(&signer(3, "k1").sign(b"{}")), RejectCode::BadSignature);
        // Payload changed after signing.
        let mut s = CoseSign1::from_slice(&good.sign(b"{\"a\":1}")).unwrap();
        s.payload = Some(b"{\"a\":2}".to_vec());
        assert_eq!(code(&s.clone().to_vec().unwrap()), RejectCode::BadSignature);
        // No signature / no payload.
        let mut s2 = s.clone();
        s2.signature.clear();
        assert_eq!(code(&s2.to_vec().unwrap()), RejectCode::Unsigned);
        let mut s3 = s.clone();
        s3.payload = None;
        assert_eq!(code(&s3.to_vec().unwrap()), RejectCode::Unsigned);
        // Another algorithm in the protected header.
        let s4 = CoseSign1Builder::new()
            .protected(
                HeaderBuilder::new()
                    .algorithm(iana::Algorithm::EdDSA)
                    .key_id(b"k1".to_vec())
                    .build(),
            )
            .payload(b"{}".to_vec())
            .signature(vec![0; 64])
            .build();
        assert_eq!(code(&s4.to_vec().unwrap()), RejectCode::BadSignature);
        // A trusted kid only in the unprotected header does not count.
        let s5 = CoseSign1Builder::new()
            .protected(
                HeaderBuilder::new()
                    .algorithm(iana::Algorithm::ES256)
                    .build(),
            )
            .unprotected(HeaderBuilder::new().key_id(b"k1".to_vec()).build())
            .payload(b"{}".to_vec())
            .create_signature(b"", |d| {
                let sig: Signature = good.key.sign(d);
                sig.to_bytes().to_vec()
            })
            .build();
        assert_eq!(code(&s5.to_vec().unwrap()), RejectCode::UnknownKey);
    }

    #[test]
    fn key_loading_checks_kids_and_points() {
        let s = signer(1, "k1");
        let pk = s.public_hex();
        assert!(TrustedKeys::from_hex([("k1", pk.as_str())]).is_ok());
        assert_eq!(
            TrustedKeys::from_hex([("k1", pk.as_str()), ("k1", pk.as_str())]).unwrap_err(),
            (1, KeyError::DuplicateKid("k1".into()))
        );
        assert_eq!(
            TrustedKeys::from_hex([("bad kid", pk.as_str())]).unwrap_err(),
            (0, KeyError::Kid)
        );
        assert_eq!(
            TrustedKeys::from_hex([("k1", "04abcd")]).unwrap_err(),
            (0, KeyError::PublicKey)
        );
        assert!(BackendSigner::from_hex("k", "00").is_err());
    }
}
