//! Metadata checker (thin_check): walks everything reachable from the superblock (and the
//! metadata snapshot), validates every block and node it meets, recomputes the metadata and
//! data reference counts and compares them with both space maps.
//!
//! The checker trusts nothing it reads: it parses blocks itself with bounds-checked offsets,
//! never asks the device for a block past its end, descends into each block at most once (so
//! loops in damaged metadata only show up as wrong counts) and bounds tree depth. Every problem
//! names the block, and for tree nodes the key range the parent allowed.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::pdata::block_io::{Block, BlockIo, BLOCK_SIZE};
use crate::pdata::btree::{max_entries, INTERNAL_NODE, LEAF_NODE};
use crate::pdata::checksum::{checksum, read_u32, read_u64, BlockKind};
use crate::pdata::sm_disk::SmRoot;
use crate::pdata::space_map::{
    nr_bitmaps, ENTRIES_PER_BITMAP, MAX_METADATA_BITMAPS, MAX_METADATA_BLOCKS,
};
use crate::util::usize_from_u64;

use super::metadata::{DeviceDetails, MAX_DATA_BLOCK_SECTORS, MIN_DATA_BLOCK_SECTORS};
use super::superblock::{METADATA_BLOCK_SECTORS, THIN_MAGIC};
use super::values::unpack_block_time;

/// Problems kept in full; beyond this only the count grows, so a wrecked device cannot make the
/// report unbounded.
pub const MAX_PROBLEMS: usize = 500;
/// No valid tree here is deeper than this: with every non-root node at least a third full, 12
/// levels would hold more than 2^64 keys.
const MAX_DEPTH: usize = 12;

/// What a check found.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Report {
    /// One line per problem, each naming the block (and key range) involved; at most
    /// `MAX_PROBLEMS`, see `nr_problems` for the full count.
    pub problems: Vec<String>,
    pub nr_problems: usize,
    pub transaction_id: u64,
    pub nr_devices: usize,
    pub nr_mappings: u64,
    /// Metadata blocks the walk found in use.
    pub metadata_blocks_used: u64,
    /// Distinct data blocks the walk found mapped.
    pub data_blocks_used: u64,
}

impl Report {
    pub fn is_clean(&self) -> bool {
        self.nr_problems == 0
    }
}

/// Which tree a node belongs to, deciding the leaf value size and what a leaf value names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tree {
    Details,
    TopLevel,
    Mapping,
    DataIndex,
    RefCount,
}

impl Tree {
    fn value_size(self) -> usize {
        match self {
            Tree::Details => 24,
            Tree::TopLevel | Tree::Mapping => 8,
            Tree::DataIndex => 16,
            Tree::RefCount => 4,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Tree::Details => "device details tree",
            Tree::TopLevel => "top-level mapping tree",
            Tree::Mapping => "device mapping tree",
            Tree::DataIndex => "data space map index tree",
            Tree::RefCount => "overflow ref-count tree",
        }
    }
}

/// A validated node's entries, copied out.
struct Entries {
    keys: Vec<u64>,
    values: Vec<u8>,
    value_size: usize,
}

impl Entries {
    fn value(&self, i: usize) -> &[u8] {
        &self.values[i * self.value_size..(i + 1) * self.value_size]
    }
}

/// Reads a 2-bit space map entry `e` of a bitmap block (kernel bit order: bit 2e is high).
fn bitmap_entry(block: &Block, e: usize) -> u8 {
    let byte = block[16 + e / 4];
    let p = 2 * (e % 4);
    let hi = (byte >> p) & 1;
    let lo = (byte >> (p + 1)) & 1;
    (hi << 1) | lo
}

/// Data blocks below this are counted in a dense array; others (a huge or damaged pool) in a map.
const DENSE_DATA_BLOCKS: u64 = 1 << 24;

/// Reference counts per data block.
#[derive(Default)]
struct Counts {
    dense: Vec<u32>,
    sparse: HashMap<u64, u32>,
}

impl Counts {
    fn new(nr_blocks: u64) -> Self {
        let n = nr_blocks.min(DENSE_DATA_BLOCKS) as usize;
        Counts {
            dense: vec![0; n],
            sparse: HashMap::new(),
        }
    }

