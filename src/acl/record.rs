//! One credential as an ACL file or a cloud snapshot gives it: the types, the limits and the
//! field validation shared by every source (CSV, JSON, cloud). Untrusted input: every field is
//! length-checked and validated, and errors name the field (the reader adds the line).

use super::schedule::{self, HolidayRule, Schedule, Target};
use super::{normalize_endpoint_key, CredentialState, ENDPOINT_KEY_LEN};
use crate::card::CardFormat;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Largest accepted ACL file. Files are streamed (memory does not grow with the file); the
/// bound only keeps a runaway file from filling the disk with staging rows. 4 GiB holds well
/// over 10 million credentials in either syntax.
pub const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024 * 1024;
/// Most credentials accepted in one file or snapshot (the largest panels hold 2 million).
pub const MAX_CREDENTIALS: usize = 10_000_000;
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
/// The newest JSON `version` this build reads (1: credentials only; 2: adds door groups,
/// schedules, holidays and credential states).
pub const JSON_FORMAT_VERSION: u64 = 2;
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
pub const CSV_OPTIONAL_COLUMNS: [&str; 2] = ["card_uids", "state"];

/// Which grammar a record is read with: a JSON file says (`version`); CSV, which has no
/// version, always reads the newest (a superset: every version-1 row means what it did).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Syntax {
    /// Doors are door ids or `*`; no state.
    #[default]
    V1,
    /// Doors may also be `@group` and carry `=schedule`; an optional `state`.
    V2,
}
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
    /// Door ids the file names that are not configured (when the import was given the
    /// configured doors).
    pub unknown_doors: super::apply::UnknownDoors,
}

/// What an import checks beyond the file itself.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// The configured door ids: a file naming others is refused (an entry that can never match
    /// a tap is most likely a typo), unless `allow_unknown_doors`.
    pub known_doors: Option<std::collections::BTreeSet<String>>,
    /// Import a file naming unknown doors anyway (an ACL shared by several gateways); they are
    /// reported in [`ImportSummary::unknown_doors`].
    pub allow_unknown_doors: bool,
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
    /// Active unless the file says suspended or revoked.
    pub state: CredentialState,
}

/// Site-wide definitions an ACL may carry (JSON version 2, cloud snapshots). A section the
/// file carries (`Some`) replaces the stored one (a merge updates it by id); a section it does
/// not carry leaves the stored one as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Definitions {
    /// Door groups by id (`@id` in a credential's doors): their door ids.
    pub door_groups: Option<BTreeMap<String, Vec<String>>>,
    /// Schedules by id (`door=id` in a credential's doors).
    pub schedules: Option<BTreeMap<String, Schedule>>,
    /// Holiday dates (`YYYY-MM-DD`, in the site's time zone).
    pub holidays: Option<BTreeSet<String>>,
}

