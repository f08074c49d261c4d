//! Byte-for-byte check of the Aliro reader core against the reference vectors.
//!
//! Reads every scenario in `$ALIRO_VECTORS_DIR` (default `tests/vectors/aliro`), builds the
//! reader from the file's `parameters`, feeds the file's R-APDUs and asserts that every C-APDU
//! the reader produces equals the file's, and that the transaction ends as the file says.
//! Nothing from the vector files is hard-coded here: another set with the same layout (other
//! keys) must pass too. Scenarios of features the reader does not implement yet are skipped by
//! name with a printed reason; the test fails if no scenario ran.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use keyway::aliro::consts::{
    tag, ReaderStatus, AID_EXPEDITED, AID_STEP_UP, CLA_PROPRIETARY, CONTROL_FLOW_S1_FAILURE,
    CONTROL_FLOW_S2_VERSION_NOT_SUPPORTED, INS_CONTROL_FLOW,
};
use keyway::aliro::document;
use keyway::aliro::{
    apdu::CommandApdu, crypto, tlv, Action, AliroError, AuthenticatedEndpoint, FastConfig,
    FastCredential, FastFallback, Outcome, Randomness, ReaderCertificate, ReaderIdentity,
    ReaderTransaction, Step, TransactionParams,
};
use serde_json::Value;

fn vectors_dir() -> PathBuf {
    match std::env::var_os("ALIRO_VECTORS_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/aliro"),
    }
}

fn hx(v: &Value) -> Vec<u8> {
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("expected hex string, got {v}"));
    hex::decode(s).unwrap_or_else(|e| panic!("bad hex {s}: {e}"))
}

fn arr<const N: usize>(v: &Value) -> [u8; N] {
    let b = hx(v);
    b.as_slice()
        .try_into()
        .unwrap_or_else(|_| panic!("expected {N} bytes, got {}", b.len()))
}

fn str_field<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

/// The vector files that are not run as reader-under-test scenarios here, each with its reason.
/// Pinned: a new vector file runs (and must pass) unless it is added here on purpose, and a
/// pinned name that no longer exists fails the test, so nothing is skipped silently.
const PINNED_SKIPS: &[(&str, &str)] = &[
    (
        "ble_standard_expedited.json",
        "BLE transport: checked byte for byte by tests/ble_vectors.rs",
    ),
    (
        "neg_control_flow_with_le.json",
        "exhibits a kormax reader defect (CONTROL FLOW with Le=00 after a FAST AUTH0) that the \
         endpoint rejects; this reader never puts Le on CONTROL FLOW (see \
         neg_fast_no_match_control_flow_abort, unit test \
         unsupported_version_sends_control_flow_without_le)",
    ),
];

/// Files of the vectors folder that hold no scenario.
const NOT_SCENARIOS: &[&str] = &["index.json", "reference_constants.json"];

/// FAST configuration of a scenario that requests FAST (AUTH0 tag 41 = 01): every Kpersistent
/// the file says the reader holds, bound to the endpoint key of the file. The no-match policy
/// is the one the file's reader followed (CONTROL FLOW after AUTH0 = abort, else AUTH1).
fn fast_config(doc: &Value) -> Option<FastConfig> {
    let p = &doc["parameters"];
    if str_field(p, "auth0_command_parameters_tag41") != Some("01") {
        return None;
    }
    let endpoint_public_key: [u8; 65] = arr(&p["endpoint_long_term_public_key"]);
    let credentials = p
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, v)| {
            let k = k.to_lowercase();
            (k.contains("kpersistent") || k.starts_with("k_persistent")) && v.is_string()
        })
        .map(|(_, v)| FastCredential {
            endpoint_public_key,
            k_persistent: crypto::SymmetricKey::from_slice(&hx(v)).unwrap(),
        })
        .collect();
    let steps = doc["steps"].as_array().unwrap();
    let after_auth0 = steps
        .iter()
        .skip_while(|s| str_field(s, "command") != Some("AUTH0"))
        .nth(1)
        .and_then(|s| str_field(s, "command"));
    let on_no_match = if after_auth0 == Some("CONTROL FLOW") {
        FastFallback::Abort
    } else {
        FastFallback::Standard
    };
    Some(FastConfig {
        credentials,
        on_no_match,
    })
}

