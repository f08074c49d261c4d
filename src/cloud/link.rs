//! The adapter: one tokio task that owns a rumqttc event loop and drives the sans-IO
//! [`Core`] with it.
//!
//! What rumqttc does not do, this does (docs/mqtt-api.md, "The link"):
//! - backoff: rumqttc reconnects at once on the next `poll()`; the event loop is dropped after
//!   any error and a new one made when the core's jittered backoff says, on the next broker,
//!   with that connection's Last Will;
//! - resubscribe whenever CONNACK says the session is new;
//! - manual acks: a down message is PUBACKed only after the core has handled it (applied and
//!   committed, or refused for good);
//! - publishing never awaits from the polling task (`try_publish`), so it cannot deadlock on a
//!   full request channel; what the channel has no room for waits in [`Backlog`] and goes in
//!   order as rumqttc drains it (a dropped PUBACK would hold the broker's window for good);
//! - max packet size fits the largest chunk; TCP_NODELAY (Nagle + delayed ACK stalls 64 KiB
//!   publishes by ~40 ms each);
//! - TLS with rustls and the ring provider only, server verified against the configured CA,
//!   optional client certificate (mTLS), optional username + password (from a 0600 file).

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{
    AsyncClient, ConnAck, ConnectReturnCode, Event, EventLoop, LastWill, MqttOptions, Packet, QoS,
    Transport,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::{watch, Notify};

use super::config::{read_password, BrokerUrl, CloudFileError, CloudSettings};
use super::contact::CloudContact;
use super::core::{ConnectPlan, Core, CoreConfig, Effect, Now, Transmit};
use super::msg::{self, Topics};
use super::msg::{DiskReport, DoorHealth, LocalHealth, OfflinePolicyReport};
use super::store::{AclSink, Outbox, StoreSync};
use crate::status::model::{CloudStatus, Snapshot};
use crate::status::Registry;

/// What `keyway status` says about the link.
struct LinkState {
    name: &'static str,
    broker: Option<String>,
    since_ms: i64,
}

/// Requests rumqttc may queue (publishes, acks, subscribes). Above the core's window of
/// event batches plus status replies; what a full channel has no room for waits in the
/// [`Backlog`].
const REQUEST_CAPACITY: usize = 256;
/// Publishes waiting in the [`Backlog`] at most; newer ones are dropped (the outbox or the
/// backend's retry recovers them). PUBACKs are never dropped.
const BACKLOG_PUBLISHES: usize = REQUEST_CAPACITY;
/// Room for MQTT framing around the largest payload.
const PACKET_SLACK: usize = 4096;
const KEEP_ALIVE: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT_S: u64 = 10;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("{field}: {source}")]
    File {
        field: String,
        #[source]
        source: CloudFileError,
    },
    #[error("TLS setup: {0}")]
    Tls(#[from] rustls::Error),
    #[error("invalid topic settings: {0}")]
    Topics(#[from] super::msg::TopicError),
    #[error("store: {0}")]
    Store(#[from] super::store::SinkError),
}

/// Reads PEM certificates (at least one).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CloudFileError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_err(path, e, "certificate"))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem_err(path, e, "certificate"))?;
    if certs.is_empty() {
        return Err(CloudFileError::Pem {
            path: path.to_owned(),
            what: "certificate",
        });
    }
    Ok(certs)
}

/// Reads a PEM private key; the file must not be readable by group or others.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, CloudFileError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|source| CloudFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(CloudFileError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    PrivateKeyDer::from_pem_file(path).map_err(|e| pem_err(path, e, "private key"))
}

fn pem_err(path: &Path, e: rustls::pki_types::pem::Error, what: &'static str) -> CloudFileError {
    match e {
        rustls::pki_types::pem::Error::Io(source) => CloudFileError::Read {
            path: path.to_owned(),
            source,
        },
        _ => CloudFileError::Pem {
            path: path.to_owned(),
            what,
        },
    }
}

