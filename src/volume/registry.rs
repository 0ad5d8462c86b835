//! The volume registry: names, sizes and flags of thin volumes, which dm-thin metadata does not
//! hold (LVM keeps them elsewhere too). One small TOML text, replaced atomically where the pool
//! keeps it ([`RegistryStore`]): in a pool directory, a file (write a temporary file, fsync it,
//! rename it over the old one, fsync the directory).
//!
//! Ordering with metadata commits keeps names from ever pointing at missing thins: a thin is
//! committed before its name is added, and a name is removed before its thin is deleted. A crash
//! in between leaves at worst an orphan thin with no name, which `thinnbd check` reports.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{fail, Error, ErrorKind, Result};
use crate::thin::metadata::{ThinId, MAX_THIN_ID};

pub const REGISTRY_FILE: &str = "volumes.toml";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Volume {
    pub name: String,
    pub thin_id: ThinId,
    /// Size in bytes.
    pub size: u64,
    #[serde(default)]
    pub read_only: bool,
    /// The volume this one was snapshotted from, when it is a snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// Set (and `origin` cleared) when the origin is deleted, so that a volume created later
    /// under the origin's name, which may even reuse its thin id, is not taken for it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub origin_deleted: bool,
    #[serde(default)]
    pub description: String,
    /// The clients that may see and open the volume; empty: every client the server lets in.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub access: Vec<Grant>,
}

/// One client identity allowed to use a volume, and whether only to read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// `cn:NAME`, `dn:SUBJECT`, `san:NAME` (as the certificate has it, e.g. `DNS:host`, or
    /// without the type) or `psk:USER`.
    pub who: String,
    #[serde(default)]
    pub read_only: bool,
}

/// The kinds of identity a grant can name.
const GRANT_KINDS: [&str; 4] = ["cn", "dn", "san", "psk"];

impl Grant {
    /// Parses `KIND:NAME[,ro]` as the command line writes a grant.
    pub fn parse(text: &str) -> Result<Grant> {
        let (who, read_only) = match text.strip_suffix(",ro") {
            Some(who) => (who, true),
            None => (text.strip_suffix(",rw").unwrap_or(text), false),
        };
        validate_who(who)?;
        Ok(Grant {
            who: who.to_owned(),
            read_only,
        })
    }

    /// Whether this grant names the client known by `identities` (see [`Volume::access_for`]).
    fn names(&self, identities: &[String]) -> bool {
        identities.iter().any(|id| same_identity(&self.who, id))
    }
}

/// Checks that `who` is `KIND:NAME` with a kind a grant can name.
pub fn validate_who(who: &str) -> Result<()> {
    match who.split_once(':') {
        Some((kind, name)) if GRANT_KINDS.contains(&kind) && !name.trim().is_empty() => Ok(()),
        _ => fail(
            ErrorKind::InvalidInput,
            format!("client identity {who:?}: use cn:NAME, dn:SUBJECT, san:NAME or psk:USER"),
        ),
    }
}

/// Whether a grant's `who` and a client's identity name the same client. Subjects are
/// compared part by part, so `CN=a,O=b` and `CN=a, O=b` match; a SAN may be written without
/// its type (`san:host` matches `san:DNS:host`).
fn same_identity(granted: &str, client: &str) -> bool {
    let dn_parts =
        |dn: &str| -> Vec<String> { dn.split(',').map(|p| p.trim().to_owned()).collect() };
    match (granted.split_once(':'), client.split_once(':')) {
        (Some(("dn", g)), Some(("dn", c))) => dn_parts(g) == dn_parts(c),
        (Some(("san", g)), Some(("san", c))) => {
            g == c || c.split_once(':').is_some_and(|(_, bare)| bare == g)
        }
        _ => granted == client,
    }
}

/// How a client may use a volume it is allowed to see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    ReadWrite,
    ReadOnly,
}

impl Volume {
    /// How the client known by `identities` (`cn:..`, `dn:..`, `san:..`, `psk:..`; none for a
    /// client that proved no identity) may use this volume; `None`: it may not see it at all.
    /// A read-only volume is read-only to everyone; a client named by several grants gets the
    /// widest.
    pub fn access_for(&self, identities: &[String]) -> Option<Access> {
        let granted_read_only = if self.access.is_empty() {
            false
        } else {
            let grants: Vec<&Grant> = self.access.iter().filter(|g| g.names(identities)).collect();
            if grants.is_empty() {
                return None;
            }
            grants.iter().all(|g| g.read_only)
        };
        Some(if self.read_only || granted_read_only {
            Access::ReadOnly
        } else {
            Access::ReadWrite
        })
    }
}

