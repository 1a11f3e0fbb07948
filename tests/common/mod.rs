//! Shared helpers for the integration tests: run the real `sockpool` binary on
//! 127.0.0.1:0, find its ports from its startup log lines, scrape its metrics, send
//! it signals. Every wait is bounded and fails with the server's log attached.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How long any single wait in a test may take before it fails.
pub const WAIT: Duration = Duration::from_secs(20);

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_sockpool")
}

/// Every alert in config/prometheus/alerts.yml (the ops tests check each one).
pub const ALERTS: &[&str] = &[
    "SockpoolDown",
    "SockpoolNearConnectionLimit",
    "SockpoolRejectingConnections",
    "SockpoolHighResetErrorRatio",
    "SockpoolWorkerSaturated",
    "SockpoolFdsNearLimit",
    "SockpoolAcceptErrors",
];

/// True under `CI=true`, where a missing tool is a failure, not a skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Whether `tool` can be started. Outside CI a missing tool skips the calling test
/// (with a note on stderr); under `CI=true` it fails it. `packages` names the
/// Debian packages that provide it.
pub fn have_tool(tool: &str, packages: &str) -> bool {
    have_tool_installed_by(
        tool,
        &format!("apt-get install -y --no-install-recommends {packages}"),
    )
}

/// [`have_tool`] for a tool that is not a Debian package: `install` is the
/// command that installs it.
pub fn have_tool_installed_by(tool: &str, install: &str) -> bool {
    match Command::new(tool)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
    {
        Ok(_) => true,
        Err(e) => {
            assert!(
                !in_ci(),
                "{tool} is required under CI=true but cannot be started: {e} ({install})"
            );
            eprintln!("SKIPPED: {tool} cannot be started ({e}); install it: {install}");
            false
        }
    }
}

/// Fails with both output streams if a finished command did not succeed.
pub fn assert_success(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Kills a child by pid; used when a wait for it has timed out.
pub fn kill(pid: u32) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    }
}

/// Waits (bounded) for a child with piped output to exit and collects that
/// output; on timeout kills it and fails, naming `what`.
pub fn output_within(child: Child, what: &str) -> Output {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(WAIT) {
        Ok(out) => out.unwrap_or_else(|e| panic!("{what}: {e}")),
        Err(_) => {
            kill(pid);
            panic!("{what} did not exit within {WAIT:?}");
        }
    }
}

/// Runs `cmd` with `input` on its stdin, then EOF, and returns its output
/// (bounded, see [`output_within`]).
pub fn run_with_input(cmd: &mut Command, input: &[u8], what: &str) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    let mut stdin = child.stdin.take().expect("stdin");
    let input = input.to_vec();
    // A separate writer: a big input must not block us while the child's output
    // fills its pipe. The child may exit before reading all of it.
    std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    output_within(child, what)
}

/// Runs `sockpool ARGS` to completion (with a time bound) and returns its output.
pub fn run(args: &[&str]) -> Output {
    let child = Command::new(bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sockpool");
    output_within(child, &format!("sockpool {args:?}"))
}

/// A child's stderr, collected line by line on a thread of its own, so that the
/// child never blocks on a full pipe and a test can wait for what it logs.
#[derive(Default)]
pub struct LogTail {
    text: Mutex<(String, bool)>, // (log, stderr closed)
    changed: Condvar,
}

impl LogTail {
    /// Starts collecting `stderr`.
    pub fn collect(stderr: impl Read + Send + 'static) -> Arc<LogTail> {
        let log = Arc::new(LogTail::default());
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut t = sink.text.lock().unwrap_or_else(PoisonError::into_inner);
                t.0.push_str(&line);
                t.0.push('\n');
                sink.changed.notify_all();
            }
            sink.text.lock().unwrap_or_else(PoisonError::into_inner).1 = true;
            sink.changed.notify_all();
        });
        log
    }

    /// Everything logged so far.
    pub fn text(&self) -> String {
        self.text
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .0
            .clone()
    }

    /// Waits until `find` finds what it looks for in the log, for at most
    /// `within`. `Err` carries the log when the time runs out or the stream
    /// closes first.
    pub fn wait_for<T>(
        &self,
        within: Duration,
        mut find: impl FnMut(&str) -> Option<T>,
    ) -> Result<T, String> {
        let deadline = Instant::now() + within;
        let mut guard = self.text.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(found) = find(&guard.0) {
                return Ok(found);
            }
            if guard.1 || Instant::now() >= deadline {
                // Return without the lock held: a caller that panics must not
                // poison it and kill the reader thread.
                return Err(guard.0.clone());
            }
            guard = self
                .changed
                .wait_timeout(guard, Duration::from_millis(100))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Waits (bounded by [`WAIT`]) until the log contains `needle` `times`
    /// times; returns the log. Panics with the log otherwise.
    pub fn wait_log(&self, needle: &str, times: usize) -> String {
        self.wait_for(WAIT, |t| {
            (t.matches(needle).count() >= times).then(|| t.to_owned())
        })
        .unwrap_or_else(|log| panic!("log never showed {needle:?} {times} times:\n{log}"))
    }
}

