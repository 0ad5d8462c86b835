//! The write path that changes mappings: provisioning a new block (data first, then the
//! mapping), copy-on-write of a shared block, and the non-blocking attempts at both that the
//! NBD server makes on its event loop before it hands a write to a blocking thread. The
//! caller holds the virtual block's prison cell (or these take it).

use std::sync::atomic::Ordering;

use crate::error::{Error, ErrorKind, Result};
use crate::thin::metadata::ThinId;
use crate::util::usize_from_u64;

use super::active_thin::{Bio, Thin};
use super::state::{Claim, PoolState};

/// The slow path of a write, with the virtual block's cell held.
pub(crate) fn write_held(state: &PoolState, thin: &Thin, bio: &Bio) -> Result<()> {
    let bs = state.block_bytes;
    let bs_len =
        usize::try_from(bs).map_err(|_| Error::new(ErrorKind::Unsupported, "block size"))?;
    let id = thin.id();
    let mapping = {
        let core = state.read_metadata();
        state.check_writable(&core)?;
        core.run(|c| c.md.lookup(id, bio.vblock))?
    };
    let end = bio.offset + bio.data.len();
    match mapping {
        Some(m) if !m.shared => state
            .data
            .write_at(&bio.data, state.data_offset(m.data_block, bio.offset)?),
        Some(m) => {
            let (nb, _) = state.alloc_block()?;
            let copied = (|| {
                let mut buf = vec![0u8; bs_len];
                if bio.data.len() < bs_len {
                    state
                        .data
                        .read_at(&mut buf, state.data_offset(m.data_block, 0)?)?;
                }
                buf[bio.offset..end].copy_from_slice(&bio.data);
                state.data.write_at(&buf, state.data_offset(nb, 0)?)
            })();
            if let Err(e) = copied {
                state.release_block(nb);
                return Err(e);
            }
            state.insert_mapping(id, bio.vblock, nb)?;
            state.stats.copied.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        None => {
            let (nb, zeroed) = state.alloc_block()?;
            provision(state, id, bio.vblock, nb, zeroed, bio.offset, &bio.data)
        }
    }
}

/// Writes a new block's data, then maps it: data first, so a reader that finds the mapping
/// finds the bytes. The rest of the block is zeroed unless it is known to read zeros. On
/// failure the block goes back to the allocator.
fn provision(
    state: &PoolState,
    thin: ThinId,
    vblock: u64,
    nb: u64,
    zeroed: bool,
    inb: usize,
    data: &[u8],
) -> Result<()> {
    let bs = state.block_bytes;
    let whole = data.len() as u64 == bs;
    let written = if whole || zeroed || !state.config.zero_new_blocks {
        state
            .data_offset(nb, inb)
            .and_then(|at| state.data.write_at(data, at))
    } else {
        // `inb + data.len()` is within the block: `pieces` never crosses one.
        let bs_len =
            usize::try_from(bs).map_err(|_| Error::new(ErrorKind::Unsupported, "block size"))?;
        let mut buf = vec![0u8; bs_len];
        buf[inb..inb + data.len()].copy_from_slice(data);
        state
            .data_offset(nb, 0)
            .and_then(|at| state.data.write_at(&buf, at))
    };
    if let Err(e) = written {
        state.release_block(nb);
        return Err(e);
    }
    state.insert_mapping(thin, vblock, nb)?;
    state.stats.provisioned.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// A write of `data` at `inb` into `vblock`, which the mapping cache does not know as
/// mapped and unshared, if it can be done without waiting: the block's cell and the
/// metadata lock free at once, no commit running, a data block free, no fault injection
/// armed. Then it provisions the block, copies it if it is shared and the source is in the
/// page cache, or writes in place when it turns out mapped and unshared.
/// `None` means nothing was changed that a retry would not redo: call the blocking path,
/// which also reports any error and applies the no-space policy.
///
/// The only wait left is for the metadata write lock to map the block, held briefly by
/// other writers; a commit that starts in between can make that one wait longer (rare).
pub(crate) fn try_write_unmapped(
    state: &PoolState,
    thin: &Thin,
    vblock: u64,
    inb: usize,
    data: &[u8],
) -> Option<()> {
    if state.failed() || state.commits.is_committing() || state.data_faults_armed() {
        return None;
    }
    let held = state.prison.try_lock((thin.id(), vblock))?;
    let r = try_write_held(state, thin.id(), vblock, inb, data);
    state.release_cell(thin, held);
    r
}

/// Provisions whole blocks `[vblock, vblock + n)` with `data` (`n` blocks of bytes, at
/// least two) together when every one of them is unmapped, their cells are free at once
/// and the pool has room for all: one allocation under one metadata lock, the data
/// written, then every block mapped under one lock. `None`: nothing was changed; write block by block instead (that path also handles
/// mapped and shared blocks, a full pool and its policy).
pub(crate) fn try_provision_run(
    state: &PoolState,
    thin: &Thin,
    vblock: u64,
    data: &[u8],
) -> Option<Result<()>> {
    let bs = state.block_bytes;
    let n = data.len() as u64 / bs;
    if n < 2 || state.failed() || state.data_faults_armed() {
        return None;
    }
    let mut cells = Vec::with_capacity(usize_from_u64(n));
    for vb in vblock..vblock + n {
        match state.prison.try_lock((thin.id(), vb)) {
            Some(held) => cells.push(held),
            None => break,
        }
    }
    let r = if cells.len() as u64 == n {
        provision_run_held(state, thin.id(), vblock, n, data)
    } else {
        None
    };
    for held in cells {
        state.release_cell(thin, held);
    }
    r
}

fn provision_run_held(
    state: &PoolState,
    thin: ThinId,
    vblock: u64,
    n: u64,
    data: &[u8],
) -> Option<Result<()>> {
    let bs = state.block_bytes;
    let bs_len = usize::try_from(bs).ok()?;
    let blocks = state.alloc_run(thin, vblock, n)?;
    // One write per block even where blocks are consecutive: the page cache sizes its
    // folios by the write, and a 4 KiB overwrite inside a 1 MiB folio costs ext4 a walk
    // over all of its buffers. The data device splits further (`data_write_chunk`); this
    // keeps folios within a block when that is turned off.
    for (&b, chunk) in blocks.iter().zip(data.chunks(bs_len)) {
        let written = state
            .data_offset(b, 0)
            .and_then(|at| state.data.write_at(chunk, at));
        if let Err(e) = written {
            for &b in &blocks {
                state.release_block(b);
            }
            return Some(Err(e));
        }
    }
    Some(state.insert_mappings(thin, vblock, &blocks).map(|()| {
        state
            .stats
            .provisioned
            .fetch_add(blocks.len() as u64, Ordering::Relaxed);
        state.stats.provisioned_runs.fetch_add(1, Ordering::Relaxed);
    }))
}

fn try_write_held(
    state: &PoolState,
    thin: ThinId,
    vblock: u64,
    inb: usize,
    data: &[u8],
) -> Option<()> {
    match state.try_claim(thin, vblock)? {
        Claim::Mapped(m) => {
            let at = state.data_offset(m.data_block, inb).ok()?;
            state.data.write_at(data, at).ok()
        }
        // A failure here is recorded (a metadata failure makes the pool read-only); the
        // blocking retry then reports it.
        Claim::New { block, zeroed } => {
            provision(state, thin, vblock, block, zeroed, inb, data).ok()
        }
        Claim::Copy { from, block } => {
            if try_copy_cached(state, from, block, inb, data).is_none() {
                state.release_block(block);
                return None;
            }
            state.insert_mapping(thin, vblock, block).ok()?;
            state.stats.copied.fetch_add(1, Ordering::Relaxed);
            Some(())
        }
    }
}

/// Copy-on-write of block `from` into `to` with `data` at `inb` laid over it, if the part
/// of `from` that survives is in the page cache (`None` otherwise, or on any error).
/// `from` cannot change meanwhile: a shared block is never written in place.
fn try_copy_cached(state: &PoolState, from: u64, to: u64, inb: usize, data: &[u8]) -> Option<()> {
    let bs = state.block_bytes;
    let mut buf = vec![0u8; usize::try_from(bs).ok()?];
    if data.len() < buf.len() {
        state
            .data
            .try_read_cached(&mut buf, state.data_offset(from, 0).ok()?)?;
    }
    buf.get_mut(inb..inb + data.len())?.copy_from_slice(data);
    state
        .data
        .write_at(&buf, state.data_offset(to, 0).ok()?)
        .ok()
}
