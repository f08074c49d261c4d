//! Aliro step-up: the Access Document, an ISO/IEC 18013-5 mdoc. Sans-IO and pure.
//!
//! - [`device_request`] builds the DeviceRequest the reader ENVELOPEs.
//! - [`session_data`] / [`session_data_payload`]: the CBOR `{"data": bstr}` wrapper of the
//!   ENVELOPE payloads (inside TLV 53).
//! - [`verify_access_document`] checks a DeviceResponse against trusted issuer keys: docType,
//!   issuer key id, the COSE_Sign1 ES256 issuer signature (`coset`), the MSO (version, digest
//!   algorithm, docType), every returned element's digest, the device key (must be the
//!   endpoint key that just authenticated) and the validity window; and returns the elements.
//!
//! Maps use text labels ("1", "2", ...) as both reference implementations do (vectors README);
//! CBOR is parsed with `ciborium`, never by hand. Everything here is untrusted input: sizes are
//! bounded by the reader's response limit, and every shape mismatch is an error.

use ciborium::value::Value;
use coset::{AsCborValue, CoseSign1};
use p256::ecdsa::signature::Verifier;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::PublicKey;
use sha2::{Digest, Sha256};

/// docType and namespace of an Aliro Access Document.
pub const ACCESS_DOC_TYPE: &str = "aliro-a";
/// CBOR tag of embedded CBOR (RFC 8949 §3.4.5.1).
const TAG_ENCODED_CBOR: u64 = 24;
/// Most documents / elements looked at in one response.
const MAX_ITEMS: usize = 64;

/// Why an Access Document was refused. No key material in messages.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DocumentError {
    #[error("CBOR: {0}")]
    Cbor(String),
    #[error("malformed document: {0}")]
    Malformed(&'static str),
    #[error("no {ACCESS_DOC_TYPE} document in the response")]
    NoDocument,
    #[error("issuer key id matches no trusted issuer key")]
    UnknownIssuer,
    #[error("issuer signature does not verify")]
    BadSignature,
    #[error("digest of element {0} does not match the signed MSO")]
    DigestMismatch(String),
    #[error("the document is bound to another device key than the authenticated endpoint")]
    WrongDeviceKey,
    #[error("document not valid at this time")]
    NotValidNow,
}

/// A verified element of the Access Document.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessElement {
    pub namespace: String,
    pub identifier: String,
    /// The element value (e.g. AccessData `{"0": version, "1": id}`), for the access rules.
    pub value: Value,
}

/// A verified Access Document.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessDocument {
    pub doc_type: String,
    /// Unix seconds.
    pub valid_from: i64,
    /// Unix seconds.
    pub valid_until: i64,
    pub elements: Vec<AccessElement>,
}

fn cbor_bytes(v: &Value) -> Result<Vec<u8>, DocumentError> {
    let mut out = Vec::new();
    ciborium::ser::into_writer(v, &mut out).map_err(|e| DocumentError::Cbor(e.to_string()))?;
    Ok(out)
}

fn parse(bytes: &[u8]) -> Result<Value, DocumentError> {
    ciborium::de::from_reader(bytes).map_err(|e| DocumentError::Cbor(e.to_string()))
}

fn text(s: &str) -> Value {
    Value::Text(s.to_owned())
}

/// DeviceRequest `{"1": "1.0", "2": [{"1": 24(<< {"1": {ns: {id: intent_to_retain}},
/// "5": doc_type} >>)}]}`.
pub fn device_request(
    doc_type: &str,
    namespace: &str,
    elements: &[(&str, bool)],
) -> Result<Vec<u8>, DocumentError> {
    let wanted = Value::Map(
        elements
            .iter()
            .map(|(id, retain)| (text(id), Value::Bool(*retain)))
            .collect(),
    );
    let items_request = Value::Map(vec![
        (text("1"), Value::Map(vec![(text(namespace), wanted)])),
        (text("5"), text(doc_type)),
    ]);
    let doc_request = Value::Map(vec![(
        text("1"),
        Value::Tag(
            TAG_ENCODED_CBOR,
            Box::new(Value::Bytes(cbor_bytes(&items_request)?)),
        ),
    )]);
    cbor_bytes(&Value::Map(vec![
        (text("1"), text("1.0")),
        (text("2"), Value::Array(vec![doc_request])),
    ]))
}

