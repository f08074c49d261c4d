//! Integration tests of the ACL store: JSON/CSV import, rejection of malformed files with the
//! right line and no change to the stored ACL, Replace vs Merge, every decision outcome,
//! file permissions, and the access-event log record.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use keyway::acl::{fingerprint, AclError, Decision, DenyReason, ImportError, ImportMode, Store};
use keyway::card::CardFormat;
use keyway::events::{self, AccessEvent, EventDecision, Transport};
use p256::elliptic_curve::sec1::ToEncodedPoint;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use time::macros::datetime;

/// A valid P-256 public key derived from a small scalar; `compressed` picks the SEC1 form.
fn key(seed: u8, compressed: bool) -> Vec<u8> {
    let mut scalar = [0u8; 32];
    scalar[0] = 0x20;
    scalar[31] = seed;
    let sk = p256::SecretKey::from_slice(&scalar).unwrap();
    sk.public_key()
        .to_encoded_point(compressed)
        .as_bytes()
        .to_vec()
}

fn key_hex(seed: u8) -> String {
    hex::encode(key(seed, false))
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// One JSON credential object on a single line.
fn obj(key: &str, person: &str, fc: u64, cn: u64, extra: &str) -> String {
    format!(
        r#"{{"endpoint_key": "{key}", "person_id": "{person}", "card_format": "h10301", "facility_code": {fc}, "card_number": {cn}, "doors": ["front", "back"]{extra}}}"#
    )
}

/// A JSON file whose credential `i` starts on line `4 + i`.
fn json_file(objects: &[String]) -> String {
    let mut s = String::from("{\n  \"version\": 1,\n  \"credentials\": [\n");
    s.push_str(&objects.join(",\n"));
    s.push_str("\n  ]\n}\n");
    s
}

const CSV_HEADER: &str =
    "endpoint_key,person_id,card_format,facility_code,card_number,valid_from,valid_until,doors\n";

fn setup() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("db/keyway.sqlite")).unwrap();
    (dir, store)
}

/// Decisions that must hold after the "good" base ACL, and keep holding after a failed import.
fn assert_base_acl(store: &Store) {
    let now = datetime!(2026-06-01 12:00 UTC);
    match store.decide(&key(1, false), "front", now).unwrap() {
        Decision::Grant(g) => {
            assert_eq!(g.person_id, "alice");
            assert_eq!(g.card_format, CardFormat::H10301);
            assert_eq!((g.facility_code, g.card_number), (12, 3456));
        }
        other => panic!("expected grant, got {other:?}"),
    }
    assert!(store
        .decide(&key(2, false), "side", now)
        .unwrap()
        .is_grant());
    assert_eq!(
        store.decide(&key(3, false), "front", now).unwrap(),
        Decision::Deny(DenyReason::UnknownKey)
    );
    assert_eq!(store.stats().unwrap().credentials, 2);
}

fn import_base(dir: &Path, store: &mut Store) {
    let good = write(
        dir,
        "base.csv",
        &format!(
            "{CSV_HEADER}{},alice,h10301,12,3456,,,front;back\n{},bob,h10304,40000,500000,2026-01-01T00:00:00Z,2027-01-01T00:00:00+01:00,*\n",
            key_hex(1),
            key_hex(2)
        ),
    );
    let sum = store.import_file(&good, ImportMode::Replace).unwrap();
    assert_eq!((sum.credentials, sum.inserted), (2, 2));
    assert_base_acl(store);
}

fn expect_reject(
    store: &mut Store,
    path: &Path,
    line: u64,
    field: Option<&str>,
    needle: &str,
) -> ImportError {
    let err = store
        .import_file(path, ImportMode::Replace)
        .expect_err("malformed file must be rejected");
    let msg = err.to_string();
    assert_eq!(err.line(), Some(line), "{msg}");
    assert_eq!(err.field(), field, "{msg}");
    let expected_prefix = match field {
        Some(f) => format!("line {line}: field '{f}': "),
        None => format!("line {line}: "),
    };
    assert!(msg.contains(&expected_prefix), "{msg}");
    assert!(msg.contains(needle), "{msg:?} should mention {needle:?}");
    // The previous ACL is untouched.
    assert_base_acl(store);
    // Merge mode is just as atomic.
    assert!(store.import_file(path, ImportMode::Merge).is_err());
    assert_base_acl(store);
    err
}

