//! ACL file import: parsing and validating the documented JSON and CSV formats
//! (docs/acl-format.md) into [`CredentialSpec`]s, and writing them in one transaction.
//!
//! The file is untrusted: its size is bounded, every field is length-checked and validated,
//! and the first bad row rejects the whole file with an error naming its line. Nothing is
//! written until the whole file has been validated, and the write is a single transaction,
//! so a failed import leaves the previous ACL exactly as it was.

use super::{normalize_endpoint_key, Store, ENDPOINT_KEY_LEN};
use crate::card::CardFormat;
use serde::de::Error as _;
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Largest accepted ACL file. JSON is parsed in memory; 64 MiB holds several hundred
/// thousand credentials while staying well inside a Raspberry Pi's RAM.
pub const MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;
/// Most credentials accepted in one file.
pub const MAX_CREDENTIALS: usize = 250_000;
/// Longest accepted `person_id`, in bytes.
pub const MAX_PERSON_ID_BYTES: usize = 128;
/// Longest accepted door id, in bytes.
pub const MAX_DOOR_ID_BYTES: usize = 64;
/// Most doors one credential may list.
pub const MAX_DOORS_PER_CREDENTIAL: usize = 256;
/// Most fields in one CSV row (bounds memory on a line of commas).
pub const MAX_CSV_FIELDS: usize = 64;
/// Longest accepted CSV field, in bytes (a full door list fits).
pub const MAX_CSV_FIELD_BYTES: usize = 20 * 1024;
/// The only JSON `version` this build reads.
pub const JSON_FORMAT_VERSION: u64 = 1;
/// CSV columns, in the documented order (any order is accepted).
pub const CSV_COLUMNS: [&str; 8] = [
    "endpoint_key",
    "person_id",
    "card_format",
    "facility_code",
    "card_number",
    "valid_from",
    "valid_until",
    "doors",
];
/// Optional CSV columns: accepted when present, empty when absent.
pub const CSV_OPTIONAL_COLUMNS: [&str; 1] = ["card_uids"];

/// How an import combines with the credentials already stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImportMode {
    /// The file becomes the whole ACL: credentials absent from it are removed.
    Replace,
    /// Credentials in the file are inserted or updated (by endpoint key); others stay.
    Merge,
}

impl ImportMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ImportMode::Replace => "replace",
            ImportMode::Merge => "merge",
        }
    }
}

/// File syntax, chosen by extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Json,
    Csv,
}

impl FileKind {
    /// `.json` or `.csv` (case-insensitive); anything else is `None`.
    pub fn from_path(path: &Path) -> Option<FileKind> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "json" => Some(FileKind::Json),
            "csv" => Some(FileKind::Csv),
            _ => None,
        }
    }
}

/// What an import did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ImportSummary {
    pub mode: ImportMode,
    /// Credentials in the file.
    pub credentials: usize,
    /// New endpoint keys added.
    pub inserted: usize,
    /// Existing endpoint keys whose row was rewritten.
    pub updated: usize,
    /// Stored credentials removed because the file (Replace mode) did not list them.
    pub removed: usize,
}

/// One validated credential from a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialSpec {
    /// Line where the row (CSV) or object (JSON) starts, for messages.
    pub line: u64,
    /// Uncompressed SEC1 point `04 || X || Y`, validated to be on P-256.
    pub endpoint_key: [u8; ENDPOINT_KEY_LEN],
    pub person_id: String,
    pub card_format: CardFormat,
    pub facility_code: u32,
    pub card_number: u32,
    /// Unix seconds, inclusive.
    pub valid_from: Option<i64>,
    /// Unix seconds, exclusive.
    pub valid_until: Option<i64>,
    /// Door ids, or `["*"]`; non-empty, no duplicates.
    pub doors: Vec<String>,
    /// UIDs of the person's physical cards (4, 7 or 10 bytes each; at most
    /// [`super::cards::MAX_UIDS_PER_CREDENTIAL`]), used at doors that accept cards. Optional.
    pub card_uids: Vec<Vec<u8>>,
}

/// Why an ACL file was rejected. Every message names the file and, where one applies, the line.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{}: cannot read: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: file is larger than the {max} byte limit", path.display())]
    TooLarge { path: PathBuf, max: u64 },
    #[error("{}: unsupported file type (the name must end in .json or .csv)", path.display())]
    UnsupportedExtension { path: PathBuf },
    #[error("{}: more than {max} credentials", path.display())]
    TooManyCredentials { path: PathBuf, max: usize },
    /// The file is not well-formed JSON/CSV, or its structure is wrong.
    #[error("{}: line {line}: {message}", path.display())]
    Syntax {
        path: PathBuf,
        line: u64,
        message: String,
    },
    /// A field holds an invalid value.
    #[error("{}: line {line}: field '{field}': {message}", path.display())]
    Field {
        path: PathBuf,
        line: u64,
        field: &'static str,
        message: String,
    },
    #[error("{}: writing the ACL failed, nothing was changed: {source}", path.display())]
    Database {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
}

impl ImportError {
    /// The file line the error points at, if any.
    pub fn line(&self) -> Option<u64> {
        match self {
            ImportError::Syntax { line, .. } | ImportError::Field { line, .. } => Some(*line),
            _ => None,
        }
    }

