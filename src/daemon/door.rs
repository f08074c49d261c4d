//! One door's NFC side: its reader loop, a tap per card presentation, the card number to the
//! panel, and the event. The same code runs in the daemon and in the hardware-in-the-loop
//! tests, which swap the OSDP bus for a [`PanelSink`] that records what it was given.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::watch;

use crate::aliro::reader::{Randomness, ReaderIdentity, TransactionParams};
use crate::card::WiegandBits;
use crate::config::{Door, NfcConfig};
use crate::events::{self, AccessEvent, Transport};
use crate::nfc::ratelimit::{RateLimitConfig, RateLimiter, UNIDENTIFIED};
use crate::nfc::{ReaderEvent, ReaderLoop, ReaderLoopConfig};

use super::store::StoreHandle;
use super::tap::{run_tap, TapContext, TapReport, VerdictWait};

/// Where a granted card number goes: the door's OSDP PD in the daemon.
pub trait PanelSink: Clone + Send + Sync + 'static {
    /// Queues the card for the panel. `started` is when the card was presented (for timing).
    fn send_card(&self, door: &Door, bits: WiegandBits, started: Instant);

    /// Called just before [`send_card`](Self::send_card): a receiver for the panel's verdict
    /// on that card, when this sink can learn it. The default learns nothing.
    fn await_verdict(&self, _door: &Door) -> Option<VerdictWait> {
        None
    }
}

/// Everything a door's loop needs.
pub struct DoorRuntime {
    pub door: Arc<Door>,
    pub identity: Arc<ReaderIdentity>,
    pub store: StoreHandle,
    pub nfc: NfcConfig,
    /// The door's failure rate limit, shared with its BLE side: a phone refused for repeated
    /// failures is refused on both transports.
    pub limiter: SharedLimiter,
}

/// One door's rate limiter, shared by its NFC reader loop and its BLE connections.
pub type SharedLimiter = Arc<Mutex<RateLimiter>>;

/// A fresh limiter with `cfg` ([`RateLimitConfig::default`] in the daemon).
pub fn shared_limiter(cfg: RateLimitConfig) -> SharedLimiter {
    Arc::new(Mutex::new(RateLimiter::new(cfg)))
}

/// Serves the door until `shutdown` turns true.
pub async fn run_door<P: PanelSink>(rt: DoorRuntime, panel: P, shutdown: watch::Receiver<bool>) {
    let loop_cfg = ReaderLoopConfig {
        door: rt.door.id.clone(),
        pattern: rt.door.reader_pattern.clone(),
        apdu_timeout: rt.nfc.apdu_timeout(),
        retry: rt.nfc.reader_retry(),
    };
    let door_id = rt.door.id.clone();
    let rt = &rt;
    let limiter: &Mutex<RateLimiter> = &rt.limiter;
    // A sensitive door asks the phone to verify its user (policy 03) and checks it did.
    let auth_policy = rt.door.aliro_auth_policy();
    ReaderLoop::new(loop_cfg)
        .run(
            shutdown,
            |link| {
                let panel = panel.clone();
                async move {
                    let started = Instant::now();
                    // Failures nobody could be blamed for make the reader pause before the
                    // next card, so a broken or hostile card cannot busy-loop it.
                    let pause = limiter
                        .lock()
                        .map(|l| l.remaining(UNIDENTIFIED, started))
                        .unwrap_or_default();
                    if !pause.is_zero() {
                        log::info!(target: "keyway::nfc", door = rt.door.id.as_str();
                            "door {}: pausing {} ms after repeated failures", rt.door.id, pause.as_millis());
                        tokio::time::sleep(pause).await;
                    }
                    let ctx = TapContext {
                        door: &rt.door.id,
                        identity: &rt.identity,
                        params: TransactionParams::nfc(auth_policy),
                        store: &rt.store,
                        transaction_timeout: rt.nfc.transaction_timeout(),
                        // FAST derives no step-up keys: a door requiring a document uses STANDARD.
                        fast: rt.door.fast && rt.door.step_up.is_none(),
                        require_user_verification: rt.door.sensitive,
                        limiter: Some(limiter),
                        accept_cards: rt.door.accept_cards,
                        step_up: rt.door.step_up.as_ref(),
                        certificate: rt.door.certificate.as_ref(),
                        panel_verdict_wait: rt.nfc.panel_verdict_wait(),
                    };
                    let randomness = Randomness::generate(&mut rand_core::OsRng);
                    let report = run_tap(&ctx, &link, randomness, started, |bits| {
                        let verdict = panel.await_verdict(&rt.door);
                        panel.send_card(&rt.door, bits, started);
                        verdict
                    })
                    .await;
                    count_for_rate_limit(
                        limiter,
                        &rt.door.id,
                        &report.limiter_identity(),
                        report.granted(),
                    );
                    record(&rt.store, &rt.door, report).await;
                }
            },
            |ev| log_reader_event(&door_id, &ev),
        )
        .await;
}

