//! The one access pipeline every transport calls.
//!
//! A transport adapter (NFC tap in [`super::tap`], BLE connection in [`super::ble`]; a remote
//! command would be a third) authenticates the phone or card itself, then hands the pipeline
//! "this subject at this door via this transport". The pipeline does the rest, the same way
//! for all:
//!
//! ```text
//! begin ─► decide: rate limit ─► ACL ─► door policy ─► (grant) card to the panel, attempt id
//!      ─► panel_verdict: wait, capped by the time left in the transaction
//!      ─► (transport answers the phone)
//!      ─► finish: FAST bookkeeping ─► rate-limit accounting ─► event row + journald
//! ```
//!
//! The decision is written into the [`Attempt`] the moment it is made, so a transaction that
//! times out afterwards (during the verdict wait or the last exchange) is still recorded as
//! that decision, never as an error.

pub mod ratelimit;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand_core::RngCore;
use tokio::sync::oneshot;

use crate::acl::{fingerprint, Decision, DenyReason};
use crate::aliro::consts::SIGNALING_USER_VERIFIED_BIT;
use crate::aliro::crypto::SymmetricKey;
use crate::aliro::reader::FastCredential;
use crate::card::{self, WiegandBits};
use crate::config::Door;
use crate::events::{self, AccessEvent, Transport};
use crate::osdp::Verdict;

use super::store::{StoreError, StoreHandle};
pub use crate::osdp::AttemptId;
pub use ratelimit::{RateLimitConfig, RateLimiter, UNIDENTIFIED};

/// The panel's verdict on the card of one attempt, when the panel sink can report it.
pub type VerdictWait = oneshot::Receiver<Verdict>;

/// Time kept back from a verdict wait for the answer to the phone (one APDU or BLE frame).
pub const ANSWER_RESERVE: Duration = Duration::from_millis(250);

/// Where a granted card number goes: the door's OSDP PD in the daemon.
pub trait PanelSink: Clone + Send + Sync + 'static {
    /// Queues the card for the panel under `attempt` (the PD carries the id to the panel's
    /// verdict). `started` is when the phone or card was presented (for timing). Returns where
    /// the panel's verdict on this card will come from, when this sink can learn it.
    fn send_card(
        &self,
        door: &Door,
        bits: WiegandBits,
        attempt: AttemptId,
        started: Instant,
    ) -> Option<VerdictWait>;
}

/// What the pipeline needs from the store ([`StoreHandle`] in the daemon).
pub trait AccessStore: Clone + Send + Sync + 'static {
    /// The ACL's answer for `subject` at `door`.
    fn acl_decision(
        &self,
        subject: &Subject,
        door: &str,
        now: time::OffsetDateTime,
    ) -> impl Future<Output = Result<Decision, StoreError>> + Send;
    /// Durably records an event; returns its id.
    fn record_event(
        &self,
        event: AccessEvent,
        attempt: Option<AttemptId>,
    ) -> impl Future<Output = Result<i64, StoreError>> + Send;
    /// The FAST keys stored for a reader.
    fn stored_fast_keys(
        &self,
        reader_id: [u8; 32],
    ) -> impl Future<Output = Result<Vec<FastCredential>, StoreError>> + Send;
    /// Stores a Kpersistent, or (`None`) marks the stored one as used.
    fn keep_fast_key(
        &self,
        reader_id: [u8; 32],
        endpoint_key: [u8; 65],
        k_persistent: Option<SymmetricKey>,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// How long the cached ACL has gone without the cloud (`None`: connected, or no cloud):
    /// what a door's offline policy is checked against.
    fn cloud_offline_for(&self) -> Option<Duration> {
        None
    }
}

impl AccessStore for StoreHandle {
    async fn acl_decision(
        &self,
        subject: &Subject,
        door: &str,
        now: time::OffsetDateTime,
    ) -> Result<Decision, StoreError> {
        match subject {
            Subject::Endpoint { key, .. } => self.decide(key, door, now).await,
            Subject::Card { uid } => self.decide_card(uid, door, now).await,
        }
    }

    async fn record_event(
        &self,
        event: AccessEvent,
        attempt: Option<AttemptId>,
    ) -> Result<i64, StoreError> {
        self.record(event, attempt).await
    }

    async fn stored_fast_keys(
        &self,
        reader_id: [u8; 32],
    ) -> Result<Vec<FastCredential>, StoreError> {
        self.fast_keys(reader_id).await
    }

    async fn keep_fast_key(
        &self,
        reader_id: [u8; 32],
        endpoint_key: [u8; 65],
        k_persistent: Option<SymmetricKey>,
    ) -> Result<bool, StoreError> {
        self.save_fast_key(reader_id, endpoint_key, k_persistent)
            .await
    }

