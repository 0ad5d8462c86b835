//! The values of the thin metadata's btrees and the references they hold: a mapping leaf's
//! block_time references a data block in the data space map; a top-level mapping leaf is the
//! root of a device's mapping tree, referenced in the metadata space map; device details
//! reference nothing.

use crate::error::Result;
use crate::pdata::btree::{self, Plain, ValueType};
use crate::pdata::checksum::read_u64;
use crate::pdata::tm::TransactionManager;

/// Packs a mapping value: 40-bit data block, 24-bit time.
pub fn pack_block_time(data_block: u64, time: u32) -> u64 {
    (data_block << 24) | u64::from(time & 0xff_ffff)
}

pub fn unpack_block_time(v: u64) -> (u64, u32) {
    (v >> 24, (v & 0xff_ffff) as u32)
}

/// A device's mapping tree values (virtual block -> block_time).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BlockTime;

impl ValueType for BlockTime {
    const SIZE: usize = 8;

    fn inc(self, tm: &mut TransactionManager, value: &[u8]) -> Result<()> {
        let (data_block, _) = unpack_block_time(read_u64(value, 0));
        tm.data_sm.inc(data_block)
    }

    fn dec(self, tm: &mut TransactionManager, value: &[u8]) -> Result<()> {
        let (data_block, _) = unpack_block_time(read_u64(value, 0));
        tm.data_sm.dec(data_block).map(drop)
    }
}

/// The top-level mapping tree values (device id -> root of its mapping tree). Dropping the
/// last reference to a device's tree releases the tree and the data blocks it maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeviceRoot;

impl ValueType for DeviceRoot {
    const SIZE: usize = 8;

    fn inc(self, tm: &mut TransactionManager, value: &[u8]) -> Result<()> {
        tm.meta_sm.inc(read_u64(value, 0))
    }

    fn dec(self, tm: &mut TransactionManager, value: &[u8]) -> Result<()> {
        btree::delete_tree(tm, read_u64(value, 0), BlockTime)
    }
}

/// Bytes of an encoded [`DeviceDetails`](super::DeviceDetails).
pub const DEVICE_DETAILS_SIZE: usize = 24;
/// The details tree values (device id -> details).
pub const DETAILS: Plain<DEVICE_DETAILS_SIZE> = Plain;
