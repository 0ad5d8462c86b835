//! The space maps' on-disk form, written at commit and loaded at open: the roots stored in the
//! superblock, bitmap blocks, the data map's index btree, the metadata map's single index
//! block, and the overflow ref-count btrees. It sits above both the transaction manager (whose
//! blocks and space maps it writes) and the btrees it builds, so neither of those imports the
//! other's business.

use super::block_io::zeroed_block;
use super::btree::{self, Plain};
use super::checksum::{read_u64, write_u32, write_u64, BlockKind};
use super::space_map::{SpaceMap, MAX_METADATA_BITMAPS};
use super::tm::TransactionManager;
use crate::error::{Error, ErrorKind, Result};
use crate::util::usize_from_u64;

/// Bytes of an index entry: bitmap location, nr_free, none_free_before.
pub const INDEX_ENTRY_SIZE: usize = 16;
/// The data map's index tree values.
pub const INDEX_ENTRY: Plain<INDEX_ENTRY_SIZE> = Plain;
/// Bytes of an overflow reference count.
pub const REF_COUNT_SIZE: usize = 4;
/// The overflow trees' values: counts of 3 or more.
pub const REF_COUNT: Plain<REF_COUNT_SIZE> = Plain;

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

/// Writes both space maps into metadata blocks of this transaction; returns (data root,
/// metadata root). The commit calls this last, just before flushing with the superblock.
pub fn write_space_maps(tm: &mut TransactionManager) -> Result<(SmRoot, SmRoot)> {
    let data_root = write_data_sm(tm)?;
    let meta_root = write_meta_sm(tm)?;
    Ok((data_root, meta_root))
}

fn encode_index_entry(out: &mut [u8], location: u64, nr_free: u32, none_free_before: u32) {
    write_u64(out, 0, location);
    write_u32(out, 8, nr_free);
    write_u32(out, 12, none_free_before);
}

/// Fills each listed bitmap's (dirty, freshly allocated) block and records its index stats.
fn encode_bitmaps(
    tm: &mut TransactionManager,
    of_data: bool,
    indexes: impl IntoIterator<Item = u64>,
) -> Result<()> {
    // Encoded aside because the block and the space map both live in `tm`.
    let mut scratch = zeroed_block();
    for i in indexes {
        let sm = if of_data { &tm.data_sm } else { &tm.meta_sm };
        let loc = sm.bitmap_locations[usize_from_u64(i)];
        let stats = sm.encode_bitmap(i, &mut scratch[..]);
        *tm.get_mut(loc)? = *scratch;
        let sm = if of_data {
            &mut tm.data_sm
        } else {
            &mut tm.meta_sm
        };
        sm.bitmap_stats[usize_from_u64(i)] = stats;
    }
    Ok(())
}

fn write_data_sm(tm: &mut TransactionManager) -> Result<SmRoot> {
    let dirty = tm.data_sm.take_dirty_bitmaps();
    if !dirty.is_empty() || tm.data_sm.index_root == 0 {
        for &i in &dirty {
            let old = tm.data_sm.bitmap_locations[usize_from_u64(i)];
            let nb = tm.new_block(BlockKind::Bitmap)?;
            if old != 0 {
                tm.meta_sm.dec(old)?;
            }
            tm.data_sm.bitmap_locations[usize_from_u64(i)] = nb;
        }
        encode_bitmaps(tm, true, dirty)?;
        let nr = tm.data_sm.bitmap_locations.len();
        let keys: Vec<u64> = (0..nr as u64).collect();
        let mut values = vec![0u8; nr * INDEX_ENTRY_SIZE];
        for i in 0..nr {
            let (nr_free, nfb) = tm.data_sm.bitmap_stats[i];
            let loc = tm.data_sm.bitmap_locations[i];
            encode_index_entry(&mut values[i * INDEX_ENTRY_SIZE..], loc, nr_free, nfb);
        }
        if tm.data_sm.index_root != 0 {
            btree::free_tree(tm, tm.data_sm.index_root)?;
        }
        tm.data_sm.index_root = btree::bulk_build(tm, INDEX_ENTRY, &keys, &values)?;
    }
    if tm.data_sm.take_overflow_dirty() || tm.data_sm.ref_count_root == 0 {
        let entries = tm.data_sm.overflow_entries();
        tm.data_sm.ref_count_root = rebuild_ref_tree(tm, tm.data_sm.ref_count_root, &entries)?;
    }
    Ok(SmRoot {
        nr_blocks: tm.data_sm.nr_blocks(),
        nr_allocated: tm.data_sm.nr_allocated(),
        bitmap_root: tm.data_sm.index_root,
        ref_count_root: tm.data_sm.ref_count_root,
    })
}

