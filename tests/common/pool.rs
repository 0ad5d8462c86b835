//! Shared helpers for the engine's integration tests: pool fixtures and the external metadata
//! checkers (`thin_check`, `verify_meta.py`), which must be present when `CI=true`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use thinnbd::engine::{Pool, PoolConfig};

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
pub fn temp_pool(data_bytes: u64, block_bytes: u64, config: PoolConfig) -> TempPool {
    let dir = tempfile::tempdir().expect("tempdir");
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

/// Like [`temp_pool`], but on tmpfs (`/dev/shm`) when there is one, for stress tests whose
/// every round commits: `fdatasync` there costs nothing, so rounds measure the engine.
pub fn temp_pool_fast(data_bytes: u64, block_bytes: u64, config: PoolConfig) -> TempPool {
    let shm = Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        tempfile::tempdir_in(shm)
    } else {
        tempfile::tempdir()
    };
    let dir = dir.or_else(|_| tempfile::tempdir()).expect("tempdir");
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

fn in_ci() -> bool {
    std::env::var("CI").map(|v| v == "true").unwrap_or(false)
}

fn find_thin_check() -> Option<PathBuf> {
    for p in [
        "/usr/sbin/thin_check",
        "/sbin/thin_check",
        "/usr/bin/thin_check",
    ] {
        if Path::new(p).exists() {
            return Some(PathBuf::from(p));
        }
    }
    None
}

/// Runs `thin_check` on a metadata file; fails the test on errors, or when the tool is missing
/// under CI. Returns false when it was skipped.
pub fn thin_check(meta: &Path) -> bool {
    let Some(tool) = find_thin_check() else {
        assert!(
            !in_ci(),
            "thin_check is required when CI=true (apt-get install thin-provisioning-tools)"
        );
        eprintln!("skipping thin_check: not installed");
        return false;
    };
    let out = Command::new(tool)
        .arg(meta)
        .output()
        .expect("run thin_check");
    assert!(
        out.status.success(),
        "thin_check failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    true
}

/// Runs the shared independent checker (`$THINNBD_VERIFY_META`, else
/// `../shared/tools/verify_meta.py`) when it exists; required under CI.
pub fn verify_meta(meta: &Path) -> bool {
    let script = match std::env::var_os("THINNBD_VERIFY_META") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/tools/verify_meta.py"),
    };
    if !script.exists() {
        assert!(!in_ci(), "{} is required when CI=true", script.display());
        eprintln!("skipping verify_meta.py: {} not found", script.display());
        return false;
    }
    let out = Command::new("python3")
        .arg(&script)
        .arg("check")
        .arg(meta)
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            assert!(!in_ci(), "python3 is required when CI=true: {e}");
            eprintln!("skipping verify_meta.py: {e}");
            return false;
        }
    };
    assert!(
        out.status.success(),
        "verify_meta.py check failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    true
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

/// A small deterministic byte pattern for (tag, offset).
pub fn pattern(tag: u64, off: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((off + i).wrapping_mul(31) ^ tag.wrapping_mul(0x9E37_79B9)) as u8 | 1)
        .collect()
}
