//! Metadata exhaustion and pool growth at the engine level: a pool whose metadata fills refuses
//! only what needs new metadata (no space), keeps serving the rest, never turns read-only, and
//! a grow brings everything back.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::metadata::{thin_check, verify_meta};
use common::pattern::pattern_at;
use common::pool::*;
use thinnbd::engine::{EngineConfig, NoSpacePolicy, Pool, PoolMode, ThinHandle};
use thinnbd::error::ErrorKind;

const BLOCK: u64 = 64 * KIB;
const GIB: u64 = 1024 * MIB;

fn error_policy() -> EngineConfig {
    EngineConfig {
        no_space_policy: NoSpacePolicy::Error,
        ..EngineConfig::default()
    }
}

/// Creates thins from `first` on until one is refused; returns the refused id. The refusal
/// must be "no space", never a read-only pool.
fn create_until_refused(pool: &Pool, first: u32) -> u32 {
    for id in first..first + 20_000 {
        if let Err(e) = pool.create_thin(id) {
            assert_eq!(e.kind(), ErrorKind::NoSpace, "thin {id}: {e}");
            return id;
        }
    }
    panic!("20,000 thins fitted in the metadata: the test pool is too large");
}

fn assert_writable_for_what_needs_no_metadata(pool: &Arc<Pool>, thin: u32, provisioned: u64) {
    let h = pool.activate(thin, 64 * GIB, false).unwrap();
    // Writes that need new blocks until the metadata refuses one (when a mapping leaf splits;
    // the data device has room for all of them): no space, to that request alone.
    let mut refused = None;
    for vb in 100..1000u64 {
        match h.write(vb * BLOCK, &[1u8; 4096], false) {
            Ok(()) => h.flush().unwrap(),
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::NoSpace, "{e}");
                assert!(e.to_string().contains("metadata"), "{e}");
                refused = Some(vb);
                break;
            }
        }
    }
    let refused = refused.expect("the metadata never refused a new block");
    let mut buf = vec![0u8; 4096];
    h.read(refused * BLOCK, &mut buf).unwrap();
    assert!(buf.iter().all(|&x| x == 0), "a refused write left data");
    // Overwrites of provisioned blocks, reads, discards and flushes go on.
    for b in 0..provisioned {
        h.write(b * BLOCK, &pattern_at(100 + b, 0, BLOCK as usize), false)
            .unwrap();
    }
    h.flush().unwrap();
    let mut buf = vec![0u8; BLOCK as usize];
    for b in 0..provisioned {
        h.read(b * BLOCK, &mut buf).unwrap();
        assert_eq!(buf, pattern_at(100 + b, 0, BLOCK as usize), "block {b}");
    }
    h.discard((provisioned - 1) * BLOCK, BLOCK, false).unwrap();
    h.flush().unwrap();
    pool.teardown(h).unwrap();
    let st = pool.status();
    assert_ne!(st.mode, PoolMode::ReadOnly, "{:?}", st.read_only_reason);
}

/// What a [`spawn_overwriting_writer`] saw: its handle back, vblock -> tag of the last write
/// acknowledged and flushed, every vblock it tried, and the blocks refused (no space) with the
/// message.
struct WriterLog {
    handle: ThinHandle,
    flushed: BTreeMap<u64, u64>,
    attempted: BTreeSet<u64>,
    refused: Vec<(u64, String)>,
    next_new: u64,
}

impl WriterLog {
    fn refused_for_metadata(&self) -> usize {
        self.refused
            .iter()
            .filter(|(_, e)| e.contains("metadata"))
            .count()
    }
}

/// Rounds of: overwrite vblocks `0..overwrites`, write one new vblock (from `first_new` up to
/// `last_new`), flush. Every refusal must be "no space"; runs until `stop` is set and the
/// metadata has refused at least once, or the new vblocks run out.
fn spawn_overwriting_writer(
    handle: ThinHandle,
    stop: Arc<AtomicBool>,
    overwrites: u64,
    first_new: u64,
    last_new: u64,
    mut flushed: BTreeMap<u64, u64>,
) -> std::thread::JoinHandle<WriterLog> {
    std::thread::spawn(move || {
        let mut log = WriterLog {
            handle,
            flushed: BTreeMap::new(),
            attempted: BTreeSet::new(),
            refused: Vec::new(),
            next_new: first_new,
        };
        let mut tag = 1000u64;
        while !(stop.load(Ordering::Acquire) && log.refused_for_metadata() > 0)
            && log.next_new <= last_new
        {
            let mut pending = Vec::new();
            let targets = (0..overwrites).chain(std::iter::once(log.next_new));
            log.next_new += 1;
            for vb in targets {
                tag += 1;
                log.attempted.insert(vb);
                match log
                    .handle
                    .write(vb * BLOCK, &pattern_at(tag, 0, 4096), false)
                {
                    Ok(()) => pending.push((vb, tag)),
                    Err(e) => {
                        assert_eq!(e.kind(), ErrorKind::NoSpace, "block {vb}: {e}");
                        log.refused.push((vb, e.to_string()));
                    }
                }
            }
            log.handle.flush().unwrap();
            flushed.extend(pending);
        }
        log.flushed = flushed;
        log
    })
}

