//! Running requests against the export: on the blocking pool (`dispatch`), or at once on the
//! event loop when the backend can do it without waiting (`read_nowait`, `write_nowait`); each
//! ends in its whole reply frame.

use std::sync::Arc;

use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio::task::JoinSet;
use tracing::{debug, warn};

use super::reader::validate;
use super::writer::{backend_error_reply, error_reply, simple_reply, Outgoing};
use super::{Ctx, BASE_ALLOCATION_ID};
use crate::error::{Error, ErrorKind};
use crate::nbd::backend::{ExportBackend, Extent, MAX_CONTEXT_EXTENTS};
use crate::nbd::codec::*;
use crate::nbd::{errno_of_kind, NBD_EIO, NBD_EOVERFLOW};
use crate::util::usize_from_u64;

/// A request read in full, with its permits, waiting to be dispatched.
pub(super) struct Pending {
    pub(super) req: Request,
    pub(super) payload: Vec<u8>,
    pub(super) permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
}

/// Runs a request on the blocking pool and queues its reply.
pub(super) fn dispatch(
    tasks: &mut JoinSet<()>,
    p: Pending,
    ctx: &Arc<Ctx>,
    tx: &mpsc::Sender<Outgoing>,
) {
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
        Ok(()) => simple_reply(req, 0),
        Err(e) => backend_error_reply(ctx, req, &e),
    }
}

/// without waiting ([`ExportBackend::try_write_nowait`]); its reply. `None`: dispatch it as
/// usual (which also validates and reports errors).
pub(super) fn write_nowait(ctx: &Ctx, req: &Request, payload: &[u8]) -> Option<Vec<u8>> {
    if !ctx
        .writes
        .may_try_nowait(payload.len(), req.has(CMD_FLAG_FUA))
        || validate(ctx, req).is_err()
    {
        return None;
    }
    ctx.backend.try_write_nowait(req.offset, payload)?;
    Some(simple_reply(req, 0))
}

/// The reply to a read the backend can serve without waiting
/// ([`ExportBackend::try_read_nowait`]): one simple reply or one data chunk. `None` sends the
/// read down the blocking path, which also produces any error reply.
pub(super) fn read_nowait(ctx: &Ctx, req: &Request) -> Option<Vec<u8>> {
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
            // The chunk's length counts its offset too: a piece within 8 bytes of 4 GiB (a
            // maximum request size configured that high) does not fit one chunk.
            let Some(chunk_length) = u32::try_from(length).ok().and_then(|l| l.checked_add(8))
            else {
                return error_reply(ctx, req, NBD_EOVERFLOW, "read too large for one data chunk");
            };
            // Header and offset first, then the backend reads straight into the frame.
            out.extend_from_slice(&[0u8; STRUCTURED_HEADER_LEN]);
            out.extend_from_slice(&pos.to_be_bytes());
            let start = out.len();
            out.resize(start + usize_from_u64(length), 0);
            if let Err(e) = b.read(pos, &mut out[start..]) {
                return backend_error_reply(ctx, req, &e);
            }
            let header = ChunkHeader {
                flags: 0,
                chunk_type: REPLY_TYPE_OFFSET_DATA,
                cookie: req.cookie,
                length: chunk_length,
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

/// One block status chunk per selected context, `base:allocation` first; the last one ends
/// the reply. Any context's error fails the whole request.
fn block_status_reply(ctx: &Ctx, req: &Request) -> Vec<u8> {
    let (offset, len) = (req.offset, u64::from(req.length));
    let mut chunks = Vec::new();
    if ctx.base_allocation {
        let extents = match ctx.backend.block_status(offset, len) {
            Ok(e) => e,
            Err(e) => return backend_error_reply(ctx, req, &e),
        };
        let states = extents.into_iter().map(|e| {
            let flags =
                if e.hole { STATE_HOLE } else { 0 } | if e.hole || e.zero { STATE_ZERO } else { 0 };
            (e.length, flags)
        });
        chunks.push((BASE_ALLOCATION_ID, descriptors(req, states)));
    }
    for context in &ctx.contexts {
        let extents = match ctx.backend.context_status(&context.name, offset, len) {
            Ok(e) => e,
            Err(e) => return backend_error_reply(ctx, req, &e),
        };
        let states = extents.into_iter().map(|e| (e.length, e.flags));
        chunks.push((context.id, descriptors(req, states)));
    }
    if chunks.iter().any(|(_, d)| d.is_empty()) {
        let kind = ErrorKind::Io;
        return error_reply(ctx, req, errno_of_kind(kind), "backend reported no extents");
    }
    let mut out = Vec::new();
    let last = chunks.len().saturating_sub(1);
    for (i, (context_id, descriptors)) in chunks.into_iter().enumerate() {
        Chunk::BlockStatus {
            context_id,
            descriptors,
        }
        .encode_into(req.cookie, i == last, &mut out);
    }
    out
}

/// A context's block descriptors for `req` from its (length, flags) runs: cut to the request
/// (whose length is a u32: so are their sums), runs with the same flags joined, one only with
/// `NBD_CMD_FLAG_REQ_ONE`, at most [`MAX_CONTEXT_EXTENTS`]. Empty when the runs cover nothing.
fn descriptors(req: &Request, runs: impl Iterator<Item = (u64, u32)>) -> Vec<BlockDescriptor> {
    let most = if req.has(CMD_FLAG_REQ_ONE) {
        1
    } else {
        MAX_CONTEXT_EXTENTS
    };
    let mut remaining = req.length;
    let mut out: Vec<BlockDescriptor> = Vec::new();
    for (length, flags) in runs {
        if remaining == 0 {
            break;
        }
        let length = u32::try_from(length).unwrap_or(u32::MAX).min(remaining);
        if length == 0 {
            continue;
        }
        let full = out.len() == most;
        match out.last_mut() {
            Some(last) if last.flags == flags => last.length += length,
            _ if full => break,
            _ => out.push(BlockDescriptor { length, flags }),
        }
        remaining -= length;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::error::Result;
    use crate::nbd::backend::WriteTurns;
    use crate::nbd::connection::buffers::Buffers;
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
            .map(|i: u32| (i * 7 + i / 4096).to_le_bytes()[0])
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
            contexts: Vec::new(),
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

    /// A long answer is cut at the limit (the client asks again from where it ends), never
    /// past the request; runs of one state are joined; REQ_ONE keeps the first.
    #[test]
    fn block_descriptors_stay_within_the_request_and_the_limit() {
        let request = |flags, length| Request {
            flags,
            command: Command::BlockStatus,
            cookie: 1,
            offset: 0,
            length,
        };
        let alternating = || (0..).map(|i: u64| (4096, u32::from(i % 2 == 1)));
        let d = descriptors(
            &request(0, u32::MAX),
            alternating().take(3 * MAX_CONTEXT_EXTENTS),
        );
        assert_eq!(d.len(), MAX_CONTEXT_EXTENTS);
        assert!(d.iter().all(|d| d.length == 4096));
        let d = descriptors(&request(0, 10_000), alternating());
        let lengths: Vec<u32> = d.iter().map(|d| d.length).collect();
        assert_eq!(lengths, [4096, 4096, 10_000 - 8192]);
        let joined = [(4096, 1), (4096, 1), (u64::MAX, 0)].into_iter();
        let d = descriptors(&request(CMD_FLAG_REQ_ONE, 1 << 20), joined);
        assert_eq!(
            d,
            [BlockDescriptor {
                length: 8192,
                flags: 1
            }]
        );
        assert_eq!(descriptors(&request(0, 4096), [(0, 1)].into_iter()), []);
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
