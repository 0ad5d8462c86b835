//! The RADOS core against a real (single-node, throwaway) Ceph cluster: the data store's
//! objects, the metadata device's ordering and durability, a whole engine pool on both, and
//! the owner lock with its fencing. Each test has a RADOS pool of its own in the cluster this
//! binary starts (tests/common/ceph.rs); without Ceph installed they skip, under CI=true they
//! fail.
#![cfg(feature = "rados")]

mod common;

use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::ceph::{CephCluster, RadosPool};
use common::pattern::pattern_at;
use thinnbd::engine::data::DataStore;
use thinnbd::engine::{EngineConfig, Pool};
use thinnbd::pdata::block_io::{BlockIo, BLOCK_SIZE};
use thinnbd::rados::lock::LOCK_NAME;
use thinnbd::rados::{
    Cluster, OwnerLock, PoolHeader, PoolObjects, RadosBlockIo, RadosLocation, RadosStore, Wait,
};
use thinnbd::ErrorKind;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const BS: u64 = 64 * KIB;

/// A RADOS pool of its own for one test, and the location of thin pool `tank` in it.
fn setup(rados_pool: &str) -> Option<(RadosPool, RadosLocation)> {
    let pool = CephCluster::shared()?.pool(rados_pool);
    let location = RadosLocation {
        pool: pool.name.clone(),
        name: "tank".into(),
        ceph_conf: Some(pool.cluster.conf.clone()),
        client_id: None,
        keyring: None,
    };
    Some((pool, location))
}

fn connect(loc: &RadosLocation) -> Arc<Cluster> {
    Cluster::connect(loc).unwrap_or_else(|e| panic!("connecting for {loc}: {e}"))
}

fn store(cluster: &Arc<Cluster>, loc: &RadosLocation, size: u64) -> RadosStore {
    RadosStore::new(cluster.clone(), loc, BS, size).unwrap()
}

fn data_blocks(cluster: &Cluster, loc: &RadosLocation) -> Vec<u64> {
    let objects = PoolObjects::new(loc);
    let mut blocks: Vec<u64> = cluster
        .list_objects(&objects.data_prefix())
        .unwrap()
        .iter()
        .map(|n| objects.data_block_of(n).expect("a data object name"))
        .collect();
    blocks.sort_unstable();
    blocks
}

/// The test pattern for `len` bytes at byte `offset` (of a store or a volume).
fn pattern(offset: u64, len: usize) -> Vec<u8> {
    pattern_at(7, offset, len)
}

#[test]
fn data_round_trips_across_blocks_and_missing_objects_read_zeros() {
    let Some((rp, loc)) = setup("rcore-data") else {
        return;
    };
    let cluster = connect(&loc);
    let data = store(&cluster, &loc, 16 * BS);

    // 60 000 .. 160 000 touches blocks 0, 1 and 2 (64 KiB each).
    let written = pattern(60_000, 100_000);
    data.write_at(&written, 60_000).unwrap();
    let mut back = vec![0xEEu8; written.len()];
    data.read_at(&mut back, 60_000).unwrap();
    assert_eq!(back, written);
    assert_eq!(data_blocks(&cluster, &loc), vec![0, 1, 2]);
    // What `rados ls` sees is the same.
    assert_eq!(
        rp.data_objects("tank"),
        vec![
            "tank.data.0000000000000000",
            "tank.data.0000000000000001",
            "tank.data.0000000000000002"
        ]
    );

    // A read across the written range and the never-written block 3 around it.
    let mut wide = vec![0xEEu8; (4 * BS) as usize];
    data.read_at(&mut wide, 0).unwrap();
    assert!(wide[..60_000].iter().all(|&b| b == 0), "before the write");
    assert_eq!(&wide[60_000..160_000], &written[..]);
    assert!(wide[160_000..].iter().all(|&b| b == 0), "after the write");

    // A partial write into a missing object: the rest of its block reads zeros.
    let small = pattern(5 * BS + 17, 100);
    data.write_at(&small, 5 * BS + 17).unwrap();
    let mut block = vec![0xEEu8; BS as usize];
    data.read_at(&mut block, 5 * BS).unwrap();
    assert!(block[..17].iter().all(|&b| b == 0));
    assert_eq!(&block[17..117], &small[..]);
    assert!(block[117..].iter().all(|&b| b == 0));
    assert_eq!(data_blocks(&cluster, &loc), vec![0, 1, 2, 5]);

    // And a partial overwrite keeps what is around it.
    data.write_at(&[0x5A; 10], 5 * BS + 20).unwrap();
    data.read_at(&mut block, 5 * BS).unwrap();
    assert_eq!(&block[17..20], &small[..3]);
    assert_eq!(&block[20..30], &[0x5A; 10]);
    assert_eq!(&block[30..117], &small[13..]);

    // Nothing past the end.
    let err = data.write_at(&[1; 10], 16 * BS - 5).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::OutOfBounds, "{err}");
    assert!(data.grow_to(32 * BS).unwrap());
    assert!(!data.grow_to(32 * BS).unwrap());
    data.write_at(&[1; 10], 16 * BS - 5).unwrap();
    assert_eq!(data.size().unwrap(), 32 * BS);
}

