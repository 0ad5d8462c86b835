//! The transaction manager: shadowing (copy-on-write) of metadata blocks, the bounded block
//! cache, both space maps, and the commit that makes a transaction durable.
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
use super::checksum::{self, read_u64, seal, verify, write_u32, write_u64, BlockKind};
use super::space_map::{SpaceMap, ENTRIES_PER_BITMAP, MAX_METADATA_BITMAPS};
use crate::error::{Error, ErrorKind, Result};
use crate::util::usize_from_u64;

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

/// The 32 bytes of a space map root as stored in the superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SmRoot {
    pub nr_blocks: u64,
    pub nr_allocated: u64,
    pub bitmap_root: u64,
    pub ref_count_root: u64,
}

impl SmRoot {
    pub fn encode(&self, out: &mut [u8]) {
        write_u64(out, 0, self.nr_blocks);
        write_u64(out, 8, self.nr_allocated);
        write_u64(out, 16, self.bitmap_root);
        write_u64(out, 24, self.ref_count_root);
    }

    pub fn decode(b: &[u8]) -> Self {
        SmRoot {
            nr_blocks: read_u64(b, 0),
            nr_allocated: read_u64(b, 8),
            bitmap_root: read_u64(b, 16),
            ref_count_root: read_u64(b, 24),
        }
    }
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

    /// Writes both space maps into metadata blocks; returns (data root, metadata root).
    pub fn write_space_maps(&mut self) -> Result<(SmRoot, SmRoot)> {
        let data_root = self.write_data_sm()?;
        let meta_root = self.write_meta_sm()?;
        Ok((data_root, meta_root))
    }

    fn encode_index_entry(out: &mut [u8], location: u64, nr_free: u32, none_free_before: u32) {
        write_u64(out, 0, location);
        write_u32(out, 8, nr_free);
        write_u32(out, 12, none_free_before);
    }

    fn write_data_sm(&mut self) -> Result<SmRoot> {
        use super::btree::{self, ValueKind};
        let dirty = self.data_sm.take_dirty_bitmaps();
        if !dirty.is_empty() || self.data_sm.index_root == 0 {
            for &i in &dirty {
                let old = self.data_sm.bitmap_locations[usize_from_u64(i)];
                let nb = self.new_block(BlockKind::Bitmap)?;
                if old != 0 {
                    self.meta_sm.dec(old)?;
                }
                self.data_sm.bitmap_locations[usize_from_u64(i)] = nb;
            }
            for &i in &dirty {
                let loc = self.data_sm.bitmap_locations[usize_from_u64(i)];
                let (_, buf) = self.dirty.get_mut(&loc).expect("allocated above");
                let stats = self.data_sm.encode_bitmap(i, &mut buf[..]);
                self.data_sm.bitmap_stats[usize_from_u64(i)] = stats;
            }
            let nr = self.data_sm.bitmap_locations.len();
            let keys: Vec<u64> = (0..nr as u64).collect();
            let mut values = vec![0u8; nr * 16];
            for i in 0..nr {
                let (nr_free, nfb) = self.data_sm.bitmap_stats[i];
                let loc = self.data_sm.bitmap_locations[i];
                Self::encode_index_entry(&mut values[i * 16..], loc, nr_free, nfb);
            }
            if self.data_sm.index_root != 0 {
                btree::free_tree(self, self.data_sm.index_root)?;
            }
            self.data_sm.index_root = btree::bulk_build(self, ValueKind::Index, &keys, &values)?;
        }
        if self.data_sm.take_overflow_dirty() || self.data_sm.ref_count_root == 0 {
            let entries = self.data_sm.overflow_entries();
            self.data_sm.ref_count_root =
                self.rebuild_ref_tree(self.data_sm.ref_count_root, &entries)?;
        }
        Ok(SmRoot {
            nr_blocks: self.data_sm.nr_blocks(),
            nr_allocated: self.data_sm.nr_allocated(),
            bitmap_root: self.data_sm.index_root,
            ref_count_root: self.data_sm.ref_count_root,
        })
    }

