//! Log output: journald with structured fields when keyway runs under systemd, stderr otherwise.
//!
//! Every `log` key-value pair becomes a journald field (upper-cased by the journal logger), so
//! `journalctl -u keyway DOOR=front DECISION=denied` works. On stderr the same pairs are printed
//! as `key=value` after the message, which is what the bench and the tests read.

pub mod catalog;

use std::io::Write;

use log::kv::{Key, Value, VisitSource};
use log::{LevelFilter, Log, Metadata, Record};

/// Where log records go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// journald if our stderr is connected to the journal (systemd service), else stderr.
    Auto,
    Journal,
    Stderr,
}

/// Installs the global logger once. Falls back to stderr when the journal socket is absent.
pub fn init(target: Target, level: LevelFilter) {
    let want_journal = match target {
        Target::Auto => systemd_journal_logger::connected_to_journal(),
        Target::Journal => true,
        Target::Stderr => false,
    };
    if want_journal {
        if let Ok(journal) = systemd_journal_logger::JournalLog::new() {
            let journal = journal.with_syslog_identifier("keyway".to_string());
            if journal.install().is_ok() {
                log::set_max_level(level);
                return;
            }
        }
        eprintln!("keyway: journald socket not available, logging to stderr");
    }
    if log::set_boxed_logger(Box::new(StderrLog)).is_ok() {
        log::set_max_level(level);
    }
}

struct StderrLog;

impl Log for StderrLog {
    fn enabled(&self, _: &Metadata) -> bool {
        true
    }

    fn log(&self, record: &Record) {
        let mut line = format!(
            "{:<5} {}: {}",
            record.level(),
            record.target(),
            record.args()
        );
        let mut kv = KvLine(&mut line);
        let _ = record.key_values().visit(&mut kv);
        line.push('\n');
        // One write per record so lines from several tasks never interleave.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {
        let _ = std::io::stderr().flush();
    }
}

struct KvLine<'a>(&'a mut String);

impl<'kvs> VisitSource<'kvs> for KvLine<'_> {
    fn visit_pair(&mut self, key: Key<'kvs>, value: Value<'kvs>) -> Result<(), log::kv::Error> {
        let v = value.to_string();
        // Quote values a reader could split wrongly.
        if v.is_empty() || v.contains(char::is_whitespace) || v.contains('"') {
            self.0.push_str(&format!(" {key}={v:?}"));
        } else {
            self.0.push_str(&format!(" {key}={v}"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_pairs_are_rendered_and_quoted() {
        let mut s = String::new();
        let pairs: [(&str, &str); 3] = [("door", "front"), ("reason", "wrong door"), ("e", "")];
        let mut v = KvLine(&mut s);
        for (k, val) in pairs {
            v.visit_pair(Key::from_str(k), Value::from(val)).unwrap();
        }
        assert_eq!(s, " door=front reason=\"wrong door\" e=\"\"");
    }
}
