//! The seam between the NBD server and whatever stores the bytes: one export
//! (`ExportBackend`) and the set of exports a server offers (`ExportSource`).
//!
//! The I/O engine implements these for thin volumes; `memory` implements them for tests.

use std::sync::Arc;

use crate::error::Result;

/// One export as the server sees it. Methods block (they do disk I/O): the server calls them
/// off the async executor (spawn_blocking), never on it; only the `try_*_nowait` methods,
/// which must not wait for anything, run on it.
pub trait ExportBackend: Send + Sync + 'static {
    fn size(&self) -> u64;
    fn read_only(&self) -> bool;
    /// The I/O size that avoids read-modify-write, e.g. the pool block size, or 4096.
    fn preferred_block_size(&self) -> u32;
    /// Fills `buf` from `offset`; holes read as zeros.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Serves a read at once if that needs no waiting at all (no lock to wait for, no device
    /// I/O: the bytes are in memory), so the server can answer it on its event loop without a
    /// hop to a blocking thread. `None`: not now (or an error); the server then calls
    /// [`read`](Self::read) off the executor. A backend that fills `buf` here promises the
    /// range holds only data (no holes), so one data chunk is the right structured reply.
    fn try_read_nowait(&self, offset: u64, buf: &mut [u8]) -> Option<()> {
        let _ = (offset, buf);
        None
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()>;
    /// Does a write at once if that needs no waiting at all (no lock or cell to wait for, no
    /// commit, no full pool), so the server can run it on its event loop without a hop to a
    /// blocking thread. `None`: not now (or an error); the server then calls
    /// [`write`](Self::write) off the executor with the same bytes, so a backend may decline
    /// after writing part of the range. Never called for FUA writes.
    fn try_write_nowait(&self, offset: u64, data: &[u8]) -> Option<()> {
        let _ = (offset, data);
        None
    }
    /// Makes every completed write durable (from any connection).
    fn flush(&self) -> Result<()>;
    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()>;
    /// `may_unmap` = !NO_HOLE. `fast_only` = FAST_ZERO: return Err(Unsupported) if it would be slow.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fast_only: bool,
        fua: bool,
    ) -> Result<()>;
    /// Extents covering [offset, offset+len) (may stop early, must cover at least one byte).
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>>;
    fn cache(&self, offset: u64, len: u64) -> Result<()>;
}

/// A run of bytes with the same allocation state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    /// Not allocated.
    pub hole: bool,
    /// Reads as zeros.
    pub zero: bool,
}

/// What `NBD_OPT_LIST` tells about one export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub description: String,
}

/// The set of exports; opening is cheap (an Arc clone of something already active).
pub trait ExportSource: Send + Sync + 'static {
    fn list(&self) -> Vec<ExportInfo>;
    /// The export used for the empty export name "".
    fn default_export(&self) -> Option<String>;
    /// `NotFound` for unknown names.
    fn open(&self, name: &str) -> Result<Arc<dyn ExportBackend>>;
}
