//! Black-box tests of the metrics sidecar over real sockets on 127.0.0.1.
//!
//! Every test takes `SERIAL`: some count the threads and fds of this process, and
//! one runs it out of file descriptors on purpose; nothing else may run meanwhile.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use rustix::process::{getrlimit, setrlimit, Resource};
use sockpool::http::{RenderFn, Sidecar, SidecarOptions};

/// Longest a test waits for any one answer; a hang fails instead of blocking CI.
const PATIENCE: Duration = Duration::from_secs(10);

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    // `SOCKPOOL_TEST_LOG=debug cargo test -- --nocapture` shows the sidecar's log.
    if let Some(level) = std::env::var("SOCKPOOL_TEST_LOG")
        .ok()
        .and_then(|l| l.parse::<log::LevelFilter>().ok())
    {
        let _ = simplelog::WriteLogger::init(level, simplelog::Config::default(), io::stderr());
    }
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

struct Running {
    sidecar: Sidecar,
    ready: Arc<AtomicBool>,
    addr: SocketAddr,
}

fn render() -> RenderFn {
    let scrapes = Arc::new(AtomicU64::new(0));
    Arc::new(move |out: &mut String| {
        let n = scrapes.fetch_add(1, Ordering::Relaxed) + 1;
        out.push_str("# HELP test_up Always 1.\n# TYPE test_up gauge\ntest_up 1\n");
        out.push_str(&format!("test_scrapes_total {n}\n"));
    })
}

fn start(opts: SidecarOptions) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let ready = Arc::new(AtomicBool::new(true));
    let sidecar = Sidecar::start(listener, opts, render(), Arc::clone(&ready)).expect("start");
    let addr = sidecar.local_addr();
    Running {
        sidecar,
        ready,
        addr,
    }
}

/// Names of this process's sidecar threads (`metrics-http`, `metrics-resp-N`).
/// tiny_http's own threads (`metrics-backend`) cannot be joined; they end on
/// their own within 5 s of the server being dropped.
fn sidecar_threads() -> Vec<String> {
    threads_named("/proc/self/task", |name| {
        name == "metrics-http" || name.starts_with("metrics-resp-")
    })
}

/// Names of the threads under `task_dir` that `keep` selects. Panics when the
/// directory or a thread's name cannot be read: read as "no threads", an
/// unreadable /proc would pass every "no threads left" check.
fn threads_named(task_dir: &str, keep: impl Fn(&str) -> bool) -> Vec<String> {
    let tasks = fs::read_dir(task_dir).unwrap_or_else(|e| panic!("{task_dir}: {e}"));
    let mut names = Vec::new();
    for task in tasks {
        let task = task.unwrap_or_else(|e| panic!("{task_dir}: {e}"));
        let comm = task.path().join("comm");
        match fs::read_to_string(&comm) {
            Ok(name) => names.push(name.trim().to_owned()),
            // A thread that ended between the listing and the read.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => panic!("{}: {e}", comm.display()),
        }
    }
    names.retain(|n| keep(n));
    names
}

#[test]
#[should_panic(expected = "/no/such/proc/task")]
fn thread_listing_fails_when_proc_is_unreadable() {
    threads_named("/no/such/proc/task", |_| true);
}

/// Shuts down and checks the promise that every thread it started was joined:
/// a lost wake-up leaves one behind (shutdown gives up on it after 5 s).
fn stop(r: Running) {
    r.sidecar.shutdown();
    let left = sidecar_threads();
    assert!(left.is_empty(), "threads left after shutdown: {left:?}");
}

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, PATIENCE).expect("connect");
    s.set_read_timeout(Some(PATIENCE)).expect("read timeout");
    s.set_write_timeout(Some(PATIENCE)).expect("write timeout");
    s
}

/// Everything the server sends until it closes (it serves one request per connection).
fn read_all(s: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    Ok(buf)
}

fn parse(raw: &[u8]) -> Reply {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Reply {
        status,
        headers,
        body: raw[end + 4..].to_vec(),
    }
}

fn exchange(addr: SocketAddr, request: &[u8]) -> Reply {
    let mut s = connect(addr);
    s.write_all(request).expect("send request");
    parse(&read_all(&mut s).expect("read reply"))
}

fn get(addr: SocketAddr, path: &str) -> Reply {
    exchange(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes(),
    )
}

fn get_with_auth(addr: SocketAddr, auth: &str) -> Reply {
    exchange(
        addr,
        format!("GET /metrics HTTP/1.1\r\nHost: test\r\nAuthorization: {auth}\r\n\r\n").as_bytes(),
    )
}

