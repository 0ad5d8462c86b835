//! The blocks that differ between two thin devices (thin_delta): a walk of both devices'
//! mapping trees side by side that never reads a subtree the two share, the runs it finds,
//! and their output as 0.9.0 `thin_delta` XML or as JSON.
//!
//! A snapshot shares whole subtrees with its origin until one of them is written; after a
//! write only the path to the changed leaf is copied. So two trees that hold the same node
//! block hold the same mappings below it, and the walk passes over it without reading it:
//! the cost follows the change, not the volume. Memory is a stack of nodes per tree, bounded
//! by the trees' depth.
//!
//! The walk yields one [`BlockDelta`] per mapped virtual block, in order; [`RunMerger`] makes
//! them into the runs 0.9.0 prints with `--verbose` (one kind, contiguous virtual blocks, and
//! contiguous data blocks on each side that maps them), and the plain XML joins runs of one
//! kind that follow on.

use std::io::Write;
use std::ops::{Deref, Range, RangeInclusive};
use std::rc::Rc;
use std::sync::Arc;

use serde::Serialize;

use crate::error::{fail, Error, ErrorKind, Result};
use crate::pdata::block_io::{Block, BlockIo, BLOCK_SIZE};
use crate::pdata::btree::{self, Node, ValueType, MAX_DEPTH};
use crate::pdata::checksum::{verify, BlockKind};
use crate::pdata::space_map::SpaceMap;
use crate::pdata::tm::{BlockRef, TransactionManager};

use super::metadata::{ThinId, ThinMetadata};
use super::superblock::{Superblock, SUPERBLOCK_LOCATION};
use super::values::{unpack_block_time, BlockTime, DeviceRoot};

/// How a virtual block compares between the left and the right device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeltaKind {
    /// Both map it to the same data block.
    Same,
    /// Both map it, to different data blocks.
    Different,
    /// Only the left device maps it.
    LeftOnly,
    /// Only the right device maps it.
    RightOnly,
}

impl DeltaKind {
    /// The element name 0.9.0 `thin_delta` gives the kind.
    pub fn xml_name(self) -> &'static str {
        match self {
            DeltaKind::Same => "same",
            DeltaKind::Different => "different",
            DeltaKind::LeftOnly => "left_only",
            DeltaKind::RightOnly => "right_only",
        }
    }

    /// A block whose content may differ between the two devices (what a backup copies).
    pub fn is_changed(self) -> bool {
        self != DeltaKind::Same
    }
}

/// One virtual block mapped by either device, with the data block each side maps it to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockDelta {
    pub vblock: u64,
    pub left: Option<u64>,
    pub right: Option<u64>,
}

impl BlockDelta {
    #[inline]
    pub fn kind(&self) -> DeltaKind {
        match (self.left, self.right) {
            (Some(l), Some(r)) if l == r => DeltaKind::Same,
            (Some(_), Some(_)) => DeltaKind::Different,
            (Some(_), None) => DeltaKind::LeftOnly,
            // The walk never yields a block neither side maps.
            (None, _) => DeltaKind::RightOnly,
        }
    }
}

/// Consecutive virtual blocks of one kind whose data blocks follow on, on each side that
/// maps them: a `<range>` of 0.9.0's `--verbose` output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DeltaRun {
    pub kind: DeltaKind,
    pub begin: u64,
    pub length: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub left_data_begin: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub right_data_begin: Option<u64>,
}

impl DeltaRun {
    pub fn end(&self) -> u64 {
        self.begin + self.length
    }

    #[inline]
    fn extends_with(&self, b: &BlockDelta) -> bool {
        let follows = |start: Option<u64>, next: Option<u64>| match (start, next) {
            (Some(s), Some(n)) => s.checked_add(self.length) == Some(n),
            (None, None) => true,
            _ => false,
        };
        b.kind() == self.kind
            && self.begin.checked_add(self.length) == Some(b.vblock)
            && follows(self.left_data_begin, b.left)
            && follows(self.right_data_begin, b.right)
    }
}

/// Whether the walk reports blocks both devices map alike. Without them it never reads a
/// subtree the two trees share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SameBlocks {
    Report,
    Skip,
}

/// What a walk read, to show that shared subtrees were passed over.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WalkStats {
    /// Nodes the side-by-side walk read (shared subtrees walked to report same blocks are not
    /// counted).
    pub nodes_read: u64,
    /// Subtrees found shared and not compared entry by entry.
    pub shared_subtrees: u64,
}

/// A subtree one tree still has to yield: its node, the key range its parents give it (the
/// keys below it are in `lo..=last`) and its height (0 for a leaf).
#[derive(Debug, Clone, Copy)]
struct Subtree {
    block: u64,
    lo: u64,
    last: u64,
    height: usize,
}

/// The next thing one tree has to yield, in key order.
#[derive(Debug, Clone, Copy)]
enum Front {
    Entry { key: u64, data: u64 },
    Subtree(Subtree),
}

