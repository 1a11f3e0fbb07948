//! The wire protocols over real sockets: ack (read and line framing) and echo,
//! half-close, pipelining, the line limit, and 64 MiB of echo with nothing lost.

mod common;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::time::Duration;

use common::{read_exact_bytes, read_to_eof, Server};

#[test]
fn ack_read_framing_answers_each_chunk_like_the_tutorial() {
    let server = Server::start(&["--no-metrics"]);
    let mut c = server.connect();
    for (send, want) in [
        (&b"hi"[..], &b"Server received \"hi\""[..]),
        (b"hi\r\n", b"Server received \"hi\"\n"),
        (b"\xff\x00bytes", b"Server received \"\xff\x00bytes\""),
    ] {
        c.write_all(send).unwrap();
        assert_eq!(read_exact_bytes(&mut c, want.len()), want);
    }
}

#[test]
fn line_framing_pipelines_in_order_and_answers_a_final_partial_line() {
    let server = Server::start(&["--no-metrics", "--framing", "line"]);
    let mut c = server.connect();
    let mut sent = Vec::new();
    let mut want = Vec::new();
    for i in 0..1000 {
        sent.extend_from_slice(format!("msg {i}\r\n").as_bytes());
        want.extend_from_slice(format!("Server received \"msg {i}\"\n").as_bytes());
    }
    sent.extend_from_slice(b"\n\x00\xfe\ntail");
    want.extend_from_slice(
        b"Server received \"\"\nServer received \"\x00\xfe\"\nServer received \"tail\"",
    );
    c.write_all(&sent).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_eof(&mut c), want);
}

#[test]
fn line_too_long_gets_an_error_and_a_graceful_close() {
    let server = Server::start(&["--framing", "line", "--max-line-bytes", "16"]);
    let mut c = server.connect();
    c.write_all(b"short\n0123456789abcdef0\n").unwrap();
    // The reply and the error arrive, then EOF (not a reset), although we never
    // closed our side.
    assert_eq!(
        read_to_eof(&mut c),
        b"Server received \"short\"\nERROR line too long\n"
    );
    server.wait_metric(
        "sockpool_connections_closed_total{reason=\"protocol_error\"}",
        |v| v == 1.0,
    );
    server.assert_counters_add_up(0.0);
}

#[test]
fn half_close_gets_every_reply_in_every_mode() {
    let payload: Vec<u8> = (0..200_000u32)
        .map(|i| b"abcdefgh\n"[(i % 9) as usize])
        .collect();
    for (args, reply_len) in [
        (&["--mode", "echo"][..], payload.len()),
        // 22,222 full lines, then "ab" answered at EOF without a newline.
        (
            &["--framing", "line"][..],
            payload.len() / 9 * (17 + 8 + 2) + 17 + 2 + 1,
        ),
    ] {
        let mut all = vec!["--no-metrics"];
        all.extend_from_slice(args);
        let server = Server::start(&all);
        let mut c = server.connect();
        c.write_all(&payload).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let got = read_to_eof(&mut c);
        assert_eq!(got.len(), reply_len, "{args:?}");
        if args[1] == "echo" {
            assert!(got == payload);
        }
    }
    // read framing: chunking is up to the kernel, but every byte is acknowledged.
    let server = Server::start(&["--no-metrics"]);
    let mut c = server.connect();
    c.write_all(b"last words").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_eof(&mut c), b"Server received \"last words\"");
}

#[test]
fn echo_64_mib_with_concurrent_reads_comes_back_exactly() {
    const TOTAL: usize = 64 << 20;
    let server = Server::start(&["--mode", "echo", "--workers", "2"]);
    let c = server.connect();
    let mut writer = c.try_clone().unwrap();
    let pattern = |i: usize| (i.wrapping_mul(31) % 251) as u8;
    let sender = std::thread::spawn(move || {
        let mut chunk = vec![0u8; 1 << 16];
        let mut sent = 0;
        while sent < TOTAL {
            for (j, b) in chunk.iter_mut().enumerate() {
                *b = pattern(sent + j);
            }
            writer.write_all(&chunk).unwrap();
            sent += chunk.len();
        }
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let mut reader = c;
    reader
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut buf = vec![0u8; 1 << 16];
    let mut got = 0;
    loop {
        let n = reader.read(&mut buf).expect("read echo");
        if n == 0 {
            break;
        }
        for (j, &b) in buf[..n].iter().enumerate() {
            assert_eq!(b, pattern(got + j), "byte {} differs", got + j);
        }
        got += n;
    }
    sender.join().unwrap();
    assert_eq!(got, TOTAL);
    server.wait_metric("sockpool_sent_bytes_total", |v| v == TOTAL as f64);
    assert_eq!(server.metric("sockpool_received_bytes_total"), TOTAL as f64);
    server.assert_counters_add_up(0.0);
}

#[test]
fn final_line_over_the_limit_at_eof_gets_the_error_and_counts_as_protocol_error() {
    let server = Server::start(&["--framing", "line", "--max-line-bytes", "8"]);
    let mut c = server.connect();
    // Eight bytes and a `\r` fit while a `\n` may follow; at EOF the `\r` is content.
    c.write_all(b"ok\n12345678\r").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    assert_eq!(
        read_to_eof(&mut c),
        b"Server received \"ok\"\nERROR line too long\n"
    );
    server.wait_metric(
        "sockpool_connections_closed_total{reason=\"protocol_error\"}",
        |v| v == 1.0,
    );
    server.assert_counters_add_up(0.0);
}
