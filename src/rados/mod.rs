//! Pools kept in a Ceph RADOS pool (`rados:POOL/NAME`): the connection to the cluster, the
//! names of a pool's objects, its header, its data store, its metadata device and the lock
//! that makes one process at a time its owner.
//!
//! Every object of pool NAME lives in RADOS pool POOL under the prefix `NAME.`
//! ([`PoolObjects`] spells each name once):
//!
//! ```text
//! NAME.pool                  header (JSON: format, block size, data size, metadata blocks);
//!                            the owner lock is taken on it
//! NAME.volumes               the volume registry, replaced whole by one write_full
//! NAME.owner                 the current owner: client, address, host, pid, since
//! NAME.meta.XXXXXXXX         metadata: 256 dm-thin blocks of 4 KiB per object (1 MiB)
//! NAME.data.XXXXXXXXXXXXXXXX one object per data block; a missing object reads zeros
//! ```
//!
//! Modules by responsibility, top down; each uses only those below it:
//!
//! ```text
//! lock  the owner lock: acquire (waiting or not), renewal, loss, takeover, who owns
//! data, meta, header  the data store, the metadata device, the pool header
//! cluster  librados: connection, object I/O, locks, blocklist, errno to error kinds
//! names  the names of a pool's objects
//! ```

pub mod cluster;
pub mod data;
pub mod header;
pub mod lock;
pub mod meta;
pub mod names;

/// Where a pool lives in Ceph and how to reach the cluster; a plain value of the volume layer
/// (a build without this feature still parses `rados:` locations, to refuse them clearly).
pub use crate::volume::location::RadosLocation;
pub use cluster::Cluster;
pub use data::RadosStore;
pub use header::PoolHeader;
pub use lock::{Owner, OwnerLock, Wait};
pub use meta::RadosBlockIo;
pub use names::PoolObjects;
