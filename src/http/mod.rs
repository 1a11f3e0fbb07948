//! The metrics sidecar: tiny_http behind a bounded front door.
//!
//! tiny_http 0.12 cannot face the network on its own: its accept thread quits on
//! the first accept error, it spawns a thread per open connection without bound,
//! it has no timeouts and no header-size limit, and its parser reads a head
//! differently from others (it splits lines on `\r\n` only). So it never sees a
//! client socket, nor a client's bytes. The layout, one file per job:
//!
//! ```text
//!  TCP clients ──> [metrics-http]  front.rs: one mio loop, owns every client socket;
//!                      │  at most `max_connections` clients, a deadline each,
//!                      │  head <= 16 KiB parsed strictly (request.rs), one request
//!                      │  per connection, at most MAX_IN_FLIGHT relayed at once
//!                      v  a fresh canonical request, never the client's bytes
//!           Unix socket in a private 0700 directory
//!                      v
//!  tiny_http Server [metrics-backend]  backend.rs: its accept thread + task pool
//!                      │  (4 idle, + one per open backend connection: <= MAX_IN_FLIGHT);
//!                      v  restarted when it dies or its socket vanishes
//!  [metrics-resp-0], [metrics-resp-1]  routes.rs: recv() a request, route it, respond
//! ```
//!
//! The front reads a request head, checks it with [`request::parse`] (a bare LF,
//! obs-fold, a NUL, a duplicate Content-Length, Transfer-Encoding or a body get a
//! 400), writes [`request::Request::canonical`] to tiny_http, half-closes that
//! socket, relays the answer back with `Connection: close` added, and closes.
//! Bytes after the head are read and dropped. Over `max_connections`, the oldest
//! connection still sending its request head is closed to make room (a
//! slowloris cannot lock scrapes out); if every slot has a complete request, new
//! connections wait in the kernel backlog until one finishes.
//!
//! Why a path socket and not the Linux abstract namespace: tiny_http's `Drop`
//! unwraps `as_pathname()`, which panics for abstract addresses; and a 0700
//! directory keeps other local users from reaching tiny_http around the bounds.

mod backend;
mod front;
mod relay;
pub mod request;
mod routes;

use std::fmt;
use std::fs;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use log::{error, warn};
use mio::{Interest, Poll, Waker};

use backend::{handler_loop, private_dir, Backend};
use front::{Front, LISTENER, WAKER};

pub use request::{MAX_HEADERS, MAX_HEAD_BYTES};

/// Renders the whole Prometheus text exposition into the buffer.
pub type RenderFn = Arc<dyn Fn(&mut String) + Send + Sync>;

/// Whether `token` can be sent as `Authorization: Bearer <token>`: RFC 6750's
/// b64token (token68): ASCII letters, digits and `-._~+/`, then `=` padding.
/// Anything else (a space, a control byte, non-ASCII) no client could present
/// in a header that every parser reads the same way.
pub fn bearer_token_ok(token: &str) -> bool {
    let body = token.trim_end_matches('=');
    !body.is_empty()
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b))
}

/// Options for the sidecar.
#[derive(Clone, Debug)]
pub struct SidecarOptions {
    /// Bearer token required on `/metrics` (already trimmed), if any.
    pub bearer_token: Option<String>,
    /// Most sidecar connections open at once; the rest wait or are refused.
    pub max_connections: usize,
    /// A sidecar connection that does not finish its request in this time is closed.
    pub request_timeout: Duration,
}