    fn slot(&mut self, b: u64) -> &mut u32 {
        match usize::try_from(b).ok().filter(|&i| i < self.dense.len()) {
            Some(i) => &mut self.dense[i],
            None => self.sparse.entry(b).or_insert(0),
        }
    }

    fn get(&self, b: u64) -> u32 {
        match usize::try_from(b).ok().and_then(|i| self.dense.get(i)) {
            Some(c) => *c,
            None => self.sparse.get(&b).copied().unwrap_or(0),
        }
    }

    fn add(&mut self, b: u64) {
        let c = self.slot(b);
        *c = c.saturating_add(1);
    }

    fn nonzero(&self) -> usize {
        self.dense.iter().filter(|&&c| c > 0).count()
            + self.sparse.values().filter(|&&c| c > 0).count()
    }
}

struct Checker {
    io: Arc<dyn BlockIo>,
    dev_blocks: u64,
    report: Report,
    /// Computed metadata reference counts, indexed by block (bounded by the device size).
    meta_counts: Vec<u32>,
    /// Computed data reference counts.
    data_counts: Counts,
    data_nr_blocks: u64,
    /// Mappings under each mapping-tree node already walked (for shared subtrees).
    subtree_mappings: HashMap<u64, u64>,
    /// Block reads still allowed. Counted walks read each block once; the uncounted re-walks of
    /// shared trees could multiply on a damaged device, so the total is capped.
    reads_left: u64,
}

impl Checker {
    fn problem(&mut self, p: String) {
        self.report.nr_problems += 1;
        if self.report.problems.len() < MAX_PROBLEMS {
            self.report.problems.push(p);
        }
    }

    /// Counts one reference to metadata block `b`: `Some(true)` the first time (descend and
    /// count children only then), `None` when `b` is past the device (reported here).
    fn reference(&mut self, b: u64, from: &str) -> Option<bool> {
        match usize::try_from(b)
            .ok()
            .and_then(|i| self.meta_counts.get_mut(i))
        {
            Some(c) => {
                *c = c.saturating_add(1);
                Some(*c == 1)
            }
            None => {
                self.problem(format!(
                    "{from} points at metadata block {b}, past the end of the device ({} blocks)",
                    self.dev_blocks
                ));
                None
            }
        }
    }

    /// Reads block `b` (known to be in range) and checks its checksum and self location.
    fn read(&mut self, b: u64, kind: BlockKind, what: &str) -> Option<Box<Block>> {
        if b >= self.dev_blocks {
            self.problem(format!("{what}: block {b} is past the end of the device"));
            return None;
        }
        if self.reads_left == 0 {
            return None;
        }
        self.reads_left -= 1;
        if self.reads_left == 0 {
            self.problem(format!(
                "{what}: block {b}: gave up after too many block reads (loops in the trees?)"
            ));
        }
        let block = match self.io.read_block(b) {
            Ok(block) => block,
            Err(e) => {
                self.problem(format!("{what}: block {b} cannot be read: {e}"));
                return None;
            }
        };
        let stored = read_u32(&block[..], 0);
        if checksum(&block, kind) != stored {
            let actual = match BlockKind::identify(&block) {
                Some(k) => format!(" (it checksums as a {})", k.name()),
                None => String::new(),
            };
            self.problem(format!(
                "{what}: block {b}: bad checksum for a {}{actual}",
                kind.name()
            ));
            return None;
        }
        let own = read_u64(&block[..], 8);
        if own != b {
            self.problem(format!(
                "{what}: block {b}: {} says it lives at block {own}",
                kind.name()
            ));
            return None;
        }
        Some(block)
    }

