//! Integration tests of the phone emulator against the Aliro interoperability vectors.
//!
//! Every scenario file's C-APDUs are replayed into a fresh [`Endpoint`] configured from the
//! file's own `parameters` (keys, group, version) and the endpoint's recorded intermediates
//! (signaling bitmap and timestamps it used, the random cryptogram it drew); each R-APDU must
//! equal the file's. No expected value lives in this source: all come from the vector files,
//! found under `ALIRO_VECTORS_DIR` (default the workspace's `tests/vectors/aliro`).
//!
//! A second part drives the same transcript through the vpcd client over a real TCP socket,
//! with this test playing vpcd.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::path::PathBuf;
use std::time::Duration;

use keyway_sim::vpcd::{self, TapOptions, CTRL_GET_ATR, CTRL_POWER_OFF, CTRL_POWER_ON};
use keyway_sim::{
    Endpoint, EndpointConfig, OsRandom, Outcome, ReaderGroupCredential, ScriptedRandom,
};
use p256::{PublicKey, SecretKey};
use serde_json::Value;
use tokio::io::AsyncWriteExt;

/// Scenarios the emulator does not implement, and why (kept explicit so a new file fails loudly).
const NOT_EMULATED: &[(&str, &str)] = &[
    (
        "ble_standard_expedited.json",
        "BLE transport is not emulated",
    ),
    (
        "nfc_step_up_access_document.json",
        "step-up / Access Document not emulated",
    ),
    ("nfc_load_cert.json", "LOAD CERT not emulated"),
];

fn vectors_dir() -> PathBuf {
    match std::env::var_os("ALIRO_VECTORS_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/vectors/aliro"),
    }
}

