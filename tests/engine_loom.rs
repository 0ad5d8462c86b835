//! Model check of the active-set / clone / teardown protocol (`thinnbd::engine::active`) with
//! the bounded cell pool the worker may block on while it holds a clone.
//!
//! Run the exhaustive loom model with:
//!
//! ```text
//! cargo test --release --features loom --test engine_loom
//! ```
//!
//! (add `CARGO_TARGET_DIR=target/loom` to keep the loom build apart from the normal one;
//! `LOOM_MAX_PREEMPTIONS=N` changes the preemption bound, 3 by default).
//! Without the `loom` feature the same scenario runs on std threads many times, as a smoke test.
//!
//! Threads: one walker (the pool worker: takes a counted clone of each member from the current
//! snapshot, drops the snapshot, blocks on the cell pool, checks the member is not torn down,
//! frees the cell, drops the clone), one teardown (unpublishes member 1, drops the set's
//! reference, waits for the completion, then marks it torn down), one activation (publishes
//! member 2). The main thread holds the only cell at first and frees it, so the walker may sleep
//! on the pool while holding its clone.

use thinnbd::engine::active::{ActiveSet, Life, Member};
use thinnbd::engine::prison::CellPool;
use thinnbd::sync::{thread, Arc, AtomicBool, Ordering};

struct Item {
    key: u64,
    life: Life,
    torn_down: AtomicBool,
}

impl Item {
    fn new(key: u64) -> Arc<Item> {
        Arc::new(Item {
            key,
            life: Life::new(),
            torn_down: AtomicBool::new(false),
        })
    }
}

impl Member for Item {
    fn life(&self) -> &Life {
        &self.life
    }
    fn key(&self) -> u64 {
        self.key
    }
}

fn scenario() {
    let set: Arc<ActiveSet<Item>> = Arc::new(ActiveSet::new());
    let cells = Arc::new(CellPool::new(1));
    let first = Item::new(1);
    assert!(set.insert(first.clone()).is_ok());
    cells.alloc();

    let walker = {
        let (set, cells) = (set.clone(), cells.clone());
        thread::spawn(move || {
            let mut i = 0;
            let mut seen = 0;
            while let Some(slot) = set.get_at(i, |_| true) {
                i += 1;
                let Some(r) = slot else { continue };
                // Blocking with only the counted clone held, never the snapshot.
                cells.alloc();
                assert!(
                    !r.torn_down.load(Ordering::SeqCst),
                    "walker uses a torn-down member"
                );
                cells.free();
                seen += 1;
                drop(r);
            }
            seen
        })
    };
    let teardown = {
        let set = set.clone();
        thread::spawn(move || {
            let gone = set.remove(1).expect("member 1 is active");
            gone.life().put_and_wait();
            gone.torn_down.store(true, Ordering::SeqCst);
            assert!(
                !gone.life().try_get(),
                "a finished member came back to life"
            );
        })
    };
    let activation = {
        let set = set.clone();
        thread::spawn(move || assert!(set.insert(Item::new(2)).is_ok()))
    };
    cells.free();
    let seen = walker.join().unwrap();
    teardown.join().unwrap();
    activation.join().unwrap();
    assert!(seen <= 2);
    assert_eq!(first.life().count(), 0);
    let keys: Vec<u64> = set.members().iter().map(|m| m.key()).collect();
    assert_eq!(keys, vec![2]);
    assert_eq!(cells.in_use(), 0);
}

#[cfg(feature = "loom")]
#[test]
fn active_set_teardown_protocol_all_interleavings() {
    // Every interleaving with up to LOOM_MAX_PREEMPTIONS forced preemptions (default here: 3,
    // loom's usual bound; unset it and set a larger number for a deeper search).
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(3);
    }
    builder.check(scenario);
}

#[cfg(not(feature = "loom"))]
#[test]
fn active_set_teardown_protocol_std_smoke() {
    for _ in 0..2000 {
        scenario();
    }
}
