//! Every metric, defined once; the per-worker counters behind them; their
//! exposition through the `prometheus` crate.
//!
//! Counting follows memcached: each worker owns a [`WorkerStats`] that only its own
//! thread writes (plain load + store, no locked read-modify-write), and a scrape
//! sums them. Workers also batch their per-message counts in a [`LocalCounters`]
//! and publish them once per event-loop turn, so a scrape is current to within one
//! loop turn (well under a second) and the hot path touches no shared cache line.
//! The accept-error counters are written by the acceptor alone. `accepted`,
//! `rejected` and `active` are written by several threads (the acceptor, and with
//! the PROXY protocol the worker that reads the header; admission and dropped
//! permits for `active`), so they are true atomic read-modify-writes; they change
//! once per connection, not per message. `active` only reports: the limits are
//! enforced by `server::admission`.
//!
//! Exposition: the hot path knows nothing of the `prometheus` crate. Its
//! [`Registry`] holds a custom [`Collector`] (`collect::PoolCollector`) that reads and
//! sums the worker blocks at scrape time, the `process_*` collector of
//! [`process`], and `sockpool_build_info`, a plain gauge with a constant label.
//! [`Metrics::render`] gathers them and writes them with the crate's
//! [`TextEncoder`]; the sidecar serves them as [`CONTENT_TYPE`].

mod collect;
pub mod process;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use prometheus::core::Collector;
use prometheus::{Registry, TextEncoder};

use collect::{family, sample, Counters, PoolCollector};
pub use collect::{Family, BUILD_INFO, POOL_FAMILIES};

/// The content type of [`Metrics::render`]'s output (Prometheus text 0.0.4).
pub const CONTENT_TYPE: &str = prometheus::TEXT_FORMAT;

/// Why a connection ended. Every connection ends with exactly one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The client closed (EOF) and every reply owed was sent.
    ClientClosed,
    /// ECONNRESET, EPIPE or ECONNABORTED on read or write.
    Reset,
    /// Nothing received and nothing owed for `idle_timeout`.
    IdleTimeout,
    /// Bytes owed and no write progress for `write_timeout`.
    WriteTimeout,
    /// A line over `max_line_bytes` in line framing.
    ProtocolError,
    /// Any other socket error.
    IoError,
    /// Still open when the shutdown grace ran out.
    ServerShutdown,
}

impl CloseReason {
    /// Every reason, in label order.
    pub const ALL: [CloseReason; 7] = [
        CloseReason::ClientClosed,
        CloseReason::Reset,
        CloseReason::IdleTimeout,
        CloseReason::WriteTimeout,
        CloseReason::ProtocolError,
        CloseReason::IoError,
        CloseReason::ServerShutdown,
    ];

    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::ClientClosed => "client_closed",
            CloseReason::Reset => "reset",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::WriteTimeout => "write_timeout",
            CloseReason::ProtocolError => "protocol_error",
            CloseReason::IoError => "io_error",
            CloseReason::ServerShutdown => "server_shutdown",
        }
    }
}

/// Why a connection was refused right after accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectReason {
    MaxConnections,
    PerIpLimit,
    ShuttingDown,
    /// `server.proxy_protocol` is on and the peer is not in `server.proxy_trusted`.
    UntrustedProxy,
}

impl RejectReason {
    /// Every reason, in label order.
    pub const ALL: [RejectReason; 4] = [
        RejectReason::MaxConnections,
        RejectReason::PerIpLimit,
        RejectReason::ShuttingDown,
        RejectReason::UntrustedProxy,
    ];

    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::MaxConnections => "max_connections",
            RejectReason::PerIpLimit => "per_ip_limit",
            RejectReason::ShuttingDown => "shutting_down",
            RejectReason::UntrustedProxy => "untrusted_proxy",
        }
    }
}

/// Upper bounds of `sockpool_connection_duration_seconds`: 1 ms to 4 hours.
pub const DURATION_BUCKETS: [f64; 16] = [
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0,
    14400.0,
];

