//! The access decision, as a pure function of one credential row, a door and a time.
//!
//! Kept apart from SQLite so every rule is unit-tested without a database; the store only
//! fetches the row (one index hit on `endpoint_key`) and calls [`evaluate`].

use super::CredentialState;
use crate::card::CardFormat;
use serde::Serialize;

/// The wildcard door id: a credential listing it may open every door.
pub const ALL_DOORS: &str = "*";

/// What the store knows about one credential, as needed for a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialRecord {
    pub credential_id: i64,
    pub person_id: String,
    pub card_format: CardFormat,
    pub facility_code: u32,
    pub card_number: u32,
    /// Unix seconds, inclusive; `None` = valid since forever.
    pub valid_from: Option<i64>,
    /// Unix seconds, exclusive; `None` = never expires.
    pub valid_until: Option<i64>,
    /// What the credential's door entries give at the requested door, now.
    pub door: DoorAccess,
    /// Suspended and revoked credentials are denied with their own reason.
    pub state: CredentialState,
}

/// A credential's access to one door at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DoorAccess {
    /// No entry names the door (itself, a group holding it, or `*`).
    NotListed,
    /// An entry names it with no schedule, or with one that is open now.
    Open,
    /// Named only on schedules that are closed now (or on a holiday).
    OutsideSchedule,
}

/// A granted access: what the panel needs (card data) plus ids for the event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Grant {
    pub credential_id: i64,
    pub person_id: String,
    pub card_format: CardFormat,
    pub facility_code: u32,
    pub card_number: u32,
}

impl Grant {
    /// The Wiegand bits to send to the panel for this grant.
    pub fn wiegand(&self) -> Result<crate::card::WiegandBits, crate::card::CardError> {
        crate::card::encode(self.card_format, self.facility_code, self.card_number)
    }
}

/// Why access was denied. [`DenyReason::as_str`] gives stable codes for events and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DenyReason {
    /// No credential has this endpoint key.
    UnknownKey,
    /// The credential is suspended (a lost phone, until re-issued or reinstated).
    Suspended,
    /// The credential is revoked.
    Revoked,
    /// `now >= valid_until`.
    Expired,
    /// `now < valid_from`.
    NotYetValid,
    /// The credential does not list this door (nor a group holding it, nor `*`).
    WrongDoor,
    /// The credential lists this door only on schedules that are closed now.
    OutsideSchedule,
    /// The door is sensitive and the phone did not report user verification (biometric/PIN).
    /// Decided by the tap, after the ACL would have granted.
    UserVerificationRequired,
    /// This phone or card failed too often on this reader recently; it is slowed down and
    /// refused until its penalty has passed. Decided by the tap before the ACL is asked.
    RateLimited,
    /// The door requires a step-up Access Document and the phone offers none.
    AccessDocumentRequired,
    /// The phone's Access Document failed verification (issuer, signature, digests, binding
    /// to the authenticated key, validity) or lacks an element the door asks for.
    AccessDocumentInvalid,
    /// The door's offline policy is fail secure and keyway has not heard from the cloud for
    /// longer than its limit (a revocation might not have reached it). Decided by the access
    /// pipeline after the ACL would have granted.
    CloudOffline,
}

impl DenyReason {
    /// Stable snake_case code, used in events, journald fields and the cloud sync.
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::UnknownKey => "unknown_key",
            DenyReason::Suspended => "suspended",
            DenyReason::Revoked => "revoked",
            DenyReason::Expired => "expired",
            DenyReason::NotYetValid => "not_yet_valid",
            DenyReason::WrongDoor => "wrong_door",
            DenyReason::OutsideSchedule => "outside_schedule",
            DenyReason::UserVerificationRequired => "user_verification_required",
            DenyReason::RateLimited => "rate_limited",
            DenyReason::AccessDocumentRequired => "access_document_required",
            DenyReason::AccessDocumentInvalid => "access_document_invalid",
            DenyReason::CloudOffline => "cloud_offline",
        }
    }
}

impl std::fmt::Display for DenyReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The outcome of [`crate::acl::Store::decide`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Grant(Grant),
    Deny(DenyReason),
}

impl Decision {
    pub fn is_grant(&self) -> bool {
        matches!(self, Decision::Grant(_))
    }
}

