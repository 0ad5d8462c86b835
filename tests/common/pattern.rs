//! Test data: deterministic bytes that name where they belong. Each byte is a hash of the seed
//! and its absolute offset, so a misplaced, stale or zeroed range never matches, and a slice of
//! a pattern is the pattern of that slice. Bytes are odd, never zero: a pattern is never a hole.

/// The bytes a write of `len` at `offset` with `seed` carries.
pub fn pattern_at(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    (offset..offset + len as u64)
        .map(|at| (mix(seed, at / 8) >> ((at % 8) * 8)) as u8 | 1)
        .collect()
}

/// [`pattern_at`] offset 0: `len` bytes, different per seed.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    pattern_at(seed, 0, len)
}

/// [`pattern`] with a zero MiB every 3 MiB, so clients that skip zeros (and leave holes) are
/// exercised too: an image to copy in and out.
pub fn pattern_with_zero_runs(seed: u64, len: usize) -> Vec<u8> {
    let mut data = pattern(seed, len);
    for start in (0..len).step_by(3 << 20) {
        data[start..(start + (1 << 20)).min(len)].fill(0);
    }
    data
}

/// splitmix64 of the seed and an 8-byte word's index.
fn mix(seed: u64, word: u64) -> u64 {
    let mut z = seed
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(word)
        .wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
