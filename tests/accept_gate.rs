//! The listener's one-shot arming (`src/server/gate.rs`) loses no connection: short
//! connections in bursts separated by pauses of every length (none, a few µs, up
//! to 20 ms), so that the workers fall asleep and wake up in every phase of the
//! hand-off between them and the acceptor, while a few connections stay open and
//! connections over the per-IP limit are rejected by the acceptor alone (batches
//! that wake no worker). Every connection must be answered.
//!
//! The refused connections matter most: a batch that hands a connection to a
//! worker is always followed by that worker re-arming the listener before it
//! sleeps, so short connections alone never lose an arming even when the
//! acceptor's own arming (`Acceptor::hand_back_listener`) or the worker's arming
//! after `park` is removed; a batch of refusals wakes nobody, and only those two
//! armings keep the listener alive after it. (Checked by removing each: with both
//! kinds of load this test fails; with short connections alone it passes.)
//!
//! A lost arming (the listener disarmed, every thread asleep) leaves the next
//! connection in the kernel's accept queue forever: its client waits for a reply
//! for [`WAIT`] (20 s) and the test fails naming it. Nothing here is timed
//! otherwise: a slow machine only makes it slower.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::{ack, connect_from, end_case, heavy, read_exact_bytes, spread_source, Server, WAIT};

/// Client threads making short connections, and connections each makes.
const CLIENTS: u32 = 4;
const CONNECTIONS_PER_CLIENT: u32 = 300;
/// Connections open for the whole run, quiet in between (a message would wake a
/// worker, which re-arms the listener and so would hide a lost arming).
const HELD: u32 = 3;
/// Threads making connections refused for the per-IP limit (one connection from
/// each one's address is held open, and the limit is 1), and connections each
/// makes. Two, so that a refused connection often arrives while the other waits
/// for its answer, and at any moment of a worker's loop.
const REJECTERS: u32 = 2;
const REJECTED_PER_REJECTER: u32 = 200;

/// The source address of a rejecter's connections: 127.63.0.R+1, outside the
/// churn's 127.64.0.0/10.
fn rejected_source(rejecter: u32) -> Ipv4Addr {
    Ipv4Addr::new(127, 63, 0, 1 + rejecter as u8)
}

/// Numbers the source addresses ([`spread_source`]): one per connection over both
/// cases, so that no address is ever over the per-IP limit of 1 (a closed
/// connection's slot is freed when the server notices the close, after the client
/// has moved on).
static NEXT_SOURCE: AtomicU32 = AtomicU32::new(0);

/// A connection from the next unused source address; returns it and its number.
fn connect_next(addr: SocketAddr) -> (TcpStream, u32) {
    let n = NEXT_SOURCE.fetch_add(1, Ordering::Relaxed);
    let c = connect_from(addr, spread_source(n))
        .unwrap_or_else(|e| panic!("connect from {} (source #{n}): {e}", spread_source(n)));
    (c, n)
}

#[test]
fn one_worker_answers_every_connection() {
    run_case(1);
}

#[test]
fn three_workers_answer_every_connection() {
    run_case(3);
}

