//! A pool kept in a Ceph RADOS pool: the seam's arm over `crate::rados` (the header, registry
//! and owner objects, the metadata and data objects, the owner lock). The header is written
//! last on create, so a pool exists once it has one.

use std::path::PathBuf;
use std::sync::Arc;

use super::{OwnerPolicy, Ownership, PoolBacking};
use crate::engine::data::DataStore;
use crate::engine::{EngineConfig, Pool};
use crate::error::{fail, Error, ErrorKind, Result};
use crate::pdata::block_io::{BlockIo, BLOCK_SIZE};
use crate::rados::{self, Cluster, OwnerLock, PoolHeader, PoolObjects, RadosBlockIo, RadosStore};
use crate::volume::location::{PoolLocation, RadosLocation};
use crate::volume::registry::RegistryStore;
use crate::volume::CreateOptions;

/// The backing of `rados:POOL/NAME`, with its connection to the cluster (shared by the owner
/// lock, the metadata device and the data store, so that losing the lock fences them all).
pub struct RadosBacking {
    location: PoolLocation,
    control_socket: PathBuf,
    rados: RadosLocation,
    cluster: Arc<Cluster>,
}

impl RadosBacking {
    pub fn connect(location: &RadosLocation) -> Result<RadosBacking> {
        Ok(RadosBacking {
            location: PoolLocation::Rados(location.clone()),
            control_socket: location.control_socket(),
            rados: location.clone(),
            cluster: Cluster::connect(location)?,
        })
    }

    fn header(&self) -> Result<PoolHeader> {
        PoolHeader::read(&self.cluster, &self.rados)?.ok_or_else(|| self.no_pool())
    }

    fn block_io(&self, header: &PoolHeader) -> Arc<dyn BlockIo> {
        Arc::new(RadosBlockIo::new(
            self.cluster.clone(),
            &self.rados,
            header.metadata_blocks,
        ))
    }

    fn data_store(&self, header: &PoolHeader) -> Result<Arc<dyn DataStore>> {
        Ok(Arc::new(RadosStore::new(
            self.cluster.clone(),
            &self.rados,
            header.block_size,
            header.data_size,
        )?))
    }

    fn create_objects(&self, opts: &CreateOptions, config: EngineConfig) -> Result<()> {
        let meta_bytes = opts
            .metadata_size
            .unwrap_or_else(|| Pool::default_metadata_bytes(opts.data_size, opts.block_size));
        if !meta_bytes.is_multiple_of(BLOCK_SIZE as u64) {
            return fail(
                ErrorKind::InvalidInput,
                format!("metadata size {meta_bytes}: must be a multiple of 4 KiB"),
            );
        }
        let nr_data_blocks = opts.data_size / opts.block_size.max(1);
        if nr_data_blocks == 0 {
            return fail(
                ErrorKind::InvalidInput,
                "the data device is smaller than one block",
            );
        }
        // A registry left by an earlier pool of this name must not name thins of this one.
        self.cluster
            .remove_object(&PoolObjects::new(&self.rados).volumes())?;
        let header = PoolHeader::new(
            opts.block_size,
            opts.data_size,
            meta_bytes / BLOCK_SIZE as u64,
        );
        let pool = Pool::create_from_parts(
            self.block_io(&header),
            self.data_store(&header)?,
            opts.block_size,
            nr_data_blocks,
            config,
        )?;
        pool.shutdown()?;
        // Last: the header makes the pool exist.
        header.write(&self.cluster, &self.rados)
    }
}

/// The registry in `NAME.volumes`, replaced whole by one write_full.
struct RegistryObject {
    cluster: Arc<Cluster>,
    pool: String,
    oid: String,
}

impl RegistryStore for RegistryObject {
    fn describe(&self) -> String {
        format!("RADOS object {}/{}", self.pool, self.oid)
    }

    fn load(&self) -> Result<Option<Vec<u8>>> {
        self.cluster.read_object(&self.oid)
    }

    fn save(&self, bytes: &[u8]) -> Result<()> {
        self.cluster.write_object_atomically(&self.oid, bytes)
    }
}

impl PoolBacking for RadosBacking {
    fn location(&self) -> &PoolLocation {
        &self.location
    }

    fn exists(&self) -> Result<bool> {
        Ok(PoolHeader::read(&self.cluster, &self.rados)?.is_some())
    }

