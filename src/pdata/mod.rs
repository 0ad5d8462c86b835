//! Persistent data: block I/O, checksums, the transaction manager with its block cache, space
//! maps and B-trees. Nothing here knows about thin devices.

// Sizes and block numbers read from disk must never wrap silently: a lossy cast needs
// `try_from` with an error, or a reason why it cannot lose anything.
#![deny(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

pub mod block_io;
pub mod btree;
pub mod checksum;
pub mod space_map;
pub mod tm;
