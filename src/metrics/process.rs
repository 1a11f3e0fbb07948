//! The process's own figures from /proc, for `process_*` on `/metrics` and for
//! `sockpool bench --server-pid`: the one /proc parser and the one RLIMIT helper.
//!
//! Why not the `prometheus` crate's `process` feature: its
//! `process_cpu_seconds_total` is whole seconds (rust-prometheus #451), useless for
//! `rate()` over a short window, and it brings a second copy of rustix. This is
//! the same handful of figures, fractional, from the same files.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, MetricType};

use super::{family, sample as metric_sample};

/// The fields of `/proc/PID/stat` that anything here needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// User CPU time, in clock ticks (field 14).
    pub utime: u64,
    /// System CPU time, in clock ticks (field 15).
    pub stime: u64,
    /// Threads (field 20).
    pub threads: u64,
    /// Start time after boot, in clock ticks (field 22).
    pub starttime: u64,
    /// Virtual memory size, bytes (field 23).
    pub vsize: u64,
    /// Resident set size, pages (field 24).
    pub rss_pages: u64,
}

impl Stat {
    /// Reads `/proc/PID/stat`.
    pub fn read(pid: u32) -> Result<Stat, String> {
        let path = format!("/proc/{pid}/stat");
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
        parse_stat(&text).ok_or_else(|| format!("cannot parse {path}"))
    }

    /// User + system CPU time.
    pub fn cpu(&self) -> Duration {
        let ticks = clock_ticks();
        let total = self.utime.saturating_add(self.stime);
        Duration::from_secs(total / ticks)
            + Duration::from_nanos((total % ticks).saturating_mul(1_000_000_000) / ticks)
    }

    /// Resident set size in bytes.
    pub fn rss_bytes(&self) -> u64 {
        self.rss_pages
            .saturating_mul(rustix::param::page_size() as u64)
    }
}

fn clock_ticks() -> u64 {
    rustix::param::clock_ticks_per_second().max(1)
}

/// Parses a `/proc/PID/stat` line. `None` if it is not one.
pub fn parse_stat(text: &str) -> Option<Stat> {
    // The command name (field 2) is in parentheses and may itself hold spaces or
    // parentheses: fields are counted from the last `)`.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): field N is fields[N - 3].
    let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
    Some(Stat {
        utime: field(14)?,
        stime: field(15)?,
        threads: field(20)?,
        starttime: field(22)?,
        vsize: field(23)?,
        rss_pages: field(24)?,
    })
}

/// One reading of a process's CPU time and memory (for `sockpool bench`).
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// User + system CPU time of all its threads.
    pub cpu: Duration,
    /// Resident set size, bytes.
    pub rss_bytes: u64,
}

/// Reads process `pid`'s CPU time and resident memory.
pub fn sample(pid: u32) -> Result<Sample, String> {
    let stat = Stat::read(pid)?;
    Ok(Sample {
        cpu: stat.cpu(),
        rss_bytes: stat.rss_bytes(),
    })
}

/// The soft RLIMIT_NOFILE in force; `None` is unlimited.
pub fn nofile_limit() -> Option<u64> {
    rustix::process::getrlimit(rustix::process::Resource::Nofile).current
}

/// Raises the soft RLIMIT_NOFILE to the hard limit (so many connections fit)
/// and returns the soft limit now in force (`None`: unlimited). A refusal is
/// returned as the error, with the limit unchanged.
pub fn raise_nofile_limit() -> Result<Option<u64>, (rustix::io::Errno, Option<u64>)> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current == limit.maximum {
        return Ok(limit.current);
    }
    let raised = Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => Ok(nofile_limit()),
        Err(e) => Err((e, limit.current)),
    }
}

/// Seconds since the epoch at which this process started, from /proc; now if
/// /proc cannot say.
pub fn start_time() -> f64 {
    let from_proc = || -> Option<f64> {
        let ticks = Stat::read(std::process::id()).ok()?.starttime as f64 / clock_ticks() as f64;
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let btime: f64 = stat
            .lines()
            .find_map(|l| l.strip_prefix("btime "))?
            .trim()
            .parse()
            .ok()?;
        Some(btime + ticks)
    };
    from_proc().unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64())
    })
}

