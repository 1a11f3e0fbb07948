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
    ack, assert_served, closed, end_case, heavy, metric_value, read_exact_bytes, read_to_eof,
    read_until_closed, rss, wait_until, Server, WAIT,
};
use socket2::{Domain, Socket, Type};

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
        "1500ms",
        "--framing",
        "line",
        "--max-line-bytes",
        "64",
    ]);
    let mut c = server.connect();
    c.set_nodelay(true).unwrap();
    // Phase 1: sixty bytes 50 ms apart (3 s, two idle timeouts' worth) then the
    // newline: the whole line comes back, so the connection stayed open. (Each
    // gap is a thirtieth of the timeout: only a test thread stalled for 1.45 s
    // could make it fail.)
    for _ in 0..60 {
        c.write_all(b"d").unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    c.write_all(b"\n").unwrap();
    let line = ack("d".repeat(60));
    assert_eq!(read_exact_bytes(&mut c, line.len()), line);
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

// ---------------------------------------------------------------- idle and write timeouts

/// Starts the server with `max_pending_write_bytes = 1024` (a config key with no
/// flag) and `flags`.
fn start_with_small_queue(flags: &[&str]) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("small-queue.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = \"127.0.0.1:0\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n\
         [connection]\nmax_pending_write_bytes = 1024\n",
    )
    .unwrap();
    let mut args = vec!["--config", path.to_str().unwrap()];
    args.extend_from_slice(flags);
    Server::start(&args)
}

/// Bytes the server has read and not yet written (echo mode): its queue.
fn owed_bytes(server: &Server) -> f64 {
    let text = server.scrape();
    let get = |series| metric_value(&text, series).unwrap_or(0.0);
    get("sockpool_received_bytes_total") - get("sockpool_sent_bytes_total")
}

/// An echo client that is owed bytes it never reads: a 4 KiB receive buffer and
/// input written until the server holds replies it cannot send (its counters say
/// so). It then sends nothing more.
fn owed_client(server: &Server) -> TcpStream {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.set_recv_buffer_size(4096).unwrap();
    s.connect(&server.addr.into()).unwrap();
    let c: TcpStream = s.into();
    c.set_nonblocking(true).unwrap();
    let chunk = vec![b'o'; 64 << 10];
    let deadline = Instant::now() + WAIT;
    let mut sent = 0usize;
    loop {
        match (&c).write(&chunk) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if owed_bytes(server) > 0.0 {
                    return c;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            // Already closed by a timeout (a stalled test thread can be that
            // slow): it was owed bytes, and the caller checks the reason.
            Err(e)
                if sent > 0
                    && matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset) =>
            {
                return c
            }
            Err(e) => panic!("write failed after {sent} bytes: {e}"),
        }
        assert!(
            Instant::now() < deadline && sent < 1 << 30,
            "the server never owed bytes ({sent} sent)"
        );
    }
}

/// `--write-timeout 0` turned the idle timeout off as well for a client owed
/// bytes: one that then neither read nor sent kept its connection and its queue
/// forever. With no write progress possible and nothing sent, it is idle.
#[test]
fn regression_write_timeout_0_does_not_turn_off_idle_timeout() {
    let server = start_with_small_queue(&[
        "--mode",
        "echo",
        "--write-timeout",
        "0",
        "--idle-timeout",
        "300ms",
    ]);
    let _owed = owed_client(&server);
    server.wait_metric(&closed("idle_timeout"), |v| v == 1.0);
    assert_eq!(server.metric(&closed("write_timeout")), 0.0);
    end_case(&server, 0.0);
}

