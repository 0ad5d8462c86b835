//! A handle on an active thin volume ([`ThinHandle`]): the I/O API callers use. It splits
//! requests into blocks, serves reads and overwrites of provisioned, unshared blocks itself
//! (under the metadata read lock for the lookup, no lock around the data I/O), hands writes
//! that must provision or copy to [`provision`] under the block's prison
//! cell (or defers them to the worker), applies the no-space policy, and zeroes, discards and
//! reports mapping status.

use std::sync::atomic::Ordering;
use std::sync::RwLockReadGuard;
use std::time::Instant;

use crate::error::{fail, ErrorKind, Result};
use crate::thin::metadata::ThinId;
use crate::util::usize_from_u64;

use super::active_thin::{Bio, Thin};
use super::pool::NoSpacePolicy;
use super::prison::Detain;
use super::provision;
use super::state::PoolState;

/// Splits `[off, off + len)` into (virtual block, offset in block, length) pieces.
fn pieces(off: u64, len: usize, bs: u64) -> impl Iterator<Item = (u64, usize, usize)> {
    let end = off + len as u64;
    let mut pos = off;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let vb = pos / bs;
        let inb = pos % bs;
        let n = (bs - inb).min(end - pos);
        pos += n;
        // Both are below the block size, so neither loses anything as a usize.
        Some((vb, usize_from_u64(inb), usize_from_u64(n)))
    })
}

/// Largest write worth trying [`ThinHandle::try_write_nowait`] for. Longer writes go to
/// [`ThinHandle::write`]: it provisions a run of new blocks together, and the copy is long
/// enough that a hand-off to a blocking thread costs little next to it.
pub const NOWAIT_WRITE_MAX: usize = 128 << 10;

/// A handle on an active thin volume. Cheap to clone; all clones stop working after teardown.
#[derive(Clone)]
pub struct ThinHandle {
    state: std::sync::Arc<PoolState>,
    thin: crate::sync::Arc<Thin>,
}

impl std::fmt::Debug for ThinHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThinHandle")
            .field("id", &self.thin.id())
            .field("instance", &self.thin.instance())
            .field("size", &self.size())
            .finish()
    }
}

type Gate<'a> = Option<RwLockReadGuard<'a, ()>>;

impl ThinHandle {
    pub(crate) fn new(state: std::sync::Arc<PoolState>, thin: crate::sync::Arc<Thin>) -> Self {
        ThinHandle { state, thin }
    }

    pub(crate) fn thin(&self) -> &crate::sync::Arc<Thin> {
        &self.thin
    }

    pub fn id(&self) -> ThinId {
        self.thin.id()
    }

    pub fn size(&self) -> u64 {
        self.thin.size()
    }

    /// Changes the volume's size (blocks past a smaller size stay mapped until discarded).
    pub fn set_size(&self, bytes: u64) {
        self.thin.set_size(bytes);
    }

    pub fn is_read_only(&self) -> bool {
        self.thin.is_read_only()
    }

    pub fn block_size(&self) -> u64 {
        self.state.block_bytes
    }

    pub fn mapped_blocks(&self) -> Result<u64> {
        self.state
            .read_metadata()
            .run(|c| c.md.mapped_blocks(self.thin.id()))
    }

