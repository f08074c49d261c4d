use keyway::aliro::apdu::ResponseApdu;
use keyway::aliro::consts::INTERFACE_BLE;
use keyway::aliro::consts::{self, tag};
use keyway::aliro::reader::{Randomness, ReaderIdentity, TransactionParams};
use keyway::aliro::tlv;
use keyway::ble::keys::BleVersions;
use keyway::ble::message::{
    self, Message, ATTR_READER_INFORMATION, NOTIFY_ACCESS_PROTOCOL_COMPLETED,
    NOTIFY_INITIATE_ACCESS_PROTOCOL, PROTOCOL_AP, PROTOCOL_NOTIFICATION,
};
use keyway::ble::session::*;
use keyway_sim::{Endpoint, EndpointConfig, OsRandom, ReaderGroupCredential};
use p256::SecretKey;
use rand_core::OsRng;
use std::time::{Duration, Instant};

fn identity() -> ReaderIdentity {
    ReaderIdentity::new([1; 16], [2; 16], SecretKey::random(&mut OsRng))
}

fn params() -> TransactionParams {
    TransactionParams {
        interface: INTERFACE_BLE,
        ..TransactionParams::default()
    }
}

fn session(id: &ReaderIdentity, now: Instant) -> ReaderSession {
    ReaderSession::new(
        id,
        params(),
        Randomness::generate(&mut OsRng),
        BleVersions::default(),
        now,
        Duration::from_secs(5),
    )
}

fn phone(id: &ReaderIdentity) -> Endpoint {
    let mut cfg = EndpointConfig::new(
        SecretKey::random(&mut OsRng),
        vec![ReaderGroupCredential {
            group_id: id.group_id,
            reader_group_key: id.private_key.public_key(),
        }],
    );
    cfg.interface_byte = INTERFACE_BLE;
    Endpoint::new(cfg, Box::new(OsRandom))
}

/// The phone's INITIATE frame: its SELECT FCI's A5 TLV in a notification.
fn initiate(ep: &mut Endpoint) -> Vec<u8> {
    let select = [
        &[0x00, 0xA4, 0x04, 0x00, 0x09][..],
        &consts::AID_EXPEDITED,
        &[0x00],
    ]
    .concat();
    let r = ep.handle(&select);
    let resp = ResponseApdu::parse(&r).unwrap();
    let fci = tlv::parse_all(resp.data).unwrap();
    let a5 = tlv::find(&fci[0].children().unwrap(), tag::FCI_PROPRIETARY)
        .unwrap()
        .raw
        .to_vec();
    Message::new(
        PROTOCOL_NOTIFICATION,
        NOTIFY_INITIATE_ACCESS_PROTOCOL,
        initiate_payload(&a5).unwrap(),
    )
    .encode()
    .unwrap()
}

/// Runs a session against the in-memory phone; returns the outcome and the phone.
fn run(granted: bool) -> (SessionOutcome, Endpoint, Vec<u8>) {
    let id = identity();
    let now = Instant::now();
    let mut s = session(&id, now);
    let mut ep = phone(&id);
    let mut inbox = initiate(&mut ep);
    let mut last_frame = Vec::new();
    for _ in 0..10 {
        let mut events = s.on_bytes(&inbox, now).unwrap();
        inbox.clear();
        while let Some(ev) = (!events.is_empty()).then(|| events.remove(0)) {
            match ev {
                Event::Send(frame) => {
                    let m = Message::parse(&frame).unwrap();
                    last_frame = frame;
                    if m.is(PROTOCOL_AP, message::AP_RQ) {
                        let r = ep.handle(&m.payload);
                        inbox.extend(Message::ap_response(r).encode().unwrap());
                    }
                }
                Event::Authenticated(e) => {
                    assert_eq!(e.public_key, ep.config().public_key_sec1());
                    events.extend(s.decide(granted, now).unwrap());
                }
                Event::Done(o) => return (o, ep, last_frame),
            }
        }
    }
    panic!("session did not finish");
}

