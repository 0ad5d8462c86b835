//! Read epochs: lets a commit wait for data reads that may have looked up a block before the
//! transaction freed it, so that no freed block is punched or handed out again while such a
//! read is still copying it (the reader would get another volume's bytes, or zeros).
//!
//! The same guarantee dm-thin gets from its deferred sets: a reader enters the current epoch
//! before its mapping lookup and leaves after its `pread`; the committer, after the commit and
//! holding no lock, opens a new epoch and waits until the old one has no reader left. Readers
//! never wait here, so the wait cannot deadlock with them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

#[derive(Default)]
pub(crate) struct ReadEpochs {
    epoch: AtomicU64,
    /// Readers in the epochs of even and odd number.
    readers: [AtomicU64; 2],
}

/// A reader's place in its epoch, given up on drop.
pub(crate) struct Reading<'a> {
    readers: &'a AtomicU64,
}

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        self.readers.fetch_sub(1, Ordering::SeqCst);
    }
}

impl ReadEpochs {
    /// Enters the current epoch; hold the result across the mapping lookup and the data read.
    pub(crate) fn enter(&self) -> Reading<'_> {
        loop {
            let epoch = self.epoch.load(Ordering::SeqCst);
            let readers = &self.readers[(epoch & 1) as usize];
            readers.fetch_add(1, Ordering::SeqCst);
            // Counted before the epoch moved on: the committer that moves it waits for us.
            if self.epoch.load(Ordering::SeqCst) == epoch {
                return Reading { readers };
            }
            readers.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Waits until every reader that entered before this call has left. Callers must not
    /// overlap (commits are serialized) and must hold no lock a reader could need.
    pub(crate) fn wait_for_earlier_readers(&self) {
        let old = self.epoch.fetch_add(1, Ordering::SeqCst);
        let readers = &self.readers[(old & 1) as usize];
        let mut spins = 0u32;
        while readers.load(Ordering::SeqCst) != 0 {
            // Page-cache reads finish in microseconds; a read from the disk takes longer.
            if spins < 100 {
                std::hint::spin_loop();
                spins += 1;
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    #[test]
    fn the_wait_covers_earlier_readers_only() {
        let epochs = Arc::new(ReadEpochs::default());
        let early = epochs.enter();
        let done = Arc::new(AtomicBool::new(false));
        let waiter = {
            let (epochs, done) = (Arc::clone(&epochs), Arc::clone(&done));
            std::thread::spawn(move || {
                epochs.wait_for_earlier_readers();
                done.store(true, Ordering::SeqCst);
            })
        };
        // Wait for the waiter to open the new epoch, then enter it: it must not be waited for.
        while epochs.epoch.load(Ordering::SeqCst) == 0 {
            std::thread::yield_now();
        }
        let late = epochs.enter();
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            !done.load(Ordering::SeqCst),
            "the wait ended with an earlier reader inside"
        );
        drop(early);
        waiter.join().unwrap();
        assert!(done.load(Ordering::SeqCst));
        drop(late);
        // A second wait has nobody to wait for once the late reader left.
        epochs.wait_for_earlier_readers();
    }
}
