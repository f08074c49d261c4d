//! keyway's configuration: one TOML file (`/etc/keyway/keyway.toml` by default).
//!
//! Parsing is serde with `deny_unknown_fields` so a typo is an error, not a silently ignored
//! setting. Validation then checks what serde cannot (ranges, cross-references, key files) and
//! every error names the field it is about, e.g. `door "front": osdp.address: 200 is out of
//! range (0..=126)`.

mod keyfile;
pub mod preflight;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use keyfile::{load_private_key, KeyFileError};

/// Where the daemon and the CLI look when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/keyway/keyway.toml";

/// Config files are small; anything larger is a mistake (or an attack on the parser).
const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is {size} bytes; the limit is {MAX_CONFIG_BYTES}")]
    TooLarge { path: PathBuf, size: u64 },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}: {field}: {message}")]
    Invalid {
        path: PathBuf,
        field: String,
        message: String,
    },
}

/// The whole file, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub daemon: DaemonConfig,
    #[serde(default)]
    pub nfc: NfcConfig,
    #[serde(default)]
    pub osdp: OsdpConfig,
    #[serde(default)]
    pub events: EventsConfig,
    #[serde(default)]
    pub site: SiteConfig,
    #[serde(default, rename = "door")]
    pub doors: Vec<DoorConfig>,
    /// Optional MQTT cloud link; absent = standalone.
    #[serde(default)]
    pub cloud: Option<crate::cloud::config::CloudConfig>,
}

/// `[site]`: where the gateway is.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    /// IANA time zone (`Europe/Berlin`) whose wall clock ACL schedules and holidays follow.
    /// Default: the system's (`/etc/localtime`).
    #[serde(default)]
    pub time_zone: Option<String>,
}

/// `[events]`: how many access events the outbox keeps (docs/events.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsConfig {
    /// Most events kept; the oldest are pruned first, delivered or not (those not delivered
    /// are counted). 10,000..=100,000,000.
    #[serde(default = "default_max_events")]
    pub max_rows: u64,
    /// Events older than this many days are pruned; 0 = no age limit (the default).
    #[serde(default)]
    pub max_age_days: u32,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            max_rows: default_max_events(),
            max_age_days: 0,
        }
    }
}

fn default_max_events() -> u64 {
    crate::events::DEFAULT_MAX_EVENTS
}

/// Bounds of `[events]`: below 10,000 rows an outage of a busy door loses events at once;
/// above 100M the database outgrows an SD card.
const MAX_EVENTS_RANGE: std::ops::RangeInclusive<u64> = 10_000..=100_000_000;
const MAX_AGE_DAYS: u32 = 3650;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// The SQLite store: ACL, events.
    #[serde(default = "default_database")]
    pub database: PathBuf,
    /// `error`, `warn`, `info`, `debug` or `trace`.
    #[serde(default = "default_log_level")]
    pub log_level: String,
    /// The Unix socket `keyway status` asks (in systemd's RuntimeDirectory).
    #[serde(default = "default_status_socket")]
    pub status_socket: PathBuf,
    /// Warn (ACL_STALE) when the ACL has not changed for this many hours; absent: never.
    #[serde(default)]
    pub acl_max_age_hours: Option<u32>,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            database: default_database(),
            log_level: default_log_level(),
            status_socket: default_status_socket(),
            acl_max_age_hours: None,
        }
    }
}

/// Where `keyway status` finds the daemon by default.
pub const DEFAULT_STATUS_SOCKET: &str = "/run/keyway/status.sock";

fn default_status_socket() -> PathBuf {
    PathBuf::from(DEFAULT_STATUS_SOCKET)
}

fn default_database() -> PathBuf {
    PathBuf::from("/var/lib/keyway/keyway.db")
}
fn default_log_level() -> String {
    "info".into()
}

/// Timing of the NFC side; defaults suit a phone held to a reader.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NfcConfig {
    /// Longest wait for one APDU's answer before the tap is abandoned.
    #[serde(default = "default_apdu_timeout_ms")]
    pub apdu_timeout_ms: u64,
    /// Longest a whole transaction may take, from card present to EXCHANGE answered.
    #[serde(default = "default_transaction_timeout_ms")]
    pub transaction_timeout_ms: u64,
    /// How often a missing reader is looked for again.
    #[serde(default = "default_reader_retry_ms")]
    pub reader_retry_ms: u64,
    /// After a grant, how long the phone's answer waits for the panel's verdict (its LED after
    /// the card read), so the phone is told what the panel decided; 0 = do not wait.
    #[serde(default = "default_panel_verdict_wait_ms")]
    pub panel_verdict_wait_ms: u64,
}

impl Default for NfcConfig {
    fn default() -> Self {
        Self {
            apdu_timeout_ms: default_apdu_timeout_ms(),
            transaction_timeout_ms: default_transaction_timeout_ms(),
            reader_retry_ms: default_reader_retry_ms(),
            panel_verdict_wait_ms: default_panel_verdict_wait_ms(),
        }
    }
}

fn default_apdu_timeout_ms() -> u64 {
    1000
}
fn default_transaction_timeout_ms() -> u64 {
    5000
}
fn default_reader_retry_ms() -> u64 {
    1000
}
fn default_panel_verdict_wait_ms() -> u64 {
    1000
}

impl NfcConfig {
    pub fn apdu_timeout(&self) -> Duration {
        Duration::from_millis(self.apdu_timeout_ms)
    }
    pub fn transaction_timeout(&self) -> Duration {
        Duration::from_millis(self.transaction_timeout_ms)
    }
    pub fn reader_retry(&self) -> Duration {
        Duration::from_millis(self.reader_retry_ms)
    }
    pub fn panel_verdict_wait(&self) -> Duration {
        Duration::from_millis(self.panel_verdict_wait_ms)
    }
}

/// What keyway tells the panel about itself in osdp_PDID.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OsdpConfig {
    /// IEEE OUI of the vendor, 3 bytes as hex.
    #[serde(default = "default_vendor_code")]
    pub vendor_code: String,
    #[serde(default = "default_model")]
    pub model: u8,
    #[serde(default)]
    pub serial_number: u32,
}

impl Default for OsdpConfig {
    fn default() -> Self {
        Self {
            vendor_code: default_vendor_code(),
            model: default_model(),
            serial_number: 0,
        }
    }
}