fn load(name: &str) -> Value {
    let path = vectors_dir().join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("read {} (set ALIRO_VECTORS_DIR?): {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

fn scenario_files() -> Vec<String> {
    let index = load("index.json");
    index["files"]
        .as_array()
        .expect("index.json files[]")
        .iter()
        .map(|f| f["file"].as_str().expect("file name").to_owned())
        .collect()
}

fn hexv(v: &Value) -> Vec<u8> {
    hex::decode(
        v.as_str()
            .unwrap_or_else(|| panic!("not a hex string: {v}")),
    )
    .expect("hex")
}

fn arr<const N: usize>(v: &Value) -> [u8; N] {
    hexv(v).try_into().expect("length")
}

/// Simple BER-TLV walk of short-length, single-byte-tag data (the plaintexts used here).
fn tlvs(mut data: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while let [tag, len, rest @ ..] = data {
        let len = usize::from(*len);
        assert!(len < 0x80 && rest.len() >= len, "unexpected TLV shape");
        out.push((*tag, rest[..len].to_vec()));
        data = &rest[len..];
    }
    assert!(data.is_empty(), "trailing TLV bytes");
    out
}

/// All `value` entries of every step's device trace, in order.
fn trace_values(doc: &Value) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for step in doc["steps"].as_array().into_iter().flatten() {
        for entry in step["device_trace"].as_array().into_iter().flatten() {
            if let Some(map) = entry["value"].as_object() {
                for (k, v) in map {
                    out.push((k.clone(), v.clone()));
                }
            }
        }
    }
    out
}

/// What the endpoint put in its AUTH1 response or FAST cryptogram, as recorded by the vector.
fn apply_recorded_payload_options(doc: &Value, config: &mut EndpointConfig) {
    let mut plaintexts = Vec::new();
    if let Some(p) = doc["intermediates"]["auth1_response_plaintext"].as_str() {
        plaintexts.push(hex::decode(p).unwrap());
    }
    for step in doc["steps"].as_array().into_iter().flatten() {
        for entry in step["device_trace"].as_array().into_iter().flatten() {
            if entry["gcm"]["channel"] == "cryptogram" {
                plaintexts.push(hexv(&entry["gcm"]["plaintext"]));
            }
        }
    }
    for plain in plaintexts {
        for (tag, value) in tlvs(&plain) {
            let nonzero = value.iter().any(|b| *b != 0);
            match tag {
                0x5E => config.signaling_bitmap = u16::from_be_bytes(value.try_into().unwrap()),
                0x91 if nonzero => config.credential_timestamp = Some(value.try_into().unwrap()),
                0x92 if nonzero => config.revocation_timestamp = Some(value.try_into().unwrap()),
                _ => {}
            }
        }
    }
}

/// Build the endpoint a scenario file describes.
fn endpoint_for(doc: &Value) -> Endpoint {
    let p = &doc["parameters"];
    let mut random = ScriptedRandom::new();
    let Some(long_term) = p["endpoint_long_term_private_key"].as_str() else {
        // Parameterless scenario (SELECT only): any key will do.
        let config = EndpointConfig::new(SecretKey::random(&mut rand_core::OsRng), vec![]);
        return Endpoint::new(config, Box::new(OsRandom));
    };
    let long_term = SecretKey::from_slice(&hex::decode(long_term).unwrap()).unwrap();
    let group_id = if p["credential_trusted_reader_group_identifier"].is_string() {
        arr::<16>(&p["credential_trusted_reader_group_identifier"])
    } else {
        arr::<16>(&p["reader_group_identifier"])
    };
    let reader_group_key =
        PublicKey::from_sec1_bytes(&hexv(&p["reader_long_term_public_key"])).unwrap();
    let mut config = EndpointConfig::new(
        long_term,
        vec![ReaderGroupCredential {
            group_id,
            reader_group_key,
        }],
    );
    config.protocol_versions = vec![arr::<2>(&p["protocol_version"])];
    apply_recorded_payload_options(doc, &mut config);
    if p["fault"].is_string() {
        // neg_invalid_device_signature: its `fault` text says the device signed over an
        // all-zero transaction identifier.
        config.faults.device_signature_transaction_id = Some([0u8; 16]);
    }
    if let Some(k) = p["endpoint_ephemeral_private_key"].as_str() {
        random.push_key(SecretKey::from_slice(&hex::decode(k).unwrap()).unwrap());
    }
    if let Some(c) = doc["intermediates"]["random_cryptogram"].as_str() {
        random.push_bytes(&hex::decode(c).unwrap());
    }
    let mut endpoint = Endpoint::new(config, Box::new(random));
    if p["k_persistent_from_nfc_standard_expedited"].is_string() {
        endpoint.store_k_persistent(
            arr::<32>(&p["reader_identifier"]),
            arr::<32>(&p["k_persistent_from_nfc_standard_expedited"]),
        );
    }
    endpoint
}

fn expected_r_apdu(step: &Value) -> Vec<u8> {
    // A tampered step: the endpoint's own output is what it sent, before the tampering.
    match step.get("r_apdu_as_sent_by_device") {
        Some(v) => hexv(v),
        None => hexv(&step["r_apdu"]),
    }
}

/// Replay one file; returns the endpoint for further checks.
fn replay(name: &str) -> Endpoint {
    let doc = load(name);
    let mut endpoint = endpoint_for(&doc);
    endpoint.on_power();
    for step in doc["steps"].as_array().expect("steps") {
        let c = hexv(&step["c_apdu"]);
        let want = expected_r_apdu(step);
        let got = endpoint.handle(&c);
        assert_eq!(
            hex::encode(&got),
            hex::encode(&want),
            "{name} step {} ({})",
            step["index"],
            step["command"]
        );
    }
    // The outcome the endpoint recorded agrees with what the vector's endpoint saw.
    let values = trace_values(&doc);
    let statuses: Vec<u16> = values
        .iter()
        .filter(|(k, _)| k == "reader_status_received")
        .map(|(_, v)| u16::from_be_bytes(arr::<2>(v)))
        .collect();
    let got_statuses: Vec<u16> = endpoint
        .outcomes()
        .filter_map(|o| match o {
            Outcome::Completed { reader_status, .. } => Some(*reader_status),
            _ => None,
        })
        .collect();
    assert_eq!(got_statuses, statuses, "{name}: reader statuses");
    let s1 = values.iter().find(|(k, _)| k == "control_flow_s1");
    let s2 = values.iter().find(|(k, _)| k == "control_flow_s2");
    if let (Some((_, s1)), Some((_, s2))) = (s1, s2) {
        assert!(
            endpoint.outcomes().any(|o| *o
                == Outcome::ControlFlow {
                    s1: arr::<1>(s1)[0],
                    s2: arr::<1>(s2)[0],
                }),
            "{name}: control flow outcome"
        );
    }
    // Error steps: the endpoint recorded a rejection with the same status word (the SELECT of
    // an unknown AID happens outside a session and is not an outcome).
    for step in doc["steps"].as_array().unwrap() {
        for entry in step["device_trace"].as_array().into_iter().flatten() {
            if let Some(sw) = entry["error"]["status_word"].as_str() {
                let sw = u16::from_str_radix(sw, 16).unwrap();
                assert!(
                    endpoint
                        .outcomes()
                        .any(|o| matches!(o, Outcome::Rejected { sw: got, .. } if *got == sw)),
                    "{name}: rejection {sw:04X} recorded"
                );
            }
        }
    }
    // Kpersistent, when the vector's endpoint derived one, matches.
    if let Some(k) = doc["intermediates"]["k_persistent"].as_str() {
        let id = arr::<32>(&doc["parameters"]["reader_identifier"]);
        let stored = endpoint.k_persistent(&id).expect("Kpersistent stored");
        assert_eq!(hex::encode(stored.as_bytes()), k, "{name}: Kpersistent");
    }
    endpoint
}

#[test]
fn every_emulated_vector_replays_byte_for_byte() {
    let files = scenario_files();
    let mut ran = Vec::new();
    for name in &files {
        if name == "reference_constants.json" {
            continue;
        }
        if NOT_EMULATED.iter().any(|(n, _)| n == name) {
            continue;
        }
        replay(name);
        ran.push(name.clone());
    }
    // The files the brief names must all be among them.
    for must in [
        "nfc_standard_expedited.json",
        "nfc_fast_expedited.json",
        "nfc_fast_first_contact_fallback.json",
        "neg_wrong_reader_signature.json",
        "neg_wrong_transaction_id.json",
        "neg_unsupported_protocol_version.json",
        "neg_unknown_reader_group.json",
        "neg_select_unknown_aid.json",
        "neg_control_flow_with_le.json",
        "neg_exchange_replay.json",
        "neg_fast_no_match_control_flow_abort.json",
    ] {
        assert!(ran.iter().any(|r| r == must), "{must} not replayed");
    }
    for (name, _why) in NOT_EMULATED {
        assert!(
            files.iter().any(|f| f == name),
            "{name} vanished from the index"
        );
    }
}

#[test]
fn standard_then_fast_with_the_learned_key() {
    // The Kpersistent learned in the STANDARD transaction is the one the FAST file relies on.
    let standard = replay("nfc_standard_expedited.json");
    let fast = load("nfc_fast_expedited.json");
    let id = arr::<32>(&fast["parameters"]["reader_identifier"]);
    let learned = standard.k_persistent(&id).expect("learned Kpersistent");
    assert_eq!(
        hex::encode(learned.as_bytes()),
        fast["parameters"]["k_persistent_from_nfc_standard_expedited"]
            .as_str()
            .unwrap()
    );
    let endpoint = replay("nfc_fast_expedited.json");
    assert!(matches!(
        endpoint.last_outcome(),
        Some(Outcome::Completed { fast: true, .. })
    ));
}

#[test]
fn fast_disabled_answers_a_decoy_and_the_reader_can_fall_back() {
    // Same FAST AUTH0, but with FAST turned off the cryptogram must differ from the real one.
    let doc = load("nfc_fast_expedited.json");
    let mut endpoint = endpoint_for(&doc);
    let mut config = endpoint.config().clone();
    config.fast_enabled = false;
    let mut random = ScriptedRandom::new();
    random.push_key(
        SecretKey::from_slice(&hexv(&doc["parameters"]["endpoint_ephemeral_private_key"])).unwrap(),
    );
    random.push_bytes(&[0x5A; 64]);
    endpoint = Endpoint::new(config, Box::new(random));
    let steps = doc["steps"].as_array().unwrap();
    assert_eq!(
        endpoint.handle(&hexv(&steps[0]["c_apdu"])),
        hexv(&steps[0]["r_apdu"])
    );
    let r = endpoint.handle(&hexv(&steps[1]["c_apdu"]));
    let real = hexv(&steps[1]["r_apdu"]);
    assert_eq!(r.len(), real.len());
    assert_eq!(r[..67], real[..67], "same ephemeral key TLV");
    assert_ne!(r, real);
    assert!(r[69..133].iter().all(|b| *b == 0x5A), "decoy cryptogram");
    // The FAST EXCHANGE cannot be opened: no FAST channel exists.
    let r = endpoint.handle(&hexv(&steps[2]["c_apdu"]));
    assert_eq!(r[r.len() - 2..], [0x6D, 0x00]);
}

#[tokio::test]
async fn tap_over_a_real_vpcd_socket() {
    let doc = load("nfc_standard_expedited.json");
    let steps = doc["steps"].as_array().unwrap().clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();

    // This task plays vpcd: power on, ATR, the reader's APDUs, then waits for the card to leave.
    let vpcd_side = tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        vpcd::write_frame(&mut sock, &[CTRL_POWER_OFF])
            .await
            .unwrap();
        vpcd::write_frame(&mut sock, &[CTRL_POWER_ON])
            .await
            .unwrap();
        vpcd::write_frame(&mut sock, &[CTRL_GET_ATR]).await.unwrap();
        let atr = vpcd::read_frame(&mut sock, 64).await.unwrap().unwrap();
        let mut answers = Vec::new();
        for step in &steps {
            vpcd::write_frame(&mut sock, &hexv(&step["c_apdu"]))
                .await
                .unwrap();
            let r = vpcd::read_frame(&mut sock, 4096).await.unwrap().unwrap();
            answers.push((r, hexv(&step["r_apdu"])));
        }
        // The card removes itself after the hold: the next read sees a clean close.
        let closed = tokio::time::timeout(Duration::from_secs(5), vpcd::read_frame(&mut sock, 64))
            .await
            .expect("card did not leave");
        let _ = sock.shutdown().await;
        (atr, answers, closed.unwrap())
    });

    let mut endpoint = endpoint_for(&doc);
    let opts = TapOptions {
        timeout: Duration::from_secs(10),
        hold: Duration::from_millis(50),
        ..TapOptions::default()
    };
    let summary = vpcd::tap(addr, &mut endpoint, &opts).await.unwrap();
    let (atr, answers, after) = vpcd_side.await.unwrap();

    assert_eq!(atr, vpcd::CONTACTLESS_ATR);
    for (got, want) in answers {
        assert_eq!(hex::encode(got), hex::encode(want));
    }
    assert!(
        after.is_none(),
        "no frame after the transaction, just a close"
    );
    assert_eq!(summary.end, vpcd::ServeEnd::Finished);
    assert_eq!(summary.apdus, 4);
    assert_eq!(summary.power_events, 2);
    let want_status = trace_values(&doc)
        .into_iter()
        .find(|(k, _)| k == "reader_status_received")
        .map(|(_, v)| u16::from_be_bytes(arr::<2>(&v)))
        .unwrap();
    assert_eq!(
        endpoint.last_outcome(),
        Some(&Outcome::Completed {
            reader_status: want_status,
            fast: false
        })
    );
}