    /// The field the error is about, if any.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            ImportError::Field { field, .. } => Some(field),
            _ => None,
        }
    }
}

/// A field-level problem before the line and path are attached.
struct FieldError {
    field: &'static str,
    message: String,
}

fn ferr(field: &'static str, message: impl Into<String>) -> FieldError {
    FieldError {
        field,
        message: message.into(),
    }
}

/// Reads and validates an ACL file without touching any database.
pub fn load_file(path: &Path) -> Result<Vec<CredentialSpec>, ImportError> {
    let kind = FileKind::from_path(path).ok_or_else(|| ImportError::UnsupportedExtension {
        path: path.to_path_buf(),
    })?;
    let io = |source| ImportError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let too_large = || ImportError::TooLarge {
        path: path.to_path_buf(),
        max: MAX_FILE_BYTES,
    };
    if file.metadata().map_err(io)?.len() > MAX_FILE_BYTES {
        return Err(too_large());
    }
    // `take` also bounds files whose size the metadata does not tell (pipes, growing files).
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(too_large());
    }
    parse_bytes(&bytes, kind, path)
}

/// Parses and validates ACL file contents; `path` is only used in messages.
pub fn parse_bytes(
    bytes: &[u8],
    kind: FileKind,
    path: &Path,
) -> Result<Vec<CredentialSpec>, ImportError> {
    let text = utf8_text(bytes, path)?;
    let specs = match kind {
        FileKind::Json => parse_json(text, path)?,
        FileKind::Csv => parse_csv(text, path)?,
    };
    check_duplicates(&specs, path)?;
    Ok(specs)
}

fn utf8_text<'a>(bytes: &'a [u8], path: &Path) -> Result<&'a str, ImportError> {
    // A UTF-8 byte order mark (spreadsheet exports) is not part of the content.
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    std::str::from_utf8(bytes).map_err(|e| {
        let good = bytes.get(..e.valid_up_to()).unwrap_or_default();
        ImportError::Syntax {
            path: path.to_path_buf(),
            line: 1 + good.iter().filter(|&&b| b == b'\n').count() as u64,
            message: "invalid UTF-8".into(),
        }
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

// ---------------------------------------------------------------------------------------
// Field validation shared by both syntaxes.

fn parse_endpoint_key(s: &str) -> Result<[u8; ENDPOINT_KEY_LEN], FieldError> {
    const F: &str = "endpoint_key";
    // 130 hex digits is the longest valid spelling; refuse to decode anything longer.
    if s.len() != 2 * ENDPOINT_KEY_LEN && s.len() != 66 {
        return Err(ferr(
            F,
            format!(
                "expected 130 hex digits (04||X||Y) or 66 (02/03||X), got {} characters",
                s.chars().count()
            ),
        ));
    }
    let raw = hex::decode(s).map_err(|e| ferr(F, format!("not hex: {e}")))?;
    normalize_endpoint_key(&raw).map_err(|m| ferr(F, m))
}

fn parse_person_id(s: &str) -> Result<String, FieldError> {
    const F: &str = "person_id";
    if s.is_empty() {
        return Err(ferr(F, "must not be empty"));
    }
    if s.len() > MAX_PERSON_ID_BYTES {
        return Err(ferr(F, format!("longer than {MAX_PERSON_ID_BYTES} bytes")));
    }
    if s.chars().any(char::is_control) {
        return Err(ferr(F, "contains a control character"));
    }
    if s.trim() != s {
        return Err(ferr(F, "has leading or trailing whitespace"));
    }
    Ok(s.to_owned())
}

fn parse_card_format(s: &str) -> Result<CardFormat, FieldError> {
    s.parse::<CardFormat>()
        .map_err(|e| ferr("card_format", e.to_string()))
}

fn parse_decimal(field: &'static str, s: &str) -> Result<u64, FieldError> {
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ferr(
            field,
            format!("'{}' is not a non-negative integer", truncate(s)),
        ));
    }
    s.parse::<u64>()
        .map_err(|_| ferr(field, format!("'{}' is out of range", truncate(s))))
}

fn parse_time(field: &'static str, s: &str) -> Result<i64, FieldError> {
    if s.len() > 64 {
        return Err(ferr(field, "longer than 64 characters"));
    }
    OffsetDateTime::parse(s, &Rfc3339)
        .map(|t| t.unix_timestamp())
        .map_err(|e| {
            ferr(
                field,
                format!(
                    "'{}' is not an RFC 3339 time like 2026-01-31T08:00:00Z: {e}",
                    truncate(s)
                ),
            )
        })
}

fn parse_door(s: &str) -> Result<String, FieldError> {
    const F: &str = "doors";
    if s == super::ALL_DOORS {
        return Ok(s.to_owned());
    }
    if s.is_empty() {
        return Err(ferr(F, "empty door id"));
    }
    if s.len() > MAX_DOOR_ID_BYTES {
        return Err(ferr(
            F,
            format!("door id longer than {MAX_DOOR_ID_BYTES} bytes"),
        ));
    }
    if !s.bytes().all(is_door_byte) {
        return Err(ferr(
            F,
            format!(
                "door id '{}' may only contain A-Z a-z 0-9 . _ - : (or be \"*\" for all doors)",
                truncate(s)
            ),
        ));
    }
    Ok(s.to_owned())
}

/// Door ids are plain tokens so they are safe in logs, journald fields and MQTT topics.
pub fn is_door_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':')
}

