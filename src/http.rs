//! The metrics sidecar: tiny_http behind a bounded front door.
//!
//! tiny_http 0.12 cannot face the network on its own: its accept thread quits on
//! the first accept error, it spawns a thread per open connection without bound,
//! and it has no timeouts and no header-size limit. So it never sees a client
//! socket. The layout:
//!
//! ```text
//!  TCP clients ──> [metrics-http]  one mio loop, owns every client socket
//!                      │  at most `max_connections` clients, a deadline each,
//!                      │  head <= 16 KiB, body <= 16 KiB, one request per connection,
//!                      │  at most MAX_IN_FLIGHT heads relayed at once
//!                      v
//!           Unix socket in a private 0700 directory
//!                      v
//!  tiny_http Server [metrics-backend]: its accept thread + task pool (4 idle,
//!                      + one per open backend connection: <= MAX_IN_FLIGHT)
//!                      v
//!  [metrics-resp-0], [metrics-resp-1]  recv() a request, route it, respond
//! ```
//!
//! The front thread reads one request (the head up to its blank line, then the
//! body its `Content-Length` announces; chunked bodies get 411), forwards exactly
//! that to tiny_http, half-closes that upstream socket (so tiny_http answers once
//! and hangs up), relays the answer back with `Connection: close` added, and
//! closes. Bytes after the request are read and dropped. Over `max_connections`,
//! the oldest connection still sending its request head is closed to make room
//! (a slowloris cannot lock scrapes out); if every slot has a complete request,
//! new connections wait in the kernel backlog until one finishes.
//!
//! Why a path socket and not the Linux abstract namespace: tiny_http's `Drop`
//! unwraps `as_pathname()`, which panics for abstract addresses; and a 0700
//! directory keeps other local users from reaching tiny_http around the bounds.

use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::os::unix::net::UnixListener;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use log::{debug, error, warn};
use mio::net::{TcpStream, UnixStream};
use mio::{Events, Interest, Poll, Token, Waker};

use crate::logging::RateLimit;
use crate::warn_limited;

/// Renders the whole Prometheus text exposition into the buffer.
pub type RenderFn = Arc<dyn Fn(&mut String) + Send + Sync>;

/// Options for the sidecar.
#[derive(Clone, Debug)]
pub struct SidecarOptions {
    /// Bearer token required on `/metrics` (already trimmed), if any.
    pub bearer_token: Option<String>,
    /// Most sidecar connections open at once; the rest wait or are refused.
    pub max_connections: usize,
    /// A sidecar connection that does not finish its request in this time is closed.
    pub request_timeout: Duration,
}