    fn check_range(&self, off: u64, len: u64) -> Result<()> {
        let size = self.size();
        match off.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => fail(
                ErrorKind::OutOfBounds,
                format!(
                    "request of {len} bytes at {off} is past the end of thin {} ({size} bytes)",
                    self.thin.id()
                ),
            ),
        }
    }

    fn check_volume_writable(&self) -> Result<()> {
        if self.thin.is_read_only() {
            return fail(
                ErrorKind::ReadOnly,
                format!("thin {} is activated read-only", self.thin.id()),
            );
        }
        Ok(())
    }

    pub fn read(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        self.check_range(off, buf.len() as u64)?;
        let _gate = self.thin.enter()?;
        // From before the first lookup to after the last read: a block looked up here is not
        // reused or punched until this ends, even if a commit frees it meanwhile.
        let _reading = self.state.read_epochs.enter();
        let bs = self.state.block_bytes;
        let data = &self.state.data;
        // Runs of consecutive data blocks are read with one call: with no readahead on the
        // data device, that is what makes a cold sequential read one large disk read.
        // Armed test faults are per block, so then every block is read on its own.
        // (position in buf, byte offset in the data device, length) of the pending run.
        let coalesce = !self.state.data_faults_armed();
        let mut run: Option<(usize, u64, usize)> = None;
        let mut pos = 0usize;
        for (vb, inb, n) in pieces(off, buf.len(), bs) {
            let at = match self.state.lookup(self.thin.id(), vb)? {
                None => {
                    buf[pos..pos + n].fill(0);
                    None
                }
                Some(m) => Some(self.state.data_offset(m.data_block, inb)?),
            };
            run = match (run, at) {
                (Some((p, a, l)), Some(at)) if coalesce && a + l as u64 == at => {
                    Some((p, a, l + n))
                }
                (prev, next) => {
                    if let Some((p, a, l)) = prev {
                        data.read_at(&mut buf[p..p + l], a)?;
                    }
                    next.map(|at| (pos, at, n))
                }
            };
            pos += n;
        }
        if let Some((p, a, l)) = run {
            data.read_at(&mut buf[p..p + l], a)?;
        }
        Ok(())
    }

    /// [`read`](Self::read) when it needs no waiting at all: the gate free, every block in the
    /// mapping cache (so mapped: the range holds no holes) and every byte in the page cache.
    /// `None` means "call `read`", which also reports any error; `buf` may then hold anything.
    /// Runs of consecutive data blocks are read with one call.
    pub fn try_read_cached(&self, off: u64, buf: &mut [u8]) -> Option<()> {
        let end = off.checked_add(buf.len() as u64)?;
        if end > self.size() || buf.is_empty() {
            return None;
        }
        let _gate = self.thin.try_enter()?;
        let _reading = self.state.read_epochs.enter();
        let bs = self.state.block_bytes;
        let state = &self.state;
        // (position in buf, byte offset in the data device, length) of the pending run.
        let mut run: Option<(usize, u64, usize)> = None;
        let mut pos = 0usize;
        for (vb, inb, n) in pieces(off, buf.len(), bs) {
            let m = state.cached_mapping(self.thin.id(), vb)?;
            let at = self.state.data_offset(m.data_block, inb).ok()?;
            run = match run {
                Some((p, a, l)) if a.checked_add(l as u64) == Some(at) => Some((p, a, l + n)),
                Some((p, a, l)) => {
                    state.data.try_read_cached(&mut buf[p..p + l], a)?;
                    Some((pos, at, n))
                }
                None => Some((pos, at, n)),
            };
            pos += n;
        }
        let (p, a, l) = run?;
        state.data.try_read_cached(&mut buf[p..p + l], a)
    }

    /// [`write`](Self::write) when it needs no waiting: the gate free and, per block, either
    /// mapped and unshared in the mapping cache (written in place), or provisioned or copied
    /// (copy-on-write of a shared block) by `try_write_unmapped` (cell, metadata lock and a
    /// free block all available at once; for a copy, the source in the page cache). A full
    /// pool, FUA and anything unusual decline. `None`
    /// means "call `write`": blocks done so far are simply written again, with the same bytes.
    /// The data write itself is a buffered `pwrite`, which the kernel can still hold up (the
    /// inode lock, dirty-page throttling) like any page-cache write: ext4 refuses `RWF_NOWAIT`
    /// for buffered writes, so there is no cheaper way to know.
    pub fn try_write_nowait(&self, off: u64, buf: &[u8]) -> Option<()> {
        let end = off.checked_add(buf.len() as u64)?;
        if self.thin.is_read_only() || self.state.failed() || buf.is_empty() || end > self.size() {
            return None;
        }
        let _gate = self.thin.try_enter()?;
        let state = &self.state;
        let mut pos = 0usize;
        for (vb, inb, n) in pieces(off, buf.len(), state.block_bytes) {
            let data = &buf[pos..pos + n];
            pos += n;
            match state.cached_mapping(self.thin.id(), vb) {
                Some(m) if !m.shared => {
                    if state.data_faults_armed() {
                        return None;
                    }
                    let at = state.data_offset(m.data_block, inb).ok()?;
                    state.data.write_at(data, at).ok()?;
                }
                // Unmapped, unknown or shared: provisioning or copy-on-write, if the cell,
                // the metadata lock, a free block (and for a copy the cached source) are all
                // there at once.
                _ => provision::try_write_unmapped(state, &self.thin, vb, inb, data)?,
            }
        }
        Some(())
    }

    pub fn write(&self, off: u64, buf: &[u8], fua: bool) -> Result<()> {
        self.check_range(off, buf.len() as u64)?;
        self.check_volume_writable()?;
        {
            let mut gate = Some(self.thin.enter()?);
            // Whole blocks in the middle that are all new are provisioned together: one
            // allocation and one mapping update under the metadata lock for all of them.
            let bs = self.state.block_bytes;
            let head = usize::try_from((bs - off % bs) % bs)
                .unwrap_or(usize::MAX)
                .min(buf.len());
            let whole = (buf.len() - head) as u64 / bs;
            let mid_end = head + usize::try_from(whole * bs).unwrap_or(0);
            self.write_pieces(off, &buf[..head], &mut gate)?;
            let mid = &buf[head..mid_end];
            let mid_off = off + head as u64;
            match provision::try_provision_run(&self.state, &self.thin, mid_off / bs, mid) {
                Some(r) => r?,
                None => self.write_pieces(mid_off, mid, &mut gate)?,
            }
            self.write_pieces(off + mid_end as u64, &buf[mid_end..], &mut gate)?;
        }
        if fua {
            self.state.flush()?;
        }
        Ok(())
    }

    fn write_pieces<'a>(&'a self, off: u64, buf: &[u8], gate: &mut Gate<'a>) -> Result<()> {
        let mut pos = 0usize;
        for (vb, inb, n) in pieces(off, buf.len(), self.state.block_bytes) {
            self.write_piece(vb, inb, &buf[pos..pos + n], gate, true)?;
            pos += n;
        }
        Ok(())
    }

    /// Writes one piece, waiting for space on a full pool when the policy says so (and the
    /// caller holds the gate shared, which is let go while waiting).
    fn write_piece<'a>(
        &'a self,
        vb: u64,
        inb: usize,
        data: &[u8],
        gate: &mut Gate<'a>,
        may_queue: bool,
    ) -> Result<()> {
        let mut deadline: Option<Instant> = None;
        loop {
            let err = match self.write_once(vb, inb, data) {
                // A full host file system is not helped by freeing pool blocks: no queueing.
                Err(e) if e.kind() == ErrorKind::NoSpace && !e.is_host_no_space() => e,
                other => return other,
            };
            if !may_queue || self.state.config.no_space_policy != NoSpacePolicy::Queue {
                return Err(err);
            }
            let dl =
                *deadline.get_or_insert_with(|| Instant::now() + self.state.config.queue_timeout);
            let seen = self.state.space_generation();
            if !self.state.space_available() {
                gate.take();
                let woke = self.state.wait_for_space(seen, dl);
                *gate = Some(self.thin.enter()?);
                if !woke {
                    return Err(err.within(format!(
                        "no space was freed within {:?}",
                        self.state.config.queue_timeout
                    )));
                }
            } else if Instant::now() >= dl {
                return Err(err);
            }
        }
    }

    fn write_once(&self, vb: u64, inb: usize, data: &[u8]) -> Result<()> {
        let state = &self.state;
        if !state.failed() {
            if let Some(m) = state.lookup(self.thin.id(), vb)?.filter(|m| !m.shared) {
                let at = state.data_offset(m.data_block, inb)?;
                return state.data.write_at(data, at);
            }
        }
        let bio = Bio::new(vb, inb, data);
        let done = bio.completion();
        match state.prison.try_detain((self.thin.id(), vb), bio) {
            Detain::Held(held, bio) => {
                let r = provision::write_held(state, &self.thin, &bio);
                state.release_cell(&self.thin, held);
                r
            }
            Detain::Waiting => done.wait(),
            Detain::NoCell(bio) => {
                state.stats.deferred.fetch_add(1, Ordering::Relaxed);
                self.thin.defer(bio);
                state.wake_worker();
                done.wait()
            }
        }
    }

    /// Unmaps whole blocks and zeroes the partial ones at the edges.
    pub fn discard(&self, off: u64, len: u64, fua: bool) -> Result<()> {
        self.check_range(off, len)?;
        self.check_volume_writable()?;
        {
            let _quiet = self.thin.quiesce();
            self.thin.check_open()?;
            let bs = self.state.block_bytes;
            let end = off + len;
            let first_whole = off.div_ceil(bs);
            let end_whole = end / bs;
            if first_whole < end_whole {
                let head = first_whole * bs - off;
                self.zero_mapped(off, head, &mut None, false)?;
                self.state
                    .unmap_range(self.thin.id(), first_whole, end_whole)?;
                self.zero_mapped(end_whole * bs, end - end_whole * bs, &mut None, false)?;
            } else {
                self.zero_mapped(off, len, &mut None, false)?;
            }
        }
        if fua {
            self.state.flush()?;
        }
        Ok(())
    }

    /// Zeroes `[off, off+len)`: unmapping whole blocks when allowed, writing zeros into mapped
    /// blocks otherwise; unmapped blocks already read as zeros.
    pub fn write_zeroes(&self, off: u64, len: u64, may_unmap: bool, fua: bool) -> Result<()> {
        if may_unmap {
            return self.discard(off, len, fua);
        }
        self.check_range(off, len)?;
        self.check_volume_writable()?;
        {
            let mut gate = Some(self.thin.enter()?);
            self.zero_mapped(off, len, &mut gate, true)?;
        }
        if fua {
            self.state.flush()?;
        }
        Ok(())
    }

    fn zero_mapped<'a>(
        &'a self,
        off: u64,
        len: u64,
        gate: &mut Gate<'a>,
        may_queue: bool,
    ) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let bs = self.state.block_bytes;
        let zeros = vec![0u8; usize::try_from(bs.min(len)).unwrap_or(0)];
        let mut pos = off;
        let end = off + len;
        while pos < end {
            let vb = pos / bs;
            let inb = pos % bs;
            let n = (bs - inb).min(end - pos);
            let mapped = self
                .state
                .read_metadata()
                .run(|c| c.md.lookup(self.thin.id(), vb))?
                .is_some();
            if mapped {
                let n_us = usize_from_u64(n);
                self.write_piece(vb, usize_from_u64(inb), &zeros[..n_us], gate, may_queue)?;
            }
            pos += n;
        }
        Ok(())
    }

    /// Runs of (length in bytes, mapped) covering `[off, off+len)`.
    pub fn block_status(&self, off: u64, len: u64) -> Result<Vec<(u64, bool)>> {
        self.check_range(off, len)?;
        let _gate = self.thin.enter()?;
        let mut out: Vec<(u64, bool)> = Vec::new();
        if len == 0 {
            return Ok(out);
        }
        let bs = self.state.block_bytes;
        let end = off + len;
        let mapped = self
            .state
            .read_metadata()
            .run(|c| c.md.mappings_in(self.thin.id(), off / bs, end.div_ceil(bs)))?;
        let mut push = |n: u64, m: bool| match out.last_mut() {
            Some(last) if last.1 == m => last.0 += n,
            _ => out.push((n, m)),
        };
        let mut cursor = off;
        for (vb, _) in mapped {
            let start = (vb * bs).max(off);
            let stop = ((vb + 1) * bs).min(end);
            if start > cursor {
                push(start - cursor, false);
            }
            if stop > start {
                push(stop - start, true);
            }
            cursor = stop;
        }
        if cursor < end {
            push(end - cursor, false);
        }
        Ok(out)
    }

    /// Makes every acknowledged write durable (group commit across the pool).
    pub fn flush(&self) -> Result<()> {
        self.thin.check_open()?;
        self.state.flush()
    }
}

