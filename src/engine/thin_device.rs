//! An active thin and its handle: request splitting, the read and overwrite fast paths, the
//! provisioning and copy-on-write slow path, discard and write-zeroes, the quiesce gate and the
//! deferred list.
//!
//! The quiesce gate is a per-thin reader-writer lock. Every request holds it shared for its whole
//! life; snapshots of the thin, discards (which free blocks a concurrent fast-path request might
//! still touch) and teardown take it exclusively, which waits for requests in flight and holds
//! new ones back briefly. Requests parked on a full pool let go of it while they wait.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use crate::error::{fail, Error, ErrorKind, Result};
use crate::thin::metadata::ThinId;
use crate::util::usize_from_u64;

use super::active::{Life, Member};
use super::pool::{Claim, NoSpacePolicy, PoolState};
use super::prison::Detain;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One-shot reply slot for a bio served by another thread.
struct Completion {
    result: Mutex<Option<Result<()>>>,
    cv: Condvar,
}

impl Completion {
    fn wait(&self) -> Result<()> {
        let mut r = lock(&self.result);
        loop {
            if let Some(done) = r.take() {
                return done;
            }
            r = self.cv.wait(r).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// A write of part of one virtual block that must provision it or break its sharing.
pub(crate) struct Bio {
    pub(crate) vblock: u64,
    pub(crate) offset: usize,
    pub(crate) data: Vec<u8>,
    done: std::sync::Arc<Completion>,
}

impl Bio {
    fn new(vblock: u64, offset: usize, data: &[u8]) -> Self {
        Bio {
            vblock,
            offset,
            data: data.to_vec(),
            done: std::sync::Arc::new(Completion {
                result: Mutex::new(None),
                cv: Condvar::new(),
            }),
        }
    }

    pub(crate) fn complete(self, r: Result<()>) {
        *lock(&self.done.result) = Some(r);
        self.done.cv.notify_all();
    }
}

pub(crate) struct Thin {
    id: ThinId,
    instance: u64,
    size: AtomicU64,
    read_only: bool,
    life: Life,
    gate: RwLock<()>,
    closing: AtomicBool,
    deferred: Mutex<VecDeque<Bio>>,
    deferred_len: AtomicUsize,
    deferred_cv: Condvar,
}

impl Member for Thin {
    fn life(&self) -> &Life {
        &self.life
    }

    fn key(&self) -> u64 {
        u64::from(self.id)
    }
}

impl Thin {
    pub(crate) fn new(id: ThinId, instance: u64, size: u64, read_only: bool) -> Self {
        Thin {
            id,
            instance,
            size: AtomicU64::new(size),
            read_only,
            life: Life::new(),
            gate: RwLock::new(()),
            closing: AtomicBool::new(false),
            deferred: Mutex::new(VecDeque::new()),
            deferred_len: AtomicUsize::new(0),
            deferred_cv: Condvar::new(),
        }
    }

    pub(crate) fn id(&self) -> ThinId {
        self.id
    }

    pub(crate) fn instance(&self) -> u64 {
        self.instance
    }

    pub(crate) fn has_deferred(&self) -> bool {
        self.deferred_len.load(Ordering::Acquire) > 0
    }

    pub(crate) fn defer(&self, bio: Bio) {
        let mut q = lock(&self.deferred);
        q.push_back(bio);
        self.deferred_len.store(q.len(), Ordering::Release);
        self.deferred_cv.notify_all();
    }

    pub(crate) fn pop_deferred(&self) -> Option<Bio> {
        let mut q = lock(&self.deferred);
        let bio = q.pop_front();
        self.deferred_len.store(q.len(), Ordering::Release);
        bio
    }

    pub(crate) fn wait_deferred(&self, timeout: Duration) {
        let q = lock(&self.deferred);
        if q.is_empty() {
            drop(self.deferred_cv.wait_timeout(q, timeout));
        }
    }

    pub(crate) fn set_closing(&self) {
        self.closing.store(true, Ordering::Release);
    }

    fn check_open(&self) -> Result<()> {
        if self.closing.load(Ordering::Acquire) {
            return fail(
                ErrorKind::NotFound,
                format!("thin {} is no longer active", self.id),
            );
        }
        Ok(())
    }

    /// Enters the gate shared, as every request does.
    fn enter(&self) -> Result<RwLockReadGuard<'_, ()>> {
        let g = self.gate.read().unwrap_or_else(|p| p.into_inner());
        self.check_open()?;
        Ok(g)
    }

    /// Enters the gate shared if that needs no waiting (no snapshot, discard or teardown
    /// holding or waiting for it), as the non-blocking read path must.
    fn try_enter(&self) -> Option<RwLockReadGuard<'_, ()>> {
        let g = match self.gate.try_read() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        if self.closing.load(Ordering::Acquire) {
            return None;
        }
        Some(g)
    }

    /// Waits for requests in flight and holds new ones back.
    pub(crate) fn quiesce(&self) -> RwLockWriteGuard<'_, ()> {
        self.gate.write().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn try_quiesce(&self) -> Option<RwLockWriteGuard<'_, ()>> {
        match self.gate.try_write() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }
}

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

