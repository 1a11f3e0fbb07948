//! Who may wake the acceptor: the listener's arming in the acceptor's epoll.
//!
//! A connection that completes its handshake wakes whoever waits on the
//! listener. When that is the acceptor and a worker is running on the same core,
//! the wake-up is an inter-processor interrupt from the core that processed the
//! client's ACK, and the acceptor preempts the worker: two context switches for
//! an accept batch of one or two connections. That was most of what short
//! connections cost over a single-threaded event loop (issue 12,
//! `bench/analysis.md`).
//!
//! So the listener is registered `EPOLLONESHOT`. Once it has fired, it stays
//! disarmed while every worker is awake, and the connections that arrive
//! meanwhile wait in the kernel's accept queue, waking nobody. A worker re-arms it
//! when it has nothing left to do and is about to sleep: if connections are
//! waiting, the acceptor wakes on this core at once (no interrupt, no preemption
//! of work) and takes them all in one batch; if none are, the next one wakes the
//! acceptor as before. The acceptor re-arms it itself after a batch when any
//! worker is asleep (a core with time to spare), and while it drains at shutdown;
//! never during an accept-error back-off (its own timer wakes it then).
//!
//! A worker that never sleeps still re-arms it every [`ARM_EVERY_TURNS`] loop
//! turns, so a saturated pool accepts at least that often, as a single-threaded
//! loop accepts once per turn.
//!
//! `armed` says "the listener is armed, or somebody is about to arm it". It may
//! be false while the kernel has it armed (an extra `EPOLL_CTL_MOD` is harmless);
//! it must never be true while it is disarmed and nobody will arm it. The
//! acceptor clears it before each accept batch and then looks at the workers'
//! `parked` flags; a worker sets `parked` before it looks at `armed`. Both are
//! SeqCst, so at least one of them sees the other: either the acceptor sees the
//! worker asleep and arms the listener itself, or the worker sees it disarmed.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use mio::net::TcpListener;
use mio::Registry;
use rustix::event::epoll;

use super::acceptor::LISTENER;

/// Loop turns a worker that never sleeps runs before it re-arms the listener.
pub const ARM_EVERY_TURNS: u32 = 8;

/// The listener's registration in the acceptor's epoll, shared with the workers.
pub struct Gate {
    armed: AtomicBool,
    /// `None` once the acceptor has closed the listener: nobody arms it again.
    fds: Mutex<Option<Fds>>,
}

struct Fds {
    /// The acceptor's epoll (a duplicate: the same epoll instance).
    epoll: Registry,
    /// A duplicate of the listener, the one registered: epoll keys its entries by
    /// descriptor, and this one lives exactly as long as the registration is used.
    listener: OwnedFd,
}

impl Gate {
    /// Registers the listener in the acceptor's epoll, armed.
    pub fn new(acceptor: &Registry, listener: &TcpListener) -> io::Result<Gate> {
        let fds = Fds {
            epoll: acceptor.try_clone()?,
            listener: listener.as_fd().try_clone_to_owned()?,
        };
        epoll::add(&fds.epoll, &fds.listener, data(), flags())?;
        Ok(Gate {
            armed: AtomicBool::new(true),
            fds: Mutex::new(Some(fds)),
        })
    }

    /// The acceptor, before it accepts: the listener may have fired (and so be
    /// disarmed).
    pub fn disarmed(&self) {
        self.armed.store(false, Ordering::SeqCst);
    }

    /// The acceptor, during a back-off: nobody re-arms the listener; the
    /// acceptor's timer wakes it.
    pub fn hold(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }

    /// True when the next worker about to sleep should arm the listener.
    pub fn is_disarmed(&self) -> bool {
        !self.armed.load(Ordering::Relaxed)
    }

    /// Arms the listener unless it is armed or being armed. Called by a worker
    /// that is about to sleep (after marking itself parked), or by the acceptor
    /// when no worker is awake.
    pub fn arm(&self) {
        if self.armed.swap(true, Ordering::SeqCst) {
            return;
        }
        self.rearm();
    }

    /// Arms the listener whatever `armed` says (the acceptor, at shutdown).
    pub fn force_arm(&self) {
        self.armed.store(true, Ordering::SeqCst);
        self.rearm();
    }

    fn rearm(&self) {
        let fds = self.fds.lock().unwrap_or_else(|p| p.into_inner());
        let Some(fds) = fds.as_ref() else {
            return; // closed: nothing to accept any more
        };
        if let Err(e) = epoll::modify(&fds.epoll, &fds.listener, data(), flags()) {
            // Cannot happen while the registration lives; if it did, the acceptor
            // would miss connections until its next wake-up, so say so.
            log::error!("cannot re-arm the listener in the acceptor's epoll: {e}");
        }
    }

    /// The acceptor, closing the listener: drops the duplicate so the socket can
    /// close, and stops every later `arm`.
    pub fn close(&self) {
        self.armed.store(true, Ordering::SeqCst);
        let fds = self.fds.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(fds) = fds {
            let _ = epoll::delete(&fds.epoll, &fds.listener);
        }
    }
}

