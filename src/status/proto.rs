//! The status socket protocol, sans-IO: the client sends one line (`status v1\n`), the daemon
//! answers one JSON [`Snapshot`] line and closes. Both sides bound what they read.

use super::model::Snapshot;

/// The only request there is.
pub const REQUEST: &[u8] = b"status v1\n";
/// Longest request line the daemon reads.
pub const MAX_REQUEST: usize = 64;
/// Longest reply the client reads (a snapshot of 64 doors is ~100 KiB).
pub const MAX_RESPONSE: usize = 1 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtoError {
    #[error("request longer than {MAX_REQUEST} bytes")]
    RequestTooLong,
    #[error("unknown request {0:?}")]
    UnknownRequest(String),
    #[error("reply longer than {MAX_RESPONSE} bytes")]
    ResponseTooLong,
    #[error("reply is not a status snapshot: {0}")]
    BadResponse(String),
}

/// A whole request in `buf`? `Ok(None)`: not yet (no newline).
pub fn parse_request(buf: &[u8]) -> Result<Option<()>, ProtoError> {
    let Some(end) = buf.iter().position(|&b| b == b'\n') else {
        return if buf.len() >= MAX_REQUEST {
            Err(ProtoError::RequestTooLong)
        } else {
            Ok(None)
        };
    };
    let line = buf.get(..=end).unwrap_or_default();
    if line == REQUEST {
        Ok(Some(()))
    } else {
        let shown: String = String::from_utf8_lossy(line)
            .trim_end()
            .chars()
            .take(MAX_REQUEST)
            .collect();
        Err(ProtoError::UnknownRequest(shown))
    }
}

pub fn encode_response(snapshot: &Snapshot) -> Vec<u8> {
    // Serialising plain structs of strings and numbers cannot fail; an empty object would
    // be refused by the client rather than misread.
    let mut out = serde_json::to_vec(snapshot).unwrap_or_else(|_| b"{}".to_vec());
    out.push(b'\n');
    out
}

/// The daemon's whole reply (it closes after one line).
pub fn parse_response(buf: &[u8]) -> Result<Snapshot, ProtoError> {
    if buf.len() > MAX_RESPONSE {
        return Err(ProtoError::ResponseTooLong);
    }
    serde_json::from_slice(buf).map_err(|e| ProtoError::BadResponse(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_is_recognised_only_whole_and_exact() {
        assert_eq!(parse_request(b""), Ok(None));
        assert_eq!(parse_request(b"status v"), Ok(None));
        assert_eq!(parse_request(REQUEST), Ok(Some(())));
        assert!(matches!(
            parse_request(b"GET / HTTP/1.0\n"),
            Err(ProtoError::UnknownRequest(r)) if r == "GET / HTTP/1.0"
        ));
        assert_eq!(
            parse_request(&[b'a'; MAX_REQUEST]),
            Err(ProtoError::RequestTooLong)
        );
    }

    #[test]
    fn response_round_trips_and_garbage_is_refused() {
        let s = Snapshot {
            version: "x".into(),
            pid: 1,
            ..Snapshot::default()
        };
        assert_eq!(parse_response(&encode_response(&s)), Ok(s));
        assert!(matches!(
            parse_response(b"{\"version\":"),
            Err(ProtoError::BadResponse(_))
        ));
        assert_eq!(
            parse_response(&vec![b' '; MAX_RESPONSE + 1]),
            Err(ProtoError::ResponseTooLong)
        );
    }
}