#[test]
fn punch_removes_whole_blocks_and_zeroes_partial_ones() {
    let Some((_rp, loc)) = setup("rcore-punch") else {
        return;
    };
    let cluster = connect(&loc);
    let data = store(&cluster, &loc, 16 * BS);
    let written = pattern(0, (5 * BS) as usize);
    data.write_at(&written, 0).unwrap();
    assert_eq!(data_blocks(&cluster, &loc), vec![0, 1, 2, 3, 4]);

    // From the middle of block 0 to the middle of block 3.
    let (from, len) = (BS / 2, 3 * BS);
    assert!(data.punch(from, len).unwrap());
    assert_eq!(
        data_blocks(&cluster, &loc),
        vec![0, 3, 4],
        "blocks 1 and 2 lose their objects"
    );
    let mut back = vec![0xEEu8; written.len()];
    data.read_at(&mut back, 0).unwrap();
    let (from, end) = (from as usize, (from + len) as usize);
    assert_eq!(&back[..from], &written[..from]);
    assert!(back[from..end].iter().all(|&b| b == 0), "the punched range");
    assert_eq!(&back[end..], &written[end..]);

    // A missing block's partial punch makes nothing.
    assert!(data.punch(7 * BS + 100, 100).unwrap());
    assert_eq!(data_blocks(&cluster, &loc), vec![0, 3, 4]);

    // What the engine learns at open: every block without an object reads zeros.
    assert_eq!(
        data.zeroed_ranges(16 * BS),
        vec![(BS, 3 * BS), (5 * BS, 16 * BS)]
    );
}

#[test]
fn metadata_blocks_read_back_before_and_after_sync_and_from_another_client() {
    let Some((_rp, loc)) = setup("rcore-meta") else {
        return;
    };
    let cluster = connect(&loc);
    let nr_blocks = 600;
    let io = RadosBlockIo::new(cluster.clone(), &loc, nr_blocks);
    let block_of = |n: u64| -> Box<[u8; BLOCK_SIZE]> {
        let mut b = Box::new([0u8; BLOCK_SIZE]);
        b.copy_from_slice(&pattern(n * BLOCK_SIZE as u64, BLOCK_SIZE));
        b
    };
    // The ends of the first object, the start of the second and one in the third.
    let written = [0u64, 255, 256, 513];
    for n in written {
        io.write_block(n, &block_of(n)).unwrap();
    }
    // Before the sync, reads see the writes (one client, one object: in order).
    for n in written {
        assert_eq!(
            io.read_block(n).unwrap(),
            block_of(n),
            "block {n} before sync"
        );
    }
    assert!(io.read_block(1).unwrap().iter().all(|&b| b == 0));
    // Overwrites in flight together land in order.
    for round in 0..20u8 {
        io.write_block(300, &[round; BLOCK_SIZE]).unwrap();
    }
    io.sync().unwrap();
    assert_eq!(io.read_block(300).unwrap()[..], [19u8; BLOCK_SIZE][..]);

    // Another client (another process, say) sees what was synced.
    let other = connect(&loc);
    let reopened = RadosBlockIo::new(other, &loc, nr_blocks);
    for n in written {
        assert_eq!(
            reopened.read_block(n).unwrap(),
            block_of(n),
            "block {n} reopened"
        );
    }
    // One read over an object boundary.
    let mut run = vec![0xEEu8; 4 * BLOCK_SIZE];
    reopened.read_blocks(254, &mut run).unwrap();
    assert!(run[..BLOCK_SIZE].iter().all(|&b| b == 0));
    assert_eq!(&run[BLOCK_SIZE..2 * BLOCK_SIZE], &block_of(255)[..]);
    assert_eq!(&run[2 * BLOCK_SIZE..3 * BLOCK_SIZE], &block_of(256)[..]);
    assert!(run[3 * BLOCK_SIZE..].iter().all(|&b| b == 0));
    // 1 MiB objects: 600 blocks of which 0..513 written make three objects.
    let objects = PoolObjects::new(&loc);
    let mut names = cluster.list_objects(&objects.meta_prefix()).unwrap();
    names.sort();
    assert_eq!(
        names,
        vec![
            "tank.meta.00000000",
            "tank.meta.00000001",
            "tank.meta.00000002"
        ]
    );
    let err = reopened.read_block(nr_blocks).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
}

