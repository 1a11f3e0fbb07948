//! The listening sockets: binding them (with SO_REUSEPORT when asked), taking them
//! over from systemd (socket activation), and shutting the data listener to new
//! handshakes before its final accept, so that closing it resets nobody.
//!
//! # Socket activation
//!
//! As `sd_listen_fds(3)` says: the sockets start at fd 3; `LISTEN_FDS` is how many;
//! they are meant for us only if `LISTEN_PID` is our pid (otherwise they belong to
//! someone else and are ignored); `LISTEN_FDNAMES` names them, colon-separated
//! (from `FileDescriptorName=`). The three variables are removed from our
//! environment once read, so nothing we might start takes them for its own. A fd
//! named `data` is the data listener and one named `metrics` the metrics listener;
//! with neither name, fd 3 is data and fd 4 is metrics. Turning a raw fd into a
//! socket needs `unsafe`, which this crate forbids: the `listenfd` crate does it
//! (after checking that the fd is a TCP stream socket), and we then check that it
//! is listening.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use socket2::{Domain, SockFilter, SockRef, Socket, Type};

use super::StartError;
use crate::config::Config;

/// The environment variables of socket activation.
const LISTEN_PID: &str = "LISTEN_PID";
const LISTEN_FDS: &str = "LISTEN_FDS";
const LISTEN_FDNAMES: &str = "LISTEN_FDNAMES";

/// The first inherited fd (`SD_LISTEN_FDS_START`).
const FIRST_FD: usize = 3;

/// The listeners the server runs on.
#[derive(Debug)]
pub struct Listeners {
    /// Non-blocking, listening.
    pub data: TcpListener,
    /// Inherited from systemd: it outlives this process, so shutdown must neither
    /// filter it nor drain its queue (the next instance takes what is queued).
    pub data_inherited: bool,
    /// `None` with metrics disabled.
    pub metrics: Option<TcpListener>,
}

/// Binds (or inherits) both listeners. Nothing is left open if it fails.
pub fn open(config: &Config) -> Result<Listeners, StartError> {
    let mut inherited = take_inherited()?;
    let data_inherited = inherited.data.is_some();
    let data = match inherited.data.take() {
        Some(l) => {
            let fail = |e: io::Error| StartError(format!("inherited data listener: {e}"));
            l.set_nonblocking(true).map_err(fail)?;
            let sock = SockRef::from(&l);
            sock.set_tcp_nodelay(config.server.tcp_nodelay)
                .map_err(fail)?;
            l
        }
        None => bind_main(config)?,
    };
    let metrics = match (config.metrics.enabled, inherited.metrics.take()) {
        (true, Some(l)) => Some(l),
        (true, None) => {
            let addr = config.metrics.listen;
            let l = TcpListener::bind(addr)
                .map_err(|e| StartError(format!("cannot listen on {addr} (metrics): {e}")))?;
            Some(l)
        }
        (false, Some(l)) => {
            log::warn!(
                "the metrics socket from systemd ({}) is not used: metrics.enabled = false",
                shown(&l)
            );
            None
        }
        (false, None) => None,
    };
    Ok(Listeners {
        data,
        data_inherited,
        metrics,
    })
}

/// Binds `server.listen` the usual way.
fn bind_main(config: &Config) -> Result<TcpListener, StartError> {
    let addr = config.server.listen;
    let fail = |e: io::Error| StartError(format!("cannot listen on {addr}: {e}"));
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).map_err(fail)?;
    socket.set_reuse_address(true).map_err(fail)?;
    if config.server.reuse_port {
        // Every socket bound to the port with SO_REUSEPORT (same user) shares it:
        // the kernel spreads new connections over them, so a new instance can
        // start while the old one drains. See `net.ipv4.tcp_migrate_req` in the
        // README for what happens to the old one's queue when it closes.
        socket.set_reuse_port(true).map_err(fail)?;
    }
    // Set on the listener, TCP_NODELAY is inherited by every accepted socket
    // (Linux copies it at accept), which saves a setsockopt per connection.
    socket
        .set_tcp_nodelay(config.server.tcp_nodelay)
        .map_err(fail)?;
    socket.bind(&addr.into()).map_err(fail)?;
    socket.listen(config.server.backlog as i32).map_err(fail)?;
    socket.set_nonblocking(true).map_err(fail)?;
    Ok(socket.into())
}

