//! The tutorial's faults, fixed: resets, clients that never close, clients that
//! never read; the connection limit; shutdown; counters that add up.

mod common;

use std::io::{ErrorKind, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use common::{read_exact_bytes, read_to_eof, reset, Server};
use rustix::process::Signal;

/// A fresh client is served correctly (ack mode, any framing).
fn roundtrip(server: &Server) {
    expect_reply(
        server,
        b"still there?\n",
        b"Server received \"still there?\"\n",
    );
}

fn expect_reply(server: &Server, send: &[u8], want: &[u8]) {
    let mut c = server.connect();
    c.write_all(send).unwrap();
    assert_eq!(read_exact_bytes(&mut c, want.len()), want);
}

fn ack(body: &str) -> Vec<u8> {
    format!("Server received \"{body}\"").into_bytes()
}

/// WinError 10054 crashed the tutorial's server.
#[test]
fn regression_client_reset_is_counted_and_logged_and_others_are_served() {
    let server = Server::start(&["--workers", "1"]);
    let mut bystander = server.connect();
    for _ in 0..3 {
        let mut c = server.connect();
        c.write_all(b"about to vanish").unwrap();
        assert!(!read_exact_bytes(&mut c, 10).is_empty());
        reset(c);
    }
    server.wait_metric("sockpool_connections_closed_total{reason=\"reset\"}", |v| {
        v == 3.0
    });
    assert!(server.metric("sockpool_reset_errors_total") >= 3.0);
    server.wait_log("connection reset by peer");
    bystander.write_all(b"ok").unwrap();
    assert_eq!(
        read_exact_bytes(&mut bystander, 20),
        b"Server received \"ok\""
    );
    roundtrip(&server);
    drop(bystander);
    server.assert_counters_add_up(0.0);
}

/// A client that never closed kept the tutorial's server waiting forever.
#[test]
fn regression_silent_client_is_closed_after_idle_timeout_without_costing_a_worker() {
    let server = Server::start(&["--workers", "1", "--idle-timeout", "300ms"]);
    server.scrape(); // the sidecar's threads are started
    let threads = server.threads();
    let mut silent: Vec<TcpStream> = (0..50).map(|_| server.connect()).collect();
    // Meanwhile the only worker still serves everyone else.
    roundtrip(&server);
    // (The sidecar's tiny_http pool may add a thread for a few seconds; 50
    // connections on a thread-per-connection server would add 50.)
    assert!(
        server.threads() <= threads + 2,
        "connections must not cost threads"
    );
    let started = Instant::now();
    for s in &mut silent {
        assert_eq!(read_to_eof(s), b"", "closed without a word");
    }
    assert!(started.elapsed() < Duration::from_secs(15));
    server.wait_metric(
        "sockpool_connections_closed_total{reason=\"idle_timeout\"}",
        |v| v == 50.0,
    );
    server.assert_counters_add_up(0.0);
}

#[test]
fn client_that_stops_reading_is_flow_controlled_then_closed_after_write_timeout() {
    let server = Server::start(&[
        "--mode",
        "echo",
        "--write-timeout",
        "500ms",
        "--idle-timeout",
        "0",
    ]);
    let mut c = server.connect();
    c.set_nonblocking(true).unwrap();
    // Write without reading until both kernels' buffers and the server's queue
    // are full: the server stops reading from us, so our writes block.
    let chunk = vec![b'x'; 1 << 16];
    let mut sent = 0usize;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut stalled_since: Option<Instant> = None;
    loop {
        match c.write(&chunk) {
            Ok(n) => {
                sent += n;
                stalled_since = None;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                let since = *stalled_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_millis(200) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("write failed before the server stalled: {e}"),
        }
        assert!(
            Instant::now() < deadline,
            "the server never stopped reading"
        );
        assert!(
            sent < 1 << 30,
            "the server kept reading a client that never reads"
        );
    }
    server.wait_metric(
        "sockpool_connections_closed_total{reason=\"write_timeout\"}",
        |v| v == 1.0,
    );
    let queued =
        server.metric("sockpool_received_bytes_total") - server.metric("sockpool_sent_bytes_total");
    assert!(
        queued <= (1 << 20) as f64 + 65536.0 * 3.0,
        "queued {queued} bytes for a non-reader"
    );
    server.wait_log("write_timeout");
    expect_reply(&server, b"echo?", b"echo?");
    server.assert_counters_add_up(0.0);
}

#[test]
fn over_max_connections_gets_the_busy_message_and_a_counter() {
    let server = Server::start(&["--max-connections", "2"]);
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = server.connect();
        c.write_all(b"hold").unwrap();
        assert_eq!(read_exact_bytes(&mut c, ack("hold").len()), ack("hold"));
        held.push(c);
    }
    for _ in 0..3 {
        let mut extra = server.connect();
        assert_eq!(read_to_eof(&mut extra), b"ERROR server busy\n");
    }
    assert_eq!(
        server.metric("sockpool_connections_rejected_total{reason=\"max_connections\"}"),
        3.0
    );
    assert_eq!(server.metric("sockpool_connections_max"), 2.0);
    held.pop();
    server.wait_metric("sockpool_connections_active", |v| v == 1.0);
    roundtrip(&server);
    server.assert_counters_add_up(1.0);
}

#[test]
fn counters_add_up_after_a_mix_of_closes_resets_timeouts_and_rejections() {
    let server = Server::start(&[
        "--max-connections",
        "4",
        "--idle-timeout",
        "400ms",
        "--framing",
        "line",
        "--max-line-bytes",
        "8",
    ]);
    let mut c = server.connect();
    c.write_all(b"a\n").unwrap();
    assert_eq!(read_exact_bytes(&mut c, 20), b"Server received \"a\"\n");
    drop(c); // client_closed
    let c = server.connect();
    c.try_clone().unwrap().write_all(b"x").unwrap();
    reset(c); // reset
    let _idle = server.connect(); // idle_timeout
    let mut long = server.connect();
    long.write_all(b"123456789").unwrap(); // protocol_error
    assert_eq!(read_exact_bytes(&mut long, 20), b"ERROR line too long\n");
    drop(long);
    server.wait_metric(
        "sockpool_connections_closed_total{reason=\"protocol_error\"}",
        |v| v == 1.0,
    );
    let _held: Vec<_> = (0..3).map(|_| server.connect()).collect();
    server.wait_metric("sockpool_connections_active", |v| v == 4.0);
    let mut extra = server.connect(); // max_connections
    assert_eq!(read_to_eof(&mut extra), b"ERROR server busy\n");
    server.assert_counters_add_up(4.0);
    // Every held connection times out.
    server.wait_metric(
        "sockpool_connections_closed_total{reason=\"idle_timeout\"}",
        |v| v == 4.0,
    );
    let text = server.assert_counters_add_up(0.0);
    assert_eq!(
        common::metric_value(
            &text,
            "sockpool_connections_rejected_total{reason=\"max_connections\"}"
        ),
        Some(1.0)
    );
    for reason in ["client_closed", "reset", "idle_timeout", "protocol_error"] {
        let v = common::metric_value(
            &text,
            &format!("sockpool_connections_closed_total{{reason=\"{reason}\"}}"),
        );
        assert!(v.unwrap_or(0.0) >= 1.0, "{reason}: {v:?}\n{text}");
    }
}

#[test]
fn sigterm_refuses_new_clients_lets_open_ones_finish_and_exits_zero() {
    let mut server = Server::start(&["--framing", "line", "--shutdown-grace", "20s"]);
    let mut c = server.connect();
    c.write_all(b"before\n").unwrap();
    assert_eq!(
        read_exact_bytes(&mut c, 25),
        b"Server received \"before\"\n"
    );
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
    assert_eq!(
        read_exact_bytes(&mut c, 25),
        b"Server received \"during\"\n"
    );
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
    roundtrip(&server);
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
fn second_signal_exits_at_once() {
    let mut server = Server::start(&["--shutdown-grace", "5m"]);
    let _idle = server.connect();
    roundtrip(&server);
    server.signal(Signal::INT);
    server.wait_log("stopped accepting");
    server.signal(Signal::INT);
    let status = server.wait_exit();
    assert_eq!(status.code(), Some(128 + 2));
}

#[test]
fn sighup_is_ignored() {
    let server = Server::start(&[]);
    server.signal(Signal::HUP);
    server.wait_log("SIGHUP ignored");
    roundtrip(&server);
}

#[test]
fn close_is_logged_at_debug_with_peer_reason_bytes_and_duration() {
    let server = Server::start(&["--log-level", "debug"]);
    let mut c = server.connect();
    let local = c.local_addr().unwrap();
    c.write_all(b"hey").unwrap();
    assert_eq!(read_exact_bytes(&mut c, 21), b"Server received \"hey\"");
    drop(c);
    let log = server.wait_log(&format!("{local}: closed reason=client_closed in=3 out=21"));
    assert!(log.contains("duration="));
}
