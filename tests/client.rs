//! `sockpool client` against the real server, as a child process with piped stdin
//! (the way scripts use it), plus `client::run` in-process for the prompt, and
//! the tutorial's own Python client against the default server.
mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Instant;

use common::{ack, kill, output_within, run_with_input, Server, WAIT};

fn spawn_client(addr: &str) -> Child {
    Command::new(common::bin())
        .args(["client", "--addr", addr])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sockpool client")
}

/// Runs `sockpool client --addr ADDR` with `input` on its stdin, then EOF.
fn client(addr: &str, input: &[u8]) -> Output {
    let mut cmd = Command::new(common::bin());
    cmd.args(["client", "--addr", addr]);
    run_with_input(&mut cmd, input, "sockpool client")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Streams a child's stdout over a channel, chunk by chunk.
fn stream_stdout(mut stdout: ChildStdout) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    rx
}

/// Receives `want` bytes from [`stream_stdout`], bounded by [`WAIT`].
fn recv_bytes(rx: &mpsc::Receiver<Vec<u8>>, want: usize, pid: u32) -> Vec<u8> {
    let deadline = Instant::now() + WAIT;
    let mut got = Vec::new();
    while got.len() < want {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(chunk) => got.extend(chunk),
            Err(e) => {
                kill(pid);
                panic!("{want} bytes from the client: {e} after {got:?}");
            }
        }
    }
    got
}

#[test]
fn pipe_prints_exact_replies_and_no_prompt() {
    let server = Server::start(&[]);
    let addr = server.addr.to_string();
    // The last line has no `\n`: the client sends one anyway.
    let out = client(&addr, "hello\n  spaced out  \nwörld\r\nlast".as_bytes());
    assert!(out.status.success(), "{out:?}");
    let want = [
        ack(b"hello"),
        ack(b"  spaced out  "),
        ack("wörld".as_bytes()),
        ack(b"last"),
    ]
    .concat();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&want)
    );
    assert_eq!(stderr(&out), "", "no banner or prompt outside a terminal");
}

#[test]
fn empty_line_quits() {
    let server = Server::start(&["--framing", "line"]);
    let addr = server.addr.to_string();
    for quit in ["\n", "\r\n"] {
        let out = client(&addr, format!("a\n{quit}never sent\n").as_bytes());
        assert!(out.status.success(), "{out:?}");
        assert_eq!(out.stdout, ack(b"a"), "quit line {quit:?}");
        assert_eq!(stderr(&out), "");
    }
    // An empty line as the very first input: nothing sent, clean exit.
    let out = client(&addr, b"\nnever sent\n");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, b"");
    // End of input straight away: same.
    let out = client(&addr, b"");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, b"");
}

#[test]
fn line_framing_and_echo_mode_replies() {
    let line = Server::start(&["--framing", "line"]);
    let out = client(&line.addr.to_string(), b"one\ntwo\r\n");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, [ack(b"one"), ack(b"two")].concat());

    let echo = Server::start(&["--mode", "echo"]);
    let input = b"one\ntwo\r\n  three\n";
    let out = client(&echo.addr.to_string(), input);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, input);
}

#[test]
fn invalid_utf8_and_nul_bytes_round_trip() {
    let raw: &[u8] = b"\xff\xfe\x00mid\x00\xc3( \x80end";
    let input = [raw, b"\n"].concat();

    let server = Server::start(&[]);
    let out = client(&server.addr.to_string(), &input);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, ack(raw));

    let echo = Server::start(&["--mode", "echo"]);
    let out = client(&echo.addr.to_string(), &input);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, input);
}

/// A line far bigger than the socket buffers plus the server's
/// `max_pending_write_bytes`: a client that wrote it all before reading any
/// reply would deadlock with the flow-controlled server.
#[test]
fn long_line_does_not_deadlock() {
    let body = vec![b'x'; 4 << 20];
    let input = [&body[..], b"\n"].concat();

    let echo = Server::start(&["--mode", "echo"]);
    let out = client(&echo.addr.to_string(), &input);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(out.stdout == input, "echo reply differs from the line sent");

    // `read` framing answers each chunk the server reads: the replies, unwrapped
    // and joined, are the line.
    let ack_server = Server::start(&[]);
    let out = client(&ack_server.addr.to_string(), &input);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).expect("ascii replies");
    assert!(text.ends_with("\"\n"), "the last reply ends the line");
    let inner: String = text
        .trim_end_matches('\n')
        .split("Server received \"")
        .skip(1)
        .map(|part| part.strip_suffix('"').expect("each reply is quoted"))
        .collect();
    assert!(inner.len() == body.len() && inner.bytes().all(|b| b == b'x'));
}

