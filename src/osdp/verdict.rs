//! Reading the panel's access decision from what it does right after a card read.
//!
//! OSDP has no "access granted" message: the panel decides and then drives the reader's LED
//! (and buzzer). Within a short window after keyway sent a card as osdp_RAW, the first LED
//! command that shows green or red is read as the verdict: green = granted, red = denied.
//! Temporary settings (what panels use for the grant/deny flash) win over permanent ones in
//! the same record; a buzzer alone decides nothing (panels beep for both). Nothing
//! conclusive within the window = unknown.

use std::time::{Duration, Instant};

use super::command::LedRecord;

/// Default window after the osdp_RAW in which LED commands count as the verdict.
pub const DEFAULT_VERDICT_WINDOW: Duration = Duration::from_secs(2);

/// OSDP LED colour codes (osdp_LED): 1 red, 2 green.
const RED: u8 = 1;
const GREEN: u8 = 2;

/// The panel's decision as seen on the reader's LED.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Granted,
    Denied,
    /// No green or red within the window.
    Unknown,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Granted => "granted",
            Verdict::Denied => "denied",
            Verdict::Unknown => "unknown",
        }
    }
}

/// The verdict one LED record expresses, if any: its temporary "on" colour when it sets a
/// temporary state, else its permanent "on" colour when it sets one.
pub fn led_verdict(rec: &LedRecord) -> Option<Verdict> {
    let colour = if rec.temporary.control == 2 {
        Some(rec.temporary.on_color)
    } else if rec.permanent.control == 1 {
        Some(rec.permanent.on_color)
    } else {
        None
    }?;
    match colour {
        GREEN => Some(Verdict::Granted),
        RED => Some(Verdict::Denied),
        _ => None,
    }
}

/// Tracks the window after one card read. Pure state: the PD feeds it and the clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerdictWindow<C> {
    pending: Option<(C, Instant)>,
    window: Duration,
}

impl<C> VerdictWindow<C> {
    pub fn new(window: Duration) -> Self {
        Self {
            pending: None,
            window,
        }
    }

    /// A card went out at `now`. Returns the previous card, still undecided, as unknown.
    pub fn card_sent(&mut self, card: C, now: Instant) -> Option<(C, Verdict)> {
        let prev = self.pending.take().map(|(c, _)| (c, Verdict::Unknown));
        self.pending = now.checked_add(self.window).map(|end| (card, end));
        prev
    }

    /// LED records arrived at `now`: the first conclusive one decides the pending card.
    pub fn led(&mut self, recs: &[LedRecord], now: Instant) -> Option<(C, Verdict)> {
        let (_, end) = self.pending.as_ref()?;
        if now > *end {
            return self.pending.take().map(|(c, _)| (c, Verdict::Unknown));
        }
        let verdict = recs.iter().find_map(led_verdict)?;
        self.pending.take().map(|(c, _)| (c, verdict))
    }

    /// When the window of the pending card closes.
    pub fn deadline(&self) -> Option<Instant> {
        self.pending.as_ref().map(|(_, end)| *end)
    }

    /// The window closed with nothing conclusive.
    pub fn expire(&mut self, now: Instant) -> Option<(C, Verdict)> {
        match &self.pending {
            Some((_, end)) if now >= *end => {
                self.pending.take().map(|(c, _)| (c, Verdict::Unknown))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::osdp::command::LedParams;

    fn rec(temp: Option<u8>, perm: Option<u8>) -> LedRecord {
        LedRecord {
            reader: 0,
            led: 0,
            temporary: LedParams {
                control: if temp.is_some() { 2 } else { 0 },
                on_color: temp.unwrap_or(0),
                timer: 10,
                ..LedParams::default()
            },
            permanent: LedParams {
                control: if perm.is_some() { 1 } else { 0 },
                on_color: perm.unwrap_or(0),
                ..LedParams::default()
            },
        }
    }

    #[test]
    fn colours_map_to_verdicts() {
        assert_eq!(led_verdict(&rec(Some(2), None)), Some(Verdict::Granted));
        assert_eq!(led_verdict(&rec(Some(1), None)), Some(Verdict::Denied));
        assert_eq!(led_verdict(&rec(None, Some(2))), Some(Verdict::Granted));
        assert_eq!(led_verdict(&rec(None, Some(1))), Some(Verdict::Denied));
        // Temporary flash wins over the permanent (idle) colour in the same record.
        assert_eq!(led_verdict(&rec(Some(2), Some(1))), Some(Verdict::Granted));
        // Amber, blue, off, or no-op records decide nothing.
        assert_eq!(led_verdict(&rec(Some(3), None)), None);
        assert_eq!(led_verdict(&rec(None, Some(0))), None);
        assert_eq!(led_verdict(&rec(None, None)), None);
        // Cancel temporary (control 1) is not a colour.
        let mut r = rec(None, None);
        r.temporary.control = 1;
        r.temporary.on_color = 2;
        assert_eq!(led_verdict(&r), None);
    }

    #[test]
    fn window_decides_once_then_expires() {
        let t = Instant::now();
        let mut w = VerdictWindow::new(Duration::from_secs(2));
        assert_eq!(w.led(&[rec(Some(2), None)], t), None, "no card yet");
        assert_eq!(w.card_sent("a", t), None);
        assert_eq!(w.deadline(), Some(t + Duration::from_secs(2)));
        // Amber first: not conclusive, still pending.
        assert_eq!(w.led(&[rec(Some(3), None)], t), None);
        let later = t + Duration::from_millis(300);
        assert_eq!(
            w.led(&[rec(Some(3), None), rec(Some(1), None)], later),
            Some(("a", Verdict::Denied))
        );
        // Decided: later colours do not count again.
        assert_eq!(w.led(&[rec(Some(2), None)], later), None);
        assert_eq!(w.deadline(), None);
        // Nothing within the window: unknown at the deadline, not before.
        w.card_sent("b", t);
        assert_eq!(w.expire(t + Duration::from_millis(1999)), None);
        assert_eq!(
            w.expire(t + Duration::from_secs(2)),
            Some(("b", Verdict::Unknown))
        );
        // A green after the window is not read as a grant.
        w.card_sent("c", t);
        assert_eq!(
            w.led(&[rec(Some(2), None)], t + Duration::from_secs(3)),
            Some(("c", Verdict::Unknown))
        );
        // A new card while one is pending: the old one is unknown.
        w.card_sent("d", t);
        assert_eq!(w.card_sent("e", t), Some(("d", Verdict::Unknown)));
    }
}