#[tokio::test]
async fn tap_times_out_when_the_reader_never_finishes() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hold_open = tokio::spawn(async move {
        let (sock, _) = listener.accept().await.unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        drop(sock);
    });
    let config = EndpointConfig::new(SecretKey::random(&mut rand_core::OsRng), vec![]);
    let mut endpoint = Endpoint::new(config, Box::new(OsRandom));
    let opts = TapOptions {
        timeout: Duration::from_millis(200),
        ..TapOptions::default()
    };
    let summary = vpcd::tap(addr, &mut endpoint, &opts).await.unwrap();
    assert_eq!(summary.end, vpcd::ServeEnd::Stopped);
    assert!(!summary.finished);
    assert!(endpoint.last_outcome().is_none());
    hold_open.abort();
}

/// The `keyway-phone-emu` binary, driven the way the bench drives it, against a vpcd played by
/// this test and a minimal reader built from the shared Aliro primitives (fresh random keys).
mod binary {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::path::Path;
    use std::process::{Command, Output};

    use keyway::aliro::apdu::CommandApdu;
    use keyway::aliro::crypto::{self, public_key_sec1, public_key_x, Role, SecureChannel};
    use keyway::aliro::keys::{self, Signer, TranscriptContext};
    use keyway::aliro::tlv;
    use p256::{PublicKey, SecretKey};
    use rand_core::OsRng;
    use serde_json::Value;

