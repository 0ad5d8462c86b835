//! Power cuts in process. A pool runs on a metadata device with a volatile
//! write cache and a data file whose unsynced pages may be lost; one power supply counts the
//! operations of both, and the cut lands at a random one of them (a dry run of the same seed
//! says how many there are). After the cut every unsynced metadata block and data page
//! independently survives or not. Then: the written-out metadata passes thin_check and
//! verify_meta.py, the pool opens without repair, every write acknowledged before the last
//! completed flush (or with FUA) reads back, every other 4 KiB piece holds its flushed version
//! or a later one, and snapshots hold exactly what their origin held when they were taken.
//!
//! THINNBD_POWERCUT_RUNS (default 150) sets the number of cuts; THINNBD_SEED replays a run.

mod common;

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::path::Path;
use std::sync::Arc;

use common::model::{Model, PIECE};
use common::power::{Power, PowerMeta, VolatileData};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use thinnbd::engine::{EngineConfig, FileStore, NoSpacePolicy, Pool};
use thinnbd::pdata::block_io::BlockIo;

const BS: u64 = 64 << 10;
const NR_DATA_BLOCKS: u64 = 512;
const META_BLOCKS: u64 = 1024;
const VOL_BYTES: u64 = 4 << 20;
const NR_PIECES: u64 = VOL_BYTES / PIECE as u64;
const OPS: usize = 120;

fn config() -> EngineConfig {
    EngineConfig {
        no_space_policy: NoSpacePolicy::Error,
        ..EngineConfig::default()
    }
}

fn open_data(path: &Path, create: bool) -> File {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(create)
        .open(path)
        .expect("data file");
    if create {
        f.set_len(NR_DATA_BLOCKS * BS).expect("size data file");
    }
    f
}

/// What the workload did, for the checks after the crash.
struct Outcome {
    model: Model,
    /// Snapshot id -> (its content, whether creating it returned Ok).
    snapshots: BTreeMap<u32, (Vec<u32>, bool)>,
    /// Snapshots whose delete returned Ok (gone) or failed at the cut (either).
    deleted: BTreeMap<u32, bool>,
    ops_run: usize,
    errors_seen: usize,
}

/// Runs the seeded workload until it ends or an operation fails; a failure before the power
/// cut is a bug.
fn workload(pool: &Arc<Pool>, power: &Power, seed: u64) -> Outcome {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut out = Outcome {
        model: Model::new(seed, NR_PIECES),
        snapshots: BTreeMap::new(),
        deleted: BTreeMap::new(),
        ops_run: 0,
        errors_seen: 0,
    };
    let h = pool.activate(1, VOL_BYTES, false).expect("activate thin 1");
    let mut next_snap = 2u32;
    let failed = |e: thinnbd::Error, what: &str| {
        assert!(
            power.is_cut(),
            "seed {seed}: {what} failed before the power cut: {e}"
        );
    };
    for _ in 0..OPS {
        out.ops_run += 1;
        let roll = rng.gen_range(0..100);
        let first = rng.gen_range(0..NR_PIECES);
        let count = rng.gen_range(1..=24).min(NR_PIECES - first);
        let off = first * PIECE as u64;
        let r = if roll < 55 {
            let fua = rng.gen_bool(0.1);
            let (versions, bytes) = out.model.begin_write(first, count, false);
            let r = h.write(off, &bytes, fua);
            if r.is_ok() {
                out.model.acked(first, &versions, fua);
            }
            r.map_err(|e| (e, "write"))
        } else if roll < 65 {
            let (versions, _) = out.model.begin_write(first, count, true);
            let r = h.discard(off, count * PIECE as u64, false);
            if r.is_ok() {
                out.model.acked(first, &versions, false);
            }
            r.map_err(|e| (e, "discard"))
        } else if roll < 80 {
            let r = h.flush();
            if r.is_ok() {
                out.model.flushed();
            }
            r.map_err(|e| (e, "flush"))
        } else if roll < 86 {
            let id = next_snap;
            next_snap += 1;
            let content: Vec<u32> = (0..NR_PIECES).map(|p| out.model.acked_version(p)).collect();
            let r = pool.create_snapshot(id, 1);
            out.snapshots.insert(id, (content, r.is_ok()));
            if r.is_ok() {
                // A snapshot commits: everything acknowledged before it is durable.
                out.model.flushed();
            }
            r.map_err(|e| (e, "snapshot"))
        } else if roll < 90 {
            let live: Vec<u32> = out
                .snapshots
                .keys()
                .copied()
                .filter(|id| !out.deleted.contains_key(id))
                .collect();
            if live.is_empty() {
                continue;
            }
            let id = live[rng.gen_range(0..live.len())];
            let r = pool.delete_thin(id);
            out.deleted.insert(id, r.is_ok());
            r.map_err(|e| (e, "delete"))
        } else {
            let mut buf = vec![0u8; (count as usize) * PIECE];
            let r = h.read(off, &mut buf);
            if r.is_ok() {
                if let Err(why) = out.model.check_exact(first, &buf) {
                    panic!("seed {seed}: read before any crash: {why}");
                }
            }
            r.map_err(|e| (e, "read"))
        };
        if let Err((e, what)) = r {
            out.errors_seen += 1;
            failed(e, what);
            break;
        }
    }
    out
}

struct Run {
    cut_at: u64,
    total_ops: u64,
    meta_kept: usize,
    pages_reverted: usize,
    pages_kept: usize,
    pieces_checked: u64,
}

