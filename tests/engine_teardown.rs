//! Regression test for the dm-thin teardown bug: the pool worker walked the active thins under
//! `rcu_read_lock` while allocating a prison cell from a mempool, which can sleep; teardown then
//! had to wait for a reader that could not finish. Here the cell pool has ONE cell, 8 writer
//! threads keep provisioning blocks on 4 thins (so bios are deferred and the worker blocks on
//! the cell pool while holding a clone of a thin), and a churn thread tears thins down and
//! activates them again, thousands of times. A watchdog fails the run on a deadlock; the event
//! log shows every teardown returned only after the worker had dropped its clone; every
//! acknowledged write reads back after re-activation.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::metadata::thin_check;
use common::pattern::pattern_at;
use common::pool::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use thinnbd::engine::{EngineConfig, EngineEvent, ThinHandle};
use thinnbd::ErrorKind;

const BS: u64 = 64 * KIB;
const THINS: u32 = 4;
const WRITERS: u64 = 8;
const VOL_BLOCKS: u64 = 128;
const MAX_ROUNDS: u64 = 3000;
const TIME_BOUND: Duration = Duration::from_secs(45);

type Slot = Mutex<Option<ThinHandle>>;

fn current(slot: &Slot) -> ThinHandle {
    loop {
        if let Some(h) = slot.lock().unwrap().clone() {
            return h;
        }
        std::thread::yield_now();
    }
}

/// Retries an operation across teardowns: a torn-down handle fails with NotFound before doing
/// anything, so the request is simply sent again on the new activation.
fn retry(slot: &Slot, f: impl Fn(&ThinHandle) -> thinnbd::Result<()>) {
    loop {
        match f(&current(slot)) {
            Ok(()) => return,
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => panic!("request failed: {e}"),
        }
    }
}

fn writer(
    slot: Arc<Slot>,
    stop: Arc<AtomicBool>,
    progress: Arc<AtomicU64>,
    w: u64,
) -> HashMap<u64, u64> {
    let mut rng = SmallRng::seed_from_u64(w);
    let mut acked: HashMap<u64, u64> = HashMap::new();
    let half = w / u64::from(THINS);
    let mut tag = w << 40;
    let mut n = 0u64;
    while !stop.load(Ordering::Acquire) && n < 2_000_000 {
        n += 1;
        let vb = rng.gen_range(0..VOL_BLOCKS / 2) * 2 + half;
        if rng.gen_bool(0.15) {
            retry(&slot, |h| h.discard(vb * BS, BS, false));
            for p in 0..BS / 4096 {
                acked.remove(&(vb * BS + p * 4096));
            }
        } else {
            let off = vb * BS + rng.gen_range(0..BS / 4096) * 4096;
            tag += 1;
            let data = pattern_at(tag, off, 4096);
            retry(&slot, |h| h.write(off, &data, false));
            acked.insert(off, tag);
            progress.fetch_add(1, Ordering::Release);
        }
    }
    acked
}

