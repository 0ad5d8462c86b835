//! The metadata device of a RADOS pool: dm-thin's 4 KiB blocks, 256 to an object
//! (`NAME.meta.<hex block/256>`), a missing object reading zeros. Writes go out as aio writes
//! and [`sync`](BlockIo::sync) waits for all of them, which is the engine's commit barrier:
//! metadata blocks, sync, superblock, sync. A read after a write of the same block sees it
//! (RADOS orders one client's operations on one object).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::cluster::PendingOp;
use super::names::META_BLOCKS_PER_OBJECT;
use super::{Cluster, PoolObjects, RadosLocation};
use crate::error::{Error, ErrorKind, Result};
use crate::pdata::block_io::{zeroed_block, Block, BlockIo, BLOCK_SIZE};

/// Writes in flight before `write_block` waits for the oldest half: bounds memory when a
/// commit writes a great many blocks.
const MAX_UNSYNCED_WRITES: usize = 4096;

/// A pool's metadata as RADOS objects.
pub struct RadosBlockIo {
    cluster: Arc<Cluster>,
    objects: PoolObjects,
    /// Grows (never shrinks) when the metadata is enlarged; the header keeps it across opens.
    nr_blocks: AtomicU64,
    in_flight: Mutex<Vec<PendingOp>>,
    /// The first failure of a write waited for outside `sync`, reported by the next `sync`.
    failed: Mutex<Option<Error>>,
}

impl RadosBlockIo {
    /// The metadata of the pool at `loc`, `nr_blocks` blocks long (from its header).
    pub fn new(cluster: Arc<Cluster>, loc: &RadosLocation, nr_blocks: u64) -> Self {
        RadosBlockIo {
            cluster,
            objects: PoolObjects::new(loc),
            nr_blocks: AtomicU64::new(nr_blocks),
            in_flight: Mutex::new(Vec::new()),
            failed: Mutex::new(None),
        }
    }

    fn check_range(&self, location: u64, count: u64) -> Result<()> {
        let nr_blocks = self.nr_blocks();
        if location.saturating_add(count) > nr_blocks {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "metadata blocks {location}..{}: past the end of the device ({nr_blocks} blocks)",
                    location.saturating_add(count)
                ),
            ));
        }
        Ok(())
    }

    fn byte_in_object(location: u64) -> u64 {
        (location % META_BLOCKS_PER_OBJECT) * BLOCK_SIZE as u64
    }

    fn remember_failure(&self, e: Error) {
        self.failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(e);
    }
}

impl Drop for RadosBlockIo {
    /// Writes still in flight end before the connection may go (this may hold its last
    /// reference): a completion must not outlive its cluster handle.
    fn drop(&mut self) {
        let writes = std::mem::take(self.in_flight.get_mut().unwrap_or_else(|p| p.into_inner()));
        drop(writes);
    }
}

impl BlockIo for RadosBlockIo {
    fn nr_blocks(&self) -> u64 {
        self.nr_blocks.load(Ordering::Acquire)
    }

    fn read_block(&self, location: u64) -> Result<Box<Block>> {
        let mut block = zeroed_block();
        self.read_blocks(location, &mut block[..])?;
        Ok(block)
    }

    /// One read per object the range touches, in parallel.
    fn read_blocks(&self, location: u64, buf: &mut [u8]) -> Result<()> {
        let count = (buf.len() / BLOCK_SIZE) as u64;
        self.check_range(location, count)?;
        let mut reads = Vec::new();
        let mut rest = &mut buf[..];
        let mut at = location;
        while !rest.is_empty() {
            let in_object = META_BLOCKS_PER_OBJECT - at % META_BLOCKS_PER_OBJECT;
            let len =
                usize::try_from(in_object).map_or(rest.len(), |n| (n * BLOCK_SIZE).min(rest.len()));
            let (piece, tail) = std::mem::take(&mut rest).split_at_mut(len);
            rest = tail;
            reads.push((self.objects.meta(at), piece, Self::byte_in_object(at)));
            at += in_object;
        }
        self.cluster.read_many(&mut reads).map_err(|e| {
            e.within(format!(
                "reading metadata blocks {location}..{}",
                location + count
            ))
        })
    }

    fn write_block(&self, location: u64, data: &Block) -> Result<()> {
        self.check_range(location, 1)?;
        let pending = self
            .cluster
            .write_async(
                &self.objects.meta(location),
                &data[..],
                Self::byte_in_object(location),
            )
            .map_err(|e| e.within(format!("writing metadata block {location}")))?;
        let oldest = {
            let mut in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            in_flight.push(pending);
            if in_flight.len() < MAX_UNSYNCED_WRITES {
                return Ok(());
            }
            in_flight
                .drain(..MAX_UNSYNCED_WRITES / 2)
                .collect::<Vec<_>>()
        };
        for write in oldest {
            if let Err(e) = write.wait() {
                self.remember_failure(e);
            }
        }
        Ok(())
    }

    /// Waits for every write issued so far; the first failure since the last sync is its
    /// error.
    fn sync(&self) -> Result<()> {
        let writes = std::mem::take(&mut *self.in_flight.lock().unwrap_or_else(|p| p.into_inner()));
        for write in writes {
            if let Err(e) = write.wait() {
                self.remember_failure(e);
            }
        }
        match self.failed.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some(e) => Err(e.within("syncing metadata")),
            None => Ok(()),
        }
    }

    /// Objects are made by writing them: growing only moves the end.
    fn grow(&self, nr_blocks: u64) -> Result<()> {
        self.nr_blocks.fetch_max(nr_blocks, Ordering::AcqRel);
        Ok(())
    }
}
