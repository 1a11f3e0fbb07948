//! The PROXY protocol on the data port (`server.proxy_protocol`): who may send a
//! header, and reading it before anything reaches the codec.
//!
//! The acceptor calls [`admit`]: a peer outside `server.proxy_trusted` is
//! rejected as `untrusted_proxy` ([`reject_untrusted`]: no busy message, since the
//! bytes would go to whoever is behind an unknown peer, and no warning per
//! connection, since that peer controls the rate); a trusted one gets a *pending*
//! permit (the global slot only; see `admission`). The connection then starts in
//! the "awaiting header" state ([`HeaderWait`]): its reads go to
//! [`read_header`] until the header is decided, and the bytes after the header in
//! the same read are the codec's first input, in the same loop turn.
//!
//! The header must be complete by accept time + `idle_timeout` (trickled bytes do
//! not extend it: otherwise a peer sending one byte per `idle_timeout - 1ms`
//! would hold a slot for 107 x `idle_timeout`). With `idle_timeout = 0` there is
//! no header deadline either, as the contract says 0 disables the timeout.
//! Missing, bad, or late header: closed as `protocol_error`, no reply (the peer is
//! a balancer: text from us would reach its client), with the shared
//! rate-limited warning. `LOCAL` and `UNKNOWN` headers are served as the balancer
//! itself (peer = the socket's peer).

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::Arc;

use mio::net::TcpStream;

use super::admission::{Admission, Permit};
use crate::config::Cidr;
use crate::logging::escape;
use crate::metrics::{Metrics, RejectReason};
use crate::protocol::proxy::{HeaderReader, ProxyError, ProxyHeader};

/// Reads (of the worker's buffer size) dropped before refusing a connection.
const REFUSE_READS: usize = 4;

/// Client bytes quoted in a warning about a bad or missing header.
const QUOTED_BYTES: usize = 48;

/// Admission with the PROXY protocol on: the peer must be trusted; the per-IP
/// part waits for the header (a pending permit).
pub fn admit(
    trusted: &[Cidr],
    admission: &Arc<Admission>,
    peer: SocketAddr,
) -> Result<Permit, RejectReason> {
    if !trusted.iter().any(|c| c.contains(peer.ip())) {
        return Err(RejectReason::UntrustedProxy);
    }
    admission.admit_pending()
}

/// Refuses a peer that may not send PROXY headers: counted, logged at debug, and
/// closed without a word.
pub fn reject_untrusted(metrics: &Metrics, stream: TcpStream, peer: SocketAddr) {
    metrics.rejected(RejectReason::UntrustedProxy);
    log::debug!(
        "{peer}: rejected ({}): not in server.proxy_trusted",
        RejectReason::UntrustedProxy.as_str()
    );
    let _ = stream.shutdown(Shutdown::Write);
}

/// A connection still waiting for its PROXY header. Boxed in the connection, so
/// a connection that has its header costs one pointer.
#[derive(Debug, Default)]
pub struct HeaderWait {
    reader: HeaderReader,
    /// Bytes received so far (header bytes; at most one read past them).
    received: usize,
    /// The first bytes received, for the warning if no valid header comes.
    began: Vec<u8>,
    /// Why the header was refused, once it was.
    failed: Option<String>,
}

/// What a turn of reading the header came to.
#[derive(Debug)]
pub enum HeaderStep {
    /// Nothing more to read now; the header is not complete.
    Wait,
    /// The header; `buf[start..end]` (the worker's read buffer) is the payload
    /// that came after it in the same read, possibly empty.
    Done {
        header: ProxyHeader,
        start: usize,
        end: usize,
    },
    /// Not a valid header (the reason is kept for [`HeaderWait::describe`]).
    Invalid,
    /// EOF before a complete header; `true` if not a single byte came (a plain TCP
    /// connect check rather than a broken header).
    Eof(bool),
    /// A socket error on read.
    Error(io::Error),
}

impl HeaderWait {
    pub fn new() -> HeaderWait {
        HeaderWait::default()
    }

    /// Bytes received so far.
    pub fn received(&self) -> usize {
        self.received
    }

    /// Why the connection is being closed before its header was decided, for the
    /// rate-limited warning: the parser's reason, or that none came in time, with
    /// the first bytes received (escaped).
    pub fn describe(&self) -> String {
        let why = match &self.failed {
            Some(why) => why.clone(),
            None if self.received == 0 => "no PROXY header (nothing received)".into(),
            None => format!("incomplete PROXY header ({} bytes)", self.received),
        };
        if self.began.is_empty() {
            why
        } else {
            format!(
                "{why}; the connection began {}",
                escape(&self.began, QUOTED_BYTES)
            )
        }
    }

    /// Keeps the first bytes of a connection that has no header yet, to quote.
    fn quote(&mut self, read: &[u8]) {
        let room = (QUOTED_BYTES + 1).saturating_sub(self.began.len());
        self.began.extend_from_slice(&read[..read.len().min(room)]);
    }

    fn fail(&mut self, e: ProxyError) -> HeaderStep {
        self.failed = Some(e.to_string());
        HeaderStep::Invalid
    }
}

/// Reads from `stream` into `buf` until the header is decided or the socket has
/// nothing more. Each read asks for all of `buf` (the caller sizes it to the
/// codec's bound on one read, since the payload after the header goes to it).
/// Counts what it reads into `received_bytes`.
pub fn read_header(
    wait: &mut HeaderWait,
    stream: &mut TcpStream,
    buf: &mut [u8],
    received_bytes: &mut u64,
) -> HeaderStep {
    loop {
        let n = match stream.read(buf) {
            Ok(0) => return HeaderStep::Eof(wait.received == 0),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return HeaderStep::Wait,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return HeaderStep::Error(e),
        };
        *received_bytes += n as u64;
        wait.received += n;
        match wait.reader.feed(&buf[..n]) {
            // The usual case, a whole header in one read: nothing kept.
            Ok(Some((header, start))) => {
                return HeaderStep::Done {
                    header,
                    start,
                    end: n,
                }
            }
            Ok(None) => wait.quote(&buf[..n]),
            Err(e) => {
                wait.quote(&buf[..n]);
                return wait.fail(e);
            }
        }
    }
}

/// Refuses a connection whose header named a client over `max_connections_per_ip`
/// (already counted by its permit): drops what it sent, sends the busy message as
/// the acceptor does for a direct client, and shuts the write side. Reading the
/// input first keeps the close from being a RST that could destroy the message.
pub fn refuse(stream: &mut TcpStream, buf: &mut [u8], busy_message: &[u8]) {
    for _ in 0..REFUSE_READS {
        if !matches!(stream.read(buf), Ok(n) if n > 0) {
            break;
        }
    }
    if !busy_message.is_empty() {
        // Best effort: a fresh socket's send buffer takes a short message.
        let _ = stream.write(busy_message);
    }
    let _ = stream.shutdown(Shutdown::Write);
}