    /// Reads and validates one node; `range` is the key range the parent allows.
    fn read_node(
        &mut self,
        b: u64,
        tree: Tree,
        is_root: bool,
        range: (u64, Option<u64>),
        ctx: &str,
    ) -> Option<(bool, Entries)> {
        let what = format!("{ctx}: {} node", tree.name());
        let block = self.read(b, BlockKind::Node, &what)?;
        let bad = |p: String| format!("{what} at block {b}: {p}");
        let flags = read_u32(&block[..], 4);
        let nr = read_u32(&block[..], 16) as usize;
        let max = read_u32(&block[..], 20) as usize;
        let vs = read_u32(&block[..], 24) as usize;
        let leaf = match flags {
            LEAF_NODE => true,
            INTERNAL_NODE => false,
            f => {
                self.problem(bad(format!(
                    "flags {f} are neither internal (1) nor leaf (2)"
                )));
                return None;
            }
        };
        let want_vs = if leaf { tree.value_size() } else { 8 };
        if vs != want_vs {
            self.problem(bad(format!("value size {vs}, expected {want_vs}")));
            return None;
        }
        if max != max_entries(vs) {
            self.problem(bad(format!(
                "max_entries {max}, expected {}",
                max_entries(vs)
            )));
            return None;
        }
        if nr > max {
            self.problem(bad(format!("{nr} entries exceed max_entries {max}")));
            return None;
        }
        if !leaf && nr == 0 {
            self.problem(bad("internal node with no entries".into()));
            return None;
        }
        if !is_root && nr < max / 3 {
            self.problem(bad(format!(
                "only {nr} entries in a non-root node (minimum {})",
                max / 3
            )));
        }
        // Sizes are validated, so these offsets stay inside the block.
        let keys: Vec<u64> = (0..nr).map(|i| read_u64(&block[..], 32 + 8 * i)).collect();
        let vbase = 32 + 8 * max;
        if vbase + vs * nr > BLOCK_SIZE {
            self.problem(bad("entries overrun the block".into()));
            return None;
        }
        let values = block[vbase..vbase + vs * nr].to_vec();
        for i in 1..nr {
            if keys[i] <= keys[i - 1] {
                self.problem(bad(format!(
                    "keys not strictly increasing at entry {i} ({} then {})",
                    keys[i - 1],
                    keys[i]
                )));
                return None;
            }
        }
        let (lo, hi) = range;
        if let (Some(&first), Some(&last)) = (keys.first(), keys.last()) {
            let hi_text = hi.map_or("end".to_string(), |h| h.to_string());
            if first < lo || hi.is_some_and(|h| last >= h) {
                self.problem(bad(format!(
                    "keys {first}..={last} fall outside the parent's range {lo}..{hi_text}"
                )));
            }
        }
        Some((
            leaf,
            Entries {
                keys,
                values,
                value_size: vs,
            },
        ))
    }

    /// Walks the tree below node `b`, calling `leaf` on every leaf. While `counting`, each
    /// child pointer adds a reference; below a node already counted through another parent
    /// the walk goes on (to see the entries) without counting again. The depth bound stops
    /// loops, which the non-counting part of a walk cannot see.
    #[allow(clippy::too_many_arguments)]
    fn walk_node(
        &mut self,
        b: u64,
        tree: Tree,
        is_root: bool,
        range: (u64, Option<u64>),
        depth: usize,
        counting: bool,
        ctx: &str,
        leaf: &mut dyn FnMut(&mut Self, bool, &Entries),
    ) {
        if depth > MAX_DEPTH {
            self.problem(format!(
                "{ctx}: {} deeper than {MAX_DEPTH} levels at block {b}",
                tree.name()
            ));
            return;
        }
        let Some((is_leaf, e)) = self.read_node(b, tree, is_root, range, ctx) else {
            return;
        };
        if is_leaf {
            leaf(self, counting, &e);
            return;
        }
        for i in 0..e.keys.len() {
            let child = read_u64(e.value(i), 0);
            let lo = e.keys[i];
            let hi = e.keys.get(i + 1).copied().or(range.1);
            let first = if counting {
                match self.reference(child, &format!("{ctx}: {} node {b}", tree.name())) {
                    Some(first) => first,
                    None => continue,
                }
            } else {
                false
            };
            self.walk_node(child, tree, false, (lo, hi), depth + 1, first, ctx, leaf);
        }
    }

    /// Counts the reference to `root` and walks the tree.
    fn visit_tree(
        &mut self,
        root: u64,
        tree: Tree,
        ctx: &str,
        leaf: &mut dyn FnMut(&mut Self, bool, &Entries),
    ) {
        if let Some(first) = self.reference(root, ctx) {
            self.walk_node(root, tree, true, (0, None), 0, first, ctx, leaf);
        }
    }