/// The reader built from a scenario's parameters. Files without parameters (SELECT-only
/// scenarios) get fixed local test keys: no cryptography is reached there.
fn build_reader(doc: &Value) -> ReaderTransaction {
    let p = &doc["parameters"];
    let has = |k: &str| p.get(k).is_some_and(|v| !v.is_null());
    let (identity, rnd, params) = if has("reader_long_term_private_key") {
        // A file where the vector reader signed with another key states that key; use it so the
        // C-APDUs are comparable (the endpoint's reaction is what the file tests).
        let key_field = if has("reader_signing_key_used_private") {
            "reader_signing_key_used_private"
        } else {
            "reader_long_term_private_key"
        };
        let identity = ReaderIdentity {
            group_id: arr(&p["reader_group_identifier"]),
            sub_id: arr(&p["reader_group_sub_identifier"]),
            private_key: crypto::secret_key_from_bytes(&hx(&p[key_field])).unwrap(),
        };
        if key_field == "reader_long_term_private_key" {
            assert_eq!(
                identity.public_key_sec1().to_vec(),
                hx(&p["reader_long_term_public_key"]),
                "reader long-term public key"
            );
        }
        assert_eq!(
            identity.reader_identifier().to_vec(),
            hx(&p["reader_identifier"]),
            "reader identifier = group || sub"
        );
        let eph = crypto::secret_key_from_bytes(&hx(&p["reader_ephemeral_private_key"])).unwrap();
        assert_eq!(
            crypto::public_key_sec1(&eph.public_key()).to_vec(),
            hx(&p["reader_ephemeral_public_key"]),
            "reader ephemeral public key"
        );
        let version_field = if has("protocol_version_sent_in_auth0") {
            "protocol_version_sent_in_auth0"
        } else {
            "protocol_version"
        };
        let params = TransactionParams {
            interface: arr::<1>(&p["interface_byte"])[0],
            auth_policy: arr::<1>(&p["authentication_policy_tag42"])[0],
            protocol_version: arr(&p[version_field]),
        };
        (
            identity,
            Randomness {
                ephemeral: eph,
                transaction_id: arr(&p["transaction_identifier"]),
            },
            params,
        )
    } else {
        let identity = ReaderIdentity {
            group_id: [0x01; 16],
            sub_id: [0x02; 16],
            private_key: crypto::secret_key_from_bytes(&[0x03; 32]).unwrap(),
        };
        let rnd = Randomness {
            ephemeral: crypto::secret_key_from_bytes(&[0x04; 32]).unwrap(),
            transaction_id: [0x05; 16],
        };
        (identity, rnd, TransactionParams::default())
    };
    let mut reader = ReaderTransaction::new(&identity, params, rnd);
    if let Some(fast) = fast_config(doc) {
        reader = reader.with_fast(fast);
    }
    if let Some(cert) = opt(p, "compressed_reader_certificate") {
        // The certificate is issued by the group key; AUTH1 is signed by its subject key.
        reader = reader.with_certificate(ReaderCertificate {
            certificate: hx(cert),
            subject_key: crypto::secret_key_from_bytes(&hx(&p["reader_intermediate_private_key"]))
                .unwrap(),
            group_public_key: crypto::public_key_from_sec1(&hx(&p["reader_long_term_public_key"]))
                .unwrap(),
        });
    }
    reader
}

/// The EXCHANGE payload the scenario's reader sent after authentication (from the endpoint's
/// decrypted view), or None.
fn exchange_payload(doc: &Value) -> Option<Vec<u8>> {
    doc["intermediates"]
        .get("exchange_command_plaintext")
        .filter(|v| !v.is_null())
        .map(hx)
}

fn reader_status_in(payload: &[u8]) -> Option<ReaderStatus> {
    let items = tlv::parse_all(payload).ok()?;
    let st = tlv::find(&items, tag::READER_STATUS)?;
    let code: [u8; 2] = st.value.try_into().ok()?;
    Some(ReaderStatus::from_code(u16::from_be_bytes(code)))
}

/// The ACL decision the test plays for the daemon: an allow list in the file is honoured,
/// otherwise the scenario's own status is used.
fn decide(doc: &Value, ep: &AuthenticatedEndpoint, file_status: ReaderStatus) -> ReaderStatus {
    match doc["parameters"]
        .get("reader_allow_list")
        .and_then(Value::as_array)
    {
        Some(list) => {
            let known = list.iter().any(|k| hx(k) == ep.public_key.to_vec());
            if known {
                file_status
            } else {
                ReaderStatus::PublicKeyNotFound
            }
        }
        None => file_status,
    }
}

fn check_authenticated(doc: &Value, ep: &AuthenticatedEndpoint, log: &mut Vec<String>) {
    let p = &doc["parameters"];
    let i = &doc["intermediates"];
    assert_eq!(
        ep.public_key.to_vec(),
        hx(&p["endpoint_long_term_public_key"]),
        "authenticated endpoint key = endpoint long-term key"
    );
    assert_eq!(ep.transaction_id.to_vec(), hx(&p["transaction_identifier"]));
    if let Some(kp) = i.get("k_persistent") {
        assert_eq!(
            ep.k_persistent.as_bytes().to_vec(),
            hx(kp),
            "Kpersistent matches the endpoint's"
        );
        log.push("Kpersistent matches".into());
    }
    if let Some(pt) = i.get("auth1_response_plaintext") {
        let pt = hx(pt);
        let items = tlv::parse_all(&pt).unwrap();
        let bitmap = tlv::find(&items, tag::SIGNALING_BITMAP)
            .map(|t| u16::from_be_bytes(t.value.try_into().unwrap()));
        assert_eq!(ep.signaling_bitmap, bitmap, "signaling bitmap");
        let ts = tlv::find(&items, tag::CREDENTIAL_TIMESTAMP).map(|t| t.value.to_vec());
        assert_eq!(ep.credential_timestamp, ts, "credential timestamp");
    }
    // Cross-check with what the kormax reader itself returned, where it reported it.
    let v = &doc["reader_outcome_kormax"]["value"];
    if let Some(k) = v.get("endpoint_public_key").filter(|k| !k.is_null()) {
        assert_eq!(ep.public_key.to_vec(), hx(k), "kormax endpoint_public_key");
    }
    if let Some(k) = v.get("endpoint_persistent_key").filter(|k| !k.is_null()) {
        assert_eq!(
            ep.k_persistent.as_bytes().to_vec(),
            hx(k),
            "kormax endpoint_persistent_key"
        );
    }
    if let Some(b) = v.get("signaling_bitmap").filter(|b| !b.is_null()) {
        assert_eq!(
            ep.signaling_bitmap.map(|x| x.to_be_bytes().to_vec()),
            Some(hx(b)),
            "kormax signaling_bitmap"
        );
    }
}