#[cfg(test)]
#[allow(
    clippy::cast_possible_truncation,
    reason = "test sizes are small constants"
)]
mod tests {
    use crate::engine::{EngineConfig, Pool};

    const BS: u64 = 64 << 10;

    fn pool(dir: &std::path::Path) -> std::sync::Arc<Pool> {
        let (meta, data) = (dir.join("meta"), dir.join("data"));
        Pool::create(&meta, &data, 64 * BS, BS, EngineConfig::default()).unwrap()
    }

    #[test]
    fn cached_reads_serve_mapped_blocks_and_decline_everything_else() {
        let dir = tempfile::tempdir().unwrap();
        let pool = pool(dir.path());
        pool.create_thin(1).unwrap();
        let h = pool.activate(1, 16 * BS, false).unwrap();
        let data: Vec<u8> = (0..3 * BS as u32).map(|i| (i % 251) as u8).collect();
        h.write(BS, &data, false).unwrap();
        // Slow reads fill the mapping cache.
        let mut back = vec![0u8; data.len()];
        h.read(BS, &mut back).unwrap();
        assert_eq!(back, data);

        // Across three (consecutively allocated) blocks, and within one.
        let mut fast = vec![0xEEu8; data.len() - 100];
        assert_eq!(h.try_read_cached(BS + 50, &mut fast), Some(()));
        assert_eq!(fast, data[50..data.len() - 50]);
        let mut one = vec![0u8; 4096];
        assert_eq!(h.try_read_cached(2 * BS + 4096, &mut one), Some(()));
        assert_eq!(one, data[(BS + 4096) as usize..(BS + 8192) as usize]);

        // A hole in the range, a range past the end, an empty buffer: the blocking path's.
        let mut buf = vec![0u8; 8192];
        assert_eq!(h.try_read_cached(BS - 4096, &mut buf), None);
        assert_eq!(h.try_read_cached(16 * BS - 4096, &mut buf), None);
        assert_eq!(h.try_read_cached(0, &mut []), None);

        // A quiesce in progress (snapshot, discard, teardown) makes it decline, not wait.
        {
            let _q = h.thin.quiesce();
            assert_eq!(h.try_read_cached(BS, &mut one), None);
        }
        assert_eq!(h.try_read_cached(BS, &mut one), Some(()));

        // After a snapshot the blocks are shared: a write copies the block, on the quick path
        // too when the source is in the page cache; then the block is the origin's alone.
        pool.create_snapshot(2, 1).unwrap();
        h.read(BS, &mut back).unwrap();
        let copied = pool.status().blocks_copied;
        assert_eq!(h.try_write_nowait(BS, &one), Some(()));
        assert_eq!(pool.status().blocks_copied, copied + 1);
        assert_eq!(h.try_write_nowait(BS, &one), Some(()));
        assert_eq!(pool.status().blocks_copied, copied + 1);

        // Armed faults always go the blocking way, where they are injected and reported.
        h.state.faults.fail_reads_of(1000);
        assert_eq!(h.try_read_cached(BS, &mut one), None);
        h.state.faults.clear();
        assert!(h.read(BS, &mut one).is_ok());
    }

