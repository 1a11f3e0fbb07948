//! systemd socket activation (`LISTEN_PID`, `LISTEN_FDS`, `LISTEN_FDNAMES`), with
//! the real `systemd-socket-activate` (Debian's `systemd` package) holding the
//! sockets: a client that connects before sockpool runs is answered; a restart
//! refuses nobody, since the socket outlives the process; named and unnamed fds;
//! fds that are not ours or not listening TCP sockets.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::load::{ping, Load, PingError};
use common::{bin, http_get, LogTail, Server, WAIT};

static NEXT_SOURCE: AtomicU32 = AtomicU32::new(1 << 20);

fn have_tool() -> bool {
    common::have_tool("systemd-socket-activate", "systemd")
}

/// A loopback address with a port that was free a moment ago
/// (`systemd-socket-activate` takes no port 0).
fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

/// A process tree started under `systemd-socket-activate`, its stderr collected.
struct Activated {
    child: Child,
    log: Arc<LogTail>,
}

impl Activated {
    fn start(cmd: &mut Command) -> Activated {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn systemd-socket-activate");
        let log = LogTail::collect(child.stderr.take().expect("stderr"));
        Activated { child, log }
    }

    fn log(&self) -> String {
        self.log.text()
    }

    /// Waits until `needle` appears `times` times in the log; returns the log.
    fn wait_log(&self, needle: &str, times: usize) -> String {
        self.log.wait_log(needle, times)
    }

    /// The children of the top process (the sockpool that runs now, if any).
    fn children(&self) -> Vec<i32> {
        let pid = self.child.id();
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }

    fn wait_exit(&mut self) -> std::process::ExitStatus {
        common::wait_child(&mut self.child, WAIT)
            .unwrap_or_else(|| panic!("did not exit; log:\n{}", self.log()))
    }
}

