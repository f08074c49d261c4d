//! Test peers shared by the integration tests (and `benches/osdp_latency.rs`): libosdp's control panel (the Python peer in
//! `tests/peers/osdp_cp.py`) on a socat pty pair.
//!
//! Needs `socat` on PATH and a Python with libosdp: `KEYWAY_PYTHON`, or
//! `<repo>/.venv/bin/python` (made by `scripts/setup`). Missing peers fail the test with a
//! message saying what to install; nothing is skipped silently.

// Each test binary uses its own subset.
#![allow(dead_code)]

pub mod cloud;
pub mod mqtt;
pub mod pcscd;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

pub const STEP_TIMEOUT: Duration = Duration::from_secs(20);

/// Kills and reaps a child process when dropped (also on a failed assertion).
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The Python with libosdp (`KEYWAY_PYTHON`, or the venv scripts/setup makes), if usable.
pub fn python_with_libosdp() -> Option<PathBuf> {
    let py = std::env::var_os("KEYWAY_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"));
    let ok = Command::new(&py)
        .args(["-c", "import osdp, osdp_sys"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    ok.then_some(py)
}

/// [`python_with_libosdp`], or a failure saying how to get it.
pub fn python() -> PathBuf {
    python_with_libosdp().unwrap_or_else(|| {
        panic!(
            "python with libosdp not found (set KEYWAY_PYTHON, or create the venv with \
             scripts/setup / `python3 -m venv .venv && .venv/bin/pip install libosdp==3.2.9`)"
        )
    })
}

/// The Python with PyPI `osdp` 1.6, the second control panel (`KEYWAY_PYTHON_OSDP16`, or
/// `<repo>/.venv-osdp16/bin/python` made by scripts/setup); a failure says how to get it.
pub fn python_osdp16() -> PathBuf {
    let py = std::env::var_os("KEYWAY_PYTHON_OSDP16")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv-osdp16/bin/python"));
    // `SerialPortOsdpConnection` is osdp-python's; libosdp's `osdp` module has none.
    let ok = Command::new(&py)
        .args([
            "-c",
            "from osdp import SerialPortOsdpConnection, calculate_scbk",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "python with PyPI osdp 1.6 not found at {} (set KEYWAY_PYTHON_OSDP16, or run \
         scripts/setup / `python3 -m venv .venv-osdp16 && .venv-osdp16/bin/pip install osdp==1.6`)",
        py.display()
    );
    py
}

pub fn require_socat() {
    let ok = Command::new("socat")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "socat not found on PATH (apt-get install socat)");
}

/// A pty pair: keyway opens `pd`, the CP opens `cp`.
pub struct PtyPair {
    _socat: KillOnDrop,
    _dir: tempfile::TempDir,
    pub pd: PathBuf,
    pub cp: PathBuf,
}

pub fn pty_pair() -> PtyPair {
    let dir = tempfile::tempdir().expect("tempdir");
    let pd = dir.path().join("pd");
    let cp = dir.path().join("cp");
    let guard = socat(&pd, &cp);
    PtyPair {
        _socat: guard,
        _dir: dir,
        pd,
        cp,
    }
}

/// Start socat linking a pty pair at `pd` and `cp`; returns once both links exist.
pub fn socat(pd: &Path, cp: &Path) -> KillOnDrop {
    require_socat();
    try_socat(pd, cp).expect("socat did not create the pty links")
}

/// [`socat`] without the checks: `None` when it cannot start or make the links in time.
pub fn try_socat(pd: &Path, cp: &Path) -> Option<KillOnDrop> {
    let child = Command::new("socat")
        .arg(format!("pty,raw,echo=0,link={}", pd.display()))
        .arg(format!("pty,raw,echo=0,link={}", cp.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let guard = KillOnDrop(child);
    let start = Instant::now();
    while !(pd.exists() && cp.exists()) {
        if start.elapsed() > STEP_TIMEOUT {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(guard)
}

/// The libosdp CP peer with its JSON-line output.
pub struct Cp {
    _child: KillOnDrop,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<(Instant, Value)>,
    pub seen: Vec<Value>,
    /// When the line the last `wait_for` returned was read.
    pub last_at: Option<Instant>,
}

impl Cp {
    pub fn start(port: &Path, pds: &[u8]) -> Cp {
        Self::start_with(port, pds, &[])
    }

    /// Start with extra arguments (e.g. `--scbk HEX`, `--enforce-secure`).
    pub fn start_with(port: &Path, pds: &[u8], extra: &[&str]) -> Cp {
        Self::spawn(&python(), "osdp_cp.py", &Self::args(port, pds, extra))
    }

    /// [`Cp::start_with`] at a raised scheduling priority (root only; otherwise as usual).
    /// The panel is hardware of its own beside keyway; where both share a few (emulated)
    /// CPUs, the panel's 200 ms reply timer must measure keyway, not the scheduler.
    pub fn start_prioritised(port: &Path, pds: &[u8], extra: &[&str]) -> Cp {
        let mut cmd = Command::new("nice");
        cmd.args(["-n", "-10"]).arg(python());
        Self::spawn_cmd(cmd, "osdp_cp.py", &Self::args(port, pds, extra))
    }

    fn args(port: &Path, pds: &[u8], extra: &[&str]) -> Vec<String> {
        let mut args = vec!["--port".to_string(), port.display().to_string()];
        for pd in pds {
            args.extend(["--pd".to_string(), pd.to_string()]);
        }
        args.extend(extra.iter().map(|a| a.to_string()));
        args
    }

    /// The PyPI `osdp` 1.6 control panel (`tests/peers/osdp16_cp.py`) on `port` for `pd`.
    pub fn start_osdp16(port: &Path, pd: u8, master_key_hex: &str) -> Cp {
        let args = [
            "--port".to_string(),
            port.display().to_string(),
            "--pd".to_string(),
            pd.to_string(),
            "--master-key".to_string(),
            master_key_hex.to_string(),
        ];
        Self::spawn(&python_osdp16(), "osdp16_cp.py", &args)
    }

    /// Run `tests/peers/<script>` with `python` and read its JSON lines.
    fn spawn(python: &Path, script: &str, args: &[String]) -> Cp {
        Self::spawn_cmd(Command::new(python), script, args)
    }

    /// [`Cp::spawn`] with `cmd` ending in the Python to run the script with.
    fn spawn_cmd(mut cmd: Command, script: &str, args: &[String]) -> Cp {
        let script = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/peers")
            .join(script);
        cmd.arg("-u").arg(script).args(args);
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn CP peer");
        let stdout = child.stdout.take().expect("stdout");
        let stdin = child.stdin.take();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                match serde_json::from_str::<Value>(&line) {
                    Ok(v) => {
                        if tx.send((Instant::now(), v)).is_err() {
                            break;
                        }
                    }
                    Err(_) => eprintln!("cp (non-json): {line}"),
                }
            }
        });
        Cp {
            _child: KillOnDrop(child),
            stdin,
            lines: rx,
            seen: Vec::new(),
            last_at: None,
        }
    }

    /// Wait for a line matching `pred`; panics with everything seen on timeout.
    pub fn wait_for(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.wait_for_within(what, STEP_TIMEOUT, pred)
    }

    /// [`wait_for`](Self::wait_for) with its own limit (slow places: an emulated VM).
    pub fn wait_for_within(
        &mut self,
        what: &str,
        limit: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let start = Instant::now();
        loop {
            let left = limit.saturating_sub(start.elapsed());
            match self.lines.recv_timeout(left) {
                Ok((at, v)) => {
                    self.seen.push(v.clone());
                    if v["event"] == "error" {
                        panic!("CP peer error: {v}");
                    }
                    if pred(&v) {
                        self.last_at = Some(at);
                        return v;
                    }
                }
                Err(_) => panic!("timed out waiting for CP {what}; CP said: {:#?}", self.seen),
            }
        }
    }

    pub fn send(&mut self, v: Value) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{v}").expect("write to CP");
        stdin.flush().expect("flush CP stdin");
    }

    pub fn wait_online(&mut self, pd: u8) -> Value {
        self.wait_for(&format!("online pd {pd}"), |v| {
            v["event"] == "online" && v["pd"] == pd
        })
    }

    pub fn went_offline(&self) -> bool {
        self.seen.iter().any(|v| v["event"] == "offline")
    }
}

/// A one-door site in `dir` (a fresh reader key, mode 0600; database and status socket
/// beside the config) on serial `port` at `address`, reader `No Such Reader`. Returns the
/// config path.
pub fn one_door_site(dir: &Path, port: &Path, address: u8) -> PathBuf {
    one_door_site_with_reader(dir, port, address, "No Such Reader")
}

/// [`one_door_site`] with its door's `nfc.reader` pattern.
pub fn one_door_site_with_reader(dir: &Path, port: &Path, address: u8, reader: &str) -> PathBuf {
    use p256::pkcs8::{EncodePrivateKey, LineEnding};
    use std::os::unix::fs::PermissionsExt;
    let key = p256::SecretKey::random(&mut rand_core::OsRng);
    let key_path = dir.join("reader.pem");
    std::fs::write(&key_path, key.to_pkcs8_pem(LineEnding::LF).unwrap()).unwrap();
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = dir.join("keyway.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[daemon]
database = "keyway.db"
status_socket = "status.sock"

[[door]]
id = "front"
osdp = {{ port = "{}", address = {address} }}
nfc = {{ reader = {reader:?} }}
aliro = {{ group_id = "00112233445566778899aabbccddeeff", sub_id = "ffeeddccbbaa99887766554433221100", private_key_file = "reader.pem" }}
"#,
            port.display()
        ),
    )
    .unwrap();
    config
}

/// `keyway --config CONFIG ARGS…`, run to its end.
pub fn keyway(config: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_keyway"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("run keyway")
}

/// What a command printed: stdout, then stderr.
pub fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `keyway --config CONFIG doctor --sniff-secs 2 --json`: its output, stdout and stderr as
/// text (never a panic), and the checklist as JSON.
pub fn doctor(config: &Path) -> (std::process::Output, String, Value) {
    let o = keyway(config, &["doctor", "--sniff-secs", "2", "--json"]);
    let text = text(&o);
    assert!(!text.contains("panicked"), "{text}");
    let v = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    (o, text, v)
}

/// The check called `name` in doctor's JSON checklist.
pub fn doctor_check<'a>(v: &'a Value, name: &str) -> &'a Value {
    v.as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no check {name} in {v}"))
}

/// The outcome (`pass`, `warn`, `fail`, `skip`) of the check called `name`.
pub fn doctor_outcome<'a>(v: &'a Value, name: &str) -> &'a str {
    doctor_check(v, name)["outcome"]
        .as_str()
        .unwrap_or_default()
}
