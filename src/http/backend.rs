//! tiny_http and its supervision: a `Server` on a Unix socket in a private
//! directory, restarted when its accept thread dies or its socket vanishes, and
//! the handler threads that take its requests.
//!
//! tiny_http's `Drop` wakes its blocking `accept()` by connecting to its own
//! socket path. When that path is gone (someone deleted the directory), the
//! connect fails and the accept thread, its task pool (4 threads) and the
//! listening fd would stay forever. So every [`Backend`] keeps a duplicate of the
//! listening socket and shuts it down when dropped: `accept()` then fails with
//! EINVAL, the accept thread ends, and its pool follows.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use log::{debug, error, warn};
use mio::net::UnixStream;

use super::{
    routes, spawn_error, Shared, HANDLERS, REBUILD_BACKOFF_MAX, REBUILD_BACKOFF_MIN, WARN_EVERY,
};
use crate::logging::RateLimit;
use crate::warn_limited;

/// A private directory this old, with no process and no listener, is litter.
const STALE_AFTER: Duration = Duration::from_secs(60);

/// One tiny_http server on its own Unix socket.
pub(super) struct Backend {
    pub(super) server: tiny_http::Server,
    pub(super) path: PathBuf,
    pub(super) generation: u64,
    /// Set when its accept thread has quit (tiny_http never restarts it).
    pub(super) dead: AtomicBool,
    /// The listening socket, shared with tiny_http's accept thread: shut down on
    /// drop to wake that thread when its path is gone.
    listening: UnixListener,
}

impl Backend {
    /// Whether connections wait in its accept queue: checked only after one of
    /// them went a whole request timeout without an answer, it means the accept
    /// thread is gone (it panics when `dup()` fails under EMFILE). Before the
    /// duplicate listener existed that showed as "connection refused".
    pub(super) fn accept_stalled(&self) -> bool {
        use rustix::event::{poll, PollFd, PollFlags};
        let mut fds = [PollFd::new(&self.listening, PollFlags::IN)];
        let zero = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        matches!(poll(&mut fds, Some(&zero)), Ok(n) if n > 0)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        // Runs before `server`'s own Drop (fields drop after this body). A
        // shutdown listener fails every `accept()`, waiting or to come, with
        // EINVAL: the accept thread ends whether or not the path still exists.
        let _ = socket2::SockRef::from(&self.listening).shutdown(std::net::Shutdown::Both);
    }
}

impl Backend {
    pub(super) fn bind(dir: &Path, generation: u64) -> io::Result<Backend> {
        // A fresh name per generation: a dead Server removes its own file on drop.
        let path = dir.join(format!("http-{generation}.sock"));
        if generation > 0 {
            ensure_private(dir)?;
        }
        let listener = UnixListener::bind(&path).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot bind {}: {e}", path.display()))
        })?;
        let listening = listener.try_clone()?;
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
            listening,
        })
    }
}

/// Recreates the private directory if something removed it, and refuses one
/// that is not ours alone (someone else may have made it in the meantime).
fn ensure_private(dir: &Path) -> io::Result<()> {
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {
            warn!("metrics sidecar: recreated {}", dir.display());
            return Ok(());
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(io::Error::new(
                e.kind(),
                format!("cannot recreate {}: {e}", dir.display()),
            ))
        }
    }
    let meta = fs::symlink_metadata(dir)?;
    let me = rustix::process::geteuid().as_raw();
    if !meta.is_dir() || meta.uid() != me || meta.permissions().mode() & 0o077 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{} is no longer a private directory", dir.display()),
        ));
    }
    Ok(())
}

/// Creates a fresh 0700 directory for the backend socket.
///
/// `$RUNTIME_DIRECTORY` (systemd's `RuntimeDirectory=`) if set, else the temp dir.
pub(super) fn private_dir() -> io::Result<PathBuf> {
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

impl Shared {
    /// Replaces the backend `dead` with a fresh one, unless someone already did.
    pub(super) fn rebuild(&self, dead: &Backend) -> io::Result<()> {
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

/// One handler thread: takes requests from the live backend and routes them;
/// restarts the backend when it is found dead.
pub(super) fn handler_loop(shared: &Shared, stop_rx: &Receiver<()>) {
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
                    routes::handle(shared, request, &mut body_hint)
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