#[test]
fn teardown_during_blocked_worker_never_deadlocks_and_waits_for_the_clone() {
    let _wd = watchdog(240, "teardown stress");
    let config = EngineConfig {
        cell_pool_size: 1,
        record_events: true,
        worker_hold_delay: Duration::from_micros(500),
        ..EngineConfig::default()
    };
    let tp = temp_pool_fast(THINS as u64 * VOL_BLOCKS * BS * 2, BS, config);
    let pool = tp.pool.clone();
    let vol = VOL_BLOCKS * BS;
    // A slow data device keeps the single cell held long enough for writers to be deferred
    // and for the worker to block on the cell pool while it holds a thin's clone.
    pool.data_faults()
        .set_write_delay(Duration::from_micros(300));
    let slots: Vec<Arc<Slot>> = (1..=THINS)
        .map(|id| {
            pool.create_thin(id).unwrap();
            Arc::new(Mutex::new(Some(pool.activate(id, vol, false).unwrap())))
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let slot = slots[(w % u64::from(THINS)) as usize].clone();
            let (stop, progress) = (stop.clone(), progress.clone());
            std::thread::spawn(move || writer(slot, stop, progress, w))
        })
        .collect();

    let start = Instant::now();
    let mut rounds = 0u64;
    let mut seen = 0;
    while rounds < MAX_ROUNDS && start.elapsed() < TIME_BOUND {
        // Pace the churn by the writers' progress, so that every round overlaps real I/O
        // (on an idle tmpfs a teardown alone takes microseconds).
        let wait_start = Instant::now();
        while progress.load(Ordering::Acquire) < seen + 4
            && wait_start.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_micros(50));
        }
        seen = progress.load(Ordering::Acquire);
        let i = (rounds % u64::from(THINS)) as usize;
        let h = slots[i]
            .lock()
            .unwrap()
            .take()
            .expect("slot holds a handle");
        let id = h.id();
        pool.teardown(h).unwrap();
        *slots[i].lock().unwrap() = Some(pool.activate(id, vol, false).unwrap());
        rounds += 1;
    }
    stop.store(true, Ordering::Release);
    let acked: Vec<HashMap<u64, u64>> = writers
        .into_iter()
        .map(|t| t.join().expect("writer panicked"))
        .collect();
    let st = pool.status();
    eprintln!(
        "{rounds} teardown rounds in {:?}; teardowns that waited for a clone: {}; deferred bios {}; provisioned {}",
        start.elapsed(),
        st.teardowns_waited,
        st.bios_deferred,
        st.blocks_provisioned
    );
    assert!(rounds >= 1000, "only {rounds} rounds");

    // Every teardown returned only after the worker had put every clone it took.
    #[derive(Default)]
    struct Life {
        gets: u64,
        puts: u64,
        ended: bool,
    }
    let mut lives: HashMap<u64, Life> = HashMap::new();
    let mut overlapped = 0u64;
    let events = pool.take_events();
    for e in &events {
        match *e {
            EngineEvent::WorkerGet { instance, .. } => {
                let l = lives.entry(instance).or_default();
                assert!(
                    !l.ended,
                    "worker took instance {instance} after its teardown returned"
                );
                l.gets += 1;
            }
            EngineEvent::WorkerPut { instance, .. } => lives.entry(instance).or_default().puts += 1,
            EngineEvent::TeardownBegin { instance, .. } => {
                let l = lives.entry(instance).or_default();
                if l.gets > l.puts {
                    overlapped += 1;
                }
            }
            EngineEvent::TeardownEnd { instance, .. } => {
                let l = lives.entry(instance).or_default();
                assert_eq!(
                    l.gets, l.puts,
                    "teardown of instance {instance} returned while the worker held a clone"
                );
                l.ended = true;
            }
        }
    }
    let ended = lives.values().filter(|l| l.ended).count() as u64;
    eprintln!(
        "{} events; {ended} teardowns checked; {overlapped} began while the worker held the clone",
        events.len()
    );
    assert_eq!(ended, rounds);
    assert!(
        st.bios_deferred > 0,
        "the worker had deferred bios to process"
    );
    assert!(
        st.teardowns_waited > 0 && overlapped > 0,
        "no teardown overlapped a worker clone: the scenario was not exercised"
    );

    pool.data_faults().clear();
    // Re-activate and read every acknowledged write back.
    for (w, acked) in acked.iter().enumerate() {
        let slot = &slots[w % THINS as usize];
        let h = current(slot);
        pool.teardown(h.clone()).unwrap();
        let h = pool.activate(h.id(), vol, false).unwrap();
        for (&off, &tag) in acked {
            let mut got = vec![0u8; 4096];
            h.read(off, &mut got).unwrap();
            assert_eq!(
                got,
                pattern_at(tag, off, 4096),
                "acknowledged write at {off} of thin {} lost",
                h.id()
            );
        }
        *slot.lock().unwrap() = Some(h);
    }
    pool.shutdown().unwrap();
    thin_check(&tp.meta_path());
}
