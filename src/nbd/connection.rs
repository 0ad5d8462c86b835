//! One client connection: the fixed newstyle handshake, then the transmission phase.
//!
//! In transmission the connection's task only reads: it decodes a request, takes permits
//! (requests in flight, payload bytes in flight), reads a write payload and dispatches the
//! request. A read the backend can serve from memory, or a small plain write it can do,
//! without waiting is done right there (`read_nowait`, `write_nowait`): a hop to a blocking
//! thread and back costs more than the work. Every other request runs its backend call on the
//! blocking pool. Either way the complete reply frame
//! goes to the connection's single writer task, so replies leave in completion order and never
//! interleave mid-frame. A malformed request closes this connection only; a request that is
//! merely invalid gets an error reply and the connection goes on.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader,
    BufWriter,
};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, info, trace, warn};

use super::backend::{BlockSizes, ExportBackend, Extent, WriteTurns};
use super::busy_poll::PollWindow;
use super::codec::*;
use super::server::{stopped, Shared};
use super::{errno_of, errno_of_kind, NBD_EINVAL, NBD_EIO, NBD_ENOSPC, NBD_EPERM};
use crate::error::{Error, ErrorKind, Result};

/// Option data larger than this is not a real client; the connection is closed.
const MAX_OPTION_DATA: u32 = 64 << 10;
/// The id of `base:allocation`, the only metadata context.
const BASE_ALLOCATION_ID: u32 = 1;

/// Runs a connection to its end; never fails (errors are logged). The connect line waits for
/// the handshake so that it can name the export; connect and disconnect lines both name it,
/// so an operator can tell which volume a client was using.
pub(super) async fn run<S>(
    stream: S,
    peer: String,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut export = None;
    let outcome = serve(stream, &peer, shared, stop, &mut export).await;
    let export = export.as_deref().unwrap_or(NO_EXPORT);
    match outcome {
        Ok(how) => info!(%peer, %export, "client disconnected ({how})"),
        Err(e) => info!(%peer, %export, error = %e, "client disconnected"),
    }
}

/// The export named on the disconnect line of a client that never chose one.
const NO_EXPORT: &str = "(none)";

async fn serve<S>(
    mut stream: S,
    peer: &str,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    export: &mut Option<String>,
) -> Result<&'static str>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let timeout = shared.config.handshake_timeout;
    let negotiated = tokio::select! {
        _ = stopped(&mut stop) => return Ok("server shutting down during handshake"),
        r = tokio::time::timeout(timeout, handshake(&mut stream, peer, &shared)) => match r {
            Err(_) => return Ok("handshake timed out"),
            Ok(r) => r?,
        },
    };
    let Some(n) = negotiated else {
        return Ok("no export chosen");
    };
    info!(%peer, export = %n.name, "client connected");
    debug!(%peer, export = %n.name, structured = n.structured, "transmission started");
    *export = Some(n.name.clone());
    transmission(stream, n, shared, stop).await
}

fn io_err(what: &str) -> impl FnOnce(io::Error) -> Error + '_ {
    move |e| Error::io(what.to_owned(), e)
}

fn protocol_error<T>(what: impl Into<String>) -> Result<T> {
    Err(Error::new(ErrorKind::InvalidInput, what))
}

// === Handshake ===============================================================================

/// What option negotiation settled on.
struct Negotiated {
    name: String,
    backend: Arc<dyn ExportBackend>,
    flags: u16,
    structured: bool,
    base_allocation: bool,
}

/// Negotiation state across options.
struct Options<'a> {
    shared: &'a Shared,
    structured: bool,
    /// The export `base:allocation` was selected for by SET_META_CONTEXT, if any.
    meta_export: Option<String>,
}

impl Options<'_> {
    /// The export a client name refers to ("" means the default export).
    fn resolve(&self, name: &str) -> Result<(String, Arc<dyn ExportBackend>)> {
        let name = if name.is_empty() {
            match self.shared.source.default_export() {
                Some(d) => d,
                None => return Err(Error::new(ErrorKind::NotFound, "no default export")),
            }
        } else {
            name.to_owned()
        };
        let backend = self.shared.source.open(&name)?;
        Ok((name, backend))
    }

    fn transmission_flags(&self, backend: &dyn ExportBackend) -> u16 {
        let mut flags = TFLAG_HAS_FLAGS
            | TFLAG_SEND_FLUSH
            | TFLAG_SEND_FUA
            | TFLAG_SEND_TRIM
            | TFLAG_SEND_WRITE_ZEROES
            | TFLAG_SEND_FAST_ZERO
            | TFLAG_CAN_MULTI_CONN
            | TFLAG_SEND_CACHE;
        if backend.read_only() {
            flags |= TFLAG_READ_ONLY;
        }
        if self.structured {
            flags |= TFLAG_SEND_DF;
        }
        flags
    }

    fn negotiated(&self, name: String, backend: Arc<dyn ExportBackend>) -> Negotiated {
        let flags = self.transmission_flags(backend.as_ref());
        let base_allocation = self.structured && self.meta_export.as_deref() == Some(name.as_str());
        Negotiated {
            name,
            backend,
            flags,
            structured: self.structured,
            base_allocation,
        }
    }
}

