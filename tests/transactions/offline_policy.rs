//! A door's offline policy in the one access pipeline, on tokio's paused clock: a fail-secure
//! door denies `cloud_offline` once the cloud has been gone longer than its limit.
use std::sync::Arc;
use std::time::{Duration, Instant};

use keyway::acl::{Decision, DenyReason};
use keyway::cloud::contact::{CloudContact, OfflinePolicy};
use keyway::daemon::access::{shared_limiter, Access, RateLimitConfig, Subject};
use keyway::events::Transport;
use keyway_sim::door::{door, MemoryStore, Panel};

fn key() -> [u8; 65] {
    [4; 65]
}

async fn decide(access: &Access<Panel, MemoryStore>) -> Decision {
    let mut att = access.begin(
        Transport::Nfc,
        Instant::now(),
        tokio::time::Instant::now() + Duration::from_secs(5),
    );
    let subject = Subject::Endpoint {
        key: key(),
        signaling_bitmap: None,
    };
    access.decide(&mut att, subject).await.unwrap();
    att.decision.unwrap()
}

fn access(
    policy: Option<OfflinePolicy>,
    contact: &Arc<CloudContact>,
) -> Access<Panel, MemoryStore> {
    let store = MemoryStore {
        granted: Some(key()),
        contact: Some(contact.clone()),
        ..MemoryStore::default()
    };
    let door = keyway::config::Door {
        cloud_offline: policy,
        ..door()
    };
    Access::new(
        Arc::new(door),
        store,
        Panel::default(),
        shared_limiter(RateLimitConfig::default()),
    )
}

/// A fail-secure door denies `cloud_offline` once the cloud has been gone for longer than
/// its limit, and grants again as soon as the link is back; a door that only reports, and
/// a door without a policy, keep granting from the cached ACL.
#[tokio::test(start_paused = true)]
async fn a_fail_secure_door_denies_after_its_offline_limit() {
    let contact = CloudContact::new(Duration::ZERO);
    let limit = Duration::from_secs(3600);
    let secure = access(
        Some(OfflinePolicy {
            limit,
            fail_secure: true,
        }),
        &contact,
    );
    let lenient = access(
        Some(OfflinePolicy {
            limit,
            fail_secure: false,
        }),
        &contact,
    );
    let none = access(None, &contact);
    contact.connected();
    tokio::time::advance(Duration::from_secs(10 * 3600)).await;
    assert!(decide(&secure).await.is_grant(), "connected: never offline");
    contact.lost();
    tokio::time::advance(limit).await;
    assert!(
        decide(&secure).await.is_grant(),
        "at the limit: still valid"
    );
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(
        decide(&secure).await,
        Decision::Deny(DenyReason::CloudOffline)
    );
    assert!(decide(&lenient).await.is_grant());
    assert!(decide(&none).await.is_grant());
    contact.connected();
    assert!(decide(&secure).await.is_grant());
}

/// The offline time survives a restart: a contact created from the persisted last
/// contact starts already past the limit.
#[tokio::test(start_paused = true)]
async fn offline_time_from_before_a_restart_counts() {
    let contact = CloudContact::new(Duration::from_secs(7200));
    let secure = access(
        Some(OfflinePolicy {
            limit: Duration::from_secs(3600),
            fail_secure: true,
        }),
        &contact,
    );
    assert_eq!(
        decide(&secure).await,
        Decision::Deny(DenyReason::CloudOffline)
    );
}
