//! Every metric, defined once; the per-worker counters behind them; their
//! exposition through the `prometheus` crate.
//!
//! Counting follows memcached: each worker owns a [`WorkerStats`] that only its own
//! thread writes (plain load + store, no locked read-modify-write), and a scrape
//! sums them. Workers also batch their per-message counts in a [`LocalCounters`]
//! and publish them once per event-loop turn, so a scrape is current to within one
//! loop turn (well under a second) and the hot path touches no shared cache line.
//! The acceptor's counters are written by the acceptor alone. `active` is the one
//! value written by several threads (the acceptor adds, workers subtract), so it
//! is a true atomic read-modify-write; it changes once per connection, not per
//! message.
//!
//! Exposition: the hot path knows nothing of the `prometheus` crate. Its
//! [`Registry`] holds a custom [`Collector`] ([`PoolCollector`]) that reads and
//! sums the worker blocks at scrape time, the `process_*` collector of
//! [`process`], and `sockpool_build_info`, a plain gauge with a constant label.
//! [`Metrics::render`] gathers them and writes them with the crate's
//! [`TextEncoder`]; the sidecar serves them as [`CONTENT_TYPE`].

pub mod process;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, MetricType};
use prometheus::{Registry, TextEncoder};

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
}

impl RejectReason {
    /// Every reason, in label order.
    pub const ALL: [RejectReason; 3] = [
        RejectReason::MaxConnections,
        RejectReason::PerIpLimit,
        RejectReason::ShuttingDown,
    ];

    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::MaxConnections => "max_connections",
            RejectReason::PerIpLimit => "per_ip_limit",
            RejectReason::ShuttingDown => "shutting_down",
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

    /// Connections this worker owns now (read by the acceptor to pick a worker).
    pub fn connections(&self) -> u64 {
        self.connections.load(Relaxed)
    }
}

/// One metric family: the single place its name, type, HELP text and variable
/// label are written. DESIGN.md's table is the contract for these.
#[derive(Debug, Clone, Copy)]
pub struct Family {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: MetricType,
    pub label: Option<&'static str>,
}

const fn fam(
    name: &'static str,
    kind: MetricType,
    label: Option<&'static str>,
    help: &'static str,
) -> Family {
    Family {
        name,
        help,
        kind,
        label,
    }
}

use MetricType::{COUNTER, GAUGE, HISTOGRAM};

pub const BUILD_INFO: Family = fam(
    "sockpool_build_info",
    GAUGE,
    None,
    "Always 1; the version label says which build runs.",
);
pub const ACCEPTED: Family = fam(
    "sockpool_connections_accepted_total",
    COUNTER,
    None,
    "Connections handed to a worker.",
);
pub const REJECTED: Family = fam(
    "sockpool_connections_rejected_total",
    COUNTER,
    Some("reason"),
    "Connections refused right after accept, by reason.",
);
pub const CLOSED: Family = fam(
    "sockpool_connections_closed_total",
    COUNTER,
    Some("reason"),
    "Connections closed, by reason.",
);
pub const ACTIVE: Family = fam(
    "sockpool_connections_active",
    GAUGE,
    None,
    "Open connections.",
);
pub const MAX: Family = fam(
    "sockpool_connections_max",
    GAUGE,
    None,
    "The effective max_connections.",
);
pub const RESET_ERRORS: Family = fam(
    "sockpool_reset_errors_total",
    COUNTER,
    None,
    "ECONNRESET, EPIPE or ECONNABORTED seen on accept, read or write.",
);
pub const ACCEPT_ERRORS: Family = fam(
    "sockpool_accept_errors_total",
    COUNTER,
    None,
    "Failed accepts (EMFILE and the like); the acceptor backs off.",
);
pub const RECEIVED_BYTES: Family = fam(
    "sockpool_received_bytes_total",
    COUNTER,
    None,
    "Bytes read from clients.",
);
pub const SENT_BYTES: Family = fam(
    "sockpool_sent_bytes_total",
    COUNTER,
    None,
    "Bytes written to clients.",
);
pub const MESSAGES: Family = fam(
    "sockpool_messages_total",
    COUNTER,
    None,
    "Replies sent (ack mode) or chunks echoed (echo mode).",
);
pub const DURATION: Family = fam(
    "sockpool_connection_duration_seconds",
    HISTOGRAM,
    None,
    "Connection lifetimes.",
);
pub const WORKERS: Family = fam(
    "sockpool_workers",
    GAUGE,
    None,
    "Worker threads in the pool.",
);
pub const WORKER_CONNECTIONS: Family = fam(
    "sockpool_worker_connections",
    GAUGE,
    Some("worker"),
    "Connections owned by each worker.",
);
pub const WORKER_BUSY: Family = fam(
    "sockpool_worker_busy_seconds_total",
    COUNTER,
    Some("worker"),
    "Time each worker spent handling events (utilization).",
);