impl Default for SidecarOptions {
    fn default() -> Self {
        SidecarOptions {
            bearer_token: None,
            max_connections: 64,
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// Largest request head (request line + headers + blank line) accepted; more is a 431.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Largest request body accepted (no endpoint takes one); more is a 413.
pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// Most requests handed to tiny_http at once. tiny_http holds a thread per open
/// connection, so this (plus its 4 idle pool threads) bounds its threads.
pub const MAX_IN_FLIGHT: usize = 4;
/// Threads answering requests; two, so one stalled response cannot stop scrapes.
const HANDLERS: usize = 2;
/// Response bytes buffered per connection while the client is slow to read.
const RESPONSE_BUF: usize = 64 * 1024;
/// Bytes after the request read and thrown away before the connection is dropped.
const MAX_DISCARD: usize = 1024 * 1024;
/// Accepts per loop turn, so a connection flood cannot starve open connections.
const ACCEPT_BATCH: usize = 64;
/// First and largest pause after a failed accept (EMFILE and the like).
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Pause between attempts to restart a dead tiny_http backend.
const REBUILD_BACKOFF_MIN: Duration = Duration::from_millis(50);
const REBUILD_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How long `shutdown` waits for its threads before it leaves them behind.
const JOIN_LIMIT: Duration = Duration::from_secs(5);
/// At most one accept warning per this period (with a count of the ones held back).
const WARN_EVERY: Duration = Duration::from_secs(10);
/// A private directory this old, with no process and no listener, is litter.
const STALE_AFTER: Duration = Duration::from_secs(60);
/// Client-supplied text in logs is cut to this many characters.
const LOG_CLIP: usize = 120;

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const FIRST_CONN: usize = 2;

const RESP_400: &[u8] =
    b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
const RESP_411: &[u8] =
    b"HTTP/1.1 411 Length Required\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
const RESP_413: &[u8] =
    b"HTTP/1.1 413 Content Too Large\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
const RESP_408: &[u8] =
    b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
const RESP_431: &[u8] = b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
const RESP_502: &[u8] =
    b"HTTP/1.1 502 Bad Gateway\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
const RESP_503: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
const CONNECTION_CLOSE: &[u8] = b"Connection: close\r\n";

/// A running sidecar; `shutdown` stops it and joins its threads.
pub struct Sidecar {
    addr: SocketAddr,
    shared: Arc<Shared>,
    /// Wakes the front thread's poll; it then sees `shared.stopping`.
    waker: Option<Waker>,
    /// Never sends; dropping it wakes handler threads sleeping in a backoff.
    stop_tx: Option<Sender<()>>,
    threads: Vec<JoinHandle<()>>,
    stopped: bool,
}

impl fmt::Debug for Sidecar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sidecar").field("addr", &self.addr).finish()
    }
}

impl Sidecar {
    /// Starts serving on an already bound listener.
    pub fn start(
        listener: TcpListener,
        opts: SidecarOptions,
        render: RenderFn,
        ready: Arc<AtomicBool>,
    ) -> io::Result<Sidecar> {
        let addr = listener.local_addr()?;
        let token = match opts.bearer_token.as_deref().map(str::trim) {
            Some("") => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "the bearer token is empty",
                ))
            }
            Some(t) => Some(t.as_bytes().to_vec()),
            None => None,
        };
        listener.set_nonblocking(true)?;
        let mut listener = mio::net::TcpListener::from_std(listener);

        let dir = private_dir()?;
        let backend = match Backend::bind(&dir, 0) {
            Ok(b) => b,
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let shared = Arc::new(Shared {
            token,
            render,
            ready,
            dir,
            backend: Mutex::new(Some(Arc::new(backend))),
            next_generation: AtomicU64::new(1),
            stopping: AtomicBool::new(false),
        });
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        // From here on, an early return drops `sidecar`, whose Drop stops what started.
        let mut sidecar = Sidecar {
            addr,
            shared: Arc::clone(&shared),
            waker: None,
            stop_tx: Some(stop_tx),
            threads: Vec::new(),
            stopped: false,
        };

        let poll = Poll::new()?;
        let waker = Waker::new(poll.registry(), WAKER)?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        sidecar.waker = Some(waker);

        for i in 0..HANDLERS {
            let shared = Arc::clone(&shared);
            let stop_rx = stop_rx.clone();
            let handle = thread::Builder::new()
                .name(format!("metrics-resp-{i}"))
                .spawn(move || handler_loop(&shared, &stop_rx))
                .map_err(|e| spawn_error("metrics-resp", e))?;
            sidecar.threads.push(handle);
        }

        let front = Front::new(poll, listener, &opts, shared, stop_rx);
        let handle = thread::Builder::new()
            .name("metrics-http".to_owned())
            .spawn(move || front.run())
            .map_err(|e| spawn_error("metrics-http", e))?;
        sidecar.threads.push(handle);
        Ok(sidecar)
    }

    /// The address it serves on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, closes every sidecar connection and joins every thread.
    pub fn shutdown(mut self) {
        self.stop();
    }

    /// Idempotent; also run by `Drop`.
    fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        {
            // Under the backend lock, so that no restart can slip in after this.
            let current = self.shared.lock_backend();
            self.shared.stopping.store(true, Ordering::SeqCst);
            if let Some(backend) = current.as_ref() {
                // One wake-up per handler blocked in `recv()`; they persist in the queue.
                for _ in 0..HANDLERS {
                    backend.server.unblock();
                }
            }
        }
        drop(self.stop_tx.take());
        // The waker must live until the front has been joined: dropping it closes
        // its eventfd, and epoll forgets an event not yet collected (a lost wake-up).
        let waker = self.waker.take();
        if let Some(w) = &waker {
            if let Err(e) = w.wake() {
                warn!("metrics sidecar: cannot wake the front thread: {e}");
            }
        }
        let limit = Instant::now() + JOIN_LIMIT;
        for handle in self.threads.drain(..) {
            // Bounded: a render closure stuck forever must not hang the shutdown.
            while !handle.is_finished() && Instant::now() < limit {
                thread::sleep(Duration::from_millis(2));
            }
            let name = handle.thread().name().unwrap_or("?").to_owned();
            if !handle.is_finished() {
                warn!("metrics sidecar: thread {name} did not stop in time; leaving it behind");
                continue;
            }
            if handle.join().is_err() {
                error!("metrics sidecar: thread {name} panicked");
            }
        }
        drop(waker);
        // Dropping the last handle to tiny_http's Server stops its accept thread
        // (it connects to itself) and removes the socket file.
        let backend = self.shared.lock_backend().take();
        drop(backend);
        if let Err(e) = fs::remove_dir_all(&self.shared.dir) {
            if e.kind() != io::ErrorKind::NotFound {
                warn!(
                    "metrics sidecar: cannot remove {}: {e}",
                    self.shared.dir.display()
                );
            }
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn_error(name: &str, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("cannot start thread {name}: {e}"))
}

/// What the front and the handlers share.
struct Shared {
    token: Option<Vec<u8>>,
    render: RenderFn,
    ready: Arc<AtomicBool>,
    /// The private directory holding the backend socket(s).
    dir: PathBuf,
    /// The live tiny_http backend; `None` once stopped.
    backend: Mutex<Option<Arc<Backend>>>,
    next_generation: AtomicU64,
    stopping: AtomicBool,
}