async fn send<S: AsyncWrite + Unpin>(stream: &mut S, reply: OptionReply) -> Result<()> {
    stream
        .write_all(&reply.encode())
        .await
        .map_err(io_err("sending option reply"))
}

/// Fixed newstyle negotiation. `None` when the client ends it without choosing an export.
async fn handshake<S>(stream: &mut S, peer: &str, shared: &Shared) -> Result<Option<Negotiated>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream
        .write_all(&encode_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        .await
        .map_err(io_err("sending greeting"))?;
    let mut buf = [0u8; 4];
    stream
        .read_exact(&mut buf)
        .await
        .map_err(io_err("reading client flags"))?;
    let client_flags = decode_client_flags(&buf)?;
    if client_flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
        return protocol_error(format!("unknown client flags {client_flags:#x}"));
    }
    let no_zeroes = client_flags & CLIENT_NO_ZEROES != 0;
    let mut opts = Options {
        shared,
        structured: false,
        meta_export: None,
    };

    loop {
        let mut hdr = [0u8; OPTION_HEADER_LEN];
        stream
            .read_exact(&mut hdr)
            .await
            .map_err(io_err("reading option"))?;
        let header = OptionHeader::decode(&hdr)?;
        if header.length > MAX_OPTION_DATA {
            return protocol_error(format!("option data of {} bytes", header.length));
        }
        let mut data = vec![0u8; header.length as usize];
        stream
            .read_exact(&mut data)
            .await
            .map_err(io_err("reading option data"))?;
        let option = header.option;
        let request = match OptionRequest::decode(option, &data) {
            Ok(r) => r,
            Err(e) if option == OPT_EXPORT_NAME => return Err(e),
            Err(e) => {
                debug!(%peer, option, error = %e, "malformed option");
                send(
                    stream,
                    OptionReply::error(option, REP_ERR_INVALID, e.context()),
                )
                .await?;
                continue;
            }
        };
        debug!(%peer, ?request, "option");
        match request {
            OptionRequest::ExportName(name) => {
                // This option has no error reply: an unknown name can only be a hang-up.
                let (name, backend) = match opts.resolve(&name) {
                    Ok(found) => found,
                    Err(e) => {
                        debug!(%peer, error = %e, "EXPORT_NAME for unknown export");
                        return Ok(None);
                    }
                };
                let n = opts.negotiated(name, backend);
                let reply = encode_export_name_reply(n.backend.size(), n.flags, no_zeroes);
                stream
                    .write_all(&reply)
                    .await
                    .map_err(io_err("sending export info"))?;
                return Ok(Some(n));
            }
            OptionRequest::Abort => {
                // The client may already be gone; the ACK is a courtesy.
                let _ = send(stream, OptionReply::new(option, OptionReplyKind::Ack)).await;
                return Ok(None);
            }
            OptionRequest::List => {
                for e in shared.source.list() {
                    let kind = OptionReplyKind::Server {
                        name: e.name,
                        description: e.description,
                    };
                    send(stream, OptionReply::new(option, kind)).await?;
                }
                send(stream, OptionReply::new(option, OptionReplyKind::Ack)).await?;
            }
            OptionRequest::StructuredReply => {
                opts.structured = true;
                send(stream, OptionReply::new(option, OptionReplyKind::Ack)).await?;
            }
            OptionRequest::Info { go, name, requests } => {
                let (name, backend) = match opts.resolve(&name) {
                    Ok(found) => found,
                    Err(e) => {
                        let code = match e.kind() {
                            ErrorKind::NotFound => REP_ERR_UNKNOWN,
                            _ => REP_ERR_PLATFORM,
                        };
                        send(stream, OptionReply::error(option, code, e.to_string())).await?;
                        continue;
                    }
                };
                for info in info_replies(&opts, &name, backend.as_ref(), &requests) {
                    send(
                        stream,
                        OptionReply::new(option, OptionReplyKind::Info(info)),
                    )
                    .await?;
                }
                send(stream, OptionReply::new(option, OptionReplyKind::Ack)).await?;
                if go {
                    return Ok(Some(opts.negotiated(name, backend)));
                }
            }
            OptionRequest::MetaContext {
                set,
                export,
                queries,
            } => {
                if set && !opts.structured {
                    let msg = "SET_META_CONTEXT needs structured replies first";
                    send(stream, OptionReply::error(option, REP_ERR_INVALID, msg)).await?;
                    continue;
                }
                let name = match opts.resolve(&export) {
                    Ok((name, _)) => name,
                    Err(e) => {
                        send(
                            stream,
                            OptionReply::error(option, REP_ERR_UNKNOWN, e.to_string()),
                        )
                        .await?;
                        continue;
                    }
                };
                // An empty query list means "all" for LIST and "none" for SET.
                let selected = if queries.is_empty() {
                    !set
                } else {
                    queries.iter().any(|q| {
                        q == META_BASE_ALLOCATION || (!set && (q == "base:" || q == "base"))
                    })
                };
                if selected {
                    let kind = OptionReplyKind::MetaContext {
                        id: BASE_ALLOCATION_ID,
                        name: META_BASE_ALLOCATION.to_owned(),
                    };
                    send(stream, OptionReply::new(option, kind)).await?;
                }
                if set {
                    opts.meta_export = selected.then_some(name);
                }
                send(stream, OptionReply::new(option, OptionReplyKind::Ack)).await?;
            }
            OptionRequest::Unknown { option, .. } => {
                let msg = format!("option {option} is not supported");
                send(stream, OptionReply::error(option, REP_ERR_UNSUP, msg)).await?;
            }
        }
    }
}