/// True once the server has closed `s` (EOF or reset), false if it kept it open.
fn closed_by_server(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue, // a last status line (408, 431, 503) before the close
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

fn count_entries(dir: &str) -> usize {
    // Read as zero, an unreadable directory would pass every "no growth" check.
    fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .count()
}

fn opts_with_token(token: &str) -> SidecarOptions {
    SidecarOptions {
        bearer_token: Some(token.to_owned()),
        ..SidecarOptions::default()
    }
}

#[test]
fn metrics_is_prometheus_text() {
    let _g = serial();
    let r = start(SidecarOptions::default());
    let reply = get(r.addr, "/metrics");
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.header("Content-Type"),
        Some("text/plain; version=0.0.4")
    );
    let body = String::from_utf8(reply.body.clone()).expect("utf-8 body");
    assert!(body.contains("test_up 1\n"), "{body:?}");
    assert!(body.contains("test_scrapes_total 1\n"), "{body:?}");
    // One request per connection, and the client is told so.
    assert_eq!(reply.header("Connection"), Some("close"));
    // The query string does not change the route.
    assert_eq!(get(r.addr, "/metrics?x=1").status, 200);
    stop(r);
}

#[test]
fn healthy_and_index_page() {
    let _g = serial();
    let r = start(SidecarOptions::default());
    let healthy = get(r.addr, "/-/healthy");
    assert_eq!(healthy.status, 200);

    let index = get(r.addr, "/");
    assert_eq!(index.status, 200);
    assert!(index
        .header("Content-Type")
        .is_some_and(|v| v.starts_with("text/html")));
    let page = String::from_utf8(index.body).expect("utf-8 page");
    assert!(page.contains("sockpool"), "{page}");
    assert!(page.contains(env!("CARGO_PKG_VERSION")), "{page}");
    for link in [
        "href=\"/metrics\"",
        "href=\"/-/healthy\"",
        "href=\"/-/ready\"",
    ] {
        assert!(page.contains(link), "missing {link} in {page}");
    }
    stop(r);
}

#[test]
fn ready_follows_the_flag() {
    let _g = serial();
    let r = start(SidecarOptions::default());
    assert_eq!(get(r.addr, "/-/ready").status, 200);
    r.ready.store(false, Ordering::SeqCst);
    assert_eq!(get(r.addr, "/-/ready").status, 503);
    // Draining is not sickness.
    assert_eq!(get(r.addr, "/-/healthy").status, 200);
    r.ready.store(true, Ordering::SeqCst);
    assert_eq!(get(r.addr, "/-/ready").status, 200);
    stop(r);
}

#[test]
fn head_has_headers_but_no_body() {
    let _g = serial();
    let r = start(SidecarOptions::default());
    let reply = exchange(r.addr, b"HEAD /metrics HTTP/1.1\r\nHost: test\r\n\r\n");
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.header("Content-Type"),
        Some("text/plain; version=0.0.4")
    );
    assert!(reply.body.is_empty(), "HEAD body: {:?}", reply.body);
    let head_root = exchange(r.addr, b"HEAD / HTTP/1.1\r\nHost: test\r\n\r\n");
    assert_eq!(head_root.status, 200);
    assert!(head_root.body.is_empty());
    stop(r);
}

#[test]
fn unknown_path_is_404() {
    let _g = serial();
    let r = start(SidecarOptions::default());
    for path in ["/nope", "/metrics/", "/-/", "/metricsx", "//metrics"] {
        assert_eq!(get(r.addr, path).status, 404, "{path}");
    }
    stop(r);
}

#[test]
fn other_methods_are_405_with_allow() {
    let _g = serial();
    let r = start(SidecarOptions::default());
    for request in [
        &b"POST /metrics HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\n\r\n"[..],
        b"PUT /-/ready HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\n\r\n",
        b"DELETE / HTTP/1.1\r\nHost: test\r\n\r\n",
        b"OPTIONS /metrics HTTP/1.1\r\nHost: test\r\n\r\n",
    ] {
        let reply = exchange(r.addr, request);
        assert_eq!(reply.status, 405, "{:?}", String::from_utf8_lossy(request));
        assert_eq!(reply.header("Allow"), Some("GET, HEAD"));
    }
    stop(r);
}