/// The error for a volume name that is not there, also given for one the client may not see,
/// so that the two cannot be told apart.
pub fn no_such_volume(name: &str) -> Error {
    Error::new(ErrorKind::NotFound, format!("no volume named {name:?}"))
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistryFile {
    #[serde(default)]
    volume: Vec<Volume>,
}

/// Where a registry's bytes live, replaced whole and atomically on every change.
pub trait RegistryStore: Send + Sync {
    /// The file or object, for messages.
    fn describe(&self) -> String;
    /// The stored bytes; `None` when none were ever stored (an empty registry).
    fn load(&self) -> Result<Option<Vec<u8>>>;
    /// Replaces the stored bytes durably: after a crash, either the old bytes or these.
    fn save(&self, bytes: &[u8]) -> Result<()>;
}

/// `DIR/volumes.toml` of a pool directory.
struct RegistryPath(PathBuf);

impl RegistryStore for RegistryPath {
    fn describe(&self) -> String {
        self.0.display().to_string()
    }

    fn load(&self) -> Result<Option<Vec<u8>>> {
        match fs::read(&self.0) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("reading {}", self.0.display()), e)),
        }
    }

    fn save(&self, bytes: &[u8]) -> Result<()> {
        write_atomically(&self.0, bytes)
    }
}

/// The store of the registry of pool directory `dir` (`DIR/volumes.toml`).
pub fn file_store(dir: &Path) -> Box<dyn RegistryStore> {
    Box::new(RegistryPath(dir.join(REGISTRY_FILE)))
}

/// The registry of a pool, held in memory and written through on every change.
pub struct Registry {
    store: Box<dyn RegistryStore>,
    volumes: Vec<Volume>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("store", &self.store.describe())
            .field("volumes", &self.volumes)
            .finish()
    }
}

/// Volume names become NBD export names and file-system-safe identifiers.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.+@".contains(c))
        && !name.starts_with('.');
    if !ok {
        return fail(
            ErrorKind::InvalidInput,
            format!("volume name {name:?}: use 1-128 characters of A-Z a-z 0-9 - _ . + @, not starting with '.'"),
        );
    }
    Ok(())
}

impl Registry {
    /// Loads `DIR/volumes.toml` of a pool directory; a missing file is an empty registry.
    pub fn load(dir: &Path) -> Result<Self> {
        Registry::load_from(file_store(dir))
    }

    /// Loads the registry `store` holds; nothing stored is an empty registry.
    pub fn load_from(store: Box<dyn RegistryStore>) -> Result<Self> {
        let corrupt = |why: &dyn std::fmt::Display| {
            Error::new(
                ErrorKind::Corrupt,
                format!("volume registry {}: {why}", store.describe()),
            )
        };
        let volumes = match store.load()? {
            Some(bytes) => {
                let text = std::str::from_utf8(&bytes).map_err(|e| corrupt(&e))?;
                let file: RegistryFile = toml::from_str(text).map_err(|e| corrupt(&e.message()))?;
                file.volume
            }
            None => Vec::new(),
        };
        let reg = Registry { store, volumes };
        reg.validate()?;
        Ok(reg)
    }

    fn validate(&self) -> Result<()> {
        for (i, v) in self.volumes.iter().enumerate() {
            validate_name(&v.name)
                .map_err(|e| e.within(format!("volume registry {}", self.store.describe())))?;
            for g in &v.access {
                validate_who(&g.who).map_err(|e| e.within(format!("volume {}", v.name)))?;
            }
            if v.thin_id > MAX_THIN_ID {
                return fail(
                    ErrorKind::Corrupt,
                    format!("volume {}: thin id {} is not 24-bit", v.name, v.thin_id),
                );
            }
            if self.volumes[..i]
                .iter()
                .any(|o| o.name == v.name || o.thin_id == v.thin_id)
            {
                return fail(
                    ErrorKind::Corrupt,
                    format!(
                        "volume registry {}: {} or its thin id appears twice",
                        self.store.describe(),
                        v.name
                    ),
                );
            }
        }
        Ok(())
    }

