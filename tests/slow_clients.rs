//! Clients that are silent, slow, or never read: `idle_timeout` and
//! `write_timeout` in every combination, flow control, and memory bounded by
//! `max_pending_write_bytes` and `max_line_bytes` whatever the client sends.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    ack, assert_served, closed, end_case, heavy, read_exact_bytes, read_to_eof, read_until_closed,
    rss, Server,
};

/// A client that never closed kept the tutorial's server waiting forever.
#[test]
fn regression_silent_client_is_closed_after_idle_timeout_without_costing_a_worker() {
    let server = Server::start(&["--workers", "1", "--idle-timeout", "300ms"]);
    server.scrape(); // the sidecar's threads are started
    let threads = server.threads();
    let mut silent: Vec<TcpStream> = (0..50).map(|_| server.connect()).collect();
    // Meanwhile the only worker still serves everyone else.
    assert_served(&server);
    // (The sidecar's tiny_http pool may add a thread for a few seconds; 50
    // connections on a thread-per-connection server would add 50.)
    assert!(
        server.threads() <= threads + 2,
        "connections must not cost threads"
    );
    for s in &mut silent {
        assert_eq!(read_until_closed(s), b"", "closed without a word");
    }
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
    assert_served(&server);
    server.assert_counters_add_up(0.0);
}

/// A client that sends one byte just before each idle deadline stays open (every
/// byte is activity), but its line cannot grow past the limit.
#[test]
fn drip_feeder_stays_open_but_its_line_is_bounded() {
    let _turn = heavy();
    let server = Server::start(&[
        "--idle-timeout",
        "500ms",
        "--framing",
        "line",
        "--max-line-bytes",
        "64",
    ]);
    let mut c = server.connect();
    c.set_nodelay(true).unwrap();
    // Phase 1: ten bytes 300 ms apart (3 s, six idle timeouts' worth) then the
    // newline: the whole line comes back, so the connection stayed open.
    for _ in 0..10 {
        c.write_all(b"d").unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }
    c.write_all(b"\n").unwrap();
    assert_eq!(read_exact_bytes(&mut c, 29), ack("dddddddddd"));
    // Phase 2: drip a line up to the limit; nothing comes back...
    for _ in 0..64 {
        c.write_all(b"x").unwrap();
        std::thread::sleep(Duration::from_millis(15));
    }
    c.set_read_timeout(Some(Duration::from_millis(250)))
        .unwrap();
    let mut byte = [0u8; 1];
    match c.read(&mut byte) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("64 bytes of line must be kept quietly, got {other:?}"),
    }
    // ...one byte more and the connection is closed as a protocol error.
    c.write_all(b"x").unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(read_to_eof(&mut c), b"ERROR line too long\n");
    server.wait_metric(&closed("protocol_error"), |v| v == 1.0);
    assert_eq!(server.metric(&closed("idle_timeout")), 0.0);
    end_case(&server, 0.0);
}

/// 100 MiB without a newline: the server answers the error after about
/// `max_line_bytes`, never buffers more, and its memory stays flat.
#[test]
fn hundred_mebibytes_without_a_newline_is_cut_off_early_with_flat_memory() {
    let _turn = heavy();
    let server = Server::start(&["--framing", "line"]); // max_line_bytes = 65536
    let pid = server.pid();
    let before = rss(pid);
    let peak = Arc::new(AtomicUsize::new(before as usize));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(rss(pid) as usize, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let c = server.connect();
    let mut reader = c.try_clone().unwrap();
    let replies = std::thread::spawn(move || read_to_eof(&mut reader));
    let mut writer = c;
    writer
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let chunk = vec![b'z'; 1 << 20];
    let mut sent = 0usize;
    while sent < 100 << 20 {
        match writer.write(&chunk) {
            Ok(n) => sent += n,
            Err(_) => break, // the server has closed: EPIPE / ECONNRESET / timeout
        }
    }
    let got = replies.join().unwrap();
    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    assert_eq!(got, b"ERROR line too long\n");
    assert!(sent < 100 << 20, "the server swallowed all 100 MiB");
    server.wait_metric(&closed("protocol_error"), |v| v == 1.0);
    // Read: the line up to the limit, at most one read buffer past it, then at most
    // the bounded drain (1 MiB) after the error.
    let received = server.metric("sockpool_received_bytes_total");
    assert!(
        received <= (65_537 + (64 << 10) + (1 << 20) + (64 << 10)) as f64,
        "{received}"
    );
    let growth = peak.load(Ordering::Relaxed) as u64 - before;
    assert!(growth < 64 << 20, "RSS grew by {growth} bytes");
    eprintln!(
        "100 MiB line: client sent {sent} bytes, server read {received}, RSS +{growth} bytes"
    );
    drop(writer);
    end_case(&server, 0.0);
}
