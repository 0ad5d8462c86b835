//! On-disk B-trees in the persistent-data layout: lookup, insert, remove (with rebalancing),
//! range iteration, bulk build and reference-counted deletion, all shadowing through the
//! transaction manager so that a tree shares unchanged nodes with its committed past and
//! with snapshots.
//!
//! Node: 32-byte header (csum, flags, blocknr, nr_entries, max_entries, value_size, pad),
//! `max_entries` u64 keys, then `max_entries` values. Internal nodes hold u64 child locations.

use super::block_io::BLOCK_SIZE;
use super::checksum::{read_u32, read_u64, write_u32, write_u64, BlockKind};
use super::tm::TransactionManager;
use crate::error::{Error, Result};

pub const INTERNAL_NODE: u32 = 1;
pub const LEAF_NODE: u32 = 2;
/// Bytes of a node's header, before its keys.
pub(crate) const HEADER: usize = 32;
/// Largest value a tree may hold: values are returned in buffers of this size.
pub const MAX_VALUE_SIZE: usize = 24;
/// No valid tree is deeper: with non-root nodes at least a third full, 16 levels would hold
/// more than 2^64 keys. Deeper means a loop in damaged metadata.
pub const MAX_DEPTH: usize = 16;

fn check_depth(depth: usize, b: u64) -> Result<()> {
    if depth > MAX_DEPTH {
        return Err(Error::corrupt(format!(
            "btree node {b}: tree deeper than {MAX_DEPTH} levels (a loop in the metadata?)"
        )));
    }
    Ok(())
}

/// What a tree's leaf values are: their size, and the references they hold on other blocks.
/// When a shared leaf is copied every value in it gains a holder (`inc`); when a leaf is
/// released its values lose one (`dec`). Implemented by zero-sized markers, so each tree
/// operation is compiled for its value type and the callbacks inline.
pub trait ValueType: Copy {
    /// Bytes per value; at most [`MAX_VALUE_SIZE`].
    const SIZE: usize;

    fn size(self) -> usize {
        Self::SIZE
    }

    /// Takes a reference on what a value points at (a shared leaf was copied).
    fn inc(self, tm: &mut TransactionManager, value: &[u8]) -> Result<()>;

    /// Drops a reference on what a value points at, releasing what reaches zero.
    fn dec(self, tm: &mut TransactionManager, value: &[u8]) -> Result<()>;
}

/// Values of `SIZE` bytes that reference nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Plain<const SIZE: usize>;

impl<const SIZE: usize> ValueType for Plain<SIZE> {
    const SIZE: usize = SIZE;

    fn inc(self, _: &mut TransactionManager, _: &[u8]) -> Result<()> {
        Ok(())
    }

    fn dec(self, _: &mut TransactionManager, _: &[u8]) -> Result<()> {
        Ok(())
    }
}

/// Copies a leaf value out into the fixed-size buffer lookups and removals return.
fn copy_value<V: ValueType>(value: &[u8]) -> [u8; MAX_VALUE_SIZE] {
    const { assert!(V::SIZE <= MAX_VALUE_SIZE) };
    let mut out = [0u8; MAX_VALUE_SIZE];
    out[..V::SIZE].copy_from_slice(value);
    out
}

pub fn max_entries(value_size: usize) -> usize {
    3 * ((BLOCK_SIZE - HEADER) / (8 + value_size) / 3)
}

/// Read-only view of a node.
#[derive(Clone, Copy)]
pub struct Node<'a> {
    b: &'a [u8],
}

