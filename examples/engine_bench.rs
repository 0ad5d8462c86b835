//! Engine overhead against the raw data file, on the same file in one run:
//! 4 KiB random overwrites of provisioned blocks vs raw `pwrite`, 4 KiB provisioning writes
//! (each to a new block) vs raw `pwrite` into never-written (sparse) blocks, and 4 KiB random
//! reads of provisioned blocks vs raw `pread`, at queue depth 1 and 32 (threads).
//!
//! The pool allocates its blocks from the bottom of the data file; the raw runs use the top
//! half, which the pool never reaches, so both sides see the same file and page cache.
//!
//! Run: `cargo run --release --example engine_bench [-- --dir DIR --secs N]`

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use thinnbd::engine::{EngineConfig, NoSpacePolicy, Pool};

const BS: u64 = 64 * 1024;
const IO: u64 = 4096;
const PROVISION_OPS: [u64; 2] = [20_000, 80_000];
const DEPTHS: [usize; 2] = [1, 32];

/// Runs `op(thread, rng, i)` on `threads` threads until `budget` ops are done or `secs` pass.
fn run(
    threads: usize,
    budget: u64,
    secs: f64,
    op: impl Fn(usize, &mut SmallRng, u64) + Sync,
) -> f64 {
    let next = AtomicU64::new(0);
    let done = AtomicU64::new(0);
    let deadline = Duration::from_secs_f64(secs);
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let (next, done, op) = (&next, &done, &op);
            s.spawn(move || {
                let mut rng = SmallRng::seed_from_u64(t as u64 * 7919 + 1);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= budget || (i % 64 == 0 && start.elapsed() > deadline) {
                        break;
                    }
                    op(t, &mut rng, i);
                    done.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut dir: Option<PathBuf> = None;
    let mut secs = 2.0f64;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--dir" => dir = args.next().map(PathBuf::from),
            "--secs" => secs = args.next().and_then(|s| s.parse().ok()).unwrap_or(secs),
            _ => {
                eprintln!("usage: engine_bench [--dir DIR] [--secs N]");
                std::process::exit(2);
            }
        }
    }
    let tmp = match &dir {
        Some(d) => tempfile::tempdir_in(d),
        None => tempfile::tempdir(),
    }
    .expect("temporary directory");
    let total_prov: u64 = PROVISION_OPS.iter().sum();
    // Bottom half for the pool, top half for the raw runs.
    let nr_blocks = total_prov * 2 + 1024;
    let raw_base = nr_blocks / 2 + 512;
    let meta = tmp.path().join("meta");
    let data = tmp.path().join("data");
    let config = EngineConfig {
        no_space_policy: NoSpacePolicy::Error,
        ..EngineConfig::default()
    };
    let pool = Pool::create(&meta, &data, nr_blocks * BS, BS, config).expect("create pool");
    pool.create_thin(1).expect("create thin");
    let vol_blocks = total_prov;
    let h = pool.activate(1, vol_blocks * BS, false).expect("activate");
    let raw = Arc::new(
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(&data)
            .expect("open data file"),
    );
    println!(
        "engine_bench: data file {} ({} blocks of 64 KiB), {secs} s per timed run",
        data.display(),
        nr_blocks
    );

    let buf = vec![0x5au8; IO as usize];
    let mut order: Vec<u64> = (0..vol_blocks).collect();
    order.shuffle(&mut SmallRng::seed_from_u64(42));
    let mut raw_order: Vec<u64> = (0..total_prov).map(|b| raw_base + b).collect();
    raw_order.shuffle(&mut SmallRng::seed_from_u64(43));
    let order = Arc::new(order);
    let raw_order = Arc::new(raw_order);

    let mut rows: Vec<(String, f64, f64, f64)> = Vec::new();
    // Dirty pages are written back before every run, so neither side pays for the other's
    // writeback.
    let settle = || raw.sync_data().expect("fdatasync");
    // Provisioning: every op takes a new block (so each side runs once per depth).
    let mut used = 0usize;
    for (qd, ops) in DEPTHS.iter().zip(PROVISION_OPS) {
        let slice = &order[used..used + ops as usize];
        let raw_slice = &raw_order[used..used + ops as usize];
        used += ops as usize;
        settle();
        let engine = run(*qd, ops, 1e6, |_, rng, i| {
            let vb = slice[i as usize];
            let off = vb * BS + rng.gen_range(0..BS / IO) * IO;
            h.write(off, &buf, false).expect("provisioning write");
        });
        settle();
        let rawr = run(*qd, ops, 1e6, |_, rng, i| {
            let b = raw_slice[i as usize];
            raw.write_all_at(&buf, b * BS + rng.gen_range(0..BS / IO) * IO)
                .expect("raw pwrite");
        });
        rows.push((format!("provision 4K  qd{qd}"), engine, rawr, 0.5));
    }
    let provisioned = used as u64;
    let st = pool.status();
    assert_eq!(
        st.blocks_provisioned, provisioned,
        "every provisioning write took one block"
    );
    pool.flush().expect("flush");

    // Timed runs alternate (engine, raw, raw, engine); the best of two is kept for each side.
    let best_of_two = |engine: &dyn Fn() -> f64, raw_run: &dyn Fn() -> f64| {
        settle();
        let e1 = engine();
        settle();
        let r1 = raw_run();
        settle();
        let r2 = raw_run();
        settle();
        let e2 = engine();
        (e1.max(e2), r1.max(r2))
    };
    for qd in DEPTHS {
        let (engine, rawr) = best_of_two(
            &|| {
                run(qd, u64::MAX, secs, |_, rng, _| {
                    let vb = order[rng.gen_range(0..provisioned) as usize];
                    h.write(vb * BS + rng.gen_range(0..BS / IO) * IO, &buf, false)
                        .expect("overwrite");
                })
            },
            &|| {
                run(qd, u64::MAX, secs, |_, rng, _| {
                    let b = raw_order[rng.gen_range(0..provisioned) as usize];
                    raw.write_all_at(&buf, b * BS + rng.gen_range(0..BS / IO) * IO)
                        .expect("raw pwrite");
                })
            },
        );
        rows.push((format!("overwrite 4K  qd{qd}"), engine, rawr, 0.8));
    }
    for qd in DEPTHS {
        let (engine, rawr) = best_of_two(
            &|| {
                run(qd, u64::MAX, secs, |_, rng, _| {
                    let mut b = [0u8; IO as usize];
                    let vb = order[rng.gen_range(0..provisioned) as usize];
                    h.read(vb * BS + rng.gen_range(0..BS / IO) * IO, &mut b)
                        .expect("read");
                })
            },
            &|| {
                run(qd, u64::MAX, secs, |_, rng, _| {
                    let mut b = [0u8; IO as usize];
                    let blk = raw_order[rng.gen_range(0..provisioned) as usize];
                    raw.read_exact_at(&mut b, blk * BS + rng.gen_range(0..BS / IO) * IO)
                        .expect("raw pread");
                })
            },
        );
        rows.push((format!("read 4K       qd{qd}"), engine, rawr, 0.8));
    }

    println!(
        "{:<20} {:>12} {:>12} {:>7} {:>8}",
        "workload", "engine op/s", "raw op/s", "ratio", "target"
    );
    for (name, e, r, target) in &rows {
        let ratio = e / r;
        let mark = if ratio >= *target { "ok" } else { "BELOW" };
        println!(
            "{name:<20} {e:>12.0} {r:>12.0} {ratio:>7.2} {:>5.1}x {mark}",
            target
        );
    }
    pool.shutdown().expect("shutdown");
}