fn info_replies(
    opts: &Options<'_>,
    name: &str,
    backend: &dyn ExportBackend,
    requests: &[u16],
) -> Vec<InfoReply> {
    let mut out = vec![InfoReply::Export {
        size: backend.size(),
        flags: opts.transmission_flags(backend),
    }];
    if requests.contains(&INFO_NAME) {
        out.push(InfoReply::Name(name.to_owned()));
    }
    if requests.contains(&INFO_DESCRIPTION) {
        let description = opts
            .shared
            .source
            .list()
            .into_iter()
            .find(|e| e.name == name)
            .map(|e| e.description)
            .unwrap_or_default();
        if !description.is_empty() {
            out.push(InfoReply::Description(description));
        }
    }
    // Sent even unasked: a minimum of 1 constrains nothing and tells the limits.
    let sizes = BlockSizes::new(
        backend.preferred_block_size(),
        opts.shared.config.max_request_bytes,
    );
    out.push(InfoReply::BlockSize {
        minimum: sizes.minimum,
        preferred: sizes.preferred,
        maximum: sizes.maximum,
    });
    out
}

// === Transmission ============================================================================

/// Everything a request needs, shared by the connection's requests.
struct Ctx {
    backend: Arc<dyn ExportBackend>,
    size: u64,
    read_only: bool,
    structured: bool,
    base_allocation: bool,
    max_request_bytes: u32,
    buffers: Buffers,
    /// Which writes run inline, which take turns (waited for on the event loop).
    writes: WriteTurns,
}

/// Frames smaller than this are left to the allocator, which serves them quickly.
const POOLED_MIN: usize = 64 << 10;
/// Frames larger than this are not kept but freed after use: a pool of maximum-size buffers
/// would pin `POOLED_COUNT` maximum requests' worth of memory per connection.
const POOLED_MAX: usize = (1 << 20) + 64;
/// Buffers kept per connection.
const POOLED_COUNT: usize = 16;

/// Large frame buffers kept for reuse within one connection: a 1 MiB read or write would
/// otherwise allocate, zero and fault in fresh memory on every request.
#[derive(Default)]
struct Buffers(std::sync::Mutex<Vec<Vec<u8>>>);

impl Buffers {
    fn pool(&self) -> std::sync::MutexGuard<'_, Vec<Vec<u8>>> {
        // Only whole buffers are pushed and popped; a poisoned pool is still consistent.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A buffer of `len` bytes whose contents are unspecified (a reused buffer keeps old
    /// bytes): the caller overwrites all of it before it leaves the connection.
    fn take(&self, len: usize) -> Vec<u8> {
        if len >= POOLED_MIN {
            if let Some(mut v) = self.pool().pop() {
                v.resize(len, 0);
                return v;
            }
        }
        vec![0u8; len]
    }

    fn put(&self, v: Vec<u8>) {
        if (POOLED_MIN..=POOLED_MAX).contains(&v.capacity()) {
            let mut pool = self.pool();
            if pool.len() < POOLED_COUNT {
                pool.push(v);
            }
        }
    }
}

/// A reply frame on its way to the writer; the permits travel with it so that a connection's
/// memory is bounded until the bytes are on the socket.
struct Outgoing {
    bytes: Vec<u8>,
    _permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
}

