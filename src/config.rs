//! Configuration in one place: `config/thinnbd.toml` is read into a private serde mirror and
//! validated into [`Config`], which holds the runtime settings of each layer. Errors name the
//! file and the key.
//!
//! Names: the TOML mirror is `Raw*` and private (every key optional, unknown keys refused); a
//! layer's validated runtime settings are its `XConfig`: [`EngineConfig`] (`[engine]`, and the
//! space policy and low-water marks of `[pool]`), [`ServerConfig`] (the limits in `[server]`),
//! [`ListenConfig`] (where `thinnbd serve` listens), [`PoolConfig`] (where the pool lives and
//! how it is created) and the nbdkit plugin's `PluginConfig`. [`Config`] holds them, so
//! callers hand `config.engine` and `config.server` to their layers as they are.
//!
//! Defaults are written once, in the `Default` impls of those types (from the constants the
//! layers name): a key missing from the file keeps its default, and the shipped
//! `config/thinnbd.toml` spells out the same values (a test holds them equal). Command-line
//! flags and the plugin's `key=value` parameters land in [`Overrides`].

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::engine::EngineConfig;
use crate::error::{Error, ErrorKind, Result};
use crate::nbd::tls::TlsMode;
use crate::nbd::ServerConfig;
use crate::util::parse_size;
use crate::volume::backing::DEFAULT_LOCK_DURATION;
use crate::volume::{PoolLocation, RadosLocation};

/// The engine's policy, named here too so the config and the engine share one type.
pub use crate::engine::NoSpacePolicy;

/// The pool directory when neither the config nor the command line names one; the only one
/// `serve` creates on first start without `--create` (a mistyped path must not get a new pool).
pub const DEFAULT_POOL_DIR: &str = "./thinnbd-pool";
/// `pool.data_size`: the sparse data file of a new pool.
pub const DEFAULT_DATA_SIZE: u64 = 64 << 30;
/// `pool.block_size`: the data block size of a new pool in a directory.
pub const DEFAULT_BLOCK_SIZE: u64 = 64 << 10;
/// `pool.block_size` of a new pool in RADOS (see [`PoolLocation::default_block_size`]).
pub const DEFAULT_RADOS_BLOCK_SIZE: u64 = 1 << 20;
/// `pool.default_volume`: the volume created with a new pool, and the default export.
pub const DEFAULT_VOLUME: &str = "default";
/// `pool.default_volume_size`.
pub const DEFAULT_VOLUME_SIZE: u64 = 10 << 30;
/// `server.listen`: the NBD port on the loopback address only, so that a first start does
/// not serve the network.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10809));
/// `log.level`.
pub const DEFAULT_LOG_LEVEL: &str = "info";

/// `pool.rados_lock_duration_secs`: renewed every third of it, so at least 3 s; longer than an
/// hour would leave a dead owner's pool unserved for as long.
const RADOS_LOCK_DURATIONS: RangeInclusive<u64> = 3..=3600;

/// `server.max_request_size`: from one page up to 1G, the most the server drains of a
/// write above the limit (and far above what clients send).
const MAX_REQUEST_SIZES: RangeInclusive<u32> = 4096..=1 << 30;
/// `server.busy_poll_us`: polling longer than this costs more CPU than any wake-up saves.
const LONGEST_BUSY_POLL: Duration = Duration::from_millis(10);

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
    dir: Option<String>,
    location: Option<String>,
    ceph_conf: Option<PathBuf>,
    client_id: Option<String>,
    keyring: Option<PathBuf>,
    rados_lock_duration_secs: Option<u64>,
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
    handshake_timeout_secs: Option<u64>,
    tls: Option<String>,
    tls_certificates: Option<PathBuf>,
    tls_verify_peer: Option<bool>,
    tls_psk: Option<PathBuf>,
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

