//! Damage generator for tests of the checker and of the metadata reader: flips bytes in
//! metadata blocks of an in-memory image, either leaving the checksum stale (what a torn or
//! rotted block looks like) or resealing it (a wrong value that only structure checks catch).

use crate::pdata::block_io::{Block, BLOCK_SIZE};
use crate::pdata::checksum::{seal, BlockKind};

use super::metadata::ThinMetadata;

/// The block kind whose salt matches the stored checksum, if any.
pub fn block_kind(block: &Block) -> Option<BlockKind> {
    BlockKind::identify(block)
}

/// Metadata blocks the pool's space map counts as in use (the committed state).
pub fn used_metadata_blocks(md: &ThinMetadata) -> Vec<u64> {
    let sm = &md.tm().meta_sm;
    (0..sm.nr_blocks())
        .filter(|&b| sm.get(b).unwrap_or(0) > 0)
        .collect()
}

/// One byte changed in one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flip {
    pub block: u64,
    pub offset: usize,
    /// XOR mask; a zero mask is turned into 0xff so that the byte always changes.
    pub mask: u8,
    /// Recompute the checksum (with the block's own kind) after the change.
    pub reseal: bool,
}

/// Applies a flip to a whole-device image. Returns false when the block or offset is outside the
/// image (nothing changed).
pub fn apply(image: &mut [u8], flip: Flip) -> bool {
    let Some(start) = usize::try_from(flip.block)
        .ok()
        .and_then(|b| b.checked_mul(BLOCK_SIZE))
    else {
        return false;
    };
    let Some(chunk) = image.get_mut(start..start.saturating_add(BLOCK_SIZE)) else {
        return false;
    };
    let Ok(block) = <&mut Block>::try_from(chunk) else {
        return false;
    };
    if flip.offset >= BLOCK_SIZE {
        return false;
    }
    let kind = block_kind(block);
    block[flip.offset] ^= if flip.mask == 0 { 0xff } else { flip.mask };
    if flip.reseal {
        if let Some(kind) = kind {
            seal(block, kind, flip.block);
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pdata::checksum::verify;

    #[test]
    fn reseal_keeps_the_checksum_valid_and_plain_flips_break_it() {
        let mut image = vec![0u8; 2 * BLOCK_SIZE];
        let mut b = [0u8; BLOCK_SIZE];
        seal(&mut b, BlockKind::Node, 1);
        image[BLOCK_SIZE..].copy_from_slice(&b);
        assert!(apply(
            &mut image,
            Flip {
                block: 1,
                offset: 100,
                mask: 4,
                reseal: true
            }
        ));
        let got: &Block = image[BLOCK_SIZE..].try_into().unwrap();
        verify(got, BlockKind::Node, 1).unwrap();
        assert_eq!(got[100], 4);
        assert!(apply(
            &mut image,
            Flip {
                block: 1,
                offset: 100,
                mask: 0,
                reseal: false
            }
        ));
        let got: &Block = image[BLOCK_SIZE..].try_into().unwrap();
        assert!(verify(got, BlockKind::Node, 1).is_err());
        assert!(!apply(
            &mut image,
            Flip {
                block: 2,
                offset: 0,
                mask: 1,
                reseal: false
            }
        ));
    }
}
