//! The request side of a connection: reads each request header and write payload, takes the
//! permits that bound what a connection holds, validates requests against the export, and
//! hands them on (`execute`).

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;
use tracing::trace;

use super::execute::{dispatch, read_nowait, write_nowait, Pending};
use super::writer::Outgoing;
use super::{protocol_error, Ctx};
use crate::error::{Error, Result};
use crate::nbd::busy_poll::PollWindow;
use crate::nbd::codec::{Command, Request, REQUEST_LEN};
use crate::nbd::shared::{stopped, ServerConfig};
use crate::nbd::{NBD_EINVAL, NBD_ENOSPC, NBD_EPERM};

/// Reads requests until the client disconnects, the server stops or the stream goes bad, and
/// sends each on its way: done at once when the backend can do it without waiting, else
/// dispatched to `tasks`. Returns why the connection ends.
pub(super) async fn read_requests<R: AsyncRead + Unpin>(
    rd: R,
    ctx: &Arc<Ctx>,
    cfg: &ServerConfig,
    tx: &mpsc::Sender<Outgoing>,
    tasks: &mut JoinSet<()>,
    stop: &mut watch::Receiver<bool>,
) -> Result<&'static str> {
    let mut rd = BufReader::with_capacity(64 << 10, rd);
    let count = Arc::new(Semaphore::new(cfg.max_inflight_per_connection));
    let byte_cap = cfg.max_inflight_bytes_per_connection;
    let bytes = Arc::new(Semaphore::new(byte_cap));
    let mut poll = PollWindow::new(cfg.busy_poll_max);
    loop {
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
            _ = stopped(stop) => return Ok("server shutting down"),
            _ = tx.closed() => return Ok("reply writer stopped"),
            r = rd.read_exact(&mut hdr) => match r {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok("closed without NBD_CMD_DISC"),
                Err(e) => return Err(Error::io("reading request", e)),
            },
        }
        if let Some(t) = idle_since {
            poll.waited(t.elapsed());
        }
        let req = match Request::decode(&hdr) {
            Ok(r) => r,
            Err(e) => return Err(e),
        };
        trace!(?req, "request");
        if req.command == Command::Disc {
            return Ok("NBD_CMD_DISC");
        }
        // A write above the maximum is drained and answered (see [`MAX_DRAINED_WRITE`]).
        let drained_write = req.command == Command::Write && req.length > ctx.max_request_bytes;
        if drained_write && req.length > MAX_DRAINED_WRITE {
            return protocol_error(format!(
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
            _ = stopped(stop) => return Ok("server shutting down"),
            p = permits => match p {
                Ok(p) => p,
                // The semaphores are never closed.
                Err(_) => return Ok("semaphore closed"),
            },
        };
        let payload = if drained_write {
            // Through the reader's own buffer: draining costs no memory. `execute` answers
            // EINVAL (`validate` checks the size first), so the empty payload is never used.
            let mut rest = (&mut rd).take(u64::from(req.length));
            let mut sink = tokio::io::sink();
            tokio::select! {
                _ = stopped(stop) => return Ok("server shutting down"),
                r = tokio::io::copy_buf(&mut rest, &mut sink) => match r {
                    Ok(n) if n == u64::from(req.length) => {}
                    Ok(_) => {
                        let eof = io::Error::from(io::ErrorKind::UnexpectedEof);
                        return Err(Error::io("draining an oversized write payload", eof));
                    }
                    Err(e) => return Err(Error::io("draining an oversized write payload", e)),
                },
            }
            Vec::new()
        } else if req.command == Command::Write {
            // Overwritten whole by read_exact (or the connection ends).
            let mut payload = ctx.buffers.take(req.length as usize);
            tokio::select! {
                _ = stopped(stop) => return Ok("server shutting down"),
                r = rd.read_exact(&mut payload) => if let Err(e) = r {
                    return Err(Error::io("reading write payload", e));
                },
            }
            payload
        } else {
            Vec::new()
        };
        // What the backend can do without waiting (reads from memory, small writes) is done
        // here, on the event loop: the hop to a blocking thread and back costs more.
        let done_here = match req.command {
            Command::Read => read_nowait(ctx, &req),
            Command::Write => write_nowait(ctx, &req, &payload),
            _ => None,
        };
        if let Some(bytes) = done_here {
            ctx.buffers.put(payload);
            let out = Outgoing {
                bytes,
                _permits: (c, b),
            };
            if tx.send(out).await.is_err() {
                return Ok("reply writer stopped");
            }
            if tx.max_capacity() - tx.capacity() >= REPLIES_BEFORE_YIELD {
                tokio::task::yield_now().await;
            }
            continue;
        }
        dispatch(
            tasks,
            Pending {
                req,
                payload,
                permits: (c, b),
            },
            ctx,
            tx,
        );
    }
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

/// Protocol-level checks, before the backend sees the request.
pub(super) fn validate(ctx: &Ctx, req: &Request) -> std::result::Result<(), (u32, &'static str)> {
    let ranged = match req.command {
        Command::Read | Command::Cache => true,
        Command::Write | Command::Trim | Command::WriteZeroes => {
            if ctx.read_only {
                return Err((NBD_EPERM, "export is read-only"));
            }
            true
        }
        Command::BlockStatus => {
            if !ctx.base_allocation && ctx.contexts.is_empty() {
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
