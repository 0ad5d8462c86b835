//! The transaction manager: shadowing (copy-on-write) of metadata blocks, the bounded block
//! cache, both space maps, and the flush that makes a transaction durable (the space maps'
//! on-disk form is written before it by `sm_disk`).
//!
//! Every block reachable from the last committed superblock is immutable. Changing one means
//! shadowing it: a copy at a newly allocated location. A block that is already a shadow made in
//! this transaction, and is referenced once, is changed in place. Commit writes every dirty
//! block, syncs, writes the superblock (the only block rewritten in place), and syncs again.

use std::collections::{HashMap, HashSet};
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dashmap::DashMap;

use super::block_io::{zeroed_block, Block, BlockIo};
use super::checksum::{seal, verify, BlockKind};
use super::space_map::{SpaceMap, ENTRIES_PER_BITMAP, MAX_METADATA_BITMAPS};
use crate::error::{Error, ErrorKind, Result};

/// A block as read: borrowed from this transaction's dirty set, or shared from the cache.
pub enum BlockRef<'a> {
    Dirty(&'a Block),
    Clean(Arc<Block>),
}

impl Deref for BlockRef<'_> {
    type Target = Block;
    fn deref(&self) -> &Block {
        match self {
            BlockRef::Dirty(b) => b,
            BlockRef::Clean(b) => b,
        }
    }
}

/// Clean, validated blocks. Sharded so that lookups from many threads do not contend.
struct BlockCache {
    blocks: DashMap<u64, (BlockKind, Arc<Block>)>,
    capacity: usize,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl BlockCache {
    fn get(&self, b: u64, kind: BlockKind) -> Option<Result<Arc<Block>>> {
        let entry = self.blocks.get(&b)?;
        self.hits.fetch_add(1, Ordering::Relaxed);
        if entry.0 != kind {
            return Some(Err(Error::corrupt(format!(
                "block {b} was read as a {} but is a {}",
                kind.name(),
                entry.0.name()
            ))));
        }
        Some(Ok(entry.1.clone()))
    }

    fn insert(&self, b: u64, kind: BlockKind, block: Arc<Block>) {
        if self.blocks.len() >= self.capacity {
            // Cheap bounded eviction: drop roughly an eighth, chosen by block number.
            let salt = self.misses.load(Ordering::Relaxed) % 8;
            self.blocks.retain(|k, _| k % 8 != salt);
        }
        self.blocks.insert(b, (kind, block));
    }
}

/// Figures about the block cache, for benchmarks and status.
#[derive(Debug, Clone, Copy, Default)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub cached_blocks: usize,
}

pub struct TransactionManager {
    io: Arc<dyn BlockIo>,
    cache: BlockCache,
    dirty: HashMap<u64, (BlockKind, Box<Block>)>,
    /// Blocks allocated in this transaction: they may be changed in place while unshared.
    fresh: HashSet<u64>,
    pub meta_sm: SpaceMap,
    pub data_sm: SpaceMap,
}

pub const DEFAULT_CACHE_BLOCKS: usize = 16 * 1024;

impl TransactionManager {
    pub fn new(io: Arc<dyn BlockIo>, meta_sm: SpaceMap, data_sm: SpaceMap) -> Self {
        TransactionManager {
            io,
            cache: BlockCache {
                blocks: DashMap::new(),
                capacity: DEFAULT_CACHE_BLOCKS,
                hits: AtomicU64::new(0),
                misses: AtomicU64::new(0),
            },
            dirty: HashMap::new(),
            fresh: HashSet::new(),
            meta_sm,
            data_sm,
        }
    }

    pub fn io(&self) -> &Arc<dyn BlockIo> {
        &self.io
    }

    /// Bounds the block cache to `blocks` entries (at least 64).
    pub fn set_cache_capacity(&mut self, blocks: usize) {
        self.cache.capacity = blocks.max(64);
    }

    pub fn cache_stats(&self) -> CacheStats {
        CacheStats {
            hits: self.cache.hits.load(Ordering::Relaxed),
            misses: self.cache.misses.load(Ordering::Relaxed),
            cached_blocks: self.cache.blocks.len(),
        }
    }