    const EMU: &str = env!("CARGO_BIN_EXE_keyway-phone-emu");

    fn send(s: &mut TcpStream, payload: &[u8]) {
        let mut f = (payload.len() as u16).to_be_bytes().to_vec();
        f.extend_from_slice(payload);
        s.write_all(&f).unwrap();
    }

    fn recv(s: &mut TcpStream) -> Option<Vec<u8>> {
        let mut len = [0u8; 2];
        if s.read_exact(&mut len).is_err() {
            return None;
        }
        let mut p = vec![0u8; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut p).unwrap();
        Some(p)
    }

    fn transmit(s: &mut TcpStream, c: &[u8]) -> (Vec<u8>, u16) {
        send(s, c);
        let mut r = recv(s).expect("R-APDU");
        let sw = r.split_off(r.len() - 2);
        (r, u16::from_be_bytes([sw[0], sw[1]]))
    }

    fn cmd(cla: u8, ins: u8, data: Vec<u8>, le: bool) -> Vec<u8> {
        let mut c = CommandApdu::new(cla, ins, 0, 0).with_data(data);
        if le {
            c = c.with_le(256);
        }
        c.encode().unwrap()
    }

    /// A reader that runs SELECT, AUTH0, AUTH1, then EXCHANGE with `status`. Returns the
    /// endpoint public key it authenticated.
    fn honest_reader(
        s: &mut TcpStream,
        group: &SecretKey,
        group_id: [u8; 16],
        status: [u8; 2],
    ) -> Vec<u8> {
        let select = CommandApdu::new(0x00, 0xA4, 0x04, 0x00)
            .with_data(keyway::aliro::consts::AID_EXPEDITED.to_vec())
            .with_le(256)
            .encode()
            .unwrap();
        let (fci, sw) = transmit(s, &select);
        assert_eq!(sw, 0x9000);
        let fci_tlvs = tlv::parse_all(&fci).unwrap();
        let a5 = fci_tlvs[0]
            .children()
            .unwrap()
            .into_iter()
            .find(|t| t.tag == 0xA5)
            .unwrap()
            .raw
            .to_vec();

        let eph = SecretKey::random(&mut OsRng);
        let mut reader_id = [0u8; 32];
        reader_id[..16].copy_from_slice(&group_id);
        reader_id[16..].copy_from_slice(&[0x5B; 16]);
        let tid = [0x7A; 16];
        let mut d = Vec::new();
        tlv::push_tlv(&mut d, 0x41, &[0x00]).unwrap();
        tlv::push_tlv(&mut d, 0x42, &[0x01]).unwrap();
        tlv::push_tlv(&mut d, 0x5C, &[0x01, 0x00]).unwrap();
        tlv::push_tlv(&mut d, 0x87, &public_key_sec1(&eph.public_key())).unwrap();
        tlv::push_tlv(&mut d, 0x4C, &tid).unwrap();
        tlv::push_tlv(&mut d, 0x4D, &reader_id).unwrap();
        let (r, sw) = transmit(s, &cmd(0x80, 0x80, d, true));
        assert_eq!(sw, 0x9000);
        let r_tlvs = tlv::parse_all(&r).unwrap();
        let ep_eph = PublicKey::from_sec1_bytes(tlv::find(&r_tlvs, 0x86).unwrap().value).unwrap();

        let t = TranscriptContext {
            reader_key_x: public_key_x(&group.public_key()),
            reader_identifier: reader_id,
            interface: 0x5E,
            protocol_version: [0x01, 0x00],
            reader_ephemeral_x: public_key_x(&eph.public_key()),
            endpoint_ephemeral_x: public_key_x(&ep_eph),
            transaction_id: tid,
            command_parameters: 0x00,
            auth_policy: 0x01,
            fci_proprietary_tlv: a5,
            vendor_extension: vec![],
        };
        let sig = crypto::sign(group, &t.signature_preimage(Signer::Reader));
        let mut d = Vec::new();
        tlv::push_tlv(&mut d, 0x41, &[0x01]).unwrap();
        tlv::push_tlv(&mut d, 0x9E, &sig).unwrap();
        let (r, sw) = transmit(s, &cmd(0x80, 0x81, d, true));
        assert_eq!(sw, 0x9000);
        let ikm = keys::transaction_ikm(&eph, &ep_eph, &tid).unwrap();
        let k = keys::derive_volatile(&ikm, &t).unwrap();
        let mut ch = SecureChannel::new(Role::Reader, k.exchange_sk_reader, k.exchange_sk_device);
        let plain = ch.open(&r).unwrap();
        let p_tlvs = tlv::parse_all(&plain).unwrap();
        let ep_key = tlv::find(&p_tlvs, 0x5A).unwrap().value.to_vec();
        let ep_pub = PublicKey::from_sec1_bytes(&ep_key).unwrap();
        crypto::verify(
            &ep_pub,
            &t.signature_preimage(Signer::Device),
            tlv::find(&p_tlvs, 0x9E).unwrap().value,
        )
        .unwrap();

        let mut d = vec![0x97, 0x02];
        d.extend_from_slice(&status);
        let (r, sw) = transmit(s, &cmd(0x80, 0xC9, ch.seal(&d).unwrap(), true));
        assert_eq!(sw, 0x9000);
        assert_eq!(ch.open(&r).unwrap(), [0x00, 0x02, 0x00, 0x00]);
        ep_key
    }