impl Default for SidecarOptions {
    fn default() -> Self {
        SidecarOptions {
            bearer_token: None,
            max_connections: 64,
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// Most requests handed to tiny_http at once. tiny_http holds a thread per open
/// connection, so this (plus its 4 idle pool threads) bounds its threads.
pub const MAX_IN_FLIGHT: usize = 4;
/// Threads answering requests; two, so one stalled response cannot stop scrapes.
const HANDLERS: usize = 2;
/// Pause between attempts to restart a dead tiny_http backend.
const REBUILD_BACKOFF_MIN: Duration = Duration::from_millis(50);
const REBUILD_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How long `shutdown` waits for its threads before it leaves them behind.
const JOIN_LIMIT: Duration = Duration::from_secs(5);
/// At most one accept warning per this period (with a count of the ones held back).
const WARN_EVERY: Duration = Duration::from_secs(10);
/// A running sidecar; `shutdown` stops it and joins its threads.
pub struct Sidecar {
    addr: SocketAddr,
    shared: Arc<Shared>,
    /// Wakes the front thread's poll; it then sees `shared.stopping`.
    waker: Option<Waker>,
    /// Never sends; dropping it wakes handler threads sleeping in a backoff.
    stop_tx: Option<Sender<()>>,
    threads: Vec<JoinHandle<()>>,
    stopped: bool,
}

impl fmt::Debug for Sidecar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sidecar").field("addr", &self.addr).finish()
    }
}

impl Sidecar {
    /// Starts serving on an already bound listener.
    pub fn start(
        listener: TcpListener,
        opts: SidecarOptions,
        render: RenderFn,
        ready: Arc<AtomicBool>,
    ) -> io::Result<Sidecar> {
        let addr = listener.local_addr()?;
        let token = match opts.bearer_token.as_deref().map(str::trim) {
            Some("") => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "the bearer token is empty",
                ))
            }
            Some(t) if !bearer_token_ok(t) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "the bearer token must be RFC 6750 token68 (printable ASCII, no spaces)",
                ))
            }
            Some(t) => Some(t.as_bytes().to_vec()),
            None => None,
        };
        listener.set_nonblocking(true)?;
        let mut listener = mio::net::TcpListener::from_std(listener);

        let dir = private_dir()?;
        let backend = match Backend::bind(&dir, 0) {
            Ok(b) => b,
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let shared = Arc::new(Shared {
            token,
            render,
            ready,
            dir,
            backend: Mutex::new(Some(Arc::new(backend))),
            next_generation: AtomicU64::new(1),
            stopping: AtomicBool::new(false),
        });
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        // From here on, an early return drops `sidecar`, whose Drop stops what started.
        let mut sidecar = Sidecar {
            addr,
            shared: Arc::clone(&shared),
            waker: None,
            stop_tx: Some(stop_tx),
            threads: Vec::new(),
            stopped: false,
        };

        let poll = Poll::new()?;
        let waker = Waker::new(poll.registry(), WAKER)?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        sidecar.waker = Some(waker);

        for i in 0..HANDLERS {
            let shared = Arc::clone(&shared);
            let stop_rx = stop_rx.clone();
            let handle = thread::Builder::new()
                .name(format!("metrics-resp-{i}"))
                .spawn(move || handler_loop(&shared, &stop_rx))
                .map_err(|e| spawn_error("metrics-resp", e))?;
            sidecar.threads.push(handle);
        }

        let front = Front::new(poll, listener, &opts, shared, stop_rx);
        let handle = thread::Builder::new()
            .name("metrics-http".to_owned())
            .spawn(move || front.run())
            .map_err(|e| spawn_error("metrics-http", e))?;
        sidecar.threads.push(handle);
        Ok(sidecar)
    }

    /// The address it serves on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, closes every sidecar connection and joins every thread.
    pub fn shutdown(mut self) {
        self.stop();
    }

    /// Idempotent; also run by `Drop`.
    fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        {
            // Under the backend lock, so that no restart can slip in after this.
            let current = self.shared.lock_backend();
            self.shared.stopping.store(true, Ordering::SeqCst);
            if let Some(backend) = current.as_ref() {
                // One wake-up per handler blocked in `recv()`; they persist in the queue.
                for _ in 0..HANDLERS {
                    backend.server.unblock();
                }
            }
        }
        drop(self.stop_tx.take());
        // The waker must live until the front has been joined: dropping it closes
        // its eventfd, and epoll forgets an event not yet collected (a lost wake-up).
        let waker = self.waker.take();
        if let Some(w) = &waker {
            if let Err(e) = w.wake() {
                warn!("metrics sidecar: cannot wake the front thread: {e}");
            }
        }
        let limit = Instant::now() + JOIN_LIMIT;
        for handle in self.threads.drain(..) {
            // Bounded: a render closure stuck forever must not hang the shutdown.
            while !handle.is_finished() && Instant::now() < limit {
                thread::sleep(Duration::from_millis(2));
            }
            let name = handle.thread().name().unwrap_or("?").to_owned();
            if !handle.is_finished() {
                warn!("metrics sidecar: thread {name} did not stop in time; leaving it behind");
                continue;
            }
            if handle.join().is_err() {
                error!("metrics sidecar: thread {name} panicked");
            }
        }
        drop(waker);
        // Dropping the last handle to tiny_http's Server stops its accept thread
        // (it connects to itself) and removes the socket file.
        let backend = self.shared.lock_backend().take();
        drop(backend);
        if let Err(e) = fs::remove_dir_all(&self.shared.dir) {
            if e.kind() != io::ErrorKind::NotFound {
                warn!(
                    "metrics sidecar: cannot remove {}: {e}",
                    self.shared.dir.display()
                );
            }
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn_error(name: &str, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("cannot start thread {name}: {e}"))
}

/// What the front and the handlers share.
struct Shared {
    token: Option<Vec<u8>>,
    render: RenderFn,
    ready: Arc<AtomicBool>,
    /// The private directory holding the backend socket(s).
    dir: PathBuf,
    /// The live tiny_http backend; `None` once stopped.
    backend: Mutex<Option<Arc<Backend>>>,
    next_generation: AtomicU64,
    stopping: AtomicBool,
}

impl Shared {
    fn lock_backend(&self) -> MutexGuard<'_, Option<Arc<Backend>>> {
        // A poisoned lock only means a thread panicked while holding it; the
        // `Option<Arc<_>>` inside is still whole.
        self.backend.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn current(&self) -> Option<Arc<Backend>> {
        self.lock_backend().clone()
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }
}
