//! Metadata benchmark: 1,000,000 random-order mapping inserts then a commit, 1,000,000 random
//! lookups served from the block cache, and our XML restore against Debian's `thin_restore`
//! on the same 1,000,000-mapping XML.
//!
//! `cargo run --release --example metadata_bench [-- MAPPINGS]`. Prints rates and ratios only;
//! targets (on a 2-core machine): lookups >= 1,000,000/s, inserts >= 300,000/s, restore at least
//! as fast as thin_restore.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Write};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use thinnbd::pdata::block_io::{BlockIo, FileBlockIo};
use thinnbd::pdata::mem_block_io::MemBlockIo;
use thinnbd::thin::{xml, ThinMetadata};

const META_BYTES: u64 = 256 << 20;

fn rate(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

fn file_io(path: &std::path::Path) -> Arc<dyn BlockIo> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open metadata file");
    Arc::new(FileBlockIo::new(f).expect("size metadata file"))
}

fn sized_file(path: &std::path::Path) {
    let f = File::create(path).expect("create metadata file");
    f.set_len(META_BYTES).expect("size metadata file");
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: u64 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let mut rng = SmallRng::seed_from_u64(42);

    // 1. Random-order inserts, one commit.
    let io = MemBlockIo::new(META_BYTES / 4096);
    let mut md = ThinMetadata::format(Arc::new(io), 128, 2 * n)?;
    md.create_thin(0)?;
    md.commit()?;
    let mut vblocks: Vec<u64> = (0..n).collect();
    vblocks.shuffle(&mut rng);
    let t = Instant::now();
    for &v in &vblocks {
        let d = md.alloc_data_block()?;
        md.insert(0, v, d)?;
    }
    let inserted = t.elapsed();
    let t = Instant::now();
    md.commit()?;
    let committed = t.elapsed();
    let total = inserted + committed;
    println!(
        "inserts: {n} random-order in {:.2}s + commit {:.2}s = {:.0} ops/s (target >= 300000)",
        inserted.as_secs_f64(),
        committed.as_secs_f64(),
        rate(n, total)
    );

    // 2. Random lookups from the cache (warm it first).
    for v in 0..n.min(20_000) {
        md.lookup(0, v * (n / n.min(20_000)))?;
    }
    let keys: Vec<u64> = (0..n).map(|_| rng.gen_range(0..n)).collect();
    let before = md.cache_stats();
    let t = Instant::now();
    let mut found = 0u64;
    for &k in &keys {
        found += u64::from(md.lookup(0, k)?.is_some());
    }
    let looked = t.elapsed();
    let after = md.cache_stats();
    assert_eq!(found, n, "every key was inserted");
    println!(
        "lookups: {n} random in {:.2}s = {:.0} ops/s (target >= 1000000); cache misses during the run: {}",
        looked.as_secs_f64(),
        rate(n, looked),
        after.misses - before.misses
    );

    // 3. Restore: ours against thin_restore on the same XML (the dump of the pool above).
    let dir = tempfile::tempdir()?;
    let xml_path = dir.path().join("pool.xml");
    {
        let mut out = BufWriter::new(File::create(&xml_path)?);
        xml::dump(&md, &mut out)?;
        out.flush()?;
    }
    drop(md);
    let xml_bytes = std::fs::metadata(&xml_path)?.len();
    let ours_path = dir.path().join("ours.meta");
    sized_file(&ours_path);
    let t = Instant::now();
    let restored = xml::restore(
        &mut BufReader::with_capacity(1 << 20, File::open(&xml_path)?),
        file_io(&ours_path),
    )?;
    let ours = t.elapsed();
    assert_eq!(restored.mapped_blocks(0)?, n);
    drop(restored);
    println!(
        "restore (ours): {n} mappings, {:.1} MB XML in {:.2}s = {:.0} mappings/s",
        xml_bytes as f64 / 1e6,
        ours.as_secs_f64(),
        rate(n, ours)
    );
    let theirs_path = dir.path().join("theirs.meta");
    sized_file(&theirs_path);
    let t = Instant::now();
    let status = Command::new("thin_restore")
        .arg("-i")
        .arg(&xml_path)
        .arg("-o")
        .arg(&theirs_path)
        .status();
    let theirs = t.elapsed();
    match status {
        Ok(s) if s.success() => println!(
            "restore (thin_restore 0.9.0): {:.2}s; ours is {:.2}x its speed (target >= 1.0)",
            theirs.as_secs_f64(),
            theirs.as_secs_f64() / ours.as_secs_f64()
        ),
        Ok(s) => println!("thin_restore failed ({s}); no comparison"),
        Err(e) => println!("thin_restore not available ({e}); no comparison"),
    }

    // 4. Check of the restored metadata, ours against thin_check.
    let t = Instant::now();
    let report = thinnbd::thin::check::check(file_io(&ours_path));
    let checked = t.elapsed();
    println!(
        "check (ours): {:.2}s, {} problems, {} mappings seen",
        checked.as_secs_f64(),
        report.nr_problems,
        report.nr_mappings
    );
    let t = Instant::now();
    if let Ok(out) = Command::new("thin_check").arg(&ours_path).output() {
        println!(
            "check (thin_check 0.9.0): {:.2}s, {}; ours is {:.2}x its speed",
            t.elapsed().as_secs_f64(),
            out.status,
            t.elapsed().as_secs_f64() / checked.as_secs_f64()
        );
    }
    Ok(())
}
