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

/// Handshakes under way (SYN_RECV) to local `port`: after
/// [`refuse_new_handshakes`], the connections that may still complete and must be
/// accepted before the close. Asked of the kernel through sock_diag netlink, which
/// dumps only sockets in that state; where netlink is not allowed (the shipped
/// unit's RestrictAddressFamilies=), read from /proc/net/tcp and tcp6, which lists
/// every socket of the host and costs more with many of them. `None` if neither
/// works (then the caller waits a fixed time). Sockets of another process on the
/// same port (SO_REUSEPORT) are counted too: they can only make the wait longer,
/// up to its bound, never shorter.
pub fn handshakes_in_flight(port: u16) -> Option<usize> {
    match sock_diag::syn_recv(port) {
        Ok(n) => Some(n),
        Err(e) => {
            log::debug!("sock_diag netlink: {e}; reading /proc/net/tcp instead");
            proc_net_syn_recv(port)
        }
    }
}

/// The /proc way of [`handshakes_in_flight`].
fn proc_net_syn_recv(port: u16) -> Option<usize> {
    /// `st` of TCP_SYN_RECV in /proc/net/tcp.
    const SYN_RECV: &str = "03";
    let needle = format!(":{port:04X}");
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
            .filter(|line| line.contains(&needle)) // cheap, before splitting
            .filter(|line| {
                let mut cols = line.split_whitespace().skip(1);
                let local = cols.next().unwrap_or("");
                let state = cols.nth(1).unwrap_or("");
                state == SYN_RECV && local.ends_with(&needle)
            })
            .count();
    }
    any.then_some(n)
}

/// The kernel's socket dump (`sock_diag(7)`, `NETLINK_SOCK_DIAG`), asked for TCP
/// sockets in SYN_RECV only, as plain bytes: an `inet_diag_req_v2` request per
/// address family, `inet_diag_msg` answers.
mod sock_diag {
    use std::io;

