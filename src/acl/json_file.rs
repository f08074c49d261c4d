//! JSON ACL files (`{ "version": 1, "credentials": [ { ... }, ... ] }`), streamed: serde reads
//! from the file through a line-counting reader and each credential object is validated and
//! handed out as soon as it is parsed, so memory holds one object, never the document.

use super::record::{
    ferr, parse_door_groups, parse_holidays, parse_schedules, truncate, validate_row,
    CredentialSpec, Definitions, FieldError, ImportError, RawRow, Syntax, JSON_FORMAT_VERSION,
    MAX_DOORS_PER_CREDENTIAL,
};
use serde::de::Error as _;
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use std::cell::Cell;
use std::io::Read;
use std::path::Path;
use std::rc::Rc;

/// Counts the lines serde has read: serde_json pulls bytes one at a time, so when a credential
/// object starts (its `{` just read) the count is that object's line. It buffers itself and
/// counts only the bytes it hands out: a one-byte read is a copy and a compare, where going
/// through the layers below for each byte was ~40% of a 5M-credential import's CPU.
struct LineCounter<R> {
    inner: R,
    line: Rc<Cell<u64>>,
    bom_checked: bool,
    buf: Box<[u8]>,
    pos: usize,
    end: usize,
}

/// Bytes read from the file at a time.
const JSON_READ_BUF: usize = 64 * 1024;

impl<R: Read> LineCounter<R> {
    fn new(inner: R, line: Rc<Cell<u64>>) -> Self {
        LineCounter {
            inner,
            line,
            bom_checked: false,
            buf: vec![0u8; JSON_READ_BUF].into_boxed_slice(),
            pos: 0,
            end: 0,
        }
    }

    /// Refills the buffer; at the start, until it holds the three bytes a UTF-8 byte order
    /// mark would take (a chunked source may hand out less), and drops such a mark: it is not
    /// part of the content.
    fn fill(&mut self) -> std::io::Result<()> {
        self.pos = 0;
        self.end = 0;
        loop {
            let n = self
                .inner
                .read(self.buf.get_mut(self.end..).unwrap_or_default())?;
            self.end += n;
            if self.bom_checked || n == 0 || self.end >= 3 {
                break;
            }
        }
        if !self.bom_checked {
            self.bom_checked = true;
            let head = self.buf.get(..self.end.min(3)).unwrap_or_default();
            if head == b"\xEF\xBB\xBF" {
                self.pos = 3;
            } else if head.first() == Some(&0xEF) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "invalid UTF-8",
                ));
            }
        }
        Ok(())
    }
}

impl<R: Read> Read for LineCounter<R> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        // A dropped byte order mark can leave a filled buffer empty: fill again.
        while self.pos >= self.end {
            self.fill()?;
            if self.end == 0 {
                return Ok(0);
            }
        }
        let avail = self.buf.get(self.pos..self.end).unwrap_or_default();
        let n = avail.len().min(out.len());
        let (Some(src), Some(dst)) = (avail.get(..n), out.get_mut(..n)) else {
            return Ok(0);
        };
        dst.copy_from_slice(src);
        let newlines = src.iter().filter(|&&b| b == b'\n').count();
        self.line.set(self.line.get() + newlines as u64);
        self.pos += n;
        Ok(n)
    }
}

/// Streams the credentials of a JSON file to `on_spec`, stopping at the first error; returns
/// the definitions the file carries (version 2).
pub(crate) fn read_json<R: Read>(
    input: R,
    path: &Path,
    on_spec: impl FnMut(CredentialSpec) -> Result<(), ImportError>,
) -> Result<Definitions, ImportError> {
    let line = Rc::new(Cell::new(1));
    let reader = LineCounter::new(input, line.clone());
    let element = Rc::new(Cell::new(0));
    let mut ctx = JsonCtx {
        path,
        line,
        element: element.clone(),
        on_spec: Box::new(on_spec),
        failure: None,
        syntax: Syntax::V1,
        definitions: Definitions::default(),
        budget: DEFINITIONS_BUDGET,
    };
    let mut de = serde_json::Deserializer::from_reader(reader);
    let parsed = TopSeed(&mut ctx)
        .deserialize(&mut de)
        .and_then(|()| de.end());
    if let Err(e) = parsed {
        // Our own (row or version) error wins over the placeholder serde carried out.
        // A credential of the wrong shape (not an object, an unknown field) is reported on
        // its first line; serde's own line can be one past it (it reads a byte ahead).
        let line = match element.get() {
            l if l > 0 && e.is_data() => l,
            _ => (e.line() as u64).max(1),
        };
        return Err(ctx.failure.take().unwrap_or_else(|| ImportError::Syntax {
            path: path.to_path_buf(),
            line,
            message: serde_message(&e),
        }));
    }
    Ok(ctx.definitions)
}

/// Most JSON values (objects, arrays, strings, numbers, each counted) and string bytes of all
/// definition sections together: they are held in memory until the apply commits.
const DEFINITIONS_BUDGET: Budget = Budget {
    values: 400_000,
    bytes: 16 * 1024 * 1024,
};

