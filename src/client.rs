//! The interactive client: `sockpool client [--addr HOST:PORT]`.
//!
//! The tutorial's client, done right. It connects, then for each line of input
//! sends the line with its `\n` and prints the reply as raw bytes, until an empty
//! line or end of input; then it closes the socket gracefully (shut the write
//! side, drain what the server still sends for a bounded time, close). The prompt
//! is shown only when stdin is a terminal, so pipes and scripts get bare replies.
//!
//! The protocol has no length prefix. Every line we send ends in `\n`, and every
//! server mode answers such a line with bytes that end in `\n` (ack: one
//! `Server received "..."` per chunk, the last one ending the line; echo: the line
//! itself), so a reply is complete once a `\n` has come back.
//!
//! Each line is sent while a second thread reads and prints the reply. Reading
//! only after the write would deadlock on a line longer than the socket buffers:
//! the server stops reading from a client whose replies pile up unread.
use std::fmt;
use std::io::{self, BufRead, IsTerminal, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

/// Shown before each line when stdin is a terminal.
const PROMPT: &[u8] = b"> ";

/// Lines are sent in pieces of at most this many bytes, so a line of any length
/// costs bounded memory. Shorter lines go out in one write, which the server's
/// `read` framing answers with one reply.
const MAX_PIECE: usize = 1 << 20;

/// Size of the buffer used to read replies from the socket.
const READ_BUF: usize = 16 * 1024;

/// The time limits of one session.
#[derive(Debug, Clone, Copy)]
struct Limits {
    /// Per resolved address.
    connect: Duration,
    /// No reply byte for this long after the line is sent: give up.
    reply: Duration,
    /// No write progress for this long (the server is not reading): give up.
    send: Duration,
    /// How long to wait for the server to finish after we shut our write side.
    drain: Duration,
}

impl Limits {
    const DEFAULT: Limits = Limits {
        connect: Duration::from_secs(10),
        reply: Duration::from_secs(10),
        send: Duration::from_secs(10),
        drain: Duration::from_secs(2),
    };
}

/// Why a session ended early. Every variant displays as one line naming what
/// failed (and the server address where there is one).
#[derive(Debug)]
pub enum ClientError {
    /// The address did not parse or resolve.
    Resolve { addr: String, source: io::Error },
    /// No resolved address accepted the connection.
    Connect { addr: String, source: io::Error },
    /// The server closed the connection before replying.
    Closed { addr: String },
    /// The server reset the connection.
    Reset { addr: String },
    /// Nothing came back in time after a line was sent.
    ReplyTimeout { addr: String, after: Duration },
    /// The server stopped reading what we send.
    SendTimeout { addr: String, after: Duration },
    /// Any other socket write error.
    Send { addr: String, source: io::Error },
    /// Any other socket read error.
    Receive { addr: String, source: io::Error },
    /// Reading the input failed.
    Stdin(io::Error),
    /// Writing the output failed.
    Stdout(io::Error),
    /// The reply reader thread could not be started.
    Thread(io::Error),
    /// The reply reader thread panicked (a bug: it has no panicking paths).
    ReaderPanicked,
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Resolve { addr, source } => {
                write!(f, "cannot resolve address {addr:?}: {source}")
            }
            ClientError::Connect { addr, source } => {
                write!(f, "cannot connect to {addr}: {source}")
            }
            ClientError::Closed { addr } => {
                write!(f, "connection to {addr} closed by the server")
            }
            ClientError::Reset { addr } => write!(f, "connection to {addr} reset by the server"),
            ClientError::ReplyTimeout { addr, after } => {
                write!(f, "no reply from {addr} within {after:?}")
            }
            ClientError::SendTimeout { addr, after } => write!(
                f,
                "cannot send to {addr}: no progress for {after:?} (the server is not reading)"
            ),
            ClientError::Send { addr, source } => write!(f, "cannot send to {addr}: {source}"),
            ClientError::Receive { addr, source } => {
                write!(f, "cannot receive from {addr}: {source}")
            }
            ClientError::Stdin(e) => write!(f, "cannot read standard input: {e}"),
            ClientError::Stdout(e) => write!(f, "cannot write standard output: {e}"),
            ClientError::Thread(e) => write!(f, "cannot start the reply reader thread: {e}"),
            ClientError::ReaderPanicked => write!(f, "internal error: the reply reader panicked"),
        }
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClientError::Resolve { source, .. }
            | ClientError::Connect { source, .. }
            | ClientError::Send { source, .. }
            | ClientError::Receive { source, .. }
            | ClientError::Stdin(source)
            | ClientError::Stdout(source)
            | ClientError::Thread(source) => Some(source),
            _ => None,
        }
    }
}

