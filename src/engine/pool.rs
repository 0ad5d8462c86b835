//! A pool: its metadata (behind one reader-writer lock), its data device, the active thins, the
//! bio prison, the deferred-bio worker thread, group commit, and the no-space and fail-stop
//! policies.
//!
//! Lock order (outer first): admin mutex -> a thin's quiesce gate -> prison cell (held as a
//! token, not a lock) -> metadata lock -> small leaf mutexes (deferred lists, counters). The
//! admin mutex serialises create/snapshot/delete/activate/teardown and is never taken by the
//! worker or the I/O paths, so teardown may hold it while it waits. Apart from that, nobody
//! holds the metadata lock or any mutex while blocking on the cell pool, on a completion, or on
//! a teardown; the worker holds only counted thin references ([`super::active::Ref`]) while it
//! blocks.

use std::fs::{File, OpenOptions};
use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{fail, Error, ErrorKind, Result};
use crate::pdata::block_io::{BlockIo, FileBlockIo, BLOCK_SIZE};
use crate::pdata::space_map::MAX_METADATA_BLOCKS;
use crate::thin::metadata::{
    recommended_metadata_blocks, Mapping, ThinId, ThinMetadata, DEFAULT_MAX_THINS,
    MIN_DATA_BLOCK_SECTORS, MIN_METADATA_BLOCKS,
};

use super::active::{ActiveSet, Member};
use super::data::DataDevice;
use super::epochs::ReadEpochs;
use super::mapcache::MapCache;
use super::prison::{Detain, Prison};
use super::thin_device::{Bio, Thin, ThinHandle};

/// What a write that needs a new data block does when the pool is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoSpacePolicy {
    /// Fail at once with `NoSpace`.
    Error,
    /// Wait up to `queue_timeout` for space to be freed (discard, delete, grow), then `NoSpace`.
    Queue,
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub no_space_policy: NoSpacePolicy,
    pub queue_timeout: Duration,
    /// Free data blocks at or below which the pool reports (and logs once) the low-water mark,
    /// when `low_water_percent` is 0 (`pool.low_water_mark` given as a size); 0 with it turns
    /// the mark off.
    pub low_water_blocks: u64,
    /// Free metadata blocks, as a percentage of the metadata device above the reserve, at or
    /// below which the pool reports (and logs once) the metadata low-water mark
    /// (`pool.metadata_low_water`, default 20%); 0 turns the mark off.
    pub metadata_low_water_percent: u64,
    /// The low-water mark as a percentage of the pool's data blocks (1-100; 0: use
    /// `low_water_blocks`), so one setting suits a small pool and a large one, and follows a
    /// grown pool (`pool.low_water_mark`, default 10%). Set it to 0 with `low_water_blocks`.
    pub low_water_percent: u8,
    /// Cells in the bio prison's pool (blocks being provisioned or copied at once).
    pub cell_pool_size: usize,
    /// Zero the rest of a newly provisioned block on a partial write (unless it is known to read
    /// zeros already). Turning it off may expose stale data of freed blocks.
    pub zero_new_blocks: bool,
    /// Keep a log of worker and teardown events ([`Pool::take_events`]), for tests.
    pub record_events: bool,
    /// Extra delay inside each commit, for tests that must see flushes coalesce.
    pub commit_delay: Duration,
    /// Extra delay before the worker drops a thin's clone, for tests that must see teardown
    /// wait for it.
    pub worker_hold_delay: Duration,
    /// Slots of the lock-free mapping cache used by the read and overwrite fast paths
    /// (24 bytes each; 0 turns it off).
    pub mapping_cache_slots: usize,
    /// Metadata blocks (4 KiB) kept in the metadata block cache.
    pub metadata_cache_blocks: usize,
    /// Largest single write to the data device (0: whole writes); see
    /// [`DataDevice::set_write_chunk`].
    pub data_write_chunk: u64,
}

impl EngineConfig {
    /// The low-water mark in blocks for a pool of `data_blocks`.
    pub fn low_water_for(&self, data_blocks: u64) -> u64 {
        match u64::from(self.low_water_percent.min(100)) {
            0 => self.low_water_blocks,
            pct => data_blocks / 100 * pct + data_blocks % 100 * pct / 100,
        }
    }
}

