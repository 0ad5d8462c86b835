//! One client connection, from handshake to hang-up: `negotiation` (the fixed newstyle
//! handshake, with the TLS handshake in it when the client starts TLS), then the transmission
//! phase, which this module sets up and winds down. The handshake is bounded in time and holds
//! a place among the connections in their handshake (`shared::HandshakeSlots`); the slot under
//! `max_connections` is taken at its end. Transmission is generic over the stream, so a plain
//! connection pays nothing for TLS.
//!
//! In transmission the connection's task only reads (`reader`): it decodes a request, takes
//! permits (requests in flight, payload bytes in flight), reads a write payload and dispatches
//! the request (`execute`). A read the backend can serve from memory, or a small plain write it
//! can do, without waiting is done right there: a hop to a blocking thread and back costs more
//! than the work. Every other request runs its backend call on the blocking pool. Either way
//! the complete reply frame goes to the connection's single writer task (`writer`), so replies
//! leave in completion order and never interleave mid-frame. Large frame buffers are reused
//! within the connection (`buffers`). A malformed request closes this connection only; a
//! request that is merely invalid gets an error reply and the connection goes on.

mod buffers;
mod execute;
mod negotiation;
mod reader;
mod writer;

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::backend::{ExportBackend, WriteTurns};
use super::shared::{stopped, HandshakeSlot, ServerState};
use crate::error::{Error, ErrorKind, Result};
use buffers::Buffers;
use negotiation::{greet, negotiate, Negotiated, Outcome};
use writer::Outgoing;

/// The id of `base:allocation`; the export's other contexts get ids after it.
const BASE_ALLOCATION_ID: u32 = 1;

/// A connection's slot under `max_connections`.
pub(super) type Slot = OwnedSemaphorePermit;

/// A metadata context besides `base:allocation` that the client selected: the export's name
/// for it and the id block status replies carry.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SelectedContext {
    id: u32,
    name: String,
}

/// Runs a connection to its end; never fails (errors are logged). The connect line waits for
/// the handshake so that it can name the export; connect and disconnect lines both name it,
/// so an operator can tell which volume a client was using. The connection's slot comes back
/// for the caller to give up once nothing of the connection runs any more.
pub(super) async fn run<S>(
    stream: S,
    peer: String,
    handshake_slot: HandshakeSlot,
    shared: Arc<ServerState>,
    stop: watch::Receiver<bool>,
) -> Option<Slot>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut export = None;
    let mut slot = None;
    let outcome = serve(
        stream,
        &peer,
        handshake_slot,
        shared,
        stop,
        &mut export,
        &mut slot,
    )
    .await;
    let export = export.as_deref().unwrap_or(NO_EXPORT);
    match outcome {
        Ok(how) => info!(%peer, %export, "client disconnected ({how})"),
        Err(e) => info!(%peer, %export, error = %e, "client disconnected"),
    }
    slot
}

/// The export named on the disconnect line of a client that never chose one.
const NO_EXPORT: &str = "(none)";

async fn serve<S>(
    stream: S,
    peer: &str,
    mut handshake_slot: HandshakeSlot,
    shared: Arc<ServerState>,
    mut stop: watch::Receiver<bool>,
    export: &mut Option<String>,
    slot: &mut Option<Slot>,
) -> Result<&'static str>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let timeout = shared.config.handshake_timeout;
    let handshake = async {
        let established = establish(stream, peer, &shared).await?;
        if matches!(established, Established::Ended(_)) {
            return Ok((established, None));
        }
        // Waiting for a slot is part of the handshake: bounded by its timeout, and a waiting
        // client gives way like any other in its handshake.
        let taken = Arc::clone(&shared.connections).acquire_owned().await;
        Ok::<_, Error>((established, taken.ok()))
    };
    let (established, taken) = tokio::select! {
        _ = stopped(&mut stop) => return Ok("server shutting down during handshake"),
        _ = &mut handshake_slot.evicted => {
            return Ok("dropped in its handshake: too many connections in their handshake")
        }
        r = tokio::time::timeout(timeout, handshake) => match r {
            Err(_) => return Ok("handshake timed out"),
            Ok(r) => r?,
        },
    };
    drop(handshake_slot);
    *slot = taken;
    match established {
        Established::Ended(how) => Ok(how),
        Established::Plain(stream, n) => {
            started(peer, &n, None, export);
            transmission(stream, n, shared, stop).await
        }
        Established::Tls(stream, n) => {
            started(peer, &n, Some(stream.ssl().version_str()), export);
            transmission(stream, n, shared, stop).await
        }
    }
}

