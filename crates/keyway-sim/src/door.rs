//! Test helpers shared by every transport's tests: an enrolled store, a reader, a door, a
//! panel that answers as told, and an in-memory store for tests on tokio's paused clock.
// Test fixtures: a setup that fails is a failed test, so they unwrap.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use p256::SecretKey;
use rand_core::OsRng;
use tokio::sync::oneshot;

use keyway::acl::{CredentialSpec, Decision, Grant, ImportMode, Store};
use keyway::aliro::crypto::SymmetricKey;
use keyway::aliro::reader::{FastCredential, ReaderIdentity};
use keyway::card::{CardFormat, WiegandBits};
use keyway::config::{AuthPolicy, Door, OsdpDoorOptions};
use keyway::daemon::access::{AccessStore, AttemptId, PanelSink, Subject, VerdictWait};
use keyway::daemon::store::{StoreError, StoreHandle};
use keyway::events::AccessEvent;
use keyway::osdp::Verdict;

/// A store with one enrolled phone (H10304 300/70000, person p-7) at `door`, and a reader.
pub struct Setup {
    pub _dir: tempfile::TempDir,
    pub store: StoreHandle,
    pub identity: ReaderIdentity,
    pub enrolled: SecretKey,
}

/// A phone key's public key as the 65-byte SEC1 point the ACL and events use.
pub fn sec1(key: &SecretKey) -> [u8; 65] {
    key.public_key()
        .to_sec1_bytes()
        .as_ref()
        .try_into()
        .unwrap()
}

/// The enrolled phone's credential.
pub fn spec(
    key: &SecretKey,
    door: &str,
    valid: (Option<i64>, Option<i64>),
    card_uids: Vec<Vec<u8>>,
) -> CredentialSpec {
    CredentialSpec {
        state: keyway::acl::CredentialState::Active,
        line: 1,
        endpoint_key: sec1(key),
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

pub fn setup(valid_from: Option<i64>, valid_until: Option<i64>, door: &str) -> Setup {
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

/// Door "front" with every option at its default.
pub fn door() -> Door {
    Door {
        id: "front".into(),
        port: PathBuf::from("/dev/null"),
        baud: 9600,
        address: 0,
        outputs: 0,
        reader_pattern: "*".into(),
        group_id: [1; 16],
        sub_id: [2; 16],
        private_key_file: PathBuf::new(),
        auth_policy: AuthPolicy::UserDeviceSetting,
        sensitive: false,
        accept_cards: false,
        fast: false,
        step_up: None,
        certificate: None,
        osdp: OsdpDoorOptions::default(),
        ble: None,
        cloud_offline: None,
    }
}

/// A panel that takes cards and, when `answer` is set, gives that verdict on each at once;
/// `silent`: it keeps every attempt waiting and never answers.
#[derive(Clone, Default)]
pub struct Panel {
    pub cards: Arc<Mutex<Vec<(WiegandBits, AttemptId)>>>,
    pub answer: Option<Verdict>,
    pub silent: bool,
    held: Arc<Mutex<Vec<oneshot::Sender<Verdict>>>>,
}

impl Panel {
    pub fn answering(v: Verdict) -> Self {
        Self {
            answer: Some(v),
            ..Self::default()
        }
    }

    pub fn silent() -> Self {
        Self {
            silent: true,
            ..Self::default()
        }
    }

    pub fn cards(&self) -> Vec<WiegandBits> {
        self.cards
            .lock()
            .unwrap()
            .iter()
            .map(|(b, _)| b.clone())
            .collect()
    }
}

impl PanelSink for Panel {
    fn send_card(
        &self,
        _door: &Door,
        bits: WiegandBits,
        attempt: AttemptId,
        _started: Instant,
    ) -> Option<VerdictWait> {
        self.cards.lock().unwrap().push((bits, attempt));
        let (tx, rx) = oneshot::channel();
        match self.answer {
            Some(v) => {
                let _ = tx.send(v);
            }
            None if self.silent => self.held.lock().unwrap().push(tx),
            None => return None,
        }
        Some(rx)
    }
}

/// An event as [`MemoryStore`] recorded it, with its attempt id.
pub type Recorded = (AccessEvent, Option<AttemptId>);

/// An in-memory store granting one key (person p-7, H10304 300/70000) and recording events:
/// no thread, so tests on tokio's paused clock are not fooled by a wait on another thread.
#[derive(Clone, Default)]
pub struct MemoryStore {
    pub granted: Option<[u8; 65]>,
    pub events: Arc<Mutex<Vec<Recorded>>>,
    /// The link's contact with the cloud, when the test has one.
    pub contact: Option<Arc<keyway::cloud::contact::CloudContact>>,
}

impl AccessStore for MemoryStore {
    async fn acl_decision(
        &self,
        subject: &Subject,
        _door: &str,
        _now: time::OffsetDateTime,
    ) -> Result<Decision, StoreError> {
        Ok(match subject {
            Subject::Endpoint { key, .. } if Some(*key) == self.granted => Decision::Grant(Grant {
                credential_id: 1,
                person_id: "p-7".into(),
                card_format: CardFormat::H10304,
                facility_code: 300,
                card_number: 70_000,
            }),
            _ => Decision::Deny(keyway::acl::DenyReason::UnknownKey),
        })
    }

    async fn record_event(
        &self,
        event: AccessEvent,
        attempt: Option<AttemptId>,
    ) -> Result<i64, StoreError> {
        let mut e = self.events.lock().unwrap();
        e.push((event, attempt));
        Ok(i64::try_from(e.len()).unwrap())
    }

    async fn stored_fast_keys(
        &self,
        _reader_id: [u8; 32],
    ) -> Result<Vec<FastCredential>, StoreError> {
        Ok(Vec::new())
    }

    async fn keep_fast_key(
        &self,
        _reader_id: [u8; 32],
        _endpoint_key: [u8; 65],
        _k_persistent: Option<SymmetricKey>,
    ) -> Result<bool, StoreError> {
        Ok(false)
    }

    fn cloud_offline_for(&self) -> Option<std::time::Duration> {
        self.contact.as_ref().and_then(|c| c.offline_for())
    }
}