impl Shared {
    fn lock_backend(&self) -> MutexGuard<'_, Option<Arc<Backend>>> {
        // A poisoned lock only means a thread panicked while holding it; the
        // `Option<Arc<_>>` inside is still whole.
        self.backend.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn current(&self) -> Option<Arc<Backend>> {
        self.lock_backend().clone()
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Replaces the backend `dead` with a fresh one, unless someone already did.
    fn rebuild(&self, dead: &Backend) -> io::Result<()> {
        let mut current = self.lock_backend();
        if self.stopping() {
            return Ok(());
        }
        match current.as_ref() {
            Some(b) if b.generation == dead.generation => {}
            _ => return Ok(()),
        }
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let fresh = Arc::new(Backend::bind(&self.dir, generation)?);
        let old = current.replace(fresh);
        drop(current);
        if let Some(old) = old {
            // Handlers still blocked on the dead server move over to the new one.
            for _ in 0..HANDLERS {
                old.server.unblock();
            }
        }
        warn!("metrics sidecar: HTTP backend restarted");
        Ok(())
    }
}

/// One tiny_http server on its own Unix socket.
struct Backend {
    server: tiny_http::Server,
    path: PathBuf,
    generation: u64,
    /// Set when its accept thread has quit (tiny_http never restarts it).
    dead: AtomicBool,
}

impl Backend {
    fn bind(dir: &Path, generation: u64) -> io::Result<Backend> {
        // A fresh name per generation: a dead Server removes its own file on drop.
        let path = dir.join(format!("http-{generation}.sock"));
        if generation > 0 {
            // Back if something removed it meanwhile; an error shows up in bind.
            let _ = fs::DirBuilder::new().mode(0o700).create(dir);
        }
        let listener = UnixListener::bind(&path).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot bind {}: {e}", path.display()))
        })?;
        // Started from a thread named for the role: Linux threads inherit their
        // creator's name, so tiny_http's accept and pool threads show up as
        // `metrics-backend` instead of borrowing the name of whoever called us.
        let server = thread::Builder::new()
            .name("metrics-backend".to_owned())
            .spawn(move || tiny_http::Server::from_listener(listener, None))
            .map_err(|e| spawn_error("metrics-backend", e))?
            .join()
            .map_err(|_| io::Error::other("tiny_http panicked at start"))?
            .map_err(|e| io::Error::other(format!("tiny_http: {e}")))?;
        Ok(Backend {
            server,
            path,
            generation,
            dead: AtomicBool::new(false),
        })
    }
}

/// Creates a fresh 0700 directory for the backend socket.
///
/// `$RUNTIME_DIRECTORY` (systemd's `RuntimeDirectory=`) if set, else the temp dir.
fn private_dir() -> io::Result<PathBuf> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let base = std::env::var_os("RUNTIME_DIRECTORY")
        .and_then(|v| {
            // systemd lists several directories separated by ':'; take the first.
            let first = v.to_string_lossy().split(':').next()?.to_owned();
            (!first.is_empty()).then(|| PathBuf::from(first))
        })
        .unwrap_or_else(std::env::temp_dir);
    sweep_stale_dirs(&base);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mut last_err = None;
    for _ in 0..16 {
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let dir = base.join(format!(
            "sockpool-metrics-{}-{nanos:x}-{seq}",
            std::process::id()
        ));
        // `create` (not `create_all`) fails on anything already there, symlinks
        // included, so nobody can hand us a directory they control.
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last_err = Some(e),
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!(
                        "cannot create a private directory in {}: {e}",
                        base.display()
                    ),
                ))
            }
        }
    }
    let e = last_err.unwrap_or_else(|| io::Error::other("name clash"));
    Err(io::Error::new(
        e.kind(),
        format!(
            "cannot create a private directory in {}: {e}",
            base.display()
        ),
    ))
}

/// Removes private directories left by sidecars that were killed (SIGKILL skips
/// the cleanup). Conservative: only ours (same uid), older than a minute, whose
/// process is gone *and* whose sockets refuse connections, so a live sidecar in
/// another PID namespace sharing this directory is left alone.
fn sweep_stale_dirs(base: &Path) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    let me = rustix::process::geteuid().as_raw();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("sockpool-metrics-"))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let path = entry.path();
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        let old = meta
            .modified()
            .ok()
            .and_then(|m| m.elapsed().ok())
            .is_some_and(|age| age > STALE_AFTER);
        if !meta.is_dir() || meta.uid() != me || !old || anyone_listening(&path) {
            continue;
        }
        match fs::remove_dir_all(&path) {
            Ok(()) => debug!("metrics sidecar: removed stale {}", path.display()),
            Err(e) => debug!(
                "metrics sidecar: cannot remove stale {}: {e}",
                path.display()
            ),
        }
    }
}

/// Whether any socket in `dir` takes a connection. Non-blocking, and any answer
/// other than "refused" or "gone" counts as alive.
fn anyone_listening(dir: &Path) -> bool {
    let Ok(entries) = fs::read_dir(dir) else {
        return true;
    };
    entries
        .flatten()
        .any(|e| match UnixStream::connect(e.path()) {
            Ok(_) => true,
            Err(e) => !matches!(
                e.kind(),
                io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound
            ),
        })
}

// ---------------------------------------------------------------------------
// Handlers: route requests that tiny_http parsed.

fn handler_loop(shared: &Shared, stop_rx: &Receiver<()>) {
    let mut backoff = REBUILD_BACKOFF_MIN;
    let mut body_hint = 4096;
    let mut warn_limit = RateLimit::new(1, WARN_EVERY);
    loop {
        if shared.stopping() {
            return;
        }
        let Some(backend) = shared.current() else {
            return;
        };
        if backend.dead.load(Ordering::SeqCst) {
            match shared.rebuild(&backend) {
                Ok(()) => backoff = REBUILD_BACKOFF_MIN,
                Err(e) => {
                    warn_limited!(
                        warn_limit,
                        Instant::now(),
                        "metrics sidecar: cannot restart the HTTP backend, retrying: {e}"
                    );
                    if let Err(RecvTimeoutError::Disconnected) = stop_rx.recv_timeout(backoff) {
                        return;
                    }
                    backoff = (backoff * 2).min(REBUILD_BACKOFF_MAX);
                }
            }
            continue;
        }
        match backend.server.recv() {
            Ok(request) => {
                // tiny_http code runs here too (it writes the answer); whatever
                // panics must cost this request, not the handler thread.
                let handled = panic::catch_unwind(AssertUnwindSafe(|| {
                    handle(shared, request, &mut body_hint)
                }));
                if handled.is_err() {
                    error!("metrics sidecar: handling a request panicked");
                }
            }
            Err(e) => {
                if shared.stopping() {
                    return;
                }
                let replaced =
                    !matches!(shared.current(), Some(b) if b.generation == backend.generation);
                // Not replaced: either its accept thread pushed this error and quit
                // (tiny_http #283), or the front found it gone and woke us.
                if !replaced && !backend.dead.swap(true, Ordering::SeqCst) {
                    warn!("metrics sidecar: HTTP backend stopped accepting ({e}); restarting it");
                }
            }
        }
    }
}

