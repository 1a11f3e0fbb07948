//! One worker thread: its mio `Poll`, its connections, their timers, and the read
//! buffer they all share.
//!
//! The acceptor pushes connections onto this worker's bounded channel and wakes it
//! through its `Waker`. In return, a worker that runs out of work re-arms the
//! listener in the acceptor's epoll before it sleeps (see `gate`). When the
//! acceptor drops its sender, the channel reports `Disconnected` after the last
//! queued connection: that is the signal to drain, finish within the shutdown
//! grace, and exit.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, TryRecvError};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use super::admission::Permit;
use super::conn::{Conn, Ctx, Limits, Next, ReadHint};
use super::gate::Gate;
use super::Shared;
use crate::metrics::{CloseReason, LocalCounters, RejectReason};
use crate::warn_limited;

/// The token of the worker's `Waker`.
pub const WAKER: Token = Token(usize::MAX);

/// One read's worth: shared by every connection of the worker.
const READ_BUFFER_BYTES: usize = 64 * 1024;

/// Readiness events taken from the kernel per `poll` call.
const EVENTS_PER_POLL: usize = 1024;

/// A connection on its way from the acceptor to a worker.
pub struct Handoff {
    pub stream: mio::net::TcpStream,
    pub peer: SocketAddr,
    /// Its admission: moves into the connection, released when that is dropped.
    pub permit: Permit,
}

/// How the acceptor wakes a worker: a mio `Waker` (an eventfd write), rung only
/// when the worker sleeps in epoll or is about to. A worker that is running
/// takes new connections at the end of its loop turn anyway, so waking it would
/// cost a syscall on each side for nothing.
pub struct Doorbell {
    waker: mio::Waker,
    parked: AtomicBool,
}

impl Doorbell {
    pub fn new(waker: mio::Waker) -> Doorbell {
        Doorbell {
            waker,
            parked: AtomicBool::new(false),
        }
    }

    /// The acceptor, after queueing connections: wakes the worker if it sleeps.
    pub fn ring(&self) -> std::io::Result<()> {
        // With the fence in `park`, this orders the queue push before the load of
        // `parked`: either the worker sees the connection when it looks at its
        // queue after parking, or this sees it parked (both fences are SeqCst).
        fence(Ordering::SeqCst);
        if self.parked.swap(false, Ordering::SeqCst) {
            self.waker.wake()
        } else {
            Ok(())
        }
    }

    /// Wakes the worker whatever it is doing (shutdown).
    pub fn wake(&self) -> std::io::Result<()> {
        self.waker.wake()
    }

    /// The worker, before it looks at its queue one last time and sleeps.
    fn park(&self) {
        self.parked.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
    }

    /// The acceptor, deciding who re-arms the listener (see `gate`).
    pub fn is_parked(&self) -> bool {
        self.parked.load(Ordering::SeqCst)
    }

    fn unpark(&self) {
        self.parked.store(false, Ordering::Relaxed);
    }
}

/// A worker and everything it owns.
pub struct Worker {
    id: usize,
    poll: Poll,
    /// Kept here as well as in the acceptor: closing the eventfd (dropping the
    /// last `Waker`) would remove a wake-up already queued in epoll, and the
    /// acceptor drops its copy right after the final wake.
    doorbell: Arc<Doorbell>,
    /// The listener's arming in the acceptor's epoll (see `gate`).
    gate: Arc<Gate>,
    /// Loop turns since this worker last slept or armed the listener.
    turns_awake: u32,
    rx: Receiver<Handoff>,
    conns: Slab<Conn>,
    buf: Box<[u8]>,
    scratch: Vec<u8>,
    /// Lazy deadline heap: `(deadline, slab key, generation)`. An entry is valid
    /// only if the connection is still there, of that generation, and its
    /// `timer_at` equals the deadline; deadlines that moved later are re-armed
    /// when their old entry comes due, so activity costs no heap operation.
    timers: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    /// Connections to drive again next turn without an event.
    again: Vec<(usize, u64)>,
    next_generation: u64,
    shared: Arc<Shared>,
    limits: Limits,
    /// `server.busy_message`, for a client refused after its PROXY header.
    busy_message: Vec<u8>,
    grace: Duration,
    /// Set once the acceptor has gone: the time by which everything must close.
    drain_deadline: Option<Instant>,
    counters: LocalCounters,
    now: Instant,
}