/// `{"data": bstr}`: the ENVELOPE payload wrapper.
pub fn session_data(ciphertext: &[u8]) -> Result<Vec<u8>, DocumentError> {
    cbor_bytes(&Value::Map(vec![(
        text("data"),
        Value::Bytes(ciphertext.to_vec()),
    )]))
}

/// The `data` bytes of a `{"data": bstr}` wrapper.
pub fn session_data_payload(bytes: &[u8]) -> Result<Vec<u8>, DocumentError> {
    match get(&parse(bytes)?, "data") {
        Some(Value::Bytes(b)) => Ok(b.clone()),
        _ => Err(DocumentError::Malformed(
            "session data has no \"data\" bytes",
        )),
    }
}

/// Value under text label `key` of a map.
fn get<'a>(map: &'a Value, key: &str) -> Option<&'a Value> {
    map.as_map()?
        .iter()
        .find(|(k, _)| k.as_text() == Some(key))
        .map(|(_, v)| v)
}

fn req<'a>(map: &'a Value, key: &str, what: &'static str) -> Result<&'a Value, DocumentError> {
    get(map, key).ok_or(DocumentError::Malformed(what))
}

/// The bytes inside a tag-24 item, and the whole item's encoding (for digests).
fn embedded(v: &Value, what: &'static str) -> Result<Vec<u8>, DocumentError> {
    match v {
        Value::Tag(TAG_ENCODED_CBOR, inner) => match inner.as_ref() {
            Value::Bytes(b) => Ok(b.clone()),
            _ => Err(DocumentError::Malformed(what)),
        },
        _ => Err(DocumentError::Malformed(what)),
    }
}

/// Key id of an issuer key: SHA-256("key-identifier" || uncompressed key)[0..8].
pub fn issuer_key_id(key: &PublicKey) -> [u8; 8] {
    let mut h = Sha256::new();
    h.update(b"key-identifier");
    h.update(crate::aliro::crypto::public_key_sec1(key));
    let d = h.finalize();
    let mut id = [0u8; 8];
    id.iter_mut().zip(d.iter()).for_each(|(o, i)| *o = *i);
    id
}

fn tdate(v: &Value, what: &'static str) -> Result<i64, DocumentError> {
    let s = match v {
        Value::Tag(0, inner) => inner.as_text(),
        other => other.as_text(),
    }
    .ok_or(DocumentError::Malformed(what))?;
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map(|t| t.unix_timestamp())
        .map_err(|_| DocumentError::Malformed(what))
}

