//! Metadata in tests: the two independent checkers (`thin_check`, `verify_meta.py`), mappings
//! from `thin_dump`, an image-backed BlockIo that records out-of-range reads, and a pool built
//! through the API with snapshots and several commits.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use thinnbd::pdata::block_io::{Block, BlockIo, BLOCK_SIZE};
use thinnbd::pdata::mem_block_io::MemBlockIo;
use thinnbd::thin::ThinMetadata;
use thinnbd::{Error, ErrorKind, Result};

use super::tools::{require_tool, tool, verify_meta_script};

pub fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/testdata")
        .join(name)
}

/// A metadata device over an in-memory image; reads past the end are refused and counted.
pub struct ImageIo {
    image: Mutex<Vec<u8>>,
    nr_blocks: u64,
    pub out_of_range: AtomicU64,
}

impl ImageIo {
    pub fn new(image: Vec<u8>) -> Arc<Self> {
        let nr_blocks = (image.len() / BLOCK_SIZE) as u64;
        Arc::new(ImageIo {
            image: Mutex::new(image),
            nr_blocks,
            out_of_range: AtomicU64::new(0),
        })
    }

    pub fn image(&self) -> Vec<u8> {
        self.image.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl BlockIo for ImageIo {
    fn nr_blocks(&self) -> u64 {
        self.nr_blocks
    }

    fn read_block(&self, location: u64) -> Result<Box<Block>> {
        if location >= self.nr_blocks {
            self.out_of_range.fetch_add(1, Ordering::Relaxed);
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!("block {location} is past the end"),
            ));
        }
        let img = self.image.lock().unwrap_or_else(|p| p.into_inner());
        let off = location as usize * BLOCK_SIZE;
        let mut b = Box::new([0u8; BLOCK_SIZE]);
        b.copy_from_slice(&img[off..off + BLOCK_SIZE]);
        Ok(b)
    }

    fn write_block(&self, location: u64, data: &Block) -> Result<()> {
        if location >= self.nr_blocks {
            self.out_of_range.fetch_add(1, Ordering::Relaxed);
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!("block {location} is past the end"),
            ));
        }
        let mut img = self.image.lock().unwrap_or_else(|p| p.into_inner());
        let off = location as usize * BLOCK_SIZE;
        img[off..off + BLOCK_SIZE].copy_from_slice(&data[..]);
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        Ok(())
    }
}

/// A pool made through the API: three thins, two snapshots, thousands of mappings, some
/// overwrites and removals, several commits, a held metadata snapshot and changes after it.
/// Returns the durable image and the metadata handle.
pub fn build_pool(meta_blocks: u64) -> (Vec<u8>, ThinMetadata) {
    let io = MemBlockIo::new(meta_blocks);
    let mut md = ThinMetadata::format(Arc::new(io.clone()), 128, 50_000).expect("format");
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rnd = move |n: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % n
    };
    for dev in [1, 2, 3] {
        md.create_thin(dev).expect("create");
    }
    for i in 0..6000u64 {
        let dev = 1 + (i % 3) as u32;
        let v = rnd(20_000);
        let d = md.alloc_data_block().expect("alloc");
        md.insert(dev, v, d).expect("insert");
    }
    md.commit().expect("commit 1");
    md.create_snapshot(10, 1).expect("snap 10");
    md.create_snapshot(11, 1).expect("snap 11");
    for _ in 0..1500 {
        let v = rnd(20_000);
        let d = md.alloc_data_block().expect("alloc");
        md.insert(10, v, d).expect("insert snap");
    }
    for _ in 0..500 {
        let v = rnd(20_000);
        md.remove(1, v).expect("remove");
    }
    md.commit().expect("commit 2");
    md.reserve_metadata_snap().expect("metadata snap");
    for _ in 0..800 {
        let v = rnd(20_000);
        let d = md.alloc_data_block().expect("alloc");
        md.insert(2, v, d).expect("insert after snap");
    }
    md.create_snapshot(12, 2).expect("snap 12");
    md.commit().expect("commit 3");
    (io.durable_image(), md)
}

/// Everything the API shows of a pool: per device, details and mappings.
pub type PoolView = Vec<(u32, thinnbd::thin::DeviceDetails, Vec<(u64, u64, u32)>)>;

pub fn view(md: &ThinMetadata) -> Result<PoolView> {
    let mut out = Vec::new();
    for dev in md.thin_ids() {
        out.push((dev, md.device_details(dev)?, md.device_mappings(dev)?));
    }
    Ok(out)
}

/// Runs Debian's `thin_check` on a metadata file; fails the test on any finding (or when the
/// tool is missing under CI). Returns false when it was skipped.
pub fn thin_check(meta: &Path) -> bool {
    if !require_tool("thin_check") {
        return false;
    }
    let out = tool("thin_check")
        .arg(meta)
        .output()
        .expect("run thin_check");
    assert!(
        out.status.success(),
        "thin_check failed on {}:\nstdout: {}\nstderr: {}",
        meta.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    true
}

/// Runs the independent checker `verify_meta.py check` on a metadata file; fails the test on
/// any finding (or when it is missing under CI). Returns false when it was skipped.
pub fn verify_meta(meta: &Path) -> bool {
    let Some(script) = verify_meta_script() else {
        return false;
    };
    let out = Command::new("python3")
        .arg(&script)
        .arg("check")
        .arg(meta)
        .output()
        .expect("run verify_meta.py");
    assert!(
        out.status.success(),
        "verify_meta.py check failed on {}:\nstdout: {}\nstderr: {}",
        meta.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    true
}

/// Both metadata checkers, `thin_check` and `verify_meta.py`, on one metadata file.
pub fn assert_metadata_clean(meta: &Path) {
    thin_check(meta);
    verify_meta(meta);
}

/// Mappings per device from `thin_dump` XML: device id -> sorted (vblock, data block).
pub fn thin_dump_mappings(meta: &Path) -> std::collections::BTreeMap<u32, Vec<(u64, u64)>> {
    let out = tool("thin_dump").arg(meta).output().expect("run thin_dump");
    assert!(
        out.status.success(),
        "thin_dump failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_dump(&String::from_utf8_lossy(&out.stdout))
}

fn attr(line: &str, name: &str) -> u64 {
    let key = format!(" {name}=\"");
    let start = line
        .find(&key)
        .unwrap_or_else(|| panic!("no {name} in {line}"))
        + key.len();
    let end = start + line[start..].find('"').expect("closing quote");
    line[start..end].parse().expect("number")
}

pub fn parse_dump(xml: &str) -> std::collections::BTreeMap<u32, Vec<(u64, u64)>> {
    let mut devs = std::collections::BTreeMap::new();
    let mut current = None;
    for line in xml.lines() {
        let l = line.trim();
        if l.starts_with("<device ") {
            let id = attr(l, "dev_id") as u32;
            devs.insert(id, Vec::new());
            current = Some(id);
        } else if l.starts_with("<single_mapping") {
            let v = devs.get_mut(&current.expect("in device")).expect("device");
            v.push((attr(l, "origin_block"), attr(l, "data_block")));
        } else if l.starts_with("<range_mapping") {
            let v = devs.get_mut(&current.expect("in device")).expect("device");
            let (o, d, n) = (
                attr(l, "origin_begin"),
                attr(l, "data_begin"),
                attr(l, "length"),
            );
            for i in 0..n {
                v.push((o + i, d + i));
            }
        }
    }
    devs
}