/// Where the pool lives and how `thinnbd serve` creates it when it is missing (`[pool]`; its
/// space policy and low-water marks are the engine's, in [`EngineConfig`]).
#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    /// Where the pool lives (`pool.dir` or `pool.location`; see [`location`](Self::location)
    /// for it with the client settings below).
    place: PoolLocation,
    /// The Ceph client settings of a RADOS pool (`None`: librados' own, from `$CEPH_CONF`,
    /// `$CEPH_ARGS` and /etc/ceph).
    pub ceph_conf: Option<PathBuf>,
    pub client_id: Option<String>,
    pub keyring: Option<PathBuf>,
    /// How long a RADOS pool's owner lock lasts unrenewed before others presume its owner dead.
    pub rados_lock_duration: Duration,
    /// A data file or block device used instead of `DIR/data`.
    pub data: Option<PathBuf>,
    /// Create the pool on start when its place holds none (kept by [`Config::apply`] only for
    /// [`DEFAULT_POOL_DIR`] or `--create`).
    pub create_if_missing: bool,
    /// Data size of a pool created on start, in bytes.
    pub data_size: u64,
    /// Block size of a pool created on start, in bytes (`None`: the location's default,
    /// [`PoolConfig::new_pool_block_size`]).
    pub block_size: Option<u64>,
    /// Volume created with a new pool and served as the default export (empty: none).
    pub default_volume: String,
    /// Size of `default_volume`, in bytes.
    pub default_volume_size: u64,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            place: PoolLocation::Dir(PathBuf::from(DEFAULT_POOL_DIR)),
            ceph_conf: None,
            client_id: None,
            keyring: None,
            rados_lock_duration: DEFAULT_LOCK_DURATION,
            data: None,
            create_if_missing: true,
            data_size: DEFAULT_DATA_SIZE,
            block_size: None,
            default_volume: DEFAULT_VOLUME.to_owned(),
            default_volume_size: DEFAULT_VOLUME_SIZE,
        }
    }
}

impl PoolConfig {
    /// Where the pool lives; a RADOS location carries the configured client settings.
    pub fn location(&self) -> PoolLocation {
        match &self.place {
            PoolLocation::Rados(r) => PoolLocation::Rados(RadosLocation {
                ceph_conf: r.ceph_conf.clone().or_else(|| self.ceph_conf.clone()),
                client_id: r.client_id.clone().or_else(|| self.client_id.clone()),
                keyring: r.keyring.clone().or_else(|| self.keyring.clone()),
                ..r.clone()
            }),
            dir => dir.clone(),
        }
    }

    /// The block size of a pool created on start: the configured one, or the location's
    /// default.
    pub fn new_pool_block_size(&self) -> u64 {
        self.block_size
            .unwrap_or_else(|| self.location().default_block_size())
    }

    /// Sets where the pool lives.
    pub fn set_location(&mut self, location: PoolLocation) {
        self.place = location;
    }

    /// True when the pool is the default pool directory (`./thinnbd-pool`, however spelled).
    pub fn is_default_dir(&self) -> bool {
        let Some(dir) = self.place.dir() else {
            return false;
        };
        let plain = |p: &Path| -> PathBuf {
            p.components()
                .filter(|c| !matches!(c, std::path::Component::CurDir))
                .collect()
        };
        plain(dir) == plain(Path::new(DEFAULT_POOL_DIR))
    }

    /// The volume a client that names none gets: `default_volume`, unless it is empty.
    pub fn default_export(&self) -> Option<String> {
        Some(self.default_volume.clone()).filter(|name| !name.is_empty())
    }
}

/// Where `thinnbd serve` listens (`server.listen`, `server.socket`); the NBD server itself
/// gets the bound listeners.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenConfig {
    /// TCP addresses, each host name already resolved.
    pub tcp: Vec<SocketAddr>,
    /// A unix socket.
    pub socket: Option<PathBuf>,
}

impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig {
            tcp: vec![DEFAULT_LISTEN],
            socket: None,
        }
    }
}

/// The validated configuration: each layer's runtime settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub pool: PoolConfig,
    pub engine: EngineConfig,
    pub server: ServerConfig,
    pub listen: ListenConfig,
    /// `log.level`: error, warn, info, debug or trace.
    pub log_level: String,
}

