//! One load thread: a mio readiness loop driving many connections at once.
//!
//! Each connection keeps `depth` requests outstanding. Expected replies are appended
//! to `expect` as requests are queued, and every byte read is compared against it, so
//! verification is one slice comparison per read. Sockets are registered once for
//! both readiness kinds (edge-triggered), which saves an `epoll_ctl` per write.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use super::workload::Workload;
use crate::logging::escape;

/// How often stalled connections are looked for.
const STALL_CHECK_EVERY: Duration = Duration::from_millis(100);
/// Longest wait for replies still in flight when the run ends.
const DRAIN_GRACE: Duration = Duration::from_secs(1);
/// Per-thread read buffer: one 64 KiB read takes a bulk reply in one call.
const READ_BUF: usize = 64 * 1024;
/// Compact the expected-bytes buffer once this much of it has been consumed.
const COMPACT_AFTER: usize = 64 * 1024;
/// Bytes of a mismatching reply shown in the error.
const SHOW_BYTES: usize = 48;

/// What every load thread of a run shares (read-only).
#[derive(Debug)]
pub struct Plan {
    pub addr: SocketAddr,
    pub workload: Workload,
    /// Requests kept outstanding per connection (1 = ping-pong).
    pub depth: usize,
    /// A fresh connection per `messages_per_connection` messages.
    pub churn: bool,
    /// Churn: ping-pong messages per connection before it is closed (at least 1).
    pub messages_per_connection: u64,
    /// Replies completed before this are warm-up: verified, not counted.
    pub measure_start: Instant,
    /// No request is sent after this; replies after it are verified, not counted.
    pub end: Instant,
    /// A request unanswered (or a connect unfinished) this long fails its connection.
    pub reply_timeout: Duration,
    /// Churn: connections each thread may open at most (TIME_WAIT stays bounded),
    /// by thread index.
    pub churn_limits: Vec<u64>,
    /// Churn: of those, how many each thread may open before `measure_start`. Less
    /// than its limit, so that a limit reached during the warm-up still leaves
    /// connections for the measured window.
    pub churn_warmup_limits: Vec<u64>,
    /// Churn: number of threads, so each thread takes its own source addresses.
    pub threads: usize,
    /// `--proxy-header`: a PROXY header with the connection's own addresses goes
    /// out first, with its first request (as a balancer sends it).
    pub proxy_header: Option<super::workload::ProxyVersion>,
}

/// What one load thread measured.
pub struct ThreadReport {
    /// Latency of measured messages, nanoseconds.
    pub hist: Histogram<u64>,
    pub messages: u64,
    pub errors: u64,
    pub mismatches: u64,
    pub first_error: Option<String>,
    pub first_mismatch: Option<String>,
    pub connections_opened: u64,
    /// Churn: this thread opened all the connections it was allowed.
    pub churn_limit_reached: bool,
}

impl ThreadReport {
    fn error(&mut self, what: String) {
        self.errors += 1;
        self.first_error.get_or_insert(what);
    }
}

/// A new latency histogram: 1 ns to 1 hour, 3 significant digits.
pub fn new_histogram() -> io::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3)
        .map_err(|e| io::Error::other(format!("histogram: {e:?}")))
}

/// A request on the wire, waiting for its reply.
struct Inflight {
    sent: Instant,
    /// Offset in `Conn::expect` where this reply ends.
    end: usize,
}

struct Conn {
    stream: TcpStream,
    /// Mixed into payloads, so connections cannot be confused for each other.
    id: u64,
    next_seq: u64,
    out: Vec<u8>,
    out_pos: usize,
    expect: Vec<u8>,
    expect_pos: usize,
    inflight: VecDeque<Inflight>,
    /// Churn: connect not yet confirmed.
    connecting: bool,
    /// Churn: when the connect started (the first message's latency covers
    /// connect + reply; later ones are measured from their send, as in ping-pong).
    started: Instant,
}

/// Why a connection ended early.
enum ConnEnd {
    Error(String),
    Mismatch(String),
}

impl Conn {
    fn new(stream: TcpStream, id: u64, now: Instant, connecting: bool) -> Conn {
        Conn {
            stream,
            id,
            next_seq: 0,
            out: Vec::new(),
            out_pos: 0,
            expect: Vec::new(),
            expect_pos: 0,
            inflight: VecDeque::new(),
            connecting,
            started: now,
        }
    }

