//! Interop with a real OSDP Control Panel: libosdp (PyPI `libosdp`) drives keyway's serial bus
//! adapter over a pty pair made by socat.
//!
//! Needs `socat` on PATH and a Python with libosdp: `KEYWAY_PYTHON`, or
//! `<repo>/.venv/bin/python` (made by `scripts/setup`). Missing peers fail the test with a
//! message saying what to install; nothing is skipped silently.
//!
//! Every assertion waits with a timeout for something to happen; none measures time.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod support;

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use keyway::osdp::phy::crc16;
use keyway::osdp::{PdConfig, PdEvent, RawCard, RawFormat, Scbk, SecureConfig, Verdict};
use keyway::serial::{load_scbk, spawn_bus, BusConfig, BusEvent};
use tokio::sync::{broadcast, watch};

use support::{pty_pair, socat, Cp, STEP_TIMEOUT};

/// Wait for a bus event matching `pred`; any NAK keyway sends meanwhile fails the test.
async fn wait_bus(
    rx: &mut broadcast::Receiver<BusEvent>,
    what: &str,
    pred: impl Fn(&BusEvent) -> bool,
) -> BusEvent {
    wait_bus_inner(rx, what, pred, false).await
}

/// Like `wait_bus`, for steps where a NAK is part of the protocol (install mode: the CP's
/// first handshake with its own key is refused; a restarted PD refuses the old session).
async fn wait_bus_naks_ok(
    rx: &mut broadcast::Receiver<BusEvent>,
    what: &str,
    pred: impl Fn(&BusEvent) -> bool,
) -> BusEvent {
    wait_bus_inner(rx, what, pred, true).await
}