#[test]
fn grant_sends_ursk_exchange_then_unsecured_notification() {
    let (outcome, ep, last) = run(true);
    assert_eq!(
        outcome,
        SessionOutcome::Completed {
            reader_state: READER_STATE_UNSECURED
        }
    );
    let m = Message::parse(&last).unwrap();
    assert!(m.is(PROTOCOL_NOTIFICATION, NOTIFY_ACCESS_PROTOCOL_COMPLETED));
    // Encrypted: plaintext (4 bytes) + tag.
    assert_eq!(m.payload.len(), 4 + 16);
    assert!(ep.is_authenticated());
}

#[test]
fn deny_sends_secured_notification_without_exchange() {
    let (outcome, _, last) = run(false);
    assert_eq!(
        outcome,
        SessionOutcome::Completed {
            reader_state: READER_STATE_SECURED
        }
    );
    assert_eq!(
        last[..2],
        [PROTOCOL_NOTIFICATION, NOTIFY_ACCESS_PROTOCOL_COMPLETED]
    );
}

#[test]
fn wrong_first_message_and_bad_initiate_end_the_session() {
    let id = identity();
    let now = Instant::now();
    let mut s = session(&id, now);
    let ap = Message::ap_response(vec![0x90, 0x00]).encode().unwrap();
    assert!(matches!(
        s.on_bytes(&ap, now),
        Err(BleError::Unexpected { .. })
    ));
    assert!(s.is_done());
    for payload in [
        vec![],
        vec![0x00, 0x02, 0x5C, 0x00],                   // not A5
        vec![0x00, 0x04, 0xA5, 0x02, 0x80, 0x00, 0x00], // attribute overruns
        vec![0x00, 0x03, 0xA5, 0x00, 0x00],             // trailing byte after the TLV
    ] {
        let mut s = session(&id, now);
        let f = Message::new(
            PROTOCOL_NOTIFICATION,
            NOTIFY_INITIATE_ACCESS_PROTOCOL,
            payload.clone(),
        )
        .encode()
        .unwrap();
        assert!(s.on_bytes(&f, now).is_err(), "{payload:02X?}");
    }
}

#[test]
fn silent_phone_times_out_and_decide_needs_authentication() {
    let id = identity();
    let t0 = Instant::now();
    let mut s = session(&id, t0);
    assert!(s.poll(t0 + Duration::from_millis(4999)).is_ok());
    assert!(matches!(s.decide(true, t0), Err(BleError::State(..))));
    let mut s = session(&id, t0);
    assert_eq!(
        s.poll(t0 + Duration::from_secs(5)),
        Err(BleError::TimedOut(Duration::from_secs(5)))
    );
    assert!(s.is_done());
    // Bytes after the deadline are refused too.
    let mut s = session(&id, t0);
    assert!(s.on_bytes(&[0x02], t0 + Duration::from_secs(6)).is_err());
}

#[test]
fn arbitrary_bytes_never_panic_and_always_end_or_wait() {
    let id = identity();
    let now = Instant::now();
    let mut seed = 0x9E37_79B9u32;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        seed
    };
    for _ in 0..300 {
        let mut s = session(&id, now);
        // A plausible header (type 0..=2, small length) followed by random bytes, so the
        // input reaches the message handlers and not only the deframer.
        let len = (next() % 40) as usize;
        let mut bytes = vec![(next() % 3) as u8, (next() % 6) as u8, 0, len as u8];
        bytes.extend((0..len).map(|_| next() as u8));
        match s.on_bytes(&bytes, now) {
            Ok(events) => assert!(events.iter().all(|e| matches!(e, Event::Send(_)))),
            Err(_) => assert!(s.is_done()),
        }
    }
}

#[test]
fn completion_payload_layout() {
    assert_eq!(
        completion_payload(READER_STATE_UNSECURED).unwrap(),
        [ATTR_READER_INFORMATION, 2, 0, READER_STATE_UNSECURED]
    );
    assert_eq!(
        initiate_payload(&[0xA5, 0x00]).unwrap(),
        [0x00, 0x02, 0xA5, 0x00]
    );
}