/// The rustls client configuration: ring provider, the configured CA only, optional client
/// certificate.
pub fn tls_config(
    ca_file: &Path,
    client: Option<(&Path, &Path)>,
) -> Result<Arc<rustls::ClientConfig>, LinkError> {
    let file = |field: &str| {
        let field = field.to_owned();
        move |source| LinkError::File { field, source }
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(ca_file).map_err(file("cloud.ca_file"))? {
        roots.add(c)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots);
    let config = match client {
        Some((cert, key)) => builder.with_client_auth_cert(
            load_certs(cert).map_err(file("cloud.client_cert_file"))?,
            load_key(key).map_err(file("cloud.client_key_file"))?,
        )?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// What a connection needs besides the broker: loaded once, reused for every attempt.
#[derive(Clone)]
pub struct Connector {
    pub client_id: String,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub credentials: Option<(String, zeroize::Zeroizing<String>)>,
}

impl Connector {
    pub fn from_settings(s: &CloudSettings) -> Result<Connector, LinkError> {
        let tls = match &s.ca_file {
            Some(ca) => Some(tls_config(
                ca,
                s.client_cert
                    .as_ref()
                    .map(|(c, k)| (c.as_path(), k.as_path())),
            )?),
            None => None,
        };
        let credentials = match (&s.username, &s.password_file) {
            (Some(u), Some(p)) => Some((
                u.clone(),
                read_password(p).map_err(|source| LinkError::File {
                    field: "cloud.password_file".into(),
                    source,
                })?,
            )),
            (Some(u), None) => Some((u.clone(), zeroize::Zeroizing::new(String::new()))),
            _ => None,
        };
        Ok(Connector {
            client_id: s.client_id.clone(),
            tls,
            credentials,
        })
    }

    /// rumqttc options for one attempt on `broker`. `clean_session` false: the broker may
    /// keep down messages while we reconnect (never relied on: resync covers a lost session).
    pub fn options(&self, broker: &BrokerUrl, will: Option<&Transmit>, clean: bool) -> MqttOptions {
        let mut o = MqttOptions::new(self.client_id.clone(), broker.host.clone(), broker.port);
        o.set_keep_alive(KEEP_ALIVE);
        o.set_clean_session(clean);
        o.set_manual_acks(true);
        o.set_max_packet_size(
            msg::MAX_MESSAGE_BYTES + PACKET_SLACK,
            msg::MAX_MESSAGE_BYTES + PACKET_SLACK,
        );
        o.set_request_channel_capacity(REQUEST_CAPACITY);
        if let Some(w) = will {
            o.set_last_will(LastWill::new(
                w.topic.clone(),
                w.payload.clone(),
                QoS::AtLeastOnce,
                w.retain,
            ));
        }
        if let Some((u, p)) = &self.credentials {
            o.set_credentials(u.clone(), p.as_str());
        }
        if broker.tls {
            if let Some(tls) = &self.tls {
                o.set_transport(Transport::tls_with_config(
                    rumqttc::TlsConfiguration::Rustls(tls.clone()),
                ));
            }
        }
        o
    }

    /// A client and its event loop with TCP_NODELAY and a connect timeout.
    pub fn connect(&self, opts: MqttOptions) -> (AsyncClient, EventLoop) {
        let (client, mut el) = AsyncClient::new(opts, REQUEST_CAPACITY);
        let mut net = rumqttc::NetworkOptions::new();
        net.set_tcp_nodelay(true);
        net.set_connection_timeout(CONNECT_TIMEOUT_S);
        el.set_network_options(net);
        (client, el)
    }

    /// Connects to `broker` with `opts` (from [`Connector::options`]) and waits for a CONNACK
    /// that accepts: the host name resolved, TCP, TLS when configured, MQTT CONNECT, all
    /// within `timeout` (rumqttc's own connect timeout applies too).
    pub async fn handshake(
        &self,
        broker: &BrokerUrl,
        opts: MqttOptions,
        timeout: Duration,
    ) -> Result<(AsyncClient, EventLoop, ConnAck), ConnectError> {
        let limit = timeout.min(CONNECT_TIMEOUT);
        let attempt = async {
            // Resolved here first so that a wrong name is told apart from a host that does
            // not answer (rumqttc resolves it again when it connects).
            let resolved = tokio::net::lookup_host((broker.host.as_str(), broker.port))
                .await
                .map(|mut a| a.next().is_some());
            match resolved {
                Ok(true) => {}
                Ok(false) => {
                    return Err(ConnectError::Resolve {
                        host: broker.host.clone(),
                        reason: "no address".into(),
                    })
                }
                Err(e) => {
                    return Err(ConnectError::Resolve {
                        host: broker.host.clone(),
                        reason: e.to_string(),
                    })
                }
            }
            let (client, mut el) = self.connect(opts);
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => return Ok((client, el, ack)),
                    Ok(_) => {}
                    Err(e) => return Err(ConnectError::classify(&e, limit)),
                }
            }
        };
        tokio::time::timeout(limit, attempt)
            .await
            .unwrap_or(Err(ConnectError::Timeout(limit)))
    }

    /// `keyway doctor`'s broker check: connects to `broker` as the link does (same client id,
    /// TLS and credentials, session kept: a clean session would discard the daemon's on the
    /// broker; no Will, so nothing is announced) and disconnects. Returns the time to CONNACK.
    pub async fn probe(
        &self,
        broker: &BrokerUrl,
        timeout: Duration,
    ) -> Result<Duration, ConnectError> {
        let t0 = Instant::now();
        let (client, mut el, _) = self
            .handshake(broker, self.options(broker, None, false), timeout)
            .await?;
        let took = t0.elapsed();
        disconnect(&client, &mut el).await;
        Ok(took)
    }
}

/// The longest a connection attempt waits (TCP, TLS and CONNACK together).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(CONNECT_TIMEOUT_S);

/// Why a connection to a broker failed, in the terms an installer fixes it by.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot resolve {host}: {reason}")]
    Resolve { host: String, reason: String },
    #[error("connection refused (nothing listens on that port, or a firewall rejects it)")]
    Refused,
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("TLS: the broker's certificate does not verify against cloud.ca_file ({0})")]
    TlsVerify(String),
    #[error("TLS: the broker refused the handshake ({0})")]
    TlsRejected(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("the broker refused the credentials (CONNACK {0})")]
    BadCredentials(String),
    #[error("the broker refused the connection (CONNACK {0})")]
    Rejected(String),
    #[error("the broker closed the connection ({0})")]
    Closed(String),
    #[error("{0}")]
    Other(String),
}

