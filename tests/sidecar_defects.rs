//! Regression tests for the metrics sidecar defects of issue 9, against the real
//! binary over loopback. Each failed on the code before the fix (the relay that
//! stopped reading at 64 KiB, the front that forwarded client bytes, the token
//! check that let non-ASCII through).

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::thread;
use std::time::Duration;

use common::{run, Server};
use socket2::{Domain, Socket, Type};

/// A connection to `to` from source address 127.0.`a`.`b`: connection churn
/// spread over 127.0.0.0/8 leaves no pile of TIME_WAIT ports on 127.0.0.1.
fn connect_from(a: u8, b: u8, to: SocketAddr) -> TcpStream {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    let from = SocketAddrV4::new(Ipv4Addr::new(127, 0, a, b), 0);
    socket
        .bind(&from.into())
        .expect("bind a loopback source address");
    socket.connect(&to.into()).expect("connect");
    let s: TcpStream = socket.into();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
    s
}

/// Everything until EOF (a timeout is an error: the answer stalled).
fn exchange(s: &mut TcpStream, request: &[u8]) -> Result<Vec<u8>, String> {
    // The server may refuse before reading it all; what it answered still counts.
    let _ = s.write_all(request);
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .map_err(|e| format!("after {} bytes: {e}", raw.len()))?;
    Ok(raw)
}

fn status_lines(raw: &[u8]) -> usize {
    raw.windows(9)
        .filter(|w| w == b"HTTP/1.1 " || w == b"HTTP/1.0 ")
        .count()
}

/// The body of a whole 200 answer, checked against its framing.
fn whole_body(raw: &[u8]) -> Result<String, String> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no head in {} bytes", raw.len()))?;
    if !head.starts_with("HTTP/1.1 200 ") {
        return Err(format!("status line {:?}", head.lines().next()));
    }
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .ok_or("no Content-Length")?;
    if body.len() != length {
        return Err(format!("{} of {length} body bytes", body.len()));
    }
    Ok(body.to_owned())
}

/// Defect 1: with `--workers 1024`, `/metrics` is about 100 KB, and scrapes
/// stopped at 65,370 bytes (the relay read only while its buffer had room, on
/// edge-triggered sockets). 20 at once, 10 times: every one arrives whole.
#[test]
fn regression_twenty_concurrent_100_kb_scrapes_all_arrive_whole() {
    let server = Server::start(&["--workers", "1024"]);
    let addr = server.metrics_addr.expect("metrics");
    let size = server.scrape().len();
    assert!(size > 90_000, "/metrics is only {size} bytes");
    for round in 0..10u8 {
        let scrapes: Vec<_> = (0..20u8)
            .map(|i| {
                thread::spawn(move || {
                    let mut s = connect_from(100 + round, 2 + i, addr);
                    let raw = exchange(&mut s, b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")?;
                    let body = whole_body(&raw)?;
                    if !body.contains("sockpool_worker_busy_seconds_total{worker=\"1023\"}") {
                        return Err("the last worker's series is missing".to_owned());
                    }
                    Ok(body.len())
                })
            })
            .collect();
        for (i, s) in scrapes.into_iter().enumerate() {
            match s.join().expect("scraper thread") {
                Ok(n) => assert!(n > 90_000, "round {round} scrape {i}: {n} bytes"),
                Err(e) => panic!("round {round} scrape {i}: {e}"),
            }
        }
    }
}

/// Defect 2: the front split header lines on `\n`, tiny_http on `\r\n` only, so
/// a bare LF smuggled a second request past the front: a 404 and then a 200 on
/// one connection. Now: one 400 and nothing else.
#[test]
fn regression_a_bare_lf_smuggles_no_second_request() {
    let server = Server::start(&["--workers", "1"]);
    let addr = server.metrics_addr.expect("metrics");
    let smuggle: &[u8] = b"GET /nope HTTP/1.1\r\nHost: x\r\nX-A: a\nContent-Length: 36\r\n\r\nGET /-/healthy HTTP/1.1\r\nHost: y\r\n\r\n";
    let raw = exchange(&mut connect_from(0, 21, addr), smuggle).expect("answer");
    assert_eq!(status_lines(&raw), 1, "{}", String::from_utf8_lossy(&raw));
    assert!(
        raw.starts_with(b"HTTP/1.1 400 "),
        "{}",
        String::from_utf8_lossy(&raw)
    );

    // A smuggled method with an escape byte never reaches tiny_http either.
    let escape: &[u8] =
        b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\nContent-Length: 25\r\n\r\nG\x1b[0mT / HTTP/1.1\r\n\r\n";
    let raw = exchange(&mut connect_from(0, 22, addr), escape).expect("answer");
    assert_eq!(status_lines(&raw), 1, "{}", String::from_utf8_lossy(&raw));
    assert!(raw.starts_with(b"HTTP/1.1 400 "));
    server.scrape();
}

/// Defect 2, the body form: a 16 KB body of `GET / HTTP/1.1\r\n\r\n` got 889
/// answers on one connection. A body is refused, and one answer is all there is.
#[test]
fn regression_a_body_of_requests_gets_one_answer() {
    let server = Server::start(&["--workers", "1"]);
    let addr = server.metrics_addr.expect("metrics");
    let body = b"GET / HTTP/1.1\r\n\r\n".repeat(16 * 1024 / 18);
    for method in ["GET", "POST"] {
        let mut request = format!(
            "{method} / HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(&body);
        let raw = exchange(&mut connect_from(0, 23, addr), &request).expect("answer");
        assert_eq!(status_lines(&raw), 1, "{method}: {} bytes back", raw.len());
        assert!(raw.starts_with(b"HTTP/1.1 400 "), "{method}");
    }
    // Pipelined requests without a body: the first is answered, the rest dropped.
    let raw = exchange(&mut connect_from(0, 24, addr), &body).expect("answer");
    assert_eq!(status_lines(&raw), 1);
    assert!(raw.starts_with(b"HTTP/1.1 200 "));
}

/// Defect 4: a bearer token tiny_http can never match (non-ASCII) passed
/// `check-config`, and every request with an Authorization header got a 502.
#[test]
fn regression_a_token_that_is_not_token68_is_a_config_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    // `check-config` of a file whose bearer token file holds `contents`.
    let check = |name: &str, contents: &str| {
        let token_file = dir.path().join(format!("token-{name}"));
        std::fs::write(&token_file, contents).unwrap();
        let config = dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "[metrics]\nbearer_token_file = {:?}\n",
                token_file.display().to_string()
            ),
        )
        .unwrap();
        run(&["check-config", config.to_str().unwrap()])
    };
    for (i, token) in [
        "t\u{f6}k\u{e9}n",
        "tab\tinside",
        "bell\u{7}",
        "sp ace",
        "a\"b",
        "=abc",
    ]
    .into_iter()
    .enumerate()
    {
        let out = check(&format!("bad-{i}"), &format!("{token}\n"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{token:?}: {stderr}");
        assert!(
            stderr.contains("metrics.bearer_token_file"),
            "{token:?}: {stderr}"
        );
    }
    let out = check("good", "  Az09-._~+/==\n");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
