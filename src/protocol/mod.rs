//! Sans-I/O codecs: bytes in, reply bytes out.
//!
//! Nothing here knows about sockets, threads, clocks or metrics, so every line of it
//! can be unit-tested, property-tested and fuzzed on plain slices. The worker feeds
//! each read's bytes to [`Decoder::feed_bounded`] with the room left in the
//! connection's reply queue, sends whatever was appended to `out`, keeps the input
//! that was not consumed for later, and calls [`Decoder::finish`] when the client
//! has half-closed.
//!
//! A reply can be much bigger than its request (19 bytes of ack for one `\n`), so
//! the room bounds the output, not the input: line framing stops decoding once the
//! replies of this call reach the room, leaving the rest of the input unconsumed.
//! Feeding that rest later gives exactly the replies one unbounded call would have.
//!
//! "Need more bytes" is not an error: a partial line simply stays in the decoder.
//! The only error is a line over the limit, after which the decoder refuses all
//! further input (the connection is being closed).
//!
//! [`proxy`] reads the PROXY protocol header a balancer may put before all of it.

pub mod proxy;

/// The reply prefix of the tutorial's protocol.
const ACK_PREFIX: &[u8] = b"Server received \"";

/// Sent, in line framing, for a line longer than `max_line_bytes`.
pub const LINE_TOO_LONG: &[u8] = b"ERROR line too long\n";

/// Bytes an ack adds to the message it quotes: the prefix, the closing `"` and
/// the `\n`. A line framing reply is at most `max_line_bytes + ACK_OVERHEAD`.
pub const ACK_OVERHEAD: usize = ACK_PREFIX.len() + 2;

/// What the server does with the bytes it receives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    /// `mode = "ack"`, `framing = "read"`: one reply per read chunk.
    AckRead,
    /// `mode = "ack"`, `framing = "line"`: one reply per `\n`-terminated line.
    AckLine {
        /// Longest line accepted, counted without its terminator.
        max_line_bytes: usize,
    },
    /// `mode = "echo"` (RFC 862): every byte comes back unchanged.
    Echo,
}

/// What one [`Decoder::feed`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fed {
    /// Input bytes taken (decoded, or held as part of an unfinished line). The
    /// rest must be fed again later, first. All of it after an error.
    pub consumed: usize,
    /// Messages answered (replies appended to `out`).
    pub messages: u64,
    /// A line went over `max_line_bytes`: `out` ends with [`LINE_TOO_LONG`] and
    /// the connection must be closed.
    pub error: Option<LineTooLong>,
}

/// The one protocol error: a line over `max_line_bytes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LineTooLong;

impl std::fmt::Display for LineTooLong {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("line too long")
    }
}

impl std::error::Error for LineTooLong {}

/// One connection's protocol state.
#[derive(Debug)]
pub struct Decoder {
    codec: Codec,
    /// Line framing: the bytes of an unfinished line. Never longer than
    /// `max_line_bytes + 1` (room for a `\r` whose `\n` has not arrived yet).
    partial: Vec<u8>,
    /// Set after [`LineTooLong`]: all further input is ignored.
    failed: bool,
}

/// A partial-line buffer that grew past this is freed rather than kept, so that an
/// idle connection costs a few bytes, not its largest line ever.
const KEEP_PARTIAL_CAPACITY: usize = 4096;

impl Decoder {
    /// A fresh decoder for one connection.
    pub fn new(codec: Codec) -> Decoder {
        Decoder {
            codec,
            partial: Vec::new(),
            failed: false,
        }
    }

    /// The codec this decoder runs.
    pub fn codec(&self) -> Codec {
        self.codec
    }

    /// True after a line went over the limit: the connection must be closed.
    pub fn failed(&self) -> bool {
        self.failed
    }

    /// Bytes held for an unfinished line.
    pub fn buffered(&self) -> usize {
        self.partial.len()
    }

    /// Heap bytes this decoder holds (for memory accounting).
    pub fn capacity(&self) -> usize {
        self.partial.capacity()
    }