/// Where a walk's nodes come from.
#[derive(Clone, Copy)]
enum NodeSource<'a> {
    /// The transaction manager: its uncommitted blocks and its cache (a live pool's metadata).
    Transaction(&'a TransactionManager),
    /// Committed metadata read once from the device, bypassing the cache: every node is read
    /// once, so caching would only cost allocation and eviction.
    Device(&'a dyn BlockIo),
}

/// Blocks read ahead at most by one tree's reader: a tree written front to back lies mostly in
/// ascending blocks, so one request can fetch several of its nodes.
const READAHEAD_BLOCKS: u64 = 32;

/// One tree's reads from a [`NodeSource::Device`]: a window of blocks read in one request,
/// growing while the tree's nodes come in ascending order, back to one block when they jump.
/// Nodes are handed out as places in the window, never copied out of it: a window stays while
/// a node of it is held and is reused once none is.
struct ReadAhead {
    window: Rc<Vec<u8>>,
    /// The window holds blocks `start..start + held`.
    start: u64,
    held: u64,
    /// The block after the last one read from the device.
    read_end: u64,
    /// Blocks the next read past the window asks for.
    next_size: u64,
    /// Windows no node refers to any more, for reuse.
    spare: Vec<Vec<u8>>,
}

impl ReadAhead {
    fn new() -> Self {
        ReadAhead {
            window: Rc::default(),
            start: 0,
            held: 0,
            read_end: 0,
            next_size: 1,
            spare: Vec::new(),
        }
    }

    /// Block `b`, as a window and the byte offset of the block in it.
    fn read(&mut self, io: &dyn BlockIo, b: u64) -> Result<(Rc<Vec<u8>>, usize)> {
        if !(self.start..self.start + self.held).contains(&b) {
            let ahead = b >= self.read_end && b - self.read_end < READAHEAD_BLOCKS;
            self.next_size = if ahead {
                (self.next_size * 2).min(READAHEAD_BLOCKS)
            } else {
                1
            };
            let count = self.next_size.min(io.nr_blocks().saturating_sub(b)).max(1);
            self.read_end = b.saturating_add(1);
            self.held = 0;
            let old = std::mem::take(&mut self.window);
            self.reuse(old);
            let mut buf = self.spare.pop().unwrap_or_default();
            #[expect(
                clippy::cast_possible_truncation,
                reason = "a window is at most READAHEAD_BLOCKS blocks"
            )]
            buf.resize(count as usize * BLOCK_SIZE, 0);
            // A fault further on is not this block's: then it is read alone.
            let count = if count > 1 && io.read_blocks(b, &mut buf).is_ok() {
                count
            } else {
                buf.truncate(BLOCK_SIZE);
                buf.copy_from_slice(&io.read_block(b)?[..]);
                1
            };
            self.window = Rc::new(buf);
            (self.start, self.held, self.read_end) = (b, count, b + count);
        }
        #[expect(
            clippy::cast_possible_truncation,
            reason = "b is inside the window, at most READAHEAD_BLOCKS blocks"
        )]
        let at = (b - self.start) as usize * BLOCK_SIZE;
        Ok((Rc::clone(&self.window), at))
    }

    /// Keeps a window's buffer for a later read once nothing refers to it.
    fn reuse(&mut self, window: Rc<Vec<u8>>) {
        if let Ok(buf) = Rc::try_unwrap(window) {
            if buf.capacity() > 0 {
                self.spare.push(buf);
            }
        }
    }
}

/// A node as one tree's cursor holds it.
enum NodeBuf<'a> {
    Shared(BlockRef<'a>),
    /// The block at this byte offset of a window read from the device.
    Window(Rc<Vec<u8>>, usize),
}

impl Deref for NodeBuf<'_> {
    type Target = Block;
    fn deref(&self) -> &Block {
        match self {
            NodeBuf::Shared(b) => b,
            NodeBuf::Window(w, at) => w[*at..*at + BLOCK_SIZE]
                .try_into()
                .expect("a window holds whole blocks"),
        }
    }
}

/// Reads one tree's mapping nodes, checked as [`btree::read_node`] checks them.
struct NodeReader<'a> {
    source: NodeSource<'a>,
    ahead: ReadAhead,
}

impl<'a> NodeReader<'a> {
    fn new(source: NodeSource<'a>) -> Self {
        NodeReader {
            source,
            ahead: ReadAhead::new(),
        }
    }

    fn read(&mut self, b: u64) -> Result<NodeBuf<'a>> {
        match self.source {
            NodeSource::Transaction(tm) => btree::read_node(tm, b, BlockTime).map(NodeBuf::Shared),
            NodeSource::Device(io) => {
                let (window, at) = self.ahead.read(io, b)?;
                let node = NodeBuf::Window(window, at);
                verify(&node, BlockKind::Node, b)?;
                let view = Node::new(&node[..]);
                // The header first: it bounds the entries the key check reads.
                view.validate_header(b, BlockTime::SIZE)?;
                if !keys_increase(&node) {
                    view.validate_keys(b)?;
                }
                Ok(node)
            }
        }
    }

    /// Takes back a node that is no longer needed.
    fn release(&mut self, node: NodeBuf<'a>) {
        if let NodeBuf::Window(window, _) = node {
            self.ahead.reuse(window);
        }
    }
}

/// Entries `next..end` of a checked leaf, all inside the walk's range and the leaf's, read
/// straight from the key and value arrays: a delta reads millions of them.
struct LeafEntries<'n> {
    keys: &'n [u8],
    values: &'n [u8],
    next: usize,
    end: usize,
}

impl<'n> LeafEntries<'n> {
    /// All entries of `leaf`, a leaf node whose header was checked (values of
    /// [`BlockTime::SIZE`] bytes).
    fn of(leaf: &'n Block) -> Self {
        let node = Node::new(&leaf[..]);
        LeafEntries {
            keys: node.key_bytes(),
            values: node.value_bytes(),
            next: 0,
            end: node.nr_entries(),
        }
    }

    #[inline]
    fn key(&self, i: usize) -> u64 {
        u64_at(self.keys, i)
    }

    /// The data block entry `i` maps to.
    #[inline]
    fn data(&self, i: usize) -> u64 {
        unpack_block_time(u64_at(self.values, i)).0
    }
}

/// Whether a node's keys strictly increase, as [`Node::validate_keys`] requires (which names
/// the fault): the same check over the key array at once, for a walk that reads every node.
fn keys_increase(node: &Block) -> bool {
    let keys = Node::new(&node[..])
        .key_bytes()
        .chunks_exact(8)
        .map(|k| u64::from_le_bytes(k.try_into().expect("8 bytes")));
    // Branch-free, so it vectorises: a fault is rare and `validate_keys` then names it.
    keys.clone()
        .zip(keys.skip(1))
        .fold(true, |increasing, (a, b)| increasing & (a < b))
}

#[inline]
fn u64_at(array: &[u8], i: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&array[8 * i..8 * i + 8]);
    u64::from_le_bytes(b)
}

struct Frame<'a> {
    location: u64,
    block: NodeBuf<'a>,
    next: usize,
    range: Subtree,
}

/// One tree's position: the nodes from the root down to the current one, each with the index
/// of its next entry. Only the part of the key space inside `first..=last` is yielded.
struct Cursor<'a> {
    reader: NodeReader<'a>,
    unopened_root: Option<Subtree>,
    frames: Vec<Frame<'a>>,
    first: u64,
    last: u64,
}

impl<'a> Cursor<'a> {
    fn new(
        source: NodeSource<'a>,
        root: u64,
        first: u64,
        last: u64,
        stats: &mut WalkStats,
    ) -> Result<Self> {
        let mut reader = NodeReader::new(source);
        let height = tree_height(&mut reader, root, stats)?;
        Ok(Cursor {
            reader,
            unopened_root: Some(Subtree {
                block: root,
                lo: 0,
                last: u64::MAX,
                height,
            }),
            frames: Vec::new(),
            first,
            last,
        })
    }

