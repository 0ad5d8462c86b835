//! An active thin's shared state: its quiesce gate, its closing flag and its list of deferred
//! bios, and [`Bio`], a write that waits in the prison or on that list until a thread serves it.
//!
//! The quiesce gate is a per-thin reader-writer lock. Every request holds it shared for its whole
//! life; snapshots of the thin, discards (which free blocks a concurrent fast-path request might
//! still touch) and teardown take it exclusively, which waits for requests in flight and holds
//! new ones back briefly. Requests parked on a full pool let go of it while they wait.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use crate::error::{fail, ErrorKind, Result};
use crate::thin::metadata::ThinId;

use super::active::{Life, Member};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One-shot reply slot for a bio served by another thread.
pub(crate) struct Completion {
    result: Mutex<Option<Result<()>>>,
    cv: Condvar,
}

impl Completion {
    pub(crate) fn wait(&self) -> Result<()> {
        let mut r = lock(&self.result);
        loop {
            if let Some(done) = r.take() {
                return done;
            }
            r = self.cv.wait(r).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// A write of part of one virtual block that must provision it or break its sharing.
pub(crate) struct Bio {
    pub(crate) vblock: u64,
    pub(crate) offset: usize,
    pub(crate) data: Vec<u8>,
    done: std::sync::Arc<Completion>,
}

impl Bio {
    pub(crate) fn new(vblock: u64, offset: usize, data: &[u8]) -> Self {
        Bio {
            vblock,
            offset,
            data: data.to_vec(),
            done: std::sync::Arc::new(Completion {
                result: Mutex::new(None),
                cv: Condvar::new(),
            }),
        }
    }

    /// Where the bio's result arrives, for the thread that waits for it.
    pub(crate) fn completion(&self) -> std::sync::Arc<Completion> {
        self.done.clone()
    }

    pub(crate) fn complete(self, r: Result<()>) {
        *lock(&self.done.result) = Some(r);
        self.done.cv.notify_all();
    }
}

/// An active thin: what its requests, the worker and teardown share.
pub(crate) struct Thin {
    id: ThinId,
    instance: u64,
    size: AtomicU64,
    read_only: bool,
    life: Life,
    gate: RwLock<()>,
    closing: AtomicBool,
    deferred: Mutex<VecDeque<Bio>>,
    deferred_len: AtomicUsize,
    deferred_cv: Condvar,
}

impl Member for Thin {
    fn life(&self) -> &Life {
        &self.life
    }

    fn key(&self) -> u64 {
        u64::from(self.id)
    }
}

impl Thin {
    pub(crate) fn new(id: ThinId, instance: u64, size: u64, read_only: bool) -> Self {
        Thin {
            id,
            instance,
            size: AtomicU64::new(size),
            read_only,
            life: Life::new(),
            gate: RwLock::new(()),
            closing: AtomicBool::new(false),
            deferred: Mutex::new(VecDeque::new()),
            deferred_len: AtomicUsize::new(0),
            deferred_cv: Condvar::new(),
        }
    }

    pub(crate) fn id(&self) -> ThinId {
        self.id
    }

    pub(crate) fn instance(&self) -> u64 {
        self.instance
    }

    /// The volume's size in bytes.
    pub(crate) fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    pub(crate) fn set_size(&self, bytes: u64) {
        self.size.store(bytes, Ordering::Release);
    }

    pub(crate) fn is_read_only(&self) -> bool {
        self.read_only
    }

    pub(crate) fn has_deferred(&self) -> bool {
        self.deferred_len.load(Ordering::Acquire) > 0
    }

    pub(crate) fn defer(&self, bio: Bio) {
        let mut q = lock(&self.deferred);
        q.push_back(bio);
        self.deferred_len.store(q.len(), Ordering::Release);
        self.deferred_cv.notify_all();
    }

    pub(crate) fn pop_deferred(&self) -> Option<Bio> {
        let mut q = lock(&self.deferred);
        let bio = q.pop_front();
        self.deferred_len.store(q.len(), Ordering::Release);
        bio
    }

    pub(crate) fn wait_deferred(&self, timeout: Duration) {
        let q = lock(&self.deferred);
        if q.is_empty() {
            drop(self.deferred_cv.wait_timeout(q, timeout));
        }
    }

    pub(crate) fn set_closing(&self) {
        self.closing.store(true, Ordering::Release);
    }

    pub(crate) fn check_open(&self) -> Result<()> {
        if self.closing.load(Ordering::Acquire) {
            return fail(
                ErrorKind::NotFound,
                format!("thin {} is no longer active", self.id),
            );
        }
        Ok(())
    }

    /// Enters the gate shared, as every request does.
    pub(crate) fn enter(&self) -> Result<RwLockReadGuard<'_, ()>> {
        let g = self.gate.read().unwrap_or_else(|p| p.into_inner());
        self.check_open()?;
        Ok(g)
    }

    /// Enters the gate shared if that needs no waiting (no snapshot, discard or teardown
    /// holding or waiting for it), as the non-blocking read path must.
    pub(crate) fn try_enter(&self) -> Option<RwLockReadGuard<'_, ()>> {
        let g = match self.gate.try_read() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        if self.closing.load(Ordering::Acquire) {
            return None;
        }
        Some(g)
    }

    /// Waits for requests in flight and holds new ones back.
    pub(crate) fn quiesce(&self) -> RwLockWriteGuard<'_, ()> {
        self.gate.write().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn try_quiesce(&self) -> Option<RwLockWriteGuard<'_, ()>> {
        match self.gate.try_write() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }
}
