//! The state a pool's threads share ([`PoolState`]): the metadata behind one reader-writer
//! lock, whose guards record fail-stop; the data store; the active thins and the prison; data
//! and metadata space (allocation, mapping, unmapping, low-water marks, waiting for space); the
//! commit; the counters behind `PoolStatus`.
//!
//! Fail-stop is recorded in one place: every fallible metadata operation runs through a guard's
//! `run` ([`MetadataRead::run`], [`MetadataWrite::run`]), which turns the pool read-only on a
//! checksum or I/O failure, so no call site can forget to.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use crate::error::{fail, Error, ErrorKind, Result};
use crate::pdata::block_io::BLOCK_SIZE;
use crate::thin::metadata::{Mapping, ThinId, ThinMetadata};

use super::active::ActiveSet;
use super::active_thin::{Bio, Thin};
use super::commit::GroupCommit;
use super::data::DataStore;
use super::epochs::ReadEpochs;
use super::mapcache::MapCache;
use super::pool::{EngineConfig, PoolMode, PoolStatus, ThinStatus};
use super::prison::{Held, Prison};
#[cfg(any(test, feature = "testing"))]
use super::testing::{DataFaults, EngineEvent, EventLog, FaultInjectingStore};

/// The pool's metadata and the per-block state kept with it, behind the metadata lock.
pub(crate) struct MetadataState {
    pub(crate) md: ThinMetadata,
    /// One bit per data block: known to read zeros (fresh sparse file, or punched).
    zeroed: Vec<u64>,
    /// Data blocks freed in this transaction whose contents go back to the file system
    /// (hole punching) once the commit that frees them is durable.
    pub(crate) to_punch: Vec<u64>,
}

impl MetadataState {
    pub(crate) fn take_zeroed(&mut self, b: u64) -> bool {
        let (w, bit) = ((b / 64) as usize, 1u64 << (b % 64));
        match self.zeroed.get_mut(w) {
            Some(word) => {
                let was = *word & bit != 0;
                *word &= !bit;
                was
            }
            None => false,
        }
    }

    pub(crate) fn set_zeroed(&mut self, b: u64) {
        let w = (b / 64) as usize;
        if self.zeroed.len() <= w {
            self.zeroed.resize(w + 1, 0);
        }
        self.zeroed[w] |= 1u64 << (b % 64);
    }
}

/// The fail-stop record: the first metadata checksum or I/O failure, after which the pool is
/// read-only for good. Only the metadata-lock guards' `run` records into it, so no metadata
/// operation can fail without turning the pool read-only.
#[derive(Default)]
struct FailStop {
    reason: Mutex<Option<String>>,
    failed: AtomicBool,
}

impl FailStop {
    fn record_failure(&self, e: Error) -> Error {
        if matches!(e.kind(), ErrorKind::Corrupt | ErrorKind::Io) {
            let mut reason = lock(&self.reason);
            if reason.is_none() {
                tracing::error!("pool metadata failed, switching to read-only: {e}");
                *reason = Some(e.to_string());
            }
            self.failed.store(true, Ordering::Release);
        }
        e
    }

    fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    fn reason(&self) -> Option<String> {
        if !self.failed() {
            return None;
        }
        lock(&self.reason).clone()
    }
}

/// The metadata read lock. Fallible metadata operations go through [`run`](Self::run), which
/// records a failure for fail-stop.
pub(crate) struct MetadataRead<'a> {
    guard: RwLockReadGuard<'a, MetadataState>,
    fail_stop: &'a FailStop,
}

impl MetadataRead<'_> {
    /// Runs a metadata operation; a checksum or I/O failure turns the pool read-only.
    pub(crate) fn run<T>(&self, op: impl FnOnce(&MetadataState) -> Result<T>) -> Result<T> {
        op(&self.guard).map_err(|e| self.fail_stop.record_failure(e))
    }
}

impl Deref for MetadataRead<'_> {
    type Target = MetadataState;
    fn deref(&self) -> &MetadataState {
        &self.guard
    }
}

