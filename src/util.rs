//! Small OS helpers shared by the layers: device sizing, hole punching, size parsing.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;

/// Size in bytes of a regular file or a block device.
pub fn device_size(file: &File) -> io::Result<u64> {
    let meta = file.metadata()?;
    if meta.file_type().is_file() {
        return Ok(meta.len());
    }
    use std::io::{Seek, SeekFrom};
    // Block devices report 0 in metadata; seeking to the end gives the size without ioctl.
    let mut f = file.try_clone()?;
    f.seek(SeekFrom::End(0))
}

/// Deallocates a byte range, leaving it reading as zeros. Returns false when the file system
/// does not support hole punching (the caller then writes zeros if it needs them).
pub fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<bool> {
    let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: fallocate only reads its integer arguments; the fd is valid for the borrow of `file`.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        )
    };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => Ok(false),
        _ => Err(err),
    }
}

/// Byte ranges of `file` below `len` that are holes (read as zeros without being stored), found
/// with `SEEK_DATA`/`SEEK_HOLE`. Empty when the file system or device cannot tell.
pub fn hole_ranges(file: &File, len: u64) -> Vec<(u64, u64)> {
    let fd = file.as_raw_fd();
    let seek = |off: u64, whence: libc::c_int| -> Option<u64> {
        let off = libc::off_t::try_from(off).ok()?;
        // SAFETY: lseek only reads its integer arguments; the fd is valid for the borrow of
        // `file`. It moves the file offset, which nothing here relies on (all I/O is positioned).
        let r = unsafe { libc::lseek(fd, off, whence) };
        u64::try_from(r).ok()
    };
    let mut holes = Vec::new();
    let mut pos = 0;
    while pos < len {
        // No data at or after `pos` (ENXIO) means the rest is a hole.
        let data = match seek(pos, libc::SEEK_DATA) {
            Some(d) => d.min(len),
            None if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) => len,
            None => return Vec::new(),
        };
        if data > pos {
            holes.push((pos, data));
        }
        if data >= len {
            break;
        }
        match seek(data, libc::SEEK_HOLE) {
            Some(h) if h > data => pos = h,
            _ => break,
        }
    }
    holes
}

/// Parses a size such as `4096`, `64K`, `10G`, `1T` (binary units, optional trailing `B`/`iB`).
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (digits, shift) = match t.chars().last()? {
        'k' | 'K' => (&t[..t.len() - 1], 10),
        'm' | 'M' => (&t[..t.len() - 1], 20),
        'g' | 'G' => (&t[..t.len() - 1], 30),
        't' | 'T' => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let n: u64 = digits.trim().parse().ok()?;
    n.checked_mul(1u64 << shift)
}

#[cfg(test)]
mod tests {
    use super::{hole_ranges, parse_size};

    #[test]
    fn holes_of_a_sparse_file() {
        use std::os::unix::fs::FileExt;
        let f = tempfile::tempfile().unwrap();
        f.set_len(8 << 20).unwrap();
        f.write_all_at(&[1u8; 4096], 4 << 20).unwrap();
        let holes = hole_ranges(&f, 8 << 20);
        // File systems may round data to their own block size; the written range is never a hole.
        assert!(!holes.is_empty());
        for (b, e) in &holes {
            assert!(
                *e <= 4 << 20 || *b >= (4 << 20) + 4096,
                "{b}..{e} covers written data"
            );
        }
        assert_eq!(holes[0].0, 0);
    }

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("64K"), Some(65536));
        assert_eq!(parse_size("10G"), Some(10 << 30));
        assert_eq!(parse_size("1TiB"), Some(1 << 40));
        assert_eq!(parse_size("2MB"), Some(2 << 20));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size("99999999999T"), None);
    }
}