impl Default for Config {
    /// The built-in defaults, which `config/thinnbd.toml` spells out.
    fn default() -> Self {
        Config {
            pool: PoolConfig::default(),
            engine: EngineConfig::default(),
            server: ServerConfig::default(),
            listen: ListenConfig::default(),
            log_level: DEFAULT_LOG_LEVEL.to_owned(),
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

/// `pool.low_water_mark` in the engine's terms: a percentage of the pool's data (which suits
/// any pool size and follows a grown pool), or a size.
fn set_low_water_mark(engine: &mut EngineConfig, text: &str) -> Option<()> {
    if text.trim().ends_with('%') {
        engine.low_water_percent = parse_percent(text)?;
        engine.low_water_bytes = 0;
    } else {
        engine.low_water_bytes = parse_size(text)?;
        engine.low_water_percent = 0;
    }
    Some(())
}

/// Replaces a default with the value the file gives, if any.
fn set<T>(slot: &mut T, value: Option<T>) {
    if let Some(value) = value {
        *slot = value;
    }
}

/// Validation of one file: every error names it and the key.
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
    fn percent(&self, key: &str, v: Option<String>) -> Result<Option<u8>> {
        v.map(|text| {
            parse_percent(&text)
                .ok_or_else(|| self.bad(key, format!("{text:?} is not a percentage (0% to 100%)")))
        })
        .transpose()
    }

    fn size(&self, key: &str, v: Option<String>) -> Result<Option<u64>> {
        v.map(|text| {
            parse_size(&text).ok_or_else(|| {
                self.bad(
                    key,
                    format!("{text:?} is not a size (e.g. 4096, 64K, 10G, 1GiB)"),
                )
            })
        })
        .transpose()
    }

    fn at_least_one(&self, key: &str, v: Option<usize>) -> Result<Option<usize>> {
        match v {
            Some(0) => Err(self.bad(key, "must be at least 1")),
            v => Ok(v),
        }
    }

    /// `[pool]`: the pool's place and creation, and the engine's space settings.
    fn pool(&self, p: RawPool, pool: &mut PoolConfig, engine: &mut EngineConfig) -> Result<()> {
        let location = match (p.dir, p.location) {
            (Some(_), Some(_)) => {
                return Err(self.bad(
                    "pool.location",
                    "give the pool's place once: pool.dir or pool.location, not both",
                ))
            }
            (Some(text), None) => Some(("pool.dir", text)),
            (None, Some(text)) => Some(("pool.location", text)),
            (None, None) => None,
        };
        if let Some((key, text)) = location {
            pool.set_location(PoolLocation::parse(&text).map_err(|e| self.bad(key, e.message()))?);
        }
        let non_empty = |p: PathBuf| Some(p).filter(|p| !p.as_os_str().is_empty());
        set(&mut pool.ceph_conf, p.ceph_conf.map(non_empty));
        set(&mut pool.keyring, p.keyring.map(non_empty));
        if let Some(id) = p.client_id {
            let id = id.strip_prefix("client.").unwrap_or(&id);
            if id.is_empty() || id.contains(|c: char| c.is_whitespace() || c.is_control()) {
                return Err(self.bad(
                    "pool.client_id",
                    format!("{id:?} is not a Ceph client id (e.g. \"admin\" for client.admin)"),
                ));
            }
            pool.client_id = Some(id.to_owned());
        }
        if let Some(secs) = p.rados_lock_duration_secs {
            if !RADOS_LOCK_DURATIONS.contains(&secs) {
                return Err(self.bad(
                    "pool.rados_lock_duration_secs",
                    format!(
                        "must be {} to {} seconds",
                        RADOS_LOCK_DURATIONS.start(),
                        RADOS_LOCK_DURATIONS.end()
                    ),
                ));
            }
            pool.rados_lock_duration = Duration::from_secs(secs);
        }
        set(&mut pool.data, p.data.map(Some));
        set(&mut pool.create_if_missing, p.create_if_missing);
        if let Some(block_size) = self.size("pool.block_size", p.block_size)? {
            if !(64 << 10..=1 << 30).contains(&block_size) || !block_size.is_multiple_of(64 << 10) {
                return Err(self.bad("pool.block_size", "must be 64K to 1G and a multiple of 64K"));
            }
            pool.block_size = Some(block_size);
        }
        set(
            &mut pool.data_size,
            self.size("pool.data_size", p.data_size)?,
        );
        if pool.data_size < pool.new_pool_block_size() {
            return Err(self.bad("pool.data_size", "smaller than one block"));
        }
        set(&mut pool.default_volume, p.default_volume);
        if !pool.default_volume.is_empty() {
            crate::volume::registry::validate_name(&pool.default_volume)
                .map_err(|e| self.bad("pool.default_volume", e))?;
        }
        set(
            &mut pool.default_volume_size,
            self.size("pool.default_volume_size", p.default_volume_size)?,
        );
        if let Some(policy) = p.no_space_policy {
            engine.no_space_policy = match policy.as_str() {
                "queue" => NoSpacePolicy::Queue,
                "error" => NoSpacePolicy::Error,
                other => {
                    return Err(self.bad(
                        "pool.no_space_policy",
                        format!("{other:?} is not \"error\" or \"queue\""),
                    ))
                }
            };
        }
        set(
            &mut engine.queue_timeout,
            p.no_space_timeout_secs.map(Duration::from_secs),
        );
        set(
            &mut engine.metadata_low_water_percent,
            self.percent("pool.metadata_low_water", p.metadata_low_water)?
                .map(u64::from),
        );
        if let Some(text) = p.low_water_mark {
            set_low_water_mark(engine, &text).ok_or_else(|| {
                self.bad(
                    "pool.low_water_mark",
                    format!("{text:?} is not a percentage (0% to 100%) or a size (e.g. 1G)"),
                )
            })?;
        }
        Ok(())
    }

    /// `[server]`: where to listen and the NBD server's limits.
    fn server(
        &self,
        s: RawServer,
        listen: &mut ListenConfig,
        server: &mut ServerConfig,
    ) -> Result<()> {
        if let Some(addrs) = s.listen {
            listen.tcp.clear();
            for a in addrs {
                listen.tcp.extend(
                    crate::util::resolve_listen_addr(&a)
                        .map_err(|why| self.bad("server.listen", why))?,
                );
            }
        }
        if let Some(path) = s.socket {
            listen.socket = Some(path).filter(|p| !p.as_os_str().is_empty());
        }
        set(
            &mut server.max_connections,
            self.at_least_one("server.max_connections", s.max_connections)?,
        );
        set(
            &mut server.max_inflight_per_connection,
            self.at_least_one(
                "server.max_inflight_per_connection",
                s.max_inflight_per_connection,
            )?,
        );
        if let Some(bytes) = self.size("server.max_request_size", s.max_request_size)? {
            server.max_request_bytes = u32::try_from(bytes)
                .ok()
                .filter(|n| MAX_REQUEST_SIZES.contains(n))
                .ok_or_else(|| self.bad("server.max_request_size", "must be 4K to 1G"))?;
        }
        if let Some(us) = s.busy_poll_us {
            let poll = Duration::from_micros(us);
            if poll > LONGEST_BUSY_POLL {
                return Err(self.bad("server.busy_poll_us", "must be 0 to 10000"));
            }
            server.busy_poll_max = poll;
        }
        set(&mut server.thread_per_connection, s.thread_per_connection);
        if let Some(secs) = s.handshake_timeout_secs {
            if secs == 0 {
                return Err(self.bad("server.handshake_timeout_secs", "must be at least 1"));
            }
            server.handshake_timeout = Duration::from_secs(secs);
        }
        let tls = &mut server.tls;
        if let Some(mode) = s.tls {
            tls.mode = TlsMode::parse(&mode).ok_or_else(|| {
                self.bad(
                    "server.tls",
                    format!("{mode:?} is not \"off\", \"on\" or \"require\""),
                )
            })?;
        }
        let non_empty = |p: PathBuf| Some(p).filter(|p| !p.as_os_str().is_empty());
        set(&mut tls.certificates, s.tls_certificates.map(non_empty));
        set(&mut tls.verify_peer, s.tls_verify_peer);
        set(&mut tls.psk, s.tls_psk.map(non_empty));
        // Credentials may still come from the command line (`serve` checks the end result);
        // once the file names some, they must make sense together.
        if tls.certificates.is_some() || tls.psk.is_some() {
            tls.validate()
                .map_err(|(key, why)| self.bad(&format!("server.{key}"), why))?;
        }
        Ok(())
    }

    /// `[engine]`: caches and I/O sizes.
    fn engine(&self, e: RawEngine, engine: &mut EngineConfig) -> Result<()> {
        set(
            &mut engine.cell_pool_size,
            self.at_least_one("engine.cell_pool_size", e.cell_pool_size)?,
        );
        set(
            &mut engine.metadata_cache_blocks,
            self.at_least_one("engine.metadata_cache_blocks", e.metadata_cache_blocks)?,
        );
        set(
            &mut engine.mapping_cache_slots,
            self.at_least_one("engine.mapping_cache_slots", e.mapping_cache_slots)?,
        );
        if let Some(chunk) = self.size("engine.data_write_chunk", e.data_write_chunk)? {
            if chunk != 0 && (!chunk.is_multiple_of(4096) || chunk > 1 << 30) {
                return Err(self.bad(
                    "engine.data_write_chunk",
                    "must be 0 or a multiple of 4K up to 1G",
                ));
            }
            engine.data_write_chunk = chunk;
        }
        Ok(())
    }

    fn log(&self, l: RawLog, level: &mut String) -> Result<()> {
        set(level, l.level);
        if !["error", "warn", "info", "debug", "trace"].contains(&level.as_str()) {
            return Err(self.bad(
                "log.level",
                format!("{level:?} is not error, warn, info, debug or trace"),
            ));
        }
        Ok(())
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

/// What a command line sets on top of the config file: `thinnbd serve`'s flags and the nbdkit
/// plugin's `key=value` parameters land here, and [`Config::apply`] is the one place where
/// they change the config.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Overrides {
    /// `--pool DIR|rados:POOL/NAME` / `pool=DIR`.
    pub pool: Option<PoolLocation>,
    /// `--create`: create a missing pool in any directory, not only the default one.
    pub create: bool,
    /// `--listen ADDR`, repeated; empty keeps the config's listeners.
    pub listen: Vec<SocketAddr>,
    /// `--socket PATH`.
    pub socket: Option<PathBuf>,
    /// `--tls off|on|require`.
    pub tls: Option<TlsMode>,
    /// `--tls-certificates DIR`.
    pub tls_certificates: Option<PathBuf>,
    /// `--tls-verify-peer`.
    pub tls_verify_peer: bool,
    /// `--tls-psk FILE`.
    pub tls_psk: Option<PathBuf>,
}

impl Config {
    /// Applies command-line settings on top of this config.
    pub fn apply(&mut self, overrides: Overrides) {
        if let Some(location) = overrides.pool {
            self.pool.set_location(location);
        }
        // A mistyped --pool (or config dir) must not silently get a new, empty pool.
        self.pool.create_if_missing =
            overrides.create || (self.pool.create_if_missing && self.pool.is_default_dir());
        let listen_given = !overrides.listen.is_empty();
        if listen_given {
            self.listen.tcp = overrides.listen;
        }
        if overrides.socket.is_some() {
            // Like qemu-nbd: a socket given alone replaces the TCP listeners.
            if !listen_given {
                self.listen.tcp.clear();
            }
            self.listen.socket = overrides.socket;
        }
        let tls = &mut self.server.tls;
        set(&mut tls.mode, overrides.tls);
        // Credentials given on the command line replace the config's, of either kind.
        if overrides.tls_certificates.is_some() || overrides.tls_psk.is_some() {
            tls.certificates = overrides.tls_certificates;
            tls.psk = overrides.tls_psk;
        }
        tls.verify_peer |= overrides.tls_verify_peer;
    }

    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("reading config {}", path.display()), e))?;
        Config::from_toml(&text, &path.display().to_string())
    }