fn truncate(s: &str) -> String {
    // Echo at most 40 characters of a bad value, without control characters.
    let mut out: String = s
        .chars()
        .take(40)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if s.chars().count() > 40 {
        out.push('…');
    }
    out
}

/// The raw fields of one row, as text, before validation.
#[derive(Default)]
struct RawRow<'a> {
    endpoint_key: Option<&'a str>,
    person_id: Option<&'a str>,
    card_format: Option<&'a str>,
    facility_code: Option<u64>,
    card_number: Option<u64>,
    valid_from: Option<&'a str>,
    valid_until: Option<&'a str>,
    doors: Vec<&'a str>,
    card_uids: Vec<&'a str>,
}

fn required<T>(v: Option<T>, field: &'static str) -> Result<T, FieldError> {
    v.ok_or_else(|| ferr(field, "missing"))
}

fn validate_row(raw: RawRow<'_>, line: u64) -> Result<CredentialSpec, FieldError> {
    let endpoint_key = parse_endpoint_key(required(raw.endpoint_key, "endpoint_key")?)?;
    let person_id = parse_person_id(required(raw.person_id, "person_id")?)?;
    let card_format = parse_card_format(required(raw.card_format, "card_format")?)?;
    let fc = required(raw.facility_code, "facility_code")?;
    let max_fc = card_format.max_facility_code();
    let facility_code = u32::try_from(fc)
        .ok()
        .filter(|&v| v <= max_fc)
        .ok_or_else(|| {
            ferr(
                "facility_code",
                format!("{fc} is larger than the {card_format} maximum {max_fc}"),
            )
        })?;
    let cn = required(raw.card_number, "card_number")?;
    let max_cn = card_format.max_card_number();
    let card_number = u32::try_from(cn)
        .ok()
        .filter(|&v| v <= max_cn)
        .ok_or_else(|| {
            ferr(
                "card_number",
                format!("{cn} is larger than the {card_format} maximum {max_cn}"),
            )
        })?;
    let valid_from = raw
        .valid_from
        .map(|s| parse_time("valid_from", s))
        .transpose()?;
    let valid_until = raw
        .valid_until
        .map(|s| parse_time("valid_until", s))
        .transpose()?;
    if let (Some(from), Some(until)) = (valid_from, valid_until) {
        if until <= from {
            return Err(ferr("valid_until", "must be later than valid_from"));
        }
    }
    if raw.doors.is_empty() {
        return Err(ferr(
            "doors",
            "must list at least one door id (or \"*\" for all doors)",
        ));
    }
    if raw.doors.len() > MAX_DOORS_PER_CREDENTIAL {
        return Err(ferr(
            "doors",
            format!("more than {MAX_DOORS_PER_CREDENTIAL} doors"),
        ));
    }
    let mut doors: Vec<String> = Vec::with_capacity(raw.doors.len());
    for d in raw.doors {
        let d = parse_door(d)?;
        if doors.contains(&d) {
            return Err(ferr("doors", format!("door '{d}' is listed twice")));
        }
        doors.push(d);
    }
    let card_uids = parse_card_uids(&raw.card_uids)?;
    Ok(CredentialSpec {
        line,
        endpoint_key,
        person_id,
        card_format,
        facility_code,
        card_number,
        valid_from,
        valid_until,
        doors,
        card_uids,
    })
}

fn parse_card_uids(raw: &[&str]) -> Result<Vec<Vec<u8>>, FieldError> {
    const F: &str = "card_uids";
    use super::cards::{is_valid_uid, MAX_UIDS_PER_CREDENTIAL};
    if raw.len() > MAX_UIDS_PER_CREDENTIAL {
        return Err(ferr(
            F,
            format!("more than {MAX_UIDS_PER_CREDENTIAL} card UIDs"),
        ));
    }
    let mut out: Vec<Vec<u8>> = Vec::with_capacity(raw.len());
    for s in raw {
        let t = s.trim();
        let uid = hex::decode(t)
            .ok()
            .filter(|u| is_valid_uid(u))
            .ok_or_else(|| {
                ferr(
                    F,
                    format!(
                        "'{}' is not a card UID (8, 14 or 20 hex digits)",
                        truncate(t)
                    ),
                )
            })?;
        if out.contains(&uid) {
            return Err(ferr(F, format!("card UID {} is listed twice", t)));
        }
        out.push(uid);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// JSON: { "version": 1, "credentials": [ { ... }, ... ] }

/// Every field is a raw value so type errors are reported by us, naming the field; serde
/// still rejects unknown and duplicate fields (a typo like `valid_untill` must not be
/// silently ignored).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonCredential {
    endpoint_key: Option<serde_json::Value>,
    person_id: Option<serde_json::Value>,
    card_format: Option<serde_json::Value>,
    facility_code: Option<serde_json::Value>,
    card_number: Option<serde_json::Value>,
    valid_from: Option<serde_json::Value>,
    valid_until: Option<serde_json::Value>,
    doors: Option<serde_json::Value>,
    card_uids: Option<serde_json::Value>,
}

fn json_str<'a>(
    v: &'a Option<serde_json::Value>,
    field: &'static str,
) -> Result<Option<&'a str>, FieldError> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ferr(field, "expected a string")),
    }
}

