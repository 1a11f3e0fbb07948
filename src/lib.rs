//! sockpool: a fixed-worker-pool TCP server with Prometheus metrics.
#![forbid(unsafe_code)]

pub mod bench;
pub mod client;
pub mod config;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod protocol;
pub mod server;
