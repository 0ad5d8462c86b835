//! Crash safety of metadata commits: the in-memory device cuts the write stream at every point
//! of a small workload (and at random points of a larger one); after the cut, unsynced writes
//! are lost, and the metadata must reopen to exactly the last committed state.

use std::collections::BTreeMap;
use std::sync::Arc;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use thinnbd::pdata::block_io::BlockIo;
use thinnbd::pdata::mem_block_io::MemBlockIo;
use thinnbd::thin::ThinMetadata;

type State = BTreeMap<u32, Vec<(u64, u64, u32)>>;

fn snapshot_state(md: &ThinMetadata) -> State {
    md.thin_ids()
        .into_iter()
        .map(|d| (d, md.device_mappings(d).unwrap()))
        .collect()
}

/// Runs the workload; returns the states after each successful commit, stopping at the first
/// error (the power cut).
fn run_workload(io: &MemBlockIo, seed: u64, transactions: usize) -> Vec<State> {
    let mut committed = Vec::new();
    let mut rng = SmallRng::seed_from_u64(seed);
    let Ok(mut md) = ThinMetadata::format(Arc::new(io.clone()), 128, 4_000) else {
        return committed;
    };
    committed.push(snapshot_state(&md));
    let mut next = 0u32;
    for t in 0..transactions {
        let step = (|| -> thinnbd::Result<()> {
            if t % 3 == 0 || md.thin_ids().is_empty() {
                md.create_thin(next)?;
                next += 1;
            }
            let ids = md.thin_ids();
            let dev = ids[rng.gen_range(0..ids.len())];
            match t % 4 {
                1 => {
                    md.create_snapshot(next, dev)?;
                    next += 1;
                }
                2 if ids.len() > 2 => md.delete_thin(ids[0])?,
                3 => {
                    md.remove_range(dev, 10, 60)?;
                }
                _ => {}
            }
            for _ in 0..rng.gen_range(50..400) {
                let v = rng.gen_range(0..1_000);
                let b = md.alloc_data_block()?;
                md.insert(dev, v, b)?;
            }
            md.commit()
        })();
        if step.is_err() {
            return committed;
        }
        committed.push(snapshot_state(&md));
    }
    committed
}

fn reopen_matches_last_commit(io: &MemBlockIo, committed: &[State], cut: u64) {
    let after = io.crash();
    match ThinMetadata::open(Arc::new(after) as Arc<dyn BlockIo>) {
        Ok(md) => {
            let state = snapshot_state(&md);
            let last = committed
                .last()
                .unwrap_or_else(|| panic!("cut {cut}: opened metadata that never committed"));
            assert_eq!(
                &state, last,
                "cut at op {cut}: reopened state is not the last commit"
            );
        }
        Err(e) => assert!(
            committed.is_empty(),
            "cut at op {cut}: committed metadata failed to open: {e}"
        ),
    }
}

#[test]
fn every_cut_point_of_a_small_workload_reopens_to_the_last_commit() {
    let full = MemBlockIo::new(256);
    let all = run_workload(&full, 1, 15);
    assert_eq!(
        all.len(),
        16,
        "the uncut workload commits every transaction"
    );
    let total_ops = full.ops_done();
    assert!(
        total_ops > 100,
        "the workload writes enough to be worth cutting ({total_ops} ops)"
    );
    for cut in 0..=total_ops {
        let io = MemBlockIo::new(256);
        io.cut_after(cut);
        let committed = run_workload(&io, 1, 15);
        reopen_matches_last_commit(&io, &committed, cut);
    }
}

#[test]
fn random_cut_points_of_a_larger_workload_reopen_to_the_last_commit() {
    let full = MemBlockIo::new(2048);
    run_workload(&full, 7, 40);
    let total_ops = full.ops_done();
    let mut rng = SmallRng::seed_from_u64(99);
    for _ in 0..60 {
        let cut = rng.gen_range(0..total_ops);
        let io = MemBlockIo::new(2048);
        io.cut_after(cut);
        let committed = run_workload(&io, 7, 40);
        reopen_matches_last_commit(&io, &committed, cut);
    }
}
