//! Configuration: a serde mirror of `config/thinnbd.toml` (every key optional, unknown keys
//! refused), validated into a runtime `Config`. Errors name the file and the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::error::{Error, ErrorKind, Result};
use crate::util::parse_size;
use crate::{engine, nbd};

/// The pool directory when neither the config nor the command line names one; the only one
/// `serve` creates on first start without `--create` (a mistyped path must not get a new pool).
pub const DEFAULT_POOL_DIR: &str = "./thinnbd-pool";

/// The configuration compiled in, identical to `config/thinnbd.toml`.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../config/thinnbd.toml");

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    pool: RawPool,
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    engine: RawEngine,
    #[serde(default)]
    log: RawLog,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    dir: Option<PathBuf>,
    data: Option<PathBuf>,
    create_if_missing: Option<bool>,
    data_size: Option<String>,
    block_size: Option<String>,
    default_volume: Option<String>,
    default_volume_size: Option<String>,
    no_space_policy: Option<String>,
    no_space_timeout_secs: Option<u64>,
    low_water_mark: Option<String>,
    metadata_low_water: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<Vec<String>>,
    socket: Option<PathBuf>,
    max_connections: Option<usize>,
    max_inflight_per_connection: Option<usize>,
    max_request_size: Option<String>,
    busy_poll_us: Option<u64>,
    thread_per_connection: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEngine {
    cell_pool_size: Option<usize>,
    metadata_cache_blocks: Option<usize>,
    mapping_cache_slots: Option<usize>,
    data_write_chunk: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: Option<String>,
}

/// The engine's policy, named here too so the config and the engine share one type.
pub use crate::engine::NoSpacePolicy;

#[derive(Debug, Clone, PartialEq)]
pub struct PoolSettings {
    pub dir: PathBuf,
    pub data: Option<PathBuf>,
    pub create_if_missing: bool,
    pub data_size: u64,
    pub block_size: u64,
    pub default_volume: String,
    pub default_volume_size: u64,
    pub no_space_policy: NoSpacePolicy,
    pub no_space_timeout: Duration,
    /// Free metadata, in percent of the metadata device on top of the reserve, at or below
    /// which a warning is logged and `pool status` flags the pool (0: off).
    pub metadata_low_water_percent: u64,
    pub low_water_mark: LowWaterMark,
}

/// `pool.low_water_mark`: free data space at which the pool warns, as bytes or as a
/// percentage of the pool's data size (which suits any pool size).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LowWaterMark {
    Bytes(u64),
    Percent(u8),
}

impl LowWaterMark {
    /// Parses `"10%"` (0 to 100) or a size such as `"1G"`.
    pub fn parse(text: &str) -> Option<LowWaterMark> {
        if text.trim().ends_with('%') {
            parse_percent(text).map(LowWaterMark::Percent)
        } else {
            parse_size(text).map(LowWaterMark::Bytes)
        }
    }
}

/// The one rule for percentages in the config: a whole number from 0 to 100 followed by `%`.
fn parse_percent(text: &str) -> Option<u8> {
    text.trim()
        .strip_suffix('%')
        .and_then(|n| n.trim().parse::<u8>().ok())
        .filter(|n| *n <= 100)
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServerSettings {
    pub listen: Vec<SocketAddr>,
    pub socket: Option<PathBuf>,
    pub max_connections: usize,
    pub max_inflight_per_connection: usize,
    pub max_request_size: u64,
    pub busy_poll: Duration,
    pub thread_per_connection: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EngineSettings {
    pub cell_pool_size: usize,
    pub metadata_cache_blocks: usize,
    pub mapping_cache_slots: usize,
    /// Largest single write to the data device; 0 writes each request's part of a block whole.
    pub data_write_chunk: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub pool: PoolSettings,
    pub server: ServerSettings,
    pub engine: EngineSettings,
    pub log_level: String,
}

struct Ctx<'a> {
    file: &'a str,
}

impl Ctx<'_> {
    fn bad(&self, key: &str, why: impl std::fmt::Display) -> Error {
        Error::new(
            ErrorKind::InvalidInput,
            format!("config {}: key {key}: {why}", self.file),
        )
    }

    /// A percentage written `"20%"`, 0 to 100.
    fn percent(&self, key: &str, v: Option<String>, default: &str) -> Result<u64> {
        let text = v.unwrap_or_else(|| default.to_string());
        parse_percent(&text)
            .map(u64::from)
            .ok_or_else(|| self.bad(key, format!("{text:?} is not a percentage (0% to 100%)")))
    }

    fn size(&self, key: &str, v: Option<String>, default: &str) -> Result<u64> {
        let text = v.unwrap_or_else(|| default.to_string());
        parse_size(&text).ok_or_else(|| {
            self.bad(
                key,
                format!("{text:?} is not a size (e.g. 4096, 64K, 10G, 1GiB)"),
            )
        })
    }
}