fn json_uint(
    v: &Option<serde_json::Value>,
    field: &'static str,
) -> Result<Option<u64>, FieldError> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::Number(n)) => n
            .as_u64()
            .map(Some)
            .ok_or_else(|| ferr(field, format!("{n} is not a non-negative integer"))),
        Some(_) => Err(ferr(field, "expected a number")),
    }
}

fn json_row(c: &JsonCredential) -> Result<RawRow<'_>, FieldError> {
    let doors = match &c.doors {
        None | Some(serde_json::Value::Null) => Vec::new(),
        Some(serde_json::Value::Array(items)) => {
            if items.len() > MAX_DOORS_PER_CREDENTIAL {
                return Err(ferr(
                    "doors",
                    format!("more than {MAX_DOORS_PER_CREDENTIAL} doors"),
                ));
            }
            items
                .iter()
                .map(|d| d.as_str().ok_or_else(|| ferr("doors", "expected strings")))
                .collect::<Result<Vec<_>, _>>()?
        }
        Some(_) => return Err(ferr("doors", "expected an array of door ids")),
    };
    let card_uids = match &c.card_uids {
        None | Some(serde_json::Value::Null) => Vec::new(),
        Some(serde_json::Value::Array(items)) => {
            if items.len() > super::cards::MAX_UIDS_PER_CREDENTIAL {
                return Err(ferr(
                    "card_uids",
                    format!(
                        "more than {} card UIDs",
                        super::cards::MAX_UIDS_PER_CREDENTIAL
                    ),
                ));
            }
            items
                .iter()
                .map(|d| {
                    d.as_str()
                        .ok_or_else(|| ferr("card_uids", "expected strings"))
                })
                .collect::<Result<Vec<_>, _>>()?
        }
        Some(_) => return Err(ferr("card_uids", "expected an array of hex UIDs")),
    };
    Ok(RawRow {
        endpoint_key: json_str(&c.endpoint_key, "endpoint_key")?,
        person_id: json_str(&c.person_id, "person_id")?,
        card_format: json_str(&c.card_format, "card_format")?,
        facility_code: json_uint(&c.facility_code, "facility_code")?,
        card_number: json_uint(&c.card_number, "card_number")?,
        valid_from: json_str(&c.valid_from, "valid_from")?,
        valid_until: json_str(&c.valid_until, "valid_until")?,
        doors,
        card_uids,
    })
}

fn parse_json(text: &str, path: &Path) -> Result<Vec<CredentialSpec>, ImportError> {
    // Element lines come from a cheap pre-scan; elements are then validated one by one as
    // serde streams them, so memory holds the validated specs, never a whole JSON tree.
    let mut ctx = JsonCtx {
        path,
        text,
        lines: credential_lines(text),
        specs: Vec::new(),
        failure: None,
        version_ok: false,
    };
    let mut de = serde_json::Deserializer::from_str(text);
    let parsed = TopSeed(&mut ctx)
        .deserialize(&mut de)
        .and_then(|()| de.end());
    if let Err(e) = parsed {
        // Our own (row or version) error wins over the placeholder serde carried out.
        return Err(ctx.failure.take().unwrap_or_else(|| ImportError::Syntax {
            path: path.to_path_buf(),
            line: e.line() as u64,
            message: serde_message(&e),
        }));
    }
    Ok(ctx.specs)
}

/// State shared by the streaming JSON visitors.
struct JsonCtx<'a> {
    path: &'a Path,
    text: &'a str,
    lines: Vec<u64>,
    specs: Vec<CredentialSpec>,
    /// The real error when a visitor aborts serde with a placeholder.
    failure: Option<ImportError>,
    version_ok: bool,
}

impl JsonCtx<'_> {
    /// Stashes `e` and returns the placeholder that makes serde stop.
    fn fail<E: serde::de::Error>(&mut self, e: ImportError) -> E {
        self.failure = Some(e);
        E::custom("rejected")
    }

    fn check_version(&mut self, v: &serde_json::Value) -> Result<(), ImportError> {
        if v.as_u64() == Some(JSON_FORMAT_VERSION) {
            self.version_ok = true;
            return Ok(());
        }
        Err(ImportError::Field {
            path: self.path.to_path_buf(),
            line: key_line(self.text, "version").unwrap_or(1),
            field: "version",
            message: format!(
                "unsupported version {} (this keyway reads {JSON_FORMAT_VERSION})",
                truncate(&v.to_string())
            ),
        })
    }
}

/// The top-level object: exactly `version` and `credentials`, each once.
struct TopSeed<'c, 'a>(&'c mut JsonCtx<'a>);

impl<'de> DeserializeSeed<'de> for TopSeed<'_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for TopSeed<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an object with \"version\" and \"credentials\"")
    }

    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<(), M::Error> {
        const FIELDS: &[&str] = &["version", "credentials"];
        let (mut version_seen, mut credentials_seen) = (false, false);
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "version" => {
                    if std::mem::replace(&mut version_seen, true) {
                        return Err(M::Error::duplicate_field("version"));
                    }
                    let v: serde_json::Value = map.next_value()?;
                    if let Err(e) = self.0.check_version(&v) {
                        return Err(self.0.fail(e));
                    }
                }
                "credentials" => {
                    if std::mem::replace(&mut credentials_seen, true) {
                        return Err(M::Error::duplicate_field("credentials"));
                    }
                    map.next_value_seed(CredentialsSeed(&mut *self.0))?;
                }
                other => return Err(M::Error::unknown_field(other, FIELDS)),
            }
        }
        if !version_seen {
            return Err(M::Error::missing_field("version"));
        }
        if !credentials_seen {
            return Err(M::Error::missing_field("credentials"));
        }
        Ok(())
    }
}