    /// Collects a tree's (key, value) pairs, each with whether its leaf was reached while
    /// counting (only then do its values add references).
    fn collect_counted(&mut self, root: u64, tree: Tree, ctx: &str) -> Vec<(u64, Vec<u8>, bool)> {
        let mut out = Vec::new();
        self.visit_tree(root, tree, ctx, &mut |_, counting, e| {
            for i in 0..e.keys.len() {
                out.push((e.keys[i], e.value(i).to_vec(), counting));
            }
        });
        out
    }

    fn collect(&mut self, root: u64, tree: Tree, ctx: &str) -> Vec<(u64, Vec<u8>)> {
        self.collect_counted(root, tree, ctx)
            .into_iter()
            .map(|(k, v, _)| (k, v))
            .collect()
    }

    /// Reads one bitmap's 2-bit entries for blocks `begin..end`; returns them (`None` = unread).
    fn read_bitmap(
        &mut self,
        loc: u64,
        index: u64,
        begin: u64,
        end: u64,
        sm: &str,
    ) -> Option<Vec<u8>> {
        let what = format!("{sm} space map bitmap {index}");
        match self.reference(loc, &what) {
            None => return None,
            Some(false) => {
                self.problem(format!("{what}: block {loc} is referenced more than once"));
                return None;
            }
            Some(true) => {}
        }
        let block = self.read(loc, BlockKind::Bitmap, &what)?;
        let used = usize_from_u64(end - begin);
        let mut out = Vec::with_capacity(used);
        for e in 0..usize_from_u64(ENTRIES_PER_BITMAP) {
            let v = bitmap_entry(&block, e);
            if e < used {
                out.push(v);
            } else if v != 0 {
                self.problem(format!(
                    "{what} at block {loc}: entry {e} is past the end of the space map but set to {v}"
                ));
                break;
            }
        }
        Some(out)
    }

    /// Overflow tree entries as a map; every entry must stand for a count of 3 or more.
    fn overflow(&mut self, root: u64, sm: &str) -> BTreeMap<u64, u32> {
        let ctx = format!("{sm} space map");
        let mut out = BTreeMap::new();
        for (b, v) in self.collect(root, Tree::RefCount, &ctx) {
            let c = read_u32(&v, 0);
            if c < 3 {
                self.problem(format!(
                    "{ctx}: overflow tree (root block {root}) holds count {c} for block {b}"
                ));
            }
            out.insert(b, c);
        }
        out
    }

    /// The metadata space map as stored: count per block (bitmaps resolved through overflow).
    fn load_metadata_sm(&mut self, root: &SmRoot) -> Option<Vec<u32>> {
        let nr_blocks = root.nr_blocks;
        if nr_blocks == 0 || nr_blocks > self.dev_blocks || nr_blocks > MAX_METADATA_BLOCKS {
            self.problem(format!(
                "superblock (block 0): metadata space map covers {nr_blocks} blocks, but the device has {}",
                self.dev_blocks
            ));
            return None;
        }
        let index_loc = root.bitmap_root;
        match self.reference(index_loc, "metadata space map root") {
            None => return None,
            Some(false) => {
                self.problem(format!(
                    "metadata space map index block {index_loc} is also used elsewhere"
                ));
                return None;
            }
            Some(true) => {}
        }
        let index = self.read(index_loc, BlockKind::Index, "metadata space map index")?;
        let n = nr_bitmaps(nr_blocks);
        if n > MAX_METADATA_BITMAPS {
            return None;
        }
        let mut bits: Vec<u8> = Vec::with_capacity(usize_from_u64(nr_blocks));
        let mut complete = true;
        for i in 0..n {
            let loc = read_u64(&index[..], 16 + 16 * usize_from_u64(i));
            let begin = i * ENTRIES_PER_BITMAP;
            let end = (begin + ENTRIES_PER_BITMAP).min(nr_blocks);
            match self.read_bitmap(loc, i, begin, end, "metadata") {
                Some(v) => bits.extend(v),
                None => {
                    complete = false;
                    bits.resize(bits.len() + usize_from_u64(end - begin), 0);
                }
            }
        }
        let overflow = self.overflow(root.ref_count_root, "metadata");
        let counts = self.resolve(bits, &overflow, "metadata");
        complete.then_some(counts)
    }

