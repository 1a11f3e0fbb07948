//! Starting, running and stopping the server.
//!
//! ```text
//!   signals ──SIGTERM──▶ Trigger ──wake──▶ acceptor ──Handoff over bounded channel + wake──▶ worker-0..N
//!                          │                  │ (drops listener, then its senders)            │ mio Poll each
//!                          └─ ready=false     └──────────────── metrics (atomics) ◀───────────┘
//!                                                                   ▲
//!                                              metrics-http ────────┘ (reads only)
//! ```
//!
//! Shutdown order: the trigger clears `ready` and wakes the acceptor; the acceptor
//! closes the listener (new clients are refused), drops every sender and wakes
//! every worker; each worker, on seeing its channel disconnected, serves its
//! connections for up to `shutdown.grace`, closes the rest, and exits;
//! [`Running::wait`] joins them all and then stops the sidecar.

mod acceptor;
pub mod admission;
pub mod conn;
mod worker;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use mio::{Poll, Waker};

use crate::config::Config;
use crate::http::{RenderFn, Sidecar, SidecarOptions};
use crate::logging::{SharedRateLimit, WARN_BURST, WARN_WINDOW};
use crate::metrics::Metrics;

/// Connections queued for one worker before the acceptor waits for it.
const HANDOFF_QUEUE: usize = 1024;

/// File descriptors kept back from `max_connections` for everything else:
/// listeners, epoll and wake-up fds, the metrics sidecar, log files, /proc reads.
/// An eighth of the limit, between these bounds.
const FD_RESERVE_MIN: u64 = 32;
const FD_RESERVE_MAX: u64 = 256;

/// State shared by the acceptor, the workers and the sidecar.
pub struct Shared {
    pub metrics: Arc<Metrics>,
    /// Set by [`Trigger::fire`]: the acceptor stops.
    pub stopping: AtomicBool,
    /// The connection limits; the acceptor takes a permit from it per connection.
    pub admission: Arc<admission::Admission>,
    /// "connection reset by peer" warnings, for all workers together.
    pub reset_log: SharedRateLimit,
    /// Idle, write-timeout and protocol-error warnings, for all workers together.
    pub timeout_log: SharedRateLimit,
}

/// Why the server could not start: exit code 1.
#[derive(Debug)]
pub struct StartError(pub String);

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StartError {}

/// Starts the shutdown. Cheap to clone; firing twice is harmless.
#[derive(Clone)]
pub struct Trigger {
    shared: Arc<Shared>,
    ready: Arc<AtomicBool>,
    acceptor: Arc<Waker>,
}

impl Trigger {
    /// Stop accepting and drain.
    pub fn fire(&self) {
        self.ready.store(false, Ordering::Release);
        self.shared.stopping.store(true, Ordering::Release);
        if let Err(e) = self.acceptor.wake() {
            log::error!("cannot wake the acceptor: {e}");
        }
    }
}

/// A running server.
pub struct Running {
    local_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    trigger: Trigger,
    acceptor: JoinHandle<()>,
    workers: Vec<JoinHandle<()>>,
    sidecar: Option<Sidecar>,
    shared: Arc<Shared>,
}

impl Running {
    /// The address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The sidecar's address, if metrics are enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// What starts the shutdown (hand it to the signal handler).
    pub fn trigger(&self) -> Trigger {
        self.trigger.clone()
    }

    /// The server's metrics.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.shared.metrics.clone()
    }

    /// Waits until the server has shut down (after [`Trigger::fire`]).
    pub fn wait(self) {
        if self.acceptor.join().is_err() {
            log::error!("the acceptor thread panicked");
        }
        for (i, w) in self.workers.into_iter().enumerate() {
            if w.join().is_err() {
                log::error!("worker-{i} panicked");
            }
        }
        log::info!("all connections closed");
        if let Some(sidecar) = self.sidecar {
            sidecar.shutdown();
        }
    }
}

/// Raises RLIMIT_NOFILE's soft limit to the hard limit and returns the number of
/// connections that fit, with a warning if `wanted` does not.
fn fit_connections(wanted: usize) -> usize {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => limit = getrlimit(Resource::Nofile),
            Err(e) => log::warn!("cannot raise RLIMIT_NOFILE to its hard limit: {e}"),
        }
    }
    let Some(soft) = limit.current else {
        return wanted;
    };
    let reserve = (soft / 8).clamp(FD_RESERVE_MIN, FD_RESERVE_MAX);
    let fit = soft.saturating_sub(reserve).max(1) as usize;
    if wanted > fit {
        log::warn!(
            "max_connections = {wanted} does not fit RLIMIT_NOFILE = {soft}; using {fit} (raise LimitNOFILE / ulimit -n)"
        );
        return fit;
    }
    wanted
}

