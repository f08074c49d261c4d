//! Task supervision and the systemd watchdog.
//!
//! Every door, bus and store task is watched: each has a [`Heartbeat`] (beaten by the task's
//! own polls, see [`Beating`], or by a successful liveness probe) and its join handle.
//! [`Supervisor::check`] runs from the daemon's main loop:
//! - a door task that ended while keyway is not stopping is restarted after a backoff
//!   (1 s, doubling to 30 s), at most [`MAX_RESTARTS`] times in [`RESTART_WINDOW`]; past that,
//!   and for a bus or store task at once, the process exits non-zero so systemd restarts it;
//! - a task not heard from for its stall limit is `stalled`: [`Supervisor::healthy`] turns
//!   false, the main loop stops sending `WATCHDOG=1` and systemd kills and restarts keyway
//!   after `WatchdogSec`. Without a systemd watchdog a stall is fatal by itself.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::status::model::{TaskState, TaskStatus};

/// Restarts allowed per task within [`RESTART_WINDOW`].
pub const MAX_RESTARTS: usize = 5;
pub const RESTART_WINDOW: Duration = Duration::from_secs(600);
const BACKOFF_START: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// When a task last showed it is alive.
#[derive(Clone, Debug)]
pub struct Heartbeat(Arc<Mutex<Instant>>);

impl Default for Heartbeat {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(Instant::now())))
    }
}

impl Heartbeat {
    pub fn beat(&self) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    pub fn last(&self) -> Instant {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Wraps a task's future: every poll is a heartbeat. A task waiting on a bounded timer or
/// I/O is polled again when it fires; one awaiting something that never comes is not, and
/// goes stale.
pub struct Beating<F> {
    inner: Pin<Box<F>>,
    beat: Heartbeat,
}

impl<F: Future> Beating<F> {
    pub fn new(inner: F, beat: Heartbeat) -> Self {
        Self {
            inner: Box::pin(inner),
            beat,
        }
    }
}

impl<F: Future> Future for Beating<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.beat.beat();
        self.inner.as_mut().poll(cx)
    }
}

/// Makes a fresh instance of a restartable task.
pub type TaskFactory = Box<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// Why keyway must exit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("task {task} {what}")]
pub struct Fatal {
    pub task: String,
    pub what: String,
}

struct Watched {
    name: String,
    handle: JoinHandle<()>,
    beat: Heartbeat,
    /// `None`: only its end is watched (tasks that may idle for ever, like a BLE door).
    stall_after: Option<Duration>,
    /// `None`: its end is fatal.
    factory: Option<TaskFactory>,
    state: TaskState,
    restarts: u32,
    recent: VecDeque<Instant>,
    restart_at: Option<Instant>,
}

#[derive(Default)]
pub struct Supervisor {
    tasks: Vec<Watched>,
    /// systemd kills a keyway that stops pinging; without it, a stall must be fatal here.
    watchdog: bool,
}

impl Supervisor {
    pub fn new(watchdog: bool) -> Self {
        Self {
            tasks: Vec::new(),
            watchdog,
        }
    }

    /// Watches a task that restarts from `factory` when it ends; polls beat its heartbeat.
    pub fn spawn_restartable(
        &mut self,
        name: &str,
        stall_after: Option<Duration>,
        factory: TaskFactory,
    ) {
        let beat = Heartbeat::default();
        let handle = tokio::spawn(Beating::new(factory(), beat.clone()));
        self.push(name, handle, beat, stall_after, Some(factory));
    }

    /// Watches a task whose end is fatal. `beat` is beaten by whoever can tell it is alive.
    pub fn watch(
        &mut self,
        name: &str,
        handle: JoinHandle<()>,
        beat: Heartbeat,
        stall_after: Option<Duration>,
    ) {
        self.push(name, handle, beat, stall_after, None);
    }

