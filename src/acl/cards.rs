//! Physical cards during a cutover: a credential may list the UIDs of the person's old cards
//! (`card_uids` in the ACL file), and a door that accepts cards looks a card up by its UID.
//!
//! A UID is not a secret and most cards let anyone read it, so a UID-only card is clonable:
//! the daemon warns at start-up for every door that accepts cards. The decision rules are the
//! same as for a phone ([`evaluate`]): validity window, then door list.

use super::{evaluate, AclError, CredentialRecord, Decision, Store};

/// UID lengths of ISO/IEC 14443 Type A cards: single, double and triple size.
pub const UID_LENGTHS: [usize; 3] = [4, 7, 10];
/// Most card UIDs one credential may list.
pub const MAX_UIDS_PER_CREDENTIAL: usize = 8;

/// True when `uid` has a length a card UID can have.
pub fn is_valid_uid(uid: &[u8]) -> bool {
    UID_LENGTHS.contains(&uid.len())
}

impl Store {
    /// Fetches the credential holding card `uid`, with its access to `door` at `now_unix`.
    pub fn lookup_card(
        &self,
        uid: &[u8],
        door: &str,
        now_unix: i64,
    ) -> Result<Option<CredentialRecord>, AclError> {
        if !is_valid_uid(uid) {
            return Ok(None);
        }
        self.query_credential(super::BY_CARD_UID, uid, door, now_unix)
    }

    /// Decides whether card `uid` may open `door` at `now` (unknown UID: `unknown_key`).
    pub fn decide_card(
        &self,
        uid: &[u8],
        door: &str,
        now: time::OffsetDateTime,
    ) -> Result<Decision, AclError> {
        let now = now.unix_timestamp();
        let record = self.lookup_card(uid, door, now)?;
        Ok(evaluate(record.as_ref(), now))
    }

    /// Number of stored card UIDs.
    pub fn card_uid_count(&self) -> Result<u64, AclError> {
        Ok(self.count("SELECT count(*) FROM card_uids")?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acl::{CredentialSpec, DenyReason, ImportMode, ENDPOINT_KEY_LEN};
    use crate::card::CardFormat;

    fn key(seed: u8) -> [u8; ENDPOINT_KEY_LEN] {
        crate::acl::test_key(seed.into())
    }

    fn spec(seed: u8, uids: Vec<Vec<u8>>, doors: &[&str]) -> CredentialSpec {
        CredentialSpec {
            state: crate::acl::CredentialState::Active,
            line: 1,
            endpoint_key: key(seed),
            person_id: format!("p{seed}"),
            card_format: CardFormat::H10301,
            facility_code: 7,
            card_number: u32::from(seed),
            valid_from: None,
            valid_until: None,
            doors: doors.iter().map(|d| d.to_string()).collect(),
            card_uids: uids,
        }
    }

    const NOW: time::OffsetDateTime = time::macros::datetime!(2026-01-01 00:00 UTC);

    #[test]
    fn card_uid_decides_like_the_credential() {
        let mut s = Store::open_in_memory().unwrap();
        let a = vec![0x04, 0xA1, 0xB2, 0xC3, 0xD4, 0xE5, 0xF6];
        let b = vec![0xDE, 0xAD, 0xBE, 0xEF];
        s.import_specs(
            &[spec(1, vec![a.clone(), b.clone()], &["front"])],
            ImportMode::Replace,
            "t",
        )
        .unwrap();
        match s.decide_card(&a, "front", NOW).unwrap() {
            Decision::Grant(g) => assert_eq!((g.person_id.as_str(), g.card_number), ("p1", 1)),
            other => panic!("{other:?}"),
        }
        assert!(s.decide_card(&b, "front", NOW).unwrap().is_grant());
        assert_eq!(
            s.decide_card(&a, "back", NOW).unwrap(),
            Decision::Deny(DenyReason::WrongDoor)
        );
        assert_eq!(
            s.decide_card(&[1, 2, 3, 4], "front", NOW).unwrap(),
            Decision::Deny(DenyReason::UnknownKey)
        );
        assert_eq!(
            s.decide_card(&[1, 2, 3], "front", NOW).unwrap(),
            Decision::Deny(DenyReason::UnknownKey)
        );
        // A phone key is not a card UID and the other way round.
        assert_eq!(
            s.decide_card(&key(1)[..10], "front", NOW).unwrap(),
            Decision::Deny(DenyReason::UnknownKey)
        );
    }

    #[test]
    fn import_moves_replaces_and_removes_uids() {
        let mut s = Store::open_in_memory().unwrap();
        let u = vec![9, 9, 9, 9];
        s.import_specs(
            &[spec(1, vec![u.clone()], &["*"])],
            ImportMode::Replace,
            "t",
        )
        .unwrap();
        // Merge: the card now belongs to credential 2 (a re-issued badge).
        s.import_specs(&[spec(2, vec![u.clone()], &["*"])], ImportMode::Merge, "t")
            .unwrap();
        match s.decide_card(&u, "x", NOW).unwrap() {
            Decision::Grant(g) => assert_eq!(g.person_id, "p2"),
            other => panic!("{other:?}"),
        }
        assert_eq!(s.card_uid_count().unwrap(), 1);
        // Updating credential 2 without cards removes its card.
        s.import_specs(&[spec(2, vec![], &["*"])], ImportMode::Merge, "t")
            .unwrap();
        assert_eq!(s.card_uid_count().unwrap(), 0);
        // Removing the credential removes its cards (cascade).
        s.import_specs(&[spec(3, vec![u.clone()], &["*"])], ImportMode::Merge, "t")
            .unwrap();
        s.import_specs(&[spec(1, vec![], &["*"])], ImportMode::Replace, "t")
            .unwrap();
        assert_eq!(s.card_uid_count().unwrap(), 0);
        assert_eq!(
            s.decide_card(&u, "x", NOW).unwrap(),
            Decision::Deny(DenyReason::UnknownKey)
        );
    }
}
