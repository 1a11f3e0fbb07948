//! The scraped family set against DESIGN.md's metrics table: every family, its
//! type, its labels and its HELP text (unchanged since the exposition moved to
//! the `prometheus` crate), and nothing else. Also the content type, which now
//! comes from the crate's `TextEncoder`.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::{http_get, Server};

/// DESIGN.md's table: name, type, label names, HELP text.
const DESIGN: &[(&str, &str, &[&str], &str)] = &[
    (
        "sockpool_build_info",
        "gauge",
        &["version"],
        "Always 1; the version label says which build runs.",
    ),
    (
        "sockpool_connections_accepted_total",
        "counter",
        &[],
        "Connections handed to a worker.",
    ),
    (
        "sockpool_connections_rejected_total",
        "counter",
        &["reason"],
        "Connections refused right after accept, by reason.",
    ),
    (
        "sockpool_connections_closed_total",
        "counter",
        &["reason"],
        "Connections closed, by reason.",
    ),
    (
        "sockpool_connections_active",
        "gauge",
        &[],
        "Open connections.",
    ),
    (
        "sockpool_connections_max",
        "gauge",
        &[],
        "The effective max_connections.",
    ),
    (
        "sockpool_reset_errors_total",
        "counter",
        &[],
        "ECONNRESET, EPIPE or ECONNABORTED seen on accept, read or write.",
    ),
    (
        "sockpool_accept_errors_total",
        "counter",
        &[],
        "Failed accepts (EMFILE and the like); the acceptor backs off.",
    ),
    (
        "sockpool_received_bytes_total",
        "counter",
        &[],
        "Bytes read from clients.",
    ),
    (
        "sockpool_sent_bytes_total",
        "counter",
        &[],
        "Bytes written to clients.",
    ),
    (
        "sockpool_messages_total",
        "counter",
        &[],
        "Replies sent (ack mode) or chunks echoed (echo mode).",
    ),
    (
        "sockpool_connection_duration_seconds",
        "histogram",
        &["le"],
        "Connection lifetimes.",
    ),
    (
        "sockpool_workers",
        "gauge",
        &[],
        "Worker threads in the pool.",
    ),
    (
        "sockpool_worker_connections",
        "gauge",
        &["worker"],
        "Connections owned by each worker.",
    ),
    (
        "sockpool_worker_busy_seconds_total",
        "counter",
        &["worker"],
        "Time each worker spent handling events (utilization).",
    ),
    (
        "process_cpu_seconds_total",
        "counter",
        &[],
        "Total user and system CPU time spent in seconds.",
    ),
    (
        "process_resident_memory_bytes",
        "gauge",
        &[],
        "Resident memory size in bytes.",
    ),
    (
        "process_open_fds",
        "gauge",
        &[],
        "Number of open file descriptors.",
    ),
    (
        "process_max_fds",
        "gauge",
        &[],
        "Maximum number of open file descriptors.",
    ),
    (
        "process_threads",
        "gauge",
        &[],
        "Number of OS threads in the process.",
    ),
    (
        "process_start_time_seconds",
        "gauge",
        &[],
        "Start time of the process since unix epoch in seconds.",
    ),
];

/// Served beyond the table, as the Prometheus client libraries do.
const EXTRA: &[(&str, &str, &[&str], &str)] = &[(
    "process_virtual_memory_bytes",
    "gauge",
    &[],
    "Virtual memory size in bytes.",
)];

#[derive(Debug, Default, PartialEq, Eq)]
struct Family {
    kind: String,
    help: String,
    labels: BTreeSet<String>,
}

/// Families by name from a text exposition; samples are matched to their family
/// by the `# TYPE` line before them.
fn families(text: &str) -> BTreeMap<String, Family> {
    let mut out: BTreeMap<String, Family> = BTreeMap::new();
    let mut current = String::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect("HELP name text");
            out.entry(name.to_owned()).or_default().help = help.to_owned();
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            out.entry(name.to_owned()).or_default().kind = kind.to_owned();
            current = name.to_owned();
        } else if !line.is_empty() {
            let series = line.rsplit_once(' ').expect("series value").0;
            let (name, labels) = series.split_once('{').unwrap_or((series, ""));
            assert!(
                name.starts_with(&current),
                "{name} outside its family {current}"
            );
            let family = out.get_mut(&current).expect("family");
            for pair in labels
                .trim_end_matches('}')
                .split(',')
                .filter(|p| !p.is_empty())
            {
                let label = pair.split_once('=').expect("label=value").0;
                family.labels.insert(label.to_owned());
            }
        }
    }
    out
}

#[test]
fn the_scraped_families_are_the_design_table() {
    let server = Server::start(&["--workers", "2"]);
    let (status, head, body) = http_get(server.metrics_addr.unwrap(), "/metrics", &[]);
    assert_eq!(status, 200);
    assert!(
        head.lines()
            .any(|l| l.eq_ignore_ascii_case("Content-Type: text/plain; version=0.0.4")),
        "{head}"
    );
    let got = families(&body);
    let want: BTreeMap<String, Family> = DESIGN
        .iter()
        .chain(EXTRA)
        .map(|(name, kind, labels, help)| {
            let family = Family {
                kind: (*kind).to_owned(),
                help: (*help).to_owned(),
                labels: labels.iter().map(|l| (*l).to_owned()).collect(),
            };
            ((*name).to_owned(), family)
        })
        .collect();
    let got_names: BTreeSet<_> = got.keys().collect();
    let want_names: BTreeSet<_> = want.keys().collect();
    assert_eq!(got_names, want_names, "family set");
    for (name, family) in &want {
        assert_eq!(&got[name], family, "{name}");
    }
    // Every known label value exists from the first scrape, at 0.
    for reason in [
        "max_connections",
        "per_ip_limit",
        "shutting_down",
        "untrusted_proxy",
    ] {
        let series = format!("sockpool_connections_rejected_total{{reason=\"{reason}\"}} 0");
        assert!(body.lines().any(|l| l == series), "missing {series}");
    }
    for reason in [
        "client_closed",
        "reset",
        "idle_timeout",
        "write_timeout",
        "protocol_error",
        "io_error",
        "server_shutdown",
    ] {
        let series = format!("sockpool_connections_closed_total{{reason=\"{reason}\"}} 0");
        assert!(body.lines().any(|l| l == series), "missing {series}");
    }
    for worker in 0..2 {
        let series = format!("sockpool_worker_connections{{worker=\"{worker}\"}} 0");
        assert!(body.lines().any(|l| l == series), "missing {series}");
    }
}
