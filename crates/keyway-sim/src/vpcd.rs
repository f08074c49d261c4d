//! Async client for vsmartcard's virtual reader `vpcd`: the card side of the socket.
//!
//! vpcd (loaded by pcscd) *listens*; the virtual card connects to it. Every message in both
//! directions is a 2-byte big-endian length followed by that many bytes. A 1-byte payload from
//! vpcd is a control code (power off / power on / reset / get ATR; only "get ATR" is answered);
//! anything longer is a C-APDU, answered with one length-prefixed R-APDU. Closing the socket is
//! how a card is "removed" from the reader.
//!
//! The card logic stays sans-IO behind [`VirtualCard`]; this module only owns the socket.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// vpcd control code: power the card off.
pub const CTRL_POWER_OFF: u8 = 0x00;
/// vpcd control code: power the card on.
pub const CTRL_POWER_ON: u8 = 0x01;
/// vpcd control code: warm reset.
pub const CTRL_RESET: u8 = 0x02;
/// vpcd control code: the reader asks for the ATR (the only control code that gets an answer).
pub const CTRL_GET_ATR: u8 = 0x04;

/// PC/SC part 3 ATR of a contactless card that carries no historical bytes (what a reader
/// synthesises for an ISO 14443-4 phone): `3B 80 80 01 01`.
pub const CONTACTLESS_ATR: [u8; 5] = [0x3B, 0x80, 0x80, 0x01, 0x01];

/// Largest frame accepted by default: a short APDU is at most 261 bytes, an extended one
/// 65 544 (more than the 2-byte length can say), Aliro expedited traffic stays well under 1 KiB.
pub const DEFAULT_MAX_FRAME: usize = 4096;

/// Default vpcd port of the first virtual slot (`Virtual PCD 00 00`).
pub const DEFAULT_VPCD_PORT: u16 = 35963;

/// A card that can sit behind vpcd. Implemented by the Aliro endpoint emulator.
pub trait VirtualCard {
    /// The reader powered the card on, off, or reset it: drop any session state.
    fn power_event(&mut self, code: u8);
    /// Answer one C-APDU with a complete R-APDU (data || SW1 SW2).
    fn transmit(&mut self, c_apdu: &[u8]) -> Vec<u8>;
    /// True once the reader has finished a transaction with this card (the tap can end).
    fn transaction_finished(&self) -> bool {
        false
    }
}

/// Errors of the vpcd transport.
#[derive(Debug, thiserror::Error)]
pub enum VpcdError {
    /// Socket error (connect, read or write).
    #[error("vpcd socket: {0}")]
    Io(#[from] std::io::Error),
    /// vpcd announced a frame larger than we accept.
    #[error("vpcd frame of {len} bytes exceeds the {max}-byte limit")]
    FrameTooLarge {
        /// Announced length.
        len: usize,
        /// Configured limit.
        max: usize,
    },
    /// vpcd sent a zero-length frame (never valid).
    #[error("vpcd sent an empty frame")]
    EmptyFrame,
    /// The socket closed in the middle of a frame.
    #[error("vpcd closed the connection in the middle of a frame")]
    Truncated,
    /// The card produced a reply that does not fit the 2-byte length prefix.
    #[error("reply of {0} bytes does not fit a vpcd frame")]
    ReplyTooLarge(usize),
    /// Could not connect to vpcd before the deadline.
    #[error("could not connect to vpcd at {addr} within {waited:?}: {last}")]
    ConnectTimeout {
        /// Address tried.
        addr: SocketAddr,
        /// Time spent retrying.
        waited: Duration,
        /// Last connection error.
        last: std::io::Error,
    },
}

/// How [`serve`] behaves.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// ATR returned for the "get ATR" control code.
    pub atr: Vec<u8>,
    /// Largest accepted frame from vpcd.
    pub max_frame: usize,
    /// When set, keep serving this long after the card reports a finished transaction, then
    /// return (the caller drops the socket = card removed). `None`: serve until stopped or closed.
    pub hold_after_finish: Option<Duration>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            atr: CONTACTLESS_ATR.to_vec(),
            max_frame: DEFAULT_MAX_FRAME,
            hold_after_finish: None,
        }
    }
}

/// Why [`serve`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServeEnd {
    /// The stop future resolved.
    Stopped,
    /// vpcd closed the socket between frames.
    PeerClosed,
    /// The card finished a transaction and the hold time elapsed.
    Finished,
}