    use rustix::net::netlink::{SocketAddrNetlink, SOCK_DIAG};
    use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType};

    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLM_F_REQUEST: u16 = 0x1;
    const NLM_F_DUMP: u16 = 0x300;
    const NLMSG_ERROR: u16 = 2;
    const NLMSG_DONE: u16 = 3;
    const NLMSG_HDR: usize = 16;
    const IPPROTO_TCP: u8 = 6;
    const TCP_SYN_RECV: u8 = 3;
    /// The address families asked: AF_INET, AF_INET6.
    const FAMILIES: [u8; 2] = [2, 10];

    /// TCP sockets in SYN_RECV whose local port is `port`.
    pub fn syn_recv(port: u16) -> io::Result<usize> {
        let fd = rustix::net::socket_with(
            AddressFamily::NETLINK,
            SocketType::DGRAM,
            SocketFlags::CLOEXEC,
            Some(SOCK_DIAG),
        )?;
        let kernel = SocketAddrNetlink::new(0, 0);
        let mut count = 0;
        let mut buf = vec![0u8; 32 * 1024];
        for (seq, family) in FAMILIES.into_iter().enumerate() {
            let mut req = Vec::with_capacity(NLMSG_HDR + 56);
            req.extend_from_slice(&((NLMSG_HDR + 56) as u32).to_ne_bytes());
            req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
            req.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
            req.extend_from_slice(&(seq as u32 + 1).to_ne_bytes());
            req.extend_from_slice(&0u32.to_ne_bytes());
            // inet_diag_req_v2: family, protocol, ext, pad, states, then a zeroed
            // inet_diag_sockid (48 bytes; ignored by a dump without a filter).
            req.extend_from_slice(&[family, IPPROTO_TCP, 0, 0]);
            req.extend_from_slice(&(1u32 << TCP_SYN_RECV).to_ne_bytes());
            req.extend_from_slice(&[0u8; 48]);
            rustix::net::sendto(&fd, &req, SendFlags::empty(), &kernel)?;
            'dump: loop {
                let (n, _) = rustix::net::recv(&fd, &mut buf[..], RecvFlags::empty())?;
                let mut msgs = &buf[..n];
                while msgs.len() >= NLMSG_HDR {
                    let len = u32::from_ne_bytes(msgs[0..4].try_into().unwrap_or([0; 4])) as usize;
                    let kind = u16::from_ne_bytes([msgs[4], msgs[5]]);
                    if len < NLMSG_HDR || len > msgs.len() {
                        return Err(io::Error::other("malformed netlink message"));
                    }
                    match kind {
                        NLMSG_DONE => break 'dump,
                        NLMSG_ERROR => {
                            let errno = msgs
                                .get(NLMSG_HDR..NLMSG_HDR + 4)
                                .map_or(0, |b| i32::from_ne_bytes(b.try_into().unwrap_or([0; 4])));
                            return Err(io::Error::from_raw_os_error(-errno));
                        }
                        SOCK_DIAG_BY_FAMILY => {
                            // inet_diag_msg: family, state, timer, retrans, then
                            // the sockid, whose first field is the local port
                            // (network byte order).
                            let body = &msgs[NLMSG_HDR..len];
                            if body.len() >= 6
                                && body[1] == TCP_SYN_RECV
                                && u16::from_be_bytes([body[4], body[5]]) == port
                            {
                                count += 1;
                            }
                        }
                        _ => {}
                    }
                    // Messages are 4-byte aligned.
                    let next = (len + 3) & !3;
                    msgs = msgs.get(next..).unwrap_or(&[]);
                }
            }
        }
        Ok(count)
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A client socket whose handshake stops half-way: it drops every segment it
    /// receives (a drop-all filter), so the server's SYN-ACK is never answered and
    /// the server holds the connection in SYN_RECV.
    fn half_open(addr: SocketAddr) -> Socket {
        let c = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        c.attach_filter(&[SockFilter::new(0x06, 0, 0, 0)]).unwrap();
        c.set_nonblocking(true).unwrap();
        match c.connect(&addr.into()) {
            Err(e) if e.raw_os_error() == Some(115) => {} // EINPROGRESS
            other => panic!("connect: {other:?}"),
        }
        c
    }

    fn wait_for(what: &str, f: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !f() {
            assert!(Instant::now() < deadline, "never: {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn handshakes_in_flight_are_counted_by_netlink_and_by_proc() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        assert_eq!(sock_diag::syn_recv(addr.port()).unwrap(), 0);
        assert_eq!(proc_net_syn_recv(addr.port()), Some(0));
        let _a = half_open(addr);
        let _b = half_open(addr);
        wait_for("two in SYN_RECV (netlink)", || {
            sock_diag::syn_recv(addr.port()).unwrap() == 2
        });
        assert_eq!(proc_net_syn_recv(addr.port()), Some(2));
        assert_eq!(handshakes_in_flight(addr.port()), Some(2));
    }

    /// The filter stops new handshakes, yet one already under way still
    /// completes (its final ACK passes) and is accepted.
    #[test]
    fn the_syn_filter_stops_new_handshakes_but_lets_one_under_way_complete() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let under_way = half_open(addr);
        wait_for("the handshake under way", || {
            sock_diag::syn_recv(addr.port()).unwrap() == 1
        });
        refuse_new_handshakes(&l).unwrap();
        // A new client: its SYN is dropped, so it neither connects nor is refused.
        let late = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        let err = late
            .connect_timeout(&addr.into(), Duration::from_millis(300))
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        // The client under way starts listening again; the server resends its
        // SYN-ACK (about 1 s after the first), the client's ACK passes the filter.
        under_way.detach_filter().unwrap();
        l.set_nonblocking(true).unwrap();
        let accepted = std::cell::RefCell::new(None);
        wait_for("the handshake under way completes and is accepted", || {
            *accepted.borrow_mut() = l.accept().ok();
            accepted.borrow().is_some()
        });
        let (_stream, peer) = accepted.into_inner().unwrap();
        assert_eq!(Some(peer), under_way.local_addr().unwrap().as_socket());
        assert_eq!(handshakes_in_flight(addr.port()), Some(0));
    }
}