/// Adds to a counter that only the calling thread writes. Cheaper than
/// `fetch_add` (no locked instruction) and still tear-free for readers.
#[inline]
fn bump(counter: &AtomicU64, n: u64) {
    if n != 0 {
        counter.store(counter.load(Relaxed).wrapping_add(n), Relaxed);
    }
}

/// One worker's figures. Written only by that worker's thread.
#[derive(Default)]
#[repr(align(128))] // own cache lines: workers never share one with each other
pub struct WorkerStats {
    connections: AtomicU64,
    closed: [AtomicU64; CloseReason::ALL.len()],
    reset_errors: AtomicU64,
    received_bytes: AtomicU64,
    sent_bytes: AtomicU64,
    messages: AtomicU64,
    busy_nanos: AtomicU64,
    duration_buckets: [AtomicU64; DURATION_BUCKETS.len() + 1],
    duration_sum_nanos: AtomicU64,
}

/// Per-message counts a worker gathers during one loop turn.
#[derive(Default, Debug)]
pub struct LocalCounters {
    pub received_bytes: u64,
    pub sent_bytes: u64,
    pub messages: u64,
    pub reset_errors: u64,
    pub busy: Duration,
}

impl WorkerStats {
    /// Publishes and zeroes a turn's counts.
    pub fn flush(&self, local: &mut LocalCounters) {
        bump(&self.received_bytes, local.received_bytes);
        bump(&self.sent_bytes, local.sent_bytes);
        bump(&self.messages, local.messages);
        bump(&self.reset_errors, local.reset_errors);
        bump(&self.busy_nanos, local.busy.as_nanos() as u64);
        *local = LocalCounters::default();
    }

    /// A connection joined this worker.
    pub fn connection_opened(&self) {
        bump(&self.connections, 1);
    }

    /// A connection of this worker ended.
    pub fn connection_closed(&self, reason: CloseReason, lifetime: Duration) {
        self.connections
            .store(self.connections.load(Relaxed).saturating_sub(1), Relaxed);
        bump(&self.closed[reason as usize], 1);
        let secs = lifetime.as_secs_f64();
        let bucket = DURATION_BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(DURATION_BUCKETS.len());
        bump(&self.duration_buckets[bucket], 1);
        bump(&self.duration_sum_nanos, lifetime.as_nanos() as u64);
    }

    /// A connection of this worker was refused after its PROXY header (counted
    /// as rejected, never as closed).
    pub fn connection_refused(&self) {
        self.connections
            .store(self.connections.load(Relaxed).saturating_sub(1), Relaxed);
    }

    /// Connections this worker owns now (read by the acceptor to pick a worker).
    pub fn connections(&self) -> u64 {
        self.connections.load(Relaxed)
    }
}

/// All of the server's metrics.
pub struct Metrics {
    counters: Arc<Counters>,
    /// Open connections, as reported: moved by `server::admission` when a permit
    /// is taken and when it is dropped. Not read for any decision. (An `Arc`
    /// because the collector reads it too.)
    active: Arc<AtomicUsize>,
    registry: Registry,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("workers", &self.counters.workers.len())
            .finish_non_exhaustive()
    }
}

impl Metrics {
    /// Metrics for a pool of `workers` workers, all at zero.
    pub fn new(workers: usize, max_connections: usize) -> Metrics {
        let counters = Arc::new(Counters {
            accepted: AtomicU64::new(0),
            rejected: Default::default(),
            accept_errors: AtomicU64::new(0),
            accept_resets: AtomicU64::new(0),
            max_connections: AtomicUsize::new(max_connections),
            workers: (0..workers).map(|_| WorkerStats::default()).collect(),
        });
        let active = Arc::new(AtomicUsize::new(0));
        let registry = Registry::new();
        // Registration fails only on invalid or clashing names and help texts,
        // which are constants above: a failure is a bug the unit test catches.
        let build_info = prometheus::Gauge::with_opts(
            prometheus::Opts::new(BUILD_INFO.name, BUILD_INFO.help)
                .const_label("version", env!("CARGO_PKG_VERSION")),
        )
        .expect("build_info is a valid gauge");
        build_info.set(1.0);
        let collectors: [Box<dyn Collector>; 3] = [
            Box::new(build_info),
            Box::new(PoolCollector::new(
                Arc::clone(&counters),
                Arc::clone(&active),
            )),
            Box::new(process::ProcessCollector::new()),
        ];
        for c in collectors {
            registry
                .register(c)
                .expect("metric families are valid and distinct");
        }
        Metrics {
            counters,
            active,
            registry,
        }
    }