async fn wait_bus_inner(
    rx: &mut broadcast::Receiver<BusEvent>,
    what: &str,
    pred: impl Fn(&BusEvent) -> bool,
    naks_ok: bool,
) -> BusEvent {
    let fut = async {
        loop {
            match rx.recv().await {
                Ok(ev) if pred(&ev) => return ev,
                Ok(BusEvent::Pd {
                    addr,
                    event: PdEvent::NakSent { command, code },
                }) if !naks_ok => {
                    panic!("keyway NAKed command {command:#04x} on PD {addr}: {code:?}")
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("bus event channel: {e}"),
            }
        }
    };
    tokio::time::timeout(STEP_TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for bus event: {what}"))
}

/// Waits for an event of PD `addr` that `pick` accepts and returns what `pick` took from it
/// (NAKs fail the test, as in [`wait_bus`]).
async fn wait_pd<T>(
    rx: &mut broadcast::Receiver<BusEvent>,
    what: &str,
    addr: u8,
    pick: impl Fn(&PdEvent) -> Option<T>,
) -> T {
    let ev = wait_bus(
        rx,
        what,
        |e| matches!(e, BusEvent::Pd { addr: a, event } if *a == addr && pick(event).is_some()),
    )
    .await;
    match ev {
        BusEvent::Pd { event, .. } => pick(&event).expect("accepted above"),
        _ => unreachable!("only PD events are accepted"),
    }
}

fn card(bits: u16, data: &[u8]) -> RawCard {
    RawCard {
        reader: 0,
        format: RawFormat::Wiegand,
        bit_count: bits,
        data: data.to_vec(),
    }
}

fn bus_config(path: &Path, pds: Vec<PdConfig>) -> BusConfig {
    BusConfig {
        path: path.to_path_buf(),
        baud: 115_200,
        pds,
        key_files: Default::default(),
        com_file: None,
    }
}

const SCBK_HEX: &str = "4b657977617920746573742053434b31";

fn scbk() -> Scbk {
    Scbk::from_slice(&hex::decode(SCBK_HEX).unwrap()).unwrap()
}

fn secure_pd(addr: u8, scbk: Option<Scbk>, install_mode: bool) -> PdConfig {
    let mut cfg = PdConfig::new(addr);
    cfg.secure = Some(SecureConfig {
        scbk,
        install_mode,
        enforce_secure: true,
    });
    cfg
}

fn is_pd(e: &BusEvent, addr: u8, pred: impl Fn(&PdEvent) -> bool) -> bool {
    matches!(e, BusEvent::Pd { addr: a, event } if *a == addr && pred(event))
}

async fn stop(stop_tx: watch::Sender<bool>, join: tokio::task::JoinHandle<()>) {
    stop_tx.send(true).unwrap();
    tokio::time::timeout(STEP_TIMEOUT, join)
        .await
        .expect("bus task stops")
        .expect("no panic");
}

/// `body` (SOM through data) with its CRC-16 appended: a packet as written on the line.
fn framed(body: &[u8]) -> Vec<u8> {
    let mut f = body.to_vec();
    f.extend_from_slice(&crc16(body).to_le_bytes());
    f
}

/// Writes `command` on the CP side of the line and reads until `reply_len` bytes came back.
async fn raw_exchange(
    line: &mut tokio_serial::SerialStream,
    command: &[u8],
    reply_len: usize,
    what: &str,
) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    AsyncWriteExt::write_all(line, command).await.unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(STEP_TIMEOUT, async {
        let mut buf = [0u8; 64];
        while got.len() < reply_len {
            let n = line.read(&mut buf).await.expect("read reply");
            got.extend_from_slice(buf.get(..n).unwrap_or_default());
        }
    })
    .await;
    assert!(read.is_ok(), "no reply to the {what}; got {got:02x?}");
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pd_comes_online_and_card_reaches_the_cp() {
    let pty = pty_pair();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut cfg = PdConfig::new(1);
    cfg.identity.vendor_code = 0x00_1A_2B;
    cfg.identity.serial = 0x0102_0304;
    let (handle, mut events, join) = spawn_bus(bus_config(&pty.pd, vec![cfg]), stop_rx).unwrap();
    wait_bus(&mut events, "port opened", |e| {
        matches!(e, BusEvent::PortOpened { .. })
    })
    .await;

    let mut cp = Cp::start(&pty.cp, &[1]);
    let online = cp.wait_online(1);
    assert_eq!(online["id"]["vendor_code"], 0x1A2B);
    assert_eq!(online["id"]["serial_number"], 0x0102_0304);
    // The CP read our capabilities: CRC, LEDs, no secure channel.
    assert_eq!(online["caps"]["CheckCharacter"][0], 1);
    assert_eq!(online["caps"]["CommunicationSecurity"][0], 0);
    assert_eq!(online["caps"]["LEDControl"][1], 1);
    wait_bus(&mut events, "PD online", |e| {
        matches!(
            e,
            BusEvent::Pd {
                addr: 1,
                event: PdEvent::Online
            }
        )
    })
    .await;

    // 26-bit Wiegand and an odd 35-bit card: the exact bits arrive.
    for (bits, data) in [
        (26u16, vec![0x12, 0x34, 0x56, 0x40]),
        (35, vec![0xAB, 0xCD, 0xEF, 0x01, 0xE0]),
    ] {
        handle.send_card(1, card(bits, &data)).await.unwrap();
        let hex = hex::encode(&data);
        let got = cp.wait_for("card", |v| {
            v["event"] == "card" && v["data"] == hex.as_str()
        });
        assert_eq!(got["pd"], 1);
        assert_eq!(got["bits"], bits);
        assert_eq!(got["format"], 1);
        assert_eq!(got["reader"], 0);
        wait_bus(&mut events, "card delivered", |e| {
            matches!(e, BusEvent::Pd { addr: 1, event: PdEvent::CardDelivered(c) } if c.data == data)
        })
        .await;
    }
    assert!(!cp.went_offline(), "CP dropped the PD: {:#?}", cp.seen);

    stop(stop_tx, join).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn led_buzzer_output_are_acked_and_tracked() {
    let pty = pty_pair();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut cfg = PdConfig::new(3);
    cfg.outputs = 1;
    let (_handle, mut events, join) = spawn_bus(bus_config(&pty.pd, vec![cfg]), stop_rx).unwrap();
    let mut cp = Cp::start(&pty.cp, &[3]);
    let online = cp.wait_online(3);
    assert_eq!(online["caps"]["OutputControl"][1], 1);

    // Permanent green LED.
    cp.send(serde_json::json!({"cmd": "led", "pd": 3, "control_code": 1, "on_color": 2, "on_count": 10}));
    let state = wait_pd(&mut events, "LED event", 3, |e| match e {
        PdEvent::Led(s) => Some(*s),
        _ => None,
    })
    .await;
    assert_eq!(state.permanent.control, 1);
    assert_eq!(state.permanent.on_color, 2);
    assert_eq!(state.permanent.on_time, 10);

    // Temporary red for 2 s on top.
    cp.send(
        serde_json::json!({"cmd": "led", "pd": 3, "temporary": true, "control_code": 2,
        "on_color": 1, "on_count": 3, "off_count": 3, "timer_count": 20}),
    );
    let state = wait_pd(&mut events, "temporary LED", 3, |e| match e {
        PdEvent::Led(s) if s.temporary.is_some() => Some(*s),
        _ => None,
    })
    .await;
    assert_eq!(state.effective().on_color, 1);
    assert_eq!(state.permanent.on_color, 2);

    cp.send(serde_json::json!({"cmd": "buzzer", "pd": 3, "control_code": 2, "on_count": 2, "off_count": 1, "rep_count": 3}));
    let b = wait_pd(&mut events, "buzzer event", 3, |e| match e {
        PdEvent::Buzzer(b) => Some(*b),
        _ => None,
    })
    .await;
    assert_eq!((b.tone, b.on_time, b.off_time, b.count), (2, 2, 1, 3));

    cp.send(serde_json::json!({"cmd": "output", "pd": 3, "output_no": 0, "control_code": 2}));
    wait_bus(&mut events, "output on", |e| {
        matches!(e, BusEvent::Pd { addr: 3, event: PdEvent::Output { output: 0, state } } if state.active)
    })
    .await;

    // Every command completed at the CP (libosdp reports completion only after an ACK).
    for _ in 0..4 {
        let done = cp.wait_for("command completion", |v| v["event"] == "completed");
        assert_eq!(done["status"], 0, "command failed at the CP: {done}");
    }
    assert!(!cp.went_offline(), "CP dropped the PD: {:#?}", cp.seen);

    stop(stop_tx, join).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pds_on_one_bus() {
    let pty = pty_pair();
    let (stop_tx, stop_rx) = watch::channel(false);
    let (handle, mut events, join) = spawn_bus(
        bus_config(&pty.pd, vec![PdConfig::new(1), PdConfig::new(2)]),
        stop_rx,
    )
    .unwrap();
    let mut cp = Cp::start(&pty.cp, &[1, 2]);
    cp.wait_online(1);
    cp.wait_online(2);
    handle
        .send_card(2, card(26, &[0x01, 0x02, 0x03, 0x00]))
        .await
        .unwrap();
    let got = cp.wait_for("card on pd 2", |v| v["event"] == "card");
    assert_eq!(got["pd"], 2);
    assert_eq!(got["data"], "01020300");
    handle
        .send_card(1, card(26, &[0x0A, 0x0B, 0x0C, 0x00]))
        .await
        .unwrap();
    let got = cp.wait_for("card on pd 1", |v| v["event"] == "card");
    assert_eq!(got["pd"], 1);
    assert_eq!(got["data"], "0a0b0c00");
    wait_bus(&mut events, "delivered on 1", |e| {
        matches!(
            e,
            BusEvent::Pd {
                addr: 1,
                event: PdEvent::CardDelivered(_)
            }
        )
    })
    .await;
    stop(stop_tx, join).await;
}

/// xorshift64*: deterministic noise without an extra crate.
fn noise(seed: &mut u64, n: usize) -> Vec<u8> {
    (0..n)
        .map(|_| {
            *seed ^= *seed >> 12;
            *seed ^= *seed << 25;
            *seed ^= *seed >> 27;
            (seed.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_line_is_survived() {
    garbage_scenario(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_line_is_survived_under_secure_channel() {
    garbage_scenario(true).await;
}

async fn garbage_scenario(secure: bool) {
    let pty = pty_pair();
    let (stop_tx, stop_rx) = watch::channel(false);
    let pd = if secure {
        secure_pd(1, Some(scbk()), false)
    } else {
        PdConfig::new(1)
    };
    let (handle, mut events, join) = spawn_bus(bus_config(&pty.pd, vec![pd]), stop_rx).unwrap();
    let mut cp = if secure {
        Cp::start_with(&pty.cp, &[1], &["--scbk", SCBK_HEX, "--enforce-secure"])
    } else {
        Cp::start(&pty.cp, &[1])
    };
    let online = cp.wait_online(1);
    assert_eq!(online["sc"], secure, "{online}");

    // A second writer on the CP side of the line: its bytes reach keyway between the CP's
    // packets. Random bytes, false SOMs with plausible lengths, and truncated packets.
    let mut line = std::fs::OpenOptions::new()
        .write(true)
        .open(&pty.cp)
        .expect("open CP side");
    let mut seed = 0x5EED_1234_ABCD_0001u64;
    for burst in 0..30u8 {
        let mut bytes = noise(&mut seed, 48);
        match burst % 3 {
            0 => bytes.extend_from_slice(&[0x53, 0x01, 0x40, 0x00, 0x04, 0x60]),
            1 => bytes.extend_from_slice(&[0xFF, 0x53, 0x01, 0x08, 0x00, 0x04, 0x60, 0x00, 0x00]),
            _ => bytes.extend_from_slice(&[0x53, 0x01, 0xFF, 0xFF]),
        }
        line.write_all(&bytes).expect("inject noise");
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    drop(line);
    let stats = handle.stats().await.unwrap();
    eprintln!("keyway decoder after noise: {stats:?}");
    assert!(
        stats.skipped_bytes > 0,
        "noise never reached keyway: {stats:?}"
    );
    assert!(
        stats.bad_length + stats.bad_check + stats.stale_drops > 0,
        "{stats:?}"
    );

    // The link recovers: a card still goes through, and the bus task is alive.
    assert!(!join.is_finished(), "bus task ended under noise");
    handle
        .send_card(1, card(26, &[0xDE, 0xAD, 0xBE, 0xC0]))
        .await
        .unwrap();
    let got = cp.wait_for("card after noise", |v| v["event"] == "card");
    assert_eq!(got["data"], "deadbec0");
    wait_bus(&mut events, "delivered after noise", |e| {
        matches!(
            e,
            BusEvent::Pd {
                addr: 1,
                event: PdEvent::CardDelivered(_)
            }
        )
    })
    .await;

    assert!(!cp.went_offline(), "CP dropped the PD: {:#?}", cp.seen);
    if secure {
        assert!(
            !cp.seen
                .iter()
                .any(|v| v["event"] == "sc" && v["active"] == false),
            "secure channel dropped under noise: {:#?}",
            cp.seen
        );
    }
    stop(stop_tx, join).await;
}

/// (b) + (f): secure channel with a known SCBK, enforced on both sides; a card read goes out
/// as osdp_RAW inside the secure channel and LED commands arrive through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_channel_with_known_scbk_delivers_card() {
    let pty = pty_pair();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut pd = secure_pd(1, Some(scbk()), false);
    // Generous: the test machine may be slow; the rule itself is unit-tested.
    pd.verdict_window = Duration::from_secs(15);
    let (handle, mut events, join) = spawn_bus(bus_config(&pty.pd, vec![pd]), stop_rx).unwrap();
    let mut cp = Cp::start_with(&pty.cp, &[1], &["--scbk", SCBK_HEX, "--enforce-secure"]);
    let online = cp.wait_online(1);
    assert_eq!(online["sc"], true, "{online}");
    // Advertised: AES-128, no SCBK-D (a key is installed).
    assert_eq!(online["caps"]["CommunicationSecurity"][0], 1);
    assert_eq!(online["caps"]["CommunicationSecurity"][1], 0);
    wait_bus(&mut events, "secure channel up", |e| {
        is_pd(e, 1, |p| {
            *p == PdEvent::SecureChannelUp { install_key: false }
        })
    })
    .await;

    let data = vec![0x8A, 0x5C, 0x3E, 0x80];
    handle.send_card(1, card(26, &data)).await.unwrap();
    let got = cp.wait_for("card under SC", |v| v["event"] == "card");
    assert_eq!(got["data"], "8a5c3e80");
    assert_eq!(got["bits"], 26);
    wait_bus(&mut events, "card delivered under SC", |e| {
        is_pd(
            e,
            1,
            |p| matches!(p, PdEvent::CardDelivered(c) if c.data == data),
        )
    })
    .await;

    // The panel flashes green: read as its verdict on that card.
    cp.send(
        serde_json::json!({"cmd": "led", "pd": 1, "temporary": true, "control_code": 2,
        "on_color": 2, "on_count": 5, "off_count": 0, "timer_count": 10}),
    );
    wait_bus(&mut events, "LED under SC", |e| {
        is_pd(
            e,
            1,
            |p| matches!(p, PdEvent::Led(s) if s.effective().on_color == 2),
        )
    })
    .await;
    wait_bus(&mut events, "panel verdict", |e| {
        is_pd(e, 1, |p| {
            matches!(p, PdEvent::PanelVerdict { card, verdict: Verdict::Granted, .. } if card.data == data)
        })
    })
    .await;
    let done = cp.wait_for("LED completion", |v| v["event"] == "completed");
    assert_eq!(done["status"], 0, "{done}");
    assert!(!cp.went_offline(), "CP dropped the PD: {:#?}", cp.seen);
    stop(stop_tx, join).await;
}

/// (c): install mode. keyway has no key; the CP (with its SCBK) is refused, falls back to
/// SCBK-D, installs its key with osdp_KEYSET and comes up secure with it. The key is on disk
/// (0600). keyway then restarts from that file: install mode is over, the CP (re-enabled, as
/// libosdp parks a PD for 300 s after an error) comes up secure again with the stored key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_mode_keyset_survives_restart() {
    use std::os::unix::fs::PermissionsExt;
    let pty = pty_pair();
    let keys = tempfile::tempdir().unwrap();
    let key_file = keys.path().join("door1.scbk");
    let mut cfg = bus_config(&pty.pd, vec![secure_pd(1, None, true)]);
    cfg.key_files.insert(1, key_file.clone());
    let (stop_tx, stop_rx) = watch::channel(false);
    let (_handle, mut events, join) = spawn_bus(cfg, stop_rx).unwrap();
    let mut cp = Cp::start_with(&pty.cp, &[1], &["--scbk", SCBK_HEX]);
    wait_bus_naks_ok(&mut events, "SCBK-D session", |e| {
        is_pd(e, 1, |p| {
            *p == PdEvent::SecureChannelUp { install_key: true }
        })
    })
    .await;
    wait_bus_naks_ok(&mut events, "key installed", |e| {
        is_pd(e, 1, |p| *p == PdEvent::KeyInstalled)
    })
    .await;
    wait_bus_naks_ok(&mut events, "session with the new key", |e| {
        is_pd(e, 1, |p| {
            *p == PdEvent::SecureChannelUp { install_key: false }
        })
    })
    .await;
    let online = cp.wait_online(1);
    assert_eq!(online["sc"], true, "{online}");
    assert_eq!(load_scbk(&key_file).unwrap(), Some(scbk()));
    let mode = std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // Hold the PD side of the pty open across the restart: socat ends the pair when the last
    // reader of a side closes, which a real RS-485 line would not do.
    let _hold = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&pty.pd)
        .expect("hold pty");
    stop(stop_tx, join).await;

    // keyway restarts with the stored key; install mode no longer applies.
    let stored = load_scbk(&key_file).unwrap();
    assert!(stored.is_some());
    let mut cfg = bus_config(&pty.pd, vec![secure_pd(1, stored, false)]);
    cfg.key_files.insert(1, key_file.clone());
    let (stop_tx, stop_rx) = watch::channel(false);
    let (handle, mut events, join) = spawn_bus(cfg, stop_rx).unwrap();
    cp.send(serde_json::json!({"cmd": "disable", "pd": 1}));
    let r = cp.wait_for("disabled", |v| v["cmd"] == "disable");
    assert_eq!(r["ok"], true, "{r}");
    cp.send(serde_json::json!({"cmd": "enable", "pd": 1}));
    let r = cp.wait_for("enabled", |v| v["cmd"] == "enable");
    assert_eq!(r["ok"], true, "{r}");
    wait_bus_naks_ok(&mut events, "secure again after restart", |e| {
        is_pd(e, 1, |p| {
            *p == PdEvent::SecureChannelUp { install_key: false }
        })
    })
    .await;
    cp.wait_for("sc active after restart", |v| {
        v["event"] == "sc" && v["active"] == true
    });
    handle
        .send_card(1, card(26, &[0x01, 0x02, 0x03, 0x40]))
        .await
        .unwrap();
    let got = cp.wait_for("card after restart", |v| v["event"] == "card");
    assert_eq!(got["data"], "01020340");
    // SCBK-D was never accepted again: no second install-key session.
    while let Ok(ev) = events.try_recv() {
        assert!(
            !is_pd(&ev, 1, |p| *p
                == PdEvent::SecureChannelUp { install_key: true }),
            "SCBK-D accepted after KEYSET"
        );
    }
    stop(stop_tx, join).await;
}

/// (e): the panel moves the PD to a new address with osdp_COMSET. keyway answers there from
/// the next command on (a card still reaches the panel), and the change is persisted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn comset_moves_the_pd_to_a_new_address() {
    let pty = pty_pair();
    let dir = tempfile::tempdir().unwrap();
    let com_file = dir.path().join("bus.com.json");
    let mut cfg = bus_config(&pty.pd, vec![PdConfig::new(1)]);
    cfg.com_file = Some(com_file.clone());
    let (stop_tx, stop_rx) = watch::channel(false);
    let (handle, mut events, join) = spawn_bus(cfg, stop_rx).unwrap();
    let mut cp = Cp::start(&pty.cp, &[1]);
    cp.wait_online(1);
    comset_pd1_to_5(&mut cp, &mut events).await;
    // The card API still uses the door's configured address; the wire uses the new one.
    handle
        .send_card(1, card(26, &[0x33, 0x44, 0x55, 0x40]))
        .await
        .unwrap();
    let got = cp.wait_for("card after COMSET", |v| v["event"] == "card");
    assert_eq!(got["data"], "33445540");
    assert!(!cp.went_offline(), "CP dropped the PD: {:#?}", cp.seen);
    let stored = keyway::serial::load_com_settings(&com_file).unwrap();
    assert_eq!(
        stored.get(&1).map(|c| (c.address, c.baud)),
        Some((5, 115_200))
    );

    // Restart both ends (holding the pty open meanwhile): keyway answers on address 5 from
    // the stored settings, so a panel configured for 5 finds it.
    let hold = |p: &Path| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(p)
            .expect("hold pty")
    };
    let (_hold_pd, _hold_cp) = (hold(&pty.pd), hold(&pty.cp));
    drop(cp);
    stop(stop_tx, join).await;
    let mut cfg = bus_config(&pty.pd, vec![PdConfig::new(1)]);
    cfg.com_file = Some(com_file.clone());
    let (stop_tx, stop_rx) = watch::channel(false);
    let (_handle, _events, join) = spawn_bus(cfg, stop_rx).unwrap();
    let mut cp = Cp::start(&pty.cp, &[5]);
    cp.wait_online(5);
    stop(stop_tx, join).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_missing_then_vanishing_is_retried() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pd_path = dir.path().join("pd");
    let cp_path = dir.path().join("cp");
    let (stop_tx, stop_rx) = watch::channel(false);
    let (handle, mut events, join) =
        spawn_bus(bus_config(&pd_path, vec![PdConfig::new(1)]), stop_rx).unwrap();
    // No port yet: errors, retries, no panic.
    wait_bus(&mut events, "open error", |e| {
        matches!(e, BusEvent::PortError { .. })
    })
    .await;
    wait_bus(&mut events, "second open error", |e| {
        matches!(e, BusEvent::PortError { .. })
    })
    .await;

    let line = socat(&pd_path, &cp_path);
    wait_bus(&mut events, "port opened", |e| {
        matches!(e, BusEvent::PortOpened { .. })
    })
    .await;
    let mut cp = Cp::start(&cp_path, &[1]);
    cp.wait_online(1);

    // The line disappears under keyway.
    drop(cp);
    drop(line);
    wait_bus(&mut events, "port failure", |e| {
        matches!(e, BusEvent::PortError { .. })
    })
    .await;
    // SIGKILLed socat leaves its links behind; a new one needs the names free.
    let _ = std::fs::remove_file(&pd_path);
    let _ = std::fs::remove_file(&cp_path);

    // It comes back: keyway reopens it and serves a new CP session.
    let _line = socat(&pd_path, &cp_path);
    wait_bus(&mut events, "port reopened", |e| {
        matches!(e, BusEvent::PortOpened { .. })
    })
    .await;
    let mut cp = Cp::start(&cp_path, &[1]);
    cp.wait_online(1);
    handle
        .send_card(1, card(26, &[0x55, 0xAA, 0x55, 0x80]))
        .await
        .unwrap();
    let got = cp.wait_for("card after reconnect", |v| v["event"] == "card");
    assert_eq!(got["data"], "55aa5580");

    stop(stop_tx, join).await;
}

/// A PD that opens its line answers only what the panel sends after the open. Commands a
/// pty (or a serial server) queued while keyway was not running were given up on by the
/// panel long ago; answering one puts an old sequence number on the line, which libosdp's
/// panel NAKs before going offline for 300 s (seen when the panel started before keyway).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_queued_before_the_port_opened_are_not_answered() {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::AsRawFd;
    use tokio::io::AsyncWriteExt;
    use tokio_serial::SerialPortBuilderExt;

    let pty = pty_pair();
    // osdp_ID to address 1 (SQN 0, CRC-16), sent while no PD has the line open.
    let stale = framed(&[0x53, 0x01, 0x09, 0x00, 0x04, 0x61, 0x00]);
    let mut line = tokio_serial::new(pty.cp.display().to_string(), 115_200)
        .open_native_async()
        .expect("open CP side");
    AsyncWriteExt::write_all(&mut line, &stale).await.unwrap();
    // Wait (bounded) until it is queued on keyway's side of the pair.
    let pd_side = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(&pty.pd)
        .expect("open PD side");
    tokio::time::timeout(STEP_TIMEOUT, async {
        loop {
            let mut queued: libc::c_int = 0;
            // SAFETY: FIONREAD writes one c_int through the pointer; the fd is open.
            let rc = unsafe { libc::ioctl(pd_side.as_raw_fd(), libc::FIONREAD, &mut queued) };
            assert_eq!(rc, 0, "FIONREAD: {}", std::io::Error::last_os_error());
            if usize::try_from(queued).unwrap_or(0) >= stale.len() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the stale command reaches the PD side");

    let (stop_tx, stop_rx) = watch::channel(false);
    let (_handle, mut events, join) =
        spawn_bus(bus_config(&pty.pd, vec![PdConfig::new(1)]), stop_rx).unwrap();
    wait_bus(&mut events, "port opened", |e| {
        matches!(e, BusEvent::PortOpened { .. })
    })
    .await;
    // A fresh osdp_POLL: its osdp_ACK must be the first thing keyway says.
    let poll = framed(&[0x53, 0x01, 0x08, 0x00, 0x04, 0x60]);
    let ack = framed(&[0x53, 0x81, 0x08, 0x00, 0x04, 0x40]);
    let got = raw_exchange(&mut line, &poll, ack.len(), "POLL").await;
    assert_eq!(
        got.get(..ack.len()),
        Some(&ack[..]),
        "keyway's first reply must answer the POLL, not the osdp_ID queued before it opened \
         the line; got {got:02x?}"
    );
    drop(pd_side);
    stop(stop_tx, join).await;
}

/// Issue 11, defect 2: under an enforced secure channel a clear osdp_COMSET (anyone on the
/// line could send one) is refused with NAK 0x06: the PD stays at its address and nothing is
/// persisted. Raw bytes written on the CP side while no CP is attached; then libosdp's CP
/// (enforced secure) still comes up at the old address and can move the PD from inside the
/// session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_comset_is_refused_under_an_enforced_secure_channel() {
    use tokio_serial::SerialPortBuilderExt;

    let pty = pty_pair();
    let dir = tempfile::tempdir().unwrap();
    let com_file = dir.path().join("bus.com.json");
    let mut cfg = bus_config(&pty.pd, vec![secure_pd(1, Some(scbk()), false)]);
    cfg.com_file = Some(com_file.clone());
    let (stop_tx, stop_rx) = watch::channel(false);
    let (handle, mut events, join) = spawn_bus(cfg, stop_rx).unwrap();
    wait_bus(&mut events, "port opened", |e| {
        matches!(e, BusEvent::PortOpened { .. })
    })
    .await;
    // Keeps the CP side open between the raw writer and the CP (socat ends the pair when
    // a side's last reader closes).
    let _hold = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&pty.cp)
        .expect("hold pty");

    // osdp_COMSET to address 1 in clear: new address 5, 9600 baud (SQN 0, CRC-16; the CRC
    // function is checked against libosdp's packets in phy's unit tests).
    let comset = framed(&[
        0x53, 0x01, 0x0D, 0x00, 0x04, 0x6E, 0x05, 0x80, 0x25, 0x00, 0x00,
    ]);
    // The reply: osdp_NAK 0x06 from address 1 (0x81), in clear.
    let nak = framed(&[0x53, 0x81, 0x09, 0x00, 0x04, 0x41, 0x06]);

    let mut line = tokio_serial::new(pty.cp.display().to_string(), 115_200)
        .open_native_async()
        .expect("open CP side");
    let got = raw_exchange(&mut line, &comset, nak.len(), "clear COMSET").await;
    assert_eq!(got, nak, "reply to a clear COMSET");
    drop(line);
    wait_bus_naks_ok(&mut events, "NAK 0x06 to the clear COMSET", |e| {
        is_pd(e, 1, |p| {
            *p == PdEvent::NakSent {
                command: 0x6E,
                code: keyway::osdp::NakCode::ScConditions,
            }
        })
    })
    .await;
    assert!(!com_file.exists(), "a clear COMSET was persisted");

    // libosdp's CP, enforcing the secure channel, finds the PD where it was.
    let mut cp = Cp::start_with(&pty.cp, &[1], &["--scbk", SCBK_HEX, "--enforce-secure"]);
    let online = cp.wait_online(1);
    assert_eq!(online["sc"], true, "{online}");
    // COMSET inside the session is applied and persisted.
    comset_pd1_to_5(&mut cp, &mut events).await;
    let stored = keyway::serial::load_com_settings(&com_file).unwrap();
    assert_eq!(stored.get(&1).map(|c| c.address), Some(5));
    drop(cp);
    drop(handle);
    stop(stop_tx, join).await;
}

/// The CP moves PD 1 to address 5 (same speed) with osdp_COMSET: applied by keyway and
/// completed at the CP.
async fn comset_pd1_to_5(cp: &mut Cp, events: &mut broadcast::Receiver<BusEvent>) {
    cp.send(serde_json::json!({"cmd": "comset", "pd": 1, "address": 5, "baud_rate": 115200}));
    wait_bus(events, "COMSET applied", |e| {
        is_pd(e, 1, |p| {
            *p == PdEvent::ComSetApplied {
                address: 5,
                baud: 115_200,
            }
        })
    })
    .await;
    let done = cp.wait_for("COMSET completion", |v| v["event"] == "completed");
    assert_eq!(done["status"], 0, "{done}");
}

/// Issue 11, defect 4: PyPI `osdp` 1.6, a second independent CP, asks for SCBK-D in every
/// osdp_CHLNG. keyway holds its own key (derived by that CP from its master key and keyway's
/// cUID) and is not in install mode: it answers with that key, as libosdp's PD does, and the
/// session comes up; a card then reaches the panel through it. SCBK-D is never accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panel_asking_for_scbk_d_gets_a_session_with_the_installed_key() {
    const MASTER_KEY: &str = "000102030405060708090a0b0c0d0e0f";
    let mut pd = secure_pd(1, None, false);
    pd.identity.vendor_code = 0x5A_4B_3C;
    pd.identity.model = 7;
    pd.identity.serial = 0x0102_0304;
    // cUID: vendor code (3, LE), model, serial (4, LE).
    let cuid = "3c4b5a0704030201";
    let out = std::process::Command::new(support::python_osdp16())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/osdp16_cp.py"))
        .args(["--derive-scbk", "--master-key", MASTER_KEY, "--cuid", cuid])
        .output()
        .expect("run osdp16_cp.py --derive-scbk");
    assert!(out.status.success(), "{out:?}");
    let key = hex::decode(String::from_utf8_lossy(&out.stdout).trim()).expect("hex key");
    pd.secure = Some(SecureConfig {
        scbk: Some(Scbk::from_slice(&key).expect("16-byte key")),
        install_mode: false,
        enforce_secure: true,
    });

    let pty = pty_pair();
    let (stop_tx, stop_rx) = watch::channel(false);
    let (handle, mut events, join) = spawn_bus(bus_config(&pty.pd, vec![pd]), stop_rx).unwrap();
    let mut cp = Cp::start_osdp16(&pty.cp, 1, MASTER_KEY);
    // Its first POLL carries a security block without a session: NAK 0x06, as from libosdp.
    let up = wait_bus_naks_ok(&mut events, "secure channel up", |e| {
        is_pd(e, 1, |p| matches!(p, PdEvent::SecureChannelUp { .. }))
    })
    .await;
    assert!(
        is_pd(&up, 1, |p| *p
            == PdEvent::SecureChannelUp { install_key: false }),
        "{up:?}"
    );
    cp.wait_for("sc active at the CP", |v| {
        v["event"] == "sc" && v["active"] == true
    });

    let data = vec![0x6B, 0x1D, 0x2C, 0x40];
    handle.send_card(1, card(26, &data)).await.unwrap();
    let got = cp.wait_for("card through the session", |v| v["event"] == "card");
    assert_eq!(
        (got["bits"].as_u64(), got["data"].as_str()),
        (Some(26), Some("6b1d2c40"))
    );
    wait_pd(&mut events, "card delivered", 1, |p| match p {
        PdEvent::CardDelivered(c) if c.data == data => Some(()),
        _ => None,
    })
    .await;
    // One session, with the installed key, kept: never SCBK-D, no handshake loop, no NAK
    // after the session came up (wait_pd above fails on one).
    drop(cp);
    drop(handle);
    stop(stop_tx, join).await;
    let mut ups = Vec::new();
    while let Ok(ev) = events.try_recv() {
        if let BusEvent::Pd {
            event: e @ PdEvent::SecureChannelUp { .. },
            ..
        } = ev
        {
            ups.push(e);
        }
    }
    assert!(ups.is_empty(), "handshakes after the first: {ups:?}");
}
