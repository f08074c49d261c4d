//! The backend side, shipped as `keyway cloud …`: build signed snapshots, deltas and commands,
//! and a small MQTT client to publish them, tail events (with application acks) and watch the
//! fleet. For installers and backend teams before their own backend exists, and for the tests.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, Packet, QoS};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::config::BrokerUrl;
use super::link::Connector;
use super::msg::{self, SnapshotFormat, TopicKind, Topics};
use super::sign::BackendSigner;

/// Received messages buffered for the caller; the poller waits when it is full.
const INBOX: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("MQTT: {0}")]
    Client(#[from] rumqttc::ClientError),
    #[error("cannot connect to {broker}: {reason}")]
    Connect { broker: String, reason: String },
    #[error("{0}")]
    Invalid(String),
}

/// Who a signed message is for, and how long it is valid.
#[derive(Debug, Clone)]
pub struct Target {
    pub site: String,
    /// A gateway id or `*`.
    pub gateway: String,
    /// Seconds from now until it expires.
    pub ttl_s: i64,
}

fn envelope(kind: &str, t: &Target, now_s: i64) -> serde_json::Value {
    serde_json::json!({
        "type": kind, "v": msg::VERSION, "site": t.site, "gateway": t.gateway,
        "issued_at": now_s, "expires_at": now_s + t.ttl_s,
    })
}

fn extend(mut base: serde_json::Value, extra: serde_json::Value) -> Vec<u8> {
    if let (Some(b), serde_json::Value::Object(e)) = (base.as_object_mut(), extra) {
        b.extend(e);
    }
    msg::to_json(&base)
}

/// The signed manifest and the chunks of a snapshot of `content` (a JSON or CSV ACL file).
pub fn snapshot_messages(
    signer: &BackendSigner,
    t: &Target,
    version: u64,
    format: SnapshotFormat,
    content: &[u8],
    chunk_size: u32,
    now_s: i64,
) -> Result<(Vec<u8>, Vec<Vec<u8>>), BackendError> {
    if chunk_size == 0 || chunk_size > msg::MAX_CHUNK_BYTES {
        return Err(BackendError::Invalid(format!(
            "chunk size must be 1..={}",
            msg::MAX_CHUNK_BYTES
        )));
    }
    let chunks: Vec<Vec<u8>> = content
        .chunks(chunk_size as usize)
        .enumerate()
        .map(|(i, c)| msg::chunk_json(version, i as u32, c))
        .collect();
    let manifest = extend(
        envelope(msg::TYPE_SNAPSHOT, t, now_s),
        serde_json::json!({
            "version": version, "format": format, "size": content.len(),
            "sha256": hex::encode(Sha256::digest(content)),
            "chunks": chunks.len(), "chunk_size": chunk_size,
        }),
    );
    Ok((signer.sign(&manifest), chunks))
}

/// A signed delta.
#[allow(clippy::too_many_arguments)]
pub fn delta_message(
    signer: &BackendSigner,
    t: &Target,
    base_version: u64,
    version: u64,
    upsert: Vec<serde_json::Value>,
    suspend: Vec<String>,
    revoke: Vec<String>,
    now_s: i64,
) -> Vec<u8> {
    signer.sign(&extend(
        envelope(msg::TYPE_DELTA, t, now_s),
        serde_json::json!({
            "base_version": base_version, "version": version,
            "upsert": upsert, "suspend": suspend, "revoke": revoke,
        }),
    ))
}

/// A signed command.
pub fn command_message(
    signer: &BackendSigner,
    t: &Target,
    request_id: &str,
    name: &str,
    args: serde_json::Map<String, serde_json::Value>,
    now_s: i64,
) -> Vec<u8> {
    signer.sign(&extend(
        envelope(msg::TYPE_COMMAND, t, now_s),
        serde_json::json!({"request_id": request_id, "name": name, "args": args}),
    ))
}

/// The credential objects of an ACL file, for a delta's `upsert` (validated like an import).
pub fn upserts_from_file(path: &std::path::Path) -> Result<Vec<serde_json::Value>, BackendError> {
    let specs = crate::acl::load_file(path).map_err(|e| BackendError::Invalid(e.to_string()))?;
    Ok(specs.iter().map(spec_json).collect())
}

fn rfc3339(t: Option<i64>) -> serde_json::Value {
    use time::format_description::well_known::Rfc3339;
    t.and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|d| d.format(&Rfc3339).ok())
        .map(serde_json::Value::from)
        .unwrap_or(serde_json::Value::Null)
}

/// One credential in the JSON ACL file format (docs/acl-format.md).
pub fn spec_json(s: &crate::acl::CredentialSpec) -> serde_json::Value {
    serde_json::json!({
        "endpoint_key": hex::encode(s.endpoint_key),
        "person_id": s.person_id,
        "card_format": s.card_format.as_str(),
        "facility_code": s.facility_code,
        "card_number": s.card_number,
        "valid_from": rfc3339(s.valid_from),
        "valid_until": rfc3339(s.valid_until),
        "doors": s.doors,
        "card_uids": s.card_uids.iter().map(hex::encode).collect::<Vec<_>>(),
    })
}