/// What happened while serving.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeSummary {
    /// Why serving ended.
    pub end: ServeEnd,
    /// C-APDUs answered.
    pub apdus: u32,
    /// Power on / off / reset control codes received.
    pub power_events: u32,
    /// ATR requests answered.
    pub atr_requests: u32,
    /// Whether the card reported a finished transaction at some point.
    pub finished: bool,
}

/// Serve `card` on an already connected vpcd stream until `stop` resolves, vpcd closes the
/// socket, or (with `hold_after_finish`) the transaction is finished and the hold has elapsed.
pub async fn serve<S, C, F>(
    stream: &mut S,
    card: &mut C,
    opts: &ServeOptions,
    stop: F,
) -> Result<ServeSummary, VpcdError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    C: VirtualCard + ?Sized,
    F: Future<Output = ()>,
{
    let mut summary = ServeSummary {
        end: ServeEnd::Stopped,
        apdus: 0,
        power_events: 0,
        atr_requests: 0,
        finished: card.transaction_finished(),
    };
    let mut finish_deadline: Option<Instant> = None;
    tokio::pin!(stop);
    loop {
        if summary.finished && finish_deadline.is_none() {
            if let Some(hold) = opts.hold_after_finish {
                finish_deadline = Some(Instant::now() + hold);
            }
        }
        let hold = async {
            match finish_deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending::<()>().await,
            }
        };
        // Dropping a half-read frame is fine here: every branch but the read ends the session.
        let frame = tokio::select! {
            biased;
            () = &mut stop => {
                summary.end = ServeEnd::Stopped;
                return Ok(summary);
            }
            () = hold => {
                summary.end = ServeEnd::Finished;
                return Ok(summary);
            }
            frame = read_frame(stream, opts.max_frame) => frame?,
        };
        let Some(frame) = frame else {
            summary.end = ServeEnd::PeerClosed;
            return Ok(summary);
        };
        match frame.as_slice() {
            [CTRL_GET_ATR] => {
                summary.atr_requests = summary.atr_requests.saturating_add(1);
                write_frame(stream, &opts.atr).await?;
            }
            [code @ (CTRL_POWER_OFF | CTRL_POWER_ON | CTRL_RESET)] => {
                // No answer is expected for power control.
                summary.power_events = summary.power_events.saturating_add(1);
                card.power_event(*code);
            }
            [code] => {
                // vpcd defines no other code: ignore it rather than reset the card.
                log::debug!(code = *code; "vpcd: unknown control code ignored");
            }
            c_apdu => {
                summary.apdus = summary.apdus.saturating_add(1);
                let r_apdu = card.transmit(c_apdu);
                write_frame(stream, &r_apdu).await?;
                if card.transaction_finished() {
                    summary.finished = true;
                }
            }
        }
    }
}

/// Read one frame. `Ok(None)` means the peer closed cleanly between frames.
pub async fn read_frame<S>(stream: &mut S, max_frame: usize) -> Result<Option<Vec<u8>>, VpcdError>
where
    S: AsyncRead + Unpin,
{
    let mut len_buf = [0u8; 2];
    // Read the first byte alone so that EOF here is a clean close, EOF later a truncation.
    if stream.read(&mut len_buf[..1]).await? == 0 {
        return Ok(None);
    }
    read_exact_or_truncated(stream, &mut len_buf[1..]).await?;
    let len = usize::from(u16::from_be_bytes(len_buf));
    if len == 0 {
        return Err(VpcdError::EmptyFrame);
    }
    if len > max_frame {
        return Err(VpcdError::FrameTooLarge {
            len,
            max: max_frame,
        });
    }
    let mut payload = vec![0u8; len];
    read_exact_or_truncated(stream, &mut payload).await?;
    Ok(Some(payload))
}

async fn read_exact_or_truncated<S>(stream: &mut S, buf: &mut [u8]) -> Result<(), VpcdError>
where
    S: AsyncRead + Unpin,
{
    match stream.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(VpcdError::Truncated),
        Err(e) => Err(VpcdError::Io(e)),
    }
}

/// Write one length-prefixed frame (single write, so a frame never interleaves).
pub async fn write_frame<S>(stream: &mut S, payload: &[u8]) -> Result<(), VpcdError>
where
    S: AsyncWrite + Unpin,
{
    let len = u16::try_from(payload.len()).map_err(|_| VpcdError::ReplyTooLarge(payload.len()))?;
    let mut buf = Vec::with_capacity(payload.len().saturating_add(2));
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(payload);
    stream.write_all(&buf).await?;
    stream.flush().await?;
    Ok(())
}

