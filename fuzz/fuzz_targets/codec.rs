//! Every codec entry point (`Decoder::new`, `feed`, `feed_bounded`, `finish`,
//! `buffered`) on fuzzer-chosen input cut into fuzzer-chosen reads.
//!
//! Input layout: byte 0 picks the codec, bytes 1-2 `max_line_bytes` (kept small so
//! that over-long lines are common), byte 3 how many cut points follow (0-15), then
//! one byte per cut (the length of that read, 0 = an empty read); the rest is the
//! payload, whatever the cuts did not take forms the last read.
//!
//! Invariants: no panic; echo returns the input unchanged; read framing gives one
//! reply per non-empty read; line framing gives exactly what one read of the whole
//! input gives, and what a plain line-by-line model gives; the decoder never holds
//! more than `max_line_bytes + 1` bytes; after an error it answers nothing more.
//! Fed with bounded rooms (the cut bytes again, as room sizes), as a connection
//! does: each call stays under its room plus one reply, leaves input only once the
//! room is used up, and resuming with what was left gives the same replies.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sockpool::protocol::{Codec, Decoder, ACK_OVERHEAD, LINE_TOO_LONG};

fuzz_target!(|data: &[u8]| {
    let Some((&[which, hi, lo, cuts], rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    let max_line_bytes = usize::from(u16::from_be_bytes([hi, lo]) % 512);
    let codec = match which % 3 {
        0 => Codec::AckRead,
        1 => Codec::AckLine { max_line_bytes },
        _ => Codec::Echo,
    };
    let cuts = usize::from(cuts % 16).min(rest.len());
    let (lens, payload) = rest.split_at(cuts);
    let mut reads: Vec<&[u8]> = Vec::new();
    let mut left = payload;
    for &len in lens {
        let (read, tail) = left.split_at(usize::from(len).min(left.len()));
        reads.push(read);
        left = tail;
    }
    reads.push(left);

    let split = run(codec, &reads);
    match codec {
        Codec::Echo => assert_eq!(split.out, payload, "echo changed the bytes"),
        Codec::AckRead => {
            let mut want = Vec::new();
            for read in reads.iter().filter(|r| !r.is_empty()) {
                want.extend_from_slice(&ack_read(read));
            }
            assert_eq!(split.out, want, "read framing: not one reply per read");
            assert_eq!(
                split.messages,
                reads.iter().filter(|r| !r.is_empty()).count() as u64
            );
        }
        Codec::AckLine { max_line_bytes } => {
            let whole = run(codec, &[payload]);
            assert_eq!(
                split.out, whole.out,
                "line framing depends on how reads split"
            );
            assert_eq!(split.messages, whole.messages);
            assert_eq!(split.failed, whole.failed);
            let (want, failed) = line_model(payload, max_line_bytes);
            assert_eq!(split.out, want, "line framing differs from the model");
            assert_eq!(split.failed, failed);
        }
    }
    if codec != Codec::AckRead {
        let rooms: Vec<usize> = lens.iter().map(|&l| usize::from(l)).collect();
        let bounded = run_bounded(codec, &reads, &rooms);
        assert_eq!(bounded, split.out, "bounded feeding changed the replies");
    }
});

/// Feeds `reads` as a connection does, each call with the next room (cycled, 0s
/// skipped), keeping what a call left for the next one; returns the replies.
fn run_bounded(codec: Codec, reads: &[&[u8]], rooms: &[usize]) -> Vec<u8> {
    let rooms: Vec<usize> = rooms.iter().copied().filter(|&r| r > 0).collect();
    let rooms = if rooms.is_empty() { vec![1] } else { rooms };
    let max_reply = match codec {
        Codec::AckLine { max_line_bytes } => {
            (max_line_bytes + ACK_OVERHEAD).max(LINE_TOO_LONG.len())
        }
        _ => usize::MAX / 2,
    };
    let mut d = Decoder::new(codec);
    let mut out = Vec::new();
    let mut kept = Vec::new();
    let mut call = 0;
    for read in reads {
        kept.extend_from_slice(read);
        while !kept.is_empty() {
            let room = rooms[call % rooms.len()];
            call += 1;
            let before = out.len();
            let fed = d.feed_bounded(&kept, &mut out, room);
            let produced = out.len() - before;
            assert!(fed.consumed <= kept.len());
            assert!(
                produced == 0 || produced < room + max_reply,
                "room {room}: {produced}"
            );
            if fed.consumed < kept.len() {
                assert!(fed.error.is_none() && produced >= room, "stopped early");
            }
            kept.drain(..fed.consumed);
            if fed.error.is_some() {
                return out;
            }
        }
    }
    d.finish(&mut out);
    out
}

struct Outcome {
    out: Vec<u8>,
    messages: u64,
    failed: bool,
}

/// Feeds each read, checking the per-call invariants, then finishes.
fn run(codec: Codec, reads: &[&[u8]]) -> Outcome {
    let mut d = Decoder::new(codec);
    assert_eq!(d.codec(), codec);
    let limit = match codec {
        Codec::AckLine { max_line_bytes } => max_line_bytes + 1,
        _ => 0,
    };
    let mut out = Vec::new();
    let mut messages = 0;
    let mut failed = false;
    for read in reads {
        let before = out.len();
        let fed = d.feed(read, &mut out);
        messages += fed.messages;
        if failed {
            assert!(fed.error.is_some(), "input accepted after an error");
            assert_eq!(out.len(), before, "output after an error");
            assert_eq!(fed.messages, 0);
        } else if fed.error.is_some() {
            failed = true;
            assert!(out.ends_with(LINE_TOO_LONG));
        }
        assert!(d.buffered() <= limit, "holds {} > {limit}", d.buffered());
    }
    let before = out.len();
    let finished = d.finish(&mut out);
    assert!(finished <= 1);
    if failed {
        assert_eq!(
            (finished, out.len()),
            (0, before),
            "answered after an error"
        );
    }
    messages += finished;
    assert_eq!(d.buffered(), 0, "finish left bytes behind");
    assert_eq!(d.finish(&mut out), 0, "a second finish answered again");
    // `finish` fails too, for a final line over the limit by a trailing `\r`.
    assert!(d.failed() || !failed, "an error forgotten");
    let failed = d.failed();
    // A decoder that failed refuses any input, even an empty line (within every
    // limit); one that did not accepts it.
    let refused = d.feed(b"\n", &mut Vec::new()).error.is_some();
    assert_eq!(refused, failed, "failed() disagrees with feed");
    Outcome {
        out,
        messages,
        failed,
    }
}

fn ack(body: &[u8], newline: bool) -> Vec<u8> {
    let mut v = b"Server received \"".to_vec();
    v.extend_from_slice(body);
    v.push(b'"');
    if newline {
        v.push(b'\n');
    }
    v
}

fn ack_read(chunk: &[u8]) -> Vec<u8> {
    match chunk.strip_suffix(b"\n") {
        Some(body) => ack(body.strip_suffix(b"\r").unwrap_or(body), true),
        None => ack(chunk, false),
    }
}

/// Line framing as the contract (DESIGN.md) reads, whole input at once: each
/// `\n`-terminated line (one `\r` dropped) is answered unless it is over the limit,
/// which ends everything with the error. A final line without `\n` is answered at
/// EOF as it is, so it too must be within the limit, a trailing `\r` included (no
/// `\n` can follow it any more). See
/// `regression_final_line_one_over_the_limit_ending_in_cr_is_an_error_at_eof`.
fn line_model(input: &[u8], max: usize) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut pieces: Vec<&[u8]> = input.split(|&b| b == b'\n').collect();
    let last = pieces.pop().unwrap_or(&[]);
    for line in pieces {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.len() > max {
            out.extend_from_slice(LINE_TOO_LONG);
            return (out, true);
        }
        out.extend_from_slice(&ack(line, true));
    }
    if last.len() > max {
        out.extend_from_slice(LINE_TOO_LONG);
        return (out, true);
    }
    if !last.is_empty() {
        out.extend_from_slice(&ack(last, false));
    }
    (out, false)
}