/// The families [`PoolCollector`] produces, in exposition order (build_info is
/// a plain gauge of its own).
pub const POOL_FAMILIES: [Family; 14] = [
    ACCEPTED,
    REJECTED,
    CLOSED,
    ACTIVE,
    MAX,
    RESET_ERRORS,
    ACCEPT_ERRORS,
    RECEIVED_BYTES,
    SENT_BYTES,
    MESSAGES,
    DURATION,
    WORKERS,
    WORKER_CONNECTIONS,
    WORKER_BUSY,
];

/// What the acceptor and the workers write; read by [`PoolCollector`].
struct Counters {
    accepted: AtomicU64,
    rejected: [AtomicU64; RejectReason::ALL.len()],
    accept_errors: AtomicU64,
    accept_resets: AtomicU64,
    max_connections: AtomicUsize,
    workers: Box<[WorkerStats]>,
}

impl Counters {
    fn sum(&self, f: impl Fn(&WorkerStats) -> &AtomicU64) -> u64 {
        self.workers.iter().map(|w| f(w).load(Relaxed)).sum()
    }
}

/// All of the server's metrics.
pub struct Metrics {
    counters: Arc<Counters>,
    /// Open connections: the acceptor adds one before handing off, the owning
    /// worker subtracts one when it closes. Also the `max_connections` check.
    /// (An `Arc` because the collector reads it too; method calls see through it.)
    pub active: Arc<AtomicUsize>,
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

    /// Acceptor only: a connection was handed to a worker.
    pub fn accepted(&self) {
        bump(&self.counters.accepted, 1);
    }