/// `sockpool client --addr HOST:PORT`: runs on the process's stdin/stdout.
pub fn main(addr: &str) -> ExitCode {
    let stdin = io::stdin();
    let prompt = stdin.is_terminal();
    match run(addr, stdin.lock(), io::stdout(), io::stderr(), prompt) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Nothing useful is left to do if stderr itself is gone.
            let _ = writeln!(io::stderr(), "sockpool client: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs one session against `addr`: lines from `input`, replies to `output` as
/// raw bytes, the prompt (when `prompt`) to `output` and a one-line banner to
/// `err`. Returns `Ok` after an empty line or end of input and a graceful close.
pub fn run(
    addr: &str,
    input: impl BufRead,
    output: impl Write + Send,
    err: impl Write,
    prompt: bool,
) -> Result<(), ClientError> {
    run_with(addr, Limits::DEFAULT, input, output, err, prompt)
}

fn run_with(
    addr: &str,
    limits: Limits,
    mut input: impl BufRead,
    mut output: impl Write + Send,
    mut err: impl Write,
    prompt: bool,
) -> Result<(), ClientError> {
    let stream = connect(addr, limits.connect)?;
    stream
        .set_write_timeout(Some(limits.send))
        .map_err(|source| send_error(addr, limits.send, source))?;
    if prompt {
        // Only a courtesy to the person at the terminal: a failure to show it
        // must not end the session.
        let _ = writeln!(
            err,
            "connected to {addr}; an empty line or end of input quits"
        );
    }
    loop {
        if prompt {
            write_out(&mut output, PROMPT)?;
        }
        let mut line = Vec::new();
        read_piece(&mut input, &mut line)?;
        if line.is_empty() {
            if prompt {
                // End of input (Ctrl-D) leaves the cursor after the prompt.
                write_out(&mut output, b"\n")?;
            }
            break;
        }
        if is_empty_line(&line) {
            break;
        }
        exchange(&stream, addr, limits, line, &mut input, &mut output)?;
    }
    close(&stream, limits.drain, &mut output)
}

/// Resolves `addr` and connects to the first address that accepts.
fn connect(addr: &str, timeout: Duration) -> Result<TcpStream, ClientError> {
    let resolved = addr
        .to_socket_addrs()
        .map_err(|source| ClientError::Resolve {
            addr: addr.to_owned(),
            source,
        })?;
    let mut last = None;
    for sa in resolved {
        match TcpStream::connect_timeout(&sa, timeout) {
            Ok(stream) => return Ok(stream),
            Err(e) => last = Some(e),
        }
    }
    Err(match last {
        Some(source) => ClientError::Connect {
            addr: addr.to_owned(),
            source,
        },
        None => ClientError::Resolve {
            addr: addr.to_owned(),
            source: io::Error::new(io::ErrorKind::NotFound, "no addresses found"),
        },
    })
}

/// Appends the next piece of a line to `buf`: up to and including `\n`, at most
/// [`MAX_PIECE`] bytes, fewer only at end of input. Bytes, not text: stdin need
/// not be UTF-8.
fn read_piece(input: &mut impl BufRead, buf: &mut Vec<u8>) -> Result<usize, ClientError> {
    input
        .by_ref()
        .take(MAX_PIECE as u64)
        .read_until(b'\n', buf)
        .map_err(ClientError::Stdin)
}

/// True for `\n`, `\r\n` and a lone `\r` at end of input: the user's way to quit.
fn is_empty_line(line: &[u8]) -> bool {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    line.is_empty()
}

/// Sends one line (whose first piece is `first`) and prints its reply.
fn exchange(
    stream: &TcpStream,
    addr: &str,
    limits: Limits,
    first: Vec<u8>,
    input: &mut impl BufRead,
    output: &mut (impl Write + Send),
) -> Result<(), ClientError> {
    // Set once the whole line is out: the reply clock starts there, since a
    // line-framed server answers nothing before the `\n`.
    let sent_at = OnceLock::new();
    // Set when sending failed and we shut the socket to wake the reader: its
    // EOF is then ours, not the server's.
    let aborted = AtomicBool::new(false);
    thread::scope(|scope| {
        let reader = thread::Builder::new()
            .name("client-reply".into())
            .spawn_scoped(scope, || {
                receive_reply(stream, addr, limits.reply, &sent_at, &aborted, output)
            })
            .map_err(ClientError::Thread)?;
        let sent = send_line(stream, addr, limits.send, first, input);
        if sent.is_err() {
            aborted.store(true, Ordering::SeqCst);
            // Errors here only mean the socket is already dead, which wakes
            // the reader just as well.
            let _ = stream.shutdown(Shutdown::Both);
        }
        let _ = sent_at.set(Instant::now());
        let received = reader.join().unwrap_or(Err(ClientError::ReaderPanicked));
        // A server that hung up explains a failed write better than the write
        // error does, so the reader's verdict comes first.
        match (sent, received) {
            (_, Err(e)) => Err(e),
            (Err(e), Ok(())) => Err(e),
            (Ok(()), Ok(())) => Ok(()),
        }
    })
}

/// Writes the line to the socket, reading further pieces from `input` while the
/// line is longer than one piece. A last line without `\n` gets one.
fn send_line(
    stream: &TcpStream,
    addr: &str,
    timeout: Duration,
    mut piece: Vec<u8>,
    input: &mut impl BufRead,
) -> Result<(), ClientError> {
    loop {
        let complete = piece.ends_with(b"\n");
        let at_eof = !complete && piece.len() < MAX_PIECE;
        if at_eof {
            piece.push(b'\n');
        }
        let mut sock = stream;
        sock.write_all(&piece)
            .map_err(|e| send_error(addr, timeout, e))?;
        if complete || at_eof {
            return Ok(());
        }
        piece.clear();
        read_piece(input, &mut piece)?;
    }
}

/// Reads from the socket and prints everything until a `\n` has been printed.
fn receive_reply(
    stream: &TcpStream,
    addr: &str,
    timeout: Duration,
    sent_at: &OnceLock<Instant>,
    aborted: &AtomicBool,
    output: &mut impl Write,
) -> Result<(), ClientError> {
    let receive_err = |source| ClientError::Receive {
        addr: addr.to_owned(),
        source,
    };
    let mut buf = vec![0u8; READ_BUF];
    let mut last_data = Instant::now();
    stream
        .set_read_timeout(Some(timeout))
        .map_err(receive_err)?;
    let mut sock = stream;
    loop {
        match sock.read(&mut buf) {
            Ok(0) if aborted.load(Ordering::SeqCst) => return Ok(()),
            Ok(0) => {
                return Err(ClientError::Closed {
                    addr: addr.to_owned(),
                })
            }
            Ok(n) => {
                let data = &buf[..n];
                write_out(output, data)?;
                if data.contains(&b'\n') {
                    return Ok(());
                }
                last_data = Instant::now();
                stream
                    .set_read_timeout(Some(timeout))
                    .map_err(receive_err)?;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) if aborted.load(Ordering::SeqCst) => return Ok(()),
            Err(e) if is_timeout(&e) => {
                // While the line is still going out, silence is expected; the
                // writer has its own timeout.
                let Some(&sent) = sent_at.get() else {
                    continue;
                };
                let idle = last_data.max(sent).elapsed();
                if idle >= timeout {
                    return Err(ClientError::ReplyTimeout {
                        addr: addr.to_owned(),
                        after: timeout,
                    });
                }
                stream
                    .set_read_timeout(Some(timeout - idle))
                    .map_err(receive_err)?;
            }
            Err(e) => return Err(connection_error(addr, e).unwrap_or_else(receive_err)),
        }
    }
}

/// Ends the session politely: shut our write side so the server sees end of
/// input and sends whatever it still owes, print that for a bounded time, then
/// close (on drop).
fn close(stream: &TcpStream, drain: Duration, output: &mut impl Write) -> Result<(), ClientError> {
    if stream.shutdown(Shutdown::Write).is_err() {
        // Not connected any more: nothing left to drain.
        return Ok(());
    }
    let deadline = Instant::now() + drain;
    let mut buf = vec![0u8; READ_BUF];
    let mut sock = stream;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return Ok(());
        }
        match sock.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => write_out(output, &buf[..n])?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // Every reply we asked for is already printed; a reset or a timeout
            // while closing loses nothing.
            Err(_) => return Ok(()),
        }
    }
}

