//! NFC: one tap, end to end. Drives the Aliro reader core over a card channel until the phone
//! (or card) is authenticated, then hands it to the access pipeline ([`super::access`]) for the
//! decision and the card to the panel, tells the phone, and lets the pipeline record it.
//!
//! Generic over the card channel so the whole flow runs in unit tests against the phone
//! emulator in memory; the daemon uses the PC/SC [`CardLink`](crate::nfc::CardLink).

use std::future::Future;
use std::time::{Duration, Instant};

use crate::acl::{Decision, DenyReason};
use crate::aliro::crypto::SymmetricKey;
use crate::aliro::document;
use crate::aliro::reader::{
    Action, AuthenticatedEndpoint, FastConfig, FastFallback, Outcome, Randomness,
    ReaderCertificate, ReaderIdentity, ReaderTransaction, Step, TransactionParams,
};
use crate::aliro::{AliroError, ReaderStatus};
use crate::config::StepUp;
use crate::events::Transport;
use crate::nfc::{CardLink, NfcError};

use super::access::{
    Access, AccessError, AccessStore, Attempt, Failure, FastUpdate, PanelSink, Subject,
};
use super::store::StoreHandle;

/// Something that carries APDUs to a card or phone.
pub trait CardChannel {
    fn transmit(&self, capdu: &[u8]) -> impl Future<Output = Result<Vec<u8>, NfcError>> + Send;
}

impl CardChannel for CardLink {
    fn transmit(&self, capdu: &[u8]) -> impl Future<Output = Result<Vec<u8>, NfcError>> + Send {
        CardLink::transmit(self, capdu)
    }
}

/// Why a tap ended without a decision (or, for a timeout, after one).
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("{0}")]
    Nfc(#[from] NfcError),
    #[error("aliro: {0}")]
    Aliro(#[from] AliroError),
    #[error("{0}")]
    Access(#[from] AccessError),
    #[error("transaction took longer than {0:?}")]
    Timeout(Duration),
    #[error("unexpected {0} from the reader core")]
    Unexpected(&'static str),
    #[error("the card has no Aliro application (and no usable UID where cards are accepted)")]
    NotAliro,
}

impl TapError {
    /// Stable code for events and logs.
    pub fn code(&self) -> &'static str {
        match self {
            TapError::Nfc(NfcError::CardGone) => "card_gone",
            TapError::Nfc(NfcError::Timeout(_)) | TapError::Timeout(_) => "timeout",
            TapError::Nfc(_) => "reader_error",
            TapError::Aliro(e) => e.code(),
            TapError::Access(e) => e.code(),
            TapError::Unexpected(_) => "internal_error",
            TapError::NotAliro => "not_aliro",
        }
    }
}

/// What one tap produced.
#[derive(Debug)]
pub struct TapReport {
    /// Subject, decision, attempt id and panel verdict, as the pipeline recorded them.
    pub attempt: Attempt,
    pub error: Option<TapError>,
    pub total: Duration,
    /// The endpoint was identified by its FAST cryptogram (no AUTH1 in this tap).
    pub fast: bool,
    /// FAST keys offered to the reader core in this tap.
    pub fast_candidates: usize,
}

/// The NFC side of one door: its pipeline, reader key and timing.
pub struct TapContext<'a, P, S = StoreHandle> {
    pub access: &'a Access<P, S>,
    pub identity: &'a ReaderIdentity,
    pub params: TransactionParams,
    pub transaction_timeout: Duration,
    /// After a grant, how long the phone's EXCHANGE waits for the panel's verdict (capped by
    /// the time left in the transaction).
    pub panel_verdict_wait: Duration,
}

impl<P, S> TapContext<'_, P, S> {
    /// FAST derives no step-up keys: a door requiring a document uses STANDARD.
    fn fast(&self) -> bool {
        self.access.door.fast && self.access.door.step_up.is_none()
    }
}

/// Signaling bitmap bit 0: an Access Document can be retrieved (reference constants).
const SIGNALING_ACCESS_DOCUMENT: u16 = 1 << 0;

/// ISO 7816 status "application not found", the answer of a card without Aliro to SELECT.
const APP_NOT_FOUND: u16 = 0x6A82;

/// GET DATA (PC/SC part 3): the UID of the card in the field.
pub const GET_UID_APDU: [u8; 5] = [0xFF, 0xCA, 0x00, 0x00, 0x00];

/// What the Aliro side of a tap learned, for FAST bookkeeping.
#[derive(Default)]
struct FastState {
    used: bool,
    candidates: usize,
    learned: Option<SymmetricKey>,
}

