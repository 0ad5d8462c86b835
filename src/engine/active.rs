//! The set of active thins and the reference protocol that makes teardown safe.
//!
//! Readers (the I/O paths and the pool worker) never lock the set: it is an immutable snapshot
//! (`Arc<Vec<Arc<T>>>`) published through `arc_swap::ArcSwap`, the userspace stand-in for RCU.
//! Writers (activate, teardown) serialise on a mutex and publish a new snapshot.
//!
//! A member's [`Life`] counts the references that keep it *in use*: one owned by the set from
//! activation until teardown, plus one per worker clone ([`ActiveSet::get`]). This mirrors the
//! dm-thin fix for walking active thins under `rcu_read_lock` while sleeping in a mempool: the
//! walker takes a reference inside the read-side section, leaves it, processes, then puts the
//! reference; teardown unpublishes, drops the set's reference and waits for a completion that
//! fires when the count reaches zero. A count that has reached zero never rises again
//! (`try_get` is "increment unless zero"), which closes the window where a walker still holds an
//! old snapshot that lists a member teardown has already finished with.
//!
//! With the `loom` feature the snapshot cell is a loom `Mutex<Arc<..>>` (arc-swap is not
//! loom-aware; `Arc` is std's, see `crate::sync`); the protocol code above it is the same.

use crate::sync::{self, Arc, AtomicUsize, Condvar, Mutex, Ordering};

/// Reference count plus completion of one active member.
///
/// The count is a lone atomic so that taking and dropping a reference (once per member per
/// worker walk) never takes a lock; the mutex and condition variable exist only for the
/// teardown waiter to sleep on. The last `put` takes the mutex before notifying, and the waiter
/// re-reads the count under it, so the wakeup cannot be lost between its check and its sleep.
pub struct Life {
    refs: AtomicUsize,
    sleep: Mutex<()>,
    zero: Condvar,
}

impl Default for Life {
    fn default() -> Self {
        Life::new()
    }
}

impl Life {
    /// A new life holding the set's own reference.
    pub fn new() -> Self {
        Life {
            refs: AtomicUsize::new(1),
            sleep: Mutex::new(()),
            zero: Condvar::new(),
        }
    }

    /// Takes a reference unless the count already reached zero (the member is finished).
    pub fn try_get(&self) -> bool {
        // Guess the common count (only the set's reference) instead of loading first: one
        // atomic step when the guess holds, the failed exchange reports the real count otherwise.
        let mut cur: usize = 1;
        loop {
            if cur == 0 {
                return false;
            }
            let Some(next) = cur.checked_add(1) else {
                return false;
            };
            match self
                .refs
                .compare_exchange(cur, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return true,
                Err(seen) => cur = seen,
            }
        }
    }

    /// Drops a reference; the last one completes the teardown waiter.
    ///
    /// Every `put` pairs with the set's own reference or a successful [`try_get`](Self::try_get)
    /// (only [`Ref`] and the teardown path call it), so the count never goes below zero.
    pub fn put(&self) {
        let prev = self.refs.fetch_sub(1, Ordering::AcqRel);
        debug_assert!(prev > 0, "Life::put without a reference");
        if prev == 1 {
            let _g = sync::lock(&self.sleep);
            self.zero.notify_all();
        }
    }

    /// Drops the owner's reference and blocks until every other reference is gone.
    pub fn put_and_wait(&self) {
        let prev = self.refs.fetch_sub(1, Ordering::AcqRel);
        debug_assert!(prev > 0, "Life::put_and_wait without a reference");
        if prev == 1 {
            return;
        }
        let mut g = sync::lock(&self.sleep);
        while self.refs.load(Ordering::Acquire) > 0 {
            g = sync::wait(&self.zero, g);
        }
    }

    /// Current count, for status and tests.
    pub fn count(&self) -> usize {
        self.refs.load(Ordering::Acquire)
    }
}

/// Something that can live in an [`ActiveSet`].
pub trait Member: Send + Sync {
    fn life(&self) -> &Life;
    /// Identity used to find and remove a member.
    fn key(&self) -> u64;
}

/// A counted clone of a member: the member stays in use (teardown waits) until it drops.
pub struct Ref<T: Member> {
    item: Arc<T>,
}

impl<T: Member> Ref<T> {
    pub fn get(&self) -> &T {
        &self.item
    }

    pub fn arc(&self) -> &Arc<T> {
        &self.item
    }
}

impl<T: Member> std::ops::Deref for Ref<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.item
    }
}

impl<T: Member> Drop for Ref<T> {
    fn drop(&mut self) {
        self.item.life().put();
    }
}

type Snapshot<T> = Arc<Vec<Arc<T>>>;

#[cfg(not(feature = "loom"))]
struct Cell<T>(arc_swap::ArcSwap<Vec<Arc<T>>>);

