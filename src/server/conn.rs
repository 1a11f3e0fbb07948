//! One connection's state: the decoder, the bytes owed, deadlines, and how it ends.
//!
//! Reads land in the worker's shared buffer; a connection keeps only what it owes
//! (a partial line in its decoder, replies not yet written) and, when its queue
//! filled up in the middle of a read, the rest of that read, so an idle connection
//! costs the size of this struct plus its slab slot.
//!
//! # Memory per connection
//!
//! `max_pending_write_bytes` bounds memory in every mode, whatever the replies
//! cost per input byte (19 bytes of ack for a bare `\n`):
//!
//! - a read asks for at most the room left in the queue
//!   (`max_pending_write_bytes - owed`);
//! - the decoder answers lines only while the replies it made in this call are
//!   fewer bytes than that room, so the queue ends at most one reply past
//!   `max_pending_write_bytes` (a reply is at most `max_line_bytes + 19` bytes);
//! - the input it did not decode is kept in `held` (never more than one read, so
//!   never more than `max_pending_write_bytes`) and decoded first once the client
//!   has read enough; the rest stays in the kernel, which stops the sender.
//!
//! So owed bytes stay under `max_pending_write_bytes` plus one reply, and the kept
//! input under `max_pending_write_bytes`.
//!
//! # Timeouts
//!
//! `idle_timeout` closes a connection on which nothing was read and no byte was
//! written for that long, whether or not bytes are owed; `write_timeout` closes
//! one that has bytes owed and made no write progress for that long. Each is off
//! at 0 and neither turns the other off: with bytes owed, whichever comes first.
//! A connection still waiting for its PROXY header (see `proxied`) has one
//! deadline instead: accept time + `idle_timeout`, closed as `protocol_error`.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::time::{Duration, Instant};

use mio::net::TcpStream;

use super::admission::Permit;
use super::proxied::{self, HeaderStep, HeaderWait};
use crate::metrics::{CloseReason, LocalCounters, RejectReason};
use crate::protocol::{Codec, Decoder};

/// Most reads for one connection in one loop turn, so a busy client cannot starve
/// the others on its worker; the worker comes back to it on the next turn.
pub const READ_BUDGET: u32 = 16;

/// After a protocol error the reply is flushed and the write side shut; the input
/// is then read and dropped for at most this long, so that closing with unread
/// bytes does not send a RST that could destroy the error reply in flight.
pub const CLOSE_DRAIN_TIME: Duration = Duration::from_secs(2);

/// ... and at most this many bytes are read and dropped.
pub const CLOSE_DRAIN_BYTES: usize = 1 << 20;

/// A reply (or kept-input) buffer that grew past this is freed once empty, so a
/// connection that once had a burst does not keep the memory while idle.
const KEEP_OUT_CAPACITY: usize = 16 * 1024;

/// Per-pool settings a connection needs.
#[derive(Clone, Debug)]
pub struct Limits {
    pub codec: Codec,
    pub max_pending_write_bytes: usize,
    pub idle_timeout: Option<Duration>,
    pub write_timeout: Option<Duration>,
}

/// What the worker lends a connection while driving it.
pub struct Ctx<'a> {
    /// The worker's read buffer.
    pub buf: &'a mut [u8],
    /// The worker's reply scratch buffer.
    pub scratch: &'a mut Vec<u8>,
    pub counters: &'a mut LocalCounters,
    pub limits: &'a Limits,
    pub now: Instant,
}

/// What the readiness event said about the read side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadHint {
    /// Nothing to read (a write-readiness event).
    Idle,
    /// Bytes arrived.
    Readable,
    /// The peer's FIN (or an error) is already known: read until EOF, since no
    /// further edge will announce it.
    Closed,
}