#[test]
fn an_engine_pool_on_rados_survives_a_reopen_and_checks_clean() {
    let Some((_rp, loc)) = setup("rcore-pool") else {
        return;
    };
    let data_size = 64 * MIB;
    let meta_blocks = Pool::default_metadata_bytes(data_size, BS) / BLOCK_SIZE as u64;
    let header = PoolHeader::new(BS, data_size, meta_blocks);
    let volume = pattern(3 * MIB + 12_345, 300_000);
    {
        let cluster = connect(&loc);
        header.write(&cluster, &loc).unwrap();
        let pool = Pool::create_from_parts(
            Arc::new(RadosBlockIo::new(cluster.clone(), &loc, meta_blocks)),
            Arc::new(store(&cluster, &loc, data_size)),
            BS,
            data_size / BS,
            EngineConfig::default(),
        )
        .unwrap();
        pool.create_thin(1).unwrap();
        let h = pool.activate(1, 16 * MIB, false).unwrap();
        h.write(3 * MIB + 12_345, &volume, false).unwrap();
        h.flush().unwrap();
        pool.create_snapshot(2, 1).unwrap();
        // Copy-on-write of a shared block, through this client.
        h.write(3 * MIB + 12_345, &[0xC0; 1000], false).unwrap();
        h.flush().unwrap();
        pool.teardown(h).unwrap();
        pool.shutdown().unwrap();
    }
    let cluster = connect(&loc);
    let header_back = PoolHeader::read(&cluster, &loc).unwrap().expect("a header");
    assert_eq!(header_back, header);
    let meta: Arc<dyn BlockIo> = Arc::new(RadosBlockIo::new(
        cluster.clone(),
        &loc,
        header_back.metadata_blocks,
    ));
    let report = thinnbd::thin::check::check(meta.clone());
    assert!(report.is_clean(), "{:?}", report.problems);
    assert_eq!(report.nr_devices, 2);
    let pool = Pool::from_parts(
        meta,
        Arc::new(store(&cluster, &loc, header_back.data_size)),
        EngineConfig::default(),
    )
    .unwrap();
    let mut back = vec![0u8; volume.len()];
    let snap = pool.activate(2, 16 * MIB, true).unwrap();
    snap.read(3 * MIB + 12_345, &mut back).unwrap();
    assert_eq!(back, volume, "the snapshot keeps the first write");
    pool.teardown(snap).unwrap();
    let origin = pool.activate(1, 16 * MIB, true).unwrap();
    origin.read(3 * MIB + 12_345, &mut back).unwrap();
    assert_eq!(&back[..1000], &[0xC0; 1000][..]);
    assert_eq!(&back[1000..], &volume[1000..]);
    pool.teardown(origin).unwrap();
    pool.shutdown().unwrap();
}

fn never_lost() -> Box<dyn Fn(thinnbd::Error) + Send> {
    Box::new(|e| panic!("lost the pool unexpectedly: {e}"))
}

/// Takes the pool (or fails with `Busy`) for `duration`, keeping nobody waiting.
fn take(
    cluster: &Arc<Cluster>,
    loc: &RadosLocation,
    duration: Duration,
) -> thinnbd::Result<OwnerLock> {
    OwnerLock::acquire(cluster, loc, duration, Wait::No, never_lost())
}

