//! Properties of the sans-I/O codecs, through the public `sockpool::protocol` API:
//! how the input is cut into reads never changes what line framing or echo answer;
//! read framing answers each read exactly once; line framing fails exactly when a
//! line is over the limit; fed with a bounded room for replies (as the server does,
//! so that `max_pending_write_bytes` bounds memory), the decoder stays within the
//! room plus one reply, and resuming with the rest gives the same reply stream.
//! Plus the regression tests the fuzzer's findings became.

mod common;

use common::{ack, ack_unterminated};
use proptest::prelude::*;
use sockpool::protocol::{Codec, Decoder, ACK_OVERHEAD, LINE_TOO_LONG};

/// What a decoder answered for a sequence of reads followed by EOF.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    out: Vec<u8>,
    messages: u64,
    failed: bool,
}

/// Feeds `reads` one `feed` call each (stopping at an error, as the server does),
/// then `finish`es unless it failed.
fn run(codec: Codec, reads: &[&[u8]]) -> Outcome {
    let mut d = Decoder::new(codec);
    let mut out = Vec::new();
    let mut messages = 0;
    for read in reads {
        let fed = d.feed(read, &mut out);
        messages += fed.messages;
        if let Codec::AckLine { max_line_bytes } = codec {
            assert!(d.buffered() <= max_line_bytes + 1, "holds {}", d.buffered());
        }
        if fed.error.is_some() {
            return Outcome {
                out,
                messages,
                failed: true,
            };
        }
    }
    messages += d.finish(&mut out);
    Outcome {
        out,
        messages,
        failed: d.failed(),
    }
}

/// Cuts `input` at the given positions (sorted, duplicates give empty reads).
fn cut<'a>(input: &'a [u8], at: &[prop::sample::Index]) -> Vec<&'a [u8]> {
    let mut points: Vec<usize> = at.iter().map(|i| i.index(input.len() + 1)).collect();
    points.sort_unstable();
    let mut reads = Vec::with_capacity(points.len() + 1);
    let mut start = 0;
    for p in points {
        reads.push(&input[start..p]);
        start = p;
    }
    reads.push(&input[start..]);
    reads
}

/// Bytes with plenty of `\n` and `\r`, so that lines are short and terminators of
/// every kind are common.
fn bytes(max_len: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop_oneof![2 => Just(b'\n'), 2 => Just(b'\r'), 2 => Just(b'"'), 12 => any::<u8>()],
        0..max_len,
    )
}

fn cuts() -> impl Strategy<Value = Vec<prop::sample::Index>> {
    prop::collection::vec(any::<prop::sample::Index>(), 0..12)
}

proptest! {
    #[test]
    fn line_framing_replies_do_not_depend_on_how_reads_split(
        input in bytes(400),
        at in cuts(),
        max_line_bytes in 0usize..48,
    ) {
        let codec = Codec::AckLine { max_line_bytes };
        let whole = run(codec, &[&input]);
        let split = run(codec, &cut(&input, &at));
        prop_assert_eq!(split, whole);
    }

    #[test]
    fn echo_returns_the_same_bytes_however_reads_split(input in bytes(400), at in cuts()) {
        let split = run(Codec::Echo, &cut(&input, &at));
        prop_assert_eq!(split.out, input);
        prop_assert!(!split.failed);
    }

    #[test]
    fn read_framing_answers_each_read_exactly_once(input in bytes(400), at in cuts()) {
        let reads = cut(&input, &at);
        let got = run(Codec::AckRead, &reads);
        let mut want = Vec::new();
        let mut n = 0;
        for read in reads.iter().filter(|r| !r.is_empty()) {
            n += 1;
            want.extend(match read.strip_suffix(b"\n") {
                Some(body) => ack(body.strip_suffix(b"\r").unwrap_or(body)),
                None => ack_unterminated(read),
            });
        }
        prop_assert_eq!(got.out, want);
        prop_assert_eq!(got.messages, n);
        prop_assert!(!got.failed);
    }

    /// The contract: a line longer than `max_line_bytes`, counted without its
    /// terminator (`\n` or `\r\n`), is an error; a final line without `\n` at EOF is
    /// answered as it is. Checked against a line-by-line reading of the whole input.
    #[test]
    fn line_framing_fails_iff_some_line_is_over_the_limit(
        input in bytes(300),
        at in cuts(),
        max_line_bytes in 0usize..24,
    ) {
        let got = run(Codec::AckLine { max_line_bytes }, &cut(&input, &at));
        let mut want = Vec::new();
        let mut pieces: Vec<&[u8]> = input.split(|&b| b == b'\n').collect();
        let last = pieces.pop().unwrap_or_default();
        let mut over = false;
        for line in pieces {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.len() > max_line_bytes {
                over = true;
                break;
            }
            want.extend(ack(line));
        }
        if !over && last.len() > max_line_bytes {
            over = true;
        }
        if over {
            want.extend_from_slice(LINE_TOO_LONG);
        } else if !last.is_empty() {
            want.extend(ack_unterminated(last));
        }
        prop_assert_eq!(got.failed, over);
        prop_assert_eq!(got.out, want);
    }
}

