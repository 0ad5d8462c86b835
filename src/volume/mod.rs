//! Volumes: named thin devices of a pool directory (metadata, data, registry, lock), built on
//! the I/O engine and used by the server, the nbdkit plugin and the CLI.
//!
//! Order of durable steps, so that a crash never leaves a name pointing at a missing thin:
//! create = thin committed, then name added; delete = name removed, then thin deleted and
//! committed. A crash in between leaves an orphan thin, which `check` reports.

pub mod registry;

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::engine::{Pool, PoolConfig, PoolMode, PoolStatus, ThinHandle};
use crate::error::{fail, Error, ErrorKind, Result};
use crate::thin::metadata::ThinId;
use registry::{Registry, Volume};

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

/// A volume as listed by `volume list` and `pool status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub name: String,
    pub thin_id: ThinId,
    pub size: u64,
    pub read_only: bool,
    pub origin: Option<String>,
    pub mapped_bytes: u64,
    pub description: String,
}

/// Everything `pool status` shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoolReport {
    pub dir: PathBuf,
    pub block_size: u64,
    pub data_used_bytes: u64,
    pub data_total_bytes: u64,
    pub metadata_used_blocks: u64,
    pub metadata_total_blocks: u64,
    pub mode: String,
    pub low_water_crossed: bool,
    pub volumes: Vec<VolumeInfo>,
}

/// What `check` found beyond the metadata checker.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CheckReport {
    /// Thin devices with no volume name (left by a crash between the two steps of a change).
    pub orphans: Vec<ThinId>,
    /// Problems: names pointing at missing thins and the like.
    pub problems: Vec<String>,
}

/// An activated volume; exports hold clones of the `Arc` while clients are connected.
pub struct ActiveVolume {
    pub name: String,
    pub thin: ThinHandle,
    pub read_only: bool,
    pub description: String,
}

/// An open pool directory: the engine's pool plus names.
pub struct Volumes {
    paths: PoolPaths,
    pool: Arc<Pool>,
    registry: Mutex<Registry>,
    active: Mutex<HashMap<String, Arc<ActiveVolume>>>,
    _lock: File,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Options for creating a pool.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub data: Option<PathBuf>,
    pub data_size: u64,
    pub block_size: u64,
}

fn take_lock(paths: &PoolPaths) -> Result<File> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&paths.lock)
        .map_err(|e| Error::io(format!("opening {}", paths.lock.display()), e))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(fs::TryLockError::WouldBlock) => fail(
            ErrorKind::Busy,
            format!(
                "pool {} is in use by another process (a running server?)",
                paths.dir.display()
            ),
        ),
        Err(fs::TryLockError::Error(e)) => {
            Err(Error::io(format!("locking {}", paths.lock.display()), e))
        }
    }
}

fn check_volume_size(size: u64) -> Result<()> {
    if size == 0 || !size.is_multiple_of(512) {
        return fail(
            ErrorKind::InvalidInput,
            format!("volume size {size}: must be a positive multiple of 512 bytes"),
        );
    }
    if size > 1 << 60 {
        return fail(
            ErrorKind::OutOfBounds,
            format!("volume size {size} is too large"),
        );
    }
    Ok(())
}

impl Volumes {
    /// Creates an empty pool in `dir` (which may exist but must hold no pool).
    pub fn create_pool(dir: &Path, opts: &CreateOptions, config: PoolConfig) -> Result<()> {
        let paths = PoolPaths::new(dir);
        if paths.exists() {
            return fail(
                ErrorKind::Busy,
                format!("{} already holds a pool", dir.display()),
            );
        }
        fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let _lock = take_lock(&paths)?;
        let file = PoolFile {
            data: opts.data.clone(),
        };
        let data_path = file.data_path(&paths);
        let pool = Pool::create(
            &paths.metadata,
            &data_path,
            opts.data_size,
            opts.block_size,
            config,
        )?;
        pool.shutdown()?;
        let text = toml::to_string(&file)
            .map_err(|e| Error::new(ErrorKind::InvalidInput, format!("encoding pool.toml: {e}")))?;
        registry::write_atomically(&paths.pool_file, text.as_bytes())?;
        Ok(())
    }