async fn transmission<S>(
    stream: S,
    n: Negotiated,
    shared: Arc<Shared>,
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
        max_request_bytes: cfg.max_request_bytes,
        buffers: Buffers::default(),
    });
    let (rd, wr) = tokio::io::split(stream);
    let mut rd = BufReader::with_capacity(64 << 10, rd);
    let (tx, rx) = mpsc::channel::<Outgoing>(cfg.max_inflight_per_connection);
    let writer = tokio::spawn(writer(wr, rx, Arc::clone(&ctx)));
    let count = Arc::new(Semaphore::new(cfg.max_inflight_per_connection));
    let byte_cap = cfg.max_inflight_bytes_per_connection;
    let bytes = Arc::new(Semaphore::new(byte_cap));
    let mut tasks = JoinSet::new();

    let mut poll = PollWindow::new(cfg.busy_poll_max);
    let outcome = loop {
        while tasks.try_join_next().is_some() {}
        let mut hdr = [0u8; REQUEST_LEN];
        // Nothing buffered and at most the reply just queued in flight: the client is likely
        // waiting on us alone, one request at a time. Poll for its next request briefly
        // rather than sleep (see `busy_poll`); deeper queues keep the worker busy anyway.
        let idle_since = (rd.buffer().is_empty()
            && count.available_permits() + 1 >= cfg.max_inflight_per_connection)
            .then(Instant::now);
        if idle_since.is_some() {
            poll_for_request(&mut rd, poll.window()).await;
        }
        tokio::select! {
            _ = stopped(&mut stop) => break Ok("server shutting down"),
            _ = tx.closed() => break Ok("reply writer stopped"),
            r = rd.read_exact(&mut hdr) => match r {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break Ok("closed without NBD_CMD_DISC"),
                Err(e) => break Err(Error::io("reading request", e)),
            },
        }
        if let Some(t) = idle_since {
            poll.waited(t.elapsed());
        }
        let req = match Request::decode(&hdr) {
            Ok(r) => r,
            Err(e) => break Err(e),
        };
        trace!(?req, "request");
        if req.command == Command::Disc {
            break Ok("NBD_CMD_DISC");
        }
        // A write above the maximum is drained and answered (see [`MAX_DRAINED_WRITE`]).
        let drained_write = req.command == Command::Write && req.length > ctx.max_request_bytes;
        if drained_write && req.length > MAX_DRAINED_WRITE {
            break protocol_error(format!(
                "write of {} bytes exceeds the maximum of {} by too much to drain",
                req.length, ctx.max_request_bytes
            ));
        }
        let cost = match req.command {
            Command::Read | Command::Write if req.length <= ctx.max_request_bytes => req.length,
            _ => 0,
        };
        let cost = cost.min(u32::try_from(byte_cap).unwrap_or(u32::MAX));
        // Waiting here is the backpressure on a client that sends faster than it reads.
        let permits = async {
            let c = Arc::clone(&count).acquire_owned().await?;
            let b = Arc::clone(&bytes).acquire_many_owned(cost).await?;
            Ok::<_, tokio::sync::AcquireError>((c, b))
        };
        let (c, b) = tokio::select! {
            _ = stopped(&mut stop) => break Ok("server shutting down"),
            p = permits => match p {
                Ok(p) => p,
                // The semaphores are never closed.
                Err(_) => break Ok("semaphore closed"),
            },
        };
        let payload = if drained_write {
            // Through the reader's own buffer: draining costs no memory. `execute` answers
            // EINVAL (`validate` checks the size first), so the empty payload is never used.
            let mut rest = (&mut rd).take(u64::from(req.length));
            let mut sink = tokio::io::sink();
            tokio::select! {
                _ = stopped(&mut stop) => break Ok("server shutting down"),
                r = tokio::io::copy_buf(&mut rest, &mut sink) => match r {
                    Ok(n) if n == u64::from(req.length) => {}
                    Ok(_) => {
                        let eof = io::Error::from(io::ErrorKind::UnexpectedEof);
                        break Err(Error::io("draining an oversized write payload", eof));
                    }
                    Err(e) => break Err(Error::io("draining an oversized write payload", e)),
                },
            }
            Vec::new()
        } else if req.command == Command::Write {
            // Overwritten whole by read_exact (or the connection ends).
            let mut payload = ctx.buffers.take(req.length as usize);
            tokio::select! {
                _ = stopped(&mut stop) => break Ok("server shutting down"),
                r = rd.read_exact(&mut payload) => if let Err(e) = r {
                    break Err(Error::io("reading write payload", e));
                },
            }
            payload
        } else {
            Vec::new()
        };
        // What the backend can do without waiting (reads from memory, small writes) is done
        // here, on the event loop: the hop to a blocking thread and back costs more.
        let done_here = match req.command {
            Command::Read => read_nowait(&ctx, &req),
            Command::Write => write_nowait(&ctx, &req, &payload),
            _ => None,
        };
        if let Some(bytes) = done_here {
            ctx.buffers.put(payload);
            let out = Outgoing {
                bytes,
                _permits: (c, b),
            };
            if tx.send(out).await.is_err() {
                break Ok("reply writer stopped");
            }
            if tx.max_capacity() - tx.capacity() >= REPLIES_BEFORE_YIELD {
                tokio::task::yield_now().await;
            }
            continue;
        }
        dispatch(
            &mut tasks,
            Pending {
                req,
                payload,
                permits: (c, b),
            },
            &ctx,
            &tx,
        );
    };
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

/// Keeps this worker awake for up to `window` while no request bytes are buffered, so that
/// the next request is picked up without a sleep and wake-up. `yield_now` returns once the
/// runtime has polled its I/O driver, which is what notices the request; `fill_buf` is
/// cancel-safe, so bytes it reads stay buffered for the header read that follows.
async fn poll_for_request<R: AsyncBufRead + Unpin>(rd: &mut R, window: Duration) {
    if window.is_zero() {
        return;
    }
    let until = Instant::now() + window;
    loop {
        tokio::select! {
            biased;
            _ = rd.fill_buf() => return,
            _ = tokio::task::yield_now() => {}
        }
        if Instant::now() >= until {
            return;
        }
        // A client sharing this CPU is what we wait for: let it run.
        std::thread::yield_now();
    }
}