fn bind_main(config: &Config) -> Result<mio::net::TcpListener, StartError> {
    use socket2::{Domain, Socket, Type};
    let addr = config.server.listen;
    let fail = |e: io::Error| StartError(format!("cannot listen on {addr}: {e}"));
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).map_err(fail)?;
    socket.set_reuse_address(true).map_err(fail)?;
    // Set on the listener, TCP_NODELAY is inherited by every accepted socket
    // (Linux copies it at accept), which saves a setsockopt per connection.
    socket
        .set_tcp_nodelay(config.server.tcp_nodelay)
        .map_err(fail)?;
    socket.bind(&addr.into()).map_err(fail)?;
    socket.listen(config.server.backlog as i32).map_err(fail)?;
    socket.set_nonblocking(true).map_err(fail)?;
    Ok(mio::net::TcpListener::from_std(socket.into()))
}

fn io_err(what: &'static str) -> impl Fn(io::Error) -> StartError {
    move |e| StartError(format!("{what}: {e}"))
}

fn spawn(name: String, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, StartError> {
    std::thread::Builder::new()
        .name(name.clone())
        .spawn(f)
        .map_err(|e| StartError(format!("cannot start thread {name}: {e}")))
}

/// Binds both listeners, starts the workers, the acceptor and the sidecar, and
/// logs the two startup lines. Nothing is left running if it fails.
pub fn start(config: &Config) -> Result<Running, StartError> {
    let max_connections = fit_connections(config.server.max_connections);
    let listener = bind_main(config)?;
    let local_addr = listener
        .local_addr()
        .map_err(|e| StartError(format!("listener: {e}")))?;
    let metrics_listener = if config.metrics.enabled {
        let addr = config.metrics.listen;
        let l = std::net::TcpListener::bind(addr)
            .map_err(|e| StartError(format!("cannot listen on {addr} (metrics): {e}")))?;
        Some(l)
    } else {
        None
    };

    let n_workers = config.effective_workers();
    let metrics = Arc::new(Metrics::new(n_workers, max_connections));
    let shared = Arc::new(Shared {
        metrics: metrics.clone(),
        stopping: AtomicBool::new(false),
        admission: Arc::new(admission::Admission::new(
            max_connections,
            config.server.max_connections_per_ip,
            metrics.clone(),
        )),
        reset_log: SharedRateLimit::new(WARN_BURST, WARN_WINDOW),
        timeout_log: SharedRateLimit::new(WARN_BURST, WARN_WINDOW),
    });
    let ready = Arc::new(AtomicBool::new(true));

    let acceptor_poll = Poll::new().map_err(io_err("acceptor poll"))?;
    let acceptor_waker = Arc::new(
        Waker::new(acceptor_poll.registry(), acceptor::WAKER).map_err(io_err("acceptor waker"))?,
    );
    let trigger = Trigger {
        shared: shared.clone(),
        ready: ready.clone(),
        acceptor: acceptor_waker,
    };

    let mut links = Vec::with_capacity(n_workers);
    let mut workers = Vec::with_capacity(n_workers);
    for id in 0..n_workers {
        let poll = Poll::new().map_err(io_err("worker poll"))?;
        let waker = Waker::new(poll.registry(), worker::WAKER).map_err(io_err("worker waker"))?;
        let doorbell = Arc::new(worker::Doorbell::new(waker));
        let (tx, rx) = crossbeam_channel::bounded(HANDOFF_QUEUE);
        let w = worker::Worker::new(id, poll, doorbell.clone(), rx, shared.clone(), config);
        match spawn(format!("worker-{id}"), move || w.run()) {
            Ok(handle) => workers.push(handle),
            Err(e) => {
                // Dropping the senders made so far releases the started workers.
                drop(links);
                drop(tx);
                return Err(e);
            }
        }
        links.push(acceptor::WorkerLink { tx, doorbell });
    }

    let acc = acceptor::Acceptor::new(
        acceptor_poll,
        listener,
        links,
        shared.clone(),
        config.server.busy_message.clone().into_bytes(),
    )
    .map_err(io_err("acceptor"))?;
    let acceptor = spawn("acceptor".into(), move || acc.run())?;

    let (sidecar, metrics_addr) = match metrics_listener {
        Some(l) => {
            let m = metrics.clone();
            let render: RenderFn = Arc::new(move |out: &mut String| m.render(out));
            let opts = SidecarOptions {
                bearer_token: config.metrics.bearer_token.clone(),
                ..SidecarOptions::default()
            };
            match Sidecar::start(l, opts, render, ready.clone()) {
                Ok(s) => {
                    let addr = s.local_addr();
                    (Some(s), Some(addr))
                }
                Err(e) => {
                    trigger.fire();
                    return Err(StartError(format!("cannot start the metrics server: {e}")));
                }
            }
        }
        None => (None, None),
    };

    let framing = match config.connection.framing {
        crate::config::Framing::Read => "read",
        crate::config::Framing::Line => "line",
    };
    let mode = match config.connection.mode {
        crate::config::Mode::Ack => "ack",
        crate::config::Mode::Echo => "echo",
    };
    log::info!("listening on {local_addr} (mode={mode} framing={framing} workers={n_workers})");
    if let Some(addr) = metrics_addr {
        log::info!("metrics on http://{addr}/metrics");
    }
    Ok(Running {
        local_addr,
        metrics_addr,
        trigger,
        acceptor,
        workers,
        sidecar,
        shared,
    })
}