/// The default bio-prison cells (`engine.cell_pool_size`).
pub const DEFAULT_CELL_POOL_SIZE: usize = 1024;
/// The default mapping-cache slots (`engine.mapping_cache_slots`).
pub const DEFAULT_MAPPING_CACHE_SLOTS: usize = 1 << 18;
/// The default wait for space under `NoSpacePolicy::Queue` (`pool.no_space_timeout_secs`).
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(60);
/// The default data low-water mark (`pool.low_water_mark`), in percent of the pool's data.
const DEFAULT_LOW_WATER_PERCENT: u8 = 10;
/// The default metadata low-water mark (`pool.metadata_low_water`), in percent.
const DEFAULT_METADATA_LOW_WATER_PERCENT: u64 = 20;

/// The values of the shipped `config/thinnbd.toml` (the config's tests hold them equal), so
/// that a pool opened without a config file behaves as `thinnbd serve` with none.
impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            no_space_policy: NoSpacePolicy::Queue,
            queue_timeout: DEFAULT_QUEUE_TIMEOUT,
            low_water_blocks: 0,
            metadata_low_water_percent: DEFAULT_METADATA_LOW_WATER_PERCENT,
            low_water_percent: DEFAULT_LOW_WATER_PERCENT,
            cell_pool_size: DEFAULT_CELL_POOL_SIZE,
            zero_new_blocks: true,
            record_events: false,
            commit_delay: Duration::ZERO,
            worker_hold_delay: Duration::ZERO,
            mapping_cache_slots: DEFAULT_MAPPING_CACHE_SLOTS,
            metadata_cache_blocks: crate::pdata::tm::DEFAULT_CACHE_BLOCKS,
            data_write_chunk: super::data::DEFAULT_WRITE_CHUNK,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    Write,
    /// A write needed a block and none was free; writes to provisioned blocks still work.
    OutOfSpace,
    /// Fail-stop after a metadata failure: reads only.
    ReadOnly,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThinStatus {
    pub id: ThinId,
    pub active: bool,
    pub mapped_blocks: u64,
}

#[derive(Debug, Clone)]
pub struct PoolStatus {
    pub data_block_bytes: u64,
    pub data_used: u64,
    pub data_total: u64,
    pub data_free: u64,
    pub metadata_used: u64,
    pub metadata_total: u64,
    /// Metadata blocks allocatable before the next commit.
    pub metadata_free: u64,
    /// Metadata blocks kept for commits and for requests that free space: a new volume,
    /// snapshot or data block is refused (no space) rather than take them.
    pub metadata_reserve: u64,
    pub metadata_low_water_blocks: u64,
    pub metadata_low_water_crossed: bool,
    pub mode: PoolMode,
    pub read_only_reason: Option<String>,
    pub low_water_blocks: u64,
    pub low_water_crossed: bool,
    pub thins: Vec<ThinStatus>,
    pub commits_done: u64,
    pub flushes_requested: u64,
    pub blocks_provisioned: u64,
    pub blocks_copied: u64,
    pub blocks_discarded: u64,
    /// Bios handed to the worker: no free cell at submission, or released from a cell.
    pub bios_deferred: u64,
    pub cells_in_use: usize,
    /// Teardowns that found a worker clone still alive and waited for it.
    pub teardowns_waited: u64,
}

/// Worker and teardown events, recorded when `EngineConfig::record_events` is set. `instance`
/// tells activations of the same thin apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineEvent {
    WorkerGet { thin: ThinId, instance: u64 },
    WorkerPut { thin: ThinId, instance: u64 },
    TeardownBegin { thin: ThinId, instance: u64 },
    TeardownEnd { thin: ThinId, instance: u64 },
}

/// The pool's metadata and the per-block state kept with it, behind the metadata lock.
pub(crate) struct MetadataState {
    pub(crate) md: ThinMetadata,
    /// One bit per data block: known to read zeros (fresh sparse file, or punched).
    zeroed: Vec<u64>,
    /// Data blocks freed in this transaction whose contents go back to the file system
    /// (hole punching) once the commit that frees them is durable.
    to_punch: Vec<u64>,
}