/// Replies the reader may queue before it lets the writer run. On a connection's own thread
/// the writer otherwise gets a turn only once the reader runs out of input, so a client at
/// queue depth 32 got its replies in bursts and its queue ran dry between them. Measured side
/// by side (4 KiB overwrites at queue depth 32, one client): no yield 145-146k IOPS, after 4
/// replies 162-168k, 8: 169-170k, 16: 164-168k, 32: 156-164k; two clients lose a little to the
/// extra sends as the batch shrinks (16: 285-314k, none: 317-321k).
const REPLIES_BEFORE_YIELD: usize = 16;

/// Longest write payload that is read and thrown away when it is over the maximum request
/// size, so that the write gets an `NBD_EINVAL` reply and the connection goes on: clients
/// that open with `NBD_OPT_EXPORT_NAME` never see the advertised maximum, and nbd-server and
/// nbdkit take writes up to 64 MiB. Draining holds no memory (it goes through the reader's
/// buffer), only time; a length beyond this is no real client's write but a stream gone out
/// of step or a hostile one, and reading up to 4 GiB for it would tie the connection up, so
/// it ends the connection instead. EINVAL rather than `NBD_EOVERFLOW`: proto.md keeps
/// EOVERFLOW for reads with `NBD_CMD_FLAG_DF` and for commands without a payload, and a
/// write over the maximum is a request the client MUST NOT send.
const MAX_DRAINED_WRITE: u32 = 1 << 30;

/// A request read in full, with its permits, waiting to be dispatched.
struct Pending {
    req: Request,
    payload: Vec<u8>,
    permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
}

/// Runs a request on the blocking pool and queues its reply.
fn dispatch(tasks: &mut JoinSet<()>, p: Pending, ctx: &Arc<Ctx>, tx: &mpsc::Sender<Outgoing>) {
    let (ctx, tx) = (Arc::clone(ctx), tx.clone());
    tasks.spawn(async move {
        let Pending {
            req,
            payload,
            permits,
        } = p;
        // Held until the write is done; the others wait here, on the event loop.
        let turn = match req.command {
            Command::Write => ctx.writes.turn(req.length as usize).await,
            _ => None,
        };
        let ctx2 = Arc::clone(&ctx);
        let run = tokio::task::spawn_blocking(move || {
            let bytes = execute(&ctx2, &req, &payload);
            drop(turn);
            ctx2.buffers.put(payload);
            bytes
        });
        let bytes = match run.await {
            Ok(bytes) => bytes,
            Err(e) => {
                warn!(error = %e, "request task failed");
                error_reply(&ctx, &req, NBD_EIO, "internal error")
            }
        };
        // A send error means the writer is gone, and the connection with it.
        let _ = tx
            .send(Outgoing {
                bytes,
                _permits: permits,
            })
            .await;
    });
}

/// The one task writing to the socket: frames go out whole, batched while more are queued.
async fn writer<W: AsyncWrite + Unpin>(
    wr: W,
    mut rx: mpsc::Receiver<Outgoing>,
    ctx: Arc<Ctx>,
) -> io::Result<()> {
    let mut wr = BufWriter::with_capacity(64 << 10, wr);
    while let Some(out) = rx.recv().await {
        wr.write_all(&out.bytes).await?;
        ctx.buffers.put(out.bytes);
        while let Ok(out) = rx.try_recv() {
            wr.write_all(&out.bytes).await?;
            ctx.buffers.put(out.bytes);
        }
        wr.flush().await?;
    }
    wr.shutdown().await
}

/// Runs one request on the calling (blocking) thread and returns its whole reply.
fn execute(ctx: &Ctx, req: &Request, payload: &[u8]) -> Vec<u8> {
    if let Err((errno, msg)) = validate(ctx, req) {
        debug!(?req, errno, msg, "request rejected");
        return error_reply(ctx, req, errno, msg);
    }
    let fua = req.has(CMD_FLAG_FUA);
    let (off, len) = (req.offset, u64::from(req.length));
    let b = ctx.backend.as_ref();
    let result = match req.command {
        Command::Read => return read_reply(ctx, req),
        Command::BlockStatus => return block_status_reply(ctx, req),
        Command::Write => b.write(off, payload, fua),
        Command::Flush => b.flush(),
        Command::Trim => b.trim(off, len, fua),
        Command::WriteZeroes => b.write_zeroes(
            off,
            len,
            !req.has(CMD_FLAG_NO_HOLE),
            req.has(CMD_FLAG_FAST_ZERO),
            fua,
        ),
        Command::Cache => b.cache(off, len),
        Command::Disc | Command::Other(_) => Err(Error::new(ErrorKind::InvalidInput, "command")),
    };
    match result {
        Ok(()) => SimpleReply {
            error: 0,
            cookie: req.cookie,
        }
        .encode()
        .to_vec(),
        Err(e) => backend_error_reply(ctx, req, &e),
    }
}

