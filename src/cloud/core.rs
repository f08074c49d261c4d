//! The sans-IO sync core: everything the cloud link decides, with no socket, no timer and no
//! randomness of its own (quinn-proto style).
//!
//! Call order, written once:
//! 1. `poll_connect(now)` when it returns a plan, connect to `plan.broker` with `plan.will`
//!    as the Last Will; then `handle_connected(session_present, …)` on CONNACK or
//!    `handle_connection_lost(…)` when the attempt or the connection fails.
//! 2. Every received PUBLISH goes to `handle_message(topic, payload, …)`; PUBACK it after the
//!    call returns (the apply is committed by then, or the message refused for good).
//! 3. `handle_timeout(…)` whenever `poll_timeout()` has passed; `handle_events_recorded(…)`
//!    when new events are in the outbox (optional: the outbox is also polled).
//! 4. After any call: drain `poll_transmit()` (publish, QoS 1) and `poll_effect()`.
//!
//! Storage is reached through [`AclSink`] and [`Outbox`]; time comes in as [`Now`] (a monotonic
//! instant for schedules and unix milliseconds for expiry and reports).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::msg::{
    self, AclReport, AclRequestMsg, AppliedMsg, CommandKind, CommandStatusMsg, EventsMsg,
    Heartbeat, NotesMsg, Reject, RejectCode, RejectedMsg, StateMsg, TopicKind, Topics,
};
use super::sign::TrustedKeys;
use super::store::{chain_hash, AclSink, Outbox, SinkError};

/// Both storage traits, as one bound.
pub trait SyncStore: AclSink + Outbox {}
impl<T: AclSink + Outbox> SyncStore for T {}

/// The two clocks a call needs.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub mono: Instant,
    pub unix_ms: i64,
}

impl Now {
    fn unix_s(self) -> i64 {
        self.unix_ms.div_euclid(1000)
    }
}

/// Settings of the core (from `[cloud]`).
#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub site: String,
    pub gateway: String,
    pub topics: Topics,
    /// How many broker URLs to rotate through.
    pub brokers: usize,
    pub heartbeat: Duration,
    /// Events per `events` message.
    pub batch_size: usize,
    /// `events` messages sent and not yet acked, at most.
    pub max_in_flight: usize,
    /// An unacked batch is resent (flagged `replay`) after this long.
    pub ack_timeout: Duration,
    /// A snapshot is abandoned when no chunk came for this long.
    pub chunk_timeout: Duration,
    /// How often the outbox is looked at when nobody says events were recorded.
    pub outbox_poll: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// At most one `acl/request` per this long (a burst of gapped deltas asks once).
    pub resync_holdoff: Duration,
    /// Software version in the birth message.
    pub software: String,
}

impl CoreConfig {
    /// Defaults for everything but the ids.
    pub fn new(topics: Topics, site: &str, gateway: &str, brokers: usize) -> CoreConfig {
        CoreConfig {
            site: site.to_owned(),
            gateway: gateway.to_owned(),
            topics,
            brokers: brokers.max(1),
            heartbeat: Duration::from_secs(60),
            batch_size: 100,
            max_in_flight: 4,
            ack_timeout: Duration::from_secs(30),
            chunk_timeout: Duration::from_secs(30),
            outbox_poll: Duration::from_secs(1),
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
            resync_holdoff: Duration::from_secs(10),
            software: env!("CARGO_PKG_VERSION").to_owned(),
        }
    }
}

/// A message to publish (QoS 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

/// Something for the adapter to do besides publishing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Subscribe (QoS 1) to these filters: the session is new.
    Subscribe(Vec<String>),
    SetLogLevel(log::LevelFilter),
}

/// How to make the next connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectPlan {
    /// Index into the configured broker list.
    pub broker: usize,
    /// The Last Will: retained `offline` with this connection's `boot` / `bd_seq`.
    pub will: Transmit,
    pub bd_seq: u64,
    /// Appended to the configured client id, with a clean session, after a broker refused to
    /// subscribe this client (see [`Core::handle_subscribed`]); `None`: the configured id.
    pub client_id_suffix: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// Waiting to connect at `next_connect`.
    Idle,
    Connecting,
    Connected,
}

/// A snapshot being received.
struct Assembly {
    version: u64,
    size: u64,
    chunks: u32,
    chunk_size: u32,
    sha256: [u8; 32],
    next: u32,
    received: u64,
    hasher: Sha256,
    deadline: Instant,
    /// Chunks that came ahead of `next`, by index (bounded).
    early: BTreeMap<u32, Vec<u8>>,
}

/// Chunks kept ahead of their turn at most, and their bytes: past either, a gap.
const MAX_EARLY_CHUNKS: usize = 16;
const MAX_EARLY_BYTES: usize = 1024 * 1024;

/// Where the event upload stands.
#[derive(Default)]
struct Cursor {
    /// Highest seq the backend acked (this process).
    acked: i64,
    /// Highest seq published on the current connection.
    sent: i64,
    /// Highest seq ever published by this process: anything at or below is a replay.
    high_water: i64,
    /// (last seq of the batch, ack deadline), oldest first.
    in_flight: VecDeque<(i64, Instant)>,
}

/// The two upward streams kept until the backend acks them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    Events,
    Notes,
}

impl Stream {
    fn topic(self) -> TopicKind {
        match self {
            Stream::Events => TopicKind::Events,
            Stream::Notes => TopicKind::Notes,
        }
    }

    fn ack_type(self) -> &'static str {
        match self {
            Stream::Events => msg::TYPE_ACK,
            Stream::Notes => msg::TYPE_NOTES_ACK,
        }
    }
}

/// The message for `items` (oldest first) and its last seq; `None` when there are none. Long
/// ids can make a batch too big for the broker: it is halved until it fits (the rest goes in
/// the next batch). `replay`: the batch starts at or below what this process sent before.
fn fit<T>(
    mut items: Vec<T>,
    high_water: i64,
    seq: impl Fn(&T) -> i64,
    make: impl Fn(&[T], bool) -> Vec<u8>,
) -> Option<(Vec<u8>, i64)> {
    let replay = seq(items.first()?) <= high_water;
    let mut payload = make(&items, replay);
    while payload.len() > msg::MAX_MESSAGE_BYTES && items.len() > 1 {
        items.truncate(items.len() / 2);
        payload = make(&items, replay);
    }
    Some((payload, seq(items.last()?)))
}

/// Most command request ids remembered for replay refusal (each until its expiry).
const MAX_SEEN_COMMANDS: usize = 4096;
/// Most queued transmits; the rest are dropped (the outbox and the backend's retries recover).
const MAX_TRANSMITS: usize = 256;

/// Counters for logs and the heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    pub rejected: u64,
    pub snapshots_applied: u64,
    pub deltas_applied: u64,
    pub events_acked: u64,
    pub transmits_dropped: u64,
}

pub struct Core {
    cfg: CoreConfig,
    keys: TrustedKeys,
    boot: u64,
    bd_seq: u64,
    link: Link,
    attempt: u32,
    broker: usize,
    next_connect: Instant,
    rng: u64,
    started: Instant,
    transmits: VecDeque<Transmit>,
    effects: VecDeque<Effect>,
    applied: Option<AclReport>,
    assembly: Option<Assembly>,
    cursor: Cursor,
    /// The notes on events (late panel verdicts, first uses): their own sequence and acks.
    notes_cursor: Cursor,
    instance: Option<String>,
    /// A `resync` command waiting for its snapshot: (request id, expires at unix s).
    pending_resync: Option<(String, i64)>,
    last_resync_request: Option<Instant>,
    seen_commands: HashMap<String, i64>,
    next_heartbeat: Option<Instant>,
    next_outbox_poll: Option<Instant>,
    /// SUBSCRIBE sent on this connection and not yet confirmed by a SUBACK.
    subscribe_unconfirmed: bool,
    /// The client-id suffix in use after a refused subscription (see `ConnectPlan`).
    client_id_suffix: Option<String>,
    /// A snapshot was cut off by a new session: ask for it on each new session until the
    /// subscriptions are confirmed.
    snapshot_interrupted: bool,
    counters: Counters,
    local: msg::LocalHealth,
    /// Unix ms of the backend's last events ack (this process).
    last_ack_ms: Option<i64>,
}

impl Core {
    /// `boot` is this process start's number (persisted by the caller), `applied` the ACL
    /// version already in the store, `seed` the randomness for backoff jitter.
    pub fn new(
        cfg: CoreConfig,
        keys: TrustedKeys,
        boot: u64,
        applied: Option<AclReport>,
        seed: u64,
        now: Instant,
    ) -> Core {
        Core {
            cfg,
            keys,
            boot,
            bd_seq: 0,
            link: Link::Idle,
            attempt: 0,
            broker: 0,
            next_connect: now,
            // xorshift must not start at 0.
            rng: seed | 1,
            started: now,
            transmits: VecDeque::new(),
            effects: VecDeque::new(),
            applied,
            assembly: None,
            cursor: Cursor::default(),
            notes_cursor: Cursor::default(),
            instance: None,
            pending_resync: None,
            last_resync_request: None,
            seen_commands: HashMap::new(),
            next_heartbeat: None,
            next_outbox_poll: None,
            subscribe_unconfirmed: false,
            client_id_suffix: None,
            snapshot_interrupted: false,
            counters: Counters::default(),
            local: msg::LocalHealth::default(),
            last_ack_ms: None,
        }
    }

    /// The gateway's own state for the next heartbeat (doors, disk), from the adapter.
    pub fn set_local_health(&mut self, local: msg::LocalHealth) {
        self.local = local;
    }

