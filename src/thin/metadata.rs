//! The pool metadata API used by the I/O engine: thin devices, their mappings, the data space
//! map, commits, and the metadata snapshot, all in dm-thin's on-disk format.
//!
//! Writes follow the kernel's shadowing order: the path to a device's entry in the top-level
//! mapping tree is made exclusive before the device's own tree is changed, so that sharing
//! with snapshots (and the metadata snapshot) is pushed down before anything is copied.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

use crate::error::{fail, Error, ErrorKind, Result};
use crate::pdata::block_io::BlockIo;
use crate::pdata::btree::{self, ValueType};
use crate::pdata::checksum::{read_u32, read_u64, write_u32, write_u64, BlockKind};
use crate::pdata::sm_disk::{
    self, load_bitmaps, INDEX_ENTRY, INDEX_ENTRY_SIZE, REF_COUNT, REF_COUNT_SIZE,
};
use crate::pdata::space_map::{nr_bitmaps, SpaceMap, MAX_METADATA_BLOCKS};
use crate::pdata::tm::{CacheStats, TransactionManager};
use crate::util::usize_from_u64;

use super::superblock::Superblock;
use super::values::{
    pack_block_time, unpack_block_time, BlockTime, DeviceRoot, DETAILS, DEVICE_DETAILS_SIZE,
};

/// A thin device id; the kernel limits them to 24 bits.
pub type ThinId = u32;
pub const MAX_THIN_ID: ThinId = (1 << 24) - 1;
/// Data block size limits in 512-byte sectors (64 KiB to 1 GiB, a multiple of 64 KiB).
pub const MIN_DATA_BLOCK_SECTORS: u32 = 128;
pub const MAX_DATA_BLOCK_SECTORS: u32 = 2_097_152;
/// Smallest metadata device we format.
pub const MIN_METADATA_BLOCKS: u64 = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeviceDetails {
    pub mapped_blocks: u64,
    pub transaction_id: u64,
    pub creation_time: u32,
    pub snapshotted_time: u32,
}

impl DeviceDetails {
    pub fn encode(&self) -> [u8; DEVICE_DETAILS_SIZE] {
        let mut v = [0u8; DEVICE_DETAILS_SIZE];
        write_u64(&mut v, 0, self.mapped_blocks);
        write_u64(&mut v, 8, self.transaction_id);
        write_u32(&mut v, 16, self.creation_time);
        write_u32(&mut v, 20, self.snapshotted_time);
        v
    }

    pub fn decode(v: &[u8]) -> Self {
        DeviceDetails {
            mapped_blocks: read_u64(v, 0),
            transaction_id: read_u64(v, 8),
            creation_time: read_u32(v, 16),
            snapshotted_time: read_u32(v, 20),
        }
    }
}

/// Result of looking up a virtual block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    pub data_block: u64,
    /// True when a snapshot may share the block: a write must copy it first.
    pub shared: bool,
}

/// What removing a mapping released.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unmapped {
    pub vblock: u64,
    pub data_block: u64,
    /// The data block has no reference left (its contents may be discarded).
    pub freed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MetadataStatus {
    pub transaction_id: u64,
    pub data_block_size_sectors: u32,
    pub data_total: u64,
    pub data_used: u64,
    pub metadata_total: u64,
    pub metadata_used: u64,
    pub metadata_snap: u64,
    pub time: u32,
}

pub struct ThinMetadata {
    tm: TransactionManager,
    sb: Superblock,
    details: BTreeMap<ThinId, DeviceDetails>,
    changed_details: HashSet<ThinId>,
    /// Current root of each device's mapping tree (the top-level tree catches up at commit).
    roots: BTreeMap<ThinId, u64>,
    changed_roots: HashSet<ThinId>,
    /// Devices whose path in the top-level tree is already exclusive in this transaction.
    exclusive_devs: HashSet<ThinId>,
    superblock_changed: bool,
    /// Data blocks allocated for a mapping that is not inserted yet (the engine writes the
    /// data first). A commit in between records them as free: a crash then loses nothing
    /// but an unacknowledged write, where recording them would leak them.
    unmapped_allocs: BTreeSet<u64>,
    /// Set after a failed metadata write: the pool is read-only from then on (fail-stop).
    failure: Option<String>,
}

fn check_thin_id(dev: ThinId) -> Result<()> {
    if dev > MAX_THIN_ID {
        return fail(
            ErrorKind::OutOfBounds,
            format!("thin id {dev} exceeds the 24-bit limit"),
        );
    }
    Ok(())
}

/// Volumes and snapshots a pool's default metadata is sized for.
pub const DEFAULT_MAX_THINS: u64 = 1000;

/// Mapping-tree leaves are assumed half full when sizing metadata (as `thin_metadata_size`).
const SIZING_ENTRIES_PER_LEAF: u64 = 126;

/// Depth a B-tree of `entries` keys can reach: nodes hold up to `max_fanout` entries and,
/// rebalanced, never fewer than `min_fanout` (a sixth here, well under what rebalancing keeps),
/// with one level to spare.
fn tree_depth_bound(entries: u64, max_fanout: u64, min_fanout: u64) -> u64 {
    let mut depth = 1;
    let mut capacity = max_fanout;
    while capacity < entries {
        capacity = capacity.saturating_mul(min_fanout);
        depth += 1;
    }
    depth + 1
}

/// Worst case of one insert into or removal from a tree of `depth`: the path shadowed, a
/// sibling or a split at every level, and a new root.
const fn tree_change_blocks(depth: u64) -> u64 {
    2 * depth + 1
}

/// Overflow (ref-count) trees grow when a shared node is shadowed and its children gain a
/// reference: a leaf or two at most per change.
const OVERFLOW_GROWTH_BLOCKS: u64 = 4;

