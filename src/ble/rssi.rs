//! The RSSI of a live LE connection, read from the controller through a raw HCI socket (the
//! I/O half of [`super::hci`]).
//!
//! Why a raw HCI socket: bluetoothd's D-Bus API exposes only the RSSI of scanned
//! advertisements, and mgmt's Get Connection Information needs `CAP_NET_ADMIN`. The kernel lets
//! an unprivileged process send Read RSSI on a raw HCI socket (it is in `hci_sock.c`'s security
//! filter, like `hcitool rssi`), so the hardened unit keeps its empty capability set.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use tokio::io::unix::AsyncFd;

use super::hci::{self, RssiReply};

const BTPROTO_HCI: libc::c_int = 1;
const HCI_CHANNEL_RAW: u16 = 0;
const SOL_HCI: libc::c_int = 0;
const HCI_FILTER: libc::c_int = 2;
/// Largest HCI event (3-byte header with indicator + 255 parameter bytes).
const MAX_EVENT: usize = 258;

/// `struct sockaddr_hci`.
#[repr(C)]
struct SockaddrHci {
    family: libc::sa_family_t,
    dev: u16,
    channel: u16,
}

/// `struct hci_ufilter`: which packets the socket receives.
#[repr(C)]
struct HciFilter {
    type_mask: u32,
    event_mask: [u32; 2],
    opcode: u16,
}

/// Why no RSSI was read.
#[derive(Debug, thiserror::Error)]
pub enum RssiError {
    #[error("adapter name {0:?} is not hciN")]
    AdapterName(String),
    #[error("HCI socket: {0}")]
    Io(#[from] io::Error),
    #[error("controller refused Read RSSI (HCI status 0x{0:02X})")]
    Controller(u8),
    #[error("no answer from the controller within {0:?}")]
    Timeout(Duration),
}

/// The index of `hciN`.
pub fn adapter_index(name: &str) -> Result<u16, RssiError> {
    name.strip_prefix("hci")
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| RssiError::AdapterName(name.to_string()))
}

/// Reads the RSSI (dBm; 127 = not available) of connection `handle` on adapter `dev`, waiting
/// at most `limit` for the controller.
pub async fn read(dev: u16, handle: u16, limit: Duration) -> Result<i8, RssiError> {
    // SAFETY: an `OwnedFd` keeps its descriptor open, and the same, until it is dropped.
    let sock = unsafe { AsyncFd::register(open(dev)?) }.map_err(|e| RssiError::Io(e.into()))?;
    let cmd = hci::read_rssi_command(handle);
    // SAFETY: writes `cmd.len()` bytes from a live array to a socket this function owns.
    let n = unsafe { libc::write(sock.as_raw_fd(), cmd.as_ptr().cast(), cmd.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error().into());
    }
    let answer = async {
        let mut buf = [0u8; MAX_EVENT];
        loop {
            let mut guard = sock.readable().await?;
            let got = guard.try_io(|fd| {
                // SAFETY: reads at most `buf.len()` bytes into a live buffer.
                let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                usize::try_from(n).map_err(|_| io::Error::last_os_error())
            });
            let Ok(read) = got else { continue };
            let n = read?;
            match buf.get(..n).and_then(|p| hci::parse_rssi_reply(p, handle)) {
                Some(RssiReply::Rssi(r)) => return Ok(r),
                Some(RssiReply::Failed(status)) => return Err(RssiError::Controller(status)),
                None => continue,
            }
        }
    };
    tokio::time::timeout(limit, answer)
        .await
        .map_err(|_| RssiError::Timeout(limit))?
}

/// A non-blocking raw HCI socket on `dev` that receives only Read RSSI's completion events.
fn open(dev: u16) -> Result<OwnedFd, RssiError> {
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_BLUETOOTH,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            BTPROTO_HCI,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error().into());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let filter = HciFilter {
        type_mask: 1 << 0x04, // events only
        event_mask: [
            (1 << hci::EVT_COMMAND_COMPLETE) | (1 << hci::EVT_COMMAND_STATUS),
            0,
        ],
        opcode: hci::OP_READ_RSSI,
    };
    // SAFETY: the option value is a live, correctly sized `hci_ufilter`.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            SOL_HCI,
            HCI_FILTER,
            std::ptr::from_ref(&filter).cast(),
            std::mem::size_of::<HciFilter>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error().into());
    }
    let addr = SockaddrHci {
        family: libc::AF_BLUETOOTH as libc::sa_family_t,
        dev,
        channel: HCI_CHANNEL_RAW,
    };
    // SAFETY: the address is a live, correctly sized `sockaddr_hci`.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::from_ref(&addr).cast(),
            std::mem::size_of::<SockaddrHci>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error().into());
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapter_names() {
        assert_eq!(adapter_index("hci0").unwrap(), 0);
        assert_eq!(adapter_index("hci12").unwrap(), 12);
        for bad in ["", "hci", "hcix", "usb0", "hci-1", "hci70000"] {
            assert!(adapter_index(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn without_bluetooth_the_error_is_clear() {
        // This machine's kernel has no Bluetooth (the VM test covers the real path); wherever
        // it runs, a nonexistent adapter must give an error, never hang or panic.
        let r = read(0xFFF0, 0x40, Duration::from_millis(200)).await;
        assert!(r.is_err(), "{r:?}");
    }
}