/// One routed answer.
struct Answer {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
    extra: Option<(&'static str, &'static str)>,
}

impl Answer {
    fn text(status: u16, body: &str) -> Answer {
        Answer {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.as_bytes().to_vec(),
            extra: None,
        }
    }
}

fn handle(shared: &Shared, request: tiny_http::Request, body_hint: &mut usize) {
    let url = request.url();
    let path = url.split('?').next().unwrap_or("");
    let answer = route(shared, &request, path, body_hint);
    // The method may be any ASCII the client chose (control bytes included).
    let method = request.method().to_string();
    debug!(
        "metrics sidecar: {:?} {:?} -> {}",
        clip(&method),
        clip(path),
        answer.status
    );
    let mut response = tiny_http::Response::from_data(answer.body).with_status_code(answer.status);
    let server = concat!("sockpool/", env!("CARGO_PKG_VERSION"));
    let headers = [
        Some(("Content-Type", answer.content_type)),
        Some(("Server", server)),
        answer.extra,
    ];
    for (name, value) in headers.into_iter().flatten() {
        if let Ok(h) = tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes()) {
            response.add_header(h);
        }
    }
    if let Err(e) = request.respond(response) {
        debug!("metrics sidecar: response not delivered: {e}");
    }
}

fn route(shared: &Shared, request: &tiny_http::Request, path: &str, hint: &mut usize) -> Answer {
    use tiny_http::Method;
    if !matches!(request.method(), Method::Get | Method::Head) {
        let mut a = Answer::text(405, "method not allowed\n");
        a.extra = Some(("Allow", "GET, HEAD"));
        return a;
    }
    match path {
        "/metrics" => {
            if let Some(token) = &shared.token {
                if !authorized(request, token) {
                    let mut a = Answer::text(401, "unauthorized\n");
                    a.extra = Some(("WWW-Authenticate", "Bearer"));
                    return a;
                }
            }
            let mut body = String::with_capacity(*hint);
            let render = &shared.render;
            // The render closure is the server's code; a bug there must cost one
            // scrape, not the sidecar's handler thread.
            match panic::catch_unwind(AssertUnwindSafe(|| render(&mut body))) {
                Ok(()) => {
                    *hint = body.len().saturating_add(1024);
                    Answer {
                        status: 200,
                        content_type: "text/plain; version=0.0.4",
                        body: body.into_bytes(),
                        extra: None,
                    }
                }
                Err(_) => {
                    error!("metrics sidecar: rendering the metrics panicked");
                    Answer::text(500, "internal error\n")
                }
            }
        }
        "/-/healthy" => Answer::text(200, "sockpool is healthy.\n"),
        "/-/ready" => {
            if shared.ready.load(Ordering::SeqCst) {
                Answer::text(200, "sockpool is ready.\n")
            } else {
                Answer::text(503, "sockpool is not ready (draining).\n")
            }
        }
        "/" => Answer {
            status: 200,
            content_type: "text/html; charset=utf-8",
            body: index_page().into_bytes(),
            extra: None,
        },
        _ => Answer::text(404, "not found\n"),
    }
}

fn index_page() -> String {
    format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>sockpool</title></head>\n\
         <body><h1>sockpool</h1><p>version {}</p><ul>\n\
         <li><a href=\"/metrics\">/metrics</a></li>\n\
         <li><a href=\"/-/healthy\">/-/healthy</a></li>\n\
         <li><a href=\"/-/ready\">/-/ready</a></li>\n\
         </ul></body></html>\n",
        env!("CARGO_PKG_VERSION")
    )
}

/// `Authorization: Bearer <token>`, the scheme case-insensitive (RFC 6750).
fn authorized(request: &tiny_http::Request, token: &[u8]) -> bool {
    let Some(header) = request
        .headers()
        .iter()
        .find(|h| h.field.equiv("Authorization"))
    else {
        return false;
    };
    let value = header.value.as_str().trim();
    let Some((scheme, presented)) = value.split_once(' ') else {
        return false;
    };
    scheme.eq_ignore_ascii_case("bearer") && constant_time_eq(token, presented.trim().as_bytes())
}

/// Compares without an early exit: the time depends on `expected.len()` only,
/// never on where the bytes differ or on the presented length.
fn constant_time_eq(expected: &[u8], presented: &[u8]) -> bool {
    let mut diff = u8::from(expected.len() != presented.len());
    for (i, &e) in expected.iter().enumerate() {
        let p = presented.get(i).copied().unwrap_or(!e);
        diff |= e ^ p;
    }
    std::hint::black_box(diff) == 0
}