/// The client that owns the pool now.
fn owning_client(cluster: &Cluster, loc: &RadosLocation) -> String {
    OwnerLock::describe_owner(cluster, loc)
        .unwrap()
        .expect("an owner")
        .client
}

const MARKED: &str = "tank.data.0000000000000000";

/// `first` owns the pool with a 3 s lock (renewed every second) that reports its loss on the
/// returned channel, and has written "before" into [`MARKED`].
fn own_reporting_loss(
    first: &Arc<Cluster>,
    loc: &RadosLocation,
) -> (OwnerLock, mpsc::Receiver<thinnbd::Error>) {
    let (lost_tx, lost_rx) = mpsc::channel();
    let held = OwnerLock::acquire(
        first,
        loc,
        Duration::from_secs(3),
        Wait::No,
        Box::new(move |e| {
            let _ = lost_tx.send(e);
        }),
    )
    .unwrap();
    first.write_at(MARKED, b"before", 0).unwrap();
    (held, lost_rx)
}

/// The renewal found the pool lost and said so; `first`'s writes fail with `Fenced` and land
/// nowhere (as `other` sees); dropping the lost lock takes no lock again.
fn assert_lost_and_fenced(
    held: OwnerLock,
    lost_rx: &mpsc::Receiver<thinnbd::Error>,
    first: &Cluster,
    other: &Cluster,
    loc: &RadosLocation,
) {
    let lost = lost_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the owner is told it lost the pool");
    assert_eq!(lost.kind(), ErrorKind::Fenced, "{lost}");
    assert!(
        lost.to_string()
            .contains(&format!("lost ownership of pool {loc}")),
        "{lost}"
    );
    assert!(held.is_lost());
    let err = first.write_at(MARKED, b"after!", 0).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Fenced, "{err}");
    assert_eq!(other.read_object(MARKED).unwrap().unwrap(), b"before");
    let header = PoolObjects::new(loc).header();
    let holders_before = other.lockers(&header, LOCK_NAME).unwrap();
    drop(held);
    assert_eq!(
        other.lockers(&header, LOCK_NAME).unwrap(),
        holders_before,
        "a lost owner neither unlocks nor locks again"
    );
}

#[test]
fn a_held_pool_is_busy_for_a_second_client_until_released() {
    let Some((_rp, loc)) = setup("rcore-lock") else {
        return;
    };
    let first = connect(&loc);
    let second = connect(&loc);
    assert_ne!(first.client_name(), second.client_name());
    assert!(OwnerLock::describe_owner(&second, &loc).unwrap().is_none());

    let held = take(&first, &loc, Duration::from_secs(30)).unwrap();
    assert_eq!(held.owner().client, first.client_name());
    assert_eq!(held.owner().pid, std::process::id());
    let seen = OwnerLock::describe_owner(&second, &loc)
        .unwrap()
        .expect("an owner");
    assert_eq!(
        &seen,
        held.owner(),
        "the owner record, read by another client"
    );

    let Err(busy) = take(&second, &loc, Duration::from_secs(30)) else {
        panic!("a second client took a held pool");
    };
    assert_eq!(busy.kind(), ErrorKind::Busy, "{busy}");
    assert!(
        busy.to_string().contains(&first.client_name()),
        "names the owner: {busy}"
    );

    drop(held);
    assert!(OwnerLock::describe_owner(&second, &loc).unwrap().is_none());
    let objects = PoolObjects::new(&loc);
    assert!(
        second.read_object(&objects.owner()).unwrap().is_none(),
        "a clean release leaves no owner record behind"
    );
    let taken = take(&second, &loc, Duration::from_secs(30)).unwrap();
    assert_eq!(taken.owner().client, second.client_name());
    // The first owner left cleanly: nobody was fenced, so it may still write.
    first.write_at("unrelated", b"still writable", 0).unwrap();
}

