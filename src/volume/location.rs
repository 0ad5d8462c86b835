//! Where a pool lives, as the operator names it: a local directory, or a thin pool inside a
//! Ceph RADOS pool (`rados:POOL/NAME`). Parsing and display only; what lives where is the
//! storage seam's (`backing`).

use std::fmt;
use std::path::{Path, PathBuf};

use crate::error::{fail, Error, ErrorKind, Result};

/// The prefix that makes a location a RADOS one; any other text is a directory.
pub const RADOS_PREFIX: &str = "rados:";

/// What a build without RADOS support says when asked for a RADOS pool.
pub const NO_RADOS_SUPPORT: &str = "built without RADOS support; rebuild with --features rados";

/// A pool's location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolLocation {
    /// A pool directory: metadata, data, registry and lock files.
    Dir(PathBuf),
    /// A thin pool stored as objects of a RADOS pool.
    Rados(RadosLocation),
}

/// A thin pool in RADOS, and how to reach the cluster. The client settings are not part of
/// the location string: they come from the configuration (`[pool] ceph_conf`, `client_id`,
/// `keyring`), and librados falls back on `$CEPH_CONF` and `$CEPH_ARGS` as every Ceph tool does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RadosLocation {
    /// The RADOS pool holding the objects.
    pub pool: String,
    /// The thin pool's name, the prefix of its objects' names.
    pub name: String,
    pub ceph_conf: Option<PathBuf>,
    /// The client's id without `client.` (e.g. `admin`).
    pub client_id: Option<String>,
    pub keyring: Option<PathBuf>,
}

/// Longest thin pool name: its objects' names (`NAME.data.` and 16 hex digits) stay short.
const MAX_NAME_LEN: usize = 64;

fn bad_location(text: &str, why: &str) -> Error {
    Error::new(
        ErrorKind::InvalidInput,
        format!("pool location {text:?}: {why} (write a RADOS pool as rados:POOL/NAME)"),
    )
}

impl RadosLocation {
    /// A location with no client settings of its own (the environment's apply).
    pub fn new(pool: &str, name: &str) -> Result<RadosLocation> {
        let text = format!("{RADOS_PREFIX}{pool}/{name}");
        check_pool_name(pool).map_err(|why| bad_location(&text, &why))?;
        check_thin_pool_name(name).map_err(|why| bad_location(&text, &why))?;
        Ok(RadosLocation {
            pool: pool.to_owned(),
            name: name.to_owned(),
            ceph_conf: None,
            client_id: None,
            keyring: None,
        })
    }
}

impl RadosLocation {
    /// Where a server of this pool on this host listens for volume commands:
    /// `rados-POOL-NAME.sock` in `$XDG_RUNTIME_DIR/thinnbd/`, else in `/tmp/thinnbd-UID/`.
    pub fn control_socket(&self) -> PathBuf {
        let dir = match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
            Some(runtime) => PathBuf::from(runtime).join("thinnbd"),
            None => {
                // SAFETY: getuid has no arguments and cannot fail.
                let uid = unsafe { libc::getuid() };
                PathBuf::from(format!("/tmp/thinnbd-{uid}"))
            }
        };
        dir.join(format!("rados-{}-{}.sock", self.pool, self.name))
    }
}

/// A RADOS pool name as `ceph osd pool create` takes it: no path separator, nothing unprintable.
fn check_pool_name(pool: &str) -> std::result::Result<(), String> {
    if pool.is_empty() {
        return Err("the RADOS pool name is empty".into());
    }
    if pool
        .chars()
        .any(|c| c == '/' || c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "RADOS pool name {pool:?} may not contain '/', spaces or control characters"
        ));
    }
    Ok(())
}

/// The thin pool's name prefixes its objects' names (`NAME.pool`, `NAME.meta.N`): a '.' in it
/// would let one pool's objects pass for another's.
fn check_thin_pool_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() {
        return Err("the pool name after '/' is missing".into());
    }
    let ok = name.len() <= MAX_NAME_LEN
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_+@".contains(c));
    if !ok {
        return Err(format!(
            "pool name {name:?}: use 1-{MAX_NAME_LEN} characters of A-Z a-z 0-9 - _ + @ \
             (no '/' or '.')"
        ));
    }
    Ok(())
}

impl PoolLocation {
    /// The data block size of a new pool here when none is given. In a directory dm-thin's
    /// usual 64 KiB: a copy-on-write copies little. In RADOS every block is an object, and
    /// an object operation costs the OSD about the same at 64 KiB as at 1 MiB: 1 MiB blocks
    /// make a 1 MiB request one operation (as RBD's 4 MiB objects do) and keep the object
    /// count of a large pool (10 Mi for 10 TiB) within what a cluster lists and scrubs well.
    pub fn default_block_size(&self) -> u64 {
        match self {
            PoolLocation::Dir(_) => crate::config::DEFAULT_BLOCK_SIZE,
            PoolLocation::Rados(_) => crate::config::DEFAULT_RADOS_BLOCK_SIZE,
        }
    }

