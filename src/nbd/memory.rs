//! A sparse in-memory export and a named set of them, for tests and examples.
//!
//! Storage is a map of 4 KiB pages; a page that was never written (or was trimmed whole) is a
//! hole and reads as zeros. Nothing here is durable, so `flush` has nothing to do.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::backend::{ExportBackend, ExportInfo, ExportSource, Extent, PeerIdentity};
use crate::error::{fail, ErrorKind, Result};

/// The page size as the backend seam tells it (the preferred block size); the others follow.
const PAGE_SIZE_U32: u32 = 4096;
pub const PAGE_SIZE: usize = PAGE_SIZE_U32 as usize;
const PAGE: u64 = PAGE_SIZE_U32 as u64;

type Pages = BTreeMap<u64, Box<[u8]>>;

/// A sparse in-memory export.
pub struct MemoryExport {
    size: u64,
    read_only: bool,
    fast_zero: bool,
    pages: RwLock<Pages>,
}

impl MemoryExport {
    /// A writable export of `size` bytes, all holes.
    pub fn new(size: u64) -> Self {
        MemoryExport {
            size,
            read_only: false,
            fast_zero: true,
            pages: RwLock::new(Pages::new()),
        }
    }

    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// When false, FAST_ZERO requests fail with `Unsupported` (as a backend that would have to
    /// write zeros does).
    pub fn fast_zero(mut self, fast_zero: bool) -> Self {
        self.fast_zero = fast_zero;
        self
    }

    /// Number of allocated pages.
    pub fn allocated_pages(&self) -> usize {
        self.read_pages().len()
    }

    fn read_pages(&self) -> RwLockReadGuard<'_, Pages> {
        // A panic while holding the lock cannot leave a page half-structured (pages are plain
        // byte arrays), so a poisoned lock is still usable.
        self.pages.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_pages(&self) -> RwLockWriteGuard<'_, Pages> {
        self.pages.write().unwrap_or_else(|p| p.into_inner())
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => fail(
                ErrorKind::OutOfBounds,
                format!("range {offset}+{len} beyond export size {}", self.size),
            ),
        }
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return fail(ErrorKind::ReadOnly, "export is read-only");
        }
        Ok(())
    }

    /// Zeros [offset, offset+len), dropping pages that end up covered entirely.
    fn punch(&self, offset: u64, len: u64) {
        let mut pages = self.write_pages();
        for_each_piece(offset, len, |page, within, n| {
            if n == PAGE_SIZE {
                pages.remove(&page);
            } else if let Some(p) = pages.get_mut(&page) {
                p[within..within + n].fill(0);
                if p.iter().all(|&b| b == 0) {
                    pages.remove(&page);
                }
            }
        });
    }
}

/// Calls `f(page_index, offset_within_page, length)` for each page-sized piece of a range.
fn for_each_piece(offset: u64, len: u64, mut f: impl FnMut(u64, usize, usize)) {
    let end = offset.saturating_add(len);
    let mut pos = offset;
    while pos < end {
        let page = pos / PAGE;
        let within = (pos % PAGE) as usize;
        let n = (PAGE_SIZE - within).min(usize::try_from(end - pos).unwrap_or(usize::MAX));
        f(page, within, n);
        pos += n as u64;
    }
}