/// Every combination of the two timeouts, each 0 (off) or not, with one client
/// owed bytes (neither reading nor sending) and one silent client owed nothing:
/// which of them is closed, and for which reason. A timeout that is off never
/// turns the other one off; with both on, the earlier deadline wins.
#[test]
fn every_combination_of_idle_and_write_timeouts() {
    struct Case {
        idle: &'static str,
        write: &'static str,
        /// Closed by the end, by reason: (idle_timeout, write_timeout).
        closed: (f64, f64),
    }
    let cases = [
        // Neither: both stay open.
        Case {
            idle: "0",
            write: "0",
            closed: (0.0, 0.0),
        },
        // Idle only: both are idle (the owed one makes no progress, sends nothing).
        Case {
            idle: "300ms",
            write: "0",
            closed: (2.0, 0.0),
        },
        // Write only: the owed one times out, the silent one stays.
        Case {
            idle: "0",
            write: "300ms",
            closed: (0.0, 1.0),
        },
        // Both, idle first: idle closes both.
        Case {
            idle: "300ms",
            write: "30s",
            closed: (2.0, 0.0),
        },
        // Both, write first: the owed one by write, the silent one by idle.
        Case {
            idle: "2s",
            write: "300ms",
            closed: (1.0, 1.0),
        },
    ];
    for case in cases {
        let what = format!("idle {} write {}", case.idle, case.write);
        let server = start_with_small_queue(&[
            "--mode",
            "echo",
            "--idle-timeout",
            case.idle,
            "--write-timeout",
            case.write,
        ]);
        let owed = owed_client(&server);
        let silent = server.connect();
        let (idle, write) = case.closed;
        server.wait_metric(&closed("idle_timeout"), |v| v == idle);
        server.wait_metric(&closed("write_timeout"), |v| v == write);
        let open = 2.0 - idle - write;
        if open > 0.0 {
            // What no timeout closes stays open: give the others time to act
            // wrongly (a slower machine only waits longer).
            std::thread::sleep(Duration::from_secs(1));
        }
        let text = server.assert_counters_add_up(open);
        assert_eq!(
            (
                metric_value(&text, &closed("idle_timeout")),
                metric_value(&text, &closed("write_timeout"))
            ),
            (Some(idle), Some(write)),
            "{what}\n{text}"
        );
        drop((owed, silent));
        server.assert_counters_add_up(0.0);
    }
}

// ---------------------------------------------------------------- memory

/// One 64 KiB read of `\n` bytes made 19 bytes of reply per byte and all of it
/// was queued: 50 clients that never read (4 KiB receive buffers) and sent
/// 512 KiB of `\n` each grew the server by 44 MB with
/// `max_pending_write_bytes = 1024`. The owed bytes must stay under
/// `max_pending_write_bytes` plus one reply, and the input kept undecoded under
/// `max_pending_write_bytes`, so the growth is a few KiB per connection.
#[test]
fn regression_line_framing_memory_is_bounded_by_max_pending_write_bytes() {
    const CLIENTS: usize = 50;
    const EACH: usize = 512 << 10;
    const PENDING: u64 = 1024;
    const MAX_LINE: u64 = 1024;
    /// Per connection: the queue (one reply past the limit), the kept input, and
    /// room for allocator rounding and the connection's own state.
    const PER_CONN: u64 = (PENDING + MAX_LINE + 20) + PENDING + 4096;
    /// Whole process: allocator arenas, metrics scrapes, stacks touched.
    const SLACK: u64 = 2 << 20;
    let _turn = heavy();
    let server = start_with_small_queue(&[
        "--workers",
        "1",
        "--framing",
        "line",
        "--max-line-bytes",
        "1024",
        "--idle-timeout",
        "0",
        "--write-timeout",
        "0",
    ]);
    assert_served(&server);
    server.scrape();
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
    let clients: Vec<TcpStream> = (0..CLIENTS)
        .map(|_| {
            let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            s.set_recv_buffer_size(4096).unwrap();
            s.connect(&server.addr.into()).unwrap();
            s.into()
        })
        .collect();
    // Each client writes until all is sent or the server stops taking it (a
    // write blocked for a second); none ever reads.
    let writers: Vec<_> = clients
        .iter()
        .map(|c| {
            let mut c = c.try_clone().unwrap();
            std::thread::spawn(move || {
                c.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
                let lines = vec![b'\n'; 64 << 10];
                let mut sent = 0;
                while sent < EACH {
                    match c.write(&lines[..(EACH - sent).min(lines.len())]) {
                        Ok(n) => sent += n,
                        Err(_) => break,
                    }
                }
                sent
            })
        })
        .collect();
    let sent: usize = writers.into_iter().map(|w| w.join().unwrap()).sum();
    // Let the server work through what it took in.
    let mut last = -1.0;
    loop {
        let received = server.metric("sockpool_received_bytes_total");
        if received == last {
            break;
        }
        last = received;
        std::thread::sleep(Duration::from_millis(300));
    }
    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let peak = peak.load(Ordering::Relaxed) as u64;
    let growth = peak.saturating_sub(before);
    let messages = server.metric("sockpool_messages_total");
    eprintln!(
        "{CLIENTS} clients sent {sent} bytes of \\n; server read {last}, answered {messages} lines; \
         RSS +{growth} bytes ({} per connection)",
        growth / CLIENTS as u64
    );
    // Not vacuous: every connection had its queue filled (1024 bytes of replies
    // is 54 lines) before the server stopped reading it.
    assert!(
        messages >= (CLIENTS * 54) as f64,
        "only {messages} lines answered"
    );
    let bound = CLIENTS as u64 * PER_CONN + SLACK;
    assert!(
        growth <= bound,
        "RSS grew {growth} bytes for {CLIENTS} connections (bound {bound})"
    );
    drop(clients);
    end_case(&server, 0.0);
}