    fn queue(&mut self, workload: &Workload, now: Instant) {
        let seq = self.next_seq;
        self.next_seq += 1;
        workload.push_request(self.id, seq, &mut self.out);
        workload.push_reply(self.id, seq, &mut self.expect);
        self.inflight.push_back(Inflight {
            sent: now,
            end: self.expect.len(),
        });
    }

    /// Writes queued bytes until done or the socket is full.
    fn flush(&mut self) -> Result<(), ConnEnd> {
        while self.out_pos < self.out.len() {
            match self.stream.write(&self.out[self.out_pos..]) {
                Ok(0) => return Err(ConnEnd::Error("write returned 0 bytes".into())),
                Ok(n) => self.out_pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ConnEnd::Error(format!("write: {e}"))),
            }
        }
        self.out.clear();
        self.out_pos = 0;
        Ok(())
    }

    /// Reads what is there, checks it byte for byte, and returns the send times of
    /// the requests whose replies are now complete (appended to `done`).
    fn read(&mut self, buf: &mut [u8], done: &mut Vec<Instant>) -> Result<(), ConnEnd> {
        loop {
            match self.stream.read(buf) {
                Ok(0) => {
                    return Err(ConnEnd::Error(format!(
                        "server closed the connection with {} replies owed",
                        self.inflight.len()
                    )))
                }
                Ok(n) => {
                    self.check(&buf[..n])?;
                    while let Some(front) = self.inflight.front() {
                        if front.end > self.expect_pos {
                            break;
                        }
                        done.push(front.sent);
                        self.inflight.pop_front();
                    }
                    self.compact();
                    // A short read emptied the socket buffer: with edge-triggered
                    // readiness the next byte brings a new event, so the extra read
                    // that would return EAGAIN is skipped.
                    if n < buf.len() {
                        return Ok(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ConnEnd::Error(format!("read: {e}"))),
            }
        }
    }

    fn check(&mut self, got: &[u8]) -> Result<(), ConnEnd> {
        let want = &self.expect[self.expect_pos..];
        let common = got.len().min(want.len());
        if got[..common] != want[..common] {
            let at = got.iter().zip(want).take_while(|(a, b)| a == b).count();
            return Err(ConnEnd::Mismatch(format!(
                "connection {}: reply differs at byte {} of what was owed: expected {}, got {}",
                self.id,
                at,
                escape(&want[at..], SHOW_BYTES),
                escape(&got[at..], SHOW_BYTES)
            )));
        }
        if got.len() > want.len() {
            return Err(ConnEnd::Mismatch(format!(
                "connection {}: {} unexpected bytes after the owed replies: {}",
                self.id,
                got.len() - want.len(),
                escape(&got[want.len()..], SHOW_BYTES)
            )));
        }
        self.expect_pos += got.len();
        Ok(())
    }

    fn compact(&mut self) {
        if self.expect_pos == self.expect.len() {
            self.expect.clear();
            self.expect_pos = 0;
        } else if self.expect_pos >= COMPACT_AFTER {
            self.expect.drain(..self.expect_pos);
            for msg in &mut self.inflight {
                msg.end -= self.expect_pos;
            }
            self.expect_pos = 0;
        }
    }

    /// Churn: whether the non-blocking connect finished (`Ok(true)`), is pending, or failed.
    fn connect_done(&mut self) -> Result<bool, ConnEnd> {
        match self.stream.take_error() {
            Ok(None) => {}
            Ok(Some(e)) | Err(e) => return Err(ConnEnd::Error(format!("connect: {e}"))),
        }
        match self.stream.peer_addr() {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
            Err(e) => Err(ConnEnd::Error(format!("connect: {e}"))),
        }
    }
}

/// Churn source address number `n`: 127.0.1.1 upwards, each a fresh 28k-port range,
/// so TIME_WAIT sockets (left on our side: we close first) never exhaust one address.
fn churn_source(n: u64) -> Ipv4Addr {
    let idx = n % (254 * 255);
    Ipv4Addr::new(127, 0, 1 + (idx / 254) as u8, 1 + (idx % 254) as u8)
}

/// Starts a non-blocking connect, bound to a rotating loopback source address when
/// the target is IPv4 loopback.
fn start_connect(addr: SocketAddr, source: u64) -> io::Result<TcpStream> {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    if let IpAddr::V4(ip) = addr.ip() {
        if ip.is_loopback() {
            socket.bind(&SockAddr::from(SocketAddr::new(
                churn_source(source).into(),
                0,
            )))?;
        }
    }
    match socket.connect(&SockAddr::from(addr)) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INPROGRESS.raw_os_error()) => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(socket.into()))
}

