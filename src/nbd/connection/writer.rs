//! The reply side of a connection: the one task that writes reply frames to the socket, and
//! the framing of error replies.

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tracing::debug;

use super::Ctx;
use crate::error::Error;
use crate::nbd::codec::{Chunk, Command, Request, SimpleReply};
use crate::nbd::errno_of;

/// A reply frame on its way to the writer; the permits travel with it so that a connection's
/// memory is bounded until the bytes are on the socket.
pub(super) struct Outgoing {
    pub(super) bytes: Vec<u8>,
    pub(super) _permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
}

/// The one task writing to the socket: frames go out whole, batched while more are queued.
pub(super) async fn write_replies<W: AsyncWrite + Unpin>(
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

pub(super) fn backend_error_reply(ctx: &Ctx, req: &Request, e: &Error) -> Vec<u8> {
    let errno = errno_of(e);
    debug!(?req, error = %e, errno, "request failed");
    error_reply(ctx, req, errno, &e.to_string())
}

/// An error reply: a structured error chunk for reads (which must not get simple replies once
/// structured replies are on), a simple reply otherwise.
pub(super) fn error_reply(ctx: &Ctx, req: &Request, errno: u32, message: &str) -> Vec<u8> {
    if ctx.structured && req.command == Command::Read {
        let mut out = Vec::new();
        Chunk::Error {
            error: errno,
            message: message.to_owned(),
        }
        .encode_into(req.cookie, true, &mut out);
        out
    } else {
        simple_reply(req, errno)
    }
}

/// The simple reply to `req` (for a read that succeeded, its data follows).
pub(super) fn simple_reply(req: &Request, errno: u32) -> Vec<u8> {
    SimpleReply {
        error: errno,
        cookie: req.cookie,
    }
    .encode()
    .to_vec()
}
