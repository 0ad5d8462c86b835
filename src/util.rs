//! Small OS helpers shared by the layers: device sizing, hole punching, size parsing,
//! clearing the way for a unix socket without taking one that is in use, and the crate's one
//! u64 -> usize conversion.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use crate::error::{Error, ErrorKind, Result};

// thinnbd builds only for 64-bit targets: block numbers, counts and byte lengths are u64 on disk
// and on the wire, and in-memory indexes over them must hold every such value.
const _: () = assert!(usize::BITS == 64, "thinnbd needs a 64-bit target");

/// A u64 block number, count or byte length as an in-memory index or length. The one place
/// that relies on the 64-bit assertion above: the conversion is lossless.
#[expect(
    clippy::cast_possible_truncation,
    reason = "usize is 64 bits wide (asserted at compile time above)"
)]
pub const fn usize_from_u64(n: u64) -> usize {
    n as usize
}

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

/// Allocates the first `len` bytes of a regular file on the host, growing it if needed, so
/// writes there can never fail for lack of host space. `posix_fallocate` writes zeros itself
/// on a file system without `fallocate`.
pub fn allocate(file: &File, len: u64) -> io::Result<()> {
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    if len == 0 {
        return Ok(());
    }
    // SAFETY: posix_fallocate only reads its integer arguments; the fd is valid for the borrow
    // of `file`.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
    match rc {
        0 => Ok(()),
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}

/// Bytes the host has allocated to `file` (`st_blocks`; 512-byte units on Linux).
pub fn allocated_bytes(file: &File) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(file.metadata()?.blocks().saturating_mul(512))
}

