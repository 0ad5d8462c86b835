//! [`Pool`], a running thin pool: created or opened over its metadata and data stores, with
//! its worker thread; the administration of its thins (create, snapshot, delete, activate,
//! teardown), growing, status, and shutdown.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crate::error::{fail, Error, ErrorKind, Result};
use crate::pdata::block_io::{BlockIo, FileBlockIo, BLOCK_SIZE};
use crate::pdata::space_map::MAX_METADATA_BLOCKS;
use crate::thin::metadata::{
    recommended_metadata_blocks, ThinId, ThinMetadata, DEFAULT_MAX_THINS, MIN_DATA_BLOCK_SECTORS,
    MIN_METADATA_BLOCKS,
};

use super::active_thin::Thin;
use super::data::DataStore;
use super::pool::{EngineConfig, PoolStatus};
use super::state::{MetadataState, PoolState};
#[cfg(any(test, feature = "testing"))]
use super::testing::{DataFaults, EngineEvent};
use super::thin_device::ThinHandle;
use super::worker;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A thin pool. Always used as `Arc<Pool>`; dropping the last one shuts it down.
pub struct Pool {
    state: Arc<PoolState>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

fn data_block_sectors(block_size_bytes: u64) -> Result<u32> {
    let unit = u64::from(MIN_DATA_BLOCK_SECTORS) * 512;
    if block_size_bytes == 0 || !block_size_bytes.is_multiple_of(unit) {
        return fail(
            ErrorKind::InvalidInput,
            format!("block size {block_size_bytes}: must be a multiple of 64 KiB"),
        );
    }
    u32::try_from(block_size_bytes / 512).map_err(|_| {
        Error::new(
            ErrorKind::InvalidInput,
            format!("block size {block_size_bytes} is too large"),
        )
    })
}

/// A metadata size the format can use: whole 4 KiB blocks, within its limits.
fn check_metadata_bytes(bytes: u64) -> Result<()> {
    let block = BLOCK_SIZE as u64;
    let (min, max) = (MIN_METADATA_BLOCKS * block, MAX_METADATA_BLOCKS * block);
    if !bytes.is_multiple_of(block) || !(min..=max).contains(&bytes) {
        return fail(
            ErrorKind::InvalidInput,
            format!("metadata size {bytes}: must be a multiple of 4 KiB from {min} to {max} bytes"),
        );
    }
    Ok(())
}

impl Pool {
    /// Creates a pool: a sparse data file of `data_size_bytes` (created when missing) and fresh
    /// metadata, sized for the data and allocated in full, in `metadata`.
    pub fn create(
        metadata: &Path,
        data: &Path,
        data_size_bytes: u64,
        block_size_bytes: u64,
        config: EngineConfig,
    ) -> Result<Arc<Pool>> {
        Pool::create_sized(
            metadata,
            data,
            data_size_bytes,
            block_size_bytes,
            None,
            config,
        )
    }

    /// Bytes of metadata a pool gets by default: sized for its data blocks and
    /// [`DEFAULT_MAX_THINS`] volumes and snapshots.
    pub fn default_metadata_bytes(data_size_bytes: u64, block_size_bytes: u64) -> u64 {
        let nr_blocks = data_size_bytes / block_size_bytes.max(1);
        recommended_metadata_blocks(nr_blocks, DEFAULT_MAX_THINS) * BLOCK_SIZE as u64
    }