impl ConnectError {
    /// What a rumqttc connection error means; `timeout` is the limit the attempt ran under.
    pub fn classify(e: &rumqttc::ConnectionError, timeout: Duration) -> ConnectError {
        use rumqttc::ConnectionError as C;
        match e {
            C::NetworkTimeout | C::FlushTimeout => return ConnectError::Timeout(timeout),
            C::ConnectionRefused(code) => {
                let c = format!("{code:?}");
                return match code {
                    ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized => {
                        ConnectError::BadCredentials(c)
                    }
                    _ => ConnectError::Rejected(c),
                };
            }
            C::MqttState(rumqttc::StateError::ConnectionAborted) => {
                return ConnectError::Closed("before its CONNACK".into())
            }
            _ => {}
        }
        // The cause is nested (TLS in I/O in rumqttc's layers): walk the chain. An io::Error's
        // `source()` skips its own payload, so that is looked at explicitly.
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(err) = cur {
            if let Some(t) = err.downcast_ref::<rustls::Error>() {
                return Self::from_tls(t);
            }
            if let Some(io) = err.downcast_ref::<std::io::Error>() {
                if let Some(t) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                    return Self::from_tls(t);
                }
                use std::io::ErrorKind as K;
                match io.kind() {
                    K::ConnectionRefused => return ConnectError::Refused,
                    K::TimedOut => return ConnectError::Timeout(timeout),
                    K::ConnectionReset
                    | K::ConnectionAborted
                    | K::UnexpectedEof
                    | K::BrokenPipe => return ConnectError::Closed(io.to_string()),
                    _ => {}
                }
            }
            cur = err.source();
        }
        ConnectError::Other(e.to_string())
    }

    fn from_tls(e: &rustls::Error) -> ConnectError {
        match e {
            rustls::Error::InvalidCertificate(c) => ConnectError::TlsVerify(format!("{c:?}")),
            rustls::Error::AlertReceived(a) => ConnectError::TlsRejected(format!("{a:?}")),
            other => ConnectError::Tls(other.to_string()),
        }
    }
}

/// Sends DISCONNECT and lets the event loop flush it, briefly.
pub async fn disconnect(client: &AsyncClient, el: &mut EventLoop) {
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Ok(ev) = el.poll().await {
            if matches!(ev, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                break;
            }
        }
    })
    .await;
}