/// What systemd passed us.
#[derive(Default)]
struct Inherited {
    data: Option<TcpListener>,
    metrics: Option<TcpListener>,
}

/// Reads (and removes) the socket-activation variables and takes the sockets.
fn take_inherited() -> Result<Inherited, StartError> {
    let Some(fds) = std::env::var_os(LISTEN_FDS) else {
        return Ok(Inherited::default());
    };
    let pid = std::env::var(LISTEN_PID).ok();
    let names = std::env::var(LISTEN_FDNAMES).ok();
    let ours = pid.as_deref() == Some(&std::process::id().to_string());
    // `listenfd` reads LISTEN_FDS and LISTEN_PID itself (and removes them); it would
    // also take a missing LISTEN_PID as ours, which systemd's rules do not, so the
    // PID is checked here first. Removing the variables is safe this early: no
    // other thread runs yet.
    let mut listen = ours.then(listenfd::ListenFd::from_env);
    for var in [LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES] {
        std::env::remove_var(var);
    }
    let Some(listen) = listen.as_mut() else {
        log::warn!(
            "{LISTEN_FDS}={fds:?} ignored: {LISTEN_PID}={} is not this process ({})",
            pid.as_deref().unwrap_or("(unset)"),
            std::process::id()
        );
        return Ok(Inherited::default());
    };
    let n = listen.len();
    let names: Vec<&str> = match names.as_deref() {
        Some(list) if list.split(':').count() == n => list.split(':').collect(),
        Some(list) => {
            log::warn!("{LISTEN_FDNAMES}={list:?} does not name {n} sockets; ignoring the names");
            Vec::new()
        }
        None => Vec::new(),
    };
    let named = |want: &str| names.iter().position(|n| *n == want);
    let (data, metrics) = if named("data").is_some() || named("metrics").is_some() {
        (named("data"), named("metrics"))
    } else {
        ((n >= 1).then_some(0), (n >= 2).then_some(1))
    };
    for i in (0..n).filter(|&i| Some(i) != data && Some(i) != metrics) {
        let name = names.get(i).copied().unwrap_or("unnamed");
        log::warn!(
            "socket fd {} ({name}) from systemd is not used: only \"data\" and \"metrics\" are",
            FIRST_FD + i
        );
    }
    let mut out = Inherited::default();
    for (slot, idx, role) in [
        (&mut out.data, data, "data"),
        (&mut out.metrics, metrics, "metrics"),
    ] {
        if let Some(i) = idx {
            let l = take_listener(listen, i, role)?;
            log::info!(
                "using the {role} socket from systemd: fd {} on {}",
                FIRST_FD + i,
                shown(&l)
            );
            *slot = Some(l);
        }
    }
    Ok(out)
}

/// Inherited socket `i`, checked to be a listening TCP socket.
fn take_listener(
    listen: &mut listenfd::ListenFd,
    i: usize,
    role: &str,
) -> Result<TcpListener, StartError> {
    let fd = FIRST_FD + i;
    let bad = |why: String| {
        StartError(format!(
            "socket fd {fd} ({role}) from systemd cannot be used: {why}"
        ))
    };
    let l = match listen.take_tcp_listener(i) {
        Ok(Some(l)) => l,
        Ok(None) => return Err(bad("already taken".into())),
        Err(e) => return Err(bad(format!("{e} (it must be a TCP stream socket)"))),
    };
    match SockRef::from(&l).is_listener() {
        Ok(true) => {}
        Ok(false) => {
            return Err(bad(
                "it is not listening (ListenStream= makes one that is)".into()
            ))
        }
        Err(e) => return Err(bad(e.to_string())),
    }
    // A previous instance never leaves a filter on an inherited socket (see
    // `refuse_new_handshakes`); removing one anyway costs nothing and would undo
    // a crash at the worst moment. ENOENT (no filter) is the usual answer.
    let _ = SockRef::from(&l).detach_filter();
    Ok(l)
}

fn shown(l: &TcpListener) -> String {
    l.local_addr()
        .map_or_else(|e| format!("(address unknown: {e})"), |a| a.to_string())
}

