//! NFC adapter: PC/SC readers through pcscd (the `pcsc` crate).
//!
//! One [`ReaderLoop`] per configured reader: find the reader (by name or `*` pattern), wait for
//! a card, connect, hand a [`CardLink`] to the tap handler, then wait for the card to leave so a
//! phone held in the field makes one event, not many. pcscd going away, the reader being
//! unplugged and a card pulled mid-APDU all end the current attempt and the loop goes on.
//!
//! PC/SC calls block, so each runs on tokio's blocking pool under a timeout: no wait is
//! unbounded, even if a driver never answers.

use std::ffi::CString;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::config::reader_matches;

/// Largest R-APDU we accept (extended length APDUs).
const MAX_RAPDU: usize = pcsc::MAX_BUFFER_SIZE_EXTENDED;
/// How long one blocking wait for a reader/card state change lasts before shutdown is checked.
const STATUS_POLL: Duration = Duration::from_millis(500);
/// Grace given to pcscd itself on top of a blocking call's own timeout.
const PCSC_SLACK: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum NfcError {
    /// The card left the field (or was reset) mid-transaction; not an error of the reader.
    #[error("card gone")]
    CardGone,
    #[error("no answer from the card within {0:?}")]
    Timeout(Duration),
    #[error("C-APDU of {0} bytes is too long")]
    CommandTooLong(usize),
    #[error("pcscd: {0}")]
    Pcsc(#[from] pcsc::Error),
    #[error("PC/SC worker failed: {0}")]
    Worker(String),
}

impl NfcError {
    fn from_transmit(e: pcsc::Error) -> Self {
        match e {
            pcsc::Error::RemovedCard
            | pcsc::Error::ResetCard
            | pcsc::Error::NoSmartcard
            | pcsc::Error::UnpoweredCard
            | pcsc::Error::UnresponsiveCard => NfcError::CardGone,
            other => NfcError::Pcsc(other),
        }
    }
}

/// A connected card, handed to the tap handler. Cheap to clone.
#[derive(Clone)]
pub struct CardLink {
    card: Arc<Mutex<pcsc::Card>>,
    atr: Vec<u8>,
    apdu_timeout: Duration,
}

impl CardLink {
    /// The card's ATR as the reader reported it.
    pub fn atr(&self) -> &[u8] {
        &self.atr
    }

    /// Sends one C-APDU and returns the R-APDU (data || SW1 SW2).
    ///
    /// An answer shorter than two bytes means the card vanished: pcsc-lite returns an empty
    /// answer when the card side closes mid-APDU.
    pub async fn transmit(&self, capdu: &[u8]) -> Result<Vec<u8>, NfcError> {
        // Short APDU header + Lc(3) + 65535 data + Le(3) is the most a C-APDU can be.
        if capdu.len() > 4 + 3 + 65535 + 3 {
            return Err(NfcError::CommandTooLong(capdu.len()));
        }
        let card = self.card.clone();
        let capdu = capdu.to_vec();
        let job = tokio::task::spawn_blocking(move || {
            let card = card
                .lock()
                .map_err(|_| NfcError::Worker("card mutex poisoned".into()))?;
            let mut buf = vec![0u8; MAX_RAPDU];
            let rapdu = card
                .transmit(&capdu, &mut buf)
                .map_err(NfcError::from_transmit)?;
            Ok::<_, NfcError>(rapdu.to_vec())
        });
        let rapdu = match tokio::time::timeout(self.apdu_timeout, job).await {
            Err(_) => return Err(NfcError::Timeout(self.apdu_timeout)),
            Ok(Err(join)) => return Err(NfcError::Worker(join.to_string())),
            Ok(Ok(r)) => r?,
        };
        if rapdu.len() < 2 {
            return Err(NfcError::CardGone);
        }
        Ok(rapdu)
    }
}

#[derive(Debug, Clone)]
pub struct ReaderLoopConfig {
    /// Door id, for logs.
    pub door: String,
    /// Reader name or `*` pattern.
    pub pattern: String,
    pub apdu_timeout: Duration,
    pub retry: Duration,
}

/// What the loop reports to the daemon besides taps (for logs and `keyway status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReaderEvent {
    /// No reader matches the configured name or pattern; the readers pcscd has (said once per
    /// absence, not on every retry).
    ReaderMissing(Vec<String>),
    ReaderFound(String),
    ReaderLost(String),
    ServiceDown(String),
}

