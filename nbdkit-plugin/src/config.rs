//! The plugin's `key=value` parameters and the plain computations the callbacks share (errno,
//! which extents nbdkit gets). Nothing here calls into nbdkit, so all of it is unit-tested.
//! The rules themselves (block sizes, extents, writes) are the export seam's, shared with
//! `thinnbd serve`.

use std::path::Path;

use thinnbd::config::{Config, Overrides};
use thinnbd::error::{fail, Error, ErrorKind, Result};
use thinnbd::nbd::{extents_at, Extent};
use thinnbd::volume::registry::{self, Registry};
use thinnbd::volume::{no_pool_in, PoolPaths};

/// What `nbdkit --help` shows for this plugin.
pub const CONFIG_HELP: &str = "\
pool=DIR      (required) the pool directory made by `thinnbd pool create`
config=FILE   thinnbd TOML config; its [pool] and [engine] settings apply
export=NAME   serve this one volume only (it also becomes the default export)";

/// The largest request advertised: `thinnbd serve`'s default, which is also the largest
/// nbdkit itself allows (64 MiB), so both frontends tell clients the same.
pub const MAX_REQUEST: u32 = thinnbd::nbd::DEFAULT_MAX_REQUEST_BYTES;

/// The keys as nbdkit hands them over, one `config` call each.
#[derive(Debug, Default)]
pub struct Keys {
    pool: Option<String>,
    config: Option<String>,
    export: Option<String>,
}

/// The checked parameters: what `after_fork` needs to open the pool and what the export
/// callbacks need to answer.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The config file's settings (or the defaults) with `pool=` applied as `thinnbd serve`
    /// applies `--pool`; its `[pool]` and `[engine]` apply. `pool.dir` is absolute: nbdkit
    /// changes directory to `/` when it daemonizes.
    pub config: Config,
    /// The config's `pool.default_volume` (empty when none), as `thinnbd serve` uses it.
    pub default_volume: Option<String>,
    /// `export=NAME`: the one volume served.
    pub export: Option<String>,
}

fn bad(why: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidInput, why)
}

impl Keys {
    pub const fn new() -> Keys {
        Keys {
            pool: None,
            config: None,
            export: None,
        }
    }

    /// One `key=value` from the command line.
    pub fn set(&mut self, key: &str, value: &str) -> Result<()> {
        let slot = match key {
            "pool" => &mut self.pool,
            "config" => &mut self.config,
            "export" => &mut self.export,
            _ => {
                return Err(bad(format!(
                    "unknown parameter {key}={value} (this plugin takes pool=DIR, config=FILE \
                     and export=NAME)"
                )))
            }
        };
        if value.is_empty() {
            return Err(bad(format!("{key}= needs a value")));
        }
        if slot.is_some() {
            return Err(bad(format!("{key}= is given twice")));
        }
        *slot = Some(value.to_string());
        Ok(())
    }

    /// Checks the keys once they are all in (`config_complete`): reads the config file and
    /// makes sure the pool directory holds a pool. Does not open the pool.
    pub fn finish(&self) -> Result<Settings> {
        let Some(pool) = &self.pool else {
            return Err(bad(
                "pool=DIR is required: the pool directory made by `thinnbd pool create DIR \
                 --data-size SIZE`",
            ));
        };
        let mut config = match &self.config {
            Some(file) => Config::load(Path::new(file))?,
            None => Config::default_config(),
        };
        let pool_dir = std::path::absolute(pool)
            .map_err(|e| Error::io(format!("pool={pool}: resolving the path"), e))?;
        if !PoolPaths::new(&pool_dir).exists() {
            return Err(no_pool_in(Path::new(pool)).within(format!("pool={pool}")));
        }
        if let Some(name) = &self.export {
            registry::validate_name(name).map_err(|e| e.within(format!("export={name}")))?;
        }
        config.apply(Overrides {
            pool_dir: Some(pool_dir),
            ..Overrides::default()
        });
        Ok(Settings {
            default_volume: Some(config.pool.default_volume.clone()).filter(|s| !s.is_empty()),
            config,
            export: self.export.clone(),
        })
    }
}

