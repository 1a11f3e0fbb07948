//! systemd's readiness protocol (`sd_notify`), so that the unit can be
//! `Type=notify`: `systemctl start` returns once both listeners are bound and the
//! workers run, and units ordered after sockpool start against a server that
//! answers.
//!
//! The protocol is one datagram of `KEY=value` lines to the Unix socket named by
//! `$NOTIFY_SOCKET`: a path, or `@name` for Linux's abstract namespace. Without
//! the variable (not started by systemd as `Type=notify`) every call does nothing.
//! Notification is best effort: a failure is logged and the service goes on,
//! because systemd times the start out on its own if READY=1 never arrives.

use std::ffi::OsString;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The environment variable systemd sets for `Type=notify` services.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Where notifications go, if anywhere.
#[derive(Debug, Clone)]
pub struct Notifier {
    target: Option<SocketAddr>,
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET`. An unusable value is logged once and ignored.
    pub fn from_env() -> Notifier {
        let target = std::env::var_os(NOTIFY_SOCKET).and_then(|value| match parse(&value) {
            Ok(addr) => Some(addr),
            Err(e) => {
                log::warn!("{NOTIFY_SOCKET}={value:?} ignored: {e}");
                None
            }
        });
        Notifier { target }
    }

    /// Sends `state` (for example `READY=1\nSTATUS=...`), logging a failure.
    pub fn notify(&self, state: &str) {
        let Some(addr) = &self.target else {
            return;
        };
        // An unbound socket per message: notifications are a handful per run, and
        // nothing is held open for the life of the process.
        let sent = UnixDatagram::unbound().and_then(|s| s.send_to_addr(state.as_bytes(), addr));
        match sent {
            Ok(_) => log::debug!("notified systemd: {}", state.replace('\n', " ")),
            Err(e) => log::warn!("cannot notify systemd ({NOTIFY_SOCKET}): {e}"),
        }
    }
}

/// A `$NOTIFY_SOCKET` value: an absolute path, or `@name` (abstract namespace).
pub fn parse(value: &OsString) -> io::Result<SocketAddr> {
    let bytes = value.as_bytes();
    match bytes.first() {
        Some(b'/') => SocketAddr::from_pathname(value),
        Some(b'@') => SocketAddr::from_abstract_name(&bytes[1..]),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not an absolute path or @abstract name (vsock is not supported)",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_paths_and_abstract_names_and_rejects_the_rest() {
        let path = parse(&"/run/systemd/notify".into()).unwrap();
        assert_eq!(
            path.as_pathname(),
            Some(std::path::Path::new("/run/systemd/notify"))
        );
        let abs = parse(&"@sockpool/notify".into()).unwrap();
        assert_eq!(abs.as_abstract_name(), Some(&b"sockpool/notify"[..]));
        for bad in ["", "relative/path", "vsock:2:1234"] {
            assert!(parse(&bad.into()).is_err(), "{bad:?}");
        }
    }
}