    fn cloud_offline_for(&self) -> Option<Duration> {
        self.cloud_contact().and_then(|c| c.offline_for())
    }
}

/// Who is asking: what the transport authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// An Aliro endpoint, proven by its signature (or FAST cryptogram), with the signaling
    /// bitmap it reported (user verification).
    Endpoint {
        key: [u8; 65],
        signaling_bitmap: Option<u16>,
    },
    /// A physical card by UID (doors that accept cards; nothing proven, clonable).
    Card { uid: Vec<u8> },
}

impl Subject {
    /// The identity a rate limit counts against: a fingerprint (the raw UID stays out of logs).
    pub fn limiter_identity(&self) -> String {
        match self {
            Subject::Endpoint { key, .. } => fingerprint(key),
            Subject::Card { uid } => format!("card:{}", fingerprint(uid)),
        }
    }

    /// What identifies the subject in events (fingerprinted there).
    pub fn bytes(&self) -> &[u8] {
        match self {
            Subject::Endpoint { key, .. } => key,
            Subject::Card { uid } => uid,
        }
    }
}

/// One access attempt as the pipeline sees it; the transport holds it while it talks to the
/// phone.
#[derive(Debug)]
pub struct Attempt {
    pub transport: Transport,
    /// When the phone or card was presented.
    pub started: Instant,
    /// When the transaction's own limit ends (tokio's clock, so tests can pause it).
    deadline: tokio::time::Instant,
    pub subject: Option<Subject>,
    /// Set the moment the decision is made.
    pub decision: Option<Decision>,
    pub to_decision: Option<Duration>,
    /// The id the granted card went to the panel under.
    pub attempt_id: Option<AttemptId>,
    verdict: Option<VerdictWait>,
    /// The panel's verdict on the card, when it came within the wait.
    pub panel_verdict: Option<Verdict>,
    /// Failures before anything was identified count against [`UNIDENTIFIED`] (NFC: a broken
    /// card must not busy-loop the reader; BLE bounds those by its connection limit instead).
    blame_unidentified: bool,
}

impl Attempt {
    /// keyway's own decision was a grant.
    pub fn granted(&self) -> bool {
        matches!(self.decision, Some(Decision::Grant(_)))
    }

    /// What the phone is told: keyway's grant, unless the panel refused it (the panel has the
    /// last word on the door).
    pub fn phone_granted(&self) -> bool {
        self.granted() && self.panel_verdict != Some(Verdict::Denied)
    }

    pub fn endpoint_key(&self) -> Option<&[u8; 65]> {
        match &self.subject {
            Some(Subject::Endpoint { key, .. }) => Some(key),
            _ => None,
        }
    }

    pub fn card_uid(&self) -> Option<&[u8]> {
        match &self.subject {
            Some(Subject::Card { uid }) => Some(uid),
            _ => None,
        }
    }

    /// The identity a rate limit counts this attempt against.
    pub fn limiter_identity(&self) -> String {
        self.subject
            .as_ref()
            .map_or_else(|| UNIDENTIFIED.to_owned(), Subject::limiter_identity)
    }

    /// Failures before anything was identified count against [`UNIDENTIFIED`].
    pub fn blame_unidentified(mut self) -> Self {
        self.blame_unidentified = true;
        self
    }
}

/// Why the pipeline could not decide.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("ACL entry cannot be encoded for the panel: {0}")]
    Card(#[from] card::CardError),
}

impl AccessError {
    /// Stable code for events and logs.
    pub fn code(&self) -> &'static str {
        match self {
            AccessError::Store(_) => "store_error",
            AccessError::Card(_) => "bad_card_data",
        }
    }
}

/// How an attempt failed, as the transport words it (code for the event, message for logs).
#[derive(Debug)]
pub struct Failure {
    pub code: &'static str,
    pub message: String,
}

/// FAST bookkeeping of an Aliro transaction, done by [`Access::finish`].
pub struct FastUpdate {
    pub reader_id: [u8; 32],
    /// The endpoint was identified by its FAST cryptogram.
    pub used: bool,
    /// The Kpersistent a STANDARD transaction derived.
    pub learned: Option<SymmetricKey>,
}

/// One door's failure rate limiter, shared by all its transports.
pub type SharedLimiter = Arc<Mutex<RateLimiter>>;

/// A fresh limiter with `cfg` ([`RateLimitConfig::default`] in the daemon).
pub fn shared_limiter(cfg: RateLimitConfig) -> SharedLimiter {
    Arc::new(Mutex::new(RateLimiter::new(cfg)))
}

