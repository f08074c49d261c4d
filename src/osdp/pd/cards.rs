//! The card queue: cards waiting for a POLL (bounded, with a time-to-live), the one sent as
//! osdp_RAW and not yet confirmed, and the start of the panel-verdict window.

use std::time::Instant;

use super::{AttemptId, Pd, PdError, PdEvent};
use crate::osdp::reply::{RawCard, Reply};

/// Largest card (bytes of data) accepted for osdp_RAW.
pub const MAX_CARD_BYTES: usize = 64;

/// Why a queued card was not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Older than `card_ttl` when a POLL came.
    Expired,
}

#[derive(Debug)]
pub(super) struct Queued {
    pub(super) card: RawCard,
    attempt: Option<AttemptId>,
    at: Instant,
}

impl Pd {
    /// Cards waiting for a POLL (not counting one sent but not yet confirmed).
    pub fn queued_cards(&self) -> usize {
        self.cards.len()
    }

    /// Queue a card for the next POLL. `now` starts its time-to-live.
    pub fn queue_card(&mut self, card: RawCard, now: Instant) -> Result<(), PdError> {
        self.queue_attempt(card, None, now)
    }

    /// [`queue_card`](Self::queue_card) for `attempt`: its `CardSent` and `PanelVerdict`
    /// events carry the id.
    pub fn queue_attempt(
        &mut self,
        card: RawCard,
        attempt: Option<AttemptId>,
        now: Instant,
    ) -> Result<(), PdError> {
        if card.bit_count == 0 {
            return Err(PdError::InvalidCard("zero bits"));
        }
        if card.byte_len() > MAX_CARD_BYTES {
            return Err(PdError::InvalidCard("too many bits"));
        }
        if card.data.len() != card.byte_len() {
            return Err(PdError::InvalidCard("data length does not match bit count"));
        }
        if card.reader >= self.cfg.readers {
            return Err(PdError::InvalidCard("no such reader"));
        }
        if self.cards.len() >= self.cfg.card_queue_len {
            return Err(PdError::QueueFull(self.cards.len()));
        }
        self.cards.push_back(Queued {
            card,
            attempt,
            at: now,
        });
        Ok(())
    }