    /// `rados:POOL/NAME`, or else a directory path (write `./rados:x` for a directory of that
    /// name).
    pub fn parse(text: &str) -> Result<PoolLocation> {
        if text.is_empty() {
            return fail(ErrorKind::InvalidInput, "the pool location is empty");
        }
        let Some(rest) = text.strip_prefix(RADOS_PREFIX) else {
            return Ok(PoolLocation::Dir(PathBuf::from(text)));
        };
        let Some((pool, name)) = rest.split_once('/') else {
            return Err(bad_location(text, "the pool name after '/' is missing"));
        };
        RadosLocation::new(pool, name).map(PoolLocation::Rados)
    }

    /// The directory of a local pool.
    pub fn dir(&self) -> Option<&Path> {
        match self {
            PoolLocation::Dir(dir) => Some(dir),
            PoolLocation::Rados(_) => None,
        }
    }

    pub fn is_rados(&self) -> bool {
        matches!(self, PoolLocation::Rados(_))
    }
}

impl fmt::Display for PoolLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PoolLocation::Dir(dir) => write!(f, "{}", dir.display()),
            PoolLocation::Rados(r) => r.fmt(f),
        }
    }
}

impl fmt::Display for RadosLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{RADOS_PREFIX}{}/{}", self.pool, self.name)
    }
}

impl std::str::FromStr for PoolLocation {
    type Err = Error;

    fn from_str(text: &str) -> Result<PoolLocation> {
        PoolLocation::parse(text)
    }
}

/// Directories are what callers had before locations: they pass as they are.
impl From<&Path> for PoolLocation {
    fn from(dir: &Path) -> Self {
        PoolLocation::Dir(dir.to_path_buf())
    }
}

impl From<&PathBuf> for PoolLocation {
    fn from(dir: &PathBuf) -> Self {
        PoolLocation::Dir(dir.clone())
    }
}

impl From<PathBuf> for PoolLocation {
    fn from(dir: PathBuf) -> Self {
        PoolLocation::Dir(dir)
    }
}

impl From<&PoolLocation> for PoolLocation {
    fn from(location: &PoolLocation) -> Self {
        location.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rados_locations_parse_and_display_round_trips() {
        let loc = PoolLocation::parse("rados:rbd/pool-1").unwrap();
        let PoolLocation::Rados(r) = &loc else {
            panic!("{loc:?} is not a RADOS location");
        };
        assert_eq!((r.pool.as_str(), r.name.as_str()), ("rbd", "pool-1"));
        assert_eq!(
            (&r.ceph_conf, &r.client_id, &r.keyring),
            (&None, &None, &None)
        );
        for text in ["rados:rbd/pool-1", "rados:my.pool/a_b+c@d", "rados:p/N"] {
            let loc = PoolLocation::parse(text).unwrap();
            assert_eq!(loc.to_string(), text);
            assert_eq!(PoolLocation::parse(&loc.to_string()).unwrap(), loc);
            assert!(loc.is_rados() && loc.dir().is_none(), "{text}");
        }
    }

    #[test]
    fn a_rados_pools_control_socket_is_per_user_and_per_pool() {
        let PoolLocation::Rados(r) = PoolLocation::parse("rados:rbd/p1").unwrap() else {
            unreachable!()
        };
        let socket = r.control_socket();
        assert_eq!(
            socket.file_name().unwrap().to_str().unwrap(),
            "rados-rbd-p1.sock"
        );
        let dir = socket.parent().unwrap();
        match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
            Some(runtime) => assert_eq!(dir, Path::new(&runtime).join("thinnbd")),
            None => assert!(
                dir.to_str().unwrap().starts_with("/tmp/thinnbd-"),
                "{dir:?}"
            ),
        }
    }

    #[test]
    fn anything_else_is_a_directory_and_round_trips() {
        for text in [
            "/srv/pool",
            "./thinnbd-pool",
            "pool",
            "./rados:x/y",
            "radosx:p/n",
        ] {
            let loc = PoolLocation::parse(text).unwrap();
            assert_eq!(loc, PoolLocation::Dir(PathBuf::from(text)), "{text}");
            assert_eq!(loc.to_string(), text);
            assert_eq!(loc.dir(), Some(Path::new(text)));
        }
        assert_eq!(
            PoolLocation::from(Path::new("/p")),
            PoolLocation::Dir("/p".into())
        );
    }

    #[test]
    fn bad_rados_locations_say_what_is_wrong() {
        for (text, says) in [
            ("rados:rbd", "after '/' is missing"),
            ("rados:rbd/", "after '/' is missing"),
            ("rados:/name", "RADOS pool name is empty"),
            ("rados:", "after '/' is missing"),
            ("rados:rbd/a.b", "no '/' or '.'"),
            ("rados:rbd/a/b", "no '/' or '.'"),
            ("rados:rbd/a b", "no '/' or '.'"),
            ("rados:r b/a", "may not contain"),
        ] {
            let e = PoolLocation::parse(text).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{text}");
            let msg = e.to_string();
            assert!(
                msg.contains(says) && msg.contains(text),
                "{text}: {msg} (expected {says:?})"
            );
        }
        let long = format!("rados:rbd/{}", "n".repeat(MAX_NAME_LEN + 1));
        assert!(PoolLocation::parse(&long).is_err());
        assert!(PoolLocation::parse(&format!("rados:rbd/{}", "n".repeat(MAX_NAME_LEN))).is_ok());
        assert!(PoolLocation::parse("").is_err());
    }
}
