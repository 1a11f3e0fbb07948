//! The accept thread: accept, apply the limits, pick a worker, hand off, wake it.
//!
//! Like memcached's dispatcher: the least-loaded worker gets the connection
//! (round-robin among equals) and it travels over that worker's bounded channel.
//! A worker asleep in epoll is woken once per accept batch, not once per
//! connection; a running one is not woken at all, as it reads its queue at the
//! end of every loop turn (see `worker::Doorbell`). The acceptor itself is woken
//! by the listener only when a worker has time to spare: while every worker is
//! busy the listener stays disarmed and the first worker about to sleep re-arms
//! it (see `gate`), so accept batches are taken in the workers' idle time instead
//! of preempting them. Accept errors such as EMFILE back off exponentially
//! instead of spinning.
//!
//! Shutdown: after the trigger it goes on accepting for `shutdown.drain_delay`;
//! then it stops new handshakes, accepts every connection that completed one, and
//! only then closes the listener, so that no client that connected is reset (see
//! [`Acceptor::close_listener`]).

use std::io::{self, Write};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Sender, TrySendError};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Poll, Token};

use super::gate::Gate;
use super::listen;
use super::worker::{Doorbell, Handoff};
use super::Shared;
use crate::logging::RateLimit;
use crate::metrics::RejectReason;
use crate::warn_limited;

pub const LISTENER: Token = Token(0);
pub const WAKER: Token = Token(1);

/// Connections accepted before the workers that got them are woken.
const WAKE_BATCH: usize = 64;

/// First and longest pause after an accept error.
const BACKOFF_MIN: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The acceptor's end of one worker.
pub struct WorkerLink {
    pub tx: Sender<Handoff>,
    pub doorbell: Arc<Doorbell>,
}

/// The accept thread's state.
pub struct Acceptor {
    pub poll: Poll,
    /// Closed (dropped) after the drain delay and a final accept, so new clients
    /// are refused and queued ones are served.
    pub listener: TcpListener,
    /// Dropped when the acceptor exits: each worker then sees `Disconnected`.
    pub workers: Vec<WorkerLink>,
    pub shared: Arc<Shared>,
    pub busy_message: Vec<u8>,
    /// The listener's arming, shared with the workers (see `gate`).
    gate: Arc<Gate>,
    /// Set at the trigger: from then on the acceptor keeps the listener armed.
    draining: bool,
    next: usize,
    backoff: Option<Duration>,
    to_wake: Vec<bool>,
    error_log: RateLimit,
}

impl Acceptor {
    pub fn new(
        poll: Poll,
        listener: TcpListener,
        gate: Arc<Gate>,
        workers: Vec<WorkerLink>,
        shared: Arc<Shared>,
        busy_message: Vec<u8>,
    ) -> Acceptor {
        let n = workers.len();
        Acceptor {
            poll,
            listener,
            workers,
            shared,
            busy_message,
            gate,
            draining: false,
            next: 0,
            backoff: None,
            to_wake: vec![false; n],
            error_log: RateLimit::new(5, Duration::from_secs(10)),
        }
    }

