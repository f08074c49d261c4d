//! ACL file import: a JSON or CSV file (docs/acl-format.md) streamed through the apply engine
//! ([`super::apply`]). The file is untrusted: its size is bounded, every record is validated as
//! it is read (see [`super::record`]), and the first bad record rejects the whole file with an
//! error naming its line. Records go to the engine's stage as they come, so memory does not
//! grow with the file; nothing reaches the live ACL before the whole file has been read and
//! checked, and a failed import leaves the previous ACL exactly as it was.

use super::apply::{ApplyError, ApplySummary, SnapshotApply};
use super::csv_file::read_csv;
use super::json_file::read_json;
pub use super::record::*;
use super::{Store, ENDPOINT_KEY_LEN};
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

/// Streams the validated credentials of `path` (`.json` or `.csv`) to `on_spec`; returns the
/// definitions (door groups, schedules, holidays) the file carries.
pub fn read_file(
    path: &Path,
    on_spec: impl FnMut(CredentialSpec) -> Result<(), ImportError>,
) -> Result<Definitions, ImportError> {
    let kind = FileKind::from_path(path).ok_or_else(|| ImportError::UnsupportedExtension {
        path: path.to_path_buf(),
    })?;
    let io = |source| ImportError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    if file.metadata().map_err(io)?.len() > MAX_FILE_BYTES {
        return Err(ImportError::TooLarge {
            path: path.to_path_buf(),
            max: MAX_FILE_BYTES,
        });
    }
    // `take` also bounds files whose size the metadata does not tell (pipes, growing files):
    // past the bound the reader ends, and the syntax error that follows is replaced by this.
    let reader = std::io::BufReader::with_capacity(64 * 1024, file.take(MAX_FILE_BYTES + 1));
    let counted = CountingReader {
        inner: reader,
        read: 0,
    };
    match kind {
        FileKind::Json => read_json(counted, path, on_spec),
        FileKind::Csv => read_csv(counted, path, on_spec).map(|()| Definitions::default()),
    }
}

/// Streams ACL content of `kind` from `input` into `apply` as it is read (a cloud snapshot
/// arriving in chunks: no file, no whole copy in memory); `path` names it in messages.
/// Returns how many records were staged.
pub fn stream_into(
    apply: &mut SnapshotApply<'_>,
    input: impl Read,
    kind: FileKind,
    path: &Path,
) -> Result<usize, ImportError> {
    let mut staged = 0usize;
    let push = |spec: CredentialSpec| {
        apply.push(&spec).map_err(|e| apply_error(e, path))?;
        staged += 1;
        Ok(())
    };
    let definitions = match kind {
        FileKind::Json => read_json(input, path, push)?,
        FileKind::Csv => {
            read_csv(input, path, push)?;
            Definitions::default()
        }
    };
    // Door groups, schedules and holidays go in with the credentials, as from a file.
    apply.define(definitions);
    Ok(staged)
}

/// Counts bytes so a file that grows past [`MAX_FILE_BYTES`] while being read is refused.
struct CountingReader<R> {
    inner: R,
    read: u64,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        if self.read > MAX_FILE_BYTES {
            return Err(std::io::Error::new(
                std::io::ErrorKind::FileTooLarge,
                format!("file is larger than the {MAX_FILE_BYTES} byte limit"),
            ));
        }
        Ok(n)
    }
}

/// Reads and validates a whole ACL file into memory without touching any database (small
/// files: tools and tests; an import streams instead).
pub fn load_file(path: &Path) -> Result<Vec<CredentialSpec>, ImportError> {
    let mut specs = Vec::new();
    read_file(path, |s| {
        specs.push(s);
        Ok(())
    })?;
    check_duplicates(&specs, path)?;
    Ok(specs)
}

/// An ACL read into memory: its definitions and credentials.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParsedAcl {
    pub definitions: Definitions,
    pub credentials: Vec<CredentialSpec>,
}