#[test]
fn json_import_and_decisions() {
    let (dir, mut store) = setup();
    let compressed = hex::encode(key(2, true));
    let text = json_file(&[
        obj(&key_hex(1), "alice", 12, 3456, ""),
        obj(
            &compressed,
            "bob",
            1,
            2,
            r#", "valid_from": "2026-01-01T00:00:00Z", "valid_until": null"#,
        ),
    ]);
    let p = write(dir.path(), "acl.json", &text);
    let sum = store.import_file(&p, ImportMode::Replace).unwrap();
    assert_eq!(
        (sum.credentials, sum.inserted, sum.updated, sum.removed),
        (2, 2, 0, 0)
    );
    let now = datetime!(2026-03-01 00:00 UTC);
    assert!(store
        .decide(&key(1, false), "back", now)
        .unwrap()
        .is_grant());
    // A compressed key in the file matches the uncompressed key the phone presents.
    match store.decide(&key(2, false), "front", now).unwrap() {
        Decision::Grant(g) => assert_eq!((g.person_id.as_str(), g.card_number), ("bob", 2)),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        store
            .decide(&key(2, false), "front", datetime!(2025-12-31 23:59:59 UTC))
            .unwrap(),
        Decision::Deny(DenyReason::NotYetValid)
    );
}