    /// The stats block of worker `i`.
    pub fn worker(&self, i: usize) -> &WorkerStats {
        &self.counters.workers[i]
    }

    /// A connection was handed to a worker (the acceptor), or, with the PROXY
    /// protocol, its header was decided (a worker): several writers, so a true
    /// atomic add; once per connection, not per message.
    pub fn accepted(&self) {
        self.counters.accepted.fetch_add(1, Relaxed);
    }

    /// Admission: a connection was admitted (its permit taken).
    pub fn connection_admitted(&self) {
        self.active.fetch_add(1, Relaxed);
    }

    /// Admission: a connection's permit was dropped (closed, or never handed off).
    pub fn connection_released(&self) {
        self.active.fetch_sub(1, Relaxed);
    }

    /// Connections handed to workers so far (for the drain summary).
    pub fn accepted_total(&self) -> u64 {
        self.counters.accepted.load(Relaxed)
    }

    /// Connections closed so far for `reason`, over all workers (for the drain
    /// summary).
    pub fn closed_total(&self, reason: CloseReason) -> u64 {
        self.counters
            .workers
            .iter()
            .map(|w| w.closed[reason as usize].load(Relaxed))
            .sum()
    }

    /// A connection was refused: by the acceptor, or (`per_ip_limit` behind a
    /// PROXY header) by a worker. Several writers, so a true atomic add.
    pub fn rejected(&self, reason: RejectReason) {
        self.counters.rejected[reason as usize].fetch_add(1, Relaxed);
    }

    /// Acceptor only: `accept()` failed for lack of resources or the like.
    pub fn accept_error(&self) {
        bump(&self.counters.accept_errors, 1);
    }

    /// Acceptor only: `accept()` saw ECONNABORTED/ECONNRESET.
    pub fn accept_reset(&self) {
        bump(&self.counters.accept_resets, 1);
    }

    /// The registry behind [`Metrics::render`] (every family, gathered at once).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Appends every metric in the Prometheus text format ([`CONTENT_TYPE`]).
    pub fn render(&self, out: &mut String) {
        let families = self.registry.gather();
        if let Err(e) = TextEncoder::new().encode_utf8(&families, out) {
            // Only a family without samples can fail, and the registry drops those.
            log::error!("cannot encode the metrics: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_exists_at_zero_and_adds_up() {
        let m = Metrics::new(2, 100);
        let mut out = String::new();
        m.render(&mut out);
        for needle in [
            "sockpool_connections_rejected_total{reason=\"per_ip_limit\"} 0",
            "sockpool_connections_closed_total{reason=\"server_shutdown\"} 0",
            "sockpool_worker_busy_seconds_total{worker=\"1\"} 0",
            "sockpool_connection_duration_seconds_bucket{le=\"+Inf\"} 0",
            "sockpool_connections_max 100",
            "process_cpu_seconds_total ",
            "process_open_fds ",
        ] {
            assert!(out.contains(needle), "missing {needle}");
        }
        m.worker(1).connection_opened();
        m.worker(1)
            .connection_closed(CloseReason::Reset, Duration::from_millis(3));
        let mut out = String::new();
        m.render(&mut out);
        assert!(out.contains("sockpool_connections_closed_total{reason=\"reset\"} 1"));
        assert!(out.contains("sockpool_connection_duration_seconds_bucket{le=\"0.001\"} 0"));
        assert!(out.contains("sockpool_connection_duration_seconds_bucket{le=\"0.005\"} 1"));
        assert!(out.contains("sockpool_connection_duration_seconds_count 1"));
    }
}