#[test]
fn an_expired_lock_is_taken_over_and_its_holder_fenced() {
    let Some((_rp, loc)) = setup("rcore-expiry") else {
        return;
    };
    let first = connect(&loc);
    let second = connect(&loc);
    let duration = Duration::from_secs(3);
    let mut stalled = take(&first, &loc, duration).unwrap();
    let data = store(&first, &loc, 16 * BS);
    data.write_at(&[0x11; 4096], 0).unwrap();
    // The owner stalls: its lock is no longer renewed and expires after `duration`.
    stalled.stop_renewing();

    let asked = Instant::now();
    let taken = OwnerLock::acquire(&second, &loc, duration, Wait::Yes, never_lost()).unwrap();
    let waited = asked.elapsed();
    assert!(
        waited >= Duration::from_secs(1) && waited < duration + Duration::from_secs(20),
        "took over after {waited:?}"
    );
    assert_eq!(owning_client(&second, &loc), second.client_name());

    // The stalled owner wakes up: it is blocklisted, and nothing it writes lands.
    let err = data.write_at(&[0x22; 4096], 0).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Fenced, "{err}");
    let mut back = vec![0u8; 4096];
    store(&second, &loc, 16 * BS).read_at(&mut back, 0).unwrap();
    assert_eq!(back, vec![0x11; 4096], "the fenced write did not land");
    // Dropping the stale lock touches neither the lock nor the new owner's record.
    drop(stalled);
    assert_eq!(owning_client(&second, &loc), second.client_name());
    assert_eq!(
        second
            .read_object(&PoolObjects::new(&loc).owner())
            .unwrap()
            .map(|b| serde_json::from_slice::<thinnbd::rados::Owner>(&b).unwrap()),
        Some(taken.owner().clone())
    );
}

#[test]
fn a_takeover_fences_the_owner_and_tells_it() {
    let Some((_rp, loc)) = setup("rcore-takeover") else {
        return;
    };
    let first = connect(&loc);
    let second = connect(&loc);
    let (held, lost_rx) = own_reporting_loss(&first, &loc);

    let owners = OwnerLock::takeover(&second, &loc).unwrap();
    assert_eq!(owners.len(), 1);
    assert_eq!(&owners[0], held.owner());
    // A waiting server takes it at once: the lock is broken.
    let taken = take(&second, &loc, Duration::from_secs(30)).unwrap();

    // The renewal finds the owner blocklisted (or its lock taken).
    assert_lost_and_fenced(held, &lost_rx, &first, &second, &loc);
    assert_eq!(owning_client(&second, &loc), second.client_name());
    drop(taken);
}

#[test]
fn an_owner_whose_lock_was_broken_stops_writing() {
    let Some((_rp, loc)) = setup("rcore-broken") else {
        return;
    };
    let first = connect(&loc);
    let other = connect(&loc);
    let (held, lost_rx) = own_reporting_loss(&first, &loc);

    // Broken by hand (`rados lock break`), without a blocklist entry: the OSDs would still
    // take this client's writes, so the owner must stop by itself.
    let header = PoolObjects::new(&loc).header();
    let lockers = other.lockers(&header, LOCK_NAME).unwrap();
    assert_eq!(lockers.len(), 1);
    assert_eq!(lockers[0].client, first.client_name());
    assert_eq!(lockers[0].address, first.address().unwrap());
    other.break_lock(&header, LOCK_NAME, &lockers[0]).unwrap();

    assert_lost_and_fenced(held, &lost_rx, &first, &other, &loc);
    assert!(other.lockers(&header, LOCK_NAME).unwrap().is_empty());
}

#[test]
fn a_call_over_hundreds_of_blocks_reads_writes_and_punches_them_all() {
    let Some((_rp, loc)) = setup("rcore-many") else {
        return;
    };
    let cluster = connect(&loc);
    // 4 KiB blocks, so one call covers more objects than are kept in flight at once.
    let block = 4096u64;
    let data = RadosStore::new(cluster.clone(), &loc, block, 1024 * block).unwrap();
    let written = pattern(100, (300 * block) as usize);
    data.write_at(&written, 100).unwrap();
    assert_eq!(
        data_blocks(&cluster, &loc),
        (0..=300).collect::<Vec<_>>(),
        "300 blocks from byte 100 touch 301"
    );
    let mut back = vec![0xEEu8; written.len() + 200];
    data.read_at(&mut back, 0).unwrap();
    assert!(back[..100].iter().all(|&b| b == 0));
    assert_eq!(&back[100..written.len() + 100], &written[..]);
    assert!(back[written.len() + 100..].iter().all(|&b| b == 0));

    assert!(data.punch(0, 301 * block).unwrap());
    assert!(data_blocks(&cluster, &loc).is_empty());
    data.read_at(&mut back, 0).unwrap();
    assert!(back.iter().all(|&b| b == 0));
}
