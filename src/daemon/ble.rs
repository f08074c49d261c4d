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

/// One door's BLE connection handler: each authenticated phone goes through the door's access
/// pipeline.
#[derive(Clone)]
pub struct Handler<P, S = StoreHandle> {
    access: Access<P, S>,
    identity: Arc<ReaderIdentity>,
    ble: Arc<DoorBle>,
}

impl<P, S> Handler<P, S> {
    pub fn new(access: Access<P, S>, identity: Arc<ReaderIdentity>, ble: Arc<DoorBle>) -> Self {
        Self {
            access,
            identity,
            ble,
        }
    }

    /// The door's pipeline this handler feeds.
    pub fn access(&self) -> &Access<P, S> {
        &self.access
    }
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
    let handler = Handler::new(
        Access::new(rt.door, rt.store, panel, rt.limiter),
        rt.identity,
        Arc::new(ble),
    );
    adapter::serve(cfg, handler, rt.stats, shutdown).await;
}
