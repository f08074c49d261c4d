//! The status socket: a Unix socket in the RuntimeDirectory (`/run/keyway/status.sock`), mode
//! 0660 and the daemon's group, so only root and members of group `keyway` can ask. One request
//! line, one JSON reply ([`super::proto`]), every read and write under a timeout.

use std::future::Future;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Semaphore};

use super::model::Snapshot;
use super::proto::{self, ProtoError};

/// One client's whole exchange.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(3);
/// Clients served at once; more wait in the listen backlog.
const MAX_CLIENTS: usize = 8;
/// Socket mode: owner and group (`keyway`) only.
pub const SOCKET_MODE: u32 = 0o660;

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("status socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "status socket {path} exists and is not a socket; remove it or change daemon.status_socket"
    )]
    NotASocket { path: PathBuf },
    #[error(
        "status socket {path} is in use by another keyway; stop it or change daemon.status_socket"
    )]
    InUse { path: PathBuf },
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("keyway is not running (no daemon listening on {path})")]
    NotRunning { path: PathBuf },
    #[error("permission denied on {path}: run as root or as a member of group keyway (sudo usermod -aG keyway $USER, then log in again)")]
    PermissionDenied { path: PathBuf },
    #[error("no answer from keyway on {path} within {timeout:?}")]
    Timeout { path: PathBuf, timeout: Duration },
    #[error("status socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("status socket {path}: {source}")]
    Proto { path: PathBuf, source: ProtoError },
}

/// Binds the socket: a stale socket from an earlier run is replaced, anything else at the
/// path is refused. The mode is set explicitly (the unit's UMask=0077 would make it 0600).
pub fn bind(path: &Path) -> Result<UnixListener, StatusError> {
    let err = |source| StatusError::Bind {
        path: path.to_owned(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            // A live socket is another keyway's: never take it over.
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(StatusError::InUse {
                    path: path.to_owned(),
                });
            }
            std::fs::remove_file(path).map_err(err)?
        }
        Ok(_) => {
            return Err(StatusError::NotASocket {
                path: path.to_owned(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE)).map_err(err)?;
    Ok(listener)
}

/// Answers clients until `shutdown`; `answer` builds each reply. Removes the socket at the end.
pub async fn serve<F, Fut>(
    listener: UnixListener,
    path: PathBuf,
    answer: F,
    mut shutdown: watch::Receiver<bool>,
) where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Snapshot> + Send,
{
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    loop {
        let conn = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => break,
            c = listener.accept() => c,
        };
        let stream = match conn {
            Ok((s, _)) => s,
            Err(e) => {
                log::warn!(target: "keyway::status", "status socket: accept failed: {e}");
                // EMFILE and the like: do not spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            // Busy: the client sees the connection close and can ask again.
            continue;
        };
        let answer = answer.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Ok(Err(e)) = tokio::time::timeout(CLIENT_TIMEOUT, one(stream, answer)).await {
                log::debug!(target: "keyway::status", "status client: {e}");
            }
        });
    }
    let _ = std::fs::remove_file(&path);
}

async fn one<F, Fut>(mut stream: UnixStream, answer: F) -> Result<(), String>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Snapshot>,
{
    let mut buf = Vec::with_capacity(proto::MAX_REQUEST);
    let mut chunk = [0u8; proto::MAX_REQUEST];
    loop {
        let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed before a request".into());
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
        match proto::parse_request(&buf) {
            Ok(Some(())) => break,
            Ok(None) => continue,
            Err(e) => {
                let _ = stream.write_all(format!("error: {e}\n").as_bytes()).await;
                return Err(e.to_string());
            }
        }
    }
    let reply = proto::encode_response(&answer().await);
    stream.write_all(&reply).await.map_err(|e| e.to_string())?;
    stream.shutdown().await.map_err(|e| e.to_string())
}

/// Asks the daemon listening on `path` for its status.
pub async fn query(path: &Path, timeout: Duration) -> Result<Snapshot, ClientError> {
    let p = || path.to_owned();
    let exchange = async {
        let mut stream = UnixStream::connect(path)
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                    ClientError::NotRunning { path: p() }
                }
                std::io::ErrorKind::PermissionDenied => ClientError::PermissionDenied { path: p() },
                _ => ClientError::Io {
                    path: p(),
                    source: e,
                },
            })?;
        let io = |source| ClientError::Io { path: p(), source };
        stream.write_all(proto::REQUEST).await.map_err(io)?;
        let mut buf = Vec::new();
        // One byte past the limit tells a too-long reply from one exactly at it.
        (&mut stream)
            .take(proto::MAX_RESPONSE as u64 + 1)
            .read_to_end(&mut buf)
            .await
            .map_err(io)?;
        proto::parse_response(&buf).map_err(|source| ClientError::Proto { path: p(), source })
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| ClientError::Timeout { path: p(), timeout })?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap() -> Snapshot {
        Snapshot {
            version: "t".into(),
            pid: 7,
            ..Snapshot::default()
        }
    }

    #[tokio::test]
    async fn a_client_gets_the_snapshot_and_the_socket_is_group_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status.sock");
        let listener = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        let (tx, rx) = watch::channel(false);
        let server = tokio::spawn(serve(listener, path.clone(), || async { snap() }, rx));
        let got = query(&path, Duration::from_secs(5)).await.unwrap();
        assert_eq!(got, snap());

        // A stranger's request gets an error line, not a snapshot.
        let mut s = UnixStream::connect(&path).await.unwrap();
        s.write_all(b"hello\n").await.unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).await.unwrap();
        assert!(reply.starts_with("error: unknown request"), "{reply}");

        tx.send(true).unwrap();
        server.await.unwrap();
        assert!(!path.exists(), "socket removed on shutdown");
        assert!(matches!(
            query(&path, Duration::from_secs(1)).await,
            Err(ClientError::NotRunning { .. })
        ));
    }

    #[tokio::test]
    async fn stale_socket_is_replaced_and_other_files_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status.sock");
        drop(bind(&path).unwrap());
        assert!(path.exists());
        let live = bind(&path).unwrap();
        assert!(matches!(bind(&path), Err(StatusError::InUse { .. })));
        drop(live);
        drop(bind(&path).unwrap());
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(bind(&file), Err(StatusError::NotASocket { .. })));
        assert_eq!(std::fs::read(&file).unwrap(), b"x");
    }

    #[tokio::test]
    async fn a_socket_we_may_not_use_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status.sock");
        let _l = bind(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o000)).unwrap();
        // root ignores the mode: then this only shows that root is let in.
        let is_root = unsafe { libc::geteuid() } == 0;
        match query(&path, Duration::from_millis(300)).await {
            Err(ClientError::PermissionDenied { .. }) => assert!(!is_root),
            Err(ClientError::Timeout { .. }) => assert!(is_root),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_daemon_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status.sock");
        let _l = bind(&path).unwrap(); // listens, never accepts
        assert!(matches!(
            query(&path, Duration::from_secs(2)).await,
            Err(ClientError::Timeout { .. })
        ));
    }
}
