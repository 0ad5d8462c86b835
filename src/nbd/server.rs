//! The NBD server: listeners, the connection cap, and graceful shutdown.
//!
//! One accept task per listener; each accepted client becomes a connection (`connection`) on a
//! thread of its own by default (see `ServerConfig::thread_per_connection`). It holds a place
//! among the connections in their handshake until it has taken a slot under
//! `max_connections` (see `shared::HandshakeSlots`). Shutdown is a watch channel
//! every task listens to; `serve` returns once every connection task has dropped its handle on
//! the `done` channel (the mini-redis pattern).

use std::future::Future;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, ToSocketAddrs, UnixListener};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::{info, warn};

use super::backend::ExportSource;
use super::connection;
use super::shared::{stopped, HandshakeSlot, ServerConfig, ServerState};
use super::tls::TlsCredentials;

/// A bound socket the server accepts clients on.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    /// Binds a TCP listener (use port 0 for a free port). Needs a tokio runtime.
    pub async fn bind_tcp(addr: impl ToSocketAddrs) -> io::Result<Self> {
        Ok(Listener::Tcp(TcpListener::bind(addr).await?))
    }

    /// Binds a unix socket at `path` (which must not exist). Needs a tokio runtime.
    pub fn bind_unix(path: &Path) -> io::Result<Self> {
        Ok(Listener::Unix(UnixListener::bind(path)?))
    }

    /// The TCP port, for a TCP listener.
    pub fn port(&self) -> Option<u16> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok().map(|a| a.port()),
            Listener::Unix(_) => None,
        }
    }

    /// A printable address, for logs.
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => match l.local_addr() {
                Ok(a) => format!("tcp:{a}"),
                Err(_) => "tcp:?".to_owned(),
            },
            Listener::Unix(l) => match l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(Path::to_owned))
            {
                Some(p) => format!("unix:{}", p.display()),
                None => "unix:?".to_owned(),
            },
        }
    }
}

/// Serves NBD on every listener until `shutdown` resolves, then stops accepting, lets
/// in-flight requests finish and send their replies, closes the connections and returns.
pub async fn serve(
    listeners: Vec<Listener>,
    source: Arc<dyn ExportSource>,
    config: ServerConfig,
    shutdown: impl Future<Output = ()>,
) {
    serve_with_tls(listeners, source, config, None, shutdown).await
}

/// `serve` with TLS credentials (`None`: TLS off); their mode says whether TLS is optional or
/// required.
pub async fn serve_with_tls(
    listeners: Vec<Listener>,
    source: Arc<dyn ExportSource>,
    config: ServerConfig,
    tls: Option<Arc<TlsCredentials>>,
    shutdown: impl Future<Output = ()>,
) {
    let config = config.sane();
    let (stop_tx, stop_rx) = watch::channel(false);
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    let shared = Arc::new(ServerState::new(source, config, tls));

    let mut accepters = JoinSet::new();
    for listener in listeners {
        info!(listener = %listener.describe(), "listening");
        accepters.spawn(accept_loop(
            listener,
            Arc::clone(&shared),
            stop_rx.clone(),
            done_tx.clone(),
        ));
    }
    drop(done_tx);

    shutdown.await;
    info!("shutting down: no new clients, finishing in-flight requests");
    // Receivers live in the tasks; a send error only means none is left.
    let _ = stop_tx.send(true);
    while accepters.join_next().await.is_some() {}
    // recv() yields None once every connection task has dropped its sender.
    let _ = done_rx.recv().await;
    info!("server stopped");
}