fn default_vendor_code() -> String {
    "000000".into()
}
fn default_model() -> u8 {
    1
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DoorConfig {
    /// Stable id used in the ACL (`doors`), events and logs.
    pub id: String,
    pub osdp: DoorOsdp,
    pub nfc: DoorNfc,
    pub aliro: DoorAliro,
    /// Relay outputs this reader drives (advertised to the panel in osdp_PDCAP).
    #[serde(default)]
    pub outputs: u8,
    /// A sensitive door requires user verification (biometric/PIN) on the phone: AUTH0 asks
    /// for it (policy 03) and a phone that does not report it is denied with
    /// `user_verification_required`. Default false.
    #[serde(default)]
    pub sensitive: bool,
    /// Accept physical cards (identified by UID) at this door during a cutover. UID-only cards
    /// are clonable: keyway warns at start-up for every door that accepts them. Default false.
    #[serde(default)]
    pub accept_cards: bool,
    /// Optional `[door.ble]`: Aliro over Bluetooth LE on this door (docs/ble.md).
    #[serde(default)]
    pub ble: Option<DoorBle>,
    /// Optional offline policy: how long cached grants stay valid without the cloud (needs
    /// `[cloud]`). Off by default: grants continue from the cached ACL however long the link
    /// is down.
    #[serde(default)]
    pub cloud_offline: Option<CloudOfflineConfig>,
}

/// `cloud_offline = { limit_s = 3600, fail_secure = true }` on a door.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudOfflineConfig {
    /// Seconds without the cloud after which the policy applies (60..=2592000, 30 days).
    pub limit_s: u64,
    /// After the limit: `true` denies grants (`cloud_offline`), `false` keeps granting and
    /// reports it. Default false.
    #[serde(default)]
    pub fail_secure: bool,
}

/// Range of [`CloudOfflineConfig::limit_s`].
pub const CLOUD_OFFLINE_LIMIT_S: std::ops::RangeInclusive<u64> = 60..=30 * 86_400;

/// `[door.ble]`: the door's BLE side. Every field is optional; defaults in docs/ble.md.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DoorBle {
    /// Serve this door over BLE (default true once the table is present).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// BlueZ adapter name (`hci0`); default: BlueZ's default adapter.
    #[serde(default)]
    pub adapter: Option<String>,
    /// Weakest signal (dBm) at which a phone is served in walk-up mode (-100..=0).
    #[serde(default = "default_rssi_threshold")]
    pub rssi_threshold_dbm: i16,
    /// `tap` (the user taps in the app; any range) or `walk_up` (automatic, needs the RSSI).
    #[serde(default)]
    pub mode: BleMode,
    /// Phones served at once (1..=16); more are disconnected at once.
    #[serde(default = "default_ble_max_connections")]
    pub max_connections: usize,
    /// L2CAP LE credit-based channel PSM (0x80..=0xFF).
    #[serde(default = "default_ble_spsm")]
    pub spsm: u16,
    /// Whole-connection limit: a phone that has not finished by then is dropped (500..=60000).
    #[serde(default = "default_ble_timeout_ms")]
    pub timeout_ms: u64,
    /// After a grant, how long the phone waits for the panel's verdict (0..=5000, less than
    /// `timeout_ms`); default: `nfc.panel_verdict_wait_ms`, filled in by validation.
    #[serde(default)]
    pub panel_verdict_wait_ms: Option<u64>,
}

/// How a phone shows intent on BLE.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BleMode {
    /// The user taps the door in the app: served at any signal strength.
    #[default]
    Tap,
    /// The phone starts by itself when near: served only at or above the RSSI threshold.
    WalkUp,
}

fn default_true() -> bool {
    true
}
fn default_rssi_threshold() -> i16 {
    -70
}
fn default_ble_max_connections() -> usize {
    4
}
fn default_ble_spsm() -> u16 {
    0x0080
}
fn default_ble_timeout_ms() -> u64 {
    5000
}

impl DoorBle {
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    pub fn panel_verdict_wait(&self) -> Duration {
        Duration::from_millis(
            self.panel_verdict_wait_ms
                .unwrap_or_else(default_panel_verdict_wait_ms),
        )
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DoorOsdp {
    /// Serial device of the RS-485 bus; doors on one bus share it.
    pub port: PathBuf,
    #[serde(default = "default_baud")]
    pub baud: u32,
    /// This door's PD address on the bus.
    pub address: u8,
    /// OSDP secure channel: file holding this PD's SCBK (32 hex digits, mode 0600). Absent
    /// (the default) = plaintext only. With `install_mode`, the file may be missing: the
    /// panel's osdp_KEYSET creates it.
    #[serde(default)]
    pub scbk_file: Option<PathBuf>,
    /// Accept the default key SCBK-D until the panel installs a key (default false).
    #[serde(default)]
    pub install_mode: bool,
    /// Outside a secure session answer only ID, CAP and the handshake in clear (default false).
    #[serde(default)]
    pub enforce_secure: bool,
    /// How long after a card is delivered the panel's LED/buzzer commands count as its
    /// verdict (default 2000 ms).
    #[serde(default)]
    pub verdict_window_ms: Option<u64>,
}

fn default_baud() -> u32 {
    9600
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DoorNfc {
    /// PC/SC reader name, exact, or a pattern where `*` matches any run of characters.
    pub reader: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DoorAliro {
    /// Reader group identifier, 16 bytes as hex.
    pub group_id: String,
    /// Reader group sub-identifier, 16 bytes as hex.
    pub sub_id: String,
    /// The reader's long-term P-256 private key (PKCS#8 or SEC1 PEM, or 64 hex digits); 0600.
    pub private_key_file: PathBuf,
    /// Aliro authentication policy sent in AUTH0 (tag 42).
    #[serde(default)]
    pub auth_policy: AuthPolicy,
    /// Offer Aliro FAST (stored Kpersistent) to phones seen before. Default true.
    #[serde(default = "default_true")]
    pub fast: bool,
    /// Require a step-up Access Document from these issuers. Absent (default): no step-up.
    #[serde(default)]
    pub step_up: Option<StepUpConfig>,
    /// LOAD CERT: a reader certificate issued by the reader group key. Then
    /// `private_key_file` is the certificate's subject key (the group private key stays off
    /// the box) and `group_public_key` enters the key schedule. Absent (default): the reader
    /// signs with the group key itself.
    #[serde(default)]
    pub certificate: Option<CertificateConfig>,
}

/// `aliro.certificate`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateConfig {
    /// File holding the compressed reader certificate (profile 0000) as hex.
    pub file: PathBuf,
    /// The reader group public key that issued it, hex of the uncompressed point.
    pub group_public_key: String,
}

/// A loaded reader certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReaderCert {
    pub certificate: Vec<u8>,
    pub group_public_key: p256::PublicKey,
}

/// Largest accepted reader certificate (a compressed profile-0000 one is ~100 bytes).
pub const MAX_CERTIFICATE_BYTES: usize = 1024;

/// `aliro.step_up`: the Access Document a door requires.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepUpConfig {
    /// Trusted issuer public keys, hex of the uncompressed P-256 point (`04||X||Y`).
    pub issuers: Vec<String>,
    /// Element identifiers (namespace `aliro-a`) requested; a grant needs every one of them.
    pub elements: Vec<String>,
}

/// A validated [`StepUpConfig`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepUp {
    pub issuers: Vec<p256::PublicKey>,
    pub elements: Vec<String>,
}