/// Connect to vpcd, retrying while it refuses (pcscd may still be starting), until `timeout`.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, VpcdError> {
    let start = Instant::now();
    let deadline = start + timeout;
    loop {
        let attempt = tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await;
        let last = match attempt {
            Ok(Ok(stream)) => {
                // APDUs are tiny request/response pairs: do not let Nagle delay them.
                stream.set_nodelay(true)?;
                return Ok(stream);
            }
            Ok(Err(e)) => e,
            Err(_) => std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"),
        };
        let now = Instant::now();
        if now >= deadline {
            return Err(VpcdError::ConnectTimeout {
                addr,
                waited: now.duration_since(start),
                last,
            });
        }
        tokio::time::sleep_until(deadline.min(now + Duration::from_millis(100))).await;
    }
}

/// Options of one [`tap`].
#[derive(Debug, Clone)]
pub struct TapOptions {
    /// Whole tap budget: connecting plus the reader's transaction.
    pub timeout: Duration,
    /// How long the "phone" stays on the reader after the transaction finished.
    pub hold: Duration,
    /// ATR presented to the reader.
    pub atr: Vec<u8>,
    /// Largest accepted frame.
    pub max_frame: usize,
}

impl Default for TapOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            hold: Duration::from_millis(200),
            atr: CONTACTLESS_ATR.to_vec(),
            max_frame: DEFAULT_MAX_FRAME,
        }
    }
}

