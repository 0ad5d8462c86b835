//! Reference counts of data or metadata blocks, held in core during a transaction and written
//! at commit in dm-thin's on-disk form: 2-bit bitmaps, an index (a btree for the data map, a
//! single index block for the metadata map) and an overflow btree for counts of 3 or more.
//!
//! A block freed in the current transaction is not handed out again until the transaction
//! commits: the last committed superblock may still refer to it.

use std::collections::BTreeSet;

use crate::error::{Error, Result};
use crate::util::usize_from_u64;

/// Entries per bitmap block: 510 words of 64 bits, 2 bits an entry.
pub const ENTRIES_PER_BITMAP: u64 = ENTRIES_PER_BITMAP_U32 as u64;
/// The same count in the 32-bit type of a bitmap's index entry fields.
const ENTRIES_PER_BITMAP_U32: u32 = 16_320;
/// The metadata space map has one index block with this many entries.
pub const MAX_METADATA_BITMAPS: u64 = 255;
/// Largest usable metadata device, in blocks.
pub const MAX_METADATA_BLOCKS: u64 = MAX_METADATA_BITMAPS * ENTRIES_PER_BITMAP;

/// In-core reference counts with the bookkeeping needed to write them back incrementally.
#[derive(Clone)]
pub struct SpaceMap {
    counts: Vec<u32>,
    /// Bit set: count > 0 now, or at the last commit. Allocation only takes clear bits.
    busy: Vec<u64>,
    freed_since_commit: Vec<u64>,
    dirty_bitmaps: BTreeSet<u64>,
    overflow_dirty: bool,
    cursor: u64,
    nr_allocated: u64,
    /// Blocks whose busy bit is set: allocated, or freed since the last commit.
    nr_busy: u64,
    /// Blocks with a count of 3 or more (the overflow tree's entries).
    nr_overflow: u64,
    /// Where each bitmap lives on the metadata device (0: not written yet).
    pub bitmap_locations: Vec<u64>,
    /// Per bitmap: (nr_free, none_free_before) as last written, for the index entries.
    pub bitmap_stats: Vec<(u32, u32)>,
    /// Data map: root of the index btree; metadata map: the index block. 0 = not written yet.
    pub index_root: u64,
    /// Root of the overflow ref-count btree. 0 = not written yet.
    pub ref_count_root: u64,
}

pub fn nr_bitmaps(nr_blocks: u64) -> u64 {
    nr_blocks.div_ceil(ENTRIES_PER_BITMAP)
}

/// The blocks bitmap `index` covers in a map of `nr_blocks`, each with its entry's position in
/// the bitmap.
fn bitmap_entries(index: u64, nr_blocks: u64) -> impl Iterator<Item = (u32, u64)> {
    let begin = index * ENTRIES_PER_BITMAP;
    let end = (begin + ENTRIES_PER_BITMAP).min(nr_blocks);
    (0..ENTRIES_PER_BITMAP_U32).zip(begin..end)
}

impl SpaceMap {
    pub fn new(nr_blocks: u64) -> Self {
        let n = usize::try_from(nr_blocks).unwrap_or(usize::MAX);
        SpaceMap {
            counts: vec![0; n],
            busy: vec![0; n.div_ceil(64)],
            freed_since_commit: Vec::new(),
            dirty_bitmaps: (0..nr_bitmaps(nr_blocks)).collect(),
            overflow_dirty: true,
            cursor: 0,
            nr_allocated: 0,
            nr_busy: 0,
            nr_overflow: 0,
            bitmap_locations: vec![0; usize_from_u64(nr_bitmaps(nr_blocks))],
            bitmap_stats: vec![(0, 0); usize_from_u64(nr_bitmaps(nr_blocks))],
            index_root: 0,
            ref_count_root: 0,
        }
    }

    pub fn nr_blocks(&self) -> u64 {
        self.counts.len() as u64
    }

    pub fn nr_allocated(&self) -> u64 {
        self.nr_allocated
    }

    pub fn nr_free(&self) -> u64 {
        self.nr_blocks() - self.nr_allocated
    }

