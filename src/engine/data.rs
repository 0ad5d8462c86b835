//! The data device: positioned reads and writes of data blocks, hole punching for discards,
//! and fault injection for tests (chosen EIOs, a slow device, and a tap that power-cut tests
//! use to model a volatile write cache).

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

/// A test observer of data-device mutations, called before each write, punch and sync (only
/// once faults are armed). Power-cut tests model a volatile write cache with it: remember what
/// a range held before it is changed, forget it at a sync, and fail everything after the cut.
pub trait DataTap: Send + Sync {
    /// Before `len` bytes at `offset` are written or punched; an error fails the operation.
    fn before_change(&self, file: &File, offset: u64, len: u64) -> io::Result<()>;
    /// Before `fdatasync`; an error fails the sync.
    fn before_sync(&self) -> io::Result<()>;
}

/// Chosen failures of the data device (tests). Byte ranges are matched by data block.
#[derive(Default)]
pub struct DataFaults {
    armed: AtomicBool,
    read_blocks: Mutex<HashSet<u64>>,
    write_blocks: Mutex<HashSet<u64>>,
    fail_all_reads: AtomicBool,
    fail_all_writes: AtomicBool,
    injected: AtomicU64,
    write_delay_ns: AtomicU64,
    read_delay_ns: AtomicU64,
    reads_delayed: AtomicU64,
    tap: Mutex<Option<Arc<dyn DataTap>>>,
}

impl DataFaults {
    /// Installs (or removes) the observer of writes, punches and syncs.
    pub fn set_tap(&self, tap: Option<Arc<dyn DataTap>>) {
        *lock(&self.tap) = tap;
        self.armed.store(true, Ordering::Release);
    }

    fn tap(&self) -> Option<Arc<dyn DataTap>> {
        if !self.armed.load(Ordering::Acquire) {
            return None;
        }
        lock(&self.tap).clone()
    }

    fn tap_change(&self, file: &File, offset: u64, len: u64) -> io::Result<()> {
        match self.tap() {
            Some(t) => t.before_change(file, offset, len),
            None => Ok(()),
        }
    }

    fn tap_sync(&self) -> io::Result<()> {
        match self.tap() {
            Some(t) => t.before_sync(),
            None => Ok(()),
        }
    }

    /// Fail every read touching data block `b` with EIO.
    pub fn fail_reads_of(&self, b: u64) {
        lock(&self.read_blocks).insert(b);
        self.armed.store(true, Ordering::Release);
    }

    /// Fail every write touching data block `b` with EIO.
    pub fn fail_writes_of(&self, b: u64) {
        lock(&self.write_blocks).insert(b);
        self.armed.store(true, Ordering::Release);
    }

    pub fn fail_all_reads(&self, on: bool) {
        self.fail_all_reads.store(on, Ordering::Release);
        self.armed.store(true, Ordering::Release);
    }

    pub fn fail_all_writes(&self, on: bool) {
        self.fail_all_writes.store(on, Ordering::Release);
        self.armed.store(true, Ordering::Release);
    }

    pub fn clear(&self) {
        lock(&self.read_blocks).clear();
        lock(&self.write_blocks).clear();
        self.fail_all_reads.store(false, Ordering::Release);
        self.fail_all_writes.store(false, Ordering::Release);
        self.write_delay_ns.store(0, Ordering::Release);
        self.read_delay_ns.store(0, Ordering::Release);
    }

    /// Makes every data write take at least `d` longer (a slow device), so tests can hold
    /// prison cells long enough for other threads to pile up behind them.
    pub fn set_write_delay(&self, d: std::time::Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.write_delay_ns.store(ns, Ordering::Release);
        self.armed.store(true, Ordering::Release);
    }

    /// Makes every data read wait `d` before it reads (after its mapping was looked up), so
    /// tests can change the pool under a read in flight.
    pub fn set_read_delay(&self, d: std::time::Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.read_delay_ns.store(ns, Ordering::Release);
        self.armed.store(true, Ordering::Release);
    }

    /// Reads that have started their delay so far.
    pub fn reads_delayed(&self) -> u64 {
        self.reads_delayed.load(Ordering::Acquire)
    }

    /// Number of failures injected so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }

    fn check(&self, write: bool, block: u64) -> io::Result<()> {
        if !self.armed.load(Ordering::Acquire) {
            return Ok(());
        }
        let delay = if write {
            &self.write_delay_ns
        } else {
            &self.read_delay_ns
        };
        let ns = delay.load(Ordering::Acquire);
        if ns > 0 {
            if !write {
                self.reads_delayed.fetch_add(1, Ordering::AcqRel);
            }
            std::thread::sleep(std::time::Duration::from_nanos(ns));
        }
        let hit = if write {
            self.fail_all_writes.load(Ordering::Acquire)
                || lock(&self.write_blocks).contains(&block)
        } else {
            self.fail_all_reads.load(Ordering::Acquire) || lock(&self.read_blocks).contains(&block)
        };
        if hit {
            self.injected.fetch_add(1, Ordering::Relaxed);
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A data file or block device, addressed in data blocks of `block_bytes`.
pub struct DataDevice {
    file: File,
    /// The whole device is known to read zeros (a sparse file we just created).
    fresh: bool,
    punch_supported: AtomicBool,
    /// `preadv2(RWF_NOWAIT)` works here (cleared on the first EOPNOTSUPP/EINVAL/ENOSYS).
    nowait_supported: AtomicBool,
    /// Largest single write handed to the kernel; see [`set_write_chunk`](Self::set_write_chunk).
    write_chunk: u64,
    faults: DataFaults,
}

/// Default for [`DataDevice::set_write_chunk`]: two pages.
pub const DEFAULT_WRITE_CHUNK: u64 = 8 << 10;

impl DataDevice {
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
        DataDevice {
            file,
            fresh,
            punch_supported: AtomicBool::new(true),
            nowait_supported: AtomicBool::new(true),
            write_chunk: DEFAULT_WRITE_CHUNK,
            faults: DataFaults::default(),
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

    pub fn is_fresh(&self) -> bool {
        self.fresh
    }

    pub fn faults(&self) -> &DataFaults {
        &self.faults
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn size(&self) -> Result<u64> {
        crate::util::device_size(&self.file).map_err(|e| Error::io("sizing the data device", e))
    }

    pub fn read_at(&self, block: u64, buf: &mut [u8], offset: u64) -> Result<()> {
        self.faults
            .check(false, block)
            .and_then(|()| self.file.read_exact_at(buf, offset))
            .map_err(|e| Error::io(format!("reading data block {block} at byte {offset}"), e))
    }

    /// Whether fault injection is armed: paths that would have to be retried after a failure
    /// (the non-blocking ones) stand aside, so each injected fault is seen exactly once.
    pub fn faults_armed(&self) -> bool {
        self.faults.armed.load(Ordering::Acquire)
    }

    /// Reads `buf` at `offset` only if the page cache holds all of it (`preadv2` with
    /// `RWF_NOWAIT`, which never waits for the device). `None` when it would have to wait, came
    /// up short, failed in any way, or faults are armed: the caller then takes the ordinary
    /// path ([`read_at`](Self::read_at)), which also reports any error. This is what lets the
    /// NBD server answer cached reads on its event loop instead of a blocking thread.
    pub fn try_read_cached(&self, buf: &mut [u8], offset: u64) -> Option<()> {
        if self.faults_armed() || !self.nowait_supported.load(Ordering::Relaxed) {
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

    pub fn write_at(&self, block: u64, buf: &[u8], offset: u64) -> Result<()> {
        self.faults
            .check(true, block)
            .and_then(|()| self.faults.tap_change(&self.file, offset, buf.len() as u64))
            .and_then(|()| self.write_in_chunks(buf, offset))
            .map_err(|e| Error::data_io(format!("writing data block {block} at byte {offset}"), e))
    }

    fn write_in_chunks(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        chunk_spans(offset, buf.len(), self.write_chunk).try_for_each(|(start, len)| {
            self.file
                .write_all_at(&buf[start..start + len], offset + start as u64)
        })
    }

    /// Deallocates a range so it reads as zeros. Returns false (and remembers it) when the
    /// device cannot punch holes.
    pub fn punch(&self, offset: u64, len: u64) -> Result<bool> {
        if !self.punch_supported.load(Ordering::Relaxed) {
            return Ok(false);
        }
        self.faults
            .tap_change(&self.file, offset, len)
            .map_err(|e| Error::io(format!("punching {len} bytes at {offset}"), e))?;
        match crate::util::punch_hole(&self.file, offset, len) {
            Ok(true) => Ok(true),
            Ok(false) => {
                self.punch_supported.store(false, Ordering::Relaxed);
                Ok(false)
            }
            Err(e) => Err(Error::io(format!("punching {len} bytes at {offset}"), e)),
        }
    }

    /// Makes every completed data write durable (before a metadata commit refers to it).
    pub fn sync(&self) -> Result<()> {
        self.faults
            .tap_sync()
            .and_then(|()| self.file.sync_data())
            .map_err(|e| Error::io("syncing the data device", e))
    }

    /// Grows a regular file to `bytes` (block devices are left alone). Returns true when the
    /// new range was added by this call (so it reads zeros).
    pub fn grow_to(&self, bytes: u64) -> Result<bool> {
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
        let mut dev = DataDevice::new(file, true);
        dev.set_write_chunk(4096);
        let data: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
        dev.write_at(1, &data, 65_536 + 100).unwrap();
        let mut back = vec![0u8; data.len()];
        dev.read_at(1, &mut back, 65_536 + 100).unwrap();
        assert_eq!(back, data);
    }
}