    /// Acceptor only: a connection was refused.
    pub fn rejected(&self, reason: RejectReason) {
        bump(&self.counters.rejected[reason as usize], 1);
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

/// Sums the worker blocks into the `sockpool_*` families at scrape time.
struct PoolCollector {
    counters: Arc<Counters>,
    active: Arc<AtomicUsize>,
    descs: Vec<Desc>,
}

impl PoolCollector {
    fn new(counters: Arc<Counters>, active: Arc<AtomicUsize>) -> PoolCollector {
        let descs = POOL_FAMILIES
            .iter()
            .map(|f| {
                let labels = f.label.iter().map(|l| (*l).to_owned()).collect();
                Desc::new(f.name.to_owned(), f.help.to_owned(), labels, HashMap::new())
                    .expect("pool family names and help texts are valid")
            })
            .collect();
        PoolCollector {
            counters,
            active,
            descs,
        }
    }

    fn one(f: &Family, v: f64) -> proto::MetricFamily {
        family(f.name, f.help, f.kind, vec![sample(f.kind, None, v)])
    }

    fn labelled(f: &Family, values: impl Iterator<Item = (String, f64)>) -> proto::MetricFamily {
        let label = f.label.unwrap_or("label");
        let metrics = values
            .map(|(value, v)| sample(f.kind, Some((label, value)), v))
            .collect();
        family(f.name, f.help, f.kind, metrics)
    }

    fn histogram(&self) -> proto::MetricFamily {
        let c = &self.counters;
        let mut cumulative = 0;
        let mut buckets = Vec::with_capacity(DURATION_BUCKETS.len());
        for (i, le) in DURATION_BUCKETS.iter().enumerate() {
            cumulative += c.sum(|w| &w.duration_buckets[i]);
            let mut b = proto::Bucket::default();
            b.set_upper_bound(*le);
            b.set_cumulative_count(cumulative);
            buckets.push(b);
        }
        cumulative += c.sum(|w| &w.duration_buckets[DURATION_BUCKETS.len()]);
        let mut h = proto::Histogram::default();
        h.set_bucket(buckets);
        h.set_sample_count(cumulative);
        h.set_sample_sum(c.sum(|w| &w.duration_sum_nanos) as f64 / 1e9);
        let mut m = proto::Metric::default();
        m.set_histogram(h);
        family(DURATION.name, DURATION.help, DURATION.kind, vec![m])
    }
}

impl Collector for PoolCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<proto::MetricFamily> {
        let c = &*self.counters;
        let resets = c.accept_resets.load(Relaxed) + c.sum(|w| &w.reset_errors);
        let workers = || c.workers.iter().enumerate();
        vec![
            Self::one(&ACCEPTED, c.accepted.load(Relaxed) as f64),
            Self::labelled(
                &REJECTED,
                RejectReason::ALL.iter().map(|r| {
                    (
                        r.as_str().to_owned(),
                        c.rejected[*r as usize].load(Relaxed) as f64,
                    )
                }),
            ),
            Self::labelled(
                &CLOSED,
                CloseReason::ALL.iter().map(|r| {
                    (
                        r.as_str().to_owned(),
                        c.sum(|w| &w.closed[*r as usize]) as f64,
                    )
                }),
            ),
            Self::one(&ACTIVE, self.active.load(Relaxed) as f64),
            Self::one(&MAX, c.max_connections.load(Relaxed) as f64),
            Self::one(&RESET_ERRORS, resets as f64),
            Self::one(&ACCEPT_ERRORS, c.accept_errors.load(Relaxed) as f64),
            Self::one(&RECEIVED_BYTES, c.sum(|w| &w.received_bytes) as f64),
            Self::one(&SENT_BYTES, c.sum(|w| &w.sent_bytes) as f64),
            Self::one(&MESSAGES, c.sum(|w| &w.messages) as f64),
            self.histogram(),
            Self::one(&WORKERS, c.workers.len() as f64),
            Self::labelled(
                &WORKER_CONNECTIONS,
                workers().map(|(i, w)| (i.to_string(), w.connections.load(Relaxed) as f64)),
            ),
            Self::labelled(
                &WORKER_BUSY,
                workers().map(|(i, w)| (i.to_string(), w.busy_nanos.load(Relaxed) as f64 / 1e9)),
            ),
        ]
    }
}

/// A family with its samples.
fn family(
    name: &str,
    help: &str,
    kind: MetricType,
    metrics: Vec<proto::Metric>,
) -> proto::MetricFamily {
    let mut f = proto::MetricFamily::default();
    f.set_name(name.to_owned());
    f.set_help(help.to_owned());
    f.set_field_type(kind);
    f.set_metric(metrics);
    f
}

/// One counter or gauge sample, with at most one label.
fn sample(kind: MetricType, label: Option<(&str, String)>, v: f64) -> proto::Metric {
    let mut m = proto::Metric::default();
    if let Some((name, value)) = label {
        let mut pair = proto::LabelPair::default();
        pair.set_name(name.to_owned());
        pair.set_value(value);
        m.set_label(vec![pair]);
    }
    if kind == MetricType::COUNTER {
        let mut c = proto::Counter::default();
        c.set_value(v);
        m.set_counter(c);
    } else {
        let mut g = proto::Gauge::default();
        g.set_value(v);
        m.set_gauge(g);
    }
    m
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
