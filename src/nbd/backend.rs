//! The export seam: what both frontends (the NBD server and the nbdkit plugin) serve through.
//! One export (`ExportBackend`), the set of exports offered (`ExportSource`), and the rules
//! every frontend applies the same way: the block sizes it advertises (`BlockSizes`), where
//! each extent starts (`extents_at`), and "large writes take turns" (`WriteTurns`).
//!
//! `service::exports` implements the traits for thin volumes (the one adapter over the
//! engine); `memory` implements them for tests. Nothing here knows the engine.

use std::sync::Arc;

use tokio::sync::{Mutex, MutexGuard, OwnedMutexGuard};

use crate::error::{fail, ErrorKind, Result};
pub use crate::nbd::tls::PeerIdentity;

/// One export as the server sees it. Methods block (they do disk I/O): the server calls them
/// off the async executor (spawn_blocking), never on it; only the `try_*_nowait` methods,
/// which must not wait for anything, run on it.
pub trait ExportBackend: Send + Sync + 'static {
    fn size(&self) -> u64;
    fn read_only(&self) -> bool;
    /// The I/O size that avoids read-modify-write, e.g. the pool block size, or 4096; the
    /// frontends advertise it as [`BlockSizes::new`] rounds it.
    fn preferred_block_size(&self) -> u32;
    /// Fills `buf` from `offset`; holes read as zeros.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Serves a read at once if that needs no waiting at all (no lock to wait for, no device
    /// I/O: the bytes are in memory), so the server can answer it on its event loop without a
    /// hop to a blocking thread. `None`: not now (or an error); the server then calls
    /// [`read`](Self::read) off the executor. A backend that fills `buf` here promises the
    /// range holds only data (no holes), so one data chunk is the right structured reply.
    fn try_read_nowait(&self, offset: u64, buf: &mut [u8]) -> Option<()> {
        let _ = (offset, buf);
        None
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()>;
    /// Does a write at once if that needs no waiting at all (no lock or cell to wait for, no
    /// commit, no full pool), so the server can run it on its event loop without a hop to a
    /// blocking thread. `None`: not now (or an error); the server then calls
    /// [`write`](Self::write) off the executor with the same bytes, so a backend may decline
    /// after writing part of the range. Never called for FUA writes.
    fn try_write_nowait(&self, offset: u64, data: &[u8]) -> Option<()> {
        let _ = (offset, data);
        None
    }
    /// The longest write worth offering to [`try_write_nowait`](Self::try_write_nowait);
    /// longer ones always go to a blocking thread and take turns ([`WriteTurns`]). No limit by
    /// default: a backend without a quick path declines every offer anyway.
    fn nowait_write_max(&self) -> usize {
        usize::MAX
    }
    /// Whether writes longer than [`nowait_write_max`](Self::nowait_write_max) take turns
    /// ([`WriteTurns`]): yes for a device that serves one at a time anyway (a file), no for
    /// one that serves many in flight (an object store across the network).
    fn write_turns(&self) -> bool {
        true
    }
    /// Makes every completed write durable (from any connection).
    fn flush(&self) -> Result<()>;
    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()>;
    /// `may_unmap` = !NO_HOLE. `fast_only` = FAST_ZERO: return Err(Unsupported) if it would be slow.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fast_only: bool,
        fua: bool,
    ) -> Result<()>;
    /// Extents covering [offset, offset+len) (may stop early, must cover at least one byte).
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>>;
    /// The metadata contexts this export offers besides `base:allocation`, by full name
    /// (`namespace:leaf`); none by default.
    fn meta_contexts(&self) -> Vec<String> {
        Vec::new()
    }
    /// The named context's state over [offset, offset+len), as [`block_status`] answers for
    /// `base:allocation` (may stop early, must cover at least one byte; at most
    /// [`MAX_CONTEXT_EXTENTS`] are used). An error when the export no longer offers it.
    ///
    /// [`block_status`]: Self::block_status
    fn context_status(&self, context: &str, offset: u64, len: u64) -> Result<Vec<ContextExtent>> {
        let _ = (offset, len);
        fail(
            ErrorKind::NotFound,
            format!("no metadata context {context:?} on this export"),
        )
    }
    fn cache(&self, offset: u64, len: u64) -> Result<()>;
}

