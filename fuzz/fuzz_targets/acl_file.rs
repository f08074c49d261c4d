//! Fuzz target: arbitrary bytes as an ACL import file (JSON and CSV).
//! Checks: no panic; a rejection names a line within the file.
#![no_main]

use std::path::Path;

use keyway::acl::import::parse_bytes;
use keyway::acl::FileKind;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let lines = input.iter().filter(|&&b| b == b'\n').count() as u64 + 1;
    for kind in [FileKind::Json, FileKind::Csv] {
        if let Err(e) = parse_bytes(input, kind, Path::new("fuzz")) {
            if let Some(line) = e.line() {
                assert!(line >= 1 && line <= lines, "line {line} of {lines}: {e}");
            }
        }
    }
});
