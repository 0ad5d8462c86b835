//! Whole-block I/O on a metadata device: the file engine used in production and an in-memory
//! engine that models durable versus volatile bytes, so tests can cut power at any point.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::{Error, ErrorKind, Result};
use crate::util::usize_from_u64;

/// Metadata block size in bytes (dm-thin's `THIN_METADATA_BLOCK_SIZE`).
pub const BLOCK_SIZE: usize = 4096;

/// One metadata block, always owned: nobody hands out `&mut` into a shared buffer.
pub type Block = [u8; BLOCK_SIZE];

pub fn zeroed_block() -> Box<Block> {
    Box::new([0u8; BLOCK_SIZE])
}

/// Positioned reads and writes of 4 KiB blocks, plus a durability barrier.
pub trait BlockIo: Send + Sync {
    fn nr_blocks(&self) -> u64;
    fn read_block(&self, location: u64) -> Result<Box<Block>>;
    fn write_block(&self, location: u64, data: &Block) -> Result<()>;
    /// Makes every completed write durable.
    fn sync(&self) -> Result<()>;
    /// Makes at least `nr_blocks` blocks addressable: a file is extended, a device must have
    /// been enlarged already. Devices that cannot grow refuse.
    fn grow(&self, nr_blocks: u64) -> Result<()> {
        if nr_blocks <= self.nr_blocks() {
            return Ok(());
        }
        Err(Error::new(
            ErrorKind::Unsupported,
            "this metadata device cannot grow",
        ))
    }
}

fn check_range(location: u64, nr_blocks: u64) -> Result<()> {
    if location >= nr_blocks {
        return Err(Error::new(
            ErrorKind::Corrupt,
            format!("metadata block {location} is past the end of the device ({nr_blocks} blocks)"),
        ));
    }
    Ok(())
}

/// A metadata file or block device read and written with `pread`/`pwrite`.
pub struct FileBlockIo {
    file: File,
    /// Grows (never shrinks) when the pool's metadata device is enlarged online.
    nr_blocks: AtomicU64,
}

impl FileBlockIo {
    pub fn new(file: File) -> Result<Self> {
        let len = crate::util::device_size(&file).map_err(|e| Error::io("sizing metadata", e))?;
        Ok(FileBlockIo {
            file,
            nr_blocks: AtomicU64::new(len / BLOCK_SIZE as u64),
        })
    }
}

impl BlockIo for FileBlockIo {
    fn nr_blocks(&self) -> u64 {
        self.nr_blocks.load(Ordering::Acquire)
    }

    fn read_block(&self, location: u64) -> Result<Box<Block>> {
        check_range(location, self.nr_blocks())?;
        let mut buf = zeroed_block();
        self.file
            .read_exact_at(&mut buf[..], location * BLOCK_SIZE as u64)
            .map_err(|e| Error::io(format!("reading metadata block {location}"), e))?;
        Ok(buf)
    }

    fn write_block(&self, location: u64, data: &Block) -> Result<()> {
        check_range(location, self.nr_blocks())?;
        self.file
            .write_all_at(&data[..], location * BLOCK_SIZE as u64)
            .map_err(|e| Error::io(format!("writing metadata block {location}"), e))
    }

    fn sync(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| Error::io("syncing metadata", e))
    }

    fn grow(&self, nr_blocks: u64) -> Result<()> {
        let want = nr_blocks
            .checked_mul(BLOCK_SIZE as u64)
            .ok_or_else(|| Error::new(ErrorKind::OutOfBounds, "metadata size overflows"))?;
        let meta = self
            .file
            .metadata()
            .map_err(|e| Error::io("inspecting the metadata device", e))?;
        if meta.file_type().is_file() && meta.len() < want {
            // Allocated, not only sized: a commit must never meet a full host file system.
            // A host that cannot hold it refuses the grow (no space), which fails nothing else.
            crate::util::allocate(&self.file, want)
                .map_err(|e| Error::data_io("allocating the grown metadata file", e))?;
        }
        let len =
            crate::util::device_size(&self.file).map_err(|e| Error::io("sizing metadata", e))?;
        if len < want {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("the metadata device has {len} bytes, {want} are needed: enlarge it first"),
            ));
        }
        self.nr_blocks
            .fetch_max(len / BLOCK_SIZE as u64, Ordering::AcqRel);
        Ok(())
    }
}