/// Parses and validates ACL file contents in memory; `path` is only used in messages.
pub fn parse_bytes(bytes: &[u8], kind: FileKind, path: &Path) -> Result<ParsedAcl, ImportError> {
    let mut specs = Vec::new();
    let push = |s| {
        specs.push(s);
        Ok(())
    };
    let definitions = match kind {
        FileKind::Json => read_json(bytes, path, push)?,
        FileKind::Csv => {
            read_csv(bytes, path, push)?;
            Definitions::default()
        }
    };
    check_duplicates(&specs, path)?;
    Ok(ParsedAcl {
        definitions,
        credentials: specs,
    })
}

fn check_duplicates(specs: &[CredentialSpec], path: &Path) -> Result<(), ImportError> {
    if specs.len() > MAX_CREDENTIALS {
        return Err(ImportError::TooManyCredentials {
            path: path.to_path_buf(),
            max: MAX_CREDENTIALS,
        });
    }
    // Keys are normalised already, so a compressed and an uncompressed spelling collide.
    let mut seen: HashMap<&[u8; ENDPOINT_KEY_LEN], u64> = HashMap::with_capacity(specs.len());
    let mut uids: HashMap<&[u8], u64> = HashMap::new();
    for s in specs {
        for u in &s.card_uids {
            if let Some(first) = uids.insert(u.as_slice(), s.line) {
                return Err(ImportError::Field {
                    path: path.to_path_buf(),
                    line: s.line,
                    field: "card_uids",
                    message: format!(
                        "card UID {} is already listed on line {first}",
                        hex::encode_upper(u)
                    ),
                });
            }
        }
        if let Some(first) = seen.insert(&s.endpoint_key, s.line) {
            return Err(ImportError::Field {
                path: path.to_path_buf(),
                line: s.line,
                field: "endpoint_key",
                message: format!("duplicate key, already listed on line {first}"),
            });
        }
    }
    Ok(())
}

/// The engine's error as an import error naming the file.
fn apply_error(e: ApplyError, path: &Path) -> ImportError {
    match e {
        ApplyError::Record {
            line,
            field,
            message,
        } => ImportError::Field {
            path: path.to_path_buf(),
            line,
            field,
            message,
        },
        ApplyError::TooMany { max } => ImportError::TooManyCredentials {
            path: path.to_path_buf(),
            max,
        },
        ApplyError::UnknownDoors(found) => ImportError::UnknownDoors {
            path: path.to_path_buf(),
            found,
        },
        other => ImportError::Apply {
            path: path.to_path_buf(),
            source: other,
        },
    }
}

impl From<ApplySummary> for ImportSummary {
    fn from(s: ApplySummary) -> Self {
        ImportSummary {
            mode: s.mode,
            credentials: s.credentials,
            inserted: s.inserted,
            updated: s.updated,
            removed: s.removed,
            unknown_doors: s.unknown_doors,
        }
    }
}

impl Store {
    /// Streams `path` (`.json` or `.csv`) through the apply engine: replace (the file becomes
    /// the ACL) or merge. On any error the stored ACL is unchanged.
    pub fn import_file(
        &mut self,
        path: &Path,
        mode: ImportMode,
    ) -> Result<ImportSummary, ImportError> {
        self.import_file_with(path, mode, &ImportOptions::default())
    }

    /// [`Store::import_file`] with the door check of `options`.
    pub fn import_file_with(
        &mut self,
        path: &Path,
        mode: ImportMode,
        options: &ImportOptions,
    ) -> Result<ImportSummary, ImportError> {
        let source = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut apply =
            SnapshotApply::begin(self, None, mode, &source).map_err(|e| apply_error(e, path))?;
        if let Some(known) = &options.known_doors {
            apply.check_doors(known.clone(), !options.allow_unknown_doors);
        }
        let definitions = read_file(path, |spec| {
            apply.push(&spec).map_err(|e| apply_error(e, path))
        })?;
        apply.define(definitions);
        Ok(apply.commit().map_err(|e| apply_error(e, path))?.into())
    }

