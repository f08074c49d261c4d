//! One door's BLE side: the BlueZ adapter ([`crate::ble::adapter`]) with the same decision path
//! as NFC — the Aliro reader core (interface C3), the ACL in the store, the card number to the
//! [`PanelSink`], and an event with transport `ble`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::acl::Decision;
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

use super::door::PanelSink;
use super::store::StoreHandle;
use super::tap::{panel_verdict, VerdictWait};

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
}

#[derive(Clone)]
struct Handler<P> {
    door: Arc<Door>,
    identity: Arc<ReaderIdentity>,
    store: StoreHandle,
    ble: Arc<DoorBle>,
    panel: P,
    panel_verdict_wait: Duration,
}

impl<P: PanelSink> ConnectionHandler for Handler<P> {
    type Verdict = BleVerdict;

    fn session(&self, now: Instant) -> ReaderSession {
        let params = TransactionParams {
            interface: INTERFACE_BLE,
            auth_policy: self.door.auth_policy.code(),
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
        let decision = self
            .store
            .decide(
                &endpoint.public_key,
                &self.door.id,
                time::OffsetDateTime::now_utc(),
            )
            .await
            .map_err(|e| format!("store: {e}"))?;
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