/// A running `sockpool serve`. Killed on drop if still running.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    log: Arc<LogTail>,
}

impl Server {
    /// Starts `sockpool serve ARGS` with both listeners on 127.0.0.1:0 (unless the
    /// arguments say otherwise) and waits for its startup lines.
    pub fn start(args: &[&str]) -> Server {
        match Server::try_start(args) {
            Ok(s) => s,
            Err((status, log)) => panic!("sockpool did not start ({status:?}):\n{log}"),
        }
    }

    /// Like [`Server::start`], with extra environment variables for the server.
    pub fn start_with_env(args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> Server {
        match Server::spawn(args, env) {
            Ok(s) => s,
            Err((status, log)) => panic!("sockpool did not start ({status:?}):\n{log}"),
        }
    }

    /// Like [`Server::start`], but returns the exit status and log if it fails.
    pub fn try_start(args: &[&str]) -> Result<Server, (Option<ExitStatus>, String)> {
        Server::spawn(args, &[])
    }

    #[allow(clippy::zombie_processes)] // every path waits: Drop, or wait_child on failure
    fn spawn(
        args: &[&str],
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Result<Server, (Option<ExitStatus>, String)> {
        let mut full: Vec<&str> = vec!["serve"];
        let has = |flag: &str| args.contains(&flag);
        if !has("--listen") && !has("--config") {
            full.extend(["--listen", "127.0.0.1:0"]);
        }
        if !has("--metrics-listen") && !has("--no-metrics") && !has("--config") {
            full.extend(["--metrics-listen", "127.0.0.1:0"]);
        }
        full.extend_from_slice(args);
        let mut child = Command::new(bin())
            .args(&full)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn sockpool");
        let log = LogTail::collect(child.stderr.take().expect("stderr"));
        let want_metrics = !has("--no-metrics");
        let found = log.wait_for(WAIT, |text| {
            let addr = find_addr(text, "listening on ")?;
            let metrics = find_addr(text, "metrics on http://");
            (metrics.is_some() || !want_metrics).then_some((addr, metrics))
        });
        match found {
            Ok((addr, metrics_addr)) => Ok(Server {
                child,
                addr,
                metrics_addr,
                log,
            }),
            Err(text) => {
                let status = wait_child(&mut child, Duration::from_secs(5));
                Err((status, text))
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the server has logged so far.
    pub fn log(&self) -> String {
        self.log.text()
    }

    /// Waits until the log contains `needle`; returns the log.
    pub fn wait_log(&self, needle: &str) -> String {
        self.log.wait_log(needle, 1)
    }

    /// A connected client socket with a 10 s read timeout.
    pub fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(self.addr).expect("connect to sockpool");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }

    /// `GET /metrics` body.
    pub fn scrape(&self) -> String {
        let addr = self.metrics_addr.expect("metrics enabled");
        let (status, _, body) = http_get(addr, "/metrics", &[]);
        assert_eq!(status, 200, "scrape failed: {body}");
        body
    }

    /// The value of one series, e.g. `sockpool_connections_closed_total{reason="reset"}`.
    pub fn metric(&self, series: &str) -> f64 {
        metric_value(&self.scrape(), series).unwrap_or_else(|| panic!("no series {series}"))
    }

    /// Waits until `series` satisfies `pred`; returns its value.
    pub fn wait_metric(&self, series: &str, pred: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + WAIT;
        loop {
            let text = self.scrape();
            if let Some(v) = metric_value(&text, series) {
                if pred(v) {
                    return v;
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "{series} never matched; last scrape:\n{text}\nlog:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the server to be at rest with `active` open connections, then checks
    /// `accepted_total = sum(closed_total) + connections_active`. Returns the scrape.
    pub fn assert_counters_add_up(&self, active: f64) -> String {
        self.wait_metric("sockpool_connections_active", |v| v == active);
        let deadline = Instant::now() + WAIT;
        loop {
            let text = self.scrape();
            let accepted = metric_value(&text, "sockpool_connections_accepted_total").unwrap();
            let closed = sum_metric(&text, "sockpool_connections_closed_total");
            let open = metric_value(&text, "sockpool_connections_active").unwrap();
            if accepted == closed + open {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "accepted {accepted} != closed {closed} + active {open}\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a signal (`rustix::process::Signal::TERM`, `INT`, `HUP`).
    pub fn signal(&self, sig: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).expect("pid");
        rustix::process::kill_process(pid, sig).expect("kill");
    }

    /// Waits (bounded) for the server to exit.
    pub fn wait_exit(&mut self) -> ExitStatus {
        wait_child(&mut self.child, WAIT)
            .unwrap_or_else(|| panic!("sockpool did not exit; log:\n{}", self.log()))
    }

    /// Threads of the server process.
    pub fn threads(&self) -> usize {
        self.proc_entries("task")
    }

    /// Open file descriptors of the server process.
    pub fn fds(&self) -> usize {
        self.proc_entries("fd")
    }

    /// Entries of a /proc/PID directory. An unreadable one fails the test: read as
    /// zero it would make every "back to baseline" check pass.
    fn proc_entries(&self, dir: &str) -> usize {
        let path = format!("/proc/{}/{dir}", self.pid());
        let entries = std::fs::read_dir(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        entries.count()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Waits up to `limit` for `child` to exit; kills it and returns `None` past that.
pub fn wait_child(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The address after `marker` in sockpool's own startup lines (`] listening on `),
/// skipping any other line that happens to contain the marker.
fn find_addr(log: &str, marker: &str) -> Option<SocketAddr> {
    log.lines().find_map(|line| {
        let rest = &line[line.find(&format!("] {marker}"))? + 2 + marker.len()..];
        let end = rest.find([' ', '/']).unwrap_or(rest.len());
        rest[..end].parse().ok()
    })
}

/// The value of one exact series in a Prometheus text scrape.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// The sum over every label set of a metric.
pub fn sum_metric(text: &str, name: &str) -> f64 {
    let prefix = format!("{name}{{");
    text.lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A minimal HTTP/1.0 GET: (status, header block, body).
pub fn http_get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, String, String) {
    http_request(addr, "GET", path, headers)
}

/// A minimal HTTP/1.0 request: (status, header block, body).
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).expect("connect to metrics");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read response");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, head.to_string(), body.to_string())
}

/// Reads from `s` until `want` bytes have arrived (or EOF/timeout); returns them.
pub fn read_exact_bytes(s: &mut TcpStream, want: usize) -> Vec<u8> {
    let mut buf = vec![0; want];
    let mut got = 0;
    while got < want {
        match s.read(&mut buf[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    buf.truncate(got);
    buf
}

/// Reads until EOF (bounded by the socket's read timeout).
pub fn read_to_eof(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

/// A client socket that resets (RST) instead of closing: SO_LINGER 0.
pub fn reset(s: TcpStream) {
    let sock = socket2::Socket::from(s);
    sock.set_linger(Some(Duration::ZERO)).unwrap();
    drop(sock);
}

// ---------------------------------------------------------------- fault-suite helpers
// Shared by the fault suites (resets, slow_clients, lifecycle, limits, signals,
// config_errors) and the protocol tests.

/// The reply to one line (line framing, or a read chunk that ends in `\n`):
/// `Server received "<body>"\n`.
pub fn ack(body: impl AsRef<[u8]>) -> Vec<u8> {
    let mut v = ack_unterminated(body);
    v.push(b'\n');
    v
}

/// The reply to a read chunk without a final `\n`, or to a final line at EOF:
/// `Server received "<body>"`, no `\n`.
pub fn ack_unterminated(body: impl AsRef<[u8]>) -> Vec<u8> {
    [&b"Server received \""[..], body.as_ref(), b"\""].concat()
}

/// The series of `sockpool_connections_closed_total` for one reason.
pub fn closed(reason: &str) -> String {
    format!("sockpool_connections_closed_total{{reason=\"{reason}\"}}")
}

/// A fresh client gets the right answer for the server's mode.
pub fn assert_served(server: &Server) {
    let echo = server.log().contains("(mode=echo");
    let mut c = server.connect();
    c.write_all(b"fresh\n").unwrap();
    let want = if echo {
        b"fresh\n".to_vec()
    } else {
        ack("fresh")
    };
    assert_eq!(
        read_exact_bytes(&mut c, want.len()),
        want,
        "log:\n{}",
        server.log()
    );
}

/// How every fault case ends: a fresh client is served and the counters add up
/// with `active` connections still open.
pub fn end_case(server: &Server, active: f64) -> String {
    assert_served(server);
    server.assert_counters_add_up(active)
}

/// A client socket bound to `src` before connecting.
pub fn connect_from(addr: SocketAddr, src: std::net::Ipv4Addr) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    s.bind(&SocketAddr::from((src, 0)).into())?;
    s.connect(&addr.into())?;
    Ok(s.into())
}

/// A number field of a `/proc/.../status` file (`VmRSS:  123 kB` gives 123).
pub fn status_field(status_path: &str, key: &str) -> u64 {
    let status =
        std::fs::read_to_string(status_path).unwrap_or_else(|e| panic!("read {status_path}: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {status_path}"))
}

/// `VmRSS` of a process, in bytes.
pub fn rss(pid: u32) -> u64 {
    status_field(&format!("/proc/{pid}/status"), "VmRSS") * 1024
}

/// Waits (bounded by [`WAIT`]) until `f` holds.
pub fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Reads until the server closes the connection and returns what came first.
/// Unlike [`read_to_eof`], a read timeout ([`WAIT`]) fails: "closed" and "still
/// open after a while" must not look alike.
pub fn read_until_closed(s: &mut TcpStream) -> Vec<u8> {
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return out,
            Err(e) => panic!("not closed within {WAIT:?} ({e}); got {out:?}"),
        }
    }
}

/// The cases that load the machine take turns within one test binary, so that
/// they neither starve each other nor the others on a 2-core machine.
static HEAVY: Mutex<()> = Mutex::new(());

pub fn heavy() -> std::sync::MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(PoisonError::into_inner)
}
/// A bounded background load of short clients (tests/common/load.rs).
pub mod load;
/// A real Prometheus for the tests (tests/common/prometheus.rs).
pub mod prometheus;
/// The `n`th of the 4,161,536 source addresses 127.64.0.1-127.127.255.254, a
/// different one for every `n` below that (so a per-IP limit never sees two).
pub fn spread_source(n: u32) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::new(
        127,
        64 + (n / (256 * 254) % 64) as u8,
        (n / 254 % 256) as u8,
        1 + (n % 254) as u8,
    )
}

/// A client socket to `addr` from source address [`spread_source`]`(n)`, with a
/// connect timeout. Load loops that open thousands of connections use it so that
/// their TIME_WAIT sockets are spread over many source addresses instead of
/// exhausting the ephemeral ports of 127.0.0.1 for every other test on the
/// machine.
pub fn connect_spread(addr: SocketAddr, n: u32, timeout: Duration) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let source = spread_source(n);
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    sock.bind(&SocketAddr::from((source, 0)).into())?;
    sock.connect_timeout(&addr.into(), timeout)?;
    let s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    Ok(s)
}

/// A file of the repository, by its path relative to the crate root.
pub fn repo_file(rel: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}
