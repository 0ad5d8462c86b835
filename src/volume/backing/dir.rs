//! A pool directory: `metadata`, `data` (or the file or device `pool.toml` names),
//! `volumes.toml`, and while open `lock` (an flock naming its holder) and `control.sock`.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{OwnerPolicy, Ownership, PoolBacking};
use crate::engine::{EngineConfig, Pool};
use crate::error::{fail, Error, ErrorKind, Result};
use crate::pdata::block_io::{BlockIo, FileBlockIo};
use crate::volume::location::PoolLocation;
use crate::volume::registry::{self, RegistryStore};
use crate::volume::CreateOptions;

/// Files of a pool directory.
#[derive(Debug, Clone)]
pub struct PoolPaths {
    pub dir: PathBuf,
    pub metadata: PathBuf,
    pub pool_file: PathBuf,
    pub lock: PathBuf,
    pub control_socket: PathBuf,
}

impl PoolPaths {
    pub fn new(dir: &Path) -> Self {
        PoolPaths {
            dir: dir.to_path_buf(),
            metadata: dir.join("metadata"),
            pool_file: dir.join("pool.toml"),
            lock: dir.join("lock"),
            control_socket: dir.join("control.sock"),
        }
    }

    pub fn exists(&self) -> bool {
        self.metadata.exists()
    }
}

/// The error for a directory that holds no pool, with the command that makes one.
pub fn no_pool_in(dir: &Path) -> Error {
    Error::new(
        ErrorKind::NotFound,
        format!(
            "{} holds no pool (no metadata file); create one with `thinnbd pool create {} --data-size SIZE`",
            dir.display(),
            dir.display()
        ),
    )
}

/// `pool.toml`: what the pool was created with that the metadata does not say.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolFile {
    /// Data file or block device; absent means `DIR/data`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    data: Option<PathBuf>,
}

