//! Sequence numbers (message control, CTRL.SQN): a command with SQN 0 starts a session; the
//! PD then expects 1, 2, 3, 1, ... A command repeating the last SQN with the same code is a CP
//! retry: the PD resends its previous reply byte for byte (a card read is not consumed twice).
//! Any other SQN gets NAK 0x04. One deliberate leniency: a PD that has not seen any command
//! since it started adopts whatever SQN arrives first, so restarting keyway under a running CP
//! does not cost a NAK (which libosdp's CP answers by taking the PD offline for 300 s).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seq {
    /// No command accepted since start.
    Fresh,
    Last(u8),
}

pub(super) fn next_sqn(s: u8) -> u8 {
    if s >= 3 {
        1
    } else {
        s + 1
    }
}

/// What an incoming command's SQN means.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum SeqCheck {
    /// SQN 0: the CP (re)starts the link.
    Restart,
    /// The CP retries the last command: send these bytes again, byte for byte (under secure
    /// channel the MAC chain has moved on, so the reply must not be rebuilt).
    Retry(Vec<u8>),
    /// Neither the last SQN nor the next: NAK 0x04, state unchanged.
    OutOfOrder,
    /// The next SQN: the CP received the previous reply.
    Advanced,
    /// A new command to process without a confirmation of the previous reply: the first one
    /// since start, or the last SQN with a different command.
    Other,
}

/// The sequence state of one PD: the last SQN and the reply sent for it.
#[derive(Debug)]
pub(super) struct Sequence {
    seq: Seq,
    /// (command code, reply bytes) of the last reply, for retries.
    last_reply: Option<(u8, Vec<u8>)>,
}

impl Sequence {
    pub(super) fn new() -> Self {
        Self {
            seq: Seq::Fresh,
            last_reply: None,
        }
    }

    /// Classify a command's SQN; SQN 0 also forgets the cached reply.
    pub(super) fn check(&mut self, sqn: u8, code: u8) -> SeqCheck {
        if sqn == 0 {
            self.last_reply = None;
            return SeqCheck::Restart;
        }
        let Seq::Last(last) = self.seq else {
            return SeqCheck::Other;
        };
        if sqn == last {
            match &self.last_reply {
                Some((c, bytes)) if *c == code => SeqCheck::Retry(bytes.clone()),
                // Same SQN, different command: a fresh command with this SQN.
                _ => SeqCheck::Other,
            }
        } else if sqn != next_sqn(last) {
            SeqCheck::OutOfOrder
        } else {
            SeqCheck::Advanced
        }
    }

    /// The reply to `code` at `sqn` went out.
    pub(super) fn record(&mut self, sqn: u8, code: u8, bytes: Vec<u8>) {
        self.seq = Seq::Last(sqn);
        self.last_reply = Some((code, bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::super::*;
    use crate::osdp::reply::code as rc;

    #[test]
    fn sequence_progression_and_wrap() {
        let mut pd = Pd::new(PdConfig::new(ADDR)).unwrap();
        let now = Instant::now();
        for s in [0u8, 1, 2, 3, 1, 2, 3, 1] {
            let r = run(&mut pd, cmd(s, 0x60, &[]), now);
            assert_eq!((r.code, r.sqn), (rc::ACK, s));
        }
    }

    #[test]
    fn out_of_order_sequence_gets_nak_4_and_state_is_kept() {
        let mut pd = Pd::new(PdConfig::new(ADDR)).unwrap();
        let now = Instant::now();
        run(&mut pd, cmd(0, 0x60, &[]), now);
        run(&mut pd, cmd(1, 0x60, &[]), now);
        let r = run(&mut pd, cmd(3, 0x60, &[]), now);
        assert_eq!((r.code, r.data.clone(), r.sqn), (rc::NAK, vec![0x04], 3));
        // The expected number still works.
        assert_eq!(run(&mut pd, cmd(2, 0x60, &[]), now).code, rc::ACK);
        assert!(events(&mut pd).contains(&PdEvent::NakSent {
            command: 0x60,
            code: NakCode::SequenceNumber
        }));
    }

    #[test]
    fn sqn_zero_restarts_session() {
        let mut pd = Pd::new(PdConfig::new(ADDR)).unwrap();
        let now = Instant::now();
        run(&mut pd, cmd(0, 0x60, &[]), now);
        run(&mut pd, cmd(1, 0x60, &[]), now);
        assert_eq!(run(&mut pd, cmd(0, 0x61, &[0]), now).code, rc::PDID);
        assert_eq!(run(&mut pd, cmd(1, 0x62, &[0]), now).code, rc::PDCAP);
    }

    #[test]
    fn fresh_pd_adopts_first_sequence_number() {
        let mut pd = Pd::new(PdConfig::new(ADDR)).unwrap();
        let now = Instant::now();
        assert_eq!(run(&mut pd, cmd(2, 0x60, &[]), now).code, rc::ACK);
        assert_eq!(run(&mut pd, cmd(3, 0x60, &[]), now).code, rc::ACK);
        assert_eq!(run(&mut pd, cmd(3 - 1, 0x60, &[]), now).code, rc::NAK);
    }

    #[test]
    fn same_sqn_different_command_is_processed_not_replayed() {
        let mut pd = Pd::new(PdConfig::new(ADDR)).unwrap();
        let now = Instant::now();
        run(&mut pd, cmd(0, 0x60, &[]), now);
        assert_eq!(run(&mut pd, cmd(0, 0x61, &[0]), now).code, rc::PDID);
        let mut p = Pd::new(PdConfig::new(ADDR)).unwrap();
        run(&mut p, cmd(0, 0x60, &[]), now);
        run(&mut p, cmd(1, 0x60, &[]), now);
        assert_eq!(run(&mut p, cmd(1, 0x64, &[]), now).code, rc::LSTATR);
    }
}
