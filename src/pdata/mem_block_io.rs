//! An in-memory metadata device that models durable versus volatile bytes, so tests can cut
//! power at any point. Built only for tests and the `testing` feature.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use super::block_io::{check_range, zeroed_block, Block, BlockIo, BLOCK_SIZE};
use crate::error::{Error, Result};
use crate::util::usize_from_u64;

#[derive(Default)]
struct MemState {
    durable: HashMap<u64, Box<Block>>,
    volatile: HashMap<u64, Box<Block>>,
    /// Operations (writes and syncs) still allowed before the simulated power cut.
    ops_left: Option<u64>,
    ops_done: u64,
    fail_writes: bool,
}

/// In-memory metadata device. Writes stay volatile until `sync`; `crash` drops them. A cut point
/// makes every operation after the N-th fail, as if power went at that moment.
#[derive(Clone)]
pub struct MemBlockIo {
    nr_blocks: u64,
    state: Arc<Mutex<MemState>>,
}

impl MemBlockIo {
    pub fn new(nr_blocks: u64) -> Self {
        MemBlockIo {
            nr_blocks,
            state: Arc::new(Mutex::new(MemState::default())),
        }
    }

    fn lock(&self) -> MutexGuard<'_, MemState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// After `ops` more writes or syncs, everything fails (power is gone).
    pub fn cut_after(&self, ops: u64) {
        self.lock().ops_left = Some(ops);
    }

    /// Makes every later write fail with EIO (a failing metadata device).
    pub fn fail_writes(&self, fail: bool) {
        self.lock().fail_writes = fail;
    }

    /// Number of writes and syncs performed so far.
    pub fn ops_done(&self) -> u64 {
        self.lock().ops_done
    }

    /// Power cut: every unsynced write is lost. Returns a fresh device holding only durable data.
    pub fn crash(&self) -> MemBlockIo {
        let st = self.lock();
        let durable = st.durable.clone();
        MemBlockIo {
            nr_blocks: self.nr_blocks,
            state: Arc::new(Mutex::new(MemState {
                durable,
                ..MemState::default()
            })),
        }
    }

    /// The durable bytes of the device, for writing out to a file.
    pub fn durable_image(&self) -> Vec<u8> {
        let st = self.lock();
        let mut image = vec![0u8; usize_from_u64(self.nr_blocks) * BLOCK_SIZE];
        for (loc, block) in &st.durable {
            let off = usize_from_u64(*loc) * BLOCK_SIZE;
            image[off..off + BLOCK_SIZE].copy_from_slice(&block[..]);
        }
        image
    }

    fn take_op(st: &mut MemState) -> Result<()> {
        if let Some(left) = st.ops_left.as_mut() {
            if *left == 0 {
                return Err(Error::io(
                    "simulated power cut",
                    std::io::Error::from_raw_os_error(libc::EIO),
                ));
            }
            *left -= 1;
        }
        st.ops_done += 1;
        Ok(())
    }
}

impl BlockIo for MemBlockIo {
    fn nr_blocks(&self) -> u64 {
        self.nr_blocks
    }

    fn read_block(&self, location: u64) -> Result<Box<Block>> {
        check_range(location, self.nr_blocks)?;
        let st = self.lock();
        let found = st
            .volatile
            .get(&location)
            .or_else(|| st.durable.get(&location));
        Ok(found.cloned().unwrap_or_else(zeroed_block))
    }

    fn write_block(&self, location: u64, data: &Block) -> Result<()> {
        check_range(location, self.nr_blocks)?;
        let mut st = self.lock();
        if st.fail_writes {
            return Err(Error::io(
                format!("injected write failure at metadata block {location}"),
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        Self::take_op(&mut st)?;
        st.volatile.insert(location, Box::new(*data));
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        let mut st = self.lock();
        Self::take_op(&mut st)?;
        let pending: Vec<_> = st.volatile.drain().collect();
        st.durable.extend(pending);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsynced_writes_are_lost_in_a_crash() {
        let io = MemBlockIo::new(4);
        let mut b = zeroed_block();
        b[0] = 1;
        io.write_block(1, &b).unwrap();
        io.sync().unwrap();
        b[0] = 2;
        io.write_block(1, &b).unwrap();
        io.write_block(2, &b).unwrap();
        let after = io.crash();
        assert_eq!(after.read_block(1).unwrap()[0], 1);
        assert_eq!(after.read_block(2).unwrap()[0], 0);
    }

    #[test]
    fn cut_point_fails_later_operations() {
        let io = MemBlockIo::new(4);
        io.cut_after(1);
        let b = zeroed_block();
        io.write_block(0, &b).unwrap();
        assert!(io.sync().is_err());
        assert!(io.read_block(4).is_err());
    }
}