/// The metadata write lock; see [`MetadataRead`].
pub(crate) struct MetadataWrite<'a> {
    guard: RwLockWriteGuard<'a, MetadataState>,
    fail_stop: &'a FailStop,
}

impl MetadataWrite<'_> {
    /// Runs a metadata change; a checksum or I/O failure turns the pool read-only.
    pub(crate) fn run<T>(&mut self, op: impl FnOnce(&mut MetadataState) -> Result<T>) -> Result<T> {
        op(&mut self.guard).map_err(|e| self.fail_stop.record_failure(e))
    }
}

impl Deref for MetadataWrite<'_> {
    type Target = MetadataState;
    fn deref(&self) -> &MetadataState {
        &self.guard
    }
}

impl DerefMut for MetadataWrite<'_> {
    fn deref_mut(&mut self) -> &mut MetadataState {
        &mut self.guard
    }
}

/// See [`PoolState::try_claim`].
pub(crate) enum Claim {
    /// Mapped and not shared: write in place.
    Mapped(Mapping),
    /// Unmapped: `block` was allocated for it (`zeroed`: it reads zeros already).
    New { block: u64, zeroed: bool },
    /// Mapped to `from`, which is shared: `block` was allocated for the copy.
    Copy { from: u64, block: u64 },
}

#[derive(Default)]
pub(crate) struct Stats {
    pub(crate) commits: AtomicU64,
    pub(crate) flushes: AtomicU64,
    pub(crate) provisioned: AtomicU64,
    /// Runs of whole new blocks provisioned together (`try_provision_run`).
    pub(crate) provisioned_runs: AtomicU64,
    pub(crate) copied: AtomicU64,
    pub(crate) discarded: AtomicU64,
    pub(crate) deferred: AtomicU64,
    pub(crate) teardowns_waited: AtomicU64,
}

/// Everything the worker, the handles and the `Pool` share: the metadata behind its lock, the
/// data store, the active thins, the prison, and the pool's signals and counters.
pub(crate) struct PoolState {
    metadata: RwLock<MetadataState>,
    pub(crate) data: Arc<dyn DataStore>,
    pub(crate) block_bytes: u64,
    pub(crate) config: EngineConfig,
    pub(crate) active: ActiveSet<Thin>,
    pub(crate) prison: Prison<Bio>,
    pub(crate) cache: MapCache,
    /// Serialises create/snapshot/delete/activate/teardown (see the lock order in `engine`).
    pub(crate) admin: Mutex<()>,
    pub(crate) work: WorkSignal,
    pub(crate) commits: GroupCommit,
    space_gen: Mutex<u64>,
    space_cv: Condvar,
    pub(crate) stats: Stats,
    /// The low-water mark in blocks for the pool's current size (`EngineConfig::low_water_for`).
    low_water_blocks: AtomicU64,
    low_water_crossed: AtomicBool,
    metadata_low_water_crossed: AtomicBool,
    /// A request was refused for want of metadata room (logged once until space comes).
    out_of_metadata: AtomicBool,
    out_of_space: AtomicBool,
    /// Data reads in flight, so a commit can wait for those that may read a block it freed.
    pub(crate) read_epochs: ReadEpochs,
    fail_stop: FailStop,
    /// Tells activations of the same thin apart.
    pub(crate) next_instance: AtomicU64,
    /// The faults injected into `data` (which is wrapped to inject them).
    #[cfg(any(test, feature = "testing"))]
    pub(crate) faults: Arc<DataFaults>,
    #[cfg(any(test, feature = "testing"))]
    events: EventLog,
}

/// The worker's wake-up call and the pool's stop flag.
#[derive(Default)]
pub(crate) struct WorkSignal {
    pending: Mutex<bool>,
    cv: Condvar,
    stopping: AtomicBool,
}

impl WorkSignal {
    pub(crate) fn wake(&self) {
        *lock(&self.pending) = true;
        self.cv.notify_one();
    }

