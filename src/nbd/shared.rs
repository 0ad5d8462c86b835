//! What the server and each of its connections share: the limits (`ServerConfig`), the export
//! source, the TLS credentials, the connection slots (established ones and those still in
//! their handshake, counted apart) and the shutdown switch every task listens to. Its own module
//! so that the server depends on the connection and both on this, never the connection on the
//! server.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{oneshot, watch, Semaphore};

use super::backend::ExportSource;
use super::tls::{TlsCredentials, TlsSettings};

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
    /// Clients served at once; more wait (within `handshake_timeout`) after their handshake.
    pub max_connections: usize,
    /// Requests being executed per connection; the connection stops reading past it.
    pub max_inflight_per_connection: usize,
    /// Read and write payload bytes held per connection (at least `max_request_bytes`). This,
    /// not `max_request_bytes`, bounds a connection's memory: a request waits for its bytes
    /// before its buffer is allocated, and buffers above 1 MiB are freed after use, not kept.
    pub max_inflight_bytes_per_connection: usize,
    /// Largest read or write one request may carry; advertised as the maximum block size.
    pub max_request_bytes: u32,
    /// Time a client has to finish its handshake (option negotiation, the TLS handshake, and
    /// waiting for a slot under `max_connections`).
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
    /// TLS: off, on or required, and where the credentials are.
    pub tls: TlsSettings,
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
            tls: TlsSettings::default(),
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
pub(super) struct ServerState {
    pub source: Arc<dyn ExportSource>,
    pub config: ServerConfig,
    /// `None` when TLS is off.
    pub tls: Option<Arc<TlsCredentials>>,
    /// Slots of established connections (`max_connections`); a connection takes one once its
    /// handshake is done.
    pub connections: Arc<Semaphore>,
    /// Connections still in their handshake, counted apart so that clients that connect and
    /// say nothing cannot take the slots of the ones being served.
    pub handshakes: Arc<HandshakeSlots>,
}

impl ServerState {
    pub fn new(
        source: Arc<dyn ExportSource>,
        config: ServerConfig,
        tls: Option<Arc<TlsCredentials>>,
    ) -> ServerState {
        ServerState {
            source,
            connections: Arc::new(Semaphore::new(config.max_connections)),
            handshakes: Arc::new(HandshakeSlots::new(config.max_connections)),
            config,
            tls,
        }
    }
}

/// Connections in their handshake, oldest first. When all slots are taken, a new connection
/// takes the slot of the oldest: a client that opens a connection and says nothing is cut off
/// (at the latest) when `limit` newer connections came after it, instead of keeping honest
/// clients from their greeting until `handshake_timeout`. An honest handshake takes a few
/// round trips, so it is rarely the oldest.
pub(super) struct HandshakeSlots {
    limit: usize,
    next_id: AtomicU64,
    waiting: Mutex<VecDeque<InHandshake>>,
}

struct InHandshake {
    id: u64,
    peer: String,
    /// Dropped to tell the connection it gave way.
    _evict: oneshot::Sender<()>,
}

/// A connection's place among those in their handshake; `evicted` resolves when it gave way
/// to a newer one. Dropping it frees the place.
pub(super) struct HandshakeSlot {
    slots: Arc<HandshakeSlots>,
    id: u64,
    pub evicted: oneshot::Receiver<()>,
}

impl HandshakeSlots {
    fn new(limit: usize) -> HandshakeSlots {
        HandshakeSlots {
            limit: limit.max(1),
            next_id: AtomicU64::new(0),
            waiting: Mutex::new(VecDeque::new()),
        }
    }

    /// A place for `peer`'s handshake, taken from the oldest one when none is free.
    pub fn enter(self: &Arc<Self>, peer: &str) -> HandshakeSlot {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (evict, evicted) = oneshot::channel();
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        if waiting.len() >= self.limit {
            if let Some(oldest) = waiting.pop_front() {
                tracing::warn!(
                    peer = %oldest.peer,
                    limit = self.limit,
                    "too many connections in their handshake: dropping the oldest"
                );
            }
        }
        waiting.push_back(InHandshake {
            id,
            peer: peer.to_owned(),
            _evict: evict,
        });
        HandshakeSlot {
            slots: Arc::clone(self),
            id,
            evicted,
        }
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut waiting = self.slots.waiting.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(at) = waiting.iter().position(|w| w.id == self.id) {
            waiting.remove(at);
        }
    }
}

/// Resolves once shutdown is requested (or the server is gone).
pub(super) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_handshake_table_drops_its_oldest_entry_and_frees_places_on_drop() {
        let slots = Arc::new(HandshakeSlots::new(2));
        let mut first = slots.enter("a");
        let mut second = slots.enter("b");
        let empty = Err(oneshot::error::TryRecvError::Empty);
        assert_eq!(first.evicted.try_recv(), empty);
        let mut third = slots.enter("c");
        // The oldest gave way; the others keep their places.
        assert_eq!(
            first.evicted.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        );
        assert_eq!(
            second.evicted.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        );
        // A place given up is free again: nobody is pushed out by the next one.
        drop(second);
        let mut fourth = slots.enter("d");
        assert_eq!(
            third.evicted.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        );
        assert_eq!(
            fourth.evicted.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        );
        drop(first);
        let waiting = slots.waiting.lock().unwrap();
        let peers: Vec<&str> = waiting.iter().map(|w| w.peer.as_str()).collect();
        assert_eq!(peers, ["c", "d"]);
    }
}
