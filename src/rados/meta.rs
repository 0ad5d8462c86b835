//! The metadata device of a RADOS pool: dm-thin's 4 KiB blocks, 256 to an object
//! (`NAME.meta.<hex block/256>`), a missing object reading zeros. Writes go out as aio writes
//! and [`sync`](BlockIo::sync) waits for all of them, which is the engine's commit barrier:
//! metadata blocks, sync, superblock, sync. A read after a write of the same block sees it
//! (RADOS orders one client's operations on one object).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::cluster::PendingWrite;
use super::names::META_BLOCKS_PER_OBJECT;
use super::{Cluster, PoolObjects, RadosLocation};
use crate::error::{Error, ErrorKind, Result};
use crate::pdata::block_io::{zeroed_block, Block, BlockIo, BLOCK_SIZE};

/// Writes in flight before `write_block` waits for the oldest half: bounds memory when a
/// commit writes a great many blocks.
const MAX_IN_FLIGHT: usize = 4096;

/// A pool's metadata as RADOS objects.
pub struct RadosBlockIo {
    cluster: Arc<Cluster>,
    objects: PoolObjects,
    /// Grows (never shrinks) when the metadata is enlarged; the header keeps it across opens.
    nr_blocks: AtomicU64,
    in_flight: Mutex<Vec<PendingWrite>>,
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

impl BlockIo for RadosBlockIo {
    fn nr_blocks(&self) -> u64 {
        self.nr_blocks.load(Ordering::Acquire)
    }

    fn read_block(&self, location: u64) -> Result<Box<Block>> {
        let mut block = zeroed_block();
        self.read_blocks(location, &mut block[..])?;
        Ok(block)
    }

    /// One read per object the range touches.
    fn read_blocks(&self, location: u64, buf: &mut [u8]) -> Result<()> {
        let count = (buf.len() / BLOCK_SIZE) as u64;
        self.check_range(location, count)?;
        let mut done = 0u64;
        while done < count {
            let at = location + done;
            let in_object =
                (META_BLOCKS_PER_OBJECT - at % META_BLOCKS_PER_OBJECT).min(count - done);
            let start = usize::try_from(done).unwrap_or(usize::MAX) * BLOCK_SIZE;
            let len = usize::try_from(in_object).unwrap_or(usize::MAX) * BLOCK_SIZE;
            let piece = &mut buf[start..start + len];
            let got = self
                .cluster
                .read_at(&self.objects.meta(at), piece, Self::byte_in_object(at))
                .map_err(|e| e.within(format!("reading metadata block {at}")))?
                .unwrap_or(0);
            piece[got..].fill(0);
            done += in_object;
        }
        Ok(())
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
            if in_flight.len() < MAX_IN_FLIGHT {
                return Ok(());
            }
            in_flight.drain(..MAX_IN_FLIGHT / 2).collect::<Vec<_>>()
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