    /// As [`create`](Self::create), with `metadata_bytes` of metadata (default: sized for
    /// the data, see [`default_metadata_bytes`](Self::default_metadata_bytes)).
    pub fn create_sized(
        metadata: &Path,
        data: &Path,
        data_size_bytes: u64,
        block_size_bytes: u64,
        metadata_bytes: Option<u64>,
        config: EngineConfig,
    ) -> Result<Arc<Pool>> {
        data_block_sectors(block_size_bytes)?;
        let nr_blocks = data_size_bytes / block_size_bytes;
        if nr_blocks == 0 {
            return fail(
                ErrorKind::InvalidInput,
                "the data device is smaller than one block",
            );
        }
        let store = super::data::open(data, true, config.data_write_chunk)?;
        store.grow_to(data_size_bytes)?;
        let meta_file = crate::util::open_read_write(metadata, true)?;
        let meta_bytes = metadata_bytes
            .unwrap_or_else(|| Pool::default_metadata_bytes(data_size_bytes, block_size_bytes));
        check_metadata_bytes(meta_bytes)?;
        meta_file
            .set_len(meta_bytes)
            .map_err(|e| Error::io(format!("sizing {}", metadata.display()), e))?;
        // Allocated in full now, so a commit can never fail for lack of host space (a failed
        // commit makes the pool read-only).
        crate::util::allocate(&meta_file, meta_bytes).map_err(|e| {
            Error::data_io(
                format!("allocating {meta_bytes} bytes for {}", metadata.display()),
                e,
            )
        })?;
        let io: Arc<dyn BlockIo> = Arc::new(FileBlockIo::new(meta_file)?);
        Pool::create_from_parts(io, store, block_size_bytes, nr_blocks, config)
    }

    /// Opens an existing pool.
    pub fn open(metadata: &Path, data: &Path, config: EngineConfig) -> Result<Arc<Pool>> {
        let io: Arc<dyn BlockIo> = Arc::new(FileBlockIo::new(crate::util::open_read_write(
            metadata, false,
        )?)?);
        let store = super::data::open(data, false, config.data_write_chunk)?;
        Pool::from_parts(io, store, config)
    }

    /// Formats `metadata` and builds a pool over `data` (tests: in-memory metadata, power cuts).
    /// `data` comes set up by its maker: `config.data_write_chunk` is for the stores that
    /// [`create`](Self::create) and [`open`](Self::open) open themselves.
    pub fn create_from_parts(
        metadata: Arc<dyn BlockIo>,
        data: Arc<dyn DataStore>,
        block_size_bytes: u64,
        nr_data_blocks: u64,
        config: EngineConfig,
    ) -> Result<Arc<Pool>> {
        let sectors = data_block_sectors(block_size_bytes)?;
        let md = ThinMetadata::format(metadata, sectors, nr_data_blocks)?;
        Pool::start(md, data, config)
    }

    /// Opens existing metadata over `data`.
    pub fn from_parts(
        metadata: Arc<dyn BlockIo>,
        data: Arc<dyn DataStore>,
        config: EngineConfig,
    ) -> Result<Arc<Pool>> {
        let md = ThinMetadata::open(metadata)?;
        Pool::start(md, data, config)
    }

    fn start(
        md: ThinMetadata,
        data: Arc<dyn DataStore>,
        config: EngineConfig,
    ) -> Result<Arc<Pool>> {
        let state = Arc::new(PoolState::new(md, data, config)?);
        let worker = worker::spawn(state.clone())?;
        Ok(Arc::new(Pool {
            state,
            worker: Mutex::new(Some(worker)),
        }))
    }

    pub fn block_size(&self) -> u64 {
        self.state.block_bytes
    }

    pub fn config(&self) -> &EngineConfig {
        &self.state.config
    }

    /// The store under the pool's data, for what its owner asks of the host (preallocation,
    /// free space). Volume I/O goes through [`ThinHandle`]s.
    pub fn data_store(&self) -> &dyn DataStore {
        &*self.state.data
    }

    /// The faults to inject into the pool's data store (tests).
    #[cfg(any(test, feature = "testing"))]
    pub fn data_faults(&self) -> &DataFaults {
        &self.state.faults
    }

    fn admin_op<T>(&self, f: impl FnOnce(&mut MetadataState) -> Result<T>) -> Result<T> {
        let mut core = self.state.write_metadata();
        self.state.check_writable(&core)?;
        core.run(f)
    }

    pub fn create_thin(&self, id: ThinId) -> Result<()> {
        let _a = lock(&self.state.admin);
        self.state
            .retry_after_commit(|| self.admin_op(|c| c.md.create_thin(id)))?;
        self.state.flush()
    }

