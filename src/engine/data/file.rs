//! The data store of a data file or a block device: positioned I/O through the page cache,
//! hole punching for discards, `fdatasync` for durability.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, Result};

use super::{DataStore, HostSpace};

/// A data file or block device.
pub struct FileStore {
    file: File,
    /// The whole device is known to read zeros (a sparse file we just created).
    fresh: bool,
    punch_supported: AtomicBool,
    /// `preadv2(RWF_NOWAIT)` works here (cleared on the first EOPNOTSUPP/EINVAL/ENOSYS).
    nowait_supported: AtomicBool,
    /// Largest single write handed to the kernel; see [`set_write_chunk`](Self::set_write_chunk).
    write_chunk: u64,
}

/// Default for [`FileStore::set_write_chunk`]: two pages.
pub const DEFAULT_WRITE_CHUNK: u64 = 8 << 10;

impl FileStore {
    /// Opens the data file or block device at `path`; `create` makes an empty file when there
    /// is none, which is then known to read zeros.
    pub fn open(path: &Path, create: bool) -> Result<Self> {
        let fresh = create && !path.exists();
        Ok(FileStore::new(
            crate::util::open_read_write(path, create)?,
            fresh,
        ))
    }

    /// Wraps an open file or block device. `fresh` says every byte currently reads as zero
    /// (set it only for a file just created sparse), which spares zeroing of new blocks.
    pub fn new(file: File, fresh: bool) -> Self {
        // No readahead: it fills the page cache with large folios (up to megabytes), and a
        // 4 KiB write into a large folio makes ext4 walk every buffer of it. After a cold
        // sequential read of a volume, random 4 KiB overwrites ran at 50-59k IOPS with
        // readahead and 152-159k without. Reads lose little: the engine reads whole runs of
        // blocks at once, and clients read ahead themselves. Advice only; failure is harmless.
        // SAFETY: advice on a descriptor `file` owns; no memory is passed.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
        FileStore {
            file,
            fresh,
            punch_supported: AtomicBool::new(true),
            nowait_supported: AtomicBool::new(true),
            write_chunk: DEFAULT_WRITE_CHUNK,
        }
    }

    /// Splits every write into pieces of at most `bytes`, aligned to `bytes` in the device
    /// (0: never split). Why: the page cache sizes each folio by the write that creates it,
    /// so a block written in one 64 KiB `pwrite` becomes one 64 KiB folio, and every later
    /// 4 KiB overwrite into it makes ext4 walk and dirty-track all sixteen of its buffers.
    /// Measured side by side: random 4 KiB overwrites at queue depth 32 ran at 108-114k IOPS
    /// into 64 KiB folios and 147-151k into 8 KiB ones (4 KiB: 140-151k, 16 KiB: 121-135k),
    /// and sequential 1 MiB writes went from 47-216 CPU ticks per GiB (two modes we did not
    /// explain) to a steady 70-78.
    pub fn set_write_chunk(&mut self, bytes: u64) {
        self.write_chunk = bytes;
    }

    fn write_in_chunks(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        chunk_spans(offset, buf.len(), self.write_chunk).try_for_each(|(start, len)| {
            self.file
                .write_all_at(&buf[start..start + len], offset + start as u64)
        })
    }
}

impl DataStore for FileStore {
    fn size(&self) -> Result<u64> {
        crate::util::device_size(&self.file).map_err(|e| Error::io("sizing the data device", e))
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file.read_exact_at(buf, offset).map_err(|e| {
            Error::io(
                format!("reading {} bytes of data at byte {offset}", buf.len()),
                e,
            )
        })
    }

    /// `preadv2` with `RWF_NOWAIT`, which never waits for the device: `None` when the page
    /// cache does not hold all of `buf`, the read came up short or failed in any way. This is
    /// what lets the NBD server answer cached reads on its event loop instead of a blocking
    /// thread.
    fn try_read_cached(&self, buf: &mut [u8], offset: u64) -> Option<()> {
        if !self.nowait_supported.load(Ordering::Relaxed) {
            return None;
        }
        let at = libc::off_t::try_from(offset).ok()?;
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: `iov` describes `buf`, which is valid for writes of `buf.len()` bytes and
        // borrowed mutably for the whole call; the descriptor belongs to `self.file`, open for
        // as long as `self` lives.
        let n = unsafe { libc::preadv2(self.file.as_raw_fd(), &iov, 1, at, libc::RWF_NOWAIT) };
        if n < 0 {
            let e = io::Error::last_os_error().raw_os_error();
            if e == Some(libc::EOPNOTSUPP) || e == Some(libc::EINVAL) || e == Some(libc::ENOSYS) {
                // Old kernel or a file system without NOWAIT reads: stop trying.
                self.nowait_supported.store(false, Ordering::Relaxed);
            }
            return None;
        }
        (usize::try_from(n).ok()? == buf.len()).then_some(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_in_chunks(buf, offset).map_err(|e| {
            Error::data_io(
                format!("writing {} bytes of data at byte {offset}", buf.len()),
                e,
            )
        })
    }

    fn punch(&self, offset: u64, len: u64) -> Result<bool> {
        if !self.punch_supported.load(Ordering::Relaxed) {
            return Ok(false);
        }
        match crate::util::punch_hole(&self.file, offset, len) {
            Ok(true) => Ok(true),
            Ok(false) => {
                self.punch_supported.store(false, Ordering::Relaxed);
                Ok(false)
            }
            Err(e) => Err(Error::io(format!("punching {len} bytes at {offset}"), e)),
        }
    }

    fn sync(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| Error::io("syncing the data device", e))
    }