/// Decides for one credential (or none) at `now` (unix seconds).
///
/// Order: state (revoked, suspended), then validity window, then door, then schedule, so a
/// person whose badge expired learns "expired" at every door rather than "wrong door" at some.
pub fn evaluate(record: Option<&CredentialRecord>, now: i64) -> Decision {
    let Some(r) = record else {
        return Decision::Deny(DenyReason::UnknownKey);
    };
    match r.state {
        CredentialState::Active => {}
        CredentialState::Suspended => return Decision::Deny(DenyReason::Suspended),
        CredentialState::Revoked => return Decision::Deny(DenyReason::Revoked),
    }
    if let Some(from) = r.valid_from {
        if now < from {
            return Decision::Deny(DenyReason::NotYetValid);
        }
    }
    if let Some(until) = r.valid_until {
        if now >= until {
            return Decision::Deny(DenyReason::Expired);
        }
    }
    match r.door {
        DoorAccess::Open => {}
        DoorAccess::NotListed => return Decision::Deny(DenyReason::WrongDoor),
        DoorAccess::OutsideSchedule => return Decision::Deny(DenyReason::OutsideSchedule),
    }
    Decision::Grant(Grant {
        credential_id: r.credential_id,
        person_id: r.person_id.clone(),
        card_format: r.card_format,
        facility_code: r.facility_code,
        card_number: r.card_number,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(from: Option<i64>, until: Option<i64>, door_allowed: bool) -> CredentialRecord {
        let door = if door_allowed {
            DoorAccess::Open
        } else {
            DoorAccess::NotListed
        };
        CredentialRecord {
            credential_id: 7,
            person_id: "p-1".into(),
            card_format: CardFormat::H10301,
            facility_code: 12,
            card_number: 3456,
            valid_from: from,
            valid_until: until,
            door,
            state: CredentialState::Active,
        }
    }

    #[test]
    fn state_comes_first() {
        let mut r = rec(Some(100), Some(200), false);
        r.state = CredentialState::Suspended;
        assert_eq!(evaluate(Some(&r), 0), Decision::Deny(DenyReason::Suspended));
        r.state = CredentialState::Revoked;
        assert_eq!(evaluate(Some(&r), 150), Decision::Deny(DenyReason::Revoked));
        assert_eq!(DenyReason::Suspended.as_str(), "suspended");
        assert_eq!(DenyReason::Revoked.as_str(), "revoked");
    }

    #[test]
    fn unknown_key() {
        assert_eq!(evaluate(None, 0), Decision::Deny(DenyReason::UnknownKey));
    }

    #[test]
    fn open_window_grants_with_card_data() {
        let d = evaluate(Some(&rec(None, None, true)), 1_000);
        assert_eq!(
            d,
            Decision::Grant(Grant {
                credential_id: 7,
                person_id: "p-1".into(),
                card_format: CardFormat::H10301,
                facility_code: 12,
                card_number: 3456,
            })
        );
    }

    #[test]
    fn window_bounds_from_inclusive_until_exclusive() {
        let r = rec(Some(100), Some(200), true);
        assert_eq!(
            evaluate(Some(&r), 99),
            Decision::Deny(DenyReason::NotYetValid)
        );
        assert!(evaluate(Some(&r), 100).is_grant());
        assert!(evaluate(Some(&r), 199).is_grant());
        assert_eq!(evaluate(Some(&r), 200), Decision::Deny(DenyReason::Expired));
        assert_eq!(
            evaluate(Some(&r), i64::MAX),
            Decision::Deny(DenyReason::Expired)
        );
        assert_eq!(
            evaluate(Some(&r), i64::MIN),
            Decision::Deny(DenyReason::NotYetValid)
        );
    }

    #[test]
    fn time_is_checked_before_door() {
        assert_eq!(
            evaluate(Some(&rec(None, Some(10), false)), 10),
            Decision::Deny(DenyReason::Expired)
        );
        assert_eq!(
            evaluate(Some(&rec(Some(10), None, false)), 9),
            Decision::Deny(DenyReason::NotYetValid)
        );
        assert_eq!(
            evaluate(Some(&rec(None, None, false)), 9),
            Decision::Deny(DenyReason::WrongDoor)
        );
    }

    #[test]
    fn grant_encodes_its_card() {
        let Decision::Grant(g) = evaluate(Some(&rec(None, None, true)), 0) else {
            panic!("expected a grant");
        };
        let bits = g.wiegand().unwrap();
        assert_eq!(
            crate::card::decode(&bits).unwrap(),
            (CardFormat::H10301, 12, 3456)
        );
    }

    #[test]
    fn codes_are_stable() {
        assert_eq!(DenyReason::UnknownKey.as_str(), "unknown_key");
        assert_eq!(DenyReason::Expired.as_str(), "expired");
        assert_eq!(DenyReason::NotYetValid.as_str(), "not_yet_valid");
        assert_eq!(DenyReason::WrongDoor.as_str(), "wrong_door");
        assert_eq!(
            serde_json::to_string(&DenyReason::NotYetValid).unwrap(),
            "\"not_yet_valid\""
        );
    }
}