/// The dotted key (`section.key`) on the line holding byte `at` of a TOML text, when that line
/// is a `key = value` line.
fn key_at(text: &str, at: usize) -> Option<String> {
    let line_start = text.get(..at)?.rfind('\n').map_or(0, |i| i + 1);
    let rest = text.get(line_start..)?;
    let line = rest.split('\n').next()?;
    let (key, _) = line.split_once('=')?;
    let key = key.trim().trim_matches('"');
    if key.is_empty() || key.starts_with('[') {
        return None;
    }
    let section = text.get(..line_start)?.lines().rev().find_map(|l| {
        let l = l.trim();
        l.strip_prefix('[')?
            .strip_suffix(']')
            .map(|s| s.trim().to_owned())
    });
    Some(match section {
        Some(s) if !s.is_empty() => format!("{s}.{key}"),
        _ => key.to_owned(),
    })
}

impl PoolSettings {
    /// True when `dir` is the default pool directory (`./thinnbd-pool`, however spelled).
    pub fn is_default_dir(&self) -> bool {
        let plain = |p: &Path| -> PathBuf {
            p.components()
                .filter(|c| !matches!(c, std::path::Component::CurDir))
                .collect()
        };
        plain(&self.dir) == plain(Path::new(DEFAULT_POOL_DIR))
    }
}

/// What a command line sets on top of the config file: `thinnbd serve`'s flags and the nbdkit
/// plugin's `key=value` parameters land here, and [`Config::apply`] is the one place where
/// they change the config.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Overrides {
    /// `--pool DIR` / `pool=DIR`.
    pub pool_dir: Option<PathBuf>,
    /// `--create`: create a missing pool in any directory, not only the default one.
    pub create: bool,
    /// `--listen ADDR`, repeated; empty keeps the config's listeners.
    pub listen: Vec<SocketAddr>,
    /// `--socket PATH`.
    pub socket: Option<PathBuf>,
}

impl Config {
    /// Applies command-line settings on top of this config.
    pub fn apply(&mut self, overrides: Overrides) {
        if let Some(dir) = overrides.pool_dir {
            self.pool.dir = dir;
        }
        // A mistyped --pool (or config dir) must not silently get a new, empty pool.
        self.pool.create_if_missing =
            overrides.create || (self.pool.create_if_missing && self.pool.is_default_dir());
        let listen_given = !overrides.listen.is_empty();
        if listen_given {
            self.server.listen = overrides.listen;
        }
        if overrides.socket.is_some() {
            // Like qemu-nbd: a socket given alone replaces the TCP listeners.
            if !listen_given {
                self.server.listen.clear();
            }
            self.server.socket = overrides.socket;
        }
    }