/// The first `LOG_CLIP` characters, for logging client text with `{:?}`.
fn clip(s: &str) -> &str {
    match s.char_indices().nth(LOG_CLIP) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

// ---------------------------------------------------------------------------
// The front thread: owns every client socket and enforces the bounds.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Reading the request (head, then any announced body) from the client.
    Head,
    /// Head complete; waiting for one of the MAX_IN_FLIGHT backend slots.
    Queued,
    /// Head forwarded to tiny_http; relaying its answer.
    Relay,
    /// The client is gone but tiny_http has not hung up yet: its in-flight slot
    /// stays taken until it does.
    Orphan,
}

struct Conn {
    client: TcpStream,
    peer: SocketAddr,
    accepted: Instant,
    deadline: Instant,
    phase: Phase,
    /// The request (Head, Queued), then what is left to forward (Relay).
    head: Vec<u8>,
    /// Bytes the whole request takes, once its head is parsed.
    need: Option<usize>,
    head_sent: usize,
    upstream: Option<UnixStream>,
    upstream_shut: bool,
    upstream_eof: bool,
    /// tiny_http's answer on its way to the client.
    out: Vec<u8>,
    out_pos: usize,
    /// The status line has been seen (and `Connection: close` added after it).
    status_done: bool,
    got_answer: bool,
    client_eof: bool,
    discarded: usize,
}

/// Why the front closes a connection, and what it tells the client first.
#[derive(Clone, Copy, Debug)]
enum Close {
    /// Finished, or the client left: nothing more to say.
    Quiet,
    Reply(&'static [u8], &'static str),
}

struct Front {
    poll: Poll,
    listener: mio::net::TcpListener,
    max_connections: usize,
    request_timeout: Duration,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    active: usize,
    in_flight: usize,
    accept_ready: bool,
    accept_paused_until: Option<Instant>,
    accept_backoff: Duration,
    accept_warn: RateLimit,
    stuck_warn: RateLimit,
    shared: Arc<Shared>,
    stop_rx: Receiver<()>,
    scratch: Vec<u8>,
}

impl Front {
    fn new(
        poll: Poll,
        listener: mio::net::TcpListener,
        opts: &SidecarOptions,
        shared: Arc<Shared>,
        stop_rx: Receiver<()>,
    ) -> Front {
        Front {
            poll,
            listener,
            // Zero would let nobody in; one is the least that still serves.
            max_connections: opts.max_connections.max(1),
            request_timeout: opts.request_timeout,
            conns: Vec::new(),
            free: Vec::new(),
            active: 0,
            in_flight: 0,
            accept_ready: true,
            accept_paused_until: None,
            accept_backoff: ACCEPT_BACKOFF_MIN,
            accept_warn: RateLimit::new(1, WARN_EVERY),
            stuck_warn: RateLimit::new(1, WARN_EVERY),
            shared,
            stop_rx,
            scratch: vec![0; 16 * 1024],
        }
    }

