//! The storage seam of a pool: where its parts live. [`PoolBacking`] is everything the volume
//! layer asks of a location: ownership (one process at a time), the volume registry's bytes,
//! the pool's header with the metadata and data devices it makes (create, open), the metadata
//! device alone (for the checker and the dump), the control socket, and the name to show.
//! [`dir`](mod@dir) is a local pool directory; `rados` a pool stored as RADOS objects.

pub mod dir;
#[cfg(feature = "rados")]
mod rados;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::location::PoolLocation;
use super::registry::RegistryStore;
use super::CreateOptions;
use crate::engine::{EngineConfig, Pool};
use crate::error::{Error, Result};
use crate::pdata::block_io::BlockIo;

/// How long a RADOS owner's lock lasts unrenewed before others presume the owner dead.
pub const DEFAULT_LOCK_DURATION: Duration = Duration::from_secs(30);

/// Called once, from another thread, when a pool's ownership is lost while it is open.
pub type OnLost = Arc<dyn Fn(&Error) + Send + Sync>;

/// How a process takes a pool's ownership.
#[derive(Clone)]
pub struct OwnerPolicy {
    /// Wait while another process owns the pool (a server taking over); else refuse at once
    /// (Busy, naming the owner).
    pub wait: bool,
    /// Told when ownership is lost (a RADOS pool taken over by another host); `None`: it is
    /// only logged. A local directory's lock cannot be lost.
    pub on_lost: Option<OnLost>,
    /// A RADOS lock's duration (`[pool] rados_lock_duration_secs`); renewed every third of it.
    pub lock_duration: Duration,
}

impl Default for OwnerPolicy {
    fn default() -> Self {
        OwnerPolicy {
            wait: false,
            on_lost: None,
            lock_duration: DEFAULT_LOCK_DURATION,
        }
    }
}

/// A pool's ownership, held until dropped.
pub struct Ownership {
    _held: Box<dyn Send + Sync>,
}

impl Ownership {
    fn new(held: impl Send + Sync + 'static) -> Ownership {
        Ownership {
            _held: Box::new(held),
        }
    }
}

/// Where a pool's parts live (see the module doc).
pub trait PoolBacking: Send + Sync {
    /// The location, as the operator names it.
    fn location(&self) -> &PoolLocation;

    /// Whether a pool is there.
    fn exists(&self) -> Result<bool>;

    /// The error for a location that holds no pool, with the command that makes one.
    fn no_pool(&self) -> Error;

    /// Takes the pool's ownership (see [`OwnerPolicy`]).
    fn take_ownership(&self, policy: &OwnerPolicy) -> Result<Ownership>;

    /// Makes an empty pool (ownership taken by the caller): its data store, formatted
    /// metadata and header. A failure leaves the location as it was where it can.
    fn create(&self, opts: &CreateOptions, config: EngineConfig) -> Result<()>;

    /// Opens the pool over its metadata and data (ownership taken by the caller).
    fn open_pool(&self, config: EngineConfig) -> Result<Arc<Pool>>;

    /// Where the volume registry's bytes live.
    fn registry_store(&self) -> Box<dyn RegistryStore>;

    /// The metadata device alone, for the checker, dump and export (`write`: read-write).
    fn metadata(&self, write: bool) -> Result<Arc<dyn BlockIo>>;

    /// Where a server of this pool on this host listens for volume commands.
    fn control_socket(&self) -> PathBuf;

    /// Who owns the pool now, in words (`None`: nobody, or the location cannot tell).
    fn owner(&self) -> Result<Option<String>> {
        Ok(None)
    }

    /// Proves this process still owns the pool, by a round trip that fails (`Fenced`) once
    /// another owner has fenced it off: what a flush acknowledges must not come after a
    /// takeover. A directory's lock cannot be taken away: nothing to prove.
    fn confirm_ownership(&self) -> Result<()> {
        Ok(())
    }

    /// Makes room for the engine to grow the pool's data to `data_bytes` and its metadata to
    /// `metadata_bytes` (never shrinking): what must be recorded before the growth commits.
    /// A file grows with the engine itself: nothing to do.
    fn before_grow(&self, _data_bytes: Option<u64>, _metadata_bytes: Option<u64>) -> Result<()> {
        Ok(())
    }

    /// Breaks another owner's hold so that a waiting process takes the pool at once; returns
    /// who was fenced off.
    fn take_over(&self) -> Result<Vec<String>>;
}

/// The backing of a location: a directory, or RADOS on a build with RADOS support.
pub fn backing(location: &PoolLocation) -> Result<Box<dyn PoolBacking>> {
    match location {
        PoolLocation::Dir(dir) => Ok(Box::new(dir::DirBacking::new(dir))),
        #[cfg(feature = "rados")]
        PoolLocation::Rados(r) => Ok(Box::new(rados::RadosBacking::connect(r)?)),
        #[cfg(not(feature = "rados"))]
        PoolLocation::Rados(_) => Err(Error::new(
            crate::error::ErrorKind::Unsupported,
            format!("{location}: {}", super::location::NO_RADOS_SUPPORT),
        )),
    }
}
