//! Engine behaviour on small pools: I/O semantics, snapshots, exactly-once provisioning, flush
//! coalescing, pool-full policies, fail-stop after a metadata failure, data-device errors,
//! teardown and persistence.

mod common;

use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::metadata::{thin_check, verify_meta};
use common::pattern::pattern_at;
use common::pool::*;
use thinnbd::engine::{EngineConfig, FileStore, NoSpacePolicy, Pool, PoolMode};
use thinnbd::pdata::block_io::BlockIo;
use thinnbd::pdata::mem_block_io::MemBlockIo;
use thinnbd::ErrorKind;

const BS: u64 = 64 * KIB;

#[test]
fn reads_writes_discards_and_zeroes_follow_the_block_rules() {
    let tp = temp_pool(16 * MIB, BS, EngineConfig::default());
    let pool = &tp.pool;
    pool.create_thin(1).unwrap();
    let h = pool.activate(1, 4 * MIB, false).unwrap();
    let mut buf = vec![0xAAu8; 200_000];
    h.read(12_345, &mut buf).unwrap();
    assert!(
        buf.iter().all(|&b| b == 0),
        "unprovisioned blocks read as zeros"
    );
    assert_eq!(pool.status().data_used, 0, "reads provision nothing");

    // A write spanning a partial, a whole and another partial block.
    let data = pattern_at(1, 60_000, 140_000);
    h.write(60_000, &data, false).unwrap();
    assert_eq!(h.mapped_blocks().unwrap(), 4);
    let mut back = vec![0u8; 300_000];
    h.read(0, &mut back).unwrap();
    assert!(
        back[..60_000].iter().all(|&b| b == 0),
        "the rest of a new block is zero"
    );
    assert_eq!(&back[60_000..200_000], &data[..]);
    assert!(back[200_000..].iter().all(|&b| b == 0));

    let st = h.block_status(0, 6 * BS).unwrap();
    assert_eq!(st, vec![(4 * BS, true), (2 * BS, false)]);
    let st = h.block_status(100, 1000).unwrap();
    assert_eq!(st, vec![(1000, true)]);

    // Discard: block 1 and 2 are whole and go away; the edges are zeroed.
    h.discard(BS - 10, 2 * BS + 20, false).unwrap();
    assert_eq!(h.mapped_blocks().unwrap(), 2);
    h.read(0, &mut back).unwrap();
    let mut expect = vec![0u8; 300_000];
    expect[60_000..200_000].copy_from_slice(&data);
    for b in &mut expect[(BS - 10) as usize..(3 * BS + 10) as usize] {
        *b = 0;
    }
    assert_eq!(back, expect);

    // Write-zeroes without unmapping keeps the mapping; with unmapping drops whole blocks.
    h.write_zeroes(3 * BS + 100, 50, false, false).unwrap();
    expect[(3 * BS + 100) as usize..(3 * BS + 150) as usize].fill(0);
    assert_eq!(h.mapped_blocks().unwrap(), 2);
    h.write_zeroes(0, BS, true, true).unwrap();
    expect[..BS as usize].fill(0);
    assert_eq!(h.mapped_blocks().unwrap(), 1);
    h.read(0, &mut back).unwrap();
    assert_eq!(back, expect);

    // Bounds.
    let e = h.read(4 * MIB - 10, &mut [0u8; 11]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OutOfBounds);
    assert_eq!(
        h.write(u64::MAX - 3, &[1; 8], false).unwrap_err().kind(),
        ErrorKind::OutOfBounds
    );
    assert_eq!(
        h.discard(4 * MIB, 1, false).unwrap_err().kind(),
        ErrorKind::OutOfBounds
    );
    h.read(4 * MIB - 10, &mut [0u8; 10]).unwrap();

    // Read-only activation.
    pool.create_thin(2).unwrap();
    let ro = pool.activate(2, MIB, true).unwrap();
    assert_eq!(
        ro.write(0, &[1], false).unwrap_err().kind(),
        ErrorKind::ReadOnly
    );
    assert_eq!(
        pool.activate(2, MIB, false).unwrap_err().kind(),
        ErrorKind::Busy
    );
}

