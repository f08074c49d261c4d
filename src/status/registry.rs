//! The live status the daemon's tasks update: reader events, bus events and PD health, BLE
//! counters, database samples, task states, problems. Cheap to update (one short lock), and
//! [`Registry::snapshot`] builds what `keyway status` prints.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::ble::adapter::AdapterStats;
use crate::cloud::contact::{CloudContact, OfflinePolicy};
use crate::config::Validated;
use crate::nfc::ReaderEvent;
use crate::osdp::PdEvent;
use crate::serial::{refuses_secure_channel, BusEvent, PdHealth};

use super::model::{
    BleStatus, CloudStatus, DatabaseStatus, DiskStatus, DoorStatus, OfflineStatus, OsdpStatus,
    Problem, ReaderStatus, SecureChannel, Snapshot, TaskStatus,
};
use super::probe::{self, DbSample};

#[derive(Clone)]
pub struct Registry {
    inner: Arc<Mutex<Live>>,
    started: Instant,
}

struct DoorLive {
    status: DoorStatus,
    port: String,
    secure_configured: bool,
    /// Unix seconds.
    cert_not_after: Option<i64>,
    ble: Option<Arc<AdapterStats>>,
    cloud_offline: Option<OfflinePolicy>,
}

#[derive(Default)]
struct Live {
    doors: Vec<DoorLive>,
    db: Option<DbSample>,
    disk: Option<DiskStatus>,
    database: Option<DatabaseStatus>,
    cloud: Option<CloudStatus>,
    contact: Option<Arc<CloudContact>>,
    tasks: Vec<TaskStatus>,
    problems: Vec<Problem>,
}

impl Registry {
    pub fn new(cfg: &Validated) -> Self {
        let doors = cfg
            .doors
            .iter()
            .map(|d| {
                let secure_configured = d.osdp.scbk_file.is_some();
                DoorLive {
                    status: DoorStatus {
                        id: d.id.clone(),
                        reader: ReaderStatus {
                            pattern: d.reader_pattern.clone(),
                            present: None,
                            pcsc_error: None,
                        },
                        osdp: OsdpStatus {
                            port: d.port.display().to_string(),
                            address: d.address,
                            secure_channel: if secure_configured {
                                SecureChannel::Waiting
                            } else {
                                SecureChannel::Off
                            },
                            ..OsdpStatus::default()
                        },
                        ble: d.ble.as_ref().map(|b| BleStatus {
                            adapter: b.adapter.clone().unwrap_or_else(|| "default".into()),
                            registered: false,
                            connections: 0,
                        }),
                        ..DoorStatus::default()
                    },
                    port: d.port.display().to_string(),
                    secure_configured,
                    cert_not_after: d
                        .certificate
                        .as_ref()
                        .and_then(|c| probe::certificate_not_after(&c.certificate)),
                    ble: None,
                    cloud_offline: d.cloud_offline,
                }
            })
            .collect();
        Self {
            inner: Arc::new(Mutex::new(Live {
                doors,
                ..Live::default()
            })),
            started: Instant::now(),
        }
    }