    /// Waits until woken or stopping, and takes the wake-up.
    pub(crate) fn wait(&self) {
        let mut pending = lock(&self.pending);
        while !*pending && !self.is_stopping() {
            pending = self
                .cv
                .wait_timeout(pending, Duration::from_millis(200))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        *pending = false;
    }

    /// Sets the stop flag; true for the first caller.
    pub(crate) fn stop(&self) -> bool {
        !self.stopping.swap(true, Ordering::AcqRel)
    }

    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl PoolState {
    /// The state of a pool over `md` and `data`; checks that `data` holds every block the
    /// metadata maps, and learns which free blocks read zeros.
    pub(crate) fn new(
        mut md: ThinMetadata,
        data: Arc<dyn DataStore>,
        config: EngineConfig,
    ) -> Result<PoolState> {
        md.set_cache_capacity(config.metadata_cache_blocks);
        let block_bytes = md.data_block_bytes();
        let nr_blocks = md.status().data_total;
        let need = nr_blocks.saturating_mul(block_bytes);
        let have = data.size()?;
        if have < need {
            return fail(
                ErrorKind::InvalidInput,
                format!("the data device has {have} bytes but the metadata maps {need}"),
            );
        }
        let words = usize::try_from(nr_blocks.div_ceil(64))
            .map_err(|_| Error::new(ErrorKind::OutOfBounds, "too many data blocks"))?;
        let zeroed = if data.is_fresh() {
            vec![u64::MAX; words]
        } else {
            zeroed_free_blocks(&md, &*data, block_bytes, nr_blocks, words)
        };
        #[cfg(any(test, feature = "testing"))]
        let faults = Arc::new(DataFaults::default());
        #[cfg(any(test, feature = "testing"))]
        let data: Arc<dyn DataStore> =
            Arc::new(FaultInjectingStore::new(data, faults.clone(), block_bytes));
        let low_water_blocks = config.low_water_for(nr_blocks, block_bytes);
        Ok(PoolState {
            metadata: RwLock::new(MetadataState {
                md,
                zeroed,
                to_punch: Vec::new(),
            }),
            data,
            block_bytes,
            prison: Prison::new(config.cell_pool_size),
            cache: MapCache::new(config.mapping_cache_slots),
            config,
            active: ActiveSet::new(),
            admin: Mutex::new(()),
            work: WorkSignal::default(),
            commits: GroupCommit::default(),
            space_gen: Mutex::new(0),
            space_cv: Condvar::new(),
            stats: Stats::default(),
            low_water_blocks: AtomicU64::new(low_water_blocks),
            low_water_crossed: AtomicBool::new(false),
            metadata_low_water_crossed: AtomicBool::new(false),
            out_of_metadata: AtomicBool::new(false),
            out_of_space: AtomicBool::new(false),
            read_epochs: ReadEpochs::default(),
            fail_stop: FailStop::default(),
            next_instance: AtomicU64::new(1),
            #[cfg(any(test, feature = "testing"))]
            faults,
            #[cfg(any(test, feature = "testing"))]
            events: EventLog::default(),
        })
    }

    /// The byte offset of `within` bytes into data block `block`.
    pub(crate) fn data_offset(&self, block: u64, within: usize) -> Result<u64> {
        block
            .checked_mul(self.block_bytes)
            .and_then(|b| b.checked_add(within as u64))
            .ok_or_else(|| {
                Error::corrupt(format!("data block {block} is past any addressable offset"))
            })
    }

    /// Whether test faults are armed on the data store: the paths that would redo a failed
    /// attempt (the non-blocking ones) then stand aside, and reads go block by block, so each
    /// injected fault is seen once, at the block it was aimed at. Never, outside tests.
    pub(crate) fn data_faults_armed(&self) -> bool {
        #[cfg(any(test, feature = "testing"))]
        return self.faults.armed();
        #[cfg(not(any(test, feature = "testing")))]
        false
    }

    /// Takes the recorded events.
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn take_events(&self) -> Vec<EngineEvent> {
        self.events.take()
    }

    pub(crate) fn read_metadata(&self) -> MetadataRead<'_> {
        MetadataRead {
            guard: self.metadata.read().unwrap_or_else(|p| p.into_inner()),
            fail_stop: &self.fail_stop,
        }
    }

    pub(crate) fn write_metadata(&self) -> MetadataWrite<'_> {
        MetadataWrite {
            guard: self.metadata.write().unwrap_or_else(|p| p.into_inner()),
            fail_stop: &self.fail_stop,
        }
    }