/// The state of one thread's loop.
struct Driver<'a> {
    plan: &'a Plan,
    poll: Poll,
    conns: Vec<Option<Conn>>,
    report: ThreadReport,
    completed: &'a AtomicU64,
    thread_index: usize,
    /// Churn: slots left empty because the warm-up's share of the limit was used
    /// up; they are opened when the measured window starts.
    parked: Vec<usize>,
}

impl Driver<'_> {
    fn fail(&mut self, slot: usize, end: ConnEnd) {
        if let Some(mut conn) = self.conns[slot].take() {
            // Deregistering cannot meaningfully fail here; the socket closes on drop.
            let _ = self.poll.registry().deregister(&mut conn.stream);
        }
        match end {
            ConnEnd::Error(e) => self.report.error(e),
            ConnEnd::Mismatch(m) => {
                self.report.mismatches += 1;
                self.report.first_mismatch.get_or_insert(m);
            }
        }
    }

    /// Churn: opens the next connection in `slot`, or leaves it empty when done
    /// (parked until the measured window if only the warm-up's share is used up).
    fn open_churn(&mut self, slot: usize, now: Instant) {
        let opened = self.report.connections_opened;
        if now >= self.plan.end {
            return;
        }
        if opened >= self.plan.churn_limits[self.thread_index] {
            self.report.churn_limit_reached = true;
            return;
        }
        if now < self.plan.measure_start
            && opened >= self.plan.churn_warmup_limits[self.thread_index]
        {
            self.parked.push(slot);
            return;
        }
        let n =
            self.report.connections_opened * self.plan.threads as u64 + self.thread_index as u64;
        self.report.connections_opened += 1;
        let mut stream = match start_connect(self.plan.addr, n) {
            Ok(s) => s,
            Err(e) => {
                return self
                    .report
                    .error(format!("connect to {}: {e}", self.plan.addr))
            }
        };
        if let Err(e) = self.poll.registry().register(
            &mut stream,
            Token(slot),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            return self.report.error(format!("register: {e}"));
        }
        let mut conn = Conn::new(stream, n, now, true);
        if let Some(version) = self.plan.proxy_header {
            // The source port is bound before the connect completes.
            match conn.stream.local_addr() {
                Ok(local) => conn.out.extend_from_slice(&super::workload::proxy_header(
                    version,
                    local,
                    self.plan.addr,
                )),
                Err(e) => return self.report.error(format!("local address: {e}")),
            }
        }
        conn.queue(&self.plan.workload, now);
        self.conns[slot] = Some(conn);
    }

    /// Handles readiness of `slot` (or a freshly added connection).
    fn service(&mut self, slot: usize, now: Instant, buf: &mut [u8], done: &mut Vec<Instant>) {
        let plan = self.plan;
        let Some(conn) = self.conns[slot].as_mut() else {
            return;
        };
        if conn.connecting {
            match conn.connect_done() {
                Ok(true) => conn.connecting = false,
                Ok(false) => return,
                Err(e) => return self.fail(slot, e),
            }
        }
        done.clear();
        if let Err(e) = conn.read(buf, done) {
            return self.fail(slot, e);
        }
        let measuring = now >= plan.measure_start && now <= plan.end;
        // Churn: the replies completed so far on this connection, before this read.
        let answered_before = conn.next_seq - (conn.inflight.len() + done.len()) as u64;
        for (i, sent) in done.iter().enumerate() {
            let first = answered_before + i as u64 == 0;
            let start = if plan.churn && first {
                conn.started
            } else {
                *sent
            };
            if measuring {
                self.report.messages += 1;
                let nanos = u64::try_from(now.duration_since(start).as_nanos()).unwrap_or(u64::MAX);
                self.report.hist.saturating_record(nanos.max(1));
            }
        }
        if plan.churn {
            if !done.is_empty() && conn.inflight.is_empty() {
                if conn.next_seq >= plan.messages_per_connection || now >= plan.end {
                    // The session is over: close it (we close first, so the
                    // TIME_WAIT stays on our side) and open the next.
                    if let Some(mut conn) = self.conns[slot].take() {
                        let _ = self.poll.registry().deregister(&mut conn.stream);
                    }
                    return self.open_churn(slot, now);
                }
                // Ping-pong: the next message of the session.
                conn.queue(&plan.workload, now);
            }
        } else if now < plan.end {
            while conn.inflight.len() < plan.depth {
                conn.queue(&plan.workload, now);
            }
        }
        if let Err(e) = conn.flush() {
            self.fail(slot, e);
        }
    }

    fn check_stalls(&mut self, now: Instant) {
        for slot in 0..self.conns.len() {
            let Some(conn) = &self.conns[slot] else {
                continue;
            };
            let since = if conn.connecting {
                Some(conn.started)
            } else {
                conn.inflight.front().map(|m| m.sent)
            };
            if let Some(since) = since {
                if now.duration_since(since) > self.plan.reply_timeout {
                    let what = if conn.connecting { "connect" } else { "reply" };
                    let msg = format!(
                        "no {what} from {} within {:?}",
                        self.plan.addr, self.plan.reply_timeout
                    );
                    self.fail(slot, ConnEnd::Error(msg));
                }
            }
        }
    }

    fn idle(&self) -> bool {
        self.conns.iter().flatten().all(|c| c.inflight.is_empty())
    }
}

