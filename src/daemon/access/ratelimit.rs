//! Failure rate limit for one reader, sans-IO (the caller passes `now`).
//!
//! A phone or card that fails again and again (unknown, denied, broken crypto, pulled early)
//! must not keep the reader busy or probe the ACL at full speed. Each identity (an endpoint key
//! fingerprint, a card UID, or [`UNIDENTIFIED`] for failures before anything was proven) gets
//! a few free failures, then an exponential penalty: while it runs, that identity is refused
//! without an ACL lookup, and failures of [`UNIDENTIFIED`] make the reader pause before the next
//! card. A success clears the identity. State is bounded: at most `capacity` identities, stale
//! ones forgotten first, then the least recently seen.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The identity failures count against when nothing about the card was proven.
pub const UNIDENTIFIED: &str = "-";

/// Tuning of a [`RateLimiter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitConfig {
    /// Failures in a row that cost nothing (a person may fumble a tap or two).
    pub free_failures: u32,
    /// Penalty after the first failure beyond the free ones; doubles with each further one.
    pub base_penalty: Duration,
    /// Longest penalty.
    pub max_penalty: Duration,
    /// An identity not seen for this long starts from zero again.
    pub forget_after: Duration,
    /// Most identities tracked at once.
    pub capacity: usize,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            free_failures: 3,
            base_penalty: Duration::from_millis(500),
            max_penalty: Duration::from_secs(8),
            forget_after: Duration::from_secs(300),
            capacity: 256,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    last_seen: Instant,
    penalty_until: Option<Instant>,
}

/// Failure counts and penalties per identity for one reader.
#[derive(Debug)]
pub struct RateLimiter {
    cfg: RateLimitConfig,
    entries: HashMap<String, Entry>,
}

impl RateLimiter {
    pub fn new(cfg: RateLimitConfig) -> Self {
        Self {
            cfg,
            entries: HashMap::new(),
        }
    }

    /// Time left of `id`'s penalty at `now` (zero when it may proceed).
    pub fn remaining(&self, id: &str, now: Instant) -> Duration {
        self.entries
            .get(id)
            .filter(|e| now.saturating_duration_since(e.last_seen) < self.cfg.forget_after)
            .and_then(|e| e.penalty_until)
            .map(|until| until.saturating_duration_since(now))
            .unwrap_or(Duration::ZERO)
    }

    /// True while `id` serves a penalty.
    pub fn is_limited(&self, id: &str, now: Instant) -> bool {
        !self.remaining(id, now).is_zero()
    }

    /// Counts a failure of `id`; returns the penalty it now serves (zero while free).
    pub fn failure(&mut self, id: &str, now: Instant) -> Duration {
        let forget = self.cfg.forget_after;
        if !self.entries.contains_key(id) {
            self.make_room(now);
        }
        let entry = self.entries.entry(id.to_owned()).or_insert(Entry {
            failures: 0,
            last_seen: now,
            penalty_until: None,
        });
        if now.saturating_duration_since(entry.last_seen) >= forget {
            entry.failures = 0;
            entry.penalty_until = None;
        }
        entry.failures = entry.failures.saturating_add(1);
        entry.last_seen = now;
        let beyond = entry.failures.saturating_sub(self.cfg.free_failures);
        if beyond == 0 {
            return Duration::ZERO;
        }
        // 2^(beyond-1) times the base, capped; the shift is bounded so it cannot overflow.
        let factor = 1u32 << beyond.saturating_sub(1).min(16);
        let penalty = self
            .cfg
            .base_penalty
            .saturating_mul(factor)
            .min(self.cfg.max_penalty);
        entry.penalty_until = now.checked_add(penalty);
        penalty
    }

    /// A success clears `id`'s record.
    pub fn success(&mut self, id: &str) {
        self.entries.remove(id);
    }

    /// Identities currently tracked.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Frees one slot when full: stale entries go first, else the least recently seen.
    fn make_room(&mut self, now: Instant) {
        if self.entries.len() < self.cfg.capacity.max(1) {
            return;
        }
        let forget = self.cfg.forget_after;
        self.entries
            .retain(|_, e| now.saturating_duration_since(e.last_seen) < forget);
        while self.entries.len() >= self.cfg.capacity.max(1) {
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.last_seen)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => {
                    self.entries.remove(&k);
                }
                None => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> RateLimitConfig {
        RateLimitConfig {
            free_failures: 2,
            base_penalty: Duration::from_millis(100),
            max_penalty: Duration::from_millis(350),
            forget_after: Duration::from_secs(10),
            capacity: 3,
        }
    }

    #[test]
    fn free_failures_then_doubling_capped_penalty() {
        let mut rl = RateLimiter::new(cfg());
        let t = Instant::now();
        assert_eq!(rl.failure("a", t), Duration::ZERO);
        assert_eq!(rl.failure("a", t), Duration::ZERO);
        assert!(!rl.is_limited("a", t));
        assert_eq!(rl.failure("a", t), Duration::from_millis(100));
        assert!(rl.is_limited("a", t));
        assert!(!rl.is_limited("b", t), "others are not affected");
        assert_eq!(rl.failure("a", t), Duration::from_millis(200));
        assert_eq!(rl.failure("a", t), Duration::from_millis(350));
        assert_eq!(rl.failure("a", t), Duration::from_millis(350));
        let later = t + Duration::from_millis(349);
        assert_eq!(rl.remaining("a", later), Duration::from_millis(1));
        assert!(!rl.is_limited("a", t + Duration::from_millis(350)));
        for _ in 0..100 {
            rl.failure("a", t);
        }
        assert_eq!(rl.remaining("a", t), Duration::from_millis(350));
    }

    #[test]
    fn success_clears_and_idle_identities_start_over() {
        let mut rl = RateLimiter::new(cfg());
        let t = Instant::now();
        for _ in 0..3 {
            rl.failure("a", t);
        }
        assert!(rl.is_limited("a", t));
        rl.success("a");
        assert!(!rl.is_limited("a", t));
        assert_eq!(rl.failure("a", t), Duration::ZERO);
        // Idle longer than forget_after: counting restarts.
        for _ in 0..3 {
            rl.failure("b", t);
        }
        let much_later = t + Duration::from_secs(11);
        assert!(!rl.is_limited("b", much_later));
        assert_eq!(rl.failure("b", much_later), Duration::ZERO);
    }

    #[test]
    fn state_is_bounded_oldest_evicted() {
        let mut rl = RateLimiter::new(cfg());
        let t = Instant::now();
        for (i, id) in ["a", "b", "c"].iter().enumerate() {
            for _ in 0..3 {
                rl.failure(id, t + Duration::from_millis(i as u64));
            }
        }
        assert_eq!(rl.len(), 3);
        rl.failure("d", t + Duration::from_millis(5));
        assert_eq!(rl.len(), 3);
        assert!(
            !rl.is_limited("a", t + Duration::from_millis(5)),
            "a evicted"
        );
        assert!(rl.is_limited("b", t + Duration::from_millis(5)));
        for i in 0..1000 {
            rl.failure(&format!("x{i}"), t + Duration::from_millis(10 + i));
        }
        assert_eq!(rl.len(), 3);
    }
}
