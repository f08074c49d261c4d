use keyway::acl::{Decision, DenyReason};
use keyway::acl::{ImportMode, Store};
use keyway::aliro::consts::SIGNALING_USER_VERIFIED_BIT;
use keyway::aliro::reader::{Randomness, TransactionParams};
use keyway::aliro::ReaderStatus;
use keyway::card::{CardFormat, WiegandBits};
use keyway::config::StepUp;
use keyway::config::{Door, ReaderCert};
use keyway::daemon::access::{shared_limiter, RateLimitConfig, SharedLimiter, UNIDENTIFIED};
use keyway::daemon::access::{Access, AccessStore, Subject};
use keyway::daemon::tap::*;
use keyway::nfc::NfcError;
use keyway::osdp::Verdict;
use keyway_sim::door::{door, sec1, setup, spec, MemoryStore, Panel, Setup};
use keyway_sim::{Endpoint, EndpointConfig, OsRandom, ReaderGroupCredential};
use p256::SecretKey;
use rand_core::OsRng;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
        keyway_sim::Outcome::Completed {
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
    let fp = keyway::acl::fingerprint(&s.enrolled.public_key().to_sec1_bytes());
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
struct CardChan(Mutex<keyway_sim::UidCard>);

impl CardChannel for CardChan {
    fn transmit(&self, capdu: &[u8]) -> impl Future<Output = Result<Vec<u8>, NfcError>> + Send {
        use keyway_sim::vpcd::VirtualCard;
        let r = Ok(self.0.lock().unwrap().transmit(capdu));
        async move { r }
    }
}

async fn card_tap(s: &Setup, uid: &[u8], accept_cards: bool) -> (TapReport, Vec<WiegandBits>) {
    let chan = CardChan(Mutex::new(keyway_sim::UidCard::new(uid)));
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
        keyway::card::decode(&cards[0]).unwrap(),
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
    let spec = keyway_sim::issuer::AccessDocumentSpec {
        element: element.into(),
        access_id: vec![0xAB; 8],
        signed: "2026-01-01T00:00:00Z".into(),
        valid_from: "2026-01-01T00:00:00Z".into(),
        valid_until: "2099-01-01T00:00:00Z".into(),
        random: [3; 16],
    };
    cfg.access_document = Some(
        keyway_sim::issuer::issue_access_document(issuer, &s.enrolled.public_key(), &spec).unwrap(),
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
    let spec = keyway_sim::issuer::AccessDocumentSpec {
        element: "floor1".into(),
        access_id: vec![1],
        signed: "2026-01-01T00:00:00Z".into(),
        valid_from: "2026-01-01T00:00:00Z".into(),
        valid_until: "2099-01-01T00:00:00Z".into(),
        random: [4; 16],
    };
    cfg.access_document = Some(
        keyway_sim::issuer::issue_access_document(&issuer, &stranger.public_key(), &spec).unwrap(),
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
    let load = keyway::aliro::apdu::CommandApdu::parse(&log[2]).unwrap();
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
            (keyway::events::EventDecision::Granted, Some("p-7")),
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
        keyway::card::decode(&cards[0]).unwrap(),
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