    /// Snapshots `origin`. An active origin is quiesced first (in-flight writes finish, new ones
    /// wait) so the snapshot holds exactly what was acknowledged before it.
    pub fn create_snapshot(&self, id: ThinId, origin: ThinId) -> Result<()> {
        let _a = lock(&self.state.admin);
        let active = self
            .state
            .active
            .members()
            .into_iter()
            .find(|t| t.id() == origin);
        let _quiet = active.as_ref().map(|t| t.quiesce());
        let cache = &self.state.cache;
        self.state.retry_after_commit(|| {
            self.admin_op(|c| {
                // Every mapping of the origin is shared from now on.
                cache.clear();
                c.md.create_snapshot(id, origin)
            })
        })?;
        drop(_quiet);
        self.state.flush()
    }

    /// Deletes a thin; `Busy` while it is active.
    pub fn delete_thin(&self, id: ThinId) -> Result<()> {
        let _a = lock(&self.state.admin);
        if self.state.active.members().iter().any(|t| t.id() == id) {
            return fail(ErrorKind::Busy, format!("thin {id} is active"));
        }
        let cache = &self.state.cache;
        self.state.retry_after_commit(|| {
            self.admin_op(|c| {
                cache.clear();
                c.md.delete_thin(id)?;
                // The freed blocks go back to the file system after the commit below, as a
                // discard's do.
                let freed = c.md.data_blocks_freed_since_commit();
                c.to_punch.extend(freed);
                Ok(())
            })
        })?;
        self.state.space_changed();
        self.state.flush()
    }

    pub fn thin_ids(&self) -> Vec<ThinId> {
        self.state.read_metadata().md.thin_ids()
    }

    /// Activates a thin as a volume of `size_bytes`.
    pub fn activate(&self, id: ThinId, size_bytes: u64, read_only: bool) -> Result<ThinHandle> {
        let _a = lock(&self.state.admin);
        if self.state.work.is_stopping() {
            return fail(ErrorKind::Busy, "the pool is shutting down");
        }
        if !self.state.read_metadata().md.exists(id) {
            return fail(ErrorKind::NotFound, format!("thin {id} does not exist"));
        }
        let instance = self.state.next_instance.fetch_add(1, Ordering::Relaxed);
        let thin = crate::sync::Arc::new(Thin::new(id, instance, size_bytes, read_only));
        if self.state.active.insert(thin.clone()).is_err() {
            return fail(ErrorKind::Busy, format!("thin {id} is already active"));
        }
        Ok(ThinHandle::new(self.state.clone(), thin))
    }

    /// Deactivates a thin: it leaves the active set, then this blocks until the worker's last
    /// clone is dropped and no request is in flight, serves what was left and commits. After it
    /// returns nothing touches the thin; requests on remaining handle clones fail.
    pub fn teardown(&self, handle: ThinHandle) -> Result<()> {
        worker::teardown(&self.state, handle.thin())
    }

    pub fn flush(&self) -> Result<()> {
        self.state.flush()
    }

    /// Grows the pool online: the data device to `data_bytes` (`None`: to the device's size
    /// now, taking up an enlarged block device or file) and the metadata device to
    /// `metadata_bytes` (`None`: unchanged). Shrinking either is refused. Writes queued on a
    /// full pool retry once it returns.
    pub fn grow(&self, data_bytes: Option<u64>, metadata_bytes: Option<u64>) -> Result<()> {
        let block = self.state.block_bytes;
        let status = self.state.read_metadata().md.status();
        let data_now = status.data_total * block;
        let meta_now = status.metadata_total * BLOCK_SIZE as u64;
        if let Some(want) = data_bytes {
            if want / block < status.data_total {
                return fail(
                    ErrorKind::InvalidInput,
                    format!("the pool's data is {data_now} bytes: shrinking it to {want} is not supported"),
                );
            }
        }
        if let Some(want) = metadata_bytes {
            if want < meta_now {
                return fail(
                    ErrorKind::InvalidInput,
                    format!("the pool's metadata is {meta_now} bytes: shrinking it to {want} is not supported"),
                );
            }
            check_metadata_bytes(want)?;
        }
        if let Some(want) = metadata_bytes.filter(|&b| b > meta_now) {
            self.resize_metadata(want)?;
        }
        let data_want = match data_bytes {
            Some(b) => b,
            None => self.state.data.size()?,
        };
        if data_want / block > status.data_total {
            self.resize_data(data_want)?;
        }
        Ok(())
    }

