//! One tap, end to end: drive the Aliro reader core over a card channel, ask the ACL, hand a
//! granted card number to the panel, tell the phone, and describe what happened.
//!
//! Generic over the card channel so the whole flow runs in unit tests against the phone
//! emulator in memory; the daemon uses the PC/SC [`CardLink`](crate::nfc::CardLink).

use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::acl::{Decision, DenyReason};
use crate::aliro::consts::SIGNALING_USER_VERIFIED_BIT;
use crate::aliro::crypto::SymmetricKey;
use crate::aliro::document;
use crate::aliro::reader::{
    Action, AuthenticatedEndpoint, FastConfig, FastFallback, Outcome, Randomness,
    ReaderCertificate, ReaderIdentity, ReaderTransaction, Step, TransactionParams,
};
use crate::aliro::{AliroError, ReaderStatus};
use crate::card::{self, WiegandBits};
use crate::config::{ReaderCert, StepUp};
use crate::nfc::ratelimit::{self, RateLimiter};
use crate::nfc::{CardLink, NfcError};
use crate::osdp::Verdict;

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
            TapError::Store(_) => "store_error",
            TapError::Card(_) => "bad_card_data",
            TapError::Unexpected(_) => "internal_error",
            TapError::NotAliro => "not_aliro",
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
    /// The endpoint was identified by its FAST cryptogram (no AUTH1 in this tap).
    pub fast: bool,
    /// FAST keys offered to the reader core in this tap.
    pub fast_candidates: usize,
    /// UID of a physical card (it did not answer the Aliro application; door accepts cards).
    pub card_uid: Option<Vec<u8>>,
    /// The panel's verdict on a grant, when it came within `panel_verdict_wait`.
    pub panel_verdict: Option<Verdict>,
}

impl TapReport {
    /// The identity a rate limit counts this tap against: the authenticated endpoint key's
    /// fingerprint, or [`ratelimit::UNIDENTIFIED`].
    pub fn limiter_identity(&self) -> String {
        match (&self.endpoint_key, &self.card_uid) {
            (Some(k), _) => crate::acl::fingerprint(k),
            (None, Some(uid)) => card_identity(uid),
            (None, None) => ratelimit::UNIDENTIFIED.to_owned(),
        }
    }

    /// What identifies the tapped thing in events: the endpoint key, else the card UID (the
    /// event then carries a fingerprint of the UID rather than the UID; a UID is no secret,
    /// and a short one can be recovered from its fingerprint by trying them all).
    pub fn subject(&self) -> Option<&[u8]> {
        self.endpoint_key
            .as_ref()
            .map(|k| k.as_slice())
            .or(self.card_uid.as_deref())
    }

    /// True when the tap ended in a grant.
    pub fn granted(&self) -> bool {
        matches!(self.decision, Some(Decision::Grant(_)))
    }
}

/// Per-door constants a tap needs.
pub struct TapContext<'a> {
    pub door: &'a str,
    pub identity: &'a ReaderIdentity,
    pub params: TransactionParams,
    pub store: &'a StoreHandle,
    pub transaction_timeout: Duration,
    /// Offer FAST with the Kpersistent values stored for this reader; store new ones.
    pub fast: bool,
    /// Sensitive door: a grant also needs the phone to report user verification
    /// ([`SIGNALING_USER_VERIFIED_BIT`]); otherwise the tap is denied
    /// `user_verification_required`.
    pub require_user_verification: bool,
    /// Endpoints serving a failure penalty are denied `rate_limited` without an ACL lookup.
    pub limiter: Option<&'a Mutex<RateLimiter>>,
    /// A card that refuses the Aliro application is identified by UID and looked up.
    pub accept_cards: bool,
    /// The door requires a step-up Access Document (STANDARD only: FAST derives no step-up
    /// keys, so a door with step-up should not offer FAST).
    pub step_up: Option<&'a StepUp>,
    /// LOAD CERT: the reader's certificate; `identity.private_key` is then its subject key.
    pub certificate: Option<&'a ReaderCert>,
    /// After a grant, how long the phone's EXCHANGE waits for the panel's verdict.
    pub panel_verdict_wait: Duration,
}

/// The panel's verdict on the card a grant sent, when the panel sink can report it.
pub type VerdictWait = tokio::sync::oneshot::Receiver<Verdict>;

