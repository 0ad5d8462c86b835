//! What a pool is told and what it tells: its settings ([`EngineConfig`], [`NoSpacePolicy`] and
//! their defaults) and its status report ([`PoolStatus`]). Plain data, below every other part
//! of the engine; the running pool is [`Pool`](super::Pool).

use std::time::Duration;

use crate::thin::metadata::ThinId;

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
    /// Free data bytes at or below which the pool reports (and logs once) the low-water mark,
    /// when `low_water_percent` is 0 (`pool.low_water_mark` given as a size); 0 with it turns
    /// the mark off. Counted in the pool's own blocks when it opens (rounded down), whatever
    /// block size a new pool would get.
    pub low_water_bytes: u64,
    /// Free metadata blocks, as a percentage of the metadata device above the reserve, at or
    /// below which the pool reports (and logs once) the metadata low-water mark
    /// (`pool.metadata_low_water`, default 20%); 0 turns the mark off.
    pub metadata_low_water_percent: u64,
    /// The low-water mark as a percentage of the pool's data blocks (1-100; 0: use
    /// `low_water_bytes`), so one setting suits a small pool and a large one, and follows a
    /// grown pool (`pool.low_water_mark`, default 10%). Set it to 0 with `low_water_bytes`.
    pub low_water_percent: u8,
    /// Cells in the bio prison's pool (blocks being provisioned or copied at once).
    pub cell_pool_size: usize,
    /// Zero the rest of a newly provisioned block on a partial write (unless it is known to read
    /// zeros already). Turning it off may expose stale data of freed blocks.
    pub zero_new_blocks: bool,
    /// Keep a log of worker and teardown events ([`Pool::take_events`](super::Pool::take_events)),
    /// for tests.
    #[cfg(any(test, feature = "testing"))]
    pub record_events: bool,
    /// Extra delay inside each commit, for tests that must see flushes coalesce.
    #[cfg(any(test, feature = "testing"))]
    pub commit_delay: Duration,
    /// Extra delay before the worker drops a thin's clone, for tests that must see teardown
    /// wait for it.
    #[cfg(any(test, feature = "testing"))]
    pub worker_hold_delay: Duration,
    /// Slots of the lock-free mapping cache used by the read and overwrite fast paths
    /// (24 bytes each; 0 turns it off).
    pub mapping_cache_slots: usize,
    /// Metadata blocks (4 KiB) kept in the metadata block cache.
    pub metadata_cache_blocks: usize,
    /// Largest single write to the data device (0: whole writes); see
    /// [`FileStore::set_write_chunk`](super::data::FileStore::set_write_chunk).
    pub data_write_chunk: u64,
}

impl EngineConfig {
    /// The low-water mark in blocks for a pool of `data_blocks` blocks of `block_bytes`.
    pub fn low_water_for(&self, data_blocks: u64, block_bytes: u64) -> u64 {
        match u64::from(self.low_water_percent.min(100)) {
            0 => self.low_water_bytes / block_bytes.max(1),
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
            low_water_bytes: 0,
            metadata_low_water_percent: DEFAULT_METADATA_LOW_WATER_PERCENT,
            low_water_percent: DEFAULT_LOW_WATER_PERCENT,
            cell_pool_size: DEFAULT_CELL_POOL_SIZE,
            zero_new_blocks: true,
            #[cfg(any(test, feature = "testing"))]
            record_events: false,
            #[cfg(any(test, feature = "testing"))]
            commit_delay: Duration::ZERO,
            #[cfg(any(test, feature = "testing"))]
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