/// A request for rumqttc's channel.
enum Out {
    /// The PUBACK of a down message (only its packet id and QoS are kept).
    Ack(rumqttc::Publish),
    Publish(Transmit),
}

/// What rumqttc's request channel had no room for, sent in order before anything newer.
///
/// rumqttc's event loop takes one request per `poll()` while one network read hands over a
/// batch of down messages, each needing a PUBACK from this task: during a big snapshot the
/// channel fills. A PUBACK dropped there is never sent, the broker keeps that message in its
/// in-flight window for good, and once the window is full it sends nothing more (the snapshot
/// of > ~1,000 chunks stalled so). Acks waiting here are bounded by the broker's window (at
/// most 65,535 packet ids); publishes by [`BACKLOG_PUBLISHES`].
#[derive(Default)]
struct Backlog {
    queue: VecDeque<Out>,
    publishes: usize,
}

impl Backlog {
    fn ack(&mut self, client: &AsyncClient, p: &rumqttc::Publish) {
        // Only what the PUBACK needs: the payload may be a 64 KiB chunk.
        let mut ack = rumqttc::Publish::new("", p.qos, Vec::new());
        ack.pkid = p.pkid;
        self.queue.push_back(Out::Ack(ack));
        self.flush(client);
    }

    fn publish(&mut self, client: &AsyncClient, t: Transmit) {
        if self.publishes >= BACKLOG_PUBLISHES {
            log::warn!(target: "keyway::cloud", "publish dropped ({} waiting): {}", self.publishes, t.topic);
            return;
        }
        self.publishes += 1;
        self.queue.push_back(Out::Publish(t));
        self.flush(client);
    }

    /// Hands over as much as the channel takes, oldest first.
    fn flush(&mut self, client: &AsyncClient) {
        while let Some(out) = self.queue.pop_front() {
            // Full (the event loop is alive while this task polls it): wait for room.
            let refused = match out {
                Out::Ack(a) => client.try_ack(&a).err().map(|_| Out::Ack(a)),
                Out::Publish(t) => {
                    let r =
                        client.try_publish(&t.topic, QoS::AtLeastOnce, t.retain, t.payload.clone());
                    if r.is_ok() {
                        self.publishes = self.publishes.saturating_sub(1);
                    }
                    r.err().map(|_| Out::Publish(t))
                }
            };
            if let Some(out) = refused {
                self.queue.push_front(out);
                return;
            }
        }
    }
}

/// Runs `f` on the store without stalling the other tasks of a multi-threaded runtime (a big
/// snapshot commit takes a while); plain call on a current-thread runtime.
fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

fn now(unix_base: (Instant, i64)) -> Now {
    let mono = Instant::now();
    let unix_ms = unix_base.1 + mono.saturating_duration_since(unix_base.0).as_millis() as i64;
    Now { mono, unix_ms }
}

fn wall_ms() -> i64 {
    crate::events::unix_ms(time::OffsetDateTime::now_utc())
}

/// How often `keyway status` gets the link's outbox depth (a count over the undelivered rows).
const STATUS_EVERY: Duration = Duration::from_secs(5);
/// How often the last contact is persisted while connected (a power cut loses at most this).
const CONTACT_EVERY: Duration = Duration::from_secs(60);

/// The running link.
pub struct Link {
    settings: CloudSettings,
    connector: Connector,
    /// Poked by the daemon when events are recorded (optional: the outbox is polled anyway).
    pub events_recorded: Arc<Notify>,
    contact: Option<Arc<CloudContact>>,
    registry: Option<Registry>,
}

/// The door and disk states of the status registry, as the heartbeat reports them.
pub fn local_health(snap: &Snapshot) -> LocalHealth {
    let doors = snap
        .doors
        .iter()
        .map(|d| DoorHealth {
            id: d.id.clone(),
            reader: match (&d.reader.present, &d.reader.pcsc_error) {
                (_, Some(_)) => "pcscd_down",
                (Some(_), None) => "present",
                (None, None) => "missing",
            }
            .into(),
            osdp: if d.osdp.port_error.is_some() {
                "port_error"
            } else if d.osdp.online {
                "online"
            } else {
                "offline"
            }
            .into(),
            secure_channel: d.osdp.secure_channel.as_str().into(),
            ble: d.ble.as_ref().map(|b| {
                if b.registered {
                    "registered"
                } else {
                    "unregistered"
                }
                .into()
            }),
            certificate_days: d.certificate_expires_in_days,
            offline_policy: d.cloud_offline.as_ref().map(|p| OfflinePolicyReport {
                limit_s: p.limit_s,
                fail_secure: p.fail_secure,
            }),
        })
        .collect();
    LocalHealth {
        doors,
        disk: snap.disk.as_ref().map(|d| DiskReport {
            free_bytes: d.free_bytes,
            total_bytes: d.total_bytes,
        }),
    }
}