/// Worst-case metadata blocks of each kind of change, for a pool's geometry.
#[derive(Debug, Clone, Copy)]
struct ChangeCosts {
    /// A mapping inserted, replaced or removed: the mapping tree, the device's path in the
    /// top-level tree, its details entry (written at commit), overflow growth.
    mapping: u64,
    /// A new thin or snapshot: its root, its top-level entry, its and its origin's details.
    device: u64,
    /// A details entry written at commit.
    details: u64,
    /// Kept beyond what a commit needs for requests that free space (discards, deletes):
    /// requests that take new metadata (blocks, volumes, snapshots) stop short of it.
    freeing_reserve: u64,
}

impl ChangeCosts {
    /// A device's mappings are at most the data blocks; device ids come from the thin count.
    fn new(nr_data_blocks: u64, nr_thins: u64) -> Self {
        let mapping_depth = tree_depth_bound(nr_data_blocks, 252, 42);
        let top_depth = tree_depth_bound(nr_thins + 1, 252, 42);
        let details = tree_change_blocks(tree_depth_bound(nr_thins + 1, 126, 21));
        let mapping =
            tree_change_blocks(mapping_depth) + top_depth + details + OVERFLOW_GROWTH_BLOCKS;
        ChangeCosts {
            mapping,
            device: 1 + tree_change_blocks(top_depth) + 2 * details + OVERFLOW_GROWTH_BLOCKS,
            details,
            freeing_reserve: 2 * mapping,
        }
    }
}

/// Blocks a commit may need besides what the transaction's changes account for.
const COMMIT_SLACK_BLOCKS: u64 = 8;

/// Metadata blocks to give a pool of `nr_data_blocks` holding up to `max_thins` volumes and
/// snapshots: `thin_metadata_size`'s estimate (half-full mapping leaves for every data block,
/// a root per thin) plus what commits and the reserve need, within the format's limits.
pub fn recommended_metadata_blocks(nr_data_blocks: u64, max_thins: u64) -> u64 {
    let mappings = nr_data_blocks.div_ceil(SIZING_ENTRIES_PER_LEAF);
    // Each thin has a root leaf, and its entries fill the top-level and details trees'
    // nodes (a third full at worst: 84 and 42 entries).
    let thins = max_thins + max_thins.div_ceil(84) + max_thins.div_ceil(42);
    let costs = ChangeCosts::new(nr_data_blocks, max_thins);
    let base = mappings
        + thins
        + costs.device
        + commit_blocks_bound(nr_data_blocks, 0, 0, 0)
        + costs.freeing_reserve
        + costs.mapping;
    // The metadata bitmaps cover the result, the base included.
    let total = base + nr_bitmaps(base) + 1;
    total.clamp(MIN_METADATA_BLOCKS, MAX_METADATA_BLOCKS)
}

/// Blocks a commit writes for the space maps of a pool of this geometry: every data bitmap and
/// its index tree, both overflow trees, every metadata bitmap and the metadata index block.
fn commit_blocks_bound(
    nr_data_blocks: u64,
    nr_metadata_blocks: u64,
    data_overflow: u64,
    metadata_overflow: u64,
) -> u64 {
    let data_bitmaps = nr_bitmaps(nr_data_blocks);
    data_bitmaps
        + btree::bulk_build_blocks(data_bitmaps, INDEX_ENTRY_SIZE)
        + btree::bulk_build_blocks(data_overflow, REF_COUNT_SIZE)
        + btree::bulk_build_blocks(metadata_overflow, REF_COUNT_SIZE)
        + nr_bitmaps(nr_metadata_blocks)
        + 1
        + COMMIT_SLACK_BLOCKS
}

/// What a request that needs metadata blocks may use of the free ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Room {
    /// Takes new metadata for good (a new block mapped, a volume, a snapshot): leaves the
    /// freeing reserve alone.
    Growth,
    /// Frees space (discard, delete): may use the freeing reserve, never what a commit needs.
    Freeing,
}

impl ThinMetadata {
    /// Writes fresh, empty metadata.
    pub fn format(
        io: Arc<dyn BlockIo>,
        data_block_sectors: u32,
        nr_data_blocks: u64,
    ) -> Result<Self> {
        if !(MIN_DATA_BLOCK_SECTORS..=MAX_DATA_BLOCK_SECTORS).contains(&data_block_sectors)
            || !data_block_sectors.is_multiple_of(MIN_DATA_BLOCK_SECTORS)
        {
            return fail(
                ErrorKind::InvalidInput,
                format!(
                    "data block size of {data_block_sectors} sectors: must be 64 KiB to 1 GiB, a multiple of 64 KiB"
                ),
            );
        }
        if nr_data_blocks >= 1 << 40 {
            return fail(ErrorKind::OutOfBounds, "more than 2^40 data blocks");
        }
        let meta_blocks = io.nr_blocks().min(MAX_METADATA_BLOCKS);
        if meta_blocks < MIN_METADATA_BLOCKS {
            return fail(
                ErrorKind::InvalidInput,
                format!("metadata device of {meta_blocks} blocks is too small (minimum {MIN_METADATA_BLOCKS})"),
            );
        }
        let mut meta_sm = SpaceMap::new(meta_blocks);
        meta_sm.set(0, 1)?;
        let data_sm = SpaceMap::new(nr_data_blocks);
        let mut tm = TransactionManager::new(io, meta_sm, data_sm);
        let details_root = btree::empty_tree(&mut tm, DETAILS)?;
        let mapping_root = btree::empty_tree(&mut tm, DeviceRoot)?;
        let sb = Superblock {
            version: 2,
            data_block_size: data_block_sectors,
            details_root,
            mapping_root,
            metadata_nr_blocks: meta_blocks,
            ..Default::default()
        };
        let mut md = ThinMetadata::with_state(tm, sb);
        md.superblock_changed = true;
        md.commit()?;
        Ok(md)
    }

    fn with_state(tm: TransactionManager, sb: Superblock) -> Self {
        ThinMetadata {
            tm,
            sb,
            details: BTreeMap::new(),
            changed_details: HashSet::new(),
            roots: BTreeMap::new(),
            changed_roots: HashSet::new(),
            exclusive_devs: HashSet::new(),
            superblock_changed: false,
            unmapped_allocs: BTreeSet::new(),
            failure: None,
        }
    }

