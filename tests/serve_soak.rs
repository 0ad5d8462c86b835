//! Soak: 8 connections of mixed load (writes, reads with checks, trims,
//! flushes, FUA) on the real server while snapshots are taken and deleted online through the
//! CLI, for 2 minutes (THINNBD_SOAK_SECS for longer). The server's RSS is sampled from
//! /proc/PID/status every second and must stay flat after warm-up: the largest sample of the
//! last third is at most the largest of the first third (after warm-up) + 32 MiB. At the end
//! every connection's region reads back exactly as its model says, the last snapshot holds
//! only versions its origin had, and the metadata passes the checkers.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::model::{identify, Model, PIECE};
use common::nbd_client::Client;
use common::server::{cli, make_pool, rss_kib, Server};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const CONNS: u64 = 8;
const REGION: u64 = 16 << 20;
const NR_PIECES: u64 = REGION / PIECE as u64;

#[derive(Default)]
struct Counts {
    writes: AtomicU64,
    reads: AtomicU64,
    trims: AtomicU64,
    flushes: AtomicU64,
    bytes_written: AtomicU64,
}

fn conn_loop(port: u16, i: u64, seed: u64, stop: &AtomicBool, counts: &Counts) -> Model {
    let mut rng = SmallRng::seed_from_u64(seed ^ (i << 32));
    let mut model = Model::new(seed.wrapping_add(i), NR_PIECES);
    let mut c = Client::connect(port, "disk").expect("connect");
    let base = i * REGION;
    for _ in 0..10_000_000u64 {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let first = rng.gen_range(0..NR_PIECES);
        let count = rng.gen_range(1..=32).min(NR_PIECES - first);
        let off = base + first * PIECE as u64;
        let roll = rng.gen_range(0..100);
        if roll < 45 {
            let fua = rng.gen_bool(0.03);
            let (versions, bytes) = model.begin_write(first, count, false);
            assert_eq!(c.write(off, &bytes, fua).expect("write"), 0, "write failed");
            model.acked(first, &versions, fua);
            counts.writes.fetch_add(1, Ordering::Relaxed);
            counts
                .bytes_written
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        } else if roll < 85 {
            let mut buf = vec![0u8; count as usize * PIECE];
            assert_eq!(c.read(off, &mut buf).expect("read"), 0, "read failed");
            if let Err(why) = model.check_exact(first, &buf) {
                panic!("connection {i}: {why}");
            }
            counts.reads.fetch_add(1, Ordering::Relaxed);
        } else if roll < 93 {
            let (versions, _) = model.begin_write(first, count, true);
            let len = (count as usize * PIECE) as u32;
            assert_eq!(c.trim(off, len).expect("trim"), 0, "trim failed");
            model.acked(first, &versions, false);
            counts.trims.fetch_add(1, Ordering::Relaxed);
        } else {
            assert_eq!(c.flush().expect("flush"), 0, "flush failed");
            model.flushed();
            counts.flushes.fetch_add(1, Ordering::Relaxed);
        }
    }
    // The whole region, exactly.
    let mut buf = vec![0u8; 1 << 20];
    for k in 0..REGION / buf.len() as u64 {
        assert_eq!(
            c.read(base + k * buf.len() as u64, &mut buf).expect("read"),
            0
        );
        let first = k * (buf.len() / PIECE) as u64;
        if let Err(why) = model.check_exact(first, &buf) {
            panic!("connection {i}, final check: {why}");
        }
    }
    c.disconnect();
    model
}

