//! The bio prison: a cell locks one virtual block of one thin while it is provisioned or copied.
//!
//! Bios that arrive for a locked block wait inside the cell and are handed back, in arrival
//! order, when the holder releases it (the caller re-queues them). Cells come from a bounded
//! [`CellPool`] whose allocation blocks while the pool is exhausted, like the kernel's mempool;
//! a non-blocking `try_` variant lets the submitting thread fall back to the deferred list.

use std::collections::HashMap;

use crate::sync::{self, Condvar, Mutex};

/// A bounded pool of cells. Holding a cell is holding one unit of this pool.
pub struct CellPool {
    free: Mutex<usize>,
    available: Condvar,
    capacity: usize,
}

impl CellPool {
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        CellPool {
            free: Mutex::new(capacity),
            available: Condvar::new(),
            capacity,
        }
    }

    /// Takes a cell, blocking while none is free.
    pub fn alloc(&self) {
        let mut free = sync::lock(&self.free);
        while *free == 0 {
            free = sync::wait(&self.available, free);
        }
        *free -= 1;
    }

    pub fn try_alloc(&self) -> bool {
        let mut free = sync::lock(&self.free);
        if *free == 0 {
            return false;
        }
        *free -= 1;
        true
    }

    pub fn free(&self) {
        let mut free = sync::lock(&self.free);
        *free = (*free + 1).min(self.capacity);
        self.available.notify_one();
    }

    pub fn in_use(&self) -> usize {
        self.capacity - *sync::lock(&self.free)
    }
}

/// What a cell locks: (thin id, virtual block).
pub type CellKey = (u32, u64);

/// Proof of holding the cell for a key; give it back with [`Prison::release`].
#[must_use = "a held cell must be released"]
pub struct Held {
    key: CellKey,
}

impl Held {
    pub fn key(&self) -> CellKey {
        self.key
    }
}

/// Outcome of trying to lock a block.
pub enum Detain<B> {
    /// The caller holds the cell and keeps its bio.
    Held(Held, B),
    /// Another holder has the block; the bio waits in its cell.
    Waiting,
    /// No cell is free right now (only from `try_detain`); the bio is given back.
    NoCell(B),
}

pub struct Prison<B> {
    cells: Mutex<HashMap<CellKey, Vec<B>>>,
    pool: CellPool,
}

impl<B> Prison<B> {
    pub fn new(pool_size: usize) -> Self {
        Prison {
            cells: Mutex::new(HashMap::new()),
            pool: CellPool::new(pool_size),
        }
    }

    pub fn pool(&self) -> &CellPool {
        &self.pool
    }

    /// Locks `key` if a cell is free at once; never blocks on the pool.
    pub fn try_detain(&self, key: CellKey, bio: B) -> Detain<B> {
        let mut cells = sync::lock(&self.cells);
        if let Some(inmates) = cells.get_mut(&key) {
            inmates.push(bio);
            return Detain::Waiting;
        }
        if !self.pool.try_alloc() {
            return Detain::NoCell(bio);
        }
        cells.insert(key, Vec::new());
        Detain::Held(Held { key }, bio)
    }

    /// Locks `key` only if no bio holds or waits on it and a cell is free at once: for a
    /// caller that must not wait at all (nor leave a bio behind in someone else's cell).
    pub fn try_lock(&self, key: CellKey) -> Option<Held> {
        let mut cells = sync::lock(&self.cells);
        if cells.contains_key(&key) || !self.pool.try_alloc() {
            return None;
        }
        cells.insert(key, Vec::new());
        Some(Held { key })
    }

    /// Locks `key`, blocking on the cell pool if it is exhausted. No prison lock is held while
    /// blocked; the caller must hold none of its own either.
    pub fn detain(&self, key: CellKey, bio: B) -> Detain<B> {
        {
            let mut cells = sync::lock(&self.cells);
            if let Some(inmates) = cells.get_mut(&key) {
                inmates.push(bio);
                return Detain::Waiting;
            }
        }
        self.pool.alloc();
        let mut cells = sync::lock(&self.cells);
        if let Some(inmates) = cells.get_mut(&key) {
            // Someone locked the block while we slept on the pool.
            inmates.push(bio);
            drop(cells);
            self.pool.free();
            return Detain::Waiting;
        }
        cells.insert(key, Vec::new());
        Detain::Held(Held { key }, bio)
    }

    /// Unlocks the cell and returns its waiting bios in arrival order.
    pub fn release(&self, held: Held) -> Vec<B> {
        let inmates = sync::lock(&self.cells)
            .remove(&held.key)
            .unwrap_or_default();
        self.pool.free();
        inmates
    }

    pub fn locked_cells(&self) -> usize {
        sync::lock(&self.cells).len()
    }
}

#[cfg(all(test, not(feature = "loom")))]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn waiters_come_back_in_order() {
        let p: Prison<u32> = Prison::new(2);
        let Detain::Held(h, 0) = p.try_detain((1, 5), 0) else {
            panic!("first must hold")
        };
        for i in 1..4 {
            assert!(matches!(p.try_detain((1, 5), i), Detain::Waiting));
        }
        let Detain::Held(h2, 9) = p.try_detain((1, 6), 9) else {
            panic!("other block is free")
        };
        assert!(matches!(p.try_detain((2, 5), 7), Detain::NoCell(7)));
        assert!(p.try_lock((1, 5)).is_none(), "held by another");
        assert!(p.try_lock((2, 5)).is_none(), "no cell free");
        assert_eq!(p.release(h), vec![1, 2, 3]);
        assert!(p.release(h2).is_empty());
        let h3 = p.try_lock((2, 5)).expect("free block, free cell");
        assert!(matches!(p.try_detain((2, 5), 8), Detain::Waiting));
        assert_eq!(p.release(h3), vec![8]);
        assert_eq!(p.pool().in_use(), 0);
    }

    #[test]
    fn blocking_detain_waits_for_a_free_cell() {
        let p: Arc<Prison<u32>> = Arc::new(Prison::new(1));
        let Detain::Held(h, _) = p.try_detain((1, 1), 0) else {
            panic!()
        };
        let p2 = p.clone();
        let t = std::thread::spawn(move || match p2.detain((1, 2), 1) {
            Detain::Held(h, b) => {
                p2.release(h);
                b
            }
            _ => 99,
        });
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(p.release(h).is_empty());
        assert_eq!(t.join().unwrap(), 1);
    }
}