/// What the worker should do with a connection after driving it.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Wait for the next readiness event or deadline.
    Wait,
    /// Drive it again on the next loop turn (read budget used up, or reading
    /// resumed after flow control) without waiting for an event.
    Again,
    /// Close it now, for this reason.
    Close(CloseReason),
    /// PROXY protocol: the header named a client over a limit. Already counted as
    /// rejected (never accepted); refuse it like the acceptor would.
    Reject(RejectReason),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Reading and answering.
    Open,
    /// The client half-closed: send what is owed, then close.
    ReadClosed,
    /// Protocol error: send the error, shut the write side, drain input, close.
    Closing { since: Instant },
}

/// One client connection.
pub struct Conn {
    pub stream: TcpStream,
    /// The client: the socket's peer, or the source in its PROXY header.
    pub peer: SocketAddr,
    /// The balancer's address when `peer` came from a PROXY header.
    pub via: Option<SocketAddr>,
    /// PROXY protocol: still waiting for the header; no byte has reached the codec.
    header: Option<Box<HeaderWait>>,
    /// Tells apart connections that reuse the same slab slot (stale timers).
    pub generation: u64,
    /// The deadline this connection's entry in the worker's timer heap has, if any.
    pub timer_at: Option<Instant>,
    pub opened: Instant,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Its admission; dropped (released) with the connection.
    permit: Permit,
    decoder: Decoder,
    /// Input read but not decoded yet: the replies to the first part of a read
    /// filled the queue. Decoded before anything more is read. At most one read,
    /// so at most `max_pending_write_bytes` (see the module docs).
    held: Vec<u8>,
    out: Vec<u8>,
    out_pos: usize,
    state: State,
    write_shut: bool,
    /// Stopped reading (and decoding `held`) because `max_pending_write_bytes`
    /// are owed.
    paused: bool,
    last_read: Instant,
    /// When bytes last left, or when bytes became owed after none were.
    last_write: Instant,
    drained: usize,
}

impl Conn {
    pub fn new(
        stream: TcpStream,
        peer: SocketAddr,
        permit: Permit,
        generation: u64,
        codec: Codec,
        now: Instant,
    ) -> Conn {
        Conn {
            stream,
            peer,
            via: None,
            header: None,
            permit,
            held: Vec::new(),
            generation,
            timer_at: None,
            opened: now,
            bytes_in: 0,
            bytes_out: 0,
            decoder: Decoder::new(codec),
            out: Vec::new(),
            out_pos: 0,
            state: State::Open,
            write_shut: false,
            paused: false,
            last_read: now,
            last_write: now,
            drained: 0,
        }
    }

    /// PROXY protocol: the connection must begin with a header (see `proxied`).
    pub fn expect_proxy_header(mut self) -> Conn {
        self.header = Some(Box::new(HeaderWait::new()));
        self
    }

    /// Called as the connection is closed: a connection closed before its PROXY
    /// header was decided is counted as accepted now (see `Permit::settle`), and
    /// this says why it was closed then, for the warning.
    pub fn settle(&mut self) -> Option<String> {
        self.permit.settle();
        self.header.as_ref().map(|w| w.describe())
    }