/// Where each extent of a `block_status` answer for `offset` starts, with the extent; empty
/// extents are left out.
pub fn extents_at(offset: u64, extents: &[Extent]) -> impl Iterator<Item = (u64, Extent)> + '_ {
    extents
        .iter()
        .filter(|e| e.length > 0)
        .scan(offset, |pos, &e| {
            let at = *pos;
            *pos = pos.saturating_add(e.length);
            Some((at, e))
        })
}

/// The block size constraints a frontend advertises for an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    pub minimum: u32,
    pub preferred: u32,
    pub maximum: u32,
}

impl BlockSizes {
    /// Any alignment works (minimum 1); the backend's preferred size as the protocol wants
    /// it, a power of two between 512 and `maximum`, the largest request the frontend takes.
    pub fn new(preferred_by_backend: u32, maximum: u32) -> BlockSizes {
        BlockSizes {
            minimum: 1,
            preferred: preferred_block_size(preferred_by_backend, maximum),
            maximum,
        }
    }
}

/// A pool block size need not be a power of two (dm-thin allows any multiple of 64 KiB), so
/// it is rounded down to one, within 512..=`max`.
pub fn preferred_block_size(backend: u32, max: u32) -> u32 {
    let p = backend.clamp(512, max.max(512));
    1 << (31 - p.leading_zeros())
}

/// "Large writes take turns", the write rule of every frontend; one per connection.
///
/// A plain (not FUA) write up to the backend's
/// [`nowait_write_max`](ExportBackend::nowait_write_max) is first offered to
/// [`try_write_nowait`](ExportBackend::try_write_nowait); a longer one runs only while it holds
/// the connection's turn. A buffered write to a file holds the file's inode lock for all of
/// its copy, so a second one would only spin on that lock while the frontend, which could be
/// taking the next payload off the socket, waits for a CPU; waiting for the turn sleeps
/// instead. The turn is held across nothing but the write itself, whose own waits (a
/// bio-prison cell, space) are the same with or without it.
///
/// One primitive for both kinds of caller: the NBD server waits for the turn on its event loop
/// ([`turn`](Self::turn)), the nbdkit plugin on its own threads ([`write`](Self::write)).
pub struct WriteTurns {
    nowait_max: usize,
    /// Whether long writes take turns at all ([`ExportBackend::write_turns`]).
    turns: bool,
    turn: Arc<Mutex<()>>,
}

impl WriteTurns {
    pub fn new(backend: &dyn ExportBackend) -> WriteTurns {
        WriteTurns {
            nowait_max: backend.nowait_write_max(),
            turns: backend.write_turns(),
            turn: Arc::new(Mutex::new(())),
        }
    }

    /// Whether a write of `len` bytes is worth offering to `try_write_nowait`.
    pub fn may_try_nowait(&self, len: usize, fua: bool) -> bool {
        !fua && len <= self.nowait_max
    }

    fn takes_turns(&self, len: usize) -> bool {
        self.turns && len > self.nowait_max
    }

    /// Waits (asynchronously) for the turn a write of `len` bytes needs; `None` for a write
    /// that needs none. The turn lasts until the guard is dropped.
    pub async fn turn(&self, len: usize) -> Option<OwnedMutexGuard<()>> {
        if self.takes_turns(len) {
            Some(Arc::clone(&self.turn).lock_owned().await)
        } else {
            None
        }
    }

    /// [`turn`](Self::turn) for a thread outside any async runtime (it would panic inside one).
    fn blocking_turn(&self, len: usize) -> Option<MutexGuard<'_, ()>> {
        self.takes_turns(len).then(|| self.turn.blocking_lock())
    }

    /// The whole rule for a frontend whose requests run on threads of their own (outside any
    /// async runtime): the quick path if allowed and taken, else the write in its turn.
    pub fn write(&self, b: &dyn ExportBackend, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        if self.may_try_nowait(data.len(), fua) && b.try_write_nowait(offset, data).is_some() {
            return Ok(());
        }
        let _turn = self.blocking_turn(data.len());
        b.write(offset, data, fua)
    }
}

