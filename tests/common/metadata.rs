//! Helpers shared by the thin tools tests: external tool discovery (fail under CI, skip
//! otherwise), an image-backed BlockIo that records out-of-range reads, and a pool built
//! through the API with snapshots and several commits.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use thinnbd::pdata::block_io::{Block, BlockIo, MemBlockIo, BLOCK_SIZE};
use thinnbd::thin::ThinMetadata;
use thinnbd::{Error, ErrorKind, Result};

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// True if `tool` runs; under CI=true a missing tool fails the test, otherwise it is skipped.
pub fn have_tool(tool: &str) -> bool {
    let ok = Command::new(tool).arg("--version").output().is_ok();
    if !ok {
        assert!(
            !in_ci(),
            "{tool} is required when CI=true (apt-get install -y thin-provisioning-tools)"
        );
        eprintln!("skipping: {tool} is not installed");
    }
    ok
}

/// `../shared/tools/verify_meta.py`, required under CI, optional otherwise.
pub fn verify_meta() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/tools/verify_meta.py");
    let python = Command::new("python3").arg("--version").output().is_ok();
    if p.exists() && python {
        return Some(p);
    }
    assert!(
        !in_ci(),
        "python3 and {} are required when CI=true",
        p.display()
    );
    eprintln!("note: verify_meta.py or python3 not available; that cross-check is skipped");
    None
}

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