    /// Opens a pool directory, taking its exclusive lock.
    pub fn open(dir: &Path, config: PoolConfig) -> Result<Arc<Volumes>> {
        let paths = PoolPaths::new(dir);
        if !paths.exists() {
            return fail(
                ErrorKind::NotFound,
                format!("{} holds no pool (no metadata file)", dir.display()),
            );
        }
        let lock = take_lock(&paths)?;
        let data = PoolFile::load(&paths)?.data_path(&paths);
        let registry = Registry::load(dir)?;
        let pool = Pool::open(&paths.metadata, &data, config)?;
        Ok(Arc::new(Volumes {
            paths,
            pool,
            registry: Mutex::new(registry),
            active: Mutex::new(HashMap::new()),
            _lock: lock,
        }))
    }

    pub fn paths(&self) -> &PoolPaths {
        &self.paths
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    pub fn volume(&self, name: &str) -> Result<Volume> {
        locked(&self.registry).get(name).cloned()
    }

    pub fn volume_names(&self) -> Vec<String> {
        locked(&self.registry)
            .volumes()
            .iter()
            .map(|v| v.name.clone())
            .collect()
    }

    pub fn list(&self) -> Vec<VolumeInfo> {
        let status = self.pool.status();
        let block = self.pool.block_size();
        locked(&self.registry)
            .volumes()
            .iter()
            .map(|v| VolumeInfo {
                name: v.name.clone(),
                thin_id: v.thin_id,
                size: v.size,
                read_only: v.read_only,
                origin: v.origin.clone(),
                mapped_bytes: status
                    .thins
                    .iter()
                    .find(|t| t.id == v.thin_id)
                    .map_or(0, |t| t.mapped_blocks)
                    * block,
                description: v.description.clone(),
            })
            .collect()
    }

    pub fn create_volume(&self, name: &str, size: u64) -> Result<VolumeInfo> {
        check_volume_size(size)?;
        let mut reg = locked(&self.registry);
        if reg.get(name).is_ok() {
            return fail(ErrorKind::Busy, format!("volume {name:?} already exists"));
        }
        registry::validate_name(name)?;
        let id = reg.free_thin_id(&self.pool.thin_ids())?;
        self.pool.create_thin(id)?;
        self.pool.flush()?;
        let v = Volume {
            name: name.into(),
            thin_id: id,
            size,
            read_only: false,
            origin: None,
            description: String::new(),
        };
        reg.add(v)?;
        drop(reg);
        self.info(name)
    }

    pub fn snapshot(&self, origin: &str, name: &str, read_only: bool) -> Result<VolumeInfo> {
        let mut reg = locked(&self.registry);
        let o = reg.get(origin)?.clone();
        if reg.get(name).is_ok() {
            return fail(ErrorKind::Busy, format!("volume {name:?} already exists"));
        }
        registry::validate_name(name)?;
        let id = reg.free_thin_id(&self.pool.thin_ids())?;
        self.pool.create_snapshot(id, o.thin_id)?;
        self.pool.flush()?;
        reg.add(Volume {
            name: name.into(),
            thin_id: id,
            size: o.size,
            read_only,
            origin: Some(origin.into()),
            description: format!("snapshot of {origin}"),
        })?;
        drop(reg);
        self.info(name)
    }

    fn info(&self, name: &str) -> Result<VolumeInfo> {
        self.list()
            .into_iter()
            .find(|v| v.name == name)
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("no volume named {name:?}")))
    }

    /// Grows or shrinks a volume; shrinking discards what lies past the new end.
    pub fn resize(&self, name: &str, size: u64) -> Result<VolumeInfo> {
        check_volume_size(size)?;
        let mut reg = locked(&self.registry);
        let mut v = reg.get(name)?.clone();
        let active = self.active_volume(&v)?;
        if size < v.size {
            active.thin.set_size(v.size);
            active.thin.discard(size, v.size - size, false)?;
        }
        active.thin.set_size(size);
        self.pool.flush()?;
        v.size = size;
        reg.update(v)?;
        drop(reg);
        self.release_if_idle(name);
        self.info(name)
    }

    /// Deletes a volume. Busy while a client has it open.
    pub fn delete(&self, name: &str) -> Result<()> {
        // A client that just disconnected may still be dropping its last requests: give it a
        // moment (without holding any lock) before calling the volume busy.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while self.in_use(name) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let mut reg = locked(&self.registry);
        let v = reg.get(name)?.clone();
        {
            let mut active = locked(&self.active);
            if let Some(a) = active.get(name) {
                if Arc::strong_count(a) > 1 {
                    return fail(
                        ErrorKind::Busy,
                        format!("volume {name:?} is in use by a client"),
                    );
                }
                let a = active.remove(name).expect("present");
                if let Ok(a) = Arc::try_unwrap(a) {
                    self.pool.teardown(a.thin)?;
                }
            }
        }
        reg.remove(name)?;
        self.pool.delete_thin(v.thin_id)?;
        self.pool.flush()
    }

    /// True while a client (an export) holds the volume.
    pub fn in_use(&self, name: &str) -> bool {
        locked(&self.active)
            .get(name)
            .is_some_and(|a| Arc::strong_count(a) > 1)
    }

    fn active_volume(&self, v: &Volume) -> Result<Arc<ActiveVolume>> {
        let mut active = locked(&self.active);
        if let Some(a) = active.get(&v.name) {
            return Ok(a.clone());
        }
        let thin = self.pool.activate(v.thin_id, v.size, v.read_only)?;
        let a = Arc::new(ActiveVolume {
            name: v.name.clone(),
            thin,
            read_only: v.read_only,
            description: if v.description.is_empty() {
                format!("thin volume {} ({} bytes)", v.name, v.size)
            } else {
                v.description.clone()
            },
        });
        active.insert(v.name.clone(), a.clone());
        Ok(a)
    }

    /// The active volume behind an export (activated on first use).
    pub fn open_volume(&self, name: &str) -> Result<Arc<ActiveVolume>> {
        let v = self.volume(name)?;
        self.active_volume(&v)
    }

    /// Tears down a volume nobody uses any more.
    pub fn release_if_idle(&self, name: &str) {
        let mut active = locked(&self.active);
        let idle = active
            .get(name)
            .map(|a| Arc::strong_count(a) == 1)
            .unwrap_or(false);
        if idle {
            if let Some(Ok(a)) = active.remove(name).map(Arc::try_unwrap) {
                if let Err(e) = self.pool.teardown(a.thin) {
                    tracing::warn!("tearing down volume {name}: {e}");
                }
            }
        }
    }

    pub fn status(&self) -> PoolReport {
        let s: PoolStatus = self.pool.status();
        let block = self.pool.block_size();
        PoolReport {
            dir: self.paths.dir.clone(),
            block_size: block,
            data_used_bytes: s.data_used * block,
            data_total_bytes: s.data_total * block,
            metadata_used_blocks: s.metadata_used,
            metadata_total_blocks: s.metadata_total,
            mode: match s.mode {
                PoolMode::Write => "write".into(),
                PoolMode::OutOfSpace => "out-of-space".into(),
                PoolMode::ReadOnly => format!(
                    "read-only ({})",
                    s.read_only_reason.as_deref().unwrap_or("metadata failure")
                ),
            },
            low_water_crossed: s.low_water_crossed,
            volumes: self.list(),
        }
    }

    /// Registry against metadata: orphan thins and names without thins.
    pub fn check_registry(&self) -> CheckReport {
        let thins = self.pool.thin_ids();
        let reg = locked(&self.registry);
        let mut report = CheckReport::default();
        for id in &thins {
            if reg.by_thin(*id).is_none() {
                report.orphans.push(*id);
            }
        }
        for v in reg.volumes() {
            if !thins.contains(&v.thin_id) {
                report.problems.push(format!(
                    "volume {:?} names thin {}, which does not exist",
                    v.name, v.thin_id
                ));
            }
            if let Some(o) = &v.origin {
                if reg.get(o).is_err() {
                    // Not a problem: origins may be deleted after their snapshots were taken.
                    tracing::debug!("volume {} has a deleted origin {o}", v.name);
                }
            }
        }
        report
    }

    /// Flushes and tears down every active volume, then shuts the pool down.
    pub fn shutdown(&self) -> Result<()> {
        let drained: Vec<Arc<ActiveVolume>> =
            locked(&self.active).drain().map(|(_, a)| a).collect();
        for a in drained {
            match Arc::try_unwrap(a) {
                Ok(a) => self.pool.teardown(a.thin)?,
                Err(a) => tracing::warn!("volume {} still in use at shutdown", a.name),
            }
        }
        self.pool.shutdown()
    }
}