/// Protocol-level checks, before the backend sees the request.
fn validate(ctx: &Ctx, req: &Request) -> std::result::Result<(), (u32, &'static str)> {
    let ranged = match req.command {
        Command::Read | Command::Cache => true,
        Command::Write | Command::Trim | Command::WriteZeroes => {
            if ctx.read_only {
                return Err((NBD_EPERM, "export is read-only"));
            }
            true
        }
        Command::BlockStatus => {
            if !ctx.base_allocation {
                return Err((NBD_EINVAL, "no metadata context negotiated"));
            }
            true
        }
        Command::Flush => false,
        Command::Disc | Command::Other(_) => return Err((NBD_EINVAL, "unknown command")),
    };
    if ranged {
        if req.length == 0 {
            return Err((NBD_EINVAL, "zero-length request"));
        }
        // First, because an oversized write's payload was drained, not kept: it must never
        // reach the backend, whatever its range.
        if matches!(req.command, Command::Read | Command::Write)
            && req.length > ctx.max_request_bytes
        {
            return Err((NBD_EINVAL, "payload larger than the maximum block size"));
        }
        match req.offset.checked_add(u64::from(req.length)) {
            Some(end) if end <= ctx.size => {}
            _ => {
                return Err((
                    past_the_end_errno(req.command),
                    "request beyond the end of the export",
                ))
            }
        }
    }
    Ok(())
}

/// The errno for a request that reaches past the end of the export. proto.md ("Error
/// values"): a write or write-zeroes there SHOULD get `NBD_ENOSPC` (the device has no room
/// for it), a read or trim `NBD_EINVAL`. nbdkit answers the same, so both frontends agree.
fn past_the_end_errno(command: Command) -> u32 {
    match command {
        Command::Write | Command::WriteZeroes => NBD_ENOSPC,
        _ => NBD_EINVAL,
    }
}

fn backend_error_reply(ctx: &Ctx, req: &Request, e: &Error) -> Vec<u8> {
    let errno = errno_of(e);
    debug!(?req, error = %e, errno, "request failed");
    error_reply(ctx, req, errno, &e.to_string())
}

/// An error reply: a structured error chunk for reads (which must not get simple replies once
/// structured replies are on), a simple reply otherwise.
fn error_reply(ctx: &Ctx, req: &Request, errno: u32, message: &str) -> Vec<u8> {
    if ctx.structured && req.command == Command::Read {
        let mut out = Vec::new();
        Chunk::Error {
            error: errno,
            message: message.to_owned(),
        }
        .encode_into(req.cookie, true, &mut out);
        out
    } else {
        SimpleReply {
            error: errno,
            cookie: req.cookie,
        }
        .encode()
        .to_vec()
    }
}

/// A valid write [`WriteTurns::may_try_nowait`] allows, done at once if the backend can do it
/// without waiting ([`ExportBackend::try_write_nowait`]); its reply. `None`: dispatch it as
/// usual (which also validates and reports errors).
fn write_nowait(ctx: &Ctx, req: &Request, payload: &[u8]) -> Option<Vec<u8>> {
    if !ctx
        .writes
        .may_try_nowait(payload.len(), req.has(CMD_FLAG_FUA))
        || validate(ctx, req).is_err()
    {
        return None;
    }
    ctx.backend.try_write_nowait(req.offset, payload)?;
    Some(
        SimpleReply {
            error: 0,
            cookie: req.cookie,
        }
        .encode()
        .to_vec(),
    )
}

/// The reply to a read the backend can serve without waiting
/// ([`ExportBackend::try_read_nowait`]): one simple reply or one data chunk. `None` sends the
/// read down the blocking path, which also produces any error reply.
fn read_nowait(ctx: &Ctx, req: &Request) -> Option<Vec<u8>> {
    validate(ctx, req).ok()?;
    let len = req.length as usize;
    let head = if ctx.structured {
        STRUCTURED_HEADER_LEN + 8
    } else {
        SIMPLE_REPLY_LEN
    };
    let mut out = ctx.buffers.take(head + len);
    if ctx
        .backend
        .try_read_nowait(req.offset, &mut out[head..])
        .is_none()
    {
        ctx.buffers.put(out);
        return None;
    }
    if ctx.structured {
        let header = ChunkHeader {
            flags: REPLY_FLAG_DONE,
            chunk_type: REPLY_TYPE_OFFSET_DATA,
            cookie: req.cookie,
            length: req.length.checked_add(8)?,
        };
        out[..STRUCTURED_HEADER_LEN].copy_from_slice(&header.encode());
        out[STRUCTURED_HEADER_LEN..head].copy_from_slice(&req.offset.to_be_bytes());
    } else {
        let reply = SimpleReply {
            error: 0,
            cookie: req.cookie,
        };
        out[..SIMPLE_REPLY_LEN].copy_from_slice(&reply.encode());
    }
    Some(out)
}

