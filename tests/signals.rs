//! Signals: SIGTERM/SIGINT drain within the grace (replies owed are delivered), a
//! second stop signal exits at once, SIGHUP is ignored.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use common::{ack, assert_served, end_case, read_exact_bytes, read_to_eof, Server};
use rustix::process::Signal;

#[test]
fn sigterm_refuses_new_clients_lets_open_ones_finish_and_exits_zero() {
    let mut server = Server::start(&["--framing", "line", "--shutdown-grace", "20s"]);
    let mut c = server.connect();
    c.write_all(b"before\n").unwrap();
    assert_eq!(read_exact_bytes(&mut c, 25), ack("before"));
    server.signal(Signal::TERM);
    server.wait_log("stopped accepting");
    let (status, _, _) = common::http_get(server.metrics_addr.unwrap(), "/-/ready", &[]);
    assert_eq!(status, 503);
    assert!(
        TcpStream::connect(server.addr).is_err(),
        "listener must be closed"
    );
    // The open connection is still served during the grace period.
    c.write_all(b"during\n").unwrap();
    assert_eq!(read_exact_bytes(&mut c, 25), ack("during"));
    c.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_eof(&mut c), b"");
    let status = server.wait_exit();
    assert_eq!(status.code(), Some(0), "{}", server.log());
    assert!(server.log().contains("shutdown complete"));
}

#[test]
fn shutdown_grace_bounds_the_wait_and_counts_server_shutdown() {
    let mut server = Server::start(&["--shutdown-grace", "300ms", "--log-level", "debug"]);
    let mut idle = server.connect();
    assert_served(&server);
    server.signal(Signal::TERM);
    assert_eq!(read_to_eof(&mut idle), b"");
    assert_eq!(server.wait_exit().code(), Some(0));
    assert!(
        server.log().contains("reason=server_shutdown"),
        "{}",
        server.log()
    );
}

#[test]
fn sigterm_with_replies_owed_delivers_them_all_and_exits_zero() {
    let mut server = Server::start(&[
        "--mode",
        "echo",
        "--shutdown-grace",
        "20s",
        "--log-level",
        "debug",
    ]);
    let c = server.connect();
    let data: Vec<u8> = (0..8 << 20).map(|i| (i % 253) as u8).collect();
    let mut writer = c.try_clone().unwrap();
    let sent = data.clone();
    let t = std::thread::spawn(move || {
        writer.write_all(&sent).unwrap();
        writer.shutdown(Shutdown::Write).unwrap();
    });
    // The server is mid-stream, with replies queued for a client not reading yet.
    server.wait_metric("sockpool_received_bytes_total", |v| v >= (1 << 20) as f64);
    server.signal(Signal::TERM);
    server.wait_log("stopped accepting");
    let mut reader = c;
    let mut got = Vec::with_capacity(data.len());
    let mut buf = vec![0; 256 << 10];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!("read failed after {} bytes: {e}", got.len()),
        }
        std::thread::sleep(Duration::from_millis(5)); // a slow reader
    }
    t.join().unwrap();
    assert!(got == data, "got {} of {} bytes", got.len(), data.len());
    assert_eq!(server.wait_exit().code(), Some(0), "{}", server.log());
    let log = server.log();
    assert!(log.contains("closed reason=client_closed"), "{log}");
    assert!(!log.contains("reason=server_shutdown"), "{log}");
}

#[test]
fn second_signal_exits_at_once() {
    let mut server = Server::start(&["--shutdown-grace", "5m"]);
    let _idle = server.connect();
    assert_served(&server);
    server.signal(Signal::INT);
    server.wait_log("stopped accepting");
    server.signal(Signal::INT);
    let status = server.wait_exit();
    assert_eq!(status.code(), Some(128 + 2));
}

/// A second stop signal exits at once (128 + SIGINT) even though a client still
/// has replies owed that it is not reading, which the grace would wait for.
#[test]
fn second_stop_signal_with_a_stalled_client_exits_at_once_with_130() {
    for first in [Signal::INT, Signal::TERM] {
        let mut server = Server::start(&["--mode", "echo", "--shutdown-grace", "5m"]);
        let mut c = server.connect();
        c.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
        // Never read: the echo stays owed, so draining would take the whole grace.
        let _ = c.write_all(&vec![b's'; 4 << 20]);
        server.wait_metric("sockpool_sent_bytes_total", |v| v > 0.0);
        server.signal(first);
        server.wait_log("stopped accepting");
        server.signal(Signal::INT);
        let code = server.wait_exit().code();
        assert_eq!(code, Some(130), "{first:?}, INT:\n{}", server.log());
    }
}

#[test]
fn sighup_is_ignored() {
    let server = Server::start(&[]);
    server.signal(Signal::HUP);
    server.wait_log("SIGHUP ignored");
    assert_served(&server);
}

#[test]
fn sighup_is_ignored_mid_conversation() {
    let server = Server::start(&["--framing", "line"]);
    let mut c = server.connect();
    c.write_all(b"before\npart").unwrap();
    assert_eq!(read_exact_bytes(&mut c, 25), ack("before"));
    for _ in 0..3 {
        server.signal(Signal::HUP);
    }
    server.wait_log("SIGHUP ignored");
    c.write_all(b"ial\n").unwrap();
    assert_eq!(read_exact_bytes(&mut c, 26), ack("partial"));
    let (status, _, _) = common::http_get(server.metrics_addr.unwrap(), "/-/ready", &[]);
    assert_eq!(status, 200);
    end_case(&server, 1.0);
}