/// Builds a fresh pool (thin 1 created and committed), arms the cut, runs the workload.
fn build(
    dir: &Path,
    seed: u64,
    cut: Option<u64>,
) -> (Arc<Power>, Arc<PowerMeta>, Arc<VolatileData>, Outcome) {
    let power = Power::new();
    let meta = Arc::new(PowerMeta::new(META_BLOCKS, power.clone()));
    let dev = Arc::new(FileStore::new(open_data(&dir.join("data"), true), true));
    let tap = VolatileData::new(power.clone());
    let pool = Pool::create_from_parts(
        meta.clone() as Arc<dyn BlockIo>,
        dev,
        BS,
        NR_DATA_BLOCKS,
        config(),
    )
    .expect("create pool");
    // Opening the pool touches no data, so the tap sees every data operation all the same.
    pool.data_faults().set_tap(Some(tap.clone()));
    pool.create_thin(1).expect("create thin 1");
    let base = power.ops_done();
    if let Some(c) = cut {
        power.cut_after(c);
    }
    let out = workload(&pool, &power, seed);
    // Whatever the workload reached, power goes now: the shutdown's commit must not count.
    power.cut_now();
    drop(pool);
    let _ = base;
    (power, meta, tap, out)
}

fn one_cut(dir: &Path, seed: u64, run_checkers: bool) -> Run {
    // Dry run: how many device operations the workload makes with power on throughout.
    let (dry_power, _, _, _) = build(dir, seed, None);
    let total_ops = dry_power.ops_done();
    let mut rng = SmallRng::seed_from_u64(seed ^ 0x5eed);
    // Ops from pool creation are before the armed cut; cut somewhere in the workload's ops.
    let cut_at = rng.gen_range(0..total_ops.max(1));
    let (power, meta, tap, out) = build(dir, seed, Some(cut_at));
    assert!(power.is_cut());

    let keep = [0.0, 0.5, 1.0][rng.gen_range(0..3)];
    let (meta_after, meta_kept) = meta.crash(&mut rng, keep, Power::new());
    let data_file = open_data(&dir.join("data"), false);
    let (pages_reverted, pages_kept) = tap.crash(&data_file, &mut rng, keep);
    drop(data_file);

    if run_checkers {
        let img = dir.join("meta.img");
        std::fs::write(&img, meta_after.image()).expect("write metadata image");
        common::assert_metadata_clean(&img);
    }

    let pool = Pool::from_parts(
        Arc::new(meta_after) as Arc<dyn BlockIo>,
        Arc::new(FileStore::new(open_data(&dir.join("data"), false), false)),
        config(),
    )
    .unwrap_or_else(|e| {
        panic!("seed {seed} cut {cut_at}: the pool does not open after the cut: {e}")
    });
    let ids = pool.thin_ids();
    assert!(ids.contains(&1), "seed {seed}: thin 1 is gone");
    let h = pool.activate(1, VOL_BYTES, false).expect("activate thin 1");
    let mut all = vec![0u8; VOL_BYTES as usize];
    h.read(0, &mut all).expect("read thin 1");
    if let Err(why) = out.model.check_after_crash(0, &all) {
        panic!("seed {seed} cut {cut_at} keep {keep}: thin 1: {why}");
    }
    let mut checked = NR_PIECES;
    for (id, (content, created)) in &out.snapshots {
        let exists = ids.contains(id);
        match out.deleted.get(id) {
            Some(true) => assert!(!exists, "seed {seed}: deleted snapshot {id} is back"),
            Some(false) => {}
            None => assert!(
                exists || !created,
                "seed {seed} cut {cut_at}: snapshot {id} was created but is gone"
            ),
        }
        if !exists {
            continue;
        }
        let hs = pool
            .activate(*id, VOL_BYTES, true)
            .expect("activate snapshot");
        hs.read(0, &mut all).expect("read snapshot");
        for (p, chunk) in all.chunks(PIECE).enumerate() {
            let want = content[p];
            let got = common::model::identify(seed, p as u64, chunk);
            assert_eq!(
                got,
                Some(want),
                "seed {seed} cut {cut_at}: snapshot {id} piece {p}"
            );
        }
        checked += NR_PIECES;
        pool.teardown(hs).expect("teardown snapshot");
    }
    // The pool keeps working after the crash.
    let bytes = vec![0xa5u8; 3 * PIECE];
    h.write(0, &bytes, true).expect("write after the crash");
    let mut back = vec![0u8; bytes.len()];
    h.read(0, &mut back).expect("read after the crash");
    assert_eq!(back, bytes);
    pool.teardown(h).expect("teardown");
    pool.shutdown().expect("clean shutdown after the crash");
    Run {
        cut_at,
        total_ops,
        meta_kept,
        pages_reverted,
        pages_kept,
        pieces_checked: checked,
    }
}

#[test]
fn power_cut_at_random_points_loses_nothing_flushed() {
    let runs = common::load::env_count("THINNBD_POWERCUT_RUNS", 150);
    let base = common::load::base_seed("power cut");
    let dir = common::pool::fast_tempdir();
    let (mut reverted, mut kept, mut meta_kept, mut pieces) = (0usize, 0usize, 0usize, 0u64);
    let mut cuts_in_commit = 0u64;
    for i in 0..runs {
        let seed = base.wrapping_add(i);
        // The external checkers take most of the time: run them on every fifth cut.
        let r = one_cut(dir.path(), seed, i % 5 == 0);
        reverted += r.pages_reverted;
        kept += r.pages_kept;
        meta_kept += r.meta_kept;
        pieces += r.pieces_checked;
        if r.meta_kept > 0 {
            cuts_in_commit += 1;
        }
        assert!(r.cut_at < r.total_ops.max(1));
    }
    println!(
        "power cut: {runs} cuts survived; {reverted} unsynced data pages lost, {kept} kept; \
         {meta_kept} unsynced metadata blocks kept ({cuts_in_commit} cuts with torn commits); \
         {pieces} pieces of 4 KiB checked; bytes lost = 0"
    );
}