/// Makes the kernel drop every new connection attempt (SYN) to `listener`, while
/// handshakes already under way still complete and queue for accept.
///
/// Why: closing a listener resets every connection in its accept queue, and
/// "accept until WouldBlock, then close" still loses the handshakes that complete
/// between the last accept and the close. So new handshakes must stop first. A
/// classic BPF socket filter (SO_ATTACH_FILTER through socket2, safe Rust) runs on
/// every segment the listener receives; this one drops a segment whose SYN flag is
/// set and passes the rest. It must not drop everything: the ACK that completes a
/// handshake (and any data that comes with it) also goes through the listener's
/// filter, and dropping it would leave a client that believes it is connected to
/// be reset at close. A dropped SYN is, to the client, a lost packet: it resends
/// it (after 1 s, 3 s...) and then meets the closed port (refused) or, with
/// SO_REUSEPORT, the next instance. Other ways considered: shutdown(SHUT_RD) on a
/// listener does the close's reset at once; TCP_FASTOPEN/backlog tricks do not
/// stop SYNs; an eBPF reuseport program needs unsafe code and privileges.
///
/// Only for a listener this process owns: a socket inherited from systemd outlives
/// us, and the filter would stay on it for the next instance.
pub fn refuse_new_handshakes(listener: &impl std::os::fd::AsFd) -> io::Result<()> {
    // Classic BPF on a TCP socket sees the segment from its TCP header: byte 13
    // holds the flags, SYN is 0x02. A return value is the number of bytes to keep
    // (0 = drop).
    const BPF_LD_B_ABS: u16 = 0x30; // BPF_LD | BPF_B | BPF_ABS
    const BPF_JSET_K: u16 = 0x45; // BPF_JMP | BPF_JSET | BPF_K
    const BPF_RET_K: u16 = 0x06; // BPF_RET | BPF_K
    const TCP_FLAGS: u32 = 13;
    const SYN: u32 = 0x02;
    let program = [
        SockFilter::new(BPF_LD_B_ABS, 0, 0, TCP_FLAGS),
        SockFilter::new(BPF_JSET_K, 0, 1, SYN), // SYN set: next; else skip one
        SockFilter::new(BPF_RET_K, 0, 0, 0),    // drop
        SockFilter::new(BPF_RET_K, 0, 0, u32::MAX), // keep all of it
    ];
    SockRef::from(listener).attach_filter(&program)
}

/// Handshakes under way (SYN_RECV) to local `port`, from /proc/net/tcp and tcp6:
/// after [`refuse_new_handshakes`], the connections that may still complete and
/// must be accepted before the close. `None` if neither file can be read (then
/// the caller waits a fixed time). Sockets of another process on the same port
/// (SO_REUSEPORT) are counted too: they can only make the wait longer, up to its
/// bound, never shorter.
pub fn handshakes_in_flight(port: u16) -> Option<usize> {
    /// `st` of TCP_SYN_RECV in /proc/net/tcp.
    const SYN_RECV: &str = "03";
    let port = format!(":{port:04X}");
    let mut any = false;
    let mut n = 0;
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        any = true;
        n += text
            .lines()
            .skip(1)
            .filter(|line| {
                let mut cols = line.split_whitespace().skip(1);
                let local = cols.next().unwrap_or("");
                let state = cols.nth(1).unwrap_or("");
                state == SYN_RECV && local.ends_with(&port)
            })
            .count();
    }
    any.then_some(n)
}

/// How long [`handshakes_in_flight`] is polled at most. A handshake whose final
/// ACK was dropped because the accept queue was full completes only when the
/// server resends its SYN-ACK, 1 s after the SYN and then 3 s; this covers the
/// first resend with room to spare, and bounds the wait when the other end never
/// answers (or when another instance shares the port).
pub const HANDSHAKE_WAIT_MAX: Duration = Duration::from_millis(2500);

/// The least time between the filter and the final accept: a SYN already past
/// the filter on another CPU shows up in /proc only when its request socket is
/// made, a few microseconds later.
pub const HANDSHAKE_SETTLE: Duration = Duration::from_millis(20);

/// Where a listener is, for the log.
pub fn local_addr(l: &TcpListener) -> Result<SocketAddr, StartError> {
    l.local_addr()
        .map_err(|e| StartError(format!("listener: {e}")))
}
