//! The thin I/O engine: data store, bio prison, deferred-bio worker, active thins.
//!
//! Threads: callers (the NBD server's blocking threads) run reads and overwrites of provisioned,
//! unshared blocks themselves, under a read lock on the metadata for the lookup and no lock at
//! all around the data I/O. Writes that must provision or break sharing lock their virtual block
//! in the [`prison`]; when no cell is free at once they go to their thin's deferred list, which
//! one pool worker thread drains (see `worker`). Flushes are group commits (`commit`):
//! concurrent flushes share one sync of the data store plus one metadata commit.
//!
//! Modules by responsibility, top down; each imports only modules below it in this list, so
//! there is no import cycle:
//!
//! ```text
//! admin          Pool: create/open, thin administration, grow, status, shutdown
//! worker         the worker thread (deferred bios) and teardown
//! thin_device    ThinHandle: a volume's I/O (reads, overwrites, no-space policy, discard)
//! provision      provisioning and copy-on-write, blocking and non-blocking
//! state          PoolState: metadata lock and fail-stop, space, allocation, commit
//! commit         group commit
//! active_thin    Thin (quiesce gate, deferred list) and Bio
//! active, prison, epochs, mapcache
//! testing        fault injection and the event log (tests only)
//! pool           settings (EngineConfig) and the status report
//! data           the DataStore trait and its backends (data/file.rs)
//! ```
//!
//! Lock order (outer first): admin mutex -> a thin's quiesce gate -> prison cell (held as a
//! token, not a lock) -> metadata lock -> small leaf mutexes (deferred lists, counters). The
//! admin mutex serialises create/snapshot/delete/activate/teardown and is never taken by the
//! worker or the I/O paths, so teardown may hold it while it waits. Apart from that, nobody
//! holds the metadata lock or any mutex while blocking on the cell pool, on a completion, or on
//! a teardown; the worker holds only counted thin references ([`active::Ref`]) while it blocks.
//!
//! Fail-stop: every fallible metadata operation runs through a metadata guard's `run` (see
//! `state`), which turns the pool read-only on the first checksum or I/O failure.

pub mod active;
mod active_thin;
mod admin;
mod commit;
pub mod data;
mod epochs;
mod mapcache;
pub mod pool;
pub mod prison;
mod provision;
mod state;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
mod thin_device;
mod worker;

pub use admin::Pool;
pub use data::{DataStore, FileStore, HostSpace};
pub use pool::{
    EngineConfig, NoSpacePolicy, PoolMode, PoolStatus, ThinStatus, DEFAULT_CELL_POOL_SIZE,
    DEFAULT_MAPPING_CACHE_SLOTS, DEFAULT_QUEUE_TIMEOUT,
};
#[cfg(any(test, feature = "testing"))]
pub use testing::{DataFaults, DataTap, EngineEvent, FaultInjectingStore};
pub use thin_device::{ThinHandle, NOWAIT_WRITE_MAX};