fn load_certificate(file: &Path, group_public_key: &str) -> Result<ReaderCert, String> {
    let meta = std::fs::metadata(file).map_err(|e| format!("{}: {e}", file.display()))?;
    // Hex text: twice the bytes, plus whitespace.
    if meta.len() > (MAX_CERTIFICATE_BYTES as u64) * 2 + 64 {
        return Err(format!(
            "{}: larger than a reader certificate",
            file.display()
        ));
    }
    let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let hex_digits: String = text.split_whitespace().collect();
    let certificate =
        hex::decode(&hex_digits).map_err(|e| format!("{}: not hex: {e}", file.display()))?;
    if certificate.is_empty() || certificate.len() > MAX_CERTIFICATE_BYTES {
        return Err(format!(
            "{}: certificate must be 1-{MAX_CERTIFICATE_BYTES} bytes",
            file.display()
        ));
    }
    let key = hex::decode(group_public_key.trim())
        .map_err(|e| format!("group_public_key not hex: {e}"))?;
    let group_public_key = p256::PublicKey::from_sec1_bytes(&key)
        .map_err(|_| "group_public_key is not a P-256 point".to_string())?;
    Ok(ReaderCert {
        certificate,
        group_public_key,
    })
}

fn validate_step_up(su: &StepUpConfig) -> Result<StepUp, String> {
    if su.issuers.is_empty() || su.issuers.len() > 16 {
        return Err("issuers: list 1 to 16 trusted issuer keys".into());
    }
    let mut issuers = Vec::with_capacity(su.issuers.len());
    for h in &su.issuers {
        let bytes = hex::decode(h.trim()).map_err(|e| format!("issuer key not hex: {e}"))?;
        let key = p256::PublicKey::from_sec1_bytes(&bytes)
            .map_err(|_| "issuer key is not a P-256 point".to_string())?;
        issuers.push(key);
    }
    if su.elements.is_empty() || su.elements.len() > 16 {
        return Err("elements: list 1 to 16 element identifiers".into());
    }
    if let Some(bad) = su
        .elements
        .iter()
        .find(|e| e.is_empty() || e.len() > 64 || e.chars().any(char::is_control))
    {
        return Err(format!(
            "element identifier {bad:?} must be 1-64 printable characters"
        ));
    }
    Ok(StepUp {
        issuers,
        elements: su.elements.clone(),
    })
}

/// AUTH0 tag 42: what the reader asks of the phone's user verification.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AuthPolicy {
    /// Follow the user-device setting (01).
    #[default]
    UserDeviceSetting,
    /// The user-device setting for a secure action (02).
    SecureAction,
    /// Force user authentication (03).
    ForceUserAuth,
}

impl AuthPolicy {
    pub fn code(self) -> u8 {
        match self {
            Self::UserDeviceSetting => 0x01,
            Self::SecureAction => 0x02,
            Self::ForceUserAuth => 0x03,
        }
    }
}

/// A door after validation: ids decoded, ready for the daemon.
#[derive(Debug, Clone)]
pub struct Door {
    pub id: String,
    pub port: PathBuf,
    pub baud: u32,
    pub address: u8,
    pub outputs: u8,
    pub reader_pattern: String,
    pub group_id: [u8; 16],
    pub sub_id: [u8; 16],
    pub private_key_file: PathBuf,
    pub auth_policy: AuthPolicy,
    /// See [`DoorConfig::sensitive`].
    pub sensitive: bool,
    /// See [`DoorConfig::accept_cards`].
    pub accept_cards: bool,
    /// See [`DoorAliro::fast`].
    pub fast: bool,
    /// See [`DoorAliro::step_up`].
    pub step_up: Option<StepUp>,
    /// See [`DoorAliro::certificate`].
    pub certificate: Option<ReaderCert>,
    /// The door's OSDP options beyond its address (secure channel, verdict window).
    pub osdp: OsdpDoorOptions,
    /// The door's BLE side, when served over BLE (`panel_verdict_wait_ms` filled in).
    pub ble: Option<DoorBle>,
    /// See [`DoorConfig::cloud_offline`].
    pub cloud_offline: Option<crate::cloud::contact::OfflinePolicy>,
}

impl Door {
    /// The AUTH0 authentication policy the door asks phones for: a sensitive door forces user
    /// verification (policy 03) whatever `auth_policy` says. Same on NFC and BLE.
    pub fn aliro_auth_policy(&self) -> u8 {
        if self.sensitive {
            AuthPolicy::ForceUserAuth.code()
        } else {
            self.auth_policy.code()
        }
    }
}

/// Everything the daemon needs, validated.
#[derive(Debug, Clone)]
pub struct Validated {
    pub source: PathBuf,
    pub daemon: DaemonConfig,
    pub log_level: log::LevelFilter,
    pub nfc: NfcConfig,
    pub vendor_code: [u8; 3],
    pub model: u8,
    pub serial_number: u32,
    /// `[events]`, validated.
    pub events: crate::events::Retention,
    /// `[site] time_zone`, resolved (the system's when not set).
    pub time_zone: jiff::tz::TimeZone,
    pub doors: Vec<Door>,
    /// `[cloud]`, when configured.
    pub cloud: Option<crate::cloud::config::CloudSettings>,
}

/// A door's optional OSDP settings, validated ([`Door::osdp`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OsdpDoorOptions {
    pub scbk_file: Option<PathBuf>,
    pub install_mode: bool,
    pub enforce_secure: bool,
    pub verdict_window: Duration,
}

impl Default for OsdpDoorOptions {
    /// Plaintext, the default verdict window: what a door without options gets.
    fn default() -> Self {
        Self {
            scbk_file: None,
            install_mode: false,
            enforce_secure: false,
            verdict_window: DEFAULT_VERDICT_WINDOW,
        }
    }
}

/// Default window for reading the panel's verdict from its LED/buzzer commands.
pub const DEFAULT_VERDICT_WINDOW: Duration = Duration::from_secs(2);

impl Validated {
    /// Doors grouped by serial port: one OSDP bus task per port.
    pub fn buses(&self) -> BTreeMap<PathBuf, Vec<&Door>> {
        let mut buses: BTreeMap<PathBuf, Vec<&Door>> = BTreeMap::new();
        for d in &self.doors {
            buses.entry(d.port.clone()).or_default().push(d);
        }
        buses
    }
}

