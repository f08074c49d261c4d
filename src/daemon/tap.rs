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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acl::{ImportMode, Store};
    use crate::aliro::consts::SIGNALING_USER_VERIFIED_BIT;
    use crate::card::{CardFormat, WiegandBits};
    use crate::config::{Door, ReaderCert};
    use crate::daemon::access::testutil::{door, sec1, setup, spec, MemoryStore, Panel, Setup};
    use crate::daemon::access::{shared_limiter, RateLimitConfig, SharedLimiter, UNIDENTIFIED};
    use crate::osdp::Verdict;
    use crate::sim::{Endpoint, EndpointConfig, OsRandom, ReaderGroupCredential};
    use p256::SecretKey;
    use rand_core::OsRng;
    use std::sync::{Arc, Mutex};

    /// The phone emulator in memory as a card channel; `fail_at` makes the n-th APDU vanish;
    /// `slow = (n, d)`: the phone takes `d` (on tokio's clock) to answer each of the first `n`.
    struct InMemory {
        phone: Mutex<Endpoint>,
        fail_at: Option<usize>,
        sent: Mutex<usize>,
        log: Mutex<Vec<Vec<u8>>>,
        slow: (usize, Duration),
    }

    impl InMemory {
        fn new(phone: Endpoint, fail_at: Option<usize>) -> Self {
            Self {
                phone: Mutex::new(phone),
                fail_at,
                sent: Mutex::new(0),
                log: Mutex::new(Vec::new()),
                slow: (0, Duration::ZERO),
            }
        }
    }

    impl CardChannel for InMemory {
        fn transmit(&self, capdu: &[u8]) -> impl Future<Output = Result<Vec<u8>, NfcError>> + Send {
            self.log.lock().unwrap().push(capdu.to_vec());
            let mut n = self.sent.lock().unwrap();
            let r = if Some(*n) == self.fail_at {
                Err(NfcError::CardGone)
            } else {
                Ok(self.phone.lock().unwrap().handle(capdu))
            };
            let slow = if *n < self.slow.0 {
                self.slow.1
            } else {
                Duration::ZERO
            };
            *n += 1;
            async move {
                if !slow.is_zero() {
                    tokio::time::sleep(slow).await;
                }
                r
            }
        }
    }

    fn phone(s: &Setup, phone_key: &SecretKey) -> Endpoint {
        let cred = ReaderGroupCredential {
            group_id: s.identity.group_id,
            reader_group_key: s.identity.private_key.public_key(),
        };
        Endpoint::new(
            EndpointConfig::new(phone_key.clone(), vec![cred]),
            Box::new(OsRandom),
        )
    }

    /// Door settings of a test tap.
    #[derive(Default)]
    struct Opts {
        fast: bool,
        sensitive: bool,
        limiter: Option<SharedLimiter>,
        accept_cards: bool,
        step_up: Option<StepUp>,
        certificate: Option<ReaderCert>,
        panel: Panel,
    }

    impl Opts {
        fn door(&self) -> Door {
            Door {
                sensitive: self.sensitive,
                accept_cards: self.accept_cards,
                fast: self.fast,
                step_up: self.step_up.clone(),
                certificate: self.certificate.clone(),
                ..door()
            }
        }

        fn access<S: AccessStore>(&self, store: S) -> Access<Panel, S> {
            let limiter = self
                .limiter
                .clone()
                .unwrap_or_else(|| shared_limiter(RateLimitConfig::default()));
            Access::new(Arc::new(self.door()), store, self.panel.clone(), limiter)
        }
    }

    fn ctx<'a, S>(s: &'a Setup, access: &'a Access<Panel, S>) -> TapContext<'a, Panel, S> {
        TapContext {
            access,
            identity: &s.identity,
            params: TransactionParams::nfc(1),
            transaction_timeout: Duration::from_secs(5),
            panel_verdict_wait: Duration::from_secs(2),
        }
    }

    async fn tap_on<C: CardChannel>(s: &Setup, chan: &C, o: &Opts) -> TapReport {
        let access = o.access(s.store.clone());
        run_tap(
            &ctx(s, &access),
            chan,
            Randomness::generate(&mut OsRng),
            Instant::now(),
        )
        .await
    }

    async fn tap_with(
        s: &Setup,
        phone: Endpoint,
        fail_at: Option<usize>,
        o: Opts,
    ) -> (TapReport, Vec<WiegandBits>, Endpoint) {
        let chan = InMemory::new(phone, fail_at);
        let report = tap_on(s, &chan, &o).await;
        (report, o.panel.cards(), chan.phone.into_inner().unwrap())
    }

    async fn tap(
        s: &Setup,
        phone_key: &SecretKey,
        fail_at: Option<usize>,
    ) -> (TapReport, Vec<WiegandBits>, Endpoint) {
        tap_with(s, phone(s, phone_key), fail_at, Opts::default()).await
    }

    /// The phone's view of its completed transaction: (reader status, via FAST).
    fn completed(phone: &Endpoint) -> Option<(u16, bool)> {
        phone.outcomes().find_map(|o| match o {
            crate::sim::Outcome::Completed {
                reader_status,
                fast,
            } => Some((*reader_status, *fast)),
            _ => None,
        })
    }

    fn phone_fast(phone: &Endpoint) -> Option<bool> {
        completed(phone).map(|(_, fast)| fast)
    }

    fn status(phone: &Endpoint) -> Option<u16> {
        completed(phone).map(|(status, _)| status)
    }

    #[tokio::test]
    async fn second_tap_of_a_known_phone_uses_fast_and_a_stranger_falls_back() {
        let s = setup(None, None, "front");
        let fast = || Opts {
            fast: true,
            ..Opts::default()
        };
        let (r, cards, mut p) = tap_with(&s, phone(&s, &s.enrolled), None, fast()).await;
        assert!(r.error.is_none(), "{:?}", r.error);
        assert!(!r.fast && r.attempt.granted() && cards.len() == 1);
        assert_eq!(r.fast_candidates, 0, "nothing stored before the first tap");
        assert_eq!(phone_fast(&p), Some(false));
        p.take_outcomes();
        // Same phone again: FAST, granted, the card still goes to the panel.
        let (r, cards, p) = tap_with(&s, p, None, fast()).await;
        assert!(r.error.is_none(), "{:?}", r.error);
        assert!(r.fast, "second tap identified by the cryptogram");
        assert!(r.attempt.granted() && cards.len() == 1);
        assert_eq!(r.fast_candidates, 1);
        assert_eq!(phone_fast(&p), Some(true));
        assert_eq!(status(&p), Some(ReaderStatus::AccessGranted.code()));
        // A phone that lost its key (fresh emulator, same long-term key): FAST does not
        // match, the same session continues with AUTH1 and it is still granted.
        let (r, _, p) = tap_with(&s, phone(&s, &s.enrolled), None, fast()).await;
        assert!(r.error.is_none(), "{:?}", r.error);
        assert!(!r.fast && r.attempt.granted());
        assert_eq!(phone_fast(&p), Some(false));
        // A stranger: no key stored for it (not in the ACL), STANDARD after the FAST attempt.
        let stranger = SecretKey::random(&mut OsRng);
        let (r, cards, _) = tap_with(&s, phone(&s, &stranger), None, fast()).await;
        assert!(r.error.is_none(), "{:?}", r.error);
        assert_eq!(
            r.attempt.decision,
            Some(Decision::Deny(DenyReason::UnknownKey))
        );
        assert!(cards.is_empty());
        let (r, _, _) = tap_with(&s, phone(&s, &stranger), None, fast()).await;
        assert_eq!(r.fast_candidates, 1, "the stranger's key was not stored");
    }

    #[tokio::test]
    async fn sensitive_door_needs_user_verification() {
        let s = setup(None, None, "front");
        let sensitive = || Opts {
            sensitive: true,
            ..Opts::default()
        };
        let (r, cards, p) = tap_with(&s, phone(&s, &s.enrolled), None, sensitive()).await;
        assert!(r.error.is_none(), "{:?}", r.error);
        assert_eq!(
            r.attempt.decision,
            Some(Decision::Deny(DenyReason::UserVerificationRequired))
        );
        assert!(cards.is_empty());
        assert_eq!(status(&p), Some(ReaderStatus::AccessDenied.code()));
        // Other bits set but not the user-verification one: still denied.
        let mut cfg = phone(&s, &s.enrolled).config().clone();
        cfg.signaling_bitmap = !SIGNALING_USER_VERIFIED_BIT;
        let (r, _, _) = tap_with(
            &s,
            Endpoint::new(cfg.clone(), Box::new(OsRandom)),
            None,
            sensitive(),
        )
        .await;
        assert_eq!(
            r.attempt.decision,
            Some(Decision::Deny(DenyReason::UserVerificationRequired))
        );
        cfg.signaling_bitmap = SIGNALING_USER_VERIFIED_BIT;
        let (r, cards, p) = tap_with(
            &s,
            Endpoint::new(cfg, Box::new(OsRandom)),
            None,
            sensitive(),
        )
        .await;
        assert!(r.attempt.granted(), "{:?}", r.attempt.decision);
        assert_eq!(cards.len(), 1);
        assert_eq!(status(&p), Some(ReaderStatus::AccessGranted.code()));
        // An ACL deny stays the ACL's reason, verified or not.
        let stranger = SecretKey::random(&mut OsRng);
        let (r, _, _) = tap_with(&s, phone(&s, &stranger), None, sensitive()).await;
        assert_eq!(
            r.attempt.decision,
            Some(Decision::Deny(DenyReason::UnknownKey))
        );
        // A normal door ignores the bit.
        let (r, _, _) = tap_with(&s, phone(&s, &s.enrolled), None, Opts::default()).await;
        assert!(r.attempt.granted());
    }

    #[tokio::test]
    async fn rate_limited_phone_is_refused_without_acl_lookup() {
        let s = setup(None, None, "front");
        let limiter = shared_limiter(RateLimitConfig {
            free_failures: 0,
            base_penalty: Duration::from_secs(600),
            ..Default::default()
        });
        let fp = crate::acl::fingerprint(&s.enrolled.public_key().to_sec1_bytes());
        limiter.lock().unwrap().failure(&fp, Instant::now());
        let o = || Opts {
            limiter: Some(limiter.clone()),
            fast: true,
            ..Opts::default()
        };
        let (r, cards, p) = tap_with(&s, phone(&s, &s.enrolled), None, o()).await;
        assert_eq!(
            r.attempt.decision,
            Some(Decision::Deny(DenyReason::RateLimited))
        );
        assert!(cards.is_empty());
        assert_eq!(status(&p), Some(ReaderStatus::AccessDenied.code()));
        assert_eq!(r.attempt.limiter_identity(), fp);
        // Nothing learned from a refused tap.
        let (r, _, _) = tap_with(&s, phone(&s, &s.enrolled), None, o()).await;
        assert_eq!(r.fast_candidates, 0);
        // Once its record is cleared (a success elsewhere), it is served again.
        limiter.lock().unwrap().success(&fp);
        let (r, _, _) = tap_with(&s, phone(&s, &s.enrolled), None, o()).await;
        assert!(r.attempt.granted());
    }

    /// A card channel over the UID-only card emulator.
    struct CardChan(Mutex<crate::sim::UidCard>);

    impl CardChannel for CardChan {
        fn transmit(&self, capdu: &[u8]) -> impl Future<Output = Result<Vec<u8>, NfcError>> + Send {
            use crate::sim::vpcd::VirtualCard;
            let r = Ok(self.0.lock().unwrap().transmit(capdu));
            async move { r }
        }
    }

    async fn card_tap(s: &Setup, uid: &[u8], accept_cards: bool) -> (TapReport, Vec<WiegandBits>) {
        let chan = CardChan(Mutex::new(crate::sim::UidCard::new(uid)));
        let o = Opts {
            accept_cards,
            fast: true,
            ..Opts::default()
        };
        let r = tap_on(s, &chan, &o).await;
        (r, o.panel.cards())
    }

    #[tokio::test]
    async fn physical_card_by_uid_only_where_the_door_accepts_cards() {
        let s = setup(None, None, "front");
        let uid = [0x04, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66];
        // Give the enrolled credential a card (merge keeps the phone key).
        let mut store = Store::open(&s._dir.path().join("k.db")).unwrap();
        let spec = spec(&s.enrolled, "front", (None, None), vec![uid.to_vec()]);
        store.import_specs(&[spec], ImportMode::Merge, "t").unwrap();

        let (r, cards) = card_tap(&s, &uid, true).await;
        assert!(r.error.is_none(), "{:?}", r.error);
        assert!(r.attempt.granted(), "{:?}", r.attempt.decision);
        assert_eq!(r.attempt.card_uid(), Some(uid.as_slice()));
        assert!(r.attempt.endpoint_key().is_none());
        assert_eq!(
            crate::card::decode(&cards[0]).unwrap(),
            (CardFormat::H10304, 300, 70_000)
        );
        assert_eq!(
            r.attempt.subject.as_ref().map(Subject::bytes),
            Some(uid.as_slice())
        );
        assert!(r.attempt.limiter_identity().starts_with("card:"));
        assert!(
            !r.attempt.limiter_identity().contains("0411"),
            "no raw UID in identities"
        );

        let (r, cards) = card_tap(&s, &[9, 9, 9, 9], true).await;
        assert_eq!(
            r.attempt.decision,
            Some(Decision::Deny(DenyReason::UnknownKey))
        );
        assert!(cards.is_empty());

        // A door that does not accept cards: the card is simply not Aliro.
        let (r, cards) = card_tap(&s, &uid, false).await;
        assert!(r.attempt.decision.is_none() && cards.is_empty());
        assert_eq!(r.error.as_ref().map(TapError::code), Some("not_aliro"));
    }

    fn phone_with_document(s: &Setup, issuer: &SecretKey, element: &str, bitmap: u16) -> Endpoint {
        let mut cfg = phone(s, &s.enrolled).config().clone();
        let spec = crate::sim::issuer::AccessDocumentSpec {
            element: element.into(),
            access_id: vec![0xAB; 8],
            signed: "2026-01-01T00:00:00Z".into(),
            valid_from: "2026-01-01T00:00:00Z".into(),
            valid_until: "2099-01-01T00:00:00Z".into(),
            random: [3; 16],
        };
        cfg.access_document = Some(
            crate::sim::issuer::issue_access_document(issuer, &s.enrolled.public_key(), &spec)
                .unwrap(),
        );
        cfg.signaling_bitmap = bitmap;
        Endpoint::new(cfg, Box::new(OsRandom))
    }

    #[tokio::test]
    async fn step_up_door_needs_a_valid_access_document() {
        let s = setup(None, None, "front");
        let issuer = SecretKey::random(&mut OsRng);
        let su = StepUp {
            issuers: vec![issuer.public_key()],
            elements: vec!["floor1".into()],
        };
        let o = || Opts {
            step_up: Some(su.clone()),
            ..Opts::default()
        };
        // Valid document, offered (bitmap bit 0): granted after ENVELOPE, told on the
        // step-up channel.
        let (r, cards, p) =
            tap_with(&s, phone_with_document(&s, &issuer, "floor1", 1), None, o()).await;
        assert!(r.error.is_none(), "{:?}", r.error);
        assert!(r.attempt.granted(), "{:?}", r.attempt.decision);
        assert_eq!(cards.len(), 1);
        assert_eq!(status(&p), Some(ReaderStatus::AccessGranted.code()));
        // Not offered: denied without step-up.
        let (r, cards, p) =
            tap_with(&s, phone_with_document(&s, &issuer, "floor1", 0), None, o()).await;
        assert_eq!(
            r.attempt.decision,
            Some(Decision::Deny(DenyReason::AccessDocumentRequired))
        );
        assert!(cards.is_empty());
        assert_eq!(status(&p), Some(ReaderStatus::AccessDenied.code()));
        // Signed by someone else, or without the element the door wants: invalid.
        let rogue = SecretKey::random(&mut OsRng);
        for ph in [
            phone_with_document(&s, &rogue, "floor1", 1),
            phone_with_document(&s, &issuer, "floor2", 1),
        ] {
            let (r, cards, p) = tap_with(&s, ph, None, o()).await;
            assert!(r.error.is_none(), "{:?}", r.error);
            assert_eq!(
                r.attempt.decision,
                Some(Decision::Deny(DenyReason::AccessDocumentInvalid))
            );
            assert!(cards.is_empty());
            assert_eq!(status(&p), Some(ReaderStatus::AccessDenied.code()));
        }
        // A valid document does not override the ACL: a stranger's own valid document is
        // still an unknown key.
        let stranger = SecretKey::random(&mut OsRng);
        let mut cfg = phone(&s, &stranger).config().clone();
        let spec = crate::sim::issuer::AccessDocumentSpec {
            element: "floor1".into(),
            access_id: vec![1],
            signed: "2026-01-01T00:00:00Z".into(),
            valid_from: "2026-01-01T00:00:00Z".into(),
            valid_until: "2099-01-01T00:00:00Z".into(),
            random: [4; 16],
        };
        cfg.access_document = Some(
            crate::sim::issuer::issue_access_document(&issuer, &stranger.public_key(), &spec)
                .unwrap(),
        );
        cfg.signaling_bitmap = 1;
        let (r, _, _) = tap_with(&s, Endpoint::new(cfg, Box::new(OsRandom)), None, o()).await;
        assert_eq!(
            r.attempt.decision,
            Some(Decision::Deny(DenyReason::UnknownKey))
        );
    }

    #[tokio::test]
    async fn configured_certificate_is_loaded_before_auth1() {
        let s = setup(None, None, "front");
        let cert = ReaderCert {
            certificate: vec![0x30, 0x81, 0x01, 0x02, 0x03],
            group_public_key: SecretKey::random(&mut OsRng).public_key(),
        };
        let chan = InMemory::new(phone(&s, &s.enrolled), None);
        let o = Opts {
            certificate: Some(cert.clone()),
            ..Opts::default()
        };
        let r = tap_on(&s, &chan, &o).await;
        let log = chan.log.into_inner().unwrap();
        let ins: Vec<u8> = log.iter().map(|c| c[1]).collect();
        // SELECT, AUTH0, then LOAD CERT carrying exactly the configured certificate; the
        // emulated phone does not implement LOAD CERT, so the tap stops there.
        assert_eq!(ins, vec![0xA4, 0x80, 0xD1]);
        let load = crate::aliro::apdu::CommandApdu::parse(&log[2]).unwrap();
        assert_eq!(
            (load.cla, load.data.as_slice()),
            (0x80, cert.certificate.as_slice())
        );
        assert!(r.attempt.decision.is_none());
        assert_eq!(
            r.error.as_ref().map(TapError::code),
            Some("endpoint_status")
        );
    }

    #[tokio::test]
    async fn failed_authentication_is_an_error_not_a_silent_end() {
        let s = setup(None, None, "front");
        let mut cfg = phone(&s, &s.enrolled).config().clone();
        cfg.faults.device_signature_transaction_id = Some([0; 16]);
        let (r, cards, _) = tap_with(
            &s,
            Endpoint::new(cfg, Box::new(OsRandom)),
            None,
            Opts::default(),
        )
        .await;
        assert!(r.attempt.decision.is_none() && cards.is_empty());
        assert_eq!(
            r.error.as_ref().map(TapError::code),
            Some("signature_invalid")
        );
        assert_eq!(r.attempt.limiter_identity(), UNIDENTIFIED);
    }

    #[tokio::test]
    async fn the_phone_is_told_what_the_panel_decided() {
        let s = setup(None, None, "front");
        let with = |panel: Panel| Opts {
            panel,
            ..Opts::default()
        };
        // The panel refuses a card keyway granted (red LED): the phone is told denied; the
        // decision stays keyway's grant and the card did go to the panel.
        let (r, cards, p) = tap_with(
            &s,
            phone(&s, &s.enrolled),
            None,
            with(Panel::answering(Verdict::Denied)),
        )
        .await;
        assert!(r.error.is_none(), "{:?}", r.error);
        assert!(r.attempt.granted() && cards.len() == 1);
        assert_eq!(r.attempt.panel_verdict, Some(Verdict::Denied));
        assert_eq!(status(&p), Some(ReaderStatus::AccessDenied.code()));
        // The panel agrees (green): granted.
        let (r, _, p) = tap_with(
            &s,
            phone(&s, &s.enrolled),
            None,
            with(Panel::answering(Verdict::Granted)),
        )
        .await;
        assert_eq!(r.attempt.panel_verdict, Some(Verdict::Granted));
        assert_eq!(status(&p), Some(ReaderStatus::AccessGranted.code()));
        // The panel says nothing within the wait: keyway's grant stands.
        let (r, _, p) = tap_with(&s, phone(&s, &s.enrolled), None, with(Panel::silent())).await;
        assert!(r.error.is_none(), "{:?}", r.error);
        assert_eq!(r.attempt.panel_verdict, None);
        assert_eq!(status(&p), Some(ReaderStatus::AccessGranted.code()));
    }

    /// A grant late in the transaction, a panel that never answers: the verdict wait is cut
    /// to the time left, the phone is told it is granted, and the event is the grant. Even
    /// when the time runs out during the last exchange, the grant stays a grant.
    #[tokio::test(start_paused = true)]
    async fn a_late_grant_is_answered_and_recorded_as_a_grant() {
        let s = setup(None, None, "front");
        let key = sec1(&s.enrolled);
        for (slow_apdus, told) in [(3, true), (4, false)] {
            // In memory: no store thread for the paused clock to run past.
            let store = MemoryStore {
                granted: Some(key),
                ..MemoryStore::default()
            };
            let o = Opts {
                panel: Panel::silent(),
                ..Opts::default()
            };
            let access = o.access(store.clone());
            // SELECT, AUTH0, AUTH1 take 1.4 s each: the decision comes at 4.2 s of 5 s, and a
            // full 2 s verdict wait would end past the transaction's limit. With `(4, _)` the
            // final EXCHANGE is slow too and the limit strikes during it.
            let chan = InMemory {
                slow: (slow_apdus, Duration::from_millis(1400)),
                ..InMemory::new(phone(&s, &s.enrolled), None)
            };
            let t0 = tokio::time::Instant::now();
            let r = run_tap(
                &ctx(&s, &access),
                &chan,
                Randomness::generate(&mut OsRng),
                Instant::now(),
            )
            .await;
            assert!(t0.elapsed() <= Duration::from_secs(5), "{:?}", t0.elapsed());
            assert!(
                r.attempt.granted(),
                "{slow_apdus}: {:?}",
                r.attempt.decision
            );
            assert_eq!(o.panel.cards().len(), 1);
            let events = store.events.lock().unwrap().clone();
            assert_eq!(events.len(), 1);
            let (event, attempt) = &events[0];
            assert_eq!(
                (event.decision, event.person_id.as_deref()),
                (crate::events::EventDecision::Granted, Some("p-7")),
                "{slow_apdus}: {event:?}"
            );
            assert!(attempt.is_some() && *attempt == r.attempt.attempt_id);
            let p = chan.phone.into_inner().unwrap();
            if told {
                assert!(r.error.is_none(), "{:?}", r.error);
                assert_eq!(status(&p), Some(ReaderStatus::AccessGranted.code()));
            } else {
                assert_eq!(r.error.as_ref().map(TapError::code), Some("timeout"));
            }
        }
    }

    #[tokio::test]
    async fn granted_phone_gets_its_card_to_the_panel_and_is_told() {
        let s = setup(None, None, "front");
        let (r, cards, phone) = tap(&s, &s.enrolled.clone(), None).await;
        assert!(r.error.is_none(), "{:?}", r.error);
        assert!(matches!(r.attempt.decision, Some(Decision::Grant(ref g)) if g.person_id == "p-7"));
        assert_eq!(cards.len(), 1);
        assert_eq!(
            crate::card::decode(&cards[0]).unwrap(),
            (CardFormat::H10304, 300, 70_000)
        );
        assert_eq!(status(&phone), Some(ReaderStatus::AccessGranted.code()));
        assert!(r.attempt.to_decision.is_some());
    }

    #[tokio::test]
    async fn every_deny_reason_keeps_the_card_from_the_panel() {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        for (s, key, reason, phone_status) in [
            {
                let s = setup(None, None, "front");
                let k = SecretKey::random(&mut OsRng);
                (
                    s,
                    Some(k),
                    DenyReason::UnknownKey,
                    ReaderStatus::PublicKeyNotFound,
                )
            },
            (
                setup(None, Some(now - 10), "front"),
                None,
                DenyReason::Expired,
                ReaderStatus::AccessDenied,
            ),
            (
                setup(Some(now + 3600), None, "front"),
                None,
                DenyReason::NotYetValid,
                ReaderStatus::AccessDenied,
            ),
            (
                setup(None, None, "back"),
                None,
                DenyReason::WrongDoor,
                ReaderStatus::AccessDenied,
            ),
        ] {
            let key = key.unwrap_or_else(|| s.enrolled.clone());
            let (r, cards, phone) = tap(&s, &key, None).await;
            assert!(r.error.is_none(), "{reason:?}: {:?}", r.error);
            assert!(
                matches!(r.attempt.decision, Some(Decision::Deny(d)) if d == reason),
                "{reason:?}: {:?}",
                r.attempt.decision
            );
            assert!(cards.is_empty(), "{reason:?}");
            assert_eq!(status(&phone), Some(phone_status.code()), "{reason:?}");
        }
    }

    #[tokio::test]
    async fn phone_gone_before_or_after_the_decision() {
        let s = setup(None, None, "front");
        // SELECT answered, AUTH0 lost: no decision, nothing to the panel.
        let (r, cards, _) = tap(&s, &s.enrolled.clone(), Some(1)).await;
        assert_eq!(r.error.as_ref().map(TapError::code), Some("card_gone"));
        assert!(r.attempt.decision.is_none() && cards.is_empty());
        // Lost during the final EXCHANGE: the grant stands and the card went to the panel.
        let (r, cards, _) = tap(&s, &s.enrolled.clone(), Some(3)).await;
        assert_eq!(r.error.as_ref().map(TapError::code), Some("card_gone"));
        assert!(matches!(r.attempt.decision, Some(Decision::Grant(_))));
        assert_eq!(cards.len(), 1);
    }
}