    /// Reads the PROXY header; once it is decided, answers the bytes that came
    /// after it in the same read, in this same turn (what the replies leave
    /// undecoded waits in `held`, as in `read_some`). `Ok(true)`: the read that
    /// completed the header emptied the socket (a short read, nothing kept), so
    /// the next edge will announce more; `Ok(false)`: read on now.
    fn await_header(&mut self, ctx: &mut Ctx<'_>) -> Result<bool, Next> {
        let Some(wait) = self.header.as_mut() else {
            return Ok(false);
        };
        // Nothing is owed yet: the whole queue is the room, as in `read_some`.
        let room = ctx.limits.max_pending_write_bytes;
        let want = room.clamp(1, ctx.buf.len());
        let step = proxied::read_header(
            wait,
            &mut self.stream,
            &mut ctx.buf[..want],
            &mut ctx.counters.received_bytes,
        );
        self.bytes_in = wait.received() as u64;
        match step {
            HeaderStep::Wait => Err(Next::Wait),
            HeaderStep::Done { header, start, end } => {
                let socket_peer = self.peer;
                self.peer = header.peer(socket_peer);
                self.via = Some(socket_peer);
                self.header = None;
                self.last_read = ctx.now;
                if let Err(reason) = self.permit.complete(self.peer.ip()) {
                    return Err(Next::Reject(reason));
                }
                log::trace!("{}: PROXY header {header:?} via {socket_peer}", self.peer);
                let input = std::mem::take(&mut ctx.buf);
                let answered = self.answer(&input[start..end], room, ctx);
                if let Ok(consumed) = answered {
                    self.held.extend_from_slice(&input[start + consumed..end]);
                }
                ctx.buf = input;
                match answered {
                    Ok(_) => Ok(end < want && self.held.is_empty()),
                    // A line too long, its error being flushed: `drive` goes on
                    // to shut the write side once it is sent.
                    Err(Next::Wait) => Ok(true),
                    Err(next) => Err(next),
                }
            }
            HeaderStep::Invalid => Err(Next::Close(CloseReason::ProtocolError)),
            // A bare TCP connect check: nothing violated.
            HeaderStep::Eof(true) => {
                self.header = None;
                Err(Next::Close(CloseReason::ClientClosed))
            }
            HeaderStep::Eof(false) => Err(Next::Close(CloseReason::ProtocolError)),
            HeaderStep::Error(e) => {
                self.header = None;
                Err(Next::Close(classify(&e, ctx.counters)))
            }
        }
    }

    /// Bytes owed to the client.
    pub fn owed(&self) -> usize {
        self.out.len() - self.out_pos
    }

    /// Flushes what is owed, reads what the client sent, answers it.
    pub fn drive(&mut self, ctx: &mut Ctx<'_>, hint: ReadHint) -> Next {
        let mut hint = hint;
        if self.header.is_some() {
            if hint == ReadHint::Idle {
                return Next::Wait;
            }
            hint = match self.await_header(ctx) {
                Err(next) => return next,
                // A short read emptied the socket and no FIN was known: the next
                // byte or FIN brings an edge (see `read_some`'s `stop_short`).
                Ok(true) if hint == ReadHint::Readable => ReadHint::Idle,
                // Maybe more behind the header's read, or a FIN already seen, and
                // no edge will say so: read until EAGAIN or EOF.
                _ => ReadHint::Closed,
            };
        }
        let mut resumed = false;
        if self.owed() > 0 {
            if let Err(reason) = self.flush(ctx) {
                return Next::Close(reason);
            }
            if self.paused && self.owed() < ctx.limits.max_pending_write_bytes {
                // Edge-triggered readiness will not tell us again about bytes that
                // arrived while we were not reading: go and read them ourselves.
                self.paused = false;
                resumed = true;
            }
        }
        let next = match self.state {
            State::Open if hint != ReadHint::Idle => {
                self.read_some(ctx, hint == ReadHint::Readable)
            }
            State::Open if resumed => self.read_some(ctx, false),
            State::Closing { .. } => self.drain_input(ctx),
            _ => Next::Wait,
        };
        match next {
            Next::Close(_) => next,
            _ if self.state == State::ReadClosed && self.owed() == 0 => {
                Next::Close(CloseReason::ClientClosed)
            }
            _ if matches!(self.state, State::Closing { .. })
                && self.owed() == 0
                && !self.write_shut =>
            {
                self.write_shut = true;
                let _ = self.stream.shutdown(Shutdown::Write);
                self.drain_input(ctx)
            }
            _ => next,
        }
    }