    fn pop(&mut self) {
        if let Some(f) = self.frames.pop() {
            self.reader.release(f.block);
        }
    }

    /// The next entry or subtree, after passing over what lies outside the walk's range.
    fn front(&mut self) -> Result<Option<Front>> {
        if let Some(root) = self.unopened_root {
            return Ok(Some(Front::Subtree(root)));
        }
        while let Some(f) = self.frames.last_mut() {
            let node = Node::new(&f.block[..]);
            let i = f.next;
            if i >= node.nr_entries() {
                self.pop();
                continue;
            }
            let key = node.key(i);
            if !(f.range.lo..=f.range.last).contains(&key) && (node.is_leaf() || i > 0) {
                return Err(Error::corrupt(format!(
                    "btree node {}: key {key} at entry {i} is outside the range {}..={} its parent gives it",
                    f.location, f.range.lo, f.range.last
                )));
            }
            // The keys the entry covers: itself, or the child's share of the parent's range.
            let (lo, last) = if node.is_leaf() {
                (key, key)
            } else {
                // Keys are strictly increasing (checked on read): the next one is above `key`.
                let below_next = (i + 1 < node.nr_entries()).then(|| node.key(i + 1) - 1);
                let lo = if i == 0 { f.range.lo } else { key };
                (lo, below_next.map_or(f.range.last, |b| b.min(f.range.last)))
            };
            if last < self.first {
                f.next += 1;
                continue;
            }
            if lo > self.last {
                self.pop();
                continue;
            }
            if node.is_leaf() {
                let (data, _time) = unpack_block_time(node.value_u64(i));
                return Ok(Some(Front::Entry { key, data }));
            }
            return Ok(Some(Front::Subtree(Subtree {
                block: node.value_u64(i),
                lo,
                last,
                height: f.range.height.saturating_sub(1),
            })));
        }
        Ok(None)
    }

    /// The entries of the current leaf that `front` would yield one by one as they are:
    /// from the next one on while inside the walk's range and the leaf's, so no frame needs
    /// leaving. None when the front is not such an entry.
    #[inline]
    fn leaf_entries(&self) -> Option<LeafEntries<'_>> {
        let f = self.frames.last()?;
        let node = Node::new(&f.block[..]);
        let next = f.next;
        if self.unopened_root.is_some() || !node.is_leaf() || next >= node.nr_entries() {
            return None;
        }
        let lo = f.range.lo.max(self.first);
        let last = f.range.last.min(self.last);
        let key = node.key(next);
        if !(lo..=last).contains(&key) {
            return None;
        }
        // Keys increase (checked on read): those after `next` are above `lo` too.
        let end = match last.checked_add(1) {
            Some(above) => node.search(above).0,
            None => node.nr_entries(),
        };
        Some(LeafEntries {
            next,
            end,
            ..LeafEntries::of(&f.block)
        })
    }

    /// Moves the current leaf's next entry to `next` (entries before it were yielded).
    fn skip_to(&mut self, next: usize) {
        if let Some(f) = self.frames.last_mut() {
            f.next = next;
        }
    }

    /// Passes over the front entry or subtree.
    fn advance(&mut self) {
        if self.unopened_root.take().is_none() {
            if let Some(f) = self.frames.last_mut() {
                f.next += 1;
            }
        }
    }

    /// Replaces the front subtree with its entries.
    fn expand(&mut self, subtree: Subtree, stats: &mut WalkStats) -> Result<()> {
        self.advance();
        if self.frames.len() >= MAX_DEPTH {
            return Err(Error::corrupt(format!(
                "btree node {}: tree deeper than {MAX_DEPTH} levels (a loop in the metadata?)",
                subtree.block
            )));
        }
        let block = self.reader.read(subtree.block)?;
        stats.nodes_read += 1;
        let node = Node::new(&block[..]);
        let next = if node.is_leaf() {
            node.search(self.first).0
        } else {
            node.child_index(self.first)
        };
        self.frames.push(Frame {
            location: subtree.block,
            block,
            next,
            range: subtree,
        });
        Ok(())
    }
}

/// Levels below the root (0 for a tree that is one leaf); B-trees keep every leaf at the
/// same depth.
fn tree_height(reader: &mut NodeReader, root: u64, stats: &mut WalkStats) -> Result<usize> {
    let mut b = root;
    for height in 0..=MAX_DEPTH {
        let block = reader.read(b)?;
        stats.nodes_read += 1;
        let node = Node::new(&block[..]);
        let (leaf, child) = (node.is_leaf(), node.value_u64(0));
        reader.release(block);
        if leaf {
            return Ok(height);
        }
        b = child;
    }
    Err(Error::corrupt(format!(
        "btree node {root}: tree deeper than {MAX_DEPTH} levels (a loop in the metadata?)"
    )))
}

/// Calls `visit` for every virtual block in `blocks` that either tree maps, in order, with
/// the data block each maps it to; `visit` returns false to stop. With [`SameBlocks::Skip`],
/// blocks both map alike are left out and the subtrees holding only such blocks are not read.
pub fn walk(
    tm: &TransactionManager,
    left_root: u64,
    right_root: u64,
    blocks: Range<u64>,
    same: SameBlocks,
    visit: &mut dyn FnMut(BlockDelta) -> Result<bool>,
) -> Result<WalkStats> {
    walk_from(
        NodeSource::Transaction(tm),
        left_root,
        right_root,
        blocks,
        same,
        visit,
    )
}