/// Verifies the Access Document in `device_response` (decrypted ENVELOPE answer) for the
/// endpoint that authenticated with `endpoint_key`, at `now_unix`, against `trusted` issuers.
pub fn verify_access_document(
    device_response: &[u8],
    trusted: &[PublicKey],
    endpoint_key: &[u8; 65],
    now_unix: i64,
) -> Result<AccessDocument, DocumentError> {
    let resp = parse(device_response)?;
    let docs = req(&resp, "2", "no documents (\"2\")")?
        .as_array()
        .ok_or(DocumentError::Malformed("documents is not an array"))?;
    let doc = docs
        .iter()
        .take(MAX_ITEMS)
        .find(|d| get(d, "5").and_then(Value::as_text) == Some(ACCESS_DOC_TYPE))
        .ok_or(DocumentError::NoDocument)?;
    let issuer_signed = req(doc, "1", "no issuerSigned (\"1\")")?;
    let name_spaces = req(issuer_signed, "1", "no nameSpaces")?;
    let issuer_auth = req(issuer_signed, "2", "no issuerAuth")?;

    // COSE_Sign1: ES256 by a trusted issuer, found by key id.
    let sign1 = CoseSign1::from_cbor_value(issuer_auth.clone())
        .map_err(|_| DocumentError::Malformed("issuerAuth is not a COSE_Sign1"))?;
    if sign1.protected.header.alg
        != Some(coset::RegisteredLabelWithPrivate::Assigned(
            coset::iana::Algorithm::ES256,
        ))
    {
        return Err(DocumentError::Malformed(
            "issuerAuth algorithm is not ES256",
        ));
    }
    // The key id names the issuer; without one, every trusted key is tried.
    let kid = &sign1.unprotected.key_id;
    let candidates: Vec<&PublicKey> = trusted
        .iter()
        .filter(|k| kid.is_empty() || issuer_key_id(k).as_slice() == kid.as_slice())
        .collect();
    if candidates.is_empty() {
        return Err(DocumentError::UnknownIssuer);
    }
    let signed_by_trusted = candidates.iter().any(|issuer| {
        let vk = VerifyingKey::from(*issuer);
        sign1
            .verify_signature(b"", |sig, data| {
                let sig = Signature::from_slice(sig).map_err(|_| ())?;
                vk.verify(data, &sig).map_err(|_| ())
            })
            .is_ok()
    });
    if !signed_by_trusted {
        return Err(DocumentError::BadSignature);
    }

    // The MSO, only now that it is signed.
    let payload = sign1
        .payload
        .as_deref()
        .ok_or(DocumentError::Malformed("issuerAuth has no payload"))?;
    let mso = parse(&embedded(&parse(payload)?, "MSO not tag-24 embedded")?)?;
    if get(&mso, "1").and_then(Value::as_text) != Some("1.0")
        || get(&mso, "2").and_then(Value::as_text) != Some("SHA-256")
        || get(&mso, "5").and_then(Value::as_text) != Some(ACCESS_DOC_TYPE)
    {
        return Err(DocumentError::Malformed(
            "MSO version/digestAlgorithm/docType",
        ));
    }
    // Device key binding: the COSE_Key in the MSO is the endpoint key that authenticated.
    let cose_key = req(req(&mso, "4", "no deviceKeyInfo")?, "1", "no deviceKey")?;
    let coord = |label: i64| -> Option<&[u8]> {
        cose_key.as_map()?.iter().find_map(|(k, v)| {
            (k.as_integer() == Some(label.into()))
                .then(|| v.as_bytes().map(Vec::as_slice))
                .flatten()
        })
    };
    let (x, y) = match (coord(-2), coord(-3)) {
        (Some(x), Some(y)) if x.len() == 32 && y.len() == 32 => (x, y),
        _ => {
            return Err(DocumentError::Malformed(
                "deviceKey is not a P-256 COSE_Key",
            ))
        }
    };
    if endpoint_key.first() != Some(&0x04)
        || endpoint_key.get(1..33) != Some(x)
        || endpoint_key.get(33..65) != Some(y)
    {
        return Err(DocumentError::WrongDeviceKey);
    }
    let validity = req(&mso, "6", "no validityInfo")?;
    let valid_from = tdate(req(validity, "2", "no validFrom")?, "validFrom")?;
    let valid_until = tdate(req(validity, "3", "no validUntil")?, "validUntil")?;
    if now_unix < valid_from || now_unix > valid_until {
        return Err(DocumentError::NotValidNow);
    }

    // Every returned element must hash to its signed digest.
    let digests = req(&mso, "3", "no valueDigests")?;
    let mut elements = Vec::new();
    for (ns, items) in name_spaces
        .as_map()
        .ok_or(DocumentError::Malformed("nameSpaces is not a map"))?
        .iter()
        .take(MAX_ITEMS)
    {
        let ns = ns
            .as_text()
            .ok_or(DocumentError::Malformed("namespace is not text"))?;
        let ns_digests =
            get(digests, ns).ok_or(DocumentError::Malformed("namespace not signed"))?;
        for item in items
            .as_array()
            .ok_or(DocumentError::Malformed("namespace items are not an array"))?
            .iter()
            .take(MAX_ITEMS)
        {
            let item_bytes = embedded(item, "IssuerSignedItem not tag-24 embedded")?;
            let whole = cbor_bytes(item)?;
            let parsed = parse(&item_bytes)?;
            let digest_id = req(&parsed, "1", "no digestID")?
                .as_integer()
                .ok_or(DocumentError::Malformed("digestID is not an integer"))?;
            let identifier = req(&parsed, "3", "no elementIdentifier")?
                .as_text()
                .ok_or(DocumentError::Malformed("elementIdentifier is not text"))?
                .to_owned();
            let signed = ns_digests
                .as_map()
                .and_then(|m| {
                    m.iter()
                        .find(|(k, _)| k.as_integer() == Some(digest_id))
                        .and_then(|(_, v)| v.as_bytes())
                })
                .ok_or_else(|| DocumentError::DigestMismatch(identifier.clone()))?;
            if Sha256::digest(&whole)[..] != signed[..] {
                return Err(DocumentError::DigestMismatch(identifier));
            }
            elements.push(AccessElement {
                namespace: ns.to_owned(),
                identifier,
                value: req(&parsed, "4", "no elementValue")?.clone(),
            });
        }
    }
    Ok(AccessDocument {
        doc_type: ACCESS_DOC_TYPE.to_owned(),
        valid_from,
        valid_until,
        elements,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_request_shape() {
        let req =
            device_request("aliro-a", "aliro-a", &[("floor1", false), ("lab", true)]).unwrap();
        let v = parse(&req).unwrap();
        assert_eq!(get(&v, "1").and_then(Value::as_text), Some("1.0"));
        let docs = get(&v, "2").and_then(Value::as_array).unwrap();
        assert_eq!(docs.len(), 1);
        let items = parse(&embedded(get(&docs[0], "1").unwrap(), "x").unwrap()).unwrap();
        assert_eq!(get(&items, "5").and_then(Value::as_text), Some("aliro-a"));
        let ns = get(get(&items, "1").unwrap(), "aliro-a").unwrap();
        assert_eq!(get(ns, "floor1"), Some(&Value::Bool(false)));
        assert_eq!(get(ns, "lab"), Some(&Value::Bool(true)));
    }

    #[test]
    fn session_data_round_trip_and_refusals() {
        let wrapped = session_data(&[1, 2, 3]).unwrap();
        assert_eq!(session_data_payload(&wrapped).unwrap(), vec![1, 2, 3]);
        let not_bytes = cbor_bytes(&Value::Map(vec![(text("data"), text("x"))])).unwrap();
        assert!(session_data_payload(&not_bytes).is_err());
        assert!(session_data_payload(&[]).is_err());
        assert!(session_data_payload(&[0xa1]).is_err());
    }

    #[test]
    fn garbage_never_verifies_and_never_panics() {
        let key = p256::SecretKey::from_slice(&[7; 32]).unwrap().public_key();
        let ep = crate::aliro::crypto::public_key_sec1(&key);
        let mut seed = 0x1234_5678u32;
        for len in 0..300usize {
            let buf: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 17;
                    seed ^= seed << 5;
                    seed as u8
                })
                .collect();
            assert!(verify_access_document(&buf, &[key], &ep, 0).is_err());
        }
        // Well-formed CBOR of the wrong shape.
        for v in [
            Value::Map(vec![]),
            Value::Map(vec![(text("2"), Value::Array(vec![]))]),
            Value::Map(vec![(text("2"), text("x"))]),
        ] {
            let b = cbor_bytes(&v).unwrap();
            assert!(verify_access_document(&b, &[key], &ep, 0).is_err());
        }
    }
}
