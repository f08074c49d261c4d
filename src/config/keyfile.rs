//! Reader private keys on disk: refused unless only the owner can read them.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

/// A PEM key is a few hundred bytes; refuse to read anything much larger.
const MAX_KEY_FILE_BYTES: u64 = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("cannot read key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "key file {path} is readable by group or others (mode {mode:04o}); run: chmod 600 {path}"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("key file {path} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error("key file {path} is too large to be a key ({size} bytes)")]
    TooLarge { path: PathBuf, size: u64 },
    #[error("key file {path} holds no P-256 private key (expected PKCS#8 PEM, SEC1 PEM or 64 hex digits)")]
    Format { path: PathBuf },
}

/// Reads a P-256 private key: PKCS#8 PEM, SEC1 (`EC PRIVATE KEY`) PEM, or 64 hex digits.
/// The key material never appears in an error message.
pub fn load_private_key(path: &Path) -> Result<p256::SecretKey, KeyFileError> {
    let read_err = |source| KeyFileError::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(KeyFileError::NotAFile {
            path: path.to_owned(),
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    if meta.len() > MAX_KEY_FILE_BYTES {
        return Err(KeyFileError::TooLarge {
            path: path.to_owned(),
            size: meta.len(),
        });
    }
    let mut text = Zeroizing::new(String::new());
    file.take(MAX_KEY_FILE_BYTES)
        .read_to_string(&mut text)
        .map_err(read_err)?;
    parse_private_key(&text).ok_or_else(|| KeyFileError::Format {
        path: path.to_owned(),
    })
}

fn parse_private_key(text: &str) -> Option<p256::SecretKey> {
    use p256::pkcs8::DecodePrivateKey;
    let t = text.trim();
    if t.starts_with("-----BEGIN PRIVATE KEY-----") {
        return p256::SecretKey::from_pkcs8_pem(t).ok();
    }
    if t.starts_with("-----BEGIN EC PRIVATE KEY-----") {
        return p256::SecretKey::from_sec1_pem(t).ok();
    }
    let bytes = Zeroizing::new(hex::decode(t).ok()?);
    if bytes.len() != 32 {
        return None;
    }
    p256::SecretKey::from_slice(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn write(dir: &Path, name: &str, body: &str, mode: u32) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn formats_and_modes() {
        use p256::pkcs8::{EncodePrivateKey, LineEnding};
        let dir = tempfile::tempdir().unwrap();
        let key = p256::SecretKey::random(&mut rand_core::OsRng);
        let pem = key.to_pkcs8_pem(LineEnding::LF).unwrap();
        let p = write(dir.path(), "a.pem", &pem, 0o600);
        assert_eq!(load_private_key(&p).unwrap().to_bytes(), key.to_bytes());

        let sec1 = key.to_sec1_pem(LineEnding::LF).unwrap();
        let p = write(dir.path(), "b.pem", &sec1, 0o400);
        assert_eq!(load_private_key(&p).unwrap().to_bytes(), key.to_bytes());

        let hexkey = hex::encode(key.to_bytes());
        let p = write(dir.path(), "c.hex", &format!("{hexkey}\n"), 0o600);
        assert_eq!(load_private_key(&p).unwrap().to_bytes(), key.to_bytes());

        let p = write(dir.path(), "d.pem", &pem, 0o640);
        let e = load_private_key(&p).unwrap_err().to_string();
        assert!(e.contains("readable by group or others (mode 0640)"), "{e}");
        assert!(e.contains("chmod 600"), "{e}");

        let p = write(dir.path(), "e.pem", "not a key", 0o600);
        let e = load_private_key(&p).unwrap_err().to_string();
        assert!(e.contains("holds no P-256 private key"), "{e}");
        assert!(
            !e.contains("not a key"),
            "error must not echo file contents: {e}"
        );

        // Zero is not a valid scalar.
        let p = write(dir.path(), "f.hex", &"00".repeat(32), 0o600);
        assert!(load_private_key(&p).is_err());

        let e = load_private_key(&dir.path().join("missing")).unwrap_err();
        assert!(matches!(e, KeyFileError::Read { .. }));
    }
}