    fn keygen(dir: &Path, name: &str) -> (std::path::PathBuf, String) {
        let path = dir.join(name);
        let out = Command::new(EMU)
            .args(["keygen", "--out"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let public = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        (path, public)
    }

    fn tap(port: u16, key: &Path, group_key_hex: &str, group_id: &str, extra: &[&str]) -> Output {
        Command::new(EMU)
            .args([
                "tap",
                "--vpcd",
                &format!("127.0.0.1:{port}"),
                "--endpoint-key",
            ])
            .arg(key)
            .args([
                "--reader-group-key",
                group_key_hex,
                "--reader-group-id",
                group_id,
                "--hold-ms",
                "50",
                "--json",
            ])
            .args(extra)
            .output()
            .unwrap()
    }

    fn json(out: &Output) -> Value {
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
    }

    #[test]
    fn keygen_writes_a_private_pem_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let (path, public) = keygen(dir.path(), "k.pem");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("-----BEGIN PRIVATE KEY-----"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert_eq!(public.len(), 130);
        assert!(public.starts_with("04"));
        let again = Command::new(EMU)
            .args(["keygen", "--out"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(!again.status.success());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text, "untouched");
        let pk = Command::new(EMU)
            .args(["pubkey", "--key"])
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(String::from_utf8(pk.stdout).unwrap().trim(), public);
    }

    #[test]
    fn tap_completed_reports_reader_status_and_exits_zero() {
        let dir = tempfile::tempdir().unwrap();
        let (key, public) = keygen(dir.path(), "phone.pem");
        let group = SecretKey::random(&mut OsRng);
        let group_hex = hex::encode(public_key_sec1(&group.public_key()));
        let group_id = [0x3C; 16];
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let vpcd = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            send(&mut s, &[0x01]);
            send(&mut s, &[0x04]);
            let atr = recv(&mut s).unwrap();
            let ep_key = honest_reader(&mut s, &group, group_id, [0x01, 0x01]);
            // The phone leaves by itself.
            assert!(recv(&mut s).is_none());
            (atr, ep_key)
        });
        let out = tap(port, &key, &group_hex, &hex::encode(group_id), &[]);
        let (atr, ep_key) = vpcd.join().unwrap();
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        let j = json(&out);
        assert_eq!(j["result"], "completed");
        assert_eq!(j["reader_status"], "0101");
        assert_eq!(j["fast"], false);
        assert_eq!(j["end"], "finished");
        assert_eq!(j["apdus"], 4);
        assert_eq!(j["endpoint_public_key"], public);
        assert_eq!(hex::encode(ep_key), public);
        assert_eq!(atr, keyway_sim::vpcd::CONTACTLESS_ATR);
    }

    #[test]
    fn repeated_taps_print_one_line_each() {
        let dir = tempfile::tempdir().unwrap();
        let (key, public) = keygen(dir.path(), "phone.pem");
        let group = SecretKey::random(&mut OsRng);
        let group_file = dir.path().join("group.hex");
        std::fs::write(
            &group_file,
            hex::encode(public_key_sec1(&group.public_key())),
        )
        .unwrap();
        let group_id = [0x19; 16];
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let vpcd = std::thread::spawn(move || {
            let mut statuses = Vec::new();
            for status in [[0x01, 0x01], [0x00, 0x01]] {
                let (mut s, _) = listener.accept().unwrap();
                send(&mut s, &[0x01]);
                statuses.push(honest_reader(&mut s, &group, group_id, status));
                assert!(recv(&mut s).is_none());
            }
            statuses
        });
        let group_arg = group_file.to_str().unwrap().to_owned();
        let out = tap(
            port,
            &key,
            &group_arg,
            &hex::encode(group_id),
            &["--count", "2", "--gap-ms", "10"],
        );
        let keys_seen = vpcd.join().unwrap();
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        let lines: Vec<Value> = String::from_utf8(out.stdout.clone())
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["tap"], 1);
        assert_eq!(lines[0]["reader_status"], "0101");
        assert_eq!(lines[1]["tap"], 2);
        assert_eq!(lines[1]["reader_status"], "0001");
        for k in keys_seen {
            assert_eq!(hex::encode(k), public);
        }
    }

