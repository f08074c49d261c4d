//! A real mosquitto for the cloud tests (started by each test on 127.0.0.1 with a free port,
//! config in a tempdir), test certificates made with openssl, and password files made with
//! mosquitto_passwd. Needs `mosquitto`, `mosquitto_passwd` and `openssl` (scripts/setup
//! installs them); a missing one FAILS the test.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::STEP_TIMEOUT;

pub fn need(bin: &str) -> PathBuf {
    for dir in ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"] {
        let p = Path::new(dir).join(bin);
        if p.exists() {
            return p;
        }
    }
    panic!("{bin} not found: run scripts/setup (installs mosquitto mosquitto-clients openssl)");
}

/// A loopback TCP port for a server a test starts, free now and never handed out twice in
/// this process. Taken BELOW the kernel's ephemeral range: a port the kernel picked for
/// `bind(0)` is released before the server binds it, and in that window any outgoing
/// connection (RabbitMQ's CLI and distribution, mosquitto clients) may be given it as its
/// local port; a port outside that range is never handed out behind our back.
pub fn free_port() -> u16 {
    use std::collections::BTreeSet;
    use std::sync::Mutex;
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .next()
                .and_then(|v| v.parse::<u16>().ok())
        })
        .unwrap_or(32768);
    let (low, high) = (10_000u16, ephemeral_low.min(32768));
    assert!(
        high > low + 1000,
        "ephemeral range starts at {ephemeral_low}: no room below it"
    );
    let span = u32::from(high - low);
    // Start somewhere different in each process (test binaries run one after another, but a
    // developer may run several at once).
    let mut at = (std::process::id() * 7919
        + std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0))
        % span;
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    for _ in 0..span {
        at = (at + 1) % span;
        let port = low + at as u16;
        if given.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.insert(port);
            return port;
        }
    }
    panic!("no free loopback port in {low}..{high}");
}

pub struct Mosquitto {
    child: Option<Child>,
    pub port: u16,
    conf: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Mosquitto {
    /// `listener_extra`: lines for the listener (TLS, auth).
    pub fn start(listener_extra: &str) -> Mosquitto {
        let mut m = Mosquitto::configure(listener_extra);
        m.restart();
        m
    }

    /// Writes the config without starting the broker (TLS files go in its dir first).
    pub fn configure(listener_extra: &str) -> Mosquitto {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let conf = dir.path().join("mosquitto.conf");
        // `user root`: started as root, mosquitto would drop to user mosquitto, which cannot
        // read the tempdir. per_listener_settings so auth applies to this listener.
        std::fs::write(
            &conf,
            format!(
                "user root\npersistence false\nper_listener_settings true\n\
                 log_dest stderr\nlistener {port} 127.0.0.1\n{}\n",
                listener_extra.replace("{dir}", &dir.path().display().to_string())
            ),
        )
        .unwrap();
        Mosquitto {
            child: None,
            port,
            conf,
            dir,
        }
    }

    pub fn restart(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("broker.log")).unwrap();
        let child = Command::new(need("mosquitto"))
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting mosquitto");
        self.child = Some(child);
        let deadline = Instant::now() + STEP_TIMEOUT;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("mosquitto exited ({status}): {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "mosquitto did not listen: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("broker.log")).unwrap_or_default()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A CA, a server certificate for 127.0.0.1/localhost and a client certificate, in `dir`.
pub fn make_certs(dir: &Path) {
    let openssl = need("openssl");
    let run = |args: &[&str]| {
        let out = Command::new(&openssl)
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let p256_key = |out: &str| {
        run(&[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            out,
        ])
    };
    p256_key("ca.key");
    run(&[
        "req",
        "-x509",
        "-new",
        "-key",
        "ca.key",
        "-subj",
        "/CN=keyway test CA",
        "-days",
        "2",
        "-out",
        "ca.pem",
    ]);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    for name in ["server", "client"] {
        p256_key(&format!("{name}.ec"));
        run(&[
            "pkcs8",
            "-topk8",
            "-nocrypt",
            "-in",
            &format!("{name}.ec"),
            "-out",
            &format!("{name}.key"),
        ]);
        run(&[
            "req",
            "-new",
            "-key",
            &format!("{name}.key"),
            "-subj",
            &format!("/CN={name}"),
            "-out",
            &format!("{name}.csr"),
        ]);
        run(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
            "-out",
            &format!("{name}.pem"),
        ]);
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            dir.join(format!("{name}.key")),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
    }
}

pub fn write_private(p: &Path, text: &str) {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(p)
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

/// A mosquitto password file at `path` with these users and passwords.
pub fn password_file(path: &Path, users: &[(&str, &str)]) {
    for (i, (user, password)) in users.iter().enumerate() {
        let mut cmd = Command::new(need("mosquitto_passwd"));
        // -c creates the file: only for the first user.
        cmd.arg("-b");
        if i == 0 {
            cmd.arg("-c");
        }
        let out = cmd.arg(path).args([user, password]).output().unwrap();
        assert!(
            out.status.success(),
            "mosquitto_passwd: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A TLS listener with a fresh CA and server certificate (`ca.pem`, `client.pem`/`client.key`
/// for mTLS in its dir); `mtls`: a client certificate is required.
pub fn tls_broker(mtls: bool) -> Mosquitto {
    let mut extra = "allow_anonymous true\ncafile {dir}/ca.pem\ncertfile {dir}/server.pem\nkeyfile {dir}/server.key\n".to_owned();
    if mtls {
        extra.push_str("require_certificate true\n");
    }
    let mut m = Mosquitto::configure(&extra);
    make_certs(m.dir.path());
    m.restart();
    m
}
