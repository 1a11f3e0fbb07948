//! The PROXY protocol header (HAProxy `send-proxy` / `send-proxy-v2`), sans-I/O.
//!
//! Behind a balancer every connection comes from the balancer's address. A balancer
//! that speaks the PROXY protocol writes one header at the very start of each
//! connection naming the real client; [`parse_header`] reads it from the bytes
//! received so far, and [`HeaderReader`] holds the bytes of a header split across
//! reads. Nothing here knows about sockets, clocks, metrics or which peers are
//! trusted: the worker decides that (see `notes/proxy-integration.md`).
//!
//! Parsing is done by the `ppp` crate; this module frames the header first and only
//! hands `ppp` a complete one, because `ppp` cannot always tell "incomplete" from
//! "invalid" on a prefix:
//!
//! - v1 `"PROXY TCP4 1.2.3.4 5.6.7.8 1234 "` (a valid header cut after the last
//!   space) is `InvalidDestinationPort` to `ppp`, a terminal error;
//! - v1 `"PROXY TCP4\r\n"` (complete and invalid) is `MissingDestinationAddress` to
//!   `ppp`, which it reports as incomplete, so a caller trusting it would wait for
//!   bytes that can never make it valid;
//! - v1 `"PROXY UNKNOWN"` followed by five or more fields is `MissingNewLine`
//!   (incomplete) even with its CRLF there; the spec says everything after
//!   `UNKNOWN` up to CRLF is to be ignored, so we recognise `UNKNOWN` ourselves.
//!
//! So: v1 is one line ending in CRLF within [`V1_MAX_BYTES`]; v2 is 16 bytes plus
//! the length in bytes 14-15, at most [`V2_MAX_BYTES`] in all. Until that many
//! bytes are here the answer is `Ok(None)` ("need more", a value, not an error),
//! unless the bytes so far already cannot start a valid header: the first byte
//! that differs from both signatures is an error at once, without waiting for more.
//! TLVs (v2) are skipped, not interpreted: none of them changes the peer address.

use std::fmt;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};

/// The v1 signature, with its separator: `PROXY `.
const V1_SIGNATURE: &[u8] = b"PROXY ";

/// The v2 signature: `\r\n\r\n\0\r\nQUIT\n`.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// The longest v1 header, CRLF included (the spec's own figure: `PROXY TCP6`, two
/// full-length IPv6 addresses and two 5-digit ports). A line with no CRLF within
/// this many bytes is an error, so a peer cannot make us buffer a "header" forever.
pub const V1_MAX_BYTES: usize = 107;

/// The fixed part of a v2 header: signature, version/command, family/protocol,
/// length.
pub const V2_FIXED_BYTES: usize = 16;

/// The longest v2 header accepted, fixed part, addresses and TLVs included. The
/// addresses take at most 216 bytes (two UNIX paths); the rest is room for TLVs
/// (HAProxy's `unique-id`, `authority`, SSL details). A header announcing more is
/// an error as soon as its length field arrives, before any of it is buffered.
pub const V2_MAX_BYTES: usize = 4096;

/// The most bytes [`HeaderReader`] ever holds: the longer of the two limits.
pub const MAX_HEADER_BYTES: usize = V2_MAX_BYTES;

/// What a valid header says about the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyHeader {
    /// v2 `LOCAL`: the proxy's own connection (a health check). The peer is the
    /// proxy itself; any addresses in the header are ignored, as the spec says.
    Local,
    /// v1 `UNKNOWN`, or v2 `PROXY` with an address family or transport we do not
    /// map to a TCP peer (`AF_UNSPEC`, `AF_UNIX`, unspecified transport). The spec
    /// lets the receiver use the real connection's addresses: the peer stays the
    /// proxy, as for [`ProxyHeader::Local`].
    Unknown,
    /// A proxied TCP connection: `source` is the real client, `destination` the
    /// address it connected to (the proxy's front end).
    Proxied {
        /// The client as the proxy saw it.
        source: SocketAddr,
        /// The address the client connected to.
        destination: SocketAddr,
    },
}

