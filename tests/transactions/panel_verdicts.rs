use keyway::acl::Store;
use keyway::card::WiegandBits;
use keyway::config::Door;
use keyway::daemon::access::{Access, Attempt, SharedLimiter, Subject};
use keyway::daemon::*;
use keyway::events::Transport;
use keyway::osdp::{AttemptId, PdEvent, RawCard, RawFormat, Verdict};
use keyway::serial::BusEvent;
use keyway_sim::door::{door, sec1, setup};
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

/// The [`PanelSink`] half of [`BusPanel`] without a serial port: the card is registered
/// with the bus's pending attempts, as `BusPanel::send_card` does before queueing it.
#[derive(Clone)]
struct PendingPanel(Pending);

impl PanelSink for PendingPanel {
    fn send_card(
        &self,
        _door: &Door,
        _bits: WiegandBits,
        attempt: AttemptId,
        started: Instant,
    ) -> Option<VerdictWait> {
        self.0.push(attempt, started)
    }
}

fn pd(addr: u8, event: PdEvent) -> BusEvent {
    BusEvent::Pd { addr, event }
}

fn card() -> RawCard {
    RawCard {
        reader: 0,
        format: RawFormat::Wiegand,
        bit_count: 26,
        data: vec![1, 2, 3, 0],
    }
}

/// Two grants in flight at one door (a BLE phone and an NFC tap); the panel refuses the
/// first card and grants the second. Each attempt hears its own verdict, and each event
/// row gets its own, whether the row was stored before or after the verdict came.
#[tokio::test]
async fn two_overlapping_grants_at_one_door_each_get_their_own_verdict() {
    let s = setup(None, None, "front");
    let pending = Pending::default();
    let limiter: SharedLimiter = shared_limiter(access::RateLimitConfig::default());
    let access = Access::new(
        Arc::new(door()),
        s.store.clone(),
        PendingPanel(pending.clone()),
        limiter,
    );
    let key = sec1(&s.enrolled);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let subject = || Subject::Endpoint {
        key,
        signaling_bitmap: None,
    };
    let mut ble: Attempt = access.begin(Transport::Ble, Instant::now(), deadline);
    access.decide(&mut ble, subject()).await.unwrap();
    let mut nfc: Attempt = access.begin(Transport::Nfc, Instant::now(), deadline);
    access.decide(&mut nfc, subject()).await.unwrap();
    let (a, b) = (ble.attempt_id.unwrap(), nfc.attempt_id.unwrap());
    assert_ne!(a, b);
    // The BLE attempt is recorded before its verdict comes (the phone was quick); the
    // NFC one after.
    access.finish(&ble, None, None).await;
    // What the PD reports: both cards leave, the panel answers on each (the PD unit test
    // `each_verdict_names_the_attempt_of_its_card` shows it tags them so).
    let events = [
        pd(
            0,
            PdEvent::CardSent {
                card: card(),
                attempt: Some(a),
            },
        ),
        pd(
            0,
            PdEvent::PanelVerdict {
                card: card(),
                verdict: Verdict::Denied,
                attempt: Some(a),
            },
        ),
        pd(
            0,
            PdEvent::CardSent {
                card: card(),
                attempt: Some(b),
            },
        ),
        pd(
            0,
            PdEvent::PanelVerdict {
                card: card(),
                verdict: Verdict::Granted,
                attempt: Some(b),
            },
        ),
    ];
    let verdict_wait = async {
        tokio::join!(
            access.panel_verdict(&mut ble, Duration::from_secs(2)),
            access.panel_verdict(&mut nfc, Duration::from_secs(2)),
        )
    };
    let feed = async {
        for e in &events {
            on_bus_event("pty", e, &pending, &s.store).await;
        }
    };
    let (verdicts, ()) = tokio::join!(verdict_wait, feed);
    assert_eq!(verdicts, (Some(Verdict::Denied), Some(Verdict::Granted)));
    assert!(!ble.phone_granted() && nfc.phone_granted());
    access.finish(&nfc, None, None).await;

    let store = Store::open(&s._dir.path().join("k.db")).unwrap();
    let rows = store.recent_events(10).unwrap();
    let by_transport = |t: Transport| {
        rows.iter()
            .find(|r| r.event.transport == t)
            .and_then(|r| r.panel_verdict.clone())
    };
    assert_eq!(by_transport(Transport::Ble).as_deref(), Some("denied"));
    assert_eq!(by_transport(Transport::Nfc).as_deref(), Some("granted"));
}
