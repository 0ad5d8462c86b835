//! Engine pools in tests: a pool on files in a temp dir (on tmpfs for stress tests), closed
//! with both metadata checkers, and a watchdog for tests that could deadlock.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use thinnbd::engine::{EngineConfig, Pool};

use super::metadata::{thin_check, verify_meta};

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;

pub struct TempPool {
    pub dir: tempfile::TempDir,
    pub pool: Arc<Pool>,
}

impl TempPool {
    pub fn meta_path(&self) -> PathBuf {
        self.dir.path().join("meta")
    }

    pub fn data_path(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Shuts the pool down (callers drop their own clones first), runs both metadata
    /// checkers, and hands back the directory with the metadata and data paths for a reopen.
    pub fn close_checked(self) -> (tempfile::TempDir, PathBuf, PathBuf) {
        let (meta, data) = (self.meta_path(), self.data_path());
        self.pool.shutdown().expect("shutdown");
        let TempPool { dir, pool } = self;
        drop(pool);
        thin_check(&meta);
        verify_meta(&meta);
        (dir, meta, data)
    }
}

/// A pool on files in a fresh temporary directory.
pub fn temp_pool(data_bytes: u64, block_bytes: u64, config: EngineConfig) -> TempPool {
    let dir = tempfile::tempdir().expect("tempdir");
    pool_in(dir, data_bytes, block_bytes, config)
}

/// Like [`temp_pool`], but on tmpfs (`/dev/shm`) when there is one, for stress tests whose
/// every round commits: `fdatasync` there costs nothing, so rounds measure the engine.
pub fn temp_pool_fast(data_bytes: u64, block_bytes: u64, config: EngineConfig) -> TempPool {
    pool_in(fast_tempdir(), data_bytes, block_bytes, config)
}

/// A temp dir on tmpfs when there is one, else the usual one: for tests that sync often and
/// check a model of durability, not the disk's.
pub fn fast_tempdir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::tempdir_in(shm) {
            return d;
        }
    }
    tempfile::tempdir().expect("tempdir")
}

fn pool_in(
    dir: tempfile::TempDir,
    data_bytes: u64,
    block_bytes: u64,
    config: EngineConfig,
) -> TempPool {
    let pool = Pool::create(
        &dir.path().join("meta"),
        &dir.path().join("data"),
        data_bytes,
        block_bytes,
        config,
    )
    .expect("create pool");
    TempPool { dir, pool }
}

/// Fails the whole test process if `secs` pass before the returned guard is dropped.
pub struct Watchdog {
    done: Arc<std::sync::atomic::AtomicBool>,
}

pub fn watchdog(secs: u64, what: &'static str) -> Watchdog {
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d = done.clone();
    std::thread::spawn(move || {
        let start = std::time::Instant::now();
        while start.elapsed().as_secs() < secs {
            if d.load(std::sync::atomic::Ordering::Acquire) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        eprintln!("WATCHDOG: {what} did not finish within {secs} s (deadlock?)");
        std::process::exit(101);
    });
    Watchdog { done }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.done.store(true, std::sync::atomic::Ordering::Release);
    }
}
