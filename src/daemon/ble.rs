//! One door's BLE side: the BlueZ adapter ([`crate::ble::adapter`]) with the same decision path
//! as NFC — the Aliro reader core (interface C3), the ACL in the store, the card number to the
//! [`PanelSink`], and an event with transport `ble`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::acl::{fingerprint, Decision, DenyReason};
use crate::aliro::consts::INTERFACE_BLE;
use crate::aliro::reader::{Randomness, ReaderIdentity, TransactionParams};
use crate::aliro::AuthenticatedEndpoint;
use crate::ble::adapter::{self, AdapterConfig, AdapterStats, ConnectionHandler, ConnectionReport};
use crate::ble::policy::{Mode, Policy};
use crate::ble::{BleVersions, ReaderSession};
use crate::card;
use crate::config::{BleMode, Door, DoorBle};
use crate::events::{self, AccessEvent, Transport};
use crate::osdp::Verdict;

use super::door::{count_for_rate_limit, PanelSink, SharedLimiter};
use super::store::StoreHandle;
use super::tap::{apply_door_policy, panel_verdict, VerdictWait};

/// What decided a BLE connection.
#[derive(Debug)]
pub struct BleVerdict {
    /// What the ACL said, or why it could not say.
    pub decision: Result<Decision, String>,
    /// The panel's verdict on a granted card, when it came within the door's wait.
    pub panel: Option<Verdict>,
    /// Where that verdict will come from, until [`ConnectionHandler::confirm`] waited for it.
    waiting: Option<VerdictWait>,
}

/// Everything a door's BLE side needs.
pub struct BleDoorRuntime {
    pub door: Arc<Door>,
    pub identity: Arc<ReaderIdentity>,
    pub store: StoreHandle,
    pub ble: DoorBle,
    /// Counters the adapter keeps (tests and status read them).
    pub stats: Arc<AdapterStats>,
    /// The door's failure rate limit, shared with its NFC side.
    pub limiter: SharedLimiter,
}

#[derive(Clone)]
struct Handler<P> {
    door: Arc<Door>,
    identity: Arc<ReaderIdentity>,
    store: StoreHandle,
    ble: Arc<DoorBle>,
    panel: P,
    panel_verdict_wait: Duration,
    limiter: SharedLimiter,
}

impl<P: PanelSink> ConnectionHandler for Handler<P> {
    type Verdict = BleVerdict;

