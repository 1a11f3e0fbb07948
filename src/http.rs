//! The metrics sidecar (owned by the `http` helper; interface fixed here).
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

/// Renders the whole Prometheus text exposition into the buffer.
pub type RenderFn = Arc<dyn Fn(&mut String) + Send + Sync>;

/// Options for the sidecar.
#[derive(Clone, Debug)]
pub struct SidecarOptions {
    /// Bearer token required on `/metrics` (already trimmed), if any.
    pub bearer_token: Option<String>,
    /// Most sidecar connections open at once; the rest wait or are refused.
    pub max_connections: usize,
    /// A sidecar connection that does not finish its request in this time is closed.
    pub request_timeout: Duration,
}

impl Default for SidecarOptions {
    fn default() -> Self {
        SidecarOptions {
            bearer_token: None,
            max_connections: 64,
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// A running sidecar; `shutdown` stops it and joins its threads.
pub struct Sidecar {
    addr: SocketAddr,
}

impl Sidecar {
    /// Starts serving on an already bound listener.
    pub fn start(
        listener: TcpListener,
        _opts: SidecarOptions,
        _render: RenderFn,
        _ready: Arc<AtomicBool>,
    ) -> io::Result<Sidecar> {
        Ok(Sidecar {
            addr: listener.local_addr()?,
        })
    }

    /// The address it serves on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, closes every sidecar connection and joins every thread.
    pub fn shutdown(self) {}
}