/// [`walk`] from either source; generic over the visitor so that the per-block call inlines
/// (a delta of a large volume visits millions of blocks).
fn walk_from<V: FnMut(BlockDelta) -> Result<bool> + ?Sized>(
    source: NodeSource,
    left_root: u64,
    right_root: u64,
    blocks: Range<u64>,
    same: SameBlocks,
    visit: &mut V,
) -> Result<WalkStats> {
    let mut stats = WalkStats::default();
    if blocks.is_empty() {
        return Ok(stats);
    }
    let (first, last) = (blocks.start, blocks.end - 1);
    let mut left = Cursor::new(source, left_root, first, last, &mut stats)?;
    let mut right = Cursor::new(source, right_root, first, last, &mut stats)?;
    let only_left = |key, data| BlockDelta {
        vblock: key,
        left: Some(data),
        right: None,
    };
    let only_right = |key, data| BlockDelta {
        vblock: key,
        left: None,
        right: Some(data),
    };
    loop {
        // Two leaves side by side (most of a walk where changes are spread out) are merged
        // here, without `front`'s climb through the frames for every entry.
        if !merge_leaves(&mut left, &mut right, same, visit)? {
            return Ok(stats);
        }
        let go_on = match (left.front()?, right.front()?) {
            (None, None) => return Ok(stats),
            (Some(Front::Entry { key, data }), None) => {
                left.advance();
                visit(only_left(key, data))?
            }
            (None, Some(Front::Entry { key, data })) => {
                right.advance();
                visit(only_right(key, data))?
            }
            (Some(Front::Subtree(s)), None) => {
                left.expand(s, &mut stats)?;
                true
            }
            (None, Some(Front::Subtree(s))) => {
                right.expand(s, &mut stats)?;
                true
            }
            (
                Some(Front::Entry { key: lk, data: ld }),
                Some(Front::Entry { key: rk, data: rd }),
            ) => compare_entries(&mut left, &mut right, (lk, ld), (rk, rd), same, visit)?,
            // Every key the other tree still holds is at least the subtree's `lo`.
            (Some(Front::Entry { key, data }), Some(Front::Subtree(s))) => {
                if key < s.lo {
                    left.advance();
                    visit(only_left(key, data))?
                } else {
                    right.expand(s, &mut stats)?;
                    true
                }
            }
            (Some(Front::Subtree(s)), Some(Front::Entry { key, data })) => {
                if key < s.lo {
                    right.advance();
                    visit(only_right(key, data))?
                } else {
                    left.expand(s, &mut stats)?;
                    true
                }
            }
            (Some(Front::Subtree(l)), Some(Front::Subtree(r))) => {
                if l.block == r.block {
                    left.advance();
                    right.advance();
                    stats.shared_subtrees += 1;
                    same == SameBlocks::Skip
                        || report_shared(&mut left.reader, l.block, first, last, visit)?
                } else {
                    // Open the subtree that comes first, else the taller one (the other may
                    // be one of its children), else both.
                    let (open_left, open_right) = if l.last < r.lo {
                        (true, false)
                    } else if r.last < l.lo {
                        (false, true)
                    } else {
                        (l.height >= r.height, r.height >= l.height)
                    };
                    if open_left {
                        left.expand(l, &mut stats)?;
                    }
                    if open_right {
                        right.expand(r, &mut stats)?;
                    }
                    true
                }
            }
        };
        if !go_on {
            return Ok(stats);
        }
    }
}

/// Yields the lower of two front entries (both when their keys match), passing over them.
fn compare_entries<V: FnMut(BlockDelta) -> Result<bool> + ?Sized>(
    left: &mut Cursor,
    right: &mut Cursor,
    (lk, ld): (u64, u64),
    (rk, rd): (u64, u64),
    same: SameBlocks,
    visit: &mut V,
) -> Result<bool> {
    if lk < rk {
        left.advance();
        visit(BlockDelta {
            vblock: lk,
            left: Some(ld),
            right: None,
        })
    } else if rk < lk {
        right.advance();
        visit(BlockDelta {
            vblock: rk,
            left: None,
            right: Some(rd),
        })
    } else {
        left.advance();
        right.advance();
        if ld == rd && same == SameBlocks::Skip {
            Ok(true)
        } else {
            visit(BlockDelta {
                vblock: lk,
                left: Some(ld),
                right: Some(rd),
            })
        }
    }
}

