//! The PROXY protocol on the data port (`server.proxy_protocol`, issue 11 §1), over
//! real sockets: v1 and v2 headers, split byte by byte or sent with the payload,
//! `LOCAL`, untrusted peers, bad and missing headers, the per-IP limit by the
//! header's address, and the counters adding up.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use common::{
    ack, closed, connect_from, metric_value, read_exact_bytes, read_until_closed, Server,
};

const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

fn rejected(reason: &str) -> String {
    format!("sockpool_connections_rejected_total{{reason=\"{reason}\"}}")
}

/// A v1 TCP4 header naming `source` as the client.
fn v1(source: SocketAddr) -> Vec<u8> {
    format!(
        "PROXY TCP4 {} 10.0.0.1 {} 20000\r\n",
        source.ip(),
        source.port()
    )
    .into_bytes()
}

/// A v2 PROXY (command 0x21) TCP over IPv4 header naming `source` as the client.
fn v2(source: SocketAddr) -> Vec<u8> {
    let SocketAddr::V4(src) = source else {
        panic!("IPv4 only")
    };
    let mut h = V2_SIGNATURE.to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12]);
    h.extend_from_slice(&src.ip().octets());
    h.extend_from_slice(&[10, 0, 0, 1]);
    h.extend_from_slice(&src.port().to_be_bytes());
    h.extend_from_slice(&20000u16.to_be_bytes());
    h
}

/// A v2 LOCAL header (a balancer's health check), with no addresses.
fn v2_local() -> Vec<u8> {
    let mut h = V2_SIGNATURE.to_vec();
    h.extend_from_slice(&[0x20, 0x00, 0, 0]);
    h
}

fn client(n: u8) -> SocketAddr {
    SocketAddr::from(([192, 0, 2, n], 40000 + u16::from(n)))
}

/// A server with `--proxy-protocol` and the given config lines (listeners on
/// 127.0.0.1:0, debug logs).
fn server(server_toml: &str, connection_toml: &str) -> (Server, tempfile::TempDir) {
    let connection_toml = if connection_toml.contains("framing") {
        connection_toml.to_string()
    } else {
        format!("framing = \"line\"\n{connection_toml}")
    };
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("proxy.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nproxy_protocol = true\n{server_toml}\n\
             [connection]\n{connection_toml}\n\
             [metrics]\nlisten = \"127.0.0.1:0\"\n[log]\nlevel = \"debug\"\n"
        ),
    )
    .unwrap();
    let s = Server::start(&["--config", path.to_str().unwrap()]);
    (s, dir)
}

fn talk(c: &mut TcpStream, line: &str) {
    c.write_all(format!("{line}\n").as_bytes()).unwrap();
    let want = ack(line);
    assert_eq!(read_exact_bytes(c, want.len()), want, "reply to {line:?}");
}

/// One client connection, header sent, served once, closed by the client.
fn proxied_once(s: &Server, header: &[u8], line: &str) {
    let mut c = s.connect();
    c.write_all(header).unwrap();
    talk(&mut c, line);
}

#[test]
fn a_v1_header_names_the_peer_and_never_reaches_the_codec() {
    let (s, _dir) = server("", "");
    let mut c = s.connect();
    let local = c.local_addr().unwrap();
    c.write_all(&v1(client(7))).unwrap();
    talk(&mut c, "hello");
    talk(&mut c, "again");
    drop(c);
    let log = s.wait_log(&format!("{}: closed reason=client_closed", client(7)));
    assert!(
        log.contains(&format!("via={local}")),
        "no via={local} in the log:\n{log}"
    );
    assert!(
        !log.contains(&format!("{local}: closed")),
        "the balancer's address logged as the peer:\n{log}"
    );
    assert_eq!(s.metric("sockpool_messages_total"), 2.0);
    s.assert_counters_add_up(0.0);
}

