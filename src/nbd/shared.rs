//! What the server and each of its connections share: the limits (`ServerConfig`), the export
//! source, and the shutdown switch every task listens to. Its own module so that the server
//! depends on the connection and both on this, never the connection on the server.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Semaphore};

use super::backend::ExportSource;

/// Longest busy-poll window: above the wake-up latency of an idle virtual CPU (tens of
/// microseconds), so that a one-request-at-a-time client is caught by the poll.
pub const DEFAULT_BUSY_POLL_MAX: Duration = Duration::from_micros(100);

/// The default largest read or write one request may carry: what nbd-server and nbdkit take,
/// so that clients which never see the advertised maximum (`NBD_OPT_EXPORT_NAME`) and send
/// up to that much are served. Memory stays bounded by
/// `max_inflight_bytes_per_connection`, not by this.
pub const DEFAULT_MAX_REQUEST_BYTES: u32 = 64 << 20;

/// The default number of clients served at once (`server.max_connections`).
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;

/// The default number of requests a connection may have in flight
/// (`server.max_inflight_per_connection`).
pub const DEFAULT_MAX_INFLIGHT_PER_CONNECTION: usize = 64;

/// Limits of the server. `Default` gives the shipped config's values.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Clients served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// Requests being executed per connection; the connection stops reading past it.
    pub max_inflight_per_connection: usize,
    /// Read and write payload bytes held per connection (at least `max_request_bytes`). This,
    /// not `max_request_bytes`, bounds a connection's memory: a request waits for its bytes
    /// before its buffer is allocated, and buffers above 1 MiB are freed after use, not kept.
    pub max_inflight_bytes_per_connection: usize,
    /// Largest read or write one request may carry; advertised as the maximum block size.
    pub max_request_bytes: u32,
    /// Time a client has to finish option negotiation.
    pub handshake_timeout: Duration,
    /// On shutdown, how long a connection may take to send the replies of requests already
    /// accepted (a client that does not read them would otherwise hold shutdown up forever).
    pub shutdown_grace: Duration,
    /// Longest a connection polls for the next request before it sleeps (adaptive; zero never
    /// polls). Spends CPU to save the wake-up latency of clients that send one request at a time.
    pub busy_poll_max: Duration,
    /// Each connection on a thread of its own (a single-threaded runtime) instead of the
    /// shared worker pool. Keeps a connection's reader, reply writer and the socket's wake-ups
    /// on one thread, as nbdkit's thread per connection does: with two clients
    /// sending one request at a time, the shared pool's workers traded their tasks and ran
    /// 2-3x slower. Costs a thread (and its blocking pool) per client.
    pub thread_per_connection: bool,
}

/// The `[server]` keys at the values of the shipped `config/thinnbd.toml` (the config's tests
/// hold them equal); the other limits are not in the config file.
impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_inflight_per_connection: DEFAULT_MAX_INFLIGHT_PER_CONNECTION,
            max_inflight_bytes_per_connection: 128 << 20,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            handshake_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(30),
            busy_poll_max: DEFAULT_BUSY_POLL_MAX,
            thread_per_connection: true,
        }
    }
}

impl ServerConfig {
    /// The same config with every limit raised to something the server can work with.
    pub(super) fn sane(mut self) -> Self {
        self.max_connections = self.max_connections.max(1);
        self.max_inflight_per_connection = self.max_inflight_per_connection.max(1);
        self.max_request_bytes = self.max_request_bytes.max(512);
        let min_bytes = self.max_request_bytes as usize;
        self.max_inflight_bytes_per_connection = self
            .max_inflight_bytes_per_connection
            .clamp(min_bytes, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
        self
    }
}

/// What every connection shares.
pub(super) struct Shared {
    pub source: Arc<dyn ExportSource>,
    pub config: ServerConfig,
}

/// Resolves once shutdown is requested (or the server is gone).
pub(super) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