/// Reads, parses and validates `path`. Key files are checked too (mode and contents), so a
/// config that passes here will not fail at start-up for a key.
pub fn load(path: &Path) -> Result<Validated, ConfigError> {
    let validated = read(path)?;
    for door in &validated.doors {
        load_private_key(&door.private_key_file).map_err(|e| ConfigError::Invalid {
            path: path.to_owned(),
            field: format!("door \"{}\": aliro.private_key_file", door.id),
            message: e.to_string(),
        })?;
    }
    if let Some(c) = &validated.cloud {
        crate::cloud::config::check_files(c).map_err(|(field, e)| ConfigError::Invalid {
            path: path.to_owned(),
            field,
            message: e.to_string(),
        })?;
    }
    Ok(validated)
}

/// Reads, parses and validates `path` without opening the key files it names: for the
/// commands a member of group keyway runs (`keyway status`), who cannot read the daemon's
/// private keys (0600, user keyway).
pub fn read(path: &Path) -> Result<Validated, ConfigError> {
    let meta = std::fs::metadata(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(ConfigError::TooLarge {
            path: path.to_owned(),
            size: meta.len(),
        });
    }
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text, path)
}

/// Parses and validates config text; does not touch key files (see [`load`]).
pub fn parse(text: &str, path: &Path) -> Result<Validated, ConfigError> {
    let raw: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string().trim_end().to_owned(),
    })?;
    validate(raw, path)
}

fn validate(raw: Config, path: &Path) -> Result<Validated, ConfigError> {
    let invalid = |field: String, message: String| ConfigError::Invalid {
        path: path.to_owned(),
        field,
        message,
    };

    let cloud = raw
        .cloud
        .clone()
        .map(|c| crate::cloud::config::validate(c, |p| resolve(path, p)))
        .transpose()
        .map_err(|(field, message)| invalid(field, message))?;
    let log_level: log::LevelFilter = raw.daemon.log_level.parse().map_err(|_| {
        invalid(
            "daemon.log_level".into(),
            format!(
                "{:?} is not one of error, warn, info, debug, trace",
                raw.daemon.log_level
            ),
        )
    })?;
    if raw.daemon.database.as_os_str().is_empty() {
        invalid_empty(&invalid, "daemon.database")?;
    }
    if raw.daemon.status_socket.as_os_str().is_empty() {
        invalid_empty(&invalid, "daemon.status_socket")?;
    }
    if raw.daemon.acl_max_age_hours == Some(0) {
        return Err(invalid(
            "daemon.acl_max_age_hours".into(),
            "0 would always warn; leave it out to not check the ACL's age".into(),
        ));
    }
    for (field, value, min, max) in [
        ("nfc.apdu_timeout_ms", raw.nfc.apdu_timeout_ms, 50, 30_000),
        (
            "nfc.transaction_timeout_ms",
            raw.nfc.transaction_timeout_ms,
            100,
            60_000,
        ),
        ("nfc.reader_retry_ms", raw.nfc.reader_retry_ms, 50, 60_000),
    ] {
        if !(min..=max).contains(&value) {
            return Err(invalid(
                field.into(),
                format!("{value} is out of range ({min}..={max})"),
            ));
        }
    }
    check_verdict_wait(
        raw.nfc.panel_verdict_wait_ms,
        raw.nfc.transaction_timeout_ms,
        "nfc.transaction_timeout_ms",
    )
    .map_err(|m| invalid("nfc.panel_verdict_wait_ms".into(), m))?;
    if !MAX_EVENTS_RANGE.contains(&raw.events.max_rows) {
        return Err(invalid(
            "events.max_rows".into(),
            format!(
                "{} is out of range ({}..={})",
                raw.events.max_rows,
                MAX_EVENTS_RANGE.start(),
                MAX_EVENTS_RANGE.end()
            ),
        ));
    }
    if raw.events.max_age_days > MAX_AGE_DAYS {
        return Err(invalid(
            "events.max_age_days".into(),
            format!(
                "{} is out of range (0..={MAX_AGE_DAYS}; 0 = no age limit)",
                raw.events.max_age_days
            ),
        ));
    }
    let time_zone = match &raw.site.time_zone {
        None => jiff::tz::TimeZone::system(),
        Some(name) => jiff::tz::TimeZone::get(name).map_err(|e| {
            invalid(
                "site.time_zone".into(),
                format!("{name:?} is not a known IANA time zone (like Europe/Berlin): {e}"),
            )
        })?,
    };
    let events = crate::events::Retention {
        max_rows: raw.events.max_rows,
        max_age_ms: (raw.events.max_age_days > 0)
            .then(|| i64::from(raw.events.max_age_days) * 86_400_000),
    };
    let vendor_code: [u8; 3] = decode_hex_array(&raw.osdp.vendor_code)
        .map_err(|m| invalid("osdp.vendor_code".into(), m))?;

    if raw.doors.is_empty() {
        return Err(invalid(
            "door".into(),
            "no door configured; add at least one [[door]] table (the packaged file has a \
             commented example to copy; fields: /usr/share/doc/keyway/README.md), then run \
             `keyway check-config` again"
                .into(),
        ));
    }
    let mut ids = BTreeSet::new();
    let mut addresses = BTreeSet::new();
    let mut bauds: BTreeMap<PathBuf, u32> = BTreeMap::new();
    let mut doors = Vec::with_capacity(raw.doors.len());
    for (i, d) in raw.doors.into_iter().enumerate() {
        let name = if d.id.is_empty() {
            format!("door[{i}]")
        } else {
            format!("door \"{}\"", d.id)
        };
        let field = |f: &str| format!("{name}: {f}");
        if !valid_door_id(&d.id) {
            return Err(invalid(
                field("id"),
                "must be 1-64 characters of letters, digits, '-', '_', '.' or ':' (as in the \
                 ACL's doors)"
                    .into(),
            ));
        }
        if !ids.insert(d.id.clone()) {
            return Err(invalid(field("id"), "another door has the same id".into()));
        }
        // 0x7F is broadcast/configuration; PD addresses are 0..=126.
        if d.osdp.address > 0x7E {
            return Err(invalid(
                field("osdp.address"),
                format!("{} is out of range (0..=126)", d.osdp.address),
            ));
        }
        if d.osdp.port.as_os_str().is_empty() {
            return Err(invalid(field("osdp.port"), "must not be empty".into()));
        }
        if !addresses.insert((d.osdp.port.clone(), d.osdp.address)) {
            return Err(invalid(
                field("osdp.address"),
                format!(
                    "address {} is already used by another door on {}",
                    d.osdp.address,
                    d.osdp.port.display()
                ),
            ));
        }
        const BAUDS: [u32; 6] = [9600, 19200, 38400, 57600, 115200, 230400];
        if !BAUDS.contains(&d.osdp.baud) {
            return Err(invalid(
                field("osdp.baud"),
                format!("{} is not an OSDP baud rate ({BAUDS:?})", d.osdp.baud),
            ));
        }
        if let Some(other) = bauds.insert(d.osdp.port.clone(), d.osdp.baud) {
            if other != d.osdp.baud {
                return Err(invalid(
                    field("osdp.baud"),
                    format!(
                        "{} differs from another door's {other} on the same port {}",
                        d.osdp.baud,
                        d.osdp.port.display()
                    ),
                ));
            }
        }
        if d.outputs > 8 {
            return Err(invalid(
                field("outputs"),
                format!("{} is out of range (0..=8)", d.outputs),
            ));
        }
        if d.nfc.reader.trim().is_empty() || d.nfc.reader.len() > 256 {
            return Err(invalid(
                field("nfc.reader"),
                "must name a PC/SC reader (1-256 characters; '*' matches anything)".into(),
            ));
        }
        let group_id =
            decode_hex_array(&d.aliro.group_id).map_err(|m| invalid(field("aliro.group_id"), m))?;
        let sub_id =
            decode_hex_array(&d.aliro.sub_id).map_err(|m| invalid(field("aliro.sub_id"), m))?;
        let key_path = resolve(path, &d.aliro.private_key_file);
        if (d.osdp.install_mode || d.osdp.enforce_secure) && d.osdp.scbk_file.is_none() {
            return Err(invalid(
                field("osdp.scbk_file"),
                "install_mode and enforce_secure need a key file".into(),
            ));
        }
        let verdict_window = match d.osdp.verdict_window_ms {
            None => DEFAULT_VERDICT_WINDOW,
            Some(ms @ 1..=60_000) => Duration::from_millis(ms),
            Some(ms) => {
                return Err(invalid(
                    field("osdp.verdict_window_ms"),
                    format!("{ms} is out of range (1..=60000)"),
                ))
            }
        };
        let osdp = OsdpDoorOptions {
            scbk_file: d.osdp.scbk_file.as_ref().map(|p| resolve(path, p)),
            install_mode: d.osdp.install_mode,
            enforce_secure: d.osdp.enforce_secure,
            verdict_window,
        };
        let certificate = match &d.aliro.certificate {
            None => None,
            Some(c) => Some(
                load_certificate(&resolve(path, &c.file), &c.group_public_key)
                    .map_err(|m| invalid(field("aliro.certificate"), m))?,
            ),
        };
        let step_up = match &d.aliro.step_up {
            None => None,
            Some(su) => Some(validate_step_up(su).map_err(|m| invalid(field("aliro.step_up"), m))?),
        };
        let mut ble = None;
        if let Some(b) = d.ble.as_ref().filter(|b| b.enabled) {
            if d.aliro.step_up.is_some() {
                // Every phone would be refused: say so now rather than advertise a door that
                // cannot open over BLE.
                return Err(invalid(
                    field("ble"),
                    "a door with aliro.step_up is served over NFC only (BLE has no step-up \
                     yet); remove the ble table or set enabled = false"
                        .into(),
                ));
            }
            let mut b = b.clone();
            b.panel_verdict_wait_ms
                .get_or_insert(raw.nfc.panel_verdict_wait_ms);
            validate_ble(&b).map_err(|(f, m)| invalid(field(f), m))?;
            ble = Some(b);
        }
        let cloud_offline = match d.cloud_offline {
            None => None,
            Some(_) if cloud.is_none() => {
                return Err(invalid(
                    field("cloud_offline"),
                    "needs a [cloud] table: without one keyway never hears from a cloud".into(),
                ))
            }
            Some(c) if !CLOUD_OFFLINE_LIMIT_S.contains(&c.limit_s) => {
                return Err(invalid(
                    field("cloud_offline.limit_s"),
                    format!(
                        "{} is out of range ({}..={})",
                        c.limit_s,
                        CLOUD_OFFLINE_LIMIT_S.start(),
                        CLOUD_OFFLINE_LIMIT_S.end()
                    ),
                ))
            }
            Some(c) => Some(crate::cloud::contact::OfflinePolicy {
                limit: Duration::from_secs(c.limit_s),
                fail_secure: c.fail_secure,
            }),
        };
        doors.push(Door {
            id: d.id,
            port: d.osdp.port,
            baud: d.osdp.baud,
            address: d.osdp.address,
            outputs: d.outputs,
            reader_pattern: d.nfc.reader,
            group_id,
            sub_id,
            private_key_file: key_path,
            auth_policy: d.aliro.auth_policy,
            sensitive: d.sensitive,
            accept_cards: d.accept_cards,
            fast: d.aliro.fast,
            step_up,
            certificate,
            osdp,
            ble,
            cloud_offline,
        });
    }
    Ok(Validated {
        source: path.to_owned(),
        daemon: DaemonConfig {
            database: resolve(path, &raw.daemon.database),
            log_level: raw.daemon.log_level,
            status_socket: resolve(path, &raw.daemon.status_socket),
            acl_max_age_hours: raw.daemon.acl_max_age_hours,
        },
        log_level,
        nfc: raw.nfc,
        vendor_code,
        model: raw.osdp.model,
        serial_number: raw.osdp.serial_number,
        events,
        time_zone,
        doors,
        cloud,
    })
}