    fn run(mut self) {
        let mut events = Events::with_capacity(256);
        let mut poll_backoff = Duration::from_millis(10);
        loop {
            if self.shared.stopping() {
                break;
            }
            self.accept_some();
            self.start_queued();
            let timeout = self.next_timeout();
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // Should not happen; never spin on it.
                warn!("metrics sidecar: poll failed: {e}");
                if let Err(RecvTimeoutError::Disconnected) = self.stop_rx.recv_timeout(poll_backoff)
                {
                    break;
                }
                poll_backoff = (poll_backoff * 2).min(Duration::from_secs(1));
                continue;
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept_ready = true,
                    WAKER => {}
                    Token(t) => {
                        let idx = (t - FIRST_CONN) / 2;
                        self.drive(idx);
                    }
                }
            }
            self.expire();
        }
        let open = self.active;
        // Dropping the connections closes them (and tiny_http's ends see EOF).
        self.conns.clear();
        debug!("metrics sidecar: front stopped, closed {open} connection(s)");
    }

    fn paused(&mut self, now: Instant) -> bool {
        match self.accept_paused_until {
            Some(until) if now < until => true,
            Some(_) => {
                self.accept_paused_until = None;
                false
            }
            None => false,
        }
    }

    fn can_accept(&self) -> bool {
        self.active < self.max_connections || self.oldest_head().is_some()
    }

    fn next_timeout(&mut self) -> Option<Duration> {
        let now = Instant::now();
        if self.accept_ready && !self.paused(now) && self.can_accept() {
            return Some(Duration::ZERO);
        }
        let mut next = self.accept_paused_until;
        for c in self.conns.iter().flatten() {
            if c.phase != Phase::Orphan {
                next = Some(next.map_or(c.deadline, |n| n.min(c.deadline)));
            }
        }
        // Rounded up a millisecond so that the deadline has passed on wake-up.
        next.map(|t| t.saturating_duration_since(now) + Duration::from_millis(1))
    }

    fn oldest_head(&self) -> Option<usize> {
        self.conns
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.as_ref().map(|c| (i, c)))
            .filter(|(_, c)| c.phase == Phase::Head)
            .min_by_key(|(_, c)| c.accepted)
            .map(|(i, _)| i)
    }

    fn accept_some(&mut self) {
        for _ in 0..ACCEPT_BATCH {
            if !self.accept_ready || self.paused(Instant::now()) {
                return;
            }
            if self.active >= self.max_connections {
                // Make room by dropping the oldest client still sending its head;
                // if all hold complete requests, leave newcomers in the backlog.
                match self.oldest_head() {
                    Some(idx) => self.close(idx, Close::Reply(RESP_503, "evicted")),
                    None => return,
                }
            }
            match self.listener.accept() {
                Ok((stream, peer)) => {
                    self.accept_backoff = ACCEPT_BACKOFF_MIN;
                    self.insert(stream, peer);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.accept_ready = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // The client gave up before we got to it: nothing to back off for.
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
                Err(e) => {
                    warn_limited!(
                        self.accept_warn,
                        Instant::now(),
                        "metrics sidecar: accept failed, retrying in {:?}: {e}",
                        self.accept_backoff
                    );
                    self.accept_paused_until = Some(Instant::now() + self.accept_backoff);
                    self.accept_backoff = (self.accept_backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    return;
                }
            }
        }
    }

    fn insert(&mut self, mut client: TcpStream, peer: SocketAddr) {
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                self.conns.push(None);
                self.conns.len() - 1
            }
        };
        if let Err(e) = self.poll.registry().register(
            &mut client,
            Token(FIRST_CONN + 2 * idx),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            debug!("metrics sidecar: cannot register {peer}: {e}");
            self.free.push(idx);
            return;
        }
        let now = Instant::now();
        self.conns[idx] = Some(Conn {
            client,
            peer,
            accepted: now,
            deadline: now + self.request_timeout,
            phase: Phase::Head,
            head: Vec::new(),
            need: None,
            head_sent: 0,
            upstream: None,
            upstream_shut: false,
            upstream_eof: false,
            out: Vec::new(),
            out_pos: 0,
            status_done: false,
            got_answer: false,
            client_eof: false,
            discarded: 0,
        });
        self.active += 1;
        self.drive(idx);
    }

    fn close(&mut self, idx: usize, how: Close) {
        let Some(slot) = self.conns.get_mut(idx) else {
            return;
        };
        let Some(conn) = slot.as_mut() else {
            return;
        };
        if let Close::Reply(bytes, why) = how {
            debug!("metrics sidecar: closing {} ({why})", conn.peer);
            // Best effort: a fresh socket's send buffer takes these few bytes.
            let _ = conn.client.write(bytes);
        }
        if conn.phase == Phase::Relay && !conn.upstream_eof {
            // tiny_http still holds its end (and a thread) for this request. Keep
            // the slot until it lets go, or MAX_IN_FLIGHT would bound nothing
            // when the backend is stuck (a render closure that blocks).
            let _ = self.poll.registry().deregister(&mut conn.client);
            let _ = conn.client.shutdown(Shutdown::Both);
            if let Some(up) = conn.upstream.as_ref() {
                // tiny_http must not wait for the rest of a request that never comes.
                let _ = up.shutdown(Shutdown::Write);
            }
            conn.phase = Phase::Orphan;
            conn.head = Vec::new();
            conn.out = Vec::new();
            conn.out_pos = 0;
            return;
        }
        let Some(mut conn) = slot.take() else {
            return;
        };
        if matches!(conn.phase, Phase::Relay | Phase::Orphan) {
            self.in_flight = self.in_flight.saturating_sub(1);
        }
        self.active = self.active.saturating_sub(1);
        self.free.push(idx);
        let _ = self.poll.registry().deregister(&mut conn.client);
        if let Some(up) = conn.upstream.as_mut() {
            let _ = self.poll.registry().deregister(up);
        }
        // FIN rather than RST where we can: the answer must not be discarded.
        let _ = conn.client.shutdown(Shutdown::Write);
    }

    fn expire(&mut self) {
        let now = Instant::now();
        for idx in 0..self.conns.len() {
            let (phase, silent, answered) = match &self.conns[idx] {
                Some(c) if c.deadline <= now && c.phase != Phase::Orphan => {
                    (c.phase, c.head.is_empty(), c.got_answer)
                }
                _ => continue,
            };
            if phase == Phase::Relay && !answered {
                warn_limited!(
                    self.stuck_warn,
                    now,
                    "metrics sidecar: the HTTP backend gave no answer within {:?}; \
                     its slot stays taken until it does",
                    self.request_timeout
                );
            }
            let how = match phase {
                // Never said a word (a browser's preconnect, a port scan): just close.
                Phase::Head if silent => Close::Quiet,
                Phase::Head => Close::Reply(RESP_408, "request timeout"),
                Phase::Queued => Close::Reply(RESP_503, "backend busy"),
                // Part of an answer may be out already; another status line would lie.
                Phase::Relay | Phase::Orphan => Close::Quiet,
            };
            self.close(idx, how);
        }
    }

    fn start_queued(&mut self) {
        if self.in_flight >= MAX_IN_FLIGHT {
            return;
        }
        let mut queued: Vec<(Instant, usize)> = self
            .conns
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.as_ref().map(|c| (i, c)))
            .filter(|(_, c)| c.phase == Phase::Queued)
            .map(|(i, c)| (c.accepted, i))
            .collect();
        queued.sort_unstable();
        for (_, idx) in queued {
            if self.in_flight >= MAX_IN_FLIGHT {
                break;
            }
            self.start_relay(idx);
        }
    }

    fn start_relay(&mut self, idx: usize) {
        let Some(backend) = self.shared.current() else {
            return;
        };
        let mut upstream = match UnixStream::connect(&backend.path) {
            Ok(s) => s,
            Err(e) => {
                debug!("metrics sidecar: backend unreachable: {e}");
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound
                ) && !backend.dead.swap(true, Ordering::SeqCst)
                {
                    // Nobody listens: its accept thread is gone without a word
                    // (it panics when dup() fails under EMFILE). Wake a handler
                    // to start a new one.
                    warn!("metrics sidecar: HTTP backend is gone ({e}); restarting it");
                    backend.server.unblock();
                }
                self.close(idx, Close::Reply(RESP_503, "backend unreachable"));
                return;
            }
        };
        if let Err(e) = self.poll.registry().register(
            &mut upstream,
            Token(FIRST_CONN + 2 * idx + 1),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            debug!("metrics sidecar: cannot register backend socket: {e}");
            self.close(idx, Close::Reply(RESP_503, "backend unreachable"));
            return;
        }
        let timeout = self.request_timeout;
        let Some(Some(conn)) = self.conns.get_mut(idx) else {
            return;
        };
        conn.upstream = Some(upstream);
        conn.phase = Phase::Relay;
        // A fresh allowance for the answer: the head's time was the client's.
        conn.deadline = Instant::now() + timeout;
        self.in_flight += 1;
        self.drive(idx);
    }

    /// Makes every step the connection allows; closes it when done or broken.
    fn drive(&mut self, idx: usize) {
        let Some(Some(conn)) = self.conns.get_mut(idx) else {
            return;
        };
        let step = match conn.phase {
            Phase::Head => read_request(conn, &mut self.scratch),
            Phase::Queued => drain_client(conn, &mut self.scratch),
            Phase::Relay => relay(conn, &mut self.scratch),
            Phase::Orphan => drain_upstream(conn, &mut self.scratch),
        };
        if let Some(how) = step {
            self.close(idx, how);
        } else if let Some(Some(c)) = self.conns.get(idx) {
            if c.phase == Phase::Queued && self.in_flight < MAX_IN_FLIGHT {
                self.start_relay(idx);
            }
        }
    }
}