    fn session(&self, now: Instant) -> ReaderSession {
        let params = TransactionParams {
            interface: INTERFACE_BLE,
            // A sensitive door asks for user verification, as on NFC.
            auth_policy: self.door.aliro_auth_policy(),
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
        match self.acl_decision(endpoint, started).await {
            Ok((decision, waiting)) => BleVerdict {
                decision: Ok(decision),
                panel: None,
                waiting,
            },
            Err(e) => BleVerdict {
                decision: Err(e),
                panel: None,
                waiting: None,
            },
        }
    }

    async fn confirm(&self, verdict: &mut BleVerdict) {
        let waiting = verdict.waiting.take();
        verdict.panel = panel_verdict(&self.door.id, waiting, self.panel_verdict_wait).await;
    }

    fn granted(verdict: &BleVerdict) -> bool {
        // As on NFC, the panel has the last word on what the phone is told.
        matches!(verdict.decision, Ok(Decision::Grant(_))) && verdict.panel != Some(Verdict::Denied)
    }

    async fn finished(&self, report: ConnectionReport<BleVerdict>) {
        // Only identified phones count: a connection that never authenticated (silent, garbage,
        // walked away) is bounded by the connection limit and the Aliro timeout instead.
        if let Some(key) = &report.endpoint_key {
            // keyway's own decision, as on NFC (a panel's refusal is not the phone's failure).
            let granted = report
                .verdict
                .as_ref()
                .is_some_and(|v| matches!(v.decision, Ok(Decision::Grant(_))));
            count_for_rate_limit(&self.limiter, &self.door.id, &fingerprint(key), granted);
        }
        record(&self.store, &self.door, report).await;
    }
}

impl<P: PanelSink> Handler<P> {
    /// The ACL's answer; a grant's card goes to the panel, with the way to its verdict.
    async fn acl_decision(
        &self,
        endpoint: &AuthenticatedEndpoint,
        started: Instant,
    ) -> Result<(Decision, Option<VerdictWait>), String> {
        let limited = self
            .limiter
            .lock()
            .map(|l| l.is_limited(&fingerprint(&endpoint.public_key), Instant::now()))
            .unwrap_or(false);
        if limited {
            return Ok((Decision::Deny(DenyReason::RateLimited), None));
        }
        let decision = self
            .store
            .decide(
                &endpoint.public_key,
                &self.door.id,
                time::OffsetDateTime::now_utc(),
            )
            .await
            .map_err(|e| format!("store: {e}"))?;
        let decision = apply_door_policy(self.door.sensitive, decision, endpoint.signaling_bitmap);
        let mut waiting = None;
        if let Decision::Grant(g) = &decision {
            let bits = card::encode(g.card_format, g.facility_code, g.card_number)
                .map_err(|e| format!("card: {e}"))?;
            // Before the phone is told, as on NFC: the RAW leaves at the next poll.
            waiting = self.panel.await_verdict(&self.door);
            self.panel.send_card(&self.door, bits, started);
        }
        Ok((decision, waiting))
    }
}

/// Serves the door over BLE until `shutdown` turns true.
pub async fn run_ble_door<P: PanelSink>(
    rt: BleDoorRuntime,
    panel: P,
    shutdown: watch::Receiver<bool>,
) {
    let cfg = AdapterConfig {
        door: rt.door.id.clone(),
        adapter: rt.ble.adapter.clone(),
        group_id: rt.door.group_id,
        sub_id: rt.door.sub_id,
        spsm: rt.ble.spsm,
        max_connections: rt.ble.max_connections,
        tx_power: 0,
        policy: Policy {
            mode: match rt.ble.mode {
                BleMode::Tap => Mode::Tap,
                BleMode::WalkUp => Mode::WalkUp,
            },
            rssi_threshold_dbm: rt.ble.rssi_threshold_dbm,
        },
    };
    let handler = Handler {
        panel_verdict_wait: rt.ble.panel_verdict_wait(),
        limiter: rt.limiter,
        door: rt.door,
        identity: rt.identity,
        store: rt.store,
        ble: Arc::new(rt.ble),
        panel,
    };
    adapter::serve(cfg, handler, rt.stats, shutdown).await;
}

/// A connection report as an event row (durable first) and a journald entry.
async fn record(store: &StoreHandle, door: &Door, report: ConnectionReport<BleVerdict>) {
    let decision = report.verdict.as_ref().map(|v| &v.decision);
    let error_code = match (&report.error, decision, report.closed_early) {
        (Some(e), _, _) => Some(e.code().to_string()),
        (None, Some(Err(e)), _) => {
            log::error!(target: "keyway::ble", door = door.id.as_str(); "door {}: {e}", door.id);
            Some("store_error".into())
        }
        (None, _, true) => Some("ble_closed".into()),
        _ => None,
    };
    if let Some(code) = &error_code {
        log::warn!(target: "keyway::ble", door = door.id.as_str(), error = code.as_str(), peer = report.peer.as_str();
            "door {}: BLE connection from {} ended: {code}", door.id, report.peer);
    }
    let latency = report.to_decision.unwrap_or(report.total);
    let latency_ms = u32::try_from(latency.as_millis()).unwrap_or(u32::MAX);
    let now = events::unix_ms(time::OffsetDateTime::now_utc());
    let key = report.endpoint_key.as_ref().map(|k| k.as_slice());
    let event = match (decision, key) {
        (Some(Ok(d)), Some(k)) => {
            AccessEvent::from_decision(now, &door.id, Transport::Ble, k, d, latency_ms)
        }
        (_, k) => AccessEvent::error(
            now,
            &door.id,
            Transport::Ble,
            k,
            error_code.as_deref().unwrap_or("no_decision"),
            latency_ms,
        ),
    };
    match store.record(event.clone()).await {
        Ok(id) => events::log_event(&event, id),
        Err(e) => {
            log::error!(target: "keyway::ble", door = door.id.as_str();
                "door {}: event could not be stored: {e}", door.id);
            events::log_event(&event, -1);
        }
    }
}

#[cfg(test)]
mod tests {
    //! The daemon's BLE decision path in memory: the door's handler (session, ACL, door
    //! policy, panel verdict) against the project's BLE phone, without BlueZ (the VM test
    //! `tests/ble_hil.rs` covers the adapter).
    use super::*;
    use crate::acl::DenyReason;
    use crate::aliro::consts::SIGNALING_USER_VERIFIED_BIT;
    use crate::ble::Event;
    use crate::card::WiegandBits;
    use crate::config::AuthPolicy;
    use crate::daemon::door::shared_limiter;
    use crate::nfc::ratelimit::RateLimitConfig;
    use crate::sim::ble_phone::{BlePhone, PhoneEvent};
    use crate::sim::{EndpointConfig, OsRandom, ReaderGroupCredential};
    use std::path::PathBuf;
    use std::sync::Mutex;
    use tokio::sync::oneshot;