#[test]
fn bearer_token_guards_metrics_only() {
    let _g = serial();
    let r = start(opts_with_token("s3cret-token"));
    let without = get(r.addr, "/metrics");
    assert_eq!(without.status, 401);
    assert_eq!(without.header("WWW-Authenticate"), Some("Bearer"));
    assert!(!String::from_utf8_lossy(&without.body).contains("test_up"));

    for wrong in [
        "Bearer wrong",
        "Bearer s3cret-toke",
        "Bearer s3cret-token2",
        "Bearer S3CRET-TOKEN",
        "Basic s3cret-token",
        "s3cret-token",
        "Bearer",
    ] {
        let reply = get_with_auth(r.addr, wrong);
        assert_eq!(reply.status, 401, "{wrong:?}");
        assert_eq!(reply.header("WWW-Authenticate"), Some("Bearer"));
    }

    let ok = get_with_auth(r.addr, "Bearer s3cret-token");
    assert_eq!(ok.status, 200);
    assert!(String::from_utf8_lossy(&ok.body).contains("test_up 1"));
    // The scheme is case-insensitive (RFC 6750 / RFC 9110).
    assert_eq!(get_with_auth(r.addr, "bearer s3cret-token").status, 200);
    // HEAD is guarded like GET.
    let head = exchange(r.addr, b"HEAD /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(head.status, 401);
    // The probes stay open: a load balancer has no token.
    assert_eq!(get(r.addr, "/-/healthy").status, 200);
    assert_eq!(get(r.addr, "/-/ready").status, 200);
    stop(r);
}

#[test]
fn token_read_from_a_file_is_trimmed() {
    let _g = serial();
    // What a token file holds, trimmed the way the config loader does...
    let file_contents = "  tok-from-file\n";
    let r = start(opts_with_token(file_contents.trim()));
    assert_eq!(get_with_auth(r.addr, "Bearer tok-from-file").status, 200);
    assert_eq!(get(r.addr, "/metrics").status, 401);
    stop(r);
    // ...and the sidecar trims again, so an untrimmed one cannot lock scrapers out.
    let r = start(opts_with_token(file_contents));
    assert_eq!(get_with_auth(r.addr, "Bearer tok-from-file").status, 200);
    assert_eq!(
        get_with_auth(r.addr, "Bearer   tok-from-file  ").status,
        200
    );
    stop(r);
}

#[test]
fn empty_token_is_refused_at_start() {
    let _g = serial();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let err = Sidecar::start(
        listener,
        opts_with_token(" \n"),
        render(),
        Arc::new(AtomicBool::new(true)),
    )
    .expect_err("an empty token must not mean 'no auth'");
    assert!(err.to_string().contains("token"), "{err}");
}

#[test]
fn a_thousand_idle_connections_cost_no_threads_and_block_no_scrape() {
    let _g = serial();
    let limit = getrlimit(Resource::Nofile);
    let wanted = 4096;
    if limit.current.is_some_and(|c| c < wanted) {
        let raised = rustix::process::Rlimit {
            current: Some(limit.maximum.map_or(wanted, |m| m.min(wanted))),
            maximum: limit.maximum,
        };
        setrlimit(Resource::Nofile, raised).expect("raise RLIMIT_NOFILE");
    }
    let r = start(SidecarOptions::default());
    assert_eq!(get(r.addr, "/metrics").status, 200);
    let threads_before = count_entries("/proc/self/task");
    let fds_before = count_entries("/proc/self/fd");

    let mut idle = Vec::with_capacity(1000);
    for _ in 0..1000 {
        idle.push(connect(r.addr));
    }
    // Half of them start a request and stall, as a slowloris would.
    for s in idle.iter_mut().step_by(2) {
        let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: slow\r\n");
    }
    let scrape = get(r.addr, "/metrics");
    assert_eq!(scrape.status, 200);
    assert!(String::from_utf8_lossy(&scrape.body).contains("test_up 1"));

    let threads_during = count_entries("/proc/self/task");
    let fds_during = count_entries("/proc/self/fd");
    eprintln!(
        "1000 idle connections: threads {threads_before} -> {threads_during}, \
         fds {fds_before} -> {fds_during}"
    );
    // tiny_http alone would hold a thread per connection (1,000+).
    assert!(
        threads_during < threads_before + 50,
        "threads: {threads_before} before, {threads_during} with 1000 idle connections"
    );
    // Our own 1,000 client ends, plus at most max_connections (64) server ends.
    assert!(
        fds_during < fds_before + 1000 + 100,
        "fds: {fds_before} before, {fds_during} with 1000 idle connections"
    );
    drop(idle);
    stop(r);
}

#[test]
fn a_one_mib_header_is_refused_and_the_endpoint_keeps_working() {
    let _g = serial();
    let r = start(SidecarOptions::default());
    let mut s = connect(r.addr);
    let mut request = b"GET /metrics HTTP/1.1\r\nHost: test\r\nX-Big: ".to_vec();
    request.resize(request.len() + 1024 * 1024, b'a');
    request.extend_from_slice(b"\r\n\r\n");
    // The server may hang up before it has all of it: a write error is fine.
    let _ = s.write_all(&request);
    let mut buf = Vec::new();
    match s.read_to_end(&mut buf) {
        Ok(_) => {
            if !buf.is_empty() {
                assert_eq!(parse(&buf).status, 431);
            }
        }
        Err(e) => assert!(
            !matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            "the server kept a 1 MiB header open: {e}"
        ),
    }
    assert_eq!(get(r.addr, "/metrics").status, 200);
    stop(r);
}

#[test]
fn a_head_just_over_16_kib_gets_431() {
    let _g = serial();
    let r = start(SidecarOptions::default());
    let mut request = b"GET /metrics HTTP/1.1\r\nHost: test\r\nX-Big: ".to_vec();
    request.resize(17 * 1024, b'a');
    request.extend_from_slice(b"\r\n\r\n");
    let mut s = connect(r.addr);
    s.write_all(&request)
        .expect("17 KiB fits the socket buffers");
    let reply = parse(&read_all(&mut s).expect("read 431"));
    assert_eq!(reply.status, 431);
    // Just under the limit is served.
    let mut request = b"GET /metrics HTTP/1.1\r\nHost: test\r\nX-Big: ".to_vec();
    request.resize(15 * 1024, b'a');
    request.extend_from_slice(b"\r\n\r\n");
    assert_eq!(exchange(r.addr, &request).status, 200);
    stop(r);
}

/// No endpoint takes a body, and a body is where a second request hides: the
/// front refuses every request that announces one, and Transfer-Encoding.
#[test]
fn request_bodies_and_transfer_encoding_are_refused() {
    let _g = serial();
    let r = start(SidecarOptions::default());
    let too_big = exchange(
        r.addr,
        b"POST /metrics HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000000\r\n\r\n",
    );
    assert_eq!(too_big.status, 400);
    let chunked = exchange(
        r.addr,
        b"POST /metrics HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    );
    assert_eq!(chunked.status, 400);
    for bad in ["-1", "abc", "", "5, 6", "+1", "99999999999999999999999"] {
        let request = format!("POST /metrics HTTP/1.1\r\nHost: t\r\nContent-Length: {bad}\r\n\r\n");
        assert_eq!(exchange(r.addr, request.as_bytes()).status, 400, "{bad:?}");
    }
    for duplicated in [
        &b"GET /metrics HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"[..],
        b"GET /metrics HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
    ] {
        assert_eq!(exchange(r.addr, duplicated).status, 400);
    }
    let get_with_body = exchange(
        r.addr,
        b"GET /metrics HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc",
    );
    assert_eq!(get_with_body.status, 400);
    let zero = exchange(
        r.addr,
        b"GET /metrics HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!(zero.status, 200);
    stop(r);
}

#[test]
fn garbage_requests_get_an_error_or_a_close() {
    let _g = serial();
    // `\r\n\r\n` is blank lines before a request line that never comes: it is
    // closed at the request timeout, which must be well inside the client's
    // PATIENCE (the default, 10 s, equals it, and the two raced: seen failing once).
    let r = start(SidecarOptions {
        request_timeout: Duration::from_secs(2),
        ..SidecarOptions::default()
    });
    let garbage: [&[u8]; 8] = [
        b"\x00\x01\x02\x03\r\n\r\n",
        b"GET\r\n\r\n",
        b"NOT HTTP AT ALL\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"\xff\xfe\xfd / HTTP/1.1\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nno colon in this header\r\n\r\n",
        b"GET /\xc3\x28 HTTP/1.1\r\n\r\n",
        b"\r\n\r\n",
    ];
    for request in garbage {
        let mut s = connect(r.addr);
        s.write_all(request).expect("send garbage");
        let raw = read_all(&mut s);
        match raw {
            Ok(raw) if !raw.is_empty() => {
                let status = parse(&raw).status;
                assert!(
                    (400..600).contains(&status),
                    "{:?} got {status}",
                    String::from_utf8_lossy(request)
                );
            }
            Ok(_) => {} // closed without a word: fine for bytes that are not HTTP
            Err(e) => assert!(
                !matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ),
                "{:?} left hanging: {e}",
                String::from_utf8_lossy(request)
            ),
        }
    }
    assert_eq!(get(r.addr, "/metrics").status, 200);
    stop(r);
}

#[test]
fn a_stalled_half_request_is_closed_after_request_timeout() {
    let _g = serial();
    let r = start(SidecarOptions {
        request_timeout: Duration::from_millis(500),
        ..SidecarOptions::default()
    });
    let mut stalled = connect(r.addr);
    stalled
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n")
        .expect("send half a request");
    let mut silent = connect(r.addr);
    // A client read timeout of PATIENCE (10 s) makes a missing close fail the test.
    assert!(closed_by_server(&mut stalled), "half request left open");
    assert!(closed_by_server(&mut silent), "silent connection left open");
    assert_eq!(get(r.addr, "/metrics").status, 200);
    stop(r);
}

#[test]
fn shutdown_returns_promptly_with_connections_open() {
    let _g = serial();
    let r = start(SidecarOptions::default());
    assert_eq!(get(r.addr, "/metrics").status, 200);
    let mut open = Vec::new();
    for i in 0..20 {
        let mut s = connect(r.addr);
        if i % 2 == 0 {
            s.write_all(b"GET /metrics HTTP/1.1\r\n")
                .expect("half request");
        }
        open.push(s);
    }
    let addr = r.addr;
    let (done_tx, done_rx) = mpsc::channel();
    let stopper = thread::spawn(move || {
        r.sidecar.shutdown();
        let _ = done_tx.send(());
    });
    done_rx
        .recv_timeout(PATIENCE)
        .expect("shutdown hung with idle connections open");
    stopper.join().expect("shutdown thread");
    let left = sidecar_threads();
    assert!(left.is_empty(), "threads left after shutdown: {left:?}");
    for s in &mut open {
        assert!(closed_by_server(s), "connection survived shutdown");
    }
    // The listener is gone: nothing answers there any more.
    assert!(TcpStream::connect_timeout(&addr, PATIENCE).is_err());
}

#[test]
fn dropping_the_sidecar_also_stops_it() {
    let _g = serial();
    let r = start(SidecarOptions::default());
    let mut s = connect(r.addr);
    let (done_tx, done_rx) = mpsc::channel();
    thread::spawn(move || {
        drop(r.sidecar);
        let _ = done_tx.send(());
    });
    done_rx.recv_timeout(PATIENCE).expect("drop hung");
    let left = sidecar_threads();
    assert!(left.is_empty(), "threads left after drop: {left:?}");
    assert!(closed_by_server(&mut s));
}

#[test]
fn concurrent_scrapes_all_succeed() {
    let _g = serial();
    let r = start(SidecarOptions::default());
    let addr = r.addr;
    let clients: Vec<_> = (0..16)
        .map(|_| thread::spawn(move || (0..10).map(|_| get(addr, "/metrics").status).collect()))
        .collect();
    for c in clients {
        let statuses: Vec<u16> = c.join().expect("client thread");
        assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    }
    stop(r);
}

/// Runs the process out of file descriptors while a scrape arrives, then gives
/// them back: the scrape (or the next one) must be served. tiny_http's own accept
/// loop quits on the first accept error (tiny-http issue #283).
///
/// `spare` fds are freed after the client connected: 0 makes the front's accept
/// fail; 2 lets the front accept and reach the backend, whose accept then fails.
fn survives_emfile(spare: usize) {
    let _g = serial();
    // A backend whose accept thread died is found out when a relay goes a whole
    // request timeout unanswered: keep that short so the retries below see it.
    let r = start(SidecarOptions {
        request_timeout: Duration::from_secs(2),
        ..SidecarOptions::default()
    });
    assert_eq!(get(r.addr, "/metrics").status, 200);
    let saved = getrlimit(Resource::Nofile);
    let mut fillers = Vec::new();
    let client = {
        let open_now = count_entries("/proc/self/fd") as u64;
        let tight = rustix::process::Rlimit {
            current: Some(open_now + 32),
            maximum: saved.maximum,
        };
        setrlimit(Resource::Nofile, tight).expect("lower RLIMIT_NOFILE");
        for _ in 0..200 {
            match File::open("/dev/null") {
                Ok(f) => fillers.push(f),
                Err(_) => break,
            }
        }
        // Free exactly one fd, for the client's own socket.
        drop(fillers.pop());
        let client = TcpStream::connect(r.addr);
        for _ in 0..spare {
            drop(fillers.pop());
        }
        client
    };
    let client = client.and_then(|mut c| {
        c.set_read_timeout(Some(PATIENCE))?;
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")?;
        Ok(c)
    });
    // Give the sidecar time to run into the limit (not asserted: timing-free).
    thread::sleep(Duration::from_millis(300));
    drop(fillers);
    setrlimit(Resource::Nofile, saved).expect("restore RLIMIT_NOFILE");

    let mut client = client.expect("connect and send with one spare fd");
    let first = read_all(&mut client).expect("the stalled scrape got an answer or a close");
    if !first.is_empty() {
        let status = parse(&first).status;
        assert!(matches!(status, 200 | 502 | 503), "first answer {status}");
    }
    // Bounded retries: the backend may be restarting after its accept failed.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let reply = get(r.addr, "/metrics");
        if reply.status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still {} after the fds came back",
            reply.status
        );
        thread::sleep(Duration::from_millis(50));
    }
    stop(r);
}