/// A fresh attempt id: 63 random bits (SQLite's integer holds it as is; unique across
/// restarts without any state).
pub fn new_attempt_id() -> AttemptId {
    rand_core::OsRng.next_u64() >> 1
}

/// The pipeline of one door. Cheap to clone; every transport of the door holds one.
#[derive(Clone)]
pub struct Access<P, S = StoreHandle> {
    pub door: Arc<Door>,
    pub store: S,
    panel: P,
    limiter: SharedLimiter,
}

impl<P: PanelSink, S: AccessStore> Access<P, S> {
    pub fn new(door: Arc<Door>, store: S, panel: P, limiter: SharedLimiter) -> Self {
        Self {
            door,
            store,
            panel,
            limiter,
        }
    }

    pub fn limiter(&self) -> &SharedLimiter {
        &self.limiter
    }

    /// A new attempt via `transport`, presented at `started`, whose transaction must end by
    /// `deadline`.
    pub fn begin(
        &self,
        transport: Transport,
        started: Instant,
        deadline: tokio::time::Instant,
    ) -> Attempt {
        Attempt {
            transport,
            started,
            deadline,
            subject: None,
            decision: None,
            to_decision: None,
            attempt_id: None,
            verdict: None,
            panel_verdict: None,
            blame_unidentified: false,
        }
    }

    /// Is `subject` serving a failure penalty (refused without an ACL lookup)?
    pub fn is_limited(&self, subject: &Subject) -> bool {
        self.limiter
            .lock()
            .map(|l| l.is_limited(&subject.limiter_identity(), Instant::now()))
            .unwrap_or(false)
    }

    /// How long the reader should pause before the next card after failures nobody could be
    /// blamed for.
    pub fn unidentified_pause(&self, now: Instant) -> Duration {
        self.limiter
            .lock()
            .map(|l| l.remaining(UNIDENTIFIED, now))
            .unwrap_or_default()
    }

    /// Rate limit, ACL, door policy; then [`settle`](Self::settle).
    pub async fn decide(&self, att: &mut Attempt, subject: Subject) -> Result<(), AccessError> {
        let decision = if self.is_limited(&subject) {
            Decision::Deny(DenyReason::RateLimited)
        } else {
            let d = self
                .store
                .acl_decision(&subject, &self.door.id, time::OffsetDateTime::now_utc())
                .await?;
            match &subject {
                Subject::Endpoint {
                    signaling_bitmap, ..
                } => apply_door_policy(self.door.sensitive, d, *signaling_bitmap),
                // A card reports nothing about its holder.
                Subject::Card { .. } => d,
            }
        };
        let decision = apply_offline_policy(&self.door, self.store.cloud_offline_for(), decision);
        self.settle(att, subject, decision)
    }

    /// Records `decision` in the attempt now and hands a grant's card to the panel under a new
    /// attempt id (before the phone is told, so the RAW leaves at the next poll). Also for
    /// decisions a transport makes itself (a step-up refusal).
    pub fn settle(
        &self,
        att: &mut Attempt,
        subject: Subject,
        decision: Decision,
    ) -> Result<(), AccessError> {
        att.subject = Some(subject);
        att.to_decision = Some(att.started.elapsed());
        if let Decision::Grant(g) = &decision {
            // An entry the panel cannot take is an error, not a grant nobody can use.
            let bits = card::encode(g.card_format, g.facility_code, g.card_number)?;
            let id = new_attempt_id();
            att.attempt_id = Some(id);
            att.verdict = self.panel.send_card(&self.door, bits, id, att.started);
        }
        att.decision = Some(decision);
        Ok(())
    }

    /// Waits (at most `wait`, and never past the transaction's deadline less
    /// [`ANSWER_RESERVE`]) for the panel's verdict on the attempt's card, so the phone is told
    /// what the panel decided. No verdict in time leaves keyway's grant standing; the verdict
    /// is stored with the event either way (by attempt id, from the bus).
    pub async fn panel_verdict(&self, att: &mut Attempt, wait: Duration) -> Option<Verdict> {
        let rx = att.verdict.take()?;
        let left = att
            .deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .saturating_sub(ANSWER_RESERVE);
        let wait = wait.min(left);
        if wait.is_zero() {
            return None;
        }
        let verdict = tokio::time::timeout(wait, rx).await.ok()?.ok();
        if verdict == Some(Verdict::Denied) {
            log::warn!(target: "keyway::daemon", door = self.door.id.as_str();
                "door {}: the panel refused a card keyway granted; the phone is told denied",
                self.door.id);
        }
        att.panel_verdict = verdict;
        verdict
    }

