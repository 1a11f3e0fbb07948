//! A bare mio echo server on one thread, no metrics, no timeouts: the practical
//! limit of an echo server on one core, to judge sockpool against.
//!
//! `mio-echo --listen 127.0.0.1:0` prints `listening on ADDR` on stdout.

use std::io::{self, Read, Write};
use std::process::ExitCode;

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};

const LISTENER: Token = Token(usize::MAX);
const READ_BUF: usize = 64 * 1024;

struct Conn {
    stream: TcpStream,
    /// Bytes read but not yet written back; while any are left we stop reading
    /// (flow control: a client that does not read cannot grow this past one buffer).
    pending: Vec<u8>,
}

enum Next {
    Keep,
    Close,
}

impl Conn {
    /// Writes `pending`; true when it is all gone.
    fn flush(&mut self) -> io::Result<bool> {
        let mut written = 0;
        while written < self.pending.len() {
            match self.stream.write(&self.pending[written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.pending.drain(..written);
        Ok(self.pending.is_empty())
    }

    /// Handles readiness: write what is owed, then echo what can be read.
    fn ready(&mut self, buf: &mut [u8]) -> io::Result<Next> {
        if !self.flush()? {
            return Ok(Next::Keep);
        }
        loop {
            match self.stream.read(buf) {
                Ok(0) => return Ok(Next::Close),
                Ok(n) => {
                    self.pending.extend_from_slice(&buf[..n]);
                    if !self.flush()? {
                        return Ok(Next::Keep);
                    }
                    // A short read emptied the socket: edge-triggered readiness brings
                    // a new event for the next byte, so skip the read that would fail.
                    if n < buf.len() {
                        return Ok(Next::Keep);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Next::Keep),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

fn serve(listen: &str) -> io::Result<()> {
    let addr = listen.parse().map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("--listen {listen:?}: {e}"),
        )
    })?;
    let mut listener = TcpListener::bind(addr)?;
    let mut poll = Poll::new()?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    println!("listening on {}", listener.local_addr()?);
    io::stdout().flush()?;

    let mut conns: Vec<Option<Conn>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; READ_BUF];
    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        for event in events.iter() {
            if event.token() == LISTENER {
                loop {
                    match listener.accept() {
                        Ok((mut stream, _)) => {
                            // Errors here only cost latency, never correctness.
                            let _ = stream.set_nodelay(true);
                            let slot = free.pop().unwrap_or_else(|| {
                                conns.push(None);
                                conns.len() - 1
                            });
                            let interest = Interest::READABLE | Interest::WRITABLE;
                            if poll
                                .registry()
                                .register(&mut stream, Token(slot), interest)
                                .is_ok()
                            {
                                conns[slot] = Some(Conn {
                                    stream,
                                    pending: Vec::new(),
                                });
                            } else {
                                free.push(slot);
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        // EMFILE and friends: give up on this batch; the next event retries.
                        Err(e) => {
                            eprintln!("accept: {e}");
                            break;
                        }
                    }
                }
                continue;
            }
            let slot = event.token().0;
            let Some(conn) = conns.get_mut(slot).and_then(Option::as_mut) else {
                continue;
            };
            if !matches!(conn.ready(&mut buf), Ok(Next::Keep)) {
                if let Some(mut conn) = conns[slot].take() {
                    let _ = poll.registry().deregister(&mut conn.stream);
                }
                free.push(slot);
            }
        }
    }
}

fn main() -> ExitCode {
    let flags = match sockpool_bench::Flags::parse(&["listen"]) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("mio-echo: {e}");
            return ExitCode::from(2);
        }
    };
    match serve(flags.get("listen", "127.0.0.1:0")) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mio-echo: {e}");
            ExitCode::FAILURE
        }
    }
}
