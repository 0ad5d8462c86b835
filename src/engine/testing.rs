//! Test doubles of the engine, built only for tests (`cfg(test)` or the `testing` feature, which
//! `cargo test` turns on and a release build leaves off): a data store that injects faults and
//! lets a tap watch every change ([`FaultInjectingStore`], steered through [`DataFaults`]), and
//! the log of worker and teardown events ([`EngineEvent`]).
//!
//! With the feature on, every pool's data store is wrapped in a [`FaultInjectingStore`] (idle
//! until a test arms it), so a test reaches the faults of any pool, however it was opened,
//! through `Pool::data_faults`.

use std::collections::HashSet;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::thin::metadata::ThinId;

use super::data::{DataStore, HostSpace};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A test observer of data-store mutations, called before each write, punch and sync (only
/// once faults are armed). Power-cut tests model a volatile write cache with it: remember what
/// a range held before it is changed, forget it at a sync, and fail everything after the cut.
pub trait DataTap: Send + Sync {
    /// Before `len` bytes at `offset` of `data` are written or punched; an error fails the
    /// operation. `data` is the store under the fault injection, to read what the range holds.
    fn before_change(&self, data: &dyn DataStore, offset: u64, len: u64) -> io::Result<()>;
    /// Before the store syncs; an error fails the sync.
    fn before_sync(&self) -> io::Result<()>;
}

/// Chosen failures of the data store. Byte ranges are matched by data block.
#[derive(Default)]
pub struct DataFaults {
    armed: AtomicBool,
    read_blocks: Mutex<HashSet<u64>>,
    write_blocks: Mutex<HashSet<u64>>,
    fail_all_reads: AtomicBool,
    fail_all_writes: AtomicBool,
    injected: AtomicU64,
    write_delay_ns: AtomicU64,
    read_delay_ns: AtomicU64,
    reads_delayed: AtomicU64,
    tap: Mutex<Option<Arc<dyn DataTap>>>,
}

impl DataFaults {
    /// Installs (or removes) the observer of writes, punches and syncs.
    pub fn set_tap(&self, tap: Option<Arc<dyn DataTap>>) {
        *lock(&self.tap) = tap;
        self.armed.store(true, Ordering::Release);
    }

    /// Fail every read touching data block `b` with EIO.
    pub fn fail_reads_of(&self, b: u64) {
        lock(&self.read_blocks).insert(b);
        self.armed.store(true, Ordering::Release);
    }

    /// Fail every write touching data block `b` with EIO.
    pub fn fail_writes_of(&self, b: u64) {
        lock(&self.write_blocks).insert(b);
        self.armed.store(true, Ordering::Release);
    }

    pub fn fail_all_reads(&self, on: bool) {
        self.fail_all_reads.store(on, Ordering::Release);
        self.armed.store(true, Ordering::Release);
    }

    pub fn fail_all_writes(&self, on: bool) {
        self.fail_all_writes.store(on, Ordering::Release);
        self.armed.store(true, Ordering::Release);
    }

    pub fn clear(&self) {
        lock(&self.read_blocks).clear();
        lock(&self.write_blocks).clear();
        self.fail_all_reads.store(false, Ordering::Release);
        self.fail_all_writes.store(false, Ordering::Release);
        self.write_delay_ns.store(0, Ordering::Release);
        self.read_delay_ns.store(0, Ordering::Release);
    }

    /// Makes every data write take at least `d` longer (a slow device), so tests can hold
    /// prison cells long enough for other threads to pile up behind them.
    pub fn set_write_delay(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.write_delay_ns.store(ns, Ordering::Release);
        self.armed.store(true, Ordering::Release);
    }

    /// Makes every data read wait `d` before it reads (after its mapping was looked up), so
    /// tests can change the pool under a read in flight.
    pub fn set_read_delay(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.read_delay_ns.store(ns, Ordering::Release);
        self.armed.store(true, Ordering::Release);
    }

    /// Reads that have started their delay so far.
    pub fn reads_delayed(&self) -> u64 {
        self.reads_delayed.load(Ordering::Acquire)
    }

    /// Number of failures injected so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }

    /// Whether anything was ever armed: the engine's paths that would retry after a failure
    /// (the non-blocking ones) then stand aside and reads go block by block, so each injected
    /// fault is seen exactly once, at the block it was aimed at.
    pub fn armed(&self) -> bool {
        self.armed.load(Ordering::Acquire)
    }

    fn tap(&self) -> Option<Arc<dyn DataTap>> {
        if !self.armed() {
            return None;
        }
        lock(&self.tap).clone()
    }

    fn tap_change(&self, data: &dyn DataStore, offset: u64, len: u64) -> io::Result<()> {
        match self.tap() {
            Some(t) => t.before_change(data, offset, len),
            None => Ok(()),
        }
    }

    fn tap_sync(&self) -> io::Result<()> {
        match self.tap() {
            Some(t) => t.before_sync(),
            None => Ok(()),
        }
    }

    fn check(&self, write: bool, block: u64) -> io::Result<()> {
        if !self.armed() {
            return Ok(());
        }
        let delay = if write {
            &self.write_delay_ns
        } else {
            &self.read_delay_ns
        };
        let ns = delay.load(Ordering::Acquire);
        if ns > 0 {
            if !write {
                self.reads_delayed.fetch_add(1, Ordering::AcqRel);
            }
            std::thread::sleep(Duration::from_nanos(ns));
        }
        let hit = if write {
            self.fail_all_writes.load(Ordering::Acquire)
                || lock(&self.write_blocks).contains(&block)
        } else {
            self.fail_all_reads.load(Ordering::Acquire) || lock(&self.read_blocks).contains(&block)
        };
        if hit {
            self.injected.fetch_add(1, Ordering::Relaxed);
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }
}

/// A data store that fails, slows down or taps the I/O of the store inside it as its
/// [`DataFaults`] say.
pub struct FaultInjectingStore {
    inner: Arc<dyn DataStore>,
    faults: Arc<DataFaults>,
    block_bytes: u64,
}

impl FaultInjectingStore {
    /// Wraps `inner`, whose data blocks are `block_bytes` long (faults are aimed at blocks).
    pub fn new(inner: Arc<dyn DataStore>, faults: Arc<DataFaults>, block_bytes: u64) -> Self {
        FaultInjectingStore {
            inner,
            faults,
            block_bytes: block_bytes.max(1),
        }
    }
}

impl DataStore for FaultInjectingStore {
    fn size(&self) -> Result<u64> {
        self.inner.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let block = offset / self.block_bytes;
        self.faults
            .check(false, block)
            .map_err(|e| Error::io(format!("reading data block {block} at byte {offset}"), e))?;
        self.inner.read_at(buf, offset)
    }

    fn try_read_cached(&self, buf: &mut [u8], offset: u64) -> Option<()> {
        if self.faults.armed() {
            return None;
        }
        self.inner.try_read_cached(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let block = offset / self.block_bytes;
        self.faults
            .check(true, block)
            .and_then(|()| {
                self.faults
                    .tap_change(&*self.inner, offset, buf.len() as u64)
            })
            .map_err(|e| {
                Error::data_io(format!("writing data block {block} at byte {offset}"), e)
            })?;
        self.inner.write_at(buf, offset)
    }

    fn punch(&self, offset: u64, len: u64) -> Result<bool> {
        self.faults
            .tap_change(&*self.inner, offset, len)
            .map_err(|e| Error::io(format!("punching {len} bytes at {offset}"), e))?;
        self.inner.punch(offset, len)
    }

    fn sync(&self) -> Result<()> {
        self.faults
            .tap_sync()
            .map_err(|e| Error::io("syncing the data device", e))?;
        self.inner.sync()
    }

    fn grow_to(&self, bytes: u64) -> Result<bool> {
        self.inner.grow_to(bytes)
    }

    fn is_fresh(&self) -> bool {
        self.inner.is_fresh()
    }

    fn zeroed_ranges(&self, end: u64) -> Vec<(u64, u64)> {
        self.inner.zeroed_ranges(end)
    }

    fn preallocate(&self, bytes: u64) -> Result<()> {
        self.inner.preallocate(bytes)
    }

    fn host_space(&self) -> Option<HostSpace> {
        self.inner.host_space()
    }
}

/// Worker and teardown events, recorded when `EngineConfig::record_events` is set. `instance`
/// tells activations of the same thin apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineEvent {
    WorkerGet { thin: ThinId, instance: u64 },
    WorkerPut { thin: ThinId, instance: u64 },
    TeardownBegin { thin: ThinId, instance: u64 },
    TeardownEnd { thin: ThinId, instance: u64 },
}

/// The recorded [`EngineEvent`]s, capped so a long stress test cannot exhaust memory.
#[derive(Default)]
pub(crate) struct EventLog {
    events: Mutex<Vec<EngineEvent>>,
}

const MAX_EVENTS: usize = 4_000_000;

impl EventLog {
    pub(crate) fn record(&self, e: EngineEvent) {
        let mut ev = lock(&self.events);
        if ev.len() < MAX_EVENTS {
            ev.push(e);
        }
    }

    pub(crate) fn take(&self) -> Vec<EngineEvent> {
        std::mem::take(&mut *lock(&self.events))
    }
}