impl Drop for Activated {
    fn drop(&mut self) {
        for pid in self.children() {
            common::kill(pid as u32);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn signal(pid: i32, sig: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(pid).expect("pid");
    rustix::process::kill_process(pid, sig).expect("kill");
}

/// One [`ping`] from the next source address, its error as text (a refusal too:
/// across these restarts nobody may be refused).
fn ping_once(addr: SocketAddr) -> Result<(), String> {
    let n = NEXT_SOURCE.fetch_add(1, Ordering::Relaxed);
    ping(addr, n, Duration::from_secs(10)).map_err(|e| match e {
        PingError::Connect(e) => format!("connect: {e}"),
        PingError::Lost(what) => what,
    })
}

/// The sockets named `data` and `metrics` (as `FileDescriptorName=` does) are used;
/// a client that connected before sockpool started is answered; the service is
/// restarted twice under a bounded load, and no client is refused or fails,
/// because the listening socket outlives each sockpool (here it is held by the
/// shell that plays systemd's part and starts sockpool again after each exit).
#[test]
fn socket_activation_answers_early_clients_and_restarts_refuse_nobody() {
    if !have_tool() {
        return;
    }
    let (data, metrics) = (free_addr(), free_addr());
    // The shell runs sockpool three times in a row with the inherited sockets,
    // as systemd would on `systemctl restart`: each run gets LISTEN_PID set to
    // its own pid (the inner `sh` execs sockpool, keeping the pid). The pause
    // between runs is a time in which no sockpool exists at all.
    let script = r#"for run in 1 2 3; do sh -c 'LISTEN_PID=$$ exec "$0" serve --workers 1 --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0' "$0" || exit 9; sleep 0.3; done"#;
    let mut tree = Activated::start(
        Command::new("systemd-socket-activate")
            .arg(format!("--listen={data}"))
            .arg(format!("--listen={metrics}"))
            .arg("--fdname=data:metrics")
            .args(["sh", "-c", script, bin()]),
    );
    tree.wait_log(&format!("Listening on {metrics}"), 1);
    // Nothing runs sockpool yet: this connection waits in the kernel's queue and
    // its arrival is what starts sockpool.
    assert!(tree.children().is_empty(), "{}", tree.log());
    ping_once(data).unwrap_or_else(|e| panic!("early client: {e}\n{}", tree.log()));
    let log = tree.wait_log("metrics on http://", 1);
    assert!(
        log.contains(&format!(
            "using the data socket from systemd: fd 3 on {data}"
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "using the metrics socket from systemd: fd 4 on {metrics}"
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!("listening on {data} (mode=ack")),
        "{log}"
    );
    assert!(
        log.contains(&format!("metrics on http://{metrics}/metrics")),
        "{log}"
    );
    assert_eq!(http_get(metrics, "/-/ready", &[]).0, 200);

    let load = Load::start(4, 3000, move || ping_once(data));
    let mut answered = 0;
    for restart in 1..=2 {
        answered += 100;
        load.wait_answered(answered);
        let running = tree.children();
        assert_eq!(running.len(), 1, "{running:?}\n{}", tree.log());
        signal(running[0], rustix::process::Signal::TERM);
        tree.wait_log("shutdown complete", restart);
        tree.wait_log("metrics on http://", restart + 1);
    }
    answered += 100;
    load.wait_answered(answered);
    let (ok, errors) = load.finish();
    eprintln!(
        "two restarts under load: {ok} answered, {} errors",
        errors.len()
    );
    assert!(
        errors.is_empty(),
        "{} clients failed or were refused across the restarts:\n{}\n{}",
        errors.len(),
        errors.join("\n"),
        tree.log()
    );
    let running = tree.children();
    assert_eq!(running.len(), 1, "{running:?}");
    signal(running[0], rustix::process::Signal::TERM);
    assert_eq!(tree.wait_exit().code(), Some(0), "{}", tree.log());
}

/// Without names, fd 3 is data and fd 4 is metrics (here sockpool itself is
/// what `systemd-socket-activate` execs, so LISTEN_PID is its pid).
#[test]
fn unnamed_sockets_are_data_then_metrics() {
    if !have_tool() {
        return;
    }
    let (data, metrics) = (free_addr(), free_addr());
    let mut tree = Activated::start(
        Command::new("systemd-socket-activate")
            .arg(format!("--listen={data}"))
            .arg(format!("--listen={metrics}"))
            .args([bin(), "serve", "--workers", "1"]),
    );
    tree.wait_log(&format!("Listening on {metrics}"), 1);
    ping_once(data).unwrap_or_else(|e| panic!("{e}\n{}", tree.log()));
    let log = tree.wait_log("metrics on http://", 1);
    assert!(
        log.contains(&format!("listening on {data} (mode=ack")),
        "{log}"
    );
    assert!(
        log.contains(&format!("metrics on http://{metrics}/metrics")),
        "{log}"
    );
    let (status, _, body) = http_get(metrics, "/metrics", &[]);
    assert_eq!(status, 200);
    assert!(
        body.contains("sockpool_connections_accepted_total 1"),
        "{body}"
    );
    signal(tree.child.id() as i32, rustix::process::Signal::TERM);
    assert_eq!(tree.wait_exit().code(), Some(0), "{}", tree.log());
}

/// A LISTEN_PID that is not ours means the sockets are someone else's: ignored,
/// with a warning, and sockpool binds its own as configured.
#[test]
fn sockets_for_another_pid_are_ignored() {
    let mut server = Server::start_with_env(
        &["--workers", "1"],
        &[
            ("LISTEN_FDS", "1".as_ref()),
            ("LISTEN_PID", "1".as_ref()),
            ("LISTEN_FDNAMES", "data".as_ref()),
        ],
    );
    assert!(
        server
            .log()
            .contains("LISTEN_FDS=\"1\" ignored: LISTEN_PID=1 is not this process"),
        "{}",
        server.log()
    );
    server.connect();
    server.signal(rustix::process::Signal::TERM);
    assert_eq!(server.wait_exit().code(), Some(0));
}

/// An inherited fd that is not a listening TCP socket is a clear error (exit 1,
/// naming the fd), not a server that silently listens elsewhere.
#[test]
fn an_inherited_fd_that_is_not_a_listening_tcp_socket_is_an_error() {
    // fd 3 is a file.
    let out = common::run_with_input(
        Command::new("sh").args([
            "-c",
            r#"LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" serve --workers 1 --listen 127.0.0.1:0 --no-metrics 3</dev/null"#,
            bin(),
        ]),
        b"",
        "sockpool with fd 3 = /dev/null",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("socket fd 3 (data) from systemd cannot be used"),
        "{stderr}"
    );
    assert!(!stderr.contains("listening on"), "{stderr}");

    // fd 3 is a UDP socket (systemd-socket-activate --datagram starts sockpool
    // on the first datagram).
    if !have_tool() {
        return;
    }
    let data = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .unwrap();
    let mut tree = Activated::start(
        Command::new("systemd-socket-activate")
            .args(["--datagram", &format!("--listen={data}")])
            .args([bin(), "serve", "--workers", "1", "--no-metrics"]),
    );
    tree.wait_log(&format!("Listening on {data}"), 1);
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.send_to(b"x", data).unwrap();
    let status = tree.wait_exit();
    let log = tree.log();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("socket fd 3 (data) from systemd cannot be used"),
        "{log}"
    );
}
