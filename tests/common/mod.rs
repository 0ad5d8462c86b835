//! Helpers shared by the integration tests, one module per subject. Each test crate includes
//! the whole folder with `mod common;` and uses what it needs.
#![allow(dead_code)]

pub mod ceph;
pub mod docs;
pub mod load;
pub mod memory_server;
pub mod metadata;
pub mod model;
pub mod nbd_client;
pub mod nbdkit;
pub mod nbdsh;
pub mod pattern;
pub mod pool;
pub mod power;
pub mod process;
pub mod qemu;
pub mod server;
pub mod small_fs;
pub mod tls;
pub mod tools;

// The helpers most test crates use, by their short names.
#[allow(unused_imports)]
pub use metadata::{assert_metadata_clean, thin_dump_mappings};
#[allow(unused_imports)]
pub use tools::{in_ci, require_tool, require_tools};