/// With the queue full the server stops reading (edge-triggered: no new edge will
/// come for bytes already in the kernel) and keeps the undecoded rest of a read.
/// A client that starts reading late must still get every reply, in order: the
/// server resumes reading and decoding by itself once the queue drains.
#[test]
fn a_client_that_reads_late_gets_every_reply_after_the_queue_filled() {
    const LINES: usize = 1_000_000;
    for mode in [&["--framing", "line"][..], &["--mode", "echo"][..]] {
        let server = start_with_small_queue(mode);
        let echo = mode.contains(&"echo");
        // A 4 KiB receive buffer: the replies (20 MB of acks) cannot all hide in
        // the kernel, so the server's queue fills and it stops reading.
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        s.set_recv_buffer_size(4096).unwrap();
        s.connect(&server.addr.into()).unwrap();
        let c: TcpStream = s.into();
        let mut writer = c.try_clone().unwrap();
        let input: Vec<u8> = (0..LINES)
            .flat_map(|i| format!("{}\n", i % 10).into_bytes())
            .collect();
        let sent = input.clone();
        let t = std::thread::spawn(move || {
            writer.write_all(&sent).unwrap();
            writer.shutdown(std::net::Shutdown::Write).unwrap();
        });
        // Let the server fill its queue and stop reading before we read a byte
        // (how long this takes does not matter: the check is on the bytes).
        wait_until("the server to stop reading", || {
            let got = server.metric("sockpool_received_bytes_total");
            std::thread::sleep(Duration::from_millis(100));
            got > 0.0 && server.metric("sockpool_received_bytes_total") == got
        });
        let mut reader = c;
        reader.set_read_timeout(Some(WAIT)).unwrap();
        let got = read_to_eof(&mut reader);
        t.join().unwrap();
        let want: Vec<u8> = if echo {
            input
        } else {
            (0..LINES)
                .flat_map(|i| ack(format!("{}", i % 10)))
                .collect()
        };
        assert!(
            got == want,
            "{mode:?}: got {} of {} bytes",
            got.len(),
            want.len()
        );
        server.wait_metric(&closed("client_closed"), |v| v == 1.0);
        end_case(&server, 0.0);
    }
}