// The tree operations are compiled once per value type, often into another codegen unit than
// this one: without `#[inline]` these one-line accessors would be calls on every key and value.
impl<'a> Node<'a> {
    #[inline]
    pub fn new(b: &'a [u8]) -> Self {
        Node { b }
    }
    #[inline]
    pub fn flags(&self) -> u32 {
        read_u32(self.b, 4)
    }
    #[inline]
    pub fn is_leaf(&self) -> bool {
        self.flags() == LEAF_NODE
    }
    #[inline]
    pub fn nr_entries(&self) -> usize {
        read_u32(self.b, 16) as usize
    }
    #[inline]
    pub fn max_entries(&self) -> usize {
        read_u32(self.b, 20) as usize
    }
    #[inline]
    pub fn value_size(&self) -> usize {
        read_u32(self.b, 24) as usize
    }
    #[inline]
    pub fn key(&self, i: usize) -> u64 {
        read_u64(self.b, HEADER + 8 * i)
    }
    /// The key array as it is stored: `nr_entries` little-endian u64s.
    #[inline]
    pub fn key_bytes(&self) -> &'a [u8] {
        &self.b[HEADER..HEADER + 8 * self.nr_entries()]
    }
    /// The value array as it is stored: `nr_entries` values of `value_size` bytes.
    #[inline]
    pub fn value_bytes(&self) -> &'a [u8] {
        let at = self.value_offset(0);
        &self.b[at..at + self.value_size() * self.nr_entries()]
    }
    #[inline]
    fn value_offset(&self, i: usize) -> usize {
        HEADER + 8 * self.max_entries() + i * self.value_size()
    }
    #[inline]
    pub fn value(&self, i: usize) -> &'a [u8] {
        let off = self.value_offset(i);
        &self.b[off..off + self.value_size()]
    }
    #[inline]
    pub fn value_u64(&self, i: usize) -> u64 {
        read_u64(self.b, self.value_offset(i))
    }

    /// Index of the first key >= `key`, and whether it is equal.
    #[inline]
    pub fn search(&self, key: u64) -> (usize, bool) {
        let (mut lo, mut hi) = (0usize, self.nr_entries());
        while lo < hi {
            let mid = (lo + hi) / 2;
            let k = self.key(mid);
            if k == key {
                return (mid, true);
            }
            if k < key {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        (lo, false)
    }

    /// Child to descend into for `key`: the last key <= `key`, or the first child.
    #[inline]
    pub fn child_index(&self, key: u64) -> usize {
        match self.search(key) {
            (i, true) => i,
            (0, false) => 0,
            (i, false) => i - 1,
        }
    }

    /// Header checks, done on every read (cheap, and they keep every slice in bounds).
    pub fn validate_header(&self, location: u64, leaf_value_size: usize) -> Result<()> {
        let bad = |what: String| Err(Error::corrupt(format!("btree node {location}: {what}")));
        let flags = self.flags();
        let expect_vs = match flags {
            INTERNAL_NODE => 8,
            LEAF_NODE => leaf_value_size,
            f => return bad(format!("flags {f} are neither internal nor leaf")),
        };
        if self.value_size() != expect_vs {
            return bad(format!(
                "value size {} where {expect_vs} was expected",
                self.value_size()
            ));
        }
        if self.max_entries() != max_entries(expect_vs) {
            return bad(format!("max_entries {} is wrong", self.max_entries()));
        }
        if self.nr_entries() > self.max_entries() {
            return bad(format!("{} entries exceed the maximum", self.nr_entries()));
        }
        if flags == INTERNAL_NODE && self.nr_entries() == 0 {
            return bad("internal node with no entries".into());
        }
        Ok(())
    }

    /// Key order, checked once when the node comes from disk.
    pub fn validate_keys(&self, location: u64) -> Result<()> {
        for i in 1..self.nr_entries() {
            if self.key(i) <= self.key(i - 1) {
                return Err(Error::corrupt(format!(
                    "btree node {location}: keys out of order at entry {i}"
                )));
            }
        }
        Ok(())
    }
}

/// Writable view of a node inside a dirty block.
struct NodeMut<'a> {
    b: &'a mut [u8],
}