impl ProxyHeader {
    /// The peer to use for logs and per-IP limits: the header's source for a
    /// proxied connection, the socket's own peer (the proxy) otherwise.
    pub fn peer(&self, socket_peer: SocketAddr) -> SocketAddr {
        match *self {
            ProxyHeader::Proxied { source, .. } => source,
            ProxyHeader::Local | ProxyHeader::Unknown => socket_peer,
        }
    }
}

/// Why the bytes at the start of a connection are not a PROXY header. Every error
/// is final: more bytes cannot make the header valid, so the connection is closed.
/// Client bytes are never part of it (the caller may log them escaped).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProxyError {
    /// The first bytes match neither signature: the peer did not send a header.
    NotProxy,
    /// v1: no CRLF within [`V1_MAX_BYTES`] (or a bare CR or LF, which no valid
    /// header holds).
    V1Unterminated,
    /// v1: a complete line that `ppp` (or our `UNKNOWN` check) rejects.
    V1Invalid(String),
    /// v2: the version/command byte is not `0x20` (LOCAL) or `0x21` (PROXY).
    V2VersionCommand(u8),
    /// v2: the family/protocol byte names no family or transport in the spec.
    V2FamilyProtocol(u8),
    /// v2: the announced header is longer than [`V2_MAX_BYTES`].
    V2TooLong(usize),
    /// v2: a complete header that `ppp` rejects (e.g. too short for its family's
    /// addresses), or a datagram transport, which a TCP server cannot be behind.
    V2Invalid(String),
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProxyError::NotProxy => f.write_str("not a PROXY protocol header"),
            ProxyError::V1Unterminated => write!(
                f,
                "PROXY v1 header without CRLF within {V1_MAX_BYTES} bytes"
            ),
            ProxyError::V1Invalid(why) => write!(f, "invalid PROXY v1 header: {why}"),
            ProxyError::V2VersionCommand(b) => {
                write!(f, "PROXY v2 header with version/command byte {b:#04x}")
            }
            ProxyError::V2FamilyProtocol(b) => {
                write!(f, "PROXY v2 header with family/protocol byte {b:#04x}")
            }
            ProxyError::V2TooLong(n) => write!(
                f,
                "PROXY v2 header of {n} bytes, over the limit of {V2_MAX_BYTES}"
            ),
            ProxyError::V2Invalid(why) => write!(f, "invalid PROXY v2 header: {why}"),
        }
    }
}

impl std::error::Error for ProxyError {}

/// Reads a PROXY v1 or v2 header from the start of `buf`, the bytes a connection
/// has received so far.
///
/// - `Ok(Some((header, consumed)))`: `buf[..consumed]` is the header; whatever
///   follows is the client's payload, for the codec.
/// - `Ok(None)`: `buf` is a valid beginning of a header; call again with more bytes.
///   `buf.len()` is then below [`MAX_HEADER_BYTES`].
/// - `Err(_)`: no valid header starts `buf`, whatever follows.
///
/// Never panics; each call is independent (no state), so a caller that buffers can
/// simply call again on the longer buffer, and splitting the input differently
/// never changes the answer.
pub fn parse_header(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    if first == V1_SIGNATURE[0] {
        parse_v1(buf)
    } else if first == V2_SIGNATURE[0] {
        parse_v2(buf)
    } else {
        Err(ProxyError::NotProxy)
    }
}

/// Whether `buf` starts like `signature` as far as either goes.
fn agrees_with(buf: &[u8], signature: &[u8]) -> bool {
    let n = buf.len().min(signature.len());
    buf[..n] == signature[..n]
}

