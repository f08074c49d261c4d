//! One door's BLE side: the BlueZ adapter ([`crate::ble::adapter`]) as a transport of the
//! access pipeline ([`super::access`]): the Aliro reader core (interface C3) authenticates the
//! phone, the pipeline decides, hands a grant's card to the [`PanelSink`], waits for the
//! panel's verdict and records the event with transport `ble`.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;

use crate::aliro::consts::INTERFACE_BLE;
use crate::aliro::reader::{Randomness, ReaderIdentity, TransactionParams};
use crate::aliro::AuthenticatedEndpoint;
use crate::ble::adapter::{self, AdapterConfig, AdapterStats, ConnectionHandler, ConnectionReport};
use crate::ble::policy::{Mode, Policy};
use crate::ble::{BleVersions, ReaderSession};
use crate::config::{BleMode, Door, DoorBle};
use crate::events::Transport;

use super::access::{
    Access, AccessError, AccessStore, Attempt, Failure, PanelSink, SharedLimiter, Subject,
};
use super::store::StoreHandle;

/// What decided a BLE connection: the pipeline's attempt, or why it could not decide.
#[derive(Debug)]
pub struct BleVerdict {
    pub attempt: Attempt,
    pub error: Option<AccessError>,
}

/// Everything a door's BLE side needs; its options are the door's own (`door.ble`).
pub struct BleDoorRuntime {
    pub door: Arc<Door>,
    pub identity: Arc<ReaderIdentity>,
    pub store: StoreHandle,
    /// Counters the adapter keeps (tests and status read them).
    pub stats: Arc<AdapterStats>,
    /// The door's failure rate limit, shared with its NFC side.
    pub limiter: SharedLimiter,
}

#[derive(Clone)]
struct Handler<P, S = StoreHandle> {
    access: Access<P, S>,
    identity: Arc<ReaderIdentity>,
    ble: Arc<DoorBle>,
}

impl<P: PanelSink, S: AccessStore> ConnectionHandler for Handler<P, S> {
    type Verdict = BleVerdict;

    fn session(&self, now: Instant) -> ReaderSession {
        let params = TransactionParams {
            interface: INTERFACE_BLE,
            // A sensitive door asks for user verification, as on NFC.
            auth_policy: self.access.door.aliro_auth_policy(),
            ..TransactionParams::default()
        };
        ReaderSession::new(
            &self.identity,
            params,
            Randomness::generate(&mut rand_core::OsRng),
            BleVersions::default(),
            now,
            self.ble.timeout(),
        )
    }

    async fn decide(&self, endpoint: &AuthenticatedEndpoint, started: Instant) -> BleVerdict {
        // The session's own limit runs from the accept (`started`).
        let left = self.ble.timeout().saturating_sub(started.elapsed());
        let mut attempt =
            self.access
                .begin(Transport::Ble, started, tokio::time::Instant::now() + left);
        let subject = Subject::Endpoint {
            key: endpoint.public_key,
            signaling_bitmap: endpoint.signaling_bitmap,
        };
        let error = self.access.decide(&mut attempt, subject).await.err();
        BleVerdict { attempt, error }
    }

    async fn confirm(&self, verdict: &mut BleVerdict) {
        self.access
            .panel_verdict(&mut verdict.attempt, self.ble.panel_verdict_wait())
            .await;
    }

    fn granted(verdict: &BleVerdict) -> bool {
        verdict.attempt.phone_granted()
    }