    /// Ends the attempt: FAST bookkeeping, rate-limit accounting, the event row (durable
    /// first) and its journald entry. After the phone was answered, so it never waits for this.
    pub async fn finish(&self, att: &Attempt, failure: Option<Failure>, fast: Option<FastUpdate>) {
        let door = self.door.id.as_str();
        let transport = att.transport.as_str();
        if let Some(f) = &failure {
            log::warn!(target: "keyway::daemon", door = door, transport = transport, error = f.code;
                "door {door}: {transport} attempt ended: {}", f.message);
        }
        if let Some(fast) = fast {
            self.remember_fast_key(att, fast).await;
        }
        if att.subject.is_some() || att.blame_unidentified {
            self.count_for_rate_limit(&att.limiter_identity(), att.granted());
        }
        if att.card_uid().is_some() {
            log::info!(target: "keyway::daemon", door = door;
                "door {door}: physical card (UID-only, clonable)");
        }
        let latency = att.to_decision.unwrap_or_else(|| att.started.elapsed());
        let latency_ms = u32::try_from(latency.as_millis()).unwrap_or(u32::MAX);
        let now = events::unix_ms(time::OffsetDateTime::now_utc());
        let subject = att.subject.as_ref().map(Subject::bytes);
        let event = match (&att.decision, subject) {
            (Some(d), Some(s)) => {
                AccessEvent::from_decision(now, door, att.transport, s, d, latency_ms)
            }
            (_, s) => AccessEvent::error(
                now,
                door,
                att.transport,
                s,
                failure.as_ref().map_or("no_decision", |f| f.code),
                latency_ms,
            ),
        };
        match self.store.record_event(event.clone(), att.attempt_id).await {
            Ok(id) => events::log_event(&event, id),
            Err(e) => {
                log::error!(target: "keyway::daemon", door = door;
                    "door {door}: event could not be stored: {e}");
                events::log_event(&event, -1);
            }
        }
    }

    /// A grant clears the identity; anything else counts as one failure against it.
    fn count_for_rate_limit(&self, id: &str, granted: bool) {
        let Ok(mut l) = self.limiter.lock() else {
            return;
        };
        if granted {
            l.success(id);
            return;
        }
        let penalty = l.failure(id, Instant::now());
        if !penalty.is_zero() {
            let door = self.door.id.as_str();
            log::warn!(target: "keyway::daemon", door = door, identity = id;
                "door {door}: {id} failed repeatedly; refused for {} ms", penalty.as_millis());
        }
    }

    /// Keeps the phone's Kpersistent for its next FAST tap (phones in the ACL only: the store
    /// refuses others), or marks the stored one as used.
    async fn remember_fast_key(&self, att: &Attempt, fast: FastUpdate) {
        let Some(key) = att.endpoint_key() else {
            return;
        };
        // Rate-limited attempts never reached the ACL: do not refresh anything for them.
        if matches!(
            att.decision,
            None | Some(Decision::Deny(DenyReason::RateLimited))
        ) {
            return;
        }
        let r = match (fast.used, fast.learned) {
            (true, _) => self.store.keep_fast_key(fast.reader_id, *key, None).await,
            (false, Some(k)) => {
                self.store
                    .keep_fast_key(fast.reader_id, *key, Some(k))
                    .await
            }
            (false, None) => return,
        };
        if let Err(e) = r {
            log::warn!(target: "keyway::daemon", door = self.door.id.as_str();
                "door {}: FAST key not stored: {e}", self.door.id);
        }
    }
}

/// The door's offline policy on top of the ACL: once keyway has been without the cloud for
/// longer than the door's limit, a fail-secure door denies (`cloud_offline`: a revocation may
/// not have reached it); any other door keeps granting from the cached ACL and says so.
pub fn apply_offline_policy(door: &Door, offline: Option<Duration>, d: Decision) -> Decision {
    let Some(policy) = door.cloud_offline else {
        return d;
    };
    if !d.is_grant() || !policy.exceeded(offline) {
        return d;
    }
    let secs = offline.unwrap_or_default().as_secs();
    let limit = policy.limit.as_secs();
    if policy.fail_secure {
        log::warn!(target: "keyway::daemon", door = door.id.as_str(), offline_s = secs;
            "door {}: denied (cloud_offline): no cloud for {secs} s, over the door's {limit} s limit (fail secure)",
            door.id);
        return Decision::Deny(DenyReason::CloudOffline);
    }
    log::warn!(target: "keyway::daemon", door = door.id.as_str(), offline_s = secs;
        "door {}: granting from the cached ACL with no cloud for {secs} s, over the door's {limit} s limit",
        door.id);
    d
}

/// The door's own rules on top of the ACL: a sensitive door grants only to a phone that
/// reports user verification.
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