fn parse_v1(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    if !agrees_with(buf, V1_SIGNATURE) {
        return Err(ProxyError::NotProxy);
    }
    let window = &buf[..buf.len().min(V1_MAX_BYTES)];
    let Some(at) = window.iter().position(|&b| b == b'\r' || b == b'\n') else {
        return if window.len() == V1_MAX_BYTES {
            Err(ProxyError::V1Unterminated)
        } else {
            Ok(None)
        };
    };
    // A bare LF, or a CR not followed by LF, is never part of a valid header. A
    // CR in the last allowed byte leaves no room for its LF.
    if window[at] == b'\n' || at + 1 == V1_MAX_BYTES {
        return Err(ProxyError::V1Unterminated);
    }
    match window.get(at + 1) {
        None => return Ok(None),
        Some(b'\n') => {}
        Some(_) => return Err(ProxyError::V1Unterminated),
    }
    let line = &window[..at + 2];
    // `UNKNOWN` may be followed by anything up to the CRLF, which is ignored (spec
    // §2.1); `ppp` rejects five or more such fields, so recognise it here.
    if let Some(rest) = line.strip_prefix(b"PROXY UNKNOWN") {
        if rest.first() == Some(&b' ') || rest == b"\r\n" {
            return Ok(Some((ProxyHeader::Unknown, line.len())));
        }
    }
    match ppp::v1::Header::try_from(line) {
        Ok(header) if header.header.len() == line.len() => {
            let header = match header.addresses {
                ppp::v1::Addresses::Unknown => ProxyHeader::Unknown,
                ppp::v1::Addresses::Tcp4(a) => ProxyHeader::Proxied {
                    source: SocketAddrV4::new(a.source_address, a.source_port).into(),
                    destination: SocketAddrV4::new(a.destination_address, a.destination_port)
                        .into(),
                },
                ppp::v1::Addresses::Tcp6(a) => ProxyHeader::Proxied {
                    source: SocketAddrV6::new(a.source_address, a.source_port, 0, 0).into(),
                    destination: SocketAddrV6::new(a.destination_address, a.destination_port, 0, 0)
                        .into(),
                },
            };
            Ok(Some((header, line.len())))
        }
        // `ppp` read a different length than our framing: refuse rather than let
        // the two disagree on where the payload starts.
        Ok(_) => Err(ProxyError::V1Invalid("header length mismatch".into())),
        // Whatever `ppp` calls it, "incomplete" included: the line is complete.
        Err(e) => Err(ProxyError::V1Invalid(e.to_string())),
    }
}

fn parse_v2(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    if !agrees_with(buf, V2_SIGNATURE) {
        return Err(ProxyError::NotProxy);
    }
    // Check each fixed byte as soon as it arrives, so that garbage fails at once.
    if let Some(&vc) = buf.get(12) {
        if vc != 0x20 && vc != 0x21 {
            return Err(ProxyError::V2VersionCommand(vc));
        }
    }
    if let Some(&fp) = buf.get(13) {
        if fp >> 4 > 3 || fp & 0x0f > 2 {
            return Err(ProxyError::V2FamilyProtocol(fp));
        }
    }
    let Some(&[hi, lo]) = buf.get(14..16).and_then(|b| b.first_chunk::<2>()) else {
        return Ok(None);
    };
    let total = V2_FIXED_BYTES + usize::from(u16::from_be_bytes([hi, lo]));
    if total > V2_MAX_BYTES {
        return Err(ProxyError::V2TooLong(total));
    }
    if buf.len() < total {
        return Ok(None);
    }
    let header = ppp::v2::Header::try_from(&buf[..total])
        .map_err(|e| ProxyError::V2Invalid(e.to_string()))?;
    if header.len() != total {
        return Err(ProxyError::V2Invalid("header length mismatch".into()));
    }
    let header = match (header.command, header.protocol, header.addresses) {
        (ppp::v2::Command::Local, _, _) => ProxyHeader::Local,
        (_, ppp::v2::Protocol::Datagram, _) => {
            return Err(ProxyError::V2Invalid(
                "a datagram (UDP) connection sent to a TCP server".into(),
            ))
        }
        (_, ppp::v2::Protocol::Stream, ppp::v2::Addresses::IPv4(a)) => ProxyHeader::Proxied {
            source: SocketAddrV4::new(a.source_address, a.source_port).into(),
            destination: SocketAddrV4::new(a.destination_address, a.destination_port).into(),
        },
        (_, ppp::v2::Protocol::Stream, ppp::v2::Addresses::IPv6(a)) => ProxyHeader::Proxied {
            source: SocketAddrV6::new(a.source_address, a.source_port, 0, 0).into(),
            destination: SocketAddrV6::new(a.destination_address, a.destination_port, 0, 0).into(),
        },
        _ => ProxyHeader::Unknown,
    };
    Ok(Some((header, total)))
}