#[test]
fn keeps_serving_after_emfile_on_accept() {
    survives_emfile(0);
}

#[test]
fn keeps_serving_after_the_backend_hits_emfile() {
    survives_emfile(2);
}

/// A pid with no process behind it (counting down from the top of the range).
fn dead_pid() -> u32 {
    (1_000_000..4_000_000u32)
        .rev()
        .find(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
        .expect("a free pid")
}

/// A private directory as a killed sidecar leaves it, `age` old; `listening`
/// keeps a live listener on its socket.
fn litter(
    tag: &str,
    age: Duration,
    listening: bool,
) -> (std::path::PathBuf, Option<std::os::unix::net::UnixListener>) {
    use std::os::unix::fs::DirBuilderExt;
    let dir = std::env::temp_dir().join(format!("sockpool-metrics-{}-test{tag}-0", dead_pid()));
    let _ = fs::remove_dir_all(&dir);
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .expect("create litter");
    let listener =
        std::os::unix::net::UnixListener::bind(dir.join("http-0.sock")).expect("bind litter");
    let listener = listening.then_some(listener);
    let then = std::time::SystemTime::now() - age;
    File::open(&dir)
        .and_then(|d| d.set_modified(then))
        .expect("age the litter");
    (dir, listener)
}

#[test]
fn directories_left_by_killed_sidecars_are_swept() {
    let _g = serial();
    let (stale, _) = litter("stale", Duration::from_secs(600), false);
    let (alive, keep_listening) = litter("alive", Duration::from_secs(600), true);
    let (young, _) = litter("young", Duration::ZERO, false);
    let r = start(SidecarOptions::default());
    assert!(!stale.exists(), "stale {} not swept", stale.display());
    assert!(alive.exists(), "a directory with a listener was removed");
    assert!(young.exists(), "a fresh directory was removed");
    stop(r);
    drop(keep_listening);
    let _ = fs::remove_dir_all(&alive);
    let _ = fs::remove_dir_all(&young);
}

/// A render closure that blocks (a deadlocked metrics lock, say) may cost
/// scrapes, never resources: the backend's in-flight slots stay taken until it
/// answers, and new requests wait for a slot, then get 503. Without that, each
/// timed-out scrape would leave one more request (and its socket) queued in
/// tiny_http, for as long as the render is stuck.
#[test]
fn a_stuck_render_cannot_pile_up_requests() {
    let _g = serial();
    let stuck = Arc::new(AtomicBool::new(false));
    let render: RenderFn = {
        let stuck = Arc::clone(&stuck);
        Arc::new(move |out: &mut String| {
            // Bounded, so a broken test cannot hang forever.
            let until = Instant::now() + 4 * PATIENCE;
            while stuck.load(Ordering::SeqCst) && Instant::now() < until {
                thread::sleep(Duration::from_millis(5));
            }
            out.push_str("test_up 1\n");
        })
    };
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let opts = SidecarOptions {
        request_timeout: Duration::from_millis(200),
        ..SidecarOptions::default()
    };
    let sidecar =
        Sidecar::start(listener, opts, render, Arc::new(AtomicBool::new(true))).expect("start");
    let addr = sidecar.local_addr();
    assert_eq!(get(addr, "/metrics").status, 200);
    let threads_before = count_entries("/proc/self/task");
    let fds_before = count_entries("/proc/self/fd");

    stuck.store(true, Ordering::SeqCst);
    let mut served = 0;
    // Waves of scrapes, one after the other, each outliving request_timeout.
    for _ in 0..16 {
        let wave: Vec<_> = (0..4)
            .map(|_| {
                thread::spawn(move || {
                    let mut s = connect(addr);
                    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
                        .expect("send");
                    read_all(&mut s).map(|raw| raw.starts_with(b"HTTP/1.1 200"))
                })
            })
            .collect();
        for s in wave {
            if let Ok(true) = s.join().expect("scraper") {
                served += 1;
            }
        }
    }
    let threads_stuck = count_entries("/proc/self/task");
    let fds_stuck = count_entries("/proc/self/fd");
    eprintln!(
        "render stuck, 64 scrapes: threads {threads_before} -> {threads_stuck}, \
         fds {fds_before} -> {fds_stuck}"
    );
    assert_eq!(served, 0, "a stuck render cannot have served");
    // At most MAX_IN_FLIGHT (4) requests held, a few fds each.
    assert!(
        fds_stuck <= fds_before + 30,
        "fds: {fds_before} before, {fds_stuck} after 64 scrapes with render stuck"
    );
    assert!(
        threads_stuck <= threads_before + 8,
        "threads: {threads_before} before, {threads_stuck} with render stuck"
    );

    stuck.store(false, Ordering::SeqCst);
    let deadline = Instant::now() + PATIENCE;
    while get(addr, "/metrics").status != 200 {
        assert!(
            Instant::now() < deadline,
            "no recovery after render came back"
        );
        thread::sleep(Duration::from_millis(20));
    }
    sidecar.shutdown();
    let left = sidecar_threads();
    assert!(left.is_empty(), "threads left after shutdown: {left:?}");
}

#[test]
fn a_panicking_render_costs_one_scrape() {
    let _g = serial();
    let boom = Arc::new(AtomicBool::new(true));
    let render: RenderFn = {
        let boom = Arc::clone(&boom);
        Arc::new(move |out: &mut String| {
            if boom.swap(false, Ordering::SeqCst) {
                panic!("render bug");
            }
            out.push_str("test_up 1\n");
        })
    };
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let sidecar = Sidecar::start(
        listener,
        SidecarOptions::default(),
        render,
        Arc::new(AtomicBool::new(true)),
    )
    .expect("start");
    let addr = sidecar.local_addr();
    assert_eq!(get(addr, "/metrics").status, 500);
    for _ in 0..4 {
        assert_eq!(get(addr, "/metrics").status, 200);
    }
    sidecar.shutdown();
}

/// Skips interim (1xx) answers, as an HTTP client does.
fn final_reply(raw: &[u8]) -> Reply {
    let mut rest = raw;
    loop {
        let reply = parse(rest);
        if reply.status >= 200 {
            return reply;
        }
        let end = rest
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(rest.len(), |p| p + 4);
        rest = &rest[end..];
    }
}

#[test]
fn unusual_but_valid_requests_are_served() {
    let _g = serial();
    let r = start(SidecarOptions::default());

    let http10 = exchange(r.addr, b"GET /metrics HTTP/1.0\r\n\r\n");
    assert_eq!(http10.status, 200);
    assert!(String::from_utf8_lossy(&http10.body).contains("test_up 1"));

    let mut s = connect(r.addr);
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\nTE: chunked\r\n\r\n")
        .expect("send");
    // TE is not forwarded: the answer has a length, which any client can read.
    let chunked = parse(&read_all(&mut s).expect("read"));
    assert_eq!(chunked.status, 200);
    assert_eq!(chunked.header("Transfer-Encoding"), None);
    assert_eq!(
        chunked.header("Content-Length"),
        Some(chunked.body.len().to_string().as_str())
    );
    assert!(String::from_utf8_lossy(&chunked.body).contains("test_up 1"));

    let mut s = connect(r.addr);
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n\r\n")
        .expect("send");
    let expect = final_reply(&read_all(&mut s).expect("read"));
    assert_eq!(expect.status, 200);

    // Keep-alive asked for, one request served, and the client is told.
    let keep = exchange(
        r.addr,
        b"GET /-/healthy HTTP/1.1\r\nHost: t\r\nConnection: keep-alive\r\n\r\n",
    );
    assert_eq!(keep.status, 200);
    assert_eq!(keep.header("Connection"), Some("close"));

    // Two pipelined requests: the first is answered, the connection then closes.
    let mut s = connect(r.addr);
    s.write_all(b"GET /-/healthy HTTP/1.1\r\nHost: t\r\n\r\nGET /nope HTTP/1.1\r\nHost: t\r\n\r\n")
        .expect("send");
    let raw = read_all(&mut s).expect("read");
    assert_eq!(parse(&raw).status, 200);
    assert_eq!(
        String::from_utf8_lossy(&raw).matches("HTTP/1.1 ").count(),
        1
    );
    stop(r);
}

/// tiny_http's threads: its accept thread and task pool, named after the thread
/// that started them (`metrics-backend`).
fn backend_threads() -> usize {
    threads_named("/proc/self/task", |n| n == "metrics-backend").len()
}

/// This process's private sidecar directories.
fn private_dirs() -> Vec<std::path::PathBuf> {
    let prefix = format!("sockpool-metrics-{}-", std::process::id());
    let base = std::env::var_os("RUNTIME_DIRECTORY")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    fs::read_dir(&base)
        .unwrap_or_else(|e| panic!("{}: {e}", base.display()))
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect()
}

/// Defect 3: each backend rebuild after the private socket directory was
/// deleted left tiny_http's accept thread, its 4 pool threads and the listening
/// fd behind (threads 13 -> 33 after 4 rebuilds): dropping tiny_http wakes its
/// accept thread by connecting to a path that no longer exists.
#[test]
fn regression_deleting_the_socket_directory_ten_times_leaks_no_threads_or_fds() {
    let _g = serial();
    let r = start(SidecarOptions::default());
    assert_eq!(get(r.addr, "/metrics").status, 200);
    let dirs = private_dirs();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    let dir = dirs[0].clone();
    let threads_before = backend_threads();
    let fds_before = count_entries("/proc/self/fd");
    assert!(threads_before > 0, "tiny_http's threads not found by name");
    for round in 0..10 {
        fs::remove_dir_all(&dir).unwrap_or_else(|e| panic!("round {round}: {e}"));
        // The first scrape finds the socket gone (503) and has the backend
        // rebuilt, directory and all; bounded retries until it is back.
        let deadline = Instant::now() + PATIENCE;
        loop {
            let status = get(r.addr, "/metrics").status;
            if status == 200 {
                break;
            }
            assert_eq!(status, 503, "round {round}");
            assert!(Instant::now() < deadline, "round {round}: no recovery");
            thread::sleep(Duration::from_millis(20));
        }
        assert!(
            dir.is_dir(),
            "round {round}: the directory was not recreated"
        );
    }
    // Idle tiny_http pool threads of a stopped server linger up to 5 s.
    let deadline = Instant::now() + 3 * PATIENCE;
    loop {
        let (threads, fds) = (backend_threads(), count_entries("/proc/self/fd"));
        if threads <= threads_before && fds <= fds_before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after 10 rebuilds: tiny_http threads {threads_before} -> {threads}, \
             fds {fds_before} -> {fds}"
        );
        thread::sleep(Duration::from_millis(100));
    }
    stop(r);
}

