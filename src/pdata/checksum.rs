//! Block checksums: crc32c over bytes 4..4096, xor a salt that identifies the block type, stored
//! little-endian at offset 0; the block's own location is kept at offset 8.

use super::block_io::{Block, BLOCK_SIZE};
use crate::error::{Error, Result};

/// The kinds of metadata block the thin pool writes, each with its checksum salt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    Superblock,
    Node,
    Bitmap,
    Index,
}

impl BlockKind {
    pub fn salt(self) -> u32 {
        match self {
            BlockKind::Superblock => 160_774,
            BlockKind::Node => 121_107,
            BlockKind::Bitmap => 240_779,
            BlockKind::Index => 160_478,
        }
    }

    /// The kind whose salt makes the stored checksum match, if any (tools on raw blocks).
    pub fn identify(block: &Block) -> Option<BlockKind> {
        let stored = read_u32(block, 0);
        [
            BlockKind::Superblock,
            BlockKind::Node,
            BlockKind::Bitmap,
            BlockKind::Index,
        ]
        .into_iter()
        .find(|&k| checksum(block, k) == stored)
    }

    pub fn name(self) -> &'static str {
        match self {
            BlockKind::Superblock => "superblock",
            BlockKind::Node => "btree node",
            BlockKind::Bitmap => "space map bitmap",
            BlockKind::Index => "space map index",
        }
    }
}

/// dm-thin's checksum: the raw crc32c (no final inversion) xor the salt.
pub fn checksum(block: &Block, kind: BlockKind) -> u32 {
    (crc32c::crc32c(&block[4..BLOCK_SIZE]) ^ 0xffff_ffff) ^ kind.salt()
}

pub fn read_u32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

pub fn read_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

pub fn write_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

pub fn write_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// Sets the self location and the checksum, ready to write at `location`.
pub fn seal(block: &mut Block, kind: BlockKind, location: u64) {
    write_u64(block, 8, location);
    let csum = checksum(block, kind);
    write_u32(block, 0, csum);
}

/// Checks checksum and self location of a block read from `location`.
pub fn verify(block: &Block, kind: BlockKind, location: u64) -> Result<()> {
    let stored = read_u32(block, 0);
    let expected = checksum(block, kind);
    if stored != expected {
        return Err(Error::corrupt(format!(
            "{} at block {location}: bad checksum (stored {stored:#010x}, computed {expected:#010x})",
            kind.name()
        )));
    }
    let own = read_u64(block, 8);
    if own != location {
        return Err(Error::corrupt(format!(
            "{} at block {location}: says it lives at block {own}",
            kind.name()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_crc_matches_the_reference_value() {
        // standard crc32c("123456789") = 0xE3069283; dm-thin uses its inversion.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn seal_then_verify_and_detect_a_flip() {
        let mut b = [0u8; BLOCK_SIZE];
        b[100] = 7;
        seal(&mut b, BlockKind::Node, 42);
        verify(&b, BlockKind::Node, 42).unwrap();
        assert!(verify(&b, BlockKind::Bitmap, 42).is_err());
        assert!(verify(&b, BlockKind::Node, 43).is_err());
        b[4000] ^= 1;
        assert!(verify(&b, BlockKind::Node, 42).is_err());
    }
}
