//! The NBD protocol: the wire codec (`codec`, no I/O), the backend seam (`backend`), an
//! in-memory backend for tests (`memory`, built only for tests and the `testing` feature) and
//! the tokio server: `server` accepts clients, `connection` serves each, and both read `shared`
//! (limits, export source, TLS credentials, connection slots, shutdown). `tls` holds the TLS
//! settings, credentials and handshake.
//!
//! `errno_of` is the one place where an error kind becomes an NBD errno.

pub mod backend;
mod busy_poll;
pub mod codec;
mod connection;
#[cfg(any(test, feature = "testing"))]
pub mod memory;
pub mod server;
mod shared;
pub mod tls;

pub use backend::{
    extents_at, preferred_block_size, BlockSizes, ContextExtent, ExportBackend, ExportInfo,
    ExportSource, Extent, PeerIdentity, WriteTurns, MAX_CONTEXT_EXTENTS,
};
pub use server::{serve, serve_with_tls, Listener};
pub use shared::{
    ServerConfig, DEFAULT_BUSY_POLL_MAX, DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_INFLIGHT_PER_CONNECTION, DEFAULT_MAX_REQUEST_BYTES,
};

use crate::error::{Error, ErrorKind};

pub const NBD_EPERM: u32 = 1;
pub const NBD_EIO: u32 = 5;
pub const NBD_ENOMEM: u32 = 12;
pub const NBD_EINVAL: u32 = 22;
pub const NBD_ENOSPC: u32 = 28;
pub const NBD_EOVERFLOW: u32 = 75;
pub const NBD_ENOTSUP: u32 = 95;
pub const NBD_ESHUTDOWN: u32 = 108;

/// The NBD errno a client sees for an error of this kind.
pub fn errno_of(e: &Error) -> u32 {
    errno_of_kind(e.kind())
}

/// `errno_of` for a bare kind (the server's own protocol checks have no `Error` to hand).
pub fn errno_of_kind(kind: ErrorKind) -> u32 {
    match kind {
        ErrorKind::NoSpace => NBD_ENOSPC,
        ErrorKind::OutOfBounds | ErrorKind::InvalidInput | ErrorKind::NotFound => NBD_EINVAL,
        ErrorKind::ReadOnly => NBD_EPERM,
        // Fenced: the write did not land and will not, whoever retries it on this connection.
        ErrorKind::Io | ErrorKind::Corrupt | ErrorKind::Fenced => NBD_EIO,
        ErrorKind::Unsupported => NBD_ENOTSUP,
        // Busy reaches a request only while its volume or pool is going away.
        ErrorKind::Busy => NBD_ESHUTDOWN,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_mapping_is_stable() {
        let cases = [
            (ErrorKind::NoSpace, 28),
            (ErrorKind::OutOfBounds, 22),
            (ErrorKind::InvalidInput, 22),
            (ErrorKind::NotFound, 22),
            (ErrorKind::ReadOnly, 1),
            (ErrorKind::Io, 5),
            (ErrorKind::Corrupt, 5),
            (ErrorKind::Unsupported, 95),
            (ErrorKind::Busy, 108),
            (ErrorKind::Fenced, 5),
        ];
        for (kind, errno) in cases {
            assert_eq!(errno_of(&Error::new(kind, "x")), errno, "{kind:?}");
        }
    }

    #[test]
    fn no_space_is_not_eio() {
        let e = Error::new(ErrorKind::NoSpace, "pool full").within("write");
        assert_eq!(errno_of(&e), NBD_ENOSPC);
    }
}