fn validate_ble(b: &DoorBle) -> Result<(), (&'static str, String)> {
    if !(-100..=0).contains(&b.rssi_threshold_dbm) {
        return Err((
            "ble.rssi_threshold_dbm",
            format!("{} is out of range (-100..=0)", b.rssi_threshold_dbm),
        ));
    }
    if !(1..=16).contains(&b.max_connections) {
        return Err((
            "ble.max_connections",
            format!("{} is out of range (1..=16)", b.max_connections),
        ));
    }
    if !(0x80..=0xFF).contains(&b.spsm) {
        return Err((
            "ble.spsm",
            format!("0x{:X} is out of range (0x80..=0xFF)", b.spsm),
        ));
    }
    if !(500..=60_000).contains(&b.timeout_ms) {
        return Err((
            "ble.timeout_ms",
            format!("{} is out of range (500..=60000)", b.timeout_ms),
        ));
    }
    if let Some(w) = b.panel_verdict_wait_ms {
        check_verdict_wait(w, b.timeout_ms, "ble.timeout_ms").map_err(|m| {
            (
                "ble.panel_verdict_wait_ms",
                format!("{m}; the default is nfc.panel_verdict_wait_ms"),
            )
        })?;
    }
    if let Some(a) = &b.adapter {
        if a.is_empty() || a.len() > 32 || !a.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err((
                "ble.adapter",
                format!("{a:?} is not an adapter name like hci0"),
            ));
        }
    }
    Ok(())
}

/// Time of a transaction a panel verdict wait may never take: the exchanges before the
/// decision and the answer to the phone after it (NFC APDUs, BLE frames).
pub const VERDICT_WAIT_MARGIN: Duration = Duration::from_millis(1000);