    /// Opens and validates existing metadata: superblock, space maps, device trees' roots.
    pub fn open(io: Arc<dyn BlockIo>) -> Result<Self> {
        let dev_blocks = io.nr_blocks();
        if dev_blocks == 0 {
            return fail(ErrorKind::Corrupt, "metadata device is empty");
        }
        let probe = TransactionManager::new(io.clone(), SpaceMap::new(0), SpaceMap::new(0));
        let sb = Superblock::decode(&*probe.read(0, BlockKind::Superblock)?)?;
        if !(MIN_DATA_BLOCK_SECTORS..=MAX_DATA_BLOCK_SECTORS).contains(&sb.data_block_size) {
            return fail(
                ErrorKind::Corrupt,
                format!("superblock: data block size {}", sb.data_block_size),
            );
        }
        let meta_root = sb.metadata_sm_root;
        if meta_root.nr_blocks == 0 || meta_root.nr_blocks > dev_blocks.min(MAX_METADATA_BLOCKS) {
            return fail(
                ErrorKind::Corrupt,
                format!(
                    "superblock: metadata space map covers {} blocks but the device has {dev_blocks}",
                    meta_root.nr_blocks
                ),
            );
        }
        // Metadata space map: a single index block listing the bitmaps.
        let mut meta_sm = SpaceMap::new(meta_root.nr_blocks);
        let meta_locations: Vec<u64> = {
            let index = probe.read(meta_root.bitmap_root, BlockKind::Index)?;
            (0..usize_from_u64(nr_bitmaps(meta_root.nr_blocks)))
                .map(|i| read_u64(&index[..], 16 + i * 16))
                .collect()
        };
        load_bitmaps(&probe, &mut meta_sm, &meta_locations)?;
        for (b, v) in btree::entries(&probe, meta_root.ref_count_root, REF_COUNT)? {
            meta_sm.set(b, read_u32(&v, 0))?;
        }
        // Data space map: an index btree of bitmaps, checked against nr_blocks before sizing.
        let data_root = sb.data_sm_root;
        let index = btree::entries(&probe, data_root.bitmap_root, INDEX_ENTRY)?;
        if index.len() as u64 != nr_bitmaps(data_root.nr_blocks) {
            return fail(
                ErrorKind::Corrupt,
                format!(
                    "data space map: {} index entries for {} blocks",
                    index.len(),
                    data_root.nr_blocks
                ),
            );
        }
        let mut data_sm = SpaceMap::new(data_root.nr_blocks);
        let data_locations: Vec<u64> = index.iter().map(|(_, v)| read_u64(v, 0)).collect();
        load_bitmaps(&probe, &mut data_sm, &data_locations)?;
        for (b, v) in btree::entries(&probe, data_root.ref_count_root, REF_COUNT)? {
            data_sm.set(b, read_u32(&v, 0))?;
        }
        meta_sm.index_root = meta_root.bitmap_root;
        meta_sm.ref_count_root = meta_root.ref_count_root;
        data_sm.index_root = data_root.bitmap_root;
        data_sm.ref_count_root = data_root.ref_count_root;
        meta_sm.mark_clean();
        data_sm.mark_clean();
        let tm = TransactionManager::new(io, meta_sm, data_sm);
        let mut md = ThinMetadata::with_state(tm, sb);
        for (dev, v) in btree::entries(&md.tm, md.sb.details_root, DETAILS)? {
            let dev = ThinId::try_from(dev)
                .map_err(|_| Error::corrupt(format!("device details: id {dev} is not 32-bit")))?;
            md.details.insert(dev, DeviceDetails::decode(&v));
        }
        for (dev, v) in btree::entries(&md.tm, md.sb.mapping_root, DeviceRoot)? {
            let dev = ThinId::try_from(dev).map_err(|_| {
                Error::corrupt(format!("mapping tree: device id {dev} is not 32-bit"))
            })?;
            if !md.details.contains_key(&dev) {
                return fail(
                    ErrorKind::Corrupt,
                    format!("mapping tree has device {dev} with no details"),
                );
            }
            md.roots.insert(dev, read_u64(&v, 0));
        }
        if md.roots.len() != md.details.len() {
            return fail(
                ErrorKind::Corrupt,
                "device details list a device with no mapping tree",
            );
        }
        Ok(md)
    }

    /// Metadata blocks the next commit may need for what this transaction changed so far.
    pub fn metadata_commit_reserve(&self) -> u64 {
        commit_blocks_bound(
            self.tm.data_sm.nr_blocks(),
            self.tm.meta_sm.nr_blocks(),
            self.tm.data_sm.nr_overflow(),
            self.tm.meta_sm.nr_overflow(),
        ) + self.changed_details.len() as u64 * self.costs().details
    }

    /// Metadata blocks that can be allocated before the next commit.
    pub fn free_metadata_blocks(&self) -> u64 {
        self.tm.meta_sm.nr_allocatable()
    }

    /// Metadata blocks freed in this transaction, allocatable once it commits.
    pub fn metadata_blocks_awaiting_commit(&self) -> u64 {
        self.tm.meta_sm.nr_freed_since_commit()
    }

    /// Metadata blocks requests that take new metadata leave alone: what a commit needs plus
    /// the reserve for requests that free space.
    pub fn metadata_reserve(&self) -> u64 {
        self.metadata_commit_reserve() + self.costs().freeing_reserve
    }

    /// True when a write needing a new data block would find the metadata room for it.
    pub fn has_metadata_room_for_mapping(&self) -> bool {
        self.room(Room::Growth, self.costs().mapping).is_ok()
    }

    fn costs(&self) -> ChangeCosts {
        ChangeCosts::new(self.tm.data_sm.nr_blocks(), self.details.len() as u64)
    }