impl PoolFile {
    fn load(paths: &PoolPaths) -> Result<PoolFile> {
        match fs::read_to_string(&paths.pool_file) {
            Ok(text) => toml::from_str(&text).map_err(|e| {
                Error::new(
                    ErrorKind::InvalidInput,
                    format!("{}: {}", paths.pool_file.display(), e.message()),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(PoolFile::default()),
            Err(e) => Err(Error::io(
                format!("reading {}", paths.pool_file.display()),
                e,
            )),
        }
    }

    fn data_path(&self, paths: &PoolPaths) -> PathBuf {
        self.data.clone().unwrap_or_else(|| paths.dir.join("data"))
    }
}

/// What this process writes into a lock it holds: "PID NAME", NAME being the program and its
/// subcommand (e.g. `4242 thinnbd serve`), so that a process refused the lock can say who has it.
fn lock_holder_line() -> String {
    let mut args = std::env::args();
    let program = args
        .next()
        .map(|a| {
            Path::new(&a)
                .file_name()
                .map_or(a.clone(), |n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_default();
    let name = match args.next() {
        Some(sub) if !sub.starts_with('-') && !sub.contains('/') => format!("{program} {sub}"),
        _ => program,
    };
    format!("{} {name}\n", std::process::id())
}

/// "process PID (NAME)" from a lock file written by `lock_holder_line`, when it names a live
/// process.
fn lock_holder(lock: &Path) -> Option<String> {
    let text = fs::read_to_string(lock).ok()?;
    let (pid, name) = text.trim().split_once(' ')?;
    let pid: u32 = pid.parse().ok()?;
    Path::new(&format!("/proc/{pid}"))
        .exists()
        .then(|| format!("process {pid} ({name})"))
}

/// Takes the exclusive lock of a pool directory (creating `DIR/lock`), held until the file is
/// closed. Busy, naming the holder, while another process has it.
pub fn take_lock(paths: &PoolPaths) -> Result<File> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&paths.lock)
        .map_err(|e| Error::io(format!("opening {}", paths.lock.display()), e))?;
    // A lock just released can linger for a moment in a child process forked (by another
    // thread) before our close and not yet past its exec: retry briefly before calling it busy.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    loop {
        match f.try_lock() {
            Ok(()) => {
                // Only a courtesy for the error message of the next process: failing to write
                // it does not make the lock less held.
                use std::os::unix::fs::FileExt;
                let line = lock_holder_line();
                if f.set_len(0)
                    .and_then(|()| f.write_all_at(line.as_bytes(), 0))
                    .is_err()
                {
                    tracing::debug!("could not note our pid in {}", paths.lock.display());
                }
                return Ok(f);
            }
            Err(fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(fs::TryLockError::WouldBlock) => {
                let holder = lock_holder(&paths.lock)
                    .unwrap_or_else(|| "another process (a running server?)".into());
                return fail(
                    ErrorKind::Busy,
                    format!("pool {} is in use by {holder}", paths.dir.display()),
                );
            }
            Err(fs::TryLockError::Error(e)) => {
                return Err(Error::io(format!("locking {}", paths.lock.display()), e))
            }
        }
    }
}

/// The backing of a pool directory.
pub struct DirBacking {
    location: PoolLocation,
    paths: PoolPaths,
}

impl DirBacking {
    pub fn new(dir: &Path) -> DirBacking {
        DirBacking {
            location: PoolLocation::Dir(dir.to_path_buf()),
            paths: PoolPaths::new(dir),
        }
    }

    pub fn paths(&self) -> &PoolPaths {
        &self.paths
    }

    fn create_pool_files(
        &self,
        file: &PoolFile,
        data_path: &Path,
        opts: &CreateOptions,
        config: EngineConfig,
    ) -> Result<()> {
        let paths = &self.paths;
        let pool = Pool::create_sized(
            &paths.metadata,
            data_path,
            opts.data_size,
            opts.block_size,
            opts.metadata_size,
            config,
        )?;
        let preallocated = if opts.preallocate {
            pool.data_store()
                .preallocate(opts.data_size)
                .map_err(|e| e.within(data_path.display()))
        } else {
            Ok(())
        };
        pool.shutdown()?;
        preallocated?;
        let text = toml::to_string(file)
            .map_err(|e| Error::new(ErrorKind::InvalidInput, format!("encoding pool.toml: {e}")))?;
        registry::write_atomically(&paths.pool_file, text.as_bytes())?;
        Ok(())
    }
}

impl PoolBacking for DirBacking {
    fn location(&self) -> &PoolLocation {
        &self.location
    }

    fn exists(&self) -> Result<bool> {
        Ok(self.paths.exists())
    }

    fn no_pool(&self) -> Error {
        no_pool_in(&self.paths.dir)
    }

    /// The directory's flock; never waits, and cannot be lost.
    fn take_ownership(&self, _policy: &OwnerPolicy) -> Result<Ownership> {
        take_lock(&self.paths).map(Ownership::new)
    }

    /// Creates the pool in the directory (which may exist but must hold no pool), under its
    /// lock.
    fn create(&self, opts: &CreateOptions, config: EngineConfig) -> Result<()> {
        let paths = &self.paths;
        let dir = &paths.dir;
        if paths.exists() {
            return fail(
                ErrorKind::Busy,
                format!("{} already holds a pool", dir.display()),
            );
        }
        fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let _lock = take_lock(paths)?;
        let file = PoolFile {
            data: opts.data.clone(),
        };
        let data_path = file.data_path(paths);
        let data_existed = data_path.exists();
        let created = self.create_pool_files(&file, &data_path, opts, config);
        if created.is_err() {
            // Leave the directory as it was, so the command can be run again (say, with a
            // smaller size) instead of finding a half-made pool.
            let _ = fs::remove_file(&paths.metadata);
            let _ = fs::remove_file(&paths.pool_file);
            if !data_existed {
                let _ = fs::remove_file(&data_path);
            }
        }
        created
    }

    fn open_pool(&self, config: EngineConfig) -> Result<Arc<Pool>> {
        let paths = &self.paths;
        let data = PoolFile::load(paths)?.data_path(paths);
        Pool::open(&paths.metadata, &data, config).map_err(|e| {
            if e.kind() != ErrorKind::Corrupt {
                return e;
            }
            // Say which file, and the way out: the checker, then a restore from a dump.
            Error::new(
                ErrorKind::Corrupt,
                format!(
                    "{meta}: {}; run `thinnbd check {dir}`, or restore from a dump with \
                     `thinnbd restore -i DUMP.xml -o {meta} --force`",
                    e.context(),
                    meta = paths.metadata.display(),
                    dir = paths.dir.display(),
                ),
            )
        })
    }

    fn registry_store(&self) -> Box<dyn RegistryStore> {
        registry::file_store(&self.paths.dir)
    }

    fn metadata(&self, write: bool) -> Result<Arc<dyn BlockIo>> {
        Ok(Arc::new(FileBlockIo::open(&self.paths.metadata, write)?))
    }

    fn control_socket(&self) -> PathBuf {
        self.paths.control_socket.clone()
    }

    fn take_over(&self) -> Result<Vec<String>> {
        fail(
            ErrorKind::Unsupported,
            format!(
                "{}: a local pool has no owner to take over (its lock goes with the process \
                 that holds it)",
                self.paths.dir.display()
            ),
        )
    }
}
