//! Our own pcscd with Debian's vpcd virtual reader (only one pcscd can run per machine: run
//! the tests that use it under `flock /tmp/keyway-pcscd.lock`). Used by the NFC HIL tests,
//! the door-to-cloud test and the revocation bench.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keyway_sim::{Endpoint, Outcome};

/// The two slots of Debian's `/etc/reader.conf.d/vpcd`, and their vpcd ports.
pub const READERS: [&str; 2] = ["Virtual PCD 00 00", "Virtual PCD 00 01"];
pub const VPCD_PORTS: [u16; 2] = [35963, 35964];

/// A pcscd of our own, stopped (SIGTERM) on drop.
pub struct Pcscd {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Pcscd {
    pub fn start(dir: &Path) -> Pcscd {
        // Another test binary (or another checkout's tests) may be using the one pcscd a
        // machine can have: wait for it to go away, bounded.
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let out = Command::new("pgrep").args(["-x", "pcscd"]).output();
            let Ok(out) = out else { break };
            if !out.status.success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "another pcscd is still running after 5 min (pid {}); stop it: these tests start their own",
                String::from_utf8_lossy(&out.stdout).trim()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
        let log = dir.join(format!("pcscd-{}.log", Instant::now().elapsed().as_nanos()));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new("pcscd")
            .args(["--foreground", "--debug"])
            .stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file))
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start pcscd ({e}); run ./scripts/setup (apt-get install pcscd vsmartcard-vpcd)")
            });
        let p = Pcscd {
            child: Some(child),
            log,
        };
        p.wait_for_reader();
        p
    }

    fn wait_for_reader(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(ctx) = pcsc::Context::establish(pcsc::Scope::User) {
                if let Ok(names) = ctx.list_readers_owned() {
                    let names: Vec<String> = names
                        .iter()
                        .map(|n| n.to_string_lossy().into_owned())
                        .collect();
                    if READERS.iter().all(|r| names.iter().any(|n| n == r)) {
                        return;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "pcscd did not show the readers {READERS:?} (is vsmartcard-vpcd installed?); log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Pcscd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits until the reader of `slot` can see a new presentation: pcscd reports it empty
/// (removal shows 0.35-0.5 s after the card side closes), then one more second.
///
/// The second is a vpcd/pcscd artefact with no event to await: after a card leaves, pcscd's
/// power-down of the (gone) card fails, pcscd publishes EMPTY but keeps "present" internally
/// until one of its presence polls (every 0.4 s) finds no vpcd client; a card that connects
/// before that poll is taken for the old one and never announced (pcscd logs no "Card
/// inserted"). Measured here; a real reader's field detection has no such gap.
pub async fn wait_reader_empty(slot: usize) {
    wait_reader_empty_only(slot).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
}

pub async fn wait_reader_empty_only(slot: usize) {
    let name = std::ffi::CString::new(READERS[slot]).unwrap();
    let r = tokio::task::spawn_blocking(move || {
        let ctx = pcsc::Context::establish(pcsc::Scope::User).map_err(|e| e.to_string())?;
        let mut rs = [pcsc::ReaderState::new(name, pcsc::State::UNAWARE)];
        // 10 s: pcscd's presence polls run late on a loaded machine.
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            match ctx.get_status_change(Duration::from_millis(500), &mut rs) {
                Ok(()) | Err(pcsc::Error::Timeout) => {}
                Err(e) => return Err(e.to_string()),
            }
            if rs[0].event_state().contains(pcsc::State::EMPTY) {
                return Ok(());
            }
            rs[0].sync_current_state();
        }
        Err("reader still shows a card after 10 s".to_string())
    })
    .await
    .unwrap();
    r.expect("reader empty");
}

/// The vpcd address of reader slot `slot` (the card side connects there).
pub fn addr(slot: usize) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], VPCD_PORTS[slot]))
}

/// The reader status the phone saw in EXCHANGE (tag 97), if any.
pub fn reader_status(phone: &Endpoint) -> Option<u16> {
    phone.outcomes().find_map(|o| match o {
        Outcome::Completed { reader_status, .. } => Some(*reader_status),
        _ => None,
    })
}