    /// Applies already-validated credentials (tests, tools). `source` is recorded in `meta`.
    pub fn import_specs(
        &mut self,
        specs: &[CredentialSpec],
        mode: ImportMode,
        source: &str,
    ) -> Result<ImportSummary, ApplyError> {
        let mut apply = SnapshotApply::begin(self, None, mode, source)?;
        for s in specs {
            apply.push(s)?;
        }
        Ok(apply.commit()?.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "test.json";

    /// A valid uncompressed key: the P-256 generator G (04 || Gx || Gy, from SEC 2).
    const G_HEX: &str = "046b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c296\
                         4fe342e2fe1a7f9b8ee7eb4a7c0f9e162bce33576b315ececbb6406837bf51f5";

    fn csv(text: &str) -> Result<Vec<CredentialSpec>, ImportError> {
        parse_bytes(text.as_bytes(), FileKind::Csv, Path::new("t.csv")).map(|p| p.credentials)
    }

    #[test]
    fn json_lines_follow_the_text() {
        let obj = row(G_HEX);
        let obj2 = row(G2_HEX);
        let text = format!(
            "{{\n  \"version\": 1,\n  \"credentials\": [\n    {obj},\n\n    {obj2}\n  ]\n}}\n"
        );
        let specs = json(&text).unwrap();
        assert_eq!(specs.iter().map(|s| s.line).collect::<Vec<_>>(), vec![4, 6]);
        // A multi-line object is numbered by its first line.
        let text = format!(
            "{{\"version\": 1, \"credentials\": [\n{}]}}",
            obj.replace(",", ",\n")
        );
        assert_eq!(json(&text).unwrap()[0].line, 2);
    }

    #[test]
    fn csv_strict_records() {
        let h = CSV_COLUMNS.join(",");
        let good = format!("{G_HEX},\"x,\"\"y\"\"\",h10301,1,2,,,*");
        let specs = csv(&format!("{h}\r\n{good}\n\n")).unwrap();
        assert_eq!(specs[0].person_id, "x,\"y\"");
        assert_eq!(specs[0].line, 2);
        let multi =
            format!("{h}\n\n{G_HEX},\"multi\nline\",h10301,1,2,,,*\n{G2_HEX},q,h10301,1,2,,,*");
        let e = csv(&multi).unwrap_err();
        assert_eq!((e.line(), e.field()), (Some(3), Some("person_id")), "{e}");
        for (bad, line, needle) in [
            (
                format!("{h}\nx\"y,z\n"),
                2,
                "quote inside an unquoted field",
            ),
            (format!("{h}\n\"x\"y,z\n"), 2, "after a closing quote"),
            (format!("{h}\n{good}\n\"open,z\nmore\n"), 3, "never closed"),
            (format!("{h}\rc\n"), 1, "carriage return"),
            (
                format!("{h}\n{good}\n{}\n", "x".repeat(MAX_CSV_FIELD_BYTES + 1)),
                3,
                "longer than",
            ),
        ] {
            let e = csv(&bad).unwrap_err();
            assert_eq!(e.line(), Some(line), "{bad:?}: {e}");
            assert!(e.to_string().contains(needle), "{bad:?}: {e}");
        }
        // Invalid UTF-8 split across the guard's reads is still found, on its line.
        let mut bytes = format!("{h}\n{good}\n").into_bytes();
        bytes.extend_from_slice(b"\xff,\n");
        let e = parse_bytes(&bytes, FileKind::Csv, Path::new("t.csv")).unwrap_err();
        assert_eq!(e.line(), Some(3), "{e}");
        // A UTF-8 byte order mark is skipped.
        assert_eq!(csv(&format!("\u{feff}{h}\n{good}\n")).unwrap().len(), 1);
    }

    fn json(text: &str) -> Result<Vec<CredentialSpec>, ImportError> {
        parse_bytes(text.as_bytes(), FileKind::Json, Path::new(P)).map(|p| p.credentials)
    }

    fn row(key: &str) -> String {
        format!(
            r#"{{"endpoint_key":"{key}","person_id":"p","card_format":"h10301","facility_code":1,"card_number":2,"doors":["*"]}}"#
        )
    }

    /// A second valid key: 2G (SEC 2 test point), so two rows never collide.
    const G2_HEX: &str = "047cf27b188d034f7e8a52380304b51ac3c08969e277f21b35a60b48fc47669978\
                          07775510db8ed040293d9ac69f7430dbba7dade63ce982299e04b79d227873d1";

    #[test]
    fn card_uids_in_json_and_csv() {
        let with = |uids: &str| {
            format!(
                r#"{{"version":1,"credentials":[{{"endpoint_key":"{G_HEX}","person_id":"p","card_format":"h10301","facility_code":1,"card_number":2,"doors":["*"],"card_uids":{uids}}}]}}"#
            )
        };
        let specs = json(&with(r#"["04a1b2c3d4e5f6", "DEADBEEF"]"#)).unwrap();
        assert_eq!(
            specs[0].card_uids,
            vec![
                vec![0x04, 0xA1, 0xB2, 0xC3, 0xD4, 0xE5, 0xF6],
                vec![0xDE, 0xAD, 0xBE, 0xEF]
            ]
        );
        // Absent: no cards (files written before card_uids existed still import).
        assert!(json(&format!(
            r#"{{"version":1,"credentials":[{}]}}"#,
            row(G_HEX)
        ))
        .unwrap()[0]
            .card_uids
            .is_empty());
        for (bad, why) in [
            (r#"["0102"]"#, "not a card UID"),
            (r#"["0102030405"]"#, "not a card UID"),
            (r#"["zz010203"]"#, "not a card UID"),
            (r#"["01020304","01020304"]"#, "listed twice"),
            (r#""01020304""#, "array"),
            (r#"[1]"#, "strings"),
            (
                r#"["01020301","01020302","01020303","01020304","01020305","01020306","01020307","01020308","01020309"]"#,
                "more than 8",
            ),
        ] {
            let e = json(&with(bad)).unwrap_err();
            assert_eq!(e.field(), Some("card_uids"), "{bad}: {e}");
            assert!(e.to_string().contains(why), "{bad}: {e}");
        }
        // One UID on two credentials of the same file.
        let two = format!(
            r#"{{"version":1,"credentials":[
{{"endpoint_key":"{G_HEX}","person_id":"a","card_format":"h10301","facility_code":1,"card_number":2,"doors":["*"],"card_uids":["01020304"]}},
{{"endpoint_key":"{G2_HEX}","person_id":"b","card_format":"h10301","facility_code":1,"card_number":3,"doors":["*"],"card_uids":["01020304"]}}]}}"#
        );
        let e = json(&two).unwrap_err();
        assert_eq!((e.field(), e.line()), (Some("card_uids"), Some(3)), "{e}");

        let csv = |header: &str, row: &str| {
            parse_bytes(
                format!("{header}\n{row}\n").as_bytes(),
                FileKind::Csv,
                Path::new("t.csv"),
            )
            .map(|p| p.credentials)
        };
        let h = "endpoint_key,person_id,card_format,facility_code,card_number,valid_from,valid_until,doors";
        let specs = csv(
            &format!("{h},card_uids"),
            &format!("{G_HEX},p,h10301,1,2,,,*,01020304; 0a0b0c0d0e0f10"),
        )
        .unwrap();
        assert_eq!(specs[0].card_uids.len(), 2);
        assert_eq!(specs[0].card_uids[1], vec![10, 11, 12, 13, 14, 15, 16]);
        let specs = csv(h, &format!("{G_HEX},p,h10301,1,2,,,*")).unwrap();
        assert!(specs[0].card_uids.is_empty(), "the column is optional");
        let e = csv(
            &format!("{h},card_uids"),
            &format!("{G_HEX},p,h10301,1,2,,,*,0102"),
        )
        .unwrap_err();
        assert_eq!(e.field(), Some("card_uids"), "{e}");
    }

    #[test]
    fn json_structure_errors() {
        let ok = format!("{{\"credentials\": [{}],\n \"version\": 1}}", row(G_HEX));
        let specs = json(&ok).unwrap();
        assert_eq!(specs.len(), 1);
        assert_eq!(specs[0].doors, vec!["*"]);
        // Version after the credentials is still checked, and reported on its line.
        let e = json(&ok.replace("\"version\": 1", "\"version\": \"1\"")).unwrap_err();
        assert_eq!((e.line(), e.field()), (Some(2), Some("version")), "{e}");
        let e = json("{\"version\": 1, \"credentials\": [],\n\"version\": 1}").unwrap_err();
        assert!(e.to_string().contains("duplicate field `version`"), "{e}");
        assert_eq!(e.line(), Some(2));
        let e = json("{\"version\": 1, \"credentials\": []}\n\nx").unwrap_err();
        assert!(e.to_string().contains("trailing characters"), "{e}");
        assert_eq!(e.line(), Some(3));
        assert!(json("[]").is_err());
        assert!(json("{\"version\": 1}")
            .unwrap_err()
            .to_string()
            .contains("missing field `credentials`"));
        let e = json("{\"version\": 1, \"credentials\": [\n  5\n]}").unwrap_err();
        assert_eq!(e.line(), Some(2), "{e}");
        let e = json("{\"version\": 1, \"credentials\": {}}").unwrap_err();
        assert!(e.to_string().contains("expected an array"), "{e}");
        assert!(json("").is_err());
    }

    #[test]
    fn csv_row_width_is_bounded() {
        let text = format!("{}\n{}\n", CSV_COLUMNS.join(","), ",".repeat(100));
        let e = parse_bytes(text.as_bytes(), FileKind::Csv, Path::new("a.csv")).unwrap_err();
        assert!(e.to_string().contains("more than 64 fields"), "{e}");
        assert_eq!(e.line(), Some(2));
        let e = parse_bytes(b"", FileKind::Csv, Path::new("a.csv")).unwrap_err();
        assert!(e.to_string().contains("header"), "{e}");
        // A header alone is a valid, empty ACL.
        let h = CSV_COLUMNS.join(",");
        assert_eq!(
            parse_bytes(h.as_bytes(), FileKind::Csv, Path::new("a.csv"))
                .unwrap()
                .credentials
                .len(),
            0
        );
    }

    #[test]
    fn mangled_input_never_panics() {
        let json_text = format!(
            "{{\"version\": 1, \"credentials\": [\n{},\n{}\n]}}",
            row(G_HEX),
            row(&format!("03{}", &G_HEX[2..66])).replace("\"p\"", "\"q\\\"x\"")
        );
        let csv_text = format!(
            "{}\n{G_HEX},\"a \"\"b\"\"\",h10301,1,2,,,front;back\r\n",
            CSV_COLUMNS.join(",")
        );
        // Every prefix, and a deterministic sprinkle of byte substitutions.
        let mut seed: u32 = 0x1234_5678;
        for (kind, text) in [(FileKind::Json, &json_text), (FileKind::Csv, &csv_text)] {
            let bytes = text.as_bytes();
            for cut in 0..=bytes.len() {
                let _ = parse_bytes(&bytes[..cut], kind, Path::new(P));
            }
            for _ in 0..2000 {
                let mut m = bytes.to_vec();
                for _ in 0..3 {
                    seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    let pos = (seed >> 8) as usize % m.len();
                    let table: &[u8] = b"\"\\,{}[]:\n\r;0zx\xff";
                    m[pos] = table[(seed >> 24) as usize % table.len()];
                }
                let _ = parse_bytes(&m, kind, Path::new(P));
            }
        }
    }

    #[test]
    fn field_validators() {
        assert!(parse_endpoint_key(G_HEX).is_ok());
        // Compressed G: 03 because Gy is odd (...f5).
        let compressed = format!("03{}", &G_HEX[2..66]);
        assert_eq!(
            parse_endpoint_key(&compressed).ok(),
            parse_endpoint_key(G_HEX).ok()
        );
        // Flipping the last bit of Y takes the point off the curve.
        let off = format!("{}f4", &G_HEX[..128]);
        assert!(parse_endpoint_key(&off).is_err());
        assert!(parse_endpoint_key(&G_HEX[..128]).is_err());
        assert!(parse_endpoint_key(&format!("zz{}", &G_HEX[2..])).is_err());
        assert!(parse_person_id("").is_err());
        assert!(parse_person_id(" a").is_err());
        assert!(parse_person_id("a\u{7}").is_err());
        assert!(parse_person_id(&"x".repeat(129)).is_err());
        assert!(parse_person_id(&"x".repeat(128)).is_ok());
        assert!(parse_door("*").is_ok());
        assert!(parse_door("front-door.1").is_ok());
        assert!(parse_door("front door").is_err());
        assert!(parse_door("").is_err());
        assert!(parse_decimal("card_number", "-1").is_err());
        assert!(parse_decimal("card_number", "1.0").is_err());
        assert!(parse_decimal("card_number", "99999999999999999999999").is_err());
        assert_eq!(
            parse_time("valid_from", "1970-01-01T00:01:00Z").ok(),
            Some(60)
        );
        assert_eq!(
            parse_time("valid_from", "1970-01-01T01:01:00+01:00").ok(),
            Some(60)
        );
        assert!(parse_time("valid_from", "2026-02-30T00:00:00Z").is_err());
        assert!(parse_time("valid_from", "2026-01-01").is_err());
    }

    fn parse(text: &str, kind: FileKind) -> Result<ParsedAcl, ImportError> {
        parse_bytes(text.as_bytes(), kind, Path::new(P))
    }

    fn cred(doors: &str, extra: &str) -> String {
        format!(
            r#"{{"endpoint_key":"{G_HEX}","person_id":"p","card_format":"h10301","facility_code":1,"card_number":2,"doors":{doors}{extra}}}"#
        )
    }

    #[test]
    fn version_2_carries_definitions_states_and_scheduled_doors() {
        let text = format!(
            r#"{{
  "version": 2,
  "door_groups": {{"lobby": ["side", "front"]}},
  "schedules": {{"biz": {{"weekly": [{{"days": "mon-fri", "from": "08:00", "until": "18:00"}}],
                         "holidays": [{{"from": "09:00", "until": "12:00"}}]}}}},
  "holidays": ["2026-12-25", "2026-01-01"],
  "credentials": [
{}
  ]
}}"#,
            cred(r#"["@lobby=biz", "dock"]"#, r#","state":"suspended""#)
        );
        let p = parse(&text, FileKind::Json).unwrap();
        let d = &p.definitions;
        assert_eq!(
            d.door_groups.as_ref().unwrap()["lobby"],
            vec!["front".to_string(), "side".to_string()]
        );
        assert!(d.schedules.as_ref().unwrap().contains_key("biz"));
        assert_eq!(d.holidays.as_ref().unwrap().len(), 2);
        let c = &p.credentials[0];
        assert_eq!(c.doors, vec!["@lobby=biz".to_string(), "dock".to_string()]);
        assert_eq!(c.state, crate::acl::CredentialState::Suspended);
        assert_eq!(c.line, 8);
        // A version-2 file may carry no definitions at all: then it changes none.
        let p = parse(
            &format!(
                r#"{{"version":2,"credentials":[{}]}}"#,
                cred(r#"["*"]"#, "")
            ),
            FileKind::Json,
        )
        .unwrap();
        assert!(p.definitions.is_empty());
    }

    #[test]
    fn version_1_stays_version_1() {
        // The version-1 grammar: no groups, schedules or states...
        for (doors, extra, field, why) in [
            (r#"["@lobby"]"#, "", "doors", "may only contain"),
            (r#"["front=biz"]"#, "", "doors", "may only contain"),
            (
                r#"["front"]"#,
                r#","state":"revoked""#,
                "state",
                "needs version 2",
            ),
        ] {
            let text = format!(r#"{{"version":1,"credentials":[{}]}}"#, cred(doors, extra));
            let e = parse(&text, FileKind::Json).unwrap_err();
            assert_eq!(e.field(), Some(field), "{e}");
            assert!(e.to_string().contains(why), "{e}");
        }
        // ...nor definitions, and a definition section must come after "version": 2.
        for text in [
            r#"{"version":1,"schedules":{},"credentials":[]}"#,
            r#"{"schedules":{},"version":2,"credentials":[]}"#,
        ] {
            let e = parse(text, FileKind::Json).unwrap_err();
            assert!(
                e.to_string().contains("needs \"version\": 2 before it"),
                "{e}"
            );
        }
        let e = parse(r#"{"version":3,"credentials":[]}"#, FileKind::Json).unwrap_err();
        assert!(e.to_string().contains("unsupported version 3"), "{e}");
    }

    #[test]
    fn definition_errors_name_the_section_and_what_is_wrong() {
        for (section, value, why) in [
            ("door_groups", r#"{"a b": ["x"]}"#, "may only contain"),
            ("door_groups", r#"{"g": []}"#, "list 1 to"),
            ("door_groups", r#"{"g": ["x", "x"]}"#, "listed twice"),
            (
                "door_groups",
                r#"{"g": ["x"], "g": ["y"]}"#,
                "appears twice",
            ),
            (
                "schedules",
                r#"{"s": {"weekly": [{"days": "mon", "from": "8:00", "until": "18:00"}]}}"#,
                "window 1: '8:00' is not a time of day",
            ),
            (
                "schedules",
                r#"{"s": {"weekly": [{"days": "moon", "from": "08:00", "until": "18:00"}]}}"#,
                "not a day",
            ),
            (
                "schedules",
                r#"{"s": {"weekly": [{"days": "mon", "from": "08:00"}]}}"#,
                "'until' missing",
            ),
            (
                "schedules",
                r#"{"s": {"weekly": [], "holiday": []}}"#,
                "unknown field 'holiday'",
            ),
            (
                "schedules",
                r#"{"s": {"weekly": [{"days": "mon", "from": "08:00", "until": "18:00", "tz": "x"}]}}"#,
                "unknown field 'tz'",
            ),
            (
                "schedules",
                r#"{"s": {"holidays": "open"}}"#,
                "expected \"closed\"",
            ),
            ("holidays", r#"["2026-02-30"]"#, "not a date"),
            ("holidays", r#"["2026-1-1"]"#, "not a date"),
            (
                "holidays",
                r#"["2026-12-25", "2026-12-25"]"#,
                "listed twice",
            ),
        ] {
            let text = format!("{{\"version\": 2,\n\"{section}\": {value},\n\"credentials\": []}}");
            let e = parse(&text, FileKind::Json).unwrap_err();
            assert!(e.to_string().contains(why), "{section} {value}: {e}");
            assert_eq!(e.line(), Some(2), "{e}");
        }
        // Too big to hold: refused while parsing, before it is in memory.
        let huge = format!(
            r#"{{"version":2,"holidays":[{}],"credentials":[]}}"#,
            vec!["\"2026-01-01\""; 500_000].join(",")
        );
        let e = parse(&huge, FileKind::Json).unwrap_err();
        assert!(e.to_string().contains("definitions too large"), "{e}");
    }

    #[test]
    fn csv_reads_states_and_scheduled_doors() {
        let h = "endpoint_key,person_id,card_format,facility_code,card_number,valid_from,valid_until,doors,state";
        let p = parse(
            &format!("{h}\n{G_HEX},p,h10301,1,2,,,@lobby=biz; front,revoked\n"),
            FileKind::Csv,
        )
        .unwrap();
        let c = &p.credentials[0];
        assert_eq!(c.doors, vec!["@lobby=biz".to_string(), "front".to_string()]);
        assert_eq!(c.state, crate::acl::CredentialState::Revoked);
        for (doors, state, why) in [
            ("front;front=biz", "", "listed twice"),
            ("@a b", "", "may only contain"),
            ("front", "gone", "not a state"),
        ] {
            let e = parse(
                &format!("{h}\n{G_HEX},p,h10301,1,2,,,{doors},{state}\n"),
                FileKind::Csv,
            )
            .unwrap_err();
            assert!(e.to_string().contains(why), "{doors} {state}: {e}");
        }
    }
}