/// Compares entries while both cursors are inside a leaf, as the walk's loop would; returns
/// false when `visit` stopped the walk. The common case of a delta (two leaves side by side,
/// most of their entries alike) runs here, over the two leaves' entries without going
/// through the cursors for each.
fn merge_leaves<V: FnMut(BlockDelta) -> Result<bool> + ?Sized>(
    left: &mut Cursor,
    right: &mut Cursor,
    same: SameBlocks,
    visit: &mut V,
) -> Result<bool> {
    // One pass: afterwards one leaf is used up, or its next entry lies outside the walk.
    if let (Some(l), Some(r)) = (left.leaf_entries(), right.leaf_entries()) {
        let (mut i, mut j) = (l.next, r.next);
        let mut go_on = true;
        while go_on && i < l.end && j < r.end {
            let (lk, rk) = (l.key(i), r.key(j));
            go_on = if lk < rk {
                let only_left = BlockDelta {
                    vblock: lk,
                    left: Some(l.data(i)),
                    right: None,
                };
                i += 1;
                visit(only_left)?
            } else if rk < lk {
                let only_right = BlockDelta {
                    vblock: rk,
                    left: None,
                    right: Some(r.data(j)),
                };
                j += 1;
                visit(only_right)?
            } else {
                let (ld, rd) = (l.data(i), r.data(j));
                i += 1;
                j += 1;
                (ld == rd && same == SameBlocks::Skip)
                    || visit(BlockDelta {
                        vblock: lk,
                        left: Some(ld),
                        right: Some(rd),
                    })?
            };
        }
        left.skip_to(i);
        right.skip_to(j);
        if !go_on {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Reports every block of a subtree both trees hold as the same on both sides; false when
/// `visit` stopped the walk.
fn report_shared<V: FnMut(BlockDelta) -> Result<bool> + ?Sized>(
    reader: &mut NodeReader,
    root: u64,
    first: u64,
    last: u64,
    visit: &mut V,
) -> Result<bool> {
    let mut go_on = true;
    shared_entries(reader, root, first..=last, visit, &mut go_on, 0)?;
    Ok(go_on)
}

/// The entries of `report_shared`'s subtree below `root`; false once past the range or when
/// `visit` said to stop (then `go_on` is false).
fn shared_entries<V: FnMut(BlockDelta) -> Result<bool> + ?Sized>(
    reader: &mut NodeReader,
    root: u64,
    keys: RangeInclusive<u64>,
    visit: &mut V,
    go_on: &mut bool,
    depth: usize,
) -> Result<bool> {
    if depth > MAX_DEPTH {
        return Err(Error::corrupt(format!(
            "btree node {root}: tree deeper than {MAX_DEPTH} levels (a loop in the metadata?)"
        )));
    }
    let block = reader.read(root)?;
    let node = Node::new(&block[..]);
    let more = if node.is_leaf() {
        (|| {
            let entries = LeafEntries::of(&block);
            for i in node.search(*keys.start()).0..entries.end {
                let key = entries.key(i);
                if key > *keys.end() {
                    return Ok(false);
                }
                let data = entries.data(i);
                *go_on = visit(BlockDelta {
                    vblock: key,
                    left: Some(data),
                    right: Some(data),
                })?;
                if !*go_on {
                    return Ok(false);
                }
            }
            Ok(true)
        })()
    } else {
        (|| {
            let start = node.child_index(*keys.start());
            for i in start..node.nr_entries() {
                // A child's keys are at least its own key.
                if i > start && node.key(i) > *keys.end() {
                    return Ok(false);
                }
                let child = node.value_u64(i);
                if !shared_entries(reader, child, keys.clone(), visit, go_on, depth + 1)? {
                    return Ok(false);
                }
            }
            Ok(true)
        })()
    };
    reader.release(block);
    more
}

/// Gathers blocks into [`DeltaRun`]s, handing each on when it is complete.
pub struct RunMerger<F: FnMut(DeltaRun) -> Result<()>> {
    run: Option<DeltaRun>,
    emit: F,
}

impl<F: FnMut(DeltaRun) -> Result<()>> RunMerger<F> {
    pub fn new(emit: F) -> Self {
        RunMerger { run: None, emit }
    }

    #[inline]
    pub fn push(&mut self, b: BlockDelta) -> Result<()> {
        if let Some(run) = &mut self.run {
            if run.extends_with(&b) {
                run.length += 1;
                return Ok(());
            }
        }
        let previous = self.run.replace(DeltaRun {
            kind: b.kind(),
            begin: b.vblock,
            length: 1,
            left_data_begin: b.left,
            right_data_begin: b.right,
        });
        previous.map_or(Ok(()), &mut self.emit)
    }

    /// Hands on the last run.
    pub fn finish(mut self) -> Result<()> {
        self.run.take().map_or(Ok(()), &mut self.emit)
    }
}

/// Calls `visit` with each run of blocks in `blocks` whose content may differ between the two
/// devices (mapped by one only, or to different data blocks), as `(first block, count)`,
/// adjacent runs joined. Shared subtrees are not read: this is cheap when little changed.
/// The devices' sizes are the caller's concern: blocks past a device's end are unmapped.
pub fn changed_extents(
    md: &ThinMetadata,
    left: ThinId,
    right: ThinId,
    blocks: Range<u64>,
    visit: &mut dyn FnMut(u64, u64) -> Result<bool>,
) -> Result<WalkStats> {
    let (left_root, right_root) = (md.device_root(left)?, md.device_root(right)?);
    let mut extent: Option<(u64, u64)> = None;
    let mut stopped = false;
    let stats = walk(
        md.tm(),
        left_root,
        right_root,
        blocks,
        SameBlocks::Skip,
        &mut |b| {
            match &mut extent {
                Some((begin, len)) if *begin + *len == b.vblock => *len += 1,
                _ => {
                    if let Some((begin, len)) = extent.replace((b.vblock, 1)) {
                        if !visit(begin, len)? {
                            stopped = true;
                            return Ok(false);
                        }
                    }
                }
            }
            Ok(true)
        },
    )?;
    if let (Some((begin, len)), false) = (extent, stopped) {
        visit(begin, len)?;
    }
    Ok(stats)
}

/// The superblock values 0.9.0 `thin_delta` prints before the diff.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DeltaHeader {
    pub time: u32,
    pub transaction: u64,
    pub data_block_size: u32,
    pub nr_data_blocks: u64,
    /// The metadata snapshot the superblock names, if any (0.9.0 prints it only then).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata_snap: Option<u64>,
}

/// Which superblock a delta reads its trees from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeltaRoot {
    /// The committed superblock.
    Live,
    /// The metadata snapshot the superblock names (`-m`); with a block number, only if it is
    /// that block (`-m=BLOCKNR`, as 0.9.0 checks it).
    MetadataSnap(Option<u64>),
}

/// Committed metadata as `thin_delta` reads it: the superblock (or, with `-m`, the metadata
/// snapshot's) and the top-level mapping tree, without loading the space maps.
pub struct DeltaSource {
    tm: TransactionManager,
    header: DeltaHeader,
    mapping_root: u64,
}

impl DeltaSource {
    /// Reads the committed superblock, or the metadata snapshot it names: an error when it
    /// names none, or another block than the one asked for.
    pub fn open(io: Arc<dyn BlockIo>, root: DeltaRoot) -> Result<Self> {
        let mut tm = TransactionManager::new(io, SpaceMap::new(0), SpaceMap::new(0));
        // One pass reads each node once: a cache as large as the pool's would only fill memory
        // (page faults and allocation for every node read) without a hit.
        tm.set_cache_capacity(256);
        let mut sb = Superblock::decode(&*tm.read(SUPERBLOCK_LOCATION, BlockKind::Superblock)?)?;
        if let DeltaRoot::MetadataSnap(asked) = root {
            if sb.metadata_snap == 0 {
                return fail(
                    ErrorKind::NotFound,
                    "the metadata holds no metadata snapshot",
                );
            }
            if let Some(asked) = asked.filter(|&b| b != sb.metadata_snap) {
                return fail(
                    ErrorKind::NotFound,
                    format!(
                        "no metadata snapshot at block {asked}: the superblock's is at block {}",
                        sb.metadata_snap
                    ),
                );
            }
            sb = Superblock::decode(&*tm.read(sb.metadata_snap, BlockKind::Superblock)?)
                .map_err(|e| e.within(format_args!("metadata snapshot {}", sb.metadata_snap)))?;
        }
        Ok(DeltaSource {
            header: DeltaHeader {
                time: sb.time,
                transaction: sb.transaction_id,
                data_block_size: sb.data_block_size,
                // A metadata snapshot's space map roots are zero: 0.9.0 prints 0 for it.
                nr_data_blocks: sb.data_sm_root.nr_blocks,
                metadata_snap: (sb.metadata_snap != 0).then_some(sb.metadata_snap),
            },
            mapping_root: sb.mapping_root,
            tm,
        })
    }

    pub fn header(&self) -> &DeltaHeader {
        &self.header
    }

    /// The root of a thin device's mapping tree; NotFound names the device.
    pub fn device_root(&self, dev: ThinId) -> Result<u64> {
        btree::lookup_u64(&self.tm, self.mapping_root, u64::from(dev), DeviceRoot)?.ok_or_else(
            || {
                Error::new(
                    ErrorKind::NotFound,
                    format!("thin device {dev} does not exist"),
                )
            },
        )
    }

    /// Calls `emit` with every run of blocks either device maps, in order, same ones included.
    pub fn runs(
        &self,
        left: ThinId,
        right: ThinId,
        emit: &mut dyn FnMut(DeltaRun) -> Result<()>,
    ) -> Result<()> {
        let (left_root, right_root) = (self.device_root(left)?, self.device_root(right)?);
        let mut merger = RunMerger::new(emit);
        walk_from(
            NodeSource::Device(&**self.tm.io()),
            left_root,
            right_root,
            0..u64::MAX,
            SameBlocks::Report,
            &mut |b| merger.push(b).map(|()| true),
        )?;
        merger.finish()
    }
}

/// How the diff is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeltaFormat {
    /// 0.9.0 `thin_delta`: runs of one kind joined, without data blocks.
    Xml,
    /// 0.9.0 `thin_delta --verbose`: every run with its data blocks, grouped by kind.
    XmlVerbose,
    /// One JSON document: the header, the two ids, and the ranges as the XML has them.
    Json { verbose: bool },
}

