//! The optional `[cloud]` table of keyway.toml. Absent: keyway runs standalone, as before.
//!
//! ```toml
//! [cloud]
//! brokers = ["mqtts://mqtt-a.example.net:8883", "mqtts://mqtt-b.example.net:8883"]
//! site = "hq"
//! gateway = "lobby-1"
//! prefix = "keyway"                  # topics: <prefix>/<site>/<gateway>/...
//! ca_file = "/etc/keyway/cloud-ca.pem"
//! client_cert_file = "/etc/keyway/cloud-cert.pem"   # mTLS, with client_key_file
//! client_key_file = "/etc/keyway/cloud-key.pem"
//! username = "lobby-1"               # with password_file (mode 0600)
//! password_file = "/etc/keyway/cloud-password"
//! heartbeat_s = 60
//! outbox_batch = 100
//! [[cloud.trusted_keys]]
//! kid = "backend-2026"
//! public_key = "04…"                 # hex SEC1 P-256
//! ```

use serde::Deserialize;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::msg::{check_id, check_prefix};
use super::sign::TrustedKeys;

/// Largest password file read.
const MAX_PASSWORD_BYTES: u64 = 4096;

/// `[cloud]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudConfig {
    pub brokers: Vec<String>,
    pub site: String,
    pub gateway: String,
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Default `keyway-<site>-<gateway>`.
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default = "default_heartbeat")]
    pub heartbeat_s: u64,
    #[serde(default = "default_batch")]
    pub outbox_batch: usize,
    #[serde(default)]
    pub trusted_keys: Vec<TrustedKeyConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustedKeyConfig {
    pub kid: String,
    pub public_key: String,
}

fn default_prefix() -> String {
    "keyway".into()
}
fn default_heartbeat() -> u64 {
    60
}
fn default_batch() -> usize {
    100
}

/// One broker to try.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        write!(f, "{scheme}://{}:{}", self.host, self.port)
    }
}

/// `mqtt://host[:port]` (1883) or `mqtts://host[:port]` (8883).
pub fn parse_broker(url: &str) -> Result<BrokerUrl, String> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("mqtts://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("mqtt://") {
        (false, r)
    } else {
        return Err(format!("{url:?} must start with mqtt:// or mqtts://"));
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{url:?}: port {p:?} is not 1..=65535"))?,
        ),
        None => (rest, if tls { 8883 } else { 1883 }),
    };
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if !host_ok {
        return Err(format!("{url:?}: host must be a DNS name or IPv4 address"));
    }
    Ok(BrokerUrl {
        tls,
        host: host.to_owned(),
        port,
    })
}

/// `[cloud]`, validated (paths resolved against the config file's directory).
#[derive(Debug, Clone)]
pub struct CloudSettings {
    pub brokers: Vec<BrokerUrl>,
    pub site: String,
    pub gateway: String,
    pub prefix: String,
    pub client_id: String,
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<(PathBuf, PathBuf)>,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    pub heartbeat: Duration,
    pub outbox_batch: usize,
    pub trusted_keys: TrustedKeys,
}