fn step_for(command: &str) -> Option<Step> {
    Some(match command {
        "SELECT" => Step::Select,
        "AUTH0" => Step::Auth0,
        "AUTH1" => Step::Auth1,
        "EXCHANGE" => Step::Exchange,
        "CONTROL FLOW" => Step::ControlFlow,
        "LOAD CERT" => Step::LoadCert,
        _ => return None,
    })
}

/// Runs one scenario; returns a short description of what was checked.
fn run_scenario(name: &str, doc: &Value) -> Vec<String> {
    let mut log = Vec::new();
    let p = &doc["parameters"];
    let steps = doc["steps"].as_array().expect("steps");
    assert!(!steps.is_empty(), "{name}: no steps");
    let mut reader = build_reader(doc);
    let payload = exchange_payload(doc);
    let file_status = payload.as_deref().and_then(reader_status_in);

    let mut pending: Option<Vec<u8>> = Some(reader.start());
    let mut authenticated = false;
    let mut final_status: Option<ReaderStatus> = None;
    let mut seen_c_apdus: Vec<Vec<u8>> = Vec::new();
    let mut terminal: Option<Result<Action, AliroError>> = None;
    let wants_step_up = steps
        .iter()
        .any(|s| str_field(s, "command") == Some("ENVELOPE"));
    let mut endpoint: Option<AuthenticatedEndpoint> = None;

    for (idx, step) in steps.iter().enumerate() {
        let command = str_field(step, "command").expect("command");
        let file_c = hx(&step["c_apdu"]);
        let ours = pending
            .take()
            .unwrap_or_else(|| panic!("{name} step {idx} ({command}): reader has nothing to send"));

        if seen_c_apdus.contains(&file_c) {
            // A step repeating an earlier C-APDU is a replay injected by the generator; this
            // reader must never repeat a sealed command (fresh counter each time).
            assert_ne!(ours, file_c, "{name} step {idx}: reader repeated a C-APDU");
            log.push(format!("{command}: replayed by the vector, ours is fresh"));
        } else if command == "SELECT"
            && !file_c
                .windows(AID_EXPEDITED.len())
                .any(|w| w == AID_EXPEDITED || w == AID_STEP_UP)
        {
            // The vector's reader deliberately selected an unknown AID; ours selects the
            // expedited AID. Only the reaction to the status word is compared.
            let cmd = CommandApdu::parse(&ours).unwrap();
            assert_eq!(cmd.data, AID_EXPEDITED.to_vec());
            log.push("SELECT of an unknown AID not reproduced; reaction to SW checked".into());
        } else if p.get("protocol_version_sent_in_auth0").is_some() && command == "AUTH0" {
            // The vector's reader sent AUTH0 with a version the FCI does not offer; this reader
            // must instead report the failure with CONTROL FLOW {S1 00, S2 27}, without Le.
            let mut body = Vec::new();
            tlv::push_tlv(
                &mut body,
                tag::COMMAND_PARAMETERS,
                &[CONTROL_FLOW_S1_FAILURE],
            )
            .unwrap();
            tlv::push_tlv(
                &mut body,
                tag::AUTH_POLICY,
                &[CONTROL_FLOW_S2_VERSION_NOT_SUPPORTED],
            )
            .unwrap();
            let expect = CommandApdu::new(CLA_PROPRIETARY, INS_CONTROL_FLOW, 0, 0)
                .with_data(body)
                .encode()
                .unwrap();
            assert_eq!(
                hex::encode(&ours),
                hex::encode(&expect),
                "{name}: CONTROL FLOW 00/27"
            );
            log.push("unsupported version -> CONTROL FLOW 00/27 (no Le) instead of AUTH0".into());
        } else if p
            .get("transaction_identifier_used_by_reader_in_auth1_signature")
            .is_some()
            && command == "AUTH1"
        {
            // The vector's reader signed over a wrong transaction id. Ours must sign over the
            // one it sent in AUTH0: its signature verifies against the endpoint's preimage.
            assert_ne!(
                ours, file_c,
                "{name}: reader reproduced the faulty signature"
            );
            let cmd = CommandApdu::parse(&ours).unwrap();
            let items = tlv::parse_all(&cmd.data).unwrap();
            let sig = tlv::find(&items, tag::SIGNATURE).unwrap().value;
            let key = crypto::public_key_from_sec1(&hx(&p["reader_long_term_public_key"])).unwrap();
            crypto::verify(
                &key,
                &hx(&doc["intermediates"]["reader_signature_preimage"]),
                sig,
            )
            .expect("our AUTH1 signature verifies over the endpoint's preimage");
            log.push(
                "AUTH1 signed over the AUTH0 transaction id (vector's faulty one not reproduced)"
                    .into(),
            );
        } else {
            assert_eq!(
                hex::encode(&ours),
                hex::encode(&file_c),
                "{name} step {idx} ({command}): C-APDU differs"
            );
            log.push(format!("{command} C-APDU identical"));
        }
        seen_c_apdus.push(file_c);

        let r = hx(&step["r_apdu"]);
        let result = reader.on_response(&r);
        let last = idx + 1 == steps.len();
        match result {
            Ok(Action::Transmit(c)) => pending = Some(c),
            Ok(Action::Authenticated(ep)) => {
                check_authenticated(doc, &ep, &mut log);
                // FAST identification exactly when the file's reader skipped AUTH1.
                let has_auth1 = steps
                    .iter()
                    .any(|s| str_field(s, "command") == Some("AUTH1"));
                assert_eq!(ep.fast, !has_auth1, "{name}: FAST identification");
                if ep.fast {
                    log.push("endpoint identified by the FAST cryptogram".into());
                }
                authenticated = true;
                endpoint = Some(ep.clone());
                if wants_step_up {
                    pending = Some(reader.step_up(&device_request(doc)).expect("step-up"));
                    log.push("step-up requested".into());
                    continue;
                }
                let payload = payload
                    .clone()
                    .unwrap_or_else(|| panic!("{name}: authenticated but no EXCHANGE in the file"));
                pending = Some(match file_status {
                    Some(status) => {
                        let status = decide(doc, &ep, status);
                        final_status = Some(status);
                        reader.complete(status).expect("complete")
                    }
                    None => reader.exchange(&payload).expect("exchange"),
                });
            }
            Ok(Action::Exchanged(resp)) => {
                assert_eq!(resp.status, 0, "{name}: EXCHANGE status");
                if let Some(pt) = doc["intermediates"].get("exchange_response_plaintext") {
                    let pt = hx(pt);
                    assert_eq!(pt[pt.len() - 2..], resp.status.to_be_bytes());
                }
                log.push("EXCHANGE response decrypted (status 0000)".into());
                if !last {
                    pending = Some(
                        reader
                            .exchange(payload.as_deref().unwrap())
                            .expect("exchange"),
                    );
                }
            }
            Ok(Action::StepUpResponse(device_response)) => {
                let ep = endpoint.clone().expect("authenticated before step-up");
                check_access_document(name, doc, &device_response, &ep, &mut log);
                let status = decide(doc, &ep, file_status.expect("final reader status"));
                final_status = Some(status);
                pending = Some(
                    reader
                        .complete(status)
                        .expect("complete on step-up channel"),
                );
            }
            done @ (Ok(Action::Done(_)) | Err(_)) => {
                assert!(
                    last,
                    "{name} step {idx}: transaction ended early with {done:?}"
                );
                terminal = Some(done);
            }
        }
    }

    // How the transaction must end, derived from the file's last step.
    let last = steps.last().unwrap();
    let last_sw = u16::from_str_radix(str_field(last, "sw").unwrap(), 16).unwrap();
    let last_cmd = str_field(last, "command").unwrap();
    let terminal = terminal.unwrap_or_else(|| panic!("{name}: reader did not finish"));
    if p.get("protocol_version_sent_in_auth0").is_some() {
        match terminal {
            Ok(Action::Done(Outcome::Failed {
                error: AliroError::UnsupportedVersion { .. },
                reported: ReaderStatus::ProtocolVersionNotSupported,
                acknowledged,
            })) => assert_eq!(acknowledged, last_sw == 0x9000),
            other => panic!("{name}: unexpected end {other:?}"),
        }
        log.push("ends Failed(UnsupportedVersion)".into());
    } else if last_sw != 0x9000 {
        let expect = AliroError::BadStatus {
            step: step_for(last_cmd).unwrap(),
            sw: last_sw,
        };
        assert_eq!(terminal, Err(expect.clone()), "{name}: final error");
        log.push(format!("ends with error: {expect}"));
    } else if authenticated {
        let status = final_status.expect("final status");
        assert_eq!(
            terminal,
            Ok(Action::Done(Outcome::Completed { status })),
            "{name}: completion"
        );
        log.push(format!(
            "completed with reader status {:04X}",
            status.code()
        ));
    } else {
        // The failure report is the file's last command: CONTROL FLOW (S2 in tag 42) or an
        // EXCHANGE carrying tag 97.
        let reported = if last_cmd == "CONTROL FLOW" {
            let cmd = CommandApdu::parse(&hx(&last["c_apdu"])).unwrap();
            let items = tlv::parse_all(&cmd.data).unwrap();
            let s2 = tlv::find(&items, tag::AUTH_POLICY).unwrap().value[0];
            ReaderStatus::from_code(u16::from(s2))
        } else {
            file_status.expect("the file's failure report carries tag 97")
        };
        match terminal {
            Ok(Action::Done(Outcome::Failed {
                error,
                reported: r,
                acknowledged: true,
            })) => {
                assert_eq!(r, reported, "{name}: reported status");
                log.push(format!(
                    "failure ({error}) reported with status {:04X}, acknowledged",
                    r.code()
                ));
            }
            other => panic!("{name}: unexpected end {other:?}"),
        }
    }
    log
}

