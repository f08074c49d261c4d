//! When keyway last heard from the cloud: written by the link, read by the access pipeline
//! for each door's offline policy (`cloud_offline` in `[[door]]`) and by the status and
//! heartbeat.
//!
//! "Heard from the cloud" means a broker connection is up (CONNACK received and not lost
//! since): while it is up, a delta or a revocation can reach the door within a second. The
//! clock is tokio's, so the pipeline's limit is tested on a paused clock; the last contact is
//! also persisted (unix ms, by the link) so a restart does not reset how long keyway has been
//! offline.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

/// A door's offline policy: how long cached grants stay valid without the cloud.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OfflinePolicy {
    /// Offline for longer than this: the policy applies.
    pub limit: Duration,
    /// `true`: deny grants with `cloud_offline` after the limit (fail secure). `false`: keep
    /// granting from the cached ACL, but say so (status, heartbeat, logs).
    pub fail_secure: bool,
}

impl OfflinePolicy {
    /// Whether the limit has passed after `offline` without the cloud.
    pub fn exceeded(&self, offline: Option<Duration>) -> bool {
        offline.is_some_and(|o| o > self.limit)
    }
}

#[derive(Debug)]
struct State {
    connected: bool,
    /// Connected: when it connected; else when it was last connected (or the baseline).
    last: Instant,
}

/// Shared between the link and every door's pipeline.
#[derive(Debug)]
pub struct CloudContact {
    state: Mutex<State>,
}

impl CloudContact {
    /// Not connected, last heard `offline_already` ago (from the persisted last contact; zero
    /// when none was ever recorded: counted from this start).
    pub fn new(offline_already: Duration) -> Arc<CloudContact> {
        let now = Instant::now();
        Arc::new(CloudContact {
            state: Mutex::new(State {
                connected: false,
                last: now.checked_sub(offline_already).unwrap_or(now),
            }),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Plain data: a panic elsewhere while holding it leaves it usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// CONNACK received.
    pub fn connected(&self) {
        let mut s = self.state();
        s.connected = true;
        s.last = Instant::now();
    }

    /// The connection (or the attempt) was lost.
    pub fn lost(&self) {
        let mut s = self.state();
        if s.connected {
            s.connected = false;
            s.last = Instant::now();
        }
    }

    pub fn is_connected(&self) -> bool {
        self.state().connected
    }

    /// How long keyway has been without the cloud; `None` while connected.
    pub fn offline_for(&self) -> Option<Duration> {
        let s = self.state();
        (!s.connected).then(|| Instant::now().saturating_duration_since(s.last))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn offline_time_counts_from_the_last_connection() {
        let c = CloudContact::new(Duration::from_secs(100));
        assert_eq!(c.offline_for(), Some(Duration::from_secs(100)));
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(c.offline_for(), Some(Duration::from_secs(105)));
        c.connected();
        tokio::time::advance(Duration::from_secs(50)).await;
        assert_eq!(c.offline_for(), None);
        c.lost();
        tokio::time::advance(Duration::from_secs(7)).await;
        assert_eq!(c.offline_for(), Some(Duration::from_secs(7)));
        // A failed attempt while offline does not restart the count.
        c.lost();
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(c.offline_for(), Some(Duration::from_secs(8)));
        let p = OfflinePolicy {
            limit: Duration::from_secs(8),
            fail_secure: true,
        };
        assert!(!p.exceeded(c.offline_for()));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(p.exceeded(c.offline_for()));
        assert!(!p.exceeded(None));
    }
}
