//! The nbdkit plugin: every volume of a pool directory as an nbdkit export, through the same
//! export adapter as `thinnbd serve` (`thinnbd::service::exports`), so both answer alike.
//!
//! ```text
//! cargo build --release -p thinnbd-nbdkit
//! nbdkit ./target/release/libnbdkit_thinnbd_plugin.so pool=DIR [config=FILE] [export=NAME]
//! ```
//!
//! A package of its own (not a crate type of the `thinnbd` library), so that only this
//! library carries `plugin_init` and a plain `cargo build` leaves no `.so` that nbdkit refuses.
//! It uses the library's public API only, and never the engine's: each callback is a call on
//! the export (`thinnbd::nbd::ExportBackend`) the adapter opened, plus nbdkit's own types.
//!
//! Life of the plugin, in nbdkit's order: `config` collects the keys, `config_complete` checks
//! them (and that DIR holds a pool), `get_ready` checks what can still be reported on the
//! terminal (the export exists, the pool is not in use), `after_fork` opens the pool (the
//! engine's worker thread must start after nbdkit daemonizes), `open`/`close` per connection,
//! `cleanup`/`unload` shut the pool down and commit. `open` is cheap: listing exports opens
//! each one, so an active volume is kept for later connections until the pool shuts down.
//!
//! The callbacks the `nbdkit` crate (0.3.0) knows are the [`nbdkit::Server`] methods of
//! [`ThinExport`]; the ones it lacks (export list, default export, description, block size,
//! cleanup) are appended in [`ffi`]. Each callback runs its body under `catch_unwind`: a panic
//! becomes EIO instead of unwinding into nbdkit. The crate's own glue around our methods can
//! only panic on flags nbdkit 1.32 never sends or on error text with a NUL, which
//! [`reply::c_text`] rules out.
//!
//! Access lists: nbdkit 1.32 gives a plugin no way to learn the TLS client's identity (the
//! peer-certificate calls came later), so every client is anonymous here: a volume with an
//! access list is never listed nor opened, and `export=` naming one is refused at start-up.

// Offsets and lengths cross the C boundary: a cast that can lose data needs `try_from` or a
// reason why it cannot.
#![deny(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

pub mod config;
mod ffi;
pub mod reply;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use nbdkit::{CacheFlags, ExtentHandle, ExtentType, Flags, FuaFlags, Server, ThreadModel};

use config::{Keys, PluginConfig};
use thinnbd::error::{fail, Error, ErrorKind, Result};
use thinnbd::nbd::{ExportBackend, ExportInfo, ExportSource, PeerIdentity, WriteTurns};
use thinnbd::service::exports::VolumeExports;
use thinnbd::volume::Volumes;

/// The nbdkit this plugin is built for, which gives plugins no TLS peer identity.
const NBDKIT_VERSION_WITHOUT_TLS_PEER: &str = "1.32";

/// Who every client is to the export adapter: the plugin cannot tell (see the module docs).
static UNKNOWN_PEER: PeerIdentity = PeerIdentity::Anonymous;

/// Keys as they arrive (`config`).
static KEYS: Mutex<Keys> = Mutex::new(Keys::new());
/// Checked keys (`config_complete`).
static CONFIG: OnceLock<PluginConfig> = OnceLock::new();
/// The open pool, from `after_fork` to `cleanup`.
static SERVED: Mutex<Option<Arc<Served>>> = Mutex::new(None);

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The open pool and the exports it offers.
struct Served {
    volumes: Arc<Volumes>,
    exports: VolumeExports,
    /// `export=NAME`: the only volume offered.
    only: Option<String>,
}

impl Served {
    fn open(c: &PluginConfig) -> Result<Served> {
        let volumes = Volumes::open(c.pool_dir(), c.config.engine.clone())?;
        Ok(Served {
            exports: VolumeExports::new(volumes.clone(), c.config.pool.default_export()),
            volumes,
            only: c.export.clone(),
        })
    }

    fn list(&self) -> Vec<ExportInfo> {
        self.exports
            .list(&UNKNOWN_PEER)
            .into_iter()
            .filter(|e| self.only.as_ref().is_none_or(|o| *o == e.name))
            .collect()
    }

    fn default_export(&self) -> Option<String> {
        self.only
            .clone()
            .or_else(|| self.exports.default_export(&UNKNOWN_PEER))
    }

    /// The volume a client's export name means ("" is the default export).
    fn resolve(&self, name: &str) -> Result<String> {
        let name = if name.is_empty() {
            self.default_export().ok_or_else(|| {
                Error::new(
                    ErrorKind::NotFound,
                    "no default export: name a volume (nbdinfo --list shows them)",
                )
            })?
        } else {
            name.to_string()
        };
        if let Some(only) = &self.only {
            if name != *only {
                return fail(
                    ErrorKind::NotFound,
                    format!("export {name:?} is not served (export={only})"),
                );
            }
        }
        Ok(name)
    }