/// A run of bytes with the same allocation state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    /// Not allocated.
    pub hole: bool,
    /// Reads as zeros.
    pub zero: bool,
}

impl Extent {
    /// Allocated bytes, `mapped`, or else a hole, which reads as zeros.
    pub fn new(length: u64, mapped: bool) -> Extent {
        Extent {
            length,
            hole: !mapped,
            zero: !mapped,
        }
    }
}

/// A run of bytes with one state in a metadata context other than `base:allocation`; the
/// flags are that context's own bits (for `qemu:dirty-bitmap:` contexts, bit 0 is "dirty").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContextExtent {
    pub length: u64,
    pub flags: u32,
}

/// The most extents of one context a block status reply carries: a longer answer is cut
/// there, as the protocol allows (the client asks again from where it ends), which bounds
/// both the backend's work and the reply.
pub const MAX_CONTEXT_EXTENTS: usize = 1 << 16;

/// What `NBD_OPT_LIST` tells about one export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub description: String,
}

/// The set of exports; opening is cheap (an Arc clone of something already active).
pub trait ExportSource: Send + Sync + 'static {
    /// The exports `peer` may use (a client in clear is [`PeerIdentity::Anonymous`]).
    fn list(&self, peer: &PeerIdentity) -> Vec<ExportInfo>;
    /// The export used for the empty export name "", among those `peer` may use.
    fn default_export(&self, peer: &PeerIdentity) -> Option<String>;
    /// `NotFound` for unknown names, and in the same words for an export `peer` may not use.
    /// The backend's `read_only` says how `peer` may use it.
    fn open(&self, name: &str, peer: &PeerIdentity) -> Result<Arc<dyn ExportBackend>>;
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

    use super::*;
    use crate::nbd::memory::MemoryExport;
    use crate::util::usize_from_u64;

    #[test]
    fn preferred_block_size_is_a_power_of_two_within_limits() {
        assert_eq!(preferred_block_size(4096, 32 << 20), 4096);
        assert_eq!(preferred_block_size(192 << 10, 32 << 20), 128 << 10);
        assert_eq!(preferred_block_size(1, 32 << 20), 512);
        assert_eq!(preferred_block_size(u32::MAX, 32 << 20), 32 << 20);
        assert_eq!(preferred_block_size(64 << 20, 48 << 20), 32 << 20);
    }

    #[test]
    fn extents_are_placed_one_after_another() {
        let e = Extent::new;
        let extents = [e(4096, true), e(0, false), e(8192, false), e(100, true)];
        assert_eq!(
            extents_at(1000, &extents).collect::<Vec<_>>(),
            vec![
                (1000, e(4096, true)),
                (5096, e(8192, false)),
                (13288, e(100, true))
            ]
        );
        assert_eq!(extents_at(0, &[]).count(), 0);
    }

    /// The byte the `i`th of a few test writes fills its range with (never 0, the unwritten
    /// value).
    pub(crate) fn fill_byte(i: u64) -> u8 {
        u8::try_from(i + 1).expect("fewer than 255 test writes")
    }

    /// The quick-path limit [`Overlapping`] reports, like the engine's.
    pub(crate) const NOWAIT_WRITE_MAX: u32 = 128 << 10;

    /// A memory export whose full writes take a while, which records how many ran at once,
    /// and whose quick path takes every write up to [`NOWAIT_WRITE_MAX`] it is offered.
    #[derive(Default)]
    pub(crate) struct Overlapping {
        pub(crate) inner: Option<MemoryExport>,
        pub(crate) quick: AtomicUsize,
        pub(crate) running: AtomicUsize,
        pub(crate) most: AtomicUsize,
        /// Behave as a store across the network: no quick path, no turns.
        pub(crate) remote: bool,
    }

    impl ExportBackend for Overlapping {
        fn size(&self) -> u64 {
            self.inner.as_ref().unwrap().size()
        }
        fn read_only(&self) -> bool {
            false
        }
        fn preferred_block_size(&self) -> u32 {
            4096
        }
        fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
            self.inner.as_ref().unwrap().read(offset, buf)
        }
        fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
            let now = self.running.fetch_add(1, SeqCst) + 1;
            self.most.fetch_max(now, SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(5));
            let r = self.inner.as_ref().unwrap().write(offset, data, fua);
            self.running.fetch_sub(1, SeqCst);
            r
        }
        fn try_write_nowait(&self, offset: u64, data: &[u8]) -> Option<()> {
            self.quick.fetch_add(1, SeqCst);
            self.inner.as_ref().unwrap().write(offset, data, false).ok()
        }
        fn nowait_write_max(&self) -> usize {
            if self.remote {
                0
            } else {
                NOWAIT_WRITE_MAX as usize
            }
        }
        fn write_turns(&self) -> bool {
            !self.remote
        }
        fn flush(&self) -> Result<()> {
            Ok(())
        }
        fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
            self.inner.as_ref().unwrap().trim(offset, len, fua)
        }
        fn write_zeroes(&self, o: u64, l: u64, u: bool, f: bool, fua: bool) -> Result<()> {
            self.inner.as_ref().unwrap().write_zeroes(o, l, u, f, fua)
        }
        fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
            self.inner.as_ref().unwrap().block_status(offset, len)
        }
        fn cache(&self, _offset: u64, _len: u64) -> Result<()> {
            Ok(())
        }
    }

    /// Writes from this many threads at once in the tests below.
    const THREADS: u64 = 6;
    /// A write longer than the quick path takes.
    const LARGE: u64 = 2 * NOWAIT_WRITE_MAX as u64;

    /// An export with room for `THREADS` large writes side by side.
    fn overlapping(remote: bool) -> Overlapping {
        Overlapping {
            inner: Some(MemoryExport::new(THREADS * LARGE)),
            remote,
            ..Default::default()
        }
    }

    /// `THREADS` writes of `len` bytes, the i-th of `fill_byte(i)` at `i * LARGE`, each from a
    /// thread of its own through `turns`; returns the most that ran at once.
    fn write_from_threads(b: &Overlapping, turns: &WriteTurns, len: u64, fua: bool) -> usize {
        b.most.store(0, SeqCst);
        std::thread::scope(|s| {
            for i in 0..THREADS {
                s.spawn(move || {
                    let data = vec![fill_byte(i); usize_from_u64(len)];
                    turns.write(b, i * LARGE, &data, fua).unwrap();
                });
            }
        });
        b.most.load(SeqCst)
    }

    /// The plugin's way (threads of its own): small plain writes take the quick path, FUA
    /// and large writes the full one, and large writes of one connection never overlap.
    #[test]
    fn blocking_callers_take_turns_for_large_writes_only() {
        let b = overlapping(false);
        let turns = WriteTurns::new(&b);
        let most = write_from_threads(&b, &turns, LARGE, false);
        assert_eq!(
            b.quick.load(SeqCst),
            0,
            "large writes never go the quick way"
        );
        assert_eq!(most, 1, "large writes at once");
        let mut all = vec![0u8; usize_from_u64(THREADS * LARGE)];
        b.read(0, &mut all).unwrap();
        for (i, chunk) in (0..).zip(all.chunks(usize_from_u64(LARGE))) {
            assert!(chunk.iter().all(|&v| v == fill_byte(i)), "write {i}");
        }

        turns.write(&b, 0, &[9; 4096], false).unwrap();
        assert_eq!(
            b.quick.load(SeqCst),
            1,
            "a small plain write goes the quick way"
        );
        turns.write(&b, 0, &[9; 4096], true).unwrap();
        assert_eq!(b.quick.load(SeqCst), 1, "a FUA write never does");
        // Small full-path writes are not held to turns.
        assert!(
            write_from_threads(&b, &turns, 4096, true) > 1,
            "small writes ran one at a time"
        );
    }

    /// A remote store's writes, large or small, never go the quick way and run many at once.
    #[test]
    fn remote_stores_take_no_quick_path_and_no_turns() {
        let b = overlapping(true);
        let turns = WriteTurns::new(&b);
        for len in [4096, LARGE] {
            assert!(
                write_from_threads(&b, &turns, len, false) > 1,
                "{len}-byte writes ran one at a time"
            );
        }
        assert_eq!(b.quick.load(SeqCst), 0, "a remote write went the quick way");
    }
}
