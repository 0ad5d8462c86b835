//! Thin-pool metadata: the superblock, devices and their mappings (the dm-thin layout over the
//! persistent-data layer), plus the dump, restore and check tools.

// Sizes and block numbers read from disk must never wrap silently: a lossy cast needs
// `try_from` with an error, or a reason why it cannot lose anything.
#![deny(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

pub mod check;
pub mod damage;
pub mod delta;
pub mod metadata;
pub mod superblock;
pub mod values;
pub mod xml;

pub use metadata::{DeviceDetails, Mapping, MetadataStatus, ThinId, ThinMetadata, Unmapped};