    fn push(
        &mut self,
        name: &str,
        handle: JoinHandle<()>,
        beat: Heartbeat,
        stall_after: Option<Duration>,
        factory: Option<TaskFactory>,
    ) {
        self.tasks.push(Watched {
            name: name.into(),
            handle,
            beat,
            stall_after,
            factory,
            state: TaskState::Running,
            restarts: 0,
            recent: VecDeque::new(),
            restart_at: None,
        });
    }

    /// Looks at every task once (from the main loop, about every second).
    pub fn check(&mut self) -> Result<(), Fatal> {
        let now = Instant::now();
        let watchdog = self.watchdog;
        for t in &mut self.tasks {
            if let Some(at) = t.restart_at {
                if now >= at {
                    if let Some(factory) = &t.factory {
                        t.beat.beat();
                        t.handle = tokio::spawn(Beating::new(factory(), t.beat.clone()));
                        t.restart_at = None;
                        t.state = TaskState::Running;
                        log::warn!(target: "keyway::daemon", task = t.name.as_str();
                            "task {} restarted ({} restart(s) so far)", t.name, t.restarts);
                    }
                }
                continue;
            }
            if t.handle.is_finished() {
                let what = "ended unexpectedly";
                while t
                    .recent
                    .front()
                    .is_some_and(|r| now.duration_since(*r) > RESTART_WINDOW)
                {
                    t.recent.pop_front();
                }
                if t.factory.is_none() || t.recent.len() >= MAX_RESTARTS {
                    t.state = TaskState::Died;
                    let what = if t.factory.is_none() {
                        what.to_string()
                    } else {
                        format!(
                            "{what} {MAX_RESTARTS} times within {} min",
                            RESTART_WINDOW.as_secs() / 60
                        )
                    };
                    log::error!(target: "keyway::daemon", task = t.name.as_str(), message_id = crate::logging::catalog::TASK_DIED;
                        "task {} {what}; exiting so systemd restarts keyway", t.name);
                    return Err(Fatal {
                        task: t.name.clone(),
                        what,
                    });
                }
                let backoff = BACKOFF_START
                    .saturating_mul(1 << t.recent.len().min(5))
                    .min(BACKOFF_MAX);
                t.recent.push_back(now);
                t.restarts += 1;
                t.state = TaskState::Restarting;
                t.restart_at = Some(now + backoff);
                log::error!(target: "keyway::daemon", task = t.name.as_str(), message_id = crate::logging::catalog::TASK_DIED;
                    "task {} {what}; restarting in {} s", t.name, backoff.as_secs());
                continue;
            }
            let stalled = t
                .stall_after
                .is_some_and(|limit| now.duration_since(t.beat.last()) > limit);
            if stalled && t.state != TaskState::Stalled {
                t.state = TaskState::Stalled;
                log::error!(target: "keyway::daemon", task = t.name.as_str(), message_id = crate::logging::catalog::TASK_DIED;
                    "task {} stalled (not heard from for {:?}); watchdog pings stopped", t.name, t.stall_after.unwrap_or_default());
                if !watchdog {
                    return Err(Fatal {
                        task: t.name.clone(),
                        what: "stalled".into(),
                    });
                }
            } else if !stalled && t.state == TaskState::Stalled {
                t.state = TaskState::Running;
                log::info!(target: "keyway::daemon", task = t.name.as_str(); "task {} alive again", t.name);
            }
        }
        Ok(())
    }

    /// Every task running and heard from: the watchdog may be pinged.
    pub fn healthy(&self) -> bool {
        self.tasks.iter().all(|t| t.state == TaskState::Running)
    }

    pub fn statuses(&self) -> Vec<TaskStatus> {
        self.tasks
            .iter()
            .map(|t| TaskStatus {
                name: t.name.clone(),
                state: t.state,
                restarts: t.restarts,
            })
            .collect()
    }