/// The DeviceRequest for the file's requested scopes (element id -> intent to retain).
fn device_request(doc: &Value) -> Vec<u8> {
    let scopes = doc["parameters"]["step_up_request_scopes"]
        .as_object()
        .expect("step_up_request_scopes");
    let elements: Vec<(&str, bool)> = scopes
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_bool().expect("bool scope")))
        .collect();
    let ns = document::ACCESS_DOC_TYPE;
    document::device_request(ns, ns, &elements).expect("DeviceRequest")
}

/// Verifies the decrypted DeviceResponse as the file's verification section says, then checks
/// that each way of breaking it is refused.
fn check_access_document(
    name: &str,
    doc: &Value,
    device_response: &[u8],
    ep: &AuthenticatedEndpoint,
    log: &mut Vec<String>,
) {
    let p = &doc["parameters"];
    let issuer = crypto::public_key_from_sec1(&hx(&p["access_document_issuer_public_key"]))
        .expect("issuer key");
    let checks = doc["access_document_verification"]
        .as_array()
        .expect("verification steps");
    let now = checks
        .iter()
        .find_map(|c| c.get("now").and_then(Value::as_str))
        .expect("verification time");
    let now = time::OffsetDateTime::parse(now, &time::format_description::well_known::Rfc3339)
        .unwrap()
        .unix_timestamp();
    let expect_ok = doc["expected"]["access_document_verification_result"] == Value::Bool(true);
    if let Some(kid) = checks
        .iter()
        .find(|c| str_field(c, "check").is_some_and(|c| c.contains("kid")))
    {
        assert_eq!(
            hex::encode(document::issuer_key_id(&issuer)),
            str_field(kid, "expected").unwrap(),
            "{name}: issuer key id"
        );
    }
    let verified =
        document::verify_access_document(device_response, &[issuer], &ep.public_key, now);
    assert_eq!(verified.is_ok(), expect_ok, "{name}: {verified:?}");
    let d = verified.unwrap();
    assert_eq!(d.doc_type, document::ACCESS_DOC_TYPE);
    // The elements returned are those the file's document carries (by identifier).
    let requested: Vec<String> = doc["parameters"]["step_up_request_scopes"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    let got: Vec<String> = d.elements.iter().map(|e| e.identifier.clone()).collect();
    assert_eq!(got, requested, "{name}: returned elements");
    log.push(format!(
        "Access Document verified: issuer ES256, digests, device key, validity ({} element(s))",
        d.elements.len()
    ));

    // Negative checks derived from the same document.
    let other = p256::SecretKey::from_slice(&[0x11; 32])
        .unwrap()
        .public_key();
    assert_eq!(
        document::verify_access_document(device_response, &[other], &ep.public_key, now),
        Err(document::DocumentError::UnknownIssuer),
        "{name}: untrusted issuer"
    );
    let mut stranger = ep.public_key;
    stranger[1..].copy_from_slice(&crypto::public_key_sec1(&other)[1..]);
    assert_eq!(
        document::verify_access_document(device_response, &[issuer], &stranger, now),
        Err(document::DocumentError::WrongDeviceKey),
        "{name}: bound to another endpoint"
    );
    assert_eq!(
        document::verify_access_document(device_response, &[issuer], &ep.public_key, 0),
        Err(document::DocumentError::NotValidNow),
        "{name}: not yet valid"
    );
    // Flip the last byte (inside the issuer signature or after it): never accepted.
    let mut tampered = device_response.to_vec();
    let sig = hx(&doc["access_document"]["issuer_auth_signature_raw_rs"]);
    let at = tampered
        .windows(sig.len())
        .position(|w| w == sig.as_slice())
        .expect("signature in the response");
    tampered[at + 10] ^= 1;
    assert_eq!(
        document::verify_access_document(&tampered, &[issuer], &ep.public_key, now),
        Err(document::DocumentError::BadSignature),
        "{name}: tampered issuer signature"
    );
    // Change the element's value bytes: its digest no longer matches.
    let item = hx(&doc["access_document"]["issuer_signed_item_cbor"]);
    let at = device_response
        .windows(item.len())
        .position(|w| w == item.as_slice())
        .expect("item in the response");
    let mut tampered = device_response.to_vec();
    let last = at + item.len() - 1;
    tampered[last] ^= 1;
    assert!(
        matches!(
            document::verify_access_document(&tampered, &[issuer], &ep.public_key, now),
            Err(document::DocumentError::DigestMismatch(_))
        ),
        "{name}: tampered element"
    );
    for cut in [0, 1, device_response.len() / 2, device_response.len() - 1] {
        assert!(document::verify_access_document(
            &device_response[..cut],
            &[issuer],
            &ep.public_key,
            now
        )
        .is_err());
    }
    log.push("tampered / untrusted / unbound / expired documents refused".into());
}

#[test]
fn reader_matches_reference_vectors() {
    let dir = vectors_dir();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read vectors dir {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no vector files in {}", dir.display());

    let mut ran = BTreeMap::new();
    let mut skipped = BTreeMap::new();
    for path in &files {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if NOT_SCENARIOS.contains(&name.as_str()) {
            continue;
        }
        let text = std::fs::read_to_string(path).unwrap();
        let doc: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: invalid JSON: {e}"));
        assert!(
            doc.get("steps").is_some(),
            "{name}: not a scenario (no steps); list it in NOT_SCENARIOS if that is intended"
        );
        match PINNED_SKIPS.iter().find(|(n, _)| *n == name) {
            Some((_, reason)) => {
                skipped.insert(name, reason.to_string());
            }
            None => {
                let log = run_scenario(&name, &doc);
                ran.insert(name, log);
            }
        }
    }
    for (pinned, _) in PINNED_SKIPS {
        assert!(
            skipped.contains_key(*pinned),
            "{pinned} is pinned as skipped but is not in {}: update PINNED_SKIPS",
            dir.display()
        );
    }

    for (name, log) in &ran {
        println!("PASS {name}");
        for l in log {
            println!("     - {l}");
        }
    }
    for (name, reason) in &skipped {
        println!("SKIP {name}: {reason}");
    }
    assert!(!ran.is_empty(), "no scenario ran from {}", dir.display());
}

/// Counts the checks made against one file's intermediates.
struct Checker<'a> {
    name: &'a str,
    count: usize,
}

impl Checker<'_> {
    fn eq(&mut self, what: &str, ours: &[u8], theirs: &Value) {
        assert_eq!(
            hex::encode(ours),
            theirs.as_str().unwrap_or_default().to_lowercase(),
            "{}: {what}",
            self.name
        );
        self.count += 1;
    }
}