/// Signaling bitmap bit 0: an Access Document can be retrieved (reference constants).
const SIGNALING_ACCESS_DOCUMENT: u16 = 1 << 0;

/// ISO 7816 status "application not found", the answer of a card without Aliro to SELECT.
const APP_NOT_FOUND: u16 = 0x6A82;

/// GET DATA (PC/SC part 3): the UID of the card in the field.
pub const GET_UID_APDU: [u8; 5] = [0xFF, 0xCA, 0x00, 0x00, 0x00];

/// Rate-limit identity of a card (a fingerprint, like phones; the raw UID stays out of logs).
fn card_identity(uid: &[u8]) -> String {
    format!("card:{}", crate::acl::fingerprint(uid))
}

fn is_limited(ctx: &TapContext<'_>, id: &str) -> bool {
    ctx.limiter.is_some_and(|l| {
        l.lock()
            .map(|l| l.is_limited(id, Instant::now()))
            .unwrap_or(false)
    })
}

/// Runs one transaction. `on_grant` receives the card number for the panel the moment the
/// decision is made (before the phone is told), so the RAW leaves at the next poll.
pub async fn run_tap<C: CardChannel>(
    ctx: &TapContext<'_>,
    channel: &C,
    randomness: Randomness,
    started: Instant,
    on_grant: impl FnOnce(WiegandBits) -> Option<VerdictWait>,
) -> TapReport {
    let mut report = TapReport {
        endpoint_key: None,
        decision: None,
        error: None,
        to_decision: None,
        total: Duration::ZERO,
        fast: false,
        fast_candidates: 0,
        card_uid: None,
        panel_verdict: None,
    };
    let mut learned: Option<SymmetricKey> = None;
    let flow = transaction(
        ctx,
        channel,
        randomness,
        started,
        &mut report,
        &mut learned,
        on_grant,
    );
    if let Err(e) = match tokio::time::timeout(ctx.transaction_timeout, flow).await {
        Ok(r) => r,
        Err(_) => Err(TapError::Timeout(ctx.transaction_timeout)),
    } {
        report.error = Some(e);
    }
    report.total = started.elapsed();
    // After the phone was answered, so it never waits for this write. Even if the final
    // EXCHANGE was lost the phone has derived the same Kpersistent (it does so at AUTH1).
    if ctx.fast {
        remember_fast_key(ctx, &report, learned).await;
    }
    report
}

async fn remember_fast_key(
    ctx: &TapContext<'_>,
    report: &TapReport,
    learned: Option<SymmetricKey>,
) {
    let Some(key) = report.endpoint_key else {
        return;
    };
    // Rate-limited taps never reached the ACL: do not refresh anything for them.
    if matches!(
        report.decision,
        None | Some(Decision::Deny(DenyReason::RateLimited))
    ) {
        return;
    }
    let reader_id = ctx.identity.reader_identifier();
    let r = match (report.fast, learned) {
        (true, _) => ctx.store.save_fast_key(reader_id, key, None).await,
        (false, Some(k)) => ctx.store.save_fast_key(reader_id, key, Some(k)).await,
        (false, None) => return,
    };
    if let Err(e) = r {
        log::warn!(target: "keyway::nfc", door = ctx.door;
            "door {}: FAST key not stored: {e}", ctx.door);
    }
}