/// A backend slower than the request timeout: nothing was sent yet, so the
/// client is told 503 instead of seeing a bare close.
#[test]
fn a_backend_past_the_deadline_before_any_byte_is_a_503() {
    let _g = serial();
    let render: RenderFn = Arc::new(|out: &mut String| {
        thread::sleep(Duration::from_millis(1500));
        out.push_str("test_up 1\n");
    });
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let opts = SidecarOptions {
        request_timeout: Duration::from_millis(300),
        ..SidecarOptions::default()
    };
    let sidecar =
        Sidecar::start(listener, opts, render, Arc::new(AtomicBool::new(true))).expect("start");
    let reply = get(sidecar.local_addr(), "/metrics");
    assert_eq!(reply.status, 503);
    sidecar.shutdown();
}

/// A token no client can send as `Bearer <token>` is refused at start, not
/// discovered as a 502 on every scrape (config validation catches it first;
/// this is the library's own guard).
#[test]
fn a_token_that_is_not_token68_is_refused_at_start() {
    let _g = serial();
    for token in ["t\u{f6}k\u{e9}n", "two words", "ctl\u{1}", "=pad-first"] {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let err = Sidecar::start(
            listener,
            opts_with_token(token),
            render(),
            Arc::new(AtomicBool::new(true)),
        )
        .expect_err(token);
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{token:?}");
    }
    let r = start(opts_with_token("Az09-._~+/=="));
    assert_eq!(get_with_auth(r.addr, "Bearer Az09-._~+/==").status, 200);
    stop(r);
}