impl NodeMut<'_> {
    #[inline]
    fn view(&self) -> Node<'_> {
        Node { b: self.b }
    }
    fn init(&mut self, flags: u32, value_size: usize) {
        self.b.fill(0);
        write_u32(self.b, 4, flags);
        self.write_size(20, max_entries(value_size));
        self.write_size(24, value_size);
    }
    fn set_nr_entries(&mut self, n: usize) {
        self.write_size(16, n);
    }
    /// Writes a header field that counts entries or bytes within this block, so it is below
    /// BLOCK_SIZE and fits the field's 32 bits.
    fn write_size(&mut self, offset: usize, size: usize) {
        debug_assert!(size < BLOCK_SIZE, "node header field {offset} = {size}");
        #[expect(
            clippy::cast_possible_truncation,
            reason = "sizes within one block are below BLOCK_SIZE (4096)"
        )]
        write_u32(self.b, offset, size as u32);
    }
    #[inline]
    fn set_key(&mut self, i: usize, k: u64) {
        write_u64(self.b, HEADER + 8 * i, k);
    }
    #[inline]
    fn set_value(&mut self, i: usize, v: &[u8]) {
        let off = self.view().value_offset(i);
        self.b[off..off + v.len()].copy_from_slice(v);
    }
    fn insert_at(&mut self, i: usize, k: u64, v: &[u8]) {
        let n = self.view().nr_entries();
        let vs = self.view().value_size();
        let max = self.view().max_entries();
        self.b
            .copy_within(HEADER + 8 * i..HEADER + 8 * n, HEADER + 8 * (i + 1));
        let vbase = HEADER + 8 * max;
        self.b
            .copy_within(vbase + vs * i..vbase + vs * n, vbase + vs * (i + 1));
        self.set_key(i, k);
        self.set_value(i, v);
        self.set_nr_entries(n + 1);
    }
    fn remove_at(&mut self, i: usize) {
        let n = self.view().nr_entries();
        let vs = self.view().value_size();
        let max = self.view().max_entries();
        self.b
            .copy_within(HEADER + 8 * (i + 1)..HEADER + 8 * n, HEADER + 8 * i);
        let vbase = HEADER + 8 * max;
        self.b
            .copy_within(vbase + vs * (i + 1)..vbase + vs * n, vbase + vs * i);
        // Keep unused slots zero: they are covered by the checksum and tools compare them.
        self.set_key(n - 1, 0);
        let off = vbase + vs * (n - 1);
        self.b[off..off + vs].fill(0);
        self.set_nr_entries(n - 1);
    }
}

/// Entries copied out of a node, used when entries move between nodes.
fn take_entries(node: Node<'_>, from: usize, to: usize) -> (Vec<u64>, Vec<u8>) {
    let keys = (from..to).map(|i| node.key(i)).collect();
    let mut values = Vec::with_capacity((to - from) * node.value_size());
    for i in from..to {
        values.extend_from_slice(node.value(i));
    }
    (keys, values)
}

fn write_entries(block: &mut [u8], flags: u32, value_size: usize, keys: &[u64], values: &[u8]) {
    let mut node = NodeMut { b: block };
    node.init(flags, value_size);
    for (i, k) in keys.iter().enumerate() {
        node.set_key(i, *k);
        node.set_value(i, &values[i * value_size..(i + 1) * value_size]);
    }
    node.set_nr_entries(keys.len());
}

/// Reads a node and checks its structure.
pub fn read_node<V: ValueType>(
    tm: &TransactionManager,
    b: u64,
    _: V,
) -> Result<super::tm::BlockRef<'_>> {
    let block = tm.read_checked(b, BlockKind::Node, &|blk| {
        Node::new(&blk[..]).validate_keys(b)
    })?;
    Node::new(&block[..]).validate_header(b, V::SIZE)?;
    Ok(block)
}

/// Looks up `key`; returns a copy of its value.
pub fn lookup<V: ValueType>(
    tm: &TransactionManager,
    root: u64,
    key: u64,
    kind: V,
) -> Result<Option<[u8; MAX_VALUE_SIZE]>> {
    let mut b = root;
    for _ in 0..=MAX_DEPTH {
        let block = read_node(tm, b, kind)?;
        let node = Node::new(&block[..]);
        if node.is_leaf() {
            return Ok(match node.search(key) {
                (i, true) => Some(copy_value::<V>(node.value(i))),
                _ => None,
            });
        }
        if node.nr_entries() == 0 {
            return Ok(None);
        }
        b = node.value_u64(node.child_index(key));
    }
    check_depth(MAX_DEPTH + 1, b).map(|_| None)
}

pub fn lookup_u64<V: ValueType>(
    tm: &TransactionManager,
    root: u64,
    key: u64,
    kind: V,
) -> Result<Option<u64>> {
    Ok(lookup(tm, root, key, kind)?.map(|v| read_u64(&v, 0)))
}