    /// Feeds the bytes of one read, all of them. Replies are appended to `out`.
    /// After an error, `out` ends with [`LINE_TOO_LONG`] (after the replies to any
    /// earlier complete lines) and all later input is ignored.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Fed {
        self.feed_bounded(input, out, usize::MAX)
    }

    /// Like [`Decoder::feed`], but appends replies only while fewer than `room`
    /// bytes were appended in this call, and says how much input it took.
    ///
    /// - `room == 0`: nothing is consumed (unless the decoder has failed).
    /// - Read framing and echo take the whole input: one read is one message (the
    ///   caller bounds the read instead). Their output is the input, or the input
    ///   plus [`ACK_OVERHEAD`].
    /// - Line framing stops after the reply that reaches `room`: its output is
    ///   under `room` plus one reply (at most `max_line_bytes + ACK_OVERHEAD`, or
    ///   [`LINE_TOO_LONG`]), and whenever it leaves input unconsumed its output is
    ///   at least `room`. It stops only right after a `\n`, so feeding the rest
    ///   later continues the same reply stream.
    pub fn feed_bounded(&mut self, input: &[u8], out: &mut Vec<u8>, room: usize) -> Fed {
        if self.failed {
            return Fed {
                consumed: input.len(),
                messages: 0,
                error: Some(LineTooLong),
            };
        }
        if input.is_empty() || room == 0 {
            return Fed::default();
        }
        let messages = match self.codec {
            Codec::Echo => {
                out.extend_from_slice(input);
                1
            }
            Codec::AckRead => {
                let (body, newline) = strip_terminator(input);
                push_ack(out, body, newline);
                1
            }
            Codec::AckLine { max_line_bytes } => {
                return self.feed_lines(input, max_line_bytes, out, room)
            }
        };
        Fed {
            consumed: input.len(),
            messages,
            error: None,
        }
    }

    fn feed_lines(&mut self, input: &[u8], max: usize, out: &mut Vec<u8>, room: usize) -> Fed {
        let mut messages = 0;
        let mut rest = input;
        let start = out.len();
        while let Some(i) = memchr::memchr(b'\n', rest) {
            if out.len() - start >= room {
                // The queue is full: the rest waits, starting at a line boundary.
                return Fed {
                    consumed: input.len() - rest.len(),
                    messages,
                    error: None,
                };
            }
            let segment = &rest[..i];
            rest = &rest[i + 1..];
            let line: &[u8] = if self.partial.is_empty() {
                segment
            } else {
                self.partial.extend_from_slice(segment);
                &self.partial
            };
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.len() > max {
                return self.fail(out, messages, input.len());
            }
            push_ack(out, line, true);
            messages += 1;
            self.clear_partial();
        }
        if !rest.is_empty() && out.len() - start >= room {
            // The queue is full: even the start of the next line waits (taking it
            // could end in an error reply past the room).
            return Fed {
                consumed: input.len() - rest.len(),
                messages,
                error: None,
            };
        }
        // An unfinished line: keep it, unless it can no longer fit. One byte more
        // than the limit is allowed only if it is a `\r` that a `\n` may follow.
        let held = self.partial.len() + rest.len();
        if held > max + 1 || (held == max + 1 && rest.last().copied() != Some(b'\r')) {
            return self.fail(out, messages, input.len());
        }
        self.partial.extend_from_slice(rest);
        Fed {
            consumed: input.len(),
            messages,
            error: None,
        }
    }

    /// The client half-closed: answers an unfinished final line (without a trailing
    /// `\n`, as it had none). Returns how many messages were answered (0 or 1).
    ///
    /// A final line one byte over the limit whose last byte is `\r` was kept while
    /// a `\n` could still follow; at EOF that `\r` is content, so the line is too
    /// long: [`LINE_TOO_LONG`] is appended and [`Decoder::failed`] turns true.
    pub fn finish(&mut self, out: &mut Vec<u8>) -> u64 {
        if self.failed || self.partial.is_empty() {
            return 0;
        }
        if let Codec::AckLine { max_line_bytes } = self.codec {
            if self.partial.len() > max_line_bytes {
                self.fail(out, 0, 0);
                return 0;
            }
        }
        push_ack(out, &self.partial, false);
        self.clear_partial();
        1
    }

    fn fail(&mut self, out: &mut Vec<u8>, messages: u64, consumed: usize) -> Fed {
        self.failed = true;
        self.partial = Vec::new();
        out.extend_from_slice(LINE_TOO_LONG);
        Fed {
            consumed,
            messages,
            error: Some(LineTooLong),
        }
    }

    fn clear_partial(&mut self) {
        if self.partial.capacity() > KEEP_PARTIAL_CAPACITY {
            self.partial = Vec::new();
        } else {
            self.partial.clear();
        }
    }
}

/// Splits one trailing `\n` or `\r\n` off a read chunk.
fn strip_terminator(chunk: &[u8]) -> (&[u8], bool) {
    match chunk.strip_suffix(b"\n") {
        Some(body) => (body.strip_suffix(b"\r").unwrap_or(body), true),
        None => (chunk, false),
    }
}

