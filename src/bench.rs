//! `sockpool bench`: the load generator.
//!
//! A few threads each drive many connections from one mio readiness loop (never a
//! thread per connection), so the generator stays cheaper per message than the server
//! it measures. Every reply is checked byte for byte; latencies go into one HDR
//! histogram per thread, merged at the end.
//!
//! # Layout
//! - `workload`: what is sent and what must come back (pure, on bytes)
//! - `driver`: one load thread's readiness loop and per-connection state
//! - `procstat` (`metrics::process`): the server's CPU time and RSS from `/proc/PID/stat`
//! - this file: flags, connection set-up, the progress bar, the report

mod driver;
use crate::metrics::process as procstat;
mod workload;

use std::io::{IsTerminal, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

pub use workload::{Mode, ProxyVersion};

/// Most load threads chosen by default: the generator must leave the server's core
/// alone, and on the benchmark host it is pinned to one core of its own.
const DEFAULT_MAX_THREADS: usize = 2;
/// File descriptors kept spare beyond the run's sockets (stdio, epoll, etc.).
const SPARE_FDS: u64 = 64;
/// Interval between progress bar updates.
const PROGRESS_EVERY: Duration = Duration::from_millis(200);
/// Interval between metrics scrapes with `--scrape`.
const SCRAPE_EVERY: Duration = Duration::from_secs(1);

/// `sockpool bench` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:20000")]
    pub addr: String,
    /// Concurrent connections (with --churn: concurrent clients).
    #[arg(long, short = 'c', default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub connections: u32,
    /// Request size in bytes on the wire (ack-line: the newline included).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=16_777_216))]
    pub size: u32,
    /// Measured time, e.g. 500ms, 10s, 1m.
    #[arg(long, short = 'd', default_value = "10s", value_parser = parse_nonzero_duration)]
    pub duration: Duration,
    /// Load applied before measuring starts (verified, not counted).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// What the server is expected to answer.
    #[arg(long, value_enum, default_value_t = Mode::Echo)]
    pub mode: Mode,
    /// Requests kept outstanding per connection (1 = ping-pong).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub pipeline: u32,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Extra idle connections held open during the run.
    #[arg(long, default_value_t = 0)]
    pub hold: u32,
    /// A fresh connection per message (connect, one request, reply, close); with
    /// --messages-per-connection N, per N messages (a short session).
    #[arg(long)]
    pub churn: bool,
    /// With --churn: ping-pong messages each connection carries before the client
    /// closes it (1 = connect, one message, close).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub messages_per_connection: u32,
    /// Most connections one --churn run opens, warm-up included (bounds TIME_WAIT
    /// sockets). The warm-up may use at most half of them, so the measured window
    /// always gets the rest; a run that reaches the limit ends early and reports
    /// what it measured.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub churn_limit: u64,
    /// Load threads [default: 2, or fewer cores or connections].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub threads: Option<u32>,
    /// A reply or connect missing for this long fails its connection.
    #[arg(long, default_value = "5s", value_parser = parse_nonzero_duration)]
    pub timeout: Duration,
    /// Server process id: report its CPU time per message and RSS over the measured window.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Start each connection with a PROXY header (v1 or v2, default v2) naming the
    /// client's own addresses, as HAProxy `send-proxy[-v2]` would: for a server
    /// with `--proxy-protocol`.
    #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "v2", value_name = "VERSION")]
    pub proxy_header: Option<ProxyVersion>,
    /// Metrics address (HOST:PORT): GET /metrics every second while measuring.
    #[arg(long, value_name = "HOST:PORT")]
    pub scrape: Option<String>,
}

/// Parses a human duration exactly as the server's config does (`0`, `250ms`,
/// `30s`, `5m`, `2h`), naming the value on error.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    crate::config::parse_duration(text).map_err(|e| format!("duration {text:?}: {e}"))
}

fn parse_nonzero_duration(text: &str) -> Result<Duration, String> {
    match parse_duration(text)? {
        Duration::ZERO => Err(format!("duration {text:?} must be more than 0")),
        d => Ok(d),
    }
}