/// Shadows a node; if it was shared, takes references on everything it points at.
fn shadow_node<V: ValueType>(tm: &mut TransactionManager, b: u64, kind: V) -> Result<u64> {
    // Validate before copying: a shadow must never spread a damaged node.
    drop(read_node(tm, b, kind)?);
    let (nb, was_shared) = tm.shadow(b, BlockKind::Node)?;
    if was_shared {
        let block = tm.read(nb, BlockKind::Node)?;
        let node = Node::new(&block[..]);
        let (keys, values) = take_entries(node, 0, node.nr_entries());
        let leaf = node.is_leaf();
        drop(block);
        for i in 0..keys.len() {
            if leaf {
                kind.inc(tm, &values[i * V::SIZE..(i + 1) * V::SIZE])?;
            } else {
                tm.meta_sm.inc(read_u64(&values, i * 8))?;
            }
        }
    }
    Ok(nb)
}

fn node_mut(tm: &mut TransactionManager, b: u64) -> Result<NodeMut<'_>> {
    Ok(NodeMut {
        b: &mut tm.get_mut(b)?[..],
    })
}

/// An empty tree: one leaf with no entries.
pub fn empty_tree<V: ValueType>(tm: &mut TransactionManager, _: V) -> Result<u64> {
    let b = tm.new_block(BlockKind::Node)?;
    node_mut(tm, b)?.init(LEAF_NODE, V::SIZE);
    Ok(b)
}

enum Inserted {
    One(u64),
    Split {
        left: u64,
        right: u64,
        right_key: u64,
    },
}

/// Inserts or replaces `key`. Returns the new root and the replaced value, if any. The caller
/// owns the reference the old value held (drop it with `kind.dec` unless it is carried over).
pub fn insert<V: ValueType>(
    tm: &mut TransactionManager,
    root: u64,
    key: u64,
    value: &[u8],
    kind: V,
) -> Result<(u64, Option<[u8; MAX_VALUE_SIZE]>)> {
    debug_assert_eq!(value.len(), V::SIZE);
    let mut old = None;
    match insert_rec(tm, root, key, value, kind, &mut old, 0)? {
        Inserted::One(b) => Ok((b, old)),
        Inserted::Split {
            left,
            right,
            right_key,
        } => {
            let left_key = Node::new(&tm.read(left, BlockKind::Node)?[..]).key(0);
            let new_root = tm.new_block(BlockKind::Node)?;
            let mut values = Vec::with_capacity(16);
            values.extend_from_slice(&left.to_le_bytes());
            values.extend_from_slice(&right.to_le_bytes());
            write_entries(
                &mut tm.get_mut(new_root)?[..],
                INTERNAL_NODE,
                8,
                &[left_key, right_key],
                &values,
            );
            Ok((new_root, old))
        }
    }
}

fn insert_rec<V: ValueType>(
    tm: &mut TransactionManager,
    b: u64,
    key: u64,
    value: &[u8],
    kind: V,
    old: &mut Option<[u8; MAX_VALUE_SIZE]>,
    depth: usize,
) -> Result<Inserted> {
    check_depth(depth, b)?;
    let nb = shadow_node(tm, b, kind)?;
    let (leaf, pos, found, child) = {
        let node = node_mut(tm, nb)?;
        let view = node.view();
        if view.is_leaf() {
            let (i, found) = view.search(key);
            (true, i, found, 0)
        } else {
            let i = view.child_index(key);
            (false, i, false, view.value_u64(i))
        }
    };
    if leaf {
        let mut node = node_mut(tm, nb)?;
        if found {
            *old = Some(copy_value::<V>(node.view().value(pos)));
            node.set_value(pos, value);
            return Ok(Inserted::One(nb));
        }
        return insert_entry(tm, nb, pos, key, value);
    }
    let sub = insert_rec(tm, child, key, value, kind, old, depth + 1)?;
    let mut node = node_mut(tm, nb)?;
    if key < node.view().key(pos) {
        node.set_key(pos, key);
    }
    match sub {
        Inserted::One(c) => {
            node.set_value(pos, &c.to_le_bytes());
            Ok(Inserted::One(nb))
        }
        Inserted::Split {
            left,
            right,
            right_key,
        } => {
            node.set_value(pos, &left.to_le_bytes());
            insert_entry(tm, nb, pos + 1, right_key, &right.to_le_bytes())
        }
    }
}

