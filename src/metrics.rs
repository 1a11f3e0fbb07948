//! Every metric, defined once; the Prometheus text rendering; process figures.
//!
//! Counting follows memcached: each worker owns a [`WorkerStats`] that only its own
//! thread writes (plain load + store, no locked read-modify-write), and a scrape
//! sums them. Workers also batch their per-message counts in a [`LocalCounters`]
//! and publish them once per event-loop turn, so a scrape is current to within one
//! loop turn (well under a second) and the hot path touches no shared cache line.
//! The acceptor's counters are written by the acceptor alone. `active` is the one
//! value written by several threads (admission adds, a dropped permit subtracts),
//! so it is a true atomic read-modify-write; it changes once per connection, not
//! per message. It only reports: the limits are enforced by `server::admission`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
    version: &'static str,
    start_time: f64,
    accepted: AtomicU64,
    rejected: [AtomicU64; RejectReason::ALL.len()],
    accept_errors: AtomicU64,
    accept_resets: AtomicU64,
    /// Open connections, as reported: moved by `server::admission` when a permit
    /// is taken and when it is dropped. Not read for any decision.
    active: AtomicUsize,
    max_connections: AtomicUsize,
    workers: Box<[WorkerStats]>,
}

impl Metrics {
    /// Metrics for a pool of `workers` workers, all at zero.
    pub fn new(workers: usize, max_connections: usize) -> Metrics {
        Metrics {
            version: env!("CARGO_PKG_VERSION"),
            start_time: process_start_time().unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64())
            }),
            accepted: AtomicU64::new(0),
            rejected: Default::default(),
            accept_errors: AtomicU64::new(0),
            accept_resets: AtomicU64::new(0),
            active: AtomicUsize::new(0),
            max_connections: AtomicUsize::new(max_connections),
            workers: (0..workers).map(|_| WorkerStats::default()).collect(),
        }
    }

    /// The stats block of worker `i`.
    pub fn worker(&self, i: usize) -> &WorkerStats {
        &self.workers[i]
    }

    /// A connection was handed to a worker (the acceptor), or, with the PROXY
    /// protocol, its header was decided (a worker): several writers, so a true
    /// atomic add; once per connection, not per message.
    pub fn accepted(&self) {
        self.accepted.fetch_add(1, Relaxed);
    }

    /// Admission: a connection was admitted (its permit taken).
    pub fn connection_admitted(&self) {
        self.active.fetch_add(1, Relaxed);
    }

    /// Admission: a connection's permit was dropped (closed, or never handed off).
    pub fn connection_released(&self) {
        self.active.fetch_sub(1, Relaxed);
    }

    /// A connection was refused: by the acceptor, or (`per_ip_limit` behind a
    /// PROXY header) by a worker. Several writers, so a true atomic add.
    pub fn rejected(&self, reason: RejectReason) {
        self.rejected[reason as usize].fetch_add(1, Relaxed);
    }

    /// Acceptor only: `accept()` failed for lack of resources or the like.
    pub fn accept_error(&self) {
        bump(&self.accept_errors, 1);
    }

    /// Acceptor only: `accept()` saw ECONNABORTED/ECONNRESET.
    pub fn accept_reset(&self) {
        bump(&self.accept_resets, 1);
    }

    /// Connections handed to workers so far (for the drain summary).
    pub fn accepted_total(&self) -> u64 {
        self.accepted.load(Relaxed)
    }

    /// Connections closed so far for `reason` (for the drain summary).
    pub fn closed_total(&self, reason: CloseReason) -> u64 {
        self.sum(|w| &w.closed[reason as usize])
    }

    fn sum(&self, f: impl Fn(&WorkerStats) -> &AtomicU64) -> u64 {
        self.workers.iter().map(|w| f(w).load(Relaxed)).sum()
    }

    /// Renders every metric in the Prometheus text format (version 0.0.4).
    pub fn render(&self, out: &mut String) {
        let o = out;
        header(
            o,
            "sockpool_build_info",
            "gauge",
            "Always 1; the version label says which build runs.",
        );
        let _ = writeln!(o, "sockpool_build_info{{version=\"{}\"}} 1", self.version);

        counter(
            o,
            "sockpool_connections_accepted_total",
            "Connections handed to a worker.",
            self.accepted.load(Relaxed),
        );

        header(
            o,
            "sockpool_connections_rejected_total",
            "counter",
            "Connections refused right after accept, by reason.",
        );
        for r in RejectReason::ALL {
            let v = self.rejected[r as usize].load(Relaxed);
            let _ = writeln!(
                o,
                "sockpool_connections_rejected_total{{reason=\"{}\"}} {v}",
                r.as_str()
            );
        }

        header(
            o,
            "sockpool_connections_closed_total",
            "counter",
            "Connections closed, by reason.",
        );
        for r in CloseReason::ALL {
            let v = self.sum(|w| &w.closed[r as usize]);
            let _ = writeln!(
                o,
                "sockpool_connections_closed_total{{reason=\"{}\"}} {v}",
                r.as_str()
            );
        }

        gauge(
            o,
            "sockpool_connections_active",
            "Open connections.",
            self.active.load(Relaxed) as f64,
        );
        gauge(
            o,
            "sockpool_connections_max",
            "The effective max_connections.",
            self.max_connections.load(Relaxed) as f64,
        );
        let resets = self.accept_resets.load(Relaxed) + self.sum(|w| &w.reset_errors);
        counter(
            o,
            "sockpool_reset_errors_total",
            "ECONNRESET, EPIPE or ECONNABORTED seen on accept, read or write.",
            resets,
        );
        counter(
            o,
            "sockpool_accept_errors_total",
            "Failed accepts (EMFILE and the like); the acceptor backs off.",
            self.accept_errors.load(Relaxed),
        );
        counter(
            o,
            "sockpool_received_bytes_total",
            "Bytes read from clients.",
            self.sum(|w| &w.received_bytes),
        );
        counter(
            o,
            "sockpool_sent_bytes_total",
            "Bytes written to clients.",
            self.sum(|w| &w.sent_bytes),
        );
        counter(
            o,
            "sockpool_messages_total",
            "Replies sent (ack mode) or chunks echoed (echo mode).",
            self.sum(|w| &w.messages),
        );

        let name = "sockpool_connection_duration_seconds";
        header(o, name, "histogram", "Connection lifetimes.");
        let mut cumulative = 0;
        for (i, le) in DURATION_BUCKETS.iter().enumerate() {
            cumulative += self.sum(|w| &w.duration_buckets[i]);
            let _ = writeln!(o, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        cumulative += self.sum(|w| &w.duration_buckets[DURATION_BUCKETS.len()]);
        let _ = writeln!(o, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let _ = writeln!(
            o,
            "{name}_sum {}",
            self.sum(|w| &w.duration_sum_nanos) as f64 / 1e9
        );
        let _ = writeln!(o, "{name}_count {cumulative}");

        gauge(
            o,
            "sockpool_workers",
            "Worker threads in the pool.",
            self.workers.len() as f64,
        );
        header(
            o,
            "sockpool_worker_connections",
            "gauge",
            "Connections owned by each worker.",
        );
        for (i, w) in self.workers.iter().enumerate() {
            let _ = writeln!(
                o,
                "sockpool_worker_connections{{worker=\"{i}\"}} {}",
                w.connections.load(Relaxed)
            );
        }
        header(
            o,
            "sockpool_worker_busy_seconds_total",
            "counter",
            "Time each worker spent handling events (utilization).",
        );
        for (i, w) in self.workers.iter().enumerate() {
            let v = w.busy_nanos.load(Relaxed) as f64 / 1e9;
            let _ = writeln!(
                o,
                "sockpool_worker_busy_seconds_total{{worker=\"{i}\"}} {v}"
            );
        }
        render_process(o, self.start_time);
    }
}

fn header(o: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn counter(o: &mut String, name: &str, help: &str, v: u64) {
    header(o, name, "counter", help);
    let _ = writeln!(o, "{name} {v}");
}

fn gauge(o: &mut String, name: &str, help: &str, v: f64) {
    header(o, name, "gauge", help);
    let _ = writeln!(o, "{name} {v}");
}

/// Fields of `/proc/self/stat` after the command name, numbered as in proc(5)
/// minus 3 (the first field after `(comm)` is field 3, `state`).
fn proc_stat() -> Option<Vec<u64>> {
    let text = std::fs::read_to_string("/proc/self/stat").ok()?;
    let after_comm = &text[text.rfind(')')? + 2..];
    Some(
        after_comm
            .split(' ')
            .skip(1)
            .map(|f| f.trim().parse().unwrap_or(0))
            .collect(),
    )
}

/// Index into [`proc_stat`] of proc(5) field `n` (state, field 3, is skipped).
const fn stat_field(n: usize) -> usize {
    n - 4
}

/// Seconds since the epoch at which this process started, from /proc.
fn process_start_time() -> Option<f64> {
    let ticks =
        *proc_stat()?.get(stat_field(22))? as f64 / rustix::param::clock_ticks_per_second() as f64;
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let btime: f64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    Some(btime + ticks)
}

/// The standard `process_*` metrics, read from /proc at scrape time.
fn render_process(o: &mut String, start_time: f64) {
    if let Some(stat) = proc_stat() {
        let hz = rustix::param::clock_ticks_per_second() as f64;
        let field = |n: usize| stat.get(stat_field(n)).copied().unwrap_or(0);
        let cpu = (field(14) + field(15)) as f64 / hz;
        header(
            o,
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
        );
        let _ = writeln!(o, "process_cpu_seconds_total {cpu}");
        gauge(
            o,
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
            field(23) as f64,
        );
        let rss = field(24) as f64 * rustix::param::page_size() as f64;
        gauge(
            o,
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            rss,
        );
        gauge(
            o,
            "process_threads",
            "Number of OS threads in the process.",
            field(20) as f64,
        );
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        // The directory handle itself is one of the entries; do not count it.
        let fds = dir.count().saturating_sub(1);
        gauge(
            o,
            "process_open_fds",
            "Number of open file descriptors.",
            fds as f64,
        );
    }
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    if let Some(max) = limit.current {
        gauge(
            o,
            "process_max_fds",
            "Maximum number of open file descriptors.",
            max as f64,
        );
    }
    gauge(
        o,
        "process_start_time_seconds",
        "Start time of the process since unix epoch in seconds.",
        start_time,
    );
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
