//! Abuse of the metrics port against the real binary: idle floods, huge headers,
//! garbage, wrong methods and paths. The main port must be unaffected throughout
//! and the metrics endpoint must recover.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{http_request, read_exact_bytes, Server};

/// The main port answers a fresh client correctly.
fn main_port_serves(server: &Server) {
    let mut c = server.connect();
    c.write_all(b"main port?\n").unwrap();
    assert_eq!(
        read_exact_bytes(&mut c, 29),
        b"Server received \"main port?\"\n"
    );
}

/// Sends raw bytes to the metrics port and returns whatever comes back before EOF
/// (write errors are fine: the sidecar may cut a client off mid-request).
fn raw_metrics(server: &Server, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(server.metrics_addr.unwrap()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn metrics_port_abuse_leaves_the_main_port_alone_and_the_endpoint_recovers() {
    let server = Server::start(&["--workers", "1"]);
    let metrics = server.metrics_addr.unwrap();
    server.scrape();
    let threads_before = server.threads();

    // 1,000 idle connections to the metrics port.
    let idle: Vec<TcpStream> = (0..1000)
        .map(|_| TcpStream::connect(metrics).unwrap())
        .collect();
    main_port_serves(&server);
    let (status, _, body) = http_request(metrics, "GET", "/metrics", &[]);
    assert_eq!(status, 200, "a scrape must get through 1,000 idle clients");
    assert!(body.contains("sockpool_connections_accepted_total"));
    assert!(
        server.threads() <= threads_before + 8,
        "idle metrics clients must not cost threads: {} -> {}",
        threads_before,
        server.threads()
    );

    // A 1 MiB header is refused without taking anything down.
    let mut huge = b"GET /metrics HTTP/1.1\r\nX-Big: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 1 << 20));
    huge.extend_from_slice(b"\r\n\r\n");
    let answer = raw_metrics(&server, &huge);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{answer:.200}"
    );
    main_port_serves(&server);

    // Garbage request lines get an error or a close, never a crash.
    for garbage in [
        &b"\x00\xff\xfe garbage\r\n\r\n"[..],
        b"GET\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"\r\n\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
    ] {
        let answer = raw_metrics(&server, garbage);
        assert!(
            answer.is_empty()
                || answer.starts_with("HTTP/1.1 4")
                || answer.starts_with("HTTP/1.0 4"),
            "{garbage:?} -> {answer:.200}"
        );
    }
    main_port_serves(&server);

    // Wrong methods and paths.
    assert_eq!(http_request(metrics, "POST", "/metrics", &[]).0, 405);
    assert_eq!(http_request(metrics, "DELETE", "/", &[]).0, 405);
    assert_eq!(http_request(metrics, "GET", "/nope", &[]).0, 404);
    assert_eq!(http_request(metrics, "GET", "/-/healthy", &[]).0, 200);

    // The flood goes away; the endpoint and the main port are fine.
    drop(idle);
    let (status, _, _) = http_request(metrics, "GET", "/metrics", &[]);
    assert_eq!(status, 200);
    main_port_serves(&server);
    server.assert_counters_add_up(0.0);
}