    /// Refuses (`NoSpace`, nothing changed) a request of `need` blocks that would leave less
    /// than its kind of request must keep, so the commit after it can always finish.
    fn room(&self, kind: Room, need: u64) -> Result<()> {
        let keep = match kind {
            Room::Growth => self.metadata_reserve(),
            Room::Freeing => self.metadata_commit_reserve(),
        };
        let free = self.free_metadata_blocks();
        if free >= keep.saturating_add(need) {
            return Ok(());
        }
        fail(
            ErrorKind::NoSpace,
            format!(
                "the pool's metadata is full: {free} of {} blocks free, {keep} kept so commits can finish; grow it with `thinnbd pool grow DIR --metadata-size SIZE`",
                self.tm.meta_sm.nr_blocks()
            ),
        )
    }

    fn writable(&self) -> Result<()> {
        match &self.failure {
            Some(why) => fail(
                ErrorKind::ReadOnly,
                format!("pool metadata is read-only after an earlier failure ({why})"),
            ),
            None => Ok(()),
        }
    }

    /// Runs a mutation; a failure inside it leaves the in-core state unknown, so it turns the
    /// pool read-only unless it is an ordinary refusal (no space, bad argument).
    fn mutate<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        self.writable()?;
        let r = f(self);
        if let Err(e) = &r {
            if matches!(e.kind(), ErrorKind::Io | ErrorKind::Corrupt) {
                self.failure = Some(e.to_string());
            }
        }
        r
    }

    pub fn is_read_only(&self) -> bool {
        self.failure.is_some()
    }

    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    /// The metadata device, for readers of what is on disk (the checker).
    pub fn io(&self) -> &Arc<dyn BlockIo> {
        self.tm.io()
    }

    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    pub fn data_block_sectors(&self) -> u32 {
        self.sb.data_block_size
    }

    pub fn data_block_bytes(&self) -> u64 {
        u64::from(self.sb.data_block_size) * 512
    }

    pub fn transaction_id(&self) -> u64 {
        self.sb.transaction_id
    }

    pub fn set_transaction_id(&mut self, id: u64) -> Result<()> {
        self.writable()?;
        self.sb.transaction_id = id;
        self.superblock_changed = true;
        Ok(())
    }

    pub fn time(&self) -> u32 {
        self.sb.time
    }

    pub fn thin_ids(&self) -> Vec<ThinId> {
        self.details.keys().copied().collect()
    }

    pub fn exists(&self, dev: ThinId) -> bool {
        self.details.contains_key(&dev)
    }

    pub fn device_details(&self, dev: ThinId) -> Result<DeviceDetails> {
        self.details.get(&dev).copied().ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!("thin device {dev} does not exist"),
            )
        })
    }

    pub fn mapped_blocks(&self, dev: ThinId) -> Result<u64> {
        Ok(self.device_details(dev)?.mapped_blocks)
    }

    fn root(&self, dev: ThinId) -> Result<u64> {
        self.roots.get(&dev).copied().ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!("thin device {dev} does not exist"),
            )
        })
    }

    pub fn create_thin(&mut self, dev: ThinId) -> Result<()> {
        check_thin_id(dev)?;
        if self.exists(dev) {
            return fail(ErrorKind::Busy, format!("thin device {dev} already exists"));
        }
        self.room(Room::Growth, self.costs().device)?;
        self.mutate(|md| {
            let root = btree::empty_tree(&mut md.tm, BlockTime)?;
            md.add_device(dev, root, 0)
        })
    }

    fn add_device(&mut self, dev: ThinId, root: u64, mapped_blocks: u64) -> Result<()> {
        let (top, old) = btree::insert(
            &mut self.tm,
            self.sb.mapping_root,
            u64::from(dev),
            &root.to_le_bytes(),
            DeviceRoot,
        )?;
        if old.is_some() {
            return fail(
                ErrorKind::Corrupt,
                format!("mapping tree already had device {dev}"),
            );
        }
        self.sb.mapping_root = top;
        self.superblock_changed = true;
        self.roots.insert(dev, root);
        self.exclusive_devs.insert(dev);
        let time = self.sb.time;
        self.details.insert(
            dev,
            DeviceDetails {
                mapped_blocks,
                transaction_id: self.sb.transaction_id,
                creation_time: time,
                snapshotted_time: time,
            },
        );
        self.changed_details.insert(dev);
        Ok(())
    }

    /// A snapshot shares the origin's whole mapping tree; sharing breaks lazily on writes.
    pub fn create_snapshot(&mut self, dev: ThinId, origin: ThinId) -> Result<()> {
        check_thin_id(dev)?;
        if self.exists(dev) {
            return fail(ErrorKind::Busy, format!("thin device {dev} already exists"));
        }
        let origin_root = self.root(origin)?;
        let mapped = self.mapped_blocks(origin)?;
        self.room(Room::Growth, self.costs().device)?;
        self.mutate(|md| {
            md.tm.meta_sm.inc(origin_root)?;
            md.sb.time = md.sb.time.wrapping_add(1) & 0xff_ffff;
            md.add_device(dev, origin_root, mapped)?;
            let time = md.sb.time;
            if let Some(o) = md.details.get_mut(&origin) {
                o.snapshotted_time = time;
            }
            md.changed_details.insert(origin);
            Ok(())
        })
    }

    /// Deletes a device; data and metadata blocks nobody else shares are freed.
    pub fn delete_thin(&mut self, dev: ThinId) -> Result<()> {
        let root = self.root(dev)?;
        self.room(Room::Freeing, self.costs().device)?;
        self.mutate(|md| {
            let (top, _stale) =
                btree::remove(&mut md.tm, md.sb.mapping_root, u64::from(dev), DeviceRoot)?;
            md.sb.mapping_root = top;
            btree::delete_tree(&mut md.tm, root, BlockTime)?;
            let (details_root, _) =
                btree::remove(&mut md.tm, md.sb.details_root, u64::from(dev), DETAILS)?;
            md.sb.details_root = details_root;
            md.superblock_changed = true;
            md.roots.remove(&dev);
            md.details.remove(&dev);
            md.changed_details.remove(&dev);
            md.changed_roots.remove(&dev);
            md.exclusive_devs.remove(&dev);
            Ok(())
        })
    }

    /// Looks up a virtual block of a device.
    pub fn lookup(&self, dev: ThinId, vblock: u64) -> Result<Option<Mapping>> {
        let details = self.device_details(dev)?;
        let root = self.root(dev)?;
        Ok(
            btree::lookup_u64(&self.tm, root, vblock, BlockTime)?.map(|v| {
                let (data_block, time) = unpack_block_time(v);
                Mapping {
                    data_block,
                    shared: details.snapshotted_time > time,
                }
            }),
        )
    }

    /// Mappings with `begin <= vblock < end`, in order.
    pub fn mappings_in(&self, dev: ThinId, begin: u64, end: u64) -> Result<Vec<(u64, Mapping)>> {
        let details = self.device_details(dev)?;
        let root = self.root(dev)?;
        let mut out = Vec::new();
        btree::iterate(&self.tm, root, BlockTime, begin, end, &mut |k, v| {
            let (data_block, time) = unpack_block_time(read_u64(v, 0));
            out.push((
                k,
                Mapping {
                    data_block,
                    shared: details.snapshotted_time > time,
                },
            ));
            Ok(true)
        })?;
        Ok(out)
    }

    /// Makes the device's path in the top-level tree exclusive to this transaction.
    fn prepare_device(&mut self, dev: ThinId) -> Result<u64> {
        let root = self.root(dev)?;
        if !self.exclusive_devs.contains(&dev) {
            // Rewriting the entry with its own value shadows the path down to it.
            self.write_device_root(dev, root)?;
            self.superblock_changed = true;
            self.exclusive_devs.insert(dev);
        }
        Ok(root)
    }

    /// Stores `root` as the device's entry in the top-level tree. The replaced value needs no
    /// release: its reference moved to the new root when that was shadowed from it.
    fn write_device_root(&mut self, dev: ThinId, root: u64) -> Result<()> {
        let (top, _) = btree::insert(
            &mut self.tm,
            self.sb.mapping_root,
            u64::from(dev),
            &root.to_le_bytes(),
            DeviceRoot,
        )?;
        self.sb.mapping_root = top;
        Ok(())
    }

    fn set_root(&mut self, dev: ThinId, root: u64) {
        if self.roots.insert(dev, root) != Some(root) {
            self.changed_roots.insert(dev);
        }
    }

    /// Maps `vblock` to `data_block` (whose reference, from `alloc_data_block`, it takes over).
    /// A previous mapping is replaced and its data block released.
    pub fn insert(&mut self, dev: ThinId, vblock: u64, data_block: u64) -> Result<()> {
        if data_block >= self.tm.data_sm.nr_blocks() {
            return fail(
                ErrorKind::OutOfBounds,
                format!("data block {data_block} is past the data device"),
            );
        }
        // Replacing a mapping (breaking sharing) takes metadata as a new one does; the
        // allocation of `data_block` checked the growth room, this keeps the commit's.
        self.room(Room::Freeing, self.costs().mapping)?;
        self.mutate(|md| {
            let root = md.prepare_device(dev)?;
            let value = pack_block_time(data_block, md.sb.time);
            let (new_root, old) =
                btree::insert(&mut md.tm, root, vblock, &value.to_le_bytes(), BlockTime)?;
            md.set_root(dev, new_root);
            md.unmapped_allocs.remove(&data_block);
            match old {
                Some(old) => BlockTime.dec(&mut md.tm, &old)?,
                None => {
                    if let Some(d) = md.details.get_mut(&dev) {
                        d.mapped_blocks += 1;
                    }
                    md.changed_details.insert(dev);
                }
            }
            Ok(())
        })
    }

    /// Removes the mapping of `vblock`, if any.
    pub fn remove(&mut self, dev: ThinId, vblock: u64) -> Result<Option<Unmapped>> {
        self.root(dev)?;
        self.room(Room::Freeing, self.costs().mapping)?;
        self.mutate(|md| md.remove_one(dev, vblock))
    }

    fn remove_one(&mut self, dev: ThinId, vblock: u64) -> Result<Option<Unmapped>> {
        let root = self.root(dev)?;
        if btree::lookup(&self.tm, root, vblock, BlockTime)?.is_none() {
            return Ok(None);
        }
        let root = self.prepare_device(dev)?;
        let (new_root, removed) = btree::remove(&mut self.tm, root, vblock, BlockTime)?;
        self.set_root(dev, new_root);
        let Some(v) = removed else { return Ok(None) };
        let (data_block, _) = unpack_block_time(read_u64(&v, 0));
        let left = self.tm.data_sm.dec(data_block)?;
        if let Some(d) = self.details.get_mut(&dev) {
            d.mapped_blocks = d.mapped_blocks.saturating_sub(1);
        }
        self.changed_details.insert(dev);
        Ok(Some(Unmapped {
            vblock,
            data_block,
            freed: left == 0,
        }))
    }

    /// Removes every mapping with `begin <= vblock < end`.
    pub fn remove_range(&mut self, dev: ThinId, begin: u64, end: u64) -> Result<Vec<Unmapped>> {
        let keys: Vec<u64> = self
            .mappings_in(dev, begin, end)?
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        if !keys.is_empty() {
            // Neighbouring keys share leaves: one path, then a leaf and a sibling per leafful.
            let leaves = (keys.len() as u64).div_ceil(btree::max_entries(8) as u64 / 3);
            self.room(Room::Freeing, self.costs().mapping + 2 * leaves)?;
        }
        self.mutate(|md| {
            let mut out = Vec::with_capacity(keys.len());
            for k in keys {
                if let Some(u) = md.remove_one(dev, k)? {
                    out.push(u);
                }
            }
            Ok(out)
        })
    }

    /// Allocates a data block (reference count 1) for a new mapping.
    pub fn alloc_data_block(&mut self) -> Result<u64> {
        self.writable()?;
        self.room(Room::Growth, self.costs().mapping)?;
        let b = self.tm.data_sm.alloc().ok_or_else(|| {
            Error::new(
                ErrorKind::NoSpace,
                "the pool's data device has no free block",
            )
        })?;
        self.unmapped_allocs.insert(b);
        Ok(b)
    }

    /// Returns a data block taken by `alloc_data_block` but never mapped.
    pub fn release_data_block(&mut self, data_block: u64) -> Result<()> {
        self.unmapped_allocs.remove(&data_block);
        self.mutate(|md| md.tm.data_sm.dec(data_block).map(drop))
    }

    /// Reference count of a data block (1 = exclusive to one mapping or one shared leaf).
    pub fn data_block_refs(&self, data_block: u64) -> Result<u32> {
        self.tm.data_sm.get(data_block)
    }

    /// Free data blocks, not counting those that become free at the next commit.
    pub fn free_data_blocks(&self) -> u64 {
        self.tm.data_sm.nr_free() - self.tm.data_sm.nr_freed_since_commit()
    }

    /// The data blocks freed in this transaction (sorted); they stay unallocated until the
    /// next commit, so their contents may be discarded until then.
    pub fn data_blocks_freed_since_commit(&self) -> Vec<u64> {
        self.tm.data_sm.freed_since_commit()
    }

    /// Keeps data blocks freed in this transaction unallocatable past the next commit, until
    /// `release_data_blocks`: their contents are discarded only once the commit that frees them
    /// is durable (before it, a crash brings back the mappings that use them).
    pub fn hold_freed_data_blocks(&mut self, blocks: &[u64]) {
        self.tm.data_sm.hold_freed(blocks);
    }

    pub fn release_data_blocks(&mut self, blocks: &[u64]) {
        self.tm.data_sm.release_held(blocks);
    }

    /// Data blocks freed in this transaction, allocatable after the next commit.
    pub fn data_blocks_awaiting_commit(&self) -> u64 {
        self.tm.data_sm.nr_freed_since_commit()
    }

    /// Grows the data device to `nr_blocks` data blocks.
    pub fn resize_data(&mut self, nr_blocks: u64) -> Result<()> {
        let now = self.tm.data_sm.nr_blocks();
        if nr_blocks < now {
            return fail(ErrorKind::Unsupported, "shrinking the data device");
        }
        if nr_blocks >= 1 << 40 {
            return fail(ErrorKind::OutOfBounds, "more than 2^40 data blocks");
        }
        self.mutate(|md| {
            md.tm.data_sm.grow(nr_blocks);
            md.superblock_changed = true;
            Ok(())
        })
    }

    /// Grows the metadata space map to `nr_blocks` (the device must hold them already); the
    /// new bitmaps and the superblock's size are written at the next commit.
    pub fn resize_metadata(&mut self, nr_blocks: u64) -> Result<()> {
        let now = self.tm.meta_sm.nr_blocks();
        if nr_blocks < now {
            return fail(
                ErrorKind::Unsupported,
                format!("shrinking the metadata device from {now} to {nr_blocks} blocks"),
            );
        }
        if nr_blocks > MAX_METADATA_BLOCKS {
            return fail(
                ErrorKind::OutOfBounds,
                format!(
                    "{nr_blocks} metadata blocks: the format holds at most {MAX_METADATA_BLOCKS}"
                ),
            );
        }
        self.writable()?;
        self.tm.io().grow(nr_blocks)?;
        self.mutate(|md| {
            md.tm.meta_sm.grow(nr_blocks);
            md.superblock_changed = true;
            Ok(())
        })
    }

    pub fn status(&self) -> MetadataStatus {
        MetadataStatus {
            transaction_id: self.sb.transaction_id,
            data_block_size_sectors: self.sb.data_block_size,
            data_total: self.tm.data_sm.nr_blocks(),
            data_used: self.tm.data_sm.nr_allocated(),
            metadata_total: self.tm.meta_sm.nr_blocks(),
            metadata_used: self.tm.meta_sm.nr_allocated(),
            metadata_snap: self.sb.metadata_snap,
            time: self.sb.time,
        }
    }

    pub fn set_cache_capacity(&mut self, blocks: usize) {
        self.tm.set_cache_capacity(blocks);
    }

    pub fn cache_stats(&self) -> CacheStats {
        self.tm.cache_stats()
    }

    pub fn has_uncommitted_changes(&self) -> bool {
        self.superblock_changed
            || self.tm.has_changes()
            || !self.changed_details.is_empty()
            || !self.changed_roots.is_empty()
    }

    /// Makes every change durable. On failure the pool turns read-only.
    pub fn commit(&mut self) -> Result<()> {
        self.writable()?;
        if !self.has_uncommitted_changes() {
            return Ok(());
        }
        let r = self.commit_inner();
        if let Err(e) = &r {
            self.failure = Some(e.to_string());
            self.tm.clear_cache();
        }
        r
    }

    fn commit_inner(&mut self) -> Result<()> {
        let mut changed: Vec<ThinId> = self.changed_roots.drain().collect();
        changed.sort_unstable();
        for dev in changed {
            // The path is exclusive (prepare_device ran), so this rewrites in place.
            let root = self.root(dev)?;
            self.write_device_root(dev, root)?;
        }
        let mut changed: Vec<ThinId> = self.changed_details.drain().collect();
        changed.sort_unstable();
        for dev in changed {
            if let Some(d) = self.details.get(&dev) {
                let (root, _) = btree::insert(
                    &mut self.tm,
                    self.sb.details_root,
                    u64::from(dev),
                    &d.encode(),
                    DETAILS,
                )?;
                self.sb.details_root = root;
            }
        }
        // Allocated but not mapped yet: written as free (see `unmapped_allocs`), then counted
        // again in memory. Only blocks nothing else references.
        let hidden: Vec<u64> = self
            .unmapped_allocs
            .iter()
            .copied()
            .filter(|&b| self.tm.data_sm.get(b).ok() == Some(1))
            .collect();
        for &b in &hidden {
            self.tm.data_sm.dec(b)?;
        }
        let written = sm_disk::write_space_maps(&mut self.tm);
        for &b in &hidden {
            self.tm.data_sm.inc(b)?;
        }
        let (data_root, meta_root) = written?;
        self.sb.data_sm_root = data_root;
        self.sb.metadata_sm_root = meta_root;
        self.sb.metadata_nr_blocks = meta_root.nr_blocks;
        self.tm.flush_with_superblock(self.sb.encode())?;
        self.exclusive_devs.clear();
        self.superblock_changed = false;
        Ok(())
    }

    /// Drops everything since the last commit by reading the committed state again.
    pub fn abort(&mut self) -> Result<()> {
        let io = self.tm.io().clone();
        *self = ThinMetadata::open(io)?;
        Ok(())
    }

    /// Takes a metadata snapshot (for tools reading a live pool with `-m`); commits first.
    pub fn reserve_metadata_snap(&mut self) -> Result<u64> {
        if self.sb.metadata_snap != 0 {
            return fail(ErrorKind::Busy, "a metadata snapshot is already held");
        }
        self.commit()?;
        self.mutate(|md| {
            let mut copy = md.sb.clone();
            copy.data_sm_root = Default::default();
            copy.metadata_sm_root = Default::default();
            copy.metadata_snap = 0;
            let s = md.tm.new_block(BlockKind::Superblock)?;
            *md.tm.get_mut(s)? = *copy.encode();
            md.tm.meta_sm.inc(md.sb.mapping_root)?;
            md.tm.meta_sm.inc(md.sb.details_root)?;
            md.sb.metadata_snap = s;
            md.superblock_changed = true;
            Ok(())
        })?;
        self.commit()?;
        Ok(self.sb.metadata_snap)
    }

    /// Releases the metadata snapshot and whatever only it referenced.
    pub fn release_metadata_snap(&mut self) -> Result<()> {
        let s = self.sb.metadata_snap;
        if s == 0 {
            return fail(ErrorKind::NotFound, "no metadata snapshot is held");
        }
        self.mutate(|md| {
            let snap = Superblock::decode(&*md.tm.read(s, BlockKind::Superblock)?)?;
            btree::delete_tree(&mut md.tm, snap.mapping_root, DeviceRoot)?;
            btree::delete_tree(&mut md.tm, snap.details_root, DETAILS)?;
            md.tm.meta_sm.dec(s)?;
            md.sb.metadata_snap = 0;
            md.superblock_changed = true;
            Ok(())
        })
    }

    /// For each device, how many of its mapped blocks no other device maps (what deleting it
    /// would free, as thin_ls's EXCLUSIVE_BLOCKS). The data space map's reference count cannot
    /// tell this: a snapshot shares whole btree subtrees, and the blocks under a shared leaf
    /// keep a count of 1 until the leaf is copied. So every mapping is walked and counted.
    pub fn exclusive_blocks(&self) -> Result<BTreeMap<ThinId, u64>> {
        // Devices mapping each data block, saturating at 2 ("shared"); one byte per data block.
        let nr_data = usize::try_from(self.tm.data_sm.nr_blocks())
            .map_err(|_| Error::new(ErrorKind::OutOfBounds, "data device too large to count"))?;
        let mut users = vec![0u8; nr_data];
        let ids = self.thin_ids();
        for &dev in &ids {
            self.for_each_data_block(dev, &mut |b| {
                if let Some(n) = users.get_mut(b) {
                    *n = n.saturating_add(1).min(2);
                }
            })?;
        }
        let mut out = BTreeMap::new();
        for &dev in &ids {
            let mut exclusive = 0u64;
            self.for_each_data_block(dev, &mut |b| {
                if users.get(b) == Some(&1) {
                    exclusive += 1;
                }
            })?;
            out.insert(dev, exclusive);
        }
        Ok(out)
    }

    /// Calls `visit` with the data block of every mapping of a device.
    fn for_each_data_block(&self, dev: ThinId, visit: &mut dyn FnMut(usize)) -> Result<()> {
        let root = self.root(dev)?;
        btree::iterate(&self.tm, root, BlockTime, 0, u64::MAX, &mut |_, v| {
            let (b, _) = unpack_block_time(read_u64(v, 0));
            // A block past the address space cannot index the count; check reports it.
            if let Ok(b) = usize::try_from(b) {
                visit(b);
            }
            Ok(true)
        })?;
        Ok(())
    }

    /// All mappings of a device as (vblock, data block, time), for dump and tests.
    pub fn device_mappings(&self, dev: ThinId) -> Result<Vec<(u64, u64, u32)>> {
        let root = self.root(dev)?;
        let mut out = Vec::new();
        btree::iterate(&self.tm, root, BlockTime, 0, u64::MAX, &mut |k, v| {
            let (b, t) = unpack_block_time(read_u64(v, 0));
            out.push((k, b, t));
            Ok(true)
        })?;
        Ok(out)
    }

    #[allow(dead_code)] // used by the restore and check tools
    pub(crate) fn tm(&self) -> &TransactionManager {
        &self.tm
    }

    /// Restores devices in bulk (thin_restore): one transaction, trees built bottom-up.
    #[allow(dead_code)] // used by restore
    pub(crate) fn bulk_load_device(
        &mut self,
        dev: ThinId,
        details: DeviceDetails,
        mappings: &[(u64, u64, u32)],
    ) -> Result<()> {
        check_thin_id(dev)?;
        if self.exists(dev) {
            return fail(
                ErrorKind::InvalidInput,
                format!("device {dev} appears twice"),
            );
        }
        self.mutate(|md| {
            let keys: Vec<u64> = mappings.iter().map(|m| m.0).collect();
            if keys.windows(2).any(|w| w[0] >= w[1]) {
                return fail(
                    ErrorKind::InvalidInput,
                    format!("device {dev}: mappings overlap or are unsorted"),
                );
            }
            let mut values = Vec::with_capacity(mappings.len() * 8);
            for &(_, data_block, time) in mappings {
                if data_block >= md.tm.data_sm.nr_blocks() {
                    return fail(
                        ErrorKind::OutOfBounds,
                        format!("device {dev}: data block {data_block} is past the data device"),
                    );
                }
                md.tm.data_sm.inc(data_block)?;
                values.extend_from_slice(&pack_block_time(data_block, time).to_le_bytes());
            }
            let root = btree::bulk_build(&mut md.tm, BlockTime, &keys, &values)?;
            md.add_device(dev, root, mappings.len() as u64)?;
            let d = md.details.get_mut(&dev).expect("just added");
            *d = DeviceDetails {
                mapped_blocks: mappings.len() as u64,
                ..details
            };
            Ok(())
        })
    }

    /// Sets superblock fields carried by a restore.
    #[allow(dead_code)] // used by restore
    pub(crate) fn set_restored_header(&mut self, time: u32, transaction_id: u64, flags: u32) {
        self.sb.time = time;
        self.sb.transaction_id = transaction_id;
        self.sb.flags = flags;
        self.superblock_changed = true;
    }

    // --- accessors for tools (xml/check) ---

    /// Root of a device's mapping tree as it stands now (committed or not).
    pub(crate) fn device_root(&self, dev: ThinId) -> Result<u64> {
        self.root(dev)
    }

    /// Sets the superblock version carried by a restore (0.9.0 XML may say 1).
    pub(crate) fn set_restored_version(&mut self, version: u32) {
        self.sb.version = version;
        self.superblock_changed = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pdata::mem_block_io::MemBlockIo;

    fn pool() -> ThinMetadata {
        ThinMetadata::format(Arc::new(MemBlockIo::new(512)), 128, 10_000).unwrap()
    }

    #[test]
    fn device_roots_reach_the_top_level_tree_at_commit() {
        let mut md = pool();
        md.create_thin(1).unwrap();
        md.commit().unwrap();
        let b = md.alloc_data_block().unwrap();
        md.insert(1, 5, b).unwrap();
        assert_eq!(md.changed_roots.len(), 1, "the new root waits for commit");
        md.commit().unwrap();
        assert!(md.changed_roots.is_empty());
        let io = md.tm.io().clone();
        let again = ThinMetadata::open(io).unwrap();
        assert_eq!(again.lookup(1, 5).unwrap().map(|m| m.data_block), Some(b));
    }

    #[test]
    fn a_block_allocated_but_not_yet_mapped_is_committed_as_free() {
        let mut md = pool();
        md.create_thin(1).unwrap();
        let mapped = md.alloc_data_block().unwrap();
        md.insert(1, 0, mapped).unwrap();
        let pending = md.alloc_data_block().unwrap();
        md.commit().unwrap();
        // A crash now: the committed state has the mapped block and no leak.
        let crashed = ThinMetadata::open(md.tm.io().clone()).unwrap();
        assert_eq!(crashed.data_block_refs(mapped).unwrap(), 1);
        assert_eq!(crashed.data_block_refs(pending).unwrap(), 0);
        // In memory it stays taken, and counts once mapped.
        assert_eq!(md.data_block_refs(pending).unwrap(), 1);
        assert_ne!(md.alloc_data_block().unwrap(), pending);
        md.insert(1, 1, pending).unwrap();
        md.commit().unwrap();
        let reopened = ThinMetadata::open(md.tm.io().clone()).unwrap();
        assert_eq!(reopened.data_block_refs(pending).unwrap(), 1);
    }

    #[test]
    fn snapshot_marks_blocks_shared_and_a_write_unshares() {
        let mut md = pool();
        md.create_thin(1).unwrap();
        let b = md.alloc_data_block().unwrap();
        md.insert(1, 0, b).unwrap();
        md.create_snapshot(2, 1).unwrap();
        assert!(md.lookup(1, 0).unwrap().unwrap().shared);
        assert!(md.lookup(2, 0).unwrap().unwrap().shared);
        let c = md.alloc_data_block().unwrap();
        md.insert(1, 0, c).unwrap();
        assert_eq!(
            md.lookup(1, 0).unwrap(),
            Some(Mapping {
                data_block: c,
                shared: false
            })
        );
        assert_eq!(md.lookup(2, 0).unwrap().unwrap().data_block, b);
        assert_eq!(md.data_block_refs(b).unwrap(), 1);
        md.delete_thin(2).unwrap();
        assert_eq!(md.data_block_refs(b).unwrap(), 0);
    }

    #[test]
    fn failed_commit_turns_read_only() {
        let io = MemBlockIo::new(512);
        let mut md = ThinMetadata::format(Arc::new(io.clone()), 128, 100).unwrap();
        md.create_thin(1).unwrap();
        io.fail_writes(true);
        assert_eq!(md.commit().unwrap_err().kind(), ErrorKind::Io);
        assert!(md.is_read_only());
        assert_eq!(md.create_thin(2).unwrap_err().kind(), ErrorKind::ReadOnly);
    }

    #[test]
    fn full_data_device_is_no_space_and_frees_after_commit() {
        let mut md = ThinMetadata::format(Arc::new(MemBlockIo::new(512)), 128, 2).unwrap();
        md.create_thin(1).unwrap();
        for v in 0..2 {
            let b = md.alloc_data_block().unwrap();
            md.insert(1, v, b).unwrap();
        }
        assert_eq!(
            md.alloc_data_block().unwrap_err().kind(),
            ErrorKind::NoSpace
        );
        md.remove(1, 0).unwrap();
        assert_eq!(md.data_blocks_awaiting_commit(), 1);
        assert_eq!(
            md.alloc_data_block().unwrap_err().kind(),
            ErrorKind::NoSpace
        );
        md.commit().unwrap();
        assert!(md.alloc_data_block().is_ok());
    }
}