    /// A panel that takes cards and, when `answer` is set, gives that verdict on each.
    #[derive(Clone, Default)]
    struct Panel {
        cards: Arc<Mutex<Vec<WiegandBits>>>,
        answer: Option<Verdict>,
        waiter: Arc<Mutex<Option<oneshot::Sender<Verdict>>>>,
    }

    impl PanelSink for Panel {
        fn send_card(&self, _door: &Door, bits: WiegandBits, _started: Instant) {
            self.cards.lock().unwrap().push(bits);
            if let (Some(v), Some(tx)) = (self.answer, self.waiter.lock().unwrap().take()) {
                let _ = tx.send(v);
            }
        }

        fn await_verdict(&self, _door: &Door) -> Option<VerdictWait> {
            self.answer?;
            let (tx, rx) = oneshot::channel();
            *self.waiter.lock().unwrap() = Some(tx);
            Some(rx)
        }
    }

    /// The NFC tap tests' store and reader: one enrolled phone at door "front".
    type Rig = crate::daemon::tap::tests::Setup;

    fn rig() -> Rig {
        crate::daemon::tap::tests::setup(None, None, "front")
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
        let door = Door {
            id: "front".into(),
            port: PathBuf::from("/dev/null"),
            baud: 9600,
            address: 0,
            outputs: 0,
            reader_pattern: "*".into(),
            group_id: [1; 16],
            sub_id: [2; 16],
            private_key_file: PathBuf::new(),
            auth_policy: AuthPolicy::UserDeviceSetting,
            sensitive,
            accept_cards: false,
            fast: false,
            step_up: None,
            certificate: None,
        };
        Handler {
            door: Arc::new(door),
            identity: Arc::new(ReaderIdentity::new(
                r.identity.group_id,
                r.identity.sub_id,
                r.identity.private_key.clone(),
            )),
            store: r.store.clone(),
            ble: Arc::new(DoorBle {
                enabled: true,
                adapter: None,
                rssi_threshold_dbm: -70,
                mode: BleMode::Tap,
                max_connections: 4,
                spsm: 0x80,
                timeout_ms: 5000,
                panel_verdict_wait_ms: Some(1000),
            }),
            panel,
            panel_verdict_wait: Duration::from_secs(1),
            limiter: shared_limiter(limit),
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
        assert_eq!(h.door.aliro_auth_policy(), AuthPolicy::ForceUserAuth.code());
        let (told, v) = connect(&h, &r, 0).await;
        assert_eq!(told, 0x00, "secured");
        assert!(matches!(
            v.decision,
            Ok(Decision::Deny(DenyReason::UserVerificationRequired))
        ));
        assert!(
            panel.cards.lock().unwrap().is_empty(),
            "no card to the panel"
        );
        let (told, v) = connect(&h, &r, SIGNALING_USER_VERIFIED_BIT).await;
        assert_eq!(told, 0x01, "unsecured");
        assert!(matches!(v.decision, Ok(Decision::Grant(_))));
        assert_eq!(panel.cards.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn the_panel_has_the_last_word() {
        let r = rig();
        // A plain door grants without user verification; the panel then refuses.
        let refusing = Panel {
            answer: Some(Verdict::Denied),
            ..Panel::default()
        };
        let h = handler(&r, false, refusing.clone());
        let (told, v) = connect(&h, &r, 0).await;
        assert!(matches!(v.decision, Ok(Decision::Grant(_))));
        assert_eq!((told, v.panel), (0x00, Some(Verdict::Denied)));
        assert_eq!(refusing.cards.lock().unwrap().len(), 1);
        let granting = Panel {
            answer: Some(Verdict::Granted),
            ..Panel::default()
        };
        let h = handler(&r, false, granting);
        let (told, v) = connect(&h, &r, 0).await;
        assert_eq!((told, v.panel), (0x01, Some(Verdict::Granted)));
        // A panel that tells nothing leaves keyway's grant standing.
        let h = handler(&r, false, Panel::default());
        let (told, v) = connect(&h, &r, 0).await;
        assert_eq!((told, v.panel), (0x01, None));
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
        let key: [u8; 65] = r
            .enrolled
            .public_key()
            .to_sec1_bytes()
            .as_ref()
            .try_into()
            .unwrap();
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
            v.decision,
            Ok(Decision::Deny(DenyReason::RateLimited))
        ));
        assert!(panel.cards.lock().unwrap().is_empty());
        // The same limiter is the door's NFC one (the daemon hands both sides one Arc).
        let fp = fingerprint(&key);
        assert!(h.limiter.lock().unwrap().is_limited(&fp, Instant::now()));
    }
}