    /// Shutdown: the handles, to wait for (restarts pending are dropped).
    pub fn into_handles(self) -> Vec<JoinHandle<()>> {
        self.tasks.into_iter().map(|t| t.handle).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A door task whose first `panics` instances panic, then serves (waits for ever while
    /// beating on a 500 ms timer, like a reader loop).
    fn door(panics: usize, started: Arc<AtomicUsize>) -> TaskFactory {
        Box::new(move || {
            let n = started.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                if n < panics {
                    panic!("door task test panic {n}");
                }
                loop {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            })
        })
    }

    async fn tick(s: &mut Supervisor, secs: u64) -> Result<(), Fatal> {
        for _ in 0..secs {
            tokio::time::sleep(Duration::from_secs(1)).await;
            s.check()?;
        }
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn a_door_task_that_panics_is_restarted_after_a_backoff() {
        let started = Arc::new(AtomicUsize::new(0));
        let mut s = Supervisor::new(true);
        s.spawn_restartable(
            "door front",
            Some(Duration::from_secs(10)),
            door(1, started.clone()),
        );
        tokio::task::yield_now().await;
        s.check().unwrap();
        assert!(!s.healthy(), "a dead task stops the pings until it is back");
        assert_eq!(s.statuses()[0].state, TaskState::Restarting);
        tick(&mut s, 2).await.unwrap();
        assert_eq!(started.load(Ordering::SeqCst), 2);
        assert!(s.healthy());
        assert_eq!(s.statuses()[0].restarts, 1);
        // And it keeps beating.
        tick(&mut s, 30).await.unwrap();
        assert!(s.healthy());
    }

    #[tokio::test(start_paused = true)]
    async fn a_door_task_that_keeps_dying_makes_keyway_exit() {
        let started = Arc::new(AtomicUsize::new(0));
        let mut s = Supervisor::new(true);
        s.spawn_restartable("door front", None, door(usize::MAX, started.clone()));
        let fatal = tick(&mut s, 600).await.unwrap_err();
        assert_eq!(fatal.task, "door front");
        assert!(fatal.what.contains("5 times"), "{fatal}");
        assert_eq!(started.load(Ordering::SeqCst), MAX_RESTARTS + 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_wedged_door_task_stops_the_pings() {
        let mut s = Supervisor::new(true);
        s.spawn_restartable(
            "door front",
            Some(Duration::from_secs(10)),
            Box::new(|| Box::pin(std::future::pending::<()>())),
        );
        tick(&mut s, 10).await.unwrap();
        assert!(s.healthy(), "within its stall limit");
        tick(&mut s, 2).await.unwrap();
        assert!(!s.healthy());
        assert_eq!(s.statuses()[0].state, TaskState::Stalled);
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_systemd_watchdog_a_stall_is_fatal() {
        let mut s = Supervisor::new(false);
        s.watch(
            "store",
            tokio::spawn(std::future::pending::<()>()),
            Heartbeat::default(),
            Some(Duration::from_secs(5)),
        );
        let fatal = tick(&mut s, 10).await.unwrap_err();
        assert_eq!(
            (fatal.task.as_str(), fatal.what.as_str()),
            ("store", "stalled")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_bus_task_that_ends_is_fatal_at_once() {
        let mut s = Supervisor::new(true);
        s.watch(
            "osdp bus /dev/ttyS0",
            tokio::spawn(async {}),
            Heartbeat::default(),
            None,
        );
        tokio::task::yield_now().await;
        let fatal = s.check().unwrap_err();
        assert_eq!(fatal.what, "ended unexpectedly");
        assert_eq!(s.statuses()[0].state, TaskState::Died);
    }

    #[tokio::test(start_paused = true)]
    async fn a_probed_task_stays_alive_while_probes_answer() {
        let mut s = Supervisor::new(true);
        let beat = Heartbeat::default();
        s.watch(
            "store",
            tokio::spawn(std::future::pending::<()>()),
            beat.clone(),
            Some(Duration::from_secs(5)),
        );
        for _ in 0..20 {
            beat.beat();
            tick(&mut s, 1).await.unwrap();
        }
        assert!(s.healthy());
        tick(&mut s, 6).await.unwrap();
        assert!(!s.healthy());
        beat.beat();
        s.check().unwrap();
        assert!(s.healthy(), "alive again once it answers");
    }
}
