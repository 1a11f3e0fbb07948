//! The front: one mio thread that owns every sidecar client socket and
//! enforces the bounds (connections, deadlines, backend slots). What happens on
//! one connection is in `relay`.

use std::io::{self, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use log::{debug, warn};
use mio::net::{TcpStream, UnixStream};
use mio::{Events, Interest, Poll, Token};

use super::relay::{
    drain_client, drain_upstream, read_request, relay, Close, Conn, Phase, RESP_408, RESP_503,
};
use super::{Shared, SidecarOptions, MAX_IN_FLIGHT, WARN_EVERY};
use crate::logging::RateLimit;
use crate::warn_limited;

/// Accepts per loop turn, so a connection flood cannot starve open connections.
const ACCEPT_BATCH: usize = 64;
/// First and largest pause after a failed accept (EMFILE and the like).
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Bytes read from a socket at once (shared by every connection).
const SCRATCH_BYTES: usize = 16 * 1024;

pub(super) const LISTENER: Token = Token(0);
pub(super) const WAKER: Token = Token(1);
/// Client `i` is token `FIRST_CONN + 2i`, its tiny_http socket the next one.
const FIRST_CONN: usize = 2;

/// The front thread's state.
pub(super) struct Front {
    poll: Poll,
    listener: mio::net::TcpListener,
    max_connections: usize,
    request_timeout: Duration,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    active: usize,
    in_flight: usize,
    accept_ready: bool,
    accept_paused_until: Option<Instant>,
    accept_backoff: Duration,
    accept_warn: RateLimit,
    stuck_warn: RateLimit,
    shared: Arc<Shared>,
    stop_rx: Receiver<()>,
    scratch: Vec<u8>,
}

impl Front {
    pub(super) fn new(
        poll: Poll,
        listener: mio::net::TcpListener,
        opts: &SidecarOptions,
        shared: Arc<Shared>,
        stop_rx: Receiver<()>,
    ) -> Front {
        Front {
            poll,
            listener,
            // Zero would let nobody in; one is the least that still serves.
            max_connections: opts.max_connections.max(1),
            request_timeout: opts.request_timeout,
            conns: Vec::new(),
            free: Vec::new(),
            active: 0,
            in_flight: 0,
            accept_ready: true,
            accept_paused_until: None,
            accept_backoff: ACCEPT_BACKOFF_MIN,
            accept_warn: RateLimit::new(1, WARN_EVERY),
            stuck_warn: RateLimit::new(1, WARN_EVERY),
            shared,
            stop_rx,
            scratch: vec![0; SCRATCH_BYTES],
        }
    }

    pub(super) fn run(mut self) {
        let mut events = Events::with_capacity(256);
        let mut poll_backoff = Duration::from_millis(10);
        loop {
            if self.shared.stopping() {
                break;
            }
            self.accept_some();
            self.start_queued();
            let timeout = self.next_timeout();
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // Should not happen; never spin on it.
                warn!("metrics sidecar: poll failed: {e}");
                if let Err(RecvTimeoutError::Disconnected) = self.stop_rx.recv_timeout(poll_backoff)
                {
                    break;
                }
                poll_backoff = (poll_backoff * 2).min(Duration::from_secs(1));
                continue;
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept_ready = true,
                    WAKER => {}
                    Token(t) => {
                        let idx = (t - FIRST_CONN) / 2;
                        self.drive(idx);
                    }
                }
            }
            self.expire();
        }
        let open = self.active;
        // Dropping the connections closes them (and tiny_http's ends see EOF).
        self.conns.clear();
        debug!("metrics sidecar: front stopped, closed {open} connection(s)");
    }

    fn paused(&mut self, now: Instant) -> bool {
        match self.accept_paused_until {
            Some(until) if now < until => true,
            Some(_) => {
                self.accept_paused_until = None;
                false
            }
            None => false,
        }
    }

    fn can_accept(&self) -> bool {
        self.active < self.max_connections || self.oldest_head().is_some()
    }

    fn next_timeout(&mut self) -> Option<Duration> {
        let now = Instant::now();
        if self.accept_ready && !self.paused(now) && self.can_accept() {
            return Some(Duration::ZERO);
        }
        let mut next = self.accept_paused_until;
        for c in self.conns.iter().flatten() {
            if c.phase != Phase::Orphan {
                next = Some(next.map_or(c.deadline, |n| n.min(c.deadline)));
            }
        }
        // Rounded up a millisecond so that the deadline has passed on wake-up.
        next.map(|t| t.saturating_duration_since(now) + Duration::from_millis(1))
    }

    fn oldest_head(&self) -> Option<usize> {
        self.conns
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.as_ref().map(|c| (i, c)))
            .filter(|(_, c)| c.phase == Phase::Head)
            .min_by_key(|(_, c)| c.accepted)
            .map(|(i, _)| i)
    }

    fn accept_some(&mut self) {
        for _ in 0..ACCEPT_BATCH {
            if !self.accept_ready || self.paused(Instant::now()) {
                return;
            }
            if self.active >= self.max_connections {
                // Make room by dropping the oldest client still sending its head;
                // if all hold complete requests, leave newcomers in the backlog.
                match self.oldest_head() {
                    Some(idx) => self.close(idx, Close::Reply(RESP_503, "evicted")),
                    None => return,
                }
            }
            match self.listener.accept() {
                Ok((stream, peer)) => {
                    self.accept_backoff = ACCEPT_BACKOFF_MIN;
                    self.insert(stream, peer);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.accept_ready = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // The client gave up before we got to it: nothing to back off for.
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
                Err(e) => {
                    warn_limited!(
                        self.accept_warn,
                        Instant::now(),
                        "metrics sidecar: accept failed, retrying in {:?}: {e}",
                        self.accept_backoff
                    );
                    self.accept_paused_until = Some(Instant::now() + self.accept_backoff);
                    self.accept_backoff = (self.accept_backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    return;
                }
            }
        }
    }

    fn insert(&mut self, mut client: TcpStream, peer: SocketAddr) {
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                self.conns.push(None);
                self.conns.len() - 1
            }
        };
        if let Err(e) = self.poll.registry().register(
            &mut client,
            Token(FIRST_CONN + 2 * idx),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            debug!("metrics sidecar: cannot register {peer}: {e}");
            self.free.push(idx);
            return;
        }
        let now = Instant::now();
        self.conns[idx] = Some(Conn::new(client, peer, now, now + self.request_timeout));
        self.active += 1;
        self.drive(idx);
    }

    fn close(&mut self, idx: usize, how: Close) {
        let Some(slot) = self.conns.get_mut(idx) else {
            return;
        };
        let Some(conn) = slot.as_mut() else {
            return;
        };
        if let Close::Reply(bytes, why) = how {
            debug!("metrics sidecar: closing {} ({why})", conn.peer);
            // Best effort: a fresh socket's send buffer takes these few bytes.
            let _ = conn.client.write(bytes);
            if conn.phase == Phase::Head {
                // What the client sent after a refused head (a body, say) is
                // read first, so that closing sends a FIN and not a RST that
                // could destroy the answer on its way. Bounded by MAX_DISCARD.
                let _ = drain_client(conn, &mut self.scratch);
            }
        }
        if conn.phase == Phase::Relay && !conn.upstream_eof {
            // tiny_http still holds its end (and a thread) for this request. Keep
            // the slot until it lets go, or MAX_IN_FLIGHT would bound nothing
            // when the backend is stuck (a render closure that blocks).
            let _ = self.poll.registry().deregister(&mut conn.client);
            let _ = conn.client.shutdown(Shutdown::Both);
            if let Some(up) = conn.upstream.as_ref() {
                // tiny_http must not wait for the rest of a request that never comes.
                let _ = up.shutdown(Shutdown::Write);
            }
            conn.phase = Phase::Orphan;
            conn.forget_buffers();
            return;
        }
        let Some(mut conn) = slot.take() else {
            return;
        };
        if matches!(conn.phase, Phase::Relay | Phase::Orphan) {
            self.in_flight = self.in_flight.saturating_sub(1);
        }
        self.active = self.active.saturating_sub(1);
        self.free.push(idx);
        let _ = self.poll.registry().deregister(&mut conn.client);
        if let Some(up) = conn.upstream.as_mut() {
            let _ = self.poll.registry().deregister(up);
        }
        // FIN rather than RST where we can: the answer must not be discarded.
        let _ = conn.client.shutdown(Shutdown::Write);
    }

    fn expire(&mut self) {
        let now = Instant::now();
        for idx in 0..self.conns.len() {
            let (phase, silent, answered, sent) = match &self.conns[idx] {
                Some(c) if c.deadline <= now && c.phase != Phase::Orphan => {
                    (c.phase, c.head.is_empty(), c.got_answer, c.sent_any)
                }
                _ => continue,
            };
            if phase == Phase::Relay && !answered {
                self.check_backend_alive();
                warn_limited!(
                    self.stuck_warn,
                    now,
                    "metrics sidecar: the HTTP backend gave no answer within {:?}; \
                     its slot stays taken until it does",
                    self.request_timeout
                );
            }
            let how = match phase {
                // Never said a word (a browser's preconnect, a port scan): just close.
                Phase::Head if silent => Close::Quiet,
                Phase::Head => Close::Reply(RESP_408, "request timeout"),
                Phase::Queued => Close::Reply(RESP_503, "backend busy"),
                // Nothing out yet: say so. Part of an answer out already:
                // another status line would lie, so just close.
                Phase::Relay if !sent => Close::Reply(RESP_503, "backend too slow"),
                Phase::Relay | Phase::Orphan => Close::Quiet,
            };
            self.close(idx, how);
        }
    }

    /// After a relay went unanswered for a whole timeout: if nobody accepts
    /// on the backend's socket any more, have a handler restart it.
    fn check_backend_alive(&self) {
        let Some(backend) = self.shared.current() else {
            return;
        };
        if backend.accept_stalled() && !backend.dead.swap(true, Ordering::SeqCst) {
            warn!("metrics sidecar: the HTTP backend stopped accepting; restarting it");
            backend.server.unblock();
        }
    }

    fn start_queued(&mut self) {
        if self.in_flight >= MAX_IN_FLIGHT {
            return;
        }
        let mut queued: Vec<(Instant, usize)> = self
            .conns
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.as_ref().map(|c| (i, c)))
            .filter(|(_, c)| c.phase == Phase::Queued)
            .map(|(i, c)| (c.accepted, i))
            .collect();
        queued.sort_unstable();
        for (_, idx) in queued {
            if self.in_flight >= MAX_IN_FLIGHT {
                break;
            }
            self.start_relay(idx);
        }
    }

    fn start_relay(&mut self, idx: usize) {
        let Some(backend) = self.shared.current() else {
            return;
        };
        let mut upstream = match UnixStream::connect(&backend.path) {
            Ok(s) => s,
            Err(e) => {
                debug!("metrics sidecar: backend unreachable: {e}");
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound
                ) && !backend.dead.swap(true, Ordering::SeqCst)
                {
                    // Nobody listens: its accept thread is gone without a word
                    // (it panics when dup() fails under EMFILE). Wake a handler
                    // to start a new one.
                    warn!("metrics sidecar: HTTP backend is gone ({e}); restarting it");
                    backend.server.unblock();
                }
                self.close(idx, Close::Reply(RESP_503, "backend unreachable"));
                return;
            }
        };
        if let Err(e) = self.poll.registry().register(
            &mut upstream,
            Token(FIRST_CONN + 2 * idx + 1),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            debug!("metrics sidecar: cannot register backend socket: {e}");
            self.close(idx, Close::Reply(RESP_503, "backend unreachable"));
            return;
        }
        let timeout = self.request_timeout;
        let Some(Some(conn)) = self.conns.get_mut(idx) else {
            return;
        };
        conn.upstream = Some(upstream);
        conn.phase = Phase::Relay;
        // A fresh allowance for the answer: the head's time was the client's.
        conn.deadline = Instant::now() + timeout;
        self.in_flight += 1;
        self.drive(idx);
    }

    /// Makes every step the connection allows; closes it when done or broken.
    fn drive(&mut self, idx: usize) {
        let Some(Some(conn)) = self.conns.get_mut(idx) else {
            return;
        };
        let step = match conn.phase {
            Phase::Head => read_request(conn, &mut self.scratch),
            Phase::Queued => drain_client(conn, &mut self.scratch),
            Phase::Relay => relay(conn, &mut self.scratch),
            Phase::Orphan => drain_upstream(conn, &mut self.scratch),
        };
        if let Some(how) = step {
            self.close(idx, how);
        } else if let Some(Some(c)) = self.conns.get(idx) {
            if c.phase == Phase::Queued && self.in_flight < MAX_IN_FLIGHT {
                self.start_relay(idx);
            }
        }
    }
}