/// The `process_*` families, as the Prometheus client libraries name them.
const FAMILIES: [(&str, &str, MetricType); 7] = [
    (
        "process_cpu_seconds_total",
        "Total user and system CPU time spent in seconds.",
        MetricType::COUNTER,
    ),
    (
        "process_virtual_memory_bytes",
        "Virtual memory size in bytes.",
        MetricType::GAUGE,
    ),
    (
        "process_resident_memory_bytes",
        "Resident memory size in bytes.",
        MetricType::GAUGE,
    ),
    (
        "process_threads",
        "Number of OS threads in the process.",
        MetricType::GAUGE,
    ),
    (
        "process_open_fds",
        "Number of open file descriptors.",
        MetricType::GAUGE,
    ),
    (
        "process_max_fds",
        "Maximum number of open file descriptors.",
        MetricType::GAUGE,
    ),
    (
        "process_start_time_seconds",
        "Start time of the process since unix epoch in seconds.",
        MetricType::GAUGE,
    ),
];

/// Collects the `process_*` families from /proc at scrape time. A figure /proc
/// cannot give is left out of that scrape rather than shown as a false zero.
pub struct ProcessCollector {
    descs: Vec<Desc>,
    start_time: f64,
}

impl ProcessCollector {
    /// A collector for this process.
    pub fn new() -> ProcessCollector {
        let descs = FAMILIES
            .iter()
            .map(|(name, help, _)| {
                Desc::new(
                    (*name).to_owned(),
                    (*help).to_owned(),
                    vec![],
                    HashMap::new(),
                )
                .expect("the process_* names and help texts are valid")
            })
            .collect();
        ProcessCollector {
            descs,
            start_time: start_time(),
        }
    }
}

impl Default for ProcessCollector {
    fn default() -> Self {
        ProcessCollector::new()
    }
}

impl Collector for ProcessCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<proto::MetricFamily> {
        let stat = Stat::read(std::process::id()).ok();
        // The directory handle itself is one of the entries; do not count it.
        let open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| d.count().saturating_sub(1) as f64);
        let values: [Option<f64>; 7] = [
            stat.map(|s| s.cpu().as_secs_f64()),
            stat.map(|s| s.vsize as f64),
            stat.map(|s| s.rss_bytes() as f64),
            stat.map(|s| s.threads as f64),
            open_fds,
            nofile_limit().map(|n| n as f64),
            Some(self.start_time),
        ];
        FAMILIES
            .iter()
            .zip(values)
            .filter_map(|((name, help, kind), v)| {
                Some(family(
                    name,
                    help,
                    *kind,
                    vec![metric_sample(*kind, None, v?)],
                ))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_stat_line_with_spaces_in_the_name() {
        let line = "1234 (tokio (x) y) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 555 100000 7 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0";
        let s = parse_stat(line).unwrap();
        let ticks = rustix::param::clock_ticks_per_second();
        assert_eq!(s.cpu(), Duration::from_nanos(300 * 1_000_000_000 / ticks));
        assert_eq!(s.rss_bytes(), 7 * rustix::param::page_size() as u64);
        assert_eq!((s.threads, s.starttime, s.vsize), (3, 555, 100000));
    }

    #[test]
    fn cpu_time_is_fractional() {
        let line = "1 (x) S 1 1 1 0 -1 0 0 0 0 0 1 0 0 0 20 0 1 0 5 10 1";
        let s = parse_stat(line).unwrap();
        assert!(s.cpu() > Duration::ZERO && s.cpu() < Duration::from_secs(1));
    }

    #[test]
    fn reads_our_own_process() {
        let s = sample(std::process::id()).unwrap();
        assert!(s.rss_bytes > 0);
    }

    #[test]
    fn garbage_is_none() {
        assert!(parse_stat("").is_none());
        assert!(parse_stat("1 (x) S 1 2").is_none());
    }
}
