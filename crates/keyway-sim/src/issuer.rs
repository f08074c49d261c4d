//! Test peer: an Access Document issuer. Builds the mdoc DeviceResponse a phone returns in
//! step-up (docType/namespace `aliro-a`, one AccessData element, MSO signed with COSE_Sign1
//! ES256 and bound to the endpoint key), the layout of the reference vectors.

use ciborium::value::Value;
use coset::{iana, AsCborValue, CoseSign1Builder, HeaderBuilder};
use p256::{PublicKey, SecretKey};
use sha2::{Digest, Sha256};

use keyway::aliro::crypto;
use keyway::aliro::document::{issuer_key_id, DocumentError, ACCESS_DOC_TYPE};

/// What to put in the document.
#[derive(Debug, Clone)]
pub struct AccessDocumentSpec {
    /// Element identifier (e.g. `floor1`).
    pub element: String,
    /// AccessData id (element value `{"0": 1, "1": id}`).
    pub access_id: Vec<u8>,
    /// RFC 3339 times.
    pub signed: String,
    pub valid_from: String,
    pub valid_until: String,
    /// Random bytes of the IssuerSignedItem (salt of its digest).
    pub random: [u8; 16],
}

fn t(s: &str) -> Value {
    Value::Text(s.to_owned())
}

fn enc(v: &Value) -> Result<Vec<u8>, DocumentError> {
    let mut out = Vec::new();
    ciborium::ser::into_writer(v, &mut out).map_err(|e| DocumentError::Cbor(e.to_string()))?;
    Ok(out)
}

fn tag24(bytes: Vec<u8>) -> Value {
    Value::Tag(24, Box::new(Value::Bytes(bytes)))
}

fn tdate(s: &str) -> Value {
    Value::Tag(0, Box::new(t(s)))
}

/// A DeviceResponse carrying one Access Document for `endpoint`, signed by `issuer`.
pub fn issue_access_document(
    issuer: &SecretKey,
    endpoint: &PublicKey,
    spec: &AccessDocumentSpec,
) -> Result<Vec<u8>, DocumentError> {
    let item = Value::Map(vec![
        (t("1"), Value::Integer(1.into())),
        (t("2"), Value::Bytes(spec.random.to_vec())),
        (t("3"), t(&spec.element)),
        (
            t("4"),
            Value::Map(vec![
                (t("0"), Value::Integer(1.into())),
                (t("1"), Value::Bytes(spec.access_id.clone())),
            ]),
        ),
    ]);
    let item = tag24(enc(&item)?);
    let digest = Sha256::digest(enc(&item)?).to_vec();
    let point = crypto::public_key_sec1(endpoint);
    let device_key = Value::Map(vec![
        (Value::Integer(1.into()), Value::Integer(2.into())),
        (Value::Integer((-1).into()), Value::Integer(1.into())),
        (
            Value::Integer((-2).into()),
            Value::Bytes(point[1..33].to_vec()),
        ),
        (
            Value::Integer((-3).into()),
            Value::Bytes(point[33..65].to_vec()),
        ),
    ]);
    let mso = Value::Map(vec![
        (t("1"), t("1.0")),
        (t("2"), t("SHA-256")),
        (
            t("3"),
            Value::Map(vec![(
                t(ACCESS_DOC_TYPE),
                Value::Map(vec![(Value::Integer(1.into()), Value::Bytes(digest))]),
            )]),
        ),
        (t("4"), Value::Map(vec![(t("1"), device_key)])),
        (t("5"), t(ACCESS_DOC_TYPE)),
        (
            t("6"),
            Value::Map(vec![
                (t("1"), tdate(&spec.signed)),
                (t("2"), tdate(&spec.valid_from)),
                (t("3"), tdate(&spec.valid_until)),
            ]),
        ),
        (t("7"), Value::Bool(false)),
    ]);
    let payload = enc(&tag24(enc(&mso)?))?;
    let sign1 = CoseSign1Builder::new()
        .protected(
            HeaderBuilder::new()
                .algorithm(iana::Algorithm::ES256)
                .build(),
        )
        .unprotected(
            HeaderBuilder::new()
                .key_id(issuer_key_id(&issuer.public_key()).to_vec())
                .build(),
        )
        .payload(payload)
        .create_signature(b"", |data| crypto::sign(issuer, data).to_vec())
        .build();
    let issuer_auth = sign1
        .to_cbor_value()
        .map_err(|e| DocumentError::Cbor(e.to_string()))?;
    let doc = Value::Map(vec![
        (
            t("1"),
            Value::Map(vec![
                (
                    t("1"),
                    Value::Map(vec![(t(ACCESS_DOC_TYPE), Value::Array(vec![item]))]),
                ),
                (t("2"), issuer_auth),
            ]),
        ),
        (t("5"), t(ACCESS_DOC_TYPE)),
    ]);
    enc(&Value::Map(vec![
        (t("1"), t("1.0")),
        (t("2"), Value::Array(vec![doc])),
        (t("3"), Value::Integer(0.into())),
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyway::aliro::document::verify_access_document;

    fn spec() -> AccessDocumentSpec {
        AccessDocumentSpec {
            element: "floor1".into(),
            access_id: vec![1, 2, 3, 4],
            signed: "2026-01-01T00:00:00Z".into(),
            valid_from: "2026-01-01T00:00:00Z".into(),
            valid_until: "2030-01-01T00:00:00Z".into(),
            random: [5; 16],
        }
    }

    #[test]
    fn issued_document_verifies_only_for_its_endpoint_and_issuer() {
        let issuer = SecretKey::from_slice(&[0x21; 32]).unwrap();
        let phone = SecretKey::from_slice(&[0x22; 32]).unwrap();
        let doc = issue_access_document(&issuer, &phone.public_key(), &spec()).unwrap();
        let ep = crypto::public_key_sec1(&phone.public_key());
        let now = 1_800_000_000; // 2027
        let d = verify_access_document(&doc, &[issuer.public_key()], &ep, now).unwrap();
        assert_eq!(d.elements.len(), 1);
        assert_eq!(d.elements[0].identifier, "floor1");
        let other = SecretKey::from_slice(&[0x23; 32]).unwrap();
        assert!(verify_access_document(&doc, &[other.public_key()], &ep, now).is_err());
        let other_ep = crypto::public_key_sec1(&other.public_key());
        assert_eq!(
            verify_access_document(&doc, &[issuer.public_key()], &other_ep, now),
            Err(DocumentError::WrongDeviceKey)
        );
        assert_eq!(
            verify_access_document(&doc, &[issuer.public_key()], &ep, 1_950_000_000),
            Err(DocumentError::NotValidNow)
        );
    }
}