#[derive(Clone, Copy)]
struct Budget {
    values: usize,
    bytes: usize,
}

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
    state: Option<serde_json::Value>,
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

fn json_row(c: &JsonCredential, syntax: Syntax) -> Result<RawRow<'_>, FieldError> {
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
        state: json_str(&c.state, "state")?,
        syntax,
    })
}

/// State shared by the streaming JSON visitors.
struct JsonCtx<'a> {
    path: &'a Path,
    /// Lines read so far (see [`LineCounter`]).
    line: Rc<Cell<u64>>,
    /// First line of the credential being parsed (0 between credentials).
    element: Rc<Cell<u64>>,
    on_spec: Box<dyn FnMut(CredentialSpec) -> Result<(), ImportError> + 'a>,
    /// The real error when a visitor aborts serde with a placeholder.
    failure: Option<ImportError>,
    /// Set by `version`; credentials before it are read as version 1.
    syntax: Syntax,
    definitions: Definitions,
    /// What the definitions may still take.
    budget: Budget,
}

impl JsonCtx<'_> {
    /// Stashes `e` and returns the placeholder that makes serde stop.
    fn fail<E: serde::de::Error>(&mut self, e: ImportError) -> E {
        self.failure = Some(e);
        E::custom("rejected")
    }

    fn check_version(&mut self, v: &serde_json::Value, line: u64) -> Result<(), ImportError> {
        match v.as_u64() {
            Some(1) => return Ok(()),
            Some(2) => {
                self.syntax = Syntax::V2;
                return Ok(());
            }
            _ => {}
        }
        Err(ImportError::Field {
            path: self.path.to_path_buf(),
            line,
            field: "version",
            message: format!(
                "unsupported version {} (this keyway reads 1 to {JSON_FORMAT_VERSION})",
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
        const FIELDS: &[&str] = &[
            "version",
            "credentials",
            "door_groups",
            "schedules",
            "holidays",
        ];
        let (mut version_seen, mut credentials_seen) = (false, false);
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                section @ ("door_groups" | "schedules" | "holidays") => {
                    let line = self.0.line.get();
                    if self.0.syntax != Syntax::V2 {
                        let e = ImportError::Field {
                            path: self.0.path.to_path_buf(),
                            line,
                            field: field_name(section),
                            message: "needs \"version\": 2 before it".into(),
                        };
                        return Err(self.0.fail(e));
                    }
                    let value = map.next_value_seed(BoundedValue(&mut self.0.budget))?;
                    if let Err(e) = self.0.define(section, &value) {
                        let e = ImportError::Field {
                            path: self.0.path.to_path_buf(),
                            line,
                            field: e.field,
                            message: e.message,
                        };
                        return Err(self.0.fail(e));
                    }
                }
                "version" => {
                    if std::mem::replace(&mut version_seen, true) {
                        return Err(M::Error::duplicate_field("version"));
                    }
                    // The key has just been read: this is its line (a number value would make
                    // serde read one byte past it).
                    let line = self.0.line.get();
                    let v: serde_json::Value = map.next_value()?;
                    if let Err(e) = self.0.check_version(&v, line) {
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
        let start = LineSeed(ctx.line.clone(), ctx.element.clone());
        while let Some((line, c)) = seq.next_element_seed(start.clone())? {
            let result = json_row(&c, ctx.syntax)
                .and_then(|raw| validate_row(raw, line))
                .map_err(|e| ImportError::Field {
                    path: ctx.path.to_path_buf(),
                    line,
                    field: e.field,
                    message: e.message,
                })
                .and_then(|spec| (ctx.on_spec)(spec));
            if let Err(e) = result {
                return Err(ctx.fail(e));
            }
        }
        Ok(())
    }
}

/// Parses one credential object, noting the line of its first byte.
#[derive(Clone)]
struct LineSeed(Rc<Cell<u64>>, Rc<Cell<u64>>);

impl<'de> DeserializeSeed<'de> for LineSeed {
    type Value = (u64, JsonCredential);

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        // serde has read the value's first byte (to see what it is) and nothing more.
        let line = self.0.get();
        self.1.set(line);
        let c = <JsonCredential as serde::Deserialize>::deserialize(d)?;
        self.1.set(0);
        Ok((line, c))
    }
}

/// serde_json's message without its " at line L column C" suffix (we print the line ourselves).
fn serde_message(e: &serde_json::Error) -> String {
    let full = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    full.strip_suffix(&suffix).unwrap_or(&full).to_owned()
}

fn field_name(section: &str) -> &'static str {
    match section {
        "door_groups" => "door_groups",
        "schedules" => "schedules",
        _ => "holidays",
    }
}

impl JsonCtx<'_> {
    /// Validates one definitions section into [`Definitions`]; each may appear once.
    fn define(&mut self, section: &str, v: &serde_json::Value) -> Result<(), FieldError> {
        let d = &mut self.definitions;
        let twice = || ferr(field_name(section), "appears twice");
        match section {
            "door_groups" if d.door_groups.is_none() => d.door_groups = Some(parse_door_groups(v)?),
            "schedules" if d.schedules.is_none() => d.schedules = Some(parse_schedules(v)?),
            "holidays" if d.holidays.is_none() => d.holidays = Some(parse_holidays(v)?),
            _ => return Err(twice()),
        }
        Ok(())
    }
}

/// A JSON value whose size is charged to a [`Budget`]: parsing stops as soon as a definitions
/// section outgrows it, before it is held in memory.
struct BoundedValue<'b>(&'b mut Budget);

