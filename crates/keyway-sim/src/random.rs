//! Randomness injected into the endpoint emulator.
//!
//! The endpoint core never reaches for the OS RNG itself: it asks an [`EndpointRandom`] for its
//! per-transaction ephemeral key and for random bytes (the decoy FAST cryptogram). The binary
//! passes [`OsRandom`]; tests pass [`ScriptedRandom`] loaded with a vector file's values so the
//! transcript replays byte for byte.

use std::collections::VecDeque;

use p256::SecretKey;
use rand_core::{OsRng, RngCore};

/// Source of the endpoint's randomness. `None` means "exhausted": the endpoint answers the
/// command with an error status instead of panicking.
pub trait EndpointRandom {
    /// A fresh P-256 ephemeral private key (one per AUTH0).
    fn ephemeral_key(&mut self) -> Option<SecretKey>;
    /// Fill `out` with random bytes.
    fn fill_bytes(&mut self, out: &mut [u8]) -> Option<()>;
}

/// The operating system's CSPRNG (for the real emulator binary).
#[derive(Debug, Default, Clone, Copy)]
pub struct OsRandom;

impl EndpointRandom for OsRandom {
    fn ephemeral_key(&mut self) -> Option<SecretKey> {
        Some(SecretKey::random(&mut OsRng))
    }

    fn fill_bytes(&mut self, out: &mut [u8]) -> Option<()> {
        OsRng.try_fill_bytes(out).ok()
    }
}

/// Replays queued values in order (tests, vector replay). Keys and bytes are separate queues,
/// so the order in which the endpoint asks for them does not matter.
#[derive(Default)]
pub struct ScriptedRandom {
    keys: VecDeque<SecretKey>,
    bytes: VecDeque<u8>,
}

impl ScriptedRandom {
    /// Empty script: every request fails until something is queued.
    pub fn new() -> Self {
        Self::default()
    }

    /// Queue an ephemeral key.
    pub fn push_key(&mut self, key: SecretKey) -> &mut Self {
        self.keys.push_back(key);
        self
    }

    /// Queue random bytes.
    pub fn push_bytes(&mut self, bytes: &[u8]) -> &mut Self {
        self.bytes.extend(bytes.iter().copied());
        self
    }

    /// Keys and bytes not consumed yet.
    pub fn remaining(&self) -> (usize, usize) {
        (self.keys.len(), self.bytes.len())
    }
}

// Secrets inside: never print them.
impl std::fmt::Debug for ScriptedRandom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScriptedRandom")
            .field("keys", &self.keys.len())
            .field("bytes", &self.bytes.len())
            .finish()
    }
}

impl EndpointRandom for ScriptedRandom {
    fn ephemeral_key(&mut self) -> Option<SecretKey> {
        self.keys.pop_front()
    }

    fn fill_bytes(&mut self, out: &mut [u8]) -> Option<()> {
        if self.bytes.len() < out.len() {
            return None;
        }
        let n = out.len();
        for (slot, b) in out.iter_mut().zip(self.bytes.drain(..n)) {
            *slot = b;
        }
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripted_replays_in_order_and_then_fails() {
        let k1 = SecretKey::from_slice(&[1u8; 32]).unwrap();
        let k2 = SecretKey::from_slice(&[2u8; 32]).unwrap();
        let mut r = ScriptedRandom::new();
        r.push_key(k1.clone())
            .push_key(k2.clone())
            .push_bytes(&[1, 2, 3]);
        assert_eq!(r.ephemeral_key().unwrap().to_bytes(), k1.to_bytes());
        let mut two = [0u8; 2];
        assert_eq!(r.fill_bytes(&mut two), Some(()));
        assert_eq!(two, [1, 2]);
        // Not enough bytes left: fails without consuming.
        assert_eq!(r.fill_bytes(&mut two), None);
        assert_eq!(r.remaining(), (1, 1));
        assert_eq!(r.ephemeral_key().unwrap().to_bytes(), k2.to_bytes());
        assert!(r.ephemeral_key().is_none());
        assert!(!format!("{r:?}").contains("01"));
    }

    #[test]
    fn os_random_gives_distinct_keys() {
        let mut r = OsRandom;
        let a = r.ephemeral_key().unwrap();
        let b = r.ephemeral_key().unwrap();
        assert_ne!(a.to_bytes(), b.to_bytes());
        let mut x = [0u8; 32];
        let mut y = [0u8; 32];
        r.fill_bytes(&mut x).unwrap();
        r.fill_bytes(&mut y).unwrap();
        assert_ne!(x, y);
    }
}
