//! Where a pool's data blocks live: [`DataStore`], what the engine asks of a data device, beside
//! [`BlockIo`](crate::pdata::block_io::BlockIo), what the metadata asks of its device.
//!
//! The engine addresses a store in bytes and holds it as `Arc<dyn DataStore>`. [`file`](mod@file) is the
//! backend of today (a data file or a block device). A new backend (an object store, say) is
//! one new module here and its arm in [`open`], which picks a backend from the pool's location.

pub mod file;

use std::path::Path;
use std::sync::Arc;

use crate::error::Result;

pub use file::{FileStore, DEFAULT_WRITE_CHUNK};

/// A data device: positioned reads and writes of data blocks, deallocation, durability.
///
/// A write that returned may still sit in a volatile cache until [`sync`](Self::sync): the
/// engine syncs before every metadata commit that refers to what it wrote.
pub trait DataStore: Send + Sync {
    /// Bytes the store holds now (it may have grown since the pool opened).
    fn size(&self) -> Result<u64>;

    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// Reads `buf` at `offset` only if that needs no waiting for the device (a cache holds all
    /// of it). `None` means "use [`read_at`](Self::read_at)", which also reports any error.
    /// The default never can.
    fn try_read_cached(&self, _buf: &mut [u8], _offset: u64) -> Option<()> {
        None
    }

    /// Writes all of `buf` at `offset`. A full host is `NoSpace` (see
    /// [`Error::data_io`](crate::error::Error::data_io)), anything else `Io`.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;

    /// Deallocates `len` bytes at `offset` so they read as zeros. `Ok(false)`: the store
    /// cannot (nothing changed, and the engine stops asking).
    fn punch(&self, offset: u64, len: u64) -> Result<bool>;

    /// Makes every completed write durable.
    fn sync(&self) -> Result<()>;

    /// Grows the store to at least `bytes` where it can grow itself (`Ok(false)`: it did not,
    /// say a block device, whose size is what it is). `Ok(true)`: the new range reads zeros.
    fn grow_to(&self, bytes: u64) -> Result<bool>;

    /// Every byte is known to read zeros (a store just created empty): new blocks need no
    /// zeroing, and nothing needs looking up to know it.
    fn is_fresh(&self) -> bool;

    /// Byte ranges below `end` known to read zeros without a look at their contents (holes of
    /// a sparse file). Empty when the store cannot tell.
    fn zeroed_ranges(&self, end: u64) -> Vec<(u64, u64)>;

    /// Reserves backing space for the first `bytes`, so writes there never find the host full.
    /// The default has nothing to reserve.
    fn preallocate(&self, _bytes: u64) -> Result<()> {
        Ok(())
    }

    /// Every read and write is a round trip to other machines (an object store): none is
    /// quick enough to run on a server's event loop, and writes gain from many in flight at
    /// once rather than from taking turns (as buffered writes to one file do).
    fn is_remote(&self) -> bool {
        false
    }

    /// The host storage under the store, where it shares a file system with other users;
    /// `None` when it does not or cannot tell.
    fn host_space(&self) -> Option<HostSpace> {
        None
    }
}

/// Space on the host file system under a data file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostSpace {
    /// Bytes an unprivileged writer can still add to the host file system.
    pub free_bytes: u64,
    /// Bytes of the data file the host has not allocated yet (holes it must fill on writing).
    pub unallocated_bytes: u64,
}

/// Opens the data store at a pool's data location (`create`: a new, empty one when there is
/// none). Writes larger than `write_chunk` bytes are split where the backend cares (see
/// [`FileStore::set_write_chunk`]).
pub fn open(location: &Path, create: bool, write_chunk: u64) -> Result<Arc<dyn DataStore>> {
    let mut store = FileStore::open(location, create)?;
    store.set_write_chunk(write_chunk);
    Ok(Arc::new(store))
}