/// The `credentials` array: each element is validated as soon as it is parsed.
struct CredentialsSeed<'c, 'a>(&'c mut JsonCtx<'a>);

impl<'de> DeserializeSeed<'de> for CredentialsSeed<'_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for CredentialsSeed<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an array of credential objects")
    }

    fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<(), S::Error> {
        let ctx = self.0;
        while let Some(c) = seq.next_element::<JsonCredential>()? {
            if ctx.specs.len() >= MAX_CREDENTIALS {
                let e = ImportError::TooManyCredentials {
                    path: ctx.path.to_path_buf(),
                    max: MAX_CREDENTIALS,
                };
                return Err(ctx.fail(e));
            }
            // The scanner sees the same elements serde does; the fallback is never expected.
            let line = ctx.lines.get(ctx.specs.len()).copied().unwrap_or(1);
            match json_row(&c).and_then(|raw| validate_row(raw, line)) {
                Ok(spec) => ctx.specs.push(spec),
                Err(e) => {
                    let e = ImportError::Field {
                        path: ctx.path.to_path_buf(),
                        line,
                        field: e.field,
                        message: e.message,
                    };
                    return Err(ctx.fail(e));
                }
            }
        }
        Ok(())
    }
}

/// serde_json's message without its " at line L column C" suffix (we print the line ourselves).
fn serde_message(e: &serde_json::Error) -> String {
    let full = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    full.strip_suffix(&suffix).unwrap_or(&full).to_owned()
}

/// A minimal scan of JSON text for line numbers. It runs before serde and tolerates invalid
/// input (never panics); past a syntax error its lines may be off, but then serde's syntax
/// error is what gets reported.
struct JsonScan<'a> {
    text: &'a str,
}