impl MetadataState {
    fn take_zeroed(&mut self, b: u64) -> bool {
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

    fn set_zeroed(&mut self, b: u64) {
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

#[derive(Default)]
struct CommitState {
    started: u64,
    completed: u64,
    running: bool,
    last_error: Option<Error>,
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

/// Everything the worker and the handles share; `Pool` owns the worker thread on top.
pub(crate) struct PoolState {
    metadata: RwLock<MetadataState>,
    pub(crate) data: DataDevice,
    pub(crate) block_bytes: u64,
    pub(crate) config: EngineConfig,
    pub(crate) active: ActiveSet<Thin>,
    pub(crate) prison: Prison<Bio>,
    cache: MapCache,
    admin: Mutex<()>,
    work_pending: Mutex<bool>,
    work_pending_cv: Condvar,
    stopping: AtomicBool,
    commit: Mutex<CommitState>,
    commit_cv: Condvar,
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
    /// A commit holds (or is about to take) the metadata write lock for its I/O: the
    /// non-blocking write path declines rather than wait behind it.
    pub(crate) committing: AtomicBool,
    /// Data reads in flight, so a commit can wait for those that may read a block it freed.
    pub(crate) read_epochs: ReadEpochs,
    fail_stop: FailStop,
    events: Mutex<Vec<EngineEvent>>,
    next_instance: AtomicU64,
}

const MAX_EVENTS: usize = 4_000_000;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl PoolState {
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

    pub(crate) fn event(&self, e: EngineEvent) {
        if self.config.record_events {
            let mut ev = lock(&self.events);
            if ev.len() < MAX_EVENTS {
                ev.push(e);
            }
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
        *lock(&self.work_pending) = true;
        self.work_pending_cv.notify_one();
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
        let mut st = lock(&self.commit);
        let target = st.started + 1;
        loop {
            if st.completed >= target {
                // A failed commit turns the pool read-only, so every later one fails too.
                return match &st.last_error {
                    Some(e) => Err(e.duplicate()),
                    None => Ok(()),
                };
            }
            if !st.running {
                st.running = true;
                st.started += 1;
                let mine = st.started;
                drop(st);
                let r = self.commit_now();
                st = lock(&self.commit);
                st.running = false;
                st.completed = mine;
                st.last_error = r.err();
                self.commit_cv.notify_all();
                continue;
            }
            st = self.commit_cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Data first (so committed mappings never point at unwritten data), then metadata.
    fn commit_now(&self) -> Result<()> {
        self.committing.store(true, Ordering::Release);
        let r = self.commit_inner();
        self.committing.store(false, Ordering::Release);
        r
    }

    fn commit_inner(&self) -> Result<()> {
        self.stats.commits.fetch_add(1, Ordering::Relaxed);
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

    /// Processes a thin's deferred bios: lock each block in the prison (blocking on the cell
    /// pool when it is exhausted), write, release, complete. Called by the worker while it holds
    /// a counted reference to the thin, and by teardown after the last such reference is gone.
    pub(crate) fn process_deferred(&self, thin: &Thin) {
        while let Some(bio) = thin.pop_deferred() {
            match self.prison.detain((thin.id(), bio.vblock), bio) {
                Detain::Held(held, bio) => {
                    let r = self.process_write(thin, &bio);
                    self.release_cell(thin, held);
                    bio.complete(r);
                }
                Detain::Waiting => {}
                Detain::NoCell(bio) => thin.defer(bio),
            }
        }
    }

    pub(crate) fn release_cell(&self, thin: &Thin, held: super::prison::Held) {
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

    /// Walks the active set, one thin at a time: a counted clone is taken inside the snapshot
    /// read, the snapshot guard is dropped, the thin's deferred bios are processed (which may
    /// block on the cell pool), then the clone is dropped.
    fn worker_pass(&self) {
        let mut i = 0;
        while let Some(slot) = self.active.get_at(i, |t| t.has_deferred()) {
            i += 1;
            let Some(r) = slot else { continue };
            self.event(EngineEvent::WorkerGet {
                thin: r.id(),
                instance: r.instance(),
            });
            self.process_deferred(&r);
            if !self.config.worker_hold_delay.is_zero() {
                std::thread::sleep(self.config.worker_hold_delay);
            }
            self.event(EngineEvent::WorkerPut {
                thin: r.id(),
                instance: r.instance(),
            });
            drop(r);
        }
    }

    fn worker_loop(&self) {
        loop {
            {
                let mut k = lock(&self.work_pending);
                while !*k && !self.stopping.load(Ordering::Acquire) {
                    k = self
                        .work_pending_cv
                        .wait_timeout(k, Duration::from_millis(200))
                        .map(|(g, _)| g)
                        .unwrap_or_else(|p| p.into_inner().0);
                }
                *k = false;
            }
            self.worker_pass();
            if self.stopping.load(Ordering::Acquire) && self.active.is_empty() {
                return;
            }
        }
    }

    /// Removes a thin from the active set and waits until nothing else uses it; see
    /// [`Pool::teardown`].
    pub(crate) fn teardown_thin(&self, thin: &crate::sync::Arc<Thin>) -> Result<()> {
        // Held throughout, so a delete or re-activation of this thin waits for the end.
        let _admin = lock(&self.admin);
        thin.set_closing();
        // Writes parked on a full pool notice the closing flag once woken.
        self.space_changed();
        let instance = thin.instance();
        if self
            .active
            .remove_if(thin.key(), |t| t.instance() == instance)
            .is_none()
        {
            return Ok(());
        }
        self.event(EngineEvent::TeardownBegin {
            thin: thin.id(),
            instance: thin.instance(),
        });
        if thin.life().count() > 1 {
            self.stats.teardowns_waited.fetch_add(1, Ordering::Relaxed);
        }
        thin.life().put_and_wait();
        // The worker can no longer reach this thin. Serve what is left until no request is in
        // flight (the quiesce gate is free); later requests see the closing flag.
        loop {
            self.process_deferred(thin);
            if let Some(_quiet) = thin.try_quiesce() {
                self.process_deferred(thin);
                break;
            }
            thin.wait_deferred(Duration::from_millis(2));
        }
        let r = self.flush();
        self.event(EngineEvent::TeardownEnd {
            thin: thin.id(),
            instance: thin.instance(),
        });
        r
    }
}

/// A thin pool. Always used as `Arc<Pool>`; dropping the last one shuts it down.
pub struct Pool {
    state: std::sync::Arc<PoolState>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

fn data_block_sectors(block_size_bytes: u64) -> Result<u32> {
    let unit = u64::from(MIN_DATA_BLOCK_SECTORS) * 512;
    if block_size_bytes == 0 || !block_size_bytes.is_multiple_of(unit) {
        return fail(
            ErrorKind::InvalidInput,
            format!("block size {block_size_bytes}: must be a multiple of 64 KiB"),
        );
    }
    u32::try_from(block_size_bytes / 512).map_err(|_| {
        Error::new(
            ErrorKind::InvalidInput,
            format!("block size {block_size_bytes} is too large"),
        )
    })
}

/// A metadata size the format can use: whole 4 KiB blocks, within its limits.
fn check_metadata_bytes(bytes: u64) -> Result<()> {
    let block = BLOCK_SIZE as u64;
    let (min, max) = (MIN_METADATA_BLOCKS * block, MAX_METADATA_BLOCKS * block);
    if !bytes.is_multiple_of(block) || !(min..=max).contains(&bytes) {
        return fail(
            ErrorKind::InvalidInput,
            format!("metadata size {bytes}: must be a multiple of 4 KiB from {min} to {max} bytes"),
        );
    }
    Ok(())
}

fn open_rw(path: &Path, create: bool) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .open(path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))
}

impl Pool {
    /// Creates a pool: a sparse data file of `data_size_bytes` (created when missing) and fresh
    /// metadata, sized for the data and allocated in full, in `metadata`.
    pub fn create(
        metadata: &Path,
        data: &Path,
        data_size_bytes: u64,
        block_size_bytes: u64,
        config: EngineConfig,
    ) -> Result<std::sync::Arc<Pool>> {
        Pool::create_sized(
            metadata,
            data,
            data_size_bytes,
            block_size_bytes,
            None,
            config,
        )
    }

    /// Bytes of metadata a pool gets by default: sized for its data blocks and
    /// [`DEFAULT_MAX_THINS`] volumes and snapshots.
    pub fn default_metadata_bytes(data_size_bytes: u64, block_size_bytes: u64) -> u64 {
        let nr_blocks = data_size_bytes / block_size_bytes.max(1);
        recommended_metadata_blocks(nr_blocks, DEFAULT_MAX_THINS) * BLOCK_SIZE as u64
    }

    /// As [`create`](Self::create), with `metadata_bytes` of metadata (default: sized for
    /// the data, see [`default_metadata_bytes`](Self::default_metadata_bytes)).
    pub fn create_sized(
        metadata: &Path,
        data: &Path,
        data_size_bytes: u64,
        block_size_bytes: u64,
        metadata_bytes: Option<u64>,
        config: EngineConfig,
    ) -> Result<std::sync::Arc<Pool>> {
        data_block_sectors(block_size_bytes)?;
        let nr_blocks = data_size_bytes / block_size_bytes;
        if nr_blocks == 0 {
            return fail(
                ErrorKind::InvalidInput,
                "the data device is smaller than one block",
            );
        }
        let fresh = !data.exists();
        let data_file = open_rw(data, true)?;
        let dev = DataDevice::new(data_file, fresh);
        dev.grow_to(data_size_bytes)?;
        let meta_file = open_rw(metadata, true)?;
        let meta_bytes = metadata_bytes
            .unwrap_or_else(|| Pool::default_metadata_bytes(data_size_bytes, block_size_bytes));
        check_metadata_bytes(meta_bytes)?;
        meta_file
            .set_len(meta_bytes)
            .map_err(|e| Error::io(format!("sizing {}", metadata.display()), e))?;
        // Allocated in full now, so a commit can never fail for lack of host space (a failed
        // commit makes the pool read-only).
        crate::util::allocate(&meta_file, meta_bytes).map_err(|e| {
            Error::data_io(
                format!("allocating {meta_bytes} bytes for {}", metadata.display()),
                e,
            )
        })?;
        let io: std::sync::Arc<dyn BlockIo> = std::sync::Arc::new(FileBlockIo::new(meta_file)?);
        Pool::create_from_parts(io, dev, block_size_bytes, nr_blocks, config)
    }

    /// Opens an existing pool.
    pub fn open(
        metadata: &Path,
        data: &Path,
        config: EngineConfig,
    ) -> Result<std::sync::Arc<Pool>> {
        let io: std::sync::Arc<dyn BlockIo> =
            std::sync::Arc::new(FileBlockIo::new(open_rw(metadata, false)?)?);
        let dev = DataDevice::new(open_rw(data, false)?, false);
        Pool::from_parts(io, dev, config)
    }

    /// Formats `metadata` and builds a pool over `data` (tests: in-memory metadata, faults).
    pub fn create_from_parts(
        metadata: std::sync::Arc<dyn BlockIo>,
        data: DataDevice,
        block_size_bytes: u64,
        nr_data_blocks: u64,
        config: EngineConfig,
    ) -> Result<std::sync::Arc<Pool>> {
        let sectors = data_block_sectors(block_size_bytes)?;
        let md = ThinMetadata::format(metadata, sectors, nr_data_blocks)?;
        Pool::start(md, data, config)
    }

    /// Opens existing metadata over `data`.
    pub fn from_parts(
        metadata: std::sync::Arc<dyn BlockIo>,
        data: DataDevice,
        config: EngineConfig,
    ) -> Result<std::sync::Arc<Pool>> {
        let md = ThinMetadata::open(metadata)?;
        Pool::start(md, data, config)
    }

    fn start(
        mut md: ThinMetadata,
        mut data: DataDevice,
        config: EngineConfig,
    ) -> Result<std::sync::Arc<Pool>> {
        md.set_cache_capacity(config.metadata_cache_blocks);
        data.set_write_chunk(config.data_write_chunk);
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
            zeroed_free_blocks(&md, &data, block_bytes, nr_blocks, words)
        };
        let low_water_blocks = config.low_water_for(nr_blocks);
        let state = std::sync::Arc::new(PoolState {
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
            work_pending: Mutex::new(false),
            work_pending_cv: Condvar::new(),
            stopping: AtomicBool::new(false),
            commit: Mutex::new(CommitState::default()),
            commit_cv: Condvar::new(),
            space_gen: Mutex::new(0),
            space_cv: Condvar::new(),
            stats: Stats::default(),
            low_water_blocks: AtomicU64::new(low_water_blocks),
            low_water_crossed: AtomicBool::new(false),
            metadata_low_water_crossed: AtomicBool::new(false),
            out_of_metadata: AtomicBool::new(false),
            out_of_space: AtomicBool::new(false),
            committing: AtomicBool::new(false),
            read_epochs: ReadEpochs::default(),
            fail_stop: FailStop::default(),
            events: Mutex::new(Vec::new()),
            next_instance: AtomicU64::new(1),
        });
        let worker_state = state.clone();
        let worker = std::thread::Builder::new()
            .name("thinnbd-pool-worker".into())
            .spawn(move || worker_state.worker_loop())
            .map_err(|e| Error::io("starting the pool worker", e))?;
        Ok(std::sync::Arc::new(Pool {
            state,
            worker: Mutex::new(Some(worker)),
        }))
    }

    pub fn block_size(&self) -> u64 {
        self.state.block_bytes
    }

    pub fn config(&self) -> &EngineConfig {
        &self.state.config
    }

    /// The data device, for fault injection in tests.
    pub fn data_device(&self) -> &DataDevice {
        &self.state.data
    }

    fn admin_op<T>(&self, f: impl FnOnce(&mut MetadataState) -> Result<T>) -> Result<T> {
        let mut core = self.state.write_metadata();
        self.state.check_writable(&core)?;
        core.run(f)
    }

    pub fn create_thin(&self, id: ThinId) -> Result<()> {
        let _a = lock(&self.state.admin);
        self.state
            .retry_after_commit(|| self.admin_op(|c| c.md.create_thin(id)))?;
        self.state.flush()
    }

    /// Snapshots `origin`. An active origin is quiesced first (in-flight writes finish, new ones
    /// wait) so the snapshot holds exactly what was acknowledged before it.
    pub fn create_snapshot(&self, id: ThinId, origin: ThinId) -> Result<()> {
        let _a = lock(&self.state.admin);
        let active = self
            .state
            .active
            .members()
            .into_iter()
            .find(|t| t.id() == origin);
        let _quiet = active.as_ref().map(|t| t.quiesce());
        let cache = &self.state.cache;
        self.state.retry_after_commit(|| {
            self.admin_op(|c| {
                // Every mapping of the origin is shared from now on.
                cache.clear();
                c.md.create_snapshot(id, origin)
            })
        })?;
        drop(_quiet);
        self.state.flush()
    }

    /// Deletes a thin; `Busy` while it is active.
    pub fn delete_thin(&self, id: ThinId) -> Result<()> {
        let _a = lock(&self.state.admin);
        if self.state.active.members().iter().any(|t| t.id() == id) {
            return fail(ErrorKind::Busy, format!("thin {id} is active"));
        }
        let cache = &self.state.cache;
        self.state.retry_after_commit(|| {
            self.admin_op(|c| {
                cache.clear();
                c.md.delete_thin(id)?;
                // The freed blocks go back to the file system after the commit below, as a
                // discard's do.
                let freed = c.md.data_blocks_freed_since_commit();
                c.to_punch.extend(freed);
                Ok(())
            })
        })?;
        self.state.space_changed();
        self.state.flush()
    }

    pub fn thin_ids(&self) -> Vec<ThinId> {
        self.state.read_metadata().md.thin_ids()
    }

    /// Activates a thin as a volume of `size_bytes`.
    pub fn activate(&self, id: ThinId, size_bytes: u64, read_only: bool) -> Result<ThinHandle> {
        let _a = lock(&self.state.admin);
        if self.state.stopping.load(Ordering::Acquire) {
            return fail(ErrorKind::Busy, "the pool is shutting down");
        }
        if !self.state.read_metadata().md.exists(id) {
            return fail(ErrorKind::NotFound, format!("thin {id} does not exist"));
        }
        let instance = self.state.next_instance.fetch_add(1, Ordering::Relaxed);
        let thin = crate::sync::Arc::new(Thin::new(id, instance, size_bytes, read_only));
        if self.state.active.insert(thin.clone()).is_err() {
            return fail(ErrorKind::Busy, format!("thin {id} is already active"));
        }
        Ok(ThinHandle::new(self.state.clone(), thin))
    }

    /// Deactivates a thin: it leaves the active set, then this blocks until the worker's last
    /// clone is dropped and no request is in flight, serves what was left and commits. After it
    /// returns nothing touches the thin; requests on remaining handle clones fail.
    pub fn teardown(&self, handle: ThinHandle) -> Result<()> {
        self.state.teardown_thin(handle.thin())
    }

    pub fn flush(&self) -> Result<()> {
        self.state.flush()
    }

    /// Grows the pool online: the data device to `data_bytes` (`None`: to the device's size
    /// now, taking up an enlarged block device or file) and the metadata device to
    /// `metadata_bytes` (`None`: unchanged). Shrinking either is refused. Writes queued on a
    /// full pool retry once it returns.
    pub fn grow(&self, data_bytes: Option<u64>, metadata_bytes: Option<u64>) -> Result<()> {
        let block = self.state.block_bytes;
        let status = self.state.read_metadata().md.status();
        let data_now = status.data_total * block;
        let meta_now = status.metadata_total * BLOCK_SIZE as u64;
        if let Some(want) = data_bytes {
            if want / block < status.data_total {
                return fail(
                    ErrorKind::InvalidInput,
                    format!("the pool's data is {data_now} bytes: shrinking it to {want} is not supported"),
                );
            }
        }
        if let Some(want) = metadata_bytes {
            if want < meta_now {
                return fail(
                    ErrorKind::InvalidInput,
                    format!("the pool's metadata is {meta_now} bytes: shrinking it to {want} is not supported"),
                );
            }
            check_metadata_bytes(want)?;
        }
        if let Some(want) = metadata_bytes.filter(|&b| b > meta_now) {
            self.resize_metadata(want)?;
        }
        let data_want = match data_bytes {
            Some(b) => b,
            None => self.state.data.size()?,
        };
        if data_want / block > status.data_total {
            self.resize_data(data_want)?;
        }
        Ok(())
    }

    /// Grows the metadata device (the file, when it is a regular file) and its space map.
    pub fn resize_metadata(&self, bytes: u64) -> Result<()> {
        let _a = lock(&self.state.admin);
        check_metadata_bytes(bytes)?;
        let nr = bytes / BLOCK_SIZE as u64;
        self.admin_op(|c| c.md.resize_metadata(nr))?;
        self.state.flush()?;
        self.state.space_changed();
        Ok(())
    }

    /// Grows the data device (and the file, when it is a regular file).
    pub fn resize_data(&self, bytes: u64) -> Result<()> {
        let _a = lock(&self.state.admin);
        let nr = bytes / self.state.block_bytes;
        let old = self.state.read_metadata().md.status().data_total;
        if nr < old {
            return fail(ErrorKind::Unsupported, "shrinking the data device");
        }
        let fresh_tail = self.state.data.grow_to(nr * self.state.block_bytes)?;
        if self.state.data.size()? < nr * self.state.block_bytes {
            return fail(
                ErrorKind::InvalidInput,
                "the data device is smaller than the requested size",
            );
        }
        self.admin_op(|c| {
            c.md.resize_data(nr)?;
            if fresh_tail {
                for b in old..nr {
                    c.set_zeroed(b);
                }
            }
            Ok(())
        })?;
        // Committed before the queued writers wake, so what they write lands in the new space
        // of a pool whose size is durable.
        self.state.flush()?;
        self.state
            .low_water_blocks
            .store(self.state.config.low_water_for(nr), Ordering::Relaxed);
        self.state.space_changed();
        Ok(())
    }

    /// Mapped blocks of each thin that no other thin maps (see `ThinMetadata::exclusive_blocks`).
    /// Walks every mapping under the metadata read lock: for listings, not for hot paths.
    pub fn exclusive_blocks(&self) -> Result<std::collections::BTreeMap<ThinId, u64>> {
        self.state.read_metadata().run(|c| c.md.exclusive_blocks())
    }

    /// Calls `visit` with each run `(first block, count)` of `blocks` whose contents may differ
    /// between two thins (see `thin::delta::changed_extents`), under the metadata read lock.
    /// Subtrees the two share are not read, so the cost follows the change; `visit` returns
    /// false to stop early. What the walk read comes back.
    pub fn changed_blocks(
        &self,
        left: ThinId,
        right: ThinId,
        blocks: std::ops::Range<u64>,
        visit: &mut dyn FnMut(u64, u64) -> Result<bool>,
    ) -> Result<crate::thin::delta::WalkStats> {
        self.state
            .read_metadata()
            .run(|c| crate::thin::delta::changed_extents(&c.md, left, right, blocks, visit))
    }

    pub fn status(&self) -> PoolStatus {
        let state = &self.state;
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

    /// Checks the metadata of the last commit, as it is on the device, while the pool serves.
    ///
    /// Holding the metadata lock shared keeps every commit out (a commit writes under the
    /// exclusive lock), and between commits the device does not change: the transaction
    /// manager keeps a transaction's blocks in memory and writes them only in its commit
    /// (`TransactionManager::flush_with_superblock`), and a block freed in a transaction is
    /// not handed out again before that transaction commits, so no shadow lands on a block
    /// the last commit refers to. What the checker reads is therefore exactly the last commit.
    /// Writes that need a metadata change wait for the check; reads go on.
    pub fn check_committed(&self) -> crate::thin::check::Report {
        let core = self.state.read_metadata();
        let io = core.md.io().clone();
        crate::thin::check::check(io)
    }

    /// Takes the recorded events (empty unless `record_events`).
    pub fn take_events(&self) -> Vec<EngineEvent> {
        std::mem::take(&mut *lock(&self.state.events))
    }

    /// Tears down every active thin, commits, and stops the worker. Idempotent.
    pub fn shutdown(&self) -> Result<()> {
        let first = {
            let _a = lock(&self.state.admin);
            !self.state.stopping.swap(true, Ordering::AcqRel)
        };
        let mut result = Ok(());
        if first {
            for thin in self.state.active.members() {
                if let Err(e) = self.state.teardown_thin(&thin) {
                    result = Err(e);
                }
            }
            if let Err(e) = self.state.flush() {
                if result.is_ok() {
                    result = Err(e);
                }
            }
        }
        self.state.wake_worker();
        if let Some(w) = lock(&self.worker).take() {
            let _ = w.join();
        }
        result
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// Free data blocks that are holes in the data file read zeros: a partial write that provisions
/// one need not zero the rest of it. (After a restart most free blocks of a sparse file are.)
fn zeroed_free_blocks(
    md: &ThinMetadata,
    data: &DataDevice,
    block_bytes: u64,
    nr_blocks: u64,
    words: usize,
) -> Vec<u64> {
    let mut zeroed = vec![0u64; words];
    for (begin, end) in crate::util::hole_ranges(data.file(), nr_blocks.saturating_mul(block_bytes))
    {
        for b in begin.div_ceil(block_bytes)..(end / block_bytes).min(nr_blocks) {
            if md.data_block_refs(b).unwrap_or(1) == 0 {
                zeroed[(b / 64) as usize] |= 1 << (b % 64);
            }
        }
    }
    zeroed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pdata::block_io::{Block, MemBlockIo};
    use std::sync::Arc;

    const BS: u64 = 64 << 10;

    /// A metadata device whose reads fail with EIO once armed (a failing disk under a pool
    /// whose metadata cache is cold).
    struct FailingReads {
        inner: MemBlockIo,
        armed: AtomicBool,
    }

    impl BlockIo for FailingReads {
        fn nr_blocks(&self) -> u64 {
            self.inner.nr_blocks()
        }
        fn read_block(&self, location: u64) -> Result<Box<Block>> {
            if self.armed.load(Ordering::Relaxed) {
                return Err(Error::io(
                    format!("injected read failure at metadata block {location}"),
                    std::io::Error::from_raw_os_error(libc::EIO),
                ));
            }
            self.inner.read_block(location)
        }
        fn write_block(&self, location: u64, data: &Block) -> Result<()> {
            self.inner.write_block(location, data)
        }
        fn sync(&self) -> Result<()> {
            self.inner.sync()
        }
    }

    fn data_device(dir: &Path, create: bool) -> DataDevice {
        let file = open_rw(&dir.join("data"), create).unwrap();
        if create {
            file.set_len(64 * BS).unwrap();
        }
        DataDevice::new(file, create)
    }

    /// A pool with thin 1 (one mapped block) reopened on a metadata device that fails every
    /// read from now on; thin 1 is activated first when `active`.
    fn pool_with_failing_reads(dir: &Path, active: bool) -> (Arc<Pool>, Option<ThinHandle>) {
        let mem = MemBlockIo::new(1024);
        let pool = Pool::create_from_parts(
            Arc::new(mem.clone()) as Arc<dyn BlockIo>,
            data_device(dir, true),
            BS,
            64,
            EngineConfig::default(),
        )
        .unwrap();
        pool.create_thin(1).unwrap();
        let h = pool.activate(1, 16 * BS, false).unwrap();
        h.write(0, &[7u8; 4096], true).unwrap();
        drop(h);
        pool.shutdown().unwrap();
        drop(pool);
        let device = Arc::new(FailingReads {
            inner: mem.crash(),
            armed: AtomicBool::new(false),
        });
        let pool = Pool::from_parts(
            device.clone() as Arc<dyn BlockIo>,
            data_device(dir, false),
            EngineConfig::default(),
        )
        .unwrap();
        let h = active.then(|| pool.activate(1, 16 * BS, false).unwrap());
        device.armed.store(true, Ordering::Relaxed);
        (pool, h)
    }

    fn assert_read_only(pool: &Pool) {
        let st = pool.status();
        assert_eq!(st.mode, PoolMode::ReadOnly);
        let why = st.read_only_reason.expect("a read-only reason");
        assert!(why.contains("injected read failure"), "{why}");
    }

    #[test]
    fn a_metadata_failure_on_the_provisioning_path_turns_the_pool_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let (pool, h) = pool_with_failing_reads(dir.path(), true);
        let e = h
            .expect("active")
            .write(5 * BS, &[1u8; 4096], false)
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io, "{e}");
        assert_read_only(&pool);
    }

    #[test]
    fn a_metadata_failure_on_an_admin_path_turns_the_pool_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let (pool, _) = pool_with_failing_reads(dir.path(), false);
        let e = pool.delete_thin(1).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io, "{e}");
        assert_read_only(&pool);
    }

    #[test]
    fn a_metadata_failure_while_listing_turns_the_pool_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let (pool, _) = pool_with_failing_reads(dir.path(), false);
        let e = pool.exclusive_blocks().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io, "{e}");
        assert_read_only(&pool);
    }
}
