//! Who is served over BLE (sans-IO): range and intent.
//!
//! A phone in a pocket across the hall must not open the door. Two modes:
//! - **tap**: the user taps the door in the app, which is intent; the phone is served at any
//!   signal strength (the app decides when to connect).
//! - **walk-up**: the phone connects by itself when it comes near. keyway serves it only when
//!   the signal it measured is at least the door's RSSI threshold; a phone whose RSSI is not
//!   known is refused (the safe side: unknown range is no evidence of presence at the door).
//!
//! RSSI 127 dBm is HCI's "not available" and counts as unknown.

/// How a phone shows intent (config `door.ble.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Tap,
    WalkUp,
}

/// The door's range policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub mode: Mode,
    /// Weakest signal served in walk-up mode (dBm).
    pub rssi_threshold_dbm: i16,
}

/// HCI's "RSSI not available".
pub const RSSI_UNAVAILABLE: i16 = 127;

/// Why a connection is not served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Walk-up mode and the phone is farther than the threshold.
    TooFar { rssi: i16, threshold: i16 },
    /// Walk-up mode and no RSSI is known for the phone.
    RssiUnknown,
}

impl Refusal {
    pub fn code(self) -> &'static str {
        match self {
            Refusal::TooFar { .. } => "ble_too_far",
            Refusal::RssiUnknown => "ble_rssi_unknown",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::TooFar { rssi, threshold } => {
                write!(
                    f,
                    "too far ({rssi} dBm, door needs {threshold} dBm or more)"
                )
            }
            Refusal::RssiUnknown => f.write_str("range unknown (no RSSI for the link)"),
        }
    }
}

impl Policy {
    /// Whether [`admit`](Self::admit) looks at the RSSI (so it is worth measuring).
    pub fn needs_rssi(&self) -> bool {
        self.mode == Mode::WalkUp
    }

    /// Whether a phone measured at `rssi` (dBm, if known) is served.
    pub fn admit(&self, rssi: Option<i16>) -> Result<(), Refusal> {
        match self.mode {
            Mode::Tap => Ok(()),
            Mode::WalkUp => match rssi.filter(|r| *r != RSSI_UNAVAILABLE) {
                None => Err(Refusal::RssiUnknown),
                Some(r) if r < self.rssi_threshold_dbm => Err(Refusal::TooFar {
                    rssi: r,
                    threshold: self.rssi_threshold_dbm,
                }),
                Some(_) => Ok(()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_serves_any_range_walk_up_needs_a_strong_known_signal() {
        let tap = Policy {
            mode: Mode::Tap,
            rssi_threshold_dbm: -60,
        };
        for rssi in [None, Some(-100), Some(-20), Some(RSSI_UNAVAILABLE)] {
            assert_eq!(tap.admit(rssi), Ok(()));
        }
        let walk = Policy {
            mode: Mode::WalkUp,
            rssi_threshold_dbm: -60,
        };
        assert_eq!(walk.admit(Some(-60)), Ok(()));
        assert_eq!(walk.admit(Some(-35)), Ok(()));
        assert_eq!(
            walk.admit(Some(-61)),
            Err(Refusal::TooFar {
                rssi: -61,
                threshold: -60
            })
        );
        assert_eq!(walk.admit(None), Err(Refusal::RssiUnknown));
        assert_eq!(
            walk.admit(Some(RSSI_UNAVAILABLE)),
            Err(Refusal::RssiUnknown)
        );
        assert_eq!(Refusal::RssiUnknown.code(), "ble_rssi_unknown");
        assert!(walk.needs_rssi() && !tap.needs_rssi());
        assert_eq!(
            Refusal::TooFar {
                rssi: -80,
                threshold: -70
            }
            .to_string(),
            "too far (-80 dBm, door needs -70 dBm or more)"
        );
    }
}