impl<'a> JsonScan<'a> {
    /// Calls `visit` for every object key, value start, opening and closing bracket.
    fn walk(&self, mut visit: impl FnMut(ScanItem<'a>)) {
        let bytes = self.text.as_bytes();
        let mut line: u64 = 1;
        let mut depth: u32 = 0;
        let mut i = 0usize;
        while let Some(&b) = bytes.get(i) {
            match b {
                b'\n' => line += 1,
                b'"' => {
                    let start = i;
                    i += 1;
                    // Skip to the closing quote; escapes never contain a raw newline.
                    while let Some(&c) = bytes.get(i) {
                        match c {
                            b'\\' => i += 1,
                            b'"' => break,
                            _ => {}
                        }
                        i += 1;
                    }
                    let raw = self.text.get(start..=i).unwrap_or_default();
                    // A string followed by ':' is a key.
                    let mut j = i + 1;
                    while bytes.get(j).is_some_and(|c| c.is_ascii_whitespace()) {
                        j += 1;
                    }
                    if bytes.get(j) == Some(&b':') {
                        visit(ScanItem::Key { depth, raw, line });
                    } else {
                        visit(ScanItem::Value { depth, line });
                    }
                }
                b'{' | b'[' => {
                    visit(ScanItem::Value { depth, line });
                    depth = depth.saturating_add(1);
                    visit(ScanItem::Open { depth, bracket: b });
                }
                b'}' | b']' => {
                    visit(ScanItem::Close { depth });
                    depth = depth.saturating_sub(1);
                }
                c if c.is_ascii_whitespace() || c == b',' || c == b':' => {}
                _ => {
                    // Start (or continuation) of a number/true/false/null literal.
                    let prev = i.checked_sub(1).and_then(|p| bytes.get(p));
                    let continues = prev.is_some_and(|p| {
                        !p.is_ascii_whitespace() && !matches!(p, b',' | b':' | b'[' | b'{')
                    });
                    if !continues {
                        visit(ScanItem::Value { depth, line });
                    }
                }
            }
            i += 1;
        }
    }
}

enum ScanItem<'a> {
    /// An object key (raw, with quotes) at `depth` (1 = top-level object).
    Key { depth: u32, raw: &'a str, line: u64 },
    /// The first byte of a value found at `depth` (the container it sits in).
    Value { depth: u32, line: u64 },
    /// After an opening bracket; `depth` is the new depth.
    Open { depth: u32, bracket: u8 },
    /// A closing bracket; `depth` is the depth being closed.
    Close { depth: u32 },
}

fn decode_key(raw: &str) -> Option<String> {
    serde_json::from_str::<String>(raw).ok()
}

/// Line of a top-level key, for messages about top-level fields.
fn key_line(text: &str, name: &str) -> Option<u64> {
    let mut found = None;
    JsonScan { text }.walk(|item| {
        if let ScanItem::Key {
            depth: 1,
            raw,
            line,
        } = item
        {
            if found.is_none() && decode_key(raw).as_deref() == Some(name) {
                found = Some(line);
            }
        }
    });
    found
}

/// Starting line of each element of the top-level `credentials` array, in order.
fn credential_lines(text: &str) -> Vec<u64> {
    let mut lines = Vec::new();
    // Whether the last top-level key was "credentials" and its value has not started yet.
    let mut pending_key = false;
    let mut in_array = false;
    JsonScan { text }.walk(|item| match item {
        ScanItem::Key { depth: 1, raw, .. } => {
            pending_key = decode_key(raw).as_deref() == Some("credentials");
        }
        ScanItem::Open { depth: 2, bracket } => {
            in_array = pending_key && bracket == b'[';
            pending_key = false;
        }
        ScanItem::Value { depth: 2, line } if in_array => lines.push(line),
        ScanItem::Close { depth: 2 } => in_array = false,
        ScanItem::Key { .. }
        | ScanItem::Value { .. }
        | ScanItem::Open { .. }
        | ScanItem::Close { .. } => {}
    });
    lines
}

// ---------------------------------------------------------------------------------------
// CSV: RFC 4180, header row, strict quoting.

struct CsvRecord {
    line: u64,
    fields: Vec<String>,
}

fn csv_syntax(path: &Path, line: u64, message: impl Into<String>) -> ImportError {
    ImportError::Syntax {
        path: path.to_path_buf(),
        line,
        message: message.into(),
    }
}

/// Splits CSV text into records. Strict: a quote may only open a field, a quoted field must
/// be followed by a delimiter or line end, and a bare CR is an error. Blank lines are skipped.
fn csv_records(
    text: &str,
    path: &Path,
    mut on_record: impl FnMut(CsvRecord) -> Result<(), ImportError>,
) -> Result<(), ImportError> {
    let mut chars = text.chars().peekable();
    let mut line: u64 = 1;
    let mut fields: Vec<String> = Vec::new();
    let mut field = String::new();
    let mut record_line = line;
    // Whether anything (even an empty quoted field) was read for the current record.
    let mut record_started = false;
    let push_char = |field: &mut String, c: char, line: u64| -> Result<(), ImportError> {
        if field.len() + c.len_utf8() > MAX_CSV_FIELD_BYTES {
            return Err(csv_syntax(
                path,
                line,
                format!("field longer than {MAX_CSV_FIELD_BYTES} bytes"),
            ));
        }
        field.push(c);
        Ok(())
    };
    loop {
        // At the start of a field.
        let mut quoted = false;
        if chars.peek() == Some(&'"') {
            chars.next();
            quoted = true;
            record_started = true;
            let open_line = line;
            loop {
                match chars.next() {
                    None => {
                        return Err(csv_syntax(path, open_line, "quoted field is never closed"))
                    }
                    Some('"') => {
                        if chars.peek() == Some(&'"') {
                            chars.next();
                            push_char(&mut field, '"', line)?;
                        } else {
                            break;
                        }
                    }
                    Some(c) => {
                        if c == '\n' {
                            line += 1;
                        }
                        push_char(&mut field, c, line)?;
                    }
                }
            }
        }
        // Unquoted content, or what follows a closing quote, up to the delimiter.
        let end_of_record;
        loop {
            match chars.next() {
                None => {
                    end_of_record = true;
                    break;
                }
                Some(',') => {
                    record_started = true;
                    end_of_record = false;
                    break;
                }
                Some('\n') => {
                    end_of_record = true;
                    line += 1;
                    break;
                }
                Some('\r') => {
                    if chars.next() != Some('\n') {
                        return Err(csv_syntax(
                            path,
                            line,
                            "carriage return not followed by a line feed",
                        ));
                    }
                    end_of_record = true;
                    line += 1;
                    break;
                }
                Some(c) if quoted => {
                    return Err(csv_syntax(
                        path,
                        line,
                        format!("unexpected '{}' after a closing quote (quotes inside a quoted field are written \"\")", truncate(&c.to_string())),
                    ));
                }
                Some('"') => {
                    return Err(csv_syntax(
                        path,
                        line,
                        "quote inside an unquoted field (quote the whole field and double the quote)",
                    ));
                }
                Some(c) => {
                    record_started = true;
                    push_char(&mut field, c, line)?;
                }
            }
        }
        if fields.len() >= MAX_CSV_FIELDS {
            return Err(csv_syntax(
                path,
                line,
                format!("more than {MAX_CSV_FIELDS} fields in one row"),
            ));
        }
        fields.push(std::mem::take(&mut field));
        if end_of_record {
            if record_started {
                on_record(CsvRecord {
                    line: record_line,
                    fields: std::mem::take(&mut fields),
                })?;
            } else {
                fields.clear();
            }
            record_started = false;
            record_line = line;
            if chars.peek().is_none() {
                break;
            }
        }
    }
    Ok(())
}

fn parse_csv(text: &str, path: &Path) -> Result<Vec<CredentialSpec>, ImportError> {
    let mut columns: Option<CsvColumns> = None;
    let mut specs = Vec::new();
    csv_records(text, path, |rec| match &columns {
        None => {
            columns = Some(csv_header(&rec, path)?);
            Ok(())
        }
        Some(cols) => {
            if specs.len() >= MAX_CREDENTIALS {
                return Err(ImportError::TooManyCredentials {
                    path: path.to_path_buf(),
                    max: MAX_CREDENTIALS,
                });
            }
            specs.push(csv_row(cols, &rec, path)?);
            Ok(())
        }
    })?;
    if columns.is_none() {
        return Err(csv_syntax(path, 1, "empty file: expected a header row"));
    }
    Ok(specs)
}

/// Column index of each known name, and the row width.
struct CsvColumns {
    index: HashMap<&'static str, usize>,
    width: usize,
}

/// Any column order; each known column exactly once; nothing unknown.
fn csv_header(header: &CsvRecord, path: &Path) -> Result<CsvColumns, ImportError> {
    let mut index: HashMap<&'static str, usize> = HashMap::new();
    for (i, name) in header.fields.iter().enumerate() {
        let Some(&known) = CSV_COLUMNS
            .iter()
            .chain(CSV_OPTIONAL_COLUMNS.iter())
            .find(|&&c| c == name.trim())
        else {
            return Err(csv_syntax(
                path,
                header.line,
                format!(
                    "unknown column '{}' (expected: {})",
                    truncate(name),
                    CSV_COLUMNS.join(",")
                ),
            ));
        };
        if index.insert(known, i).is_some() {
            return Err(csv_syntax(
                path,
                header.line,
                format!("column '{known}' appears twice"),
            ));
        }
    }
    if let Some(missing) = CSV_COLUMNS.iter().find(|c| !index.contains_key(*c)) {
        return Err(csv_syntax(
            path,
            header.line,
            format!("missing column '{missing}'"),
        ));
    }
    Ok(CsvColumns {
        index,
        width: header.fields.len(),
    })
}

fn csv_row(cols: &CsvColumns, rec: &CsvRecord, path: &Path) -> Result<CredentialSpec, ImportError> {
    if rec.fields.len() != cols.width {
        return Err(csv_syntax(
            path,
            rec.line,
            format!("expected {} fields, found {}", cols.width, rec.fields.len()),
        ));
    }
    let get = |name: &str| -> &str {
        cols.index
            .get(name)
            .and_then(|&i| rec.fields.get(i))
            .map(String::as_str)
            .unwrap_or_default()
    };
    let non_empty = |s: &'static str| -> Option<&str> { Some(get(s)).filter(|v| !v.is_empty()) };
    let line = rec.line;
    let to_import = |e: FieldError| ImportError::Field {
        path: path.to_path_buf(),
        line,
        field: e.field,
        message: e.message,
    };
    let facility_code = non_empty("facility_code")
        .map(|s| parse_decimal("facility_code", s))
        .transpose()
        .map_err(to_import)?;
    let card_number = non_empty("card_number")
        .map(|s| parse_decimal("card_number", s))
        .transpose()
        .map_err(to_import)?;
    let doors_field = get("doors");
    let doors = if doors_field.trim().is_empty() {
        Vec::new()
    } else {
        doors_field.split(';').map(str::trim).collect()
    };
    let uids_field = get("card_uids");
    let card_uids = if uids_field.trim().is_empty() {
        Vec::new()
    } else {
        uids_field.split(';').map(str::trim).collect()
    };
    let raw = RawRow {
        endpoint_key: non_empty("endpoint_key"),
        person_id: non_empty("person_id"),
        card_format: non_empty("card_format"),
        facility_code,
        card_number,
        valid_from: non_empty("valid_from"),
        valid_until: non_empty("valid_until"),
        doors,
        card_uids,
    };
    validate_row(raw, line).map_err(to_import)
}

// ---------------------------------------------------------------------------------------
// Writing.

impl Store {
    /// Validates `path` (`.json` or `.csv`) completely, then applies it in one transaction.
    /// On any error the stored ACL is unchanged.
    pub fn import_file(
        &mut self,
        path: &Path,
        mode: ImportMode,
    ) -> Result<ImportSummary, ImportError> {
        let specs = load_file(path)?;
        let source = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.import_specs(&specs, mode, &source)
            .map_err(|source| ImportError::Database {
                path: path.to_path_buf(),
                source,
            })
    }