    /// Grows the metadata device (the file, when it is a regular file) and its space map.
    pub fn resize_metadata(&self, bytes: u64) -> Result<()> {
        let _a = lock(&self.state.admin);
        check_metadata_bytes(bytes)?;
        let nr = bytes / BLOCK_SIZE as u64;
        self.admin_op(|c| c.md.resize_metadata(nr))?;
        self.state.flush()?;
        self.state.space_changed();
        Ok(())
    }

    /// Grows the data device (and the file, when it is a regular file).
    pub fn resize_data(&self, bytes: u64) -> Result<()> {
        let _a = lock(&self.state.admin);
        let nr = bytes / self.state.block_bytes;
        let old = self.state.read_metadata().md.status().data_total;
        if nr < old {
            return fail(ErrorKind::Unsupported, "shrinking the data device");
        }
        let fresh_tail = self.state.data.grow_to(nr * self.state.block_bytes)?;
        if self.state.data.size()? < nr * self.state.block_bytes {
            return fail(
                ErrorKind::InvalidInput,
                "the data device is smaller than the requested size",
            );
        }
        self.admin_op(|c| {
            c.md.resize_data(nr)?;
            if fresh_tail {
                for b in old..nr {
                    c.set_zeroed(b);
                }
            }
            Ok(())
        })?;
        // Committed before the queued writers wake, so what they write lands in the new space
        // of a pool whose size is durable.
        self.state.flush()?;
        self.state.set_data_blocks(nr);
        self.state.space_changed();
        Ok(())
    }

    /// Mapped blocks of each thin that no other thin maps (see `ThinMetadata::exclusive_blocks`).
    /// Walks every mapping under the metadata read lock: for listings, not for hot paths.
    pub fn exclusive_blocks(&self) -> Result<std::collections::BTreeMap<ThinId, u64>> {
        self.state.read_metadata().run(|c| c.md.exclusive_blocks())
    }

    /// Calls `visit` with each run `(first block, count)` of `blocks` whose contents may differ
    /// between two thins (see `thin::delta::changed_extents`), under the metadata read lock.
    /// Subtrees the two share are not read, so the cost follows the change; `visit` returns
    /// false to stop early. What the walk read comes back.
    pub fn changed_blocks(
        &self,
        left: ThinId,
        right: ThinId,
        blocks: std::ops::Range<u64>,
        visit: &mut dyn FnMut(u64, u64) -> Result<bool>,
    ) -> Result<crate::thin::delta::WalkStats> {
        self.state
            .read_metadata()
            .run(|c| crate::thin::delta::changed_extents(&c.md, left, right, blocks, visit))
    }

    pub fn status(&self) -> PoolStatus {
        self.state.status()
    }

    /// Checks the metadata of the last commit, as it is on the device, while the pool serves.
    ///
    /// Holding the metadata lock shared keeps every commit out (a commit writes under the
    /// exclusive lock), and between commits the device does not change: the transaction
    /// manager keeps a transaction's blocks in memory and writes them only in its commit
    /// (`TransactionManager::flush_with_superblock`), and a block freed in a transaction is
    /// not handed out again before that transaction commits, so no shadow lands on a block
    /// the last commit refers to. What the checker reads is therefore exactly the last commit.
    /// Writes that need a metadata change wait for the check; reads go on.
    pub fn check_committed(&self) -> crate::thin::check::Report {
        let core = self.state.read_metadata();
        let io = core.md.io().clone();
        crate::thin::check::check(io)
    }

    /// Takes the recorded events (empty unless `record_events`).
    #[cfg(any(test, feature = "testing"))]
    pub fn take_events(&self) -> Vec<EngineEvent> {
        self.state.take_events()
    }