#[test]
fn filling_metadata_with_volumes_refuses_new_volumes_and_keeps_the_pool_writable() {
    let _w = watchdog(600, "filling metadata with volumes");
    let tp = temp_pool_fast(64 * MIB, BLOCK, error_policy());
    let pool = tp.pool.clone();
    pool.create_thin(0).unwrap();
    let h = pool.activate(0, 64 * MIB, false).unwrap();
    for b in 0..8 {
        h.write(b * BLOCK, &pattern_at(b, 0, BLOCK as usize), false)
            .unwrap();
    }
    h.flush().unwrap();
    pool.teardown(h).unwrap();

    let refused = create_until_refused(&pool, 1);
    assert!(
        refused > 1000,
        "the default metadata holds 1000 volumes, got {refused}"
    );
    // The refusal leaves no trace: the next try is refused the same way.
    assert_eq!(
        pool.create_thin(refused).unwrap_err().kind(),
        ErrorKind::NoSpace
    );
    assert_writable_for_what_needs_no_metadata(&pool, 0, 8);

    // Growing the metadata online lifts the refusal.
    let meta_now = pool.status().metadata_total * 4096;
    pool.grow(None, Some(meta_now * 2)).unwrap();
    pool.create_thin(refused).unwrap();
    let h = pool.activate(0, 64 * MIB, false).unwrap();
    h.write(20 * BLOCK, &pattern_at(20, 0, BLOCK as usize), false)
        .unwrap();
    h.flush().unwrap();
    pool.teardown(h).unwrap();
    drop(pool);
    let (_dir, meta, data) = tp.close_checked();

    let pool = Pool::open(&meta, &data, error_policy()).unwrap();
    assert_eq!(pool.status().metadata_total * 4096, meta_now * 2);
    assert!(pool.thin_ids().contains(&refused));
    let h = pool.activate(0, 64 * MIB, false).unwrap();
    let mut buf = vec![0u8; BLOCK as usize];
    for b in 0..7 {
        h.read(b * BLOCK, &mut buf).unwrap();
        assert_eq!(buf, pattern_at(100 + b, 0, BLOCK as usize), "block {b}");
    }
    h.read(20 * BLOCK, &mut buf).unwrap();
    assert_eq!(buf, pattern_at(20, 0, BLOCK as usize));
}

/// Volumes fill the metadata while a writer overwrites its provisioned blocks and provisions
/// new ones: the writer sees only successes and no-space refusals for want of metadata, the
/// pool never turns read-only, everything acknowledged and flushed survives a reopen, and a
/// metadata grow lets a new volume and new blocks in again.
#[test]
fn filling_metadata_with_volumes_under_write_load_loses_nothing_flushed() {
    let _w = watchdog(600, "filling metadata with volumes under write load");
    // 4096 data blocks: the writer cannot run out of data before the metadata fills.
    let tp = temp_pool_fast(256 * MIB, BLOCK, error_policy());
    let pool = tp.pool.clone();
    pool.create_thin(0).unwrap();
    let provisioned = 8u64;
    let last_new = 3500u64;
    let h = pool.activate(0, 256 * MIB, false).unwrap();
    for b in 0..provisioned {
        h.write(b * BLOCK, &pattern_at(b, 0, 4096), false).unwrap();
    }
    h.flush().unwrap();
    let expected: BTreeMap<u64, u64> = (0..provisioned).map(|b| (b, b)).collect();

    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_overwriting_writer(
        h,
        stop.clone(),
        provisioned,
        provisioned,
        last_new,
        expected,
    );
    let refused_id = create_until_refused(&pool, 1);
    stop.store(true, Ordering::Release);
    let WriterLog {
        handle: h,
        flushed: mut expected,
        attempted,
        refused,
        next_new,
    } = writer.join().unwrap();
    assert!(
        !refused.is_empty(),
        "the writer never met the full metadata"
    );
    // The data device has room: only the metadata refuses, and only new blocks.
    for (vb, e) in &refused {
        assert!(e.contains("metadata"), "block {vb}: {e}");
        assert!(*vb >= provisioned, "overwrite of block {vb} refused: {e}");
    }
    assert_eq!(
        pool.create_thin(refused_id).unwrap_err().kind(),
        ErrorKind::NoSpace
    );
    let st = pool.status();
    assert_ne!(st.mode, PoolMode::ReadOnly, "{:?}", st.read_only_reason);

    // A metadata grow online lets a new volume and new blocks in.
    let meta_now = pool.status().metadata_total * 4096;
    pool.grow(None, Some(meta_now * 2)).unwrap();
    pool.create_thin(refused_id).unwrap();
    for vb in next_new..next_new + 200 {
        h.write(vb * BLOCK, &pattern_at(vb, 0, 4096), false)
            .unwrap();
        expected.insert(vb, vb);
    }
    h.flush().unwrap();
    pool.teardown(h).unwrap();
    drop(pool);
    let (_dir, meta, data) = tp.close_checked();

    let pool = Pool::open(&meta, &data, error_policy()).unwrap();
    assert!(pool.thin_ids().contains(&refused_id));
    let h = pool.activate(0, 256 * MIB, false).unwrap();
    let mut buf = vec![0u8; 4096];
    for vb in attempted.into_iter().chain(next_new..next_new + 200) {
        h.read(vb * BLOCK, &mut buf).unwrap();
        match expected.get(&vb) {
            Some(t) => assert_eq!(buf, pattern_at(*t, 0, 4096), "block {vb}"),
            None => assert!(buf.iter().all(|&x| x == 0), "block {vb}"),
        }
    }
}

