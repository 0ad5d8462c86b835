//! The thin I/O engine: data device, bio prison, deferred-bio worker, active thins.
//!
//! Threads: callers (the NBD server's blocking threads) run reads and overwrites of provisioned,
//! unshared blocks themselves, under a read lock on the metadata for the lookup and no lock at
//! all around the data I/O. Writes that must provision or break sharing lock their virtual block
//! in the [`prison`]; when no cell is free at once they go to their thin's deferred list, which
//! one pool worker thread drains (see [`pool`]). Flushes are group commits: concurrent flushes
//! share one `fdatasync` of the data device plus one metadata commit.

#![deny(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

pub mod active;
pub mod data;
mod epochs;
mod mapcache;
pub mod pool;
pub mod prison;
mod thin_device;

pub use data::{DataDevice, DataFaults, DataTap};
pub use pool::{
    EngineConfig, EngineEvent, NoSpacePolicy, Pool, PoolMode, PoolStatus, ThinStatus,
    DEFAULT_CELL_POOL_SIZE, DEFAULT_MAPPING_CACHE_SLOTS, DEFAULT_QUEUE_TIMEOUT,
};
pub use thin_device::{ThinHandle, NOWAIT_WRITE_MAX};