/// Logs the start of transmission, with the TLS version and peer when TLS is on.
fn started(peer: &str, n: &Negotiated, tls_version: Option<&str>, export: &mut Option<String>) {
    let tls = match (&n.identity, tls_version) {
        (Some(identity), Some(version)) => format!("{version} {identity}"),
        _ => "off".to_owned(),
    };
    info!(%peer, export = %n.name, %tls, "client connected");
    debug!(%peer, export = %n.name, structured = n.structured, "transmission started");
    *export = Some(n.name.clone());
}

/// How a handshake ended: an export chosen over the plain stream or over TLS, or nothing.
enum Established<S> {
    Plain(S, Negotiated),
    Tls(tokio_openssl::SslStream<S>, Negotiated),
    Ended(&'static str),
}

/// The greeting, options, and when the client starts TLS, the TLS handshake and options again.
async fn establish<S>(mut stream: S, peer: &str, shared: &ServerState) -> Result<Established<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let no_zeroes = greet(&mut stream).await?;
    match negotiate(&mut stream, peer, shared, no_zeroes, None).await? {
        Outcome::Export(n) => return Ok(Established::Plain(stream, n)),
        Outcome::NoExport => return Ok(Established::Ended("no export chosen")),
        Outcome::StartTls => {}
    }
    let Some(tls) = &shared.tls else {
        return protocol_error("STARTTLS without TLS credentials");
    };
    let (mut stream, identity) = tls.accept(stream).await?;
    debug!(%peer, %identity, version = stream.ssl().version_str(), "TLS handshake done");
    match negotiate(&mut stream, peer, shared, no_zeroes, Some(&identity)).await? {
        Outcome::Export(n) => Ok(Established::Tls(stream, n)),
        Outcome::NoExport => {
            // close_notify, so that the client sees a clean end of the TLS session.
            let _ = stream.shutdown().await;
            Ok(Established::Ended("no export chosen"))
        }
        Outcome::StartTls => protocol_error("STARTTLS over TLS"),
    }
}

fn io_err(what: &str) -> impl FnOnce(io::Error) -> Error + '_ {
    move |e| Error::io(what.to_owned(), e)
}

fn protocol_error<T>(what: impl Into<String>) -> Result<T> {
    Err(Error::new(ErrorKind::InvalidInput, what))
}

/// Everything a request needs, shared by the connection's requests.
struct Ctx {
    backend: Arc<dyn ExportBackend>,
    size: u64,
    read_only: bool,
    structured: bool,
    base_allocation: bool,
    /// The other contexts selected, answered after `base:allocation` in this order.
    contexts: Vec<SelectedContext>,
    max_request_bytes: u32,
    buffers: Buffers,
    /// Which writes run inline, which take turns (waited for on the event loop).
    writes: WriteTurns,
}