    #[test]
    fn nowait_writes_overwrite_and_provision_and_decline_what_must_wait() {
        let dir = tempfile::tempdir().unwrap();
        let pool = pool(dir.path());
        pool.create_thin(1).unwrap();
        let h = pool.activate(1, 16 * BS, false).unwrap();
        let a = vec![0xA5u8; 4096];
        let b = vec![0x5Au8; 2 * BS as usize];

        // Provisioning (a partial block, and two blocks at once), then overwriting in place.
        assert_eq!(h.try_write_nowait(BS + 4096, &a), Some(()));
        assert_eq!(h.try_write_nowait(4 * BS, &b), Some(()));
        assert_eq!(h.mapped_blocks().unwrap(), 3);
        let mut back = vec![0u8; BS as usize];
        h.read(BS, &mut back).unwrap();
        assert!(
            back[..4096].iter().all(|&x| x == 0),
            "rest of a new block reads zeros"
        );
        assert_eq!(back[4096..8192], a[..]);
        assert!(back[8192..].iter().all(|&x| x == 0));
        assert_eq!(h.try_write_nowait(BS, &a), Some(()));
        h.read(BS, &mut back[..8192]).unwrap();
        assert_eq!(back[..4096], a[..]);
        let mut two = vec![0u8; b.len()];
        h.read(4 * BS, &mut two).unwrap();
        assert_eq!(two, b);

        // Past the end, empty, read-only pieces: declined, nothing written.
        assert_eq!(h.try_write_nowait(16 * BS - 4096, &b[..8192]), None);
        assert_eq!(h.try_write_nowait(0, &[]), None);

        // The block's cell held by someone else, the gate taken, a commit running, faults
        // armed: declined rather than waited for.
        let cell = h.state.prison.try_lock((1, 7)).unwrap();
        assert_eq!(h.try_write_nowait(7 * BS, &a), None);
        h.state.release_cell(&h.thin, cell);
        {
            let _q = h.thin.quiesce();
            assert_eq!(h.try_write_nowait(BS, &a), None);
        }
        {
            let _core = h.state.write_metadata();
            assert_eq!(h.try_write_nowait(8 * BS, &a), None);
        }
        h.state.commits.set_committing(true);
        assert_eq!(h.try_write_nowait(8 * BS, &a), None);
        h.state.commits.set_committing(false);
        h.state.faults.fail_reads_of(1000);
        assert_eq!(h.try_write_nowait(BS, &a), None);
        assert_eq!(h.try_write_nowait(9 * BS, &a), None);
        h.state.faults.clear();
        assert_eq!(h.mapped_blocks().unwrap(), 3);

        assert_eq!(pool.status().blocks_provisioned, 3);

        // A full pool declines; the blocking path applies the no-space policy.
        let small_dir = tempfile::tempdir().unwrap();
        let cfg = EngineConfig {
            no_space_policy: crate::engine::NoSpacePolicy::Error,
            ..EngineConfig::default()
        };
        let (meta, data) = (small_dir.path().join("meta"), small_dir.path().join("data"));
        let small = Pool::create(&meta, &data, 2 * BS, BS, cfg).unwrap();
        small.create_thin(1).unwrap();
        let s = small.activate(1, 16 * BS, false).unwrap();
        assert_eq!(s.try_write_nowait(0, &b), Some(()));
        assert_eq!(s.try_write_nowait(2 * BS, &a), None);
        let err = s.write(2 * BS, &a, false).unwrap_err();
        assert_eq!(err.kind(), crate::error::ErrorKind::NoSpace);
    }