fn byte_offset(block: u64, bs: u64, within: usize) -> Result<u64> {
    block
        .checked_mul(bs)
        .and_then(|b| b.checked_add(within as u64))
        .ok_or_else(|| Error::corrupt(format!("data block {block} is past any addressable offset")))
}

impl PoolState {
    /// The slow path of a write, with the virtual block's cell held.
    pub(crate) fn process_write(&self, thin: &Thin, bio: &Bio) -> Result<()> {
        let bs = self.block_bytes;
        let bs_len =
            usize::try_from(bs).map_err(|_| Error::new(ErrorKind::Unsupported, "block size"))?;
        let id = thin.id();
        let mapping = {
            let core = self.read_metadata();
            self.check_writable(&core)?;
            core.run(|c| c.md.lookup(id, bio.vblock))?
        };
        let end = bio.offset + bio.data.len();
        match mapping {
            Some(m) if !m.shared => self.data.write_at(
                m.data_block,
                &bio.data,
                byte_offset(m.data_block, bs, bio.offset)?,
            ),
            Some(m) => {
                let (nb, _) = self.alloc_block()?;
                let copied = (|| {
                    let mut buf = vec![0u8; bs_len];
                    if bio.data.len() < bs_len {
                        self.data.read_at(
                            m.data_block,
                            &mut buf,
                            byte_offset(m.data_block, bs, 0)?,
                        )?;
                    }
                    buf[bio.offset..end].copy_from_slice(&bio.data);
                    self.data.write_at(nb, &buf, byte_offset(nb, bs, 0)?)
                })();
                if let Err(e) = copied {
                    self.release_block(nb);
                    return Err(e);
                }
                self.insert_mapping(id, bio.vblock, nb)?;
                self.stats.copied.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            None => {
                let (nb, zeroed) = self.alloc_block()?;
                self.provision(id, bio.vblock, nb, zeroed, bio.offset, &bio.data)
            }
        }
    }

    /// Writes a new block's data, then maps it: data first, so a reader that finds the mapping
    /// finds the bytes. The rest of the block is zeroed unless it is known to read zeros. On
    /// failure the block goes back to the allocator.
    fn provision(
        &self,
        thin: ThinId,
        vblock: u64,
        nb: u64,
        zeroed: bool,
        inb: usize,
        data: &[u8],
    ) -> Result<()> {
        let bs = self.block_bytes;
        let whole = data.len() as u64 == bs;
        let written = if whole || zeroed || !self.config.zero_new_blocks {
            byte_offset(nb, bs, inb).and_then(|at| self.data.write_at(nb, data, at))
        } else {
            // `inb + data.len()` is within the block: `pieces` never crosses one.
            let bs_len = usize::try_from(bs)
                .map_err(|_| Error::new(ErrorKind::Unsupported, "block size"))?;
            let mut buf = vec![0u8; bs_len];
            buf[inb..inb + data.len()].copy_from_slice(data);
            byte_offset(nb, bs, 0).and_then(|at| self.data.write_at(nb, &buf, at))
        };
        if let Err(e) = written {
            self.release_block(nb);
            return Err(e);
        }
        self.insert_mapping(thin, vblock, nb)?;
        self.stats.provisioned.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// A write of `data` at `inb` into `vblock`, which the mapping cache does not know as
    /// mapped and unshared, if it can be done without waiting: the block's cell and the
    /// metadata lock free at once, no commit running, a data block free, no fault injection
    /// armed. Then it provisions the block, copies it if it is shared and the source is in the
    /// page cache, or writes in place when it turns out mapped and unshared.
    /// `None` means nothing was changed that a retry would not redo: call the blocking path,
    /// which also reports any error and applies the no-space policy.
    ///
    /// The only wait left is for the metadata write lock to map the block, held briefly by
    /// other writers; a commit that starts in between can make that one wait longer (rare).
    pub(crate) fn try_write_unmapped(
        &self,
        thin: &Thin,
        vblock: u64,
        inb: usize,
        data: &[u8],
    ) -> Option<()> {
        if self.failed() || self.committing.load(Ordering::Acquire) || self.data.faults_armed() {
            return None;
        }
        let held = self.prison.try_lock((thin.id(), vblock))?;
        let r = self.try_write_held(thin.id(), vblock, inb, data);
        self.release_cell(thin, held);
        r
    }

    /// Provisions whole blocks `[vblock, vblock + n)` with `data` (`n` blocks of bytes, at
    /// least two) together when every one of them is unmapped, their cells are free at once
    /// and the pool has room for all: one allocation under one metadata lock, the data
    /// written, then every block mapped under one lock. `None`: nothing was changed; write block by block instead (that path also handles
    /// mapped and shared blocks, a full pool and its policy).
    pub(crate) fn try_provision_run(
        &self,
        thin: &Thin,
        vblock: u64,
        data: &[u8],
    ) -> Option<Result<()>> {
        let bs = self.block_bytes;
        let n = data.len() as u64 / bs;
        if n < 2 || self.failed() || self.data.faults_armed() {
            return None;
        }
        let mut cells = Vec::with_capacity(usize_from_u64(n));
        for vb in vblock..vblock + n {
            match self.prison.try_lock((thin.id(), vb)) {
                Some(held) => cells.push(held),
                None => break,
            }
        }
        let r = if cells.len() as u64 == n {
            self.provision_run_held(thin.id(), vblock, n, data)
        } else {
            None
        };
        for held in cells {
            self.release_cell(thin, held);
        }
        r
    }

    fn provision_run_held(
        &self,
        thin: ThinId,
        vblock: u64,
        n: u64,
        data: &[u8],
    ) -> Option<Result<()>> {
        let bs = self.block_bytes;
        let bs_len = usize::try_from(bs).ok()?;
        let blocks = self.alloc_run(thin, vblock, n)?;
        // One write per block even where blocks are consecutive: the page cache sizes its
        // folios by the write, and a 4 KiB overwrite inside a 1 MiB folio costs ext4 a walk
        // over all of its buffers. The data device splits further (`data_write_chunk`); this
        // keeps folios within a block when that is turned off.
        for (&b, chunk) in blocks.iter().zip(data.chunks(bs_len)) {
            let written = byte_offset(b, bs, 0).and_then(|at| self.data.write_at(b, chunk, at));
            if let Err(e) = written {
                for &b in &blocks {
                    self.release_block(b);
                }
                return Some(Err(e));
            }
        }
        Some(self.insert_mappings(thin, vblock, &blocks).map(|()| {
            self.stats
                .provisioned
                .fetch_add(blocks.len() as u64, Ordering::Relaxed);
            self.stats.provisioned_runs.fetch_add(1, Ordering::Relaxed);
        }))
    }

    fn try_write_held(&self, thin: ThinId, vblock: u64, inb: usize, data: &[u8]) -> Option<()> {
        match self.try_claim(thin, vblock)? {
            Claim::Mapped(m) => {
                let at = byte_offset(m.data_block, self.block_bytes, inb).ok()?;
                self.data.write_at(m.data_block, data, at).ok()
            }
            // A failure here is recorded (a metadata failure makes the pool read-only); the
            // blocking retry then reports it.
            Claim::New { block, zeroed } => {
                self.provision(thin, vblock, block, zeroed, inb, data).ok()
            }
            Claim::Copy { from, block } => {
                if self.try_copy_cached(from, block, inb, data).is_none() {
                    self.release_block(block);
                    return None;
                }
                self.insert_mapping(thin, vblock, block).ok()?;
                self.stats.copied.fetch_add(1, Ordering::Relaxed);
                Some(())
            }
        }
    }

    /// Copy-on-write of block `from` into `to` with `data` at `inb` laid over it, if the part
    /// of `from` that survives is in the page cache (`None` otherwise, or on any error).
    /// `from` cannot change meanwhile: a shared block is never written in place.
    fn try_copy_cached(&self, from: u64, to: u64, inb: usize, data: &[u8]) -> Option<()> {
        let bs = self.block_bytes;
        let mut buf = vec![0u8; usize::try_from(bs).ok()?];
        if data.len() < buf.len() {
            self.data
                .try_read_cached(&mut buf, byte_offset(from, bs, 0).ok()?)?;
        }
        buf.get_mut(inb..inb + data.len())?.copy_from_slice(data);
        self.data
            .write_at(to, &buf, byte_offset(to, bs, 0).ok()?)
            .ok()
    }
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
            .field("id", &self.thin.id)
            .field("instance", &self.thin.instance)
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
        self.thin.id
    }

    pub fn size(&self) -> u64 {
        self.thin.size.load(Ordering::Acquire)
    }

    /// Changes the volume's size (blocks past a smaller size stay mapped until discarded).
    pub fn set_size(&self, bytes: u64) {
        self.thin.size.store(bytes, Ordering::Release);
    }

    pub fn is_read_only(&self) -> bool {
        self.thin.read_only
    }

    pub fn block_size(&self) -> u64 {
        self.state.block_bytes
    }

    pub fn mapped_blocks(&self) -> Result<u64> {
        self.state
            .read_metadata()
            .run(|c| c.md.mapped_blocks(self.thin.id))
    }

    fn check_range(&self, off: u64, len: u64) -> Result<()> {
        let size = self.size();
        match off.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => fail(
                ErrorKind::OutOfBounds,
                format!(
                    "request of {len} bytes at {off} is past the end of thin {} ({size} bytes)",
                    self.thin.id
                ),
            ),
        }
    }