/// One tap: connect to vpcd (card placed on the reader), serve until the reader finished a
/// transaction (plus `hold`), vpcd hangs up, or `timeout`; then close the socket (card removed).
///
/// "Finished" is [`VirtualCard::transaction_finished`]: clear the card's record between taps
/// (for the endpoint, [`crate::Endpoint::take_outcomes`]), or the tap ends after `hold`.
pub async fn tap<C>(
    addr: SocketAddr,
    card: &mut C,
    opts: &TapOptions,
) -> Result<ServeSummary, VpcdError>
where
    C: VirtualCard + ?Sized,
{
    let deadline = Instant::now() + opts.timeout;
    let mut stream = connect(addr, opts.timeout).await?;
    let serve_opts = ServeOptions {
        atr: opts.atr.clone(),
        max_frame: opts.max_frame,
        hold_after_finish: Some(opts.hold),
    };
    let summary = serve(
        &mut stream,
        card,
        &serve_opts,
        tokio::time::sleep_until(deadline),
    )
    .await?;
    // Graceful FIN; the reader sees the card leave either way.
    let _ = stream.shutdown().await;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    /// Records what it is asked and echoes the APDU reversed with 9000.
    #[derive(Default)]
    struct EchoCard {
        powers: Vec<u8>,
        seen: Vec<Vec<u8>>,
        finish_after: Option<usize>,
    }

    impl VirtualCard for EchoCard {
        fn power_event(&mut self, code: u8) {
            self.powers.push(code);
        }
        fn transmit(&mut self, c_apdu: &[u8]) -> Vec<u8> {
            self.seen.push(c_apdu.to_vec());
            let mut r: Vec<u8> = c_apdu.iter().rev().copied().collect();
            r.extend_from_slice(&[0x90, 0x00]);
            r
        }
        fn transaction_finished(&self) -> bool {
            self.finish_after.is_some_and(|n| self.seen.len() >= n)
        }
    }

    fn frame(p: &[u8]) -> Vec<u8> {
        let mut v = (p.len() as u16).to_be_bytes().to_vec();
        v.extend_from_slice(p);
        v
    }

    #[tokio::test]
    async fn control_codes_atr_and_apdu() {
        let (mut vpcd, mut card_side) = duplex(1024);
        let mut card = EchoCard::default();
        let opts = ServeOptions::default();
        let task = async {
            let mut input = Vec::new();
            input.extend(frame(&[CTRL_POWER_ON]));
            input.extend(frame(&[CTRL_GET_ATR]));
            input.extend(frame(&[0x00, 0xA4, 0x04, 0x00]));
            input.extend(frame(&[CTRL_RESET]));
            input.extend(frame(&[0x03]));
            input.extend(frame(&[CTRL_POWER_OFF]));
            vpcd.write_all(&input).await.unwrap();
            let atr = read_frame(&mut vpcd, 64).await.unwrap().unwrap();
            let rapdu = read_frame(&mut vpcd, 64).await.unwrap().unwrap();
            drop(vpcd);
            (atr, rapdu)
        };
        let (summary, (atr, rapdu)) = tokio::join!(
            serve(&mut card_side, &mut card, &opts, std::future::pending()),
            task
        );
        let summary = summary.unwrap();
        assert_eq!(atr, CONTACTLESS_ATR);
        assert_eq!(rapdu, vec![0x00, 0x04, 0xA4, 0x00, 0x90, 0x00]);
        assert_eq!(card.powers, vec![CTRL_POWER_ON, CTRL_RESET, CTRL_POWER_OFF]);
        assert_eq!(summary.end, ServeEnd::PeerClosed);
        assert_eq!(summary.apdus, 1);
        assert_eq!(summary.power_events, 3);
        assert_eq!(summary.atr_requests, 1);
        assert!(!summary.finished);
    }

    #[tokio::test]
    async fn oversized_and_empty_and_truncated_frames_are_errors() {
        #[derive(Debug, PartialEq)]
        enum Want {
            TooLarge(usize),
            Empty,
            Truncated,
        }
        let cases = [
            (vec![0x10, 0x01], Want::TooLarge(4097)),
            (vec![0x00, 0x00], Want::Empty),
            (vec![0x00, 0x05, 0x01, 0x02], Want::Truncated),
            (vec![0x00], Want::Truncated),
            // Exactly the limit is accepted; only the missing payload fails.
            (vec![0x10, 0x00], Want::Truncated),
        ];
        for (bytes, want) in cases {
            let (mut vpcd, mut card_side) = duplex(1024);
            vpcd.write_all(&bytes).await.unwrap();
            drop(vpcd);
            let mut card = EchoCard::default();
            let opts = ServeOptions {
                max_frame: 4096,
                ..ServeOptions::default()
            };
            let got = match serve(&mut card_side, &mut card, &opts, std::future::pending()).await {
                Err(VpcdError::FrameTooLarge { len, max: 4096 }) => Want::TooLarge(len),
                Err(VpcdError::EmptyFrame) => Want::Empty,
                Err(VpcdError::Truncated) => Want::Truncated,
                other => panic!("{bytes:02x?}: unexpected {other:?}"),
            };
            assert_eq!(got, want, "{bytes:02x?}");
            assert!(card.seen.is_empty());
        }
    }

    #[tokio::test]
    async fn stop_future_ends_serving() {
        let (_vpcd, mut card_side) = duplex(64);
        let mut card = EchoCard::default();
        let summary = serve(
            &mut card_side,
            &mut card,
            &ServeOptions::default(),
            std::future::ready(()),
        )
        .await
        .unwrap();
        assert_eq!(summary.end, ServeEnd::Stopped);
    }

    #[tokio::test]
    async fn finished_transaction_ends_after_hold() {
        let (mut vpcd, mut card_side) = duplex(1024);
        let mut card = EchoCard {
            finish_after: Some(2),
            ..EchoCard::default()
        };
        let opts = ServeOptions {
            hold_after_finish: Some(Duration::from_millis(50)),
            ..ServeOptions::default()
        };
        let peer = async {
            for i in 0..3u8 {
                vpcd.write_all(&frame(&[0x80, 0xC9, 0, i])).await.unwrap();
                let r = read_frame(&mut vpcd, 64).await.unwrap().unwrap();
                assert_eq!(r.first(), Some(&i));
            }
            // Keep the socket open: serving must end on its own after the hold.
            vpcd
        };
        let (summary, _vpcd) = tokio::join!(
            serve(&mut card_side, &mut card, &opts, std::future::pending()),
            peer
        );
        let summary = summary.unwrap();
        assert_eq!(summary.end, ServeEnd::Finished);
        assert!(summary.finished);
        // The third APDU arrived during the hold and was still answered.
        assert_eq!(summary.apdus, 3);
    }

    #[tokio::test]
    async fn write_frame_rejects_oversized_reply() {
        let (_a, mut b) = duplex(64);
        let big = vec![0u8; 70_000];
        assert!(matches!(
            write_frame(&mut b, &big).await,
            Err(VpcdError::ReplyTooLarge(70_000))
        ));
    }
}