    /// The built-in defaults.
    pub fn default_config() -> Config {
        Config::from_toml(DEFAULT_CONFIG_TOML, "<built-in defaults>")
            .expect("the shipped config is valid")
    }

    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("reading config {}", path.display()), e))?;
        Config::from_toml(&text, &path.display().to_string())
    }

    pub fn from_toml(text: &str, file: &str) -> Result<Config> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let at = e
                .span()
                .map(|s| text.get(s).unwrap_or("").trim().to_string())
                .unwrap_or_default();
            // serde names unknown keys but not the key of a value of the wrong type.
            let key = e
                .span()
                .and_then(|s| key_at(text, s.start))
                .map(|k| format!("key {k}: "))
                .unwrap_or_default();
            Error::new(
                ErrorKind::InvalidInput,
                format!("config {file}: {key}{} (at {at:?})", e.message().trim()),
            )
        })?;
        let c = Ctx { file };
        let p = raw.pool;
        let block_size = c.size("pool.block_size", p.block_size, "64K")?;
        if !(64 << 10..=1 << 30).contains(&block_size) || block_size % (64 << 10) != 0 {
            return Err(c.bad("pool.block_size", "must be 64K to 1G and a multiple of 64K"));
        }
        let data_size = c.size("pool.data_size", p.data_size, "64G")?;
        if data_size < block_size {
            return Err(c.bad("pool.data_size", "smaller than one block"));
        }
        let default_volume = p.default_volume.unwrap_or_else(|| "default".into());
        if !default_volume.is_empty() {
            crate::volume::registry::validate_name(&default_volume)
                .map_err(|e| c.bad("pool.default_volume", e))?;
        }
        let no_space_policy = match p.no_space_policy.as_deref().unwrap_or("queue") {
            "queue" => NoSpacePolicy::Queue,
            "error" => NoSpacePolicy::Error,
            other => {
                return Err(c.bad(
                    "pool.no_space_policy",
                    format!("{other:?} is not \"error\" or \"queue\""),
                ))
            }
        };
        let pool = PoolSettings {
            dir: p.dir.unwrap_or_else(|| PathBuf::from(DEFAULT_POOL_DIR)),
            data: p.data,
            create_if_missing: p.create_if_missing.unwrap_or(true),
            data_size,
            block_size,
            default_volume,
            default_volume_size: c.size(
                "pool.default_volume_size",
                p.default_volume_size,
                "10G",
            )?,
            no_space_policy,
            no_space_timeout: p
                .no_space_timeout_secs
                .map_or(engine::DEFAULT_QUEUE_TIMEOUT, Duration::from_secs),
            metadata_low_water_percent: c.percent(
                "pool.metadata_low_water",
                p.metadata_low_water,
                "20%",
            )?,
            low_water_mark: {
                let text = p.low_water_mark.unwrap_or_else(|| "10%".into());
                LowWaterMark::parse(&text).ok_or_else(|| {
                    c.bad(
                        "pool.low_water_mark",
                        format!("{text:?} is not a percentage (0% to 100%) or a size (e.g. 1G)"),
                    )
                })?
            },
        };
        let s = raw.server;
        let mut listen = Vec::new();
        for a in s.listen.unwrap_or_else(|| vec!["127.0.0.1:10809".into()]) {
            listen.extend(
                crate::util::resolve_listen_addr(&a).map_err(|why| c.bad("server.listen", why))?,
            );
        }
        let default_max_request = nbd::DEFAULT_MAX_REQUEST_BYTES.to_string();
        let max_request_size = c.size(
            "server.max_request_size",
            s.max_request_size,
            &default_max_request,
        )?;
        if !(4096..=1 << 30).contains(&max_request_size) {
            return Err(c.bad("server.max_request_size", "must be 4K to 1G"));
        }
        let positive = |key: &str, v: Option<usize>, d: usize| -> Result<usize> {
            match v.unwrap_or(d) {
                0 => Err(c.bad(key, "must be at least 1")),
                n => Ok(n),
            }
        };
        let server = ServerSettings {
            listen,
            socket: s.socket.filter(|p| !p.as_os_str().is_empty()),
            max_connections: positive(
                "server.max_connections",
                s.max_connections,
                nbd::DEFAULT_MAX_CONNECTIONS,
            )?,
            max_inflight_per_connection: positive(
                "server.max_inflight_per_connection",
                s.max_inflight_per_connection,
                nbd::DEFAULT_MAX_INFLIGHT_PER_CONNECTION,
            )?,
            max_request_size,
            busy_poll: match s.busy_poll_us.map(Duration::from_micros) {
                None => nbd::DEFAULT_BUSY_POLL_MAX,
                Some(d) if d <= Duration::from_millis(10) => d,
                Some(_) => return Err(c.bad("server.busy_poll_us", "must be 0 to 10000")),
            },
            thread_per_connection: s.thread_per_connection.unwrap_or(true),
        };
        let engine = EngineSettings {
            cell_pool_size: positive(
                "engine.cell_pool_size",
                raw.engine.cell_pool_size,
                engine::DEFAULT_CELL_POOL_SIZE,
            )?,
            metadata_cache_blocks: positive(
                "engine.metadata_cache_blocks",
                raw.engine.metadata_cache_blocks,
                crate::pdata::tm::DEFAULT_CACHE_BLOCKS,
            )?,
            mapping_cache_slots: positive(
                "engine.mapping_cache_slots",
                raw.engine.mapping_cache_slots,
                engine::DEFAULT_MAPPING_CACHE_SLOTS,
            )?,
            data_write_chunk: match c.size(
                "engine.data_write_chunk",
                raw.engine.data_write_chunk,
                &engine::data::DEFAULT_WRITE_CHUNK.to_string(),
            )? {
                n if n == 0 || (n % 4096 == 0 && n <= 1 << 30) => n,
                _ => {
                    return Err(c.bad(
                        "engine.data_write_chunk",
                        "must be 0 or a multiple of 4K up to 1G",
                    ))
                }
            },
        };
        let log_level = raw.log.level.unwrap_or_else(|| "info".into());
        if !["error", "warn", "info", "debug", "trace"].contains(&log_level.as_str()) {
            return Err(c.bad(
                "log.level",
                format!("{log_level:?} is not error, warn, info, debug or trace"),
            ));
        }
        Ok(Config {
            pool,
            server,
            engine,
            log_level,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_config_equals_the_built_in_defaults() {
        let shipped = Config::default_config();
        let empty = Config::from_toml("", "empty").unwrap();
        assert_eq!(
            shipped, empty,
            "config/thinnbd.toml must spell out exactly the defaults"
        );
        assert_eq!(shipped.pool.block_size, 64 << 10);
        assert_eq!(shipped.pool.data_size, 64 << 30);
        assert_eq!(
            shipped.server.listen,
            vec!["127.0.0.1:10809".parse().unwrap()]
        );
    }

    #[test]
    fn default_max_request_size_is_what_nbd_server_and_nbdkit_accept() {
        let empty = Config::from_toml("", "empty").unwrap();
        assert_eq!(empty.server.max_request_size, 64 << 20);
    }

    #[test]
    fn only_the_default_pool_dir_counts_as_default() {
        let with_dir = |dir: &str| {
            let mut c = Config::default_config();
            c.pool.dir = dir.into();
            c.pool.is_default_dir()
        };
        assert!(Config::default_config().pool.is_default_dir());
        for same in [
            "thinnbd-pool",
            "./thinnbd-pool",
            "./thinnbd-pool/",
            "././thinnbd-pool",
        ] {
            assert!(with_dir(same), "{same}");
        }
        for other in [
            "thinnbd-pool2",
            "/srv/thinnbd-pool",
            "pool",
            "../thinnbd-pool",
        ] {
            assert!(!with_dir(other), "{other}");
        }
    }

    #[test]
    fn unknown_keys_and_bad_values_name_key_and_file() {
        let e = Config::from_toml("[pool]\nbogus_key = 1\n", "my.toml").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("my.toml") && msg.contains("bogus_key"),
            "{msg}"
        );
        let e = Config::from_toml("[pool]\nblock_size = \"3K\"\n", "my.toml").unwrap_err();
        assert!(
            e.to_string().contains("pool.block_size") && e.to_string().contains("my.toml"),
            "{e}"
        );
        let e = Config::from_toml("[server]\nlisten = [\"nowhere\"]\n", "f.toml").unwrap_err();
        assert!(e.to_string().contains("server.listen"), "{e}");
        let e = Config::from_toml("[pool]\nno_space_policy = \"maybe\"\n", "f.toml").unwrap_err();
        assert!(e.to_string().contains("pool.no_space_policy"), "{e}");
        let e = Config::from_toml("[pool]\ncreate_if_missing = \"yes\"\n", "f.toml").unwrap_err();
        assert!(e.to_string().contains("pool.create_if_missing"), "{e}");
        let e = Config::from_toml("[server]\nbusy_poll_us = 20000\n", "f.toml").unwrap_err();
        assert!(e.to_string().contains("server.busy_poll_us"), "{e}");
        let e = Config::from_toml("[engine]\ndata_write_chunk = \"6K\"\n", "f.toml").unwrap_err();
        assert!(e.to_string().contains("engine.data_write_chunk"), "{e}");
        let whole = Config::from_toml("[engine]\ndata_write_chunk = \"0\"\n", "f.toml").unwrap();
        assert_eq!(whole.engine.data_write_chunk, 0);
        let off = Config::from_toml("[server]\nbusy_poll_us = 0\n", "f.toml").unwrap();
        assert!(off.server.busy_poll.is_zero());
        assert!(off.server.thread_per_connection, "the default");
        let pooled =
            Config::from_toml("[server]\nthread_per_connection = false\n", "f.toml").unwrap();
        assert!(!pooled.server.thread_per_connection);
        let e = Config::from_toml("[server]\nthread_per_connection = 1\n", "f.toml").unwrap_err();
        assert!(e.to_string().contains("thread_per_connection"), "{e}");
    }

    #[test]
    fn low_water_mark_is_a_percentage_by_default_and_takes_sizes() {
        let d = Config::default_config();
        assert_eq!(d.pool.low_water_mark, LowWaterMark::Percent(10));
        let c = Config::from_toml("[pool]\nlow_water_mark = \"25%\"\n", "x").unwrap();
        assert_eq!(c.pool.low_water_mark, LowWaterMark::Percent(25));
        let c = Config::from_toml("[pool]\nlow_water_mark = \"2G\"\n", "x").unwrap();
        assert_eq!(c.pool.low_water_mark, LowWaterMark::Bytes(2 << 30));
        for bad in ["150%", "-1%", "ten%", "lots"] {
            let e = Config::from_toml(&format!("[pool]\nlow_water_mark = \"{bad}\"\n"), "f.toml")
                .unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.contains("pool.low_water_mark") && msg.contains("f.toml"),
                "{bad}: {msg}"
            );
        }
    }

    #[test]
    fn no_space_policy_is_the_engines_own_type() {
        let c = Config::from_toml("[pool]\nno_space_policy = \"error\"\n", "x").unwrap();
        let engine_policy: crate::engine::NoSpacePolicy = c.pool.no_space_policy;
        assert_eq!(engine_policy, crate::engine::NoSpacePolicy::Error);
        assert_eq!(
            Config::default_config().pool.no_space_policy,
            crate::engine::NoSpacePolicy::Queue
        );
    }

    #[test]
    fn overrides_land_in_the_config() {
        let mut c = Config::default_config();
        c.apply(Overrides::default());
        assert!(
            c.pool.create_if_missing,
            "the default dir keeps create_if_missing"
        );
        assert_eq!(c.server, Config::default_config().server);

        let mut c = Config::default_config();
        c.apply(Overrides {
            pool_dir: Some("/srv/pool".into()),
            socket: Some("/run/t.sock".into()),
            ..Overrides::default()
        });
        assert_eq!(c.pool.dir, PathBuf::from("/srv/pool"));
        assert!(
            !c.pool.create_if_missing,
            "a named dir is created only on request"
        );
        assert!(c.server.listen.is_empty(), "a socket alone replaces TCP");
        assert_eq!(c.server.socket, Some(PathBuf::from("/run/t.sock")));

        let addr: SocketAddr = "127.0.0.1:10900".parse().unwrap();
        let mut c = Config::default_config();
        c.apply(Overrides {
            pool_dir: Some("/srv/pool".into()),
            create: true,
            listen: vec![addr],
            socket: Some("/run/t.sock".into()),
        });
        assert!(c.pool.create_if_missing);
        assert_eq!(c.server.listen, vec![addr]);
        assert_eq!(c.server.socket, Some(PathBuf::from("/run/t.sock")));
    }

    #[test]
    fn sizes_take_suffixes() {
        let c =
            Config::from_toml("[pool]\ndata_size = \"2T\"\nblock_size = \"1M\"\n", "x").unwrap();
        assert_eq!(c.pool.data_size, 2 << 40);
        assert_eq!(c.pool.block_size, 1 << 20);
    }
}