fn data() -> epoll::EventData {
    epoll::EventData::new_u64(LISTENER.0 as u64)
}

/// Readable (a connection to accept), delivered once per arming.
fn flags() -> epoll::EventFlags {
    epoll::EventFlags::IN | epoll::EventFlags::ONESHOT
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{SocketAddr, TcpStream};
    use std::time::Duration;

    use mio::{Events, Poll};

    /// Long enough for an armed listener with a connection queued to be reported
    /// on any machine; a correct gate never needs it.
    const DELIVERED: Duration = Duration::from_secs(10);
    /// How long a poll waits for an event that must not come. A correct gate never
    /// delivers one, however long this is, so a short wait cannot fail spuriously.
    const NOTHING: Duration = Duration::from_millis(100);

    /// An acceptor's epoll with a gated listener, as `Acceptor` has them.
    fn gated() -> (Poll, TcpListener, Gate, SocketAddr) {
        let poll = Poll::new().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let gate = Gate::new(poll.registry(), &listener).unwrap();
        let addr = listener.local_addr().unwrap();
        (poll, listener, gate, addr)
    }

    /// How many times the listener was reported by one poll (0 or 1: one-shot).
    fn listener_events(poll: &mut Poll, timeout: Duration) -> usize {
        let mut events = Events::with_capacity(8);
        poll.poll(&mut events, Some(timeout)).unwrap();
        events
            .iter()
            .inspect(|e| assert_eq!(e.token(), LISTENER))
            .count()
    }

    #[test]
    fn armed_at_start_fires_once_then_waits_for_arm() {
        let (mut poll, listener, gate, addr) = gated();
        assert!(!gate.is_disarmed());
        let _first = TcpStream::connect(addr).unwrap();
        assert_eq!(listener_events(&mut poll, DELIVERED), 1);
        // The acceptor, woken: the listener has fired and is disarmed.
        gate.disarmed();
        assert!(gate.is_disarmed());
        // Left in the accept queue (a ready listener), plus a new connection: a
        // disarmed listener reports neither.
        let _second = TcpStream::connect(addr).unwrap();
        assert_eq!(listener_events(&mut poll, NOTHING), 0);
        // A worker about to sleep arms it: the queued connections wake the
        // acceptor at once.
        gate.arm();
        assert!(!gate.is_disarmed());
        assert_eq!(listener_events(&mut poll, DELIVERED), 1);
        // It fired again (one-shot) while `armed` still says armed: a second `arm`
        // is no `EPOLL_CTL_MOD`, so the still-ready listener stays silent.
        gate.arm();
        assert_eq!(listener_events(&mut poll, NOTHING), 0);
        // Once the acceptor has cleared `armed`, the next `arm` re-arms it.
        gate.disarmed();
        gate.arm();
        assert_eq!(listener_events(&mut poll, DELIVERED), 1);
        // Accepting everything makes it not ready: armed, it stays silent until
        // the next connection, which it reports.
        gate.disarmed();
        while listener.accept().is_ok() {}
        gate.arm();
        assert_eq!(listener_events(&mut poll, NOTHING), 0);
        let _third = TcpStream::connect(addr).unwrap();
        assert_eq!(listener_events(&mut poll, DELIVERED), 1);
    }

    #[test]
    fn hold_stops_arm_but_not_force_arm() {
        let (mut poll, _listener, gate, addr) = gated();
        let _queued = TcpStream::connect(addr).unwrap();
        assert_eq!(listener_events(&mut poll, DELIVERED), 1);
        gate.disarmed();
        // An accept-error back-off: the acceptor's timer wakes it, not a worker.
        gate.hold();
        assert!(!gate.is_disarmed());
        gate.arm();
        assert_eq!(listener_events(&mut poll, NOTHING), 0);
        // Shutdown: armed whatever `armed` says.
        gate.force_arm();
        assert_eq!(listener_events(&mut poll, DELIVERED), 1);
        // And again, although `armed` is already true.
        gate.force_arm();
        assert_eq!(listener_events(&mut poll, DELIVERED), 1);
    }

    #[test]
    fn close_stops_arming_and_lets_the_listener_close() {
        let (mut poll, listener, gate, addr) = gated();
        let _queued = TcpStream::connect(addr).unwrap();
        assert_eq!(listener_events(&mut poll, DELIVERED), 1);
        gate.disarmed();
        gate.close();
        assert!(gate.fds.lock().unwrap().is_none());
        // The listener is still open and ready, but no longer registered: nothing
        // arms it any more.
        gate.disarmed();
        gate.arm();
        gate.force_arm();
        assert_eq!(listener_events(&mut poll, NOTHING), 0);
        // The gate's duplicate is closed too: once the acceptor drops its own
        // listener, the port refuses connections (the gate is still alive here).
        drop(listener);
        let refused = TcpStream::connect(addr).expect_err("the listener outlived close()");
        assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);
        drop(gate);
    }
}
