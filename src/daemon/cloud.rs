//! Starts the cloud link (src/cloud) when `[cloud]` is configured; standalone otherwise.
//!
//! The link has its own connection to the database (WAL: the store thread's writes and the
//! link's acks and ACL applies wait on each other only for the length of a transaction) and
//! finds new events by polling the outbox once a second.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;

use super::DaemonError;
use crate::cloud::contact::CloudContact;
use crate::cloud::link::Link;
use crate::cloud::store::StoreSync;
use crate::config::Validated;
use crate::status::Registry;

/// The contact the link will keep, starting from the last one persisted (so a restart does
/// not reset a door's offline limit); `None` without `[cloud]`.
pub fn contact(cfg: &Validated) -> Result<Option<Arc<CloudContact>>, DaemonError> {
    if cfg.cloud.is_none() {
        return Ok(None);
    }
    let mut store =
        StoreSync::open(&cfg.daemon.database).map_err(|e| DaemonError::Cloud(e.to_string()))?;
    let last = store
        .last_contact_ms()
        .map_err(|e| DaemonError::Cloud(e.to_string()))?;
    let now = crate::events::unix_ms(time::OffsetDateTime::now_utc());
    // Never heard from (a new gateway): counted from this start. A clock that went back
    // counts as no time offline rather than a negative one.
    let offline = last.map_or(Duration::ZERO, |ms| {
        Duration::from_millis(u64::try_from(now.saturating_sub(ms)).unwrap_or(0))
    });
    for d in cfg.doors.iter() {
        if let Some(p) = d.cloud_offline {
            log::info!(target: "keyway::cloud", door = d.id.as_str();
                "door {}: cached grants valid for {} s without the cloud, then {}",
                d.id,
                p.limit.as_secs(),
                if p.fail_secure { "denied (fail secure)" } else { "granted and reported" });
        }
    }
    Ok(Some(CloudContact::new(offline)))
}

/// Spawns the link on `tasks`; it stops when `shutdown` turns true.
pub fn spawn(
    cfg: &Validated,
    contact: Option<Arc<CloudContact>>,
    registry: Registry,
    tasks: &mut JoinSet<()>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), DaemonError> {
    let (Some(settings), Some(contact)) = (cfg.cloud.clone(), contact) else {
        log::info!(target: "keyway::cloud", "no [cloud] configured: standalone");
        return Ok(());
    };
    let link = Link::new(settings)
        .map_err(|e| DaemonError::Cloud(e.to_string()))?
        .with_contact(contact)
        .with_registry(registry);
    let store = match StoreSync::open(&cfg.daemon.database) {
        Ok(s) => s,
        // The doors are served read-only; the cloud link needs to write (ACL, outbox acks).
        Err(e) if e.is_unwritable() => {
            log::error!(target: "keyway::cloud",
                "cloud link not started: the database takes no writes ({e})");
            return Ok(());
        }
        Err(e) => return Err(DaemonError::Cloud(e.to_string())),
    };
    tasks.spawn(async move {
        if let Err(e) = link.run(store, shutdown).await {
            log::error!(target: "keyway::cloud", "cloud link stopped: {e}");
        }
    });
    Ok(())
}