/// Found by `line_framing_fails_iff_some_line_is_over_the_limit`: a final line
/// without `\n` that is one byte over the limit, that byte being `\r`, is answered
/// at EOF instead of getting the error. While the line was open the decoder rightly
/// kept the `\r` (a `\n` might have followed, making it a terminator); once the
/// client has half-closed, no `\n` can come, so the `\r` is content and the line is
/// `max_line_bytes + 1` long.
///
/// The second case is the fuzzer's (`fuzz/`, target `codec`, input
/// `[10, 98, 0, 245, 0, 126, 10, 1, 71, 13]`): `max_line_bytes = 0` and a lone
/// `\r` before EOF.
#[test]
fn regression_final_line_one_over_the_limit_ending_in_cr_is_an_error_at_eof() {
    let cases: [(usize, &[u8], Vec<u8>); 2] =
        [(8, b"ok\n12345678\r", ack(b"ok")), (0, b"\r", Vec::new())];
    for (max_line_bytes, input, answered) in cases {
        let got = run(Codec::AckLine { max_line_bytes }, &[input]);
        let want = [answered.as_slice(), LINE_TOO_LONG].concat();
        assert_eq!(
            String::from_utf8_lossy(&got.out),
            String::from_utf8_lossy(&want),
            "max_line_bytes = {max_line_bytes}, input {input:?}"
        );
        assert!(got.failed, "the decoder must report the error");
    }
}

/// The same `\r`, at the limit, is kept while the line is open and the line is fine
/// once its `\n` arrives, however the reads fall.
#[test]
fn line_at_the_limit_with_crlf_split_anywhere_is_answered() {
    let codec = Codec::AckLine { max_line_bytes: 8 };
    let input = b"12345678\r\n";
    for i in 0..=input.len() {
        let got = run(codec, &[&input[..i], &input[i..]]);
        assert_eq!(got.out, ack(b"12345678"), "cut at {i}");
        assert!(!got.failed);
    }
}

/// What feeding `reads` with bounded rooms, the way a connection does, produced.
struct Bounded {
    out: Vec<u8>,
    failed: bool,
}

/// Feeds each read as a connection does: the input a call leaves unconsumed is
/// kept and fed first next time, each call with the next room from `rooms`
/// (cycled; a room of 0 takes nothing, as when the queue is full). Checks every
/// call's output against its room and against the input it consumed.
fn run_bounded(codec: Codec, reads: &[&[u8]], rooms: &[usize]) -> Result<Bounded, TestCaseError> {
    let max_reply = match codec {
        Codec::AckLine { max_line_bytes } => {
            (max_line_bytes + ACK_OVERHEAD).max(LINE_TOO_LONG.len())
        }
        // One read is one message: the caller bounds the read, not the decoder.
        Codec::AckRead | Codec::Echo => usize::MAX / 2,
    };
    let mut d = Decoder::new(codec);
    let mut out = Vec::new();
    let mut kept: Vec<u8> = Vec::new();
    let mut calls = 0usize;
    for read in reads {
        kept.extend_from_slice(read);
        // Feed until this read is taken; the number of calls is bounded, as every
        // call with room consumes something (or fails).
        let mut zero_rooms = 0;
        while !kept.is_empty() {
            let room = rooms[calls % rooms.len()];
            calls += 1;
            let before = (out.len(), d.buffered());
            let fed = d.feed_bounded(&kept, &mut out, room);
            let produced = out.len() - before.0;
            prop_assert!(fed.consumed <= kept.len());
            if fed.error.is_some() {
                prop_assert_eq!(fed.consumed, kept.len(), "an error takes everything");
            }
            // Never more than the room plus one reply...
            if produced > 0 {
                prop_assert!(
                    produced < room.saturating_add(max_reply),
                    "room {} produced {} (max reply {})",
                    room,
                    produced,
                    max_reply
                );
            }
            // ...and never more than the input taken can cost: 19 bytes per byte,
            // plus the unfinished line held from before, plus the error line.
            let error_line = if fed.error.is_some() {
                LINE_TOO_LONG.len()
            } else {
                0
            };
            prop_assert!(
                produced <= ACK_OVERHEAD * fed.consumed + before.1 + error_line,
                "consumed {} (held {}) produced {}",
                fed.consumed,
                before.1,
                produced
            );
            // Input is left over only when the room is used up.
            if fed.consumed < kept.len() && fed.error.is_none() {
                prop_assert!(
                    produced >= room,
                    "stopped early: room {} produced {}",
                    room,
                    produced
                );
            }
            if room == 0 {
                prop_assert_eq!((fed.consumed, produced), (0, 0));
                zero_rooms += 1;
                prop_assert!(zero_rooms <= rooms.len(), "only zero rooms");
            } else {
                zero_rooms = 0;
            }
            kept.drain(..fed.consumed);
            if fed.error.is_some() {
                return Ok(Bounded { out, failed: true });
            }
        }
    }
    d.finish(&mut out);
    Ok(Bounded {
        out,
        failed: d.failed(),
    })
}

