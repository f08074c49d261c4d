//! Stable journald `MESSAGE_ID`s for every state that stops a door from serving phones.
//!
//! Generated once (random 128-bit) and never changed: scripts, alerting and the journal
//! catalog (`systemd/keyway.catalog`, installed to /usr/lib/systemd/catalog/ so `journalctl -x`
//! explains each one and what to do) key on them. Log with the `message_id` key-value pair,
//! which the journal logger turns into the `MESSAGE_ID` field:
//! `log::warn!(message_id = catalog::OSDP_OFFLINE, door = ...; "...")`.
//! Find them with `journalctl -t keyway MESSAGE_ID=<id>`.

/// A door's configured PC/SC reader is not connected (never found, or unplugged).
pub const READER_MISSING: &str = "7bcfabdf845844dbb233d33f464d704a";
/// pcscd cannot be reached: no NFC door works.
pub const PCSC_UNAVAILABLE: &str = "7c5a09ff8d8246d7a92a4e68d1bf139c";
/// The OSDP serial port cannot be opened or failed.
pub const SERIAL_PORT_FAILED: &str = "31725fa0ecef46c18e06f8df61a2b612";
/// The panel stopped polling a door's PD (OSDP offline): card reads cannot reach it.
pub const OSDP_OFFLINE: &str = "1966eed3afaf410e9a8a6f151d67ab71";
/// The panel's secure-channel handshake was refused (key mismatch, or SCBK-D outside install
/// mode), or the installed key could not be stored.
pub const SECURE_CHANNEL_REFUSED: &str = "223995afb3d242ebb6cccc866efdcfc6";
/// The reader certificate expires in under 30 days.
pub const CERTIFICATE_EXPIRING: &str = "3746a421469b42228b746c4580fd5d29";
/// The reader certificate has expired: phones refuse the reader.
pub const CERTIFICATE_EXPIRED: &str = "5a9e6679925748bfa8fdc5e85c1cd08b";
/// The ACL is older than its configured maximum age.
pub const ACL_STALE: &str = "165ec5c6e7e54792ace4293e4e3397cd";
/// The system clock is not set (before keyway was built): validity checks cannot be trusted.
pub const CLOCK_UNSET: &str = "acabffd82457414189e6d28a0ef4fedc";
/// The file system holding the database is nearly full.
pub const DISK_NEARLY_FULL: &str = "a4792670bed04ef99286fceedbf6ab8a";
/// A door, bus or store task ended unexpectedly.
pub const TASK_DIED: &str = "1456c92b1b2d490a8105eb38e7b7eb1d";
/// The database failed its integrity check at start: some credentials cannot be read.
pub const DATABASE_DAMAGED: &str = "de2db234a59a418291d5b65490cc51f2";
/// The database takes no writes (read-only file system, permissions, full disk): grants go
/// on, events are not stored.
pub const DATABASE_READ_ONLY: &str = "7be3eefd22e64729ab3f685bd68fdcd2";
/// An access event could not be stored.
pub const EVENT_NOT_STORED: &str = "0ca8bc80d4cb4e8cbe68d95d1c7fac9a";
/// keyway has been without the cloud for longer than a door's offline limit
/// (`cloud_offline`): a fail-secure door denies, another grants from a possibly stale ACL.
pub const CLOUD_OFFLINE: &str = "3053253b29604905b43014e0acc8eea1";

/// Every id with its constant's name, for the catalog check.
pub const ALL: [(&str, &str); 15] = [
    ("READER_MISSING", READER_MISSING),
    ("PCSC_UNAVAILABLE", PCSC_UNAVAILABLE),
    ("SERIAL_PORT_FAILED", SERIAL_PORT_FAILED),
    ("OSDP_OFFLINE", OSDP_OFFLINE),
    ("SECURE_CHANNEL_REFUSED", SECURE_CHANNEL_REFUSED),
    ("CERTIFICATE_EXPIRING", CERTIFICATE_EXPIRING),
    ("CERTIFICATE_EXPIRED", CERTIFICATE_EXPIRED),
    ("ACL_STALE", ACL_STALE),
    ("CLOCK_UNSET", CLOCK_UNSET),
    ("DISK_NEARLY_FULL", DISK_NEARLY_FULL),
    ("TASK_DIED", TASK_DIED),
    ("DATABASE_DAMAGED", DATABASE_DAMAGED),
    ("DATABASE_READ_ONLY", DATABASE_READ_ONLY),
    ("EVENT_NOT_STORED", EVENT_NOT_STORED),
    ("CLOUD_OFFLINE", CLOUD_OFFLINE),
];

#[cfg(test)]
mod tests {
    use super::*;

    const CATALOG: &str = include_str!("../../systemd/keyway.catalog");

    #[test]
    fn ids_are_unique_128_bit_hex_and_each_has_one_catalog_entry() {
        let mut seen = std::collections::BTreeSet::new();
        for (name, id) in ALL {
            assert_eq!(id.len(), 32, "{name}");
            assert!(
                id.chars()
                    .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()),
                "{name}"
            );
            assert!(seen.insert(id), "{name} repeats an id");
            let header = format!("-- {id}\n");
            assert_eq!(CATALOG.matches(&header).count(), 1, "{name}: catalog entry");
        }
        // No entry in the catalog that the code does not define.
        let entries = CATALOG.lines().filter(|l| l.starts_with("-- ")).count();
        assert_eq!(entries, ALL.len());
        // Every entry has a subject and says what to do.
        for block in CATALOG.split("\n-- ").skip(1) {
            assert!(block.contains("\nSubject: "), "{block}");
            assert!(block.contains("What to do"), "{block}");
        }
    }
}