    /// Tears down every active thin, commits, and stops the worker. Idempotent.
    pub fn shutdown(&self) -> Result<()> {
        let first = {
            let _a = lock(&self.state.admin);
            self.state.work.stop()
        };
        let mut result = Ok(());
        if first {
            for thin in self.state.active.members() {
                if let Err(e) = worker::teardown(&self.state, &thin) {
                    result = Err(e);
                }
            }
            if let Err(e) = self.state.flush() {
                if result.is_ok() {
                    result = Err(e);
                }
            }
        }
        self.state.wake_worker();
        if let Some(w) = lock(&self.worker).take() {
            let _ = w.join();
        }
        result
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::data::FileStore;
    use crate::engine::PoolMode;
    use crate::pdata::block_io::Block;
    use crate::pdata::mem_block_io::MemBlockIo;
    use std::sync::atomic::AtomicBool;

    const BS: u64 = 64 << 10;

    /// A metadata device whose reads fail with EIO once armed (a failing disk under a pool
    /// whose metadata cache is cold).
    struct FailingReads {
        inner: MemBlockIo,
        armed: AtomicBool,
    }

    impl BlockIo for FailingReads {
        fn nr_blocks(&self) -> u64 {
            self.inner.nr_blocks()
        }
        fn read_block(&self, location: u64) -> Result<Box<Block>> {
            if self.armed.load(Ordering::Relaxed) {
                return Err(Error::io(
                    format!("injected read failure at metadata block {location}"),
                    std::io::Error::from_raw_os_error(libc::EIO),
                ));
            }
            self.inner.read_block(location)
        }
        fn write_block(&self, location: u64, data: &Block) -> Result<()> {
            self.inner.write_block(location, data)
        }
        fn sync(&self) -> Result<()> {
            self.inner.sync()
        }
    }

    fn data_store(dir: &Path, create: bool) -> Arc<dyn DataStore> {
        let file = crate::util::open_read_write(&dir.join("data"), create).unwrap();
        if create {
            file.set_len(64 * BS).unwrap();
        }
        Arc::new(FileStore::new(file, create))
    }

    /// A pool with thin 1 (one mapped block) reopened on a metadata device that fails every
    /// read from now on; thin 1 is activated first when `active`.
    fn pool_with_failing_reads(dir: &Path, active: bool) -> (Arc<Pool>, Option<ThinHandle>) {
        let mem = MemBlockIo::new(1024);
        let pool = Pool::create_from_parts(
            Arc::new(mem.clone()) as Arc<dyn BlockIo>,
            data_store(dir, true),
            BS,
            64,
            EngineConfig::default(),
        )
        .unwrap();
        pool.create_thin(1).unwrap();
        let h = pool.activate(1, 16 * BS, false).unwrap();
        h.write(0, &[7u8; 4096], true).unwrap();
        drop(h);
        pool.shutdown().unwrap();
        drop(pool);
        let device = Arc::new(FailingReads {
            inner: mem.crash(),
            armed: AtomicBool::new(false),
        });
        let pool = Pool::from_parts(
            device.clone() as Arc<dyn BlockIo>,
            data_store(dir, false),
            EngineConfig::default(),
        )
        .unwrap();
        let h = active.then(|| pool.activate(1, 16 * BS, false).unwrap());
        device.armed.store(true, Ordering::Relaxed);
        (pool, h)
    }

    fn assert_read_only(pool: &Pool) {
        let st = pool.status();
        assert_eq!(st.mode, PoolMode::ReadOnly);
        let why = st.read_only_reason.expect("a read-only reason");
        assert!(why.contains("injected read failure"), "{why}");
    }

    #[test]
    fn a_metadata_failure_on_the_provisioning_path_turns_the_pool_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let (pool, h) = pool_with_failing_reads(dir.path(), true);
        let e = h
            .expect("active")
            .write(5 * BS, &[1u8; 4096], false)
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io, "{e}");
        assert_read_only(&pool);
    }

    #[test]
    fn a_metadata_failure_on_an_admin_path_turns_the_pool_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let (pool, _) = pool_with_failing_reads(dir.path(), false);
        let e = pool.delete_thin(1).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io, "{e}");
        assert_read_only(&pool);
    }

    #[test]
    fn a_metadata_failure_while_listing_turns_the_pool_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let (pool, _) = pool_with_failing_reads(dir.path(), false);
        let e = pool.exclusive_blocks().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io, "{e}");
        assert_read_only(&pool);
    }
}