/// Bytes an unprivileged writer can still add to the file system holding `file`.
pub fn host_free_bytes(file: &File) -> io::Result<u64> {
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `st` is valid for writes of one `statvfs`; the fd is valid for the borrow of
    // `file`. The struct is read only after the call reported success.
    let rc = unsafe { libc::fstatvfs(file.as_raw_fd(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstatvfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    // The field types differ between targets (u32 on some 32-bit ones).
    #[allow(clippy::useless_conversion)]
    let (avail, fragment): (u64, u64) = (st.f_bavail.into(), st.f_frsize.into());
    Ok(avail.saturating_mul(fragment))
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

/// The one rule for sizes everywhere (CLI, config, plugin settings): a whole number, then
/// optionally a binary unit K, M, G, T or P (powers of 1024), then optionally `i` and/or `B`;
/// case does not matter. `1g` = `1G` = `1GiB` = `1GB` = 2^30; `512`, `512b` and `512B` are bytes.
/// Decimal (SI) units are deliberately not offered: storage users read `G` as GiB, as LVM does.
pub fn parse_size(text: &str) -> Option<u64> {
    let lower = text.trim().to_ascii_lowercase();
    let t = lower.strip_suffix('b').unwrap_or(&lower);
    let (digits, shift) = match t.char_indices().last()? {
        (_, c) if c.is_ascii_digit() => (t, 0),
        (at, c) => {
            let digits = &t[..at];
            // `i` only between a unit and `B` (`1Gi` is unusual but unambiguous; `1i` is not).
            let (digits, unit) = match c {
                'i' => {
                    let (at, unit) = digits.char_indices().last()?;
                    (&digits[..at], unit)
                }
                _ => (digits, c),
            };
            let shift = match unit {
                'k' => 10,
                'm' => 20,
                'g' => 30,
                't' => 40,
                'p' => 50,
                _ => return None,
            };
            (digits, shift)
        }
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    n.checked_mul(1u64 << shift)
}

/// A size for people, in the units `parse_size` reads: `1.50G`, `512M`, `0B`. Whole values are
/// printed without decimals so they can be pasted back as arguments.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["K", "M", "G", "T", "P"];
    // The largest unit the value reaches: one per 10 bits.
    let exp = (bytes.checked_ilog2().unwrap_or(0) / 10).min(5) as usize;
    if exp == 0 {
        return format!("{bytes}B");
    }
    let i = exp - 1;
    let scale = 1u64 << (10 * exp);
    if bytes.is_multiple_of(scale) {
        return format!("{}{}", bytes / scale, UNITS[i]);
    }
    #[allow(clippy::cast_precision_loss)] // two decimals for display only
    let value = bytes as f64 / scale as f64;
    format!("{value:.2}{}", UNITS[i])
}

/// Every address a listen argument (`HOST:PORT`, `[V6]:PORT`, `NAME:PORT`) stands for: host
/// names are resolved, and a name with several addresses (`localhost`) gives all of them.
pub fn resolve_listen_addr(text: &str) -> std::result::Result<Vec<std::net::SocketAddr>, String> {
    use std::net::ToSocketAddrs;
    let addrs: Vec<_> = text
        .to_socket_addrs()
        .map_err(|e| format!("{text:?} is not HOST:PORT ({e})"))?
        .collect();
    if addrs.is_empty() {
        return Err(format!("{text:?} resolves to no address"));
    }
    Ok(addrs)
}

/// Makes `path` free for a unix socket to be bound: removes a stale socket (one nobody answers
/// on, left by a process that died) and nothing else. A live socket belongs to another server,
/// and a file that is not a socket is someone's data: both are errors naming the path.
pub fn remove_stale_socket(path: &Path) -> Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(format!("examining {}", path.display()), e)),
    };
    if !meta.file_type().is_socket() {
        return Err(Error::new(
            ErrorKind::Busy,
            format!(
                "{} exists and is not a socket: not replacing it (remove it or choose another path)",
                path.display()
            ),
        ));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(Error::new(
            ErrorKind::Busy,
            format!(
                "{} is the socket of a running server (it answers): stop that server or choose another path",
                path.display()
            ),
        )),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => std::fs::remove_file(path)
            .or_else(|e| match e.kind() {
                io::ErrorKind::NotFound => Ok(()),
                _ => Err(e),
            })
            .map_err(|e| Error::io(format!("removing the stale socket {}", path.display()), e)),
        Err(e) => Err(Error::io(
            format!("{} is a socket that cannot be probed; not replacing it", path.display()),
            e,
        )),
    }
}

/// Opens `path` for reading and writing (creating it when `create`), never truncating it.
pub fn open_read_write(path: &Path, create: bool) -> Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .open(path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::{format_size, hole_ranges, parse_size, resolve_listen_addr};

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

    #[test]
    fn sizes_ignore_case_and_read_units_as_binary() {
        for text in ["1g", "1G", "1GiB", "1GB", "1gb", "1gib", "1Gi", " 1G "] {
            assert_eq!(parse_size(text), Some(1 << 30), "{text}");
        }
        assert_eq!(parse_size("10GB"), Some(10 << 30));
        assert_eq!(parse_size("2p"), Some(2 << 50));
        assert_eq!(parse_size("512b"), Some(512));
        for bad in ["", "G", "1x", "1iB", "-1G", "1.5G", "1 G", "1bb", "+1G"] {
            assert_eq!(parse_size(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn formatted_sizes_parse_back() {
        assert_eq!(format_size(0), "0B");
        assert_eq!(format_size(1023), "1023B");
        assert_eq!(format_size(512 << 20), "512M");
        assert_eq!(format_size(3 << 29), "1.50G");
        assert_eq!(format_size(1 << 40), "1T");
        for n in [4096u64, 64 << 10, 10 << 30] {
            assert_eq!(parse_size(&format_size(n)), Some(n));
        }
    }

    #[test]
    fn listen_addresses_resolve_host_names() {
        let addrs = resolve_listen_addr("localhost:10809").unwrap();
        assert!(addrs
            .iter()
            .all(|a| a.ip().is_loopback() && a.port() == 10809));
        assert!(!addrs.is_empty());
        assert_eq!(
            resolve_listen_addr("127.0.0.1:1").unwrap(),
            vec!["127.0.0.1:1".parse().unwrap()]
        );
        assert!(resolve_listen_addr("nowhere").is_err());
    }
}