    /// Turns 2-bit entries plus overflow entries into counts, reporting disagreements.
    fn resolve(&mut self, bits: Vec<u8>, overflow: &BTreeMap<u64, u32>, sm: &str) -> Vec<u32> {
        let mut counts: Vec<u32> = bits.iter().map(|&v| u32::from(v)).collect();
        for (&b, &c) in overflow {
            match usize::try_from(b).ok().and_then(|i| counts.get_mut(i)) {
                Some(slot) if *slot == 3 => *slot = c,
                Some(slot) => self.problem(format!(
                    "{sm} space map: overflow entry for block {b} ({c}) but the bitmap says {slot}"
                )),
                None => self.problem(format!(
                    "{sm} space map: overflow entry for block {b}, past the space map's end"
                )),
            }
        }
        for (b, c) in counts.iter().enumerate() {
            if *c == 3 && !overflow.contains_key(&(b as u64)) {
                self.problem(format!(
                    "{sm} space map: block {b} has bitmap value 3 but no overflow entry"
                ));
            }
        }
        counts
    }

    /// The data space map as stored: nonzero counts only, `None` if it could not be read whole.
    fn load_data_sm(&mut self, root: &SmRoot) -> Option<Counts> {
        let nr_blocks = root.nr_blocks;
        if nr_blocks >= 1 << 40 {
            self.problem(format!(
                "superblock (block 0): data space map has {nr_blocks} blocks (over 2^40)"
            ));
            return None;
        }
        let want = nr_bitmaps(nr_blocks);
        let index = self.collect(root.bitmap_root, Tree::DataIndex, "data space map index");
        let mut complete = index.len() as u64 == want;
        if !complete {
            self.problem(format!(
                "data space map index tree (root block {}): {} entries for {want} bitmaps",
                root.bitmap_root,
                index.len()
            ));
        }
        let mut counts = Counts::new(nr_blocks);
        let mut threes = Vec::new();
        for (i, (key, v)) in index.iter().enumerate() {
            if *key != i as u64 {
                self.problem(format!(
                    "data space map index tree (root block {}): entry {i} has key {key}",
                    root.bitmap_root
                ));
                complete = false;
                continue;
            }
            if *key >= want {
                continue;
            }
            let begin = key * ENTRIES_PER_BITMAP;
            let end = (begin + ENTRIES_PER_BITMAP).min(nr_blocks);
            match self.read_bitmap(read_u64(v, 0), *key, begin, end, "data") {
                Some(bits) => {
                    for (e, &c) in bits.iter().enumerate() {
                        if c != 0 {
                            *counts.slot(begin + e as u64) = u32::from(c);
                            if c == 3 {
                                threes.push(begin + e as u64);
                            }
                        }
                    }
                }
                None => complete = false,
            }
        }
        let overflow = self.overflow(root.ref_count_root, "data");
        for (&b, &c) in &overflow {
            match counts.get(b) {
                3 => *counts.slot(b) = c,
                have => {
                    self.problem(format!(
                        "data space map: overflow entry for block {b} ({c}) but the bitmap says {have}"
                    ));
                }
            }
        }
        for b in threes {
            if !overflow.contains_key(&b) {
                self.problem(format!(
                    "data space map: block {b} has bitmap value 3 but no overflow entry"
                ));
            }
        }
        complete.then_some(counts)
    }

    /// Walks one device's mapping tree; returns its number of mappings. `counting` is false
    /// when the top-level leaf naming it was already counted through another parent.
    fn walk_device(&mut self, dev: u64, root: u64, counting: bool, ctx: &str) -> u64 {
        if !counting {
            if let Some(&n) = self.subtree_mappings.get(&root) {
                return n;
            }
            // Not walked yet (its first parent failed to read): walk without counting.
            let dctx = format!("{ctx}: device {dev}");
            return self.mapping_count_only(root, (0, None), 0, &dctx);
        }
        if self.reference(root, ctx) != Some(true) {
            return self.subtree_mappings.get(&root).copied().unwrap_or(0);
        }
        let dctx = format!("{ctx}: device {dev}");
        self.mapping_subtree(root, true, (0, None), 0, &dctx)
    }

