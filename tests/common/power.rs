//! Power-cut models for in-process tests. One [`Power`] counts the mutating operations of both
//! devices (metadata block writes and syncs, data writes, punches and syncs); after the cut
//! point every operation fails, as if the machine lost power at that instant.
//!
//! [`PowerMeta`] is a metadata device whose writes stay volatile until a sync, and
//! [`VolatileData`] a data-device tap that remembers what each 4 KiB page held at the last sync.
//! At the crash, each unsynced metadata block and data page independently survives or not:
//! a disk's write cache may have written any of them out before power went.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, MutexGuard};

use rand::Rng;
use thinnbd::engine::{DataStore, DataTap};
use thinnbd::pdata::block_io::{zeroed_block, Block, BlockIo, BLOCK_SIZE};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Default)]
struct PowerState {
    ops_left: Option<u64>,
    ops_done: u64,
    cut: bool,
}

/// The power supply shared by a pool's two devices.
#[derive(Default)]
pub struct Power {
    st: Mutex<PowerState>,
}

impl Power {
    pub fn new() -> Arc<Power> {
        Arc::new(Power::default())
    }

    /// Power goes after `ops` more operations.
    pub fn cut_after(&self, ops: u64) {
        lock(&self.st).ops_left = Some(ops);
    }

    pub fn cut_now(&self) {
        self.cut_after(0);
    }

    pub fn is_cut(&self) -> bool {
        lock(&self.st).cut
    }

    pub fn ops_done(&self) -> u64 {
        lock(&self.st).ops_done
    }

    fn take_op(&self) -> io::Result<()> {
        let mut st = lock(&self.st);
        if let Some(left) = st.ops_left.as_mut() {
            if *left == 0 {
                st.cut = true;
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            *left -= 1;
        }
        st.ops_done += 1;
        Ok(())
    }

    fn check(&self) -> io::Result<()> {
        if lock(&self.st).cut {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }
}

#[derive(Default)]
struct MetaState {
    durable: HashMap<u64, Box<Block>>,
    volatile: HashMap<u64, Box<Block>>,
}

/// A metadata device with a volatile write cache, on a [`Power`] supply.
pub struct PowerMeta {
    nr_blocks: u64,
    power: Arc<Power>,
    st: Mutex<MetaState>,
}

fn to_err(what: &str, e: io::Error) -> thinnbd::Error {
    thinnbd::Error::io(format!("simulated power cut ({what})"), e)
}

impl PowerMeta {
    pub fn new(nr_blocks: u64, power: Arc<Power>) -> PowerMeta {
        PowerMeta {
            nr_blocks,
            power,
            st: Mutex::new(MetaState::default()),
        }
    }

    /// The device after power comes back on (on `power`): durable blocks, plus each unsynced
    /// block with probability `keep`. Returns it and the number of unsynced blocks kept.
    pub fn crash(&self, rng: &mut impl Rng, keep: f64, power: Arc<Power>) -> (PowerMeta, usize) {
        let st = lock(&self.st);
        let mut durable = st.durable.clone();
        let mut kept = 0;
        let mut volatile: Vec<_> = st.volatile.iter().collect();
        volatile.sort_by_key(|(k, _)| **k);
        for (loc, b) in volatile {
            if rng.gen_bool(keep) {
                durable.insert(*loc, b.clone());
                kept += 1;
            }
        }
        let after = PowerMeta {
            nr_blocks: self.nr_blocks,
            power,
            st: Mutex::new(MetaState {
                durable,
                volatile: HashMap::new(),
            }),
        };
        (after, kept)
    }

    /// The durable bytes, as a metadata file for the external checkers.
    pub fn image(&self) -> Vec<u8> {
        let st = lock(&self.st);
        let mut image = vec![0u8; self.nr_blocks as usize * BLOCK_SIZE];
        for (loc, block) in &st.durable {
            let off = *loc as usize * BLOCK_SIZE;
            image[off..off + BLOCK_SIZE].copy_from_slice(&block[..]);
        }
        image
    }
}

impl BlockIo for PowerMeta {
    fn nr_blocks(&self) -> u64 {
        self.nr_blocks
    }

    fn read_block(&self, location: u64) -> thinnbd::Result<Box<Block>> {
        if location >= self.nr_blocks {
            return Err(thinnbd::Error::corrupt(format!(
                "metadata block {location} is past the end"
            )));
        }
        self.power.check().map_err(|e| to_err("read", e))?;
        let st = lock(&self.st);
        let found = st
            .volatile
            .get(&location)
            .or_else(|| st.durable.get(&location));
        Ok(found.cloned().unwrap_or_else(zeroed_block))
    }

    fn write_block(&self, location: u64, data: &Block) -> thinnbd::Result<()> {
        if location >= self.nr_blocks {
            return Err(thinnbd::Error::corrupt(format!(
                "metadata block {location} is past the end"
            )));
        }
        self.power.take_op().map_err(|e| to_err("write", e))?;
        lock(&self.st).volatile.insert(location, Box::new(*data));
        Ok(())
    }

    fn sync(&self) -> thinnbd::Result<()> {
        self.power.take_op().map_err(|e| to_err("sync", e))?;
        let mut st = lock(&self.st);
        let pending: Vec<_> = st.volatile.drain().collect();
        st.durable.extend(pending);
        Ok(())
    }
}

const PAGE: u64 = 4096;

/// The data device's volatile write cache, as a tap on a real file: before a page is first
/// changed after a sync, its old bytes are saved; a sync forgets them; a crash puts back the
/// old bytes of each unsynced page with probability 1 - keep.
pub struct VolatileData {
    power: Arc<Power>,
    undo: Mutex<HashMap<u64, Vec<u8>>>,
}

impl VolatileData {
    pub fn new(power: Arc<Power>) -> Arc<VolatileData> {
        Arc::new(VolatileData {
            power,
            undo: Mutex::new(HashMap::new()),
        })
    }

    /// Applies the crash to `file`; returns (pages reverted, pages kept).
    pub fn crash(&self, file: &File, rng: &mut impl Rng, keep: f64) -> (usize, usize) {
        let undo = lock(&self.undo);
        let mut pages: Vec<_> = undo.iter().collect();
        pages.sort_by_key(|(k, _)| **k);
        let (mut reverted, mut kept) = (0, 0);
        for (page, old) in pages {
            if rng.gen_bool(keep) {
                kept += 1;
            } else {
                file.write_all_at(old, page * PAGE)
                    .expect("revert a data page");
                reverted += 1;
            }
        }
        (reverted, kept)
    }
}

impl DataTap for VolatileData {
    fn before_change(&self, data: &dyn DataStore, offset: u64, len: u64) -> io::Result<()> {
        self.power.take_op()?;
        let mut undo = lock(&self.undo);
        let first = offset / PAGE;
        let end = (offset + len).div_ceil(PAGE);
        for page in first..end {
            if undo.contains_key(&page) {
                continue;
            }
            let mut old = vec![0u8; PAGE as usize];
            data.read_at(&mut old, page * PAGE)
                .map_err(io::Error::other)?;
            undo.insert(page, old);
        }
        Ok(())
    }

    fn before_sync(&self) -> io::Result<()> {
        self.power.take_op()?;
        lock(&self.undo).clear();
        Ok(())
    }
}