impl Settings {
    /// The pool directory (`pool=`), absolute.
    pub fn pool_dir(&self) -> &Path {
        &self.config.pool.dir
    }

    /// The checks worth making before nbdkit forks, while errors still reach the terminal:
    /// the named export exists and no other process holds the pool.
    pub fn preflight(&self) -> Result<()> {
        let reg = Registry::load(self.pool_dir())?;
        if let Some(name) = &self.export {
            if reg.get(name).is_err() {
                let names: Vec<&str> = reg.volumes().iter().map(|v| v.name.as_str()).collect();
                return fail(
                    ErrorKind::NotFound,
                    format!(
                        "export={name}: the pool has no such volume (it has: {})",
                        if names.is_empty() {
                            "none".to_string()
                        } else {
                            names.join(", ")
                        }
                    ),
                );
            }
        }
        // The real lock is taken by `Volumes::open` after the fork; this probe only turns a
        // pool in use into a message on the terminal instead of a silent exit.
        let lock = PoolPaths::new(self.pool_dir()).lock;
        if let Ok(f) = std::fs::File::open(&lock) {
            if let Err(std::fs::TryLockError::WouldBlock) = f.try_lock() {
                return fail(
                    ErrorKind::Busy,
                    format!(
                        "pool {} is in use by another process (a running `thinnbd serve`?)",
                        self.pool_dir().display()
                    ),
                );
            }
        }
        Ok(())
    }
}

/// The Linux errno nbdkit sends for an error kind (one mapping, shared with the NBD server).
pub fn errno_of(kind: ErrorKind) -> i32 {
    i32::try_from(thinnbd::nbd::errno_of_kind(kind)).unwrap_or(libc::EIO)
}

/// Text for C: nbdkit takes NUL-terminated strings, so an inner NUL would cut (or, in the
/// nbdkit crate's error path, panic); it becomes a visible escape instead.
pub fn c_text(s: &str) -> std::ffi::CString {
    std::ffi::CString::new(s.replace('\0', "\\0")).unwrap_or_default()
}

/// The extents nbdkit gets for a `block_status` answer from `offset`, each with where it
/// starts; only the first with `req_one`.
pub fn extents(
    offset: u64,
    extents: &[Extent],
    req_one: bool,
) -> impl Iterator<Item = (u64, Extent)> + '_ {
    extents_at(offset, extents).take(if req_one { 1 } else { usize::MAX })
}

#[cfg(test)]
mod tests {
    use super::*;
    use thinnbd::nbd::BlockSizes;
    use thinnbd::service::exports::preferred_io_size;

