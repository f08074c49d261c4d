//! Fuzz target: arbitrary text as keyway.toml. Checks: no panic, errors are messages.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    if let Ok(text) = std::str::from_utf8(input) {
        let _ = keyway::config::parse(text, Path::new("/etc/keyway/keyway.toml"));
    }
});