fn opt<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.get(key).filter(|x| !x.is_null())
}

fn x_of(sec1: &[u8]) -> [u8; 32] {
    crypto::public_key_x(&crypto::public_key_from_sec1(sec1).unwrap())
}

/// The A5 TLV of a scenario: from the SELECT FCI, or (BLE) from the INITIATE_ACCESS_PROTOCOL
/// notification (frame header(4) || attribute id(1) || attribute length(1) || A5 TLV).
fn fci_a5(doc: &Value) -> Option<Vec<u8>> {
    if let Some(a5) = opt(&doc["intermediates"], "fci_proprietary_template_A5") {
        return Some(hx(a5));
    }
    let frame = hx(opt(
        opt(doc, "ble_messages")?,
        "initiate_access_protocol_notification",
    )?
    .get("frame")?);
    frame.get(6..).map(<[u8]>::to_vec)
}

/// Private keys stated in the parameters, by their public key (to reproduce RFC 6979
/// signatures of whichever key the file says was used).
fn private_keys(p: &Value) -> Vec<p256::SecretKey> {
    p.as_object()
        .into_iter()
        .flatten()
        .filter(|(k, v)| k.contains("private") && v.is_string())
        .filter_map(|(_, v)| crypto::secret_key_from_bytes(&hex::decode(v.as_str()?).ok()?).ok())
        .collect()
}

