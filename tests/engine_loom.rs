//! Model check of the active-set / clone / teardown protocol (`thinnbd::engine::active`) with
//! the bounded cell pool the worker may block on while it holds a clone.
//!
//! Run it with:
//!
//! ```text
//! CARGO_TARGET_DIR=target-loom cargo test --release --features loom --test engine_loom -- --nocapture
//! ```
//!
//! (the separate target dir keeps the loom build apart from the normal one).
//! Without the `loom` feature the same scenarios run on std threads many times, as a smoke test.
//!
//! Three participants, explored EXHAUSTIVELY (no preemption bound, no iteration or time cap;
//! loom panics rather than truncating if the branch limit is hit):
//! - the walker (the pool worker): takes a counted clone of each member from the current
//!   snapshot, drops the snapshot, blocks on the one-cell pool while holding only the clone,
//!   checks the member is not torn down, frees the cell, drops the clone;
//! - the teardown: unpublishes member 1, drops the set's reference, waits for the completion,
//!   marks the member torn down and checks it cannot be revived;
//! - the activation, played by the main thread after spawning the other two: publishes member 2
//!   and frees the cell the walker blocks on (once in each order, two models).
//!
//! Both exhaustive models together take about 5 s in release mode (50k + 71k iterations, printed
//! with `--nocapture`). A fourth participant (activation on its own thread) costs 3.4M iterations
//! and ~200 s unbounded, so that variant runs with loom's preemption bound of 3 instead.
//!
//! The models are only worth something if they can fail: two deliberately broken protocols (a
//! walker that uses a member without a counted clone, a teardown that does not wait) must make
//! loom report a failing interleaving, and the correct model must reach the interleavings that
//! matter (teardown finds a clone outstanding, the walker is refused a finished member, the
//! walker sees both members); counters outside loom's view record that.

use std::sync::atomic::AtomicUsize as Counter;
use std::sync::atomic::Ordering as CounterOrdering;

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

/// Which protocol the scenario runs: the real one, or a deliberately broken one.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Protocol {
    Correct,
    /// The walker uses members from an uncounted listing instead of a counted clone.
    UncountedWalker,
    /// Teardown drops the set's reference without waiting for the clones.
    TeardownNoWait,
}

/// Who plays the activation and where the cell pool's only cell is freed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Activation {
    /// The main thread publishes member 2, then frees the cell.
    MainInsertThenFree,
    /// The main thread frees the cell, then publishes member 2.
    MainFreeThenInsert,
    /// A fourth thread publishes member 2 while the main thread frees the cell.
    OwnThread,
}

/// Witnesses of interleavings reached (plain std atomics: loom does not see them, so they add
/// no branch points; loom runs one thread at a time, so they record the explored schedule).
#[derive(Default)]
struct Reached {
    iterations: Counter,
    /// Teardown started waiting while the walker held a clone of member 1.
    teardown_waited: Counter,
    /// The walker's snapshot listed a member whose count had reached zero.
    refused_finished: Counter,
    /// The walker processed both members.
    saw_both: Counter,
}

impl Reached {
    fn bump(c: &Counter) {
        c.fetch_add(1, CounterOrdering::Relaxed);
    }
    fn get(c: &Counter) -> usize {
        c.load(CounterOrdering::Relaxed)
    }
}

fn scenario(protocol: Protocol, activation: Activation, reached: &'static Reached) {
    Reached::bump(&reached.iterations);
    let set: Arc<ActiveSet<Item>> = Arc::new(ActiveSet::new());
    let cells = Arc::new(CellPool::new(1));
    let first = Item::new(1);
    assert!(set.insert(first.clone()).is_ok());
    // The only cell is held until the activation side frees it, so the walker may have to
    // sleep on the pool while it holds its clone.
    cells.alloc();
    // Whether the walker holds (or, when broken, uses) member 1 right now.
    let holding_first = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));

    let walker = {
        let (set, cells, holding_first) = (set.clone(), cells.clone(), holding_first.clone());
        thread::spawn(move || {
            let mut seen = 0;
            if protocol == Protocol::UncountedWalker {
                for item in set.members() {
                    holding_first.store(item.key == 1, CounterOrdering::SeqCst);
                    cells.alloc();
                    assert!(
                        !item.torn_down.load(Ordering::SeqCst),
                        "walker uses a torn-down member"
                    );
                    cells.free();
                    holding_first.store(false, CounterOrdering::SeqCst);
                    seen += 1;
                }
                return seen;
            }
            let mut i = 0;
            while let Some(slot) = set.get_at(i, |_| true) {
                i += 1;
                let Some(r) = slot else {
                    Reached::bump(&reached.refused_finished);
                    continue;
                };
                holding_first.store(r.key == 1, CounterOrdering::SeqCst);
                // Blocking with only the counted clone held, never the snapshot.
                cells.alloc();
                assert!(
                    !r.torn_down.load(Ordering::SeqCst),
                    "walker uses a torn-down member"
                );
                cells.free();
                seen += 1;
                holding_first.store(false, CounterOrdering::SeqCst);
                drop(r);
            }
            seen
        })
    };
    let teardown = {
        let (set, holding_first) = (set.clone(), holding_first.clone());
        thread::spawn(move || {
            let gone = set.remove(1).expect("member 1 is active");
            if holding_first.load(CounterOrdering::SeqCst) {
                Reached::bump(&reached.teardown_waited);
            }
            if protocol == Protocol::TeardownNoWait {
                gone.life().put();
            } else {
                gone.life().put_and_wait();
            }
            gone.torn_down.store(true, Ordering::SeqCst);
            // (The broken teardown never saw the count reach zero, so there is nothing finished
            // to revive; its failure must show as the walker's use of a torn-down member.)
            if protocol != Protocol::TeardownNoWait {
                assert!(
                    !gone.life().try_get(),
                    "a finished member came back to life"
                );
            }
        })
    };
    match activation {
        Activation::MainInsertThenFree => {
            assert!(set.insert(Item::new(2)).is_ok());
            cells.free();
        }
        Activation::MainFreeThenInsert => {
            cells.free();
            assert!(set.insert(Item::new(2)).is_ok());
        }
        Activation::OwnThread => {
            let set = set.clone();
            let activation = thread::spawn(move || assert!(set.insert(Item::new(2)).is_ok()));
            cells.free();
            activation.join().unwrap();
        }
    }
    let seen = walker.join().unwrap();
    teardown.join().unwrap();
    assert!(seen <= 2);
    if seen == 2 {
        Reached::bump(&reached.saw_both);
    }
    if protocol != Protocol::TeardownNoWait {
        assert_eq!(first.life().count(), 0);
    }
    let keys: Vec<u64> = set.members().iter().map(|m| m.key()).collect();
    assert_eq!(keys, vec![2]);
    assert_eq!(cells.in_use(), 0);
}

