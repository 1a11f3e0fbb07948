//! sockpool: a fixed-worker-pool TCP server with Prometheus metrics.
//!
//! It keeps the protocol of a classic Python socket tutorial (every message is
//! answered with `Server received "<data>"`) and fixes its faults: a reset client
//! is counted and logged instead of crashing the server, and a client that never
//! closes is closed after `idle_timeout` instead of holding the server forever.
//!
//! # Layout
//!
//! - [`config`]: `Config`, built-in defaults, the TOML file and flags, validation,
//!   all driven by one table of keys. The only reader of config files.
//! - [`protocol`]: sans-I/O codecs (ack with read or line framing, echo): bytes in,
//!   replies out. No sockets, no clocks, no metrics; unit-, property- and
//!   fuzz-tested.
//!   - [`protocol::proxy`]: the PROXY protocol v1/v2 header a balancer puts first
//!     (parsed by `ppp`, framed and bounded here): "need more" is `Ok(None)`, the
//!     header's end is where the codec's bytes begin.
//! - [`server`]: `start(config)` binds and spawns everything; shutdown ordering.
//!   - `server::acceptor`: the accept thread: admission, least-loaded worker,
//!     hand-off over a bounded crossbeam channel, wake-ups only for parked workers
//!     (batched), accept-error back-off.
//!   - `server::gate`: the listener's one-shot arming in the acceptor's epoll:
//!     while every worker is busy, connections wait in the accept queue and the
//!     first worker about to sleep re-arms it, so the acceptor never preempts a
//!     running worker to take one connection.
//!   - [`server::admission`]: `max_connections` and the per-IP table as a
//!     `Permit` taken at accept, carried in the hand-off and the connection, and
//!     released on drop.
//!   - `server::listen`: the listening sockets: binding (SO_REUSEPORT), systemd
//!     socket activation, and the SYN-dropping filter that lets the last accepts
//!     empty the queue before the close.
//!   - `server::worker`: one worker thread: its mio `Poll`, its connections, their
//!     timers, the read buffer they share.
//!   - [`server::conn`]: one connection: bytes owed, flow control (memory bounded
//!     by `max_pending_write_bytes` in every mode), deadlines, how it ends.
//! - [`metrics`]: every metric defined once; per-worker counters summed at scrape
//!   time by a `prometheus` crate `Collector`; `metrics::process`: `process_*`
//!   figures from /proc (the one /proc parser) and the RLIMIT_NOFILE helper.
//! - [`http`]: the tiny_http sidecar (`/metrics`, `/-/healthy`, `/-/ready`, `/`),
//!   kept on a short leash so it can never take the main service down: a strict
//!   front (`http::request`, sans-I/O) that sends tiny_http one canonical request.
//! - [`logging`]: log + simplelog set-up, rate-limited warnings, escaping client
//!   bytes.
//! - [`notify`]: systemd readiness (`READY=1`, `STOPPING=1` to `$NOTIFY_SOCKET`).
//! - [`client`]: `sockpool client`, the tutorial's interactive client done right.
//! - [`mod@bench`]: `sockpool bench`, the load generator.
//!
//! # Threads
//!
//! ```text
//!  clients ──▶ acceptor ──(bounded channel + mio Waker)──▶ worker-0 … worker-N-1
//!                 │ ◀──── re-arms the listener (gate) ───────┤  before sleeping,
//!                 │                                          │  one mio Poll each,
//!                 │                                          │  many connections each
//!                 └──────────────▶ Metrics (atomics) ◀───────┘
//!                                      ▲
//!  Prometheus ──▶ metrics-http ────────┘  (reads only; bounded, see `http`)
//!  SIGTERM/SIGINT ──▶ signals ──▶ Trigger: ready = false, wake the acceptor
//! ```
//!
//! Data flows one way: acceptor → worker → protocol, each reporting to metrics.
//! Shutdown is a chain of dropped senders and deliberate wake-ups (see [`server`]).
#![forbid(unsafe_code)]

pub mod bench;
pub mod client;
pub mod config;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod protocol;
pub mod server;