#[test]
fn csv_import_with_quoting_bom_and_crlf() {
    let (dir, mut store) = setup();
    let text = format!(
        "\u{feff}{}\r\n{},\"Müller, Anna\",h10304,65535,524287,,2030-01-01T00:00:00Z,\"front; back\"\r\n\r\n",
        CSV_HEADER.trim_end(),
        key_hex(5)
    );
    let p = write(dir.path(), "acl.CSV", &text);
    let sum = store.import_file(&p, ImportMode::Merge).unwrap();
    assert_eq!(sum.inserted, 1);
    match store
        .decide(&key(5, false), "back", datetime!(2029-12-31 23:59:59 UTC))
        .unwrap()
    {
        Decision::Grant(g) => {
            assert_eq!(g.person_id, "Müller, Anna");
            assert_eq!(g.card_format, CardFormat::H10304);
            assert_eq!((g.facility_code, g.card_number), (65535, 524_287));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        store
            .decide(&key(5, false), "back", datetime!(2030-01-01 00:00 UTC))
            .unwrap(),
        Decision::Deny(DenyReason::Expired)
    );
}

#[test]
fn malformed_csv_files_are_rejected_with_line_and_acl_untouched() {
    let (dir, mut store) = setup();
    import_base(dir.path(), &mut store);
    let good_row = |seed: u8| format!("{},p{seed},h10301,1,{seed},,,front\n", key_hex(seed));
    let csv = |bad_row: String| format!("{CSV_HEADER}{}{}{bad_row}", good_row(10), good_row(11));

    // Bad hex on line 4 (header = line 1).
    let bad_hex = format!("{}zz", &key_hex(12)[..128]);
    let p = write(
        dir.path(),
        "a.csv",
        &csv(format!("{bad_hex},p,h10301,1,1,,,front\n")),
    );
    expect_reject(&mut store, &p, 4, Some("endpoint_key"), "not hex");

    // A well-formed point that is not on the curve (last bit of Y flipped).
    let mut off = key(12, false);
    off[64] ^= 1;
    let p = write(
        dir.path(),
        "b.csv",
        &csv(format!("{},p,h10301,1,1,,,front\n", hex::encode(off))),
    );
    expect_reject(&mut store, &p, 4, Some("endpoint_key"), "P-256");

    let p = write(
        dir.path(),
        "c.csv",
        &csv(format!(
            "{},p,h10301,1,1,2026-13-01T00:00:00Z,,front\n",
            key_hex(12)
        )),
    );
    expect_reject(&mut store, &p, 4, Some("valid_from"), "RFC 3339");

    let p = write(
        dir.path(),
        "d.csv",
        &csv(format!("{},p,wiegand26,1,1,,,front\n", key_hex(12))),
    );
    expect_reject(
        &mut store,
        &p,
        4,
        Some("card_format"),
        "unknown card format",
    );

    let p = write(
        dir.path(),
        "e.csv",
        &csv(format!("{},p,h10301,256,1,,,front\n", key_hex(12))),
    );
    expect_reject(&mut store, &p, 4, Some("facility_code"), "maximum 255");

    let p = write(
        dir.path(),
        "f.csv",
        &csv(format!("{},p,h10304,1,524288,,,front\n", key_hex(12))),
    );
    expect_reject(&mut store, &p, 4, Some("card_number"), "maximum 524287");

    // The same key as line 2, spelled compressed.
    let p = write(
        dir.path(),
        "g.csv",
        &csv(format!(
            "{},p,h10301,1,1,,,front\n",
            hex::encode(key(10, true))
        )),
    );
    expect_reject(&mut store, &p, 4, Some("endpoint_key"), "line 2");

    // Text after a closing quote.
    let p = write(
        dir.path(),
        "h.csv",
        &csv(format!("{},\"p\"x,h10301,1,1,,,front\n", key_hex(12))),
    );
    expect_reject(&mut store, &p, 4, None, "closing quote");

    // A quote never closed: reported where the field opened.
    let p = write(
        dir.path(),
        "i.csv",
        &csv(format!(
            "{},\"p,h10301,1,1,,,front\n{}",
            key_hex(12),
            good_row(13)
        )),
    );
    expect_reject(&mut store, &p, 4, None, "never closed");

    let p = write(
        dir.path(),
        "j.csv",
        &csv(format!("{},p,h10301,1,1,,front\n", key_hex(12))),
    );
    expect_reject(&mut store, &p, 4, None, "expected 8 fields, found 7");

    let p = write(
        dir.path(),
        "k.csv",
        &csv(format!("{},p,h10301,1,1,,,\n", key_hex(12))),
    );
    expect_reject(&mut store, &p, 4, Some("doors"), "at least one door");

    let p = write(
        dir.path(),
        "l.csv",
        &csv(format!(
            "{},p,h10301,1,1,2026-02-01T00:00:00Z,2026-01-01T00:00:00Z,front\n",
            key_hex(12)
        )),
    );
    expect_reject(
        &mut store,
        &p,
        4,
        Some("valid_until"),
        "later than valid_from",
    );

    let p = write(
        dir.path(),
        "m.csv",
        &csv(format!("{},p\u{1b}[31m,h10301,1,1,,,front\n", key_hex(12))),
    );
    expect_reject(&mut store, &p, 4, Some("person_id"), "control character");

    let p = write(dir.path(), "n.csv", "endpoint_key,person_id\n");
    expect_reject(&mut store, &p, 1, None, "missing column 'card_format'");
}

#[test]
fn malformed_json_files_are_rejected_with_line_and_acl_untouched() {
    let (dir, mut store) = setup();
    import_base(dir.path(), &mut store);
    let good = |seed: u8| obj(&key_hex(seed), &format!("p{seed}"), 1, u64::from(seed), "");
    let file = |bad: String| json_file(&[good(10), good(11), bad]);

    // The third object starts on line 6.
    let p = write(dir.path(), "a.json", &file(obj("04zz", "p", 1, 1, "")));
    expect_reject(&mut store, &p, 6, Some("endpoint_key"), "hex digits");

    let mut off = key(12, false);
    off[64] ^= 1;
    let p = write(
        dir.path(),
        "b.json",
        &file(obj(&hex::encode(off), "p", 1, 1, "")),
    );
    expect_reject(&mut store, &p, 6, Some("endpoint_key"), "P-256");

    let p = write(
        dir.path(),
        "c.json",
        &file(obj(
            &key_hex(12),
            "p",
            1,
            1,
            r#", "valid_until": "tomorrow""#,
        )),
    );
    expect_reject(&mut store, &p, 6, Some("valid_until"), "RFC 3339");

    let p = write(
        dir.path(),
        "d.json",
        &file(obj(&key_hex(12), "p", 1, 1, "").replace("h10301", "H10301")),
    );
    expect_reject(
        &mut store,
        &p,
        6,
        Some("card_format"),
        "unknown card format",
    );

    let p = write(
        dir.path(),
        "e.json",
        &file(obj(&key_hex(12), "p", 300, 1, "")),
    );
    expect_reject(&mut store, &p, 6, Some("facility_code"), "maximum 255");

    let p = write(
        dir.path(),
        "f.json",
        &file(obj(&key_hex(12), "p", 1, 1 << 40, "")),
    );
    expect_reject(&mut store, &p, 6, Some("card_number"), "maximum 65535");

    let p = write(
        dir.path(),
        "g.json",
        &file(obj(&key_hex(10), "again", 1, 1, "")),
    );
    expect_reject(
        &mut store,
        &p,
        6,
        Some("endpoint_key"),
        "already listed on line 4",
    );

    let p = write(
        dir.path(),
        "h.json",
        &file(obj(&key_hex(12), "p", 1, 1, "").replace(": 1,", ": \"1\",")),
    );
    expect_reject(
        &mut store,
        &p,
        6,
        Some("facility_code"),
        "expected a number",
    );

    // A multi-line object: the error is in a later line, the object starts on line 6.
    let multi = format!(
        "{{\n      \"endpoint_key\": \"{}\",\n      \"person_id\": \"p\",\n      \"card_format\": \"h10301\",\n      \"facility_code\": 1,\n      \"card_number\": -5,\n      \"doors\": [\"front\"]\n    }}",
        key_hex(12)
    );
    let p = write(dir.path(), "i.json", &file(multi));
    expect_reject(
        &mut store,
        &p,
        6,
        Some("card_number"),
        "non-negative integer",
    );

    // Truncated JSON: serde_json reports the end of input (line 6, where the text stops).
    let full = file(good(12));
    let cut = &full[..full.find("\"card_number\": 12").unwrap()];
    let p = write(dir.path(), "j.json", cut);
    expect_reject(&mut store, &p, 6, None, "EOF");

    // A misspelt field is not silently ignored.
    let p = write(
        dir.path(),
        "k.json",
        &file(obj(&key_hex(12), "p", 1, 1, r#", "valid_untill": null"#)),
    );
    expect_reject(&mut store, &p, 6, None, "unknown field `valid_untill`");

    let p = write(
        dir.path(),
        "l.json",
        &json_file(&[good(12)]).replace("\"version\": 1", "\"version\": 3"),
    );
    expect_reject(&mut store, &p, 2, Some("version"), "unsupported version 3");
}

#[test]
fn unreadable_and_oversized_files_are_rejected() {
    let (dir, mut store) = setup();
    import_base(dir.path(), &mut store);
    let p = write(dir.path(), "acl.txt", "x");
    assert!(matches!(
        store.import_file(&p, ImportMode::Replace),
        Err(ImportError::UnsupportedExtension { .. })
    ));
    let p = dir.path().join("missing.json");
    assert!(matches!(
        store.import_file(&p, ImportMode::Replace),
        Err(ImportError::Io { .. })
    ));
    // Sparse file just over the limit: refused from its size, without reading it.
    let p = dir.path().join("huge.json");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(keyway::acl::import::MAX_FILE_BYTES + 1).unwrap();
    assert!(matches!(
        store.import_file(&p, ImportMode::Replace),
        Err(ImportError::TooLarge { .. })
    ));
    let p = write(dir.path(), "bin.csv", "endpoint_key\n\u{0}\n");
    assert!(store.import_file(&p, ImportMode::Replace).is_err());
    // Invalid UTF-8 is reported on its line (after a valid header: errors come in file order).
    std::fs::write(&p, [CSV_HEADER.as_bytes(), b"\xff\xfe\n"].concat()).unwrap();
    let e = store.import_file(&p, ImportMode::Replace).unwrap_err();
    assert_eq!(e.line(), Some(2), "{e}");
    assert_base_acl(&store);
}

#[test]
fn replace_versus_merge() {
    let (dir, mut store) = setup();
    import_base(dir.path(), &mut store);
    let now = datetime!(2026-06-01 12:00 UTC);
    // Merge: key 1 updated (new card number, door list), key 3 added, key 2 kept.
    let merge = write(
        dir.path(),
        "merge.csv",
        &format!(
            "{CSV_HEADER}{},alice,h10301,12,9999,,,side\n{},carol,h10301,1,1,,,front\n",
            key_hex(1),
            key_hex(3)
        ),
    );
    let sum = store.import_file(&merge, ImportMode::Merge).unwrap();
    assert_eq!((sum.inserted, sum.updated, sum.removed), (1, 1, 0));
    assert_eq!(store.stats().unwrap().credentials, 3);
    assert_eq!(
        store.decide(&key(1, false), "front", now).unwrap(),
        Decision::Deny(DenyReason::WrongDoor)
    );
    match store.decide(&key(1, false), "side", now).unwrap() {
        Decision::Grant(g) => assert_eq!(g.card_number, 9999),
        other => panic!("{other:?}"),
    }
    assert!(store
        .decide(&key(2, false), "side", now)
        .unwrap()
        .is_grant());
    assert!(store
        .decide(&key(3, false), "front", now)
        .unwrap()
        .is_grant());

    // Replace: only key 3 remains.
    let only3 = write(
        dir.path(),
        "only3.json",
        &json_file(&[obj(&key_hex(3), "carol", 1, 1, "")]),
    );
    let sum = store.import_file(&only3, ImportMode::Replace).unwrap();
    assert_eq!((sum.inserted, sum.updated, sum.removed), (0, 1, 2));
    let st = store.stats().unwrap();
    assert_eq!((st.credentials, st.door_grants), (1, 2));
    assert_eq!(
        store.decide(&key(1, false), "side", now).unwrap(),
        Decision::Deny(DenyReason::UnknownKey)
    );
    assert!(store
        .decide(&key(3, false), "back", now)
        .unwrap()
        .is_grant());
    let li = st.last_import.unwrap();
    assert_eq!(
        (li.source.as_str(), li.mode.as_str(), li.count),
        ("only3.json", "replace", 1)
    );

    // An empty file in Replace mode empties the ACL (explicitly allowed: revoke everyone).
    let empty = write(
        dir.path(),
        "empty.json",
        "{\"version\": 1, \"credentials\": []}",
    );
    let sum = store.import_file(&empty, ImportMode::Replace).unwrap();
    assert_eq!(sum.removed, 1);
    assert_eq!(store.stats().unwrap().credentials, 0);
}

#[test]
fn every_deny_reason_with_controlled_time() {
    let (dir, mut store) = setup();
    let p = write(
        dir.path(),
        "acl.json",
        &json_file(&[obj(
            &key_hex(7),
            "dave",
            5,
            6,
            r#", "valid_from": "2026-01-01T00:00:00Z", "valid_until": "2026-02-01T00:00:00Z""#,
        )
        .replace(r#"["front", "back"]"#, r#"["lab"]"#)]),
    );
    store.import_file(&p, ImportMode::Replace).unwrap();
    let k = key(7, false);
    let cases = [
        (
            datetime!(2025-12-31 23:59:59 UTC),
            "lab",
            Some(DenyReason::NotYetValid),
        ),
        (datetime!(2026-01-01 00:00:00 UTC), "lab", None),
        (datetime!(2026-01-31 23:59:59 UTC), "lab", None),
        (
            datetime!(2026-02-01 00:00:00 UTC),
            "lab",
            Some(DenyReason::Expired),
        ),
        (
            datetime!(2026-01-15 00:00:00 UTC),
            "front",
            Some(DenyReason::WrongDoor),
        ),
        // The same instant written in another offset.
        (datetime!(2026-02-01 00:59:59 +01:00), "lab", None),
    ];
    for (now, door, want) in cases {
        let got = store.decide(&k, door, now).unwrap();
        match want {
            Some(r) => assert_eq!(got, Decision::Deny(r), "{now} {door}"),
            None => assert!(got.is_grant(), "{now} {door}: {got:?}"),
        }
    }
    assert_eq!(
        store
            .decide(&key(8, false), "lab", datetime!(2026-01-15 00:00 UTC))
            .unwrap(),
        Decision::Deny(DenyReason::UnknownKey)
    );
    let codes: Vec<&str> = [
        DenyReason::UnknownKey,
        DenyReason::Expired,
        DenyReason::NotYetValid,
        DenyReason::WrongDoor,
    ]
    .iter()
    .map(|r| r.as_str())
    .collect();
    assert_eq!(
        codes,
        ["unknown_key", "expired", "not_yet_valid", "wrong_door"]
    );
}

#[test]
fn new_database_is_private_wal_and_persistent() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state/sub/keyway.sqlite");
    {
        let mut store = Store::open(&db).unwrap();
        let p = write(
            dir.path(),
            "acl.json",
            &json_file(&[obj(&key_hex(1), "alice", 12, 3456, "")]),
        );
        store.import_file(&p, ImportMode::Replace).unwrap();
        // SQLite's side files get the database file's mode while the store is open.
        for side in ["keyway.sqlite-wal", "keyway.sqlite-shm"] {
            let m = std::fs::metadata(db.with_file_name(side)).unwrap();
            assert_eq!(m.permissions().mode() & 0o777, 0o600, "{side}");
        }
    }
    let mode = std::fs::metadata(&db).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "database mode {mode:o}");
    let dir_mode = std::fs::metadata(db.parent().unwrap())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(dir_mode & 0o077, 0, "directory mode {dir_mode:o}");

    let raw = rusqlite::Connection::open(&db).unwrap();
    let jm: String = raw
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(jm, "wal");
    let uv: i64 = raw
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(uv, keyway::acl::SCHEMA_VERSION);
    drop(raw);

    let store = Store::open(&db).unwrap();
    assert!(store
        .decide(&key(1, false), "front", datetime!(2026-01-01 00:00 UTC))
        .unwrap()
        .is_grant());

    // A pre-existing world-readable file is tightened.
    let loose = dir.path().join("loose.sqlite");
    std::fs::write(&loose, b"").unwrap();
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
    Store::open(&loose).unwrap();
    let mode = std::fs::metadata(&loose).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("k.sqlite");
    drop(Store::open(&db).unwrap());
    let raw = rusqlite::Connection::open(&db).unwrap();
    raw.pragma_update(None, "user_version", 99).unwrap();
    drop(raw);
    let err = Store::open(&db).unwrap_err();
    assert!(
        matches!(err, AclError::SchemaTooNew { found: 99, .. }),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------
// The access log record, captured with a test logger (this test binary owns the logger).

/// (level, target, message, key-value pairs) of one captured record.
type Captured = (log::Level, String, String, Vec<(String, String)>);

struct Capture(std::sync::Mutex<Vec<Captured>>);

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        struct Collect(Vec<(String, String)>);
        impl<'kvs> log::kv::VisitSource<'kvs> for Collect {
            fn visit_pair(
                &mut self,
                key: log::kv::Key<'kvs>,
                value: log::kv::Value<'kvs>,
            ) -> Result<(), log::kv::Error> {
                self.0.push((key.to_string(), value.to_string()));
                Ok(())
            }
        }
        let mut kv = Collect(Vec::new());
        record.key_values().visit(&mut kv).unwrap();
        self.0.lock().unwrap().push((
            record.level(),
            record.target().to_string(),
            record.args().to_string(),
            kv.0,
        ));
    }
    fn flush(&self) {}
}

static CAPTURE: Capture = Capture(std::sync::Mutex::new(Vec::new()));

#[test]
fn access_event_is_recorded_and_logged_once_with_fields() {
    log::set_logger(&CAPTURE).unwrap();
    log::set_max_level(log::LevelFilter::Info);
    let (dir, mut store) = setup();
    import_base(dir.path(), &mut store);
    let k = key(1, false);
    let decision = store
        .decide(&k, "front", datetime!(2026-06-01 12:00 UTC))
        .unwrap();
    let ev = AccessEvent::from_decision(
        events::unix_ms(datetime!(2026-06-01 12:00 UTC)),
        "front",
        Transport::Nfc,
        &k,
        &decision,
        120,
    );
    let id = store.record_event(&ev).unwrap();
    CAPTURE.0.lock().unwrap().clear();
    events::log_event(&ev, id);
    let logged = CAPTURE.0.lock().unwrap().clone();
    let access: Vec<_> = logged
        .iter()
        .filter(|r| r.1 == events::LOG_TARGET)
        .collect();
    assert_eq!(access.len(), 1, "{logged:?}");
    let (level, _, message, kv) = access[0];
    assert_eq!(*level, log::Level::Info);
    assert!(
        message.starts_with("access granted door=front"),
        "{message}"
    );
    let get = |k: &str| kv.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
    assert_eq!(get("door"), Some("front"));
    assert_eq!(get("decision"), Some("granted"));
    assert_eq!(get("reason"), Some("granted"));
    assert_eq!(get("person"), Some("alice"));
    assert_eq!(get("transport"), Some("nfc"));
    assert_eq!(get("latency_ms"), Some("120"));
    assert_eq!(get("event_id"), Some(id.to_string().as_str()));
    let fp = fingerprint(&k);
    assert_eq!(get("fingerprint"), Some(fp.as_str()));
    // Never the key itself, nor the card number.
    let all = format!("{message} {kv:?}");
    assert!(!all.contains(&hex::encode(&k)[..20]), "{all}");
    assert!(!all.contains("3456"), "{all}");

    let stored = store.recent_events(1).unwrap();
    assert_eq!(stored[0].id, id);
    assert_eq!(stored[0].event.decision, EventDecision::Granted);
    assert_eq!(stored[0].event.person_id.as_deref(), Some("alice"));

    // Errors are logged at warn, without absent fields.
    let err = AccessEvent::error(1, "front", Transport::Ble, None, "auth_failed", 9);
    CAPTURE.0.lock().unwrap().clear();
    events::log_event(&err, 2);
    let logged: Vec<_> = CAPTURE
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.1 == events::LOG_TARGET)
        .cloned()
        .collect();
    assert_eq!(logged.len(), 1);
    assert_eq!(logged[0].0, log::Level::Warn);
    assert!(logged[0]
        .3
        .iter()
        .all(|(k, _)| k != "person" && k != "fingerprint"));
}

/// The fenced block of `lang` in docs/acl-format.md, so the documented examples stay true.
fn doc_block(lang: &str) -> String {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/acl-format.md"))
        .unwrap();
    let start = doc.find(&format!("```{lang}\n")).unwrap() + lang.len() + 4;
    let len = doc[start..].find("```").unwrap();
    doc[start..start + len].to_string()
}

#[test]
fn documented_examples_behave_as_documented() {
    let (dir, mut store) = setup();
    // Both examples list one key twice (uncompressed and compressed): refused as documented.
    for (name, text) in [
        ("doc.json", doc_block("json")),
        ("doc.csv", doc_block("csv")),
    ] {
        let p = write(dir.path(), name, &text);
        let e = store.import_file(&p, ImportMode::Replace).unwrap_err();
        assert_eq!(e.field(), Some("endpoint_key"), "{e}");
        assert!(e.to_string().contains("duplicate key"), "{e}");
    }
    // Without the second row the CSV example imports, and the generator key opens "front".
    let csv = doc_block("csv");
    let first_two: Vec<&str> = csv.lines().take(2).collect();
    let p = write(dir.path(), "doc1.csv", &first_two.join("\n"));
    store.import_file(&p, ImportMode::Replace).unwrap();
    let g = p256::AffinePoint::GENERATOR.to_encoded_point(false);
    match store
        .decide(g.as_bytes(), "lab-2", datetime!(2026-01-01 00:00 UTC))
        .unwrap()
    {
        Decision::Grant(grant) => {
            assert_eq!(grant.person_id, "E-10442");
            assert_eq!((grant.facility_code, grant.card_number), (123, 4567));
        }
        other => panic!("{other:?}"),
    }
}