    /// Blocks `alloc` can hand out before the next commit (free now and at the last commit).
    pub fn nr_allocatable(&self) -> u64 {
        self.nr_blocks() - self.nr_busy
    }

    /// Entries the overflow tree holds (counts of 3 or more).
    pub fn nr_overflow(&self) -> u64 {
        self.nr_overflow
    }

    fn out_of_range(&self, b: u64) -> Error {
        Error::corrupt(format!(
            "block {b} is outside the space map ({} blocks)",
            self.nr_blocks()
        ))
    }

    pub fn get(&self, b: u64) -> Result<u32> {
        self.counts
            .get(usize_from_u64(b))
            .copied()
            .ok_or_else(|| self.out_of_range(b))
    }

    fn set_busy(&mut self, b: u64, on: bool) {
        let word = &mut self.busy[(b / 64) as usize];
        let bit = 1u64 << (b % 64);
        let was = *word & bit != 0;
        if on {
            *word |= bit;
        } else {
            *word &= !bit;
        }
        match (was, on) {
            (false, true) => self.nr_busy += 1,
            (true, false) => self.nr_busy -= 1,
            _ => {}
        }
    }

    /// Sets a count directly (loading from disk, bulk building).
    pub fn set(&mut self, b: u64, count: u32) -> Result<()> {
        let old = self.get(b)?;
        self.counts[usize_from_u64(b)] = count;
        self.changed(b, old, count);
        Ok(())
    }

    fn changed(&mut self, b: u64, old: u32, new: u32) {
        if old == new {
            return;
        }
        self.dirty_bitmaps.insert(b / ENTRIES_PER_BITMAP);
        if old >= 3 || new >= 3 {
            self.overflow_dirty = true;
        }
        match (old >= 3, new >= 3) {
            (false, true) => self.nr_overflow += 1,
            (true, false) => self.nr_overflow -= 1,
            _ => {}
        }
        match (old, new) {
            (0, _) => {
                self.nr_allocated += 1;
                self.set_busy(b, true);
            }
            (_, 0) => {
                self.nr_allocated -= 1;
                self.freed_since_commit.push(b);
            }
            _ => {}
        }
    }

    pub fn inc(&mut self, b: u64) -> Result<()> {
        let old = self.get(b)?;
        let new = old.checked_add(1).ok_or_else(|| self.out_of_range(b))?;
        self.counts[usize_from_u64(b)] = new;
        self.changed(b, old, new);
        Ok(())
    }

    /// Drops one reference; returns the new count.
    pub fn dec(&mut self, b: u64) -> Result<u32> {
        let old = self.get(b)?;
        if old == 0 {
            return Err(Error::corrupt(format!(
                "reference count of block {b} would drop below 0"
            )));
        }
        self.counts[usize_from_u64(b)] = old - 1;
        self.changed(b, old, old - 1);
        Ok(old - 1)
    }

    /// Finds a block that is free now and was free at the last commit, and sets its count to 1.
    pub fn alloc(&mut self) -> Option<u64> {
        let n = self.nr_blocks();
        if n == 0 {
            return None;
        }
        let start = self.cursor.min(n - 1);
        let found = self
            .find_clear(start, n)
            .or_else(|| self.find_clear(0, start))?;
        self.counts[usize_from_u64(found)] = 1;
        self.changed(found, 0, 1);
        self.cursor = found + 1;
        Some(found)
    }

    fn find_clear(&self, from: u64, to: u64) -> Option<u64> {
        let mut b = from;
        while b < to {
            let word = self.busy[(b / 64) as usize];
            if word == u64::MAX {
                b = (b / 64 + 1) * 64;
                continue;
            }
            if word & (1 << (b % 64)) == 0 {
                return Some(b);
            }
            b += 1;
        }
        None
    }

    /// Blocks freed since the last commit that could be handed out once it completes.
    pub fn nr_freed_since_commit(&self) -> u64 {
        self.freed_since_commit
            .iter()
            .filter(|b| self.counts[usize_from_u64(**b)] == 0)
            .count() as u64
    }

