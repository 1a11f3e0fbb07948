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
//! Shutdown order: the trigger clears `ready` (so `/-/ready` says 503 at once),
//! notes what is open, and wakes the acceptor; the acceptor goes on accepting for
//! `shutdown.drain_delay` (a balancer takes the instance out meanwhile), then
//! stops new handshakes, accepts what is queued and closes the listener (see
//! `listen::refuse_new_handshakes`; nobody who connected is reset), drops every
//! sender and wakes every worker; each worker, on seeing its channel
//! disconnected, serves its connections for up to `shutdown.grace`, closes the
//! rest, and exits; [`Running::wait`] joins them all, logs one line that sums up
//! the drain, keeps `/metrics` up for `shutdown.metrics_linger` so a last scrape
//! sees it, and then stops the sidecar.

mod acceptor;
pub mod admission;
pub mod conn;
mod gate;
mod listen;
mod proxied;
mod worker;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::{Poll, Waker};

use crate::config::{format_duration, Config};
use crate::http::{RenderFn, Sidecar, SidecarOptions};
use crate::logging::{SharedRateLimit, WARN_BURST, WARN_WINDOW};
use crate::metrics::{CloseReason, Metrics};

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
    /// `shutdown.drain_delay`: the acceptor keeps accepting this long after the trigger.
    pub drain_delay: Duration,
    /// The data listener came from systemd and outlives us: at shutdown the acceptor
    /// only stops accepting (the next instance takes what is queued).
    pub listener_inherited: bool,
    /// `server.proxy_trusted` when `server.proxy_protocol` is on; `None` when off.
    /// The acceptor rejects other peers; workers read a header first.
    pub proxy_trusted: Option<Vec<crate::config::Cidr>>,
    /// Where the drain started from, for its summary; set by the first trigger.
    drain: Mutex<Option<DrainStart>>,
}

/// The figures at the stop signal that the drain's summary line compares with.
#[derive(Clone, Copy, Debug)]
struct DrainStart {
    at: Instant,
    open: usize,
    accepted: u64,
    closed: u64,
    shut: u64,
}

impl DrainStart {
    fn now(shared: &Shared) -> DrainStart {
        let metrics = &shared.metrics;
        DrainStart {
            at: Instant::now(),
            open: shared.admission.open(),
            accepted: metrics.accepted_total(),
            closed: CloseReason::ALL
                .iter()
                .map(|&r| metrics.closed_total(r))
                .sum(),
            shut: metrics.closed_total(CloseReason::ServerShutdown),
        }
    }
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
    /// Start the drain: not ready at once, accepting for `drain_delay`, then closed.
    pub fn fire(&self) {
        self.ready.store(false, Ordering::Release);
        {
            let mut drain = self.shared.drain.lock().unwrap_or_else(|p| p.into_inner());
            if drain.is_none() {
                *drain = Some(DrainStart::now(&self.shared));
            }
        }
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
    /// `shutdown.metrics_linger`.
    metrics_linger: Duration,
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
        log_drain(&self.shared);
        if let Some(sidecar) = self.sidecar {
            if !self.metrics_linger.is_zero() {
                // Ready stays false: /-/ready answers 503 while /metrics still
                // serves the final figures (the server_shutdown closes above).
                log::info!(
                    "keeping /metrics up for {} (shutdown.metrics_linger)",
                    format_duration(self.metrics_linger)
                );
                std::thread::sleep(self.metrics_linger);
            }
            sidecar.shutdown();
        }
    }
}

/// One info line that sums up the drain.
fn log_drain(shared: &Shared) {
    let start = *shared.drain.lock().unwrap_or_else(|p| p.into_inner());
    let Some(start) = start else {
        return; // stopped without a trigger (cannot happen today)
    };
    let end = DrainStart::now(shared);
    let shut = end.shut - start.shut;
    let finished = (end.closed - start.closed).saturating_sub(shut);
    log::info!(
        "drain done: {} connections open at the stop signal, {} accepted since; \
         {finished} finished on their own, {shut} closed at the end of the grace \
         (server_shutdown); took {:.3}s",
        start.open,
        end.accepted - start.accepted,
        start.at.elapsed().as_secs_f64()
    );
}

/// Raises RLIMIT_NOFILE's soft limit to the hard limit and returns the number of
/// connections that fit, with a warning if `wanted` does not.
fn fit_connections(wanted: usize) -> usize {
    let soft = match crate::metrics::process::raise_nofile_limit() {
        Ok(soft) => soft,
        Err((e, soft)) => {
            log::warn!("cannot raise RLIMIT_NOFILE to its hard limit: {e}");
            soft
        }
    };
    let Some(soft) = soft else {
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
    let listen::Listeners {
        data,
        data_inherited,
        metrics: metrics_listener,
    } = listen::open(config)?;
    let local_addr = listen::local_addr(&data)?;
    let listener = mio::net::TcpListener::from_std(data);

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
        drain_delay: config.shutdown.drain_delay,
        listener_inherited: data_inherited,
        proxy_trusted: config
            .server
            .proxy_protocol
            .then(|| config.server.proxy_trusted.clone()),
        drain: Mutex::new(None),
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

    let gate = Arc::new(
        gate::Gate::new(acceptor_poll.registry(), &listener).map_err(io_err("acceptor epoll"))?,
    );

    let mut links = Vec::with_capacity(n_workers);
    let mut workers = Vec::with_capacity(n_workers);
    for id in 0..n_workers {
        let poll = Poll::new().map_err(io_err("worker poll"))?;
        let waker = Waker::new(poll.registry(), worker::WAKER).map_err(io_err("worker waker"))?;
        let doorbell = Arc::new(worker::Doorbell::new(waker));
        let (tx, rx) = crossbeam_channel::bounded(HANDOFF_QUEUE);
        let w = worker::Worker::new(
            id,
            poll,
            doorbell.clone(),
            gate.clone(),
            rx,
            shared.clone(),
            config,
        );
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
        gate,
        links,
        shared.clone(),
        config.server.busy_message.clone().into_bytes(),
    );
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
        metrics_linger: config.shutdown.metrics_linger,
    })
}
