//! Volumes: named thin devices of a pool (metadata, data, registry, ownership) wherever it
//! lives ([`location`], [`backing`]), built on the I/O engine and used by the server, the
//! nbdkit plugin and the CLI.
//!
//! Order of durable steps, so that a crash never leaves a name pointing at a missing thin:
//! create = thin committed, then name added; delete = name removed, then thin deleted and
//! committed. A crash in between leaves an orphan thin, which `check` reports.

pub mod backing;
pub mod location;
pub mod registry;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use serde::{Deserialize, Serialize};

use crate::engine::{EngineConfig, Pool, PoolMode, PoolStatus, ThinHandle};
use crate::error::{fail, Error, ErrorKind, Result};
use crate::thin::metadata::ThinId;
pub use backing::dir::{no_pool_in, take_lock, PoolPaths};
pub use backing::{backing, OnLost, OwnerPolicy, Ownership, PoolBacking};
pub use location::{PoolLocation, RadosLocation};
pub use registry::{no_such_volume, Access, Grant};
use registry::{Registry, Volume};

/// A volume as listed by `volume list` and `pool status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub name: String,
    pub thin_id: ThinId,
    pub size: u64,
    pub read_only: bool,
    /// The volume this one was snapshotted from, while it still exists.
    pub origin: Option<String>,
    /// True for a snapshot whose origin has since been deleted (then `origin` is `None`).
    #[serde(default)]
    pub origin_deleted: bool,
    pub mapped_bytes: u64,
    /// Mapped bytes no other volume maps (what deleting this one would free); `None` when the
    /// mappings were not walked (the reply to a single change) or could not be.
    #[serde(default)]
    pub exclusive_bytes: Option<u64>,
    /// Mapped bytes shared with other volumes (snapshots and origins).
    #[serde(default)]
    pub shared_bytes: Option<u64>,
    pub description: String,
    /// Who may use the volume; empty: every client the server lets in.
    #[serde(default)]
    pub access: Vec<Grant>,
}

/// A change to a volume's access list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessChange {
    /// Adds the grant, replacing one for the same identity.
    Allow(Grant),
    /// Removes the grant for this identity.
    Deny(String),
    /// Removes every grant: the volume is open to every client again.
    Clear,
}

/// The new size asked of `volume resize`: absolute, or relative as `lvresize` reads `+SIZE` and
/// `-SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NewSize {
    Exactly(u64),
    GrowBy(u64),
    ShrinkBy(u64),
}

impl NewSize {
    /// The size in bytes this asks of a volume now `current` bytes long.
    pub fn resolve(self, current: u64) -> Result<u64> {
        let (new, what) = match self {
            NewSize::Exactly(n) => (Some(n), "size"),
            NewSize::GrowBy(n) => (current.checked_add(n), "growth"),
            NewSize::ShrinkBy(n) => (current.checked_sub(n), "shrink"),
        };
        new.filter(|n| *n > 0).ok_or_else(|| {
            Error::new(
                ErrorKind::OutOfBounds,
                format!("a {what} of {self} from {current} bytes leaves no valid size"),
            )
        })
    }
}

impl std::fmt::Display for NewSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NewSize::Exactly(n) => write!(f, "{n} bytes"),
            NewSize::GrowBy(n) => write!(f, "+{n} bytes"),
            NewSize::ShrinkBy(n) => write!(f, "-{n} bytes"),
        }
    }
}

/// Everything `pool status` shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoolReport {
    /// The pool's location (a directory, or `rados:POOL/NAME`).
    pub dir: PathBuf,
    /// Who owns a RADOS pool: `client.X ADDR (HOST pid PID) since T`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    pub block_size: u64,
    pub data_used_bytes: u64,
    pub data_total_bytes: u64,
    pub metadata_used_blocks: u64,
    pub metadata_total_blocks: u64,
    /// Metadata blocks free now, and those kept so commits finish and space can be freed
    /// (a new volume, snapshot or data block is refused with no space rather than take them).
    #[serde(default)]
    pub metadata_free_blocks: u64,
    #[serde(default)]
    pub metadata_reserve_blocks: u64,
    #[serde(default)]
    pub metadata_low_water_blocks: u64,
    #[serde(default)]
    pub metadata_low_water_crossed: bool,
    pub mode: String,
    pub low_water_crossed: bool,
    pub volumes: Vec<VolumeInfo>,
    /// Free data at or below which the pool warns (`pool.low_water_mark`; 0: off).
    #[serde(default)]
    pub low_water_mark_bytes: u64,
    /// Free space of the file system holding the data file (`None` for a block device).
    #[serde(default)]
    pub host_free_bytes: Option<u64>,
    /// What the operator should know: host space short of the pool's free data, over-commit.
    #[serde(default)]
    pub warnings: Vec<String>,
}