/// The per-reader loop. Runs until `shutdown` turns true.
pub struct ReaderLoop {
    cfg: ReaderLoopConfig,
}

/// Turns blocking-pool join failures and timeouts of non-APDU calls into one error type.
async fn blocking<T: Send + 'static>(
    limit: Duration,
    f: impl FnOnce() -> Result<T, pcsc::Error> + Send + 'static,
) -> Result<T, NfcError> {
    match tokio::time::timeout(limit, tokio::task::spawn_blocking(f)).await {
        Err(_) => Err(NfcError::Timeout(limit)),
        Ok(Err(join)) => Err(NfcError::Worker(join.to_string())),
        Ok(Ok(r)) => r.map_err(NfcError::Pcsc),
    }
}

enum Wait {
    /// A card is present: its ATR and pcscd's card event count (insertions + removals).
    Card(Vec<u8>, u32),
    Nothing,
    ReaderGone,
}

impl ReaderLoop {
    pub fn new(cfg: ReaderLoopConfig) -> Self {
        Self { cfg }
    }

    /// Runs the loop: `on_card` is called once per card presentation and awaited before the
    /// loop waits for the card to leave. `on_event` hears about readers and pcscd.
    pub async fn run<F, Fut>(
        self,
        mut shutdown: watch::Receiver<bool>,
        mut on_card: F,
        on_event: impl Fn(ReaderEvent),
    ) where
        F: FnMut(CardLink) -> Fut,
        Fut: Future<Output = ()>,
    {
        let mut last_service_error: Option<String> = None;
        while !*shutdown.borrow() {
            let ctx =
                match blocking(PCSC_SLACK, || pcsc::Context::establish(pcsc::Scope::User)).await {
                    Ok(ctx) => {
                        last_service_error = None;
                        ctx
                    }
                    Err(e) => {
                        let msg = e.to_string();
                        // Say it once, not once a second while pcscd is down.
                        if last_service_error.as_deref() != Some(msg.as_str()) {
                            on_event(ReaderEvent::ServiceDown(msg.clone()));
                            last_service_error = Some(msg);
                        }
                        sleep_or_shutdown(self.cfg.retry, &mut shutdown).await;
                        continue;
                    }
                };
            if let Err(e) = self
                .serve_context(&ctx, &mut shutdown, &mut on_card, &on_event)
                .await
            {
                on_event(ReaderEvent::ServiceDown(e.to_string()));
                last_service_error = Some(e.to_string());
                sleep_or_shutdown(self.cfg.retry, &mut shutdown).await;
            }
        }
    }

