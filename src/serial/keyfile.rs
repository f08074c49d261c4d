//! SCBK key files: one per PD, 32 hex digits and a newline, mode 0600, owned by keyway.
//!
//! Loading refuses a file readable by group or others (a leaked SCBK lets anyone on the bus
//! impersonate the reader). Storing is atomic: a 0600 temporary file in the same directory,
//! fsync, rename over the old file, fsync the directory, so a power cut leaves either the old
//! or the new key, never half a key. Key bytes never appear in errors or logs.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::osdp::{KeyStore, Scbk};

/// A key file is tiny; anything longer is not ours.
const MAX_KEY_FILE: u64 = 256;

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: readable by group or others (mode {mode:o}); chmod 600")]
    Permissions { path: PathBuf, mode: u32 },
    #[error("{path}: not a 16-byte key in hex")]
    Format { path: PathBuf },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KeyFileError + '_ {
    move |source| KeyFileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Read the SCBK at `path`; `Ok(None)` when the file does not exist (no key installed yet).
pub fn load_scbk(path: &Path) -> Result<Option<Scbk>, KeyFileError> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(path)(e)),
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    if meta.len() > MAX_KEY_FILE {
        return Err(KeyFileError::Format {
            path: path.to_path_buf(),
        });
    }
    let mut text = std::fs::read_to_string(path).map_err(io(path))?;
    let parsed = hex::decode(text.trim())
        .ok()
        .and_then(|mut bytes| {
            let k = Scbk::from_slice(&bytes).ok();
            zeroize::Zeroize::zeroize(&mut bytes);
            k
        })
        .ok_or_else(|| KeyFileError::Format {
            path: path.to_path_buf(),
        });
    zeroize::Zeroize::zeroize(&mut text);
    parsed.map(Some)
}

/// Write `key` to `path` atomically with mode 0600.
pub fn store_scbk(path: &Path, key: &Scbk) -> Result<(), KeyFileError> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    // The keys directory under the state directory may not exist yet on a fresh install.
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io(dir))?;
    }
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    // A temporary left by a crash is stale; start afresh (create_new below must not fail on it).
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&tmp)(e)),
    }
    let mut text = hex::encode(key.expose());
    text.push('\n');
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    zeroize::Zeroize::zeroize(&mut text);
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io(path))
}

/// The adapter's [`KeyStore`]: the PD's key file.
#[derive(Debug, Clone)]
pub struct FileKeyStore {
    pub path: PathBuf,
}

impl KeyStore for FileKeyStore {
    fn store(&mut self, address: u8, key: &Scbk) -> Result<(), String> {
        store_scbk(&self.path, key).map_err(|e| {
            log::error!(address, error:% = e; "OSDP KEYSET: new SCBK could not be stored");
            e.to_string()
        })?;
        log::info!(address, path:? = self.path; "OSDP KEYSET: new SCBK stored");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_then_load_round_trip_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        // The keys directory is created on first KEYSET (fresh StateDirectory).
        let path = dir.path().join("keys/door.scbk");
        assert!(load_scbk(&path).unwrap().is_none());
        let key = Scbk::new([0xA5; 16]);
        store_scbk(&path, &key).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5\n"
        );
        assert_eq!(load_scbk(&path).unwrap(), Some(key));
        // Overwrite (key rotation), a stale temporary does not get in the way.
        let keys_mode = std::fs::metadata(dir.path().join("keys"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(keys_mode & 0o777, 0o700);
        std::fs::write(dir.path().join("keys/door.scbk.tmp"), "junk").unwrap();
        let key2 = Scbk::new([0x01; 16]);
        store_scbk(&path, &key2).unwrap();
        assert_eq!(load_scbk(&path).unwrap(), Some(key2));
        assert!(!dir.path().join("keys/door.scbk.tmp").exists());
    }

    #[test]
    fn load_refuses_open_permissions_and_bad_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        std::fs::write(&path, "00112233445566778899aabbccddeeff\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_scbk(&path).unwrap_err();
        assert!(matches!(err, KeyFileError::Permissions { mode: 0o644, .. }));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(load_scbk(&path).unwrap().is_some());
        for bad in ["0011", "zz112233445566778899aabbccddeeff", ""] {
            std::fs::write(&path, bad).unwrap();
            let err = load_scbk(&path).unwrap_err();
            assert!(matches!(err, KeyFileError::Format { .. }), "{bad}");
            // The error never carries key material.
            assert!(!err.to_string().contains("0011"));
        }
    }
}