    fn rebuild_ref_tree(&mut self, old_root: u64, entries: &[(u64, u32)]) -> Result<u64> {
        use super::btree::{self, ValueKind};
        if old_root != 0 {
            btree::free_tree(self, old_root)?;
        }
        let keys: Vec<u64> = entries.iter().map(|e| e.0).collect();
        let values: Vec<u8> = entries.iter().flat_map(|e| e.1.to_le_bytes()).collect();
        btree::bulk_build(self, ValueKind::RefCount, &keys, &values)
    }

    fn write_meta_sm(&mut self) -> Result<SmRoot> {
        if self.meta_sm.bitmap_locations.len() as u64 > MAX_METADATA_BITMAPS {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "metadata device larger than 255 bitmaps",
            ));
        }
        // Blocks allocated below only go 0 -> 1 and old ones 1 -> 0, so the overflow tree
        // built first stays right; bitmaps are relocated until no new one turns dirty.
        if self.meta_sm.take_overflow_dirty() || self.meta_sm.ref_count_root == 0 {
            let entries = self.meta_sm.overflow_entries();
            self.meta_sm.ref_count_root =
                self.rebuild_ref_tree(self.meta_sm.ref_count_root, &entries)?;
        }
        let old_index = self.meta_sm.index_root;
        let new_index = self.new_block(BlockKind::Index)?;
        if old_index != 0 {
            self.meta_sm.dec(old_index)?;
        }
        self.meta_sm.index_root = new_index;
        let mut relocated = std::collections::BTreeSet::new();
        loop {
            let pending: Vec<u64> = self
                .meta_sm
                .dirty_bitmaps()
                .iter()
                .copied()
                .filter(|i| !relocated.contains(i))
                .collect();
            if pending.is_empty() {
                break;
            }
            for i in pending {
                let old = self.meta_sm.bitmap_locations[usize_from_u64(i)];
                let nb = self.new_block(BlockKind::Bitmap)?;
                if old != 0 {
                    self.meta_sm.dec(old)?;
                }
                self.meta_sm.bitmap_locations[usize_from_u64(i)] = nb;
                relocated.insert(i);
            }
        }
        self.meta_sm.take_dirty_bitmaps();
        if self.meta_sm.take_overflow_dirty() {
            return Err(Error::corrupt(
                "metadata overflow counts changed while writing bitmaps",
            ));
        }
        let mut index = zeroed_block();
        for &i in &relocated {
            let loc = self.meta_sm.bitmap_locations[usize_from_u64(i)];
            let (_, buf) = self.dirty.get_mut(&loc).expect("allocated above");
            let stats = self.meta_sm.encode_bitmap(i, &mut buf[..]);
            self.meta_sm.bitmap_stats[usize_from_u64(i)] = stats;
        }
        for i in 0..self.meta_sm.bitmap_locations.len() {
            let (nr_free, nfb) = self.meta_sm.bitmap_stats[i];
            let loc = self.meta_sm.bitmap_locations[i];
            Self::encode_index_entry(&mut index[16 + i * 16..], loc, nr_free, nfb);
        }
        *self.get_mut(new_index)? = *index;
        Ok(SmRoot {
            nr_blocks: self.meta_sm.nr_blocks(),
            nr_allocated: self.meta_sm.nr_allocated(),
            bitmap_root: new_index,
            ref_count_root: self.meta_sm.ref_count_root,
        })
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

/// Loads a space map's bitmaps listed by `entries` (location per bitmap) into `sm`.
pub fn load_bitmaps(tm: &TransactionManager, sm: &mut SpaceMap, locations: &[u64]) -> Result<()> {
    for (i, &loc) in locations.iter().enumerate() {
        let block = tm.read(loc, BlockKind::Bitmap)?;
        sm.decode_bitmap(i as u64, &block[..])?;
    }
    sm.bitmap_locations = locations.to_vec();
    let mut scratch = zeroed_block();
    for i in 0..locations.len() {
        sm.bitmap_stats[i] = sm.encode_bitmap(i as u64, &mut scratch[..]);
    }
    Ok(())
}

/// Index entry decoding shared by the metadata index block and the data index btree.
pub fn decode_index_location(entry: &[u8]) -> u64 {
    checksum::read_u64(entry, 0)
}
