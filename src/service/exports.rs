//! Thin volumes as NBD exports: `ExportSource` over the pool directory's volumes and
//! `ExportBackend` over one active volume.

use std::sync::Arc;

use crate::error::{fail, ErrorKind, Result};
use crate::nbd::{ExportBackend, ExportInfo, ExportSource, Extent};
use crate::volume::{ActiveVolume, Volumes};

/// Every volume of a pool, one export each.
pub struct VolumeExports {
    volumes: Arc<Volumes>,
    default_export: Option<String>,
}

impl VolumeExports {
    pub fn new(volumes: Arc<Volumes>, default_export: Option<String>) -> Self {
        VolumeExports {
            volumes,
            default_export,
        }
    }
}

impl ExportSource for VolumeExports {
    fn list(&self) -> Vec<ExportInfo> {
        self.volumes
            .list()
            .into_iter()
            .map(|v| ExportInfo {
                description: describe(&v.name, v.size, v.origin.as_deref(), v.read_only),
                name: v.name,
            })
            .collect()
    }

    fn default_export(&self) -> Option<String> {
        let names = self.volumes.volume_names();
        match &self.default_export {
            Some(d) if names.contains(d) => Some(d.clone()),
            _ if names.len() == 1 => names.into_iter().next(),
            _ => None,
        }
    }

    fn open(&self, name: &str) -> Result<Arc<dyn ExportBackend>> {
        let active = self.volumes.open_volume(name)?;
        Ok(Arc::new(VolumeExport {
            active,
            block_size: self.volumes.pool().block_size(),
        }))
    }
}

/// What `nbdinfo --list` shows for a volume.
pub fn describe(name: &str, size: u64, origin: Option<&str>, read_only: bool) -> String {
    let mut d = format!("thin volume {name}, {} MiB", size >> 20);
    if let Some(o) = origin {
        d.push_str(&format!(", snapshot of {o}"));
    }
    if read_only {
        d.push_str(", read-only");
    }
    d
}

/// One connection's view of an active volume; dropping it releases the connection's hold.
pub struct VolumeExport {
    active: Arc<ActiveVolume>,
    block_size: u64,
}

impl ExportBackend for VolumeExport {
    fn size(&self) -> u64 {
        self.active.thin.size()
    }

    fn read_only(&self) -> bool {
        self.active.read_only
    }

    fn preferred_block_size(&self) -> u32 {
        u32::try_from(self.block_size)
            .unwrap_or(4096)
            .clamp(4096, 2 << 20)
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.active.thin.read(offset, buf)
    }

    fn try_read_nowait(&self, offset: u64, buf: &mut [u8]) -> Option<()> {
        self.active.thin.try_read_cached(offset, buf)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.active.thin.write(offset, data, fua)
    }

    fn try_write_nowait(&self, offset: u64, data: &[u8]) -> Option<()> {
        self.active.thin.try_write_nowait(offset, data)
    }

    fn flush(&self) -> Result<()> {
        self.active.thin.flush()
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.active.thin.discard(offset, len, fua)
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fast_only: bool,
        fua: bool,
    ) -> Result<()> {
        // Unmapping is always faster than writing zeros; allocating zeros (NO_HOLE) is not.
        if fast_only && !may_unmap {
            return fail(
                ErrorKind::Unsupported,
                "zeroing without unmapping is not fast",
            );
        }
        self.active.thin.write_zeroes(offset, len, may_unmap, fua)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        Ok(self
            .active
            .thin
            .block_status(offset, len)?
            .into_iter()
            .map(|(length, mapped)| Extent {
                length,
                hole: !mapped,
                zero: !mapped,
            })
            .collect())
    }

    fn cache(&self, offset: u64, len: u64) -> Result<()> {
        // Metadata lookups for the range warm the block cache; data is left to the page cache.
        self.active.thin.block_status(offset, len).map(drop)
    }
}