/// Snapshots fill the metadata while a writer overwrites and provisions: the writer sees only
/// successes and no-space refusals, and everything it saw flushed survives a restart.
#[test]
fn filling_metadata_with_snapshots_under_write_load_loses_nothing_flushed() {
    let _w = watchdog(600, "filling metadata with snapshots");
    let dir = tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .unwrap();
    let (meta, data) = (dir.path().join("meta"), dir.path().join("data"));
    // 256 metadata blocks: a few dozen snapshots fill them.
    let pool = Pool::create_sized(
        &meta,
        &data,
        512 * MIB,
        BLOCK,
        Some(256 * 4096),
        error_policy(),
    )
    .unwrap();
    pool.create_thin(0).unwrap();
    let blocks = 64u64;
    let h = pool.activate(0, 64 * GIB, false).unwrap();
    for b in 0..blocks / 2 {
        h.write(b * BLOCK, &pattern_at(b, 0, 4096), false).unwrap();
    }
    h.flush().unwrap();
    // vblock -> tag of the last write acknowledged and flushed (absent: reads zeros).
    let mut expected: BTreeMap<u64, u64> = (0..blocks / 2).map(|b| (b, b)).collect();

    let stop = Arc::new(AtomicBool::new(false));
    // The origin's blocks (shared after each snapshot), then a new block in a leaf of its own.
    let writer = spawn_overwriting_writer(
        h,
        stop.clone(),
        blocks,
        blocks + 1,
        blocks + 2000,
        expected.clone(),
    );
    let mut snaps = 0u32;
    loop {
        match pool.create_snapshot(1 + snaps, 0) {
            Ok(()) => snaps += 1,
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::NoSpace, "snapshot {}: {e}", 1 + snaps);
                assert!(e.to_string().contains("metadata"), "{e}");
                break;
            }
        }
        assert!(snaps < 10_000, "the metadata never filled");
    }
    stop.store(true, Ordering::Release);
    let log = writer.join().unwrap();
    assert!(snaps > 0, "no snapshot fitted at all");
    assert!(
        log.refused_for_metadata() > 0,
        "the writer never met the full metadata"
    );
    let (h, attempted) = (log.handle, log.attempted);
    expected = log.flushed;
    let st = pool.status();
    assert_ne!(st.mode, PoolMode::ReadOnly, "{:?}", st.read_only_reason);
    pool.teardown(h).unwrap();

    // Deleting snapshots frees metadata: new blocks are writable again.
    for id in 1..=snaps {
        pool.delete_thin(id).unwrap();
    }
    let h = pool.activate(0, 64 * GIB, false).unwrap();
    h.write(blocks * BLOCK, &pattern_at(7, 0, 4096), false)
        .unwrap();
    h.flush().unwrap();
    expected.insert(blocks, 7);
    pool.teardown(h).unwrap();
    pool.shutdown().unwrap();
    drop(pool);
    thin_check(&meta);
    verify_meta(&meta);

    let pool = Pool::open(&meta, &data, error_policy()).unwrap();
    let h = pool.activate(0, 64 * GIB, false).unwrap();
    let mut buf = vec![0u8; 4096];
    for vb in attempted {
        h.read(vb * BLOCK, &mut buf).unwrap();
        match expected.get(&vb) {
            Some(t) => assert_eq!(buf, pattern_at(*t, 0, 4096), "block {vb}"),
            None => assert!(buf.iter().all(|&x| x == 0), "block {vb}"),
        }
    }
}