#[derive(Default)]
struct MemState {
    durable: HashMap<u64, Box<Block>>,
    volatile: HashMap<u64, Box<Block>>,
    /// Operations (writes and syncs) still allowed before the simulated power cut.
    ops_left: Option<u64>,
    ops_done: u64,
    fail_writes: bool,
}

/// In-memory metadata device. Writes stay volatile until `sync`; `crash` drops them. A cut point
/// makes every operation after the N-th fail, as if power went at that moment.
#[derive(Clone)]
pub struct MemBlockIo {
    nr_blocks: u64,
    state: Arc<Mutex<MemState>>,
}

impl MemBlockIo {
    pub fn new(nr_blocks: u64) -> Self {
        MemBlockIo {
            nr_blocks,
            state: Arc::new(Mutex::new(MemState::default())),
        }
    }

    fn lock(&self) -> MutexGuard<'_, MemState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// After `ops` more writes or syncs, everything fails (power is gone).
    pub fn cut_after(&self, ops: u64) {
        self.lock().ops_left = Some(ops);
    }

    /// Makes every later write fail with EIO (a failing metadata device).
    pub fn fail_writes(&self, fail: bool) {
        self.lock().fail_writes = fail;
    }

    /// Number of writes and syncs performed so far.
    pub fn ops_done(&self) -> u64 {
        self.lock().ops_done
    }

    /// Power cut: every unsynced write is lost. Returns a fresh device holding only durable data.
    pub fn crash(&self) -> MemBlockIo {
        let st = self.lock();
        let durable = st.durable.clone();
        MemBlockIo {
            nr_blocks: self.nr_blocks,
            state: Arc::new(Mutex::new(MemState {
                durable,
                ..MemState::default()
            })),
        }
    }

    /// The durable bytes of the device, for writing out to a file.
    pub fn durable_image(&self) -> Vec<u8> {
        let st = self.lock();
        let mut image = vec![0u8; usize_from_u64(self.nr_blocks) * BLOCK_SIZE];
        for (loc, block) in &st.durable {
            let off = usize_from_u64(*loc) * BLOCK_SIZE;
            image[off..off + BLOCK_SIZE].copy_from_slice(&block[..]);
        }
        image
    }

    fn take_op(st: &mut MemState) -> Result<()> {
        if let Some(left) = st.ops_left.as_mut() {
            if *left == 0 {
                return Err(Error::io(
                    "simulated power cut",
                    std::io::Error::from_raw_os_error(libc::EIO),
                ));
            }
            *left -= 1;
        }
        st.ops_done += 1;
        Ok(())
    }
}

impl BlockIo for MemBlockIo {
    fn nr_blocks(&self) -> u64 {
        self.nr_blocks
    }

    fn read_block(&self, location: u64) -> Result<Box<Block>> {
        check_range(location, self.nr_blocks)?;
        let st = self.lock();
        let found = st
            .volatile
            .get(&location)
            .or_else(|| st.durable.get(&location));
        Ok(found.cloned().unwrap_or_else(zeroed_block))
    }

    fn write_block(&self, location: u64, data: &Block) -> Result<()> {
        check_range(location, self.nr_blocks)?;
        let mut st = self.lock();
        if st.fail_writes {
            return Err(Error::io(
                format!("injected write failure at metadata block {location}"),
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        Self::take_op(&mut st)?;
        st.volatile.insert(location, Box::new(*data));
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        let mut st = self.lock();
        Self::take_op(&mut st)?;
        let pending: Vec<_> = st.volatile.drain().collect();
        st.durable.extend(pending);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsynced_writes_are_lost_in_a_crash() {
        let io = MemBlockIo::new(4);
        let mut b = zeroed_block();
        b[0] = 1;
        io.write_block(1, &b).unwrap();
        io.sync().unwrap();
        b[0] = 2;
        io.write_block(1, &b).unwrap();
        io.write_block(2, &b).unwrap();
        let after = io.crash();
        assert_eq!(after.read_block(1).unwrap()[0], 1);
        assert_eq!(after.read_block(2).unwrap()[0], 0);
    }

    #[test]
    fn cut_point_fails_later_operations() {
        let io = MemBlockIo::new(4);
        io.cut_after(1);
        let b = zeroed_block();
        io.write_block(0, &b).unwrap();
        assert!(io.sync().is_err());
        assert!(io.read_block(4).is_err());
    }
}