fn rooms() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(
        prop_oneof![1 => Just(0usize), 6 => 1usize..80, 1 => 80usize..1000],
        1..8,
    )
    .prop_filter("some room", |r| r.iter().any(|&n| n > 0))
}

proptest! {
    /// However reads fall and whatever room each call gets, line framing answers
    /// exactly what one unbounded call answers, and echo returns the input.
    #[test]
    fn bounded_feeding_and_resuming_gives_the_same_replies(
        input in bytes(400),
        at in cuts(),
        room in rooms(),
        max_line_bytes in 0usize..48,
    ) {
        let codec = Codec::AckLine { max_line_bytes };
        let whole = run(codec, &[&input]);
        let bounded = run_bounded(codec, &cut(&input, &at), &room)?;
        prop_assert_eq!(bounded.failed, whole.failed);
        prop_assert_eq!(bounded.out, whole.out);
        let echo = run_bounded(Codec::Echo, &cut(&input, &at), &room)?;
        prop_assert_eq!(echo.out, input);
    }

    /// A flood of empty lines (19 bytes of reply per input byte) in big reads:
    /// every call stays within its room plus one reply.
    #[test]
    fn bounded_feeding_of_empty_lines_stays_within_the_room(
        lines in 1usize..3000,
        crlf in any::<bool>(),
        room in rooms(),
    ) {
        let line: &[u8] = if crlf { b"\r\n" } else { b"\n" };
        let input = line.repeat(lines);
        let codec = Codec::AckLine { max_line_bytes: 16 };
        let bounded = run_bounded(codec, &[&input], &room)?;
        prop_assert_eq!(bounded.out, ack(b"").repeat(lines));
    }

    #[test]
    fn bounded_read_framing_answers_each_fed_chunk_once(input in bytes(300), at in cuts(), room in rooms()) {
        let reads = cut(&input, &at);
        let bounded = run_bounded(Codec::AckRead, &reads, &room)?;
        prop_assert_eq!(bounded.out, run(Codec::AckRead, &reads).out);
    }
}

/// The config fuzz target's property, pinned for timeouts written as bare integers
/// (seconds): such a value is accepted only if `to_toml()` can print it back. Just
/// over a year (the longest duration a string may give) and the largest TOML
/// integer were both accepted, printed as `"31536001s"` / `"9223372036854775807s"`,
/// and then refused when read back; the huge one also overflowed `Instant` in the
/// workers (see `tests/config_errors.rs`).
#[test]
fn regression_integer_timeouts_round_trip_through_to_toml_or_are_refused() {
    use sockpool::config::Config;
    for key in [
        "connection]\nidle_timeout",
        "connection]\nwrite_timeout",
        "shutdown]\ngrace",
    ] {
        for value in ["31536000", "31536001", "9223372036854775807"] {
            let text = format!("[{key} = {value}\n");
            let mut config = Config::default();
            if config.merge_toml(&text, "t").is_err() {
                continue;
            }
            let shown = config.to_toml();
            let mut back = Config::default();
            let loaded = back.merge_toml(&shown, "back");
            assert!(loaded.is_ok(), "{text:?} printed as\n{shown}\n{loaded:?}");
            assert_eq!(back, config, "{text:?}");
        }
    }
}
