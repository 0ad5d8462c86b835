//! Persistent data: block I/O, checksums, the transaction manager with its block cache, space
//! maps and B-trees. Nothing here knows about thin devices.

pub mod block_io;
pub mod btree;
pub mod checksum;
#[cfg(any(test, feature = "testing"))]
mod mem_block_io;
pub mod space_map;
pub mod tm;
