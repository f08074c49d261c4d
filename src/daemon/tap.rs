//! One tap, end to end: drive the Aliro reader core over a card channel, ask the ACL, hand a
//! granted card number to the panel, tell the phone, and describe what happened.
//!
//! Generic over the card channel so the whole flow runs in unit tests against the phone
//! emulator in memory; the daemon uses the PC/SC [`CardLink`](crate::nfc::CardLink).

use std::future::Future;
use std::time::{Duration, Instant};

use crate::acl::{Decision, DenyReason};
use crate::aliro::reader::{
    Action, Randomness, ReaderIdentity, ReaderTransaction, TransactionParams,
};
use crate::aliro::{AliroError, ReaderStatus};
use crate::card::{self, WiegandBits};
use crate::nfc::{CardLink, NfcError};

use super::store::{StoreError, StoreHandle};

/// Something that carries APDUs to a card or phone.
pub trait CardChannel {
    fn transmit(&self, capdu: &[u8]) -> impl Future<Output = Result<Vec<u8>, NfcError>> + Send;
}

impl CardChannel for CardLink {
    fn transmit(&self, capdu: &[u8]) -> impl Future<Output = Result<Vec<u8>, NfcError>> + Send {
        CardLink::transmit(self, capdu)
    }
}

/// Why a tap ended without a decision.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("{0}")]
    Nfc(#[from] NfcError),
    #[error("aliro: {0}")]
    Aliro(#[from] AliroError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("transaction took longer than {0:?}")]
    Timeout(Duration),
    #[error("unexpected {0} from the reader core")]
    Unexpected(&'static str),
    #[error("ACL entry cannot be encoded for the panel: {0}")]
    Card(#[from] card::CardError),
}

impl TapError {
    /// Stable code for events and logs.
    pub fn code(&self) -> &'static str {
        match self {
            TapError::Nfc(NfcError::CardGone) => "card_gone",
            TapError::Nfc(NfcError::Timeout(_)) | TapError::Timeout(_) => "timeout",
            TapError::Nfc(_) => "reader_error",
            TapError::Aliro(e) => e.code(),
            TapError::Store(_) => "store_error",
            TapError::Card(_) => "bad_card_data",
            TapError::Unexpected(_) => "internal_error",
        }
    }
}

/// What one tap produced.
#[derive(Debug)]
pub struct TapReport {
    /// The authenticated endpoint key, if authentication got that far.
    pub endpoint_key: Option<[u8; 65]>,
    pub decision: Option<Decision>,
    pub error: Option<TapError>,
    /// From card presence to the access decision.
    pub to_decision: Option<Duration>,
    pub total: Duration,
}

/// Per-door constants a tap needs.
pub struct TapContext<'a> {
    pub door: &'a str,
    pub identity: &'a ReaderIdentity,
    pub params: TransactionParams,
    pub store: &'a StoreHandle,
    pub transaction_timeout: Duration,
}

/// Runs one transaction. `on_grant` receives the card number for the panel the moment the
/// decision is made (before the phone is told), so the RAW leaves at the next poll.
pub async fn run_tap<C: CardChannel>(
    ctx: &TapContext<'_>,
    channel: &C,
    randomness: Randomness,
    started: Instant,
    on_grant: impl FnOnce(WiegandBits),
) -> TapReport {
    let mut report = TapReport {
        endpoint_key: None,
        decision: None,
        error: None,
        to_decision: None,
        total: Duration::ZERO,
    };
    let flow = transaction(ctx, channel, randomness, started, &mut report, on_grant);
    if let Err(e) = match tokio::time::timeout(ctx.transaction_timeout, flow).await {
        Ok(r) => r,
        Err(_) => Err(TapError::Timeout(ctx.transaction_timeout)),
    } {
        report.error = Some(e);
    }
    report.total = started.elapsed();
    report
}

async fn transaction<C: CardChannel>(
    ctx: &TapContext<'_>,
    channel: &C,
    randomness: Randomness,
    started: Instant,
    report: &mut TapReport,
    on_grant: impl FnOnce(WiegandBits),
) -> Result<(), TapError> {
    let mut tx = ReaderTransaction::new(ctx.identity, ctx.params.clone(), randomness);
    let mut on_grant = Some(on_grant);
    let mut capdu = tx.start();
    loop {
        let rapdu = channel.transmit(&capdu).await?;
        match tx.on_response(&rapdu)? {
            Action::Transmit(next) => capdu = next,
            Action::Authenticated(endpoint) => {
                let key = endpoint.public_key_sec1();
                report.endpoint_key = Some(key);
                let decision = ctx
                    .store
                    .decide(&key, ctx.door, time::OffsetDateTime::now_utc())
                    .await?;
                report.to_decision = Some(started.elapsed());
                let status = match &decision {
                    Decision::Grant(g) => {
                        let bits = card::encode(g.card_format, g.facility_code, g.card_number)?;
                        if let Some(f) = on_grant.take() {
                            f(bits);
                        }
                        ReaderStatus::AccessGranted
                    }
                    Decision::Deny(DenyReason::UnknownKey) => ReaderStatus::PublicKeyNotFound,
                    Decision::Deny(_) => ReaderStatus::AccessDenied,
                };
                report.decision = Some(decision);
                capdu = tx.complete(status)?;
            }
            Action::Done(_) => return Ok(()),
            // Only answers `ReaderTransaction::exchange`, which a plain tap never calls.
            Action::Exchanged(_) => return Err(TapError::Unexpected("EXCHANGE response")),
        }
    }
}