    fn live(&self) -> MutexGuard<'_, Live> {
        // A panic while holding the lock leaves plain data behind: keep serving it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn door(&self, id: &str, f: impl FnOnce(&mut DoorLive)) {
        if let Some(d) = self.live().doors.iter_mut().find(|d| d.status.id == id) {
            f(d);
        }
    }

    /// The door ids, in config order.
    pub fn door_ids(&self) -> Vec<String> {
        self.live()
            .doors
            .iter()
            .map(|d| d.status.id.clone())
            .collect()
    }

    pub fn reader_event(&self, door: &str, ev: &ReaderEvent) {
        self.door(door, |d| match ev {
            ReaderEvent::ReaderFound(name) => {
                d.status.reader.present = Some(name.clone());
                d.status.reader.pcsc_error = None;
            }
            ReaderEvent::ReaderLost(_) => d.status.reader.present = None,
            ReaderEvent::ReaderMissing(_) => {
                d.status.reader.present = None;
                d.status.reader.pcsc_error = None;
            }
            ReaderEvent::ServiceDown(e) => {
                d.status.reader.present = None;
                d.status.reader.pcsc_error = Some(e.clone());
            }
        });
    }

    pub fn bus_event(&self, port: &str, ev: &BusEvent) {
        let mut live = self.live();
        let on_port = live.doors.iter_mut().filter(|d| d.port == port);
        match ev {
            BusEvent::PortOpened { .. } => on_port.for_each(|d| d.status.osdp.port_error = None),
            BusEvent::PortError { error, .. } => on_port.for_each(|d| {
                d.status.osdp.port_error = Some(error.clone());
                d.status.osdp.online = false;
            }),
            BusEvent::Pd { addr, event } => {
                let Some(d) = on_port.into_iter().find(|d| d.status.osdp.address == *addr) else {
                    return;
                };
                let o = &mut d.status.osdp;
                match event {
                    PdEvent::Online => o.online = true,
                    PdEvent::Offline => {
                        o.online = false;
                        if o.secure_channel == SecureChannel::Up {
                            o.secure_channel = SecureChannel::Waiting;
                        }
                    }
                    PdEvent::SecureChannelUp { .. } => o.secure_channel = SecureChannel::Up,
                    PdEvent::SecureChannelDown { .. } if d.secure_configured => {
                        o.secure_channel = SecureChannel::Waiting
                    }
                    PdEvent::KeyStoreFailed(_) => o.secure_channel = SecureChannel::Refused,
                    PdEvent::NakSent { command, code }
                        if refuses_secure_channel(*command, *code) =>
                    {
                        o.secure_channel = SecureChannel::Refused
                    }
                    _ => {}
                }
            }
        }
    }

    /// What the bus task said about its PDs just now.
    pub fn bus_health(&self, port: &str, health: &[PdHealth]) {
        let mut live = self.live();
        for d in live.doors.iter_mut().filter(|d| d.port == port) {
            let Some(h) = health.iter().find(|h| h.address == d.status.osdp.address) else {
                continue;
            };
            let o = &mut d.status.osdp;
            o.online = h.online;
            o.last_poll_ms_ago = h
                .since_last_command
                .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX));
            if h.secure_session {
                o.secure_channel = SecureChannel::Up;
            } else if o.secure_channel == SecureChannel::Up {
                o.secure_channel = SecureChannel::Waiting;
            }
        }
    }

    pub fn ble_stats(&self, door: &str, stats: Arc<AdapterStats>) {
        self.door(door, |d| d.ble = Some(stats));
    }

    pub fn db_sample(&self, sample: DbSample) {
        self.live().db = Some(sample);
    }

    pub fn disk(&self, disk: Option<DiskStatus>) {
        self.live().disk = disk;
    }

    /// The store's own view of the database.
    pub fn database(&self, database: DatabaseStatus) {
        self.live().database = Some(database);
    }

    /// The cloud link's state: for the MQTT task to call when keyway has one.
    pub fn set_cloud(&self, cloud: Option<CloudStatus>) {
        self.live().cloud = cloud;
    }

    /// The link's contact, for each door's offline policy.
    pub fn set_cloud_contact(&self, contact: Option<Arc<CloudContact>>) {
        self.live().contact = contact;
    }

    pub fn set_tasks(&self, tasks: Vec<TaskStatus>) {
        self.live().tasks = tasks;
    }

    pub fn set_problems(&self, problems: Vec<Problem>) {
        self.live().problems = problems;
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn snapshot(&self, now_ms: i64) -> Snapshot {
        let live = self.live();
        let offline = live.contact.as_ref().and_then(|c| c.offline_for());
        let doors = live
            .doors
            .iter()
            .map(|d| {
                let mut s = d.status.clone();
                if let (Some(b), Some(stats)) = (s.ble.as_mut(), &d.ble) {
                    let up = stats.registrations.load(Ordering::Relaxed);
                    let lost = stats.losses.load(Ordering::Relaxed);
                    b.registered = up > lost;
                    b.connections = stats.active.load(Ordering::Relaxed);
                }
                s.cloud_offline = d.cloud_offline.map(|p| OfflineStatus {
                    limit_s: p.limit.as_secs(),
                    fail_secure: p.fail_secure,
                    exceeded: p.exceeded(offline),
                });
                s.certificate_expires_in_days = d
                    .cert_not_after
                    .map(|t| probe::days_left(t, now_ms.div_euclid(1000)));
                if let Some((_, served, last)) = live
                    .db
                    .as_ref()
                    .and_then(|db| db.doors.iter().find(|(id, ..)| *id == s.id))
                {
                    s.phones_served = *served;
                    s.last_decisions = last.clone();
                }
                s
            })
            .collect();
        Snapshot {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            uptime_s: self.started.elapsed().as_secs(),
            now_ms,
            doors,
            acl: live.db.as_ref().map(|db| db.acl.clone()),
            outbox: live.db.as_ref().map(|db| db.outbox.clone()),
            disk: live.disk.clone(),
            database: live.database.clone(),
            cloud: live.cloud.clone(),
            tasks: live.tasks.clone(),
            problems: live.problems.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::osdp::pd::ScEndReason;
    use crate::osdp::NakCode;
    use std::path::PathBuf;

    fn cfg(scbk: bool) -> Validated {
        let text = format!(
            r#"
[[door]]
id = "front"
osdp = {{ port = "/dev/ttyS9", address = 3{} }}
nfc = {{ reader = "ACS*" }}
aliro = {{ group_id = "00112233445566778899aabbccddeeff", sub_id = "ffeeddccbbaa99887766554433221100", private_key_file = "k.pem" }}
"#,
            if scbk { ", scbk_file = \"k.scbk\"" } else { "" }
        );
        crate::config::parse(&text, &PathBuf::from("/etc/keyway/keyway.toml")).unwrap()
    }

    fn pd(event: PdEvent) -> BusEvent {
        BusEvent::Pd { addr: 3, event }
    }

    #[test]
    fn reader_and_bus_events_reach_the_door() {
        let r = Registry::new(&cfg(true));
        let door = |r: &Registry| r.snapshot(0).doors.remove(0);
        assert_eq!(door(&r).osdp.secure_channel, SecureChannel::Waiting);
        assert_eq!(door(&r).reader.present, None);

        r.reader_event("front", &ReaderEvent::ReaderFound("ACS 1".into()));
        r.bus_event("/dev/ttyS9", &pd(PdEvent::Online));
        r.bus_event(
            "/dev/ttyS9",
            &pd(PdEvent::SecureChannelUp { install_key: false }),
        );
        let d = door(&r);
        assert_eq!(d.reader.present.as_deref(), Some("ACS 1"));
        assert!(d.osdp.online);
        assert_eq!(d.osdp.secure_channel, SecureChannel::Up);

        // Another port's events and another address are not this door's.
        r.bus_event("/dev/ttyS8", &pd(PdEvent::Offline));
        r.bus_event(
            "/dev/ttyS9",
            &BusEvent::Pd {
                addr: 4,
                event: PdEvent::Offline,
            },
        );
        assert!(door(&r).osdp.online);

        r.bus_event(
            "/dev/ttyS9",
            &pd(PdEvent::SecureChannelDown {
                reason: ScEndReason::Timeout,
            }),
        );
        assert_eq!(door(&r).osdp.secure_channel, SecureChannel::Waiting);
        r.bus_event(
            "/dev/ttyS9",
            &pd(PdEvent::NakSent {
                command: crate::osdp::command::code::SCRYPT,
                code: NakCode::ScConditions,
            }),
        );
        assert_eq!(door(&r).osdp.secure_channel, SecureChannel::Refused);

        r.bus_event(
            "/dev/ttyS9",
            &BusEvent::PortError {
                path: "/dev/ttyS9".into(),
                error: "No such file".into(),
                retry_in: Duration::from_secs(1),
            },
        );
        let d = door(&r);
        assert!(!d.osdp.online);
        assert_eq!(d.osdp.port_error.as_deref(), Some("No such file"));

        r.reader_event("front", &ReaderEvent::ServiceDown("no pcscd".into()));
        let d = door(&r);
        assert_eq!(d.reader.present, None);
        assert_eq!(d.reader.pcsc_error.as_deref(), Some("no pcscd"));
    }

    #[test]
    fn bus_health_gives_the_last_poll() {
        let r = Registry::new(&cfg(false));
        r.bus_health(
            "/dev/ttyS9",
            &[PdHealth {
                address: 3,
                online: true,
                since_last_command: Some(Duration::from_millis(180)),
                secure_session: false,
            }],
        );
        let d = r.snapshot(0).doors.remove(0);
        assert!(d.osdp.online);
        assert_eq!(d.osdp.last_poll_ms_ago, Some(180));
        assert_eq!(d.osdp.secure_channel, SecureChannel::Off);
    }
}
