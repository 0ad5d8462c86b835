//! Model-based random test of the engine: 4 threads, 100,000 random operations (writes of any
//! size and alignment, reads, discards, write-zeroes, flushes, snapshots of live thins) over
//! several thins of a pool with 64 KiB blocks; every read is compared with an in-memory model.
//! Afterwards the pool is shut down, the metadata passes `thin_check` and `verify_meta.py`, and
//! a reopened pool still holds exactly the model's bytes.
//!
//! Each thread owns its thins (so their model is exact) and owns every fourth 4 KiB chunk of one
//! shared thin: neighbouring chunks of one 64 KiB block are written by different threads at once,
//! which drives the prison, the copy-on-write path (after snapshots of the shared thin) and the
//! deferred worker. Half the plain writes try the non-blocking path of the NBD server first.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::metadata::{thin_check, verify_meta};
use common::pool::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use thinnbd::engine::{EngineConfig, NoSpacePolicy, Pool, ThinHandle};

const BS: u64 = 64 * KIB;
const THREADS: u64 = 4;
const OPS_PER_THREAD: u64 = 25_000;
const VOL: u64 = MIB;
const SHARED_ID: u32 = 999;
const CHUNK: u64 = 4096;

struct Vol {
    id: u32,
    h: ThinHandle,
    model: Vec<u8>,
}

/// Writes that `try_write_nowait` took (the rest of the writes it was offered fell back).
static NOWAIT_WRITES: AtomicU64 = AtomicU64::new(0);

/// Half the plain writes go first to the non-blocking path the NBD server uses, falling back to
/// the blocking one as the server does when it declines.
fn write(h: &ThinHandle, rng: &mut SmallRng, off: u64, data: &[u8], fua: bool) {
    if !fua && rng.gen_bool(0.5) && h.try_write_nowait(off, data).is_some() {
        NOWAIT_WRITES.fetch_add(1, Ordering::Relaxed);
        return;
    }
    h.write(off, data, fua).unwrap();
}

fn check_range(h: &ThinHandle, model: &[u8], off: u64, len: u64, what: &str) {
    let mut got = vec![0u8; len as usize];
    h.read(off, &mut got).unwrap();
    let want = &model[off as usize..(off + len) as usize];
    if got != want {
        let first = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
        panic!(
            "{what}: thin {} differs at byte {} (got {}, want {})",
            h.id(),
            off + first as u64,
            got[first],
            want[first]
        );
    }
}

fn random_range(rng: &mut SmallRng, size: u64) -> (u64, u64) {
    let off = if rng.gen_bool(0.3) {
        rng.gen_range(0..size / BS) * BS
    } else {
        rng.gen_range(0..size)
    };
    let max = size - off;
    let len = match rng.gen_range(0..4) {
        0 => rng.gen_range(1..=512.min(max)),
        1 => rng.gen_range(1..=8192.min(max)),
        2 => BS.min(max),
        _ => rng.gen_range(1..=(3 * BS).min(max)),
    };
    (off, len)
}