    /// Counts mappings below a mapping-tree node walked for the first time, adding data refs.
    fn mapping_subtree(
        &mut self,
        b: u64,
        is_root: bool,
        range: (u64, Option<u64>),
        depth: usize,
        ctx: &str,
    ) -> u64 {
        if depth > MAX_DEPTH {
            self.problem(format!(
                "{ctx}: mapping tree deeper than {MAX_DEPTH} levels at block {b}"
            ));
            return 0;
        }
        let Some((leaf, e)) = self.read_node(b, Tree::Mapping, is_root, range, ctx) else {
            return 0;
        };
        let mut total = 0u64;
        if leaf {
            for i in 0..e.keys.len() {
                let (data, _time) = unpack_block_time(read_u64(e.value(i), 0));
                if data >= self.data_nr_blocks {
                    self.problem(format!(
                        "{ctx}: mapping leaf {b}: virtual block {} maps data block {data}, past the data device ({} blocks)",
                        e.keys[i], self.data_nr_blocks
                    ));
                }
                self.data_counts.add(data);
            }
            total = e.keys.len() as u64;
        } else {
            for i in 0..e.keys.len() {
                let child = read_u64(e.value(i), 0);
                let hi = e.keys.get(i + 1).copied().or(range.1);
                let n = if self.reference(child, &format!("{ctx}: mapping node {b}")) == Some(true)
                {
                    self.mapping_subtree(child, false, (e.keys[i], hi), depth + 1, ctx)
                } else {
                    self.subtree_mappings.get(&child).copied().unwrap_or(0)
                };
                total = total.saturating_add(n);
            }
        }
        self.subtree_mappings.insert(b, total);
        total
    }

    /// Number of mappings below `b` without counting references (a subtree whose counted
    /// parent could not be read).
    fn mapping_count_only(
        &mut self,
        b: u64,
        range: (u64, Option<u64>),
        depth: usize,
        ctx: &str,
    ) -> u64 {
        if depth > MAX_DEPTH {
            return 0;
        }
        let Some((leaf, e)) = self.read_node(b, Tree::Mapping, depth == 0, range, ctx) else {
            return 0;
        };
        if leaf {
            return e.keys.len() as u64;
        }
        let mut total = 0u64;
        for i in 0..e.keys.len() {
            let hi = e.keys.get(i + 1).copied().or(range.1);
            let n =
                self.mapping_count_only(read_u64(e.value(i), 0), (e.keys[i], hi), depth + 1, ctx);
            total = total.saturating_add(n);
        }
        total
    }

    /// Checks the devices of one superblock (live or snapshot): details against the top-level
    /// tree, mapped_blocks against the mappings found.
    fn check_devices(&mut self, details_root: u64, mapping_root: u64, ctx: &str, live: bool) {
        let mut details = BTreeMap::new();
        for (dev, v) in self.collect(details_root, Tree::Details, &format!("{ctx} details tree")) {
            details.insert(dev, DeviceDetails::decode(&v));
        }
        let top = self.collect_counted(
            mapping_root,
            Tree::TopLevel,
            &format!("{ctx} top-level mapping tree"),
        );
        let mut seen = BTreeMap::new();
        for (dev, v, counting) in &top {
            let root = read_u64(v, 0);
            let n = self.walk_device(*dev, root, *counting, ctx);
            seen.insert(*dev, n);
            match details.get(dev) {
                None => self.problem(format!(
                    "{ctx}: top-level mapping tree (root block {mapping_root}) has device {dev}, which has no details"
                )),
                Some(d) if d.mapped_blocks != n => self.problem(format!(
                    "{ctx}: device {dev} (tree root block {root}): details say {} mapped blocks, the tree has {n}",
                    d.mapped_blocks
                )),
                Some(_) => {}
            }
        }
        for dev in details.keys() {
            if !seen.contains_key(dev) {
                self.problem(format!(
                    "{ctx}: details tree (root block {details_root}) has device {dev}, which has no mapping tree"
                ));
            }
        }
        if live {
            self.report.nr_devices = details.len();
            self.report.nr_mappings = seen.values().fold(0u64, |a, n| a.saturating_add(*n));
        }
    }

