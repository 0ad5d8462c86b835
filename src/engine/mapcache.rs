//! A bounded, lock-free cache of (thin, virtual block) -> mapping for the read and overwrite
//! fast paths, so they need no metadata lock and no btree walk on a hit.
//!
//! Direct-mapped slots, each a small seqlock of atomics. Consistency with the metadata comes from
//! *when* slots change: misses are filled while the filler holds the metadata read lock, and every
//! change of a mapping (insert, remove, snapshot, delete) updates or clears the cache while it
//! holds the metadata write lock. So a hit is never older than a lookup done under the lock just
//! before the lock was dropped, which is what the fast paths did before.

use std::sync::atomic::{fence, AtomicU64, Ordering};

use crate::thin::metadata::{Mapping, ThinId};

const EMPTY: u64 = u64::MAX;

/// 32-byte aligned so that no slot straddles two cache lines.
#[repr(align(32))]
struct Slot {
    seq: AtomicU64,
    key: AtomicU64,
    val: AtomicU64,
}

pub(crate) struct MapCache {
    slots: Box<[Slot]>,
    mask: usize,
}

fn key_of(thin: ThinId, vblock: u64) -> Option<u64> {
    (vblock < 1 << 40).then(|| (u64::from(thin) << 40) | vblock)
}

impl MapCache {
    /// A cache of `slots` entries (rounded up to a power of two; 0 disables it).
    pub(crate) fn new(slots: usize) -> Self {
        let n = if slots == 0 {
            0
        } else {
            slots.next_power_of_two()
        };
        let slots: Box<[Slot]> = (0..n)
            .map(|_| Slot {
                seq: AtomicU64::new(0),
                key: AtomicU64::new(EMPTY),
                val: AtomicU64::new(0),
            })
            .collect();
        MapCache {
            mask: n.saturating_sub(1),
            slots,
        }
    }

    fn slot(&self, key: u64) -> Option<&Slot> {
        if self.slots.is_empty() {
            return None;
        }
        // Consecutive blocks of a thin take consecutive slots, from a start that depends on
        // the thin: a volume's working set then sits in a compact run of cache lines and
        // pages instead of being scattered over the whole table, which made every hit a
        // cache and TLB miss (7% of the plugin's CPU on random reads).
        let thin = key >> 40;
        let vblock = key & ((1 << 40) - 1);
        let start = thin.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 24;
        self.slots
            .get((start.wrapping_add(vblock) as usize) & self.mask)
    }

    pub(crate) fn get(&self, thin: ThinId, vblock: u64) -> Option<Mapping> {
        let key = key_of(thin, vblock)?;
        let s = self.slot(key)?;
        let s1 = s.seq.load(Ordering::Acquire);
        if s1 & 1 == 1 {
            return None;
        }
        let k = s.key.load(Ordering::Relaxed);
        let v = s.val.load(Ordering::Relaxed);
        fence(Ordering::Acquire);
        if s.seq.load(Ordering::Relaxed) != s1 || k != key {
            return None;
        }
        Some(Mapping {
            data_block: v >> 1,
            shared: v & 1 == 1,
        })
    }

    /// Writes a slot; `wait` spins for a concurrent writer (used under the metadata write lock,
    /// where only a filler that is finishing can hold the slot), otherwise gives up.
    fn write(&self, s: &Slot, key: u64, val: u64, only_if: Option<u64>, wait: bool) {
        loop {
            let cur = s.seq.load(Ordering::Relaxed);
            if cur & 1 == 0
                && s.seq
                    .compare_exchange(cur, cur + 1, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                fence(Ordering::Release);
                if only_if.is_none_or(|k| s.key.load(Ordering::Relaxed) == k) {
                    s.key.store(key, Ordering::Relaxed);
                    s.val.store(val, Ordering::Relaxed);
                }
                s.seq.store(cur + 2, Ordering::Release);
                return;
            }
            if !wait {
                return;
            }
            std::hint::spin_loop();
        }
    }

    /// Records a mapping just looked up; call with the metadata lock held (read or write).
    pub(crate) fn fill(&self, thin: ThinId, vblock: u64, m: Mapping) {
        let Some(key) = key_of(thin, vblock) else {
            return;
        };
        let Some(s) = self.slot(key) else { return };
        if m.data_block >= 1 << 62 {
            return;
        }
        self.write(
            s,
            key,
            (m.data_block << 1) | u64::from(m.shared),
            None,
            false,
        );
    }

    /// Forgets a mapping; call with the metadata write lock held.
    pub(crate) fn invalidate(&self, thin: ThinId, vblock: u64) {
        let Some(key) = key_of(thin, vblock) else {
            return;
        };
        let Some(s) = self.slot(key) else { return };
        self.write(s, EMPTY, 0, Some(key), true);
    }

    /// Forgets everything (snapshots and deletes); call with the metadata write lock held.
    pub(crate) fn clear(&self) {
        for s in self.slots.iter() {
            if s.key.load(Ordering::Relaxed) != EMPTY {
                self.write(s, EMPTY, 0, None, true);
            }
        }
    }
}

#[cfg(all(test, not(feature = "loom")))]
mod tests {
    use super::*;

    #[test]
    fn fill_get_invalidate_clear() {
        let c = MapCache::new(1000);
        assert!(c.get(1, 5).is_none());
        c.fill(
            1,
            5,
            Mapping {
                data_block: 77,
                shared: true,
            },
        );
        assert_eq!(
            c.get(1, 5),
            Some(Mapping {
                data_block: 77,
                shared: true
            })
        );
        assert!(c.get(2, 5).is_none());
        c.invalidate(2, 5);
        assert!(
            c.get(1, 5).is_some(),
            "invalidating another key leaves the slot"
        );
        c.invalidate(1, 5);
        assert!(c.get(1, 5).is_none());
        c.fill(
            3,
            9,
            Mapping {
                data_block: 1,
                shared: false,
            },
        );
        c.clear();
        assert!(c.get(3, 9).is_none());
        let off = MapCache::new(0);
        off.fill(
            1,
            1,
            Mapping {
                data_block: 1,
                shared: false,
            },
        );
        assert!(off.get(1, 1).is_none());
    }

    #[test]
    fn a_run_of_blocks_as_long_as_the_table_is_held_whole() {
        let c = MapCache::new(1024);
        let m = |b: u64| Mapping {
            data_block: b * 3,
            shared: b.is_multiple_of(2),
        };
        for b in 5000..6024 {
            c.fill(7, b, m(b));
        }
        for b in 5000..6024 {
            assert_eq!(
                c.get(7, b),
                Some(m(b)),
                "block {b} was evicted by its neighbours"
            );
        }
        // The next block wraps onto the first one's slot: a direct-mapped cache, still exact.
        c.fill(7, 6024, m(6024));
        assert_eq!(c.get(7, 5000), None);
        assert_eq!(c.get(7, 6024), Some(m(6024)));
    }
}
