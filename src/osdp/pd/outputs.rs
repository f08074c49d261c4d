//! What the CP drives on the PD: LEDs (temporary over permanent, timers in 100 ms), the
//! buzzer and the outputs (relays), from osdp_LED, osdp_BUZ and osdp_OUT.

use std::time::{Duration, Instant};

use super::{Pd, PdEvent};
use crate::osdp::command::{BuzzerRecord, LedParams, LedRecord, OutputRecord};
use crate::osdp::reply::{NakCode, Reply};

/// Current state of one LED as the CP set it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedState {
    pub reader: u8,
    pub led: u8,
    pub permanent: LedParams,
    /// The temporary setting and when it ends (then the permanent one shows again).
    pub temporary: Option<(LedParams, Instant)>,
}

impl LedState {
    /// The setting visible now.
    pub fn effective(&self) -> LedParams {
        self.temporary.map_or(self.permanent, |(t, _)| t)
    }
}

/// Current state of one output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputState {
    pub active: bool,
    /// For a temporary command: when it ends and the state it returns to.
    pub until: Option<(Instant, bool)>,
}

impl Pd {
    /// When temporary LED and output settings end.
    pub(super) fn output_deadlines(&self) -> impl Iterator<Item = Instant> + '_ {
        let leds = self.leds.iter().filter_map(|l| l.temporary.map(|(_, t)| t));
        let outs = self.outputs.iter().filter_map(|o| o.until.map(|(t, _)| t));
        leds.chain(outs)
    }

    /// End the temporary LED and output settings due by `now`, reporting each change.
    pub(super) fn expire_outputs(&mut self, now: Instant) {
        let mut changed = Vec::new();
        for led in &mut self.leds {
            if matches!(led.temporary, Some((_, end)) if end <= now) {
                led.temporary = None;
                changed.push(PdEvent::Led(*led));
            }
        }
        for (i, out) in self.outputs.iter_mut().enumerate() {
            if let Some((end, after)) = out.until {
                if end <= now {
                    *out = OutputState {
                        active: after,
                        until: None,
                    };
                    let output = u8::try_from(i).unwrap_or(u8::MAX);
                    changed.push(PdEvent::Output {
                        output,
                        state: *out,
                    });
                }
            }
        }
        for ev in changed {
            self.emit(ev);
        }
    }

    pub fn leds(&self) -> &[LedState] {
        &self.leds
    }

    pub fn buzzer(&self, reader: u8) -> Option<BuzzerRecord> {
        self.buzzers.get(usize::from(reader)).copied().flatten()
    }

    pub fn outputs(&self) -> &[OutputState] {
        &self.outputs
    }

    pub(super) fn apply_led(&mut self, recs: &[LedRecord], now: Instant) -> Reply {
        // Validate every record first so a command is applied whole or not at all.
        let valid = recs.iter().all(|r| {
            r.reader < self.cfg.readers
                && r.led < self.cfg.leds_per_reader
                && r.temporary.control <= 2
                && r.permanent.control <= 1
        });
        if !valid {
            return Reply::Nak(NakCode::Record);
        }
        for r in recs {
            let idx =
                usize::from(r.reader) * usize::from(self.cfg.leds_per_reader) + usize::from(r.led);
            let Some(led) = self.leds.get_mut(idx) else {
                continue;
            };
            if r.permanent.control == 1 {
                led.permanent = r.permanent;
            }
            match r.temporary.control {
                1 => led.temporary = None,
                2 => {
                    let dur = Duration::from_millis(u64::from(r.temporary.timer) * 100);
                    led.temporary = now.checked_add(dur).map(|end| (r.temporary, end));
                }
                _ => {}
            }
            let state = *led;
            self.emit(PdEvent::Led(state));
        }
        if let Some(((card, attempt), verdict)) = self.verdict.led(recs, now) {
            self.emit(PdEvent::PanelVerdict {
                card,
                verdict,
                attempt,
            });
        }
        Reply::Ack
    }

    pub(super) fn apply_buzzer(&mut self, recs: &[BuzzerRecord]) -> Reply {
        if !self.cfg.buzzer {
            return Reply::Nak(NakCode::UnknownCommand);
        }
        if !recs
            .iter()
            .all(|r| r.reader < self.cfg.readers && r.tone <= 2)
        {
            return Reply::Nak(NakCode::Record);
        }
        for r in recs {
            if let Some(slot) = self.buzzers.get_mut(usize::from(r.reader)) {
                *slot = Some(*r);
            }
            self.emit(PdEvent::Buzzer(*r));
        }
        Reply::Ack
    }

    pub(super) fn apply_output(&mut self, recs: &[OutputRecord], now: Instant) -> Reply {
        if !recs
            .iter()
            .all(|r| r.output < self.cfg.outputs && r.control <= 6)
        {
            return Reply::Nak(NakCode::Record);
        }
        for r in recs {
            let Some(out) = self.outputs.get_mut(usize::from(r.output)) else {
                continue;
            };
            let timed = now.checked_add(Duration::from_millis(u64::from(r.timer) * 100));
            let prev = *out;
            *out = match r.control {
                0 => prev,
                1 => OutputState {
                    active: false,
                    until: None,
                },
                2 => OutputState {
                    active: true,
                    until: None,
                },
                // 3/4: permanent state applies once a running timer ends.
                3 | 4 => {
                    let want = r.control == 4;
                    match prev.until {
                        Some((end, _)) => OutputState {
                            active: prev.active,
                            until: Some((end, want)),
                        },
                        None => OutputState {
                            active: want,
                            until: None,
                        },
                    }
                }
                5 => OutputState {
                    active: true,
                    until: timed.map(|t| (t, prev.active)),
                },
                _ => OutputState {
                    active: false,
                    until: timed.map(|t| (t, prev.active)),
                },
            };
            let state = *out;
            self.emit(PdEvent::Output {
                output: r.output,
                state,
            });
        }
        Reply::Ack
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::super::*;
    use crate::osdp::reply::code as rc;

    #[test]
    fn led_buzzer_output_state_is_tracked() {
        let mut cfg = PdConfig::new(ADDR);
        cfg.outputs = 2;
        let mut pd = Pd::new(cfg).unwrap();
        let now = Instant::now();
        run(&mut pd, cmd(0, 0x60, &[]), now);
        events(&mut pd);
        // Permanent green.
        assert_eq!(
            run(&mut pd, cmd(1, 0x69, &led_data(0, 0, 1, 2)), now).code,
            rc::ACK
        );
        assert_eq!(pd.leds()[0].effective().on_color, 2);
        // Temporary red for 1 s.
        let temp = [0, 0, 2, 3, 3, 1, 0, 10, 0, 0, 0, 0, 0, 0];
        assert_eq!(run(&mut pd, cmd(2, 0x69, &temp), now).code, rc::ACK);
        assert_eq!(pd.leds()[0].effective().on_color, 1);
        assert_eq!(pd.leds()[0].permanent.on_color, 2);
        let evs = events(&mut pd);
        assert_eq!(evs.len(), 2);
        assert!(matches!(evs[1], PdEvent::Led(s) if s.temporary.is_some()));
        assert_eq!(pd.next_timeout(), Some(now + Duration::from_secs(1)));
        pd.handle_timeout(now + Duration::from_secs(1));
        assert_eq!(pd.leds()[0].effective().on_color, 2);
        assert!(matches!(events(&mut pd)[..], [PdEvent::Led(s)] if s.temporary.is_none()));
        // Buzzer.
        assert_eq!(
            run(&mut pd, cmd(3, 0x6A, &[0, 2, 1, 1, 2]), now).code,
            rc::ACK
        );
        assert_eq!(pd.buzzer(0).map(|b| b.count), Some(2));
        // Output 1 on, then temporary off for 0.5 s.
        assert_eq!(run(&mut pd, cmd(1, 0x68, &[1, 2, 0, 0]), now).code, rc::ACK);
        assert!(pd.outputs()[1].active);
        assert_eq!(run(&mut pd, cmd(2, 0x68, &[1, 6, 5, 0]), now).code, rc::ACK);
        assert!(!pd.outputs()[1].active);
        pd.handle_timeout(now + Duration::from_millis(500));
        assert!(pd.outputs()[1].active);
        // OSTAT reports both outputs.
        let r = run(&mut pd, cmd(3, 0x66, &[]), now);
        assert_eq!((r.code, r.data), (rc::OSTATR, vec![0, 1]));
        // A multi-record command with one bad record changes nothing.
        let mut data = led_data(0, 0, 1, 5);
        data.extend(led_data(0, 9, 1, 5));
        assert_eq!(run(&mut pd, cmd(1, 0x69, &data), now).code, rc::NAK);
        assert_eq!(pd.leds()[0].permanent.on_color, 2);
    }
}
