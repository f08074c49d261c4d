//! CSV ACL files (RFC 4180, header row, strict quoting), streamed: records are split by the
//! `csv` crate and handed out one by one, so memory does not grow with the file.
//!
//! The `csv` crate is lenient (a stray quote or a bare CR is accepted); keyway is not, because
//! a silently mis-split row could grant the wrong person. [`StrictGuard`] sits between the file
//! and the crate and rejects, with the line, what the crate would let through: a quote inside
//! an unquoted field, text after a closing quote, a quoted field never closed, a bare CR,
//! invalid UTF-8, and rows or fields over the size bounds (so a row's memory is bounded too).

use super::record::{
    parse_decimal, truncate, validate_row, CredentialSpec, FieldError, ImportError, RawRow, Syntax,
    CSV_COLUMNS, CSV_OPTIONAL_COLUMNS, MAX_CSV_FIELDS, MAX_CSV_FIELD_BYTES,
};
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

/// One CSV record: its first line and its fields.
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

/// Streams the credentials of a CSV file to `on_spec`, stopping at the first error.
pub(crate) fn read_csv<R: Read>(
    input: R,
    path: &Path,
    mut on_spec: impl FnMut(CredentialSpec) -> Result<(), ImportError>,
) -> Result<(), ImportError> {
    let guard = StrictGuard::new(input);
    let failure = guard.failure.clone();
    let starts = guard.starts.clone();
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(guard);
    let mut columns: Option<CsvColumns> = None;
    let mut record = csv::StringRecord::new();
    loop {
        let more = match reader.read_record(&mut record) {
            Ok(more) => more,
            Err(e) => {
                // The guard's own error (with its line) wins over the crate's I/O wrapper.
                if let Some((line, message)) = failure.take() {
                    return Err(csv_syntax(path, line, message));
                }
                return Err(crate_error(e, path));
            }
        };
        if !more {
            break;
        }
        // The guard saw every record start (the crate's own line count is off after CRLF and
        // blank lines); it runs at most one buffer ahead, so this queue stays small.
        let line = starts.borrow_mut().pop_front().unwrap_or(1);
        let rec = CsvRecord {
            line,
            fields: record.iter().map(str::to_owned).collect(),
        };
        match &columns {
            None => columns = Some(csv_header(&rec, path)?),
            Some(cols) => on_spec(csv_row(cols, &rec, path)?)?,
        }
    }
    if columns.is_none() {
        return Err(csv_syntax(path, 1, "empty file: expected a header row"));
    }
    Ok(())
}

fn crate_error(e: csv::Error, path: &Path) -> ImportError {
    let line = e.position().map(|p| p.line()).unwrap_or(1);
    match e.into_kind() {
        csv::ErrorKind::Io(source) => ImportError::Io {
            path: path.to_path_buf(),
            source,
        },
        csv::ErrorKind::Utf8 { .. } => csv_syntax(path, line, "invalid UTF-8"),
        other => csv_syntax(path, line, format!("{other:?}")),
    }
}

/// Where the guard is inside the CSV grammar.
#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    FieldStart,
    Unquoted,
    Quoted,
    /// A quote inside a quoted field: the closing one, or the first of `""`.
    QuoteInQuoted,
    /// After a CR, which must be followed by LF.
    Cr,
}

/// A `Read` adapter that checks the strict grammar as bytes pass to the `csv` crate. An error
/// is kept until the bytes before it have been consumed, so errors come in file order; it is
/// then returned as an I/O error and its (line, message) left in `failure`.
struct StrictGuard<R> {
    inner: R,
    state: State,
    line: u64,
    quote_line: u64,
    fields: usize,
    field_bytes: usize,
    /// Bytes of an unfinished UTF-8 sequence at the end of the last chunk.
    utf8_carry: Vec<u8>,
    bom_checked: bool,
    pending: Option<(u64, String)>,
    failure: std::rc::Rc<std::cell::Cell<Option<(u64, String)>>>,
    eof_checked: bool,
    /// True at the start of a line outside a quoted field.
    line_start: bool,
    /// First line of each non-blank record, in order.
    starts: std::rc::Rc<std::cell::RefCell<std::collections::VecDeque<u64>>>,
}

impl<R: Read> StrictGuard<R> {
    fn new(inner: R) -> Self {
        StrictGuard {
            inner,
            state: State::FieldStart,
            line: 1,
            quote_line: 1,
            fields: 0,
            field_bytes: 0,
            utf8_carry: Vec::new(),
            bom_checked: false,
            pending: None,
            failure: Default::default(),
            eof_checked: false,
            line_start: true,
            starts: Default::default(),
        }
    }

    /// Checks `buf` in place; returns how many bytes (at its start) to hand on, recording the
    /// error after them. Record-ending CRs are dropped (CRLF becomes LF): the `csv` crate
    /// would otherwise number the line after a CRLF one too low.
    fn check(&mut self, buf: &mut [u8]) -> usize {
        let utf8_ok = self.check_utf8(buf);
        let mut out = 0;
        for i in 0..buf.len() {
            let Some(b) = buf.get(i).copied() else {
                break;
            };
            if i >= utf8_ok {
                self.pending = Some((self.line, "invalid UTF-8".into()));
                return out;
            }
            let before = self.state;
            if let Err(message) = self.step(b) {
                self.pending = Some((self.line, message));
                return out;
            }
            if b == b'\r' && self.state == State::Cr && before != State::Quoted {
                continue;
            }
            // `out <= i`: the byte moves down over a dropped CR, never past the end.
            if let Some(slot) = buf.get_mut(out) {
                *slot = b;
            }
            out += 1;
        }
        out
    }