/// Writes and flushes, so that a reply shows at once even without a `\n`.
fn write_out(output: &mut impl Write, data: &[u8]) -> Result<(), ClientError> {
    output
        .write_all(data)
        .and_then(|()| output.flush())
        .map_err(ClientError::Stdout)
}

fn is_timeout(e: &io::Error) -> bool {
    // A socket read timeout is EAGAIN on Unix and ETIMEDOUT on Windows.
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Maps the errors that mean "the server hung up" to their own variants and
/// hands any other error back.
fn connection_error(addr: &str, e: io::Error) -> Result<ClientError, io::Error> {
    let addr = addr.to_owned();
    match e.kind() {
        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted => {
            Ok(ClientError::Reset { addr })
        }
        // EPIPE: the server has closed its end, and our write found out.
        io::ErrorKind::BrokenPipe => Ok(ClientError::Closed { addr }),
        _ => Err(e),
    }
}

fn send_error(addr: &str, timeout: Duration, e: io::Error) -> ClientError {
    if is_timeout(&e) {
        return ClientError::SendTimeout {
            addr: addr.to_owned(),
            after: timeout,
        };
    }
    connection_error(addr, e).unwrap_or_else(|source| ClientError::Send {
        addr: addr.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    //! Failure paths the real server never takes on purpose (silence, a reply cut
    //! short), played by a throwaway peer on a real socket.
    use super::*;
    use std::net::TcpListener;

    /// For the test that waits for the reply timeout on purpose.
    const SHORT: Limits = Limits {
        connect: Duration::from_secs(10),
        reply: Duration::from_millis(200),
        send: Duration::from_secs(10),
        drain: Duration::from_secs(2),
    };

    /// For tests whose peer does answer: no timeout a slow machine could reach.
    const PATIENT: Limits = Limits {
        connect: Duration::from_secs(20),
        reply: Duration::from_secs(20),
        send: Duration::from_secs(20),
        drain: Duration::from_secs(20),
    };

    /// Runs `peer` on the one connection a fresh listener accepts.
    fn with_peer(
        peer: impl FnOnce(TcpStream) + Send + 'static,
    ) -> (String, thread::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("local_addr").to_string();
        let handle = thread::spawn(move || {
            let (conn, _) = listener.accept().expect("accept");
            peer(conn);
        });
        (addr, handle)
    }

    /// Reads from `conn` until `n` bytes have arrived (or the client is gone).
    fn read_n(conn: &mut TcpStream, n: usize) -> Vec<u8> {
        let mut got = vec![0u8; n];
        let _ = conn.read_exact(&mut got);
        got
    }

    #[test]
    fn empty_lines() {
        for line in [&b"\n"[..], b"\r\n", b"\r"] {
            assert!(is_empty_line(line), "{line:?}");
        }
        for line in [&b"a\n"[..], b" \n", b"\0\n", b"\r\r\n", b"x"] {
            assert!(!is_empty_line(line), "{line:?}");
        }
    }

    #[test]
    fn silent_server_is_a_reply_timeout() {
        let (addr, peer) = with_peer(|mut conn| {
            let _ = read_n(&mut conn, 3);
            // Hold the connection open, silent, until the client gives up.
            let _ = conn.read(&mut [0u8; 1]);
        });
        let mut out = Vec::new();
        let res = run_with(&addr, SHORT, &b"hi\n"[..], &mut out, io::sink(), false);
        let e = res.expect_err("a silent server must time out");
        assert!(matches!(e, ClientError::ReplyTimeout { .. }), "{e:?}");
        assert_eq!(e.to_string(), format!("no reply from {addr} within 200ms"));
        assert!(out.is_empty());
        peer.join().expect("peer");
    }

    #[test]
    fn reply_cut_short_is_printed_then_closed() {
        let (addr, peer) = with_peer(|mut conn| {
            let _ = read_n(&mut conn, 3);
            let _ = conn.write_all(b"partial");
        });
        let mut out = Vec::new();
        let res = run_with(
            &addr,
            PATIENT,
            &b"hi\nmore\n"[..],
            &mut out,
            io::sink(),
            false,
        );
        let e = res.expect_err("a server that hangs up mid-reply is an error");
        assert!(matches!(e, ClientError::Closed { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            format!("connection to {addr} closed by the server")
        );
        assert_eq!(out, b"partial");
        peer.join().expect("peer");
    }

    #[test]
    fn reply_in_pieces_and_last_line_without_newline() {
        let (addr, peer) = with_peer(|mut conn| {
            assert_eq!(read_n(&mut conn, 4), b"abc\n");
            // A reply split across writes is one reply: we must wait for `\n`.
            for part in [&b"one "[..], b"reply", b"\n"] {
                conn.write_all(part).expect("write");
                conn.flush().expect("flush");
                thread::sleep(Duration::from_millis(20));
            }
            // The last line had no `\n`; the client adds one.
            assert_eq!(read_n(&mut conn, 4), b"xyz\n");
            conn.write_all(b"two\n").expect("write");
            // After the client's end of input, what we still send is printed.
            let mut rest = Vec::new();
            conn.read_to_end(&mut rest).expect("read to end");
            assert!(rest.is_empty());
            conn.write_all(b"bye\n").expect("write");
        });
        let mut out = Vec::new();
        run_with(
            &addr,
            PATIENT,
            &b"abc\nxyz"[..],
            &mut out,
            io::sink(),
            false,
        )
        .expect("run");
        assert_eq!(out, b"one reply\ntwo\nbye\n");
        peer.join().expect("peer");
    }

    #[test]
    fn address_without_port_is_a_resolve_error() {
        let e = run("127.0.0.1", &b"hi\n"[..], io::sink(), io::sink(), false).expect_err("no port");
        assert!(matches!(e, ClientError::Resolve { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.starts_with("cannot resolve address \"127.0.0.1\": "),
            "{msg}"
        );
        assert!(!msg.contains('\n'));
    }
}