    pub fn volumes(&self) -> &[Volume] {
        &self.volumes
    }

    pub fn get(&self, name: &str) -> Result<&Volume> {
        self.volumes
            .iter()
            .find(|v| v.name == name)
            .ok_or_else(|| no_such_volume(name))
    }

    /// Renames a volume, and the origin name its snapshots record, in one durable write.
    pub fn rename(&mut self, name: &str, new_name: &str) -> Result<()> {
        validate_name(new_name)?;
        self.get(name)?;
        if self.get(new_name).is_ok() {
            return fail(
                ErrorKind::Busy,
                format!("volume {new_name:?} already exists"),
            );
        }
        let next = self
            .volumes
            .iter()
            .map(|v| {
                let mut v = v.clone();
                if v.name == name {
                    v.name = new_name.into();
                }
                if v.origin.as_deref() == Some(name) {
                    v.origin = Some(new_name.into());
                }
                v
            })
            .collect();
        self.replace(next)
    }

    pub fn by_thin(&self, id: ThinId) -> Option<&Volume> {
        self.volumes.iter().find(|v| v.thin_id == id)
    }

    /// The lowest thin id not used by a registered volume nor by `also_taken` (metadata).
    pub fn free_thin_id(&self, also_taken: &[ThinId]) -> Result<ThinId> {
        (0..=MAX_THIN_ID)
            .find(|id| self.by_thin(*id).is_none() && !also_taken.contains(id))
            .ok_or_else(|| Error::new(ErrorKind::NoSpace, "no free thin id"))
    }

    pub fn add(&mut self, volume: Volume) -> Result<()> {
        validate_name(&volume.name)?;
        if self.volumes.iter().any(|v| v.name == volume.name) {
            return fail(
                ErrorKind::Busy,
                format!("volume {:?} already exists", volume.name),
            );
        }
        let mut next = self.volumes.clone();
        next.push(volume);
        self.replace(next)
    }

    /// Removes a volume; its snapshots, in the same write, record that their origin is gone.
    pub fn remove(&mut self, name: &str) -> Result<Volume> {
        let v = self.get(name)?.clone();
        let next = self
            .volumes
            .iter()
            .filter(|o| o.name != name)
            .map(|o| {
                let mut o = o.clone();
                if o.origin.as_deref() == Some(name) {
                    o.origin = None;
                    o.origin_deleted = true;
                }
                o
            })
            .collect();
        self.replace(next)?;
        Ok(v)
    }

    pub fn update(&mut self, volume: Volume) -> Result<()> {
        self.get(&volume.name)?;
        let next = self
            .volumes
            .iter()
            .map(|o| {
                if o.name == volume.name {
                    volume.clone()
                } else {
                    o.clone()
                }
            })
            .collect();
        self.replace(next)
    }

    /// Writes the new list durably, then adopts it.
    fn replace(&mut self, volumes: Vec<Volume>) -> Result<()> {
        let text = toml::to_string(&RegistryFile {
            volume: volumes.clone(),
        })
        .map_err(|e| {
            Error::new(
                ErrorKind::InvalidInput,
                format!("encoding the volume registry: {e}"),
            )
        })?;
        self.store.save(text.as_bytes())?;
        self.volumes = volumes;
        Ok(())
    }
}