/// Validates `[cloud]`; errors are `(field, message)` with `cloud.`-prefixed field names.
/// `resolve` turns a relative path into one relative to the config file.
pub fn validate(
    raw: CloudConfig,
    resolve: impl Fn(&Path) -> PathBuf,
) -> Result<CloudSettings, (String, String)> {
    fn bad<T>(f: &str, m: String) -> Result<T, (String, String)> {
        Err((format!("cloud.{f}"), m))
    }
    if raw.brokers.is_empty() || raw.brokers.len() > 16 {
        return bad("brokers", "list 1 to 16 broker URLs".into());
    }
    let mut brokers = Vec::new();
    for (i, b) in raw.brokers.iter().enumerate() {
        match parse_broker(b) {
            Ok(u) => brokers.push(u),
            Err(m) => return bad(&format!("brokers[{i}]"), m),
        }
    }
    for (f, v) in [("site", &raw.site), ("gateway", &raw.gateway)] {
        if let Err(e) = check_id(v) {
            return bad(f, format!("{v:?}: {e}"));
        }
    }
    if let Err(e) = check_prefix(&raw.prefix) {
        return bad("prefix", format!("{:?}: {e}", raw.prefix));
    }
    let client_id = raw
        .client_id
        .clone()
        .unwrap_or_else(|| format!("keyway-{}-{}", raw.site, raw.gateway));
    // MQTT 3.1.1 servers must accept 1..=23 bytes; most accept more. Keep it printable.
    if client_id.is_empty()
        || client_id.len() > 128
        || !client_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return bad("client_id", "1..=128 bytes of A-Z a-z 0-9 - _ .".into());
    }
    let any_tls = brokers.iter().any(|b| b.tls);
    if any_tls && raw.ca_file.is_none() {
        return bad(
            "ca_file",
            "required with mqtts:// brokers (the broker's CA, PEM)".into(),
        );
    }
    let client_cert = match (&raw.client_cert_file, &raw.client_key_file) {
        (Some(c), Some(k)) => Some((resolve(c), resolve(k))),
        (None, None) => None,
        (Some(_), None) => return bad("client_key_file", "required with client_cert_file".into()),
        (None, Some(_)) => return bad("client_cert_file", "required with client_key_file".into()),
    };
    if client_cert.is_some() && !any_tls {
        return bad(
            "client_cert_file",
            "client certificates need mqtts:// brokers".into(),
        );
    }
    match (&raw.username, &raw.password_file) {
        (Some(u), _) if u.is_empty() || u.len() > 256 => {
            return bad("username", "1..=256 bytes".into())
        }
        (None, Some(_)) => return bad("username", "required with password_file".into()),
        _ => {}
    }
    if !(5..=3600).contains(&raw.heartbeat_s) {
        return bad(
            "heartbeat_s",
            format!("{} is out of range (5..=3600)", raw.heartbeat_s),
        );
    }
    if !(1..=1000).contains(&raw.outbox_batch) {
        return bad(
            "outbox_batch",
            format!("{} is out of range (1..=1000)", raw.outbox_batch),
        );
    }
    if raw.trusted_keys.is_empty() {
        return bad(
            "trusted_keys",
            "list at least one backend public key (kid, public_key): unsigned updates are never applied".into(),
        );
    }
    let trusted_keys = TrustedKeys::from_hex(
        raw.trusted_keys
            .iter()
            .map(|k| (k.kid.as_str(), k.public_key.as_str())),
    )
    .map_err(|(i, e)| (format!("cloud.trusted_keys[{i}]"), e.to_string()))?;
    Ok(CloudSettings {
        brokers,
        site: raw.site,
        gateway: raw.gateway,
        prefix: raw.prefix,
        client_id,
        ca_file: raw.ca_file.as_deref().map(&resolve),
        client_cert,
        username: raw.username,
        password_file: raw.password_file.as_deref().map(&resolve),
        heartbeat: Duration::from_secs(raw.heartbeat_s),
        outbox_batch: raw.outbox_batch,
        trusted_keys,
    })
}

/// Why a file named in `[cloud]` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CloudFileError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is readable by group or others (mode {mode:04o}); run: chmod 600 {}", path.display(), path.display())]
    Permissions { path: PathBuf, mode: u32 },
    #[error("{} is empty or larger than {MAX_PASSWORD_BYTES} bytes", path.display())]
    Size { path: PathBuf },
    #[error("{} holds no PEM {what}", path.display())]
    Pem { path: PathBuf, what: &'static str },
}

