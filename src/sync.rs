//! The one place the engine's concurrency protocol takes its primitives from.
//!
//! The active-thin set, the per-thin reference count and the teardown completion are built only
//! from what this module exports, so that the same code can be model-checked with `loom`
//! (`cargo test --release --features loom --test engine_loom`). Normally these are the std
//! types; with the `loom` feature they are loom's, which explore every interleaving.
//!
//! `Arc` stays std's under loom on purpose: the protocol under test is the member's own count
//! ([`crate::engine::active::Life`]), not the allocation's. Loom's `Arc` makes every clone and
//! drop of a snapshot or member a scheduling point, which multiplies the interleavings (8.5M
//! instead of 50k for the teardown model) without checking anything the protocol relies on.

#[cfg(not(feature = "loom"))]
pub use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

#[cfg(not(feature = "loom"))]
pub use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

#[cfg(not(feature = "loom"))]
pub use std::thread;

#[cfg(feature = "loom")]
pub use loom::sync::{Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

#[cfg(feature = "loom")]
pub use std::sync::Arc;

#[cfg(feature = "loom")]
pub use loom::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

#[cfg(feature = "loom")]
pub use loom::thread;

/// Locks a mutex, ignoring poisoning: a panicking holder has already failed its own request, and
/// the protected state is kept consistent at every unlock point.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Waits on a condition variable, ignoring poisoning (see [`lock`]).
pub fn wait<'a, T>(cv: &Condvar, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    cv.wait(guard).unwrap_or_else(|p| p.into_inner())
}