impl Definitions {
    /// Whether the file carried any section.
    pub fn is_empty(&self) -> bool {
        self.door_groups.is_none() && self.schedules.is_none() && self.holidays.is_none()
    }
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
    /// The file names door ids the configuration does not have.
    #[error(
        "{}: names doors that are not in the configuration: {found}; fix the door ids, or \
         import with --allow-unknown-doors (an ACL shared by several gateways)",
        path.display()
    )]
    UnknownDoors {
        path: PathBuf,
        found: super::apply::UnknownDoors,
    },
    /// The file was fine but applying it failed (database busy, damaged, disk full...).
    #[error("{}: the ACL was not applied, nothing was changed: {source}", path.display())]
    Apply {
        path: PathBuf,
        #[source]
        source: super::apply::ApplyError,
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

    /// True when the file is to blame (unreadable, malformed, invalid); false when the
    /// database is (busy, damaged, full), so the CLI does not call a good file bad.
    pub fn is_file_problem(&self) -> bool {
        !matches!(self, ImportError::Apply { .. })
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
pub(crate) struct FieldError {
    pub(crate) field: &'static str,
    pub(crate) message: String,
}

pub(crate) fn ferr(field: &'static str, message: impl Into<String>) -> FieldError {
    FieldError {
        field,
        message: message.into(),
    }
}
// ---------------------------------------------------------------------------------------
// Field validation shared by both syntaxes.

pub(crate) fn parse_endpoint_key(s: &str) -> Result<[u8; ENDPOINT_KEY_LEN], FieldError> {
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

pub(crate) fn parse_person_id(s: &str) -> Result<String, FieldError> {
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

pub(crate) fn parse_card_format(s: &str) -> Result<CardFormat, FieldError> {
    s.parse::<CardFormat>()
        .map_err(|e| ferr("card_format", e.to_string()))
}

pub(crate) fn parse_decimal(field: &'static str, s: &str) -> Result<u64, FieldError> {
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ferr(
            field,
            format!("'{}' is not a non-negative integer", truncate(s)),
        ));
    }
    s.parse::<u64>()
        .map_err(|_| ferr(field, format!("'{}' is out of range", truncate(s))))
}

pub(crate) fn parse_time(field: &'static str, s: &str) -> Result<i64, FieldError> {
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

pub(crate) fn parse_door(s: &str) -> Result<String, FieldError> {
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

pub(crate) fn truncate(s: &str) -> String {
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
pub(crate) struct RawRow<'a> {
    pub(crate) endpoint_key: Option<&'a str>,
    pub(crate) person_id: Option<&'a str>,
    pub(crate) card_format: Option<&'a str>,
    pub(crate) facility_code: Option<u64>,
    pub(crate) card_number: Option<u64>,
    pub(crate) valid_from: Option<&'a str>,
    pub(crate) valid_until: Option<&'a str>,
    pub(crate) doors: Vec<&'a str>,
    pub(crate) card_uids: Vec<&'a str>,
    pub(crate) state: Option<&'a str>,
    pub(crate) syntax: Syntax,
}

pub(crate) fn required<T>(v: Option<T>, field: &'static str) -> Result<T, FieldError> {
    v.ok_or_else(|| ferr(field, "missing"))
}

pub(crate) fn validate_row(raw: RawRow<'_>, line: u64) -> Result<CredentialSpec, FieldError> {
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
    match raw.syntax {
        Syntax::V1 => {
            for d in raw.doors {
                let d = parse_door(d)?;
                if doors.contains(&d) {
                    return Err(ferr("doors", format!("door '{d}' is listed twice")));
                }
                doors.push(d);
            }
        }
        Syntax::V2 => {
            let mut targets: Vec<Target<'_>> = Vec::with_capacity(raw.doors.len());
            for d in &raw.doors {
                let e = schedule::parse_entry(d).map_err(|m| ferr("doors", m))?;
                if targets.contains(&e.target) {
                    let name = d.split('=').next().unwrap_or(d);
                    return Err(ferr("doors", format!("'{name}' is listed twice")));
                }
                targets.push(e.target);
                doors.push((*d).to_owned());
            }
        }
    }
    let state = match (raw.syntax, raw.state) {
        (_, None) => CredentialState::Active,
        (Syntax::V1, Some(_)) => return Err(ferr("state", "needs version 2")),
        (Syntax::V2, Some(s)) => parse_state(s)?,
    };
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
        state,
    })
}

pub(crate) fn parse_state(s: &str) -> Result<CredentialState, FieldError> {
    match s {
        "" | "active" => Ok(CredentialState::Active),
        "suspended" => Ok(CredentialState::Suspended),
        "revoked" => Ok(CredentialState::Revoked),
        other => Err(ferr(
            "state",
            format!(
                "'{}' is not a state (active, suspended, revoked)",
                truncate(other)
            ),
        )),
    }
}

// ---------------------------------------------------------------------------------------
// Definitions (JSON version 2), from already-parsed JSON values whose size the reader bounded.

/// `"door_groups": { "lobby": ["front", "side"], ... }`.
pub(crate) fn parse_door_groups(
    v: &serde_json::Value,
) -> Result<BTreeMap<String, Vec<String>>, FieldError> {
    const F: &str = "door_groups";
    let obj = v
        .as_object()
        .ok_or_else(|| ferr(F, "expected an object of group id -> door ids"))?;
    if obj.len() > schedule::MAX_DOOR_GROUPS {
        return Err(ferr(
            F,
            format!("more than {} groups", schedule::MAX_DOOR_GROUPS),
        ));
    }
    let mut out = BTreeMap::new();
    let mut members = 0usize;
    for (id, doors) in obj {
        schedule::check_id("door group", id).map_err(|m| ferr(F, m))?;
        let list = doors
            .as_array()
            .ok_or_else(|| ferr(F, format!("group '{id}': expected an array of door ids")))?;
        if list.is_empty() || list.len() > schedule::MAX_DOORS_PER_GROUP {
            return Err(ferr(
                F,
                format!(
                    "group '{id}': list 1 to {} door ids",
                    schedule::MAX_DOORS_PER_GROUP
                ),
            ));
        }
        members += list.len();
        if members > schedule::MAX_GROUP_MEMBERS {
            return Err(ferr(
                F,
                format!(
                    "more than {} doors in all groups",
                    schedule::MAX_GROUP_MEMBERS
                ),
            ));
        }
        let mut doors: Vec<String> = Vec::with_capacity(list.len());
        for d in list {
            let d = d
                .as_str()
                .ok_or_else(|| ferr(F, format!("group '{id}': expected door id strings")))?;
            schedule::check_id("door", d).map_err(|m| ferr(F, format!("group '{id}': {m}")))?;
            if doors.iter().any(|x| x == d) {
                return Err(ferr(F, format!("group '{id}': door '{d}' is listed twice")));
            }
            doors.push(d.to_owned());
        }
        doors.sort();
        out.insert(id.clone(), doors);
    }
    Ok(out)
}

/// `"schedules": { "id": { "weekly": [{"days", "from", "until"}...], "holidays": ... } }`;
/// `holidays` is an array of `{"from", "until"}`, `"closed"` (the default) or `"as_weekday"`.
pub(crate) fn parse_schedules(
    v: &serde_json::Value,
) -> Result<BTreeMap<String, Schedule>, FieldError> {
    const F: &str = "schedules";
    let obj = v
        .as_object()
        .ok_or_else(|| ferr(F, "expected an object of schedule id -> schedule"))?;
    if obj.len() > schedule::MAX_SCHEDULES {
        return Err(ferr(
            F,
            format!("more than {} schedules", schedule::MAX_SCHEDULES),
        ));
    }
    let mut out = BTreeMap::new();
    for (id, def) in obj {
        schedule::check_id("schedule", id).map_err(|m| ferr(F, m))?;
        let e = |m: String| ferr(F, format!("schedule '{id}': {m}"));
        let def = def
            .as_object()
            .ok_or_else(|| e("expected an object with \"weekly\"".into()))?;
        if let Some(k) = def.keys().find(|k| *k != "weekly" && *k != "holidays") {
            return Err(e(format!(
                "unknown field '{}' (expected weekly, holidays)",
                truncate(k)
            )));
        }
        let str_field = |w: &serde_json::Map<String, serde_json::Value>, k: &str| {
            w.get(k)
                .and_then(|x| x.as_str())
                .map(str::to_owned)
                .ok_or_else(|| format!("'{k}' missing or not a string"))
        };
        let windows = |v: Option<&serde_json::Value>,
                       with_days: bool|
         -> Result<Vec<schedule::Window>, String> {
            let list = match v {
                None => return Ok(Vec::new()),
                Some(v) => v.as_array().ok_or("expected an array of windows")?,
            };
            if list.len() > schedule::MAX_WINDOWS {
                return Err(format!("more than {} windows", schedule::MAX_WINDOWS));
            }
            let allowed: &[&str] = if with_days {
                &["days", "from", "until"]
            } else {
                &["from", "until"]
            };
            let mut out = Vec::with_capacity(list.len());
            for (i, w) in list.iter().enumerate() {
                let n = i + 1;
                let w = w
                    .as_object()
                    .ok_or_else(|| format!("window {n}: expected an object"))?;
                if let Some(k) = w.keys().find(|k| !allowed.contains(&k.as_str())) {
                    return Err(format!(
                        "window {n}: unknown field '{}' (expected {})",
                        truncate(k),
                        allowed.join(", ")
                    ));
                }
                let days = if with_days {
                    str_field(w, "days").map_err(|m| format!("window {n}: {m}"))?
                } else {
                    "daily".into()
                };
                let from = str_field(w, "from").map_err(|m| format!("window {n}: {m}"))?;
                let until = str_field(w, "until").map_err(|m| format!("window {n}: {m}"))?;
                out.push(
                    schedule::parse_window(&days, &from, &until)
                        .map_err(|m| format!("window {n}: {m}"))?,
                );
            }
            Ok(out)
        };
        let weekly = windows(def.get("weekly"), true).map_err(e)?;
        let holidays = match def.get("holidays") {
            None => HolidayRule::Closed,
            Some(serde_json::Value::String(s)) if s == "closed" => HolidayRule::Closed,
            Some(serde_json::Value::String(s)) if s == "as_weekday" => HolidayRule::AsWeekday,
            Some(v @ serde_json::Value::Array(_)) => HolidayRule::Windows(
                windows(Some(v), false)
                    .map_err(|m| e(format!("holidays: {m}")))?
                    .iter()
                    .map(|w| (w.from, w.until))
                    .collect(),
            ),
            Some(_) => {
                return Err(e(
                    "holidays: expected \"closed\", \"as_weekday\" or an array of windows".into(),
                ))
            }
        };
        out.insert(id.clone(), Schedule::new(&weekly, &holidays));
    }
    Ok(out)
}

/// `"holidays": ["2026-12-25", ...]`: calendar dates in the site's time zone.
pub(crate) fn parse_holidays(v: &serde_json::Value) -> Result<BTreeSet<String>, FieldError> {
    const F: &str = "holidays";
    let list = v
        .as_array()
        .ok_or_else(|| ferr(F, "expected an array of dates like \"2026-12-25\""))?;
    if list.len() > schedule::MAX_HOLIDAYS {
        return Err(ferr(
            F,
            format!("more than {} dates", schedule::MAX_HOLIDAYS),
        ));
    }
    let mut out = BTreeSet::new();
    for d in list {
        let s = d
            .as_str()
            .ok_or_else(|| ferr(F, "expected date strings like \"2026-12-25\""))?;
        let date: jiff::civil::Date =
            s.parse().ok().filter(|_| s.len() == 10).ok_or_else(|| {
                ferr(
                    F,
                    format!("'{}' is not a date like 2026-12-25", truncate(s)),
                )
            })?;
        if !out.insert(date.to_string()) {
            return Err(ferr(F, format!("{s} is listed twice")));
        }
    }
    Ok(out)
}

pub(crate) fn parse_card_uids(raw: &[&str]) -> Result<Vec<Vec<u8>>, FieldError> {
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