    /// Finds the reader and serves cards on it until the context breaks (pcscd restart).
    async fn serve_context<F, Fut>(
        &self,
        ctx: &pcsc::Context,
        shutdown: &mut watch::Receiver<bool>,
        on_card: &mut F,
        on_event: &impl Fn(ReaderEvent),
    ) -> Result<(), NfcError>
    where
        F: FnMut(CardLink) -> Fut,
        Fut: Future<Output = ()>,
    {
        let mut missing_said = false;
        loop {
            if *shutdown.borrow() {
                return Ok(());
            }
            let (found, available) = self.find_reader(ctx).await?;
            let Some(name) = found else {
                if !missing_said {
                    on_event(ReaderEvent::ReaderMissing(available));
                    missing_said = true;
                }
                self.wait_for_pnp(ctx, shutdown).await?;
                continue;
            };
            missing_said = false;
            on_event(ReaderEvent::ReaderFound(
                name.to_string_lossy().into_owned(),
            ));
            let mut state = pcsc::State::UNAWARE;
            // A card that replaced the previous one while we waited for that one to leave.
            let mut pending: Option<(Vec<u8>, u32)> = None;
            loop {
                if *shutdown.borrow() {
                    return Ok(());
                }
                let wait = match pending.take() {
                    Some((atr, count)) => Wait::Card(atr, count),
                    None => self.wait_card(ctx, &name, &mut state).await?,
                };
                match wait {
                    Wait::Nothing => continue,
                    Wait::ReaderGone => {
                        on_event(ReaderEvent::ReaderLost(name.to_string_lossy().into_owned()));
                        break;
                    }
                    Wait::Card(atr, arrived) => {
                        match self.connect(ctx, &name).await {
                            Ok(card) => {
                                let link = CardLink {
                                    card: Arc::new(Mutex::new(card)),
                                    atr,
                                    apdu_timeout: self.cfg.apdu_timeout,
                                };
                                on_card(link.clone()).await;
                                disconnect(link).await;
                            }
                            // Pulled before we could connect: nothing happened, wait again.
                            Err(NfcError::CardGone) => {}
                            Err(NfcError::Pcsc(e)) if is_service_error(e) => {
                                return Err(NfcError::Pcsc(e))
                            }
                            Err(e) => log::warn!(
                                target: "keyway::nfc",
                                door = self.cfg.door.as_str();
                                "door {}: connecting to the card failed: {e}", self.cfg.door
                            ),
                        }
                        // One event per presentation: wait until the card leaves. A card
                        // pulled and another presented between two status polls shows no
                        // EMPTY state, only pcscd's event count moved on (a removal and an
                        // insertion): that is a new presentation, served at once.
                        loop {
                            if *shutdown.borrow() {
                                return Ok(());
                            }
                            match self.wait_card(ctx, &name, &mut state).await? {
                                Wait::Nothing => break,
                                Wait::Card(atr, now) if presented_again(arrived, now) => {
                                    pending = Some((atr, now));
                                    break;
                                }
                                Wait::Card(..) => continue,
                                Wait::ReaderGone => break,
                            }
                        }
                    }
                }
            }
        }
    }

    /// The first reader matching the configured pattern, and the names of all readers.
    async fn find_reader(
        &self,
        ctx: &pcsc::Context,
    ) -> Result<(Option<CString>, Vec<String>), NfcError> {
        let c = ctx.clone();
        let names = match blocking(PCSC_SLACK, move || c.list_readers_owned()).await {
            Ok(n) => n,
            Err(NfcError::Pcsc(pcsc::Error::NoReadersAvailable)) => Vec::new(),
            Err(e) => return Err(e),
        };
        let available: Vec<String> = names
            .iter()
            .map(|n| n.to_string_lossy().into_owned())
            .collect();
        let found = names
            .into_iter()
            .find(|n| reader_matches(&self.cfg.pattern, &n.to_string_lossy()));
        Ok((found, available))
    }