fn read_reply(ctx: &Ctx, req: &Request) -> Vec<u8> {
    let len = req.length as usize;
    let b = ctx.backend.as_ref();
    if !ctx.structured {
        let mut out = Vec::with_capacity(SIMPLE_REPLY_LEN + len);
        out.extend_from_slice(
            &SimpleReply {
                error: 0,
                cookie: req.cookie,
            }
            .encode(),
        );
        out.resize(SIMPLE_REPLY_LEN + len, 0);
        return match b.read(req.offset, &mut out[SIMPLE_REPLY_LEN..]) {
            Ok(()) => out,
            Err(e) => backend_error_reply(ctx, req, &e),
        };
    }
    let pieces = if req.has(CMD_FLAG_DF) {
        vec![(u64::from(req.length), false)]
    } else {
        read_pieces(b, req.offset, u64::from(req.length))
    };
    let mut out = Vec::with_capacity(len + 64);
    let mut last_header = 0;
    let mut pos = req.offset;
    for (length, zero) in pieces {
        last_header = out.len();
        if zero {
            // Pieces are at most the request length, which is a u32.
            let length = u32::try_from(length).unwrap_or(u32::MAX);
            Chunk::OffsetHole {
                offset: pos,
                length,
            }
            .encode_into(req.cookie, false, &mut out);
        } else {
            // Header and offset first, then the backend reads straight into the frame.
            out.extend_from_slice(&[0u8; STRUCTURED_HEADER_LEN]);
            out.extend_from_slice(&pos.to_be_bytes());
            let start = out.len();
            out.resize(start + length as usize, 0);
            if let Err(e) = b.read(pos, &mut out[start..]) {
                return backend_error_reply(ctx, req, &e);
            }
            let header = ChunkHeader {
                flags: 0,
                chunk_type: REPLY_TYPE_OFFSET_DATA,
                cookie: req.cookie,
                length: (8 + length) as u32,
            };
            out[last_header..last_header + STRUCTURED_HEADER_LEN].copy_from_slice(&header.encode());
        }
        pos += length;
    }
    // The flags field sits right after the magic.
    out[last_header + 4..last_header + 6].copy_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
    out
}

/// Splits a read into (length, reads-as-zero) pieces using the backend's block status. Falls
/// back to one data piece when the backend cannot tell.
fn read_pieces(b: &dyn ExportBackend, offset: u64, len: u64) -> Vec<(u64, bool)> {
    let mut pieces: Vec<(u64, bool)> = Vec::new();
    let mut done = 0;
    while done < len {
        let extents = match b.block_status(offset + done, len - done) {
            Ok(e) => e,
            Err(_) => return vec![(len, false)],
        };
        let before = done;
        for Extent { length, hole, zero } in extents {
            let length = length.min(len - done);
            if length == 0 {
                continue;
            }
            let zero = hole || zero;
            match pieces.last_mut() {
                Some(last) if last.1 == zero => last.0 += length,
                _ => pieces.push((length, zero)),
            }
            done += length;
            if done == len {
                break;
            }
        }
        if done == before {
            // A backend that reports nothing would loop forever.
            return vec![(len, false)];
        }
    }
    pieces
}

