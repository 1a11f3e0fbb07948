//! One sidecar connection: its state and the steps the front takes on it.
//! Read the head (checked by `request`), queue, relay tiny_http's answer, drain.
//!
//! Both sockets are edge-triggered: every step runs until the kernel says
//! WouldBlock (or the bounded buffer is full, in which case the other side is
//! blocked and its own edge comes later), so no wake-up is ever needed that
//! will not come. Memory is bounded both ways: the head by
//! [`MAX_HEAD_BYTES`](super::MAX_HEAD_BYTES), the answer by [`RESPONSE_BUF`]
//! (tiny_http waits on its socket while the client is slow), and what follows
//! the head by [`MAX_DISCARD`].

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::time::Instant;

use log::debug;
use mio::net::{TcpStream, UnixStream};

use super::request::{self, HeadScanner, Reject};
use crate::logging::escape;

/// Response bytes held per connection while the client is slow to read.
pub(super) const RESPONSE_BUF: usize = 64 * 1024;
/// Bytes after the request read and thrown away before the connection is dropped.
const MAX_DISCARD: usize = 1024 * 1024;
/// Client bytes shown in a log line, escaped.
const LOG_CLIP: usize = 120;

pub(super) const RESP_400: &[u8] =
    b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
pub(super) const RESP_408: &[u8] =
    b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
pub(super) const RESP_431: &[u8] = b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
pub(super) const RESP_502: &[u8] =
    b"HTTP/1.1 502 Bad Gateway\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
pub(super) const RESP_503: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
const CONNECTION_CLOSE: &[u8] = b"Connection: close\r\n";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Phase {
    /// Reading the request head from the client.
    Head,
    /// Head accepted; waiting for one of the MAX_IN_FLIGHT backend slots.
    Queued,
    /// Canonical request sent to tiny_http; relaying its answer.
    Relay,
    /// The client is gone but tiny_http has not hung up yet: its in-flight slot
    /// stays taken until it does.
    Orphan,
}

pub(super) struct Conn {
    pub(super) client: TcpStream,
    pub(super) peer: SocketAddr,
    pub(super) accepted: Instant,
    pub(super) deadline: Instant,
    pub(super) phase: Phase,
    /// The client's bytes until the head is complete (Head only).
    pub(super) head: Vec<u8>,
    scanner: HeadScanner,
    /// The canonical request for tiny_http, and how much of it is written.
    request: Vec<u8>,
    request_sent: usize,
    pub(super) upstream: Option<UnixStream>,
    upstream_shut: bool,
    pub(super) upstream_eof: bool,
    /// tiny_http's answer on its way to the client: `out[out_pos..]` is owed.
    out: Vec<u8>,
    out_pos: usize,
    /// The status line has been seen (and `Connection: close` added after it).
    status_done: bool,
    pub(super) got_answer: bool,
    /// Some byte of the answer reached the client: a late error can only close.
    pub(super) sent_any: bool,
    client_eof: bool,
    discarded: usize,
}

/// Why the front closes a connection, and what it tells the client first.
#[derive(Clone, Copy, Debug)]
pub(super) enum Close {
    /// Finished, or the client left: nothing more to say.
    Quiet,
    Reply(&'static [u8], &'static str),
}

impl Conn {
    pub(super) fn new(
        client: TcpStream,
        peer: SocketAddr,
        now: Instant,
        deadline: Instant,
    ) -> Conn {
        Conn {
            client,
            peer,
            accepted: now,
            deadline,
            phase: Phase::Head,
            head: Vec::new(),
            scanner: HeadScanner::default(),
            request: Vec::new(),
            request_sent: 0,
            upstream: None,
            upstream_shut: false,
            upstream_eof: false,
            out: Vec::new(),
            out_pos: 0,
            status_done: false,
            got_answer: false,
            sent_any: false,
            client_eof: false,
            discarded: 0,
        }
    }

    /// Frees the buffers of a connection that turned orphan.
    pub(super) fn forget_buffers(&mut self) {
        self.head = Vec::new();
        self.request = Vec::new();
        self.out = Vec::new();
        self.out_pos = 0;
    }
}

