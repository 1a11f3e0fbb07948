//! A bounded background load of short clients, for the tests that restart a
//! server under traffic and count who was lost.

use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// The request every [`ping`] sends, and the reply it must get back.
pub const PING: &[u8] = b"ping\n";
pub const PONG: &[u8] = b"Server received \"ping\"\n";

/// Why one [`ping`] failed.
#[derive(Debug)]
pub enum PingError {
    /// Never connected (refused, or no answer to the SYN in time).
    Connect(std::io::Error),
    /// Connected, then reset, EOF, a wrong reply or no reply: what happened.
    Lost(String),
}

/// One client from source address `connect_spread(n)`: connects, sends [`PING`],
/// reads [`PONG`] whole, closes.
pub fn ping(addr: SocketAddr, n: u32, connect_timeout: Duration) -> Result<(), PingError> {
    let mut s = super::connect_spread(addr, n, connect_timeout).map_err(PingError::Connect)?;
    let lost = PingError::Lost;
    s.write_all(PING).map_err(|e| lost(format!("write: {e}")))?;
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    while got.len() < PONG.len() {
        match s.read(&mut buf) {
            Ok(0) => {
                return Err(lost(format!(
                    "EOF after {:?}",
                    String::from_utf8_lossy(&got)
                )))
            }
            Ok(k) => got.extend_from_slice(&buf[..k]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(lost(format!("read after {got:?}: {e}"))),
        }
    }
    if got != PONG {
        return Err(lost(format!("reply {:?}", String::from_utf8_lossy(&got))));
    }
    Ok(())
}

/// `threads` threads each running `client` again and again until [`Load::finish`]
/// or until `max` attempts in all: bounded in count, and in time by the caller.
/// The answers are counted as they come, so a test can wait for progress.
pub struct Load<E> {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
    threads: Vec<JoinHandle<(u64, Vec<E>)>>,
}

impl<E: Send + 'static> Load<E> {
    pub fn start(
        threads: usize,
        max: u32,
        client: impl Fn() -> Result<(), E> + Send + Sync + 'static,
    ) -> Load<E> {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let tried = Arc::new(AtomicU32::new(0));
        let client = Arc::new(client);
        let threads = (0..threads)
            .map(|_| {
                let (stop, answered, tried) = (stop.clone(), answered.clone(), tried.clone());
                let client = client.clone();
                std::thread::spawn(move || {
                    let (mut ok, mut errors) = (0, Vec::new());
                    while !stop.load(Ordering::Relaxed)
                        && tried.fetch_add(1, Ordering::Relaxed) < max
                    {
                        match client() {
                            Ok(()) => {
                                ok += 1;
                                answered.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => errors.push(e),
                        }
                    }
                    (ok, errors)
                })
            })
            .collect();
        Load {
            stop,
            answered,
            threads,
        }
    }

    /// Waits (bounded) until at least `n` clients have been answered.
    pub fn wait_answered(&self, n: u64) {
        super::wait_until(&format!("the load to reach {n} answers"), || {
            self.answered() >= n
        });
    }

    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }

    /// Stops the clients; returns how many were answered and every error.
    pub fn finish(self) -> (u64, Vec<E>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = (0, Vec::new());
        for t in self.threads {
            let (ok, errors) = t.join().expect("load thread");
            all.0 += ok;
            all.1.extend(errors);
        }
        all
    }
}
