//! The daemon's BLE decision path in memory: the door's handler (session, ACL, door
//! policy, panel verdict) against the project's BLE phone, without BlueZ (the VM test
//! `tests/ble_hil.rs` covers the adapter).
use keyway::acl::{fingerprint, Decision, DenyReason};
use keyway::aliro::consts::SIGNALING_USER_VERIFIED_BIT;
use keyway::aliro::reader::ReaderIdentity;
use keyway::ble::adapter::{ConnectionHandler, ConnectionReport};
use keyway::ble::BleVersions;
use keyway::ble::Event;
use keyway::config::{BleMode, Door, DoorBle};
use keyway::daemon::access::Access;
use keyway::daemon::access::{shared_limiter, RateLimitConfig};
use keyway::daemon::ble::*;
use keyway::osdp::Verdict;
use keyway_sim::ble_phone::{BlePhone, PhoneEvent};
use keyway_sim::door::{door, sec1, setup, Panel, Setup};
use keyway_sim::{EndpointConfig, OsRandom, ReaderGroupCredential};
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

/// The shared store and reader: one enrolled phone at door "front".
type Rig = Setup;

fn rig() -> Rig {
    setup(None, None, "front")
}

fn handler(r: &Rig, sensitive: bool, panel: Panel) -> Handler<Panel> {
    handler_with(r, sensitive, panel, RateLimitConfig::default())
}

fn handler_with(r: &Rig, sensitive: bool, panel: Panel, limit: RateLimitConfig) -> Handler<Panel> {
    let ble = DoorBle {
        enabled: true,
        adapter: None,
        rssi_threshold_dbm: -70,
        mode: BleMode::Tap,
        max_connections: 4,
        spsm: 0x80,
        timeout_ms: 5000,
        panel_verdict_wait_ms: Some(1000),
    };
    let door = Door {
        sensitive,
        ble: Some(ble.clone()),
        ..door()
    };
    Handler::new(
        Access::new(
            Arc::new(door),
            r.store.clone(),
            panel,
            shared_limiter(limit),
        ),
        Arc::new(ReaderIdentity::new(
            r.identity.group_id,
            r.identity.sub_id,
            r.identity.private_key.clone(),
        )),
        Arc::new(ble),
    )
}

/// One connection as the adapter runs it; returns what the phone was told and the verdict.
async fn connect(h: &Handler<Panel>, r: &Rig, signaling_bitmap: u16) -> (u8, BleVerdict) {
    let cred = ReaderGroupCredential {
        group_id: [1; 16],
        reader_group_key: r.identity.private_key.public_key(),
    };
    let mut cfg = EndpointConfig::new(r.enrolled.clone(), vec![cred]);
    cfg.signaling_bitmap = signaling_bitmap;
    let mut phone = BlePhone::new(cfg, Box::new(OsRandom), BleVersions::default());
    let now = Instant::now();
    let mut session = h.session(now);
    let mut inbox = phone.initiate().unwrap();
    let mut verdict = None;
    for _ in 0..10 {
        let mut events = session.on_bytes(&inbox, now).unwrap();
        inbox.clear();
        while !events.is_empty() {
            match events.remove(0) {
                Event::Send(frame) => {
                    for ev in phone.on_bytes(&frame).unwrap() {
                        match ev {
                            PhoneEvent::Send(f) => inbox.extend(f),
                            PhoneEvent::Completed { reader_state } => {
                                return (reader_state, verdict.expect("decided"));
                            }
                        }
                    }
                }
                Event::Authenticated(ep) => {
                    let mut v = h.decide(&ep, now).await;
                    h.confirm(&mut v).await;
                    events.extend(session.decide(Handler::<Panel>::granted(&v), now).unwrap());
                    verdict = Some(v);
                }
                Event::Done(_) => {}
            }
        }
    }
    panic!("the connection did not finish");
}

#[tokio::test]
async fn a_sensitive_door_needs_user_verification_over_ble_too() {
    let r = rig();
    let panel = Panel::default();
    let h = handler(&r, true, panel.clone());
    // The session asks the phone for user verification (AUTH0 policy 03).
    assert_eq!(
        h.access().door.aliro_auth_policy(),
        keyway::config::AuthPolicy::ForceUserAuth.code()
    );
    let (told, v) = connect(&h, &r, 0).await;
    assert_eq!(told, 0x00, "secured");
    assert!(matches!(
        v.attempt.decision,
        Some(Decision::Deny(DenyReason::UserVerificationRequired))
    ));
    assert!(panel.cards().is_empty(), "no card to the panel");
    let (told, v) = connect(&h, &r, SIGNALING_USER_VERIFIED_BIT).await;
    assert_eq!(told, 0x01, "unsecured");
    assert!(v.attempt.granted());
    assert_eq!(panel.cards().len(), 1);
}

#[tokio::test]
async fn the_panel_has_the_last_word() {
    let r = rig();
    // A plain door grants without user verification; the panel then refuses.
    let refusing = Panel::answering(Verdict::Denied);
    let h = handler(&r, false, refusing.clone());
    let (told, v) = connect(&h, &r, 0).await;
    assert!(v.attempt.granted());
    assert_eq!(
        (told, v.attempt.panel_verdict),
        (0x00, Some(Verdict::Denied))
    );
    assert_eq!(refusing.cards().len(), 1);
    let granting = Panel::answering(Verdict::Granted);
    let h = handler(&r, false, granting);
    let (told, v) = connect(&h, &r, 0).await;
    assert_eq!(
        (told, v.attempt.panel_verdict),
        (0x01, Some(Verdict::Granted))
    );
    // A panel that tells nothing leaves keyway's grant standing.
    let h = handler(&r, false, Panel::default());
    let (told, v) = connect(&h, &r, 0).await;
    assert_eq!((told, v.attempt.panel_verdict), (0x01, None));
}

#[tokio::test]
async fn repeated_failures_are_rate_limited_like_on_nfc() {
    let r = rig();
    let panel = Panel::default();
    // No free failure, a penalty far longer than the test: no timing involved.
    let limit = RateLimitConfig {
        free_failures: 0,
        base_penalty: Duration::from_secs(600),
        max_penalty: Duration::from_secs(600),
        ..RateLimitConfig::default()
    };
    let h = handler_with(&r, true, panel.clone(), limit);
    // A failure (no user verification at a sensitive door), reported as the adapter does.
    let (_, v) = connect(&h, &r, 0).await;
    let key = sec1(&r.enrolled);
    let report = |v| ConnectionReport {
        peer: "00:00:00:00:00:01".into(),
        endpoint_key: Some(key),
        verdict: Some(v),
        outcome: None,
        error: None,
        closed_early: false,
        to_decision: None,
        total: Duration::ZERO,
    };
    h.finished(report(v)).await;
    // Now even a verified phone is refused without an ACL lookup, and no card goes out.
    let (told, v) = connect(&h, &r, SIGNALING_USER_VERIFIED_BIT).await;
    assert_eq!(told, 0x00);
    assert!(matches!(
        v.attempt.decision,
        Some(Decision::Deny(DenyReason::RateLimited))
    ));
    assert!(panel.cards().is_empty());
    // The same limiter is the door's NFC one (the daemon hands both sides one Arc).
    let fp = fingerprint(&key);
    assert!(h
        .access()
        .limiter()
        .lock()
        .unwrap()
        .is_limited(&fp, Instant::now()));
}
