//! One door's NFC side: its reader loop, a tap per card presentation through the access
//! pipeline. The same code runs in the daemon and in the hardware-in-the-loop tests, which
//! swap the OSDP bus for a [`PanelSink`] that records what it was given.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;

use crate::aliro::reader::{Randomness, ReaderIdentity, TransactionParams};
use crate::config::{Door, NfcConfig};
use crate::logging::catalog;
use crate::nfc::{ReaderEvent, ReaderLoop, ReaderLoopConfig};

use super::access::{Access, PanelSink, SharedLimiter};
use super::store::StoreHandle;
use super::tap::{run_tap, TapContext};

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

/// Serves the door until `shutdown` turns true.
pub async fn run_door<P: PanelSink>(rt: DoorRuntime, panel: P, shutdown: watch::Receiver<bool>) {
    run_door_observed(rt, panel, shutdown, |_| {}).await
}

/// [`run_door`], telling `observe` about the reader too (for `keyway status`).
pub async fn run_door_observed<P: PanelSink>(
    rt: DoorRuntime,
    panel: P,
    shutdown: watch::Receiver<bool>,
    observe: impl Fn(&ReaderEvent),
) {
    let loop_cfg = ReaderLoopConfig {
        door: rt.door.id.clone(),
        pattern: rt.door.reader_pattern.clone(),
        apdu_timeout: rt.nfc.apdu_timeout(),
        retry: rt.nfc.reader_retry(),
    };
    let door_id = rt.door.id.clone();
    let reader_pattern = rt.door.reader_pattern.clone();
    let access = Access::new(rt.door.clone(), rt.store.clone(), panel, rt.limiter.clone());
    let ctx = TapContext {
        access: &access,
        identity: &rt.identity,
        // A sensitive door asks the phone to verify its user (policy 03) and checks it did.
        params: TransactionParams::nfc(rt.door.aliro_auth_policy()),
        transaction_timeout: rt.nfc.transaction_timeout(),
        panel_verdict_wait: rt.nfc.panel_verdict_wait(),
    };
    let ctx = &ctx;
    ReaderLoop::new(loop_cfg)
        .run(
            shutdown,
            |link| async move {
                let started = Instant::now();
                // Failures nobody could be blamed for make the reader pause before the next
                // card, so a broken or hostile card cannot busy-loop it.
                let pause = ctx.access.unidentified_pause(started);
                if !pause.is_zero() {
                    log::info!(target: "keyway::nfc", door = ctx.access.door.id.as_str();
                        "door {}: pausing {} ms after repeated failures", ctx.access.door.id, pause.as_millis());
                    tokio::time::sleep(pause).await;
                }
                let randomness = Randomness::generate(&mut rand_core::OsRng);
                run_tap(ctx, &link, randomness, started).await;
            },
            |ev| {
                log_reader_event(&door_id, &reader_pattern, &ev);
                observe(&ev);
            },
        )
        .await;
}

fn log_reader_event(door: &str, pattern: &str, ev: &ReaderEvent) {
    match ev {
        ReaderEvent::ReaderFound(name) => {
            log::info!(target: "keyway::nfc", door = door, reader = name.as_str(); "door {door}: reader found: {name}")
        }
        ReaderEvent::ReaderMissing(available) => {
            let available = if available.is_empty() {
                "none".to_string()
            } else {
                available.join(", ")
            };
            log::warn!(target: "keyway::nfc", door = door, message_id = catalog::READER_MISSING, available = available.as_str();
                "door {door}: no reader matches nfc.reader \"{pattern}\"; readers present: {available}")
        }
        ReaderEvent::ReaderLost(name) => {
            log::warn!(target: "keyway::nfc", door = door, reader = name.as_str(), message_id = catalog::READER_MISSING; "door {door}: reader lost: {name}")
        }
        ReaderEvent::ServiceDown(msg) => {
            log::warn!(target: "keyway::nfc", door = door, message_id = catalog::PCSC_UNAVAILABLE; "door {door}: PC/SC unavailable: {msg}")
        }
    }
}