/// Free space on the host file system against what the pool may still write there.
struct HostSpace {
    free: u64,
    needed: u64,
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

/// An open pool: the engine's pool plus names, owned by this process while open.
pub struct Volumes {
    backing: Box<dyn PoolBacking>,
    pool: Arc<Pool>,
    registry: Mutex<Registry>,
    active: Mutex<HashMap<String, Arc<ActiveVolume>>>,
    /// Why this process lost the pool, once it has (the first request that failed `Fenced`):
    /// every later change and flush fails, whatever the engine would answer. Read on every
    /// request's path without a lock.
    lost: OnceLock<String>,
    /// Told once when a request finds the pool lost (the owner lock's own check may come later).
    on_lost: Option<OnLost>,
    _owner: Ownership,
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
    /// Bytes of metadata; `None` sizes it for the data and a thousand volumes and snapshots.
    pub metadata_size: Option<u64>,
    /// Allocate the data file in full on the host (a block device already is), so no write
    /// can fail for lack of host space (as `qemu-img create -o preallocation=falloc`).
    pub preallocate: bool,
}

/// A registered volume as listed, with what the metadata says of its blocks.
fn volume_info(v: &Volume, mapped_bytes: u64, exclusive_bytes: Option<u64>) -> VolumeInfo {
    VolumeInfo {
        name: v.name.clone(),
        thin_id: v.thin_id,
        size: v.size,
        read_only: v.read_only,
        origin: v.origin.clone(),
        origin_deleted: v.origin_deleted,
        mapped_bytes,
        exclusive_bytes,
        shared_bytes: exclusive_bytes.map(|x| mapped_bytes.saturating_sub(x)),
        description: v.description.clone(),
        access: v.access.clone(),
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
    /// Creates an empty pool at `location` (a directory may exist but must hold no pool).
    pub fn create_pool(
        location: impl Into<PoolLocation>,
        opts: &CreateOptions,
        config: EngineConfig,
    ) -> Result<()> {
        backing(&location.into())?.create(opts, config)
    }

    /// Opens a pool, taking its ownership; Busy, naming the owner, when another process has it.
    pub fn open(location: impl Into<PoolLocation>, config: EngineConfig) -> Result<Arc<Volumes>> {
        Volumes::open_backing(backing(&location.into())?, config, &OwnerPolicy::default())
    }

    /// Opens the pool of `backing`, taking its ownership as `policy` says.
    pub fn open_backing(
        backing: Box<dyn PoolBacking>,
        config: EngineConfig,
        policy: &OwnerPolicy,
    ) -> Result<Arc<Volumes>> {
        if !backing.exists()? {
            return Err(backing.no_pool());
        }
        let owner = backing.take_ownership(policy)?;
        let registry = Registry::load_from(backing.registry_store())?;
        let pool = backing.open_pool(config)?;
        Ok(Arc::new(Volumes {
            backing,
            pool,
            registry: Mutex::new(registry),
            active: Mutex::new(HashMap::new()),
            lost: OnceLock::new(),
            on_lost: policy.on_lost.clone(),
            _owner: owner,
        }))
    }

    /// `Fenced` once this process has lost the pool (see [`note_result`](Self::note_result)).
    pub fn check_owned(&self) -> Result<()> {
        match self.lost.get() {
            Some(why) => fail(ErrorKind::Fenced, why.clone()),
            None => Ok(()),
        }
    }

    /// Passes a request's result on, taking a `Fenced` error as the loss of the pool: from
    /// then on [`check_owned`](Self::check_owned) fails, and the owner policy's `on_lost` is
    /// told (once).
    pub fn note_result<T>(&self, result: Result<T>) -> Result<T> {
        if let Err(e) = &result {
            if e.kind() == ErrorKind::Fenced {
                let first = self.lost.set(e.message()).is_ok();
                if let (true, Some(tell)) = (first, &self.on_lost) {
                    tell(&Error::new(
                        ErrorKind::Fenced,
                        format!(
                            "lost ownership of pool {}: {}",
                            self.location(),
                            e.message()
                        ),
                    ));
                }
            }
        }
        result
    }

    /// What a flush (or a FUA write) acknowledges must be this process's as the pool's owner:
    /// proves it still is (a RADOS pool: one round trip a fenced client cannot make).
    pub fn confirm_owned(&self) -> Result<()> {
        self.check_owned()?;
        self.note_result(self.backing.confirm_ownership())
    }

    pub fn location(&self) -> &PoolLocation {
        self.backing.location()
    }

    /// The status of a pool this process does not own (served by another process or host,
    /// or by nobody), read without its ownership: header, registry, owner and the metadata of
    /// the last commit. What only the owner's engine knows (mode, low-water marks, exclusive
    /// bytes) is left out; a commit racing the read may make it fail, so it is tried again.
    pub fn status_unowned(backing: &dyn PoolBacking) -> Result<PoolReport> {
        if !backing.exists()? {
            return Err(backing.no_pool());
        }
        let mut attempts = 0;
        loop {
            attempts += 1;
            match Volumes::read_status_unowned(backing) {
                Err(e) if e.kind() == ErrorKind::Corrupt && attempts < 3 => {
                    tracing::debug!("status read raced a commit ({e}); reading again");
                }
                result => return result,
            }
        }
    }

    fn read_status_unowned(backing: &dyn PoolBacking) -> Result<PoolReport> {
        let owner = backing.owner()?;
        let registry = Registry::load_from(backing.registry_store())?;
        let md = crate::thin::ThinMetadata::open(backing.metadata(false)?)?;
        let s = md.status();
        let block = md.data_block_bytes();
        let volumes = registry
            .volumes()
            .iter()
            .map(|v| {
                let mapped = md.mapped_blocks(v.thin_id).unwrap_or(0) * block;
                volume_info(v, mapped, None)
            })
            .collect();
        Ok(PoolReport {
            dir: PathBuf::from(backing.location().to_string()),
            mode: match &owner {
                Some(_) => "served by its owner (this is its last commit)".into(),
                None => "not open".into(),
            },
            owner,
            block_size: block,
            data_used_bytes: s.data_used * block,
            data_total_bytes: s.data_total * block,
            metadata_used_blocks: s.metadata_used,
            metadata_total_blocks: s.metadata_total,
            metadata_free_blocks: s.metadata_total.saturating_sub(s.metadata_used),
            metadata_reserve_blocks: md.metadata_reserve(),
            metadata_low_water_blocks: 0,
            metadata_low_water_crossed: false,
            low_water_crossed: false,
            volumes,
            low_water_mark_bytes: 0,
            host_free_bytes: None,
            warnings: Vec::new(),
        })
    }

    /// Where a server of this pool listens for volume commands.
    pub fn control_socket(&self) -> PathBuf {
        self.backing.control_socket()
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    pub fn volume(&self, name: &str) -> Result<Volume> {
        locked(&self.registry).get(name).cloned()
    }

    /// The other volumes of `name`'s family: those with the same root ancestor along the
    /// snapshot origins (its ancestors, descendants and their siblings). An origin that was
    /// deleted ends a chain, so its snapshots root families of their own.
    pub fn family(&self, name: &str) -> Result<Vec<Volume>> {
        let reg = locked(&self.registry);
        let all = reg.volumes();
        let root = |v: &Volume| {
            let mut at = v;
            // Bounded: a registry edited by hand could hold an origin loop.
            for _ in 0..all.len() {
                match at.origin.as_deref().and_then(|o| reg.get(o).ok()) {
                    Some(origin) => at = origin,
                    None => break,
                }
            }
            at.name.clone()
        };
        let own_root = root(reg.get(name)?);
        Ok(all
            .iter()
            .filter(|v| v.name != name && root(v) == own_root)
            .cloned()
            .collect())
    }

    pub fn volume_names(&self) -> Vec<String> {
        locked(&self.registry)
            .volumes()
            .iter()
            .map(|v| v.name.clone())
            .collect()
    }

    pub fn list(&self) -> Vec<VolumeInfo> {
        self.list_counting(true)
    }

    /// `list`; `count_sharing` walks every mapping to split exclusive from shared bytes (a
    /// listing asks for it; the reply to a single change does not, so a change on a big pool
    /// does not hold the metadata lock for a full walk).
    fn list_counting(&self, count_sharing: bool) -> Vec<VolumeInfo> {
        let status = self.pool.status();
        let block = self.pool.block_size();
        let exclusive = if count_sharing {
            self.pool
                .exclusive_blocks()
                .map_err(|e| tracing::warn!("counting exclusive blocks: {e}"))
                .ok()
        } else {
            None
        };
        locked(&self.registry)
            .volumes()
            .iter()
            .map(|v| {
                let mapped_bytes = status
                    .thins
                    .iter()
                    .find(|t| t.id == v.thin_id)
                    .map_or(0, |t| t.mapped_blocks)
                    * block;
                let exclusive_bytes = exclusive
                    .as_ref()
                    .map(|m| m.get(&v.thin_id).copied().unwrap_or(0) * block);
                volume_info(v, mapped_bytes, exclusive_bytes)
            })
            .collect()
    }

    pub fn create_volume(&self, name: &str, size: u64) -> Result<VolumeInfo> {
        self.create_volume_described(name, size, "")
    }

    /// `create_volume` with a description (shown by `volume list`, sent to NBD clients).
    pub fn create_volume_described(
        &self,
        name: &str,
        size: u64,
        description: &str,
    ) -> Result<VolumeInfo> {
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
            origin_deleted: false,
            description: description.into(),
            access: Vec::new(),
        };
        if let Err(e) = reg.add(v) {
            self.forget_unnamed_thin(id);
            return Err(e);
        }
        drop(reg);
        self.info(name)
    }

    pub fn snapshot(&self, origin: &str, name: &str, read_only: bool) -> Result<VolumeInfo> {
        self.snapshot_described(origin, name, read_only, None)
    }

    /// `snapshot` with a description instead of the default "snapshot of ORIGIN".
    pub fn snapshot_described(
        &self,
        origin: &str,
        name: &str,
        read_only: bool,
        description: Option<&str>,
    ) -> Result<VolumeInfo> {
        let mut reg = locked(&self.registry);
        let o = reg.get(origin)?.clone();
        if reg.get(name).is_ok() {
            return fail(ErrorKind::Busy, format!("volume {name:?} already exists"));
        }
        registry::validate_name(name)?;
        let id = reg.free_thin_id(&self.pool.thin_ids())?;
        self.pool.create_snapshot(id, o.thin_id)?;
        self.pool.flush()?;
        let added = reg.add(Volume {
            name: name.into(),
            thin_id: id,
            size: o.size,
            read_only,
            origin: Some(origin.into()),
            origin_deleted: false,
            description: description.map_or_else(|| format!("snapshot of {origin}"), Into::into),
            // The snapshot holds the origin's data: the clients kept from one are kept from
            // the other until the operator says otherwise.
            access: o.access.clone(),
        });
        if let Err(e) = added {
            self.forget_unnamed_thin(id);
            return Err(e);
        }
        drop(reg);
        self.info(name)
    }

    /// Deletes a thin whose name could not be recorded (the registry write failed, say on a
    /// full host file system), so a failed create leaves no orphan behind. If this fails too,
    /// `check` reports the orphan.
    fn forget_unnamed_thin(&self, id: ThinId) {
        if let Err(e) = self.pool.delete_thin(id).and_then(|()| self.pool.flush()) {
            tracing::warn!("removing thin {id} after a failed create: {e}");
        }
    }

    fn info(&self, name: &str) -> Result<VolumeInfo> {
        self.list_counting(false)
            .into_iter()
            .find(|v| v.name == name)
            .ok_or_else(|| no_such_volume(name))
    }

    /// Changes who may use a volume; new connections follow the new list at once.
    pub fn set_access(&self, name: &str, change: &AccessChange) -> Result<VolumeInfo> {
        let mut reg = locked(&self.registry);
        let mut v = reg.get(name)?.clone();
        match change {
            AccessChange::Allow(grant) => {
                registry::validate_who(&grant.who)?;
                v.access.retain(|g| g.who != grant.who);
                v.access.push(grant.clone());
            }
            AccessChange::Deny(who) => {
                if !v.access.iter().any(|g| g.who == *who) {
                    return fail(
                        ErrorKind::NotFound,
                        format!("volume {name:?} has no grant for {who:?}"),
                    );
                }
                v.access.retain(|g| g.who != *who);
            }
            AccessChange::Clear => v.access.clear(),
        }
        reg.update(v)?;
        drop(reg);
        self.info(name)
    }

    /// The volumes the client known by `identities` may see (see [`Volume::access_for`]).
    pub fn visible_to(&self, identities: &[String]) -> Vec<Volume> {
        locked(&self.registry)
            .volumes()
            .iter()
            .filter(|v| v.access_for(identities).is_some())
            .cloned()
            .collect()
    }

    /// The active volume behind an export for the client known by `identities`, and how it
    /// may use it. A volume it may not see is refused exactly as a name that does not exist.
    pub fn open_volume_for(
        &self,
        name: &str,
        identities: &[String],
    ) -> Result<(Arc<ActiveVolume>, Access)> {
        let v = self.volume(name)?;
        let access = v
            .access_for(identities)
            .ok_or_else(|| no_such_volume(name))?;
        Ok((self.active_volume(&v)?, access))
    }

    /// Resizes a volume to an absolute or relative size. A shrink discards what lies past the
    /// new end, so it needs `force`, and is refused while a client has the volume open (the
    /// client would see its data vanish under it) even with `force`.
    pub fn resize_to(&self, name: &str, new_size: NewSize, force: bool) -> Result<VolumeInfo> {
        let current = self.volume(name)?.size;
        if force && new_size.resolve(current).is_ok_and(|s| s < current) {
            self.wait_until_idle(name);
        }
        let mut reg = locked(&self.registry);
        let mut v = reg.get(name)?.clone();
        let size = new_size.resolve(v.size)?;
        check_volume_size(size)?;
        // Held from the busy check to the end, so that no client can open the volume between.
        let mut active_map = locked(&self.active);
        if size < v.size {
            if !force {
                return fail(
                    ErrorKind::InvalidInput,
                    format!(
                        "shrinking volume {name:?} from {} to {size} bytes would discard the data \
                         past {size} bytes; to shrink anyway, add --force",
                        v.size
                    ),
                );
            }
            if active_map
                .get(name)
                .is_some_and(|a| Arc::strong_count(a) > 1)
            {
                return fail(
                    ErrorKind::Busy,
                    format!(
                        "volume {name:?} is in use by a client, which would lose the data past \
                         {size} bytes under it: disconnect the client first"
                    ),
                );
            }
        }
        let active = self.activate_locked(&mut active_map, &v)?;
        if size < v.size {
            active.thin.set_size(v.size);
            active.thin.discard(size, v.size - size, false)?;
        }
        active.thin.set_size(size);
        drop(active);
        drop(active_map);
        self.pool.flush()?;
        v.size = size;
        reg.update(v)?;
        drop(reg);
        self.release_if_idle(name);
        self.info(name)
    }

    /// Renames a volume (its export name changes with it). Refused while a client has it open.
    pub fn rename(&self, name: &str, new_name: &str) -> Result<VolumeInfo> {
        registry::validate_name(new_name)?;
        self.wait_until_idle(name);
        let mut reg = locked(&self.registry);
        reg.get(name)?;
        if reg.get(new_name).is_ok() {
            return fail(
                ErrorKind::Busy,
                format!("volume {new_name:?} already exists"),
            );
        }
        {
            let mut active = locked(&self.active);
            if let Some(a) = active.get(name) {
                if Arc::strong_count(a) > 1 {
                    return fail(
                        ErrorKind::Busy,
                        format!(
                            "volume {name:?} is in use by a client under its current export \
                             name: disconnect the client first"
                        ),
                    );
                }
                if let Some(Ok(a)) = active.remove(name).map(Arc::try_unwrap) {
                    self.pool.teardown(a.thin)?;
                }
            }
        }
        reg.rename(name, new_name)?;
        drop(reg);
        self.info(new_name)
    }

    /// Deletes a volume. Busy while a client has it open.
    pub fn delete(&self, name: &str) -> Result<()> {
        self.wait_until_idle(name);
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

    /// A client that just disconnected may still be dropping its last requests: gives it a
    /// moment (without holding any lock) before a change that needs the volume idle.
    fn wait_until_idle(&self, name: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while self.in_use(name) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// True while a client (an export) holds the volume.
    pub fn in_use(&self, name: &str) -> bool {
        locked(&self.active)
            .get(name)
            .is_some_and(|a| Arc::strong_count(a) > 1)
    }

    fn active_volume(&self, v: &Volume) -> Result<Arc<ActiveVolume>> {
        self.activate_locked(&mut locked(&self.active), v)
    }

    fn activate_locked(
        &self,
        active: &mut HashMap<String, Arc<ActiveVolume>>,
        v: &Volume,
    ) -> Result<Arc<ActiveVolume>> {
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
            dir: PathBuf::from(self.location().to_string()),
            owner: self
                .backing
                .owner()
                .map_err(|e| tracing::warn!("reading the pool's owner: {e}"))
                .ok()
                .flatten(),
            block_size: block,
            data_used_bytes: s.data_used * block,
            data_total_bytes: s.data_total * block,
            metadata_used_blocks: s.metadata_used,
            metadata_total_blocks: s.metadata_total,
            metadata_free_blocks: s.metadata_free,
            metadata_reserve_blocks: s.metadata_reserve,
            metadata_low_water_blocks: s.metadata_low_water_blocks,
            metadata_low_water_crossed: s.metadata_low_water_crossed,
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
            low_water_mark_bytes: s.low_water_blocks * block,
            host_free_bytes: self.host_space().map(|h| h.free),
            warnings: self
                .host_space_warning()
                .into_iter()
                .chain(self.overcommit_warning())
                .collect(),
        }
    }

    /// Grows the pool's data (`None`: to the data device's size now) and metadata (`None`:
    /// unchanged); shrinking is refused. Returns the pool's status after.
    pub fn grow(&self, data_size: Option<u64>, metadata_size: Option<u64>) -> Result<PoolReport> {
        self.backing.before_grow(data_size, metadata_size)?;
        self.pool.grow(data_size, metadata_size)?;
        Ok(self.status())
    }

    /// The data file's host file system: its free space and what the pool may still need
    /// there. `None` for a block device or when the host cannot tell.
    fn host_space(&self) -> Option<HostSpace> {
        let host = self.pool.data_store().host_space()?;
        let s = self.pool.status();
        let pool_free = s.data_free.saturating_mul(self.pool.block_size());
        Some(HostSpace {
            free: host.free_bytes,
            needed: pool_free.min(host.unallocated_bytes),
        })
    }

    /// A warning when the host file system cannot hold the pool's free data space: writes
    /// would then fail with ENOSPC while the pool still reports free space.
    pub fn host_space_warning(&self) -> Option<String> {
        let h = self.host_space()?;
        (h.free < h.needed).then(|| {
            format!(
                "the file system holding the data file has {} bytes free, less than the {} \
                 bytes of free pool data it may still need: writes can fail with ENOSPC before \
                 the pool is full (free host space, or create pools with --preallocate)",
                h.free, h.needed
            )
        })
    }

    /// LVM's warning when the volumes together may need more than the pool holds.
    pub fn overcommit_warning(&self) -> Option<String> {
        let total: u64 = locked(&self.registry)
            .volumes()
            .iter()
            .fold(0u64, |sum, v| sum.saturating_add(v.size));
        let data = self.pool.status().data_total * self.pool.block_size();
        (total > data).then(|| {
            format!(
                "sum of all thin volume sizes ({total} bytes) exceeds the size of thin pool {} \
                 ({data} bytes)",
                self.location()
            )
        })
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
