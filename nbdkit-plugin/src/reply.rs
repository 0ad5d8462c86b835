//! What the callbacks hand back to nbdkit, computed without calling into it so that all of
//! it is unit-tested: the errno of an error, error text as C text, the extents of a
//! `block_status` answer (whose rules are the export seam's, shared with `thinnbd serve`).

use thinnbd::error::ErrorKind;
use thinnbd::nbd::{extents_at, Extent};

/// The Linux errno nbdkit sends for an error kind (one mapping, shared with the NBD server).
pub fn errno_of(kind: ErrorKind) -> i32 {
    i32::try_from(thinnbd::nbd::errno_of_kind(kind)).unwrap_or(libc::EIO)
}

/// Text for C: nbdkit takes NUL-terminated strings, so an inner NUL would cut (or, in the
/// nbdkit crate's error path, panic); it becomes a visible escape instead.
pub fn c_text(s: &str) -> std::ffi::CString {
    std::ffi::CString::new(s.replace('\0', "\\0")).unwrap_or_default()
}

/// The extents nbdkit gets for a `block_status` answer from `offset`, each with where it
/// starts; only the first with `req_one`.
pub fn extents(
    offset: u64,
    extents: &[Extent],
    req_one: bool,
) -> impl Iterator<Item = (u64, Extent)> + '_ {
    extents_at(offset, extents).take(if req_one { 1 } else { usize::MAX })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_follows_the_nbd_mapping() {
        assert_eq!(errno_of(ErrorKind::NoSpace), libc::ENOSPC);
        assert_eq!(errno_of(ErrorKind::OutOfBounds), libc::EINVAL);
        assert_eq!(errno_of(ErrorKind::NotFound), libc::EINVAL);
        assert_eq!(errno_of(ErrorKind::ReadOnly), libc::EPERM);
        assert_eq!(errno_of(ErrorKind::Corrupt), libc::EIO);
        assert_eq!(errno_of(ErrorKind::Unsupported), libc::ENOTSUP);
        assert_eq!(errno_of(ErrorKind::Busy), libc::ESHUTDOWN);
    }

    #[test]
    fn extents_follow_the_runs() {
        let runs = [(4096, true), (0, false), (8192, false), (100, true)]
            .map(|(length, mapped)| Extent::new(length, mapped));
        let all: Vec<_> = extents(1000, &runs, false).collect();
        assert_eq!(
            all.iter()
                .map(|&(at, e)| (at, e.length, e.hole))
                .collect::<Vec<_>>(),
            vec![(1000, 4096, false), (5096, 8192, true), (13288, 100, false)]
        );
        assert_eq!(extents(1000, &runs, true).collect::<Vec<_>>(), all[..1]);
        assert_eq!(extents(0, &[], false).count(), 0);
    }

    #[test]
    fn c_text_never_fails() {
        assert_eq!(c_text("a\0b").to_str().unwrap(), "a\\0b");
        assert_eq!(c_text("plain").to_str().unwrap(), "plain");
    }
}