    fn make_pool_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("metadata"), b"").unwrap();
        dir
    }

    #[test]
    fn keys_are_checked_one_by_one() {
        let mut k = Keys::new();
        assert_eq!(
            k.set("size", "1G").unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
        assert!(k.set("pool", "").unwrap_err().to_string().contains("value"));
        k.set("pool", "/p").unwrap();
        assert!(k
            .set("pool", "/q")
            .unwrap_err()
            .to_string()
            .contains("twice"));
        k.set("export", "disk").unwrap();
        k.set("config", "/c.toml").unwrap();
    }

    #[test]
    fn pool_is_required_and_must_hold_a_pool() {
        let e = Keys::new().finish().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(e.to_string().contains("pool=DIR is required"), "{e}");

        let empty = tempfile::tempdir().unwrap();
        let mut k = Keys::new();
        k.set("pool", empty.path().to_str().unwrap()).unwrap();
        let e = k.finish().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert!(e.to_string().contains("holds no pool"), "{e}");
    }

    #[test]
    fn settings_take_the_config_file_and_make_the_path_absolute() {
        let dir = make_pool_dir();
        let cfg = dir.path().join("c.toml");
        std::fs::write(
            &cfg,
            "[pool]\ndefault_volume = \"vm1\"\nno_space_policy = \"error\"\n",
        )
        .unwrap();
        let mut k = Keys::new();
        k.set("pool", dir.path().to_str().unwrap()).unwrap();
        k.set("config", cfg.to_str().unwrap()).unwrap();
        let s = k.finish().unwrap();
        assert!(s.pool_dir().is_absolute());
        assert_eq!(
            s.config.pool.dir,
            std::path::absolute(dir.path()).unwrap(),
            "pool= lands in the config as --pool does"
        );
        assert_eq!(s.default_volume.as_deref(), Some("vm1"));
        assert!(matches!(
            s.config.pool.no_space_policy,
            thinnbd::config::NoSpacePolicy::Error
        ));
        assert_eq!(s.export, None);

        let mut k = Keys::new();
        k.set("pool", dir.path().to_str().unwrap()).unwrap();
        k.set("config", dir.path().join("missing.toml").to_str().unwrap())
            .unwrap();
        assert_eq!(k.finish().unwrap_err().kind(), ErrorKind::Io);

        std::fs::write(&cfg, "[pool]\nno_such_key = 1\n").unwrap();
        let mut k = Keys::new();
        k.set("pool", dir.path().to_str().unwrap()).unwrap();
        k.set("config", cfg.to_str().unwrap()).unwrap();
        assert_eq!(k.finish().unwrap_err().kind(), ErrorKind::InvalidInput);
    }

    #[test]
    fn export_names_are_validated() {
        let dir = make_pool_dir();
        let mut k = Keys::new();
        k.set("pool", dir.path().to_str().unwrap()).unwrap();
        k.set("export", "../etc").unwrap();
        let e = k.finish().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(e.to_string().contains("export=../etc"), "{e}");
    }

    #[test]
    fn errno_follows_the_nbd_mapping() {
        assert_eq!(errno_of(ErrorKind::NoSpace), libc::ENOSPC);
        assert_eq!(errno_of(ErrorKind::OutOfBounds), libc::EINVAL);
        assert_eq!(errno_of(ErrorKind::NotFound), libc::EINVAL);
        assert_eq!(errno_of(ErrorKind::ReadOnly), libc::EPERM);
        assert_eq!(errno_of(ErrorKind::Corrupt), libc::EIO);
        assert_eq!(errno_of(ErrorKind::Unsupported), libc::ENOTSUP);
        assert_eq!(errno_of(ErrorKind::Busy), libc::ESHUTDOWN);
    }

    #[test]
    fn block_sizes_are_powers_of_two_within_limits() {
        let block_sizes = |pool_block| {
            let s = BlockSizes::new(preferred_io_size(pool_block), MAX_REQUEST);
            (s.minimum, s.preferred, s.maximum)
        };
        assert_eq!(block_sizes(64 << 10), (1, 64 << 10, 64 << 20));
        assert_eq!(block_sizes(192 << 10), (1, 128 << 10, 64 << 20));
        assert_eq!(block_sizes(1 << 30), (1, 2 << 20, 64 << 20));
        assert_eq!(block_sizes(0), (1, 4096, 64 << 20));
    }

    #[test]
    fn extents_follow_the_runs() {
        let runs = [(4096, true), (0, false), (8192, false), (100, true)]
            .map(|(length, mapped)| Extent::new(length, mapped));
        let all: Vec<_> = extents(1000, &runs, false).collect();
        assert_eq!(
            all.iter()
                .map(|&(at, e)| (at, e.length, e.hole))
                .collect::<Vec<_>>(),
            vec![(1000, 4096, false), (5096, 8192, true), (13288, 100, false)]
        );
        assert_eq!(extents(1000, &runs, true).collect::<Vec<_>>(), all[..1]);
        assert_eq!(extents(0, &[], false).count(), 0);
    }

    #[test]
    fn c_text_never_fails() {
        assert_eq!(c_text("a\0b").to_str().unwrap(), "a\\0b");
        assert_eq!(c_text("plain").to_str().unwrap(), "plain");
    }
}