/// One worker thread's run; returns its own volumes and its model of the shared thin.
fn run_thread(pool: Arc<Pool>, shared: ThinHandle, t: u64) -> (Vec<(u32, Vec<u8>)>, Vec<u8>) {
    let mut rng = SmallRng::seed_from_u64(0x5eed + t);
    let mut next_id = (t as u32 + 1) * 1_000_000;
    let mut vols: Vec<Vol> = Vec::new();
    pool.create_thin(next_id).unwrap();
    vols.push(Vol {
        id: next_id,
        h: pool.activate(next_id, VOL, false).unwrap(),
        model: vec![0; VOL as usize],
    });
    next_id += 1;
    let mut shared_model = vec![0u8; VOL as usize];
    let my_chunks: Vec<u64> = (0..VOL / CHUNK).filter(|c| c % THREADS == t).collect();

    for op in 0..OPS_PER_THREAD {
        let p = rng.gen_range(0..1000);
        let vi = rng.gen_range(0..vols.len());
        let v = &mut vols[vi];
        match p {
            0..=349 => {
                let (off, len) = random_range(&mut rng, VOL);
                let mut data = vec![0u8; len as usize];
                rng.fill(&mut data[..]);
                let fua = rng.gen_bool(0.02);
                write(&v.h, &mut rng, off, &data, fua);
                v.model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            350..=599 => {
                let (off, len) = random_range(&mut rng, VOL);
                check_range(&v.h, &v.model, off, len, "read");
            }
            600..=669 => {
                let (off, len) = random_range(&mut rng, VOL);
                v.h.discard(off, len, false).unwrap();
                v.model[off as usize..(off + len) as usize].fill(0);
            }
            670..=739 => {
                let (off, len) = random_range(&mut rng, VOL);
                v.h.write_zeroes(off, len, rng.gen_bool(0.5), false)
                    .unwrap();
                v.model[off as usize..(off + len) as usize].fill(0);
            }
            740..=839 => {
                let c = my_chunks[rng.gen_range(0..my_chunks.len())];
                let inoff = rng.gen_range(0..CHUNK);
                let len = rng.gen_range(1..=CHUNK - inoff);
                let off = c * CHUNK + inoff;
                let mut data = vec![0u8; len as usize];
                rng.fill(&mut data[..]);
                write(&shared, &mut rng, off, &data, false);
                shared_model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            840..=919 => {
                let c = my_chunks[rng.gen_range(0..my_chunks.len())];
                check_range(&shared, &shared_model, c * CHUNK, CHUNK, "shared read");
            }
            920..=959 => {
                if rng.gen_bool(0.5) {
                    pool.flush().unwrap();
                } else {
                    v.h.flush().unwrap();
                }
            }
            960..=979 => {
                // Snapshot of a live thin of ours.
                let id = next_id;
                next_id += 1;
                let origin = v.id;
                pool.create_snapshot(id, origin).unwrap();
                let model = v.model.clone();
                let h = pool.activate(id, VOL, false).unwrap();
                vols.push(Vol { id, h, model });
                if vols.len() > 3 {
                    let victim = vols.swap_remove(rng.gen_range(0..vols.len()));
                    check_range(&victim.h, &victim.model, 0, VOL, "before delete");
                    pool.teardown(victim.h).unwrap();
                    pool.delete_thin(victim.id).unwrap();
                }
            }
            980..=984 => {
                // Snapshot of the shared thin while the others write to it: our own chunks
                // must hold exactly what we had acknowledged.
                let id = next_id;
                next_id += 1;
                pool.create_snapshot(id, SHARED_ID).unwrap();
                let snap = pool.activate(id, VOL, true).unwrap();
                for &c in my_chunks.iter().step_by(7) {
                    check_range(&snap, &shared_model, c * CHUNK, CHUNK, "shared snapshot");
                }
                pool.teardown(snap).unwrap();
                pool.delete_thin(id).unwrap();
            }
            _ => {
                check_range(&v.h, &v.model, 0, VOL, "full read");
            }
        }
        if op % 5000 == 0 {
            eprintln!("thread {t}: {op} ops");
        }
    }
    for v in &vols {
        check_range(&v.h, &v.model, 0, VOL, "final");
    }
    for &c in &my_chunks {
        check_range(&shared, &shared_model, c * CHUNK, CHUNK, "final shared");
    }
    (
        vols.into_iter().map(|v| (v.id, v.model)).collect(),
        shared_model,
    )
}

#[test]
fn random_operations_match_the_model_and_the_metadata_checks_out() {
    let _wd = watchdog(900, "model test");
    let config = EngineConfig {
        no_space_policy: NoSpacePolicy::Error,
        cell_pool_size: 2,
        ..EngineConfig::default()
    };
    let tp = temp_pool(64 * MIB, BS, config);
    let pool = tp.pool.clone();
    pool.create_thin(SHARED_ID).unwrap();
    let shared = pool.activate(SHARED_ID, VOL, false).unwrap();
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (pool, shared) = (pool.clone(), shared.clone());
            std::thread::spawn(move || run_thread(pool, shared, t))
        })
        .collect();
    let mut own = Vec::new();
    let mut shared_model = vec![0u8; VOL as usize];
    for (t, th) in threads.into_iter().enumerate() {
        let (vols, sm) = th.join().expect("worker thread panicked");
        own.extend(vols);
        for c in (0..VOL / CHUNK).filter(|c| c % THREADS == t as u64) {
            let r = (c * CHUNK) as usize..((c + 1) * CHUNK) as usize;
            shared_model[r.clone()].copy_from_slice(&sm[r]);
        }
    }
    let st = pool.status();
    eprintln!(
        "status: provisioned {} copied {} discarded {} deferred {} commits {} flushes {} used {}/{}",
        st.blocks_provisioned,
        st.blocks_copied,
        st.blocks_discarded,
        st.bios_deferred,
        st.commits_done,
        st.flushes_requested,
        st.data_used,
        st.data_total
    );
    assert!(st.blocks_copied > 0 && st.blocks_provisioned > 0 && st.blocks_discarded > 0);
    assert!(st.bios_deferred > 0, "the deferred worker was exercised");
    let nowait = NOWAIT_WRITES.load(Ordering::Relaxed);
    eprintln!("writes done by try_write_nowait: {nowait}");
    assert!(
        nowait > 1000,
        "the non-blocking write path was exercised ({nowait})"
    );
    pool.shutdown().unwrap();
    drop(shared);
    drop(pool);
    let TempPool { dir, pool } = tp;
    drop(pool);
    let meta = dir.path().join("meta");
    thin_check(&meta);
    verify_meta(&meta);

    let pool = Pool::open(&meta, &dir.path().join("data"), EngineConfig::default()).unwrap();
    let h = pool.activate(SHARED_ID, VOL, true).unwrap();
    check_range(&h, &shared_model, 0, VOL, "reopened shared");
    for (id, model) in &own {
        let h = pool.activate(*id, VOL, true).unwrap();
        check_range(&h, model, 0, VOL, "reopened");
    }
    let mut ids = pool.thin_ids();
    ids.sort_unstable();
    let mut want: Vec<u32> = own.iter().map(|(id, _)| *id).chain([SHARED_ID]).collect();
    want.sort_unstable();
    assert_eq!(ids, want, "deleted thins are gone, live ones remain");
}
