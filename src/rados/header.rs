//! The pool header, `NAME.pool`: what a pool is (block size, data size, metadata size), kept
//! as a small JSON object so `rados get` shows it. Metadata has its own superblock; the header
//! says how big the devices under it are, which RADOS cannot tell.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{Cluster, PoolObjects, RadosLocation};
use crate::error::{Error, ErrorKind, Result};

/// The header format this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// The contents of `NAME.pool`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolHeader {
    pub format_version: u32,
    /// Bytes per data block (one `NAME.data.*` object each).
    pub block_size: u64,
    /// Bytes of data the pool may map.
    pub data_size: u64,
    /// 4 KiB metadata blocks.
    pub metadata_blocks: u64,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
}

/// Seconds since the Unix epoch, as the header and the owner record keep time.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl PoolHeader {
    /// A header for a pool created now.
    pub fn new(block_size: u64, data_size: u64, metadata_blocks: u64) -> Self {
        PoolHeader {
            format_version: FORMAT_VERSION,
            block_size,
            data_size,
            metadata_blocks,
            created_at: unix_now(),
        }
    }

    /// The header of the pool at `loc`; `None` when there is no such pool (yet).
    pub fn read(cluster: &Cluster, loc: &RadosLocation) -> Result<Option<PoolHeader>> {
        let oid = PoolObjects::new(loc).header();
        // Empty: a creator has locked the pool (the lock makes the object) and not yet
        // written the header.
        let Some(bytes) = cluster.read_object(&oid)?.filter(|b| !b.is_empty()) else {
            return Ok(None);
        };
        let header: PoolHeader = serde_json::from_slice(&bytes)
            .map_err(|e| Error::corrupt(format!("the header {oid} of {loc}: {e}")))?;
        if header.format_version != FORMAT_VERSION {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "{loc}: header format {} (this build knows {FORMAT_VERSION})",
                    header.format_version
                ),
            ));
        }
        Ok(Some(header))
    }

    /// Replaces the header of the pool at `loc` (one atomic write).
    pub fn write(&self, cluster: &Cluster, loc: &RadosLocation) -> Result<()> {
        let mut bytes = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::new(ErrorKind::Io, format!("encoding the header: {e}")))?;
        bytes.push(b'\n');
        cluster.write_object_atomically(&PoolObjects::new(loc).header(), &bytes)
    }
}
