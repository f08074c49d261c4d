//! Starts the cloud link (src/cloud) when `[cloud]` is configured; standalone otherwise.
//!
//! The link has its own connection to the database (WAL: the store thread's writes and the
//! link's acks and ACL applies wait on each other only for the length of a transaction) and
//! finds new events by polling the outbox once a second.

use tokio::sync::watch;
use tokio::task::JoinSet;

use super::DaemonError;
use crate::cloud::link::Link;
use crate::cloud::store::StoreSync;
use crate::config::Validated;

/// Spawns the link on `tasks`; it stops when `shutdown` turns true.
pub fn spawn(
    cfg: &Validated,
    tasks: &mut JoinSet<()>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), DaemonError> {
    let Some(settings) = cfg.cloud.clone() else {
        log::info!(target: "keyway::cloud", "no [cloud] configured: standalone");
        return Ok(());
    };
    let link = Link::new(settings).map_err(|e| DaemonError::Cloud(e.to_string()))?;
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