    /// Reads and validates a block (checksum, self location, kind), through the cache.
    pub fn read(&self, b: u64, kind: BlockKind) -> Result<BlockRef<'_>> {
        self.read_checked(b, kind, &|_| Ok(()))
    }

    /// As `read`, running `check` once when the block comes from the device (not from cache).
    pub fn read_checked(
        &self,
        b: u64,
        kind: BlockKind,
        check: &dyn Fn(&Block) -> Result<()>,
    ) -> Result<BlockRef<'_>> {
        if let Some((k, block)) = self.dirty.get(&b) {
            if *k != kind {
                return Err(Error::corrupt(format!(
                    "block {b} was read as a {} but is a {}",
                    kind.name(),
                    k.name()
                )));
            }
            return Ok(BlockRef::Dirty(block));
        }
        if let Some(found) = self.cache.get(b, kind) {
            return found.map(BlockRef::Clean);
        }
        self.cache.misses.fetch_add(1, Ordering::Relaxed);
        let raw = self.io.read_block(b)?;
        verify(&raw, kind, b)?;
        check(&raw)?;
        let arc: Arc<Block> = Arc::from(raw);
        self.cache.insert(b, kind, arc.clone());
        Ok(BlockRef::Clean(arc))
    }

    /// Reads a block without validation (tools that inspect damaged metadata).
    pub fn read_raw(&self, b: u64) -> Result<Box<Block>> {
        match self.dirty.get(&b) {
            Some((_, block)) => Ok(block.clone()),
            None => self.io.read_block(b),
        }
    }

    /// Allocates a metadata block for this transaction, zero-filled and dirty.
    pub fn new_block(&mut self, kind: BlockKind) -> Result<u64> {
        let b = self.meta_sm.alloc().ok_or_else(|| {
            Error::new(
                ErrorKind::NoSpace,
                "metadata device is full: no free metadata block",
            )
        })?;
        self.fresh.insert(b);
        self.dirty.insert(b, (kind, zeroed_block()));
        Ok(b)
    }

    /// Mutable access to a block made or shadowed in this transaction.
    pub fn get_mut(&mut self, b: u64) -> Result<&mut Block> {
        match self.dirty.get_mut(&b) {
            Some((_, block)) => Ok(block),
            None => Err(Error::corrupt(format!(
                "block {b} changed without being shadowed"
            ))),
        }
    }

    /// Copy-on-write. Returns the block to change and whether the original was shared, in
    /// which case the caller must take a reference on everything the copy points at.
    pub fn shadow(&mut self, b: u64, kind: BlockKind) -> Result<(u64, bool)> {
        let count = self.meta_sm.get(b)?;
        if count == 0 {
            return Err(Error::corrupt(format!(
                "shadowing block {b}, which has no references"
            )));
        }
        if count == 1 && self.fresh.contains(&b) {
            return Ok((b, false));
        }
        let copy = Box::new(*self.read(b, kind)?);
        let nb = self.new_block(kind)?;
        self.dirty.insert(nb, (kind, copy));
        self.meta_sm.dec(b)?;
        Ok((nb, count > 1))
    }

    /// True when a block was allocated in this transaction and is referenced once.
    pub fn is_exclusive(&self, b: u64) -> bool {
        self.fresh.contains(&b) && self.meta_sm.get(b).unwrap_or(0) == 1
    }

    /// Writes every dirty block, syncs, writes the superblock, syncs again.
    pub fn flush_with_superblock(&mut self, mut superblock: Box<Block>) -> Result<()> {
        let mut locations: Vec<u64> = self.dirty.keys().copied().collect();
        locations.sort_unstable();
        for b in &locations {
            let (kind, block) = self.dirty.get_mut(b).expect("listed above");
            seal(block, *kind, *b);
            self.io.write_block(*b, block)?;
        }
        self.io.sync()?;
        seal(&mut superblock, BlockKind::Superblock, 0);
        self.io.write_block(0, &superblock)?;
        self.io.sync()?;
        for (b, (kind, block)) in self.dirty.drain() {
            self.cache.insert(b, kind, Arc::from(block));
        }
        self.cache
            .insert(0, BlockKind::Superblock, Arc::from(superblock));
        self.fresh.clear();
        self.meta_sm.commit_done();
        self.data_sm.commit_done();
        Ok(())
    }

    /// Drops everything done since the last commit (the caller reloads the space maps).
    pub fn discard_changes(&mut self) {
        self.dirty.clear();
        self.fresh.clear();
    }

    /// Forgets cached blocks (after an abort or a failed commit whose writes may be partial).
    pub fn clear_cache(&self) {
        self.cache.blocks.clear();
    }

    pub fn has_changes(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Number of index entries a metadata index block can hold.
    pub fn metadata_index_capacity() -> u64 {
        MAX_METADATA_BITMAPS
    }

    /// Entries per bitmap block.
    pub fn entries_per_bitmap() -> u64 {
        ENTRIES_PER_BITMAP
    }
}