/// Holds the start of a header that arrived split across reads, for one
/// connection, until the rest comes. Costs nothing (no allocation) when the whole
/// header comes in one read, which is the usual case.
///
/// Because a read is handed on only once [`parse_header`] says "need more", every
/// held byte belongs to the header, and the payload after it always starts inside
/// the read that completes it: [`HeaderReader::feed`] returns that offset.
#[derive(Debug, Default)]
pub struct HeaderReader {
    /// The reads so far, when they did not yet hold a whole header. Never longer
    /// than [`MAX_HEADER_BYTES`].
    held: Vec<u8>,
}

impl HeaderReader {
    /// A reader holding nothing.
    pub fn new() -> HeaderReader {
        HeaderReader::default()
    }

    /// Takes the next read. `Ok(Some((header, start)))`: the header is complete and
    /// `read[start..]` is the client's first payload (possibly empty), for the
    /// codec. `Ok(None)`: the read was kept, feed the next one. `Err`: close the
    /// connection. After `Some` or `Err` the reader holds nothing and must not be
    /// fed again (it would read the payload as a new header).
    pub fn feed(&mut self, read: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
        if self.held.is_empty() {
            return match parse_header(read) {
                Ok(None) => {
                    self.held.extend_from_slice(read);
                    Ok(None)
                }
                done => done,
            };
        }
        // At most MAX_HEADER_BYTES are ever needed: hold no more than that, so a
        // huge read cannot grow the buffer before the parser refuses it.
        let room = MAX_HEADER_BYTES.saturating_sub(self.held.len());
        let before = self.held.len();
        self.held.extend_from_slice(&read[..read.len().min(room)]);
        match parse_header(&self.held) {
            Ok(None) => Ok(None),
            Ok(Some((header, consumed))) => {
                self.held = Vec::new();
                // The held bytes alone were no complete header, so it ends in `read`.
                Ok(Some((header, consumed.saturating_sub(before))))
            }
            Err(e) => {
                self.held = Vec::new();
                Err(e)
            }
        }
    }