/// A grant clears the identity; anything else counts as one failure against it. Shared by the
/// NFC taps and the BLE connections of a door.
pub fn count_for_rate_limit(limiter: &Mutex<RateLimiter>, door: &str, id: &str, granted: bool) {
    let Ok(mut l) = limiter.lock() else {
        return;
    };
    if granted {
        l.success(id);
        return;
    }
    let penalty = l.failure(id, Instant::now());
    if !penalty.is_zero() {
        log::warn!(target: "keyway::daemon", door = door, identity = id;
            "door {door}: {id} failed repeatedly; refused for {} ms", penalty.as_millis());
    }
}

/// Turns a tap report into an event row (durable first) and a journald entry.
async fn record(store: &StoreHandle, door: &Door, report: TapReport) {
    if let Some(e) = &report.error {
        log::warn!(target: "keyway::nfc", door = door.id.as_str(), error = e.code();
            "door {}: tap ended: {e}", door.id);
    }
    if report.fast_candidates > 0 || report.fast {
        log::debug!(target: "keyway::nfc", door = door.id.as_str(), fast = report.fast;
            "door {}: FAST {} ({} stored keys tried)", door.id,
            if report.fast { "used" } else { "not matched" }, report.fast_candidates);
    }
    let latency = report.to_decision.unwrap_or(report.total);
    let latency_ms = u32::try_from(latency.as_millis()).unwrap_or(u32::MAX);
    let now = events::unix_ms(time::OffsetDateTime::now_utc());
    let key = report.subject();
    if report.card_uid.is_some() {
        log::info!(target: "keyway::nfc", door = door.id.as_str();
            "door {}: physical card (UID-only, clonable)", door.id);
    }
    let event = match (&report.decision, key, &report.error) {
        (Some(d), Some(k), _) => {
            AccessEvent::from_decision(now, &door.id, Transport::Nfc, k, d, latency_ms)
        }
        (_, k, Some(e)) => {
            AccessEvent::error(now, &door.id, Transport::Nfc, k, e.code(), latency_ms)
        }
        (_, k, None) => {
            AccessEvent::error(now, &door.id, Transport::Nfc, k, "no_decision", latency_ms)
        }
    };
    match store.record(event.clone()).await {
        Ok(id) => events::log_event(&event, id),
        Err(e) => {
            log::error!(target: "keyway::daemon", door = door.id.as_str();
                "door {}: event could not be stored: {e}", door.id);
            events::log_event(&event, -1);
        }
    }
}

fn log_reader_event(door: &str, ev: &ReaderEvent) {
    match ev {
        ReaderEvent::ReaderFound(name) => {
            log::info!(target: "keyway::nfc", door = door, reader = name.as_str(); "door {door}: reader found: {name}")
        }
        ReaderEvent::ReaderLost(name) => {
            log::warn!(target: "keyway::nfc", door = door, reader = name.as_str(); "door {door}: reader lost: {name}")
        }
        ReaderEvent::ServiceDown(msg) => {
            log::warn!(target: "keyway::nfc", door = door; "door {door}: PC/SC unavailable: {msg}")
        }
    }
}
