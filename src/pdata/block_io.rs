//! Whole-block I/O on a metadata device: the `BlockIo` trait and the file or block device used
//! in production. The in-memory device with power cuts for tests is `mem_block_io`.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, ErrorKind, Result};

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
    /// Reads the blocks from `location` on into `buf` (a whole number of blocks): one request
    /// where the device allows, for readers that go through the metadata front to back.
    fn read_blocks(&self, location: u64, buf: &mut [u8]) -> Result<()> {
        for (i, chunk) in buf.chunks_exact_mut(BLOCK_SIZE).enumerate() {
            chunk.copy_from_slice(&self.read_block(location + i as u64)?[..]);
        }
        Ok(())
    }
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

pub(super) fn check_range(location: u64, nr_blocks: u64) -> Result<()> {
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
    /// The metadata file or device at `path`, read-only or read-write.
    pub fn open(path: &Path, write: bool) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        FileBlockIo::new(file)
    }

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

    fn read_blocks(&self, location: u64, buf: &mut [u8]) -> Result<()> {
        let count = (buf.len() / BLOCK_SIZE) as u64;
        if count == 0 {
            return Ok(());
        }
        check_range(location.saturating_add(count - 1), self.nr_blocks())?;
        self.file
            .read_exact_at(buf, location * BLOCK_SIZE as u64)
            .map_err(|e| {
                Error::io(
                    format!("reading metadata blocks {location}..{}", location + count),
                    e,
                )
            })
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