    /// Blocks freed since the last commit (count now 0), sorted.
    pub fn freed_since_commit(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .freed_since_commit
            .iter()
            .copied()
            .filter(|b| self.counts[usize_from_u64(*b)] == 0)
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Keeps `blocks` (freed in this transaction) out of the allocator past the next commit,
    /// until `release_held`: their old contents are being discarded.
    pub fn hold_freed(&mut self, blocks: &[u64]) {
        if blocks.is_empty() {
            return;
        }
        let held: std::collections::HashSet<u64> = blocks.iter().copied().collect();
        self.freed_since_commit.retain(|b| !held.contains(b));
    }

    /// Lets held blocks be allocated again (those still free).
    pub fn release_held(&mut self, blocks: &[u64]) {
        for &b in blocks {
            if self.counts.get(usize_from_u64(b)) == Some(&0) {
                self.set_busy(b, false);
                self.cursor = self.cursor.min(b);
            }
        }
    }

    /// Called once a commit is durable: blocks freed before it become allocatable.
    pub fn commit_done(&mut self) {
        for b in std::mem::take(&mut self.freed_since_commit) {
            if self.counts[usize_from_u64(b)] == 0 {
                self.set_busy(b, false);
                self.cursor = self.cursor.min(b);
            }
        }
    }

    /// Grows the map; new blocks are free.
    pub fn grow(&mut self, nr_blocks: u64) {
        let old = self.nr_blocks();
        if nr_blocks <= old {
            return;
        }
        let n = usize_from_u64(nr_blocks);
        self.counts.resize(n, 0);
        self.busy.resize(n.div_ceil(64), 0);
        let bitmaps = nr_bitmaps(nr_blocks);
        self.bitmap_locations.resize(usize_from_u64(bitmaps), 0);
        self.bitmap_stats.resize(usize_from_u64(bitmaps), (0, 0));
        // The last old bitmap gains in-range entries; all new ones must be written.
        for i in old / ENTRIES_PER_BITMAP..bitmaps {
            self.dirty_bitmaps.insert(i);
        }
    }

    pub fn take_dirty_bitmaps(&mut self) -> BTreeSet<u64> {
        std::mem::take(&mut self.dirty_bitmaps)
    }

    pub fn dirty_bitmaps(&self) -> &BTreeSet<u64> {
        &self.dirty_bitmaps
    }

    pub fn take_overflow_dirty(&mut self) -> bool {
        std::mem::replace(&mut self.overflow_dirty, false)
    }

    /// Blocks with a count of 3 or more, in order, for the overflow tree.
    pub fn overflow_entries(&self) -> Vec<(u64, u32)> {
        self.counts
            .iter()
            .enumerate()
            .filter(|(_, c)| **c >= 3)
            .map(|(b, c)| (b as u64, *c))
            .collect()
    }

    /// Fills a bitmap block body (bytes 16..4096) for bitmap `index`; returns the index entry
    /// fields (nr_free, none_free_before) in the kernel's convention.
    pub fn encode_bitmap(&self, index: u64, block: &mut [u8]) -> (u32, u32) {
        block[16..].fill(0);
        let mut in_range = 0u32;
        let mut used = 0u32;
        let mut first_free: Option<u32> = None;
        for (e, b) in bitmap_entries(index, self.nr_blocks()) {
            in_range = e + 1;
            let v = self.counts[usize_from_u64(b)].min(3) as u8;
            if v == 0 {
                first_free.get_or_insert(e);
                continue;
            }
            used += 1;
            let e = e as usize;
            let p = 2 * (e % 4);
            let hi = v >> 1;
            let lo = v & 1;
            block[16 + e / 4] |= (hi << p) | (lo << (p + 1));
        }
        let nr_free = ENTRIES_PER_BITMAP_U32 - used;
        let none_free_before = first_free.unwrap_or(in_range);
        (nr_free, none_free_before)
    }

    /// Loads counts from a bitmap block; entries of 3 are left at 3 for the overflow tree to fix.
    pub fn decode_bitmap(&mut self, index: u64, block: &[u8]) -> Result<()> {
        for (e, b) in bitmap_entries(index, self.nr_blocks()) {
            let e = e as usize;
            let p = 2 * (e % 4);
            let byte = block[16 + e / 4];
            let hi = (byte >> p) & 1;
            let lo = (byte >> (p + 1)) & 1;
            let v = u32::from((hi << 1) | lo);
            if v != 0 {
                self.set(b, v)?;
            }
        }
        Ok(())
    }

    /// After loading from disk nothing is dirty and nothing is pending free.
    pub fn mark_clean(&mut self) {
        self.dirty_bitmaps.clear();
        self.overflow_dirty = false;
        self.freed_since_commit.clear();
        self.cursor = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_blocks_wait_for_commit() {
        let mut sm = SpaceMap::new(2);
        let a = sm.alloc().unwrap();
        let b = sm.alloc().unwrap();
        assert_eq!(sm.alloc(), None);
        sm.commit_done();
        sm.dec(a).unwrap();
        assert_eq!(
            sm.alloc(),
            None,
            "a block freed in this transaction is not reused"
        );
        sm.commit_done();
        assert_eq!(sm.alloc(), Some(a));
        assert_eq!(sm.get(b).unwrap(), 1);
    }

    #[test]
    fn allocatable_and_overflow_counts_follow_every_change() {
        let mut sm = SpaceMap::new(10);
        let a = sm.alloc().unwrap();
        let b = sm.alloc().unwrap();
        assert_eq!(sm.nr_allocatable(), 8);
        sm.commit_done();
        sm.dec(a).unwrap();
        // Freed in this transaction: not allocatable until the commit.
        assert_eq!(sm.nr_allocatable(), 8);
        sm.commit_done();
        assert_eq!(sm.nr_allocatable(), 9);
        for _ in 0..3 {
            sm.inc(b).unwrap();
        }
        assert_eq!(sm.nr_overflow(), 1);
        sm.dec(b).unwrap();
        sm.dec(b).unwrap();
        assert_eq!(sm.nr_overflow(), 0);
        sm.grow(20);
        assert_eq!(sm.nr_allocatable(), 19);
    }

    #[test]
    fn bitmap_round_trip_with_the_kernel_bit_order() {
        let mut sm = SpaceMap::new(20_000);
        for (b, c) in [(0, 1), (1, 2), (2, 3), (3, 7), (16_319, 1), (16_320, 2)] {
            sm.set(b, c).unwrap();
        }
        let mut block = [0u8; 4096];
        let (nr_free, nfb) = sm.encode_bitmap(0, &mut block);
        // count 1 = 0b10 << p, count 2 = 0b01 << p, 3 = 0b11 << p, entries 0..4 in byte 16.
        assert_eq!(block[16], 0b10 | (0b01 << 2) | (0b11 << 4) | (0b11 << 6));
        assert_eq!(nr_free, 16_320 - 5);
        assert_eq!(nfb, 4);
        let mut back = SpaceMap::new(20_000);
        back.decode_bitmap(0, &block).unwrap();
        assert_eq!(back.get(1).unwrap(), 2);
        assert_eq!(back.get(3).unwrap(), 3);
        assert_eq!(back.get(16_319).unwrap(), 1);
    }

    #[test]
    fn a_full_partial_last_bitmap_counts_entries_past_the_end_as_free() {
        let nr_blocks = 20_000;
        let in_last = nr_blocks - ENTRIES_PER_BITMAP;
        let mut sm = SpaceMap::new(nr_blocks);
        for b in ENTRIES_PER_BITMAP..nr_blocks {
            sm.set(b, 1).unwrap();
        }
        sm.set(nr_blocks - 1, 2).unwrap();
        let mut block = [0u8; 4096];
        let (nr_free, nfb) = sm.encode_bitmap(1, &mut block);
        assert_eq!(u64::from(nr_free), ENTRIES_PER_BITMAP - in_last);
        assert_eq!(
            u64::from(nfb),
            in_last,
            "no free entry within the map's end"
        );
        let mut back = SpaceMap::new(nr_blocks);
        back.decode_bitmap(1, &block).unwrap();
        assert_eq!(back.get(ENTRIES_PER_BITMAP).unwrap(), 1);
        assert_eq!(back.get(nr_blocks - 1).unwrap(), 2);
        assert_eq!(back.nr_allocated(), in_last);
    }
}