#[test]
fn a_v2_header_and_its_payload_split_byte_by_byte_are_served() {
    let (s, _dir) = server("", "");
    let mut c = s.connect();
    c.set_nodelay(true).unwrap();
    for b in v2(client(8)).iter().chain(b"split\n") {
        c.write_all(&[*b]).unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    let want = ack("split");
    assert_eq!(read_exact_bytes(&mut c, want.len()), want);
    drop(c);
    s.wait_log(&format!("{}: closed reason=client_closed", client(8)));
    s.assert_counters_add_up(0.0);
}

#[test]
fn header_and_payload_in_one_write_are_served_in_one_turn_and_echo_never_sends_the_header() {
    // Echo: the payload, and only the payload, comes back.
    let (s, _dir) = server("", "mode = \"echo\"\nframing = \"read\"");
    for header in [v1(client(9)), v2(client(9))] {
        let mut c = s.connect();
        let mut first = header.clone();
        first.extend_from_slice(b"payload after the header");
        c.write_all(&first).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        assert_eq!(
            read_until_closed(&mut c),
            b"payload after the header",
            "header {:?}",
            String::from_utf8_lossy(&header)
        );
    }
    s.assert_counters_add_up(0.0);
    // Ack, line framing: two lines in the header's own segment, both answered.
    let (s, _dir) = server("", "");
    let mut c = s.connect();
    let mut first = v2(client(10));
    first.extend_from_slice(b"one\ntwo\n");
    c.write_all(&first).unwrap();
    let want = [ack("one"), ack("two")].concat();
    assert_eq!(read_exact_bytes(&mut c, want.len()), want);
}

#[test]
fn a_local_header_is_served_as_the_balancer_itself() {
    let (s, _dir) = server("", "");
    let mut c = s.connect();
    let local = c.local_addr().unwrap();
    c.write_all(&v2_local()).unwrap();
    talk(&mut c, "health");
    drop(c);
    s.wait_log(&format!("{local}: closed reason=client_closed"));
    s.assert_counters_add_up(0.0);
}

#[test]
fn an_untrusted_peer_is_rejected_and_counted_without_a_word() {
    let (s, _dir) = server("proxy_trusted = [\"127.0.0.2/32\"]", "");
    // Labelled from the first scrape.
    assert_eq!(s.metric(&rejected("untrusted_proxy")), 0.0);
    let mut c = connect_from(s.addr, Ipv4Addr::new(127, 0, 0, 3)).unwrap();
    let _ = c.write_all(&v1(client(11)));
    assert_eq!(
        read_until_closed(&mut c),
        b"",
        "an untrusted peer got a reply"
    );
    s.wait_metric(&rejected("untrusted_proxy"), |v| v == 1.0);
    // A trusted one is served.
    let mut c = connect_from(s.addr, Ipv4Addr::new(127, 0, 0, 2)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(&v1(client(12))).unwrap();
    talk(&mut c, "trusted");
    drop(c);
    let text = s.assert_counters_add_up(0.0);
    assert_eq!(
        metric_value(&text, "sockpool_connections_accepted_total"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric_value(&text, &rejected("untrusted_proxy")),
        Some(1.0),
        "{text}"
    );
}

#[test]
fn a_bad_header_is_a_protocol_error_with_an_escaped_warning() {
    let (s, _dir) = server("", "");
    let mut c = s.connect();
    c.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    assert_eq!(read_until_closed(&mut c), b"", "a reply to a bad header");
    s.wait_metric(&closed("protocol_error"), |v| v == 1.0);
    let log = s.wait_log("closed, protocol_error: not a PROXY protocol header");
    assert!(
        log.contains(r#"the connection began "GET / HTTP/1.0\r\n\r\n""#),
        "{log}"
    );
    // A v1 header with a bad address.
    let mut c = s.connect();
    c.write_all(b"PROXY TCP4 999.0.0.1 10.0.0.1 1 2\r\nhello\n")
        .unwrap();
    assert_eq!(read_until_closed(&mut c), b"");
    s.wait_metric(&closed("protocol_error"), |v| v == 2.0);
    s.assert_counters_add_up(0.0);
}

#[test]
fn a_missing_header_is_closed_after_idle_timeout_as_protocol_error() {
    let (s, _dir) = server("", "idle_timeout = \"1s\"");
    let mut silent = s.connect();
    let mut partial = s.connect();
    partial.write_all(b"PROXY TCP4 192.0.2.").unwrap();
    assert_eq!(read_until_closed(&mut silent), b"");
    assert_eq!(read_until_closed(&mut partial), b"");
    s.wait_metric(&closed("protocol_error"), |v| v == 2.0);
    assert_eq!(s.metric(&closed("idle_timeout")), 0.0);
    let log = s.wait_log("protocol_error: incomplete PROXY header (19 bytes)");
    assert!(
        log.contains("protocol_error: no PROXY header (nothing received)"),
        "{log}"
    );
    s.assert_counters_add_up(0.0);
}

#[test]
fn a_header_trickled_byte_by_byte_does_not_extend_its_deadline() {
    // idle_timeout 1 s: a byte every 200 ms would keep an ordinary connection open
    // forever; the header's deadline runs from accept. The 45-byte header takes
    // 9 s to send; the server must close before the client has sent it all.
    let (s, _dir) = server("", "idle_timeout = \"1s\"");
    let mut c = s.connect();
    c.set_nodelay(true).unwrap();
    c.set_nonblocking(true).unwrap();
    let header = v1(client(13));
    let mut sent = 0;
    for b in &header {
        if c.write(&[*b]).is_err() {
            break;
        }
        sent += 1;
        std::thread::sleep(Duration::from_millis(200));
        // Closed yet? A FIN makes the peek return 0; an open socket says WouldBlock.
        match c.peek(&mut [0u8; 1]) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            _ => break,
        }
    }
    assert!(
        sent < header.len(),
        "the whole trickled header was taken: its deadline moved with each byte"
    );
    s.wait_metric(&closed("protocol_error"), |v| v == 1.0);
    s.assert_counters_add_up(0.0);
}

#[test]
fn the_per_ip_limit_applies_to_the_header_address() {
    let (s, _dir) = server("max_connections_per_ip = 2", "");
    // Two from one client (all from 127.0.0.1, the "balancer"), both served.
    let mut held = Vec::new();
    for i in 0..2 {
        let mut c = s.connect();
        c.write_all(&v2(client(20))).unwrap();
        talk(&mut c, &format!("first client {i}"));
        held.push(c);
    }
    // A third from the same client: the busy message.
    let mut third = s.connect();
    third.write_all(&v2(client(20))).unwrap();
    third.write_all(b"over the limit\n").unwrap();
    assert_eq!(read_until_closed(&mut third), b"ERROR server busy\n");
    assert_eq!(s.metric(&rejected("per_ip_limit")), 1.0);
    // Other clients behind the same balancer are not affected.
    for i in 0..2 {
        let mut c = s.connect();
        c.write_all(&v1(client(21))).unwrap();
        talk(&mut c, &format!("second client {i}"));
        held.push(c);
    }
    // The refused connection was never accepted: accepted = 4 = active.
    let text = s.assert_counters_add_up(4.0);
    assert_eq!(
        metric_value(&text, "sockpool_connections_accepted_total"),
        Some(4.0),
        "{text}"
    );
    drop(held);
    s.assert_counters_add_up(0.0);
    // Room again for the first client.
    proxied_once(&s, &v2(client(20)), "room again");
}

#[test]
fn counters_add_up_over_a_mix_of_good_bad_untrusted_and_refused() {
    let (s, _dir) = server(
        "max_connections_per_ip = 1\nproxy_trusted = [\"127.0.0.1/32\"]",
        "idle_timeout = \"2s\"",
    );
    let mut held = Vec::new();
    let (mut good, mut bad, mut untrusted, mut refused, mut connect_checks) = (0, 0, 0, 0, 0);
    for round in 0u8..6 {
        // Good, v1 and v2, each a new client; the first of each round stays open.
        let mut c = s.connect();
        c.write_all(&v1(client(100 + round))).unwrap();
        talk(&mut c, "good v1");
        good += 1;
        let mut d = s.connect();
        d.write_all(&v2(client(150 + round))).unwrap();
        talk(&mut d, "good v2");
        good += 1;
        drop(d);
        // Refused: the held client again (limit 1).
        let mut r = s.connect();
        r.write_all(&v2(client(100 + round))).unwrap();
        assert_eq!(read_until_closed(&mut r), b"ERROR server busy\n");
        refused += 1;
        held.push(c);
        // Bad header.
        let mut b = s.connect();
        b.write_all(b"PROXY TCP5 nonsense\r\n").unwrap();
        assert_eq!(read_until_closed(&mut b), b"");
        bad += 1;
        // Untrusted (a different loopback source).
        let mut u = connect_from(s.addr, Ipv4Addr::new(127, 0, 0, 5)).unwrap();
        u.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        assert_eq!(read_until_closed(&mut u), b"");
        untrusted += 1;
        // A bare TCP connect check: connect and close.
        drop(s.connect());
        connect_checks += 1;
    }
    // One that never sends a header (closed at idle_timeout).
    let mut silent = s.connect();
    assert_eq!(read_until_closed(&mut silent), b"");
    bad += 1;
    // The held connections end by idle_timeout or here, whichever is first (the
    // rounds may be slow on a busy machine): count them as closed either way.
    drop(held);
    let text = s.assert_counters_add_up(0.0);
    let accepted = good + bad + connect_checks;
    assert_eq!(
        metric_value(&text, "sockpool_connections_accepted_total"),
        Some(f64::from(accepted)),
        "{text}"
    );
    assert_eq!(
        metric_value(&text, &rejected("per_ip_limit")),
        Some(f64::from(refused))
    );
    assert_eq!(
        metric_value(&text, &rejected("untrusted_proxy")),
        Some(f64::from(untrusted))
    );
    assert_eq!(
        metric_value(&text, &closed("protocol_error")),
        Some(f64::from(bad))
    );
    assert_eq!(
        metric_value(&text, &closed("client_closed")).unwrap()
            + metric_value(&text, &closed("idle_timeout")).unwrap(),
        f64::from(good + connect_checks),
        "{text}"
    );
}

#[test]
fn without_proxy_protocol_a_header_is_just_data() {
    // The feature is off by default: the header is an ordinary line.
    let s = Server::start(&["--framing", "line"]);
    let mut c = s.connect();
    c.write_all(b"PROXY TCP4 192.0.2.1 10.0.0.1 1 2\r\n")
        .unwrap();
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\n") && c.read(&mut byte).unwrap() == 1 {
        got.push(byte[0]);
    }
    let got = String::from_utf8_lossy(&got);
    assert!(
        got.starts_with("Server received \"PROXY TCP4 192.0.2.1 10.0.0.1 1 2"),
        "{got:?}"
    );
}