    /// Accepts until shutdown is requested and its drain delay has passed, then
    /// closes the listener and releases the workers.
    pub fn run(mut self) {
        let mut events = Events::with_capacity(16);
        let mut close_at: Option<Instant> = None;
        loop {
            if close_at.is_none() && self.shared.stopping.load(Ordering::Acquire) {
                let delay = self.shared.drain_delay;
                if !delay.is_zero() {
                    log::info!(
                        "not ready; still accepting for {} (shutdown.drain_delay)",
                        crate::config::format_duration(delay)
                    );
                }
                close_at = Some(Instant::now() + delay);
                // Draining: accept promptly, whoever is awake.
                self.draining = true;
                self.gate.force_arm();
            }
            let timeout = match close_at {
                Some(at) => {
                    let left = at.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    Some(self.backoff.map_or(left, |b| b.min(left)))
                }
                None => self.backoff,
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    log::error!("acceptor: poll failed: {e}; stopping");
                    break;
                }
            }
            // Woken by the trigger: start the drain delay's clock at the top.
            if close_at.is_none() && self.shared.stopping.load(Ordering::Acquire) {
                continue;
            }
            self.accept_batch();
        }
        self.close_listener();
        let Acceptor {
            listener,
            workers,
            gate,
            ..
        } = self;
        gate.close(); // its duplicate of the listener too
        drop(listener);
        log::info!("stopped accepting; draining connections");
        for w in workers {
            drop(w.tx);
            let _ = w.doorbell.wake();
        }
    }

    /// Closes the listener without resetting anyone who completed a handshake:
    /// new handshakes are stopped first (a SYN-dropping socket filter), the ones
    /// under way are given time to complete while the queue is accepted, and the
    /// queue is accepted once more until it is empty; only then is it closed.
    /// The connections accepted here are served like any other (never sent the
    /// busy message for shutting down). A listener inherited from systemd is only
    /// let go: it outlives us, and the next instance accepts what is queued.
    fn close_listener(&mut self) {
        if self.shared.listener_inherited {
            return; // dropped with `self`: systemd still holds the socket
        }
        let started = Instant::now();
        if let Err(e) = listen::refuse_new_handshakes(&self.listener) {
            // Fall back to "accept until WouldBlock, then close", which can still
            // reset a handshake that completes in between.
            log::warn!("cannot stop new handshakes before closing the listener: {e}");
            self.accept_batch();
            return;
        }
        let port = self.listener.local_addr().map_or(0, |a| a.port());
        let mut events = Events::with_capacity(16);
        loop {
            self.accept_batch();
            let waited = started.elapsed();
            if waited >= listen::HANDSHAKE_SETTLE {
                let in_flight = listen::handshakes_in_flight(port);
                if in_flight != Some(0) {
                    log::debug!("handshakes under way after {waited:?}: {in_flight:?}");
                }
                match in_flight {
                    Some(0) => break,
                    None if waited >= listen::HANDSHAKE_SETTLE * 5 => break,
                    _ if waited >= listen::HANDSHAKE_WAIT_MAX => {
                        log::warn!(
                            "closing the listener with handshakes still under way after {waited:?}"
                        );
                        break;
                    }
                    _ => {}
                }
            }
            // Woken by a connection to accept, or every few ms to look again.
            let _ = self.poll.poll(&mut events, Some(Duration::from_millis(5)));
        }
        self.accept_batch();
        log::debug!(
            "listener closed after {:?} of final accepts",
            started.elapsed()
        );
    }

    fn accept_batch(&mut self) {
        // The listener may have fired, which disarmed it (see `gate`).
        self.gate.disarmed();
        let mut handed = 0;
        loop {
            match self.listener.accept() {
                Ok((stream, peer)) => {
                    self.backoff = None;
                    self.dispatch(stream, peer);
                    handed += 1;
                    if handed % WAKE_BATCH == 0 {
                        self.wake_workers();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // The queue is empty: whatever failed before has nothing left
                    // to fail on, so the listener wakes us again (not the timer).
                    self.backoff = None;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if super::conn::is_reset(&e) => self.shared.metrics.accept_reset(),
                Err(e) => {
                    // EMFILE, ENFILE, ENOBUFS, ENOMEM...: the connection stays in
                    // the backlog. Wait and retry rather than spin on the error.
                    self.shared.metrics.accept_error();
                    let pause = self
                        .backoff
                        .map_or(BACKOFF_MIN, |b| (b * 2).min(BACKOFF_MAX));
                    self.backoff = Some(pause);
                    warn_limited!(
                        self.error_log,
                        Instant::now(),
                        "accept failed: {e}; retrying in {pause:?}"
                    );
                    break;
                }
            }
        }
        self.wake_workers();
        self.hand_back_listener();
    }

    /// After a batch: who arms the listener next (see `gate`). While every worker
    /// is awake (the ones just woken for this batch count as awake) it is left
    /// disarmed, for the first one about to sleep to arm. A worker asleep means a
    /// core with time to spare, so then the acceptor arms it at once.
    fn hand_back_listener(&self) {
        if self.backoff.is_some() {
            self.gate.hold(); // the back-off timer wakes us, not the listener
        } else if self.draining || self.workers.iter().any(|w| w.doorbell.is_parked()) {
            self.gate.arm();
        }
    }

    fn wake_workers(&mut self) {
        for (i, flag) in self.to_wake.iter_mut().enumerate() {
            if std::mem::take(flag) {
                if let Err(e) = self.workers[i].doorbell.ring() {
                    log::error!("acceptor: cannot wake worker-{i}: {e}");
                }
            }
        }
    }

    fn dispatch(&mut self, stream: TcpStream, peer: SocketAddr) {
        let shared = self.shared.clone();
        // No check of `stopping` here: every connection accepted before the
        // listener closes is served (the drain delay and the final accepts).
        let permit = match &shared.proxy_trusted {
            None => shared.admission.admit(peer.ip()),
            // PROXY protocol: the per-IP limit waits for the header's address.
            Some(trusted) => match super::proxied::admit(trusted, &shared.admission, peer) {
                Ok(permit) => Ok(permit),
                Err(RejectReason::UntrustedProxy) => {
                    return super::proxied::reject_untrusted(&shared.metrics, stream, peer)
                }
                Err(reason) => Err(reason),
            },
        };
        let permit = match permit {
            Ok(permit) => permit,
            Err(reason) => return self.reject(stream, peer, reason),
        };
        // A pending permit is counted (accepted or rejected) when its header is.
        let count = !permit.pending();
        let first = self.pick_worker();
        let mut handoff = Handoff {
            stream,
            peer,
            permit,
        };
        // Try the chosen worker, then the others; if every queue is full, wait on
        // the chosen one: that is backpressure into the kernel's backlog.
        for k in 0..self.workers.len() {
            let i = (first + k) % self.workers.len();
            match self.workers[i].tx.try_send(handoff) {
                Ok(()) => return self.handed(i, count),
                Err(TrySendError::Full(h)) | Err(TrySendError::Disconnected(h)) => handoff = h,
            }
        }
        self.wake_workers();
        match self.workers[first].tx.send(handoff) {
            Ok(()) => self.handed(first, count),
            // Dropping the hand-off closes the socket and releases its permit.
            Err(lost) => log::error!("{}: worker-{first} is gone; closing", lost.0.peer),
        }
    }

    fn handed(&mut self, worker: usize, count: bool) {
        self.to_wake[worker] = true;
        if count {
            self.shared.metrics.accepted();
        }
    }

    /// The worker with the fewest connections (queued ones included), starting the
    /// scan after the last pick so that ties go round-robin.
    fn pick_worker(&mut self) -> usize {
        let n = self.workers.len();
        let load = |i: usize| {
            self.shared.metrics.worker(i).connections() as usize + self.workers[i].tx.len()
        };
        let best = (0..n)
            .map(|k| (self.next + k) % n)
            .min_by_key(|&i| load(i))
            .unwrap_or(0);
        self.next = (best + 1) % n;
        best
    }

    fn reject(&mut self, mut stream: TcpStream, peer: SocketAddr, reason: RejectReason) {
        self.shared.metrics.rejected(reason);
        log::debug!("{peer}: rejected ({})", reason.as_str());
        if !self.busy_message.is_empty() {
            // Best effort: a fresh socket's send buffer takes a short message.
            let _ = stream.write(&self.busy_message);
        }
        let _ = stream.shutdown(std::net::Shutdown::Write);
    }
}