/// Latency percentiles, microseconds.
#[derive(Debug, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

/// A process's cost over the measured window: the server's (with `--server-pid`) or
/// the load generator's own, which shows whether the generator could be the limit.
#[derive(Debug, Serialize)]
pub struct ProcessCost {
    /// CPU time (user + system, all threads), microseconds.
    pub cpu_us: f64,
    pub cpu_us_per_msg: Option<f64>,
    /// CPU time / wall time: 1.0 is one core fully busy.
    pub cpu_util: f64,
    /// Resident memory at the end of the window, bytes.
    pub rss_bytes: u64,
}

/// Everything a run measured; `--json` prints it as one object.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub addr: String,
    pub mode: Mode,
    pub connections: u32,
    pub size: u32,
    pub pipeline: u32,
    pub threads: usize,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub hold: u32,
    pub held_open: u32,
    pub churn: bool,
    /// With churn: messages per connection before the client closes it.
    pub messages_per_connection: u32,
    pub connections_opened: u64,
    /// Churn: the run opened `--churn-limit` connections and ended early.
    pub churn_limit_reached: bool,
    /// Replies completed and verified inside the measured window.
    pub messages: u64,
    pub msgs_per_s: f64,
    /// Request bytes per second, in 10^6 bytes (the echoed bytes, for echo).
    pub mb_per_s: f64,
    pub latency_us: Latency,
    /// Connections that failed (refused, reset, closed early, timed out).
    pub errors: u64,
    /// Replies that differed from what was owed.
    pub mismatches: u64,
    pub first_error: Option<String>,
    pub first_mismatch: Option<String>,
    pub server: Option<ProcessCost>,
    /// This load generator (all its threads).
    pub client: Option<ProcessCost>,
    pub scrapes_ok: u64,
    pub scrapes_failed: u64,
}

impl Summary {
    fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(e) = &self.first_error {
            out.push(format!("{} connection error(s), first: {e}", self.errors));
        }
        if let Some(m) = &self.first_mismatch {
            out.push(format!(
                "{} mismatched replies, first: {m}",
                self.mismatches
            ));
        }
        if self.messages == 0 && self.errors == 0 && self.mismatches == 0 {
            out.push("no reply completed in the measured window".into());
        }
        if self.held_open < self.hold {
            out.push(format!(
                "{} of {} held connections were closed by the server during the run",
                self.hold - self.held_open,
                self.hold
            ));
        }
        if self.scrapes_failed > 0 {
            out.push(format!("{} metrics scrape(s) failed", self.scrapes_failed));
        }
        out
    }

    fn print_table(&self, out: &mut impl Write) -> std::io::Result<()> {
        let shape = if self.churn {
            format!(
                "churn, {} clients, {} message(s) per connection",
                self.connections, self.messages_per_connection
            )
        } else {
            format!(
                "{} connections, pipeline {}",
                self.connections, self.pipeline
            )
        };
        writeln!(
            out,
            "sockpool bench: {} {}, {}, {} B, {} threads, {:.1}s (+{:.1}s warm-up){}",
            self.addr,
            self.mode.name(),
            shape,
            self.size,
            self.threads,
            self.duration_s,
            self.warmup_s,
            if self.hold > 0 {
                format!(", {} held", self.hold)
            } else {
                String::new()
            }
        )?;
        let l = &self.latency_us;
        let rows = [
            ("messages", self.messages.to_string()),
            ("msgs/s", format!("{:.0}", self.msgs_per_s)),
            ("MB/s", format!("{:.2}", self.mb_per_s)),
            ("latency p50", format_us(l.p50)),
            ("latency p90", format_us(l.p90)),
            ("latency p99", format_us(l.p99)),
            ("latency p99.9", format_us(l.p999)),
            ("latency max", format_us(l.max)),
            ("errors", self.errors.to_string()),
            ("mismatches", self.mismatches.to_string()),
        ];
        for (name, value) in rows {
            writeln!(out, "  {name:<14} {value:>12}")?;
        }
        if self.churn {
            writeln!(
                out,
                "  {:<14} {:>12}",
                "connections", self.connections_opened
            )?;
            if self.churn_limit_reached {
                writeln!(
                    out,
                    "  (--churn-limit reached: the rates are over the time the run lasted)"
                )?;
            }
        }
        if self.hold > 0 {
            writeln!(
                out,
                "  {:<14} {:>12}",
                "held open",
                format!("{}/{}", self.held_open, self.hold)
            )?;
        }
        for (who, cost) in [("server", &self.server), ("bench", &self.client)] {
            let Some(c) = cost else { continue };
            let per = c
                .cpu_us_per_msg
                .map_or_else(String::new, |p| format!(", {p:.2} µs/msg"));
            let value = format!("{:.0}%{per}", c.cpu_util * 100.0);
            writeln!(out, "  {:<14} {value:>12}", format!("{who} CPU"))?;
        }
        if let Some(s) = &self.server {
            let rss = format!("{:.1} MiB", s.rss_bytes as f64 / 1_048_576.0);
            writeln!(out, "  {:<14} {rss:>12}", "server RSS")?;
        }
        if self.scrapes_ok + self.scrapes_failed > 0 {
            writeln!(
                out,
                "  {:<14} {:>12}",
                "scrapes",
                format!("{} ok", self.scrapes_ok)
            )?;
        }
        Ok(())
    }
}