/// Inserts an entry into an exclusive node, splitting it in two when full.
fn insert_entry(
    tm: &mut TransactionManager,
    nb: u64,
    pos: usize,
    key: u64,
    value: &[u8],
) -> Result<Inserted> {
    let (n, max, flags, vs) = {
        let v = node_mut(tm, nb)?;
        let view = v.view();
        (
            view.nr_entries(),
            view.max_entries(),
            view.flags(),
            view.value_size(),
        )
    };
    if n < max {
        node_mut(tm, nb)?.insert_at(pos, key, value);
        return Ok(Inserted::One(nb));
    }
    let mid = n / 2;
    let (rkeys, rvalues) = take_entries(node_mut(tm, nb)?.view(), mid, n);
    let (lkeys, lvalues) = take_entries(node_mut(tm, nb)?.view(), 0, mid);
    let right = tm.new_block(BlockKind::Node)?;
    write_entries(&mut tm.get_mut(nb)?[..], flags, vs, &lkeys, &lvalues);
    write_entries(&mut tm.get_mut(right)?[..], flags, vs, &rkeys, &rvalues);
    if pos <= mid {
        node_mut(tm, nb)?.insert_at(pos, key, value);
    } else {
        node_mut(tm, right)?.insert_at(pos - mid, key, value);
    }
    let right_key = node_mut(tm, right)?.view().key(0);
    Ok(Inserted::Split {
        left: nb,
        right,
        right_key,
    })
}

/// Removes `key`. Returns the new root and the removed value (whose reference the caller now
/// owns), or the unchanged root and None when the key is absent.
pub fn remove<V: ValueType>(
    tm: &mut TransactionManager,
    root: u64,
    key: u64,
    kind: V,
) -> Result<(u64, Option<[u8; MAX_VALUE_SIZE]>)> {
    if lookup(tm, root, key, kind)?.is_none() {
        return Ok((root, None));
    }
    let (mut new_root, removed) = remove_rec(tm, root, key, kind, 0)?;
    // An internal root with a single child gives way to the child.
    loop {
        let (leaf, n, only_child) = {
            let block = tm.read(new_root, BlockKind::Node)?;
            let node = Node::new(&block[..]);
            (
                node.is_leaf(),
                node.nr_entries(),
                if node.is_leaf() { 0 } else { node.value_u64(0) },
            )
        };
        if leaf || n != 1 {
            break;
        }
        // new_root is exclusive here (it was shadowed), so its one reference moves to the child.
        tm.meta_sm.dec(new_root)?;
        new_root = only_child;
    }
    Ok((new_root, Some(removed)))
}

fn remove_rec<V: ValueType>(
    tm: &mut TransactionManager,
    b: u64,
    key: u64,
    kind: V,
    depth: usize,
) -> Result<(u64, [u8; MAX_VALUE_SIZE])> {
    check_depth(depth, b)?;
    let nb = shadow_node(tm, b, kind)?;
    let (leaf, pos, child) = {
        let node = node_mut(tm, nb)?;
        let view = node.view();
        if view.is_leaf() {
            let (i, found) = view.search(key);
            if !found {
                return Err(Error::corrupt(format!(
                    "key {key} vanished from btree node {nb}"
                )));
            }
            (true, i, 0)
        } else {
            let i = view.child_index(key);
            (false, i, view.value_u64(i))
        }
    };
    if leaf {
        let mut node = node_mut(tm, nb)?;
        let removed = copy_value::<V>(node.view().value(pos));
        node.remove_at(pos);
        return Ok((nb, removed));
    }
    let (new_child, removed) = remove_rec(tm, child, key, kind, depth + 1)?;
    node_mut(tm, nb)?.set_value(pos, &new_child.to_le_bytes());
    let underfull = {
        let block = tm.read(new_child, BlockKind::Node)?;
        let c = Node::new(&block[..]);
        c.nr_entries() < c.max_entries() / 3
    };
    if underfull {
        rebalance(tm, nb, pos, kind)?;
    }
    Ok((nb, removed))
}