impl Link {
    pub fn new(settings: CloudSettings) -> Result<Link, LinkError> {
        let connector = Connector::from_settings(&settings)?;
        Ok(Link {
            settings,
            connector,
            events_recorded: Arc::new(Notify::new()),
            contact: None,
            registry: None,
        })
    }

    /// Keeps `contact` (the doors' offline policy reads it) up to date and persisted.
    pub fn with_contact(mut self, contact: Arc<CloudContact>) -> Link {
        self.contact = Some(contact);
        self
    }

    /// Reports the link in `keyway status` and takes the doors' states for the heartbeat.
    pub fn with_registry(mut self, registry: Registry) -> Link {
        self.registry = Some(registry);
        self
    }

    /// The registry's doors and disk into the core (before a heartbeat or diagnostics).
    fn refresh_local(&self, core: &mut Core, now_ms: i64) {
        if let Some(r) = &self.registry {
            core.set_local_health(local_health(&r.snapshot(now_ms)));
        }
    }

    /// The link's state for `keyway status`.
    fn report(&self, core: &Core, store: &mut StoreSync, state: &LinkState) {
        let Some(r) = &self.registry else {
            return;
        };
        let outbox = blocking(|| store.depth()).unwrap_or_default();
        r.set_cloud(Some(CloudStatus {
            state: state.name.into(),
            broker: state.broker.clone(),
            since_ms: Some(state.since_ms),
            last_ack_ms: core.last_ack_ms(),
            outbox_depth: outbox.depth,
            outbox_oldest_ms: outbox.oldest_ms,
            outbox_dropped: outbox.dropped,
            rejected: core.counters().rejected,
            acl_version: core.applied().map(|a| a.version),
        }));
    }

    /// Connected or not, for the offline policy (persisted so a restart keeps counting).
    fn contact(&self, store: &mut StoreSync, connected: Option<bool>) {
        let Some(c) = &self.contact else {
            return;
        };
        let was = c.is_connected();
        match connected {
            Some(true) => c.connected(),
            Some(false) => c.lost(),
            None => {}
        }
        // The last moment it was connected is now: while connected, or just as it was lost
        // (a failed attempt while offline is no contact).
        if was || c.is_connected() {
            if let Err(e) = blocking(|| store.set_last_contact_ms(wall_ms())) {
                log::warn!(target: "keyway::cloud", "recording the last cloud contact: {e}");
            }
        }
    }