    #[test]
    fn card_subcommand_presents_a_uid_only_card() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let t = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let select = CommandApdu::new(0x00, 0xA4, 0x04, 0x00)
                .with_data(keyway::aliro::consts::AID_EXPEDITED.to_vec())
                .with_le(256)
                .encode()
                .unwrap();
            let no_aliro = transmit(&mut s, &select).1;
            let (uid, sw) = transmit(&mut s, &[0xFF, 0xCA, 0x00, 0x00, 0x00]);
            (no_aliro, uid, sw)
        });
        let out = Command::new(EMU)
            .args([
                "card",
                "--vpcd",
                &format!("127.0.0.1:{port}"),
                "--uid",
                "04A1B2C3D4E5F6",
            ])
            .output()
            .unwrap();
        let (no_aliro, uid, sw) = t.join().unwrap();
        assert_eq!(no_aliro, 0x6A82);
        assert_eq!(
            (uid, sw),
            (vec![0x04, 0xA1, 0xB2, 0xC3, 0xD4, 0xE5, 0xF6], 0x9000)
        );
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        let bad = Command::new(EMU)
            .args(["card", "--uid", "0102"])
            .output()
            .unwrap();
        assert_eq!(bad.status.code(), Some(1));
    }

    #[test]
    fn tap_exit_codes_for_abort_rejection_timeout_and_no_vpcd() {
        let dir = tempfile::tempdir().unwrap();
        let (key, _) = keygen(dir.path(), "phone.pem");
        let group = SecretKey::random(&mut OsRng);
        let group_hex = hex::encode(public_key_sec1(&group.public_key()));
        let gid = "000102030405060708090a0b0c0d0e0f";
        let select = CommandApdu::new(0x00, 0xA4, 0x04, 0x00)
            .with_data(keyway::aliro::consts::AID_EXPEDITED.to_vec())
            .with_le(256)
            .encode()
            .unwrap();

        // CONTROL FLOW -> 2.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let sel = select.clone();
        let t = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            assert_eq!(transmit(&mut s, &sel).1, 0x9000);
            let cf = [0x80, 0x3C, 0, 0, 6, 0x41, 1, 0, 0x42, 1, 0x27];
            assert_eq!(transmit(&mut s, &cf).1, 0x9000);
            assert!(recv(&mut s).is_none());
        });
        let out = tap(port, &key, &group_hex, gid, &[]);
        t.join().unwrap();
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        assert_eq!(json(&out)["s2"], "27");

        // CONTROL FLOW with Le (strict) -> rejected 6701 -> 3; with --lenient-le -> 2.
        for (extra, code) in [(&[][..], 3), (&["--lenient-le"][..], 2)] {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let port = listener.local_addr().unwrap().port();
            let sel = select.clone();
            let t = std::thread::spawn(move || {
                let (mut s, _) = listener.accept().unwrap();
                assert_eq!(transmit(&mut s, &sel).1, 0x9000);
                let cf = [0x80, 0x3C, 0, 0, 6, 0x41, 1, 0, 0x42, 1, 0x00, 0x00];
                transmit(&mut s, &cf).1
            });
            let out = tap(port, &key, &group_hex, gid, extra);
            let sw = t.join().unwrap();
            assert_eq!(out.status.code(), Some(code), "{extra:?} {out:?}");
            if code == 3 {
                assert_eq!(sw, 0x6701);
                assert_eq!(json(&out)["sw"], "6701");
            }
        }

        // Phone offering only another version: SELECT shows it, the reader gives up with
        // CONTROL FLOW 00/27 -> 2.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let sel = select.clone();
        let t = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let (fci, sw) = transmit(&mut s, &sel);
            assert_eq!(sw, 0x9000);
            let cf = [0x80, 0x3C, 0, 0, 6, 0x41, 1, 0, 0x42, 1, 0x27];
            assert_eq!(transmit(&mut s, &cf).1, 0x9000);
            fci
        });
        let out = tap(port, &key, &group_hex, gid, &["--protocol-version", "0200"]);
        let fci = t.join().unwrap();
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        assert!(
            fci.windows(4).any(|w| w == [0x5C, 0x02, 0x02, 0x00]),
            "{}",
            hex::encode(&fci)
        );

        // Reader never finishes -> 4.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let t = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            send(&mut s, &[0x01]);
            assert!(recv(&mut s).is_none());
        });
        let out = tap(port, &key, &group_hex, gid, &["--timeout-s", "1"]);
        t.join().unwrap();
        assert_eq!(out.status.code(), Some(4), "{out:?}");
        assert_eq!(json(&out)["result"], "no_transaction");

        // Nothing listening -> 1 with an error on stderr.
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let out = tap(port, &key, &group_hex, gid, &["--timeout-s", "1"]);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("vpcd"));

        // Bad arguments -> non-zero before any connection.
        let out = tap(port, &key, "04abcd", gid, &[]);
        assert_eq!(out.status.code(), Some(1));
    }
}