    /// Length of the valid UTF-8 prefix of `buf` (an unfinished sequence at its end counts as
    /// valid and is carried to the next chunk).
    fn check_utf8(&mut self, buf: &[u8]) -> usize {
        let mut joined = std::mem::take(&mut self.utf8_carry);
        let carried = joined.len();
        joined.extend_from_slice(buf);
        match std::str::from_utf8(&joined) {
            Ok(_) => buf.len(),
            Err(e) => {
                let good = e.valid_up_to().saturating_sub(carried);
                if e.error_len().is_none() {
                    // Incomplete sequence at the end: carry it.
                    self.utf8_carry = joined.get(e.valid_up_to()..).unwrap_or_default().to_vec();
                    buf.len()
                } else {
                    good
                }
            }
        }
    }

    fn step(&mut self, b: u8) -> Result<(), String> {
        if self.line_start && b != b'\n' && b != b'\r' {
            self.line_start = false;
            self.starts.borrow_mut().push_back(self.line);
        }
        match (self.state, b) {
            (State::Cr, b'\n') => self.end_record(),
            (State::Cr, _) => return Err("carriage return not followed by a line feed".into()),
            (State::FieldStart, b'"') => {
                self.quote_line = self.line;
                self.state = State::Quoted;
            }
            (State::FieldStart | State::Unquoted | State::QuoteInQuoted, b',') => {
                self.next_field()?;
            }
            (State::FieldStart | State::Unquoted | State::QuoteInQuoted, b'\n') => {
                self.end_record()
            }
            (State::FieldStart | State::Unquoted | State::QuoteInQuoted, b'\r') => {
                self.state = State::Cr
            }
            (State::Unquoted, b'"') => {
                return Err(
                    "quote inside an unquoted field (quote the whole field and double \
                            the quote)"
                        .into(),
                )
            }
            (State::FieldStart | State::Unquoted, _) => {
                self.state = State::Unquoted;
                self.grow()?;
            }
            (State::Quoted, b'"') => self.state = State::QuoteInQuoted,
            (State::Quoted, _) => {
                if b == b'\n' {
                    self.line += 1;
                }
                self.grow()?;
            }
            (State::QuoteInQuoted, b'"') => {
                self.state = State::Quoted;
                self.grow()?;
            }
            (State::QuoteInQuoted, c) => {
                return Err(format!(
                    "unexpected '{}' after a closing quote (quotes inside a quoted field are \
                     written \"\")",
                    truncate(&char::from(c).to_string())
                ))
            }
        }
        Ok(())
    }

    fn grow(&mut self) -> Result<(), String> {
        self.field_bytes += 1;
        if self.field_bytes > MAX_CSV_FIELD_BYTES {
            return Err(format!("field longer than {MAX_CSV_FIELD_BYTES} bytes"));
        }
        Ok(())
    }

    fn next_field(&mut self) -> Result<(), String> {
        self.fields += 1;
        self.field_bytes = 0;
        self.state = State::FieldStart;
        if self.fields >= MAX_CSV_FIELDS {
            return Err(format!("more than {MAX_CSV_FIELDS} fields in one row"));
        }
        Ok(())
    }

    fn end_record(&mut self) {
        self.line += 1;
        self.line_start = true;
        self.fields = 0;
        self.field_bytes = 0;
        self.state = State::FieldStart;
    }

    fn fail(&mut self, e: (u64, String)) -> std::io::Error {
        let err = std::io::Error::new(std::io::ErrorKind::InvalidData, e.1.clone());
        self.failure.set(Some(e));
        err
    }
}

impl<R: Read> Read for StrictGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if let Some(e) = self.pending.take() {
            return Err(self.fail(e));
        }
        let mut n = self.inner.read(buf)?;
        if !self.bom_checked && n > 0 {
            // A UTF-8 byte order mark (spreadsheet exports) is not part of the content. It is
            // only looked for in the first read, which a BufReader makes large.
            self.bom_checked = true;
            if buf.get(..n).is_some_and(|b| b.starts_with(b"\xEF\xBB\xBF")) {
                buf.copy_within(3..n, 0);
                n -= 3;
                if n == 0 {
                    return self.read(buf);
                }
            }
        }
        if n == 0 {
            if !self.eof_checked {
                self.eof_checked = true;
                if self.state == State::Quoted {
                    return Err(self.fail((self.quote_line, "quoted field is never closed".into())));
                }
                if !self.utf8_carry.is_empty() {
                    return Err(self.fail((self.line, "invalid UTF-8".into())));
                }
            }
            return Ok(0);
        }
        let Some(chunk) = buf.get_mut(..n) else {
            return Ok(0);
        };
        let good = self.check(chunk);
        if good == 0 {
            if let Some(e) = self.pending.take() {
                return Err(self.fail(e));
            }
            // A chunk of nothing but CRs: read on rather than signal the end.
            return self.read(buf);
        }
        Ok(good)
    }
}

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
        state: non_empty("state"),
        // CSV has no version: the newest grammar, a superset of version 1.
        syntax: Syntax::V2,
    };
    validate_row(raw, line).map_err(to_import)
}
