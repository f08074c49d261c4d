//! Byte-for-byte replay of the Aliro BLE vector (`ble_standard_expedited.json`) through both
//! BLE session cores: keyway's reader side ([`keyway::ble::ReaderSession`]) and the phone
//! emulator's side ([`keyway_sim::ble_phone::BlePhone`]).
//!
//! Everything is read from `$ALIRO_VECTORS_DIR` (default `tests/vectors/aliro`) at run time:
//! keys, identifiers, randomness, every frame. Nothing from the file is written here, so a set
//! with other keys and the same layout must pass too.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use keyway::aliro::{crypto, tlv, Randomness, ReaderIdentity, TransactionParams};
use keyway::ble::keys::BleVersions;
use keyway::ble::session::{completion_payload, Event, SessionOutcome, READER_STATE_UNSECURED};
use keyway::ble::ReaderSession;
use keyway_sim::ble_phone::{BlePhone, PhoneBleError, PhoneEvent};
use keyway_sim::{EndpointConfig, ReaderGroupCredential, ScriptedRandom};
use serde_json::Value;

fn vector() -> Value {
    let dir = match std::env::var_os("ALIRO_VECTORS_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/aliro"),
    };
    let path = dir.join("ble_standard_expedited.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn hx(v: &Value) -> Vec<u8> {
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("expected hex, got {v}"));
    hex::decode(s.replace(' ', "")).unwrap_or_else(|e| panic!("bad hex {s}: {e}"))
}

fn arr<const N: usize>(v: &Value) -> [u8; N] {
    hx(v)
        .try_into()
        .unwrap_or_else(|b: Vec<u8>| panic!("expected {N} bytes, got {}", b.len()))
}

fn one(v: &Value) -> u8 {
    arr::<1>(v)[0]
}

/// "supported [0100], selected 0100" -> versions.
fn ble_versions(p: &Value) -> BleVersions {
    let s = p["ble_uwb_protocol_versions"].as_str().expect("versions");
    let inner = s
        .split('[')
        .nth(1)
        .and_then(|r| r.split(']').next())
        .expect("supported list");
    let supported = inner
        .split(',')
        .map(|v| arr::<2>(&Value::String(v.trim().into())))
        .collect();
    let selected = s.rsplit(' ').next().expect("selected");
    BleVersions {
        supported,
        selected: arr::<2>(&Value::String(selected.into())),
    }
}

fn steps(doc: &Value) -> &Vec<Value> {
    doc["steps"].as_array().expect("steps")
}

#[test]
fn reader_session_replays_the_ble_vector() {
    let doc = vector();
    let p = &doc["parameters"];
    assert_eq!(
        one(&p["auth0_command_parameters_tag41"]),
        0,
        "the BLE reader runs STANDARD"
    );
    let versions = ble_versions(p);
    assert_eq!(
        versions.salt(),
        hx(&doc["intermediates"]["ble_sk_salt_actuator"])
    );
    let identity = ReaderIdentity::new(
        arr(&p["reader_group_identifier"]),
        arr(&p["reader_group_sub_identifier"]),
        crypto::secret_key_from_bytes(&hx(&p["reader_long_term_private_key"])).unwrap(),
    );
    let rnd = Randomness {
        ephemeral: crypto::secret_key_from_bytes(&hx(&p["reader_ephemeral_private_key"])).unwrap(),
        transaction_id: arr(&p["transaction_identifier"]),
    };
    let params = TransactionParams {
        interface: one(&p["interface_byte"]),
        auth_policy: one(&p["authentication_policy_tag42"]),
        protocol_version: arr(&p["protocol_version"]),
    };
    let now = Instant::now();
    let mut s = ReaderSession::new(
        &identity,
        params,
        rnd,
        versions,
        now,
        Duration::from_secs(5),
    );
    let msgs = &doc["ble_messages"];
    let completed = &msgs["reader_status_access_protocol_completed_notification"];
    assert_eq!(
        completion_payload(READER_STATE_UNSECURED).unwrap(),
        hx(&completed["plaintext_payload"]),
        "the vector's completion notification is a grant"
    );

    let mut events: Vec<Event> = s
        .on_bytes(
            &hx(&msgs["initiate_access_protocol_notification"]["frame"]),
            now,
        )
        .unwrap();
    let mut authenticated = false;
    for step in steps(&doc) {
        let name = step["command"].as_str().unwrap_or("?");
        let sent = match events.as_slice() {
            [Event::Send(f)] => f.clone(),
            other => panic!("{name}: expected one frame, got {other:?}"),
        };
        assert_eq!(
            hex::encode(&sent),
            hex::encode(hx(&step["ble_ap_rq_frame"])),
            "{name}: AP_RQ"
        );
        events = s.on_bytes(&hx(&step["ble_ap_rs_frame"]), now).unwrap();
        if let [Event::Authenticated(ep)] = events.as_slice() {
            assert_eq!(
                ep.public_key.to_vec(),
                hx(&p["endpoint_long_term_public_key"]),
                "{name}"
            );
            authenticated = true;
            events = s.decide(true, now).unwrap();
        }
    }
    assert!(authenticated);
    match events.as_slice() {
        [Event::Send(f), Event::Done(SessionOutcome::Completed { reader_state })] => {
            assert_eq!(hex::encode(f), hex::encode(hx(&completed["frame"])));
            assert_eq!(*reader_state, READER_STATE_UNSECURED);
        }
        other => panic!("expected the completion notification, got {other:?}"),
    }
    assert!(s.is_done());
}

