//! Persisted osdp_COMSET results: per PD (by its configured address) the bus address and
//! speed the panel moved it to, so a restart answers where the panel now looks.
//!
//! Format (JSON, written atomically: temporary file, fsync, rename):
//! `{"1": {"address": 5, "baud": 9600}}`. A missing file means no changes.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Larger than any real file; bounds what is read.
const MAX_COM_FILE: u64 = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComSetting {
    pub address: u8,
    pub baud: u32,
}

/// Configured address → current setting.
pub type ComSettings = BTreeMap<u8, ComSetting>;

#[derive(Debug, thiserror::Error)]
pub enum ComFileError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Format { path: String, message: String },
}

pub fn load_com_settings(path: &Path) -> Result<ComSettings, ComFileError> {
    let p = || path.display().to_string();
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ComSettings::new()),
        Err(source) => return Err(ComFileError::Io { path: p(), source }),
    };
    if meta.len() > MAX_COM_FILE {
        return Err(ComFileError::Format {
            path: p(),
            message: "too large".into(),
        });
    }
    let text =
        std::fs::read_to_string(path).map_err(|source| ComFileError::Io { path: p(), source })?;
    let raw: BTreeMap<String, ComSetting> =
        serde_json::from_str(&text).map_err(|e| ComFileError::Format {
            path: p(),
            message: e.to_string(),
        })?;
    let mut out = ComSettings::new();
    for (k, v) in raw {
        let key: u8 = k.parse().map_err(|_| ComFileError::Format {
            path: p(),
            message: format!("{k:?} is not a PD address"),
        })?;
        if key > 126 || v.address > 126 {
            return Err(ComFileError::Format {
                path: p(),
                message: format!("address out of range for PD {k}"),
            });
        }
        out.insert(key, v);
    }
    Ok(out)
}

pub fn store_com_settings(path: &Path, settings: &ComSettings) -> Result<(), ComFileError> {
    let p = || path.display().to_string();
    let raw: BTreeMap<String, ComSetting> =
        settings.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    let text = serde_json::to_string_pretty(&raw).map_err(|e| ComFileError::Format {
        path: p(),
        message: e.to_string(),
    })?;
    let mut tmp = path.as_os_str().to_os_string();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(|source| ComFileError::Io { path: p(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_validation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.com.json");
        assert!(load_com_settings(&path).unwrap().is_empty());
        let mut s = ComSettings::new();
        s.insert(
            1,
            ComSetting {
                address: 5,
                baud: 9600,
            },
        );
        store_com_settings(&path, &s).unwrap();
        assert_eq!(load_com_settings(&path).unwrap(), s);
        std::fs::write(&path, r#"{"1": {"address": 200, "baud": 9600}}"#).unwrap();
        assert!(load_com_settings(&path).is_err());
        std::fs::write(&path, r#"{"x": {"address": 2, "baud": 9600}}"#).unwrap();
        assert!(load_com_settings(&path).is_err());
        std::fs::write(&path, "not json").unwrap();
        assert!(load_com_settings(&path).is_err());
    }
}
