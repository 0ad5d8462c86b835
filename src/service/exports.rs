//! The one adapter from thin volumes to exports: `ExportSource` over the pool directory's
//! volumes and `ExportBackend` over one active volume. Both frontends, the NBD server
//! (`thinnbd serve`) and the nbdkit plugin, serve through it, so every rule about what a
//! volume does as an export lives here once: the fast-zero refusal, `cache` as a metadata
//! walk, the preferred block size, extents, which writes may take the engine's quick path,
//! and the `qemu:dirty-bitmap:NAME` context each volume offers for every other volume of its
//! snapshot family (the blocks the two map differently), and each volume's access list (a
//! client sees and opens only the volumes granted to it, read-only where the grant says so).
//! The frontends never reach the engine themselves.

use std::sync::Arc;

use crate::engine::NOWAIT_WRITE_MAX;
use crate::error::{fail, ErrorKind, Result};
use crate::nbd::codec::{META_DIRTY_BITMAP_PREFIX, STATE_DIRTY};
use crate::nbd::{
    ContextExtent, ExportBackend, ExportInfo, ExportSource, Extent, PeerIdentity,
    MAX_CONTEXT_EXTENTS,
};
use crate::volume::{Access, ActiveVolume, Volumes};

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

    /// The pool's preferred I/O size (every volume of a pool has the same), for a frontend
    /// that asks before it has a volume open.
    pub fn preferred_block_size(&self) -> u32 {
        preferred_io_size(self.volumes.pool().block_size())
    }
}

/// The pool block (no read-modify-write below it), kept within 4 KiB..=2 MiB.
pub fn preferred_io_size(pool_block: u64) -> u32 {
    u32::try_from(pool_block.clamp(4096, 2 << 20)).unwrap_or(4096)
}

impl ExportSource for VolumeExports {
    fn list(&self, peer: &PeerIdentity) -> Vec<ExportInfo> {
        let identities = peer.names();
        self.volumes
            .visible_to(&identities)
            .into_iter()
            .map(|v| {
                let read_only = v.access_for(&identities) == Some(Access::ReadOnly);
                ExportInfo {
                    description: describe(&v.name, v.size, v.origin.as_deref(), read_only),
                    name: v.name,
                }
            })
            .collect()
    }

    fn default_export(&self, peer: &PeerIdentity) -> Option<String> {
        let names: Vec<String> = (self.volumes.visible_to(&peer.names()).into_iter())
            .map(|v| v.name)
            .collect();
        match &self.default_export {
            Some(d) if names.contains(d) => Some(d.clone()),
            _ if names.len() == 1 => names.into_iter().next(),
            _ => None,
        }
    }