fn refuse(conn: &Conn, r: Reject) -> Close {
    debug!(
        "metrics sidecar: {} sent a request refused with {} ({}): {}",
        conn.peer,
        r.status,
        r.reason,
        escape(&conn.head, LOG_CLIP)
    );
    let bytes = if r.status == 431 { RESP_431 } else { RESP_400 };
    Close::Reply(bytes, r.reason)
}

/// Reads the head until it is complete and checked; then the connection waits
/// for a backend slot with the canonical request in hand. `Some` means close.
pub(super) fn read_request(conn: &mut Conn, scratch: &mut [u8]) -> Option<Close> {
    loop {
        let n = match conn.client.read(scratch) {
            Ok(0) => return Some(Close::Quiet),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return Some(Close::Quiet),
        };
        conn.head.extend_from_slice(&scratch[..n]);
        match conn.scanner.scan(&conn.head) {
            Ok(None) => continue,
            Ok(Some(_)) => {}
            Err(r) => return Some(refuse(conn, r)),
        }
        return match request::parse(&conn.head) {
            Ok(Some(req)) => {
                // Whatever followed the head (a pipelined request, a body
                // despite its headers) is dropped, never forwarded.
                conn.discarded = conn.head.len() - req.head_len;
                conn.request = req.canonical();
                conn.head = Vec::new();
                conn.phase = Phase::Queued;
                drain_client(conn, scratch)
            }
            Ok(None) => Some(Close::Reply(RESP_400, "incomplete head")),
            Err(r) => Some(refuse(conn, r)),
        };
    }
}

/// Reads and drops what the client sends after its head, so that closing later
/// sends a FIN and not a RST that could destroy the answer in flight.
pub(super) fn drain_client(conn: &mut Conn, scratch: &mut [u8]) -> Option<Close> {
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
pub(super) fn drain_upstream(conn: &mut Conn, scratch: &mut [u8]) -> Option<Close> {
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

/// Writes what is owed to the client until done or WouldBlock.
fn flush_client(conn: &mut Conn) -> Result<(), Close> {
    while conn.status_done && conn.out_pos < conn.out.len() {
        match conn.client.write(&conn.out[conn.out_pos..]) {
            Ok(0) => return Err(Close::Quiet),
            Ok(n) => {
                conn.out_pos += n;
                conn.sent_any = true;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Err(Close::Quiet),
        }
    }
    if conn.out_pos == conn.out.len() {
        conn.out.clear();
        conn.out_pos = 0;
    }
    Ok(())
}

/// Sends the canonical request, then moves tiny_http's answer to the client
/// until one side would block: the answer arrives whole, whatever its size.
pub(super) fn relay(conn: &mut Conn, scratch: &mut [u8]) -> Option<Close> {
    let Some(up) = conn.upstream.as_mut() else {
        return Some(Close::Reply(RESP_502, "no backend"));
    };
    // 1. The request, then a half-close: tiny_http answers it and hangs up.
    while conn.request_sent < conn.request.len() {
        match up.write(&conn.request[conn.request_sent..]) {
            Ok(0) => return Some(Close::Reply(RESP_502, "backend closed")),
            Ok(n) => conn.request_sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Some(Close::Reply(RESP_502, "backend write failed")),
        }
    }
    if conn.request_sent == conn.request.len() && !conn.upstream_shut {
        let _ = up.shutdown(Shutdown::Write);
        conn.upstream_shut = true;
    }
    // 2. The answer. Stop only when tiny_http has nothing more for now
    //    (WouldBlock: its next write wakes us) or the buffer is full (then the
    //    client's write hit WouldBlock: its next drain wakes us).
    loop {
        if let Err(close) = flush_client(conn) {
            return Some(close);
        }
        if conn.upstream_eof || conn.out.len() - conn.out_pos >= RESPONSE_BUF {
            break;
        }
        if conn.out_pos > 0 {
            conn.out.drain(..conn.out_pos);
            conn.out_pos = 0;
        }
        let room = (RESPONSE_BUF - conn.out.len()).min(scratch.len());
        let Some(up) = conn.upstream.as_mut() else {
            break;
        };
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
        // Whatever it was, it is all there is: pass it on.
        conn.status_done = true;
        if let Err(close) = flush_client(conn) {
            return Some(close);
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
    let Some(eol) = out.windows(2).position(|w| w == b"\r\n") else {
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
