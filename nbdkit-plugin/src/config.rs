//! The plugin's `key=value` parameters, checked into [`PluginConfig`]: the same
//! `thinnbd::config::Config` as `thinnbd serve`'s (the TOML file of `config=`, `pool=` applied
//! as `--pool`), plus what only the plugin has (`export=`). Nothing here calls into nbdkit, so
//! all of it is unit-tested.

use std::path::{Path, PathBuf};

use thinnbd::config::{Config, Overrides};
use thinnbd::error::{fail, Error, ErrorKind, Result};
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
pub struct PluginConfig {
    /// `config=FILE` (or the defaults) with `pool=DIR` applied as `thinnbd serve` applies
    /// `--pool`. The plugin uses `config.pool` (`default_volume` as the default export) and
    /// `config.engine`; nbdkit does the listening and its own limits, so `config.listen` and
    /// `config.server` go unused.
    pub config: Config,
    /// `pool=DIR`, absolute because nbdkit changes directory to `/` when it daemonizes.
    pool_dir: PathBuf,
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
    pub fn finish(&self) -> Result<PluginConfig> {
        let Some(pool) = &self.pool else {
            return Err(bad(
                "pool=DIR is required: the pool directory made by `thinnbd pool create DIR \
                 --data-size SIZE`",
            ));
        };
        let mut config = match &self.config {
            Some(file) => Config::load(Path::new(file))?,
            None => Config::default(),
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
            pool: Some(pool_dir.clone().into()),
            ..Overrides::default()
        });
        Ok(PluginConfig {
            config,
            pool_dir,
            export: self.export.clone(),
        })
    }
}

impl PluginConfig {
    /// The pool directory (`pool=`), absolute.
    pub fn pool_dir(&self) -> &Path {
        &self.pool_dir
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
            if reg.get(name).is_ok_and(|v| !v.access.is_empty()) {
                return fail(
                    ErrorKind::InvalidInput,
                    format!(
                        "export={name}: the volume has an access list, and nbdkit {} tells a \
                         plugin nothing of who the TLS client is, so the plugin never serves it \
                         (serve it with `thinnbd serve`, or clear its list with \
                         `thinnbd volume access --clear`)",
                        crate::NBDKIT_VERSION_WITHOUT_TLS_PEER
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
    fn the_config_file_lands_with_the_path_made_absolute() {
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
        let plugin = k.finish().unwrap();
        assert!(plugin.pool_dir().is_absolute());
        assert_eq!(
            plugin.config.pool.location(),
            std::path::absolute(dir.path()).unwrap().into(),
            "pool= lands in the config as --pool does"
        );
        assert_eq!(plugin.config.pool.default_export().as_deref(), Some("vm1"));
        assert_eq!(
            plugin.config.engine.no_space_policy,
            thinnbd::config::NoSpacePolicy::Error
        );
        assert_eq!(plugin.export, None);

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
}