/// keyway's own reader core (`aliro::reader`) against the emulated phone, in memory: the loop
/// the bench runs through pcscd, without the sockets.
mod reader_core {
    use keyway::aliro::consts::ReaderStatus;
    use keyway::aliro::reader::{
        Action, AliroError, AuthenticatedEndpoint, FastConfig, FastCredential, FastFallback,
        Outcome as ReaderOutcome, Randomness, ReaderIdentity, ReaderTransaction, TransactionParams,
    };
    use keyway_sim::{Endpoint, EndpointConfig, OsRandom, Outcome, ReaderGroupCredential};
    use p256::SecretKey;
    use rand_core::OsRng;

    fn identity() -> ReaderIdentity {
        ReaderIdentity {
            group_id: [0x42; 16],
            sub_id: [0x24; 16],
            private_key: SecretKey::random(&mut OsRng),
        }
    }

    fn phone_for(identity: &ReaderIdentity) -> (Endpoint, [u8; 65]) {
        let config = EndpointConfig::new(
            SecretKey::random(&mut OsRng),
            vec![ReaderGroupCredential {
                group_id: identity.group_id,
                reader_group_key: identity.private_key.public_key(),
            }],
        );
        let public = config.public_key_sec1();
        (Endpoint::new(config, Box::new(OsRandom)), public)
    }

    /// Runs one transaction; `decide` maps the authenticated endpoint key to a reader status.
    fn run(
        identity: &ReaderIdentity,
        phone: &mut Endpoint,
        decide: impl Fn(&[u8; 65]) -> ReaderStatus,
    ) -> Result<ReaderOutcome, AliroError> {
        run_with(identity, phone, None, decide).0
    }

    /// Like [`run`], optionally requesting FAST; also returns what the reader authenticated.
    fn run_with(
        identity: &ReaderIdentity,
        phone: &mut Endpoint,
        fast: Option<FastConfig>,
        decide: impl Fn(&[u8; 65]) -> ReaderStatus,
    ) -> (
        Result<ReaderOutcome, AliroError>,
        Option<AuthenticatedEndpoint>,
    ) {
        let mut reader = ReaderTransaction::new(
            identity,
            TransactionParams::default(),
            Randomness::generate(&mut OsRng),
        );
        if let Some(fast) = fast {
            reader = reader.with_fast(fast);
        }
        phone.on_power();
        let mut authenticated = None;
        let mut c = reader.start();
        for _ in 0..16 {
            let r = phone.handle(&c);
            let step = reader.on_response(&r);
            match step {
                Ok(Action::Transmit(next)) => c = next,
                Ok(Action::Authenticated(ep)) => {
                    match reader.complete(decide(&ep.public_key)) {
                        Ok(next) => c = next,
                        Err(e) => return (Err(e), Some(ep)),
                    }
                    authenticated = Some(ep);
                }
                Ok(Action::Exchanged(_) | Action::StepUpResponse(_)) => {
                    panic!("no intermediate EXCHANGE or step-up requested")
                }
                Ok(Action::Done(o)) => return (Ok(o), authenticated),
                Err(e) => return (Err(e), authenticated),
            }
        }
        panic!("transaction did not end");
    }