    fn description(&self, name: &str) -> Option<String> {
        let name = self.resolve(name).ok()?;
        self.list()
            .into_iter()
            .find(|e| e.name == name)
            .map(|e| e.description)
    }
}

/// The open pool; `Busy` outside `after_fork`..`cleanup`.
fn served() -> Result<Arc<Served>> {
    locked(&SERVED).clone().ok_or_else(|| {
        Error::new(
            ErrorKind::Busy,
            "the pool is not open (nbdkit is starting or stopping)",
        )
    })
}

fn plugin_config() -> Result<&'static PluginConfig> {
    CONFIG
        .get()
        .ok_or_else(|| Error::new(ErrorKind::InvalidInput, "the plugin was not configured"))
}

/// Shuts the pool down (commit, stop the worker, drop the lock) if it is open. Idempotent:
/// both `cleanup` and `unload` call it, and neither finds a pool under `--help`.
fn shutdown_pool() -> Result<()> {
    let served = locked(&SERVED).take();
    match served {
        Some(s) => s.volumes.shutdown(),
        None => Ok(()),
    }
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Runs a callback body: errors keep their kind's errno, a panic becomes EIO.
fn guard<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => Err(Error::new(
            ErrorKind::Io,
            format!("{what}: internal error: {}", panic_text(&*p)),
        )),
    }
}

fn to_nbdkit(e: Error) -> nbdkit::Error {
    nbdkit::Error::new(
        reply::errno_of(e.kind()),
        reply::c_text(&e.to_string()).to_string_lossy().into_owned(),
    )
}

/// [`guard`] for the crate's callbacks.
fn call<T>(what: &str, f: impl FnOnce() -> Result<T>) -> nbdkit::Result<T> {
    guard(what, f).map_err(to_nbdkit)
}

/// One connection: the export the client chose, as the adapter opened it.
pub struct ThinExport {
    export: Arc<dyn ExportBackend>,
    /// The connection's write rule; waiting for a turn leaves the CPU to nbdkit's threads
    /// reading the next payloads.
    writes: WriteTurns,
}

fn u64_of(n: u32) -> u64 {
    u64::from(n)
}

