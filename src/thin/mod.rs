//! Thin-pool metadata: the superblock, devices and their mappings (the dm-thin layout over the
//! persistent-data layer), plus the dump, restore and check tools.

pub mod check;
pub mod damage;
pub mod delta;
pub mod metadata;
pub mod superblock;
pub mod values;
pub mod xml;

pub use metadata::{DeviceDetails, Mapping, MetadataStatus, ThinId, ThinMetadata, Unmapped};
