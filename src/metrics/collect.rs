//! The `prometheus` side: every `sockpool_*` family defined once (name, type,
//! HELP, label), and the [`Collector`] that sums the worker blocks into them at
//! scrape time.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, MetricType};

use super::{CloseReason, RejectReason, WorkerStats, DURATION_BUCKETS};

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
pub(super) struct Counters {
    pub(super) accepted: AtomicU64,
    pub(super) rejected: [AtomicU64; RejectReason::ALL.len()],
    pub(super) accept_errors: AtomicU64,
    pub(super) accept_resets: AtomicU64,
    pub(super) max_connections: AtomicUsize,
    pub(super) workers: Box<[WorkerStats]>,
}

impl Counters {
    fn sum(&self, f: impl Fn(&WorkerStats) -> &AtomicU64) -> u64 {
        self.workers.iter().map(|w| f(w).load(Relaxed)).sum()
    }
}

/// Sums the worker blocks into the `sockpool_*` families at scrape time.
pub(super) struct PoolCollector {
    counters: Arc<Counters>,
    active: Arc<AtomicUsize>,
    descs: Vec<Desc>,
}

impl PoolCollector {
    pub(super) fn new(counters: Arc<Counters>, active: Arc<AtomicUsize>) -> PoolCollector {
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
pub(super) fn family(
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
pub(super) fn sample(kind: MetricType, label: Option<(&str, String)>, v: f64) -> proto::Metric {
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