    pub(super) fn poll_reply(&mut self, now: Instant) -> Reply {
        while let Some(q) = self.cards.pop_front() {
            if now.saturating_duration_since(q.at) > self.cfg.card_ttl {
                self.emit(PdEvent::CardDropped {
                    card: q.card,
                    reason: DropReason::Expired,
                });
                continue;
            }
            let reply = Reply::Raw(q.card.clone());
            // The previous card's story ends (undecided) before this one's begins, so a
            // listener can tell a verdict on this card from a late one on the last.
            if let Some(((card, attempt), verdict)) =
                self.verdict.card_sent((q.card.clone(), q.attempt), now)
            {
                self.emit(PdEvent::PanelVerdict {
                    card,
                    verdict,
                    attempt,
                });
            }
            self.emit(PdEvent::CardSent {
                card: q.card.clone(),
                attempt: q.attempt,
            });
            self.in_flight = Some(q);
            return reply;
        }
        Reply::Ack
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::super::*;
    use crate::osdp::reply::code as rc;
    use crate::osdp::verdict::{Verdict, DEFAULT_VERDICT_WINDOW};
    use std::time::Duration;

    #[test]
    fn retry_resends_card_byte_for_byte_and_delivery_is_confirmed_by_next_sqn() {
        let mut pd = Pd::new(PdConfig::new(ADDR)).unwrap();
        let now = Instant::now();
        run(&mut pd, cmd(0, 0x60, &[]), now);
        pd.queue_card(card26(), now).unwrap();
        let first = pd.handle_frame(&cmd(1, 0x60, &[]), now).unwrap();
        let f = decode(&first);
        assert_eq!(f.code, rc::RAW);
        // reader 0, Wiegand, 26 bits LE, then the 4 data bytes.
        assert_eq!(f.data, vec![0, 1, 26, 0, 0x12, 0x34, 0x56, 0x40]);
        assert_eq!(
            events(&mut pd).last(),
            Some(&PdEvent::CardSent {
                card: card26(),
                attempt: None
            })
        );
        // The CP did not get it and retries with the same SQN: identical bytes, queue empty.
        let again = pd.handle_frame(&cmd(1, 0x60, &[]), now).unwrap();
        assert_eq!(first, again);
        assert!(events(&mut pd).is_empty());
        // Next SQN: plain ACK, and the card counts as delivered.
        assert_eq!(run(&mut pd, cmd(2, 0x60, &[]), now).code, rc::ACK);
        assert_eq!(events(&mut pd), vec![PdEvent::CardDelivered(card26())]);
    }

    #[test]
    fn card_sent_in_a_dropped_session_is_resent_after_restart() {
        let mut pd = Pd::new(PdConfig::new(ADDR)).unwrap();
        let now = Instant::now();
        run(&mut pd, cmd(0, 0x60, &[]), now);
        pd.queue_card(card26(), now).unwrap();
        assert_eq!(run(&mut pd, cmd(1, 0x60, &[]), now).code, rc::RAW);
        // CP gave up and restarts with ID at SQN 0.
        run(&mut pd, cmd(0, 0x61, &[0]), now);
        assert_eq!(run(&mut pd, cmd(1, 0x60, &[]), now).code, rc::RAW);
    }

    #[test]
    fn stale_cards_are_dropped_not_sent() {
        let mut pd = Pd::new(PdConfig::new(ADDR)).unwrap();
        let now = Instant::now();
        pd.queue_card(card26(), now).unwrap();
        let later = now + Duration::from_secs(6);
        assert_eq!(run(&mut pd, cmd(0, 0x60, &[]), later).code, rc::ACK);
        assert!(events(&mut pd).contains(&PdEvent::CardDropped {
            card: card26(),
            reason: DropReason::Expired
        }));
    }

    #[test]
    fn card_queue_is_bounded_and_validated() {
        let mut cfg = PdConfig::new(ADDR);
        cfg.card_queue_len = 2;
        let mut pd = Pd::new(cfg).unwrap();
        let now = Instant::now();
        pd.queue_card(card26(), now).unwrap();
        pd.queue_card(card26(), now).unwrap();
        assert_eq!(pd.queue_card(card26(), now), Err(PdError::QueueFull(2)));
        let bad = RawCard {
            data: vec![0; 3],
            ..card26()
        };
        assert!(matches!(
            pd.queue_card(bad, now),
            Err(PdError::InvalidCard(_))
        ));
        let bad = RawCard {
            reader: 1,
            ..card26()
        };
        assert!(matches!(
            pd.queue_card(bad, now),
            Err(PdError::InvalidCard(_))
        ));
        let bad = RawCard {
            bit_count: 0,
            data: vec![],
            ..card26()
        };
        assert!(matches!(
            pd.queue_card(bad, now),
            Err(PdError::InvalidCard(_))
        ));
    }

    #[test]
    fn undecided_previous_card_is_closed_before_the_next_card_is_sent() {
        let mut pd = Pd::new(PdConfig::new(ADDR)).unwrap();
        let now = Instant::now();
        run(&mut pd, cmd(0, 0x60, &[]), now);
        let first = card26();
        let mut second = card26();
        second.data[3] ^= 0x40;
        pd.queue_card(first.clone(), now).unwrap();
        assert_eq!(run(&mut pd, cmd(1, 0x60, &[]), now).code, rc::RAW);
        events(&mut pd);
        pd.queue_card(second.clone(), now).unwrap();
        assert_eq!(run(&mut pd, cmd(2, 0x60, &[]), now).code, rc::RAW);
        let evs: Vec<_> = events(&mut pd)
            .into_iter()
            .filter(|e| matches!(e, PdEvent::PanelVerdict { .. } | PdEvent::CardSent { .. }))
            .collect();
        assert_eq!(
            evs,
            vec![
                PdEvent::PanelVerdict {
                    card: first,
                    verdict: Verdict::Unknown,
                    attempt: None
                },
                PdEvent::CardSent {
                    card: second,
                    attempt: None
                }
            ]
        );
    }

    #[test]
    fn each_verdict_names_the_attempt_of_its_card() {
        // Two grants at one door in flight at once (say a BLE phone and an NFC tap): both
        // cards are queued before the panel says anything; it refuses the first and grants
        // the second. Each verdict must carry its own card's attempt.
        let mut pd = Pd::new(PdConfig::new(ADDR)).unwrap();
        let now = Instant::now();
        run(&mut pd, cmd(0, 0x60, &[]), now);
        let (a, mut b) = (card26(), card26());
        b.data[3] ^= 0x40;
        pd.queue_attempt(a.clone(), Some(11), now).unwrap();
        pd.queue_attempt(b.clone(), Some(22), now).unwrap();
        let verdicts = |evs: Vec<PdEvent>| -> Vec<(Option<AttemptId>, Verdict)> {
            evs.into_iter()
                .filter_map(|e| match e {
                    PdEvent::PanelVerdict {
                        attempt, verdict, ..
                    } => Some((attempt, verdict)),
                    _ => None,
                })
                .collect()
        };
        assert_eq!(run(&mut pd, cmd(1, 0x60, &[]), now).code, rc::RAW);
        assert!(events(&mut pd).contains(&PdEvent::CardSent {
            card: a.clone(),
            attempt: Some(11)
        }));
        let t = now + Duration::from_millis(200);
        assert_eq!(
            run(&mut pd, cmd(2, 0x69, &led_data(0, 0, 1, 1)), t).code,
            rc::ACK
        );
        assert_eq!(verdicts(events(&mut pd)), vec![(Some(11), Verdict::Denied)]);
        assert_eq!(run(&mut pd, cmd(3, 0x60, &[]), t).code, rc::RAW);
        assert!(events(&mut pd).contains(&PdEvent::CardSent {
            card: b.clone(),
            attempt: Some(22)
        }));
        let green = [0, 0, 2, 5, 5, 2, 0, 30, 0, 0, 0, 0, 0, 0];
        assert_eq!(run(&mut pd, cmd(1, 0x69, &green), t).code, rc::ACK);
        assert_eq!(
            verdicts(events(&mut pd)),
            vec![(Some(22), Verdict::Granted)]
        );
        // A card resent after a link restart keeps its attempt.
        pd.queue_attempt(a.clone(), Some(33), t).unwrap();
        assert_eq!(run(&mut pd, cmd(2, 0x60, &[]), t).code, rc::RAW);
        events(&mut pd);
        assert_eq!(run(&mut pd, cmd(0, 0x60, &[]), t).code, rc::RAW);
        assert!(events(&mut pd).contains(&PdEvent::CardSent {
            card: a,
            attempt: Some(33)
        }));
    }

    #[test]
    fn panel_verdict_from_led_after_raw() {
        let mut pd = Pd::new(PdConfig::new(ADDR)).unwrap();
        let now = Instant::now();
        run(&mut pd, cmd(0, 0x60, &[]), now);
        pd.queue_card(card26(), now).unwrap();
        assert_eq!(run(&mut pd, cmd(1, 0x60, &[]), now).code, rc::RAW);
        // Temporary green flash 300 ms later → granted.
        let green = [0, 0, 2, 5, 5, 2, 0, 30, 0, 0, 0, 0, 0, 0];
        let t = now + Duration::from_millis(300);
        assert_eq!(run(&mut pd, cmd(2, 0x69, &green), t).code, rc::ACK);
        let evs = events(&mut pd);
        assert!(evs.contains(&PdEvent::PanelVerdict {
            card: card26(),
            verdict: Verdict::Granted,
            attempt: None
        }));
        // Next card: nothing conclusive → unknown when the window closes.
        pd.queue_card(card26(), t).unwrap();
        assert_eq!(run(&mut pd, cmd(3, 0x60, &[]), t).code, rc::RAW);
        events(&mut pd);
        pd.handle_timeout(t + Duration::from_millis(1999));
        assert!(events(&mut pd).is_empty());
        pd.handle_timeout(t + DEFAULT_VERDICT_WINDOW);
        assert_eq!(
            events(&mut pd),
            vec![PdEvent::PanelVerdict {
                card: card26(),
                verdict: Verdict::Unknown,
                attempt: None
            }]
        );
        // Red permanent after a third card → denied.
        pd.queue_card(card26(), t).unwrap();
        assert_eq!(run(&mut pd, cmd(1, 0x60, &[]), t).code, rc::RAW);
        assert_eq!(
            run(&mut pd, cmd(2, 0x69, &led_data(0, 0, 1, 1)), t).code,
            rc::ACK
        );
        assert!(events(&mut pd).contains(&PdEvent::PanelVerdict {
            card: card26(),
            verdict: Verdict::Denied,
            attempt: None
        }));
    }
}
