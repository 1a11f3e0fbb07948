//! Properties of the PROXY protocol header parser, through the public
//! `sockpool::protocol::proxy` API: how the bytes are cut into reads never changes
//! the header found or where the payload starts; arbitrary bytes never panic and
//! never make it hold more than its limit; "need more" and errors are consistent
//! over prefixes (an error is final, "need more" only ever precedes a decision);
//! generated v1 and v2 headers give back the addresses they were made from.

use proptest::prelude::*;
use sockpool::protocol::proxy::{
    parse_header, HeaderReader, ProxyError, ProxyHeader, MAX_HEADER_BYTES, V2_MAX_BYTES,
};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// What feeding a sequence of reads to a [`HeaderReader`] gave.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// The header, and every byte after it (the rest of the completing read and
    /// all later reads).
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

/// Cuts `input` at the given positions (sorted; duplicates give empty reads).
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

/// A header to generate: its bytes are built here, independently of the parser.
#[derive(Clone, Debug)]
enum Gen {
    V1 {
        source: SocketAddr,
        destination: SocketAddr,
    },
    V1Unknown,
    V2Proxy {
        source: SocketAddr,
        destination: SocketAddr,
        tlvs: Vec<(u8, Vec<u8>)>,
    },
    V2Local {
        tlvs: Vec<(u8, Vec<u8>)>,
    },
}

impl Gen {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Gen::V1 {
                source,
                destination,
            } => {
                let family = if source.is_ipv4() { "TCP4" } else { "TCP6" };
                format!(
                    "PROXY {family} {} {} {} {}\r\n",
                    source.ip(),
                    destination.ip(),
                    source.port(),
                    destination.port()
                )
                .into_bytes()
            }
            Gen::V1Unknown => b"PROXY UNKNOWN\r\n".to_vec(),
            Gen::V2Proxy {
                source,
                destination,
                tlvs,
            } => {
                let mut body = Vec::new();
                let fp = match (source.ip(), destination.ip()) {
                    (IpAddr::V4(s), IpAddr::V4(d)) => {
                        body.extend_from_slice(&s.octets());
                        body.extend_from_slice(&d.octets());
                        0x11
                    }
                    (IpAddr::V6(s), IpAddr::V6(d)) => {
                        body.extend_from_slice(&s.octets());
                        body.extend_from_slice(&d.octets());
                        0x21
                    }
                    _ => unreachable!("the strategy pairs families"),
                };
                body.extend_from_slice(&source.port().to_be_bytes());
                body.extend_from_slice(&destination.port().to_be_bytes());
                v2(0x21, fp, body, tlvs)
            }
            Gen::V2Local { tlvs } => v2(0x20, 0x00, Vec::new(), tlvs),
        }
    }

    fn expected(&self) -> ProxyHeader {
        match *self {
            Gen::V1 {
                source,
                destination,
            }
            | Gen::V2Proxy {
                source,
                destination,
                ..
            } => ProxyHeader::Proxied {
                source,
                destination,
            },
            Gen::V1Unknown => ProxyHeader::Unknown,
            Gen::V2Local { .. } => ProxyHeader::Local,
        }
    }
}

fn v2(vc: u8, fp: u8, mut body: Vec<u8>, tlvs: &[(u8, Vec<u8>)]) -> Vec<u8> {
    for (kind, value) in tlvs {
        body.push(*kind);
        body.extend_from_slice(&(value.len() as u16).to_be_bytes());
        body.extend_from_slice(value);
    }
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(vc);
    h.push(fp);
    h.extend_from_slice(&(body.len() as u16).to_be_bytes());
    h.extend_from_slice(&body);
    h
}

fn addr_pair() -> impl Strategy<Value = (SocketAddr, SocketAddr)> {
    prop_oneof![
        (
            any::<[u8; 4]>(),
            any::<u16>(),
            any::<[u8; 4]>(),
            any::<u16>()
        )
            .prop_map(|(s, sp, d, dp)| (
                SocketAddr::from((Ipv4Addr::from(s), sp)),
                SocketAddr::from((Ipv4Addr::from(d), dp))
            )),
        (
            any::<[u8; 16]>(),
            any::<u16>(),
            any::<[u8; 16]>(),
            any::<u16>()
        )
            .prop_map(|(s, sp, d, dp)| (
                SocketAddr::from((Ipv6Addr::from(s), sp)),
                SocketAddr::from((Ipv6Addr::from(d), dp))
            )),
    ]
}