/// A full data device with the queue policy: writers wait, an online grow lets them finish.
#[test]
fn growing_the_data_online_lets_queued_writes_finish() {
    let _w = watchdog(300, "queued writes after a grow");
    let tp = temp_pool_fast(
        BLOCK * 16,
        BLOCK,
        EngineConfig {
            no_space_policy: NoSpacePolicy::Queue,
            queue_timeout: Duration::from_secs(120),
            ..EngineConfig::default()
        },
    );
    let pool = tp.pool.clone();
    pool.create_thin(0).unwrap();
    let h = pool.activate(0, 64 * MIB, false).unwrap();
    for b in 0..16 {
        h.write(b * BLOCK, &pattern_at(b, 0, 4096), false).unwrap();
    }
    h.flush().unwrap();
    let writers: Vec<_> = (16..24u64)
        .map(|b| {
            let h = h.clone();
            std::thread::spawn(move || {
                h.write(b * BLOCK, &pattern_at(b, 0, 4096), false)?;
                h.flush()
            })
        })
        .collect();
    // Bounded wait until the pool reports itself full (the writers are queued).
    for _ in 0..6000 {
        if pool.status().mode == PoolMode::OutOfSpace {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(pool.status().mode, PoolMode::OutOfSpace);
    assert!(writers.iter().all(|w| !w.is_finished()));
    // Shrinking is refused and changes nothing.
    let err = pool.grow(Some(BLOCK * 8), None).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    pool.grow(Some(BLOCK * 32), None).unwrap();
    for w in writers {
        w.join().unwrap().unwrap();
    }
    assert_eq!(pool.status().data_total, 32);
    pool.teardown(h).unwrap();
    drop(pool);
    let (_dir, meta, data) = tp.close_checked();
    let pool = Pool::open(&meta, &data, EngineConfig::default()).unwrap();
    let h = pool.activate(0, 64 * MIB, false).unwrap();
    let mut buf = vec![0u8; 4096];
    for b in 0..24 {
        h.read(b * BLOCK, &mut buf).unwrap();
        assert_eq!(buf, pattern_at(b, 0, 4096), "block {b}");
    }
}

/// A data file enlarged behind the pool's back (as a block device grown by LVM) is taken up by
/// a grow without a size.
#[test]
fn a_grow_without_a_size_takes_up_an_enlarged_data_device() {
    let tp = temp_pool(BLOCK * 16, BLOCK, EngineConfig::default());
    std::fs::OpenOptions::new()
        .write(true)
        .open(tp.data_path())
        .unwrap()
        .set_len(BLOCK * 40)
        .unwrap();
    assert_eq!(tp.pool.status().data_total, 16);
    tp.pool.grow(None, None).unwrap();
    assert_eq!(tp.pool.status().data_total, 40);
}

#[test]
fn the_default_metadata_counts_volumes_not_only_data_blocks() {
    // thin_metadata_size -b 64k -s 64m -m 1000: about 1009 blocks; ours adds the commit and
    // freeing reserves.
    let bytes = Pool::default_metadata_bytes(64 * MIB, BLOCK);
    assert!(bytes >= (1000 + 9) * 4096, "{bytes}");
    // The estimate grows with the data: a leaf per 126 blocks.
    let big = Pool::default_metadata_bytes(64 * 1024 * MIB, BLOCK);
    assert!(big >= bytes + (1_048_576 / 126 - 9) * 4096, "{big}");
}

#[test]
fn the_metadata_low_water_mark_is_reported() {
    let tp = temp_pool_fast(
        64 * MIB,
        BLOCK,
        EngineConfig {
            metadata_low_water_percent: 50,
            ..error_policy()
        },
    );
    let st = tp.pool.status();
    assert!(!st.metadata_low_water_crossed, "{st:?}");
    // Half the metadata on top of the reserve, so the warning comes before a refusal.
    assert_eq!(
        st.metadata_low_water_blocks,
        st.metadata_reserve + st.metadata_total / 2
    );
    let mut id = 0;
    while tp.pool.status().metadata_free > st.metadata_low_water_blocks {
        tp.pool.create_thin(id).unwrap();
        id += 1;
        assert!(id < 20_000);
    }
    assert!(tp.pool.status().metadata_low_water_crossed);
}