    fn no_pool(&self) -> Error {
        Error::new(
            ErrorKind::NotFound,
            format!(
                "{loc} holds no pool (no header object {}); create one with \
                 `thinnbd pool create {loc} --data-size SIZE`",
                PoolObjects::new(&self.rados).header(),
                loc = self.location
            ),
        )
    }

    fn take_ownership(&self, policy: &OwnerPolicy) -> Result<Ownership> {
        let wait = if policy.wait {
            rados::Wait::Yes
        } else {
            rados::Wait::No
        };
        let on_lost: Box<dyn Fn(Error) + Send> = match policy.on_lost.clone() {
            Some(tell) => Box::new(move |e: Error| tell(&e)),
            None => Box::new(|e: Error| tracing::error!("{e}")),
        };
        let lock = OwnerLock::acquire(
            &self.cluster,
            &self.rados,
            policy.lock_duration,
            wait,
            on_lost,
        )?;
        Ok(Ownership::new(lock))
    }

    fn create(&self, opts: &CreateOptions, config: EngineConfig) -> Result<()> {
        let loc = &self.location;
        if opts.data.is_some() {
            return fail(
                ErrorKind::InvalidInput,
                format!(
                    "{loc}: --data names a file or device; a RADOS pool keeps its data in objects"
                ),
            );
        }
        if opts.preallocate {
            return fail(
                ErrorKind::InvalidInput,
                format!("{loc}: --preallocate allocates a data file; a RADOS pool has none"),
            );
        }
        if self.exists()? {
            return fail(ErrorKind::Busy, format!("{loc} already holds a pool"));
        }
        let _owner = self.take_ownership(&OwnerPolicy::default())?;
        // Again under the lock: another creator may have finished meanwhile.
        if self.exists()? {
            return fail(ErrorKind::Busy, format!("{loc} already holds a pool"));
        }
        self.create_objects(opts, config)
    }

    fn open_pool(&self, config: EngineConfig) -> Result<Arc<Pool>> {
        let header = self.header()?;
        Pool::from_parts(self.block_io(&header), self.data_store(&header)?, config).map_err(|e| {
            if e.kind() != ErrorKind::Corrupt {
                return e;
            }
            Error::new(
                ErrorKind::Corrupt,
                format!(
                    "{loc} metadata: {}; run `thinnbd check {loc}`",
                    e.context(),
                    loc = self.location
                ),
            )
        })
    }

    fn registry_store(&self) -> Box<dyn RegistryStore> {
        Box::new(RegistryObject {
            cluster: self.cluster.clone(),
            pool: self.rados.pool.clone(),
            oid: PoolObjects::new(&self.rados).volumes(),
        })
    }

    fn metadata(&self, _write: bool) -> Result<Arc<dyn BlockIo>> {
        Ok(self.block_io(&self.header()?))
    }

    fn control_socket(&self) -> PathBuf {
        self.control_socket.clone()
    }

    fn owner(&self) -> Result<Option<String>> {
        Ok(OwnerLock::describe_owner(&self.cluster, &self.rados)?.map(|o| o.to_string()))
    }

    fn take_over(&self) -> Result<Vec<String>> {
        let owners = OwnerLock::takeover(&self.cluster, &self.rados)?;
        Ok(owners.iter().map(ToString::to_string).collect())
    }

    /// A read of the header: the OSDs refuse every request of a blocklisted client, and a
    /// new owner blocklists the previous one before it writes anything.
    fn confirm_ownership(&self) -> Result<()> {
        self.cluster
            .object_size(&PoolObjects::new(&self.rados).header())
            .map(drop)
    }

    /// The header records the devices' sizes (RADOS cannot tell them): it grows before the
    /// metadata that takes the space up is committed, so a crash between leaves a header
    /// larger than the metadata, never smaller.
    fn before_grow(&self, data_bytes: Option<u64>, metadata_bytes: Option<u64>) -> Result<()> {
        let mut header = self.header()?;
        let before = header.clone();
        if let Some(bytes) = data_bytes {
            header.data_size = header.data_size.max(bytes);
        }
        if let Some(bytes) = metadata_bytes {
            header.metadata_blocks = header.metadata_blocks.max(bytes / BLOCK_SIZE as u64);
        }
        if header != before {
            header.write(&self.cluster, &self.rados)?;
        }
        Ok(())
    }
}