    fn run(&mut self) {
        if self.dev_blocks == 0 {
            self.problem("metadata device is empty".into());
            return;
        }
        self.reference(0, "superblock");
        let Some(sb) = self.read(0, BlockKind::Superblock, "superblock") else {
            return;
        };
        let magic = read_u64(&sb[..], 32);
        if magic != THIN_MAGIC {
            self.problem(format!("superblock (block 0): bad magic {magic}"));
        }
        let version = read_u32(&sb[..], 40);
        if !(1..=2).contains(&version) {
            self.problem(format!(
                "superblock (block 0): unsupported version {version}"
            ));
        }
        let (compat_ro, incompat) = (read_u32(&sb[..], 356), read_u32(&sb[..], 360));
        if compat_ro != 0 || incompat != 0 {
            self.problem(format!(
                "superblock (block 0): unknown feature flags (compat_ro {compat_ro:#x}, incompat {incompat:#x})"
            ));
        }
        let dbs = read_u32(&sb[..], 336);
        if !(MIN_DATA_BLOCK_SECTORS..=MAX_DATA_BLOCK_SECTORS).contains(&dbs) {
            self.problem(format!(
                "superblock (block 0): data block size {dbs} sectors"
            ));
        }
        let mbs = read_u32(&sb[..], 340);
        if mbs != METADATA_BLOCK_SECTORS {
            self.problem(format!(
                "superblock (block 0): metadata block size {mbs} sectors"
            ));
        }
        self.report.transaction_id = read_u64(&sb[..], 48);
        let data_root = SmRoot::decode(&sb[64..96]);
        let meta_root = SmRoot::decode(&sb[192..224]);
        let mapping_root = read_u64(&sb[..], 320);
        let details_root = read_u64(&sb[..], 328);
        let snap = read_u64(&sb[..], 56);
        self.data_nr_blocks = data_root.nr_blocks;
        self.data_counts = Counts::new(data_root.nr_blocks.min(1 << 40));

        let meta_sm = self.load_metadata_sm(&meta_root);
        let data_sm = self.load_data_sm(&data_root);
        self.check_devices(details_root, mapping_root, "live", true);
        if snap != 0 {
            match self.reference(snap, "superblock metadata_snap") {
                Some(true) => {
                    let what = "metadata snapshot superblock";
                    if let Some(s) = self.read(snap, BlockKind::Superblock, what) {
                        let (d, m) = (read_u64(&s[..], 328), read_u64(&s[..], 320));
                        self.check_devices(d, m, "metadata snapshot", false);
                    }
                }
                Some(false) => self.problem(format!(
                    "metadata snapshot superblock {snap} is also used elsewhere"
                )),
                None => {}
            }
        }
        self.compare_metadata(meta_sm, meta_root.nr_blocks);
        self.compare_data(data_sm);
    }

    fn compare_metadata(&mut self, stored: Option<Vec<u32>>, nr_blocks: u64) {
        self.report.metadata_blocks_used =
            self.meta_counts.iter().filter(|&&c| c > 0).count() as u64;
        let Some(stored) = stored else { return };
        let computed = std::mem::take(&mut self.meta_counts);
        for (b, &c) in computed.iter().enumerate() {
            let s = stored.get(b).copied();
            match s {
                Some(s) if s == c => {}
                Some(s) => self.problem(format!(
                    "metadata block {b}: space map count {s}, but {c} references were found{}",
                    if c < s { " (leaked)" } else { "" }
                )),
                None if c > 0 => self.problem(format!(
                    "metadata block {b} is in use but past the metadata space map ({nr_blocks} blocks)"
                )),
                None => {}
            }
        }
        self.meta_counts = computed;
    }

    fn compare_data(&mut self, stored: Option<Counts>) {
        self.report.data_blocks_used = self.data_counts.nonzero() as u64;
        let Some(stored) = stored else { return };
        let dense = self.data_counts.dense.len().max(stored.dense.len()) as u64;
        let mut blocks: Vec<u64> = stored
            .sparse
            .keys()
            .chain(self.data_counts.sparse.keys())
            .copied()
            .filter(|&b| b >= dense)
            .collect();
        blocks.sort_unstable();
        blocks.dedup();
        for b in (0..dense).chain(blocks) {
            let s = stored.get(b);
            let c = self.data_counts.get(b);
            if s != c {
                self.problem(format!(
                    "data block {b}: space map count {s}, but {c} references were found{}",
                    if c < s { " (leaked)" } else { "" }
                ));
            }
        }
    }
}