    /// A regular file grows; a block device is left alone.
    fn grow_to(&self, bytes: u64) -> Result<bool> {
        let meta = self
            .file
            .metadata()
            .map_err(|e| Error::io("inspecting the data device", e))?;
        if !meta.file_type().is_file() || meta.len() >= bytes {
            return Ok(false);
        }
        self.file
            .set_len(bytes)
            .map_err(|e| Error::io("growing the data file", e))?;
        Ok(true)
    }

    fn is_fresh(&self) -> bool {
        self.fresh
    }

    fn zeroed_ranges(&self, end: u64) -> Vec<(u64, u64)> {
        crate::util::hole_ranges(&self.file, end)
    }

    /// Allocates a regular file's first `bytes` on the host (a block device needs nothing).
    fn preallocate(&self, bytes: u64) -> Result<()> {
        let meta = self
            .file
            .metadata()
            .map_err(|e| Error::io("inspecting the data device", e))?;
        if !meta.file_type().is_file() {
            return Ok(());
        }
        crate::util::allocate(&self.file, bytes)
            .map_err(|e| Error::data_io(format!("preallocating {bytes} bytes of data"), e))
    }

    /// For a regular file; a block device has its own space.
    fn host_space(&self) -> Option<HostSpace> {
        let meta = self.file.metadata().ok()?;
        if !meta.file_type().is_file() {
            return None;
        }
        Some(HostSpace {
            free_bytes: crate::util::host_free_bytes(&self.file).ok()?,
            unallocated_bytes: meta
                .len()
                .saturating_sub(crate::util::allocated_bytes(&self.file).ok()?),
        })
    }
}

/// `(start, len)` pieces of a `len`-byte buffer written at `offset`, each ending at a multiple
/// of `chunk` in the device or at the end of the buffer (one piece when `chunk` is 0).
fn chunk_spans(offset: u64, len: usize, chunk: u64) -> impl Iterator<Item = (usize, usize)> {
    let mut start = 0usize;
    std::iter::from_fn(move || {
        if start >= len {
            return None;
        }
        let left = len - start;
        let piece = match chunk {
            0 => left,
            c => {
                let to_boundary = c - (offset + start as u64) % c;
                usize::try_from(to_boundary).map_or(left, |n| n.min(left))
            }
        };
        let span = (start, piece);
        start += piece;
        Some(span)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_split_at_chunk_boundaries_of_the_device() {
        let spans: Vec<_> = chunk_spans(6 << 10, 20 << 10, 8 << 10).collect();
        // 6K..8K, 8K..16K, 16K..24K, 24K..26K of the device.
        assert_eq!(
            spans,
            vec![
                (0, 2 << 10),
                (2 << 10, 8 << 10),
                (10 << 10, 8 << 10),
                (18 << 10, 2 << 10)
            ]
        );
        assert_eq!(
            chunk_spans(0, 64 << 10, 0).collect::<Vec<_>>(),
            vec![(0, 64 << 10)]
        );
        assert_eq!(
            chunk_spans(4096, 512, 8192).collect::<Vec<_>>(),
            vec![(0, 512)]
        );
        assert_eq!(chunk_spans(0, 0, 8192).count(), 0);
    }

    #[test]
    fn a_chunked_write_lands_whole() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(256 << 10).unwrap();
        let mut dev = FileStore::new(file, true);
        dev.set_write_chunk(4096);
        let data: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
        dev.write_at(&data, 65_536 + 100).unwrap();
        let mut back = vec![0u8; data.len()];
        dev.read_at(&mut back, 65_536 + 100).unwrap();
        assert_eq!(back, data);
    }
}