#[cfg(not(feature = "loom"))]
impl<T> Cell<T> {
    fn new() -> Self {
        Cell(arc_swap::ArcSwap::from_pointee(Vec::new()))
    }
    fn load(&self) -> arc_swap::Guard<Snapshot<T>> {
        self.0.load()
    }
    fn store(&self, s: Snapshot<T>) {
        self.0.store(s)
    }
}

#[cfg(feature = "loom")]
struct Cell<T>(Mutex<Snapshot<T>>);

#[cfg(feature = "loom")]
impl<T> Cell<T> {
    fn new() -> Self {
        Cell(Mutex::new(Arc::new(Vec::new())))
    }
    fn load(&self) -> Snapshot<T> {
        sync::lock(&self.0).clone()
    }
    fn store(&self, s: Snapshot<T>) {
        *sync::lock(&self.0) = s;
    }
}

/// The published set of active members.
pub struct ActiveSet<T: Member> {
    cell: Cell<T>,
    /// Serialises writers and holds the snapshot they last published, so a writer builds the
    /// next one from it without reading the cell back.
    writers: Mutex<Snapshot<T>>,
}

impl<T: Member> Default for ActiveSet<T> {
    fn default() -> Self {
        ActiveSet::new()
    }
}

impl<T: Member> ActiveSet<T> {
    pub fn new() -> Self {
        ActiveSet {
            cell: Cell::new(),
            writers: Mutex::new(Arc::new(Vec::new())),
        }
    }

    /// Publishes `item` unless a member with the same key is active (then gives it back).
    pub fn insert(&self, item: Arc<T>) -> std::result::Result<(), Arc<T>> {
        let mut cur = sync::lock(&self.writers);
        if cur.iter().any(|m| m.key() == item.key()) {
            return Err(item);
        }
        let mut next: Vec<Arc<T>> = cur.iter().cloned().collect();
        next.push(item);
        let next = Arc::new(next);
        self.cell.store(next.clone());
        *cur = next;
        Ok(())
    }

    /// Unpublishes the member with `key`; readers holding an older snapshot may still see it,
    /// which is why teardown then waits on the member's [`Life`].
    pub fn remove(&self, key: u64) -> Option<Arc<T>> {
        self.remove_if(key, |_| true)
    }

    /// Like [`remove`](Self::remove), but only when `which` accepts the member (so a stale
    /// handle cannot unpublish a later activation under the same key).
    pub fn remove_if(&self, key: u64, which: impl Fn(&T) -> bool) -> Option<Arc<T>> {
        let mut cur = sync::lock(&self.writers);
        let pos = cur.iter().position(|m| m.key() == key && which(m))?;
        let mut next: Vec<Arc<T>> = cur.iter().cloned().collect();
        let gone = next.remove(pos);
        let next = Arc::new(next);
        self.cell.store(next.clone());
        *cur = next;
        Some(gone)
    }

    /// A counted clone of the member at `index` of the current snapshot, if it is still in use.
    /// The snapshot guard is dropped before returning: the caller may block while holding the
    /// `Ref`, never while holding the guard. `None` means past the end; `Some(None)` means
    /// the slot is finished or not wanted.
    pub fn get_at(&self, index: usize, want: impl Fn(&T) -> bool) -> Option<Option<Ref<T>>> {
        let snap = self.cell.load();
        let item = snap.get(index)?;
        if !want(item) || !item.life().try_get() {
            return Some(None);
        }
        Some(Some(Ref { item: item.clone() }))
    }

    /// A counted clone of the member with `key`.
    pub fn get(&self, key: u64) -> Option<Ref<T>> {
        let snap = self.cell.load();
        let item = snap.iter().find(|m| m.key() == key)?;
        if !item.life().try_get() {
            return None;
        }
        Some(Ref { item: item.clone() })
    }

    /// Whether a member of the current snapshot satisfies `test` (no clone is taken, and
    /// the snapshot guard is dropped before returning).
    pub fn any(&self, test: impl Fn(&T) -> bool) -> bool {
        self.cell.load().iter().any(|m| test(m))
    }

    /// Members of the current snapshot (for status; not counted).
    pub fn members(&self) -> Vec<Arc<T>> {
        self.cell.load().iter().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.cell.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(all(test, not(feature = "loom")))]
mod tests {
    use super::*;

    struct M(u64, Life);
    impl Member for M {
        fn life(&self) -> &Life {
            &self.1
        }
        fn key(&self) -> u64 {
            self.0
        }
    }

    #[test]
    fn finished_member_cannot_be_revived() {
        let set = ActiveSet::new();
        set.insert(Arc::new(M(1, Life::new()))).ok().unwrap();
        assert!(set.insert(Arc::new(M(1, Life::new()))).is_err());
        let r = set.get(1).unwrap();
        let gone = set.remove(1).unwrap();
        assert!(set.get(1).is_none());
        let waiter = {
            let gone = gone.clone();
            std::thread::spawn(move || gone.life().put_and_wait())
        };
        drop(r);
        waiter.join().unwrap();
        assert!(!gone.life().try_get());
        assert_eq!(gone.life().count(), 0);
    }
}