fn check_key_schedule(name: &str, doc: &Value) -> usize {
    use keyway::aliro::keys::{self, Signer, TranscriptContext};
    let p = &doc["parameters"];
    let i = &doc["intermediates"];
    let mut c = Checker { name, count: 0 };
    let (Some(reader_eph), Some(ep_eph_pub), Some(a5)) = (
        opt(p, "reader_ephemeral_private_key"),
        opt(i, "endpoint_ephemeral_public_key").or(opt(p, "endpoint_ephemeral_public_key")),
        fci_a5(doc),
    ) else {
        return 0;
    };
    let reader_eph = crypto::secret_key_from_bytes(&hx(reader_eph)).unwrap();
    let ep_eph = crypto::public_key_from_sec1(&hx(ep_eph_pub)).unwrap();
    let tid: [u8; 16] = arr(&p["transaction_identifier"]);
    let ctx = TranscriptContext {
        reader_key_x: x_of(&hx(&p["reader_long_term_public_key"])),
        reader_identifier: arr(&p["reader_identifier"]),
        interface: arr::<1>(&p["interface_byte"])[0],
        protocol_version: arr(&p["protocol_version"]),
        reader_ephemeral_x: crypto::public_key_x(&reader_eph.public_key()),
        endpoint_ephemeral_x: crypto::public_key_x(&ep_eph),
        transaction_id: tid,
        command_parameters: arr::<1>(&p["auth0_command_parameters_tag41"])[0],
        auth_policy: arr::<1>(&p["authentication_policy_tag42"])[0],
        fci_proprietary_tlv: a5,
        vendor_extension: Vec::new(),
    };
    if let Some(a5) = opt(i, "fci_proprietary_template_A5") {
        c.eq("A5 TLV", &ctx.fci_proprietary_tlv, a5);
    }

    let z = crypto::ecdh_x(&reader_eph, &ep_eph);
    if let Some(v) = opt(i, "ecdh_shared_secret_z") {
        c.eq("ECDH Z", z.as_bytes(), v);
    }
    let ikm = keys::transaction_ikm(&reader_eph, &ep_eph, &tid).unwrap();
    if let Some(v) = opt(i, "x963_kdf_output") {
        c.eq("X9.63 output", ikm.as_bytes(), v);
    }
    if let Some(v) = opt(i, "reader_signature_preimage") {
        c.eq(
            "reader preimage",
            &ctx.signature_preimage(Signer::Reader),
            v,
        );
    }
    if let (Some(v), None) = (opt(i, "device_signature_preimage"), opt(p, "fault")) {
        c.eq(
            "device preimage",
            &ctx.signature_preimage(Signer::Device),
            v,
        );
    }

    let mut ble_ikm = None;
    if let Some(v) = opt(i, "volatile_salt") {
        c.eq("volatile salt", &ctx.volatile_salt(), v);
        if let Some(v) = opt(i, "hkdf_info") {
            c.eq("HKDF info", &ctx.hkdf_info(), v);
        }
        let k = keys::derive_volatile(&ikm, &ctx).unwrap();
        for (what, key) in [
            ("exchange_sk_reader", &k.exchange_sk_reader),
            ("exchange_sk_device", &k.exchange_sk_device),
            ("step_up_input_key_material", &k.step_up_ikm),
            ("ble_input_key_material", &k.ble_ikm),
            ("ursk", &k.ursk),
        ] {
            if let Some(v) = opt(i, what) {
                c.eq(what, key.as_bytes(), v);
            }
        }
        if opt(i, "step_up_sk_reader").is_some() {
            let (r, d) = keys::derive_step_up(&k.step_up_ikm).unwrap();
            c.eq("step_up_sk_reader", r.as_bytes(), &i["step_up_sk_reader"]);
            c.eq("step_up_sk_device", d.as_bytes(), &i["step_up_sk_device"]);
        }
        ble_ikm = Some(k.ble_ikm.clone());
        if let (Some(salt), Some(ep_lt)) = (
            opt(i, "persistent_salt"),
            opt(p, "endpoint_long_term_public_key"),
        ) {
            let ep_x = x_of(&hx(ep_lt));
            c.eq("persistent salt", &ctx.persistent_salt(&ep_x), salt);
            if let Some(kp) = opt(i, "k_persistent") {
                let ours = keys::derive_persistent(&ikm, &ctx, &ep_x).unwrap();
                c.eq("Kpersistent", ours.as_bytes(), kp);
            }
        }
    }

    if let (Some(salt), Some(kp), Some(ep_lt)) = (
        opt(i, "fast_salt"),
        opt(i, "fast_kpersistent_found"),
        opt(p, "endpoint_long_term_public_key"),
    ) {
        let ep_x = x_of(&hx(ep_lt));
        c.eq("FAST salt", &ctx.fast_salt(&ep_x), salt);
        if let Some(v) = opt(i, "fast_hkdf_info") {
            c.eq("FAST info", &ctx.hkdf_info(), v);
        }
        let kp = keyway::aliro::crypto::SymmetricKey::from_slice(&hx(kp)).unwrap();
        let f = keys::derive_fast(&kp, &ctx, &ep_x).unwrap();
        for (what, key) in [
            ("cryptogram_sk", &f.cryptogram_sk),
            ("exchange_sk_reader", &f.exchange_sk_reader),
            ("exchange_sk_device", &f.exchange_sk_device),
            ("ble_input_key_material", &f.ble_ikm),
            ("ursk", &f.ursk),
        ] {
            if let Some(v) = opt(i, what) {
                c.eq(what, key.as_bytes(), v);
            }
        }
        // The cryptogram (AUTH0 response tag 9D) opens with CryptogramSK, zero IV, no AAD.
        for s in doc["steps"].as_array().into_iter().flatten() {
            if str_field(s, "command") != Some("AUTH0") {
                continue;
            }
            let r = hx(&s["r_apdu"]);
            let items = tlv::parse_all(&r[..r.len() - 2]).unwrap();
            if let Some(cg) = tlv::find(&items, tag::CRYPTOGRAM) {
                let pt = crypto::gcm_open(&f.cryptogram_sk, &[0u8; 12], &[], cg.value)
                    .unwrap_or_else(|_| panic!("{name}: cryptogram does not open"));
                assert_eq!(pt.first(), Some(&(tag::SIGNALING_BITMAP as u8)));
                c.count += 1;
            }
        }
    }

    if let Some(ble_ikm) = ble_ikm {
        if let Some(salt) = opt(i, "ble_sk_salt_actuator") {
            let (r, d) = keys::derive_ble(&ble_ikm, &hx(salt)).unwrap();
            c.eq(
                "ble_sk_reader_actuator",
                r.as_bytes(),
                &i["ble_sk_reader_actuator"],
            );
            c.eq(
                "ble_sk_device_actuator",
                d.as_bytes(),
                &i["ble_sk_device_actuator"],
            );
            // BLE "access protocol completed" notification, if the file has one.
            if let Some(n) = doc
                .get("ble_messages")
                .and_then(|m| opt(m, "reader_status_access_protocol_completed_notification"))
            {
                let frame = hx(&n["frame"]);
                let iv: [u8; 12] = arr(&n["iv"]);
                let ct = crypto::gcm_seal(
                    &r,
                    &iv,
                    &hx(&n["aad(header||id||plaintext_len)"]),
                    &hx(&n["plaintext_payload"]),
                )
                .unwrap();
                assert_eq!(
                    hex::encode(ct),
                    hex::encode(&frame[4..]),
                    "{name}: BLE notification"
                );
                c.count += 1;
            }
        }
        if opt(i, "ble_sk_reader_kormax").is_some() {
            let (r, d) = keys::derive_ble(&ble_ikm, &[0u8; 32]).unwrap();
            c.eq(
                "ble_sk_reader_kormax",
                r.as_bytes(),
                &i["ble_sk_reader_kormax"],
            );
            c.eq(
                "ble_sk_device_kormax",
                d.as_bytes(),
                &i["ble_sk_device_kormax"],
            );
        }
    }

    // Signatures: RFC 6979 reproduction with whichever stated key matches.
    let keys_here = private_keys(p);
    let sign_with = |public: &[u8], msg: &[u8]| {
        keys_here
            .iter()
            .find(|k| crypto::public_key_sec1(&k.public_key()).to_vec() == public)
            .map(|k| crypto::sign(k, msg))
    };
    if let (Some(sig), Some(pre), Some(with)) = (
        opt(i, "reader_signature"),
        opt(i, "reader_signature_preimage"),
        opt(i, "reader_signature_verified_with"),
    ) {
        if opt(i, "reader_signature_valid").and_then(Value::as_bool) == Some(true) {
            if let Some(ours) = sign_with(&hx(with), &hx(pre)) {
                c.eq("reader signature (RFC 6979)", &ours, sig);
            }
        }
    }
    if let (Some(sig), Some(pre), Some(ep_lt)) = (
        opt(i, "device_signature"),
        opt(i, "device_signature_preimage"),
        opt(p, "endpoint_long_term_public_key"),
    ) {
        let key = crypto::public_key_from_sec1(&hx(ep_lt)).unwrap();
        crypto::verify(&key, &hx(pre), &hx(sig)).expect("device signature verifies");
        if let Some(ours) = sign_with(&hx(ep_lt), &hx(pre)) {
            c.eq("device signature (RFC 6979)", &ours, sig);
        }
    }

    // Every AES-GCM operation the endpoint traced: IV rule and ciphertext.
    for s in doc["steps"].as_array().into_iter().flatten() {
        for e in s["device_trace"].as_array().into_iter().flatten() {
            let Some(g) = e.get("gcm") else { continue };
            let iv = match str_field(g, "direction") {
                Some(d) => {
                    let dir = match d {
                        "reader->device" => crypto::Direction::ReaderToEndpoint,
                        "device->reader" => crypto::Direction::EndpointToReader,
                        other => panic!("{name}: unknown GCM direction {other}"),
                    };
                    let counter: u32 = match &g["counter"] {
                        Value::Number(n) => u32::try_from(n.as_u64().unwrap()).unwrap(),
                        Value::String(t) => t.parse().unwrap(),
                        other => panic!("{name}: bad GCM counter {other}"),
                    };
                    let iv = crypto::aliro_iv(dir, counter);
                    c.eq("GCM IV", &iv, &g["iv"]);
                    iv
                }
                // No direction: the FAST cryptogram, sealed with a fixed IV stated in the file.
                None => arr(&g["iv"]),
            };
            let key = keyway::aliro::crypto::SymmetricKey::from_slice(&hx(&g["key_hex"])).unwrap();
            match opt(g, "plaintext") {
                Some(pt) => {
                    let ct = crypto::gcm_seal(&key, &iv, &hx(&g["aad"]), &hx(pt)).unwrap();
                    c.eq("GCM ciphertext", &ct, &g["ciphertext_and_tag"]);
                }
                None => {
                    // A traced failure (e.g. a replayed command): it must fail here too.
                    assert!(
                        crypto::gcm_open(&key, &iv, &hx(&g["aad"]), &hx(&g["ciphertext_and_tag"]))
                            .is_err(),
                        "{name}: GCM operation traced as failed opens here"
                    );
                    c.count += 1;
                }
            }
        }
    }
    c.count
}

/// The shared primitives and the key schedule reproduce every intermediate value of every
/// file that has them (later features included: their key schedule is already in `keys`).
#[test]
fn key_schedule_matches_intermediates() {
    let dir = vectors_dir();
    let mut total = 0;
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let doc: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        if doc.get("steps").is_none() {
            continue;
        }
        let n = check_key_schedule(&name, &doc);
        println!("{name}: {n} intermediate values reproduced");
        total += n;
        files += usize::from(n > 0);
    }
    assert!(
        total > 0 && files > 0,
        "no intermediate value checked in {}",
        dir.display()
    );
}