#[test]
fn refused_address_is_a_one_line_error() {
    // A port that was just free: bind, note it, close.
    let addr = {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").to_string()
    };
    let out = client(&addr, b"hello\n");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(out.stdout, b"");
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err:?}");
    assert!(
        err.starts_with(&format!("sockpool client: cannot connect to {addr}: ")),
        "{err:?}"
    );
}

#[test]
fn unresolvable_address_is_a_one_line_error() {
    for addr in ["127.0.0.1", "127.0.0.1:notaport", "300.1.2.3:5"] {
        let out = client(addr, b"hello\n");
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "{err:?}");
        assert!(
            err.starts_with(&format!(
                "sockpool client: cannot resolve address {addr:?}: "
            )),
            "{err:?}"
        );
    }
}

#[test]
fn server_killed_mid_session_is_an_error() {
    let mut server = Server::start(&[]);
    let addr = server.addr.to_string();
    let mut child = spawn_client(&addr);
    let pid = child.id();
    let mut stdin = child.stdin.take().expect("stdin");
    let stdout = stream_stdout(child.stdout.take().expect("stdout"));

    stdin.write_all(b"one\n").expect("write line");
    stdin.flush().expect("flush");
    let want = ack(b"one");
    assert_eq!(recv_bytes(&stdout, want.len(), pid), want);

    server.signal(rustix::process::Signal::KILL);
    server.wait_exit();
    // The client is blocked on stdin; its next line finds the server gone.
    // (The write may also fail if the client already quit: fine either way.)
    let _ = stdin.write_all(b"two\n");
    drop(stdin);
    let out = output_within(child, "sockpool client");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stdout.try_iter().all(|chunk| chunk.is_empty()),
        "nothing more printed"
    );
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err:?}");
    // FIN or RST, depending on timing: both name the address and the cause.
    assert!(
        err == format!("sockpool client: connection to {addr} closed by the server\n")
            || err == format!("sockpool client: connection to {addr} reset by the server\n"),
        "{err:?}"
    );
}

#[test]
fn run_shows_the_prompt_when_asked() {
    let server = Server::start(&[]);
    let addr = server.addr.to_string();

    let (mut out, mut err) = (Vec::new(), Vec::new());
    sockpool::client::run(&addr, &b"hi\nthere\n"[..], &mut out, &mut err, true).expect("session");
    // End of input (Ctrl-D) ends the prompt line.
    let want = [&b"> "[..], &ack(b"hi"), b"> ", &ack(b"there"), b"> \n"].concat();
    assert_eq!(
        String::from_utf8_lossy(&out),
        String::from_utf8_lossy(&want)
    );
    let err = String::from_utf8(err).expect("utf-8 banner");
    assert!(err.starts_with(&format!("connected to {addr}")), "{err:?}");

    // An empty line quits without a further prompt; without `prompt` there is
    // neither prompt nor banner.
    let (mut out, mut err) = (Vec::new(), Vec::new());
    sockpool::client::run(&addr, &b"hi\n\n"[..], &mut out, &mut err, true).expect("session");
    assert_eq!(out, [&b"> "[..], &ack(b"hi"), b"> "].concat());
    let (mut out, mut err) = (Vec::new(), Vec::new());
    sockpool::client::run(&addr, &b"hi\n"[..], &mut out, &mut err, false).expect("session");
    assert_eq!(out, ack(b"hi"));
    assert!(err.is_empty());
}

/// The tutorial's own client (no newline, one `recv` per message) against the
/// default server (`--mode ack --framing read`), unchanged.
#[test]
fn tutorial_python_client_works_against_default_server() {
    if !common::have_tool("python3", "python3") {
        return;
    }
    let server = Server::start(&["--mode", "ack", "--framing", "read"]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tutorial_client.py");
    let out = run_with_input(
        Command::new("python3").args([script, "127.0.0.1", &server.addr.port().to_string()]),
        "hello\nHello, World!\nwörld\n\n".as_bytes(),
        "the tutorial's client",
    );
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    // `input()` prints its prompt with no newline; `print` adds one per reply.
    assert_eq!(
        stdout,
        "Enter message: Server received \"hello\"\n\
         Enter message: Server received \"Hello, World!\"\n\
         Enter message: Server received \"wörld\"\n\
         Enter message: "
    );
}