    /// Runs until `shutdown` turns true. The store is this task's own connection to the
    /// database (WAL: the daemon's writer and this one do not block each other's reads).
    pub async fn run(
        self,
        mut store: StoreSync,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), LinkError> {
        let s = &self.settings;
        let topics = Topics::new(&s.prefix, &s.site, &s.gateway)?;
        let mut cfg = CoreConfig::new(topics, &s.site, &s.gateway, s.brokers.len());
        cfg.heartbeat = s.heartbeat;
        cfg.batch_size = s.outbox_batch;
        let boot = blocking(|| store.next_boot())?;
        let applied = blocking(|| store.applied())?;
        let mut seed = [0u8; 8];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut seed);
        let base = (Instant::now(), wall_ms());
        let mut core = Core::new(
            cfg,
            s.trusted_keys.clone(),
            boot,
            applied,
            u64::from_le_bytes(seed),
            base.0,
        );
        log::info!(target: "keyway::cloud", "cloud link: {} broker(s), boot {boot}", s.brokers.len());
        let mut state = LinkState {
            name: "offline",
            broker: None,
            since_ms: wall_ms(),
        };
        self.report(&core, &mut store, &state);
        loop {
            if *shutdown.borrow() {
                return Ok(());
            }
            if let Some(plan) = core.poll_connect(now(base)) {
                let stop = self
                    .connection(&mut core, &mut store, plan, base, &mut shutdown, &mut state)
                    .await;
                if stop {
                    return Ok(());
                }
                continue;
            }
            let wake = core
                .poll_timeout()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
            tokio::select! {
                _ = tokio::time::sleep_until(wake.into()) => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    /// One connection, from CONNECT to its loss; true when shutting down.
    async fn connection(
        &self,
        core: &mut Core,
        store: &mut StoreSync,
        plan: ConnectPlan,
        base: (Instant, i64),
        shutdown: &mut watch::Receiver<bool>,
        state: &mut LinkState,
    ) -> bool {
        let Some(broker) = self.settings.brokers.get(plan.broker) else {
            core.handle_connection_lost(now(base));
            return false;
        };
        log::info!(target: "keyway::cloud", "connecting to {broker} (bd_seq {})", plan.bd_seq);
        // After a refused subscription: a fresh client id, and a clean session so the broker
        // does not keep one per attempt.
        let fallback;
        let (connector, clean) = match &plan.client_id_suffix {
            Some(suffix) => {
                let mut c = self.connector.clone();
                c.client_id.push_str(suffix);
                fallback = c;
                (&fallback, true)
            }
            None => (&self.connector, false),
        };
        let opts = connector.options(broker, Some(&plan.will), clean);
        let (client, mut el) = connector.connect(opts);
        if state.name != "connecting" {
            *state = LinkState {
                name: "connecting",
                broker: Some(broker.to_string()),
                since_ms: wall_ms(),
            };
        }
        state.broker = Some(broker.to_string());
        self.report(core, store, state);
        let mut next_report = Instant::now() + STATUS_EVERY;
        let mut next_contact = Instant::now() + CONTACT_EVERY;
        let mut backlog = Backlog::default();
        // Every way out of a connection but shutdown: offline for the doors and the status.
        let lost = |core: &mut Core, store: &mut StoreSync, state: &mut LinkState| {
            core.handle_connection_lost(now(base));
            if state.name == "connected" {
                *state = LinkState {
                    name: "offline",
                    broker: None,
                    since_ms: wall_ms(),
                };
            }
            self.contact(store, Some(false));
            self.report(core, store, state);
        };
        loop {
            let wake = core
                .poll_timeout()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
            tokio::select! {
                ev = el.poll() => match ev {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        if ack.code != ConnectReturnCode::Success {
                            log::warn!(target: "keyway::cloud", "{broker} refused the connection: {:?}", ack.code);
                            lost(core, store, state);
                            return false;
                        }
                        log::info!(target: "keyway::cloud", "connected to {broker} (session present: {})", ack.session_present);
                        self.contact(store, Some(true));
                        let n = now(base);
                        self.refresh_local(core, n.unix_ms);
                        blocking(|| core.handle_connected(ack.session_present, n, store));
                        *state = LinkState {
                            name: "connected",
                            broker: Some(broker.to_string()),
                            since_ms: wall_ms(),
                        };
                        self.report(core, store, state);
                    }
                    Ok(Event::Incoming(Packet::SubAck(ack))) => {
                        let ok = ack.return_codes.iter().all(|c| matches!(c, rumqttc::SubscribeReasonCode::Success(_)));
                        core.handle_subscribed(ok);
                        if !ok {
                            log::warn!(target: "keyway::cloud", "{broker} refused the subscriptions: {:?}", ack.return_codes);
                            lost(core, store, state);
                            return false;
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let r = blocking(|| core.handle_message(&p.topic, &p.payload, now(base), store));
                        if let Err(r) = r {
                            log::debug!(target: "keyway::cloud", "{}: {r}", p.topic);
                        }
                        // PUBACK only now: handled and committed (or refused for good).
                        backlog.ack(&client, &p);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        log::warn!(target: "keyway::cloud", "{broker}: {e}");
                        lost(core, store, state);
                        return false;
                    }
                },
                _ = tokio::time::sleep_until(wake.into()) => {
                    let n = now(base);
                    self.refresh_local(core, n.unix_ms);
                    blocking(|| core.handle_timeout(n, store));
                    if Instant::now() >= next_report {
                        next_report = Instant::now() + STATUS_EVERY;
                        self.report(core, store, state);
                    }
                    if Instant::now() >= next_contact {
                        next_contact = Instant::now() + CONTACT_EVERY;
                        self.contact(store, None);
                    }
                }
                _ = self.events_recorded.notified() => {
                    blocking(|| core.handle_events_recorded(now(base), store));
                }
                _ = shutdown.changed() => {
                    // A clean disconnect does not fire the Will: say offline ourselves.
                    let _ = client.try_publish(&plan.will.topic, QoS::AtLeastOnce, true, plan.will.payload.clone());
                    disconnect(&client, &mut el).await;
                    return true;
                }
            }
            // Subscriptions first: a birth or request answered at once must find them.
            while let Some(effect) = core.poll_effect() {
                match effect {
                    Effect::Subscribe(filters) => {
                        let subs = filters
                            .into_iter()
                            .map(|f| rumqttc::SubscribeFilter::new(f, QoS::AtLeastOnce));
                        if let Err(e) = client.try_subscribe_many(subs) {
                            log::warn!(target: "keyway::cloud", "subscribe: {e}");
                        }
                    }
                    Effect::SetLogLevel(level) => {
                        log::set_max_level(level);
                        log::info!(target: "keyway::cloud", "log level set to {level}");
                    }
                }
            }
            // What waited goes first, as rumqttc makes room.
            backlog.flush(&client);
            while let Some(t) = core.poll_transmit() {
                backlog.publish(&client, t);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::ConnectionError as C;

    const T: Duration = Duration::from_secs(10);

    fn tls_in_io(e: rustls::Error) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e)
    }

    #[test]
    fn connection_errors_are_told_apart_as_an_installer_fixes_them() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(
            ConnectError::classify(&C::Io(refused), T),
            ConnectError::Refused
        );
        assert_eq!(
            ConnectError::classify(&C::NetworkTimeout, T),
            ConnectError::Timeout(T)
        );
        assert!(matches!(
            ConnectError::classify(
                &C::ConnectionRefused(ConnectReturnCode::BadUserNamePassword),
                T
            ),
            ConnectError::BadCredentials(_)
        ));
        assert!(matches!(
            ConnectError::classify(&C::ConnectionRefused(ConnectReturnCode::NotAuthorized), T),
            ConnectError::BadCredentials(_)
        ));
        assert!(matches!(
            ConnectError::classify(&C::ConnectionRefused(ConnectReturnCode::BadClientId), T),
            ConnectError::Rejected(_)
        ));
        // Where tokio-rustls puts a verification failure: in an io::Error inside rumqttc's
        // TLS error.
        let unknown_ca = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let e = C::Tls(rumqttc::TlsError::Io(tls_in_io(unknown_ca)));
        assert_eq!(
            ConnectError::classify(&e, T),
            ConnectError::TlsVerify("UnknownIssuer".into())
        );
        // A TLS 1.3 client-certificate refusal arrives on the first read (the CONNACK's).
        let alert = rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired);
        let e = C::MqttState(rumqttc::StateError::Deserialization(
            rumqttc::mqttbytes::Error::Io(tls_in_io(alert)),
        ));
        assert!(matches!(
            ConnectError::classify(&e, T),
            ConnectError::TlsRejected(_)
        ));
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(matches!(
            ConnectError::classify(&C::Io(reset), T),
            ConnectError::Closed(_)
        ));
    }

    fn connector() -> Connector {
        Connector {
            client_id: "keyway-test".into(),
            tls: None,
            credentials: None,
        }
    }

    /// A listener that takes the connection (the kernel's backlog) and never answers: the probe
    /// gives up at its limit and says so. The paused clock jumps there as soon as all is idle.
    #[tokio::test(start_paused = true)]
    async fn a_broker_that_never_answers_is_a_timeout() {
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let broker = BrokerUrl {
            tls: false,
            host: "127.0.0.1".into(),
            port: silent.local_addr().unwrap().port(),
        };
        let limit = Duration::from_secs(5);
        let r = connector().probe(&broker, limit).await;
        assert_eq!(r, Err(ConnectError::Timeout(limit)));
    }

    #[tokio::test]
    async fn nothing_listening_is_refused() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let broker = BrokerUrl {
            tls: false,
            host: "127.0.0.1".into(),
            port,
        };
        assert_eq!(
            connector().probe(&broker, T).await,
            Err(ConnectError::Refused)
        );
    }
}