/// Runs one tap and records it. A granted card goes to the panel the moment the decision is
/// made (before the phone is told), so the RAW leaves at the next poll.
pub async fn run_tap<C: CardChannel, P: PanelSink, S: AccessStore>(
    ctx: &TapContext<'_, P, S>,
    channel: &C,
    randomness: Randomness,
    started: Instant,
) -> TapReport {
    let access = ctx.access;
    let deadline = tokio::time::Instant::now() + ctx.transaction_timeout;
    let mut attempt = access
        .begin(Transport::Nfc, started, deadline)
        .blame_unidentified();
    let mut fast = FastState::default();
    let flow = transaction(ctx, channel, randomness, &mut attempt, &mut fast);
    // A timeout drops the flow but not what it wrote into `attempt`: a decision made before
    // the timeout is recorded as that decision.
    let error = match tokio::time::timeout_at(deadline, flow).await {
        Ok(r) => r.err(),
        Err(_) => Some(TapError::Timeout(ctx.transaction_timeout)),
    };
    if fast.candidates > 0 || fast.used {
        let door = access.door.id.as_str();
        log::debug!(target: "keyway::nfc", door = door, fast = fast.used;
            "door {door}: FAST {} ({} stored keys tried)",
            if fast.used { "used" } else { "not matched" }, fast.candidates);
    }
    let (used, candidates) = (fast.used, fast.candidates);
    // After the phone was answered, so it never waits for these writes. Even if the final
    // EXCHANGE was lost the phone has derived the same Kpersistent (it does so at AUTH1).
    let update = ctx.fast().then(|| FastUpdate {
        reader_id: ctx.identity.reader_identifier(),
        used,
        learned: fast.learned,
    });
    let failure = error.as_ref().map(|e| Failure {
        code: e.code(),
        message: e.to_string(),
    });
    access.finish(&attempt, failure, update).await;
    TapReport {
        attempt,
        error,
        total: started.elapsed(),
        fast: used,
        fast_candidates: candidates,
    }
}

async fn transaction<C: CardChannel, P: PanelSink, S: AccessStore>(
    ctx: &TapContext<'_, P, S>,
    channel: &C,
    randomness: Randomness,
    att: &mut Attempt,
    fast: &mut FastState,
) -> Result<(), TapError> {
    let access = ctx.access;
    let door = &access.door;
    let mut tx = ReaderTransaction::new(ctx.identity, ctx.params, randomness);
    if ctx.fast() {
        // A store hiccup must not cost the tap: fall back to STANDARD.
        match access
            .store
            .stored_fast_keys(ctx.identity.reader_identifier())
            .await
        {
            Ok(credentials) if !credentials.is_empty() => {
                fast.candidates = credentials.len();
                tx = tx.with_fast(FastConfig {
                    credentials,
                    on_no_match: FastFallback::Standard,
                });
            }
            Ok(_) => {}
            Err(e) => log::warn!(target: "keyway::nfc", door = door.id.as_str();
                "door {}: stored FAST keys unavailable, using STANDARD: {e}", door.id),
        }
    }
    if let Some(c) = &door.certificate {
        tx = tx.with_certificate(ReaderCertificate {
            certificate: c.certificate.clone(),
            subject_key: ctx.identity.private_key.clone(),
            group_public_key: c.group_public_key,
        });
    }
    // The endpoint whose Access Document is being fetched (door with step-up).
    let mut stepping_up: Option<AuthenticatedEndpoint> = None;
    let mut capdu = tx.start();
    loop {
        let rapdu = channel.transmit(&capdu).await?;
        let action = match tx.on_response(&rapdu) {
            Err(AliroError::BadStatus {
                step: Step::Select, ..
            }) if door.accept_cards => {
                return physical_card(access, channel, att).await;
            }
            // No Aliro application on this card/phone: say so rather than "endpoint status".
            Err(AliroError::BadStatus {
                step: Step::Select,
                sw: APP_NOT_FOUND,
            }) => return Err(TapError::NotAliro),
            other => other?,
        };
        match action {
            Action::Transmit(next) => capdu = next,
            Action::Authenticated(endpoint) => {
                let subject = Subject::Endpoint {
                    key: endpoint.public_key_sec1(),
                    signaling_bitmap: endpoint.signaling_bitmap,
                };
                fast.used = endpoint.fast;
                if !endpoint.fast {
                    fast.learned = Some(endpoint.k_persistent.clone());
                }
                match door.step_up.as_ref() {
                    // A limited phone is refused by `decide` without being asked for more.
                    Some(su) if !access.is_limited(&subject) => {
                        let offered = endpoint
                            .signaling_bitmap
                            .is_some_and(|b| b & SIGNALING_ACCESS_DOCUMENT != 0);
                        if offered && !endpoint.fast {
                            let elements: Vec<(&str, bool)> =
                                su.elements.iter().map(|e| (e.as_str(), false)).collect();
                            let ns = document::ACCESS_DOC_TYPE;
                            let request = document::device_request(ns, ns, &elements)
                                .map_err(|_| TapError::Unexpected("DeviceRequest encoding"))?;
                            capdu = tx.step_up(&request)?;
                            stepping_up = Some(endpoint);
                            continue;
                        }
                        access.settle(
                            att,
                            subject,
                            Decision::Deny(DenyReason::AccessDocumentRequired),
                        )?;
                    }
                    _ => access.decide(att, subject).await?,
                }
                capdu = conclude(ctx, &mut tx, att).await?;
            }
            Action::StepUpResponse(doc) => {
                let endpoint = stepping_up
                    .take()
                    .ok_or(TapError::Unexpected("step-up response"))?;
                let key = endpoint.public_key_sec1();
                let subject = Subject::Endpoint {
                    key,
                    signaling_bitmap: endpoint.signaling_bitmap,
                };
                let now = time::OffsetDateTime::now_utc().unix_timestamp();
                let verified = door
                    .step_up
                    .as_ref()
                    .is_some_and(|su| check_document(&door.id, su, &doc, &key, now));
                if verified {
                    access.decide(att, subject).await?;
                } else {
                    access.settle(
                        att,
                        subject,
                        Decision::Deny(DenyReason::AccessDocumentInvalid),
                    )?;
                }
                capdu = conclude(ctx, &mut tx, att).await?;
            }
            Action::Done(Outcome::Completed { .. }) => return Ok(()),
            // The core reported a failure to the phone (bad signature, undecryptable answer,
            // ...): the tap ends with that error, not a silent "no decision".
            Action::Done(Outcome::Failed { error, .. }) => return Err(TapError::Aliro(error)),
            // Only answers `ReaderTransaction::exchange`, which a plain tap never calls.
            Action::Exchanged(_) => return Err(TapError::Unexpected("EXCHANGE response")),
        }
    }
}