fn format_us(us: f64) -> String {
    if us >= 10_000.0 {
        format!("{:.1} ms", us / 1000.0)
    } else {
        format!("{us:.1} µs")
    }
}

/// Raises the soft open-files limit to the hard one, so many held connections fit.
/// Returns the limit now in force.
fn raise_nofile_limit() -> u64 {
    crate::metrics::process::raise_nofile_limit()
        .unwrap_or_else(|(_, unchanged)| unchanged)
        .unwrap_or(u64::MAX)
}

fn resolve(addr: &str) -> Result<SocketAddr, String> {
    addr.to_socket_addrs()
        .map_err(|e| format!("cannot resolve {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr} resolves to no address"))
}

fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, String> {
    let stream = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    stream
        .set_nodelay(true)
        .map_err(|e| format!("cannot set TCP_NODELAY on a connection to {addr}: {e}"))?;
    Ok(stream)
}

/// [`connect`], then the PROXY header if `--proxy-header` asks for one.
fn connect_with(
    addr: SocketAddr,
    timeout: Duration,
    proxy: Option<ProxyVersion>,
) -> Result<TcpStream, String> {
    let mut stream = connect(addr, timeout)?;
    if let Some(version) = proxy {
        let local = stream
            .local_addr()
            .map_err(|e| format!("local address of a connection to {addr}: {e}"))?;
        stream
            .write_all(&workload::proxy_header(version, local, addr))
            .map_err(|e| format!("cannot send the PROXY header to {addr}: {e}"))?;
    }
    Ok(stream)
}

