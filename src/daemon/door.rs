//! One door's NFC side: its reader loop, a tap per card presentation, the card number to the
//! panel, and the event. The same code runs in the daemon and in the hardware-in-the-loop
//! tests, which swap the OSDP bus for a [`PanelSink`] that records what it was given.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;

use crate::aliro::reader::{Randomness, ReaderIdentity, TransactionParams};
use crate::card::WiegandBits;
use crate::config::{Door, NfcConfig};
use crate::events::{self, AccessEvent, Transport};
use crate::nfc::{ReaderEvent, ReaderLoop, ReaderLoopConfig};

use super::store::StoreHandle;
use super::tap::{run_tap, TapContext, TapReport};

/// Where a granted card number goes: the door's OSDP PD in the daemon.
pub trait PanelSink: Clone + Send + Sync + 'static {
    /// Queues the card for the panel. `started` is when the card was presented (for timing).
    fn send_card(&self, door: &Door, bits: WiegandBits, started: Instant);
}

/// Everything a door's loop needs.
pub struct DoorRuntime {
    pub door: Arc<Door>,
    pub identity: Arc<ReaderIdentity>,
    pub store: StoreHandle,
    pub nfc: NfcConfig,
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
    ReaderLoop::new(loop_cfg)
        .run(
            shutdown,
            |link| {
                let panel = panel.clone();
                async move {
                    let started = Instant::now();
                    let ctx = TapContext {
                        door: &rt.door.id,
                        identity: &rt.identity,
                        params: TransactionParams::nfc(rt.door.auth_policy.code()),
                        store: &rt.store,
                        transaction_timeout: rt.nfc.transaction_timeout(),
                    };
                    let randomness = Randomness::generate(&mut rand_core::OsRng);
                    let report = run_tap(&ctx, &link, randomness, started, |bits| {
                        panel.send_card(&rt.door, bits, started)
                    })
                    .await;
                    record(&rt.store, &rt.door, report).await;
                }
            },
            |ev| log_reader_event(&door_id, &ev),
        )
        .await;
}

/// Turns a tap report into an event row (durable first) and a journald entry.
async fn record(store: &StoreHandle, door: &Door, report: TapReport) {
    if let Some(e) = &report.error {
        log::warn!(target: "keyway::nfc", door = door.id.as_str(), error = e.code();
            "door {}: tap ended: {e}", door.id);
    }
    let latency = report.to_decision.unwrap_or(report.total);
    let latency_ms = u32::try_from(latency.as_millis()).unwrap_or(u32::MAX);
    let now = events::unix_ms(time::OffsetDateTime::now_utc());
    let key = report.endpoint_key.as_ref().map(|k| k.as_slice());
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