impl Server for ThinExport {
    fn name() -> &'static str {
        "thinnbd"
    }

    fn longname() -> Option<&'static str> {
        Some("thinnbd thin-provisioning pool")
    }

    fn version() -> Option<&'static str> {
        Some(env!("CARGO_PKG_VERSION"))
    }

    fn description() -> Option<&'static str> {
        Some(
            "Serves every thin volume of a thinnbd pool directory (dm-thin metadata format) \
             as an export.",
        )
    }

    fn config_help() -> Option<&'static str> {
        Some(config::CONFIG_HELP)
    }

    fn config(key: &str, value: &str) -> nbdkit::Result<()> {
        call("config", || locked(&KEYS).set(key, value))
    }

    fn config_complete() -> nbdkit::Result<()> {
        call("config_complete", || {
            let c = locked(&KEYS).finish()?;
            CONFIG
                .set(c)
                .map_err(|_| Error::new(ErrorKind::Busy, "config_complete ran twice"))
        })
    }

    fn thread_model() -> nbdkit::Result<ThreadModel> {
        Ok(ThreadModel::Parallel)
    }

    fn dump_plugin() {
        let _ = catch_unwind(|| {
            println!("thinnbd_version={}", env!("CARGO_PKG_VERSION"));
            println!("thinnbd_keys=pool,config,export");
        });
    }

    fn get_ready() -> nbdkit::Result<()> {
        call("get_ready", || {
            if std::env::var_os("RUST_LOG").is_some() {
                // nbdkit sends stderr to /dev/null once it daemonizes; with -f the engine's
                // logs stay visible.
                let _ = tracing_subscriber::fmt()
                    .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                    .with_writer(std::io::stderr)
                    .try_init();
            }
            plugin_config()?.preflight()
        })
    }

    fn after_fork() -> nbdkit::Result<()> {
        call("after_fork", || {
            let c = plugin_config()?;
            let served = Served::open(c)?;
            tracing::info!(pool = %c.pool_dir().display(), "pool open");
            thinnbd::service::log_space(&served.volumes);
            *locked(&SERVED) = Some(Arc::new(served));
            Ok(())
        })
    }

    fn unload() {
        let _ = catch_unwind(|| {
            if let Err(e) = shutdown_pool() {
                eprintln!("thinnbd: shutting the pool down: {e}");
            }
        });
    }

    fn open(_readonly: bool) -> nbdkit::Result<Box<dyn Server>> {
        call("open", || {
            let served = served()?;
            let requested = ffi::export_name()?;
            let name = served.resolve(&requested)?;
            let export = served.exports.open(&name, &UNKNOWN_PEER)?;
            Ok(Box::new(ThinExport {
                writes: WriteTurns::new(export.as_ref()),
                export,
            }) as Box<dyn Server>)
        })
    }

    fn get_size(&self) -> nbdkit::Result<i64> {
        call("get_size", || {
            i64::try_from(self.export.size())
                .map_err(|_| Error::new(ErrorKind::OutOfBounds, "volume size"))
        })
    }

    fn can_write(&self) -> nbdkit::Result<bool> {
        Ok(!self.export.read_only())
    }

    fn can_flush(&self) -> nbdkit::Result<bool> {
        Ok(true)
    }

    fn is_rotational(&self) -> nbdkit::Result<bool> {
        Ok(false)
    }

    fn can_trim(&self) -> nbdkit::Result<bool> {
        Ok(true)
    }

    fn can_zero(&self) -> nbdkit::Result<bool> {
        Ok(true)
    }

    fn can_fast_zero(&self) -> nbdkit::Result<bool> {
        Ok(true)
    }

    fn can_fua(&self) -> nbdkit::Result<FuaFlags> {
        Ok(FuaFlags::Native)
    }

    /// Flush is a pool-wide group commit, so what one connection flushed every other sees.
    fn can_multi_conn(&self) -> nbdkit::Result<bool> {
        Ok(true)
    }

    fn can_extents(&self) -> nbdkit::Result<bool> {
        Ok(true)
    }

    fn can_cache(&self) -> nbdkit::Result<CacheFlags> {
        Ok(CacheFlags::Native)
    }

    /// The quick path first (one read for a run of cached blocks, no metadata lock), then
    /// the general one, which also reports any error.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> nbdkit::Result<()> {
        call("pread", || match self.export.try_read_nowait(offset, buf) {
            Some(()) => Ok(()),
            None => self.export.read(offset, buf),
        })
    }

    fn write_at(&self, buf: &[u8], offset: u64, flags: Flags) -> nbdkit::Result<()> {
        call("pwrite", || {
            let fua = flags.contains(Flags::FUA);
            self.writes.write(self.export.as_ref(), offset, buf, fua)
        })
    }

    fn flush(&self) -> nbdkit::Result<()> {
        call("flush", || self.export.flush())
    }

    fn trim(&self, count: u32, offset: u64, flags: Flags) -> nbdkit::Result<()> {
        call("trim", || {
            let fua = flags.contains(Flags::FUA);
            self.export.trim(offset, u64_of(count), fua)
        })
    }

    fn zero(&self, count: u32, offset: u64, flags: Flags) -> nbdkit::Result<()> {
        call("zero", || {
            self.export.write_zeroes(
                offset,
                u64_of(count),
                flags.contains(Flags::MAY_TRIM),
                flags.contains(Flags::FAST_ZERO),
                flags.contains(Flags::FUA),
            )
        })
    }

    fn extents(
        &self,
        count: u32,
        offset: u64,
        flags: Flags,
        extent_handle: &mut ExtentHandle,
    ) -> nbdkit::Result<()> {
        let extents = call("extents", || {
            self.export.block_status(offset, u64_of(count))
        })?;
        for (at, e) in reply::extents(offset, &extents, flags.contains(Flags::REQ_ONE)) {
            let kind = match (e.hole, e.zero) {
                (true, _) => ExtentType::HoleZero,
                (false, true) => ExtentType::Zero,
                (false, false) => ExtentType::Allocated,
            };
            extent_handle.add(at, e.length, kind)?;
        }
        Ok(())
    }

    fn cache(&self, count: u32, offset: u64) -> nbdkit::Result<()> {
        call("cache", || self.export.cache(offset, u64_of(count)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_in_a_callback_becomes_eio() {
        let e = guard("pread", || -> Result<()> { panic!("boom") }).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io);
        assert!(e.to_string().contains("pread: internal error: boom"), "{e}");
        assert_eq!(reply::errno_of(e.kind()), libc::EIO);
        let e = guard("zero", || fail::<()>(ErrorKind::NoSpace, "full")).unwrap_err();
        assert_eq!(reply::errno_of(e.kind()), libc::ENOSPC);
    }

    #[test]
    fn no_pool_is_open_before_after_fork() {
        assert_eq!(served().err().map(|e| e.kind()), Some(ErrorKind::Busy));
        shutdown_pool().unwrap();
    }
}