fn block_status_reply(ctx: &Ctx, req: &Request) -> Vec<u8> {
    let extents = match ctx.backend.block_status(req.offset, u64::from(req.length)) {
        Ok(e) => e,
        Err(e) => return backend_error_reply(ctx, req, &e),
    };
    let mut remaining = u64::from(req.length);
    let mut descriptors: Vec<BlockDescriptor> = Vec::new();
    for e in extents {
        let length = e.length.min(remaining);
        if length == 0 {
            continue;
        }
        let flags =
            if e.hole { STATE_HOLE } else { 0 } | if e.hole || e.zero { STATE_ZERO } else { 0 };
        match descriptors.last_mut() {
            Some(last) if last.flags == flags => last.length += length as u32,
            _ => descriptors.push(BlockDescriptor {
                length: length as u32,
                flags,
            }),
        }
        remaining -= length;
    }
    if descriptors.is_empty() {
        let kind = ErrorKind::Io;
        return error_reply(ctx, req, errno_of_kind(kind), "backend reported no extents");
    }
    if req.has(CMD_FLAG_REQ_ONE) {
        descriptors.truncate(1);
    }
    let mut out = Vec::new();
    Chunk::BlockStatus {
        context_id: BASE_ALLOCATION_ID,
        descriptors,
    }
    .encode_into(req.cookie, true, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::nbd::backend::tests::{Overlapping, NOWAIT_WRITE_MAX};
    use crate::nbd::memory::MemoryExport;

    /// A memory export whose non-blocking read serves only ranges written before (all data),
    /// like the engine's, and counts how often it was asked.
    struct Fast {
        inner: MemoryExport,
        written_below: u64,
        asked: std::sync::atomic::AtomicUsize,
    }

    impl ExportBackend for Fast {
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn read_only(&self) -> bool {
            false
        }
        fn preferred_block_size(&self) -> u32 {
            4096
        }
        fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
            self.inner.read(offset, buf)
        }
        fn try_read_nowait(&self, offset: u64, buf: &mut [u8]) -> Option<()> {
            self.asked
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if offset + buf.len() as u64 > self.written_below {
                return None;
            }
            self.inner.read(offset, buf).ok()
        }
        fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
            self.inner.write(offset, data, fua)
        }
        fn flush(&self) -> Result<()> {
            Ok(())
        }
        fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
            self.inner.trim(offset, len, fua)
        }
        fn write_zeroes(&self, o: u64, l: u64, u: bool, f: bool, fua: bool) -> Result<()> {
            self.inner.write_zeroes(o, l, u, f, fua)
        }
        fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
            self.inner.block_status(offset, len)
        }
        fn cache(&self, _offset: u64, _len: u64) -> Result<()> {
            Ok(())
        }
    }

    fn ctx(structured: bool) -> (Ctx, Arc<Fast>) {
        let inner = MemoryExport::new(1 << 20);
        let data: Vec<u8> = (0..256 << 10)
            .map(|i: u32| (i * 7 + i / 4096) as u8)
            .collect();
        inner.write(0, &data, false).unwrap();
        let fast = Arc::new(Fast {
            inner,
            written_below: 256 << 10,
            asked: Default::default(),
        });
        let c = Ctx {
            writes: WriteTurns::new(fast.as_ref()),
            backend: fast.clone(),
            size: 1 << 20,
            read_only: false,
            structured,
            base_allocation: structured,
            max_request_bytes: 32 << 20,
            buffers: Buffers::default(),
        };
        (c, fast)
    }

    fn read(cookie: u64, flags: u16, offset: u64, length: u32) -> Request {
        Request {
            flags,
            command: Command::Read,
            cookie,
            offset,
            length,
        }
    }

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
        let shared = Arc::new(Shared {
            source: Arc::new(crate::nbd::memory::MemorySource::new()),
            config: crate::nbd::ServerConfig::default(),
        });
        let (client, server) = tokio::io::duplex(4 << 20);
        let (stop_tx, stop_rx) = watch::channel(false);
        let n = Negotiated {
            name: "q".into(),
            backend,
            flags: 0,
            structured: false,
            base_allocation: false,
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
                    out.extend(std::iter::repeat_n(i as u8 + 1, len as usize));
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
            let mut all = vec![0u8; (N * u64::from(large)) as usize];
            backend.read(0, &mut all).unwrap();
            for (i, chunk) in all.chunks(large as usize).enumerate() {
                assert!(chunk.iter().all(|&b| b == i as u8 + 1), "write {i}");
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
                out.extend(std::iter::repeat_n(i as u8 + 1, length as usize));
            }
            client.write_all(&out).await.unwrap();
            let got = replies(&mut client, N).await;
            assert_eq!(got.len(), N as usize);
            for (i, (cookie, error)) in got.into_iter().enumerate() {
                assert_eq!(cookie, i as u64);
                let want = if cookie == 30 { NBD_ENOSPC } else { 0 };
                assert_eq!(error, want, "reply to {cookie}");
            }
            let mut all = vec![0u8; (N * 4096) as usize];
            backend.0.read(0, &mut all).unwrap();
            for (i, chunk) in all.chunks(4096).enumerate() {
                let want = if i == 20 || i == 30 { 0 } else { i as u8 + 1 };
                assert!(chunk.iter().all(|&b| b == want), "block {i}");
            }
            let inline = backend.1.load(std::sync::atomic::Ordering::SeqCst);
            let blocking = backend.2.load(std::sync::atomic::Ordering::SeqCst);
            assert_eq!((inline, blocking), (N as usize - 3, 1), "inline, blocking");
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

    #[test]
    fn large_buffers_are_reused_small_and_huge_ones_are_not() {
        let b = Buffers::default();
        let v = b.take(1 << 20);
        assert_eq!(v.len(), 1 << 20);
        let ptr = v.as_ptr();
        b.put(v);
        let again = b.take((1 << 20) - 100);
        assert_eq!((again.len(), again.as_ptr()), ((1 << 20) - 100, ptr));
        b.put(vec![0u8; 4096]);
        b.put(vec![0u8; 32 << 20]);
        assert!(b.pool().is_empty(), "only 64 KiB to 1 MiB buffers are kept");
        for _ in 0..2 * POOLED_COUNT {
            b.put(vec![0u8; 128 << 10]);
        }
        assert_eq!(b.pool().len(), POOLED_COUNT);
        assert_eq!(
            b.take(100).capacity(),
            100,
            "small frames come from the allocator"
        );
    }

    #[test]
    fn nowait_reads_reply_exactly_as_the_blocking_path_does() {
        for structured in [false, true] {
            let (c, _) = ctx(structured);
            for (flags, offset, length) in [(0, 0, 4096), (0, 4095, 70_000), (CMD_FLAG_DF, 8192, 1)]
            {
                let req = read(9, flags, offset, length);
                let fast = read_nowait(&c, &req).expect("written range is served at once");
                assert_eq!(
                    fast,
                    read_reply(&c, &req),
                    "structured={structured} {req:?}"
                );
            }
        }
    }

    #[test]
    fn nowait_reads_fall_back_when_the_backend_or_the_request_says_so() {
        let (c, fast) = ctx(true);
        // Partly unwritten: the backend declines; the blocking path sends its hole chunks.
        assert!(read_nowait(&c, &read(1, 0, (256 << 10) - 4096, 8192)).is_none());
        assert_eq!(fast.asked.load(std::sync::atomic::Ordering::Relaxed), 1);
        // Invalid requests never reach the backend; the blocking path sends their errors.
        assert!(read_nowait(&c, &read(2, 0, 1 << 20, 1)).is_none());
        assert!(read_nowait(&c, &read(3, 0, 0, 0)).is_none());
        assert_eq!(fast.asked.load(std::sync::atomic::Ordering::Relaxed), 1);
    }
}