#[test]
fn soak_mixed_load_with_online_snapshots_keeps_rss_flat() {
    let secs = common::load::env_secs("THINNBD_SOAK_SECS", 120);
    let seed = common::load::base_seed("soak");
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    make_pool(&pool, "1G", &[("disk", "256M")]);
    let mut server = Server::start_on_pool(&pool, None, &dir.path().join("log"));
    let port = server.port;
    let pid = server.pid();
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());
    let samples = Arc::new(Mutex::new(Vec::<u64>::new()));

    let sampler = {
        let (stop, samples) = (stop.clone(), samples.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Some(kib) = rss_kib(pid) {
                    samples.lock().unwrap().push(kib);
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    };
    let workers: Vec<_> = (0..CONNS)
        .map(|i| {
            let (stop, counts) = (stop.clone(), counts.clone());
            std::thread::spawn(move || conn_loop(port, i, seed, &stop, &counts))
        })
        .collect();

    // Online snapshots and deletes through the CLI (the control socket), bounded in count.
    let p = pool.to_str().unwrap().to_owned();
    let start = Instant::now();
    let mut live: Vec<String> = Vec::new();
    let (mut snaps, mut deletes) = (0u64, 0u64);
    while start.elapsed() < secs && snaps < 10_000 {
        std::thread::sleep(Duration::from_millis(1500));
        let name = format!("snap{snaps}");
        let out = cli(&["snapshot", "--pool", &p, "disk", &name]);
        assert!(
            out.status.success(),
            "online snapshot failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        snaps += 1;
        live.push(name);
        if live.len() > 3 {
            let old = live.remove(0);
            let out = cli(&["volume", "delete", "--pool", &p, &old]);
            assert!(
                out.status.success(),
                "online delete failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            deletes += 1;
        }
        assert!(
            server.is_running(),
            "the server died:\n{}",
            server.log_text()
        );
    }
    stop.store(true, Ordering::Relaxed);
    let models: Vec<Model> = workers
        .into_iter()
        .map(|w| w.join().expect("connection thread"))
        .collect();
    sampler.join().unwrap();

    // The newest snapshot: every piece holds some version its owner wrote (or zeros).
    let last = live.last().expect("a snapshot").clone();
    let mut c = Client::connect(port, &last).expect("connect to the snapshot");
    let mut buf = vec![0u8; 1 << 20];
    for (i, m) in models.iter().enumerate() {
        for k in 0..REGION / buf.len() as u64 {
            let off = i as u64 * REGION + k * buf.len() as u64;
            assert_eq!(c.read(off, &mut buf).unwrap(), 0);
            for (j, chunk) in buf.chunks(PIECE).enumerate() {
                let piece = k * (buf.len() / PIECE) as u64 + j as u64;
                assert!(
                    identify(m.salt, piece, chunk).is_some(),
                    "snapshot {last}: region {i} piece {piece} holds foreign bytes"
                );
            }
        }
    }
    c.disconnect();

    let st = server.terminate();
    assert!(st.success(), "{st}\n{}", server.log_text());
    common::assert_metadata_clean(&pool.join("metadata"));

    let samples = samples.lock().unwrap().clone();
    // Warm-up: the first sixth of the run (at least one sample).
    let warm = (samples.len() / 6).max(1);
    let rest = &samples[warm.min(samples.len())..];
    assert!(rest.len() >= 3, "too few RSS samples: {samples:?}");
    let third = rest.len() / 3;
    let first_max = rest[..third.max(1)].iter().max().copied().unwrap();
    let last_max = rest[rest.len() - third.max(1)..]
        .iter()
        .max()
        .copied()
        .unwrap();
    let c = &counts;
    println!(
        "soak: {} s, {} connections: {} writes ({} MiB), {} reads checked, {} trims, {} flushes; \
         {snaps} online snapshots, {deletes} deletes; RSS KiB after warm-up: first third max \
         {first_max}, last third max {last_max} ({} samples); bytes lost = 0",
        secs.as_secs(),
        CONNS,
        c.writes.load(Ordering::Relaxed),
        c.bytes_written.load(Ordering::Relaxed) >> 20,
        c.reads.load(Ordering::Relaxed),
        c.trims.load(Ordering::Relaxed),
        c.flushes.load(Ordering::Relaxed),
        samples.len()
    );
    assert!(
        last_max <= first_max + 32 * 1024,
        "RSS grew: first third max {first_max} KiB, last third max {last_max} KiB: {samples:?}"
    );
}