    fn open(&self, name: &str, peer: &PeerIdentity) -> Result<Arc<dyn ExportBackend>> {
        let (active, access) = self.volumes.open_volume_for(name, &peer.names())?;
        Ok(Arc::new(VolumeExport {
            active,
            read_only: access == Access::ReadOnly,
            block_size: self.volumes.pool().block_size(),
            volumes: Arc::clone(&self.volumes),
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
    /// The volume's own flag or this client's read-only grant.
    read_only: bool,
    block_size: u64,
    /// Where the volume's snapshot family is looked up, afresh for every request: a volume
    /// deleted since the client chose its context fails the request instead of answering
    /// from a stale list.
    volumes: Arc<Volumes>,
}

impl VolumeExport {
    /// The family member a `qemu:dirty-bitmap:NAME` context compares against, as it is now.
    fn bitmap_reference(&self, context: &str) -> Result<crate::thin::metadata::ThinId> {
        let not_offered = || {
            fail(
                ErrorKind::NotFound,
                format!(
                    "metadata context {context:?}: no such snapshot related to volume {:?} (deleted?)",
                    self.active.name
                ),
            )
        };
        let Some(name) = context.strip_prefix(META_DIRTY_BITMAP_PREFIX) else {
            return not_offered();
        };
        let family = self.volumes.family(&self.active.name)?;
        match family.into_iter().find(|v| v.name == name) {
            Some(v) => Ok(v.thin_id),
            None => not_offered(),
        }
    }
}

impl VolumeExport {
    /// The pool's data lives across the network (see `DataStore::is_remote`).
    fn remote_data(&self) -> bool {
        self.volumes.pool().data_store().is_remote()
    }

    /// Runs a change (or a flush) only while this process owns the pool, taking a `Fenced`
    /// failure as the loss of it; what it makes `durable` (a flush, FUA) is acknowledged only
    /// after proving the ownership held to the end, so nothing acknowledged comes after a
    /// takeover.
    fn changing(&self, durable: bool, change: impl FnOnce() -> Result<()>) -> Result<()> {
        self.volumes.check_owned()?;
        self.volumes.note_result(change())?;
        if durable {
            self.volumes.confirm_owned()?;
        }
        Ok(())
    }
}

impl ExportBackend for VolumeExport {
    fn size(&self) -> u64 {
        self.active.thin.size()
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn preferred_block_size(&self) -> u32 {
        preferred_io_size(self.block_size)
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.active.thin.read(offset, buf)
    }

    fn try_read_nowait(&self, offset: u64, buf: &mut [u8]) -> Option<()> {
        self.active.thin.try_read_cached(offset, buf)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.changing(fua, || self.active.thin.write(offset, data, fua))
    }

    fn try_write_nowait(&self, offset: u64, data: &[u8]) -> Option<()> {
        // A pool lost to another owner answers on the slow path, which says so.
        self.volumes.check_owned().ok()?;
        self.active.thin.try_write_nowait(offset, data)
    }

    fn nowait_write_max(&self) -> usize {
        // A remote store's write is a network round trip: never on the event loop.
        if self.remote_data() {
            0
        } else {
            NOWAIT_WRITE_MAX
        }
    }

    fn write_turns(&self) -> bool {
        !self.remote_data()
    }

    fn flush(&self) -> Result<()> {
        self.changing(true, || self.active.thin.flush())
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.changing(fua, || self.active.thin.discard(offset, len, fua))
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
        self.changing(fua, || {
            self.active.thin.write_zeroes(offset, len, may_unmap, fua)
        })
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        Ok(self
            .active
            .thin
            .block_status(offset, len)?
            .into_iter()
            .map(|(length, mapped)| Extent::new(length, mapped))
            .collect())
    }

    fn meta_contexts(&self) -> Vec<String> {
        match self.volumes.family(&self.active.name) {
            Ok(family) => family
                .into_iter()
                .map(|v| format!("{META_DIRTY_BITMAP_PREFIX}{}", v.name))
                .collect(),
            Err(e) => {
                tracing::warn!(volume = %self.active.name, "listing its family: {e}");
                Vec::new()
            }
        }
    }

    /// Dirty where the two volumes may differ: blocks mapped by one only, or to different data
    /// blocks. The walk passes over subtrees the two share, so its cost follows the change.
    fn context_status(&self, context: &str, offset: u64, len: u64) -> Result<Vec<ContextExtent>> {
        let reference = self.bitmap_reference(context)?;
        let bs = self.block_size;
        let end = offset.saturating_add(len);
        let mut extents = Vec::new();
        let mut at = offset;
        let mut cut_short = false;
        let blocks = offset / bs..end.div_ceil(bs);
        (self.volumes.pool()).changed_blocks(
            reference,
            self.active.thin.id(),
            blocks,
            &mut |first, count| {
                let start = (first * bs).max(offset);
                let stop = first.saturating_add(count).saturating_mul(bs).min(end);
                if start > at {
                    extents.push(ContextExtent {
                        length: start - at,
                        flags: 0,
                    });
                }
                extents.push(ContextExtent {
                    length: stop - start,
                    flags: STATE_DIRTY,
                });
                at = stop;
                cut_short = extents.len() >= MAX_CONTEXT_EXTENTS;
                Ok(!cut_short)
            },
        )?;
        if at < end && !cut_short {
            extents.push(ContextExtent {
                length: end - at,
                flags: 0,
            });
        }
        Ok(extents)
    }

    fn cache(&self, offset: u64, len: u64) -> Result<()> {
        // Metadata lookups for the range warm the block cache; data is left to the page cache.
        self.active.thin.block_status(offset, len).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::EngineConfig;
    use crate::nbd::codec::META_BASE_ALLOCATION;
    use crate::nbd::{extents_at, BlockSizes, WriteTurns};
    use crate::volume::{AccessChange, CreateOptions, Grant};

    /// Runs `test` on a pool of 64 KiB blocks with one 4 MiB volume "v", then shuts the pool
    /// down.
    fn with_pool(test: impl FnOnce(&Arc<Volumes>)) {
        with_pool_sized(16 << 20, 4 << 20, test);
    }

    /// [`with_pool`] with `data_size` bytes of data and a "v" of `volume_size`.
    fn with_pool_sized(data_size: u64, volume_size: u64, test: impl FnOnce(&Arc<Volumes>)) {
        let dir = tempfile::tempdir().unwrap();
        let opts = CreateOptions {
            data: None,
            data_size,
            block_size: 64 << 10,
            metadata_size: None,
            preallocate: false,
        };
        Volumes::create_pool(dir.path(), &opts, EngineConfig::default()).unwrap();
        let volumes = Volumes::open(dir.path(), EngineConfig::default()).unwrap();
        volumes.create_volume("v", volume_size).unwrap();
        test(&volumes);
        volumes.shutdown().unwrap();
    }

    /// [`with_pool`], with "v" opened as the frontends open it.
    fn with_export(test: impl FnOnce(&VolumeExports, &dyn ExportBackend)) {
        with_pool(|volumes| {
            let exports = VolumeExports::new(volumes.clone(), None);
            let export = exports.open("v", &PeerIdentity::Anonymous).unwrap();
            test(&exports, export.as_ref());
        });
    }

    #[test]
    fn preferred_block_size_is_the_pool_block_within_limits() {
        assert_eq!(preferred_io_size(64 << 10), 64 << 10);
        assert_eq!(preferred_io_size(0), 4096);
        assert_eq!(preferred_io_size(1 << 30), 2 << 20);
        // As both frontends advertise it: rounded down to a power of two.
        let advertised = |pool_block| BlockSizes::new(preferred_io_size(pool_block), 32 << 20);
        assert_eq!(
            advertised(64 << 10),
            BlockSizes {
                minimum: 1,
                preferred: 64 << 10,
                maximum: 32 << 20
            }
        );
        assert_eq!(advertised(192 << 10).preferred, 128 << 10);
        assert_eq!(advertised(1 << 30).preferred, 2 << 20);
        assert_eq!(advertised(0).preferred, 4096);
        with_export(|exports, export| {
            assert_eq!(exports.preferred_block_size(), 64 << 10);
            assert_eq!(export.preferred_block_size(), 64 << 10);
        });
    }

    #[test]
    fn fast_zero_is_refused_only_when_zeros_must_be_written() {
        with_export(|_, export| {
            export.write(0, &[7u8; 64 << 10], false).unwrap();
            // NO_HOLE with FAST_ZERO: allocating zeros is not fast.
            let e = export
                .write_zeroes(0, 64 << 10, false, true, false)
                .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Unsupported);
            let text = e.to_string();
            assert!(
                text.contains("zeroing without unmapping is not fast"),
                "{text}"
            );
            let mut back = vec![0u8; 64 << 10];
            export.read(0, &mut back).unwrap();
            assert!(back.iter().all(|&b| b == 7), "a refused zero changed data");
            // Unmapping is fast; without FAST_ZERO, NO_HOLE zeros are written.
            export.write_zeroes(0, 64 << 10, true, true, false).unwrap();
            export.write(64 << 10, &[7u8; 4096], false).unwrap();
            export
                .write_zeroes(64 << 10, 4096, false, false, false)
                .unwrap();
            let mut back = vec![9u8; 128 << 10];
            export.read(0, &mut back).unwrap();
            assert!(back.iter().all(|&b| b == 0));
        });
    }

    #[test]
    fn extents_say_where_data_is_and_holes_read_as_zeros() {
        with_export(|_, export| {
            export.write(128 << 10, &[1u8; 64 << 10], false).unwrap();
            let extents = export.block_status(0, 4 << 20).unwrap();
            let hole = Extent {
                length: 128 << 10,
                hole: true,
                zero: true,
            };
            assert_eq!(
                extents_at(0, &extents).collect::<Vec<_>>(),
                vec![
                    (0, hole),
                    (128 << 10, Extent::new(64 << 10, true)),
                    (192 << 10, Extent::new((4 << 20) - (192 << 10), false)),
                ]
            );
            // `cache` walks the same metadata and reports its errors the same way.
            export.cache(0, 4 << 20).unwrap();
            assert_eq!(
                export.cache(4 << 20, 4096).unwrap_err().kind(),
                export.block_status(4 << 20, 4096).unwrap_err().kind()
            );
        });
    }

    #[test]
    fn only_writes_up_to_the_engine_limit_are_offered_its_quick_path() {
        with_export(|_, export| {
            let turns = WriteTurns::new(export);
            assert!(turns.may_try_nowait(NOWAIT_WRITE_MAX, false));
            assert!(!turns.may_try_nowait(NOWAIT_WRITE_MAX + 1, false));
            assert!(!turns.may_try_nowait(4096, true));
            // The whole rule on a plain thread, as the plugin runs it: both sizes land.
            turns.write(export, 0, &[3u8; 4096], false).unwrap();
            let large = vec![4u8; 2 * NOWAIT_WRITE_MAX];
            turns.write(export, 1 << 20, &large, true).unwrap();
            let mut back = vec![0u8; 2 * NOWAIT_WRITE_MAX];
            export.read(1 << 20, &mut back).unwrap();
            assert_eq!(back, large);
            export.read(0, &mut back[..4096]).unwrap();
            assert!(back[..4096].iter().all(|&b| b == 3));
        });
    }

    /// `v` against its snapshot `s1`: `s1b` (a snapshot of `s1`) is family too, `lone` is
    /// not; dirty means mapped differently, cut to the asked range; a reference deleted since
    /// is an error, never a stale answer.
    #[test]
    fn dirty_bitmaps_compare_a_volume_with_each_snapshot_of_its_family() {
        with_pool(|volumes| {
            volumes.create_volume("lone", 4 << 20).unwrap();
            let exports = VolumeExports::new(volumes.clone(), None);
            let v = exports.open("v", &PeerIdentity::Anonymous).unwrap();
            v.write(0, &[1u8; 1 << 20], false).unwrap();
            volumes.snapshot("v", "s1", true).unwrap();
            volumes.snapshot("s1", "s1b", true).unwrap();
            // One whole block overwritten, and 10 bytes that make block 16 differ.
            v.write(128 << 10, &[2u8; 64 << 10], false).unwrap();
            v.write((1 << 20) + 100, &[3u8; 10], false).unwrap();

            let bitmap = |name: &str| format!("{META_DIRTY_BITMAP_PREFIX}{name}");
            assert_eq!(v.meta_contexts(), [bitmap("s1"), bitmap("s1b")]);
            assert_eq!(
                exports
                    .open("lone", &PeerIdentity::Anonymous)
                    .unwrap()
                    .meta_contexts(),
                [] as [String; 0]
            );
            let run = |length: u64, dirty: bool| ContextExtent {
                length,
                flags: if dirty { STATE_DIRTY } else { 0 },
            };
            assert_eq!(
                v.context_status(&bitmap("s1"), 0, 4 << 20).unwrap(),
                [
                    run(128 << 10, false),
                    run(64 << 10, true),
                    run((1 << 20) - (192 << 10), false),
                    run(64 << 10, true),
                    run((3 << 20) - (64 << 10), false),
                ]
            );
            assert_eq!(
                v.context_status(&bitmap("s1"), 130 << 10, 100 << 10)
                    .unwrap(),
                [run(62 << 10, true), run(38 << 10, false)]
            );
            assert_eq!(
                v.context_status(&bitmap("s1b"), 0, 64 << 10).unwrap(),
                [run(64 << 10, false)]
            );
            for not_offered in [bitmap("lone"), bitmap("v"), META_BASE_ALLOCATION.to_owned()] {
                let e = v.context_status(&not_offered, 0, 4096).unwrap_err();
                assert_eq!(e.kind(), ErrorKind::NotFound, "{not_offered}: {e}");
            }

            volumes.delete("s1").unwrap();
            let e = v.context_status(&bitmap("s1"), 0, 4096).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
            // s1b lost its origin: a family of its own now.
            assert_eq!(v.meta_contexts(), [] as [String; 0]);
        });
    }

    /// The walk behind a dirty bitmap reads the paths to what changed, not the volume: one
    /// block changed in a 256 MiB volume with every block mapped (4096 mappings, a few dozen
    /// leaves) is found by reading the paths to it and passing over the shared leaves.
    #[test]
    fn a_dirty_bitmap_costs_the_change_not_the_volume() {
        with_pool_sized(512 << 20, 256 << 20, |volumes| {
            let exports = VolumeExports::new(volumes.clone(), None);
            let v = exports.open("v", &PeerIdentity::Anonymous).unwrap();
            // A little in every block maps all of them (the fresh data file needs no zeroing).
            for block in 0..4096 {
                v.write(block << 16, &[5u8; 512], false).unwrap();
            }
            let s1 = volumes.snapshot("v", "s1", true).unwrap();
            v.write(700 << 16, &[6u8; 4096], false).unwrap();

            let mut runs = Vec::new();
            let thin_v = volumes.volume("v").unwrap().thin_id;
            let stats = (volumes.pool())
                .changed_blocks(s1.thin_id, thin_v, 0..4096, &mut |first, count| {
                    runs.push((first, count));
                    Ok(true)
                })
                .unwrap();
            assert_eq!(runs, [(700, 1)]);
            assert!(stats.shared_subtrees >= 16, "{stats:?}");
            assert!(stats.nodes_read <= 8, "{stats:?}");
        });
    }

    #[test]
    fn a_client_sees_and_opens_only_what_it_is_granted() {
        with_pool(|volumes| {
            volumes.create_volume("a", 1 << 20).unwrap();
            let allow = |name: &str, grant: &str| {
                let change = AccessChange::Allow(Grant::parse(grant).unwrap());
                volumes.set_access(name, &change).unwrap();
            };
            allow("a", "psk:alice");
            allow("v", "psk:bob,ro");
            let exports = VolumeExports::new(volumes.clone(), None);
            let alice = PeerIdentity::Psk("alice".into());
            let bob = PeerIdentity::Psk("bob".into());
            let names = |peer: &PeerIdentity| -> Vec<String> {
                exports.list(peer).into_iter().map(|e| e.name).collect()
            };
            assert_eq!(names(&alice), ["a"]);
            assert_eq!(names(&bob), ["v"]);
            assert!(names(&PeerIdentity::Anonymous).is_empty());
            assert_eq!(exports.default_export(&alice).as_deref(), Some("a"));
            assert!(!exports.open("a", &alice).unwrap().read_only());
            assert!(exports.open("v", &bob).unwrap().read_only());
            let refusal = |name: &str, peer: &PeerIdentity| {
                let e = exports.open(name, peer).err().expect("refused");
                (
                    e.kind(),
                    e.to_string().replace(&format!("{name:?}"), "NAME"),
                )
            };
            assert_eq!(refusal("v", &alice), refusal("missing", &alice));
            assert_eq!(refusal("a", &bob), refusal("missing", &bob));
            assert_eq!(
                refusal("a", &PeerIdentity::Anonymous).0,
                ErrorKind::NotFound
            );
            volumes.set_access("a", &AccessChange::Clear).unwrap();
            assert_eq!(names(&bob), ["v", "a"]);
        });
    }
}
