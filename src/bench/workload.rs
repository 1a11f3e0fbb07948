//! What the load generator sends and what it expects back: pure functions on bytes.
//!
//! Every request carries its sequence number (hex, in its first bytes) and a slice of
//! a fixed pattern chosen by a hash of (connection, sequence), so a reply that is
//! mixed up with another connection's, reordered, or cut is caught by a plain byte
//! comparison. The payload alphabet has no `\n` and no `"`, so ack-line replies are
//! unambiguous.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// Which PROXY protocol header `--proxy-header` sends first on each connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProxyVersion {
    /// Text: `PROXY TCP4 <src> <dst> <sport> <dport>\r\n`.
    V1,
    /// Binary, as HAProxy `send-proxy-v2` sends it.
    V2,
}

/// A PROXY header naming `source` (the client's own address) and `destination`,
/// as a balancer in front of the server would send it.
pub fn proxy_header(version: ProxyVersion, source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    // Both addresses must be of one family; an IPv4 source towards an IPv6 server
    // is written as IPv4-mapped IPv6, as HAProxy does.
    let (src, dst) = match (source, destination) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => (IpAddr::V4(*s.ip()), IpAddr::V4(*d.ip())),
        (s, d) => (IpAddr::V6(to_v6(s.ip())), IpAddr::V6(to_v6(d.ip()))),
    };
    let (sport, dport) = (source.port(), destination.port());
    match version {
        ProxyVersion::V1 => {
            let family = if src.is_ipv4() { "TCP4" } else { "TCP6" };
            format!("PROXY {family} {src} {dst} {sport} {dport}\r\n").into_bytes()
        }
        ProxyVersion::V2 => {
            let mut h = b"\r\n\r\n\0\r\nQUIT\n\x21".to_vec();
            match (src, dst) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    h.extend_from_slice(&[0x11, 0, 12]);
                    h.extend_from_slice(&s.octets());
                    h.extend_from_slice(&d.octets());
                }
                (s, d) => {
                    h.extend_from_slice(&[0x21, 0, 36]);
                    h.extend_from_slice(&to_v6(s).octets());
                    h.extend_from_slice(&to_v6(d).octets());
                }
            }
            h.extend_from_slice(&sport.to_be_bytes());
            h.extend_from_slice(&dport.to_be_bytes());
            h
        }
    }
}

fn to_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// Request/reply shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// RFC 862 echo: the reply is the request.
    Echo,
    /// sockpool `--mode ack --framing line`: a line in, `Server received "<line>"\n` out.
    AckLine,
}

impl Mode {
    /// The name used on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Echo => "echo",
            Mode::AckLine => "ack-line",
        }
    }
}

/// Printable, no `\n`, no `"`: 64 symbols so a byte picks one with a mask.
const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// How many distinct starting offsets into the pattern a payload may use.
const PATTERN_OFFSETS: usize = 251;

/// Hex digits of the sequence number stamped at the start of each payload.
const SEQ_DIGITS: usize = 16;

const ACK_PREFIX: &[u8] = b"Server received \"";
const ACK_SUFFIX: &[u8] = b"\"\n";

/// Builds requests and expected replies for one run.
#[derive(Debug, Clone)]
pub struct Workload {
    mode: Mode,
    /// `payload_len + PATTERN_OFFSETS` pattern bytes, so a payload is one memcpy.
    pattern: Vec<u8>,
}

impl Workload {
    /// `size` is the request size on the wire; ack-line needs at least 1 (the `\n`).
    pub fn new(mode: Mode, size: usize) -> Result<Workload, String> {
        if size == 0 {
            return Err("--size must be at least 1".to_string());
        }
        let payload_len = match mode {
            Mode::Echo => size,
            Mode::AckLine => size - 1,
        };
        let pattern = (0..payload_len + PATTERN_OFFSETS)
            .map(|i| ALPHABET[(i.wrapping_mul(7) ^ (i >> 6)) & 63])
            .collect();
        Ok(Workload { mode, pattern })
    }

    fn payload_len(&self) -> usize {
        self.pattern.len() - PATTERN_OFFSETS
    }

