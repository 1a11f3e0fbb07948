//! systemd readiness (`Type=notify`): sockpool sends READY=1 to `$NOTIFY_SOCKET`
//! once it serves, and STOPPING=1 when a stop signal starts the drain. These tests
//! play systemd's part with a real Unix datagram socket, a path one and an abstract
//! one, as systemd uses both.

mod common;

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

use common::{Server, WAIT};
use rustix::process::Signal;

/// The next notification, as text.
fn recv(sock: &UnixDatagram) -> String {
    sock.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 4096];
    let n = sock
        .recv(&mut buf)
        .expect("a notification within the wait bound");
    String::from_utf8(buf[..n].to_vec()).expect("UTF-8 notification")
}

/// One message, answered in the default read framing (no newline).
fn assert_answers(server: &Server, message: &str) {
    let mut c = server.connect();
    c.write_all(message.as_bytes()).unwrap();
    let want = format!("Server received \"{message}\"");
    let mut reply = vec![0u8; want.len()];
    c.read_exact(&mut reply).unwrap();
    assert_eq!(String::from_utf8_lossy(&reply), want);
}

/// Runs one server life against `sock` (reachable as `value` in `$NOTIFY_SOCKET`).
fn ready_then_stopping(sock: &UnixDatagram, value: &OsStr) {
    let mut server = Server::start_with_env(&["--workers", "1"], &[("NOTIFY_SOCKET", value)]);
    let ready = recv(sock);
    let lines: Vec<&str> = ready.lines().collect();
    assert!(lines.contains(&"READY=1"), "{ready:?}");
    let status = format!("STATUS=serving on {}", server.addr);
    assert!(lines.contains(&status.as_str()), "{ready:?}");
    // Ready means serving: a client is answered right away.
    assert_answers(&server, "hello");
    server.signal(Signal::TERM);
    let stopping = recv(sock);
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    assert_eq!(server.wait_exit().code(), Some(0), "{}", server.log());
    // Nothing else was sent.
    sock.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 64];
    assert!(
        sock.recv(&mut buf).is_err(),
        "an unexpected extra notification"
    );
}

#[test]
fn ready_and_stopping_reach_a_path_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let sock = UnixDatagram::bind(&path).unwrap();
    ready_then_stopping(&sock, path.as_os_str());
}

#[test]
fn ready_and_stopping_reach_an_abstract_socket() {
    let name = format!("sockpool-test-notify-{}", std::process::id());
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let sock = UnixDatagram::bind_addr(&addr).unwrap();
    ready_then_stopping(&sock, OsStr::new(&format!("@{name}")));
}

/// A bad value, or a socket nobody listens on, costs a warning and nothing else.
#[test]
fn an_unusable_notify_socket_is_a_warning_not_a_failure() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nobody-listens");
    for (value, warning) in [
        (
            OsStr::new("relative/notify"),
            "NOTIFY_SOCKET=\"relative/notify\" ignored",
        ),
        (missing.as_os_str(), "cannot notify systemd"),
    ] {
        let mut server = Server::start_with_env(&["--workers", "1"], &[("NOTIFY_SOCKET", value)]);
        server.wait_log(warning);
        assert_answers(&server, "still here");
        server.signal(Signal::TERM);
        assert_eq!(server.wait_exit().code(), Some(0), "{}", server.log());
    }
}
