//! Stored Aliro FAST keys: the Kpersistent a reader derived in a STANDARD transaction with an
//! endpoint, kept per (reader identifier, endpoint key) so the next tap can use FAST.
//!
//! Bounded: at most [`MAX_FAST_KEYS_PER_READER`] per reader identifier, least recently used
//! evicted first. A key is only stored for an endpoint that has an active credential in the ACL
//! (so a stranger cannot fill the table), and it goes with the credential: the apply engine
//! (`apply`) removes it when the credential is removed or its validity or state changes.
//!
//! Kpersistent is a secret: it is never logged, and the database file is 0600 (see
//! [`Store::open`]).

use rusqlite::OptionalExtension;

use super::{compress_key, normalize_endpoint_key, AclError, Store, ENDPOINT_KEY_LEN};
use crate::aliro::crypto::SymmetricKey;
use crate::aliro::reader::FastCredential;

/// Most keys kept per reader identifier. Each stored key costs one HKDF + one AES-GCM per FAST
/// tap on that reader (a few microseconds each), so the bound also bounds a tap's work.
pub const MAX_FAST_KEYS_PER_READER: usize = 256;

impl Store {
    /// The stored keys of `reader_id` (group id || sub id), most recently used first.
    pub fn fast_keys(&self, reader_id: &[u8; 32]) -> Result<Vec<FastCredential>, AclError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, endpoint_key, k_persistent FROM fast_keys WHERE reader_id = ?1
             ORDER BY used_at DESC, id DESC LIMIT ?2",
        )?;
        let rows = stmt.query_map(
            rusqlite::params![reader_id.as_slice(), MAX_FAST_KEYS_PER_READER as i64],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, Vec<u8>>(1)?,
                    zeroize::Zeroizing::new(r.get::<_, Vec<u8>>(2)?),
                ))
            },
        )?;
        let mut out = Vec::new();
        for row in rows {
            let (id, key, k) = row?;
            let corrupt = |what: &str| AclError::Corrupt {
                id,
                what: format!("fast key: {what}"),
            };
            let endpoint_public_key: [u8; ENDPOINT_KEY_LEN] = key
                .as_slice()
                .try_into()
                .map_err(|_| corrupt("endpoint key length"))?;
            let k_persistent =
                SymmetricKey::from_slice(&k).ok_or_else(|| corrupt("Kpersistent length"))?;
            out.push(FastCredential {
                endpoint_public_key,
                k_persistent,
            });
        }
        Ok(out)
    }

    /// Stores (or refreshes) the Kpersistent for `endpoint_key` at `reader_id`, then evicts the
    /// least recently used keys beyond the bound. Returns `false`, storing nothing, when no
    /// credential has this endpoint key. `now_ms` orders eviction (unix milliseconds).
    pub fn save_fast_key(
        &mut self,
        reader_id: &[u8; 32],
        endpoint_key: &[u8],
        k_persistent: &SymmetricKey,
        now_ms: i64,
    ) -> Result<bool, AclError> {
        let Ok(key) = normalize_endpoint_key(endpoint_key) else {
            return Ok(false);
        };
        let stored = compress_key(&key);
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let credential: Option<i64> = tx
            .query_row(
                "SELECT 1 FROM acl WHERE key = ?1 AND state = 0",
                [stored.as_slice()],
                |r| r.get(0),
            )
            .optional()?;
        if credential.is_none() {
            return Ok(false);
        }
        tx.execute(
            "INSERT INTO fast_keys (reader_id, key, endpoint_key, k_persistent, used_at)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (reader_id, endpoint_key) DO UPDATE SET
                key = excluded.key,
                k_persistent = excluded.k_persistent,
                used_at = excluded.used_at",
            rusqlite::params![
                reader_id.as_slice(),
                stored.as_slice(),
                key.as_slice(),
                k_persistent.as_bytes().as_slice(),
                now_ms
            ],
        )?;
        tx.execute(
            "DELETE FROM fast_keys WHERE reader_id = ?1 AND id NOT IN (
                SELECT id FROM fast_keys WHERE reader_id = ?1
                ORDER BY used_at DESC, id DESC LIMIT ?2)",
            rusqlite::params![reader_id.as_slice(), MAX_FAST_KEYS_PER_READER as i64],
        )?;
        tx.commit()?;
        Ok(true)
    }

    /// Marks the key of `endpoint_key` at `reader_id` as just used (FAST succeeded), so
    /// eviction takes idle endpoints first.
    pub fn touch_fast_key(
        &mut self,
        reader_id: &[u8; 32],
        endpoint_key: &[u8],
        now_ms: i64,
    ) -> Result<(), AclError> {
        self.conn.execute(
            "UPDATE fast_keys SET used_at = ?3 WHERE reader_id = ?1 AND endpoint_key = ?2",
            rusqlite::params![reader_id.as_slice(), endpoint_key, now_ms],
        )?;
        Ok(())
    }

    /// Number of stored FAST keys (all readers), for status output and tests.
    pub fn fast_key_count(&self) -> Result<u64, AclError> {
        Ok(self.count("SELECT count(*) FROM fast_keys")?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acl::{CredentialSpec, ImportMode};
    use crate::card::CardFormat;

    fn key(seed: u16) -> [u8; ENDPOINT_KEY_LEN] {
        crate::acl::test_key(seed)
    }

    fn spec(seed: u16, until: Option<i64>) -> CredentialSpec {
        CredentialSpec {
            state: crate::acl::CredentialState::Active,
            line: 1,
            endpoint_key: key(seed),
            person_id: format!("p{seed}"),
            card_format: CardFormat::H10301,
            facility_code: 1,
            card_number: u32::from(seed),
            valid_from: None,
            valid_until: until,
            doors: vec!["*".into()],
            card_uids: Vec::new(),
        }
    }

    fn k(b: u8) -> SymmetricKey {
        SymmetricKey::from_bytes([b; 32])
    }

    const R1: [u8; 32] = [1; 32];
    const R2: [u8; 32] = [2; 32];

    #[test]
    fn stored_only_for_known_credentials_and_per_reader() {
        let mut s = Store::open_in_memory().unwrap();
        s.import_specs(&[spec(1, None)], ImportMode::Replace, "t")
            .unwrap();
        assert!(s.save_fast_key(&R1, &key(1), &k(7), 10).unwrap());
        assert!(!s.save_fast_key(&R1, &key(2), &k(8), 11).unwrap());
        assert!(!s.save_fast_key(&R1, &[4, 1, 2], &k(8), 11).unwrap());
        let got = s.fast_keys(&R1).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].endpoint_public_key, key(1));
        assert_eq!(got[0].k_persistent, k(7));
        assert!(s.fast_keys(&R2).unwrap().is_empty());
        // A new standard transaction replaces the key, it does not add a second row.
        assert!(s.save_fast_key(&R1, &key(1), &k(9), 12).unwrap());
        let got = s.fast_keys(&R1).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].k_persistent, k(9));
    }

    #[test]
    fn removal_and_revocation_by_import_wipe_the_keys() {
        let mut s = Store::open_in_memory().unwrap();
        s.import_specs(&[spec(1, None), spec(2, None)], ImportMode::Replace, "t")
            .unwrap();
        assert!(s.save_fast_key(&R1, &key(1), &k(1), 1).unwrap());
        assert!(s.save_fast_key(&R1, &key(2), &k(2), 2).unwrap());
        // Same validity: an unchanged re-import keeps FAST working.
        s.import_specs(&[spec(1, None), spec(2, None)], ImportMode::Replace, "t")
            .unwrap();
        assert_eq!(s.fast_key_count().unwrap(), 2);
        // Credential 2 dropped from the ACL, credential 1 given an end date.
        s.import_specs(&[spec(1, Some(5))], ImportMode::Replace, "t")
            .unwrap();
        assert_eq!(s.fast_key_count().unwrap(), 0);
    }

    #[test]
    fn bounded_least_recently_used_evicted_first() {
        let mut s = Store::open_in_memory().unwrap();
        let n = MAX_FAST_KEYS_PER_READER as u16 + 2;
        let specs: Vec<_> = (1..=n).map(|i| spec(i, None)).collect();
        s.import_specs(&specs, ImportMode::Replace, "t").unwrap();
        for i in 1..=n - 2 {
            assert!(s
                .save_fast_key(&R1, &key(i), &k(i as u8), i64::from(i))
                .unwrap());
        }
        // Endpoint 1 taps again (FAST): it is now the most recently used.
        s.touch_fast_key(&R1, &key(1), 10_000).unwrap();
        s.save_fast_key(&R1, &key(n - 1), &k(1), 10_001).unwrap();
        s.save_fast_key(&R1, &key(n), &k(1), 10_002).unwrap();
        let got = s.fast_keys(&R1).unwrap();
        assert_eq!(got.len(), MAX_FAST_KEYS_PER_READER);
        let keys: Vec<_> = got.iter().map(|c| c.endpoint_public_key).collect();
        assert_eq!(keys[0], key(n), "most recent first");
        assert!(keys.contains(&key(1)), "touched key kept");
        assert!(
            !keys.contains(&key(2)) && !keys.contains(&key(3)),
            "oldest evicted"
        );
        assert!(keys.contains(&key(4)));
        // Another reader's table is untouched by this reader's eviction.
        assert!(s.save_fast_key(&R2, &key(2), &k(2), 1).unwrap());
        assert_eq!(s.fast_keys(&R2).unwrap().len(), 1);
        assert_eq!(s.fast_keys(&R1).unwrap().len(), MAX_FAST_KEYS_PER_READER);
    }
}