/// One rule for every transport: a verdict wait (0 = none, at most 5 s) must fit in the
/// transaction's limit `limit_ms` (field `limit_field`) with [`VERDICT_WAIT_MARGIN`] to spare,
/// so a timeout never cuts the wait and a grant always reaches the phone. At run time the wait
/// is also capped by the time actually left (`daemon::access`).
fn check_verdict_wait(wait_ms: u64, limit_ms: u64, limit_field: &str) -> Result<(), String> {
    let margin = u64::try_from(VERDICT_WAIT_MARGIN.as_millis()).unwrap_or(u64::MAX);
    if wait_ms > 5_000 {
        return Err(format!("{wait_ms} is out of range (0..=5000)"));
    }
    if wait_ms > 0 && wait_ms.saturating_add(margin) > limit_ms {
        return Err(format!(
            "{wait_ms} does not fit in {limit_field} {limit_ms}: a verdict wait needs {margin} ms \
             of the transaction left for the exchanges with the phone (raise {limit_field} to \
             at least {} or lower the wait)",
            wait_ms.saturating_add(margin)
        ));
    }
    Ok(())
}

fn invalid_empty(
    invalid: &impl Fn(String, String) -> ConfigError,
    field: &str,
) -> Result<(), ConfigError> {
    Err(invalid(field.into(), "must not be empty".into()))
}

/// A door id: 1-64 of A-Z a-z 0-9 . _ - : — the same set the ACL accepts for its `doors`, so
/// every configured door can be named in an ACL file (e.g. `site:front`).
pub fn valid_door_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
}

/// Relative paths in the file are relative to the file, so a bench config can sit beside its keys.
fn resolve(config_path: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        return p.to_owned();
    }
    match config_path.parent() {
        Some(dir) => dir.join(p),
        None => p.to_owned(),
    }
}

fn decode_hex_array<const N: usize>(s: &str) -> Result<[u8; N], String> {
    let bytes = hex::decode(s.trim()).map_err(|e| format!("{s:?} is not hex: {e}"))?;
    <[u8; N]>::try_from(bytes.as_slice()).map_err(|_| {
        format!(
            "must be {N} bytes ({} hex digits), got {} bytes",
            2 * N,
            bytes.len()
        )
    })
}

/// Does a PC/SC reader name match the configured name or `*` pattern?
pub fn reader_matches(pattern: &str, name: &str) -> bool {
    glob_match(pattern.as_bytes(), name.as_bytes())
}

fn glob_match(p: &[u8], s: &[u8]) -> bool {
    // Iterative `*` matcher with one backtrack point: linear enough for reader names.
    let (mut pi, mut si) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        match p.get(pi) {
            Some(b'*') => {
                star = Some((pi, si));
                pi += 1;
            }
            Some(&c) if Some(&c) == s.get(si) => {
                pi += 1;
                si += 1;
            }
            _ => match star {
                Some((sp, ss)) => {
                    pi = sp + 1;
                    si = ss + 1;
                    star = Some((sp, ss + 1));
                }
                None => return false,
            },
        }
    }
    p.get(pi..).unwrap_or_default().iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[daemon]
database = "state/keyway.db"