    /// Blocks (bounded) until the set of readers changes or the retry period passes.
    async fn wait_for_pnp(
        &self,
        ctx: &pcsc::Context,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), NfcError> {
        let c = ctx.clone();
        let wait = self.cfg.retry;
        let r = blocking(wait + PCSC_SLACK, move || {
            let mut states = [pcsc::ReaderState::new(
                pcsc::PNP_NOTIFICATION(),
                pcsc::State::UNAWARE,
            )];
            // First call learns the current reader count, the second waits for a change.
            c.get_status_change(Duration::ZERO, &mut states)
                .or_else(ok_timeout)?;
            states[0].sync_current_state();
            c.get_status_change(wait, &mut states).or_else(ok_timeout)
        })
        .await;
        match r {
            Ok(()) => Ok(()),
            // Some pcsc-lite builds have no PnP notification: fall back to plain retries.
            Err(NfcError::Pcsc(e)) if !is_service_error(e) => {
                sleep_or_shutdown(self.cfg.retry, shutdown).await;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Waits (bounded) for the reader's state to change from `state` and reports it.
    async fn wait_card(
        &self,
        ctx: &pcsc::Context,
        name: &CString,
        state: &mut pcsc::State,
    ) -> Result<Wait, NfcError> {
        let c = ctx.clone();
        let n = name.clone();
        let current = *state;
        let (event, atr, count) = blocking(STATUS_POLL + PCSC_SLACK, move || {
            let mut rs = [pcsc::ReaderState::new(n, current)];
            c.get_status_change(STATUS_POLL, &mut rs)
                .or_else(ok_timeout)?;
            let [r] = &rs;
            Ok((r.event_state(), r.atr().to_vec(), r.event_count()))
        })
        .await?;
        // Keep only the state bits; CHANGED and the event counter make UNAWARE loops.
        *state = event - pcsc::State::CHANGED;
        log::trace!(target: "keyway::nfc", door = self.cfg.door.as_str(); "reader state {event:?}, card events {count}");
        if event.intersects(pcsc::State::UNKNOWN | pcsc::State::IGNORE | pcsc::State::UNAVAILABLE) {
            return Ok(Wait::ReaderGone);
        }
        let present = event.contains(pcsc::State::PRESENT) && !event.contains(pcsc::State::MUTE);
        Ok(if present {
            Wait::Card(atr, count)
        } else {
            Wait::Nothing
        })
    }

    async fn connect(&self, ctx: &pcsc::Context, name: &CString) -> Result<pcsc::Card, NfcError> {
        let c = ctx.clone();
        let n = name.clone();
        match blocking(PCSC_SLACK * 2, move || {
            c.connect(&n, pcsc::ShareMode::Shared, pcsc::Protocols::ANY)
        })
        .await
        {
            Err(NfcError::Pcsc(e)) => Err(NfcError::from_transmit(e)),
            other => other,
        }
    }
}

/// Whether pcscd's card event count moved from `arrived` (when the card we served came) to
/// `now` by a removal and an insertion at least. It counts both, modulo 2^16; a reset of the
/// same card (our disconnect) is not an insertion.
fn presented_again(arrived: u32, now: u32) -> bool {
    let moved = now.wrapping_sub(arrived) & 0xFFFF;
    moved >= 2
}

fn ok_timeout(e: pcsc::Error) -> Result<(), pcsc::Error> {
    if e == pcsc::Error::Timeout {
        Ok(())
    } else {
        Err(e)
    }
}

/// Errors that mean pcscd itself went away: the context must be re-established.
fn is_service_error(e: pcsc::Error) -> bool {
    matches!(
        e,
        pcsc::Error::NoService
            | pcsc::Error::ServiceStopped
            | pcsc::Error::InvalidHandle
            | pcsc::Error::CommError
            | pcsc::Error::NoReadersAvailable
    )
}

async fn disconnect(link: CardLink) {
    // Reset so the next tap starts from SELECT; failure only means the card is already gone.
    let card = link.card;
    let _ = blocking(PCSC_SLACK, move || {
        if let Ok(card) = Arc::try_unwrap(card) {
            if let Ok(card) = card.into_inner() {
                return card
                    .disconnect(pcsc::Disposition::ResetCard)
                    .map_err(|(_, e)| e);
            }
        }
        Ok(())
    })
    .await;
}

async fn sleep_or_shutdown(d: Duration, shutdown: &mut watch::Receiver<bool>) {
    let _ = tokio::time::timeout(d, shutdown.wait_for(|s| *s)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_card_swapped_between_polls_is_a_new_presentation() {
        assert!(!presented_again(7, 7), "same card still held");
        assert!(!presented_again(7, 8), "only a removal (or a reset) seen");
        assert!(presented_again(7, 9), "removed and another presented");
        assert!(presented_again(0xFFFF, 1), "the 16-bit count wraps");
    }

    #[test]
    fn transmit_errors_that_mean_the_card_left() {
        for e in [
            pcsc::Error::RemovedCard,
            pcsc::Error::ResetCard,
            pcsc::Error::NoSmartcard,
        ] {
            assert!(matches!(NfcError::from_transmit(e), NfcError::CardGone));
        }
        assert!(matches!(
            NfcError::from_transmit(pcsc::Error::NoService),
            NfcError::Pcsc(pcsc::Error::NoService)
        ));
        assert!(is_service_error(pcsc::Error::NoService));
        assert!(!is_service_error(pcsc::Error::RemovedCard));
    }
}