    #[test]
    fn whole_new_blocks_are_provisioned_together_and_mixed_runs_block_by_block() {
        let dir = tempfile::tempdir().unwrap();
        let pool = pool(dir.path());
        pool.create_thin(1).unwrap();
        let h = pool.activate(1, 32 * BS, false).unwrap();
        let data: Vec<u8> = (0..6 * BS as u32).map(|i| (i % 253) as u8).collect();

        // A partial head, four whole new blocks, a partial tail.
        let off = 2 * BS - 4096;
        let len = 4 * BS as usize + 8192;
        h.write(off, &data[..len], false).unwrap();
        assert_eq!(h.mapped_blocks().unwrap(), 6);
        assert_eq!(pool.status().blocks_provisioned, 6);
        let runs = || {
            h.state
                .stats
                .provisioned_runs
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        assert_eq!(runs(), 1, "the four whole blocks went together");
        let mut back = vec![0u8; len];
        h.read(off, &mut back).unwrap();
        assert_eq!(back, data[..len]);
        let mut edge = vec![0xFFu8; BS as usize - 4096];
        h.read(BS, &mut edge).unwrap();
        assert!(
            edge.iter().all(|&b| b == 0),
            "the head block's start reads zeros"
        );

        // Blocks provisioned together are overwritten on the non-blocking path like others.
        let probe = vec![7u8; 4096];
        assert_eq!(h.try_write_nowait(3 * BS + 4096, &probe), Some(()));
        assert_eq!(h.try_write_nowait(3 * BS + 8192, &probe), Some(()));
        // (and back to what the checks below expect: byte `off + i` holds `data[i]`)
        let at = (3 * BS + 4096 - off) as usize;
        h.write(3 * BS + 4096, &data[at..at + 8192], false).unwrap();

        // A run over mapped and new blocks goes block by block, and still lands.
        h.write(5 * BS, &data[..4 * BS as usize], false).unwrap();
        assert_eq!(h.mapped_blocks().unwrap(), 8);
        assert_eq!(
            runs(),
            1,
            "a run with mapped blocks is not provisioned as one"
        );
        let mut back = vec![0u8; 4 * BS as usize];
        h.read(5 * BS, &mut back).unwrap();
        assert_eq!(back, data[..4 * BS as usize]);

        // After a snapshot the blocks are shared: a whole-block run copies, never re-provisions
        // in place of the origin's blocks.
        pool.create_snapshot(2, 1).unwrap();
        let snap = pool.activate(2, 32 * BS, true).unwrap();
        h.write(2 * BS, &data[BS as usize..3 * BS as usize], false)
            .unwrap();
        let mut old = vec![0u8; 2 * BS as usize];
        snap.read(2 * BS, &mut old).unwrap();
        assert_eq!(old, data[4096..4096 + 2 * BS as usize]);
        h.read(2 * BS, &mut old).unwrap();
        assert_eq!(old, data[BS as usize..3 * BS as usize]);
        h.flush().unwrap();
    }
}