    fn check_volume_writable(&self) -> Result<()> {
        if self.thin.read_only {
            return fail(
                ErrorKind::ReadOnly,
                format!("thin {} is activated read-only", self.thin.id),
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
        // (position in buf, first data block, byte offset in the data device, length).
        let coalesce = !data.faults_armed();
        let mut run: Option<(usize, u64, u64, usize)> = None;
        let mut pos = 0usize;
        for (vb, inb, n) in pieces(off, buf.len(), bs) {
            let at = match self.state.lookup(self.thin.id, vb)? {
                None => {
                    buf[pos..pos + n].fill(0);
                    None
                }
                Some(m) => Some((m.data_block, byte_offset(m.data_block, bs, inb)?)),
            };
            run = match (run, at) {
                (Some((p, b, a, l)), Some((_, at))) if coalesce && a + l as u64 == at => {
                    Some((p, b, a, l + n))
                }
                (prev, next) => {
                    if let Some((p, b, a, l)) = prev {
                        data.read_at(b, &mut buf[p..p + l], a)?;
                    }
                    next.map(|(b, at)| (pos, b, at, n))
                }
            };
            pos += n;
        }
        if let Some((p, b, a, l)) = run {
            data.read_at(b, &mut buf[p..p + l], a)?;
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
            let m = state.cached_mapping(self.thin.id, vb)?;
            let at = byte_offset(m.data_block, bs, inb).ok()?;
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
        if self.thin.read_only || self.state.failed() || buf.is_empty() || end > self.size() {
            return None;
        }
        let _gate = self.thin.try_enter()?;
        let state = &self.state;
        let mut pos = 0usize;
        for (vb, inb, n) in pieces(off, buf.len(), state.block_bytes) {
            let data = &buf[pos..pos + n];
            pos += n;
            match state.cached_mapping(self.thin.id, vb) {
                Some(m) if !m.shared => {
                    if state.data.faults_armed() {
                        return None;
                    }
                    let at = byte_offset(m.data_block, state.block_bytes, inb).ok()?;
                    state.data.write_at(m.data_block, data, at).ok()?;
                }
                // Unmapped, unknown or shared: provisioning or copy-on-write, if the cell,
                // the metadata lock, a free block (and for a copy the cached source) are all
                // there at once.
                _ => state.try_write_unmapped(&self.thin, vb, inb, data)?,
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
            match self.state.try_provision_run(&self.thin, mid_off / bs, mid) {
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
            if let Some(m) = state.lookup(self.thin.id, vb)?.filter(|m| !m.shared) {
                let at = byte_offset(m.data_block, state.block_bytes, inb)?;
                return state.data.write_at(m.data_block, data, at);
            }
        }
        let bio = Bio::new(vb, inb, data);
        let done = bio.done.clone();
        match state.prison.try_detain((self.thin.id, vb), bio) {
            Detain::Held(held, bio) => {
                let r = state.process_write(&self.thin, &bio);
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
                    .unmap_range(self.thin.id, first_whole, end_whole)?;
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
                .run(|c| c.md.lookup(self.thin.id, vb))?
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
            .run(|c| c.md.mappings_in(self.thin.id, off / bs, end.div_ceil(bs)))?;
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
        h.state.data.faults().fail_reads_of(1000);
        assert_eq!(h.try_read_cached(BS, &mut one), None);
        h.state.data.faults().clear();
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
        h.state
            .committing
            .store(true, std::sync::atomic::Ordering::Release);
        assert_eq!(h.try_write_nowait(8 * BS, &a), None);
        h.state
            .committing
            .store(false, std::sync::atomic::Ordering::Release);
        h.state.data.faults().fail_reads_of(1000);
        assert_eq!(h.try_write_nowait(BS, &a), None);
        assert_eq!(h.try_write_nowait(9 * BS, &a), None);
        h.state.data.faults().clear();
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