async fn transmission<S>(
    stream: S,
    n: Negotiated,
    shared: Arc<ServerState>,
    mut stop: watch::Receiver<bool>,
) -> Result<&'static str>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let cfg = &shared.config;
    let ctx = Arc::new(Ctx {
        size: n.backend.size(),
        read_only: n.backend.read_only(),
        writes: WriteTurns::new(n.backend.as_ref()),
        backend: n.backend,
        structured: n.structured,
        base_allocation: n.base_allocation,
        contexts: n.contexts,
        max_request_bytes: cfg.max_request_bytes,
        buffers: Buffers::default(),
    });
    let (rd, wr) = tokio::io::split(stream);
    let (tx, rx) = mpsc::channel::<Outgoing>(cfg.max_inflight_per_connection);
    let writer = tokio::spawn(writer::write_replies(wr, rx, Arc::clone(&ctx)));
    let mut tasks = JoinSet::new();
    let outcome = reader::read_requests(rd, &ctx, cfg, &tx, &mut tasks, &mut stop).await;
    // Let every accepted request finish and its reply go out before the writer closes. A
    // client that stops reading could hold that up forever, so once the server is shutting
    // down it gets `shutdown_grace`, then the connection is cut.
    let writer_abort = writer.abort_handle();
    let drain = async {
        while tasks.join_next().await.is_some() {}
        drop(tx);
        match writer.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => debug!(error = %e, "reply writer failed"),
            Err(e) => warn!(error = %e, "reply writer task failed"),
        }
    };
    let grace = cfg.shutdown_grace;
    let deadline = async {
        stopped(&mut stop).await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        _ = drain => {}
        _ = deadline => {
            warn!("shutdown grace period over: dropping replies the client did not read");
            writer_abort.abort();
        }
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use crate::nbd::backend::tests::fill_byte;
    use crate::nbd::backend::tests::{Overlapping, NOWAIT_WRITE_MAX};
    use crate::nbd::backend::Extent;
    use crate::nbd::codec::*;
    use crate::nbd::memory::MemoryExport;
    use crate::nbd::NBD_ENOSPC;
    use crate::util::usize_from_u64;

    /// A memory export that takes every write it is offered without waiting, and counts
    /// which path each write came by.
    struct Quick(
        MemoryExport,
        std::sync::atomic::AtomicUsize,
        std::sync::atomic::AtomicUsize,
    );

    impl ExportBackend for Quick {
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn read_only(&self) -> bool {
            false
        }
        fn preferred_block_size(&self) -> u32 {
            4096
        }
        fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
            self.0.read(offset, buf)
        }
        fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
            self.2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.0.write(offset, data, fua)
        }
        fn try_write_nowait(&self, offset: u64, data: &[u8]) -> Option<()> {
            self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.0.write(offset, data, false).ok()
        }
        fn flush(&self) -> Result<()> {
            Ok(())
        }
        fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
            self.0.trim(offset, len, fua)
        }
        fn write_zeroes(&self, o: u64, l: u64, u: bool, f: bool, fua: bool) -> Result<()> {
            self.0.write_zeroes(o, l, u, f, fua)
        }
        fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
            self.0.block_status(offset, len)
        }
        fn cache(&self, _offset: u64, _len: u64) -> Result<()> {
            Ok(())
        }
    }

    /// A runtime like the server's shared one, with blocking threads beside its workers.
    fn two_worker_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    /// Runs the transmission phase for `backend` over an in-memory pipe; the client end, the
    /// connection's task and its stop switch come back.
    fn start_transmission(
        backend: Arc<dyn ExportBackend>,
    ) -> (
        tokio::io::DuplexStream,
        tokio::task::JoinHandle<Result<&'static str>>,
        watch::Sender<bool>,
    ) {
        let shared = Arc::new(ServerState::new(
            Arc::new(crate::nbd::memory::MemorySource::new()),
            crate::nbd::ServerConfig::default(),
            None,
        ));
        let (client, server) = tokio::io::duplex(4 << 20);
        let (stop_tx, stop_rx) = watch::channel(false);
        let n = Negotiated {
            name: "q".into(),
            backend,
            flags: 0,
            structured: false,
            base_allocation: false,
            identity: None,
            contexts: Vec::new(),
        };
        (
            client,
            tokio::spawn(transmission(server, n, shared, stop_rx)),
            stop_tx,
        )
    }

    /// Reads `n` simple replies; their (cookie, error) pairs come back sorted by cookie.
    async fn replies(client: &mut tokio::io::DuplexStream, n: u64) -> Vec<(u64, u32)> {
        let mut got = Vec::new();
        for _ in 0..n {
            let mut r = [0u8; SIMPLE_REPLY_LEN];
            tokio::time::timeout(
                std::time::Duration::from_secs(60),
                client.read_exact(&mut r),
            )
            .await
            .expect("every request is answered")
            .unwrap();
            let cookie = u64::from_be_bytes(r[8..16].try_into().unwrap());
            got.push((cookie, u32::from_be_bytes(r[4..8].try_into().unwrap())));
        }
        got.sort_unstable();
        got
    }

    #[test]
    fn large_writes_of_one_connection_run_one_at_a_time_small_ones_together() {
        two_worker_runtime().block_on(async {
            let fua_writes = |len: u32, n: u64| {
                let mut out = Vec::new();
                for i in 0..n {
                    let req = Request {
                        flags: CMD_FLAG_FUA,
                        command: Command::Write,
                        cookie: i,
                        offset: i * u64::from(len),
                        length: len,
                    };
                    out.extend_from_slice(&req.encode());
                    out.extend(std::iter::repeat_n(fill_byte(i), len as usize));
                }
                out
            };
            const N: u64 = 8;
            // Writes larger than the non-blocking limit: one at a time, all done and right.
            let large = NOWAIT_WRITE_MAX * 2;
            let backend = Arc::new(Overlapping {
                inner: Some(MemoryExport::new(N * u64::from(large))),
                ..Default::default()
            });
            let (mut client, _conn, _stop) = start_transmission(backend.clone());
            client.write_all(&fua_writes(large, N)).await.unwrap();
            assert_eq!(
                replies(&mut client, N).await,
                (0..N).map(|c| (c, 0)).collect::<Vec<_>>()
            );
            let mut all = vec![0u8; usize_from_u64(N * u64::from(large))];
            backend.read(0, &mut all).unwrap();
            for (i, chunk) in (0..).zip(all.chunks(large as usize)) {
                assert!(chunk.iter().all(|&b| b == fill_byte(i)), "write {i}");
            }
            let most = backend.most.load(std::sync::atomic::Ordering::SeqCst);
            assert_eq!(most, 1, "large writes at once");

            // Small writes that must wait (FUA) are not held to that: they overlap.
            let backend = Arc::new(Overlapping {
                inner: Some(MemoryExport::new(N * 4096)),
                ..Default::default()
            });
            let (mut client, _conn, _stop) = start_transmission(backend.clone());
            client.write_all(&fua_writes(4096, N)).await.unwrap();
            assert_eq!(
                replies(&mut client, N).await,
                (0..N).map(|c| (c, 0)).collect::<Vec<_>>()
            );
            let most = backend.most.load(std::sync::atomic::Ordering::SeqCst);
            assert!(most > 1, "small writes ran one at a time");
        });
    }

    #[test]
    fn pipelined_nowait_writes_run_inline_and_each_gets_its_reply() {
        two_worker_runtime().block_on(async {
            let backend = Arc::new(Quick(
                MemoryExport::new(1 << 20),
                Default::default(),
                Default::default(),
            ));
            let (mut client, conn, _stop) = start_transmission(backend.clone());
            // 40 writes sent at once, one of them FUA, and a flush in the middle: the FUA
            // write and anything past the end go the blocking way, the rest run inline.
            const N: u64 = 40;
            let mut out = Vec::new();
            for i in 0..N {
                let (command, flags) = match i {
                    20 => (Command::Flush, 0),
                    25 => (Command::Write, CMD_FLAG_FUA),
                    _ => (Command::Write, 0),
                };
                // One write past the end of the 1 MiB export: an error reply, never inline.
                let i_off = if i == 30 { 1 << 20 } else { i * 4096 };
                let length = if command == Command::Write { 4096 } else { 0 };
                let req = Request {
                    flags,
                    command,
                    cookie: i,
                    offset: if length > 0 { i_off } else { 0 },
                    length,
                };
                out.extend_from_slice(&req.encode());
                out.extend(std::iter::repeat_n(fill_byte(i), length as usize));
            }
            client.write_all(&out).await.unwrap();
            let got = replies(&mut client, N).await;
            assert_eq!(got.len(), usize_from_u64(N));
            for (i, (cookie, error)) in got.into_iter().enumerate() {
                assert_eq!(cookie, i as u64);
                let want = if cookie == 30 { NBD_ENOSPC } else { 0 };
                assert_eq!(error, want, "reply to {cookie}");
            }
            let mut all = vec![0u8; usize_from_u64(N * 4096)];
            backend.0.read(0, &mut all).unwrap();
            for (i, chunk) in (0..).zip(all.chunks(4096)) {
                let want = if i == 20 || i == 30 { 0 } else { fill_byte(i) };
                assert!(chunk.iter().all(|&b| b == want), "block {i}");
            }
            let inline = backend.1.load(std::sync::atomic::Ordering::SeqCst);
            let blocking = backend.2.load(std::sync::atomic::Ordering::SeqCst);
            assert_eq!(
                (inline, blocking),
                (usize_from_u64(N) - 3, 1),
                "inline, blocking"
            );
            let disc = Request {
                flags: 0,
                command: Command::Disc,
                cookie: N,
                offset: 0,
                length: 0,
            };
            client.write_all(&disc.encode()).await.unwrap();
            let how = conn.await.unwrap().unwrap();
            assert_eq!(how, "NBD_CMD_DISC");
        });
    }
}