    /// Input read but not yet decoded (bytes).
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Reads up to [`READ_BUDGET`] times (decoding kept input first). With
    /// `stop_short`, a short read ends the turn (see below); otherwise reading goes
    /// on until EAGAIN, EOF, or a full queue.
    fn read_some(&mut self, ctx: &mut Ctx<'_>, stop_short: bool) -> Next {
        for _ in 0..READ_BUDGET {
            let room = ctx
                .limits
                .max_pending_write_bytes
                .saturating_sub(self.owed());
            if room == 0 {
                self.paused = true;
                return Next::Wait;
            }
            if !self.held.is_empty() {
                let mut held = std::mem::take(&mut self.held);
                match self.answer(&held, room, ctx) {
                    Ok(consumed) => held.drain(..consumed),
                    Err(next) => return next,
                };
                if held.is_empty() && held.capacity() > KEEP_OUT_CAPACITY {
                    held = Vec::new();
                }
                self.held = held;
                continue;
            }
            // Never read more than the queue has room for: an echo owes what it
            // reads, and an ack owes more, so this is what bounds the input kept.
            let want = room.min(ctx.buf.len());
            let n = match self.stream.read(&mut ctx.buf[..want]) {
                Ok(0) => {
                    self.state = State::ReadClosed;
                    ctx.scratch.clear();
                    ctx.counters.messages += self.decoder.finish(ctx.scratch);
                    if self.decoder.failed() {
                        // The final line was too long: the error goes out, then the
                        // usual graceful close (the input is already at EOF).
                        self.state = State::Closing { since: ctx.now };
                    }
                    let replies = std::mem::take(ctx.scratch);
                    let result = self.send(&replies, ctx);
                    *ctx.scratch = replies;
                    return result.map_or_else(Next::Close, |_| Next::Wait);
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Next::Wait,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Next::Close(classify(&e, ctx.counters)),
            };
            self.bytes_in += n as u64;
            ctx.counters.received_bytes += n as u64;
            self.last_read = ctx.now;
            let input = std::mem::take(&mut ctx.buf);
            let answered = self.answer(&input[..n], room, ctx);
            if let Ok(consumed) = answered {
                self.held.extend_from_slice(&input[consumed..n]);
            }
            ctx.buf = input;
            if let Err(next) = answered {
                return next;
            }
            if stop_short && n < want && self.held.is_empty() {
                // A short read emptied the socket buffer. On Linux, epoll's edge
                // trigger fires again for any byte or FIN that arrives after this
                // read, so we can skip the read that would only say EAGAIN. (A FIN
                // that was already there is `ReadHint::Closed`.) Not with input
                // kept: no edge would announce it, so the loop decodes it first.
                return Next::Wait;
            }
        }
        Next::Again
    }

    /// Answers `input` with at most about `room` bytes of replies (see the module
    /// docs) and sends them. Returns how much of `input` was decoded, or what the
    /// worker must do now (close, or wait while a protocol error is flushed).
    fn answer(&mut self, input: &[u8], room: usize, ctx: &mut Ctx<'_>) -> Result<usize, Next> {
        if ctx.limits.codec == Codec::Echo {
            // Echo straight from the input: no copy unless the client is slower
            // than we are. The read was no bigger than `room`.
            ctx.counters.messages += 1;
            return self
                .send(input, ctx)
                .map(|_| input.len())
                .map_err(Next::Close);
        }
        ctx.scratch.clear();
        let fed = self.decoder.feed_bounded(input, ctx.scratch, room);
        let replies = std::mem::take(ctx.scratch);
        let sent = self.send(&replies, ctx);
        *ctx.scratch = replies;
        ctx.counters.messages += fed.messages;
        if fed.error.is_some() {
            log::debug!(
                "{}: line longer than max_line_bytes; the input began {}",
                self.peer,
                crate::logging::escape(input, 48)
            );
            self.held = Vec::new();
            self.state = State::Closing { since: ctx.now };
            return Err(sent.map_or_else(Next::Close, |_| Next::Wait));
        }
        sent.map(|_| fed.consumed).map_err(Next::Close)
    }

    /// After a protocol error: read and drop input until EOF, a bound, or nothing.
    fn drain_input(&mut self, ctx: &mut Ctx<'_>) -> Next {
        if !self.write_shut {
            return Next::Wait;
        }
        loop {
            match self.stream.read(ctx.buf) {
                Ok(0) => return Next::Close(CloseReason::ProtocolError),
                Ok(n) => {
                    self.bytes_in += n as u64;
                    ctx.counters.received_bytes += n as u64;
                    self.drained += n;
                    if self.drained > CLOSE_DRAIN_BYTES {
                        return Next::Close(CloseReason::ProtocolError);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Next::Wait,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return Next::Close(CloseReason::ProtocolError),
            }
        }
    }

    /// Sends `bytes` after whatever is owed: straight to the socket if nothing is
    /// queued, the rest (if any) into the queue.
    fn send(&mut self, bytes: &[u8], ctx: &mut Ctx<'_>) -> Result<(), CloseReason> {
        if bytes.is_empty() {
            return Ok(());
        }
        let mut written = 0;
        if self.owed() == 0 {
            written = self.write_from(bytes, ctx)?;
            if written == bytes.len() {
                return Ok(());
            }
            // Bytes owed from now on: the write timeout runs from here.
            self.last_write = ctx.now;
        }
        self.out.extend_from_slice(&bytes[written..]);
        Ok(())
    }

    /// Writes what is owed until done or the socket is full.
    fn flush(&mut self, ctx: &mut Ctx<'_>) -> Result<(), CloseReason> {
        let out = std::mem::take(&mut self.out);
        let r = self.write_from(&out[self.out_pos..], ctx);
        self.out = out;
        self.out_pos += r?;
        if self.out_pos == self.out.len() {
            self.out_pos = 0;
            if self.out.capacity() > KEEP_OUT_CAPACITY {
                self.out = Vec::new();
            } else {
                self.out.clear();
            }
        } else if self.out_pos > self.out.len() / 2 && self.out_pos > 4096 {
            // Keep the queue from creeping: drop the sent half.
            self.out.drain(..self.out_pos);
            self.out_pos = 0;
        }
        Ok(())
    }

    fn write_from(&mut self, bytes: &[u8], ctx: &mut Ctx<'_>) -> Result<usize, CloseReason> {
        let mut done = 0;
        while done < bytes.len() {
            match self.stream.write(&bytes[done..]) {
                Ok(0) => return Err(CloseReason::IoError),
                Ok(n) => {
                    done += n;
                    self.bytes_out += n as u64;
                    ctx.counters.sent_bytes += n as u64;
                    self.last_write = ctx.now;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(classify(&e, ctx.counters)),
            }
        }
        Ok(done)
    }

    /// When this connection must be closed if nothing happens, and why.
    ///
    /// Idle: nothing read and nothing written for `idle_timeout`, owed bytes or
    /// not (a client that neither reads nor sends is idle). Write: bytes owed and
    /// no write progress for `write_timeout`. With both, the earlier one; either
    /// may be off (0) without turning the other off.
    pub fn deadline(&self, limits: &Limits) -> Option<(Instant, CloseReason)> {
        if self.header.is_some() {
            // From accept, not from the last byte: see `proxied`.
            return limits
                .idle_timeout
                .map(|t| (self.opened + t, CloseReason::ProtocolError));
        }
        if let State::Closing { since } = self.state {
            return Some((since + CLOSE_DRAIN_TIME, CloseReason::ProtocolError));
        }
        let quiet_since = self.last_read.max(self.last_write);
        let idle = limits
            .idle_timeout
            .map(|t| (quiet_since + t, CloseReason::IdleTimeout));
        if self.owed() == 0 {
            return idle;
        }
        let write = limits
            .write_timeout
            .map(|t| (self.last_write + t, CloseReason::WriteTimeout));
        match (write, idle) {
            // On a tie the write timeout names it: bytes were owed.
            (Some(w), Some(i)) => Some(if i.0 < w.0 { i } else { w }),
            (w, i) => w.or(i),
        }
    }
}

/// Maps a socket error to a close reason, counting resets.
fn classify(e: &io::Error, counters: &mut LocalCounters) -> CloseReason {
    if is_reset(e) {
        counters.reset_errors += 1;
        CloseReason::Reset
    } else {
        CloseReason::IoError
    }
}

/// ECONNRESET, EPIPE or ECONNABORTED: the peer is gone.
pub fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::server::admission::Admission;
    use std::sync::Arc;

    /// A connection whose queue filled while the rest of a read was kept undecoded,
    /// with nothing left in the kernel: the only event it will ever get is a
    /// writable edge (the client read). That alone must flush, resume, and decode
    /// what was kept, turn after turn, until every reply has gone out.
    #[test]
    fn a_paused_connection_resumes_on_a_writable_edge_alone() {
        const INPUT: usize = 1000;
        let want: Vec<u8> = b"Server received \"\"\n".repeat(INPUT);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        // The smallest buffers the kernel allows, so that the replies cannot all
        // hide in the two sockets.
        client.set_recv_buffer_size(1).unwrap();
        client
            .connect(&listener.local_addr().unwrap().into())
            .unwrap();
        let mut client: std::net::TcpStream = client.into();
        let (accepted, peer) = listener.accept().unwrap();
        socket2::SockRef::from(&accepted)
            .set_send_buffer_size(1)
            .unwrap();
        accepted.set_nonblocking(true).unwrap();
        let admission = Arc::new(Admission::new(1, 0, Arc::new(Metrics::new(1, 1))));
        let limits = Limits {
            codec: Codec::AckLine { max_line_bytes: 64 },
            max_pending_write_bytes: 1024,
            idle_timeout: None,
            write_timeout: None,
        };
        let mut conn = Conn::new(
            TcpStream::from_std(accepted),
            peer,
            admission.admit(peer.ip()).unwrap(),
            1,
            limits.codec,
            Instant::now(),
        );
        let mut buf = vec![0u8; 64 * 1024];
        let mut scratch = Vec::new();
        let mut counters = LocalCounters::default();
        let mut drive = |conn: &mut Conn, hint: ReadHint| {
            let mut ctx = Ctx {
                buf: &mut buf,
                scratch: &mut scratch,
                counters: &mut counters,
                limits: &limits,
                now: Instant::now(),
            };
            conn.drive(&mut ctx, hint)
        };
        std::io::Write::write_all(&mut client, &[b'\n'; INPUT]).unwrap();
        // Readable events (and the worker's next-turn drives) until all the input
        // has left the kernel (one read takes it, as it fits the room) and the
        // connection waits.
        let mut hint = ReadHint::Readable;
        for _ in 0..1000 {
            match drive(&mut conn, hint) {
                Next::Again => hint = ReadHint::Closed,
                Next::Wait if conn.bytes_in == INPUT as u64 => break,
                Next::Wait => hint = ReadHint::Readable,
                other => panic!("ended: {other:?}"),
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(conn.bytes_in, INPUT as u64);
        assert!(conn.held() > 0, "the replies all fit: nothing was kept");
        assert!(
            conn.owed() > 0,
            "{} bytes kept with nothing owed: no event would ever decode them",
            conn.held()
        );
        // From now on only writable edges: the client reads what arrived.
        client.set_nonblocking(true).unwrap();
        let mut got = Vec::new();
        let mut idle_rounds = 0;
        while got.len() < want.len() {
            let before = got.len();
            let mut chunk = [0u8; 8192];
            loop {
                match std::io::Read::read(&mut client, &mut chunk) {
                    Ok(0) => panic!("closed"),
                    Ok(n) => got.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("{e}"),
                }
            }
            assert_eq!(drive(&mut conn, ReadHint::Idle), Next::Wait);
            idle_rounds = if got.len() == before {
                idle_rounds + 1
            } else {
                0
            };
            assert!(
                idle_rounds < 200,
                "stalled at {} of {} bytes, {} kept, {} owed",
                got.len(),
                want.len(),
                conn.held(),
                conn.owed()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(got == want, "{} bytes differ", got.len());
        assert_eq!((conn.held(), conn.owed()), (0, 0));
    }
}