/// Merges child `pos` of the exclusive node `parent` with a sibling, or evens out their entries.
fn rebalance<V: ValueType>(
    tm: &mut TransactionManager,
    parent: u64,
    pos: usize,
    kind: V,
) -> Result<()> {
    let n = node_mut(tm, parent)?.view().nr_entries();
    if n < 2 {
        return Ok(());
    }
    let (li, ri) = if pos + 1 < n {
        (pos, pos + 1)
    } else {
        (pos - 1, pos)
    };
    let (left_old, right_old) = {
        let p = node_mut(tm, parent)?;
        (p.view().value_u64(li), p.view().value_u64(ri))
    };
    let left = shadow_node(tm, left_old, kind)?;
    let right = shadow_node(tm, right_old, kind)?;
    let (flags, vs, max) = {
        let block = tm.read(left, BlockKind::Node)?;
        let v = Node::new(&block[..]);
        (v.flags(), v.value_size(), v.max_entries())
    };
    let (mut keys, mut values) =
        take_entries(Node::new(&tm.read(left, BlockKind::Node)?[..]), 0, {
            Node::new(&tm.read(left, BlockKind::Node)?[..]).nr_entries()
        });
    {
        let block = tm.read(right, BlockKind::Node)?;
        let r = Node::new(&block[..]);
        let (rk, rv) = take_entries(r, 0, r.nr_entries());
        keys.extend(rk);
        values.extend(rv);
    }
    if keys.len() <= max {
        write_entries(&mut tm.get_mut(left)?[..], flags, vs, &keys, &values);
        let mut p = node_mut(tm, parent)?;
        p.set_value(li, &left.to_le_bytes());
        p.remove_at(ri);
        // The merged-away node's children now belong to `left`: free the block alone.
        tm.meta_sm.dec(right)?;
    } else {
        let half = keys.len() / 2;
        write_entries(
            &mut tm.get_mut(left)?[..],
            flags,
            vs,
            &keys[..half],
            &values[..half * vs],
        );
        write_entries(
            &mut tm.get_mut(right)?[..],
            flags,
            vs,
            &keys[half..],
            &values[half * vs..],
        );
        let mut p = node_mut(tm, parent)?;
        p.set_value(li, &left.to_le_bytes());
        p.set_value(ri, &right.to_le_bytes());
        p.set_key(ri, keys[half]);
    }
    Ok(())
}

/// Visits entries with `begin <= key < end` in key order; the visitor returns false to stop.
pub fn iterate<V: ValueType>(
    tm: &TransactionManager,
    root: u64,
    kind: V,
    begin: u64,
    end: u64,
    visit: &mut dyn FnMut(u64, &[u8]) -> Result<bool>,
) -> Result<bool> {
    iterate_at(tm, root, kind, begin, end, visit, 0)
}

