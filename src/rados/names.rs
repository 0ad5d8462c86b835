//! The names of a pool's RADOS objects, spelt in one place.

use super::RadosLocation;

/// Metadata blocks kept in one `NAME.meta.*` object (256 x 4 KiB = 1 MiB).
pub const META_BLOCKS_PER_OBJECT: u64 = 256;

/// The object names of one pool (`NAME.*` in its RADOS pool).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolObjects {
    name: String,
}

impl PoolObjects {
    pub fn new(location: &RadosLocation) -> Self {
        PoolObjects {
            name: location.name.clone(),
        }
    }

    /// `NAME.`: every object of the pool, and nothing of another pool (names hold no '.').
    pub fn prefix(&self) -> String {
        format!("{}.", self.name)
    }

    /// The header, also the object the owner lock is taken on.
    pub fn header(&self) -> String {
        format!("{}.pool", self.name)
    }

    /// The volume registry.
    pub fn volumes(&self) -> String {
        format!("{}.volumes", self.name)
    }

    /// The current owner's record.
    pub fn owner(&self) -> String {
        format!("{}.owner", self.name)
    }

    /// The prefix of every metadata object.
    pub fn meta_prefix(&self) -> String {
        format!("{}.meta.", self.name)
    }

    /// The metadata object holding metadata block `block`.
    pub fn meta(&self, block: u64) -> String {
        format!(
            "{}{:08x}",
            self.meta_prefix(),
            block / META_BLOCKS_PER_OBJECT
        )
    }

    /// The prefix of every data object.
    pub fn data_prefix(&self) -> String {
        format!("{}.data.", self.name)
    }

    /// The object of data block `block`.
    pub fn data(&self, block: u64) -> String {
        format!("{}{block:016x}", self.data_prefix())
    }

    /// The data block an object name of this pool stands for (`None`: not a data object).
    pub fn data_block_of(&self, object: &str) -> Option<u64> {
        let hex = object.strip_prefix(&self.data_prefix())?;
        (hex.len() == 16)
            .then(|| u64::from_str_radix(hex, 16).ok())
            .flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_layout() {
        let loc = RadosLocation {
            pool: "rbd".into(),
            name: "tank".into(),
            ceph_conf: None,
            client_id: None,
            keyring: None,
        };
        let o = PoolObjects::new(&loc);
        assert_eq!(o.header(), "tank.pool");
        assert_eq!(o.volumes(), "tank.volumes");
        assert_eq!(o.owner(), "tank.owner");
        assert_eq!(o.meta(0), "tank.meta.00000000");
        assert_eq!(o.meta(255), "tank.meta.00000000");
        assert_eq!(o.meta(256 * 0x1a + 3), "tank.meta.0000001a");
        assert_eq!(o.data(0xabc), "tank.data.0000000000000abc");
        assert_eq!(o.data_block_of("tank.data.0000000000000abc"), Some(0xabc));
        assert_eq!(o.data_block_of("tank.meta.00000000"), None);
        assert_eq!(o.data_block_of("tank.data.abc"), None);
    }
}