fn write_err(e: std::io::Error) -> Error {
    Error::io("writing the delta", e)
}

fn json_err(e: serde_json::Error) -> Error {
    write_err(e.into())
}

/// One of the two devices compared: its thin id and, when it was chosen by volume name, the
/// name (the JSON document gives it beside the id; thin_delta's XML has no place for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeltaSide<'a> {
    pub id: ThinId,
    pub name: Option<&'a str>,
}

impl DeltaSide<'_> {
    /// A device chosen by thin id.
    pub fn id(id: ThinId) -> Self {
        DeltaSide { id, name: None }
    }
}

/// Prints what differs between devices `left` and `right` of `source`.
pub fn write_delta(
    source: &DeltaSource,
    left_side: DeltaSide,
    right_side: DeltaSide,
    format: DeltaFormat,
    out: &mut dyn Write,
) -> Result<()> {
    let (left, right) = (left_side.id, right_side.id);
    // Both devices are looked up before anything is printed, so a bad id prints nothing.
    source.device_root(left)?;
    source.device_root(right)?;
    match format {
        DeltaFormat::Xml | DeltaFormat::XmlVerbose => {
            let verbose = format == DeltaFormat::XmlVerbose;
            let h = source.header();
            let snap = h
                .metadata_snap
                .map(|s| format!("\" metadata_snap=\"{s}"))
                .unwrap_or_default();
            write!(
                out,
                "<superblock uuid=\"\" time=\"{}\" transaction=\"{}\" data_block_size=\"{}\" nr_data_blocks=\"{}{snap}\">\n  <diff left=\"{left}\" right=\"{right}\">\n",
                h.time, h.transaction, h.data_block_size, h.nr_data_blocks
            )
            .map_err(write_err)?;
            let mut xml = XmlRanges::new(&mut *out, verbose);
            source.runs(left, right, &mut |r| xml.push(r))?;
            xml.finish()?;
            out.write_all(b"  </diff>\n</superblock>\n")
                .map_err(write_err)
        }
        DeltaFormat::Json { verbose } => {
            // The ranges are streamed into the document rather than gathered first.
            write!(
                out,
                "{{\"superblock\":{},\"left\":{left},\"right\":{right},",
                serde_json::to_string(source.header()).map_err(json_err)?
            )
            .map_err(write_err)?;
            for (field, side) in [("left_name", left_side), ("right_name", right_side)] {
                if let Some(name) = side.name {
                    let name = serde_json::to_string(name).map_err(json_err)?;
                    write!(out, "\"{field}\":{name},").map_err(write_err)?;
                }
            }
            out.write_all(b"\"ranges\":[").map_err(write_err)?;
            let mut json = JsonRanges {
                out: &mut *out,
                verbose,
                pending: None,
                written: 0,
            };
            source.runs(left, right, &mut |r| json.push(r))?;
            json.finish()?;
            out.write_all(b"]}\n").map_err(write_err)
        }
    }
}

/// A run without its data blocks, joined with the next when it follows on with the same kind
/// (0.9.0's plain output).
fn join_plain(pending: &mut Option<DeltaRun>, r: DeltaRun) -> Option<DeltaRun> {
    if let Some(p) = pending {
        if p.kind == r.kind && p.end() == r.begin {
            p.length += r.length;
            return None;
        }
    }
    pending.replace(DeltaRun {
        left_data_begin: None,
        right_data_begin: None,
        ..r
    })
}

/// Writes ranges as 0.9.0 does: plain, joined; or verbose, one `<range>` per run inside an
/// element per stretch of one kind. Each line is put together in one buffer (numbers written
/// digit by digit, not through `fmt`) and written whole: a delta can have millions of runs.
struct XmlRanges<'a> {
    out: &'a mut dyn Write,
    verbose: bool,
    /// Plain: the range being joined. Verbose: the kind of the open element.
    pending: Option<DeltaRun>,
    line: Vec<u8>,
}

impl<'a> XmlRanges<'a> {
    fn new(out: &'a mut dyn Write, verbose: bool) -> Self {
        XmlRanges {
            out,
            verbose,
            pending: None,
            line: Vec::with_capacity(128),
        }
    }

    fn push(&mut self, r: DeltaRun) -> Result<()> {
        if !self.verbose {
            return match join_plain(&mut self.pending, r) {
                Some(done) => self.plain(&done),
                None => Ok(()),
            };
        }
        self.line.clear();
        let open = self.pending.map(|p| p.kind);
        if open != Some(r.kind) {
            if let Some(kind) = open {
                self.tag("    </", kind, ">\n");
            }
            self.tag("    <", r.kind, ">\n");
        }
        self.pending = Some(r);
        self.line.extend_from_slice(b"      <range");
        self.attribute("begin", r.begin);
        match (r.kind, r.left_data_begin, r.right_data_begin) {
            (DeltaKind::Different, Some(l), Some(rd)) => {
                self.attribute("left_data_begin", l);
                self.attribute("right_data_begin", rd);
            }
            (_, l, rd) => self.attribute("data_begin", l.or(rd).unwrap_or_default()),
        }
        self.attribute("length", r.length);
        self.line.extend_from_slice(b"/>\n");
        self.write_line()
    }

    fn plain(&mut self, r: &DeltaRun) -> Result<()> {
        self.line.clear();
        self.tag("    <", r.kind, "");
        self.attribute("begin", r.begin);
        self.attribute("length", r.length);
        self.line.extend_from_slice(b"/>\n");
        self.write_line()
    }

    fn tag(&mut self, open: &str, kind: DeltaKind, close: &str) {
        for part in [open, kind.xml_name(), close] {
            self.line.extend_from_slice(part.as_bytes());
        }
    }