    /// Bytes held, waiting for the rest of a header.
    pub fn buffered(&self) -> usize {
        self.held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn v4(a: [u8; 4], port: u16) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::from(a), port))
    }

    fn v6(a: &str, port: u16) -> SocketAddr {
        SocketAddr::from((a.parse::<Ipv6Addr>().unwrap(), port))
    }

    /// A v2 header: version/command byte, family/protocol byte, then the body.
    fn v2(vc: u8, fp: u8, body: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(vc);
        h.push(fp);
        h.extend_from_slice(&(body.len() as u16).to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    fn v2_ipv4_body(tlvs: &[u8]) -> Vec<u8> {
        let mut b = vec![192, 0, 2, 7, 10, 0, 0, 1];
        b.extend_from_slice(&51234u16.to_be_bytes());
        b.extend_from_slice(&20000u16.to_be_bytes());
        b.extend_from_slice(tlvs);
        b
    }

    fn v2_ipv6_body() -> Vec<u8> {
        let mut b = "2001:db8::7".parse::<Ipv6Addr>().unwrap().octets().to_vec();
        b.extend_from_slice(&"::1".parse::<Ipv6Addr>().unwrap().octets());
        b.extend_from_slice(&443u16.to_be_bytes());
        b.extend_from_slice(&20000u16.to_be_bytes());
        b
    }

    /// Every valid header we know, with what it must parse to.
    fn valid() -> Vec<(&'static str, Vec<u8>, ProxyHeader)> {
        let proxied4 = ProxyHeader::Proxied {
            source: v4([192, 0, 2, 7], 51234),
            destination: v4([10, 0, 0, 1], 20000),
        };
        // TLVs: ALPN "h2", AUTHORITY "example.com", NOOP of 3 bytes.
        let mut tlvs = vec![0x01, 0, 2, b'h', b'2', 0x02, 0, 11];
        tlvs.extend_from_slice(b"example.com");
        tlvs.extend_from_slice(&[0x04, 0, 3, 0, 0, 0]);
        let mut unix = vec![0u8; 216];
        unix[..5].copy_from_slice(b"/a.so");
        vec![
            (
                "v1 TCP4",
                b"PROXY TCP4 192.0.2.7 10.0.0.1 51234 20000\r\n".to_vec(),
                proxied4,
            ),
            (
                "v1 TCP4 longest",
                b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n".to_vec(),
                ProxyHeader::Proxied {
                    source: v4([255; 4], 65535),
                    destination: v4([255; 4], 65535),
                },
            ),
            (
                "v1 TCP4 port 0",
                b"PROXY TCP4 1.2.3.4 5.6.7.8 0 0\r\n".to_vec(),
                ProxyHeader::Proxied {
                    source: v4([1, 2, 3, 4], 0),
                    destination: v4([5, 6, 7, 8], 0),
                },
            ),
            (
                "v1 TCP6",
                b"PROXY TCP6 2001:db8::7 ::1 443 20000\r\n".to_vec(),
                ProxyHeader::Proxied {
                    source: v6("2001:db8::7", 443),
                    destination: v6("::1", 20000),
                },
            ),
            (
                "v1 TCP6 longest (107 bytes)",
                b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n".to_vec(),
                ProxyHeader::Proxied {
                    source: v6("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
                    destination: v6("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
                },
            ),
            ("v1 UNKNOWN", b"PROXY UNKNOWN\r\n".to_vec(), ProxyHeader::Unknown),
            (
                "v1 UNKNOWN with addresses (ignored)",
                b"PROXY UNKNOWN ffff:f::1 ffff:f::2 1 2\r\n".to_vec(),
                ProxyHeader::Unknown,
            ),
            (
                "v1 UNKNOWN with five fields (ppp rejects it)",
                b"PROXY UNKNOWN a b c d e\r\n".to_vec(),
                ProxyHeader::Unknown,
            ),
            ("v2 PROXY IPv4", v2(0x21, 0x11, &v2_ipv4_body(&[])), proxied4),
            (
                "v2 PROXY IPv4 with TLVs",
                v2(0x21, 0x11, &v2_ipv4_body(&tlvs)),
                proxied4,
            ),
            (
                "v2 PROXY IPv6",
                v2(0x21, 0x21, &v2_ipv6_body()),
                ProxyHeader::Proxied {
                    source: v6("2001:db8::7", 443),
                    destination: v6("::1", 20000),
                },
            ),
            ("v2 LOCAL", v2(0x20, 0x00, &[]), ProxyHeader::Local),
            (
                "v2 LOCAL with addresses (ignored)",
                v2(0x20, 0x11, &v2_ipv4_body(&[])),
                ProxyHeader::Local,
            ),
            ("v2 PROXY AF_UNSPEC", v2(0x21, 0x00, &[]), ProxyHeader::Unknown),
            ("v2 PROXY AF_UNIX", v2(0x21, 0x31, &unix), ProxyHeader::Unknown),
            (
                "v2 PROXY IPv4, transport unspecified",
                v2(0x21, 0x10, &v2_ipv4_body(&[])),
                ProxyHeader::Unknown,
            ),
            (
                "v2 longest",
                v2(0x21, 0x11, &v2_ipv4_body(&vec![0; V2_MAX_BYTES - 16 - 12])),
                proxied4,
            ),
        ]
    }

    #[test]
    fn valid_headers_parse_and_consume_exactly_the_header() {
        for (name, bytes, want) in valid() {
            assert_eq!(
                parse_header(&bytes),
                Ok(Some((want, bytes.len()))),
                "{name}"
            );
            let mut with_payload = bytes.clone();
            with_payload.extend_from_slice(b"hello\r\n");
            assert_eq!(
                parse_header(&with_payload),
                Ok(Some((want, bytes.len()))),
                "{name} + payload"
            );
        }
    }

    #[test]
    fn every_truncation_of_a_valid_header_needs_more() {
        for (name, bytes, _) in valid() {
            for n in 0..bytes.len() {
                assert_eq!(parse_header(&bytes[..n]), Ok(None), "{name} cut at {n}");
            }
        }
    }

    #[test]
    fn the_reader_gives_the_same_answer_for_every_two_way_split() {
        for (name, bytes, want) in valid() {
            let mut input = bytes.clone();
            input.extend_from_slice(b"payload");
            for n in 0..=input.len() {
                let mut r = HeaderReader::new();
                let (first, second) = input.split_at(n);
                // The payload is what follows the header in the read that ends
                // it, plus any later reads.
                let got = match r.feed(first) {
                    Ok(Some((h, start))) => (h, [&first[start..], second].concat()),
                    Ok(None) => {
                        let (h, start) = r.feed(second).unwrap().unwrap();
                        (h, second[start..].to_vec())
                    }
                    Err(e) => panic!("{name} cut at {n}: {e}"),
                };
                assert_eq!(got, (want, b"payload".to_vec()), "{name} at {n}");
                assert_eq!(r.buffered(), 0);
            }
        }
    }

    #[test]
    fn invalid_headers_are_errors() {
        let long_tlvs = v2(0x21, 0x11, &v2_ipv4_body(&vec![0; V2_MAX_BYTES - 16 - 11]));
        let cases: Vec<(&str, Vec<u8>, ProxyError)> = vec![
            ("http", b"GET / HTTP/1.1\r\n".to_vec(), ProxyError::NotProxy),
            ("lower case", b"proxy TCP4".to_vec(), ProxyError::NotProxy),
            ("one wrong byte", b"X".to_vec(), ProxyError::NotProxy),
            ("P then garbage", b"PX".to_vec(), ProxyError::NotProxy),
            ("PROXY without space", b"PROXY\r\n".to_vec(), ProxyError::NotProxy),
            ("CR then garbage", b"\r\nGET".to_vec(), ProxyError::NotProxy),
            (
                "v1 line without CRLF within 107 bytes",
                [b"PROXY TCP4 ".as_slice(), &[b'1'; 96]].concat(),
                ProxyError::V1Unterminated,
            ),
            (
                "v1 CR as byte 107",
                [b"PROXY UNKNOWN ".as_slice(), &[b'x'; 92], b"\r\n"].concat(),
                ProxyError::V1Unterminated,
            ),
            (
                "v1 bare LF",
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n".to_vec(),
                ProxyError::V1Unterminated,
            ),
            (
                "v1 CR without LF",
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX".to_vec(),
                ProxyError::V1Unterminated,
            ),
            (
                "v1 UNKNOWNX",
                b"PROXY UNKNOWNX\r\n".to_vec(),
                ProxyError::V1Invalid("Header has an invalid protocol.".into()),
            ),
            (
                "v1 TCP4 without addresses (ppp calls it incomplete)",
                b"PROXY TCP4\r\n".to_vec(),
                ProxyError::V1Invalid("Header missing destination address.".into()),
            ),
            (
                "v1 TCP4 with an IPv6 address",
                b"PROXY TCP4 ::1 ::1 1 2\r\n".to_vec(),
                ProxyError::V1Invalid(
                    "Header contains invalid IP address for the source.".into(),
                ),
            ),
            (
                "v1 port over 65535",
                b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n".to_vec(),
                ProxyError::V1Invalid("Header contains invalid TCP port for the source.".into()),
            ),
            (
                "v1 port with a leading zero",
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1 02\r\n".to_vec(),
                ProxyError::V1Invalid(
                    "Header contains invalid TCP port for the destination.".into(),
                ),
            ),
            (
                "v1 trailing space",
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n".to_vec(),
                ProxyError::V1Invalid("Header must end in '\r\n'.".into()),
            ),
            (
                "v1 TCP5",
                b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n".to_vec(),
                ProxyError::V1Invalid("Header has an invalid protocol.".into()),
            ),
            (
                "v1 not UTF-8",
                b"PROXY TCP4 1.2.3.\xff 5.6.7.8 1 2\r\n".to_vec(),
                ProxyError::V1Invalid("Header is not valid UTF-8.".into()),
            ),
            (
                "v2 signature with one wrong byte",
                b"\r\n\r\n\0\r\nQUIX".to_vec(),
                ProxyError::NotProxy,
            ),
            (
                "v2 version 1",
                v2(0x11, 0x11, &v2_ipv4_body(&[]))[..13].to_vec(),
                ProxyError::V2VersionCommand(0x11),
            ),
            (
                "v2 command 2",
                v2(0x22, 0x11, &v2_ipv4_body(&[])),
                ProxyError::V2VersionCommand(0x22),
            ),
            (
                "v2 family 4",
                v2(0x21, 0x41, &v2_ipv4_body(&[]))[..14].to_vec(),
                ProxyError::V2FamilyProtocol(0x41),
            ),
            (
                "v2 protocol 3",
                v2(0x21, 0x13, &v2_ipv4_body(&[])),
                ProxyError::V2FamilyProtocol(0x13),
            ),
            (
                "v2 over the limit, refused on its length alone",
                long_tlvs[..16].to_vec(),
                ProxyError::V2TooLong(V2_MAX_BYTES + 1),
            ),
            (
                "v2 IPv4 body too short for its addresses",
                v2(0x21, 0x11, &[1, 2, 3, 4]),
                ProxyError::V2Invalid("Header does not contain enough bytes for the address family. Expected 12, found 4.".into()),
            ),
            (
                "v2 UDP",
                v2(0x21, 0x12, &v2_ipv4_body(&[])),
                ProxyError::V2Invalid("a datagram (UDP) connection sent to a TCP server".into()),
            ),
        ];
        for (name, bytes, want) in cases {
            let got = parse_header(&bytes).expect_err(name);
            // The wording of `ppp`'s messages may change between releases: for
            // its errors the kind is what matters.
            match (&got, &want) {
                (ProxyError::V1Invalid(_), ProxyError::V1Invalid(_))
                | (ProxyError::V2Invalid(_), ProxyError::V2Invalid(_)) => {}
                _ => assert_eq!(got, want, "{name}"),
            }
            assert_eq!(
                std::mem::discriminant(&got),
                std::mem::discriminant(&want),
                "{name}: {got}"
            );
        }
    }

    #[test]
    fn bytes_that_match_neither_signature_fail_on_the_first_byte() {
        for b in 0..=255u8 {
            let got = parse_header(&[b]);
            if b == b'P' || b == b'\r' {
                assert_eq!(got, Ok(None), "{b:#x}");
            } else {
                assert_eq!(got, Err(ProxyError::NotProxy), "{b:#x}");
            }
        }
    }

    #[test]
    fn the_reader_never_holds_more_than_the_limit() {
        // A v2 header of the largest allowed size, fed a byte at a time.
        let h = v2(0x21, 0x11, &v2_ipv4_body(&vec![0; V2_MAX_BYTES - 16 - 12]));
        let mut r = HeaderReader::new();
        for (i, b) in h.iter().enumerate() {
            let got = r.feed(std::slice::from_ref(b)).unwrap();
            assert!(r.buffered() < MAX_HEADER_BYTES);
            assert_eq!(got.is_some(), i + 1 == h.len(), "at {i}");
        }
        // A v1 line fed in one huge read after a partial one: refused, nothing kept.
        let mut r = HeaderReader::new();
        assert_eq!(r.feed(b"PROXY "), Ok(None));
        assert_eq!(r.feed(&[b'x'; 1 << 20]), Err(ProxyError::V1Unterminated));
        assert_eq!(r.buffered(), 0);
    }

    /// Why this module frames the header before `ppp` sees it: on its own, `ppp`
    /// (2.3) calls a cut valid header invalid and a complete invalid one
    /// incomplete. If a later `ppp` fixes this, the framing could be simplified.
    #[test]
    fn ppp_alone_confuses_incomplete_and_invalid() {
        use ppp::PartialResult;
        let cut_valid = b"PROXY TCP4 1.2.3.4 5.6.7.8 1234 ".as_slice();
        assert!(ppp::v1::Header::try_from(cut_valid).is_complete());
        assert!(ppp::v1::Header::try_from(cut_valid).is_err());
        assert_eq!(parse_header(cut_valid), Ok(None));

        let complete_invalid = b"PROXY TCP4\r\n".as_slice();
        assert!(ppp::v1::Header::try_from(complete_invalid).is_incomplete());
        assert!(parse_header(complete_invalid).is_err());

        let unknown = b"PROXY UNKNOWN a b c d e\r\n".as_slice();
        assert!(ppp::v1::Header::try_from(unknown).is_incomplete());
        assert_eq!(
            parse_header(unknown),
            Ok(Some((ProxyHeader::Unknown, unknown.len())))
        );
    }

    #[test]
    fn peer_is_the_source_only_when_proxied() {
        let socket = v4([127, 0, 0, 1], 40000);
        let client = v4([192, 0, 2, 7], 51234);
        let proxied = ProxyHeader::Proxied {
            source: client,
            destination: socket,
        };
        assert_eq!(proxied.peer(socket), client);
        assert_eq!(ProxyHeader::Local.peer(socket), socket);
        assert_eq!(ProxyHeader::Unknown.peer(socket), socket);
    }

    /// Parse cost per header, by hand: `cargo test --release --lib
    /// proxy::tests::parse_cost -- --ignored --nocapture`. Prints figures, asserts
    /// nothing about speed.
    #[test]
    #[ignore]
    fn parse_cost() {
        let cases = [
            (
                "v1 TCP4",
                b"PROXY TCP4 192.0.2.7 10.0.0.1 51234 20000\r\n".to_vec(),
            ),
            (
                "v1 TCP6",
                b"PROXY TCP6 2001:db8::7 2001:db8::1 51234 20000\r\n".to_vec(),
            ),
            ("v2 IPv4", v2(0x21, 0x11, &v2_ipv4_body(&[]))),
            ("v2 IPv6", v2(0x21, 0x21, &v2_ipv6_body())),
        ];
        const N: u32 = 2_000_000;
        for (name, bytes) in cases {
            let start = std::time::Instant::now();
            for _ in 0..N {
                let got = parse_header(std::hint::black_box(&bytes));
                std::hint::black_box(&got);
            }
            let ns = start.elapsed().as_nanos() as f64 / f64::from(N);
            println!("{name}: {ns:.1} ns/header ({} bytes)", bytes.len());
        }
    }
}