/// Thin 1 (2 MiB) with its first `blocks` blocks written, and thin 2, its snapshot, both
/// active; with the bytes written.
fn origin_and_snapshot(
    pool: &Pool,
    blocks: usize,
) -> (
    thinnbd::engine::ThinHandle,
    thinnbd::engine::ThinHandle,
    Vec<u8>,
) {
    pool.create_thin(1).unwrap();
    let origin = pool.activate(1, 2 * MIB, false).unwrap();
    let before = pattern_at(7, 0, blocks * BS as usize);
    origin.write(0, &before, false).unwrap();
    pool.create_snapshot(2, 1).unwrap();
    let snap = pool.activate(2, 2 * MIB, false).unwrap();
    (origin, snap, before)
}

#[test]
fn snapshot_of_a_live_origin_keeps_acknowledged_data_and_breaks_sharing() {
    let tp = temp_pool(16 * MIB, BS, EngineConfig::default());
    let pool = &tp.pool;
    let (origin, snap, before) = origin_and_snapshot(pool, 3);
    // Partial overwrite of a shared block: the origin copies it first.
    origin.write(BS + 5, b"hello", false).unwrap();
    snap.write(2 * BS, &[9u8; 4096], false).unwrap();
    let st = pool.status();
    assert_eq!(st.blocks_copied, 2);
    let mut o = vec![0u8; before.len()];
    origin.read(0, &mut o).unwrap();
    let mut expect = before.clone();
    expect[(BS + 5) as usize..(BS + 10) as usize].copy_from_slice(b"hello");
    assert_eq!(o, expect);
    let mut s = vec![0u8; before.len()];
    snap.read(0, &mut s).unwrap();
    let mut expect_s = before.clone();
    expect_s[2 * BS as usize..2 * BS as usize + 4096].fill(9);
    assert_eq!(s, expect_s);
    // A second write to the now-exclusive block does not copy again.
    origin.write(BS + 100, b"again", false).unwrap();
    assert_eq!(pool.status().blocks_copied, 2);
    // Deleting an active thin is refused; after teardown it works.
    assert_eq!(pool.delete_thin(2).unwrap_err().kind(), ErrorKind::Busy);
    let snap2 = snap.clone();
    pool.teardown(snap).unwrap();
    assert_eq!(
        snap2.read(0, &mut [0u8; 1]).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    // A stale handle's teardown does not touch a later activation of the same thin.
    let again = pool.activate(2, MIB, false).unwrap();
    pool.teardown(snap2).unwrap();
    again.read(0, &mut [0u8; 1]).unwrap();
    assert_eq!(pool.delete_thin(2).unwrap_err().kind(), ErrorKind::Busy);
    pool.teardown(again).unwrap();
    pool.delete_thin(2).unwrap();
    origin.read(0, &mut o).unwrap();
    expect[(BS + 100) as usize..(BS + 105) as usize].copy_from_slice(b"again");
    assert_eq!(o, expect);
}

#[test]
fn copy_on_write_without_waiting_when_the_source_is_cached() {
    let tp = temp_pool(16 * MIB, BS, EngineConfig::default());
    let pool = &tp.pool;
    let (origin, snap, before) = origin_and_snapshot(pool, 2);
    // Just written, so in the page cache: the copy needs no waiting.
    assert_eq!(origin.try_write_nowait(BS + 7, b"quick"), Some(()));
    assert_eq!(pool.status().blocks_copied, 1);
    // Now exclusive: written in place, no second copy.
    assert_eq!(origin.try_write_nowait(BS + 100, b"again"), Some(()));
    assert_eq!(pool.status().blocks_copied, 1);
    let mut expect = before.clone();
    expect[(BS + 7) as usize..(BS + 12) as usize].copy_from_slice(b"quick");
    expect[(BS + 100) as usize..(BS + 105) as usize].copy_from_slice(b"again");
    let mut o = vec![0u8; before.len()];
    origin.read(0, &mut o).unwrap();
    assert_eq!(o, expect);
    let mut s = vec![0u8; before.len()];
    snap.read(0, &mut s).unwrap();
    assert_eq!(s, before, "the snapshot keeps the shared data");
    pool.teardown(snap).unwrap();
    pool.teardown(origin).unwrap();
    pool.shutdown().unwrap();
    thin_check(&tp.meta_path());
    verify_meta(&tp.meta_path());
}

#[test]
fn concurrent_writes_to_one_unprovisioned_block_provision_it_once() {
    let tp = temp_pool(
        32 * MIB,
        BS,
        EngineConfig {
            cell_pool_size: 4,
            ..EngineConfig::default()
        },
    );
    let pool = tp.pool.clone();
    pool.create_thin(1).unwrap();
    let h = pool.activate(1, 8 * MIB, false).unwrap();
    const WRITERS: u64 = 16;
    const BLOCKS: u64 = 24;
    for vb in 0..BLOCKS {
        let barrier = Arc::new(Barrier::new(WRITERS as usize));
        let threads: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (h, barrier) = (h.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let off = vb * BS + w * 4096;
                    let data = pattern_at(vb * 100 + w, off, 4096);
                    barrier.wait();
                    h.write(off, &data, false).unwrap();
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }
    let st = pool.status();
    assert_eq!(
        st.blocks_provisioned, BLOCKS,
        "each block provisioned exactly once"
    );
    assert_eq!(h.mapped_blocks().unwrap(), BLOCKS);
    for vb in 0..BLOCKS {
        for w in 0..WRITERS {
            let off = vb * BS + w * 4096;
            let mut got = vec![0u8; 4096];
            h.read(off, &mut got).unwrap();
            assert_eq!(
                got,
                pattern_at(vb * 100 + w, off, 4096),
                "write lost at block {vb} writer {w}"
            );
        }
    }
}

#[test]
fn concurrent_flushes_share_commits() {
    let config = EngineConfig {
        commit_delay: Duration::from_millis(20),
        ..EngineConfig::default()
    };
    let tp = temp_pool(16 * MIB, BS, config);
    let pool = tp.pool.clone();
    pool.create_thin(1).unwrap();
    let h = pool.activate(1, 8 * MIB, false).unwrap();
    let before = pool.status();
    let barrier = Arc::new(Barrier::new(64));
    let threads: Vec<_> = (0..64u64)
        .map(|i| {
            let (h, barrier) = (h.clone(), barrier.clone());
            std::thread::spawn(move || {
                h.write(i * 4096, &pattern_at(i, 0, 4096), false).unwrap();
                barrier.wait();
                h.flush().unwrap();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let after = pool.status();
    let commits = after.commits_done - before.commits_done;
    let flushes = after.flushes_requested - before.flushes_requested;
    eprintln!("64 concurrent flushes -> {commits} commits");
    assert_eq!(flushes, 64);
    assert!(
        (1..=8).contains(&commits),
        "64 flushes caused {commits} commits"
    );
}

fn fill_pool(h: &thinnbd::engine::ThinHandle, blocks: u64) {
    for b in 0..blocks {
        h.write(b * BS, &pattern_at(b, 0, 512), false).unwrap();
    }
}

#[test]
fn full_pool_with_error_policy_fails_new_blocks_at_once() {
    let config = EngineConfig {
        no_space_policy: NoSpacePolicy::Error,
        // A mark in blocks: the default percentage would leave an 8-block pool none.
        low_water_bytes: 2 * BS,
        low_water_percent: 0,
        ..EngineConfig::default()
    };
    let tp = temp_pool(8 * BS, BS, config);
    let pool = &tp.pool;
    pool.create_thin(1).unwrap();
    let h = pool.activate(1, 64 * BS, false).unwrap();
    fill_pool(&h, 6);
    assert!(pool.status().low_water_crossed);
    fill_pool(&h, 8);
    let e = h.write(10 * BS, &[1; 10], false).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NoSpace, "{e}");
    assert_eq!(pool.status().mode, PoolMode::OutOfSpace);
    // Provisioned blocks stay writable.
    h.write(3 * BS + 7, b"still fine", true).unwrap();
    // Freeing a block (it needs a commit before reuse; the engine commits on demand).
    h.discard(2 * BS, BS, false).unwrap();
    h.write(10 * BS, &[1; 10], false).unwrap();
    assert_eq!(pool.status().mode, PoolMode::Write);
    let mut got = [0u8; 10];
    h.read(3 * BS + 7, &mut got).unwrap();
    assert_eq!(&got, b"still fine");
}

#[test]
fn full_pool_with_queue_policy_waits_for_space_then_times_out() {
    let config = EngineConfig {
        no_space_policy: NoSpacePolicy::Queue,
        queue_timeout: Duration::from_secs(30),
        ..EngineConfig::default()
    };
    let tp = temp_pool(8 * BS, BS, config);
    let pool = tp.pool.clone();
    pool.create_thin(1).unwrap();
    let h = pool.activate(1, 64 * BS, false).unwrap();
    fill_pool(&h, 8);
    let (tx, rx) = std::sync::mpsc::channel();
    let writer = {
        let h = h.clone();
        std::thread::spawn(move || tx.send(h.write(20 * BS, &[5; 100], false)).unwrap())
    };
    // The queued write must not complete while the pool stays full.
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "write completed on a full pool"
    );
    h.write(BS, b"overwrite works while full", false).unwrap();
    h.discard(0, BS, false).unwrap();
    let r = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("queued write released by the discard");
    r.unwrap();
    writer.join().unwrap();
    let mut got = [0u8; 100];
    h.read(20 * BS, &mut got).unwrap();
    assert_eq!(got, [5; 100]);

    // With a short timeout the queued write gives up with NoSpace, not Io.
    drop(h);
    let config = EngineConfig {
        no_space_policy: NoSpacePolicy::Queue,
        queue_timeout: Duration::from_millis(200),
        ..EngineConfig::default()
    };
    let tp2 = temp_pool(4 * BS, BS, config);
    tp2.pool.create_thin(1).unwrap();
    let h2 = tp2.pool.activate(1, 64 * BS, false).unwrap();
    fill_pool(&h2, 4);
    let e = h2.write(30 * BS, &[1], false).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NoSpace, "{e}");
}

#[test]
fn metadata_write_failure_turns_the_pool_read_only() {
    let mem = MemBlockIo::new(1024);
    let io: Arc<dyn BlockIo> = Arc::new(mem.clone());
    let dir = tempfile::tempdir().unwrap();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.path().join("data"))
        .unwrap();
    file.set_len(64 * BS).unwrap();
    let pool = Pool::create_from_parts(
        io,
        Arc::new(FileStore::new(file, true)),
        BS,
        64,
        EngineConfig::default(),
    )
    .unwrap();
    pool.create_thin(1).unwrap();
    let h = pool.activate(1, 32 * BS, false).unwrap();
    let data = pattern_at(3, 0, 100_000);
    h.write(0, &data, true).unwrap();
    mem.fail_writes(true);
    h.write(5 * BS, &[1; 10], false).unwrap();
    let e = h.flush().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    let st = pool.status();
    assert_eq!(st.mode, PoolMode::ReadOnly);
    assert!(st.read_only_reason.is_some());
    for off in [0, 6 * BS] {
        let e = h.write(off, &[2; 10], false).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ReadOnly);
        assert!(e.to_string().contains("read-only"), "{e}");
    }
    assert_eq!(
        h.discard(0, BS, false).unwrap_err().kind(),
        ErrorKind::ReadOnly
    );
    assert_eq!(pool.create_thin(9).unwrap_err().kind(), ErrorKind::ReadOnly);
    let mut back = vec![0u8; data.len()];
    h.read(0, &mut back).unwrap();
    assert_eq!(back, data, "reads keep working");
}

#[test]
fn data_device_errors_fail_only_the_request() {
    let tp = temp_pool(16 * MIB, BS, EngineConfig::default());
    let pool = &tp.pool;
    pool.create_thin(1).unwrap();
    let h = pool.activate(1, MIB, false).unwrap();
    h.write(0, &[7; 4096], false).unwrap();
    let faults = pool.data_faults();
    faults.fail_all_writes(true);
    assert_eq!(
        h.write(0, &[8; 10], false).unwrap_err().kind(),
        ErrorKind::Io
    );
    assert_eq!(
        h.write(3 * BS, &[8; 10], false).unwrap_err().kind(),
        ErrorKind::Io
    );
    assert_eq!(
        h.mapped_blocks().unwrap(),
        1,
        "a failed provisioning maps nothing"
    );
    faults.fail_all_writes(false);
    faults.fail_all_reads(true);
    assert_eq!(h.read(0, &mut [0u8; 10]).unwrap_err().kind(), ErrorKind::Io);
    let mut z = [1u8; 10];
    h.read(5 * BS, &mut z).unwrap();
    assert_eq!(z, [0; 10], "unprovisioned reads do not touch the device");
    faults.clear();
    assert!(faults.injected() >= 3);
    assert_eq!(pool.status().mode, PoolMode::Write);
    h.write(3 * BS, &[8; 10], true).unwrap();
    let mut got = [0u8; 4096];
    h.read(0, &mut got).unwrap();
    assert_eq!(got, [7; 4096]);
}

#[test]
fn pool_reopens_with_its_data_and_passes_the_checkers() {
    let tp = temp_pool(16 * MIB, BS, EngineConfig::default());
    let data = pattern_at(11, 0, 300_000);
    {
        let pool = tp.pool.clone();
        pool.create_thin(1).unwrap();
        let h = pool.activate(1, 4 * MIB, false).unwrap();
        h.write(1000, &data, false).unwrap();
        pool.create_snapshot(2, 1).unwrap();
        h.write(2000, b"after snapshot", false).unwrap();
        pool.shutdown().unwrap();
    }
    let TempPool { dir, pool } = tp;
    drop(pool);
    thin_check(&dir.path().join("meta"));
    verify_meta(&dir.path().join("meta"));
    let pool = Pool::open(
        &dir.path().join("meta"),
        &dir.path().join("data"),
        EngineConfig::default(),
    )
    .unwrap();
    let h1 = pool.activate(1, 4 * MIB, false).unwrap();
    let h2 = pool.activate(2, 4 * MIB, false).unwrap();
    let mut got = vec![0u8; data.len()];
    h2.read(1000, &mut got).unwrap();
    assert_eq!(got, data);
    h1.read(1000, &mut got).unwrap();
    let mut expect = data.clone();
    expect[1000..1014].copy_from_slice(b"after snapshot");
    assert_eq!(got, expect);
}

#[test]
fn growing_or_deleting_releases_queued_writes() {
    let config = EngineConfig {
        no_space_policy: NoSpacePolicy::Queue,
        queue_timeout: Duration::from_secs(30),
        ..EngineConfig::default()
    };
    let tp = temp_pool(6 * BS, BS, config);
    let pool = tp.pool.clone();
    pool.create_thin(1).unwrap();
    pool.create_thin(2).unwrap();
    let h = pool.activate(1, 64 * BS, false).unwrap();
    let other = pool.activate(2, 64 * BS, false).unwrap();
    fill_pool(&other, 2);
    fill_pool(&h, 4);
    let queued = |off: u64| {
        let (tx, rx) = std::sync::mpsc::channel();
        let h = h.clone();
        std::thread::spawn(move || tx.send(h.write(off, &[3; 64], false)).unwrap());
        rx
    };
    // Growing the data device.
    let rx = queued(40 * BS);
    assert!(
        rx.recv_timeout(Duration::from_millis(200)).is_err(),
        "write completed on a full pool"
    );
    pool.resize_data(7 * BS).unwrap();
    rx.recv_timeout(Duration::from_secs(30))
        .expect("released by the resize")
        .unwrap();
    assert_eq!(pool.status().data_total, 7);
    // Deleting another thin.
    let rx = queued(41 * BS);
    assert!(
        rx.recv_timeout(Duration::from_millis(200)).is_err(),
        "write completed on a full pool"
    );
    pool.teardown(other).unwrap();
    pool.delete_thin(2).unwrap();
    rx.recv_timeout(Duration::from_secs(30))
        .expect("released by the delete")
        .unwrap();
    let mut got = [0u8; 64];
    h.read(41 * BS, &mut got).unwrap();
    assert_eq!(got, [3; 64]);
}

#[test]
fn partial_writes_zero_the_rest_of_a_block_on_a_used_device() {
    // A data file full of old bytes, not known to read zeros.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data");
    std::fs::write(&path, vec![0xEEu8; (16 * BS) as usize]).unwrap();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let io: Arc<dyn BlockIo> = Arc::new(MemBlockIo::new(1024));
    let pool = Pool::create_from_parts(
        io,
        Arc::new(FileStore::new(file, false)),
        BS,
        16,
        EngineConfig::default(),
    )
    .unwrap();
    pool.create_thin(1).unwrap();
    let h = pool.activate(1, 16 * BS, false).unwrap();
    h.write(BS + 100, b"abc", false).unwrap();
    let mut block = vec![1u8; BS as usize];
    h.read(BS, &mut block).unwrap();
    assert_eq!(&block[100..103], b"abc");
    block[100..103].fill(0);
    assert!(
        block.iter().all(|&b| b == 0),
        "stale device bytes leaked into a new block"
    );
}

#[test]
fn discarding_a_whole_unshared_block_punches_it_out_of_the_data_file() {
    use std::os::unix::fs::MetadataExt;
    let tp = temp_pool(16 * MIB, BS, EngineConfig::default());
    let pool = &tp.pool;
    pool.create_thin(1).unwrap();
    let h = pool.activate(1, 4 * MIB, false).unwrap();
    h.write(0, &vec![0x42u8; (16 * BS) as usize], true).unwrap();
    let allocated = || std::fs::metadata(tp.data_path()).unwrap().blocks() * 512;
    let before = allocated();
    assert!(
        before >= 16 * BS,
        "the writes were allocated ({before} bytes)"
    );
    h.discard(0, 16 * BS, true).unwrap();
    let after = allocated();
    assert!(
        after + 16 * BS <= before,
        "discard freed no space: {before} -> {after}"
    );
    let mut z = vec![1u8; 4096];
    h.read(5 * BS, &mut z).unwrap();
    assert!(z.iter().all(|&b| b == 0));
    // A punched block is known to read zeros, so re-provisioning it needs no zero-fill.
    h.write(3 * BS + 10, b"x", false).unwrap();
    let mut blk = vec![1u8; BS as usize];
    h.read(3 * BS, &mut blk).unwrap();
    assert_eq!(blk.iter().filter(|&&b| b != 0).count(), 1);
}

#[test]
fn a_read_in_flight_keeps_the_block_it_looked_up_from_reuse() {
    let tp = temp_pool(16 * MIB, BS, EngineConfig::default());
    let pool = &tp.pool;
    let (origin, snap, before) = origin_and_snapshot(pool, 1);
    let faults = pool.data_faults();
    // The read looks block 0's mapping up (the block shared with the snapshot), then stalls.
    faults.set_read_delay(Duration::from_millis(400));
    let reader = {
        let origin = origin.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            origin.read(0, &mut buf).unwrap();
            buf
        })
    };
    while faults.reads_delayed() == 0 {
        std::thread::yield_now();
    }
    faults.set_read_delay(Duration::ZERO);
    // Meanwhile the origin breaks sharing and the snapshot goes: the old block is freed...
    origin.write(4096, &[1u8; 4096], false).unwrap();
    pool.teardown(snap).unwrap();
    pool.delete_thin(2).unwrap();
    // ...and a new volume's write would take it (lowest free block first) and the discard
    // passdown would have punched it, had the commit not waited for the read.
    pool.create_thin(3).unwrap();
    let other = pool.activate(3, 2 * MIB, false).unwrap();
    other.write(0, &[0xee; 4096], false).unwrap();
    other.flush().unwrap();
    let got = reader.join().unwrap();
    assert!(
        got == before[..4096],
        "the read returned bytes that were not the origin's (first byte {:#x})",
        got[0]
    );
    pool.teardown(other).unwrap();
    pool.teardown(origin).unwrap();
}