async fn accept_loop(
    listener: Listener,
    shared: Arc<ServerState>,
    mut stop: watch::Receiver<bool>,
    done: mpsc::Sender<()>,
) {
    // Unix peers have no address; a number tells their log lines apart.
    let mut unix_clients = 0u64;
    loop {
        let accepted = tokio::select! {
            _ = stopped(&mut stop) => return,
            a = accept(&listener) => a,
        };
        let (stream, peer) = match accepted {
            Ok((s @ Accepted::Unix(_), _)) => {
                unix_clients += 1;
                (s, format!("unix#{unix_clients}"))
            }
            Ok(a) => a,
            Err(e) => {
                // Typically EMFILE: back off instead of spinning, keep serving the others.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Its slot under `max_connections` the connection takes after its handshake.
        let entry = Entry {
            slot: shared.handshakes.enter(&peer),
            peer,
            shared: Arc::clone(&shared),
            stop: stop.clone(),
        };
        let finished = done.clone();
        if shared.config.thread_per_connection {
            spawn_on_own_thread(stream, entry, finished);
        } else {
            tokio::spawn(async move {
                let permit = run_accepted(stream, entry).await;
                drop(permit);
                drop(finished);
            });
        }
    }
}

/// What a connection holds until it ends: its handle on the channel `serve` waits on for
/// every connection to finish.
type Finished = mpsc::Sender<()>;

/// What an accepted connection starts with.
struct Entry {
    peer: String,
    slot: HandshakeSlot,
    shared: Arc<ServerState>,
    stop: watch::Receiver<bool>,
}

/// Runs the connection on a new thread with a current-thread runtime. The socket moves to
/// that runtime's I/O driver (through the std type), so its wake-ups land on the same thread
/// as the tasks they wake.
fn spawn_on_own_thread(stream: Accepted, entry: Entry, finished: Finished) {
    let peer = entry.peer.clone();
    let detached = match stream.into_std() {
        Ok(s) => s,
        Err(e) => {
            warn!(%peer, error = %e, "could not hand the connection to its thread");
            return;
        }
    };
    let spawned = std::thread::Builder::new()
        .name("nbd-conn".to_owned())
        .spawn(move || {
            // A connection never runs more blocking requests at once than it has in flight.
            let blocking_threads = entry.shared.config.max_inflight_per_connection;
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .max_blocking_threads(blocking_threads)
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    warn!(%peer, error = %e, "could not start the connection's runtime");
                    return;
                }
            };
            let permit = runtime.block_on(async move {
                match detached.into_tokio() {
                    Ok(stream) => run_accepted(stream, entry).await,
                    Err(e) => {
                        warn!(%peer, error = %e, "could not register the connection");
                        None
                    }
                }
            });
            // The runtime's blocking threads finish the requests they run before it drops,
            // so the connection's slot is given back only after its last request.
            drop(runtime);
            drop(permit);
            drop(finished);
        });
    if let Err(e) = spawned {
        // Typically EAGAIN at the process's thread limit: refuse this client, serve the rest.
        warn!(error = %e, "could not start a connection thread");
    }
}

/// Runs the connection; its slot under `max_connections` comes back, for the caller to
/// give up once nothing of the connection runs any more.
async fn run_accepted(stream: Accepted, e: Entry) -> Option<connection::Slot> {
    match stream {
        Accepted::Tcp(s) => {
            // Replies are whole frames; Nagle would only add latency.
            let _ = s.set_nodelay(true);
            connection::run(s, e.peer, e.slot, e.shared, e.stop).await
        }
        Accepted::Unix(s) => {
            // Best effort: the kernel caps it at net.core.wmem_max.
            let _ = socket2::SockRef::from(&s).set_send_buffer_size(UNIX_SEND_BUFFER);
            connection::run(s, e.peer, e.slot, e.shared, e.stop).await
        }
    }
}

/// Send buffer asked for on unix connections. The default (about 200 KiB) takes a 1 MiB read
/// reply in five rounds of write, EAGAIN and wake-up; with room for a whole reply the
/// connection writes it in one go (1 MiB sequential reads +17-20%). TCP tunes its own.
const UNIX_SEND_BUFFER: usize = 1 << 20;

enum Accepted {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

/// An accepted socket between two runtimes.
enum DetachedStream {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

impl Accepted {
    /// Deregisters the socket from this runtime (it stays non-blocking).
    fn into_std(self) -> io::Result<DetachedStream> {
        Ok(match self {
            Accepted::Tcp(s) => DetachedStream::Tcp(s.into_std()?),
            Accepted::Unix(s) => DetachedStream::Unix(s.into_std()?),
        })
    }
}

impl DetachedStream {
    /// Registers the socket with the current runtime.
    fn into_tokio(self) -> io::Result<Accepted> {
        Ok(match self {
            DetachedStream::Tcp(s) => Accepted::Tcp(tokio::net::TcpStream::from_std(s)?),
            DetachedStream::Unix(s) => Accepted::Unix(tokio::net::UnixStream::from_std(s)?),
        })
    }
}

async fn accept(listener: &Listener) -> io::Result<(Accepted, String)> {
    match listener {
        Listener::Tcp(l) => {
            let (s, addr) = l.accept().await?;
            Ok((Accepted::Tcp(s), addr.to_string()))
        }
        Listener::Unix(l) => Ok((Accepted::Unix(l.accept().await?.0), String::new())),
    }
}