    /// The defaults with what `text` sets on top, validated.
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
        let mut config = Config::default();
        c.pool(raw.pool, &mut config.pool, &mut config.engine)?;
        c.server(raw.server, &mut config.listen, &mut config.server)?;
        c.engine(raw.engine, &mut config.engine)?;
        c.log(raw.log, &mut config.log_level)?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `text` (in file `f.toml`) is refused with an error naming `key` and the file.
    fn assert_refused_naming_key(text: &str, key: &str) {
        let msg = Config::from_toml(text, "f.toml").unwrap_err().to_string();
        assert!(msg.contains(key) && msg.contains("f.toml"), "{text}: {msg}");
    }

    /// Compares by the `Debug` text, which shows every field: the layers' configs have no
    /// `PartialEq`, as nothing but these tests compares them.
    fn assert_same<T: std::fmt::Debug>(a: &T, b: &T, what: &str) {
        assert_eq!(format!("{a:#?}"), format!("{b:#?}"), "{what}");
    }

    #[test]
    fn shipped_config_equals_the_built_in_defaults() {
        let shipped = Config::from_toml(DEFAULT_CONFIG_TOML, "config/thinnbd.toml").unwrap();
        let built_in = Config::default();
        assert_same(
            &shipped,
            &built_in,
            "config/thinnbd.toml must spell out exactly the defaults",
        );
        assert_same(
            &Config::from_toml("", "empty").unwrap(),
            &built_in,
            "a missing key keeps its default",
        );
        // A layer built without a config file (a test, an embedder) behaves as `thinnbd
        // serve` with none.
        assert_same(&shipped.engine, &EngineConfig::default(), "engine defaults");
        assert_same(&shipped.server, &ServerConfig::default(), "server defaults");
        assert_eq!(shipped.pool, PoolConfig::default());
        assert_eq!(shipped.listen, ListenConfig::default());
        // The values the shipped file's comments and the operator's guide state.
        assert_eq!(shipped.pool.block_size, None);
        assert_eq!(shipped.pool.new_pool_block_size(), 64 << 10);
        assert_eq!(shipped.pool.data_size, 64 << 30);
        assert_eq!(
            shipped.listen.tcp,
            vec!["127.0.0.1:10809".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(shipped.engine.low_water_percent, 10);
        assert_eq!(shipped.engine.low_water_bytes, 0);
        assert_eq!(shipped.engine.metadata_low_water_percent, 20);
        assert_eq!(shipped.engine.no_space_policy, NoSpacePolicy::Queue);
        assert_eq!(shipped.engine.queue_timeout, Duration::from_secs(60));
        assert_eq!(shipped.server.busy_poll_max, Duration::from_micros(100));
        assert_eq!(shipped.log_level, "info");
    }

    #[test]
    fn default_max_request_size_is_what_nbd_server_and_nbdkit_accept() {
        let empty = Config::from_toml("", "empty").unwrap();
        assert_eq!(empty.server.max_request_bytes, 64 << 20);
    }

    #[test]
    fn max_request_size_out_of_range_is_an_error_not_a_default() {
        for bad in ["1K", "2G", "5G", "16T"] {
            let e = Config::from_toml(
                &format!("[server]\nmax_request_size = \"{bad}\"\n"),
                "f.toml",
            )
            .unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.contains("server.max_request_size") && msg.contains("f.toml"),
                "{bad}: {msg}"
            );
        }
        for (good, bytes) in [("4K", 4096), ("32M", 32 << 20), ("1G", 1 << 30)] {
            let c = Config::from_toml(
                &format!("[server]\nmax_request_size = \"{good}\"\n"),
                "f.toml",
            )
            .unwrap();
            assert_eq!(c.server.max_request_bytes, bytes, "{good}");
        }
    }

    #[test]
    fn only_the_default_pool_dir_counts_as_default() {
        let with_dir = |dir: &str| {
            let mut c = Config::default();
            c.pool.set_location(PoolLocation::Dir(dir.into()));
            c.pool.is_default_dir()
        };
        assert!(Config::default().pool.is_default_dir());
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
    fn the_default_export_is_the_default_volume_unless_empty() {
        assert_eq!(
            Config::default().pool.default_export().as_deref(),
            Some("default")
        );
        let none = Config::from_toml("[pool]\ndefault_volume = \"\"\n", "x").unwrap();
        assert_eq!(none.pool.default_export(), None);
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
        let e = Config::from_toml("[server]\nmax_connections = 0\n", "f.toml").unwrap_err();
        assert!(e.to_string().contains("server.max_connections"), "{e}");
        let e = Config::from_toml("[engine]\ndata_write_chunk = \"6K\"\n", "f.toml").unwrap_err();
        assert!(e.to_string().contains("engine.data_write_chunk"), "{e}");
        let e = Config::from_toml("[log]\nlevel = \"loud\"\n", "f.toml").unwrap_err();
        assert!(e.to_string().contains("log.level"), "{e}");
        let whole = Config::from_toml("[engine]\ndata_write_chunk = \"0\"\n", "f.toml").unwrap();
        assert_eq!(whole.engine.data_write_chunk, 0);
        let off = Config::from_toml("[server]\nbusy_poll_us = 0\n", "f.toml").unwrap();
        assert!(off.server.busy_poll_max.is_zero());
        assert!(off.server.thread_per_connection, "the default");
        let pooled =
            Config::from_toml("[server]\nthread_per_connection = false\n", "f.toml").unwrap();
        assert!(!pooled.server.thread_per_connection);
        let e = Config::from_toml("[server]\nthread_per_connection = 1\n", "f.toml").unwrap_err();
        assert!(e.to_string().contains("thread_per_connection"), "{e}");
    }

    #[test]
    fn the_file_lands_in_each_layers_config() {
        let c = Config::from_toml(
            "[pool]\nno_space_timeout_secs = 5\nmetadata_low_water = \"0%\"\n\
             [server]\nmax_connections = 3\nmax_inflight_per_connection = 7\n\
             socket = \"/run/t.sock\"\nlisten = []\n\
             [engine]\ncell_pool_size = 11\nmetadata_cache_blocks = 12\n\
             mapping_cache_slots = 13\ndata_write_chunk = \"64K\"\n\
             [log]\nlevel = \"debug\"\n",
            "x",
        )
        .unwrap();
        assert_eq!(c.engine.queue_timeout, Duration::from_secs(5));
        assert_eq!(c.engine.metadata_low_water_percent, 0, "0% turns it off");
        assert_eq!(c.server.max_connections, 3);
        assert_eq!(c.server.max_inflight_per_connection, 7);
        assert_eq!(c.listen.tcp, Vec::<SocketAddr>::new());
        assert_eq!(c.listen.socket, Some(PathBuf::from("/run/t.sock")));
        assert_eq!(c.engine.cell_pool_size, 11);
        assert_eq!(c.engine.metadata_cache_blocks, 12);
        assert_eq!(c.engine.mapping_cache_slots, 13);
        assert_eq!(c.engine.data_write_chunk, 64 << 10);
        assert_eq!(c.log_level, "debug");
    }

    #[test]
    fn low_water_mark_is_a_percentage_by_default_and_takes_sizes() {
        let d = Config::default();
        assert_eq!(
            (d.engine.low_water_percent, d.engine.low_water_bytes),
            (10, 0)
        );
        let c = Config::from_toml("[pool]\nlow_water_mark = \"25%\"\n", "x").unwrap();
        assert_eq!(
            (c.engine.low_water_percent, c.engine.low_water_bytes),
            (25, 0)
        );
        let c = Config::from_toml("[pool]\nlow_water_mark = \"2G\"\n", "x").unwrap();
        assert_eq!(
            (c.engine.low_water_percent, c.engine.low_water_bytes),
            (0, 2 << 30)
        );
        assert_eq!(
            c.engine.low_water_for(8192, 1 << 20),
            2048,
            "a size counts in the pool's own blocks"
        );
        assert_eq!(c.engine.low_water_for(8192, 64 << 10), 32768);
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
        let engine_policy: crate::engine::NoSpacePolicy = c.engine.no_space_policy;
        assert_eq!(engine_policy, crate::engine::NoSpacePolicy::Error);
        assert_eq!(
            Config::default().engine.no_space_policy,
            crate::engine::NoSpacePolicy::Queue
        );
    }

    #[test]
    fn overrides_land_in_the_config() {
        let mut c = Config::default();
        c.apply(Overrides::default());
        assert!(
            c.pool.create_if_missing,
            "the default dir keeps create_if_missing"
        );
        assert_eq!(c.listen, ListenConfig::default());

        let mut c = Config::default();
        c.apply(Overrides {
            pool: Some(PathBuf::from("/srv/pool").into()),
            socket: Some("/run/t.sock".into()),
            ..Overrides::default()
        });
        assert_eq!(c.pool.location(), PoolLocation::Dir("/srv/pool".into()));
        assert!(
            !c.pool.create_if_missing,
            "a named dir is created only on request"
        );
        assert!(c.listen.tcp.is_empty(), "a socket alone replaces TCP");
        assert_eq!(c.listen.socket, Some(PathBuf::from("/run/t.sock")));

        let addr: SocketAddr = "127.0.0.1:10900".parse().unwrap();
        let mut c = Config::default();
        c.apply(Overrides {
            pool: Some(PathBuf::from("/srv/pool").into()),
            create: true,
            listen: vec![addr],
            socket: Some("/run/t.sock".into()),
            ..Overrides::default()
        });
        assert!(c.pool.create_if_missing);
        assert_eq!(c.listen.tcp, vec![addr]);
        assert_eq!(c.listen.socket, Some(PathBuf::from("/run/t.sock")));
    }

    #[test]
    fn tls_keys_name_themselves_when_wrong() {
        let c = Config::from_toml(
            "[server]\ntls = \"require\"\ntls_certificates = \"/etc/t\"\n\
             tls_verify_peer = true\nhandshake_timeout_secs = 5\n",
            "f.toml",
        )
        .unwrap();
        assert_eq!(c.server.tls.mode, TlsMode::Require);
        assert_eq!(c.server.tls.certificates, Some(PathBuf::from("/etc/t")));
        assert!(c.server.tls.verify_peer);
        assert_eq!(c.server.handshake_timeout, Duration::from_secs(5));
        // Credentials may come with the command line.
        let on = Config::from_toml("[server]\ntls = \"on\"\n", "f.toml").unwrap();
        assert_eq!(on.server.tls.mode, TlsMode::On);
        for (text, key) in [
            ("tls = \"yes\"", "server.tls"),
            (
                "tls_verify_peer = true\ntls_psk = \"k\"",
                "server.tls_verify_peer",
            ),
            (
                "tls_psk = \"k\"\ntls_certificates = \"d\"",
                "server.tls_psk",
            ),
            (
                "handshake_timeout_secs = 0",
                "server.handshake_timeout_secs",
            ),
        ] {
            assert_refused_naming_key(&format!("[server]\n{text}\n"), key);
        }
    }

    #[test]
    fn tls_flags_replace_the_configs_credentials() {
        let mut c =
            Config::from_toml("[server]\ntls = \"on\"\ntls_psk = \"/k\"\n", "f.toml").unwrap();
        c.apply(Overrides {
            tls: Some(TlsMode::Require),
            tls_certificates: Some("/d".into()),
            tls_verify_peer: true,
            ..Overrides::default()
        });
        assert_eq!(c.server.tls.mode, TlsMode::Require);
        assert_eq!(c.server.tls.certificates, Some(PathBuf::from("/d")));
        assert_eq!(c.server.tls.psk, None);
        assert!(c.server.tls.verify_peer);
        assert!(c.server.tls.validate().is_ok());
    }

    #[test]
    fn a_rados_location_and_its_client_settings_come_from_the_file() {
        let c = Config::from_toml(
            "[pool]\nlocation = \"rados:rbd/tank\"\nceph_conf = \"/etc/ceph/x.conf\"\n\
             client_id = \"client.thinnbd\"\nkeyring = \"/etc/ceph/x.keyring\"\n\
             rados_lock_duration_secs = 12\n",
            "f.toml",
        )
        .unwrap();
        let PoolLocation::Rados(r) = c.pool.location() else {
            panic!("{:?} is not a RADOS location", c.pool.location());
        };
        assert_eq!((r.pool.as_str(), r.name.as_str()), ("rbd", "tank"));
        assert_eq!(r.ceph_conf, Some(PathBuf::from("/etc/ceph/x.conf")));
        assert_eq!(
            r.client_id.as_deref(),
            Some("thinnbd"),
            "client. is implied"
        );
        assert_eq!(r.keyring, Some(PathBuf::from("/etc/ceph/x.keyring")));
        assert_eq!(c.pool.rados_lock_duration, Duration::from_secs(12));
        assert!(!c.pool.is_default_dir());
        assert_eq!(
            c.pool.new_pool_block_size(),
            1 << 20,
            "a new pool in RADOS has 1 MiB blocks unless told"
        );
        let c = Config::from_toml(
            "[pool]\nlocation = \"rados:rbd/tank\"\nblock_size = \"128K\"\n",
            "f.toml",
        )
        .unwrap();
        assert_eq!(c.pool.new_pool_block_size(), 128 << 10);
        // `dir` takes a location too, and a directory in either key is a directory.
        let c = Config::from_toml("[pool]\ndir = \"rados:rbd/t2\"\n", "f.toml").unwrap();
        assert_eq!(c.pool.location().to_string(), "rados:rbd/t2");
        let c = Config::from_toml("[pool]\nlocation = \"/srv/p\"\n", "f.toml").unwrap();
        assert_eq!(c.pool.location(), PoolLocation::Dir("/srv/p".into()));
        assert_eq!(
            Config::default().pool.rados_lock_duration,
            Duration::from_secs(30)
        );
    }

    #[test]
    fn bad_rados_settings_name_key_and_file() {
        for (text, key) in [
            ("location = \"rados:rbd\"", "pool.location"),
            ("dir = \"rados:rbd/a.b\"", "pool.dir"),
            ("dir = \"/a\"\nlocation = \"/b\"", "pool.location"),
            ("client_id = \"\"", "pool.client_id"),
            ("client_id = \"client.\"", "pool.client_id"),
            (
                "rados_lock_duration_secs = 2",
                "pool.rados_lock_duration_secs",
            ),
            (
                "rados_lock_duration_secs = 7200",
                "pool.rados_lock_duration_secs",
            ),
        ] {
            assert_refused_naming_key(&format!("[pool]\n{text}\n"), key);
        }
    }

    #[test]
    fn the_command_lines_pool_replaces_the_files_and_keeps_its_client_settings() {
        let mut c = Config::from_toml(
            "[pool]\nlocation = \"rados:rbd/a\"\nclient_id = \"x\"\n",
            "f.toml",
        )
        .unwrap();
        c.apply(Overrides {
            pool: Some(PoolLocation::Rados(
                RadosLocation::new("other", "b").unwrap(),
            )),
            ..Overrides::default()
        });
        let PoolLocation::Rados(r) = c.pool.location() else {
            panic!("not RADOS");
        };
        assert_eq!(r.to_string(), "rados:other/b");
        assert_eq!(r.client_id.as_deref(), Some("x"));
        assert!(!c.pool.create_if_missing);
        c.apply(Overrides {
            pool: Some(PathBuf::from("/srv/p").into()),
            ..Overrides::default()
        });
        assert_eq!(c.pool.location(), PoolLocation::Dir("/srv/p".into()));
    }

    #[test]
    fn sizes_take_suffixes() {
        let c =
            Config::from_toml("[pool]\ndata_size = \"2T\"\nblock_size = \"1M\"\n", "x").unwrap();
        assert_eq!(c.pool.data_size, 2 << 40);
        assert_eq!(c.pool.block_size, Some(1 << 20));
    }
}