/// Checks a metadata device. Never panics and never reads past the device, whatever it holds.
pub fn check(io: Arc<dyn BlockIo>) -> Report {
    let dev_blocks = io.nr_blocks();
    let tracked = dev_blocks.min(MAX_METADATA_BLOCKS) as usize;
    let mut c = Checker {
        io,
        dev_blocks,
        report: Report::default(),
        meta_counts: vec![0; tracked],
        data_counts: Counts::default(),
        data_nr_blocks: 0,
        subtree_mappings: HashMap::new(),
        reads_left: dev_blocks
            .min(MAX_METADATA_BLOCKS)
            .saturating_mul(2)
            .saturating_add(10_000),
    };
    c.run();
    c.report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pdata::checksum::{seal, write_u32, write_u64};
    use crate::pdata::mem_block_io::MemBlockIo;
    use crate::thin::ThinMetadata;

    fn pool() -> (MemBlockIo, ThinMetadata) {
        let io = MemBlockIo::new(512);
        let mut md = ThinMetadata::format(Arc::new(io.clone()), 128, 20_000).unwrap();
        md.create_thin(1).unwrap();
        for v in 0..2000u64 {
            let d = md.alloc_data_block().unwrap();
            md.insert(1, v * 3, d).unwrap();
        }
        md.commit().unwrap();
        md.create_snapshot(2, 1).unwrap();
        for v in 0..300u64 {
            let d = md.alloc_data_block().unwrap();
            md.insert(2, v * 7, d).unwrap();
        }
        md.commit().unwrap();
        md.reserve_metadata_snap().unwrap();
        md.commit().unwrap();
        (io, md)
    }

    #[test]
    fn clean_pool_has_no_problems() {
        let (io, _md) = pool();
        let r = check(Arc::new(io));
        assert!(r.is_clean(), "{:#?}", r.problems);
        assert_eq!(r.nr_devices, 2);
        assert!(r.nr_mappings >= 2000 + 2000);
    }

    #[test]
    fn resealed_count_change_is_reported_with_its_block() {
        let (io, md) = pool();
        // Bump the overflow-free bitmap count of the superblock (block 0) from 1 to 2.
        let meta_index = md.superblock().metadata_sm_root.bitmap_root;
        let index = io.read_block(meta_index).unwrap();
        let bitmap = read_u64(&index[..], 16);
        let mut b = io.read_block(bitmap).unwrap();
        b[16] = (b[16] & !0b11) | 0b01;
        seal(&mut b, BlockKind::Bitmap, bitmap);
        io.write_block(bitmap, &b).unwrap();
        io.sync().unwrap();
        let r = check(Arc::new(io));
        assert!(
            r.problems.iter().any(|p| p.contains("metadata block 0:")),
            "{:#?}",
            r.problems
        );
    }

    #[test]
    fn garbage_and_loops_do_not_hang_or_panic() {
        let (io, md) = pool();
        // Make the live top-level root point device 1 at the superblock and the details tree
        // point at itself through a fake internal node.
        let top = md.superblock().mapping_root;
        let mut b = io.read_block(top).unwrap();
        write_u32(&mut b[..], 4, INTERNAL_NODE);
        for i in 0..252 {
            write_u64(&mut b[..], 32 + 8 * i, i as u64);
            write_u64(&mut b[..], 32 + 8 * 252 + 8 * i, top);
        }
        write_u32(&mut b[..], 16, 252);
        seal(&mut b, BlockKind::Node, top);
        io.write_block(top, &b).unwrap();
        io.sync().unwrap();
        let r = check(Arc::new(io.clone()));
        assert!(!r.is_clean());
        let tiny = MemBlockIo::new(3);
        assert!(!check(Arc::new(tiny)).is_clean());
        let empty = MemBlockIo::new(0);
        assert!(!check(Arc::new(empty)).is_clean());
    }
}
