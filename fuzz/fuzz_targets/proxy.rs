//! The PROXY protocol header parser (`parse_header`, `HeaderReader`) on
//! fuzzer-chosen bytes cut into fuzzer-chosen reads.
//!
//! Input layout: byte 0 is how many cut points follow (0-15), then one byte per cut
//! (the length of that read, 0 = an empty read); the rest is the payload, whatever
//! the cuts did not take forms the last read.
//!
//! Invariants: no panic; the reader gives the same header and the same payload
//! after it however the input is cut, and the same as `parse_header` on the whole;
//! it never holds `MAX_HEADER_BYTES` or more; over the prefixes of the input,
//! `parse_header` says "need more" until it decides, then never changes its mind;
//! a header found ends within the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sockpool::protocol::proxy::{
    parse_header, HeaderReader, ProxyError, ProxyHeader, MAX_HEADER_BYTES,
};

#[derive(Debug, PartialEq)]
enum Outcome {
    Header(ProxyHeader, Vec<u8>),
    NeedMore,
    Error(ProxyError),
}

fn feed_all(reads: &[&[u8]]) -> Outcome {
    let mut r = HeaderReader::new();
    for (i, read) in reads.iter().enumerate() {
        let got = r.feed(read);
        assert!(r.buffered() < MAX_HEADER_BYTES, "holds {}", r.buffered());
        match got {
            Ok(None) => {}
            Ok(Some((header, start))) => {
                let mut payload = read[start..].to_vec();
                for later in &reads[i + 1..] {
                    payload.extend_from_slice(later);
                }
                return Outcome::Header(header, payload);
            }
            Err(e) => return Outcome::Error(e),
        }
    }
    Outcome::NeedMore
}

fuzz_target!(|data: &[u8]| {
    let Some((&cuts, rest)) = data.split_first() else {
        return;
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

    let whole = feed_all(&[payload]);
    assert_eq!(feed_all(&reads), whole, "the answer depends on how reads split");
    match (&whole, parse_header(payload)) {
        (Outcome::Header(h, after), Ok(Some((h2, consumed)))) => {
            assert_eq!(*h, h2);
            assert_eq!(after.as_slice(), &payload[consumed..]);
        }
        (Outcome::NeedMore, Ok(None)) => assert!(payload.len() < MAX_HEADER_BYTES),
        (Outcome::Error(e), Err(e2)) => assert_eq!(*e, e2),
        (w, p) => panic!("reader {w:?} but parse_header {p:?}"),
    }

    // Prefix finality (only over the first bytes, to keep each run fast: every
    // decision is made within MAX_HEADER_BYTES).
    let mut decided = None;
    for n in 0..=payload.len().min(MAX_HEADER_BYTES) {
        let got = parse_header(&payload[..n]);
        match (&decided, &got) {
            (None, Ok(None)) => {}
            (None, _) => decided = Some(got),
            (Some(first), _) => assert_eq!(first, &got, "changed its mind at {n}"),
        }
    }
});