impl ExportBackend for MemoryExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn preferred_block_size(&self) -> u32 {
        PAGE_SIZE_U32
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check(offset, buf.len() as u64)?;
        let pages = self.read_pages();
        let mut done = 0;
        for_each_piece(offset, buf.len() as u64, |page, within, n| {
            let dst = &mut buf[done..done + n];
            match pages.get(&page) {
                Some(p) => dst.copy_from_slice(&p[within..within + n]),
                None => dst.fill(0),
            }
            done += n;
        });
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8], _fua: bool) -> Result<()> {
        self.check_writable()?;
        self.check(offset, data.len() as u64)?;
        let mut pages = self.write_pages();
        let mut done = 0;
        for_each_piece(offset, data.len() as u64, |page, within, n| {
            let p = pages
                .entry(page)
                .or_insert_with(|| vec![0u8; PAGE_SIZE].into_boxed_slice());
            p[within..within + n].copy_from_slice(&data[done..done + n]);
            done += n;
        });
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64, _fua: bool) -> Result<()> {
        self.check_writable()?;
        self.check(offset, len)?;
        self.punch(offset, len);
        Ok(())
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fast_only: bool,
        _fua: bool,
    ) -> Result<()> {
        self.check_writable()?;
        self.check(offset, len)?;
        if fast_only && !self.fast_zero {
            return fail(ErrorKind::Unsupported, "fast zeroing is not available");
        }
        if may_unmap {
            self.punch(offset, len);
            return Ok(());
        }
        // NO_HOLE: the range must stay allocated.
        let mut pages = self.write_pages();
        for_each_piece(offset, len, |page, within, n| {
            let p = pages
                .entry(page)
                .or_insert_with(|| vec![0u8; PAGE_SIZE].into_boxed_slice());
            p[within..within + n].fill(0);
        });
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.check(offset, len)?;
        let pages = self.read_pages();
        let mut extents: Vec<Extent> = Vec::new();
        for_each_piece(offset, len, |page, _, n| {
            let hole = !pages.contains_key(&page);
            match extents.last_mut() {
                Some(last) if last.hole == hole => last.length += n as u64,
                _ => extents.push(Extent::new(n as u64, !hole)),
            }
        });
        Ok(extents)
    }

    fn cache(&self, offset: u64, len: u64) -> Result<()> {
        self.check(offset, len)
    }
}

/// A named set of memory exports.
#[derive(Default)]
pub struct MemorySource {
    exports: RwLock<BTreeMap<String, (String, Arc<MemoryExport>)>>,
    default: RwLock<Option<String>>,
}

impl MemorySource {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) an export; the first one added becomes the default export.
    pub fn add(&self, name: &str, description: &str, export: MemoryExport) -> Arc<MemoryExport> {
        let export = Arc::new(export);
        let mut exports = self.exports.write().unwrap_or_else(|p| p.into_inner());
        exports.insert(
            name.to_owned(),
            (description.to_owned(), Arc::clone(&export)),
        );
        let mut default = self.default.write().unwrap_or_else(|p| p.into_inner());
        default.get_or_insert_with(|| name.to_owned());
        export
    }

    pub fn set_default(&self, name: Option<&str>) {
        *self.default.write().unwrap_or_else(|p| p.into_inner()) = name.map(str::to_owned);
    }

    pub fn get(&self, name: &str) -> Option<Arc<MemoryExport>> {
        let exports = self.exports.read().unwrap_or_else(|p| p.into_inner());
        exports.get(name).map(|(_, e)| Arc::clone(e))
    }
}

impl ExportSource for MemorySource {
    fn list(&self, _peer: &PeerIdentity) -> Vec<ExportInfo> {
        let exports = self.exports.read().unwrap_or_else(|p| p.into_inner());
        exports
            .iter()
            .map(|(name, (description, _))| ExportInfo {
                name: name.clone(),
                description: description.clone(),
            })
            .collect()
    }