    /// ` name="value"`.
    fn attribute(&mut self, name: &str, value: u64) {
        self.line.push(b' ');
        self.line.extend_from_slice(name.as_bytes());
        self.line.extend_from_slice(b"=\"");
        push_decimal(&mut self.line, value);
        self.line.push(b'"');
    }

    fn write_line(&mut self) -> Result<()> {
        self.out.write_all(&self.line).map_err(write_err)
    }

    fn finish(mut self) -> Result<()> {
        match (self.pending.take(), self.verbose) {
            (None, _) => Ok(()),
            (Some(r), false) => self.plain(&r),
            (Some(r), true) => {
                self.line.clear();
                self.tag("    </", r.kind, ">\n");
                self.write_line()
            }
        }
    }
}

/// Appends `n` in decimal.
fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + u8::try_from(n % 10).expect("a decimal digit");
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// Writes the ranges of the JSON document, joined as the plain XML joins them unless verbose.
struct JsonRanges<'a> {
    out: &'a mut dyn Write,
    verbose: bool,
    pending: Option<DeltaRun>,
    written: u64,
}

impl JsonRanges<'_> {
    fn push(&mut self, r: DeltaRun) -> Result<()> {
        if self.verbose {
            return self.write(&r);
        }
        match join_plain(&mut self.pending, r) {
            Some(done) => self.write(&done),
            None => Ok(()),
        }
    }

    fn write(&mut self, r: &DeltaRun) -> Result<()> {
        if self.written > 0 {
            self.out.write_all(b",").map_err(write_err)?;
        }
        self.written += 1;
        serde_json::to_writer(&mut *self.out, r).map_err(json_err)
    }

    fn finish(mut self) -> Result<()> {
        match self.pending.take() {
            Some(r) => self.write(&r),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pdata::mem_block_io::MemBlockIo;
    use proptest::prelude::*;

    fn pool(nr_data_blocks: u64) -> ThinMetadata {
        ThinMetadata::format(Arc::new(MemBlockIo::new(4096)), 128, nr_data_blocks).unwrap()
    }

    fn map(md: &mut ThinMetadata, dev: ThinId, vblock: u64) -> u64 {
        let d = md.alloc_data_block().unwrap();
        md.insert(dev, vblock, d).unwrap();
        d
    }

    /// The blocks either device maps, compared from two full listings.
    fn expected(md: &ThinMetadata, left: ThinId, right: ThinId) -> Vec<BlockDelta> {
        let mut all = std::collections::BTreeMap::<u64, BlockDelta>::new();
        for (v, d, _) in md.device_mappings(left).unwrap() {
            all.insert(
                v,
                BlockDelta {
                    vblock: v,
                    left: Some(d),
                    right: None,
                },
            );
        }
        for (v, d, _) in md.device_mappings(right).unwrap() {
            all.entry(v)
                .or_insert(BlockDelta {
                    vblock: v,
                    left: None,
                    right: None,
                })
                .right = Some(d);
        }
        all.into_values().collect()
    }

    fn walked(
        md: &ThinMetadata,
        left: ThinId,
        right: ThinId,
        blocks: Range<u64>,
        same: SameBlocks,
    ) -> (Vec<BlockDelta>, WalkStats) {
        let mut out = Vec::new();
        let stats = walk(
            md.tm(),
            md.device_root(left).unwrap(),
            md.device_root(right).unwrap(),
            blocks.clone(),
            same,
            &mut |b| {
                out.push(b);
                Ok(true)
            },
        )
        .unwrap();
        if !md.tm().has_changes() {
            // Committed metadata read from the device, as `thinnbd delta` reads it, walks alike.
            let mut from_device = Vec::new();
            let device_stats = walk_from(
                NodeSource::Device(&**md.tm().io()),
                md.device_root(left).unwrap(),
                md.device_root(right).unwrap(),
                blocks,
                same,
                &mut |b| {
                    from_device.push(b);
                    Ok(true)
                },
            )
            .unwrap();
            assert_eq!(
                from_device, out,
                "{left} against {right} read from the device"
            );
            assert_eq!(device_stats, stats);
        }
        (out, stats)
    }

    fn check_all_pairs(md: &ThinMetadata) {
        let ids = md.thin_ids();
        for &l in &ids {
            for &r in &ids {
                let want = expected(md, l, r);
                let (got, _) = walked(md, l, r, 0..u64::MAX, SameBlocks::Report);
                assert_eq!(got, want, "{l} against {r}");
                let (changed, _) = walked(md, l, r, 0..u64::MAX, SameBlocks::Skip);
                let want_changed: Vec<_> = want
                    .iter()
                    .filter(|b| b.kind().is_changed())
                    .copied()
                    .collect();
                assert_eq!(changed, want_changed, "changes of {l} against {r}");
            }
        }
    }

    /// A device mapping `n` blocks in order: a tree with two levels of internal nodes once
    /// `n` passes 252 half-full leaves.
    fn big_device(n: u64) -> ThinMetadata {
        let mut md = pool(n + 1000);
        md.create_thin(1).unwrap();
        for v in 0..n {
            map(&mut md, 1, v);
        }
        md.commit().unwrap();
        md
    }

    #[test]
    fn a_snapshot_with_one_changed_block_reads_a_path_not_the_tree() {
        let n = 40_000;
        let mut md = big_device(n);
        let root = md.device_root(1).unwrap();
        let mut stats = WalkStats::default();
        let mut reader = NodeReader::new(NodeSource::Transaction(md.tm()));
        let depth = tree_height(&mut reader, root, &mut stats).unwrap() + 1;
        assert!(
            depth >= 3,
            "the tree should have two internal levels, has {depth} levels"
        );
        md.create_snapshot(2, 1).unwrap();
        md.commit().unwrap();
        let (nothing, stats) = walked(&md, 1, 2, 0..u64::MAX, SameBlocks::Skip);
        assert!(nothing.is_empty());
        assert_eq!(stats.shared_subtrees, 1, "the roots are the same block");

        let changed_at = 23_456;
        let new_block = map(&mut md, 2, changed_at);
        md.commit().unwrap();
        let (changes, stats) = walked(&md, 1, 2, 0..u64::MAX, SameBlocks::Skip);
        assert_eq!(
            changes,
            vec![BlockDelta {
                vblock: changed_at,
                left: Some(changed_at),
                right: Some(new_block),
            }]
        );
        // Per tree: the height probe and the path to the changed leaf, each at most `depth`
        // nodes, where the whole tree has hundreds of leaves.
        assert!(
            stats.nodes_read <= 4 * depth as u64,
            "{stats:?} for a tree of depth {depth}"
        );
        assert!(stats.shared_subtrees >= 2, "{stats:?}");

        let mut extents = Vec::new();
        changed_extents(&md, 1, 2, 0..n, &mut |b, l| {
            extents.push((b, l));
            Ok(true)
        })
        .unwrap();
        assert_eq!(extents, vec![(changed_at, 1)]);
        let mut outside = Vec::new();
        changed_extents(&md, 1, 2, 0..changed_at, &mut |b, l| {
            outside.push((b, l));
            Ok(true)
        })
        .unwrap();
        assert!(outside.is_empty(), "{outside:?}");
    }

    #[test]
    fn a_range_limits_the_walk_and_extents_join_kinds() {
        let mut md = pool(10_000);
        md.create_thin(1).unwrap();
        for v in 0..600 {
            map(&mut md, 1, v);
        }
        md.create_snapshot(2, 1).unwrap();
        for v in 100..110 {
            map(&mut md, 2, v);
        }
        md.remove(2, 110).unwrap();
        map(&mut md, 2, 700);
        map(&mut md, 2, 701);
        check_all_pairs(&md);

        let mut extents = Vec::new();
        changed_extents(&md, 1, 2, 0..1000, &mut |b, l| {
            extents.push((b, l));
            Ok(true)
        })
        .unwrap();
        assert_eq!(
            extents,
            vec![(100, 11), (700, 2)],
            "different and left-only join"
        );

        let (part, _) = walked(&md, 1, 2, 105..701, SameBlocks::Report);
        let want: Vec<_> = expected(&md, 1, 2)
            .into_iter()
            .filter(|b| (105..701).contains(&b.vblock))
            .collect();
        assert_eq!(part, want);

        let mut first = Vec::new();
        changed_extents(&md, 1, 2, 0..1000, &mut |b, l| {
            first.push((b, l));
            Ok(false)
        })
        .unwrap();
        assert_eq!(first, vec![(100, 11)], "the visitor stops the walk");
    }

    #[test]
    fn a_node_read_from_the_device_with_keys_out_of_order_is_named() {
        use crate::pdata::checksum::{read_u64, seal, write_u64};
        let mut md = big_device(1000);
        md.create_snapshot(2, 1).unwrap();
        map(&mut md, 2, 500);
        md.commit().unwrap();
        let io = Arc::clone(md.tm().io());
        let mut leaf = md.device_root(2).unwrap();
        loop {
            let block = io.read_block(leaf).unwrap();
            let node = Node::new(&block[..]);
            if node.is_leaf() {
                break;
            }
            leaf = node.value_u64(node.child_index(500));
        }
        // The first two keys swapped, under a valid checksum.
        let mut block = io.read_block(leaf).unwrap();
        let (k0, k1) = (
            read_u64(&block[..], btree::HEADER),
            read_u64(&block[..], btree::HEADER + 8),
        );
        write_u64(&mut block[..], btree::HEADER, k1);
        write_u64(&mut block[..], btree::HEADER + 8, k0);
        seal(&mut block, BlockKind::Node, leaf);
        io.write_block(leaf, &block).unwrap();
        let err = walk_from(
            NodeSource::Device(&*io),
            md.device_root(1).unwrap(),
            md.device_root(2).unwrap(),
            0..u64::MAX,
            SameBlocks::Report,
            &mut |_| Ok(true),
        )
        .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
        assert!(
            err.to_string()
                .contains(&format!("btree node {leaf}: keys out of order at entry 1")),
            "{err}"
        );
    }

    #[test]
    fn runs_break_where_thin_delta_verbose_breaks_them() {
        let blocks = [
            (0, Some(10), Some(10)),
            (1, Some(11), Some(11)),
            (2, Some(12), Some(50)),
            (3, Some(13), Some(51)),
            (4, Some(20), Some(52)), // left data jumps: a new different run
            (6, Some(21), None),     // a gap
            (7, None, Some(9)),
        ];
        let mut runs = Vec::new();
        let mut m = RunMerger::new(|r| {
            runs.push((
                r.kind,
                r.begin,
                r.length,
                r.left_data_begin,
                r.right_data_begin,
            ));
            Ok(())
        });
        for (v, l, r) in blocks {
            m.push(BlockDelta {
                vblock: v,
                left: l,
                right: r,
            })
            .unwrap();
        }
        m.finish().unwrap();
        use DeltaKind::*;
        assert_eq!(
            runs,
            vec![
                (Same, 0, 2, Some(10), Some(10)),
                (Different, 2, 2, Some(12), Some(50)),
                (Different, 4, 1, Some(20), Some(52)),
                (LeftOnly, 6, 1, Some(21), None),
                (RightOnly, 7, 1, None, Some(9)),
            ]
        );
    }

    #[derive(Debug, Clone)]
    enum Op {
        Map { dev: usize, vblock: u64 },
        Unmap { dev: usize, vblock: u64 },
        Snapshot { origin: usize },
        Commit,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            8 => (0..8usize, 0..3000u64).prop_map(|(dev, vblock)| Op::Map { dev, vblock }),
            3 => (0..8usize, 0..3000u64).prop_map(|(dev, vblock)| Op::Unmap { dev, vblock }),
            1 => (0..8usize).prop_map(|origin| Op::Snapshot { origin }),
            1 => Just(Op::Commit),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn the_walk_matches_a_comparison_of_full_listings(
            ops in proptest::collection::vec(op(), 1..400),
            runs in proptest::collection::vec((0..3000u64, 1..400u64), 1..6),
        ) {
            let mut md = pool(100_000);
            md.create_thin(0).unwrap();
            // Long sequential runs make trees of several leaves that snapshots then share.
            for (start, len) in runs {
                for v in start..start + len {
                    map(&mut md, 0, v);
                }
            }
            for op in ops {
                let ids = md.thin_ids();
                let pick = |i: usize| ids[i % ids.len()];
                match op {
                    Op::Map { dev, vblock } => {
                        map(&mut md, pick(dev), vblock);
                    }
                    Op::Unmap { dev, vblock } => {
                        md.remove(pick(dev), vblock).unwrap();
                    }
                    Op::Snapshot { origin } => {
                        let id = ids.iter().max().unwrap() + 1;
                        md.create_snapshot(id, pick(origin)).unwrap();
                    }
                    Op::Commit => md.commit().unwrap(),
                }
            }
            check_all_pairs(&md);
            md.commit().unwrap();
            check_all_pairs(&md);
        }
    }
}