/// A connected backend client. Received messages arrive on [`Backend::recv`]; publishing
/// happens from the caller's task while a spawned task polls the event loop.
pub struct Backend {
    client: AsyncClient,
    inbox: mpsc::Receiver<(String, Vec<u8>)>,
    poller: tokio::task::JoinHandle<()>,
    /// Made again after a reconnect into a new session.
    subscriptions: Arc<Mutex<Vec<String>>>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.poller.abort();
    }
}

impl Backend {
    /// Connects (clean session) and waits for the CONNACK, at most `timeout`.
    pub async fn connect(
        connector: &Connector,
        broker: &BrokerUrl,
        timeout: Duration,
    ) -> Result<Backend, BackendError> {
        let mut opts = connector.options(broker, None, true);
        opts.set_manual_acks(false);
        let (client, mut el, _) =
            connector
                .handshake(broker, opts, timeout)
                .await
                .map_err(|e| BackendError::Connect {
                    broker: broker.to_string(),
                    reason: e.to_string(),
                })?;
        let (tx, inbox) = mpsc::channel(INBOX);
        let subscriptions: Arc<Mutex<Vec<String>>> = Arc::default();
        let (subs, resubscriber) = (subscriptions.clone(), client.clone());
        let poller = tokio::spawn(async move {
            loop {
                match el.poll().await {
                    // Reconnected into a new session (a broker restart, a cluster node lost, or
                    // RabbitMQ closing a publisher's connection when a queue on a dead node
                    // nacks): the subscriptions are gone.
                    Ok(Event::Incoming(Packet::ConnAck(a))) if !a.session_present => {
                        let filters: Vec<rumqttc::SubscribeFilter> = subs
                            .lock()
                            .map(|f| f.clone())
                            .unwrap_or_default()
                            .into_iter()
                            .map(|f| rumqttc::SubscribeFilter::new(f, QoS::AtLeastOnce))
                            .collect();
                        if !filters.is_empty() {
                            let _ = resubscriber.try_subscribe_many(filters);
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if tx
                            .send((p.topic.clone(), p.payload.to_vec()))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    Ok(_) => {}
                    // Connected once: keep trying, gently.
                    Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
                }
            }
        });
        Ok(Backend {
            client,
            inbox,
            poller,
            subscriptions,
        })
    }

    pub async fn subscribe(&self, filter: &str) -> Result<(), BackendError> {
        if let Ok(mut subs) = self.subscriptions.lock() {
            subs.push(filter.to_owned());
        }
        Ok(self.client.subscribe(filter, QoS::AtLeastOnce).await?)
    }

    pub async fn publish(
        &self,
        topic: &str,
        payload: Vec<u8>,
        retain: bool,
    ) -> Result<(), BackendError> {
        Ok(self
            .client
            .publish(topic, QoS::AtLeastOnce, retain, payload)
            .await?)
    }

    /// The next received message, or `None` after `timeout`.
    pub async fn recv(&mut self, timeout: Duration) -> Option<(String, Vec<u8>)> {
        tokio::time::timeout(timeout, self.inbox.recv())
            .await
            .ok()
            .flatten()
    }

    /// Publishes a snapshot: the manifest, then the chunks in order.
    pub async fn publish_snapshot(
        &self,
        topics: &Topics,
        manifest: Vec<u8>,
        chunks: Vec<Vec<u8>>,
    ) -> Result<(), BackendError> {
        self.publish(&topics.topic(TopicKind::AclSnapshot), manifest, false)
            .await?;
        for c in chunks {
            self.publish(&topics.topic(TopicKind::AclChunk), c, false)
                .await?;
        }
        Ok(())
    }

    /// Application ack for a gateway's events.
    pub async fn ack_events(
        &self,
        topics: &Topics,
        instance: &str,
        through_seq: i64,
    ) -> Result<(), BackendError> {
        self.ack(topics, TopicKind::EventsAck, instance, through_seq)
            .await
    }

    /// Application ack for a gateway's notes.
    pub async fn ack_notes(
        &self,
        topics: &Topics,
        instance: &str,
        through_seq: i64,
    ) -> Result<(), BackendError> {
        self.ack(topics, TopicKind::NotesAck, instance, through_seq)
            .await
    }

    async fn ack(
        &self,
        topics: &Topics,
        kind: TopicKind,
        instance: &str,
        through_seq: i64,
    ) -> Result<(), BackendError> {
        let ack = msg::EventsAck {
            kind: if kind == TopicKind::NotesAck {
                msg::TYPE_NOTES_ACK
            } else {
                msg::TYPE_ACK
            }
            .into(),
            v: msg::VERSION,
            instance: instance.into(),
            through_seq,
        };
        self.publish(&topics.topic(kind), msg::to_json(&ack), false)
            .await
    }

    pub async fn disconnect(self) {
        let _ = self.client.disconnect().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