    /// Records a worker or teardown event when the config asks for it (tests).
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn event(&self, e: EngineEvent) {
        if self.config.record_events {
            self.events.record(e);
        }
    }

    pub(crate) fn read_only_reason(&self, core: &MetadataState) -> Option<String> {
        if let Some(why) = core.md.failure() {
            return Some(why.to_string());
        }
        self.fail_stop.reason()
    }

    pub(crate) fn check_writable(&self, core: &MetadataState) -> Result<()> {
        match self.read_only_reason(core) {
            Some(why) => fail(
                ErrorKind::ReadOnly,
                format!("the pool is read-only after a metadata failure ({why}); run thin_check"),
            ),
            None => Ok(()),
        }
    }

    /// Looks a block up through the mapping cache; misses are filled under the read lock.
    pub(crate) fn lookup(&self, thin: ThinId, vblock: u64) -> Result<Option<Mapping>> {
        if let Some(m) = self.cache.get(thin, vblock) {
            return Ok(Some(m));
        }
        let core = self.read_metadata();
        let m = core.run(|c| c.md.lookup(thin, vblock))?;
        if let Some(m) = m {
            self.cache.fill(thin, vblock, m);
        }
        Ok(m)
    }

    /// The mapping if the lock-free cache has it; never touches the metadata lock.
    pub(crate) fn cached_mapping(&self, thin: ThinId, vblock: u64) -> Option<Mapping> {
        self.cache.get(thin, vblock)
    }

    /// Cheap fail-stop test for the overwrite fast path: every metadata failure passes through
    /// a metadata guard's `run` (failed commits included), which sets the flag.
    pub(crate) fn failed(&self) -> bool {
        self.fail_stop.failed()
    }

    /// Tells the worker thread there is work: deferred bios to drain or a teardown to finish.
    pub(crate) fn wake_worker(&self) {
        self.work.wake();
    }

    /// Space was freed or added: wakes writes queued on a full pool.
    pub(crate) fn space_changed(&self) {
        self.out_of_space.store(false, Ordering::Relaxed);
        self.out_of_metadata.store(false, Ordering::Relaxed);
        *lock(&self.space_gen) += 1;
        self.space_cv.notify_all();
    }

    pub(crate) fn space_generation(&self) -> u64 {
        *lock(&self.space_gen)
    }