fn run_case(workers: u32) {
    let _turn = heavy();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gate.toml");
    std::fs::write(
        &config,
        "[server]\nlisten = \"127.0.0.1:0\"\nmax_connections_per_ip = 1\n\
         [connection]\nframing = \"line\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let workers_arg = workers.to_string();
    let server = Server::start(&[
        "--config",
        config.to_str().unwrap(),
        "--workers",
        &workers_arg,
    ]);
    let addr = server.addr;

    let mut held: Vec<TcpStream> = (0..HELD)
        .map(|k| {
            let (mut c, _) = connect_next(addr);
            talk(
                &mut c,
                &format!("held {k}"),
                &format!("held connection {k}"),
            );
            c
        })
        .collect();
    let mut holders: Vec<TcpStream> = (0..REJECTERS)
        .map(|r| {
            let from = rejected_source(r);
            let mut c =
                connect_from(addr, from).unwrap_or_else(|e| panic!("connect from {from}: {e}"));
            talk(
                &mut c,
                &format!("holder {r}"),
                &format!("the connection from {from}"),
            );
            c
        })
        .collect();

    std::thread::scope(|s| {
        for client in 0..CLIENTS {
            s.spawn(move || churn(addr, workers, client));
        }
        for rejecter in 0..REJECTERS {
            s.spawn(move || rejects(addr, workers, rejecter));
        }
    });

    for (k, c) in held.iter_mut().enumerate() {
        talk(
            c,
            &format!("held {k}, still"),
            &format!("held connection {k}"),
        );
    }
    for (r, c) in holders.iter_mut().enumerate() {
        let what = format!("the connection from {}", rejected_source(r as u32));
        talk(c, &format!("holder {r}, still"), &what);
    }
    let made = CLIENTS * CONNECTIONS_PER_CLIENT + HELD + REJECTERS;
    // Counted before the hand-off, so final once every reply has come.
    assert_eq!(
        server.metric("sockpool_connections_accepted_total"),
        f64::from(made),
        "workers={workers}"
    );
    assert_eq!(
        server.metric("sockpool_connections_rejected_total{reason=\"per_ip_limit\"}"),
        f64::from(REJECTERS * REJECTED_PER_REJECTER),
        "workers={workers}"
    );
    drop((held, holders));
    end_case(&server, 0.0);
}

/// One client thread: short connections, each from a source address of its own:
/// connect, one line, its full reply, close.
fn churn(addr: SocketAddr, workers: u32, client: u32) {
    let mut rng = 0x9e37_79b9_7f4a_7c15_u64 ^ u64::from(client * 7919 + workers);
    for i in 0..CONNECTIONS_PER_CLIENT {
        pause(&mut rng);
        let (mut c, n) = connect_next(addr);
        talk(
            &mut c,
            &format!("client {client} connection {i}"),
            &format!("workers={workers} client {client} connection {i} (source #{n})"),
        );
    }
}

/// Connections over the per-IP limit: the acceptor answers them itself (the busy
/// message, then close) and hands nothing to any worker.
fn rejects(addr: SocketAddr, workers: u32, rejecter: u32) {
    let mut rng = 0x2545_f491_4f6c_dd1d_u64 ^ u64::from(rejecter * 104_729 + workers);
    let from = rejected_source(rejecter);
    for i in 0..REJECTED_PER_REJECTER {
        pause(&mut rng);
        let mut c = connect_from(addr, from).unwrap_or_else(|e| {
            panic!("workers={workers} rejecter {rejecter} connection {i}: connect: {e}")
        });
        c.set_read_timeout(Some(WAIT)).unwrap();
        let mut got = Vec::new();
        if let Err(e) = c.read_to_end(&mut got) {
            panic!(
                "workers={workers} rejecter {rejecter} connection {i}: not answered and closed within \
                 {WAIT:?} ({e}; got {:?}): left in the accept queue, the listener never re-armed",
                String::from_utf8_lossy(&got)
            );
        }
        assert_eq!(
            String::from_utf8_lossy(&got),
            "ERROR server busy\n",
            "workers={workers} rejecter {rejecter} connection {i}"
        );
    }
}

/// Sends `line` and waits (up to [`WAIT`]) for its whole reply.
fn talk(c: &mut TcpStream, line: &str, what: &str) {
    c.set_read_timeout(Some(WAIT)).unwrap();
    c.write_all(format!("{line}\n").as_bytes())
        .unwrap_or_else(|e| panic!("{what}: send: {e}"));
    let want = ack(line);
    let got = read_exact_bytes(c, want.len());
    assert!(
        got == want,
        "{what}: no full reply within {WAIT:?} (got {:?}): left in the accept queue, the \
         listener never re-armed?",
        String::from_utf8_lossy(&got)
    );
}

/// A pause before the next connection, drawn from `rng`: none (a burst), a few
/// µs of spinning (a worker still running its turn), ~0.1 ms (a worker between
/// its last look and its sleep), or 1-20 ms (every worker asleep).
fn pause(rng: &mut u64) {
    *rng = rng
        .wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add(1_442_695_040_888_963_407);
    let r = (*rng >> 33) as u32;
    let spread = u64::from(r >> 4);
    match r % 16 {
        0..=5 => {}
        6..=8 => {
            let until = Instant::now() + Duration::from_micros(2 + spread % 9);
            while Instant::now() < until {
                std::hint::spin_loop();
            }
        }
        9..=10 => std::thread::sleep(Duration::from_micros(50 + spread % 150)),
        11..=13 => std::thread::sleep(Duration::from_micros(1_000 + spread % 2_000)),
        14 => std::thread::sleep(Duration::from_micros(5_000 + spread % 5_000)),
        _ => std::thread::sleep(Duration::from_millis(20)),
    }
}