/// Reads the head up to its blank line, then the body its `Content-Length`
/// announces (tiny_http reads small bodies eagerly and fails on a short one).
/// `Some` means close.
/// `METHOD SP TARGET SP HTTP/1.x`: a method of 1 to 16 upper-case letters, a target
/// that is `*` or starts with `/` (or is an absolute `http` URI), printable ASCII.
fn request_line_ok(head: &[u8]) -> bool {
    let line = match find(head, b"\r\n") {
        Some(end) => &head[..end],
        None => return false,
    };
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    (1..=16).contains(&method.len())
        && method.iter().all(u8::is_ascii_uppercase)
        && (target == b"*" || target.starts_with(b"/") || target.starts_with(b"http"))
        && target.iter().all(|b| b.is_ascii_graphic())
        && (version == b"HTTP/1.1" || version == b"HTTP/1.0")
}

fn read_request(conn: &mut Conn, scratch: &mut [u8]) -> Option<Close> {
    loop {
        if let Some(need) = conn.need {
            if conn.head.len() >= need {
                // Anything after the request (a pipelined one) is not forwarded.
                conn.head.truncate(need);
                conn.phase = Phase::Queued;
                return drain_client(conn, scratch);
            }
        }
        let n = match conn.client.read(scratch) {
            Ok(0) => return Some(Close::Quiet),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return Some(Close::Quiet),
        };
        let searched = conn.head.len().saturating_sub(3);
        conn.head.extend_from_slice(&scratch[..n]);
        if conn.need.is_some() {
            continue;
        }
        if let Some(end) = find(&conn.head[searched..], b"\r\n\r\n") {
            let end = searched + end + 4;
            if end > MAX_HEAD_BYTES {
                return Some(Close::Reply(RESP_431, "request head too large"));
            }
            if !request_line_ok(&conn.head[..end]) {
                // tiny_http would drop such a request without an answer, which
                // the relay could only report as 502; say what it is instead.
                return Some(Close::Reply(RESP_400, "malformed request line"));
            }
            match body_length(&conn.head[..end]) {
                Ok(body) => conn.need = Some(end + body),
                Err(close) => return Some(close),
            }
        } else if conn.head.len() >= MAX_HEAD_BYTES {
            return Some(Close::Reply(RESP_431, "request head too large"));
        }
    }
}

/// The body length a head announces, or the reply that refuses it.
fn body_length(head: &[u8]) -> Result<usize, Close> {
    let mut length: Option<usize> = None;
    for line in head.split(|&b| b == b'\n').skip(1) {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let name = line[..colon].trim_ascii();
        let value = line[colon + 1..].trim_ascii();
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            return Err(Close::Reply(RESP_411, "chunked request body"));
        }
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = std::str::from_utf8(value)
                .ok()
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<usize>().ok());
            match (n, length) {
                (None, _) => return Err(Close::Reply(RESP_400, "bad Content-Length")),
                (Some(n), Some(seen)) if n != seen => {
                    return Err(Close::Reply(RESP_400, "conflicting Content-Length"))
                }
                (Some(n), _) => length = Some(n),
            }
        }
    }
    match length.unwrap_or(0) {
        n if n > MAX_BODY_BYTES => Err(Close::Reply(RESP_413, "request body too large")),
        n => Ok(n),
    }
}

