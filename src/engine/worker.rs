//! The pool's worker thread, which serves deferred bios (writes that found no free prison cell,
//! or waited in one), and teardown, which takes a thin out of its reach.

use std::thread::JoinHandle;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::sync::Arc;

use super::active::Member;
use super::active_thin::Thin;
use super::prison::Detain;
use super::provision;
use super::state::PoolState;
#[cfg(any(test, feature = "testing"))]
use super::testing::EngineEvent;

/// Starts the worker thread; it returns once the pool is stopping and no thin is active.
pub(crate) fn spawn(state: std::sync::Arc<PoolState>) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("thinnbd-pool-worker".into())
        .spawn(move || run(&state))
        .map_err(|e| Error::io("starting the pool worker", e))
}

fn run(state: &PoolState) {
    loop {
        state.work.wait();
        pass(state);
        // A pass walks the set by index over fresh snapshots: a thin removed meanwhile shifts
        // the ones after it, and one of them may be passed over, its bios deferred (and its
        // wake-up taken) before the pass began. Pass again until none is left behind.
        while state.active.any(Thin::has_deferred) {
            pass(state);
        }
        if state.work.is_stopping() && state.active.is_empty() {
            return;
        }
    }
}

/// Walks the active set, one thin at a time: a counted clone is taken inside the snapshot
/// read, the snapshot guard is dropped, the thin's deferred bios are processed (which may
/// block on the cell pool), then the clone is dropped.
fn pass(state: &PoolState) {
    let mut i = 0;
    while let Some(slot) = state.active.get_at(i, |t| t.has_deferred()) {
        i += 1;
        let Some(r) = slot else { continue };
        #[cfg(any(test, feature = "testing"))]
        state.event(EngineEvent::WorkerGet {
            thin: r.id(),
            instance: r.instance(),
        });
        serve_deferred(state, &r);
        #[cfg(any(test, feature = "testing"))]
        {
            if !state.config.worker_hold_delay.is_zero() {
                std::thread::sleep(state.config.worker_hold_delay);
            }
            state.event(EngineEvent::WorkerPut {
                thin: r.id(),
                instance: r.instance(),
            });
        }
        drop(r);
    }
}

/// Serves a thin's deferred bios: lock each block in the prison (blocking on the cell pool
/// when it is exhausted), write, release, complete. Called by the worker while it holds a
/// counted reference to the thin, and by teardown after the last such reference is gone.
fn serve_deferred(state: &PoolState, thin: &Thin) {
    while let Some(bio) = thin.pop_deferred() {
        match state.prison.detain((thin.id(), bio.vblock), bio) {
            Detain::Held(held, bio) => {
                let r = provision::write_held(state, thin, &bio);
                state.release_cell(thin, held);
                bio.complete(r);
            }
            Detain::Waiting => {}
            Detain::NoCell(bio) => thin.defer(bio),
        }
    }
}

/// Removes a thin from the active set and waits until nothing else uses it: the worker's last
/// clone dropped, no request in flight, what was deferred served, and a commit. Afterwards
/// nothing touches the thin; requests on remaining handles fail.
pub(crate) fn teardown(state: &PoolState, thin: &Arc<Thin>) -> Result<()> {
    // Held throughout, so a delete or re-activation of this thin waits for the end.
    let _admin = state.admin.lock().unwrap_or_else(|p| p.into_inner());
    thin.set_closing();
    // Writes parked on a full pool notice the closing flag once woken.
    state.space_changed();
    let instance = thin.instance();
    if state
        .active
        .remove_if(thin.key(), |t| t.instance() == instance)
        .is_none()
    {
        return Ok(());
    }
    #[cfg(any(test, feature = "testing"))]
    state.event(EngineEvent::TeardownBegin {
        thin: thin.id(),
        instance: thin.instance(),
    });
    if thin.life().count() > 1 {
        state
            .stats
            .teardowns_waited
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    thin.life().put_and_wait();
    // The worker can no longer reach this thin. Serve what is left until no request is in
    // flight (the quiesce gate is free); later requests see the closing flag.
    loop {
        serve_deferred(state, thin);
        if let Some(_quiet) = thin.try_quiesce() {
            serve_deferred(state, thin);
            break;
        }
        thin.wait_deferred(Duration::from_millis(2));
    }
    let r = state.flush();
    #[cfg(any(test, feature = "testing"))]
    state.event(EngineEvent::TeardownEnd {
        thin: thin.id(),
        instance: thin.instance(),
    });
    r
}
