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
    let mut tx = ReaderTransaction::new(ctx.identity, ctx.params, randomness);
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

#[cfg(test)]
mod tests {
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
    }

    impl CardChannel for InMemory {
        fn transmit(&self, capdu: &[u8]) -> impl Future<Output = Result<Vec<u8>, NfcError>> + Send {
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

    struct Setup {
        _dir: tempfile::TempDir,
        store: StoreHandle,
        identity: ReaderIdentity,
        enrolled: SecretKey,
    }

    fn setup(valid_from: Option<i64>, valid_until: Option<i64>, door: &str) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("k.db");
        let enrolled = SecretKey::random(&mut OsRng);
        let spec = CredentialSpec {
            line: 1,
            endpoint_key: enrolled
                .public_key()
                .to_sec1_bytes()
                .as_ref()
                .try_into()
                .unwrap(),
            person_id: "p-7".into(),
            card_format: CardFormat::H10304,
            facility_code: 300,
            card_number: 70_000,
            valid_from,
            valid_until,
            doors: vec![door.into()],
        };
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

    async fn tap(
        s: &Setup,
        phone_key: &SecretKey,
        fail_at: Option<usize>,
    ) -> (TapReport, Vec<WiegandBits>, Endpoint) {
        let cred = ReaderGroupCredential {
            group_id: s.identity.group_id,
            reader_group_key: s.identity.private_key.public_key(),
        };
        let chan = InMemory {
            phone: Mutex::new(Endpoint::new(
                EndpointConfig::new(phone_key.clone(), vec![cred]),
                Box::new(OsRandom),
            )),
            fail_at,
            sent: Mutex::new(0),
        };
        let ctx = TapContext {
            door: "front",
            identity: &s.identity,
            params: TransactionParams::nfc(1),
            store: &s.store,
            transaction_timeout: Duration::from_secs(5),
        };
        let mut cards = Vec::new();
        let report = run_tap(
            &ctx,
            &chan,
            Randomness::generate(&mut OsRng),
            Instant::now(),
            |b| cards.push(b),
        )
        .await;
        (report, cards, chan.phone.into_inner().unwrap())
    }

    fn status(phone: &Endpoint) -> Option<u16> {
        phone.outcomes().find_map(|o| match o {
            crate::sim::Outcome::Completed { reader_status, .. } => Some(*reader_status),
            _ => None,
        })
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