impl BoundedValue<'_> {
    fn charge<E: serde::de::Error>(&mut self, bytes: usize) -> Result<(), E> {
        let b = &mut *self.0;
        if b.values == 0 || b.bytes < bytes {
            return Err(E::custom(
                "definitions too large (door_groups, schedules and holidays together)",
            ));
        }
        b.values -= 1;
        b.bytes -= bytes;
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for BoundedValue<'_> {
    type Value = serde_json::Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for BoundedValue<'_> {
    type Value = serde_json::Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: serde::de::Error>(mut self, v: bool) -> Result<Self::Value, E> {
        self.charge(0)?;
        Ok(v.into())
    }

    fn visit_i64<E: serde::de::Error>(mut self, v: i64) -> Result<Self::Value, E> {
        self.charge(0)?;
        Ok(v.into())
    }

    fn visit_u64<E: serde::de::Error>(mut self, v: u64) -> Result<Self::Value, E> {
        self.charge(0)?;
        Ok(v.into())
    }

    fn visit_f64<E: serde::de::Error>(mut self, v: f64) -> Result<Self::Value, E> {
        self.charge(0)?;
        Ok(v.into())
    }

    fn visit_str<E: serde::de::Error>(mut self, v: &str) -> Result<Self::Value, E> {
        self.charge(v.len())?;
        Ok(v.into())
    }

    fn visit_unit<E: serde::de::Error>(mut self) -> Result<Self::Value, E> {
        self.charge(0)?;
        Ok(serde_json::Value::Null)
    }

    fn visit_seq<S: SeqAccess<'de>>(mut self, mut seq: S) -> Result<Self::Value, S::Error> {
        self.charge(0)?;
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(BoundedValue(&mut *self.0))? {
            out.push(v);
        }
        Ok(serde_json::Value::Array(out))
    }

    fn visit_map<M: MapAccess<'de>>(mut self, mut map: M) -> Result<Self::Value, M::Error> {
        self.charge(0)?;
        let mut out = serde_json::Map::new();
        while let Some(k) = map.next_key::<String>()? {
            self.charge(k.len())?;
            let v = map.next_value_seed(BoundedValue(&mut *self.0))?;
            if out.insert(k.clone(), v).is_some() {
                return Err(M::Error::custom(format!(
                    "'{}' appears twice",
                    truncate(&k)
                )));
            }
        }
        Ok(serde_json::Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hands out `step` bytes per read at most (a chunked source, the worst case: 1).
    struct Trickle<'a>(&'a [u8], usize);

    impl Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            let n = self.0.len().min(out.len()).min(self.1);
            let (head, rest) = self.0.split_at(n);
            out[..n].copy_from_slice(head);
            self.0 = rest;
            Ok(n)
        }
    }

    const G_HEX: &str = "046b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c296\
                         4fe342e2fe1a7f9b8ee7eb4a7c0f9e162bce33576b315ececbb6406837bf51f5";

    fn lines(input: impl Read) -> Result<Vec<u64>, ImportError> {
        let mut got = Vec::new();
        read_json(input, Path::new("t.json"), |s| {
            got.push(s.line);
            Ok(())
        })?;
        Ok(got)
    }

    /// A byte order mark is dropped however the source hands the bytes out, and lines are
    /// counted across the buffer's refills exactly as serde reads them.
    #[test]
    fn bom_and_lines_whatever_the_read_size() {
        let row = format!(
            r#"{{"endpoint_key":"{G_HEX}","person_id":"p","card_format":"h10301","facility_code":1,"card_number":2,"doors":["*"]}}"#
        );
        let body = format!("{{\n\"version\": 1,\n\"credentials\": [\n\n{row}\n]\n}}\n");
        // Past the buffer, so the credential's line is counted across a refill.
        let padded = format!("{}{body}", "\n".repeat(JSON_READ_BUF + 5));
        for text in [body.clone(), format!("\u{FEFF}{body}"), padded] {
            let extra = text.matches('\n').count() as u64 - body.matches('\n').count() as u64;
            for step in [1, 2, 3, 7, usize::MAX] {
                let got = lines(Trickle(text.as_bytes(), step)).unwrap();
                assert_eq!(got, vec![5 + extra], "step {step}");
            }
        }
        // Half a mark is not UTF-8.
        let bad = format!("\u{FEFF}{body}").into_bytes();
        let mut bad = bad[..1].to_vec();
        bad.extend_from_slice(body.as_bytes());
        assert!(lines(Trickle(&bad, 1)).is_err());
    }
}