/// Runs one load thread until the plan's end (plus a short drain), over `streams`
/// (already connected) or, with churn, over `churn_slots` concurrent connections.
pub fn run(
    plan: &Plan,
    thread_index: usize,
    streams: Vec<(u64, std::net::TcpStream)>,
    churn_slots: usize,
    completed: &AtomicU64,
) -> io::Result<ThreadReport> {
    let poll = Poll::new()?;
    let mut driver = Driver {
        plan,
        poll,
        conns: Vec::new(),
        report: ThreadReport {
            hist: new_histogram()?,
            messages: 0,
            errors: 0,
            mismatches: 0,
            first_error: None,
            first_mismatch: None,
            connections_opened: 0,
            churn_limit_reached: false,
        },
        completed,
        thread_index,
        parked: Vec::new(),
    };
    let now = Instant::now();
    for (id, stream) in streams {
        stream.set_nonblocking(true)?;
        let mut stream = TcpStream::from_std(stream);
        let slot = driver.conns.len();
        driver.poll.registry().register(
            &mut stream,
            Token(slot),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        driver.conns.push(Some(Conn::new(stream, id, now, false)));
        driver.report.connections_opened += 1;
    }
    for slot in 0..churn_slots {
        driver.conns.push(None);
        driver.open_churn(slot, now);
    }
    let mut buf = vec![0u8; READ_BUF];
    let mut done = Vec::new();
    if !plan.churn {
        for slot in 0..driver.conns.len() {
            driver.service(slot, now, &mut buf, &mut done);
        }
    }
    let mut events = Events::with_capacity(1024);
    let mut next_stall_check = now + STALL_CHECK_EVERY;
    let mut reported = 0;
    let drain_until = plan.end + DRAIN_GRACE.min(plan.reply_timeout);
    loop {
        let now = Instant::now();
        if now >= plan.measure_start && !driver.parked.is_empty() {
            for slot in std::mem::take(&mut driver.parked) {
                driver.open_churn(slot, now);
            }
        }
        // Churn slots are reopened at once unless the run is over, the slot failed
        // (a server that refuses would otherwise make us spin on failing connects),
        // or it waits for the measured window; so no live connection and none
        // waiting means nothing more can happen.
        if driver.conns.iter().all(Option::is_none) && driver.parked.is_empty() {
            break;
        }
        if now >= plan.end && (driver.idle() || now >= drain_until) {
            break;
        }
        let phase_edge = if !driver.parked.is_empty() {
            plan.measure_start
        } else if now < plan.end {
            plan.end
        } else {
            drain_until
        };
        let wait = phase_edge
            .min(next_stall_check)
            .saturating_duration_since(now);
        if let Err(e) = driver.poll.poll(&mut events, Some(wait)) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let now = Instant::now();
        for event in events.iter() {
            driver.service(event.token().0, now, &mut buf, &mut done);
        }
        // The progress counter is shared between threads: touched once per wake-up,
        // not once per message.
        driver
            .completed
            .fetch_add(driver.report.messages - reported, Ordering::Relaxed);
        reported = driver.report.messages;
        if now >= next_stall_check {
            driver.check_stalls(now);
            next_stall_check = now + STALL_CHECK_EVERY;
        }
    }
    Ok(driver.report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn churn_sources_stay_in_loopback_and_avoid_127_0_0_x() {
        for n in [0u64, 1, 253, 254, 255, 254 * 255 - 1, 254 * 255, u64::MAX] {
            let ip = churn_source(n);
            assert!(ip.is_loopback(), "{ip}");
            assert_ne!(ip.octets()[2], 0, "{ip}");
            assert_ne!(ip.octets()[3], 0, "{ip}");
            assert_ne!(ip.octets()[3], 255, "{ip}");
        }
        assert_ne!(churn_source(0), churn_source(1));
    }
}
