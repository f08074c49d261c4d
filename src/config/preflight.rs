//! What `check-config` verifies beyond the file itself: that the places keyway writes at run
//! time can be written, and that the serial ports exist. The daemon does not run these checks
//! (a USB serial adapter may appear after start-up; the bus task retries), `check-config` and
//! so the unit's `ExecStartPre` do, under the same sandbox as the daemon.

use std::path::{Path, PathBuf};

use super::Validated;

/// Where the unit's `StateDirectory=keyway` puts keyway's writable state.
pub const STATE_DIR: &str = "/var/lib/keyway";

/// One problem, with the field it is about and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub field: String,
    pub message: String,
    /// keyway cannot run with it; otherwise a warning (it runs, with less).
    pub fatal: bool,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Every problem found; empty when the run-time paths are usable.
pub fn check(cfg: &Validated) -> Vec<Problem> {
    let mut problems = Vec::new();
    if let Err(m) = writable_file_dir(&cfg.daemon.database).map_err(with_state_hint) {
        // An existing database on a disk that takes no writes is still served (read-only, so
        // grants go on): refusing to start would stop every door.
        let readable = std::fs::File::open(&cfg.daemon.database).is_ok();
        problems.push(Problem {
            field: "daemon.database".into(),
            message: if readable {
                format!(
                    "{m}; keyway will serve grants READ-ONLY from it and store no events until \
                     it can write"
                )
            } else {
                m
            },
            fatal: !readable,
        });
    }
    for door in &cfg.doors {
        let name = format!("door \"{}\"", door.id);
        if let Some(path) = door.osdp.scbk_file.as_ref() {
            // The panel's osdp_KEYSET rewrites this file (install mode and key rotation).
            if let Err(m) = writable_file_dir(path).map_err(with_state_hint) {
                problems.push(Problem {
                    field: format!("{name}: osdp.scbk_file"),
                    message: m,
                    fatal: true,
                });
            }
        }
        if let Err(m) = serial_port_exists(&door.port) {
            problems.push(Problem {
                field: format!("{name}: osdp.port"),
                message: m,
                fatal: true,
            });
        }
    }
    problems
}

fn with_state_hint(m: String) -> String {
    format!(
        "{m}; keep files keyway writes under {STATE_DIR} (the unit's StateDirectory: the rest \
         of the system is read-only to the service)"
    )
}

/// Can a file at `path` be created or replaced? Checks the nearest existing directory above it
/// (keyway creates missing directories below that one).
fn writable_file_dir(path: &Path) -> Result<(), String> {
    let Some(mut dir) = path.parent().map(Path::to_path_buf) else {
        return Err(format!("{} has no directory", path.display()));
    };
    if dir.as_os_str().is_empty() {
        dir = PathBuf::from(".");
    }
    // Bounded walk up: a path has finitely many components.
    let existing = loop {
        match std::fs::metadata(&dir) {
            Ok(m) if m.is_dir() => break dir,
            Ok(_) => return Err(format!("{} is not a directory", dir.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match dir.parent() {
                Some(p) if !p.as_os_str().is_empty() => dir = p.to_path_buf(),
                _ => return Err(format!("no directory of {} exists", path.display())),
            },
            Err(e) => return Err(format!("{}: {e}", dir.display())),
        }
    };
    if let Ok(m) = std::fs::metadata(path) {
        if m.is_dir() {
            return Err(format!("{} is a directory", path.display()));
        }
    }
    match access_write(&existing) {
        Ok(()) => Ok(()),
        Err(e) => Err(format!(
            "{} cannot be written ({}: {e})",
            path.display(),
            existing.display()
        )),
    }
}

/// `access(W_OK)`: also reports a read-only mount (EROFS), which mode bits do not show.
fn access_write(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    let rc = unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn serial_port_exists(port: &Path) -> Result<(), String> {
    match std::fs::metadata(port) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(format!(
            "{} does not exist; is the RS-485 adapter plugged in? `ls /dev/serial/by-id/` lists \
             USB adapters by a name that survives replugging",
            port.display()
        )),
        Err(e) => Err(format!("{}: {e}", port.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn config(dir: &Path, database: &Path, scbk: &Path, port: &Path) -> Validated {
        let text = format!(
            r#"
[daemon]
database = "{}"
[[door]]
id = "front"
osdp = {{ port = "{}", address = 1, scbk_file = "{}", install_mode = true }}
nfc = {{ reader = "r" }}
aliro = {{ group_id = "00112233445566778899aabbccddeeff", sub_id = "ffeeddccbbaa99887766554433221100", private_key_file = "k.pem" }}
"#,
            database.display(),
            port.display(),
            scbk.display()
        );
        super::super::parse(&text, &dir.join("keyway.toml")).unwrap()
    }

    #[test]
    fn writable_paths_and_an_existing_port_pass() {
        let dir = tempfile::tempdir().unwrap();
        let port = dir.path().join("tty");
        std::fs::write(&port, "").unwrap();
        // keys/ does not exist yet: KEYSET creates it.
        let cfg = config(
            dir.path(),
            &dir.path().join("keyway.db"),
            &dir.path().join("keys/front.scbk"),
            &port,
        );
        assert_eq!(check(&cfg), vec![]);
    }

    #[test]
    fn unwritable_directories_and_a_missing_port_are_named_with_a_hint() {
        let dir = tempfile::tempdir().unwrap();
        // A regular file where a directory should be fails for root too.
        let file = dir.path().join("file");
        std::fs::write(&file, "").unwrap();
        let mut cases = vec![(file, "not a directory")];
        // Mode bits: root passes them (the read-only mount of the packaged unit is proven by
        // scripts/package-check).
        if unsafe { libc::geteuid() } != 0 {
            let ro = dir.path().join("ro");
            std::fs::create_dir(&ro).unwrap();
            std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o500)).unwrap();
            cases.push((ro, "cannot be written"));
        }
        for (bad, why) in cases {
            let cfg = config(
                dir.path(),
                &bad.join("keyway.db"),
                &bad.join("keys/front.scbk"),
                &dir.path().join("ttyUSB9"),
            );
            assert_problems(&check(&cfg), why);
        }
    }

    fn assert_problems(p: &[Problem], why: &str) {
        assert_eq!(p.len(), 3, "{p:?}");
        assert_eq!(p[0].field, "daemon.database");
        assert!(p[0].message.contains(STATE_DIR), "{}", p[0]);
        assert!(p[0].message.to_lowercase().contains(why), "{}", p[0]);
        assert_eq!(p[1].field, "door \"front\": osdp.scbk_file");
        assert!(p[1].message.to_lowercase().contains(why), "{}", p[1]);
        assert_eq!(p[2].field, "door \"front\": osdp.port");
        assert!(p[2].message.contains("does not exist"), "{}", p[2]);
    }
}