    #[test]
    fn fast_after_standard_and_both_fallbacks() {
        let id = identity();
        let (mut phone, public) = phone_for(&id);
        let (out, auth) = run_with(&id, &mut phone, None, |_| ReaderStatus::StateUnsecured);
        assert!(matches!(out, Ok(ReaderOutcome::Completed { .. })));
        let auth = auth.unwrap();
        assert!(!auth.fast);
        // The phone stored the same Kpersistent the reader learned.
        assert_eq!(
            phone.k_persistent(&id.reader_identifier()),
            Some(&auth.k_persistent)
        );
        let fast = FastConfig {
            credentials: vec![FastCredential {
                endpoint_public_key: public,
                k_persistent: auth.k_persistent.clone(),
            }],
            on_no_match: FastFallback::Abort,
        };

        // FAST: identified by the cryptogram, no AUTH1.
        let (out, auth2) = run_with(&id, &mut phone, Some(fast.clone()), |key| {
            assert_eq!(key, &public);
            ReaderStatus::StateSecured
        });
        assert!(
            matches!(out, Ok(ReaderOutcome::Completed { .. })),
            "{out:?}"
        );
        assert!(auth2.unwrap().fast);
        assert_eq!(
            phone.last_outcome(),
            Some(&Outcome::Completed {
                reader_status: ReaderStatus::StateSecured.code(),
                fast: true
            })
        );

        // Phone with FAST off: decoy cryptogram. Abort -> CONTROL FLOW 00/00 at the phone.
        let mut config = phone.config().clone();
        config.fast_enabled = false;
        let mut no_fast = Endpoint::new(config, Box::new(OsRandom));
        let (out, _) = run_with(&id, &mut no_fast, Some(fast.clone()), |_| {
            panic!("must not authenticate")
        });
        assert!(
            !matches!(out, Ok(ReaderOutcome::Completed { .. })),
            "{out:?}"
        );
        assert_eq!(
            no_fast.last_outcome(),
            Some(&Outcome::ControlFlow { s1: 0, s2: 0 })
        );

        // Fallback to STANDARD in the same session.
        let fallback = FastConfig {
            on_no_match: FastFallback::Standard,
            ..fast
        };
        let (out, auth3) = run_with(&id, &mut no_fast, Some(fallback), |_| {
            ReaderStatus::StateUnsecured
        });
        assert!(
            matches!(out, Ok(ReaderOutcome::Completed { .. })),
            "{out:?}"
        );
        assert!(!auth3.unwrap().fast);
        assert_eq!(
            no_fast.last_outcome(),
            Some(&Outcome::Completed {
                reader_status: ReaderStatus::StateUnsecured.code(),
                fast: false
            })
        );
    }

    #[test]
    fn granted_and_denied_reach_the_phone() {
        let id = identity();
        let (mut phone, public) = phone_for(&id);
        for status in [
            ReaderStatus::StateUnsecured,
            ReaderStatus::PublicKeyNotFound,
        ] {
            let out = run(&id, &mut phone, |key| {
                assert_eq!(key, &public);
                status
            })
            .unwrap();
            assert_eq!(out, ReaderOutcome::Completed { status });
            assert_eq!(
                phone.last_outcome(),
                Some(&Outcome::Completed {
                    reader_status: status.code(),
                    fast: false
                })
            );
        }
    }

    #[test]
    fn phone_without_the_group_refuses_auth0() {
        let id = identity();
        let other = ReaderIdentity {
            group_id: [0x43; 16],
            ..identity()
        };
        let (mut phone, _) = phone_for(&other);
        let err = run(&id, &mut phone, |_| ReaderStatus::StateUnsecured).unwrap_err();
        assert!(
            matches!(err, AliroError::BadStatus { sw: 0x6701, .. }),
            "{err:?}"
        );
        assert!(matches!(
            phone.last_outcome(),
            Some(Outcome::Rejected { sw: 0x6701, .. })
        ));
    }

    #[test]
    fn reader_with_the_wrong_key_gets_6982() {
        let id = identity();
        let (mut phone, _) = phone_for(&id);
        let impostor = ReaderIdentity {
            private_key: SecretKey::random(&mut OsRng),
            ..identity()
        };
        let err = run(&impostor, &mut phone, |_| ReaderStatus::StateUnsecured).unwrap_err();
        assert!(
            matches!(err, AliroError::BadStatus { sw: 0x6982, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn faulty_device_signature_is_reported_to_the_phone() {
        let id = identity();
        let (phone, _) = phone_for(&id);
        let mut config = phone.config().clone();
        config.faults.device_signature_transaction_id = Some([0u8; 16]);
        let mut phone = Endpoint::new(config, Box::new(OsRandom));
        let out = run(&id, &mut phone, |_| panic!("must not authenticate")).unwrap();
        let ReaderOutcome::Failed {
            error, reported, ..
        } = out
        else {
            panic!("expected failure, got {out:?}");
        };
        assert_eq!(error, AliroError::SignatureInvalid);
        // The phone saw the reader's failure report.
        assert_eq!(
            phone.last_outcome(),
            Some(&Outcome::Completed {
                reader_status: reported.code(),
                fast: false
            })
        );
    }

    #[test]
    fn version_mismatch_ends_with_control_flow() {
        let id = identity();
        let (phone, _) = phone_for(&id);
        let mut config = phone.config().clone();
        config.protocol_versions = vec![[0x02, 0x00]];
        let mut phone = Endpoint::new(config, Box::new(OsRandom));
        let out = run(&id, &mut phone, |_| panic!("must not authenticate"));
        assert!(
            matches!(
                phone.last_outcome(),
                Some(Outcome::ControlFlow { s1: 0x00, s2: 0x27 })
            ),
            "{out:?} / {:?}",
            phone.last_outcome()
        );
    }
}