/// An idle held connection is still open when reading would block: no EOF, no reset,
/// and nothing sent to it (such as a busy message before a close).
fn still_open(stream: &TcpStream) -> bool {
    if stream.set_nonblocking(true).is_err() {
        return false;
    }
    let mut byte = [0u8; 1];
    matches!(stream.peek(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// One GET /metrics; true on a 200 with the whole body read.
fn scrape_once(addr: &str, timeout: Duration) -> bool {
    let Ok(target) = resolve(addr) else {
        return false;
    };
    let Ok(mut stream) = TcpStream::connect_timeout(&target, timeout) else {
        return false;
    };
    if stream.set_read_timeout(Some(timeout)).is_err()
        || stream.set_write_timeout(Some(timeout)).is_err()
    {
        return false;
    }
    let request = format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut response = Vec::new();
    // Bounded: a metrics page is small; a server streaming forever is a failure.
    let read = (&mut stream).take(64 << 20).read_to_end(&mut response);
    read.is_ok() && (response.starts_with(b"HTTP/1.1 200") || response.starts_with(b"HTTP/1.0 200"))
}

/// Scrapes `addr` every second from `from` until `until` or `stop`; returns (ok, failed).
fn scrape_loop(
    addr: &str,
    from: Instant,
    until: Instant,
    timeout: Duration,
    stop: &AtomicBool,
) -> (u64, u64) {
    let (mut ok, mut failed) = (0, 0);
    let mut next = from;
    while next < until && !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now < next {
            thread::sleep((next - now).min(PROGRESS_EVERY));
            continue;
        }
        if scrape_once(addr, timeout) {
            ok += 1;
        } else {
            failed += 1;
        }
        next += SCRAPE_EVERY;
    }
    (ok, failed)
}

fn progress_bar(total: Duration) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total.as_millis() as u64);
    let style = ProgressStyle::with_template("{spinner} [{bar:32}] {elapsed:>4} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    bar.set_style(style);
    bar
}

/// Sleeps until `until`, updating the progress bar; stops early when every load
/// thread is done (a server that went away ends the run without waiting it out).
fn wait_with_progress(
    until: Instant,
    start: Instant,
    bar: &ProgressBar,
    completed: &AtomicU64,
    running: &AtomicU64,
) {
    let mut last = (Instant::now(), completed.load(Ordering::Relaxed));
    loop {
        let now = Instant::now();
        if now >= until || running.load(Ordering::Acquire) == 0 {
            return;
        }
        thread::sleep((until - now).min(PROGRESS_EVERY));
        let now = Instant::now();
        let count = completed.load(Ordering::Relaxed);
        let rate = (count - last.1) as f64 / now.duration_since(last.0).as_secs_f64().max(1e-9);
        last = (now, count);
        bar.set_position(now.duration_since(start).as_millis() as u64);
        bar.set_message(format!("{count} msgs, {rate:.0}/s"));
    }
}

/// Runs the load generator.
pub fn main(args: BenchArgs) -> ExitCode {
    match run(&args) {
        Ok(summary) => {
            let failures = summary.failures();
            let printed = if args.json {
                serde_json::to_string(&summary)
                    .map_err(std::io::Error::other)
                    .and_then(|text| writeln!(std::io::stdout(), "{text}"))
            } else {
                summary.print_table(&mut std::io::stdout())
            };
            if let Err(e) = printed {
                eprintln!("error: cannot write the report: {e}");
                return ExitCode::FAILURE;
            }
            for failure in &failures {
                eprintln!("error: {failure}");
            }
            if failures.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `limit` split over `threads` as evenly as can be, summing to exactly `limit`.
fn churn_shares(limit: u64, threads: usize) -> Vec<u64> {
    let n = threads.max(1) as u64;
    (0..n)
        .map(|i| limit / n + u64::from(i < limit % n))
        .collect()
}

/// Sets up connections, runs the load threads, and gathers the summary.
pub fn run(args: &BenchArgs) -> Result<Summary, String> {
    let workload = workload::Workload::new(args.mode, args.size as usize)?;
    let addr = resolve(&args.addr)?;
    let slots = args.connections as usize;
    let threads = match args.threads {
        Some(t) => t as usize,
        None => thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(DEFAULT_MAX_THREADS),
    }
    .min(slots);
    // With churn, a thread with no connection to open would only idle.
    let threads = if args.churn {
        threads.min(usize::try_from(args.churn_limit).unwrap_or(usize::MAX))
    } else {
        threads
    };

    if let Some(pid) = args.server_pid {
        // Checked before any load, so a wrong pid is a clear error, not a lost run.
        procstat::sample(pid).map_err(|e| format!("--server-pid {pid}: {e}"))?;
    }
    let fd_limit = raise_nofile_limit();
    let needed = u64::from(args.hold) + u64::from(args.connections) + SPARE_FDS;
    if needed > fd_limit {
        return Err(format!(
            "{} held + {} connections need about {needed} file descriptors; the limit is {fd_limit}",
            args.hold, args.connections
        ));
    }

    // Connect everything before the clock starts: a refused address fails here, with
    // a clear message, before any thread is started.
    let mut streams = Vec::new();
    if args.churn {
        drop(connect_with(addr, args.timeout, args.proxy_header)?);
    } else {
        for id in 0..slots {
            streams.push((
                id as u64,
                connect_with(addr, args.timeout, args.proxy_header)?,
            ));
        }
    }
    let mut held = Vec::with_capacity(args.hold as usize);
    for i in 0..args.hold {
        let stream = connect_with(addr, args.timeout, args.proxy_header)
            .map_err(|e| format!("held connection {} of {}: {e}", i + 1, args.hold))?;
        held.push(stream);
    }

    let start = Instant::now();
    let measure_start = start + args.warmup;
    let end = measure_start + args.duration;
    let plan = Arc::new(driver::Plan {
        addr,
        workload,
        depth: args.pipeline as usize,
        churn: args.churn,
        messages_per_connection: u64::from(args.messages_per_connection),
        measure_start,
        end,
        reply_timeout: args.timeout,
        churn_limits: churn_shares(args.churn_limit, threads),
        churn_warmup_limits: churn_shares(args.churn_limit, threads)
            .into_iter()
            .map(|limit| limit / 2)
            .collect(),
        threads,
        proxy_header: args.proxy_header,
    });
    let completed = Arc::new(AtomicU64::new(0));
    let running = Arc::new(AtomicU64::new(threads as u64));

    let mut per_thread: Vec<Vec<(u64, TcpStream)>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, stream) in streams.into_iter().enumerate() {
        per_thread[i % threads].push(stream);
    }
    let mut handles = Vec::new();
    for (index, streams) in per_thread.into_iter().enumerate() {
        let churn_slots = if args.churn {
            slots / threads + usize::from(index < slots % threads)
        } else {
            0
        };
        let (plan, completed, running) = (plan.clone(), completed.clone(), running.clone());
        let handle = thread::Builder::new()
            .name(format!("bench-{index}"))
            .spawn(move || {
                let report = driver::run(&plan, index, streams, churn_slots, &completed);
                running.fetch_sub(1, Ordering::Release);
                report
            })
            .map_err(|e| format!("cannot start a load thread: {e}"))?;
        handles.push(handle);
    }

    let stop_scraping = Arc::new(AtomicBool::new(false));
    let scraper = match &args.scrape {
        Some(metrics) => {
            let (metrics, stop, timeout) = (metrics.clone(), stop_scraping.clone(), args.timeout);
            let handle = thread::Builder::new()
                .name("bench-scrape".into())
                .spawn(move || scrape_loop(&metrics, measure_start, end, timeout, &stop))
                .map_err(|e| format!("cannot start the scrape thread: {e}"))?;
            Some(handle)
        }
        None => None,
    };

    let bar = progress_bar(end - start);
    wait_with_progress(measure_start, start, &bar, &completed, &running);
    // A server that went away mid-run has no /proc entry left: the run is still
    // reported (its errors say what happened), without the server's cost.
    let server_before = args.server_pid.and_then(|pid| procstat::sample(pid).ok());
    let client_before = procstat::sample(std::process::id()).ok();
    wait_with_progress(end, start, &bar, &completed, &running);
    let server_after = args.server_pid.and_then(|pid| procstat::sample(pid).ok());
    let client_after = procstat::sample(std::process::id()).ok();
    let window = Instant::now()
        .saturating_duration_since(measure_start)
        .min(args.duration);
    bar.finish_and_clear();

    let held_open = held.iter().filter(|s| still_open(s)).count() as u32;
    drop(held);

    let mut hist = driver::new_histogram().map_err(|e| e.to_string())?;
    let mut summary = Summary {
        addr: addr.to_string(),
        mode: args.mode,
        connections: args.connections,
        size: args.size,
        pipeline: args.pipeline,
        threads,
        duration_s: args.duration.as_secs_f64(),
        warmup_s: args.warmup.as_secs_f64(),
        hold: args.hold,
        held_open,
        churn: args.churn,
        messages_per_connection: args.messages_per_connection,
        connections_opened: 0,
        churn_limit_reached: false,
        messages: 0,
        msgs_per_s: 0.0,
        mb_per_s: 0.0,
        latency_us: Latency {
            p50: 0.0,
            p90: 0.0,
            p99: 0.0,
            p999: 0.0,
            max: 0.0,
            mean: 0.0,
        },
        errors: 0,
        mismatches: 0,
        first_error: None,
        first_mismatch: None,
        server: None,
        client: None,
        scrapes_ok: 0,
        scrapes_failed: 0,
    };
    for handle in handles {
        let report = handle
            .join()
            .map_err(|_| "a load thread panicked".to_string())?
            .map_err(|e| format!("load thread failed: {e}"))?;
        // Both histograms have the same bounds, so adding cannot fail.
        let _ = hist.add(&report.hist);
        summary.messages += report.messages;
        summary.errors += report.errors;
        summary.mismatches += report.mismatches;
        summary.connections_opened += report.connections_opened;
        summary.churn_limit_reached |= report.churn_limit_reached;
        if summary.first_error.is_none() {
            summary.first_error = report.first_error;
        }
        if summary.first_mismatch.is_none() {
            summary.first_mismatch = report.first_mismatch;
        }
    }
    stop_scraping.store(true, Ordering::Relaxed);
    if let Some(scraper) = scraper {
        let (ok, failed) = scraper
            .join()
            .map_err(|_| "the scrape thread panicked".to_string())?;
        summary.scrapes_ok = ok;
        summary.scrapes_failed = failed;
    }

    // Rates are over the configured window, so runs of equal length compare; a run
    // that ended early (every connection failed) is reported over what it lasted.
    let seconds = window.as_secs_f64().max(1e-9);
    summary.msgs_per_s = summary.messages as f64 / seconds;
    summary.mb_per_s = summary.msgs_per_s * f64::from(args.size) / 1e6;
    let us = |nanos: u64| nanos as f64 / 1000.0;
    if !hist.is_empty() {
        summary.latency_us = Latency {
            p50: us(hist.value_at_quantile(0.5)),
            p90: us(hist.value_at_quantile(0.9)),
            p99: us(hist.value_at_quantile(0.99)),
            p999: us(hist.value_at_quantile(0.999)),
            max: us(hist.max()),
            mean: hist.mean() / 1000.0,
        };
    }
    let messages = summary.messages;
    let cost = |before: Option<procstat::Sample>, after: Option<procstat::Sample>| {
        let (before, after) = (before?, after?);
        let cpu = after.cpu.saturating_sub(before.cpu);
        let cpu_us = cpu.as_secs_f64() * 1e6;
        Some(ProcessCost {
            cpu_us,
            cpu_us_per_msg: (messages > 0).then(|| cpu_us / messages as f64),
            cpu_util: cpu.as_secs_f64() / seconds,
            rss_bytes: after.rss_bytes,
        })
    };
    summary.server = cost(server_before, server_after);
    summary.client = cost(client_before, client_after);
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_in_every_unit() {
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
    }

    #[test]
    fn bad_durations_are_clear_errors() {
        for bad in ["", "10", "s", "10x", "1..2s", "-1s", "1e999s", "5 m"] {
            let err = parse_duration(bad).unwrap_err();
            assert!(err.contains("duration"), "{bad}: {err}");
        }
        assert!(parse_nonzero_duration("0").is_err());
        assert!(parse_nonzero_duration("0s").is_err());
    }

    #[test]
    fn churn_limit_is_split_exactly_and_warm_up_gets_under_half() {
        assert_eq!(churn_shares(2000, 2), [1000, 1000]);
        assert_eq!(churn_shares(5, 2), [3, 2]);
        assert_eq!(churn_shares(1, 1), [1]);
        for (limit, threads) in [(1u64, 1usize), (7, 3), (100_000, 4), (3, 3)] {
            let shares = churn_shares(limit, threads);
            assert_eq!(shares.iter().sum::<u64>(), limit);
            // Every thread's measured window gets at least one connection.
            assert!(shares.iter().all(|&s| s - s / 2 >= 1), "{shares:?}");
        }
    }

    #[test]
    fn resolve_names_the_address_on_failure() {
        assert!(resolve("127.0.0.1:1").is_ok());
        assert!(resolve("no port").unwrap_err().contains("no port"));
    }
}
