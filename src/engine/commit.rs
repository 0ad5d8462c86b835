//! Group commit: flushes that arrive together share one commit. A flush returns once a commit
//! that started after it was called has finished, so every write acknowledged before the call
//! is durable; callers that arrive while a commit runs wait for the next one, which one of them
//! runs for all. What a commit does is the caller's (see `PoolState::commit_now`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

use crate::error::{Error, Result};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Default)]
struct Rounds {
    started: u64,
    completed: u64,
    running: bool,
    last_error: Option<Error>,
}

#[derive(Default)]
pub(crate) struct GroupCommit {
    rounds: Mutex<Rounds>,
    done: Condvar,
    /// A commit is running: the non-blocking write path declines rather than wait behind its
    /// hold on the metadata write lock.
    committing: AtomicBool,
}

impl GroupCommit {
    /// Returns once a run of `commit` that started after this call has finished, with its
    /// result. Concurrent callers share runs.
    pub(crate) fn flush(&self, commit: impl FnOnce() -> Result<()>) -> Result<()> {
        let mut commit = Some(commit);
        let mut st = lock(&self.rounds);
        let target = st.started + 1;
        loop {
            if st.completed >= target {
                // A failed commit turns the pool read-only, so every later one fails too.
                return match &st.last_error {
                    Some(e) => Err(e.duplicate()),
                    None => Ok(()),
                };
            }
            if !st.running {
                // This caller's own run, at most once: after it `completed >= target`.
                let Some(run) = commit.take() else {
                    unreachable!("a flush runs at most one commit")
                };
                st.running = true;
                st.started += 1;
                let mine = st.started;
                drop(st);
                self.committing.store(true, Ordering::Release);
                let r = run();
                self.committing.store(false, Ordering::Release);
                st = lock(&self.rounds);
                st.running = false;
                st.completed = mine;
                st.last_error = r.err();
                self.done.notify_all();
                continue;
            }
            st = self.done.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    pub(crate) fn is_committing(&self) -> bool {
        self.committing.load(Ordering::Acquire)
    }

    /// Marks a commit as running (or not) without running one: tests of the paths that
    /// decline during a commit.
    #[cfg(test)]
    pub(crate) fn set_committing(&self, on: bool) {
        self.committing.store(on, Ordering::Release);
    }
}