fn tlvs() -> impl Strategy<Value = Vec<(u8, Vec<u8>)>> {
    prop::collection::vec(
        (any::<u8>(), prop::collection::vec(any::<u8>(), 0..64)),
        0..6,
    )
}

fn header() -> impl Strategy<Value = Gen> {
    prop_oneof![
        addr_pair().prop_map(|(source, destination)| Gen::V1 {
            source,
            destination
        }),
        Just(Gen::V1Unknown),
        (addr_pair(), tlvs()).prop_map(|((source, destination), tlvs)| Gen::V2Proxy {
            source,
            destination,
            tlvs
        }),
        tlvs().prop_map(|tlvs| Gen::V2Local { tlvs }),
    ]
}

/// Bytes that are often near a header: a valid one with some bytes changed, cut
/// or extended, or plain noise.
fn near_header() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..300),
        (
            header(),
            prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
            prop::collection::vec(any::<u8>(), 0..40),
        )
            .prop_map(|(g, changes, tail)| {
                let mut b = g.bytes();
                for (at, byte) in changes {
                    let i = at.index(b.len());
                    b[i] = byte;
                }
                b.extend_from_slice(&tail);
                b
            }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn generated_headers_round_trip(
        g in header(),
        payload in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let bytes = g.bytes();
        let input = [bytes.as_slice(), &payload].concat();
        prop_assert_eq!(
            parse_header(&input),
            Ok(Some((g.expected(), bytes.len())))
        );
        prop_assert_eq!(feed_all(&[&input]), Outcome::Header(g.expected(), payload));
    }

    #[test]
    fn a_header_split_across_reads_gives_what_it_gives_whole(
        g in header(),
        payload in prop::collection::vec(any::<u8>(), 0..64),
        at in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
    ) {
        let input = [g.bytes().as_slice(), &payload].concat();
        prop_assert_eq!(feed_all(&cut(&input, &at)), Outcome::Header(g.expected(), payload));
    }

    #[test]
    fn any_bytes_split_anyhow_give_what_they_give_whole(
        input in near_header(),
        at in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
    ) {
        prop_assert_eq!(feed_all(&cut(&input, &at)), feed_all(&[&input]));
    }

    /// Over the prefixes of any input: "need more" until a decision, then the same
    /// decision for every longer prefix; a header found is the same header, ending
    /// at the same byte; "need more" never on more than the limit.
    #[test]
    fn decisions_are_final_over_prefixes(input in near_header()) {
        let mut decided: Option<Result<Option<(ProxyHeader, usize)>, ProxyError>> = None;
        for n in 0..=input.len() {
            let got = parse_header(&input[..n]);
            match (&decided, &got) {
                (None, Ok(None)) => prop_assert!(n < MAX_HEADER_BYTES),
                (None, _) => decided = Some(got),
                (Some(first), _) => prop_assert_eq!(first, &got, "at {}", n),
            }
        }
        if let Some(Ok(Some((_, consumed)))) = decided {
            prop_assert!(consumed <= input.len());
            prop_assert!(consumed <= V2_MAX_BYTES);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(input in prop::collection::vec(any::<u8>(), 0..5000)) {
        let _ = parse_header(&input);
        let _ = feed_all(&[&input]);
    }
}

/// Every cut point of one header with TLVs, two reads each, exhaustively (the
/// property tests sample cut points; this tries them all for one v1 and one v2).
#[test]
fn every_single_cut_of_a_header_with_payload_gives_the_whole_answer() {
    let v1 = Gen::V1 {
        source: "[2001:db8::7]:51234".parse().unwrap(),
        destination: "[::1]:20000".parse().unwrap(),
    };
    let v2 = Gen::V2Proxy {
        source: "192.0.2.7:51234".parse().unwrap(),
        destination: "10.0.0.1:20000".parse().unwrap(),
        tlvs: vec![(0x01, b"h2".to_vec()), (0x02, b"example.com".to_vec())],
    };
    for g in [v1, v2] {
        let input = [g.bytes().as_slice(), b"hello\n"].concat();
        for n in 0..=input.len() {
            let (a, b) = input.split_at(n);
            assert_eq!(
                feed_all(&[a, b]),
                Outcome::Header(g.expected(), b"hello\n".to_vec()),
                "{g:?} cut at {n}"
            );
        }
    }
}
