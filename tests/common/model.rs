//! What a volume may hold after a crash, 4 KiB piece by piece. Each write of a piece gets a new
//! version whose bytes name the piece and the version, so a read shows which write survived.
//! After a completed flush (or FUA write) a piece must hold exactly its last acknowledged
//! version; writes after that (acknowledged or in flight at the crash) may each survive or not.

use super::nbd_client::Client;

pub const PIECE: usize = 4096;

/// The bytes of `version` of `piece` (version 0 is zeros: never written, or trimmed).
pub fn piece_bytes(salt: u64, piece: u64, version: u32) -> Vec<u8> {
    let mut out = vec![0u8; PIECE];
    if version == 0 {
        return out;
    }
    out[0..8].copy_from_slice(&piece.to_le_bytes());
    out[8..12].copy_from_slice(&version.to_le_bytes());
    out[12..20].copy_from_slice(&salt.to_le_bytes());
    let mut x =
        (piece.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(version) ^ salt.rotate_left(17)) | 1;
    for b in out[20..].iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    out
}

/// Which version a piece read back holds, or None when it is no version of this piece.
pub fn identify(salt: u64, piece: u64, got: &[u8]) -> Option<u32> {
    if got.iter().all(|&b| b == 0) {
        return Some(0);
    }
    let p = u64::from_le_bytes(got.get(0..8)?.try_into().ok()?);
    let v = u32::from_le_bytes(got.get(8..12)?.try_into().ok()?);
    if p != piece || v == 0 || piece_bytes(salt, piece, v) != got {
        return None;
    }
    Some(v)
}

#[derive(Clone, Default)]
struct Piece {
    /// Version that must be there after a crash unless a later one is.
    durable: u32,
    /// Versions written since `durable` was settled, in order (acknowledged or not).
    since: Vec<u32>,
    /// Last acknowledged version.
    acked: u32,
}

#[derive(Clone)]
pub struct Model {
    pub salt: u64,
    pieces: Vec<Piece>,
    next_version: u32,
    /// Pieces changed since the last flush (so a flush settles only those).
    dirty: Vec<u64>,
}

impl Model {
    pub fn new(salt: u64, nr_pieces: u64) -> Model {
        Model {
            salt,
            pieces: vec![Piece::default(); nr_pieces as usize],
            next_version: 1,
            dirty: Vec::new(),
        }
    }

    pub fn nr_pieces(&self) -> u64 {
        self.pieces.len() as u64
    }

    /// Starts a write of `count` pieces from `first` (0 = trim/zero); returns the versions
    /// and the bytes to send. Call before sending.
    pub fn begin_write(&mut self, first: u64, count: u64, zero: bool) -> (Vec<u32>, Vec<u8>) {
        let mut versions = Vec::new();
        let mut bytes = Vec::new();
        for p in first..first + count {
            let v = if zero { 0 } else { self.fresh_version() };
            let piece = &mut self.pieces[p as usize];
            piece.since.push(v);
            self.dirty.push(p);
            versions.push(v);
            bytes.extend_from_slice(&piece_bytes(self.salt, p, v));
        }
        (versions, bytes)
    }

    fn fresh_version(&mut self) -> u32 {
        let v = self.next_version;
        self.next_version += 1;
        v
    }

    /// The write (or trim) was acknowledged; with FUA it is durable too.
    pub fn acked(&mut self, first: u64, versions: &[u32], fua: bool) {
        for (i, &v) in versions.iter().enumerate() {
            let piece = &mut self.pieces[(first + i as u64) as usize];
            piece.acked = v;
            if fua {
                piece.durable = v;
                piece.since.clear();
            }
        }
    }

    /// A flush completed with no request in flight: everything acknowledged is durable.
    pub fn flushed(&mut self) {
        for p in std::mem::take(&mut self.dirty) {
            let piece = &mut self.pieces[p as usize];
            piece.durable = piece.acked;
            piece.since.clear();
        }
    }

    /// Forgets every write of unknown fate: after a crash and a check the state read back is
    /// what is durable now.
    pub fn settle(&mut self, piece: u64, version: u32) {
        let p = &mut self.pieces[piece as usize];
        p.durable = version;
        p.acked = version;
        p.since.clear();
    }

    pub fn acked_version(&self, piece: u64) -> u32 {
        self.pieces[piece as usize].acked
    }

    /// Checks the bytes of pieces `first..` read back after a crash; returns the versions found
    /// or a description of the first violation.
    pub fn check_after_crash(&self, first: u64, got: &[u8]) -> Result<Vec<u32>, String> {
        let mut found = Vec::new();
        for (i, chunk) in got.chunks(PIECE).enumerate() {
            let p = first + i as u64;
            let piece = &self.pieces[p as usize];
            let Some(v) = identify(self.salt, p, chunk) else {
                return Err(format!(
                    "piece {p} holds bytes of no write to it (durable version {}, later {:?})",
                    piece.durable, piece.since
                ));
            };
            if v != piece.durable && !piece.since.contains(&v) {
                return Err(format!(
                    "piece {p} holds version {v}; allowed: {} (flushed) or one of {:?} (later)",
                    piece.durable, piece.since
                ));
            }
            found.push(v);
        }
        Ok(found)
    }

    /// Reads the model's whole region back through `client` from byte `base`, 1 MiB at a
    /// time, checks it as after a crash ([`check_after_crash`](Self::check_after_crash)) and
    /// settles every piece on what it found. `Err`: a read error or the first violation.
    pub fn verify_region_after_crash(
        &mut self,
        client: &mut Client,
        base: u64,
    ) -> Result<(), String> {
        let region = self.nr_pieces() * PIECE as u64;
        let mut buf = vec![0u8; 1 << 20];
        let mut off = 0;
        while off < region {
            let len = (region - off).min(buf.len() as u64) as usize;
            let chunk = &mut buf[..len];
            match client.read(base + off, chunk) {
                Ok(0) => {}
                Ok(errno) => {
                    return Err(format!("read at {} failed: NBD error {errno}", base + off))
                }
                Err(e) => return Err(format!("read at {} failed: {e}", base + off)),
            }
            let first = off / PIECE as u64;
            for (i, v) in self
                .check_after_crash(first, chunk)?
                .into_iter()
                .enumerate()
            {
                self.settle(first + i as u64, v);
            }
            off += len as u64;
        }
        Ok(())
    }

    /// Checks bytes read back with no crash in between: exactly the acknowledged versions.
    pub fn check_exact(&self, first: u64, got: &[u8]) -> Result<(), String> {
        for (i, chunk) in got.chunks(PIECE).enumerate() {
            let p = first + i as u64;
            let want = self.pieces[p as usize].acked;
            match identify(self.salt, p, chunk) {
                Some(v) if v == want => {}
                other => return Err(format!("piece {p}: want version {want}, found {other:?}")),
            }
        }
        Ok(())
    }
}