#[test]
fn checking_the_last_commit_while_writers_commit_finds_it_clean() {
    let tp = temp_pool(64 * MIB, BS, EngineConfig::default());
    let pool = tp.pool.clone();
    pool.create_thin(1).unwrap();
    let h = pool.activate(1, 32 * MIB, false).unwrap();
    let writers: Vec<_> = (0..2u64)
        .map(|w| {
            let h = h.clone();
            std::thread::spawn(move || {
                for i in 0..400u64 {
                    // Scattered blocks, rewrites and discards, so commits shadow and free
                    // metadata blocks all the time.
                    let block = (i * 37 + w * 11) % 256;
                    if i % 7 == 3 {
                        h.discard(block * BS, BS, false).unwrap();
                    } else {
                        h.write(block * BS, &pattern_at(i, 0, 4096), false).unwrap();
                    }
                    if i % 5 == 0 {
                        h.flush().unwrap();
                    }
                }
            })
        })
        .collect();
    let mut last_transaction = 0;
    for round in 0..40 {
        let report = pool.check_committed();
        assert!(
            report.is_clean(),
            "round {round}: the last commit checked dirty: {:?}",
            report.problems
        );
        assert!(report.transaction_id >= last_transaction);
        last_transaction = report.transaction_id;
        if round == 20 {
            pool.create_snapshot(2, 1).unwrap();
        }
    }
    for w in writers {
        w.join().unwrap();
    }
    h.flush().unwrap();
    let report = pool.check_committed();
    assert!(report.is_clean(), "{:?}", report.problems);
    assert_eq!(report.nr_devices, 2);
    let mapped = pool
        .status()
        .thins
        .iter()
        .find(|t| t.id == 1)
        .unwrap()
        .mapped_blocks;
    assert!(mapped > 0);
    assert!(
        report.nr_mappings >= mapped,
        "{} < {mapped}",
        report.nr_mappings
    );
}