    /// Unix ms of the backend's last application-level events ack since this start.
    pub fn last_ack_ms(&self) -> Option<i64> {
        self.last_ack_ms
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    pub fn applied(&self) -> Option<&AclReport> {
        self.applied.as_ref()
    }

    pub fn is_connected(&self) -> bool {
        self.link == Link::Connected
    }

    // -----------------------------------------------------------------------------------
    // Connection.

    /// The next connection to make, once its backoff has passed.
    pub fn poll_connect(&mut self, now: Now) -> Option<ConnectPlan> {
        if self.link != Link::Idle || now.mono < self.next_connect {
            return None;
        }
        self.link = Link::Connecting;
        self.bd_seq += 1;
        let will = StateMsg {
            kind: "state".into(),
            v: msg::VERSION,
            state: "offline".into(),
            boot: self.boot,
            bd_seq: self.bd_seq,
            ts_ms: now.unix_ms,
            software: None,
            acl_version: None,
        };
        Some(ConnectPlan {
            broker: self.broker,
            will: Transmit {
                topic: self.cfg.topics.topic(TopicKind::State),
                payload: msg::to_json(&will),
                retain: true,
            },
            bd_seq: self.bd_seq,
            client_id_suffix: self.client_id_suffix.clone(),
        })
    }

    /// CONNACK received.
    pub fn handle_connected<S: SyncStore>(
        &mut self,
        session_present: bool,
        now: Now,
        store: &mut S,
    ) {
        self.link = Link::Connected;
        self.attempt = 0;
        if !session_present {
            // A fresh session has no subscriptions (rumqttc does not restore them).
            let filters = TopicKind::DOWN
                .iter()
                .map(|k| self.cfg.topics.topic(*k))
                .collect();
            self.effects.push_back(Effect::Subscribe(filters));
            self.subscribe_unconfirmed = true;
            // The chunks of a snapshot in progress may have gone with the old session (a
            // cluster node that died takes its sessions along): start it over now rather
            // than after the chunk timeout, and ask again on every new session until one
            // has taken the subscriptions (the request may die with a refused session).
            if self.assembly.is_some() {
                self.abort_snapshot(store);
                self.snapshot_interrupted = true;
                log::info!(target: "keyway::cloud", "new session in the middle of a snapshot: asking for it again");
            }
        }
        let birth = StateMsg {
            kind: "state".into(),
            v: msg::VERSION,
            state: "online".into(),
            boot: self.boot,
            bd_seq: self.bd_seq,
            ts_ms: now.unix_ms,
            software: Some(self.cfg.software.clone()),
            acl_version: self.applied.as_ref().map(|a| a.version),
        };
        self.publish(TopicKind::State, msg::to_json(&birth));
        if self.applied.is_none() {
            self.request_snapshot("startup", now, true);
        } else if self.snapshot_interrupted && !session_present {
            self.request_snapshot("snapshot_failed", now, true);
        }
        self.rewind();
        self.next_heartbeat = Some(now.mono + self.cfg.heartbeat);
        self.pump_outbox(now, store);
    }

    /// SUBACK received: `ok` when every filter was granted. A refusal (a failure return
    /// code, or the broker closing the connection before its SUBACK) means this client id's
    /// session cannot be used here — RabbitMQ refuses to subscribe a client whose session
    /// queue lives on a cluster node that is down, for as long as that node is down. The next
    /// connections then use a fresh client id (configured id + `-s<bd_seq>`) with a clean
    /// session; the adapter drops the connection after a refusal.
    pub fn handle_subscribed(&mut self, ok: bool) {
        if ok {
            self.subscribe_unconfirmed = false;
            self.snapshot_interrupted = false;
        }
    }

    /// The connection attempt failed or an established connection was lost: back off, then
    /// try the next broker.
    pub fn handle_connection_lost(&mut self, now: Now) {
        if self.link == Link::Idle {
            return;
        }
        if std::mem::take(&mut self.subscribe_unconfirmed) && self.link == Link::Connected {
            log::warn!(target: "keyway::cloud", "the broker did not take the subscriptions: next connections use a fresh client id");
            self.client_id_suffix = Some(format!("-s{}", self.bd_seq));
        }
        self.link = Link::Idle;
        self.transmits.clear();
        self.rewind();
        self.next_heartbeat = None;
        self.next_outbox_poll = None;
        self.broker = (self.broker + 1) % self.cfg.brokers;
        let delay = self.backoff();
        self.attempt = self.attempt.saturating_add(1);
        self.next_connect = now.mono + delay;
    }

    /// Full jitter: uniform in [min, min(max, min·2^attempt)], so a fleet that lost its
    /// broker together does not come back together.
    fn backoff(&mut self) -> Duration {
        let min = self.cfg.backoff_min.as_millis() as u64;
        let max = self.cfg.backoff_max.as_millis() as u64;
        let ceil = min
            .saturating_mul(1u64 << self.attempt.min(20))
            .min(max)
            .max(min);
        let span = ceil - min + 1;
        Duration::from_millis(min + self.next_random() % span)
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64*: enough for jitter; the seed is the injected randomness.
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    // -----------------------------------------------------------------------------------
    // Output.

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    pub fn poll_effect(&mut self) -> Option<Effect> {
        self.effects.pop_front()
    }

    /// The earliest instant `handle_timeout` (or `poll_connect`) has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t: Vec<Instant> = Vec::new();
        if self.link == Link::Idle {
            t.push(self.next_connect);
        }
        t.extend(self.next_heartbeat);
        t.extend(self.next_outbox_poll);
        t.extend(self.assembly.as_ref().map(|a| a.deadline));
        t.extend(self.cursor.in_flight.front().map(|f| f.1));
        t.extend(self.notes_cursor.in_flight.front().map(|f| f.1));
        t.into_iter().min()
    }

    fn publish(&mut self, kind: TopicKind, payload: Vec<u8>) {
        if self.link != Link::Connected {
            return;
        }
        if self.transmits.len() >= MAX_TRANSMITS {
            self.counters.transmits_dropped += 1;
            return;
        }
        self.transmits.push_back(Transmit {
            topic: self.cfg.topics.topic(kind),
            payload,
            retain: kind.retained(),
        });
    }

    // -----------------------------------------------------------------------------------
    // Timers.

    pub fn handle_timeout<S: SyncStore>(&mut self, now: Now, store: &mut S) {
        if self
            .assembly
            .as_ref()
            .is_some_and(|a| now.mono >= a.deadline)
        {
            self.abort_snapshot(store);
            self.reject(
                TopicKind::AclChunk,
                Reject::new(RejectCode::SnapshotTimeout, "no chunk for too long"),
                None,
                now,
            );
            self.request_snapshot("snapshot_failed", now, true);
        }
        if let Some((id, exp)) = &self.pending_resync {
            if now.unix_s() >= *exp {
                let id = id.clone();
                self.pending_resync = None;
                self.status(&id, "failed", Some("expired"), None, now);
            }
        }
        let late = |c: &Cursor| c.in_flight.front().is_some_and(|f| now.mono >= f.1);
        if late(&self.cursor) || late(&self.notes_cursor) {
            // The backend did not ack in time: send again from the last ack, as replays.
            self.rewind();
        }
        if self.next_heartbeat.is_some_and(|t| now.mono >= t) {
            let hb = self.heartbeat(now, store);
            self.publish(TopicKind::Heartbeat, msg::to_json(&hb));
            self.next_heartbeat = Some(now.mono + self.cfg.heartbeat);
        }
        self.pump_outbox(now, store);
    }

    /// New events were recorded: send them now instead of at the next outbox poll.
    pub fn handle_events_recorded<S: SyncStore>(&mut self, now: Now, store: &mut S) {
        self.pump_outbox(now, store);
    }

    fn heartbeat<S: SyncStore>(&mut self, now: Now, store: &mut S) -> Heartbeat {
        let outbox = store.depth().unwrap_or_else(|e| {
            log::warn!(target: "keyway::cloud", "outbox depth: {e}");
            msg::OutboxReport::default()
        });
        Heartbeat {
            kind: "heartbeat".into(),
            v: msg::VERSION,
            boot: self.boot,
            bd_seq: self.bd_seq,
            ts_ms: now.unix_ms,
            uptime_s: now.mono.saturating_duration_since(self.started).as_secs(),
            acl_age_s: self
                .applied
                .as_ref()
                .map(|a| u64::try_from((now.unix_ms - a.applied_at_ms) / 1000).unwrap_or(0)),
            acl: self.applied.clone(),
            outbox,
            rejected: self.counters.rejected,
            doors: self.local.doors.clone(),
            disk: self.local.disk.clone(),
        }
    }

    // -----------------------------------------------------------------------------------
    // Events up.

    fn rewind(&mut self) {
        for c in [&mut self.cursor, &mut self.notes_cursor] {
            c.sent = c.acked;
            c.in_flight.clear();
        }
    }

    fn cursor_mut(&mut self, stream: Stream) -> &mut Cursor {
        match stream {
            Stream::Events => &mut self.cursor,
            Stream::Notes => &mut self.notes_cursor,
        }
    }

    fn instance<S: SyncStore>(&mut self, store: &mut S) -> Option<String> {
        if self.instance.is_none() {
            match store.instance() {
                Ok(i) => self.instance = Some(i),
                Err(e) => log::warn!(target: "keyway::cloud", "outbox instance: {e}"),
            }
        }
        self.instance.clone()
    }

    fn pump_outbox<S: SyncStore>(&mut self, now: Now, store: &mut S) {
        if self.link != Link::Connected {
            return;
        }
        self.next_outbox_poll = Some(now.mono + self.cfg.outbox_poll);
        let Some(instance) = self.instance(store) else {
            return;
        };
        self.pump(Stream::Events, &instance, now, store);
        self.pump(Stream::Notes, &instance, now, store);
    }

    /// Sends the next batches of `stream` while its window has room.
    fn pump<S: SyncStore>(&mut self, stream: Stream, instance: &str, now: Now, store: &mut S) {
        let (limit, window) = (self.cfg.batch_size.max(1), self.cfg.max_in_flight.max(1));
        while self.cursor_mut(stream).in_flight.len() < window {
            let c = self.cursor_mut(stream);
            let (after, high_water) = (c.sent, c.high_water);
            let built = match stream {
                Stream::Events => store.batch(after, limit).map(|b| {
                    fit(
                        b,
                        high_water,
                        |e| e.seq,
                        |events, replay| {
                            msg::to_json(&EventsMsg {
                                kind: "events".into(),
                                v: msg::VERSION,
                                instance: instance.to_owned(),
                                replay,
                                events: events.to_vec(),
                            })
                        },
                    )
                }),
                Stream::Notes => store.notes(after, limit).map(|b| {
                    fit(
                        b,
                        high_water,
                        |n| n.seq,
                        |notes, replay| {
                            msg::to_json(&NotesMsg {
                                kind: msg::TYPE_NOTES.into(),
                                v: msg::VERSION,
                                instance: instance.to_owned(),
                                replay,
                                notes: notes.to_vec(),
                            })
                        },
                    )
                }),
            };
            let (payload, last) = match built {
                Ok(Some(b)) => b,
                Ok(None) => return,
                Err(e) => {
                    log::warn!(target: "keyway::cloud", "reading the outbox: {e}");
                    return;
                }
            };
            self.publish(stream.topic(), payload);
            let deadline = now.mono + self.cfg.ack_timeout;
            let c = self.cursor_mut(stream);
            c.sent = last;
            c.high_water = c.high_water.max(last);
            c.in_flight.push_back((last, deadline));
        }
    }

    fn handle_ack<S: SyncStore>(
        &mut self,
        stream: Stream,
        payload: &[u8],
        now: Now,
        store: &mut S,
    ) -> Result<(), Reject> {
        let ack = msg::parse_ack(payload, stream.ack_type())?;
        let instance = self.instance(store);
        if instance.as_deref() != Some(ack.instance.as_str()) {
            return Err(Reject::new(
                RejectCode::WrongTarget,
                "ack for another outbox instance",
            ));
        }
        let c = self.cursor_mut(stream);
        // Never forget rows this process has not sent: they would be lost if the ack is
        // wrong. Rows acked beyond that are simply sent again.
        let through = ack.through_seq.min(c.high_water);
        if through <= c.acked {
            return Ok(());
        }
        let n = match stream {
            Stream::Events => store.ack_through(through, now.unix_ms),
            Stream::Notes => store.ack_notes_through(through, now.unix_ms),
        }
        .map_err(|e| Reject::new(RejectCode::ApplyFailed, e.to_string()))?;
        if stream == Stream::Events {
            self.counters.events_acked += n as u64;
            self.last_ack_ms = Some(now.unix_ms);
        }
        let c = self.cursor_mut(stream);
        c.acked = through;
        if c.sent < through {
            c.sent = through;
        }
        while c.in_flight.front().is_some_and(|f| f.0 <= through) {
            c.in_flight.pop_front();
        }
        // Acked events may release their notes.
        self.pump_outbox(now, store);
        Ok(())
    }

    // -----------------------------------------------------------------------------------
    // Down messages.

    /// Handles one received message. `Err` is a refusal, already counted, logged and reported
    /// up on `rejected` (and on `cmd/status` for commands); the caller only PUBACKs.
    pub fn handle_message<S: SyncStore>(
        &mut self,
        topic: &str,
        payload: &[u8],
        now: Now,
        store: &mut S,
    ) -> Result<TopicKind, Reject> {
        let Some(kind) = self.cfg.topics.classify(topic) else {
            // Not ours (a broker or ACL mistake): ignore, never report to someone else's topic.
            log::debug!(target: "keyway::cloud", "ignoring a message on {topic}");
            return Err(Reject::new(RejectCode::WrongTarget, "unexpected topic"));
        };
        if payload.len() > msg::MAX_MESSAGE_BYTES {
            let r = Reject::new(RejectCode::Oversized, format!("{} bytes", payload.len()));
            self.reject(kind, r.clone(), None, now);
            return Err(r);
        }
        let result = match kind {
            TopicKind::AclSnapshot => self.on_manifest(payload, now, store),
            TopicKind::AclChunk => self.on_chunk(payload, now, store),
            TopicKind::AclDelta => self.on_delta(payload, now, store),
            TopicKind::Command => return self.on_command(payload, now, store).map(|_| kind),
            TopicKind::EventsAck => self.handle_ack(Stream::Events, payload, now, store),
            TopicKind::NotesAck => self.handle_ack(Stream::Notes, payload, now, store),
            _ => Err(Reject::new(RejectCode::WrongTarget, "not a down topic")),
        };
        match result {
            Ok(()) => Ok(kind),
            Err(r) => {
                if !r.reported {
                    self.reject(kind, r.clone(), None, now);
                }
                Err(r)
            }
        }
    }

    fn reject(&mut self, kind: TopicKind, r: Reject, request_id: Option<String>, now: Now) {
        self.counters.rejected += 1;
        log::warn!(
            target: "keyway::cloud",
            "refused a message on {}: {} ({})",
            kind.suffix(),
            r.code.as_str(),
            r.detail
        );
        let m = RejectedMsg {
            kind: "rejected".into(),
            v: msg::VERSION,
            topic: kind.suffix().into(),
            reason: r.code,
            detail: r.detail,
            request_id,
            ts_ms: now.unix_ms,
        };
        self.publish(TopicKind::Rejected, msg::to_json(&m));
    }

    fn request_snapshot(&mut self, reason: &str, now: Now, force: bool) {
        let held = self
            .last_resync_request
            .is_some_and(|t| now.mono < t + self.cfg.resync_holdoff);
        if held && !force {
            return;
        }
        self.last_resync_request = Some(now.mono);
        let m = AclRequestMsg {
            kind: "acl_request".into(),
            v: msg::VERSION,
            have_version: self.applied.as_ref().map(|a| a.version),
            reason: reason.into(),
            ts_ms: now.unix_ms,
        };
        self.publish(TopicKind::AclRequest, msg::to_json(&m));
    }

    fn applied_version(&self) -> Option<u64> {
        self.applied.as_ref().map(|a| a.version)
    }

    fn on_applied(&mut self, report: AclReport, source: &str) {
        log::info!(
            target: "keyway::cloud",
            "ACL version {} applied from a {source}",
            report.version
        );
        let m = AppliedMsg {
            kind: "acl_applied".into(),
            v: msg::VERSION,
            source: source.into(),
            acl: report.clone(),
        };
        self.applied = Some(report);
        // A gap seen after this apply is news: it may ask at once.
        self.last_resync_request = None;
        self.publish(TopicKind::AclApplied, msg::to_json(&m));
    }

    fn on_manifest<S: SyncStore>(
        &mut self,
        payload: &[u8],
        now: Now,
        store: &mut S,
    ) -> Result<(), Reject> {
        let (_kid, body) = self.keys.verify(payload)?;
        let cm = msg::parse_manifest(&body, &self.cfg.site, &self.cfg.gateway, now.unix_s())?;
        if self.applied_version().is_some_and(|v| v >= cm.m.version) {
            return Err(Reject::new(
                RejectCode::Replayed,
                format!(
                    "snapshot v{} is not above the applied version",
                    cm.m.version
                ),
            ));
        }
        // A newer manifest (or the same one redelivered) starts over.
        self.abort_snapshot(store);
        store
            .snapshot_begin(cm.m.version, cm.m.format, cm.m.size)
            .map_err(apply_failed)?;
        self.assembly = Some(Assembly {
            version: cm.m.version,
            size: cm.m.size,
            chunks: cm.m.chunks,
            chunk_size: cm.m.chunk_size,
            sha256: cm.sha256,
            next: 0,
            received: 0,
            hasher: Sha256::new(),
            deadline: now.mono + self.cfg.chunk_timeout,
            early: BTreeMap::new(),
        });
        Ok(())
    }

    fn abort_snapshot<S: SyncStore>(&mut self, store: &mut S) {
        if self.assembly.take().is_some() {
            store.snapshot_abort();
        }
    }

    /// Abandons the snapshot, refuses with `r` and asks for another.
    fn fail_snapshot<S: SyncStore>(
        &mut self,
        store: &mut S,
        r: Reject,
        now: Now,
    ) -> Result<(), Reject> {
        self.abort_snapshot(store);
        self.fail_pending_resync(r.code.as_str(), now);
        // Reported before the request, so the backend reads the reason first.
        self.reject(TopicKind::AclChunk, r.clone(), None, now);
        self.request_snapshot("snapshot_failed", now, true);
        Err(r.reported())
    }

    fn fail_pending_resync(&mut self, reason: &str, now: Now) {
        if let Some((id, _)) = self.pending_resync.take() {
            self.status(&id, "failed", Some(reason), None, now);
        }
    }

    fn on_chunk<S: SyncStore>(
        &mut self,
        payload: &[u8],
        now: Now,
        store: &mut S,
    ) -> Result<(), Reject> {
        let chunk = msg::parse_chunk(payload)?;
        let Some(a) = self.assembly.as_mut() else {
            if self.applied_version().is_some_and(|v| v >= chunk.version) {
                return Ok(()); // a late redelivery of a snapshot already applied
            }
            return Err(Reject::new(
                RejectCode::OutOfOrder,
                "chunk without a manifest",
            ));
        };
        if chunk.version < a.version {
            return Ok(()); // an older snapshot's leftovers
        }
        if chunk.version > a.version {
            return Err(Reject::new(
                RejectCode::OutOfOrder,
                "chunk of a snapshot without a manifest",
            ));
        }
        if chunk.index < a.next || a.early.contains_key(&chunk.index) {
            return Ok(()); // QoS 1 redelivery
        }
        if chunk.index >= a.chunks {
            let r = Reject::new(
                RejectCode::ChunkGap,
                format!("chunk {} of {}", chunk.index, a.chunks),
            );
            return self.fail_snapshot(store, r, now);
        }
        a.deadline = now.mono + self.cfg.chunk_timeout;
        if chunk.index > a.next {
            // Ahead of its turn (a broker may reorder across a reconnect): kept, bounded, until
            // the missing ones come; more than that is a gap.
            let early_bytes: usize = a.early.values().map(Vec::len).sum();
            if a.early.len() >= MAX_EARLY_CHUNKS || early_bytes + chunk.data.len() > MAX_EARLY_BYTES
            {
                let r = Reject::new(
                    RejectCode::ChunkGap,
                    format!(
                        "chunk {} where {} belongs, {} already held",
                        chunk.index,
                        a.next,
                        a.early.len()
                    ),
                );
                return self.fail_snapshot(store, r, now);
            }
            a.early.insert(chunk.index, chunk.data);
            return Ok(());
        }
        let mut data = chunk.data;
        loop {
            if let Err(r) = self.take_chunk(data, store) {
                return self.fail_snapshot(store, r, now);
            }
            let Some(a) = self.assembly.as_mut() else {
                return Ok(());
            };
            if a.next == a.chunks {
                return self.finish_snapshot(now, store);
            }
            match a.early.remove(&a.next) {
                Some(d) => data = d,
                None => return Ok(()),
            }
        }
    }

    /// The next chunk in order: length, hash, into the apply engine.
    fn take_chunk<S: SyncStore>(&mut self, data: Vec<u8>, store: &mut S) -> Result<(), Reject> {
        let Some(a) = self.assembly.as_mut() else {
            return Ok(());
        };
        let expected = if a.next + 1 == a.chunks {
            a.size - a.received
        } else {
            u64::from(a.chunk_size)
        };
        if data.len() as u64 != expected {
            return Err(Reject::new(
                RejectCode::HashMismatch,
                format!(
                    "chunk {} has {} bytes, {expected} expected",
                    a.next,
                    data.len()
                ),
            ));
        }
        a.hasher.update(&data);
        a.received += expected;
        a.next += 1;
        store
            .snapshot_push(&data)
            .map_err(|e| Reject::new(RejectCode::ApplyFailed, e.to_string()))
    }

    /// Every chunk is in: check the hash against the signed manifest, then commit.
    fn finish_snapshot<S: SyncStore>(&mut self, now: Now, store: &mut S) -> Result<(), Reject> {
        let Some(a) = self.assembly.take() else {
            return Ok(());
        };
        let digest: [u8; 32] = a.hasher.finalize().into();
        if digest != a.sha256 {
            // The staged apply is dropped: the old ACL stays, unchanged and serving.
            store.snapshot_abort();
            let r = Reject::new(
                RejectCode::HashMismatch,
                "SHA-256 of the content differs from the manifest",
            );
            return self.fail_snapshot(store, r, now);
        }
        let report = AclReport {
            version: a.version,
            hash: hex::encode(digest),
            applied_at_ms: now.unix_ms,
        };
        match store.snapshot_commit(&report) {
            Ok(n) => {
                self.counters.snapshots_applied += 1;
                log::info!(target: "keyway::cloud", "snapshot v{}: {n} credentials", a.version);
                self.on_applied(report, "snapshot");
                if let Some((id, _)) = self.pending_resync.take() {
                    self.status(
                        &id,
                        "done",
                        None,
                        Some(serde_json::json!({"version": a.version})),
                        now,
                    );
                }
                Ok(())
            }
            Err(e) => {
                // Bad content would fail again: report, do not ask for the same snapshot.
                self.fail_pending_resync("apply_failed", now);
                Err(apply_failed(e))
            }
        }
    }

    fn on_delta<S: SyncStore>(
        &mut self,
        payload: &[u8],
        now: Now,
        store: &mut S,
    ) -> Result<(), Reject> {
        let (_kid, body) = self.keys.verify(payload)?;
        let delta = msg::parse_delta(&body, &self.cfg.site, &self.cfg.gateway, now.unix_s())?;
        let Some(applied) = self.applied.clone() else {
            let r = Reject::new(RejectCode::OutOfOrder, "no ACL version applied yet");
            return self.delta_gap(r, now);
        };
        if delta.version <= applied.version {
            return Err(Reject::new(
                RejectCode::Replayed,
                format!(
                    "delta to v{} is not above v{}",
                    delta.version, applied.version
                ),
            ));
        }
        if delta.base_version != applied.version {
            let r = Reject::new(
                RejectCode::OutOfOrder,
                format!(
                    "delta on v{}, applied is v{}",
                    delta.base_version, applied.version
                ),
            );
            return self.delta_gap(r, now);
        }
        let report = AclReport {
            version: delta.version,
            hash: chain_hash(&applied.hash, &body),
            applied_at_ms: now.unix_ms,
        };
        match store.apply_delta(&delta, &report) {
            Ok(()) => {
                self.counters.deltas_applied += 1;
                self.on_applied(report, "delta");
                Ok(())
            }
            Err(SinkError::VersionMismatch { .. }) => {
                // The store moved (another writer): trust it and ask for a snapshot.
                self.applied = store.applied().ok().flatten();
                self.delta_gap(
                    Reject::new(RejectCode::OutOfOrder, "store version moved"),
                    now,
                )
            }
            Err(e) => Err(apply_failed(e)),
        }
    }

    /// Refuses a delta that does not fit the applied version and asks for a snapshot
    /// (reported first, so the backend reads the reason before the request).
    fn delta_gap(&mut self, r: Reject, now: Now) -> Result<(), Reject> {
        self.reject(TopicKind::AclDelta, r.clone(), None, now);
        self.request_snapshot("delta_gap", now, false);
        Err(r.reported())
    }

    fn status(
        &mut self,
        request_id: &str,
        status: &str,
        reason: Option<&str>,
        result: Option<serde_json::Value>,
        now: Now,
    ) {
        let m = CommandStatusMsg {
            kind: "command_status".into(),
            v: msg::VERSION,
            request_id: request_id.into(),
            status: status.into(),
            reason: reason.map(str::to_owned),
            result,
            ts_ms: now.unix_ms,
        };
        self.publish(TopicKind::CommandStatus, msg::to_json(&m));
    }

    fn on_command<S: SyncStore>(
        &mut self,
        payload: &[u8],
        now: Now,
        store: &mut S,
    ) -> Result<(), Reject> {
        let parsed = self.keys.verify(payload).and_then(|(_kid, body)| {
            let id = msg::peek_request_id(&body);
            msg::parse_command(&body, &self.cfg.site, &self.cfg.gateway, now.unix_s())
                .map_err(|r| r.with_request_id(id))
        });
        let cmd = match parsed.and_then(|c| self.check_replay(c, now)) {
            Ok(c) => c,
            Err(r) => {
                // Only a signature-checked request id is answered on cmd/status.
                if let Some(id) = r.request_id.clone() {
                    self.status(&id, "rejected", Some(r.code.as_str()), None, now);
                }
                let rid = r.request_id.clone();
                self.reject(TopicKind::Command, r.clone(), rid, now);
                return Err(r.reported());
            }
        };
        self.status(&cmd.request_id, "accepted", None, None, now);
        log::info!(target: "keyway::cloud", "command {} ({})", cmd.kind.name(), cmd.request_id);
        match cmd.kind {
            CommandKind::Resync => {
                self.fail_pending_resync("superseded", now);
                self.pending_resync = Some((cmd.request_id, cmd.expires_at));
                self.request_snapshot("command", now, true);
            }
            CommandKind::RevokeNow(key) => match store.revoke_now(&key) {
                Ok(found) => self.status(
                    &cmd.request_id,
                    "done",
                    None,
                    Some(serde_json::json!({ "removed": found })),
                    now,
                ),
                Err(e) => {
                    log::warn!(target: "keyway::cloud", "revoke_now: {e}");
                    self.status(&cmd.request_id, "failed", Some("apply_failed"), None, now);
                }
            },
            CommandKind::SetLogLevel(level) => {
                self.effects.push_back(Effect::SetLogLevel(level));
                self.status(&cmd.request_id, "done", None, None, now);
            }
            CommandKind::ReportDiagnostics => {
                let hb = self.heartbeat(now, store);
                let v = serde_json::to_value(&hb).ok();
                self.status(&cmd.request_id, "done", None, v, now);
            }
        }
        Ok(())
    }

    fn check_replay(&mut self, cmd: msg::Command, now: Now) -> Result<msg::Command, Reject> {
        let now_s = now.unix_s();
        self.seen_commands.retain(|_, exp| *exp > now_s);
        if self.seen_commands.contains_key(&cmd.request_id) {
            return Err(Reject::new(RejectCode::Replayed, "request id already seen")
                .with_request_id(Some(cmd.request_id)));
        }
        if self.seen_commands.len() >= MAX_SEEN_COMMANDS {
            // Forget the one expiring first (it is the least useful to remember).
            if let Some(k) = self
                .seen_commands
                .iter()
                .min_by_key(|(_, e)| **e)
                .map(|(k, _)| k.clone())
            {
                self.seen_commands.remove(&k);
            }
        }
        self.seen_commands
            .insert(cmd.request_id.clone(), cmd.expires_at);
        Ok(cmd)
    }
}

fn apply_failed(e: SinkError) -> Reject {
    Reject::new(RejectCode::ApplyFailed, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acl::test_key;
    use crate::cloud::msg::tests::{cred, env, key_hex, NOW};
    use crate::cloud::msg::{SnapshotFormat, TYPE_COMMAND, TYPE_DELTA, TYPE_SNAPSHOT};
    use crate::cloud::sign::tests::{signer, trusted};
    use crate::cloud::sign::BackendSigner;
    use crate::cloud::store::StoreSync;
    use crate::events::{AccessEvent, Transport};

    struct H {
        core: Core,
        store: StoreSync,
        /// Snapshots stream into the apply engine on a second connection: a file database.
        _dir: tempfile::TempDir,
        signer: BackendSigner,
        t0: Instant,
        now: Now,
        topics: Topics,
    }

    fn merge(mut base: serde_json::Value, extra: serde_json::Value) -> Vec<u8> {
        for (k, v) in extra.as_object().unwrap() {
            base[k] = v.clone();
        }
        serde_json::to_vec(&base).unwrap()
    }

    impl H {
        fn new() -> H {
            H::with(|_| {})
        }

        fn with(f: impl FnOnce(&mut CoreConfig)) -> H {
            let topics = Topics::new("kw", "s1", "gw1").unwrap();
            let mut cfg = CoreConfig::new(topics.clone(), "s1", "gw1", 2);
            cfg.batch_size = 2;
            cfg.max_in_flight = 2;
            f(&mut cfg);
            let s = signer(1, "k1");
            let t0 = Instant::now();
            let core = Core::new(cfg, trusted(&[&s]), 7, None, 42, t0);
            let dir = tempfile::tempdir().unwrap();
            H {
                core,
                store: StoreSync::open(&dir.path().join("k.db")).unwrap(),
                _dir: dir,
                signer: s,
                t0,
                now: Now {
                    mono: t0,
                    unix_ms: NOW * 1000,
                },
                topics,
            }
        }

        fn advance(&mut self, d: Duration) {
            self.now.mono += d;
            self.now.unix_ms += d.as_millis() as i64;
        }

        fn connect(&mut self, session_present: bool) -> ConnectPlan {
            let plan = self.core.poll_connect(self.now).expect("a connect plan");
            self.core
                .handle_connected(session_present, self.now, &mut self.store);
            plan
        }

        fn sent(&mut self) -> Vec<(String, serde_json::Value)> {
            std::iter::from_fn(|| self.core.poll_transmit())
                .map(|t| {
                    let suffix = t.topic.strip_prefix("kw/s1/gw1/").unwrap().to_owned();
                    (suffix, serde_json::from_slice(&t.payload).unwrap())
                })
                .collect()
        }

        fn sent_on(&mut self, suffix: &str) -> Vec<serde_json::Value> {
            self.sent()
                .into_iter()
                .filter(|(s, _)| s == suffix)
                .map(|(_, v)| v)
                .collect()
        }

        fn recv(&mut self, kind: TopicKind, payload: &[u8]) -> Result<TopicKind, Reject> {
            let topic = self.topics.topic(kind);
            self.core
                .handle_message(&topic, payload, self.now, &mut self.store)
        }

        fn signed(&self, v: &[u8]) -> Vec<u8> {
            self.signer.sign(v)
        }

        fn manifest(&self, version: u64, content: &[u8], chunk_size: u32) -> Vec<u8> {
            self.signed(&merge(
                env(TYPE_SNAPSHOT),
                serde_json::json!({"version": version, "format": "json", "size": content.len(),
                    "sha256": hex::encode(Sha256::digest(content)),
                    "chunks": content.len().div_ceil(chunk_size as usize), "chunk_size": chunk_size}),
            ))
        }

        /// Sends a whole snapshot of credentials `seeds` as `version`.
        fn snapshot(&mut self, version: u64, seeds: &[u16]) {
            let content = snapshot_content(seeds);
            let m = self.manifest(version, &content, 100);
            self.recv(TopicKind::AclSnapshot, &m).unwrap();
            for (i, c) in content.chunks(100).enumerate() {
                self.recv(TopicKind::AclChunk, &msg::chunk_json(version, i as u32, c))
                    .unwrap();
            }
        }

        /// The manifest of `content` as `version`, then its chunks with one bit flipped near
        /// the end; the refusal of the last chunk.
        fn corrupted_snapshot(&mut self, version: u64, content: &[u8]) -> RejectCode {
            let mut evil = content.to_vec();
            let at = evil.len() - 3;
            evil[at] ^= 1;
            self.recv(
                TopicKind::AclSnapshot,
                &self.manifest(version, content, 100),
            )
            .unwrap();
            let mut result = Ok(TopicKind::AclChunk);
            for (i, c) in evil.chunks(100).enumerate() {
                result = self.recv(TopicKind::AclChunk, &msg::chunk_json(version, i as u32, c));
            }
            result.unwrap_err().code
        }

        fn delta(&self, base: u64, version: u64, extra: serde_json::Value) -> Vec<u8> {
            let mut b = serde_json::json!({"base_version": base, "version": version});
            for (k, v) in extra.as_object().unwrap() {
                b[k] = v.clone();
            }
            self.signed(&merge(env(TYPE_DELTA), b))
        }

        fn command(&self, id: &str, name: &str, args: serde_json::Value) -> Vec<u8> {
            self.signed(&merge(
                env(TYPE_COMMAND),
                serde_json::json!({"request_id": id, "name": name, "args": args}),
            ))
        }

        fn record(&mut self, n: usize) {
            crate::cloud::store::record_test_events(self.store.store(), n, 1);
        }

        /// Records a grant of credential `cred` (its card under `attempt`); its id.
        fn grant(&mut self, cred: i64, attempt: Option<i64>) -> i64 {
            let e = AccessEvent {
                credential_id: Some(cred),
                person_id: Some(format!("p{cred}")),
                decision: crate::events::EventDecision::Granted,
                reason: "granted".into(),
                ..AccessEvent::error(2, "d1", Transport::Nfc, None, "x", 1)
            };
            self.store.store().record_attempt(&e, attempt).unwrap()
        }

        fn grants(&mut self, seed: u16) -> bool {
            let t = time::OffsetDateTime::from_unix_timestamp(NOW + 1).unwrap();
            self.store
                .store()
                .decide(&test_key(seed), "d1", t)
                .unwrap()
                .is_grant()
        }
    }

    fn snapshot_content(seeds: &[u16]) -> Vec<u8> {
        let creds: Vec<_> = seeds.iter().map(|s| cred(*s)).collect();
        serde_json::to_vec(&serde_json::json!({"version": 1, "credentials": creds})).unwrap()
    }

    fn codes(v: &[serde_json::Value]) -> Vec<String> {
        v.iter()
            .map(|r| r["reason"].as_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn birth_will_subscriptions_and_startup_request() {
        let mut h = H::new();
        let plan = h.connect(false);
        assert_eq!(plan.broker, 0);
        assert!(plan.will.retain);
        let will: serde_json::Value = serde_json::from_slice(&plan.will.payload).unwrap();
        assert_eq!(
            (
                will["state"].as_str(),
                will["boot"].as_u64(),
                will["bd_seq"].as_u64()
            ),
            (Some("offline"), Some(7), Some(1))
        );
        match h.core.poll_effect() {
            Some(Effect::Subscribe(f)) => {
                assert_eq!(f.len(), TopicKind::DOWN.len());
                assert!(f.contains(&"kw/s1/gw1/cmd".to_owned()));
            }
            other => panic!("{other:?}"),
        }
        let first = h.core.poll_transmit().unwrap();
        assert!(first.retain && first.topic == "kw/s1/gw1/state");
        let birth: serde_json::Value = serde_json::from_slice(&first.payload).unwrap();
        assert_eq!(
            (birth["state"].as_str(), birth["bd_seq"].as_u64()),
            (Some("online"), Some(1))
        );
        let req = h.sent_on("acl/request");
        assert_eq!(req[0]["reason"], "startup");
        assert!(req[0]["have_version"].is_null());

        // A reconnect into a present session does not resubscribe; bd_seq goes up.
        h.core.handle_connection_lost(h.now);
        h.advance(Duration::from_secs(120));
        let plan = h.connect(true);
        assert_eq!((plan.broker, plan.bd_seq), (1, 2));
        assert_eq!(h.core.poll_effect(), None);
    }

    /// RabbitMQ (clustered, no mirroring) accepts the CONNECT of a client whose session queue
    /// lives on a node that died, then closes the connection at its SUBSCRIBE: the core must
    /// move to a fresh client id, or it would never receive anything until that node is back.
    #[test]
    fn a_refused_subscription_moves_to_a_fresh_client_id() {
        let mut h = H::new();
        let plan = h.connect(false);
        assert_eq!(plan.client_id_suffix, None);
        assert!(matches!(h.core.poll_effect(), Some(Effect::Subscribe(_))));
        // Confirmed: a later loss keeps the configured id.
        h.core.handle_subscribed(true);
        h.core.handle_connection_lost(h.now);
        h.advance(Duration::from_secs(120));
        let plan = h.connect(false);
        assert_eq!(plan.client_id_suffix, None);
        // Lost before the SUBACK (the broker closed it): the next plan has a fresh id.
        h.core.handle_connection_lost(h.now);
        h.advance(Duration::from_secs(120));
        let plan = h.connect(false);
        assert_eq!(plan.client_id_suffix.as_deref(), Some("-s2"));
        // A SUBACK with a failure code is a refusal too (the adapter then drops the link).
        h.core.handle_subscribed(false);
        h.core.handle_connection_lost(h.now);
        h.advance(Duration::from_secs(120));
        let plan = h.connect(false);
        assert_eq!(plan.client_id_suffix.as_deref(), Some("-s3"));
        // A failed connection attempt (no CONNACK) changes nothing.
        h.core.handle_subscribed(true);
        h.core.handle_connection_lost(h.now);
        h.advance(Duration::from_secs(120));
        h.core.poll_connect(h.now).unwrap();
        h.core.handle_connection_lost(h.now);
        h.advance(Duration::from_secs(120));
        assert_eq!(
            h.core
                .poll_connect(h.now)
                .unwrap()
                .client_id_suffix
                .as_deref(),
            Some("-s3")
        );
    }

    /// A new session in the middle of a snapshot (the node holding the old one died): the
    /// chunks sent meanwhile are gone, so the snapshot starts over at once, not after the
    /// chunk timeout; the old ACL is untouched.
    #[test]
    fn a_new_session_mid_snapshot_asks_for_it_again() {
        let mut h = H::new();
        h.connect(false);
        h.snapshot(1, &[1]);
        let content = snapshot_content(&[2, 3]);
        h.recv(TopicKind::AclSnapshot, &h.manifest(2, &content, 100))
            .unwrap();
        h.recv(TopicKind::AclChunk, &msg::chunk_json(2, 0, &content[..100]))
            .unwrap();
        h.sent();
        h.core.handle_connection_lost(h.now);
        h.advance(Duration::from_secs(2));
        // A present session still holds the rest: keep assembling.
        h.connect(true);
        assert!(h.sent_on("acl/request").is_empty());
        h.core.handle_connection_lost(h.now);
        h.advance(Duration::from_secs(2));
        h.connect(false);
        let req = h.sent_on("acl/request");
        assert_eq!(req.len(), 1, "{req:?}");
        assert_eq!(
            (req[0]["reason"].as_str(), req[0]["have_version"].as_u64()),
            (Some("snapshot_failed"), Some(1))
        );
        assert!(h.grants(1) && !h.grants(2));
        // That session was refused before its SUBACK: the next one asks again; once the
        // subscriptions are confirmed, later sessions do not.
        h.core.handle_connection_lost(h.now);
        h.advance(Duration::from_secs(2));
        h.connect(false);
        assert_eq!(h.sent_on("acl/request").len(), 1);
        h.core.handle_subscribed(true);
        // The snapshot sent again applies.
        h.recv(TopicKind::AclSnapshot, &h.manifest(2, &content, 100))
            .unwrap();
        for (i, c) in content.chunks(100).enumerate() {
            h.recv(TopicKind::AclChunk, &msg::chunk_json(2, i as u32, c))
                .unwrap();
        }
        assert!(!h.grants(1) && h.grants(2) && h.grants(3));
    }

    #[test]
    fn backoff_is_jittered_exponential_and_rotates_brokers() {
        let mut h = H::new();
        let mut ceilings_hit = Vec::new();
        for attempt in 0..12u32 {
            let plan = h.core.poll_connect(h.now).unwrap();
            assert_eq!(plan.broker, attempt as usize % 2);
            h.core.handle_connection_lost(h.now);
            // Nothing before the backoff ends.
            let wait = h.core.poll_timeout().unwrap() - h.now.mono;
            let ceil = (500u64 << attempt).min(60_000);
            assert!(
                wait >= Duration::from_millis(500) && wait <= Duration::from_millis(ceil),
                "{attempt}: {wait:?}"
            );
            ceilings_hit.push(wait);
            assert!(h.core.poll_connect(h.now).is_none());
            h.advance(wait);
        }
        // Jitter: not all the same once the window is wide.
        assert!(ceilings_hit[6..].windows(2).any(|w| w[0] != w[1]));
        // Two cores with other seeds do not reconnect in lockstep.
        let waits: Vec<Duration> = (0..8u64)
            .map(|seed| {
                let mut c = Core::new(
                    CoreConfig::new(h.topics.clone(), "s1", "gw1", 1),
                    TrustedKeys::default(),
                    1,
                    None,
                    seed * 7919,
                    h.t0,
                );
                let n = Now {
                    mono: h.t0,
                    unix_ms: 0,
                };
                for _ in 0..5 {
                    c.poll_connect(Now {
                        mono: c.next_connect,
                        ..n
                    });
                    c.handle_connection_lost(Now {
                        mono: c.next_connect,
                        ..n
                    });
                }
                c.next_connect - h.t0
            })
            .collect();
        let distinct: std::collections::HashSet<_> = waits.iter().collect();
        assert!(distinct.len() > 4, "{waits:?}");
        // A successful connect resets the backoff.
        h.connect(false);
        h.core.handle_connection_lost(h.now);
        assert!(h.core.poll_timeout().unwrap() - h.now.mono <= Duration::from_millis(500));
    }

    #[test]
    fn snapshot_is_assembled_verified_applied_and_reported() {
        let mut h = H::new();
        h.connect(false);
        h.sent();
        h.snapshot(3, &[1, 2, 3]);
        assert!(h.grants(1) && h.grants(3));
        let applied = h.sent_on("acl/applied");
        assert_eq!(applied.len(), 1);
        assert_eq!(
            (
                applied[0]["version"].as_u64(),
                applied[0]["source"].as_str()
            ),
            (Some(3), Some("snapshot"))
        );
        assert_eq!(
            applied[0]["hash"].as_str().unwrap(),
            hex::encode(Sha256::digest(snapshot_content(&[1, 2, 3])))
        );
        assert_eq!(h.store.applied().unwrap().unwrap().version, 3);
        // A late redelivered chunk of it is ignored; the same manifest again is a replay.
        assert!(h
            .recv(TopicKind::AclChunk, &msg::chunk_json(3, 0, b"x"))
            .is_ok());
        let m = h.manifest(3, &snapshot_content(&[9]), 100);
        assert_eq!(
            h.recv(TopicKind::AclSnapshot, &m).unwrap_err().code,
            RejectCode::Replayed
        );
        assert_eq!(codes(&h.sent_on("rejected")), vec!["replayed"]);
        assert!(!h.grants(9));
    }

    /// Chunks ahead of their turn are held (bounded) and applied in order once the missing
    /// one comes; more than the bound held is a gap. A bad hash at the end drops the staged
    /// apply: the old ACL stays, serving.
    #[test]
    fn chunks_out_of_order_are_held_in_a_bound_and_a_bad_hash_keeps_the_old_acl() {
        let mut h = H::new();
        h.connect(false);
        h.snapshot(1, &[7]);
        let seeds: Vec<u16> = (10..=40).collect();
        let content = snapshot_content(&seeds);
        let chunks: Vec<&[u8]> = content.chunks(100).collect();
        assert!(chunks.len() > MAX_EARLY_CHUNKS + 2);
        h.sent();
        h.recv(TopicKind::AclSnapshot, &h.manifest(2, &content, 100))
            .unwrap();
        // 0, then 3, 2, 1 (each held until its turn), then the rest in order.
        for i in [0usize, 3, 2, 3, 1] {
            h.recv(
                TopicKind::AclChunk,
                &msg::chunk_json(2, i as u32, chunks[i]),
            )
            .unwrap();
        }
        for (i, c) in chunks.iter().enumerate().skip(4) {
            h.recv(TopicKind::AclChunk, &msg::chunk_json(2, i as u32, c))
                .unwrap();
        }
        assert_eq!(h.store.applied().unwrap().unwrap().version, 2);
        assert!(h.grants(40), "the new ACL serves");
        assert!(!h.grants(7), "the old ACL is gone");
        assert!(h.sent_on("rejected").is_empty());

        // Too many ahead of a missing chunk: a gap.
        h.recv(TopicKind::AclSnapshot, &h.manifest(3, &content, 100))
            .unwrap();
        let mut last = Ok(TopicKind::AclChunk);
        for (i, c) in chunks.iter().enumerate().skip(1).take(MAX_EARLY_CHUNKS + 1) {
            last = h.recv(TopicKind::AclChunk, &msg::chunk_json(3, i as u32, c));
        }
        assert_eq!(last.unwrap_err().code, RejectCode::ChunkGap);
        assert_eq!(h.store.applied().unwrap().unwrap().version, 2);

        // Every chunk in, the content changed on the way: nothing applied.
        assert_eq!(h.corrupted_snapshot(3, &content), RejectCode::HashMismatch);
        assert_eq!(h.store.applied().unwrap().unwrap().version, 2);
        assert!(h.grants(40));
        // And the next good one applies (the abandoned stage is gone).
        h.snapshot(3, &[8]);
        assert!(h.grants(8) && !h.grants(40));
    }

    #[test]
    fn snapshot_duplicates_gap_hash_and_timeout() {
        let mut h = H::new();
        h.connect(false);
        h.sent();
        let content = snapshot_content(&[1, 2]);
        let chunks: Vec<&[u8]> = content.chunks(100).collect();
        assert!(chunks.len() >= 3);
        // Duplicate chunk (QoS 1 redelivery) is harmless.
        h.recv(TopicKind::AclSnapshot, &h.manifest(2, &content, 100))
            .unwrap();
        h.recv(TopicKind::AclChunk, &msg::chunk_json(2, 0, chunks[0]))
            .unwrap();
        h.recv(TopicKind::AclChunk, &msg::chunk_json(2, 0, chunks[0]))
            .unwrap();
        // An index past the end is a gap: abandoned, reported, a snapshot requested.
        let e = h
            .recv(TopicKind::AclChunk, &msg::chunk_json(2, 99, chunks[2]))
            .unwrap_err();
        assert_eq!(e.code, RejectCode::ChunkGap);
        let out = h.sent();
        assert_eq!(
            out.iter().filter(|(s, _)| s == "rejected").count(),
            1,
            "{out:?}"
        );
        assert!(out
            .iter()
            .any(|(s, v)| s == "acl/request" && v["reason"] == "snapshot_failed"));
        assert_eq!(h.store.applied().unwrap(), None);
        // Now a chunk has no manifest.
        assert_eq!(
            h.recv(TopicKind::AclChunk, &msg::chunk_json(2, 1, chunks[1]))
                .unwrap_err()
                .code,
            RejectCode::OutOfOrder
        );
        // Content that does not match the manifest's hash.
        assert_eq!(h.corrupted_snapshot(2, &content), RejectCode::HashMismatch);
        // A wrong-length chunk.
        h.recv(TopicKind::AclSnapshot, &h.manifest(2, &content, 100))
            .unwrap();
        assert_eq!(
            h.recv(
                TopicKind::AclChunk,
                &msg::chunk_json(2, 0, &chunks[0][..50])
            )
            .unwrap_err()
            .code,
            RejectCode::HashMismatch
        );
        // Timeout.
        h.sent();
        h.recv(TopicKind::AclSnapshot, &h.manifest(2, &content, 100))
            .unwrap();
        h.recv(TopicKind::AclChunk, &msg::chunk_json(2, 0, chunks[0]))
            .unwrap();
        h.advance(Duration::from_secs(29));
        h.core.handle_timeout(h.now, &mut h.store);
        assert!(h.sent_on("rejected").is_empty());
        h.advance(Duration::from_secs(1));
        assert!(h.core.poll_timeout().unwrap() <= h.now.mono);
        h.core.handle_timeout(h.now, &mut h.store);
        assert_eq!(codes(&h.sent_on("rejected")), vec!["snapshot_timeout"]);
        assert_eq!(h.store.applied().unwrap(), None);
        assert!(!h.grants(1));
    }

    #[test]
    fn signed_messages_refused_for_each_reason() {
        let mut h = H::new();
        h.connect(false);
        h.snapshot(1, &[1]);
        h.sent();
        let other = signer(9, "k9");
        let body = merge(
            env(TYPE_DELTA),
            serde_json::json!({"base_version": 1, "version": 2, "revoke": [key_hex(1)]}),
        );
        let cases: Vec<(Vec<u8>, RejectCode)> = vec![
            (body.clone(), RejectCode::Unsigned),
            (other.sign(&body), RejectCode::UnknownKey),
            (signer(9, "k1").sign(&body), RejectCode::BadSignature),
            (b"\x00\x01".to_vec(), RejectCode::Malformed),
            (
                vec![b'{'; msg::MAX_MESSAGE_BYTES + 1],
                RejectCode::Oversized,
            ),
            (
                h.delta(
                    1,
                    2,
                    serde_json::json!({"revoke": [key_hex(1)], "expires_at": NOW}),
                ),
                RejectCode::Expired,
            ),
            (
                h.delta(
                    1,
                    2,
                    serde_json::json!({"revoke": [key_hex(1)], "gateway": "gw2"}),
                ),
                RejectCode::WrongTarget,
            ),
            (
                h.delta(1, 2, serde_json::json!({"revoke": ["zz"]})),
                RejectCode::Malformed,
            ),
            (
                h.delta(0, 1, serde_json::json!({"revoke": [key_hex(1)]})),
                RejectCode::Replayed,
            ),
        ];
        for (payload, want) in &cases {
            assert_eq!(
                h.recv(TopicKind::AclDelta, payload).unwrap_err().code,
                *want
            );
        }
        let reported = h.sent_on("rejected");
        assert_eq!(reported.len(), cases.len());
        assert!(reported.iter().all(|r| r["topic"] == "acl/delta"));
        assert_eq!(h.core.counters().rejected, cases.len() as u64);
        // Nothing was applied: credential 1 still opens.
        assert!(h.grants(1));
        assert_eq!(h.store.applied().unwrap().unwrap().version, 1);
    }

    #[test]
    fn deltas_apply_in_order_and_a_gap_asks_for_a_snapshot() {
        let mut h = H::new();
        h.connect(false);
        // Before any snapshot, a delta cannot apply.
        let d = h.delta(1, 2, serde_json::json!({"revoke": [key_hex(1)]}));
        assert_eq!(
            h.recv(TopicKind::AclDelta, &d).unwrap_err().code,
            RejectCode::OutOfOrder
        );
        h.snapshot(1, &[1, 2]);
        h.sent();
        let d2 = h.delta(
            1,
            2,
            serde_json::json!({"revoke": [key_hex(1)], "upsert": [cred(5)]}),
        );
        h.recv(TopicKind::AclDelta, &d2).unwrap();
        assert!(!h.grants(1) && h.grants(5) && h.grants(2));
        let applied = h.sent_on("acl/applied");
        assert_eq!(
            (
                applied[0]["version"].as_u64(),
                applied[0]["source"].as_str()
            ),
            (Some(2), Some("delta"))
        );
        // The same delta again is a replay; one skipping v3 is a gap → snapshot request.
        assert_eq!(
            h.recv(TopicKind::AclDelta, &d2).unwrap_err().code,
            RejectCode::Replayed
        );
        let d4 = h.delta(3, 4, serde_json::json!({"suspend": [key_hex(2)]}));
        assert_eq!(
            h.recv(TopicKind::AclDelta, &d4).unwrap_err().code,
            RejectCode::OutOfOrder
        );
        let req = h.sent_on("acl/request");
        assert_eq!(req.len(), 1);
        assert_eq!(
            (req[0]["reason"].as_str(), req[0]["have_version"].as_u64()),
            (Some("delta_gap"), Some(2))
        );
        // A second gap right after does not ask again (holdoff).
        assert!(h.recv(TopicKind::AclDelta, &d4).is_err());
        assert!(h.sent_on("acl/request").is_empty());
        assert!(h.grants(2));
        let d3 = h.delta(2, 3, serde_json::json!({"suspend": [key_hex(2)]}));
        h.recv(TopicKind::AclDelta, &d3).unwrap();
        assert!(!h.grants(2));
    }

    #[test]
    fn commands_accepted_done_replay_expiry() {
        let mut h = H::new();
        h.connect(true);
        h.snapshot(1, &[1, 2]);
        h.sent();
        let c = h.command(
            "r1",
            "revoke_now",
            serde_json::json!({"endpoint_key": key_hex(1)}),
        );
        h.recv(TopicKind::Command, &c).unwrap();
        let st = h.sent_on("cmd/status");
        assert_eq!(
            st.iter()
                .map(|s| s["status"].as_str().unwrap())
                .collect::<Vec<_>>(),
            ["accepted", "done"]
        );
        assert_eq!(st[1]["result"]["removed"], true);
        assert!(!h.grants(1));
        // Replay of the same signed command.
        assert_eq!(
            h.recv(TopicKind::Command, &c).unwrap_err().code,
            RejectCode::Replayed
        );
        let out = h.sent();
        assert!(out.iter().any(|(s, v)| s == "cmd/status"
            && v["status"] == "rejected"
            && v["reason"] == "replayed"));
        assert!(out
            .iter()
            .any(|(s, v)| s == "rejected" && v["request_id"] == "r1"));
        // Expired, unknown.
        let old = h.signed(&merge(
            env(TYPE_COMMAND),
            serde_json::json!({"request_id": "r2", "name": "resync", "expires_at": NOW - 1}),
        ));
        assert_eq!(
            h.recv(TopicKind::Command, &old).unwrap_err().code,
            RejectCode::Expired
        );
        let unk = h.command("r3", "open_door", serde_json::json!({}));
        assert_eq!(
            h.recv(TopicKind::Command, &unk).unwrap_err().code,
            RejectCode::UnknownCommand
        );
        let st = h.sent_on("cmd/status");
        assert_eq!(st.len(), 2);
        assert!(st.iter().all(|s| s["status"] == "rejected"));
        // Unsigned commands are never answered on cmd/status (the id is not trusted).
        let plain = merge(
            env(TYPE_COMMAND),
            serde_json::json!({"request_id": "r4", "name": "resync"}),
        );
        assert_eq!(
            h.recv(TopicKind::Command, &plain).unwrap_err().code,
            RejectCode::Unsigned
        );
        assert!(h.sent_on("cmd/status").is_empty());
        // Log level and diagnostics.
        h.recv(
            TopicKind::Command,
            &h.command("r5", "set_log_level", serde_json::json!({"level": "debug"})),
        )
        .unwrap();
        assert_eq!(
            h.core.poll_effect(),
            Some(Effect::SetLogLevel(log::LevelFilter::Debug))
        );
        h.sent();
        h.recv(
            TopicKind::Command,
            &h.command("r6", "report_diagnostics", serde_json::json!({})),
        )
        .unwrap();
        let st = h.sent_on("cmd/status");
        assert_eq!(st[1]["result"]["acl"]["version"], 1);
    }

    #[test]
    fn resync_command_completes_with_the_snapshot_or_fails_at_expiry() {
        let mut h = H::new();
        h.connect(false);
        h.snapshot(1, &[1]);
        h.sent();
        h.recv(
            TopicKind::Command,
            &h.command("r1", "resync", serde_json::json!({})),
        )
        .unwrap();
        let out = h.sent();
        assert!(out
            .iter()
            .any(|(s, v)| s == "acl/request" && v["reason"] == "command"));
        assert_eq!(
            out.iter().filter(|(s, _)| s == "cmd/status").count(),
            1,
            "only accepted so far"
        );
        h.snapshot(2, &[2]);
        let st = h.sent_on("cmd/status");
        assert_eq!(
            (
                st[0]["status"].as_str(),
                st[0]["result"]["version"].as_u64()
            ),
            (Some("done"), Some(2))
        );

        h.recv(
            TopicKind::Command,
            &h.command("r2", "resync", serde_json::json!({})),
        )
        .unwrap();
        h.sent();
        h.advance(Duration::from_secs(301));
        h.core.handle_timeout(h.now, &mut h.store);
        let st = h.sent_on("cmd/status");
        assert_eq!(
            (st[0]["status"].as_str(), st[0]["reason"].as_str()),
            (Some("failed"), Some("expired"))
        );
    }

    fn seqs(batches: &[serde_json::Value]) -> Vec<Vec<i64>> {
        batches
            .iter()
            .map(|b| {
                b["events"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| e["seq"].as_i64().unwrap())
                    .collect()
            })
            .collect()
    }

    fn ack(h: &mut H, through: i64) -> Result<TopicKind, Reject> {
        let inst = h.store.instance().unwrap();
        let a = serde_json::json!({"type": "events_ack", "v": 1, "instance": inst, "through_seq": through});
        h.recv(TopicKind::EventsAck, &serde_json::to_vec(&a).unwrap())
    }

    #[test]
    fn events_go_in_order_in_a_window_and_are_kept_until_acked() {
        let mut h = H::new();
        h.record(5);
        h.connect(true);
        let b = h.sent_on("events");
        // Window of 2 batches of 2.
        assert_eq!(seqs(&b), vec![vec![1, 2], vec![3, 4]]);
        assert!(b.iter().all(|b| b["replay"] == false));
        let rows = h.store.store().recent_events(5).unwrap();
        assert_eq!(b[0]["events"][0]["uid"], rows[4].uid.as_str());
        // Nothing more until an ack; the outbox keeps every row.
        h.advance(Duration::from_secs(2));
        h.core.handle_timeout(h.now, &mut h.store);
        assert!(h.sent_on("events").is_empty());
        assert_eq!(h.store.depth().unwrap().depth, 5);
        ack(&mut h, 2).unwrap();
        assert_eq!(h.store.depth().unwrap().depth, 3);
        assert_eq!(seqs(&h.sent_on("events")), vec![vec![5]]);
        // New events are picked up by the poll.
        h.record(1);
        h.advance(Duration::from_secs(1));
        h.core.handle_timeout(h.now, &mut h.store);
        assert!(
            h.sent_on("events").is_empty(),
            "window full (3..4 and 5 in flight)"
        );
        ack(&mut h, 5).unwrap();
        assert_eq!(seqs(&h.sent_on("events")), vec![vec![6]]);
        // An ack for another outbox is refused; an ack beyond what was sent only covers what was.
        let a = serde_json::json!({"type": "events_ack", "v": 1, "instance": "other", "through_seq": 9});
        assert_eq!(
            h.recv(TopicKind::EventsAck, &serde_json::to_vec(&a).unwrap())
                .unwrap_err()
                .code,
            RejectCode::WrongTarget
        );
        h.record(1);
        ack(&mut h, 100).unwrap();
        assert_eq!(h.store.depth().unwrap().depth, 1, "event 7 was never sent");
        assert_eq!(seqs(&h.sent_on("events")), vec![vec![7]]);
    }

    #[test]
    fn unacked_events_are_replayed_after_reconnect_and_ack_timeout() {
        let mut h = H::new();
        h.record(3);
        h.connect(true);
        assert_eq!(seqs(&h.sent_on("events")), vec![vec![1, 2], vec![3]]);
        ack(&mut h, 2).unwrap();
        h.core.handle_connection_lost(h.now);
        h.record(1);
        h.advance(Duration::from_secs(120));
        h.connect(true);
        let b = h.sent_on("events");
        assert_eq!(seqs(&b), vec![vec![3, 4]]);
        assert_eq!(b[0]["replay"], true);
        // No ack in time: resent, flagged.
        h.advance(Duration::from_secs(30));
        h.core.handle_timeout(h.now, &mut h.store);
        let b = h.sent_on("events");
        assert_eq!(seqs(&b), vec![vec![3, 4]]);
        assert_eq!(b[0]["replay"], true);
        ack(&mut h, 4).unwrap();
        assert_eq!(h.store.depth().unwrap().depth, 0);
        // Offline: nothing is sent or queued.
        h.core.handle_connection_lost(h.now);
        h.record(2);
        h.core.handle_events_recorded(h.now, &mut h.store);
        assert!(h.sent().is_empty());
    }

    #[test]
    fn a_batch_too_big_for_the_broker_is_split() {
        let mut h = H::with(|c| {
            c.batch_size = 1000;
            c.max_in_flight = 1;
        });
        // ~600 bytes per event with long ids: 1000 of them would be ~600 KB.
        let long = "p".repeat(128);
        for _ in 0..1000 {
            let mut e =
                AccessEvent::error(1, &"d".repeat(64), Transport::Nfc, None, &"r".repeat(64), 1);
            e.person_id = Some(long.clone());
            h.store.store().record_event(&e).unwrap();
        }
        h.connect(true);
        let out: Vec<Transmit> = std::iter::from_fn(|| h.core.poll_transmit()).collect();
        let batch = out.iter().find(|t| t.topic.ends_with("/events")).unwrap();
        assert!(
            batch.payload.len() <= msg::MAX_MESSAGE_BYTES,
            "{}",
            batch.payload.len()
        );
        let m: msg::EventsMsg = serde_json::from_slice(&batch.payload).unwrap();
        assert!(
            m.events.len() >= 100 && m.events.len() < 1000,
            "{}",
            m.events.len()
        );
        // The rest follows after the ack, from where this batch ended.
        let last = m.events.last().unwrap().seq;
        ack(&mut h, last).unwrap();
        let next = h.sent_on("events");
        assert_eq!(next[0]["events"][0]["seq"], last + 1);
    }

    #[test]
    fn heartbeat_on_schedule_with_acl_and_outbox() {
        let mut h = H::new();
        h.connect(false);
        h.snapshot(4, &[1]);
        h.record(2);
        h.sent();
        h.advance(Duration::from_secs(59));
        h.core.handle_timeout(h.now, &mut h.store);
        assert!(h.sent_on("heartbeat").is_empty());
        h.advance(Duration::from_secs(1));
        h.core.handle_timeout(h.now, &mut h.store);
        let hb = h.sent_on("heartbeat");
        assert_eq!(hb.len(), 1);
        assert_eq!(hb[0]["acl"]["version"], 4);
        assert_eq!(hb[0]["acl_age_s"], 60);
        assert_eq!(hb[0]["outbox"]["depth"], 2);
        assert_eq!(hb[0]["uptime_s"], 60);
        assert_eq!(hb[0]["boot"], 7);
    }

    fn local_health() -> msg::LocalHealth {
        msg::LocalHealth {
            doors: vec![msg::DoorHealth {
                id: "front".into(),
                reader: "present".into(),
                osdp: "online".into(),
                secure_channel: "up".into(),
                ble: Some("registered".into()),
                certificate_days: Some(200),
                offline_policy: Some(msg::OfflinePolicyReport {
                    limit_s: 3600,
                    fail_secure: true,
                }),
            }],
            disk: Some(msg::DiskReport {
                free_bytes: 1 << 30,
                total_bytes: 8 << 30,
            }),
        }
    }

    /// Notes (a first use, a late verdict) go up on their own topic once their event is
    /// acked, never by resending the event changed; they are kept until their own ack, and
    /// resent as replays after a reconnect.
    #[test]
    fn notes_follow_their_acked_events_and_wait_for_their_own_ack() {
        let mut h = H::new();
        let first = h.grant(9, Some(1));
        h.grant(9, Some(2));
        h.connect(true);
        let b = h.sent_on("events");
        assert_eq!(seqs(&b), vec![vec![first, first + 1]]);
        assert!(b[0]["events"][1].get("panel_verdict").is_none());
        // The panel answers after the event went up: the event row is not touched.
        h.store.store().set_panel_verdict(2, "denied").unwrap();
        h.advance(Duration::from_secs(1));
        h.core.handle_timeout(h.now, &mut h.store);
        assert!(h.sent_on("notes").is_empty(), "its event is not acked yet");
        ack(&mut h, first + 1).unwrap();
        let n = h.sent_on("notes");
        assert_eq!(n.len(), 1);
        let notes = n[0]["notes"].as_array().unwrap();
        let kinds: Vec<&str> = notes.iter().map(|n| n["kind"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["first_use", "panel_verdict"]);
        let rows = h.store.store().recent_events(2).unwrap();
        assert_eq!(notes[0]["event_uid"], rows[1].uid.as_str());
        assert_eq!(notes[1]["event_uid"], rows[0].uid.as_str());
        assert_eq!(notes[1]["panel_verdict"], "denied");
        assert_eq!(n[0]["replay"], false);
        // Unacked: resent as a replay after a reconnect; acked: gone.
        h.core.handle_connection_lost(h.now);
        h.advance(Duration::from_secs(120));
        h.connect(true);
        let again = h.sent_on("notes");
        assert_eq!(again[0]["replay"], true);
        assert_eq!(again[0]["notes"], n[0]["notes"]);
        let inst = h.store.instance().unwrap();
        let last = notes[1]["seq"].as_i64().unwrap();
        let a =
            serde_json::json!({"type": "notes_ack", "v": 1, "instance": inst, "through_seq": last});
        h.recv(TopicKind::NotesAck, &serde_json::to_vec(&a).unwrap())
            .unwrap();
        assert_eq!(h.store.store().notes_undelivered().unwrap(), 0);
        // An events ack on the notes topic is refused.
        let wrong = serde_json::json!({"type": "events_ack", "v": 1, "instance": inst, "through_seq": last});
        assert_eq!(
            h.recv(TopicKind::NotesAck, &serde_json::to_vec(&wrong).unwrap())
                .unwrap_err()
                .code,
            RejectCode::Malformed
        );
    }

    #[test]
    fn heartbeat_reports_doors_disk_and_dropped_events() {
        let mut h = H::with(|c| c.heartbeat = Duration::from_secs(5));
        h.core.set_local_health(local_health());
        h.connect(true);
        h.record(3);
        // Retention pruned undelivered events: counted, and reported.
        let r = crate::events::Retention {
            max_rows: 1,
            max_age_ms: None,
        };
        h.store.store().prune_events(&r, 0).unwrap();
        h.sent();
        h.advance(Duration::from_secs(5));
        h.core.handle_timeout(h.now, &mut h.store);
        let hb = h.sent_on("heartbeat");
        // Pruned down to 1% under one row: the newest stays, two are dropped.
        assert_eq!(hb[0]["outbox"]["dropped"], 2, "{}", hb[0]);
        assert_eq!(hb[0]["outbox"]["depth"], 1);
        assert_eq!(hb[0]["doors"][0]["reader"], "present");
        assert_eq!(hb[0]["doors"][0]["certificate_days"], 200);
        assert_eq!(hb[0]["doors"][0]["offline_policy"]["limit_s"], 3600);
        assert_eq!(hb[0]["disk"]["free_bytes"], 1u64 << 30);
        check(&hb[0]);
    }

    fn schema(name: &str) -> jsonschema::Validator {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("docs/schemas")
            .join(format!("{name}.json"));
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        jsonschema::validator_for(&serde_json::from_str(&text).unwrap()).unwrap()
    }

    fn check(v: &serde_json::Value) {
        let name = v["type"].as_str().unwrap();
        let errors: Vec<String> = schema(name)
            .iter_errors(v)
            .map(|e| format!("{e} at {}", e.instance_path()))
            .collect();
        assert!(errors.is_empty(), "{name}: {errors:?}\n{v}");
    }

    /// Every message keyway sends (and the backend tool builds) matches its JSON Schema in
    /// docs/schemas, and docs/asyncapi.yaml lists exactly the topics the code uses.
    #[test]
    fn every_message_matches_its_schema_and_asyncapi_lists_every_topic() {
        use crate::cloud::backend;
        let mut h = H::new();
        let plan = h.core.poll_connect(h.now).unwrap();
        let mut up: Vec<(String, serde_json::Value)> = vec![(
            "state".into(),
            serde_json::from_slice(&plan.will.payload).unwrap(),
        )];
        h.core.handle_connected(false, h.now, &mut h.store);
        h.snapshot(1, &[1, 2]);
        h.recv(
            TopicKind::AclDelta,
            &h.delta(1, 2, serde_json::json!({"revoke": [key_hex(1)]})),
        )
        .unwrap();
        let _ = h.recv(
            TopicKind::AclDelta,
            &h.delta(5, 6, serde_json::json!({"revoke": [key_hex(1)]})),
        );
        h.record(3);
        h.core.handle_events_recorded(h.now, &mut h.store);
        // A first use and a late verdict, released by the ack of their events.
        let id = h.grant(5, Some(77));
        h.store.store().set_panel_verdict(77, "denied").unwrap();
        h.store.store().mark_delivered(id, 1).unwrap();
        h.core.set_local_health(local_health());
        for (id, name, args) in [
            ("r1", "report_diagnostics", serde_json::json!({})),
            ("r2", "resync", serde_json::json!({})),
            ("r3", "nope", serde_json::json!({})),
        ] {
            let _ = h.recv(TopicKind::Command, &h.command(id, name, args));
        }
        h.advance(Duration::from_secs(60));
        h.core.handle_timeout(h.now, &mut h.store);
        up.extend(h.sent());
        let kinds: std::collections::BTreeSet<&str> = up
            .iter()
            .map(|(_, v)| v["type"].as_str().unwrap())
            .collect();
        assert_eq!(
            kinds.into_iter().collect::<Vec<_>>(),
            [
                "acl_applied",
                "acl_request",
                "command_status",
                "events",
                "heartbeat",
                "notes",
                "rejected",
                "state"
            ]
        );
        let notes: Vec<&serde_json::Value> = up
            .iter()
            .filter(|(s, _)| s == "notes")
            .flat_map(|(_, v)| v["notes"].as_array().unwrap())
            .collect();
        assert_eq!(notes.len(), 2, "first use and late verdict: {notes:?}");
        assert!(up.iter().any(
            |(s, v)| s == "heartbeat" && v["doors"][0]["offline_policy"]["fail_secure"] == true
        ));
        for (suffix, v) in &up {
            check(v);
            assert_eq!(
                h.topics.classify(&format!("kw/s1/gw1/{suffix}")),
                None,
                "{suffix} is an up topic"
            );
        }
        // Down messages as the backend tool builds them.
        let t = backend::Target {
            site: "s1".into(),
            gateway: "gw1".into(),
            ttl_s: 60,
        };
        let (m, chunks) =
            backend::snapshot_messages(&h.signer, &t, 3, SnapshotFormat::Json, b"{}", 1, NOW)
                .unwrap();
        let keys = trusted(&[&h.signer]);
        let signed = [
            m,
            backend::delta_message(
                &h.signer,
                &t,
                1,
                2,
                vec![cred(1)],
                vec![key_hex(2)],
                vec![key_hex(3)],
                NOW,
            ),
            backend::command_message(
                &h.signer,
                &t,
                "r9",
                "set_log_level",
                serde_json::from_value(serde_json::json!({"level": "info"})).unwrap(),
                NOW,
            ),
        ];
        for s in signed {
            check(&serde_json::from_slice(&keys.verify(&s).unwrap().1).unwrap());
        }
        check(&serde_json::from_slice(&chunks[0]).unwrap());
        for kind in [msg::TYPE_ACK, msg::TYPE_NOTES_ACK] {
            check(
                &serde_json::to_value(msg::EventsAck {
                    kind: kind.into(),
                    v: 1,
                    instance: "ab12".into(),
                    through_seq: 4,
                })
                .unwrap(),
            );
        }

        let api = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/asyncapi.yaml"),
        )
        .unwrap();
        let listed: std::collections::BTreeSet<String> = api
            .lines()
            .filter_map(|l| {
                l.trim()
                    .strip_prefix("address: '{prefix}/{site}/{gateway}/")
            })
            .map(|a| a.trim_end_matches('\'').to_owned())
            .collect();
        let used: std::collections::BTreeSet<String> = TopicKind::UP
            .iter()
            .chain(TopicKind::DOWN.iter())
            .map(|k| k.suffix().to_owned())
            .collect();
        assert_eq!(listed, used);
        // The rejected schema lists every reason code and every down topic.
        let rej: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/schemas/rejected.json"),
            )
            .unwrap(),
        )
        .unwrap();
        let reasons: Vec<&str> = rej["properties"]["reason"]["enum"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(reasons, RejectCode::ALL.map(|c| c.as_str()).to_vec());
        let topics: Vec<&str> = rej["properties"]["topic"]["enum"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(topics, TopicKind::DOWN.map(|k| k.suffix()).to_vec());
    }
}