async fn transaction<C: CardChannel>(
    ctx: &TapContext<'_>,
    channel: &C,
    randomness: Randomness,
    started: Instant,
    report: &mut TapReport,
    learned: &mut Option<SymmetricKey>,
    on_grant: impl FnOnce(WiegandBits) -> Option<VerdictWait>,
) -> Result<(), TapError> {
    let mut tx = ReaderTransaction::new(ctx.identity, ctx.params, randomness);
    if ctx.fast {
        // A store hiccup must not cost the tap: fall back to STANDARD.
        match ctx.store.fast_keys(ctx.identity.reader_identifier()).await {
            Ok(credentials) if !credentials.is_empty() => {
                report.fast_candidates = credentials.len();
                tx = tx.with_fast(FastConfig {
                    credentials,
                    on_no_match: FastFallback::Standard,
                });
            }
            Ok(_) => {}
            Err(e) => log::warn!(target: "keyway::nfc", door = ctx.door;
                "door {}: stored FAST keys unavailable, using STANDARD: {e}", ctx.door),
        }
    }
    if let Some(c) = ctx.certificate {
        tx = tx.with_certificate(ReaderCertificate {
            certificate: c.certificate.clone(),
            subject_key: ctx.identity.private_key.clone(),
            group_public_key: c.group_public_key,
        });
    }
    let mut on_grant = Some(on_grant);
    // The endpoint whose Access Document is being fetched (door with step-up).
    let mut stepping_up: Option<AuthenticatedEndpoint> = None;
    let mut capdu = tx.start();
    loop {
        let rapdu = channel.transmit(&capdu).await?;
        let action = match tx.on_response(&rapdu) {
            Err(AliroError::BadStatus {
                step: Step::Select, ..
            }) if ctx.accept_cards => {
                return physical_card(ctx, channel, started, report, on_grant.take()).await;
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
                let key = endpoint.public_key_sec1();
                report.endpoint_key = Some(key);
                report.fast = endpoint.fast;
                if !endpoint.fast {
                    *learned = Some(endpoint.k_persistent.clone());
                }
                let decision = if is_limited(ctx, &crate::acl::fingerprint(&key)) {
                    Decision::Deny(DenyReason::RateLimited)
                } else if let Some(su) = ctx.step_up {
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
                    Decision::Deny(DenyReason::AccessDocumentRequired)
                } else {
                    let d = ctx
                        .store
                        .decide(&key, ctx.door, time::OffsetDateTime::now_utc())
                        .await?;
                    apply_door_policy(ctx.require_user_verification, d, endpoint.signaling_bitmap)
                };
                capdu = conclude(ctx, &mut tx, decision, report, started, &mut on_grant).await?;
            }
            Action::StepUpResponse(doc) => {
                let endpoint = stepping_up
                    .take()
                    .ok_or(TapError::Unexpected("step-up response"))?;
                let key = endpoint.public_key_sec1();
                let now = time::OffsetDateTime::now_utc();
                let verified = match ctx.step_up {
                    Some(su) => check_document(ctx.door, su, &doc, &key, now.unix_timestamp()),
                    None => false,
                };
                let decision = if verified {
                    let d = ctx.store.decide(&key, ctx.door, now).await?;
                    apply_door_policy(ctx.require_user_verification, d, endpoint.signaling_bitmap)
                } else {
                    Decision::Deny(DenyReason::AccessDocumentInvalid)
                };
                capdu = conclude(ctx, &mut tx, decision, report, started, &mut on_grant).await?;
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

/// Records the decision, hands a grant to the panel, waits (bounded) for the panel's verdict
/// so the phone is told what the panel decided, and returns the final EXCHANGE.
async fn conclude(
    ctx: &TapContext<'_>,
    tx: &mut ReaderTransaction,
    decision: Decision,
    report: &mut TapReport,
    started: Instant,
    on_grant: &mut Option<impl FnOnce(WiegandBits) -> Option<VerdictWait>>,
) -> Result<Vec<u8>, TapError> {
    report.to_decision = Some(started.elapsed());
    let status = match &decision {
        Decision::Grant(g) => {
            let bits = card::encode(g.card_format, g.facility_code, g.card_number)?;
            let wait = on_grant.take().and_then(|f| f(bits));
            report.panel_verdict = panel_verdict(ctx.door, wait, ctx.panel_verdict_wait).await;
            if report.panel_verdict == Some(Verdict::Denied) {
                ReaderStatus::AccessDenied
            } else {
                ReaderStatus::AccessGranted
            }
        }
        Decision::Deny(DenyReason::UnknownKey) => ReaderStatus::PublicKeyNotFound,
        Decision::Deny(_) => ReaderStatus::AccessDenied,
    };
    report.decision = Some(decision);
    Ok(tx.complete(status)?)
}

/// Waits (at most `wait`; zero: not at all) for the panel's verdict on the card a grant just
/// sent, so the phone is told what the panel decided. No verdict in time, or none at all,
/// leaves keyway's grant standing. Shared by the NFC tap and the BLE connection.
pub async fn panel_verdict(door: &str, rx: Option<VerdictWait>, wait: Duration) -> Option<Verdict> {
    let rx = rx.filter(|_| !wait.is_zero())?;
    let verdict = tokio::time::timeout(wait, rx).await.ok()?.ok();
    if verdict == Some(Verdict::Denied) {
        log::warn!(target: "keyway::daemon", door = door;
            "door {door}: the panel refused a card keyway granted; the phone is told denied");
    }
    verdict
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

/// A card without the Aliro application: read its UID and decide by the ACL's card UIDs.
async fn physical_card<C: CardChannel>(
    ctx: &TapContext<'_>,
    channel: &C,
    started: Instant,
    report: &mut TapReport,
    on_grant: Option<impl FnOnce(WiegandBits) -> Option<VerdictWait>>,
) -> Result<(), TapError> {
    let r = channel.transmit(&GET_UID_APDU).await?;
    let uid = match r.split_last_chunk::<2>() {
        Some((uid, [0x90, 0x00])) if crate::acl::cards::is_valid_uid(uid) => uid.to_vec(),
        _ => return Err(TapError::NotAliro),
    };
    let id = card_identity(&uid);
    report.card_uid = Some(uid);
    let uid = report.card_uid.as_deref().unwrap_or_default();
    let decision = if is_limited(ctx, &id) {
        Decision::Deny(DenyReason::RateLimited)
    } else {
        ctx.store
            .decide_card(uid, ctx.door, time::OffsetDateTime::now_utc())
            .await?
    };
    report.to_decision = Some(started.elapsed());
    if let (Decision::Grant(g), Some(f)) = (&decision, on_grant) {
        // A card is told nothing: the panel's verdict is only recorded with the event.
        let _verdict = f(card::encode(g.card_format, g.facility_code, g.card_number)?);
    }
    report.decision = Some(decision);
    Ok(())
}

/// The door's own rules on top of the ACL: a sensitive door grants only to a phone that
/// reports user verification. Shared by NFC taps and BLE connections.
pub fn apply_door_policy(
    require_user_verification: bool,
    d: Decision,
    signaling_bitmap: Option<u16>,
) -> Decision {
    let verified = signaling_bitmap.is_some_and(|b| b & SIGNALING_USER_VERIFIED_BIT != 0);
    match d {
        Decision::Grant(_) if require_user_verification && !verified => {
            Decision::Deny(DenyReason::UserVerificationRequired)
        }
        other => other,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::acl::{CredentialSpec, ImportMode, Store};
    use crate::card::CardFormat;
    use crate::sim::{Endpoint, EndpointConfig, OsRandom, ReaderGroupCredential};
    use p256::SecretKey;
    use rand_core::OsRng;
    use std::sync::Mutex;

    /// The phone emulator in memory as a card channel; `fail_at` makes the n-th APDU vanish.
    struct InMemory {
        phone: Mutex<Endpoint>,
        fail_at: Option<usize>,
        sent: Mutex<usize>,
        log: Mutex<Vec<Vec<u8>>>,
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
            *n += 1;
            async move { r }
        }
    }

    /// A store with one enrolled phone (H10304 300/70000, person p-7) at `door`, and a reader.
    /// Also used by the BLE handler's tests (`daemon::ble`).
    pub(crate) struct Setup {
        pub(crate) _dir: tempfile::TempDir,
        pub(crate) store: StoreHandle,
        pub(crate) identity: ReaderIdentity,
        pub(crate) enrolled: SecretKey,
    }

    /// The enrolled phone's credential.
    fn spec(
        key: &SecretKey,
        door: &str,
        valid: (Option<i64>, Option<i64>),
        card_uids: Vec<Vec<u8>>,
    ) -> CredentialSpec {
        CredentialSpec {
            line: 1,
            endpoint_key: key
                .public_key()
                .to_sec1_bytes()
                .as_ref()
                .try_into()
                .unwrap(),
            person_id: "p-7".into(),
            card_format: CardFormat::H10304,
            facility_code: 300,
            card_number: 70_000,
            valid_from: valid.0,
            valid_until: valid.1,
            doors: vec![door.into()],
            card_uids,
        }
    }

    pub(crate) fn setup(valid_from: Option<i64>, valid_until: Option<i64>, door: &str) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("k.db");
        let enrolled = SecretKey::random(&mut OsRng);
        let spec = spec(&enrolled, door, (valid_from, valid_until), Vec::new());
        Store::open(&db)
            .unwrap()
            .import_specs(&[spec], ImportMode::Replace, "test")
            .unwrap();
        let (store, _t) = StoreHandle::open(&db).unwrap();
        let identity = ReaderIdentity::new([1; 16], [2; 16], SecretKey::random(&mut OsRng));
        Setup {
            _dir: dir,
            store,
            identity,
            enrolled,
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
    struct Opts<'a> {
        fast: bool,
        sensitive: bool,
        limiter: Option<&'a Mutex<RateLimiter>>,
        accept_cards: bool,
        step_up: Option<&'a StepUp>,
        certificate: Option<&'a ReaderCert>,
        /// What the panel says about a granted card (None: this sink learns nothing).
        panel: Option<Verdict>,
        /// The panel keeps the tap waiting and never answers.
        panel_silent: bool,
    }

    async fn tap_with(
        s: &Setup,
        phone: Endpoint,
        fail_at: Option<usize>,
        o: Opts<'_>,
    ) -> (TapReport, Vec<WiegandBits>, Endpoint) {
        let chan = InMemory {
            phone: Mutex::new(phone),
            fail_at,
            sent: Mutex::new(0),
            log: Mutex::new(Vec::new()),
        };
        let ctx = TapContext {
            door: "front",
            identity: &s.identity,
            params: TransactionParams::nfc(1),
            store: &s.store,
            transaction_timeout: Duration::from_secs(5),
            fast: o.fast,
            require_user_verification: o.sensitive,
            limiter: o.limiter,
            accept_cards: o.accept_cards,
            step_up: o.step_up,
            certificate: o.certificate,
            panel_verdict_wait: Duration::from_secs(2),
        };
        let mut cards = Vec::new();
        // The "panel" answers at once with `o.panel`, says it cannot tell (drops its sender),
        // or, `panel_silent`, keeps the tap waiting and never answers.
        let mut silent_panel = None;
        let report = run_tap(
            &ctx,
            &chan,
            Randomness::generate(&mut OsRng),
            Instant::now(),
            |b| {
                cards.push(b);
                let (tx, rx) = tokio::sync::oneshot::channel();
                match o.panel {
                    Some(v) => {
                        let _ = tx.send(v);
                    }
                    None if o.panel_silent => silent_panel = Some(tx),
                    None => drop(tx),
                }
                Some(rx)
            },
        )
        .await;
        drop(silent_panel);
        (report, cards, chan.phone.into_inner().unwrap())
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
        assert!(!r.fast && r.granted() && cards.len() == 1);
        assert_eq!(r.fast_candidates, 0, "nothing stored before the first tap");
        assert_eq!(phone_fast(&p), Some(false));
        p.take_outcomes();
        // Same phone again: FAST, granted, the card still goes to the panel.
        let (r, cards, p) = tap_with(&s, p, None, fast()).await;
        assert!(r.error.is_none(), "{:?}", r.error);
        assert!(r.fast, "second tap identified by the cryptogram");
        assert!(r.granted() && cards.len() == 1);
        assert_eq!(r.fast_candidates, 1);
        assert_eq!(phone_fast(&p), Some(true));
        assert_eq!(status(&p), Some(ReaderStatus::AccessGranted.code()));
        // A phone that lost its key (fresh emulator, same long-term key): FAST does not
        // match, the same session continues with AUTH1 and it is still granted.
        let (r, _, p) = tap_with(&s, phone(&s, &s.enrolled), None, fast()).await;
        assert!(r.error.is_none(), "{:?}", r.error);
        assert!(!r.fast && r.granted());
        assert_eq!(phone_fast(&p), Some(false));
        // A stranger: no key stored for it (not in the ACL), STANDARD after the FAST attempt.
        let stranger = SecretKey::random(&mut OsRng);
        let (r, cards, _) = tap_with(&s, phone(&s, &stranger), None, fast()).await;
        assert!(r.error.is_none(), "{:?}", r.error);
        assert_eq!(r.decision, Some(Decision::Deny(DenyReason::UnknownKey)));
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
            r.decision,
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
            r.decision,
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
        assert!(r.granted(), "{:?}", r.decision);
        assert_eq!(cards.len(), 1);
        assert_eq!(status(&p), Some(ReaderStatus::AccessGranted.code()));
        // An ACL deny stays the ACL's reason, verified or not.
        let stranger = SecretKey::random(&mut OsRng);
        let (r, _, _) = tap_with(&s, phone(&s, &stranger), None, sensitive()).await;
        assert_eq!(r.decision, Some(Decision::Deny(DenyReason::UnknownKey)));
        // A normal door ignores the bit.
        let (r, _, _) = tap_with(&s, phone(&s, &s.enrolled), None, Opts::default()).await;
        assert!(r.granted());
    }

    #[tokio::test]
    async fn rate_limited_phone_is_refused_without_acl_lookup() {
        let s = setup(None, None, "front");
        let limiter = Mutex::new(RateLimiter::new(crate::nfc::ratelimit::RateLimitConfig {
            free_failures: 0,
            base_penalty: Duration::from_secs(600),
            ..Default::default()
        }));
        let fp = crate::acl::fingerprint(&s.enrolled.public_key().to_sec1_bytes());
        limiter.lock().unwrap().failure(&fp, Instant::now());
        let o = || Opts {
            limiter: Some(&limiter),
            fast: true,
            ..Opts::default()
        };
        let (r, cards, p) = tap_with(&s, phone(&s, &s.enrolled), None, o()).await;
        assert_eq!(r.decision, Some(Decision::Deny(DenyReason::RateLimited)));
        assert!(cards.is_empty());
        assert_eq!(status(&p), Some(ReaderStatus::AccessDenied.code()));
        assert_eq!(r.limiter_identity(), fp);
        // Nothing learned from a refused tap.
        let (r, _, _) = tap_with(&s, phone(&s, &s.enrolled), None, o()).await;
        assert_eq!(r.fast_candidates, 0);
        // Once its record is cleared (a success elsewhere), it is served again.
        limiter.lock().unwrap().success(&fp);
        let (r, _, _) = tap_with(&s, phone(&s, &s.enrolled), None, o()).await;
        assert!(r.granted());
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
        let ctx = TapContext {
            door: "front",
            identity: &s.identity,
            params: TransactionParams::nfc(1),
            store: &s.store,
            transaction_timeout: Duration::from_secs(5),
            fast: true,
            require_user_verification: false,
            limiter: None,
            accept_cards,
            step_up: None,
            certificate: None,
            panel_verdict_wait: Duration::from_secs(2),
        };
        let mut cards = Vec::new();
        let r = run_tap(
            &ctx,
            &chan,
            Randomness::generate(&mut OsRng),
            Instant::now(),
            |b| {
                cards.push(b);
                None
            },
        )
        .await;
        (r, cards)
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
        assert!(r.granted(), "{:?}", r.decision);
        assert_eq!(r.card_uid.as_deref(), Some(uid.as_slice()));
        assert!(r.endpoint_key.is_none());
        assert_eq!(
            crate::card::decode(&cards[0]).unwrap(),
            (CardFormat::H10304, 300, 70_000)
        );
        assert_eq!(r.subject(), Some(uid.as_slice()));
        assert!(r.limiter_identity().starts_with("card:"));
        assert!(
            !r.limiter_identity().contains("0411"),
            "no raw UID in identities"
        );

        let (r, cards) = card_tap(&s, &[9, 9, 9, 9], true).await;
        assert_eq!(r.decision, Some(Decision::Deny(DenyReason::UnknownKey)));
        assert!(cards.is_empty());

        // A door that does not accept cards: the card is simply not Aliro.
        let (r, cards) = card_tap(&s, &uid, false).await;
        assert!(r.decision.is_none() && cards.is_empty());
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
            step_up: Some(&su),
            ..Opts::default()
        };
        // Valid document, offered (bitmap bit 0): granted after ENVELOPE, told on the
        // step-up channel.
        let (r, cards, p) =
            tap_with(&s, phone_with_document(&s, &issuer, "floor1", 1), None, o()).await;
        assert!(r.error.is_none(), "{:?}", r.error);
        assert!(r.granted(), "{:?}", r.decision);
        assert_eq!(cards.len(), 1);
        assert_eq!(status(&p), Some(ReaderStatus::AccessGranted.code()));
        // Not offered: denied without step-up.
        let (r, cards, p) =
            tap_with(&s, phone_with_document(&s, &issuer, "floor1", 0), None, o()).await;
        assert_eq!(
            r.decision,
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
                r.decision,
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
        assert_eq!(r.decision, Some(Decision::Deny(DenyReason::UnknownKey)));
    }

    #[tokio::test]
    async fn configured_certificate_is_loaded_before_auth1() {
        let s = setup(None, None, "front");
        let cert = ReaderCert {
            certificate: vec![0x30, 0x81, 0x01, 0x02, 0x03],
            group_public_key: SecretKey::random(&mut OsRng).public_key(),
        };
        let chan = InMemory {
            phone: Mutex::new(phone(&s, &s.enrolled)),
            fail_at: None,
            sent: Mutex::new(0),
            log: Mutex::new(Vec::new()),
        };
        let ctx = TapContext {
            door: "front",
            identity: &s.identity,
            params: TransactionParams::nfc(1),
            store: &s.store,
            transaction_timeout: Duration::from_secs(5),
            fast: false,
            require_user_verification: false,
            limiter: None,
            accept_cards: false,
            step_up: None,
            certificate: Some(&cert),
            panel_verdict_wait: Duration::from_secs(2),
        };
        let r = run_tap(
            &ctx,
            &chan,
            Randomness::generate(&mut OsRng),
            Instant::now(),
            |_| None,
        )
        .await;
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
        assert!(r.decision.is_none());
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
        assert!(r.decision.is_none() && cards.is_empty());
        assert_eq!(
            r.error.as_ref().map(TapError::code),
            Some("signature_invalid")
        );
        assert_eq!(r.limiter_identity(), ratelimit::UNIDENTIFIED);
    }

    #[tokio::test]
    async fn the_phone_is_told_what_the_panel_decided() {
        let s = setup(None, None, "front");
        let with = |panel: Option<Verdict>, panel_silent: bool| Opts {
            panel,
            panel_silent,
            ..Opts::default()
        };
        // The panel refuses a card keyway granted (red LED): the phone is told denied; the
        // decision stays keyway's grant and the card did go to the panel.
        let (r, cards, p) = tap_with(
            &s,
            phone(&s, &s.enrolled),
            None,
            with(Some(Verdict::Denied), false),
        )
        .await;
        assert!(r.error.is_none(), "{:?}", r.error);
        assert!(r.granted() && cards.len() == 1);
        assert_eq!(r.panel_verdict, Some(Verdict::Denied));
        assert_eq!(status(&p), Some(ReaderStatus::AccessDenied.code()));
        // The panel agrees (green): granted.
        let (r, _, p) = tap_with(
            &s,
            phone(&s, &s.enrolled),
            None,
            with(Some(Verdict::Granted), false),
        )
        .await;
        assert_eq!(r.panel_verdict, Some(Verdict::Granted));
        assert_eq!(status(&p), Some(ReaderStatus::AccessGranted.code()));
        // The panel says nothing within the wait: keyway's grant stands.
        let (r, _, p) = tap_with(&s, phone(&s, &s.enrolled), None, with(None, true)).await;
        assert!(r.error.is_none(), "{:?}", r.error);
        assert_eq!(r.panel_verdict, None);
        assert_eq!(status(&p), Some(ReaderStatus::AccessGranted.code()));
    }

    #[tokio::test]
    async fn granted_phone_gets_its_card_to_the_panel_and_is_told() {
        let s = setup(None, None, "front");
        let (r, cards, phone) = tap(&s, &s.enrolled.clone(), None).await;
        assert!(r.error.is_none(), "{:?}", r.error);
        assert!(matches!(r.decision, Some(Decision::Grant(ref g)) if g.person_id == "p-7"));
        assert_eq!(cards.len(), 1);
        assert_eq!(
            crate::card::decode(&cards[0]).unwrap(),
            (CardFormat::H10304, 300, 70_000)
        );
        assert_eq!(status(&phone), Some(ReaderStatus::AccessGranted.code()));
        assert!(r.to_decision.is_some());
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
                matches!(r.decision, Some(Decision::Deny(d)) if d == reason),
                "{reason:?}: {:?}",
                r.decision
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
        assert!(r.decision.is_none() && cards.is_empty());
        // Lost during the final EXCHANGE: the grant stands and the card went to the panel.
        let (r, cards, _) = tap(&s, &s.enrolled.clone(), Some(3)).await;
        assert_eq!(r.error.as_ref().map(TapError::code), Some("card_gone"));
        assert!(matches!(r.decision, Some(Decision::Grant(_))));
        assert_eq!(cards.len(), 1);
    }
}