/// Reads the password file: mode 0600 (or stricter), one line, trailing newline dropped.
/// The password is never logged.
pub fn read_password(path: &Path) -> Result<zeroize::Zeroizing<String>, CloudFileError> {
    let read = |source| CloudFileError::Read {
        path: path.to_owned(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read)?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(CloudFileError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    if meta.len() == 0 || meta.len() > MAX_PASSWORD_BYTES {
        return Err(CloudFileError::Size {
            path: path.to_owned(),
        });
    }
    let text = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(read)?);
    Ok(zeroize::Zeroizing::new(
        text.trim_end_matches(['\r', '\n']).to_owned(),
    ))
}

/// Checks every file `[cloud]` names (check-config and start-up): the CA and client
/// certificate parse, the client key and password file are private.
pub fn check_files(s: &CloudSettings) -> Result<(), (String, CloudFileError)> {
    if let Some(ca) = &s.ca_file {
        super::link::load_certs(ca).map_err(|e| ("cloud.ca_file".to_owned(), e))?;
    }
    if let Some((cert, key)) = &s.client_cert {
        super::link::load_certs(cert).map_err(|e| ("cloud.client_cert_file".to_owned(), e))?;
        super::link::load_key(key).map_err(|e| ("cloud.client_key_file".to_owned(), e))?;
    }
    if let Some(p) = &s.password_file {
        read_password(p).map_err(|e| ("cloud.password_file".to_owned(), e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(extra: &str) -> Result<CloudSettings, (String, String)> {
        let pk = crate::cloud::sign::tests::signer(1, "k1").public_hex();
        let text = format!(
            "brokers = [\"mqtt://127.0.0.1:1883\"]\nsite = \"s1\"\ngateway = \"gw1\"\n{extra}\n\
             [[trusted_keys]]\nkid = \"k1\"\npublic_key = \"{pk}\"\n"
        );
        let c: CloudConfig = toml::from_str(&text).map_err(|e| ("toml".into(), e.to_string()))?;
        validate(c, |p| Path::new("/etc/keyway").join(p))
    }

    fn field(extra: &str) -> String {
        raw(extra).unwrap_err().0
    }

    #[test]
    fn defaults_and_field_named_errors() {
        let s = raw("").unwrap();
        assert_eq!(s.client_id, "keyway-s1-gw1");
        assert_eq!(s.prefix, "keyway");
        assert_eq!(s.brokers[0].port, 1883);
        assert_eq!(field("prefix = \"a/b/c/d\""), "cloud.prefix");
        assert_eq!(
            field("ca_file = \"ca.pem\"\nclient_cert_file = \"c.pem\""),
            "cloud.client_key_file"
        );
        assert_eq!(field("password_file = \"p\""), "cloud.username");
        assert_eq!(field("heartbeat_s = 1"), "cloud.heartbeat_s");
        assert_eq!(field("outbox_batch = 0"), "cloud.outbox_batch");
        assert_eq!(field("client_id = \"a b\""), "cloud.client_id");
        let tls = "brokers = [\"mqtts://h\"]";
        let t: CloudConfig = toml::from_str(&format!(
            "{tls}\nsite=\"s\"\ngateway=\"g\"\ntrusted_keys=[]"
        ))
        .unwrap();
        assert_eq!(
            validate(t, |p: &Path| p.to_path_buf()).unwrap_err().0,
            "cloud.ca_file"
        );
    }

    #[test]
    fn broker_urls() {
        assert_eq!(
            parse_broker("mqtts://mqtt.example.net").unwrap(),
            BrokerUrl {
                tls: true,
                host: "mqtt.example.net".into(),
                port: 8883
            }
        );
        assert_eq!(parse_broker("mqtt://10.0.0.1:1884").unwrap().port, 1884);
        for bad in [
            "http://h",
            "mqtt://",
            "mqtt://h:0",
            "mqtt://h:x",
            "mqtt://h h",
            "mqtt://u@h",
        ] {
            assert!(parse_broker(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn password_file_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, "s3cret\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_password(&p).unwrap_err();
        assert!(matches!(e, CloudFileError::Permissions { .. }));
        assert!(!e.to_string().contains("s3cret"));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_password(&p).unwrap().as_str(), "s3cret");
    }
}
