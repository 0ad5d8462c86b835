//! The data store of a RADOS pool: one object per data block (`NAME.data.<hex block>`), a
//! missing object reading zeros. Each call returns when its librados operations have (the
//! objects of a multi-block call in parallel); the engine calls from many threads at once, so
//! requests are in flight in parallel. A write is durable on every replica once acknowledged,
//! so `sync` has nothing to do.
//!
//! Copy-on-write of a shared block copies through this process (read, then write): librados'
//! C API has no server-side copy.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::{Cluster, PoolObjects, RadosLocation};
use crate::engine::data::DataStore;
use crate::error::{Error, ErrorKind, Result};

/// A pool's data blocks as RADOS objects.
pub struct RadosStore {
    cluster: Arc<Cluster>,
    objects: PoolObjects,
    block_size: u64,
    /// Bytes the pool may address; grows with the pool (the header keeps it across opens).
    size: AtomicU64,
}

/// One block's share of a byte range: the block, the offset in it, where in the caller's
/// buffer the piece starts and its length.
struct Piece {
    block: u64,
    offset_in_block: u64,
    start: usize,
    len: usize,
}

impl RadosStore {
    /// The data of the pool at `loc`, of `data_size` bytes in blocks of `block_size` bytes
    /// (from its header).
    pub fn new(
        cluster: Arc<Cluster>,
        loc: &RadosLocation,
        block_size: u64,
        data_size: u64,
    ) -> Result<Self> {
        if block_size == 0 {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "data block size 0 for a RADOS store",
            ));
        }
        Ok(RadosStore {
            cluster,
            objects: PoolObjects::new(loc),
            block_size,
            size: AtomicU64::new(data_size),
        })
    }

    /// The pieces of `len` bytes at `offset`, one per block touched; refused past the end.
    fn pieces(&self, offset: u64, len: usize) -> Result<impl Iterator<Item = Piece> + '_> {
        let end = offset.checked_add(len as u64);
        if end.is_none_or(|end| end > self.size.load(Ordering::Acquire)) {
            return Err(Error::new(
                ErrorKind::OutOfBounds,
                format!(
                    "{len} bytes at byte {offset}: past the end of the data ({} bytes)",
                    self.size.load(Ordering::Acquire)
                ),
            ));
        }
        let mut start = 0usize;
        Ok(std::iter::from_fn(move || {
            if start >= len {
                return None;
            }
            let at = offset + start as u64;
            let offset_in_block = at % self.block_size;
            let room = self.block_size - offset_in_block;
            let piece_len = usize::try_from(room).map_or(len - start, |r| r.min(len - start));
            let piece = Piece {
                block: at / self.block_size,
                offset_in_block,
                start,
                len: piece_len,
            };
            start += piece_len;
            Some(piece)
        }))
    }
}

impl DataStore for RadosStore {
    fn is_remote(&self) -> bool {
        true
    }

    fn size(&self) -> Result<u64> {
        Ok(self.size.load(Ordering::Acquire))
    }

    /// The blocks' objects are read in parallel.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut reads = Vec::new();
        let mut rest = buf;
        for p in self.pieces(offset, rest.len())? {
            let (piece, tail) = std::mem::take(&mut rest).split_at_mut(p.len);
            rest = tail;
            reads.push((self.objects.data(p.block), piece, p.offset_in_block));
        }
        self.cluster.read_many(&mut reads)
    }

    /// The blocks' objects are written in parallel.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let writes: Vec<_> = self
            .pieces(offset, buf.len())?
            .map(|p| {
                (
                    self.objects.data(p.block),
                    &buf[p.start..p.start + p.len],
                    p.offset_in_block,
                )
            })
            .collect();
        self.cluster.write_many(&writes)
    }

    /// Whole blocks lose their objects; the parts of blocks at either end are zeroed.
    fn punch(&self, offset: u64, len: u64) -> Result<bool> {
        let len = usize::try_from(len)
            .map_err(|_| Error::new(ErrorKind::OutOfBounds, format!("punching {len} bytes")))?;
        let mut whole = Vec::new();
        for p in self.pieces(offset, len)? {
            let oid = self.objects.data(p.block);
            if p.offset_in_block == 0 && p.len as u64 == self.block_size {
                whole.push(oid);
            } else {
                self.cluster.zero(&oid, p.offset_in_block, p.len as u64)?;
            }
        }
        self.cluster.remove_many(&whole)?;
        Ok(true)
    }

    fn sync(&self) -> Result<()> {
        Ok(())
    }

    /// Objects are made by writing them: growing only moves the end.
    fn grow_to(&self, bytes: u64) -> Result<bool> {
        Ok(self.size.fetch_max(bytes, Ordering::AcqRel) < bytes)
    }

    fn is_fresh(&self) -> bool {
        false
    }

    /// Every block without an object: one listing of the RADOS pool. An error leaves
    /// nothing known to be zero (the engine then zeroes what it provisions).
    fn zeroed_ranges(&self, end: u64) -> Vec<(u64, u64)> {
        let names = match self.cluster.list_objects(&self.objects.data_prefix()) {
            Ok(names) => names,
            Err(e) => {
                tracing::warn!("listing data objects: {e}");
                return Vec::new();
            }
        };
        let mut present: Vec<u64> = names
            .iter()
            .filter_map(|n| self.objects.data_block_of(n))
            .collect();
        present.sort_unstable();
        let mut ranges = Vec::new();
        let mut from = 0u64;
        for block in present {
            let start = block.saturating_mul(self.block_size).min(end);
            if start > from {
                ranges.push((from, start));
            }
            from = from.max(start.saturating_add(self.block_size).min(end));
        }
        if from < end {
            ranges.push((from, end));
        }
        ranges
    }
}