fn iterate_at<V: ValueType>(
    tm: &TransactionManager,
    root: u64,
    kind: V,
    begin: u64,
    end: u64,
    visit: &mut dyn FnMut(u64, &[u8]) -> Result<bool>,
    depth: usize,
) -> Result<bool> {
    check_depth(depth, root)?;
    let block = read_node(tm, root, kind)?;
    let node = Node::new(&block[..]);
    let n = node.nr_entries();
    if node.is_leaf() {
        let (start, _) = node.search(begin);
        for i in start..n {
            let k = node.key(i);
            if k >= end {
                return Ok(false);
            }
            if !visit(k, node.value(i))? {
                return Ok(false);
            }
        }
        return Ok(true);
    }
    let first = node.child_index(begin);
    for i in first..n {
        if node.key(i) >= end && i > first {
            return Ok(false);
        }
        if !iterate_at(tm, node.value_u64(i), kind, begin, end, visit, depth + 1)? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Every entry of a tree, in order (small trees and tools).
pub fn entries<V: ValueType>(
    tm: &TransactionManager,
    root: u64,
    kind: V,
) -> Result<Vec<(u64, Vec<u8>)>> {
    let mut out = Vec::new();
    iterate(tm, root, kind, 0, u64::MAX, &mut |k, v| {
        out.push((k, v.to_vec()));
        Ok(true)
    })?;
    Ok(out)
}

/// Builds a tree from sorted keys in one pass: leaves of near-equal size, then internal levels.
/// Metadata blocks `bulk_build` takes for `entries` values of `value_size` bytes.
pub fn bulk_build_blocks(entries: u64, value_size: usize) -> u64 {
    let mut nodes = entries.div_ceil(max_entries(value_size) as u64).max(1);
    let mut total = nodes;
    while nodes > 1 {
        nodes = nodes.div_ceil(max_entries(8) as u64);
        total += nodes;
    }
    total
}

pub fn bulk_build<V: ValueType>(
    tm: &mut TransactionManager,
    kind: V,
    keys: &[u64],
    values: &[u8],
) -> Result<u64> {
    let vs = V::SIZE;
    if keys.is_empty() {
        return empty_tree(tm, kind);
    }
    let mut level = build_level(tm, LEAF_NODE, vs, keys, values)?;
    while level.len() > 1 {
        let keys: Vec<u64> = level.iter().map(|e| e.0).collect();
        let values: Vec<u8> = level.iter().flat_map(|e| e.1.to_le_bytes()).collect();
        level = build_level(tm, INTERNAL_NODE, 8, &keys, &values)?;
    }
    Ok(level[0].1)
}

fn build_level(
    tm: &mut TransactionManager,
    flags: u32,
    vs: usize,
    keys: &[u64],
    values: &[u8],
) -> Result<Vec<(u64, u64)>> {
    let max = max_entries(vs);
    let n = keys.len();
    let nodes = n.div_ceil(max);
    let mut out = Vec::with_capacity(nodes);
    let mut start = 0;
    for i in 0..nodes {
        let end = n * (i + 1) / nodes;
        let b = tm.new_block(BlockKind::Node)?;
        write_entries(
            &mut tm.get_mut(b)?[..],
            flags,
            vs,
            &keys[start..end],
            &values[start * vs..end * vs],
        );
        out.push((keys[start], b));
        start = end;
    }
    Ok(out)
}

/// Releases a tree's own blocks that nobody else references (space map trees, which are never
/// shared); values are not followed.
pub fn free_tree(tm: &mut TransactionManager, root: u64) -> Result<()> {
    free_tree_at(tm, root, 0)
}

fn free_tree_at(tm: &mut TransactionManager, root: u64, depth: usize) -> Result<()> {
    check_depth(depth, root)?;
    let children = {
        let block = tm.read(root, BlockKind::Node)?;
        let node = Node::new(&block[..]);
        if node.is_leaf() {
            Vec::new()
        } else {
            (0..node.nr_entries()).map(|i| node.value_u64(i)).collect()
        }
    };
    for c in children {
        free_tree_at(tm, c, depth + 1)?;
    }
    tm.meta_sm.dec(root)?;
    Ok(())
}

/// Drops one reference to a tree; nodes that reach zero release their children and values.
pub fn delete_tree<V: ValueType>(tm: &mut TransactionManager, root: u64, kind: V) -> Result<()> {
    delete_tree_at(tm, root, kind, 0)
}

fn delete_tree_at<V: ValueType>(
    tm: &mut TransactionManager,
    root: u64,
    kind: V,
    depth: usize,
) -> Result<()> {
    check_depth(depth, root)?;
    let (leaf, values) = {
        let block = read_node(tm, root, kind)?;
        let node = Node::new(&block[..]);
        let (_, values) = take_entries(node, 0, node.nr_entries());
        (node.is_leaf(), values)
    };
    if tm.meta_sm.dec(root)? > 0 {
        return Ok(());
    }
    if leaf {
        for v in values.chunks(V::SIZE) {
            kind.dec(tm, v)?;
        }
    } else {
        for v in values.chunks(8) {
            delete_tree_at(tm, read_u64(v, 0), kind, depth + 1)?;
        }
    }
    Ok(())
}

/// Calls `visit` on every node block of a tree (each node once per reference path).
pub fn walk_nodes<V: ValueType>(
    tm: &TransactionManager,
    root: u64,
    kind: V,
    visit: &mut dyn FnMut(u64, Node<'_>) -> Result<()>,
) -> Result<()> {
    walk_nodes_at(tm, root, kind, visit, 0)
}

fn walk_nodes_at<V: ValueType>(
    tm: &TransactionManager,
    root: u64,
    kind: V,
    visit: &mut dyn FnMut(u64, Node<'_>) -> Result<()>,
    depth: usize,
) -> Result<()> {
    check_depth(depth, root)?;
    let block = read_node(tm, root, kind)?;
    let node = Node::new(&block[..]);
    visit(root, node)?;
    if !node.is_leaf() {
        for i in 0..node.nr_entries() {
            walk_nodes_at(tm, node.value_u64(i), kind, visit, depth + 1)?;
        }
    }
    Ok(())
}