fn phone(doc: &Value) -> BlePhone {
    let p = &doc["parameters"];
    let reader_key = crypto::public_key_from_sec1(&hx(&p["reader_long_term_public_key"])).unwrap();
    let mut config = EndpointConfig::new(
        crypto::secret_key_from_bytes(&hx(&p["endpoint_long_term_private_key"])).unwrap(),
        vec![ReaderGroupCredential {
            group_id: arr(&p["reader_group_identifier"]),
            reader_group_key: reader_key,
        }],
    );
    // The endpoint's signaling bitmap and credential timestamp are whatever its AUTH1 response
    // plaintext carried.
    let plain = hx(&doc["intermediates"]["auth1_response_plaintext"]);
    for t in tlv::parse_all(&plain).unwrap() {
        match t.tag {
            0x5E => config.signaling_bitmap = u16::from_be_bytes(t.value.try_into().unwrap()),
            0x91 => config.credential_timestamp = Some(t.value.try_into().unwrap()),
            _ => {}
        }
    }
    let mut random = ScriptedRandom::new();
    random.push_key(
        crypto::secret_key_from_bytes(&hx(&p["endpoint_ephemeral_private_key"])).unwrap(),
    );
    BlePhone::new(config, Box::new(random), ble_versions(p))
}

#[test]
fn phone_emulator_replays_the_ble_vector() {
    let doc = vector();
    let msgs = &doc["ble_messages"];
    let mut ph = phone(&doc);
    assert_eq!(
        hex::encode(ph.initiate().unwrap()),
        hex::encode(hx(&msgs["initiate_access_protocol_notification"]["frame"]))
    );
    for step in steps(&doc) {
        let name = step["command"].as_str().unwrap_or("?");
        let out = ph.on_bytes(&hx(&step["ble_ap_rq_frame"])).unwrap();
        assert_eq!(
            out,
            vec![PhoneEvent::Send(hx(&step["ble_ap_rs_frame"]))],
            "{name}: AP_RS"
        );
    }
    let frame = hx(&msgs["reader_status_access_protocol_completed_notification"]["frame"]);
    // A flipped bit is refused (and uses up the counter, as the reader's next message would).
    let mut tampered = phone(&doc);
    tampered.initiate().unwrap();
    for step in steps(&doc) {
        tampered.on_bytes(&hx(&step["ble_ap_rq_frame"])).unwrap();
    }
    let mut bad = frame.clone();
    let last = bad.len() - 1;
    bad[last] ^= 0x01;
    assert_eq!(tampered.on_bytes(&bad), Err(PhoneBleError::BadNotification));

    assert_eq!(
        ph.on_bytes(&frame).unwrap(),
        vec![PhoneEvent::Completed {
            reader_state: READER_STATE_UNSECURED
        }]
    );
}