    /// Waits until the space generation moves past `seen` or `deadline` passes.
    pub(crate) fn wait_for_space(&self, seen: u64, deadline: Instant) -> bool {
        let mut g = lock(&self.space_gen);
        loop {
            if *g != seen {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            g = self
                .space_cv
                .wait_timeout(g, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// True when a retry of an allocation could succeed now.
    pub(crate) fn space_available(&self) -> bool {
        let core = self.read_metadata();
        let data = core.md.free_data_blocks() > 0 || core.md.data_blocks_awaiting_commit() > 0;
        data && (core.md.has_metadata_room_for_mapping()
            || core.md.metadata_blocks_awaiting_commit() > 0)
    }

    /// A request refused for want of metadata room: logged once until space comes.
    fn note_metadata_full(&self, e: &Error) {
        if !self.out_of_metadata.swap(true, Ordering::Relaxed) {
            tracing::warn!("thin pool refused a request: {e}");
        }
    }

    /// Runs `op`; when it is refused for want of space and a commit would free some (blocks
    /// freed in this transaction), commits once and runs it again.
    pub(crate) fn retry_after_commit<T>(&self, mut op: impl FnMut() -> Result<T>) -> Result<T> {
        match op() {
            Err(e) if e.kind() == ErrorKind::NoSpace => {
                let freeable = {
                    let core = self.read_metadata();
                    core.md.metadata_blocks_awaiting_commit() > 0
                        || core.md.data_blocks_awaiting_commit() > 0
                };
                if !freeable {
                    self.note_metadata_full(&e);
                    return Err(e);
                }
                self.flush()?;
                op().inspect_err(|e| {
                    if e.kind() == ErrorKind::NoSpace {
                        self.note_metadata_full(e);
                    }
                })
            }
            other => other,
        }
    }

    /// Allocates a data block; returns it and whether it is known to read zeros. A failed
    /// allocation commits once when freed blocks await a commit, then retries.
    pub(crate) fn alloc_block(&self) -> Result<(u64, bool)> {
        for attempt in 0..2 {
            let mut core = self.write_metadata();
            self.check_writable(&core)?;
            match core.run(|c| c.md.alloc_data_block()) {
                Ok(b) => {
                    let zeroed = core.take_zeroed(b);
                    let free = core.md.free_data_blocks();
                    drop(core);
                    self.check_low_water(free);
                    return Ok((b, zeroed));
                }
                Err(e) if e.kind() == ErrorKind::NoSpace => {
                    let metadata_full = !core.md.has_metadata_room_for_mapping();
                    let awaiting = if metadata_full {
                        core.md.metadata_blocks_awaiting_commit()
                    } else {
                        core.md.data_blocks_awaiting_commit()
                    };
                    drop(core);
                    if awaiting > 0 && attempt == 0 {
                        self.flush()?;
                        continue;
                    }
                    if metadata_full {
                        self.note_metadata_full(&e);
                        return Err(e);
                    }
                    if !self.out_of_space.swap(true, Ordering::Relaxed) {
                        tracing::warn!("thin pool is out of data space");
                    }
                    return fail(ErrorKind::NoSpace, "the thin pool is out of data space");
                }
                Err(e) => return Err(e),
            }
        }
        fail(ErrorKind::NoSpace, "the thin pool is out of data space")
    }

    /// What a write into a block the mapping cache does not know as mapped and unshared can
    /// do, decided under the metadata write lock only if that lock is free at once (`None`
    /// otherwise, and also for a read-only or full pool, or an error: the blocking path's
    /// cases).
    pub(crate) fn try_claim(&self, thin: ThinId, vblock: u64) -> Option<Claim> {
        let mut core = match self.metadata.try_write() {
            Ok(c) => c,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        if self.read_only_reason(&core).is_some() {
            return None;
        }
        let shared_from = match core.md.lookup(thin, vblock).ok()? {
            None => None,
            Some(m) if !m.shared => {
                self.cache.fill(thin, vblock, m);
                return Some(Claim::Mapped(m));
            }
            Some(m) => Some(m.data_block),
        };
        let block = core.md.alloc_data_block().ok()?;
        let zeroed = core.take_zeroed(block);
        let free = core.md.free_data_blocks();
        drop(core);
        self.check_low_water(free);
        Some(match shared_from {
            None => Claim::New { block, zeroed },
            Some(from) => Claim::Copy { from, block },
        })
    }

    fn check_low_water(&self, free: u64) {
        let mark = self.low_water_blocks.load(Ordering::Relaxed);
        if mark == 0 {
            return;
        }
        if free <= mark {
            if !self.low_water_crossed.swap(true, Ordering::Relaxed) {
                let bs = self.block_bytes;
                tracing::warn!(
                    "thin pool reached its low-water mark: {} bytes of data free (mark {} bytes)",
                    free * bs,
                    mark * bs
                );
            }
        } else {
            self.low_water_crossed.store(false, Ordering::Relaxed);
        }
    }

    /// The metadata low-water mark in blocks: the configured share of a metadata device of
    /// `total` blocks above the `reserve`, so the warning comes before any refusal.
    fn metadata_low_water_blocks(&self, total: u64, reserve: u64) -> u64 {
        match self.config.metadata_low_water_percent {
            0 => 0,
            pct => reserve + total.saturating_mul(pct) / 100,
        }
    }

    fn check_metadata_low_water(&self, free: u64, total: u64, reserve: u64) {
        let mark = self.metadata_low_water_blocks(total, reserve);
        if mark == 0 {
            return;
        }
        if free <= mark {
            if !self
                .metadata_low_water_crossed
                .swap(true, Ordering::Relaxed)
            {
                let block = BLOCK_SIZE as u64;
                tracing::warn!(
                    "thin pool reached its metadata low-water mark: {free} free metadata blocks ({} bytes) of {total}, mark {mark} blocks ({} bytes); grow it with `thinnbd pool grow DIR --metadata-size SIZE`",
                    free * block,
                    mark * block
                );
            }
        } else {
            self.metadata_low_water_crossed
                .store(false, Ordering::Relaxed);
        }
    }

    /// Gives back a block allocated for a write that failed.
    pub(crate) fn release_block(&self, b: u64) {
        // A failure is recorded (fail-stop) by `run`; the write already failed for its own reason.
        let _ = self.write_metadata().run(|c| c.md.release_data_block(b));
    }

    /// Maps `vblock` of `thin` to `b`; on failure the block is released.
    pub(crate) fn insert_mapping(&self, thin: ThinId, vblock: u64, b: u64) -> Result<()> {
        let mut core = self.write_metadata();
        self.cache.invalidate(thin, vblock);
        core.run(|c| {
            c.md.insert(thin, vblock, b).inspect_err(|_| {
                let _ = c.md.release_data_block(b);
            })
        })
    }

    /// Allocates `n` blocks for the unmapped run `[vblock, vblock + n)` of `thin` under one
    /// metadata lock; `None` (nothing allocated) if any of them is mapped, the pool cannot
    /// hold them all, or anything fails: the block-by-block path then deals with it.
    pub(crate) fn alloc_run(&self, thin: ThinId, vblock: u64, n: u64) -> Option<Vec<u64>> {
        let mut core = self.write_metadata();
        if self.read_only_reason(&core).is_some() || core.md.free_data_blocks() < n {
            return None;
        }
        for vb in vblock..vblock + n {
            if core.md.lookup(thin, vb).ok()?.is_some() {
                return None;
            }
        }
        let mut blocks = Vec::with_capacity(usize::try_from(n).ok()?);
        for _ in 0..n {
            match core.md.alloc_data_block() {
                Ok(b) => {
                    // Whole blocks are written in full, but the block must stop counting as
                    // known-zero, or its next owner after a free would skip zeroing it.
                    core.take_zeroed(b);
                    blocks.push(b);
                }
                Err(_) => {
                    for &b in &blocks {
                        let _ = core.md.release_data_block(b);
                    }
                    return None;
                }
            }
        }
        let free = core.md.free_data_blocks();
        drop(core);
        self.check_low_water(free);
        Some(blocks)
    }

    /// Maps `vblock + i` of `thin` to `blocks[i]` under one lock; on failure every block not
    /// yet mapped is released and the pool turns read-only (as with one insert).
    pub(crate) fn insert_mappings(&self, thin: ThinId, vblock: u64, blocks: &[u64]) -> Result<()> {
        self.write_metadata().run(|c| {
            for (i, &b) in blocks.iter().enumerate() {
                let vb = vblock + i as u64;
                self.cache.invalidate(thin, vb);
                if let Err(e) = c.md.insert(thin, vb, b) {
                    for &rest in &blocks[i..] {
                        let _ = c.md.release_data_block(rest);
                    }
                    return Err(e);
                }
            }
            Ok(())
        })
    }

    /// Unmaps `[begin, end)` of `thin`; blocks nobody references any more are punched out of
    /// the data device after the next commit (see `commit_now`).
    pub(crate) fn unmap_range(&self, thin: ThinId, begin: u64, end: u64) -> Result<()> {
        self.retry_after_commit(|| self.unmap_range_once(thin, begin, end))
    }

    fn unmap_range_once(&self, thin: ThinId, begin: u64, end: u64) -> Result<()> {
        let mut core = self.write_metadata();
        self.check_writable(&core)?;
        let gone = core
            .run(|c| c.md.remove_range(thin, begin, end))
            // Some mappings may be gone already; forget them all.
            .inspect_err(|_| self.cache.clear())?;
        let mut freed = 0u64;
        for u in &gone {
            self.cache.invalidate(thin, u.vblock);
            if !u.freed {
                continue;
            }
            freed += 1;
            core.to_punch.push(u.data_block);
        }
        drop(core);
        self.stats
            .discarded
            .fetch_add(gone.len() as u64, Ordering::Relaxed);
        if freed > 0 {
            self.space_changed();
        }
        Ok(())
    }

    /// Group commit: returns once a commit that started after this call has finished, so
    /// every write acknowledged before the call is durable. Concurrent callers share commits.
    pub(crate) fn flush(&self) -> Result<()> {
        self.stats.flushes.fetch_add(1, Ordering::Relaxed);
        self.commits.flush(|| self.commit_now())
    }

    /// Data first (so committed mappings never point at unwritten data), then metadata.
    fn commit_now(&self) -> Result<()> {
        self.stats.commits.fetch_add(1, Ordering::Relaxed);
        #[cfg(any(test, feature = "testing"))]
        if !self.config.commit_delay.is_zero() {
            std::thread::sleep(self.config.commit_delay);
        }
        self.data.sync()?;
        let mut core = self.write_metadata();
        if let Some(why) = self.read_only_reason(&core) {
            return fail(
                ErrorKind::ReadOnly,
                format!("the pool is read-only after a metadata failure ({why})"),
            );
        }
        // Every block this transaction freed stays out of the allocator past the commit until
        // the reads that may still be copying it are done (see `epochs`); discarded and
        // deleted ones are also punched first.
        let mut to_punch = std::mem::take(&mut core.to_punch);
        let freed = core.md.data_blocks_freed_since_commit();
        core.md.hold_freed_data_blocks(&freed);
        core.md.hold_freed_data_blocks(&to_punch);
        core.run(|c| c.md.commit())?;
        let metadata_free = core.md.free_metadata_blocks();
        let metadata_total = core.md.status().metadata_total;
        let metadata_reserve = core.md.metadata_reserve();
        drop(core);
        self.check_metadata_low_water(metadata_free, metadata_total, metadata_reserve);
        if self.out_of_metadata.load(Ordering::Relaxed) {
            // The commit made the metadata blocks this transaction freed allocatable: writes
            // queued for want of metadata may fit now.
            self.space_changed();
        }
        if !freed.is_empty() || !to_punch.is_empty() {
            self.read_epochs.wait_for_earlier_readers();
            let punched = self.punch_discarded(&mut to_punch);
            let mut core = self.write_metadata();
            for b in punched {
                core.set_zeroed(b);
            }
            core.md.release_data_blocks(&freed);
            core.md.release_data_blocks(&to_punch);
            drop(core);
            self.space_changed();
        }
        Ok(())
    }

    /// Gives discarded blocks, freed by a durable commit, back to the file system and returns
    /// those punched (they now read zeros). They are held out of the allocator meanwhile, so
    /// no lock is needed around the punching.
    fn punch_discarded(&self, blocks: &mut Vec<u64>) -> Vec<u64> {
        blocks.sort_unstable();
        blocks.dedup();
        let mut punched = Vec::with_capacity(blocks.len());
        for run in blocks.chunk_by(|a, b| a + 1 == *b) {
            let (Some(off), Some(len)) = (
                run[0].checked_mul(self.block_bytes),
                (run.len() as u64).checked_mul(self.block_bytes),
            ) else {
                continue;
            };
            match self.data.punch(off, len) {
                Ok(true) => punched.extend_from_slice(run),
                Ok(false) => break,
                Err(e) => tracing::warn!("discard passdown failed: {e}"),
            }
        }
        punched
    }

    pub(crate) fn release_cell(&self, thin: &Thin, held: Held) {
        let inmates = self.prison.release(held);
        if !inmates.is_empty() {
            self.stats
                .deferred
                .fetch_add(inmates.len() as u64, Ordering::Relaxed);
            for bio in inmates {
                thin.defer(bio);
            }
            self.wake_worker();
        }
    }

    pub(crate) fn status(&self) -> PoolStatus {
        let state = self;
        let active: Vec<ThinId> = state.active.members().iter().map(|t| t.id()).collect();
        let core = state.read_metadata();
        let ms = core.md.status();
        let ro = state.read_only_reason(&core);
        let thins = core
            .md
            .thin_ids()
            .into_iter()
            .map(|id| ThinStatus {
                id,
                active: active.contains(&id),
                mapped_blocks: core.md.mapped_blocks(id).unwrap_or(0),
            })
            .collect();
        let data_free = core.md.free_data_blocks();
        let metadata_free = core.md.free_metadata_blocks();
        let metadata_reserve = core.md.metadata_reserve();
        drop(core);
        let metadata_low_water_blocks =
            state.metadata_low_water_blocks(ms.metadata_total, metadata_reserve);
        let mode = if ro.is_some() {
            PoolMode::ReadOnly
        } else if state.out_of_space.load(Ordering::Relaxed) {
            PoolMode::OutOfSpace
        } else {
            PoolMode::Write
        };
        PoolStatus {
            data_block_bytes: state.block_bytes,
            data_used: ms.data_used,
            data_total: ms.data_total,
            data_free,
            metadata_used: ms.metadata_used,
            metadata_total: ms.metadata_total,
            metadata_free,
            metadata_reserve,
            metadata_low_water_blocks,
            metadata_low_water_crossed: metadata_low_water_blocks > 0
                && metadata_free <= metadata_low_water_blocks,
            mode,
            read_only_reason: ro,
            low_water_blocks: state.low_water_blocks.load(Ordering::Relaxed),
            low_water_crossed: {
                let mark = state.low_water_blocks.load(Ordering::Relaxed);
                mark > 0 && data_free <= mark
            },
            thins,
            commits_done: state.stats.commits.load(Ordering::Relaxed),
            flushes_requested: state.stats.flushes.load(Ordering::Relaxed),
            blocks_provisioned: state.stats.provisioned.load(Ordering::Relaxed),
            blocks_copied: state.stats.copied.load(Ordering::Relaxed),
            blocks_discarded: state.stats.discarded.load(Ordering::Relaxed),
            bios_deferred: state.stats.deferred.load(Ordering::Relaxed),
            cells_in_use: state.prison.pool().in_use(),
            teardowns_waited: state.stats.teardowns_waited.load(Ordering::Relaxed),
        }
    }

    /// Follows a resize of the data to `nr_blocks` blocks with the low-water mark.
    pub(crate) fn set_data_blocks(&self, nr_blocks: u64) {
        self.low_water_blocks.store(
            self.config.low_water_for(nr_blocks, self.block_bytes),
            Ordering::Relaxed,
        );
    }
}

/// Free data blocks that are holes in the data file read zeros: a partial write that provisions
/// one need not zero the rest of it. (After a restart most free blocks of a sparse file are.)
fn zeroed_free_blocks(
    md: &ThinMetadata,
    data: &dyn DataStore,
    block_bytes: u64,
    nr_blocks: u64,
    words: usize,
) -> Vec<u64> {
    let mut zeroed = vec![0u64; words];
    for (begin, end) in data.zeroed_ranges(nr_blocks.saturating_mul(block_bytes)) {
        for b in begin.div_ceil(block_bytes)..(end / block_bytes).min(nr_blocks) {
            if md.data_block_refs(b).unwrap_or(1) == 0 {
                zeroed[(b / 64) as usize] |= 1 << (b % 64);
            }
        }
    }
    zeroed
}