impl Worker {
    pub fn new(
        id: usize,
        poll: Poll,
        doorbell: Arc<Doorbell>,
        gate: Arc<Gate>,
        rx: Receiver<Handoff>,
        shared: Arc<Shared>,
        config: &crate::config::Config,
    ) -> Worker {
        Worker {
            id,
            poll,
            doorbell,
            gate,
            turns_awake: 0,
            rx,
            conns: Slab::new(),
            buf: vec![0; READ_BUFFER_BYTES].into_boxed_slice(),
            scratch: Vec::new(),
            timers: BinaryHeap::new(),
            again: Vec::new(),
            next_generation: 0,
            shared,
            limits: Limits {
                codec: config.codec(),
                max_pending_write_bytes: config.connection.max_pending_write_bytes,
                idle_timeout: config.connection.idle_timeout,
                write_timeout: config.connection.write_timeout,
            },
            busy_message: config.server.busy_message.clone().into_bytes(),
            grace: config.shutdown.grace,
            drain_deadline: None,
            counters: LocalCounters::default(),
            now: Instant::now(),
        }
    }

    /// The event loop. Returns when drained.
    pub fn run(mut self) {
        let mut events = Events::with_capacity(EVENTS_PER_POLL);
        loop {
            if let Err(e) = self.wait(&mut events) {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    log::error!(
                        "worker-{}: poll failed: {e}; closing its connections",
                        self.id
                    );
                    self.close_all(CloseReason::IoError);
                    return;
                }
            }
            let started = Instant::now();
            self.now = started;
            for event in events.iter() {
                match event.token() {
                    // The wake-up only ended the sleep; the queue is read below.
                    WAKER => {}
                    Token(key) => {
                        let hint = if event.is_read_closed() || event.is_error() {
                            ReadHint::Closed
                        } else if event.is_readable() {
                            ReadHint::Readable
                        } else {
                            ReadHint::Idle
                        };
                        self.drive(key, hint);
                    }
                }
            }
            // Every turn, woken or not: the acceptor rings only a parked worker.
            self.take_handoffs();
            for (key, generation) in std::mem::take(&mut self.again) {
                if self
                    .conns
                    .get(key)
                    .is_some_and(|c| c.generation == generation)
                {
                    self.drive(key, ReadHint::Closed);
                }
            }
            self.expire_timers();
            let done = self.drain_step();
            self.counters.busy += started.elapsed();
            self.shared
                .metrics
                .worker(self.id)
                .flush(&mut self.counters);
            if done {
                return;
            }
        }
    }

    /// Takes the next readiness events, sleeping if there are none. A worker with
    /// nothing left to do re-arms the listener just before it sleeps (see
    /// `gate`). It looks without sleeping first, because a listener armed while
    /// it still has work would let the next connection wake the acceptor and
    /// preempt it. (Skipping the look after a sleep saved an `epoll_wait` per
    /// connection with one client at a time, but under 8 clients it armed the
    /// listener during work so often that sessions cost 14 % more CPU.)
    fn wait(&mut self, events: &mut Events) -> std::io::Result<()> {
        let timeout = self.poll_timeout();
        if self.gate.is_disarmed() {
            if self.turns_awake >= super::gate::ARM_EVERY_TURNS {
                self.gate.arm(); // a saturated worker still lets the acceptor in
            } else if timeout == Some(Duration::ZERO) {
                self.turns_awake += 1;
                return self.poll.poll(events, timeout);
            } else {
                self.poll.poll(events, Some(Duration::ZERO))?;
                if !events.is_empty() {
                    self.turns_awake += 1;
                    return Ok(());
                }
            }
        }
        self.turns_awake = 0;
        if timeout == Some(Duration::ZERO) {
            return self.poll.poll(events, timeout);
        }
        if self.gate.is_disarmed() {
            // Arming wakes the acceptor on this core if connections wait, and it
            // usually runs at once: what it hands over is taken this turn, with
            // no wake-up to ring and no sleep.
            self.gate.arm();
            if !self.rx.is_empty() {
                events.clear();
                return Ok(());
            }
        }
        self.doorbell.park();
        // After `park`: the acceptor either sees this worker asleep and arms the
        // listener itself, or has disarmed it before this looks.
        self.gate.arm();
        // A connection queued before `park` came without a wake-up.
        let timeout = if self.rx.is_empty() {
            timeout
        } else {
            Some(Duration::ZERO)
        };
        let polled = self.poll.poll(events, timeout);
        self.doorbell.unpark();
        polled
    }

    fn poll_timeout(&self) -> Option<Duration> {
        if !self.again.is_empty() {
            return Some(Duration::ZERO);
        }
        let now = Instant::now();
        let timer = self.timers.peek().map(|Reverse((t, _, _))| *t);
        [timer, self.drain_deadline]
            .into_iter()
            .flatten()
            .min()
            .map(|t| t.saturating_duration_since(now))
    }

    /// Registers every connection the acceptor queued; notices the acceptor leaving.
    fn take_handoffs(&mut self) {
        loop {
            match self.rx.try_recv() {
                Ok(h) => self.adopt(h),
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Disconnected) => {
                    if self.drain_deadline.is_none() {
                        log::debug!(
                            "worker-{}: draining {} connections",
                            self.id,
                            self.conns.len()
                        );
                        self.drain_deadline = Some(self.now + self.grace);
                    }
                    return;
                }
            }
        }
    }

    fn adopt(&mut self, h: Handoff) {
        let Handoff {
            mut stream,
            peer,
            permit,
        } = h;
        // TCP_NODELAY needs no call here: accepted sockets inherit it from the
        // listener (see `bind_main`).
        let stats = self.shared.metrics.worker(self.id);
        stats.connection_opened();
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        if let Err(e) = self.poll.registry().register(
            &mut stream,
            Token(key),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            log::warn!("{peer}: cannot register with worker-{}: {e}", self.id);
            let mut permit = permit;
            permit.settle(); // PROXY protocol: accepted, then closed
            stats.connection_closed(CloseReason::IoError, Duration::ZERO);
            return; // dropping the stream and the permit closes and releases it
        }
        self.next_generation += 1;
        let conn = Conn::new(
            stream,
            peer,
            permit,
            self.next_generation,
            self.limits.codec,
            self.now,
        );
        entry.insert(match self.shared.proxy_trusted {
            Some(_) => conn.expect_proxy_header(),
            None => conn,
        });
        log::trace!("{peer}: accepted by worker-{}", self.id);
        // No optimistic first read: it mostly got EAGAIN and cost more syscalls and
        // switches than it saved (issue 12, bench/analysis.md).
        self.arm(key);
    }

    fn drive(&mut self, key: usize, hint: ReadHint) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let mut ctx = Ctx {
            buf: &mut self.buf,
            scratch: &mut self.scratch,
            counters: &mut self.counters,
            limits: &self.limits,
            now: self.now,
        };
        match conn.drive(&mut ctx, hint) {
            Next::Wait => self.arm(key),
            Next::Again => {
                self.again.push((key, conn.generation));
                self.arm(key);
            }
            Next::Close(reason) => self.close(key, reason),
            Next::Reject(reason) => self.refuse(key, reason),
        }
    }

    /// PROXY protocol: the header named a client over a limit. Counted as
    /// rejected by its permit; never accepted, so never closed either.
    fn refuse(&mut self, key: usize, reason: RejectReason) {
        let mut conn = self.conns.remove(key);
        self.shared.metrics.worker(self.id).connection_refused();
        log::debug!(
            "{}: rejected ({}) via={}",
            conn.peer,
            reason.as_str(),
            conn.via.map_or_else(|| "-".to_string(), |v| v.to_string())
        );
        super::proxied::refuse(&mut conn.stream, &mut self.buf, &self.busy_message);
    }

    /// Makes sure the connection's deadline has a timer entry at or before it.
    fn arm(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        if let Some((deadline, _)) = conn.deadline(&self.limits) {
            if conn.timer_at.is_none_or(|t| deadline < t) {
                conn.timer_at = Some(deadline);
                self.timers.push(Reverse((deadline, key, conn.generation)));
            }
        }
    }

    fn expire_timers(&mut self) {
        while let Some(&Reverse((at, key, generation))) = self.timers.peek() {
            if at > self.now {
                return;
            }
            self.timers.pop();
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            if conn.generation != generation || conn.timer_at != Some(at) {
                continue; // stale entry
            }
            conn.timer_at = None;
            match conn.deadline(&self.limits) {
                Some((deadline, reason)) if deadline <= self.now => self.close(key, reason),
                _ => self.arm(key),
            }
        }
    }

    /// While draining: true once every connection is gone (closing the rest when
    /// the grace runs out).
    fn drain_step(&mut self) -> bool {
        let Some(deadline) = self.drain_deadline else {
            return false;
        };
        if !self.conns.is_empty() && self.now >= deadline {
            log::info!(
                "worker-{}: shutdown grace over, closing {} connections",
                self.id,
                self.conns.len()
            );
            self.close_all(CloseReason::ServerShutdown);
        }
        self.conns.is_empty()
    }

    fn close_all(&mut self, reason: CloseReason) {
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.close(key, reason);
        }
    }

    fn close(&mut self, key: usize, reason: CloseReason) {
        let mut conn = self.conns.remove(key);
        // Before the counts: a connection closed before its PROXY header was
        // decided is counted as accepted now.
        let header_note = conn.settle();
        let lifetime = self.now.saturating_duration_since(conn.opened);
        self.shared
            .metrics
            .worker(self.id)
            .connection_closed(reason, lifetime);
        let peer = conn.peer;
        match reason {
            CloseReason::Reset => {
                warn_limited!(
                    self.shared.reset_log,
                    self.now,
                    "{peer}: connection reset by peer"
                );
            }
            CloseReason::ProtocolError if header_note.is_some() => {
                warn_limited!(
                    self.shared.timeout_log,
                    self.now,
                    "{peer}: closed, {}: {}",
                    reason.as_str(),
                    header_note.as_deref().unwrap_or_default()
                );
            }
            CloseReason::IdleTimeout | CloseReason::WriteTimeout | CloseReason::ProtocolError => {
                warn_limited!(
                    self.shared.timeout_log,
                    self.now,
                    "{peer}: closed, {}",
                    reason.as_str()
                );
            }
            _ => {}
        }
        log::debug!(
            "{peer}: closed reason={} in={} out={} owed={} duration={:.3}s{}",
            reason.as_str(),
            conn.bytes_in,
            conn.bytes_out,
            conn.owed(),
            lifetime.as_secs_f64(),
            conn.via.map_or_else(String::new, |v| format!(" via={v}"))
        );
        // Dropping the stream closes the socket, which also removes it from epoll;
        // dropping the permit gives the connection's slot back.
        drop(conn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parking protocol loses no wake-up: a consumer that sleeps in epoll with
    /// no timeout (as a worker with no timers does) sees the last connection of
    /// every burst, pushed while it was busy or asleep. The producer waits for each
    /// burst to be taken, so a lost wake-up leaves both stuck and the wait fails.
    #[test]
    fn doorbell_loses_no_wake_up() {
        const BURSTS: u32 = 20_000;
        let mut poll = Poll::new().unwrap();
        let doorbell = Arc::new(Doorbell::new(
            mio::Waker::new(poll.registry(), WAKER).unwrap(),
        ));
        let (tx, rx) = crossbeam_channel::bounded::<u32>(64);
        let (taken_tx, taken_rx) = crossbeam_channel::unbounded();
        let bell = doorbell.clone();
        let consumer = std::thread::spawn(move || {
            let mut events = Events::with_capacity(8);
            let mut next = 0;
            loop {
                bell.park();
                let timeout = if rx.is_empty() {
                    None
                } else {
                    Some(Duration::ZERO)
                };
                poll.poll(&mut events, timeout).unwrap();
                bell.unpark();
                loop {
                    match rx.try_recv() {
                        Ok(item) => {
                            assert_eq!(item, next);
                            next += 1;
                            taken_tx.send(item).unwrap();
                        }
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => return,
                    }
                }
                // The rest of a worker's loop turn (timers, metrics): the window in
                // which a push finds the consumer running and does not wake it.
                for _ in 0..(next % 7) * 100 {
                    std::hint::spin_loop();
                }
            }
        });
        let mut item = 0;
        for burst in 0..BURSTS {
            for _ in 0..=burst % 3 {
                tx.send(item).unwrap();
                doorbell.ring().unwrap();
                item += 1;
            }
            loop {
                match taken_rx.recv_timeout(Duration::from_secs(20)) {
                    Ok(taken) if taken == item - 1 => break,
                    Ok(_) => {}
                    Err(_) => panic!("burst {burst}: its last item was never taken"),
                }
            }
        }
        drop(tx);
        doorbell.wake().unwrap();
        consumer.join().unwrap();
    }
}