    async fn finished(&self, report: ConnectionReport<BleVerdict>) {
        let (mut attempt, error) = match report.verdict {
            Some(v) => (v.attempt, v.error),
            None => {
                let started = Instant::now()
                    .checked_sub(report.total)
                    .unwrap_or_else(Instant::now);
                let a = self
                    .access
                    .begin(Transport::Ble, started, tokio::time::Instant::now());
                (a, None)
            }
        };
        if attempt.subject.is_none() {
            attempt.subject = report.endpoint_key.map(|key| Subject::Endpoint {
                key,
                signaling_bitmap: None,
            });
        }
        let failure = match (&report.error, &error, report.closed_early) {
            (Some(e), _, _) => Some(Failure {
                code: e.code(),
                message: format!("connection from {}: {e}", report.peer),
            }),
            (None, Some(e), _) => Some(Failure {
                code: e.code(),
                message: format!("connection from {}: {e}", report.peer),
            }),
            (None, None, true) => Some(Failure {
                code: "ble_closed",
                message: format!("connection from {} closed early", report.peer),
            }),
            _ => None,
        };
        // Only identified phones count for the rate limit (the attempt is not
        // `blame_unidentified`): a connection that never authenticated is bounded by the
        // connection limit and the Aliro timeout instead.
        self.access.finish(&attempt, failure, None).await;
    }
}

/// Serves the door over BLE until `shutdown` turns true.
pub async fn run_ble_door<P: PanelSink>(
    rt: BleDoorRuntime,
    panel: P,
    shutdown: watch::Receiver<bool>,
) {
    let Some(ble) = rt.door.ble.clone() else {
        log::error!(target: "keyway::ble", door = rt.door.id.as_str();
            "door {}: no BLE options; not served over BLE", rt.door.id);
        return;
    };
    let cfg = AdapterConfig {
        door: rt.door.id.clone(),
        adapter: ble.adapter.clone(),
        group_id: rt.door.group_id,
        sub_id: rt.door.sub_id,
        spsm: ble.spsm,
        max_connections: ble.max_connections,
        tx_power: 0,
        policy: Policy {
            mode: match ble.mode {
                BleMode::Tap => Mode::Tap,
                BleMode::WalkUp => Mode::WalkUp,
            },
            rssi_threshold_dbm: ble.rssi_threshold_dbm,
        },
    };
    let handler = Handler {
        access: Access::new(rt.door, rt.store, panel, rt.limiter),
        identity: rt.identity,
        ble: Arc::new(ble),
    };
    adapter::serve(cfg, handler, rt.stats, shutdown).await;
}

#[cfg(test)]
mod tests {
    //! The daemon's BLE decision path in memory: the door's handler (session, ACL, door
    //! policy, panel verdict) against the project's BLE phone, without BlueZ (the VM test
    //! `tests/ble_hil.rs` covers the adapter).
    use super::*;
    use crate::acl::{fingerprint, Decision, DenyReason};
    use crate::aliro::consts::SIGNALING_USER_VERIFIED_BIT;
    use crate::ble::Event;
    use crate::daemon::access::testutil::{door, sec1, setup, Panel, Setup};
    use crate::daemon::access::{shared_limiter, RateLimitConfig};
    use crate::osdp::Verdict;
    use crate::sim::ble_phone::{BlePhone, PhoneEvent};
    use crate::sim::{EndpointConfig, OsRandom, ReaderGroupCredential};
    use std::time::Duration;

    /// The shared store and reader: one enrolled phone at door "front".
    type Rig = Setup;

    fn rig() -> Rig {
        setup(None, None, "front")
    }

    fn handler(r: &Rig, sensitive: bool, panel: Panel) -> Handler<Panel> {
        handler_with(r, sensitive, panel, RateLimitConfig::default())
    }

    fn handler_with(
        r: &Rig,
        sensitive: bool,
        panel: Panel,
        limit: RateLimitConfig,
    ) -> Handler<Panel> {
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
        Handler {
            access: Access::new(
                Arc::new(door),
                r.store.clone(),
                panel,
                shared_limiter(limit),
            ),
            identity: Arc::new(ReaderIdentity::new(
                r.identity.group_id,
                r.identity.sub_id,
                r.identity.private_key.clone(),
            )),
            ble: Arc::new(ble),
        }
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
            h.access.door.aliro_auth_policy(),
            crate::config::AuthPolicy::ForceUserAuth.code()
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
            .access
            .limiter()
            .lock()
            .unwrap()
            .is_limited(&fp, Instant::now()));
    }
}