[[door]]
id = "front"
osdp = { port = "/dev/ttyUSB0", address = 1 }
nfc = { reader = "Virtual PCD 00 00" }
aliro = { group_id = "00112233445566778899aabbccddeeff", sub_id = "ffeeddccbbaa99887766554433221100", private_key_file = "keys/front.pem" }
"#;

    fn err(text: &str) -> String {
        match parse(text, Path::new("/etc/keyway/keyway.toml")) {
            Ok(_) => panic!("expected an error for:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn good_file_parses_with_defaults_and_relative_paths() {
        let v = parse(GOOD, Path::new("/etc/keyway/keyway.toml")).unwrap();
        assert_eq!(v.doors.len(), 1);
        let d = &v.doors[0];
        assert_eq!(d.baud, 9600);
        assert_eq!(d.group_id[0], 0x00);
        assert_eq!(d.group_id[15], 0xff);
        assert_eq!(d.auth_policy.code(), 1);
        assert_eq!(
            d.private_key_file,
            PathBuf::from("/etc/keyway/keys/front.pem")
        );
        assert_eq!(
            v.daemon.database,
            PathBuf::from("/etc/keyway/state/keyway.db")
        );
        assert_eq!(v.nfc.apdu_timeout(), Duration::from_millis(1000));
        // Door policy fields added later are optional, with safe defaults.
        assert!(!d.sensitive && !d.accept_cards && d.fast);
    }

    #[test]
    fn door_ids_take_the_acl_character_set() {
        // ACL files name doors like "site:front"; the config must be able to as well.
        let v = parse(
            &GOOD.replace("id = \"front\"", "id = \"hq:front-1.a_b\""),
            Path::new("/etc/keyway/keyway.toml"),
        )
        .unwrap();
        assert_eq!(v.doors[0].id, "hq:front-1.a_b");
        for bad in ["front door", "front/1", "", "ü"] {
            let e = err(&GOOD.replace("id = \"front\"", &format!("id = {bad:?}")));
            assert!(e.contains(": id: must be 1-64 characters"), "{bad}: {e}");
        }
    }

    #[test]
    fn events_retention_defaults_keep_a_million_and_are_bounded() {
        let v = parse(GOOD, Path::new("/k.toml")).unwrap();
        assert_eq!(v.events, crate::events::Retention::default());
        assert!(v.events.max_rows >= 1_000_000 && v.events.max_age_ms.is_none());
        let v = parse(
            &format!("[events]\nmax_rows = 20000\nmax_age_days = 30\n{GOOD}"),
            Path::new("/k.toml"),
        )
        .unwrap();
        assert_eq!(
            (v.events.max_rows, v.events.max_age_ms),
            (20_000, Some(30 * 86_400_000))
        );
        let e = err(&format!("[events]\nmax_rows = 10\n{GOOD}"));
        assert!(e.contains("events.max_rows: 10 is out of range"), "{e}");
        let e = err(&format!("[events]\nmax_age_days = 99999\n{GOOD}"));
        assert!(e.contains("events.max_age_days"), "{e}");
        let e = err(&format!("[events]\nmax_bytes = 1\n{GOOD}"));
        assert!(e.contains("unknown field `max_bytes`"), "{e}");
    }

    #[test]
    fn door_policy_fields() {
        let text = GOOD
            .replace(
                "id = \"front\"",
                "id = \"front\"\nsensitive = true\naccept_cards = true",
            )
            .replace("keys/front.pem\"", "keys/front.pem\", fast = false");
        let v = parse(&text, Path::new("/etc/keyway/keyway.toml")).unwrap();
        let d = &v.doors[0];
        assert!(d.sensitive && d.accept_cards && !d.fast);
        let e = err(&GOOD.replace("id = \"front\"", "id = \"front\"\nsensitive = \"yes\""));
        assert!(e.contains("sensitive"), "{e}");
    }

    #[test]
    fn reader_certificate_file() {
        let dir = tempfile::tempdir().unwrap();
        let g = "046b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c2964fe342e2fe1a7f9b8ee7eb4a7c0f9e162bce33576b315ececbb6406837bf51f5";
        std::fs::create_dir_all(dir.path().join("keys")).unwrap();
        std::fs::write(dir.path().join("keys/front.cert"), "3081 0102\n03\n").unwrap();
        let with = |file: &str, key: &str| {
            GOOD.replace(
                "keys/front.pem\"",
                &format!("keys/front.pem\", certificate = {{ file = \"{file}\", group_public_key = \"{key}\" }}"),
            )
        };
        let cfg = dir.path().join("keyway.toml");
        let v = parse(&with("keys/front.cert", g), &cfg).unwrap();
        let c = v.doors[0].certificate.as_ref().unwrap();
        assert_eq!(c.certificate, vec![0x30, 0x81, 0x01, 0x02, 0x03]);
        assert!(v.doors[0].certificate.is_some());
        for (file, key, why) in [
            ("keys/missing.cert", g, "missing.cert"),
            ("keys/front.cert", "04zz", "not hex"),
            ("keys/front.cert", &g[..g.len() - 2], "P-256"),
        ] {
            let e = match parse(&with(file, key), &cfg) {
                Ok(_) => panic!("{file} {key}: accepted"),
                Err(e) => e.to_string(),
            };
            assert!(e.contains("aliro.certificate") && e.contains(why), "{e}");
        }
        std::fs::write(dir.path().join("keys/front.cert"), "zz").unwrap();
        let e = parse(&with("keys/front.cert", g), &cfg)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("not hex"), "{e}");
    }

    #[test]
    fn step_up_issuers_and_elements() {
        // The P-256 generator G is a valid issuer key for parsing purposes.
        let g = "046b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c2964fe342e2fe1a7f9b8ee7eb4a7c0f9e162bce33576b315ececbb6406837bf51f5";
        let with = |issuers: &str, elements: &str| {
            GOOD.replace(
                "keys/front.pem\"",
                &format!(
                    "keys/front.pem\", step_up = {{ issuers = {issuers}, elements = {elements} }}"
                ),
            )
        };
        let v = parse(
            &with(&format!("[\"{g}\"]"), "[\"floor1\"]"),
            Path::new("/etc/keyway/keyway.toml"),
        )
        .unwrap();
        let su = v.doors[0].step_up.as_ref().unwrap();
        assert_eq!(su.elements, vec!["floor1".to_string()]);
        assert_eq!(su.issuers.len(), 1);
        assert!(parse(GOOD, Path::new("/k.toml")).unwrap().doors[0]
            .step_up
            .is_none());
        for (issuers, elements, why) in [
            ("[]".to_string(), "[\"a\"]", "issuers"),
            ("[\"04zz\"]".to_string(), "[\"a\"]", "not hex"),
            (format!("[\"{}\"]", &g[..g.len() - 2]), "[\"a\"]", "P-256"),
            (format!("[\"{g}\"]"), "[]", "elements"),
            (format!("[\"{g}\"]"), "[\"\"]", "1-64"),
        ] {
            let e = err(&with(&issuers, elements));
            assert!(e.contains("aliro.step_up") && e.contains(why), "{e}");
        }
    }

    #[test]
    fn errors_name_the_field() {
        let e = err(&GOOD.replace("address = 1", "address = 127"));
        assert!(
            e.contains("door \"front\": osdp.address: 127 is out of range"),
            "{e}"
        );
        let e = err(&GOOD.replace("00112233445566778899aabbccddeeff", "0011"));
        assert!(e.contains("aliro.group_id: must be 16 bytes"), "{e}");
        let e = err(&GOOD.replace("ffeeddccbbaa99887766554433221100", "zz"));
        assert!(e.contains("aliro.sub_id") && e.contains("not hex"), "{e}");
        let e = err(&GOOD.replace("address = 1", "address = 1, speed = 3"));
        assert!(e.contains("unknown field `speed`"), "{e}");
        let e = err(&format!("{GOOD}\n[daemon2]\n"));
        assert!(e.contains("daemon2"), "{e}");
        let e = err(&GOOD.replace("address = 1", "address = \"one\""));
        assert!(e.contains("address"), "{e}");
        let e = err("[daemon]\nlog_level = \"loud\"\n");
        assert!(e.contains("daemon.log_level"), "{e}");
        let e = err("");
        assert!(e.contains("no door configured"), "{e}");
        let e = err(&GOOD.replace("address = 1", "address = 1, baud = 1234"));
        assert!(
            e.contains("osdp.baud: 1234 is not an OSDP baud rate"),
            "{e}"
        );
    }

    #[test]
    fn duplicate_ids_and_addresses_are_refused() {
        let second = GOOD.split("[[door]]").nth(1).unwrap();
        let e = err(&format!("{GOOD}\n[[door]]{second}"));
        assert!(e.contains("another door has the same id"), "{e}");
        let e = err(&format!(
            "{GOOD}\n[[door]]{}",
            second.replace("\"front\"", "\"back\"")
        ));
        assert!(
            e.contains("door \"back\": osdp.address: address 1 is already used"),
            "{e}"
        );
        let ok = format!(
            "{GOOD}\n[[door]]{}",
            second
                .replace("\"front\"", "\"back\"")
                .replace("address = 1", "address = 2")
        );
        let v = parse(&ok, Path::new("k.toml")).unwrap();
        assert_eq!(v.buses().len(), 1);
        assert_eq!(v.buses().values().next().unwrap().len(), 2);
    }

    #[test]
    fn osdp_secure_options_default_off_and_validate() {
        let v = parse(GOOD, Path::new("/etc/keyway/keyway.toml")).unwrap();
        let o = &v.doors[0].osdp;
        assert_eq!(o.scbk_file, None);
        assert!(!o.install_mode && !o.enforce_secure);
        assert_eq!(o.verdict_window, DEFAULT_VERDICT_WINDOW);
        let sc = GOOD.replace(
            "address = 1 }",
            "address = 1, scbk_file = \"keys/front.scbk\", install_mode = true, enforce_secure = true, verdict_window_ms = 1500 }",
        );
        let v = parse(&sc, Path::new("/etc/keyway/keyway.toml")).unwrap();
        let o = &v.doors[0].osdp;
        assert_eq!(
            o.scbk_file.as_deref(),
            Some(Path::new("/etc/keyway/keys/front.scbk"))
        );
        assert!(o.install_mode && o.enforce_secure);
        assert_eq!(o.verdict_window, Duration::from_millis(1500));
        let e = err(&GOOD.replace("address = 1 }", "address = 1, install_mode = true }"));
        assert!(e.contains("osdp.scbk_file"), "{e}");
        let e = err(&GOOD.replace("address = 1 }", "address = 1, verdict_window_ms = 0 }"));
        assert!(e.contains("osdp.verdict_window_ms"), "{e}");
    }

    fn ble_of(v: &Validated) -> &DoorBle {
        v.doors[0].ble.as_ref().unwrap()
    }

    #[test]
    fn a_verdict_wait_must_fit_in_its_transaction_on_every_transport() {
        // NFC: the wait plus the margin for the APDUs within transaction_timeout_ms.
        let nfc = |wait: u64, limit: u64| {
            parse(
                &format!(
                    "[nfc]\npanel_verdict_wait_ms = {wait}\ntransaction_timeout_ms = {limit}\n{GOOD}"
                ),
                Path::new("/k.toml"),
            )
        };
        assert!(nfc(1000, 2000).is_ok());
        assert!(nfc(0, 100).is_ok(), "no wait, nothing to fit");
        for (wait, limit) in [(1001, 2000), (5000, 5000), (4000, 1000)] {
            let e = nfc(wait, limit).unwrap_err().to_string();
            assert!(
                e.contains("nfc.panel_verdict_wait_ms") && e.contains("nfc.transaction_timeout_ms"),
                "{wait}/{limit}: {e}"
            );
        }
        let e = nfc(5001, 60_000).unwrap_err().to_string();
        assert!(e.contains("nfc.panel_verdict_wait_ms"), "{e}");
        // BLE: the same rule against the door's timeout_ms.
        let ble = |t: &str| parse(&format!("{GOOD}ble = {{ {t} }}\n"), Path::new("/k.toml"));
        assert!(ble("timeout_ms = 2000, panel_verdict_wait_ms = 1000").is_ok());
        assert!(ble("timeout_ms = 500, panel_verdict_wait_ms = 0").is_ok());
        let e = ble("timeout_ms = 1999, panel_verdict_wait_ms = 1000")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("ble.panel_verdict_wait_ms") && e.contains("ble.timeout_ms"),
            "{e}"
        );
    }

    #[test]
    fn ble_table_is_optional_with_documented_defaults() {
        let v = parse(GOOD, Path::new("/etc/keyway/keyway.toml")).unwrap();
        assert!(v.doors[0].ble.is_none());
        let with = format!("{GOOD}ble = {{}}\n");
        let v = parse(&with, Path::new("/etc/keyway/keyway.toml")).unwrap();
        let b = v.doors[0].ble.as_ref().unwrap();
        assert!(b.enabled && b.adapter.is_none());
        assert_eq!(
            (
                b.rssi_threshold_dbm,
                b.mode,
                b.max_connections,
                b.spsm,
                b.timeout_ms
            ),
            (-70, BleMode::Tap, 4, 0x80, 5000)
        );
        // The panel-verdict wait follows the NFC one unless the door sets its own.
        assert_eq!(b.panel_verdict_wait(), Duration::from_secs(1));
        let own = format!("[nfc]\npanel_verdict_wait_ms = 300\n{GOOD}");
        let v = parse(&format!("{own}ble = {{}}\n"), Path::new("/k.toml")).unwrap();
        assert_eq!(ble_of(&v).panel_verdict_wait_ms, Some(300));
        let v = parse(
            &format!("{own}ble = {{ panel_verdict_wait_ms = 0 }}\n"),
            Path::new("/k.toml"),
        )
        .unwrap();
        assert_eq!(ble_of(&v).panel_verdict_wait(), Duration::ZERO);
        let off = format!("{GOOD}ble = {{ enabled = false }}\n");
        assert!(parse(&off, Path::new("/k.toml")).unwrap().doors[0]
            .ble
            .is_none());
        let walk = format!(
            "{GOOD}ble = {{ mode = \"walk_up\", rssi_threshold_dbm = -60, adapter = \"hci1\" }}\n"
        );
        let v = parse(&walk, Path::new("/k.toml")).unwrap();
        assert_eq!(ble_of(&v).mode, BleMode::WalkUp);
        assert_eq!(ble_of(&v).adapter.as_deref(), Some("hci1"));
        for (bad, field) in [
            ("max_connections = 0", "ble.max_connections"),
            ("max_connections = 17", "ble.max_connections"),
            ("rssi_threshold_dbm = 5", "ble.rssi_threshold_dbm"),
            ("spsm = 5", "ble.spsm"),
            ("timeout_ms = 100", "ble.timeout_ms"),
            ("panel_verdict_wait_ms = 5001", "ble.panel_verdict_wait_ms"),
            (
                "timeout_ms = 800, panel_verdict_wait_ms = 800",
                "ble.panel_verdict_wait_ms",
            ),
            // The inherited default (1000) must fit the door's timeout too.
            ("timeout_ms = 1500", "ble.panel_verdict_wait_ms"),
            ("adapter = \"../x\"", "ble.adapter"),
        ] {
            let e = err(&format!("{GOOD}ble = {{ {bad} }}\n"));
            assert!(
                e.contains(&format!("door \"front\": {field}")),
                "{bad}: {e}"
            );
        }
        // A step-up door cannot grant over BLE: refused with a clear reason.
        let g = "046b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c2964fe342e2fe1a7f9b8ee7eb4a7c0f9e162bce33576b315ececbb6406837bf51f5";
        let step_up = GOOD.replace(
            "keys/front.pem\"",
            &format!(
                "keys/front.pem\", step_up = {{ issuers = [\"{g}\"], elements = [\"floor1\"] }}"
            ),
        );
        if let Err(e) = parse(&step_up, Path::new("/k.toml")) {
            panic!("{e}");
        }
        let e = err(&format!("{step_up}ble = {{}}\n"));
        assert!(
            e.contains("door \"front\": ble:") && e.contains("NFC only"),
            "{e}"
        );
        let off = format!("{step_up}ble = {{ enabled = false }}\n");
        assert!(parse(&off, Path::new("/k.toml")).is_ok());
        let e = err(&format!("{GOOD}ble = {{ range = 3 }}\n"));
        assert!(e.contains("unknown field `range`"), "{e}");
    }

    #[test]
    fn reader_patterns() {
        assert!(reader_matches("Virtual PCD 00 00", "Virtual PCD 00 00"));
        assert!(!reader_matches("Virtual PCD 00 00", "Virtual PCD 00 01"));
        assert!(reader_matches("Virtual PCD*", "Virtual PCD 00 01"));
        assert!(reader_matches("*PCD*01", "Virtual PCD 00 01"));
        assert!(!reader_matches("*PCD*02", "Virtual PCD 00 01"));
        assert!(reader_matches("*", ""));
        assert!(!reader_matches("", "x"));
        assert!(reader_matches("a*b*c", "aXbYbc"));
    }
}
