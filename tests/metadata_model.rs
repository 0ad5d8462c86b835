//! A randomized workload through the pool metadata API against an in-test model; the result
//! must satisfy Debian's thin_check and the independent checker, and thin_dump must list
//! exactly the model's mappings.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::fs::OpenOptions;
use std::sync::Arc;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use thinnbd::pdata::block_io::{BlockIo, FileBlockIo};
use thinnbd::thin::ThinMetadata;

type Model = BTreeMap<u32, BTreeMap<u64, u64>>;

fn open_io(path: &std::path::Path) -> Arc<dyn BlockIo> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    Arc::new(FileBlockIo::new(f).unwrap())
}

fn check_against_model(md: &ThinMetadata, model: &Model) {
    assert_eq!(md.thin_ids(), model.keys().copied().collect::<Vec<_>>());
    for (dev, maps) in model {
        let got: Vec<(u64, u64)> = md
            .device_mappings(*dev)
            .unwrap()
            .into_iter()
            .map(|m| (m.0, m.1))
            .collect();
        let want: Vec<(u64, u64)> = maps.iter().map(|(k, v)| (*k, *v)).collect();
        assert_eq!(got.len(), want.len(), "device {dev} mapping count");
        assert_eq!(got, want, "device {dev} mappings");
        assert_eq!(md.mapped_blocks(*dev).unwrap(), maps.len() as u64);
    }
}

/// Expected data block reference counts: one per device mapping it (no metadata sharing is
/// visible to the model; the space map counts distinct leaves, which thin_check verifies).
fn model_data_in_use(model: &Model) -> HashMap<u64, u32> {
    let mut used = HashMap::new();
    for maps in model.values() {
        for b in maps.values() {
            *used.entry(*b).or_insert(0) += 1;
        }
    }
    used
}

#[test]
fn randomized_workload_passes_thin_check_and_dumps_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let meta = dir.path().join("metadata");
    let f = std::fs::File::create(&meta).unwrap();
    f.set_len(64 << 20).unwrap();
    drop(f);

    let mut rng = SmallRng::seed_from_u64(0x7417_2026);
    let nr_data_blocks = 300_000;
    let mut md = ThinMetadata::format(open_io(&meta), 128, nr_data_blocks).unwrap();
    let mut model: Model = BTreeMap::new();
    let mut next_id = 0u32;
    let mut inserted = 0u64;
    let mut commits = 0;
    let mut deletes = 0;
    let mut range_removes = 0;
    let mut snapshots = 0;

    for id in 0..3 {
        md.create_thin(id).unwrap();
        model.insert(id, BTreeMap::new());
        next_id = id + 1;
    }
    let mut round = 0;
    while inserted < 200_000 || commits < 20 || deletes < 3 || snapshots < 6 {
        round += 1;
        assert!(round < 10_000, "workload did not converge");
        let ids: Vec<u32> = model.keys().copied().collect();
        let dev = ids[rng.gen_range(0..ids.len())];
        match rng.gen_range(0..100) {
            0..=5 if model.len() < 12 => {
                md.create_snapshot(next_id, dev).unwrap();
                let copy = model[&dev].clone();
                model.insert(next_id, copy);
                next_id += 1;
                snapshots += 1;
            }
            6..=8 if model.len() > 5 => {
                md.delete_thin(dev).unwrap();
                model.remove(&dev);
                deletes += 1;
            }
            9..=14 => {
                let begin = rng.gen_range(0..20_000u64);
                let end = begin + rng.gen_range(1..3_000);
                let removed = md.remove_range(dev, begin, end).unwrap();
                let maps = model.get_mut(&dev).unwrap();
                let keys: Vec<u64> = maps.range(begin..end).map(|(k, _)| *k).collect();
                assert_eq!(removed.len(), keys.len());
                for k in keys {
                    maps.remove(&k);
                }
                range_removes += 1;
            }
            15..=17 if model.len() < 12 => {
                md.create_thin(next_id).unwrap();
                model.insert(next_id, BTreeMap::new());
                next_id += 1;
            }
            _ => {
                // A burst of writes: mostly sequential runs, some random, some overwrites.
                let n = rng.gen_range(500..4_000);
                let mut v = rng.gen_range(0..25_000u64);
                for _ in 0..n {
                    if rng.gen_bool(0.2) {
                        v = rng.gen_range(0..25_000);
                    } else {
                        v += 1;
                    }
                    let b = md.alloc_data_block().unwrap();
                    md.insert(dev, v, b).unwrap();
                    model.get_mut(&dev).unwrap().insert(v, b);
                    inserted += 1;
                }
            }
        }
        if round % 7 == 0 {
            md.commit().unwrap();
            commits += 1;
            // Spot-check lookups.
            for (d, maps) in &model {
                for (k, b) in maps.iter().take(50) {
                    assert_eq!(md.lookup(*d, *k).unwrap().map(|m| m.data_block), Some(*b));
                }
            }
        }
    }
    md.commit().unwrap();
    assert!(model.len() >= 5, "at least 5 thins");
    assert!(range_removes > 0);
    check_against_model(&md, &model);
    let used = model_data_in_use(&model);
    assert_eq!(
        md.status().data_used,
        used.len() as u64,
        "data blocks in use"
    );
    drop(md);

    let reopened = ThinMetadata::open(open_io(&meta)).unwrap();
    check_against_model(&reopened, &model);
    drop(reopened);

    common::assert_metadata_clean(&meta);
    if common::require_tool("thin_dump") {
        let dumped = common::thin_dump_mappings(&meta);
        let want: BTreeMap<u32, Vec<(u64, u64)>> = model
            .iter()
            .map(|(d, m)| (*d, m.iter().map(|(k, v)| (*k, *v)).collect()))
            .collect();
        assert_eq!(dumped, want, "thin_dump lists exactly the model's mappings");
    }
}

#[test]
fn small_pool_with_metadata_snapshot_passes_checks() {
    let dir = tempfile::tempdir().unwrap();
    let meta = dir.path().join("metadata");
    std::fs::File::create(&meta)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let mut md = ThinMetadata::format(open_io(&meta), 128, 5_000).unwrap();
    md.create_thin(1).unwrap();
    for v in 0..600 {
        let b = md.alloc_data_block().unwrap();
        md.insert(1, v, b).unwrap();
    }
    md.create_snapshot(2, 1).unwrap();
    md.create_snapshot(3, 2).unwrap();
    md.commit().unwrap();
    md.reserve_metadata_snap().unwrap();
    for v in 0..100 {
        let b = md.alloc_data_block().unwrap();
        md.insert(1, v * 3, b).unwrap();
    }
    md.remove_range(3, 200, 400).unwrap();
    md.commit().unwrap();
    drop(md);
    common::assert_metadata_clean(&meta);
    let mut md = ThinMetadata::open(open_io(&meta)).unwrap();
    md.release_metadata_snap().unwrap();
    md.delete_thin(2).unwrap();
    md.commit().unwrap();
    assert_eq!(md.device_mappings(3).unwrap().len(), 400);
    drop(md);
    common::assert_metadata_clean(&meta);
}