    /// Applies already-validated credentials in one transaction. `source` is recorded in
    /// `meta` (e.g. the file name).
    pub fn import_specs(
        &mut self,
        specs: &[CredentialSpec],
        mode: ImportMode,
        source: &str,
    ) -> Result<ImportSummary, rusqlite::Error> {
        let tx = self.conn.transaction()?;
        let summary = write_specs(&tx, specs, mode, source)?;
        tx.commit()?;
        Ok(summary)
    }
}

/// The body of [`Store::import_specs`] inside a caller's transaction, so a caller can commit
/// other rows (the cloud sync's applied version) atomically with the ACL.
pub(crate) fn write_specs(
    tx: &rusqlite::Transaction<'_>,
    specs: &[CredentialSpec],
    mode: ImportMode,
    source: &str,
) -> Result<ImportSummary, rusqlite::Error> {
    {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let mut existing: HashMap<Vec<u8>, i64> = HashMap::new();
        {
            let mut stmt = tx.prepare("SELECT endpoint_key, id FROM credentials")?;
            let rows =
                stmt.query_map([], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?)))?;
            for row in rows {
                let (k, id) = row?;
                existing.insert(k, id);
            }
        }
        let mut summary = ImportSummary {
            mode,
            credentials: specs.len(),
            inserted: 0,
            updated: 0,
            removed: 0,
        };
        {
            let mut insert = tx.prepare(
                "INSERT INTO credentials (endpoint_key, person_id, card_format, facility_code, \
                 card_number, valid_from, valid_until, created_at, updated_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8)",
            )?;
            let mut update = tx.prepare(
                "UPDATE credentials SET person_id = ?2, card_format = ?3, facility_code = ?4, \
                 card_number = ?5, valid_from = ?6, valid_until = ?7, updated_at = ?8 \
                 WHERE id = ?1",
            )?;
            let mut clear_doors =
                tx.prepare("DELETE FROM credential_doors WHERE credential_id = ?1")?;
            let mut add_door =
                tx.prepare("INSERT INTO credential_doors (credential_id, door) VALUES (?1, ?2)")?;
            let mut clear_uids = tx.prepare("DELETE FROM card_uids WHERE credential_id = ?1")?;
            // A UID listed for another credential moves to this one (a re-issued badge).
            let mut add_uid = tx.prepare(
                "INSERT INTO card_uids (uid, credential_id) VALUES (?1, ?2) \
                 ON CONFLICT (uid) DO UPDATE SET credential_id = excluded.credential_id",
            )?;
            for s in specs {
                // Ids of existing keys are kept, so events keep pointing at the same row.
                let id = match existing.remove(s.endpoint_key.as_slice()) {
                    Some(id) => {
                        update.execute(rusqlite::params![
                            id,
                            s.person_id,
                            s.card_format.as_str(),
                            s.facility_code,
                            s.card_number,
                            s.valid_from,
                            s.valid_until,
                            now
                        ])?;
                        clear_doors.execute([id])?;
                        clear_uids.execute([id])?;
                        summary.updated += 1;
                        id
                    }
                    None => {
                        insert.execute(rusqlite::params![
                            s.endpoint_key.as_slice(),
                            s.person_id,
                            s.card_format.as_str(),
                            s.facility_code,
                            s.card_number,
                            s.valid_from,
                            s.valid_until,
                            now
                        ])?;
                        summary.inserted += 1;
                        tx.last_insert_rowid()
                    }
                };
                for d in &s.doors {
                    add_door.execute(rusqlite::params![id, d])?;
                }
                for u in &s.card_uids {
                    add_uid.execute(rusqlite::params![u.as_slice(), id])?;
                }
            }
            if mode == ImportMode::Replace {
                // Whatever is left in `existing` was not in the file. Doors go by cascade.
                let mut delete = tx.prepare("DELETE FROM credentials WHERE id = ?1")?;
                for id in existing.values() {
                    summary.removed += delete.execute([id])?;
                }
            }
            let mut meta = tx.prepare(
                "INSERT INTO meta (key, value) VALUES (?1, ?2) \
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            )?;
            meta.execute(rusqlite::params!["last_import_at", now.to_string()])?;
            meta.execute(rusqlite::params!["last_import_source", source])?;
            meta.execute(rusqlite::params!["last_import_mode", mode.as_str()])?;
            meta.execute(rusqlite::params![
                "last_import_count",
                specs.len().to_string()
            ])?;
        }
        Ok(summary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "test.json";

    /// A valid uncompressed key: the P-256 generator G (04 || Gx || Gy, from SEC 2).
    const G_HEX: &str = "046b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c296\
                         4fe342e2fe1a7f9b8ee7eb4a7c0f9e162bce33576b315ececbb6406837bf51f5";

    fn json_lines(text: &str) -> Vec<u64> {
        credential_lines(text)
    }

    #[test]
    fn credential_lines_follow_the_text() {
        let text = "{\n  \"version\": 1,\n  \"other\": [ {\"x\": 1} ],\n  \"credentials\": [\n    {\"a\": \"[{,\\\"\"},\n\n    {\n      \"b\": [1, {\"c\": 2}]\n    }, {\"d\": 3}\n  ]\n}\n";
        assert_eq!(json_lines(text), vec![5, 7, 9]);
        assert_eq!(key_line(text, "version"), Some(2));
        assert_eq!(json_lines("{\"credentials\":[]}"), Vec::<u64>::new());
        // Escaped key spelling is still the same key to serde, and to us.
        assert_eq!(json_lines("{\"cred\\u0065ntials\":[\n1,\n2]}"), vec![2, 3]);
    }

    fn collect(text: &str) -> Result<Vec<CsvRecord>, ImportError> {
        let mut v = Vec::new();
        csv_records(text, Path::new(P), |r| {
            v.push(r);
            Ok(())
        })?;
        Ok(v)
    }

    #[test]
    fn csv_strict_records() {
        let recs = collect("a,b\r\n\"x,\"\"y\"\"\",z\n\n\"multi\nline\",q").unwrap();
        assert_eq!(recs.len(), 3);
        assert_eq!(recs[1].fields, vec!["x,\"y\"", "z"]);
        assert_eq!(recs[1].line, 2);
        assert_eq!(recs[2].line, 4);
        assert_eq!(recs[2].fields, vec!["multi\nline", "q"]);
        for (bad, line) in [
            ("a,b\nx\"y,z\n", 2),
            ("a,b\n\"x\"y,z\n", 2),
            ("a,b\n1,2\n\"open,z\nmore\n", 3),
            ("a,b\rc\n", 1),
        ] {
            let e = collect(bad).err().unwrap();
            assert_eq!(e.line(), Some(line), "{bad:?}: {e}");
        }
    }

    fn json(text: &str) -> Result<Vec<CredentialSpec>, ImportError> {
        parse_bytes(text.as_bytes(), FileKind::Json, Path::new(P))
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
}