/// Appends `Server received "<body>"`, plus `\n` if asked. Bytes go through as they
/// are: no decoding, no escaping (DESIGN.md).
fn push_ack(out: &mut Vec<u8>, body: &[u8], newline: bool) {
    out.reserve(ACK_PREFIX.len() + body.len() + 2);
    out.extend_from_slice(ACK_PREFIX);
    out.extend_from_slice(body);
    out.push(b'"');
    if newline {
        out.push(b'\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(codec: Codec, reads: &[&[u8]], eof: bool) -> (Vec<u8>, u64, Option<LineTooLong>) {
        let mut d = Decoder::new(codec);
        let mut out = Vec::new();
        let mut n = 0;
        for r in reads {
            let fed = d.feed(r, &mut out);
            n += fed.messages;
            if fed.error.is_some() {
                return (out, n, fed.error);
            }
        }
        if eof {
            n += d.finish(&mut out);
        }
        (out, n, None)
    }

    const LINE: Codec = Codec::AckLine { max_line_bytes: 8 };

    #[test]
    fn read_framing_one_reply_per_chunk() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"hi", b"Server received \"hi\""),
            (b"hi\n", b"Server received \"hi\"\n"),
            (b"hi\r\n", b"Server received \"hi\"\n"),
            (b"\n", b"Server received \"\"\n"),
            (b"\r\n", b"Server received \"\"\n"),
            (b"\r", b"Server received \"\r\""),
            (b"a\nb\n", b"Server received \"a\nb\"\n"),
            (b"a\r\r\n", b"Server received \"a\r\"\n"),
            (b"\xff\x00\"q", b"Server received \"\xff\x00\"q\""),
        ];
        for (input, want) in cases {
            let (out, n, err) = run(Codec::AckRead, &[input], true);
            assert_eq!(out, *want, "input {input:?}");
            assert_eq!((n, err), (1, None));
        }
    }

    #[test]
    fn line_framing_lines_partials_and_crlf() {
        let (out, n, _) = run(LINE, &[b"a\nb", b"c\r", b"\n\n", b"\x00\xfe\n"], true);
        assert_eq!(out, b"Server received \"a\"\nServer received \"bc\"\nServer received \"\"\nServer received \"\x00\xfe\"\n");
        assert_eq!(n, 4);
    }

    #[test]
    fn line_framing_only_one_cr_dropped() {
        let (out, _, _) = run(LINE, &[b"x\r\r\n"], false);
        assert_eq!(out, b"Server received \"x\r\"\n");
    }

    #[test]
    fn line_framing_final_line_without_newline_answered_at_eof() {
        let (out, n, _) = run(LINE, &[b"a\nlast"], true);
        assert_eq!(out, b"Server received \"a\"\nServer received \"last\"");
        assert_eq!(n, 2);
        let (out, n, _) = run(LINE, &[b"a\n"], true);
        assert_eq!((out.as_slice(), n), (&b"Server received \"a\"\n"[..], 1));
        let (out, _, _) = run(LINE, &[b"cr\r"], true);
        assert_eq!(out, b"Server received \"cr\r\"");
        // At the limit plus a `\r` that no `\n` will follow: too long after all.
        let mut d = Decoder::new(LINE);
        let mut out = Vec::new();
        assert_eq!(d.feed(b"12345678\r", &mut out).error, None);
        assert_eq!(d.finish(&mut out), 0);
        assert!(d.failed());
        assert_eq!(out, LINE_TOO_LONG);
    }

    #[test]
    fn line_at_limit_passes_with_any_terminator() {
        for input in [&b"12345678\n"[..], b"12345678\r\n"] {
            let (out, n, err) = run(LINE, &[input], true);
            assert_eq!(out, b"Server received \"12345678\"\n");
            assert_eq!((n, err), (1, None));
        }
        // Split right after the `\r` that takes the buffer one past the limit.
        let (out, _, err) = run(LINE, &[b"12345678\r", b"\n"], true);
        assert_eq!(
            (out.as_slice(), err),
            (&b"Server received \"12345678\"\n"[..], None)
        );
    }

    #[test]
    fn line_over_limit_is_an_error_without_waiting_for_newline() {
        let (out, n, err) = run(LINE, &[b"ok\n123456789"], false);
        assert_eq!(out, b"Server received \"ok\"\nERROR line too long\n");
        assert_eq!((n, err), (1, Some(LineTooLong)));
        let (out, _, err) = run(LINE, &[b"1234", b"5678", b"9"], false);
        assert_eq!((out.as_slice(), err), (LINE_TOO_LONG, Some(LineTooLong)));
        let (_, _, err) = run(LINE, &[b"12345678\rx"], false);
        assert_eq!(err, Some(LineTooLong));
        let (_, _, err) = run(LINE, &[b"123456789\n"], false);
        assert_eq!(err, Some(LineTooLong));
    }

    #[test]
    fn after_an_error_input_is_refused_and_eof_answers_nothing() {
        let mut d = Decoder::new(LINE);
        let mut out = Vec::new();
        assert!(d.feed(b"123456789", &mut out).error.is_some());
        out.clear();
        assert_eq!(d.feed(b"fine\n", &mut out).error, Some(LineTooLong));
        assert_eq!(d.finish(&mut out), 0);
        assert!(out.is_empty());
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn echo_returns_bytes_unchanged() {
        let (out, _, _) = run(Codec::Echo, &[b"\x00\xff\r\n", b"x"], true);
        assert_eq!(out, b"\x00\xff\r\nx");
    }

    #[test]
    fn empty_reads_answer_nothing() {
        for codec in [Codec::AckRead, LINE, Codec::Echo] {
            let (out, n, _) = run(codec, &[b""], true);
            assert_eq!((out.len(), n), (0, 0), "{codec:?}");
        }
    }

    #[test]
    fn big_partial_buffer_is_released_after_the_line() {
        let mut d = Decoder::new(Codec::AckLine {
            max_line_bytes: 65536,
        });
        let mut out = Vec::new();
        d.feed(&vec![b'a'; 50_000], &mut out);
        assert_eq!(d.feed(b"\n", &mut out).messages, 1);
        assert_eq!(d.capacity(), 0);
    }
}