    /// Appends the payload of message `seq` on connection `conn`.
    fn push_payload(&self, conn: u64, seq: u64, out: &mut Vec<u8>) {
        let mix = (seq ^ conn.rotate_left(32)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let offset = (mix >> 40) as usize % PATTERN_OFFSETS;
        let start = out.len();
        out.extend_from_slice(&self.pattern[offset..offset + self.payload_len()]);
        let stamp = &mut out[start..];
        let digits = stamp.len().min(SEQ_DIGITS);
        for (i, byte) in stamp[..digits].iter_mut().enumerate() {
            let shift = 4 * (digits - 1 - i);
            *byte = b"0123456789abcdef"[((seq >> shift) & 15) as usize];
        }
    }

    /// Appends request `seq` of connection `conn` to `out`.
    pub fn push_request(&self, conn: u64, seq: u64, out: &mut Vec<u8>) {
        self.push_payload(conn, seq, out);
        if self.mode == Mode::AckLine {
            out.push(b'\n');
        }
    }

    /// Appends the reply expected for request `seq` of connection `conn` to `out`.
    pub fn push_reply(&self, conn: u64, seq: u64, out: &mut Vec<u8>) {
        match self.mode {
            Mode::Echo => self.push_payload(conn, seq, out),
            Mode::AckLine => {
                out.extend_from_slice(ACK_PREFIX);
                self.push_payload(conn, seq, out);
                out.extend_from_slice(ACK_SUFFIX);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_headers_parse_back_to_the_addresses_they_name() {
        use crate::protocol::proxy::{parse_header, ProxyHeader};
        let cases: [(SocketAddr, SocketAddr); 3] = [
            (
                "127.0.1.7:40001".parse().unwrap(),
                "127.0.0.1:20000".parse().unwrap(),
            ),
            (
                "[2001:db8::7]:443".parse().unwrap(),
                "[::1]:20000".parse().unwrap(),
            ),
            (
                "127.0.1.7:40001".parse().unwrap(),
                "[::1]:20000".parse().unwrap(),
            ),
        ];
        for (src, dst) in cases {
            for version in [ProxyVersion::V1, ProxyVersion::V2] {
                let h = proxy_header(version, src, dst);
                let (parsed, used) = parse_header(&h).unwrap().unwrap();
                assert_eq!(used, h.len(), "{version:?} {src} {dst}");
                let ProxyHeader::Proxied { source, .. } = parsed else {
                    panic!("{version:?} {src}: {parsed:?}")
                };
                assert_eq!(source.port(), src.port());
                assert_eq!(source.ip().to_canonical(), src.ip().to_canonical());
            }
        }
    }

    #[test]
    fn echo_reply_is_the_request() {
        let w = Workload::new(Mode::Echo, 64).unwrap();
        let (mut req, mut rep) = (Vec::new(), Vec::new());
        w.push_request(3, 99, &mut req);
        w.push_reply(3, 99, &mut rep);
        assert_eq!(req.len(), 64);
        assert_eq!(req, rep);
        assert_eq!(&req[..16], b"0000000000000063");
    }

    #[test]
    fn ack_line_reply_quotes_the_line_without_its_newline() {
        let w = Workload::new(Mode::AckLine, 8).unwrap();
        let (mut req, mut rep) = (Vec::new(), Vec::new());
        w.push_request(0, 0x2a, &mut req);
        w.push_reply(0, 0x2a, &mut rep);
        assert_eq!(req, b"000002a\n");
        assert_eq!(rep, b"Server received \"000002a\"\n");
    }

    #[test]
    fn payloads_are_printable_and_never_hold_newline_or_quote() {
        let w = Workload::new(Mode::AckLine, 300).unwrap();
        for seq in 0..50 {
            let mut req = Vec::new();
            w.push_request(7, seq, &mut req);
            let payload = &req[..req.len() - 1];
            assert!(payload.iter().all(|b| b.is_ascii_graphic() && *b != b'"'));
            assert_eq!(req.last(), Some(&b'\n'));
        }
    }

    #[test]
    fn different_messages_differ() {
        let w = Workload::new(Mode::Echo, 4).unwrap();
        let render = |conn, seq| {
            let mut v = Vec::new();
            w.push_request(conn, seq, &mut v);
            v
        };
        assert_ne!(render(0, 1), render(0, 2));
        // Same sequence on two connections: the pattern offset differs for most pairs
        // once the stamp leaves room for it.
        let w = Workload::new(Mode::Echo, 64).unwrap();
        let differing = (0..20u64)
            .filter(|c| {
                let (mut a, mut b) = (Vec::new(), Vec::new());
                w.push_request(*c, 5, &mut a);
                w.push_request(c + 1, 5, &mut b);
                a != b
            })
            .count();
        assert!(differing >= 18);
    }

    #[test]
    fn zero_size_is_refused_and_size_one_ack_line_is_an_empty_line() {
        assert!(Workload::new(Mode::Echo, 0).is_err());
        let w = Workload::new(Mode::AckLine, 1).unwrap();
        let mut rep = Vec::new();
        w.push_reply(0, 0, &mut rep);
        assert_eq!(rep, b"Server received \"\"\n");
    }
}