/// write, fsync, rename, fsync the directory.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    // A full host file system fails the write alone (NoSpace): the old file stays in place.
    let io_err = |what: &str, e| Error::data_io(format!("{what} {}", tmp.display()), e);
    let mut f = File::create(&tmp).map_err(|e| io_err("creating", e))?;
    let written = f
        .write_all(bytes)
        .map_err(|e| io_err("writing", e))
        .and_then(|()| f.sync_all().map_err(|e| io_err("syncing", e)));
    drop(f);
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::rename(&tmp, path)
        .map_err(|e| Error::io(format!("renaming over {}", path.display()), e))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("syncing directory {}", dir.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(name: &str, id: ThinId) -> Volume {
        Volume {
            name: name.into(),
            thin_id: id,
            size: 1 << 20,
            read_only: false,
            origin: None,
            origin_deleted: false,
            description: String::new(),
            access: Vec::new(),
        }
    }

    #[test]
    fn grants_decide_who_sees_a_volume_and_how() {
        let ids = |list: &[&str]| -> Vec<String> { list.iter().map(|s| s.to_string()).collect() };
        let open = vol("open", 0);
        assert_eq!(open.access_for(&[]), Some(Access::ReadWrite));
        let v = Volume {
            access: vec![
                Grant::parse("cn:alice").unwrap(),
                Grant::parse("psk:bob,ro").unwrap(),
                Grant::parse("dn:CN=carol,O=x").unwrap(),
                Grant::parse("san:host.example,ro").unwrap(),
            ],
            ..vol("a", 1)
        };
        assert_eq!(v.access_for(&[]), None, "anonymous");
        assert_eq!(
            v.access_for(&ids(&["psk:alice"])),
            None,
            "a PSK user is not a CN"
        );
        assert_eq!(v.access_for(&ids(&["cn:alice"])), Some(Access::ReadWrite));
        assert_eq!(v.access_for(&ids(&["psk:bob"])), Some(Access::ReadOnly));
        assert_eq!(
            v.access_for(&ids(&["dn:CN=carol, O=x", "cn:carol"])),
            Some(Access::ReadWrite)
        );
        assert_eq!(v.access_for(&ids(&["dn:CN=carol, O=y"])), None);
        assert_eq!(
            v.access_for(&ids(&["san:DNS:host.example"])),
            Some(Access::ReadOnly)
        );
        assert_eq!(
            v.access_for(&ids(&["san:DNS:host.example", "cn:alice"])),
            Some(Access::ReadWrite),
            "the widest grant wins"
        );
        let ro = Volume {
            read_only: true,
            ..v
        };
        assert_eq!(ro.access_for(&ids(&["cn:alice"])), Some(Access::ReadOnly));
        for bad in ["alice", "x509:alice", "cn:", "psk: "] {
            assert!(Grant::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_registry_without_access_lists_loads_and_grants_persist() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join(REGISTRY_FILE),
            "[[volume]]\nname = \"a\"\nthin_id = 1\nsize = 1\n",
        )
        .unwrap();
        let mut r = Registry::load(dir.path()).unwrap();
        assert!(r.get("a").unwrap().access.is_empty());
        let mut a = r.get("a").unwrap().clone();
        a.access = vec![Grant::parse("cn:alice,ro").unwrap()];
        r.update(a.clone()).unwrap();
        assert_eq!(Registry::load(dir.path()).unwrap().get("a").unwrap(), &a);
    }

    #[test]
    fn add_remove_persist() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Registry::load(dir.path()).unwrap();
        r.add(vol("a", 0)).unwrap();
        r.add(vol("b", 1)).unwrap();
        assert!(r.add(vol("a", 2)).is_err());
        assert_eq!(r.free_thin_id(&[2]).unwrap(), 3);
        r.remove("a").unwrap();
        let again = Registry::load(dir.path()).unwrap();
        assert_eq!(again.volumes(), &[vol("b", 1)]);
    }

    #[test]
    fn deleting_an_origin_marks_its_snapshots_and_rename_follows() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Registry::load(dir.path()).unwrap();
        r.add(vol("a", 0)).unwrap();
        r.add(Volume {
            origin: Some("a".into()),
            ..vol("s", 1)
        })
        .unwrap();
        r.rename("a", "b").unwrap();
        assert_eq!(r.get("s").unwrap().origin.as_deref(), Some("b"));
        assert!(r.rename("s", "b").is_err(), "a taken name");
        r.remove("b").unwrap();
        // A new volume under the old name (even with the old thin id) is not the origin.
        r.add(vol("b", 0)).unwrap();
        let again = Registry::load(dir.path()).unwrap();
        let s = again.get("s").unwrap();
        assert_eq!(s.origin, None);
        assert!(s.origin_deleted);
    }

    #[test]
    fn bad_names_and_files_are_refused() {
        assert!(validate_name("ok-name_1.2").is_ok());
        for bad in ["", ".hidden", "a/b", "sp ace", &"x".repeat(200)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join(REGISTRY_FILE),
            "[[volume]]\nname = \"a\"\nthin_id = 1\nsize = 1\nbogus = 2\n",
        )
        .unwrap();
        let e = Registry::load(dir.path()).unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
    }
}
