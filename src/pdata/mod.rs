//! Persistent data: block I/O, checksums, the transaction manager with its block cache, space
//! maps and B-trees. Nothing here knows about thin devices: what a tree's values reference is
//! told by its [`btree::ValueType`], which the thin layer implements for its own values.
//!
//! Modules by responsibility, top down; each imports only modules below it in this list, so
//! there is no import cycle:
//!
//! ```text
//! sm_disk     the space maps' on-disk form: roots, bitmaps, index and ref-count trees
//! btree       B-trees shadowed through the transaction manager; value types
//! tm          TransactionManager: shadowing, block cache, both space maps, flush
//! space_map   in-core reference counts
//! checksum    block kinds, checksums, little-endian fields
//! mem_block_io  an in-memory metadata device with power cuts (tests only)
//! block_io    the metadata device
//! ```

pub mod block_io;
pub mod btree;
pub mod checksum;
#[cfg(any(test, feature = "testing"))]
pub mod mem_block_io;
pub mod sm_disk;
pub mod space_map;
pub mod tm;