    fn default_export(&self, _peer: &PeerIdentity) -> Option<String> {
        self.default
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn open(&self, name: &str, _peer: &PeerIdentity) -> Result<Arc<dyn ExportBackend>> {
        match self.get(name) {
            Some(e) => Ok(e),
            None => fail(ErrorKind::NotFound, format!("no export named {name:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unwritten_space_reads_zero_and_is_a_hole() {
        let m = MemoryExport::new(1 << 20);
        let mut buf = vec![1u8; 10_000];
        m.read(1000, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        assert_eq!(
            m.block_status(0, 1 << 20).unwrap(),
            vec![Extent {
                length: 1 << 20,
                hole: true,
                zero: true
            }]
        );
    }

    #[test]
    fn unaligned_write_reads_back_and_allocates_touched_pages() {
        let m = MemoryExport::new(1 << 20);
        let data: Vec<u8> = (0..9000u32).map(|i| (i % 251) as u8).collect();
        m.write(4000, &data, false).unwrap();
        let mut back = vec![0u8; 9000];
        m.read(4000, &mut back).unwrap();
        assert_eq!(back, data);
        // Bytes 4000..13000 touch pages 0..=3.
        assert_eq!(m.allocated_pages(), 4);
        let ext = m.block_status(0, 5 * PAGE).unwrap();
        assert_eq!(
            ext,
            vec![
                Extent {
                    length: 4 * PAGE,
                    hole: false,
                    zero: false
                },
                Extent {
                    length: PAGE,
                    hole: true,
                    zero: true
                }
            ]
        );
    }

    #[test]
    fn trim_punches_whole_pages_and_zeroes_partial_ones() {
        let m = MemoryExport::new(1 << 20);
        m.write(0, &vec![0xabu8; 4 * PAGE_SIZE], false).unwrap();
        m.trim(100, 2 * PAGE, false).unwrap();
        // Page 1 is gone, pages 0 and 2 keep their untouched bytes.
        assert_eq!(m.allocated_pages(), 3);
        let mut buf = vec![0u8; 4 * PAGE_SIZE];
        m.read(0, &mut buf).unwrap();
        assert!(buf[..100].iter().all(|&b| b == 0xab));
        assert!(buf[100..100 + 2 * PAGE_SIZE].iter().all(|&b| b == 0));
        assert!(buf[100 + 2 * PAGE_SIZE..].iter().all(|&b| b == 0xab));
        m.trim(0, 4 * PAGE, false).unwrap();
        assert_eq!(m.allocated_pages(), 0);
    }

    #[test]
    fn write_zeroes_no_hole_keeps_allocation_and_fast_zero_can_refuse() {
        let m = MemoryExport::new(1 << 20).fast_zero(false);
        m.write_zeroes(0, 2 * PAGE, false, false, false).unwrap();
        assert_eq!(m.allocated_pages(), 2);
        let e = m.write_zeroes(0, PAGE, true, true, false).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        m.write_zeroes(0, 2 * PAGE, true, false, false).unwrap();
        assert_eq!(m.allocated_pages(), 0);
    }

    #[test]
    fn bounds_and_read_only_are_enforced() {
        let m = MemoryExport::new(PAGE);
        let mut b = [0u8; 2];
        assert_eq!(
            m.read(PAGE - 1, &mut b).unwrap_err().kind(),
            ErrorKind::OutOfBounds
        );
        assert_eq!(
            m.trim(u64::MAX, 2, false).unwrap_err().kind(),
            ErrorKind::OutOfBounds
        );
        let ro = MemoryExport::new(PAGE).read_only(true);
        assert_eq!(
            ro.write(0, &[1], false).unwrap_err().kind(),
            ErrorKind::ReadOnly
        );
    }

    #[test]
    fn source_lists_opens_and_defaults() {
        let s = MemorySource::new();
        s.add("a", "first", MemoryExport::new(PAGE));
        s.add("b", "second", MemoryExport::new(2 * PAGE));
        assert_eq!(s.list(&PeerIdentity::Anonymous).len(), 2);
        assert_eq!(
            s.default_export(&PeerIdentity::Anonymous).as_deref(),
            Some("a")
        );
        assert_eq!(
            s.open("b", &PeerIdentity::Anonymous).unwrap().size(),
            2 * PAGE
        );
        assert_eq!(
            s.open("zz", &PeerIdentity::Anonymous)
                .err()
                .map(|e| e.kind()),
            Some(ErrorKind::NotFound)
        );
    }
}
