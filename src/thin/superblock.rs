//! The thin-pool superblock (metadata block 0) and the metadata-snapshot copy of it.

use super::super::pdata::block_io::{zeroed_block, Block, BlockIo};
use crate::error::{Error, ErrorKind, Result};
use crate::pdata::checksum::{read_u32, read_u64, verify, write_u32, write_u64, BlockKind};
use crate::pdata::sm_disk::SmRoot;

pub const THIN_MAGIC: u64 = 27_022_010;
pub const SUPERBLOCK_LOCATION: u64 = 0;
pub const METADATA_BLOCK_SECTORS: u32 = 8;
pub const NEEDS_CHECK_FLAG: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Superblock {
    pub flags: u32,
    pub uuid: [u8; 16],
    pub version: u32,
    pub time: u32,
    pub transaction_id: u64,
    pub metadata_snap: u64,
    pub data_sm_root: SmRoot,
    pub metadata_sm_root: SmRoot,
    pub mapping_root: u64,
    pub details_root: u64,
    pub data_block_size: u32,
    pub metadata_nr_blocks: u64,
}

impl Superblock {
    pub fn encode(&self) -> Box<Block> {
        let mut b = zeroed_block();
        write_u32(&mut b[..], 4, self.flags);
        b[16..32].copy_from_slice(&self.uuid);
        write_u64(&mut b[..], 32, THIN_MAGIC);
        write_u32(&mut b[..], 40, self.version);
        write_u32(&mut b[..], 44, self.time);
        write_u64(&mut b[..], 48, self.transaction_id);
        write_u64(&mut b[..], 56, self.metadata_snap);
        self.data_sm_root.encode(&mut b[64..96]);
        self.metadata_sm_root.encode(&mut b[192..224]);
        write_u64(&mut b[..], 320, self.mapping_root);
        write_u64(&mut b[..], 328, self.details_root);
        write_u32(&mut b[..], 336, self.data_block_size);
        write_u32(&mut b[..], 340, METADATA_BLOCK_SECTORS);
        write_u64(&mut b[..], 344, self.metadata_nr_blocks);
        b
    }

    /// Decodes a superblock whose checksum and location were already verified.
    pub fn decode(b: &Block) -> Result<Self> {
        let magic = read_u64(b, 32);
        if magic != THIN_MAGIC {
            return Err(Error::corrupt(format!(
                "superblock: bad magic {magic} (want {THIN_MAGIC})"
            )));
        }
        let incompat = read_u32(b, 360);
        let compat_ro = read_u32(b, 356);
        if incompat != 0 || compat_ro != 0 {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("superblock: unsupported feature flags (incompat {incompat:#x}, compat_ro {compat_ro:#x})"),
            ));
        }
        let version = read_u32(b, 40);
        if !(1..=2).contains(&version) {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("superblock: version {version}"),
            ));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[16..32]);
        Ok(Superblock {
            flags: read_u32(b, 4),
            uuid,
            version,
            time: read_u32(b, 44),
            transaction_id: read_u64(b, 48),
            metadata_snap: read_u64(b, 56),
            data_sm_root: SmRoot::decode(&b[64..96]),
            metadata_sm_root: SmRoot::decode(&b[192..224]),
            mapping_root: read_u64(b, 320),
            details_root: read_u64(b, 328),
            data_block_size: read_u32(b, 336),
            metadata_nr_blocks: read_u64(b, 344),
        })
    }
}

/// The superblock of a metadata device when block 0 holds a valid one (checksum, location,
/// magic, version): what a restore must not overwrite unasked.
pub fn read_valid(io: &dyn BlockIo) -> Option<Superblock> {
    let block = io.read_block(SUPERBLOCK_LOCATION).ok()?;
    verify(&block, BlockKind::Superblock, SUPERBLOCK_LOCATION).ok()?;
    Superblock::decode(&block).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn superblock_round_trip() {
        let sb = Superblock {
            version: 2,
            time: 3,
            transaction_id: 9,
            mapping_root: 7,
            details_root: 6,
            data_block_size: 128,
            metadata_nr_blocks: 1024,
            data_sm_root: SmRoot {
                nr_blocks: 1024,
                nr_allocated: 611,
                bitmap_root: 4,
                ref_count_root: 5,
            },
            ..Default::default()
        };
        let b = sb.encode();
        assert_eq!(&b[0x20..0x28], &[0xba, 0x52, 0x9c, 0x01, 0, 0, 0, 0]);
        assert_eq!(b[0x150], 0x80);
        assert_eq!(Superblock::decode(&b).unwrap(), sb);
    }
}