fn rebuild_ref_tree(
    tm: &mut TransactionManager,
    old_root: u64,
    entries: &[(u64, u32)],
) -> Result<u64> {
    if old_root != 0 {
        btree::free_tree(tm, old_root)?;
    }
    let keys: Vec<u64> = entries.iter().map(|e| e.0).collect();
    let values: Vec<u8> = entries.iter().flat_map(|e| e.1.to_le_bytes()).collect();
    btree::bulk_build(tm, REF_COUNT, &keys, &values)
}

fn write_meta_sm(tm: &mut TransactionManager) -> Result<SmRoot> {
    if tm.meta_sm.bitmap_locations.len() as u64 > MAX_METADATA_BITMAPS {
        return Err(Error::new(
            ErrorKind::Unsupported,
            "metadata device larger than 255 bitmaps",
        ));
    }
    // Blocks allocated below only go 0 -> 1 and old ones 1 -> 0, so the overflow tree
    // built first stays right; bitmaps are relocated until no new one turns dirty.
    if tm.meta_sm.take_overflow_dirty() || tm.meta_sm.ref_count_root == 0 {
        let entries = tm.meta_sm.overflow_entries();
        tm.meta_sm.ref_count_root = rebuild_ref_tree(tm, tm.meta_sm.ref_count_root, &entries)?;
    }
    let old_index = tm.meta_sm.index_root;
    let new_index = tm.new_block(BlockKind::Index)?;
    if old_index != 0 {
        tm.meta_sm.dec(old_index)?;
    }
    tm.meta_sm.index_root = new_index;
    let mut relocated = std::collections::BTreeSet::new();
    loop {
        let pending: Vec<u64> = tm
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
            let old = tm.meta_sm.bitmap_locations[usize_from_u64(i)];
            let nb = tm.new_block(BlockKind::Bitmap)?;
            if old != 0 {
                tm.meta_sm.dec(old)?;
            }
            tm.meta_sm.bitmap_locations[usize_from_u64(i)] = nb;
            relocated.insert(i);
        }
    }
    tm.meta_sm.take_dirty_bitmaps();
    if tm.meta_sm.take_overflow_dirty() {
        return Err(Error::corrupt(
            "metadata overflow counts changed while writing bitmaps",
        ));
    }
    encode_bitmaps(tm, false, relocated)?;
    let mut index = zeroed_block();
    for i in 0..tm.meta_sm.bitmap_locations.len() {
        let (nr_free, nfb) = tm.meta_sm.bitmap_stats[i];
        let loc = tm.meta_sm.bitmap_locations[i];
        encode_index_entry(&mut index[16 + i * INDEX_ENTRY_SIZE..], loc, nr_free, nfb);
    }
    *tm.get_mut(new_index)? = *index;
    Ok(SmRoot {
        nr_blocks: tm.meta_sm.nr_blocks(),
        nr_allocated: tm.meta_sm.nr_allocated(),
        bitmap_root: new_index,
        ref_count_root: tm.meta_sm.ref_count_root,
    })
}

/// Loads a space map's bitmaps listed by `locations` (location per bitmap) into `sm`.
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
    read_u64(entry, 0)
}