/// The decision is in `att` already (a timeout from here on cannot unmake it): wait, within
/// the time left, for the panel's verdict on a grant, and return the final EXCHANGE.
async fn conclude<P: PanelSink, S: AccessStore>(
    ctx: &TapContext<'_, P, S>,
    tx: &mut ReaderTransaction,
    att: &mut Attempt,
) -> Result<Vec<u8>, TapError> {
    ctx.access.panel_verdict(att, ctx.panel_verdict_wait).await;
    let status = if att.phone_granted() {
        ReaderStatus::AccessGranted
    } else if att.decision == Some(Decision::Deny(DenyReason::UnknownKey)) {
        ReaderStatus::PublicKeyNotFound
    } else {
        ReaderStatus::AccessDenied
    };
    Ok(tx.complete(status)?)
}

/// Verifies the Access Document and that it carries every element the door asks for.
fn check_document(door: &str, su: &StepUp, doc: &[u8], key: &[u8; 65], now: i64) -> bool {
    match document::verify_access_document(doc, &su.issuers, key, now) {
        Ok(d) => {
            let missing = su
                .elements
                .iter()
                .find(|want| !d.elements.iter().any(|e| &e.identifier == *want));
            if let Some(m) = missing {
                log::warn!(target: "keyway::nfc", door = door;
                    "door {door}: Access Document lacks element {m:?}");
                return false;
            }
            true
        }
        Err(e) => {
            log::warn!(target: "keyway::nfc", door = door;
                "door {door}: Access Document refused: {e}");
            false
        }
    }
}

/// A card without the Aliro application: read its UID and decide by the ACL's card UIDs. A
/// card is told nothing: the panel's verdict is only recorded with the event.
async fn physical_card<C: CardChannel, P: PanelSink, S: AccessStore>(
    access: &Access<P, S>,
    channel: &C,
    att: &mut Attempt,
) -> Result<(), TapError> {
    let r = channel.transmit(&GET_UID_APDU).await?;
    let uid = match r.split_last_chunk::<2>() {
        Some((uid, [0x90, 0x00])) if crate::acl::cards::is_valid_uid(uid) => uid.to_vec(),
        _ => return Err(TapError::NotAliro),
    };
    access.decide(att, Subject::Card { uid }).await?;
    Ok(())
}