/// A fresh set of witnesses for one test (leaked: the model closure must be `'static`).
fn reached() -> &'static Reached {
    Box::leak(Box::default())
}

#[cfg(feature = "loom")]
mod model {
    use super::*;
    use std::time::Instant;

    /// A builder that explores everything: no preemption bound, no iteration or time cap,
    /// whatever LOOM_* variables are set. Exceeding `max_branches` makes loom panic, so a
    /// too-small limit fails loudly rather than cutting the search short.
    fn exhaustive() -> loom::model::Builder {
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound = None;
        builder.max_permutations = None;
        builder.max_duration = None;
        builder.max_branches = builder.max_branches.max(10_000);
        builder
    }

    fn check_exhaustive(activation: Activation) {
        let reached = reached();
        let start = Instant::now();
        exhaustive().check(move || scenario(Protocol::Correct, activation, reached));
        eprintln!(
            "loom {activation:?}: exhaustive, {} iterations in {:.1?}; teardown waited in {}, \
             finished member refused in {}, both members walked in {}",
            Reached::get(&reached.iterations),
            start.elapsed(),
            Reached::get(&reached.teardown_waited),
            Reached::get(&reached.refused_finished),
            Reached::get(&reached.saw_both),
        );
        // The model reaches the windows the protocol exists for.
        assert!(Reached::get(&reached.teardown_waited) > 0);
        assert!(Reached::get(&reached.refused_finished) > 0);
        assert!(Reached::get(&reached.saw_both) > 0);
    }

    #[test]
    fn all_interleavings_activation_insert_then_free() {
        check_exhaustive(Activation::MainInsertThenFree);
    }

    #[test]
    fn all_interleavings_activation_free_then_insert() {
        check_exhaustive(Activation::MainFreeThenInsert);
    }

    /// Four participants (activation on its own thread): exhaustive is ~200 s, so this runs
    /// with a preemption bound (LOOM_MAX_PREEMPTIONS, 3 by default).
    #[test]
    fn activation_on_own_thread_bounded() {
        let reached = reached();
        let mut builder = loom::model::Builder::new();
        if builder.preemption_bound.is_none() {
            builder.preemption_bound = Some(3);
        }
        let start = Instant::now();
        builder.check(move || scenario(Protocol::Correct, Activation::OwnThread, reached));
        eprintln!(
            "loom OwnThread: preemption bound {:?}, {} iterations in {:.1?}",
            builder.preemption_bound,
            Reached::get(&reached.iterations),
            start.elapsed()
        );
    }

    /// Runs the exhaustive model on a broken protocol and returns loom's panic message.
    fn broken(protocol: Protocol) -> String {
        let reached = reached();
        let result = std::panic::catch_unwind(move || {
            exhaustive().check(move || scenario(protocol, Activation::MainInsertThenFree, reached))
        });
        let Err(payload) = result else {
            panic!("loom did not catch the broken protocol {protocol:?}");
        };
        let msg = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        eprintln!(
            "loom {protocol:?}: caught after {} iterations: {msg}",
            Reached::get(&reached.iterations)
        );
        msg
    }

    #[test]
    fn catches_walker_without_counted_clone() {
        let msg = broken(Protocol::UncountedWalker);
        assert!(msg.contains("torn-down member"), "{msg}");
    }

    #[test]
    fn catches_teardown_that_does_not_wait() {
        let msg = broken(Protocol::TeardownNoWait);
        assert!(msg.contains("torn-down member"), "{msg}");
    }
}

#[cfg(not(feature = "loom"))]
#[test]
fn active_set_teardown_protocol_std_smoke() {
    let reached = reached();
    for activation in [
        Activation::MainInsertThenFree,
        Activation::MainFreeThenInsert,
        Activation::OwnThread,
    ] {
        for _ in 0..700 {
            scenario(Protocol::Correct, activation, reached);
        }
    }
    assert_eq!(Reached::get(&reached.iterations), 2100);
}