/// Reads and drops what the client sends after its head, so that closing later
/// sends a FIN and not a RST that could destroy the answer in flight.
fn drain_client(conn: &mut Conn, scratch: &mut [u8]) -> Option<Close> {
    while !conn.client_eof {
        match conn.client.read(scratch) {
            Ok(0) => conn.client_eof = true,
            Ok(n) => {
                conn.discarded += n;
                if conn.discarded > MAX_DISCARD {
                    return Some(Close::Quiet);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Some(Close::Quiet),
        }
    }
    None
}

/// Reads and drops what tiny_http still sends for an orphan; done at its EOF.
fn drain_upstream(conn: &mut Conn, scratch: &mut [u8]) -> Option<Close> {
    let Some(up) = conn.upstream.as_mut() else {
        return Some(Close::Quiet);
    };
    loop {
        match up.read(scratch) {
            Ok(0) => {
                conn.upstream_eof = true;
                return Some(Close::Quiet);
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => {
                conn.upstream_eof = true;
                return Some(Close::Quiet);
            }
        }
    }
}

fn relay(conn: &mut Conn, scratch: &mut [u8]) -> Option<Close> {
    let Some(up) = conn.upstream.as_mut() else {
        return Some(Close::Reply(RESP_502, "no backend"));
    };
    // 1. The head, then a half-close: tiny_http answers it and hangs up.
    while conn.head_sent < conn.head.len() {
        match up.write(&conn.head[conn.head_sent..]) {
            Ok(0) => return Some(Close::Reply(RESP_502, "backend closed")),
            Ok(n) => conn.head_sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Some(Close::Reply(RESP_502, "backend write failed")),
        }
    }
    if conn.head_sent == conn.head.len() && !conn.upstream_shut {
        let _ = up.shutdown(Shutdown::Write);
        conn.upstream_shut = true;
        conn.head = Vec::new();
        conn.head_sent = 0;
    }
    // 2. The answer, into a bounded buffer.
    if conn.out_pos > 0 {
        conn.out.drain(..conn.out_pos);
        conn.out_pos = 0;
    }
    while !conn.upstream_eof && conn.out.len() < RESPONSE_BUF {
        let room = (RESPONSE_BUF - conn.out.len()).min(scratch.len());
        match up.read(&mut scratch[..room]) {
            Ok(0) => conn.upstream_eof = true,
            Ok(n) => {
                conn.got_answer = true;
                conn.out.extend_from_slice(&scratch[..n]);
                mark_close(&mut conn.out, &mut conn.status_done);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => conn.upstream_eof = true,
        }
    }
    if conn.upstream_eof {
        if !conn.got_answer {
            return Some(Close::Reply(RESP_502, "backend gave no answer"));
        }
        conn.status_done = true;
    }
    // 3. On to the client, once the status line is complete.
    while conn.status_done && conn.out_pos < conn.out.len() {
        match conn.client.write(&conn.out[conn.out_pos..]) {
            Ok(0) => return Some(Close::Quiet),
            Ok(n) => conn.out_pos += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Some(Close::Quiet),
        }
    }
    if let Some(close) = drain_client(conn, scratch) {
        return Some(close);
    }
    if conn.upstream_eof && conn.out_pos == conn.out.len() {
        return Some(Close::Quiet);
    }
    None
}

/// Adds `Connection: close` after tiny_http's status line: we serve one request
/// per connection, and RFC 9112 §9.6 wants the client told so.
fn mark_close(out: &mut Vec<u8>, status_done: &mut bool) {
    if *status_done {
        return;
    }
    let Some(eol) = find(out, b"\r\n") else {
        if out.len() > 1024 {
            *status_done = true; // not HTTP; pass it on untouched
        }
        return;
    };
    *status_done = true;
    // "HTTP/1.1 100 Continue": an interim answer; the final one follows unmarked.
    let interim = out[..eol]
        .split(|&b| b == b' ')
        .nth(1)
        .is_some_and(|code| code.first() == Some(&b'1'));
    if !interim {
        let at = eol + 2;
        out.splice(at..at, CONNECTION_CLOSE.iter().copied());
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {

    #[test]
    fn request_lines_are_checked_before_relaying() {
        for good in [
            &b"GET /metrics HTTP/1.1\r\n\r\n"[..],
            b"HEAD / HTTP/1.0\r\n\r\n",
            b"POST * HTTP/1.1\r\n\r\n",
        ] {
            assert!(request_line_ok(good), "{good:?}");
        }
        for bad in [
            &b"\x00\xff garbage\r\n\r\n"[..],
            b"GET\r\n\r\n",
            b"GET / HTTP/9.9\r\n\r\n",
            b"get / HTTP/1.1\r\n\r\n",
            b"GET  / HTTP/1.1\r\n\r\n",
            b"GET /a b HTTP/1.1\r\n\r\n",
            b"\r\n\r\n",
        ] {
            assert!(!request_line_ok(bad), "{bad:?}");
        }
    }
    use super::*;

    #[test]
    fn constant_time_eq_matches_only_equal() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"secret", b"secre"));
        assert!(!constant_time_eq(b"secret", b""));
        // A presented byte equal to `!e` past the end must not make it match.
        assert!(!constant_time_eq(b"ab", b"a"));
    }

    #[test]
    fn clip_cuts_on_char_boundaries() {
        let long = "é".repeat(LOG_CLIP + 10);
        assert_eq!(clip(&long).chars().count(), LOG_CLIP);
        assert_eq!(clip("short"), "short");
    }
}
