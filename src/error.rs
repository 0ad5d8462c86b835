//! The library's one error type: a small set of kinds, each with context and an optional source.
//!
//! Storage layers never speak wire protocols; the mapping of a kind to an NBD errno lives in
//! exactly one place, at the protocol edge (`nbd::errno_of`).

use std::fmt;
use std::io;

/// What went wrong, in the terms a caller can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The underlying file or device failed.
    Io,
    /// The pool has no free data (or metadata) block left.
    NoSpace,
    /// On-disk metadata failed validation (checksum, magic, block number, layout).
    Corrupt,
    /// The pool (or the volume) refuses writes: by configuration or after a metadata failure.
    ReadOnly,
    /// A request reaches past the end of a volume, or a value is outside its allowed range.
    OutOfBounds,
    /// The request is valid but not supported by this implementation.
    Unsupported,
    /// The object is in use (an open volume, a locked pool).
    Busy,
    /// The named object (volume, thin device) does not exist.
    NotFound,
    /// A malformed argument, config value or command.
    InvalidInput,
    /// This client was cut off from shared storage (a Ceph blocklist) because another host
    /// took the pool over: nothing it writes lands any more.
    Fenced,
}

impl ErrorKind {
    const NAMES: [(ErrorKind, &'static str); 10] = [
        (ErrorKind::Io, "io"),
        (ErrorKind::NoSpace, "no_space"),
        (ErrorKind::Corrupt, "corrupt"),
        (ErrorKind::ReadOnly, "read_only"),
        (ErrorKind::OutOfBounds, "out_of_bounds"),
        (ErrorKind::Unsupported, "unsupported"),
        (ErrorKind::Busy, "busy"),
        (ErrorKind::NotFound, "not_found"),
        (ErrorKind::InvalidInput, "invalid_input"),
        (ErrorKind::Fenced, "fenced"),
    ];

    /// A stable name, used where errors cross a process boundary (the control socket).
    pub fn name(self) -> &'static str {
        Self::NAMES
            .iter()
            .find(|(k, _)| *k == self)
            .map(|(_, n)| *n)
            .unwrap_or("io")
    }

    pub fn from_name(name: &str) -> ErrorKind {
        Self::NAMES
            .iter()
            .find(|(_, n)| *n == name)
            .map(|(k, _)| *k)
            .unwrap_or(ErrorKind::Io)
    }
}

/// An error with its kind, a human-readable context and, where there is one, the cause.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    context: String,
    source: Option<io::Error>,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn new(kind: ErrorKind, context: impl Into<String>) -> Self {
        Error {
            kind,
            context: context.into(),
            source: None,
        }
    }

    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error {
            kind: ErrorKind::Io,
            context: context.into(),
            source: Some(source),
        }
    }

    /// An error of `kind` caused by an OS error (an errno a library returned, say).
    pub fn with_source(kind: ErrorKind, context: impl Into<String>, source: io::Error) -> Self {
        Error {
            kind,
            context: context.into(),
            source: Some(source),
        }
    }

    /// An I/O error where a full host file system refuses one request and leaves the pool as
    /// it was: writes to the data device, allocating a pool's files, replacing the registry.
    /// `ENOSPC` and `EDQUOT` (an exhausted quota) are `NoSpace`, so a client sees ENOSPC rather
    /// than EIO. Metadata I/O keeps [`Error::io`]: there any failed write turns the pool
    /// read-only, whatever its cause.
    pub fn data_io(context: impl Into<String>, source: io::Error) -> Self {
        let kind = match source.raw_os_error() {
            Some(libc::ENOSPC | libc::EDQUOT) => ErrorKind::NoSpace,
            _ => ErrorKind::Io,
        };
        Error {
            kind,
            context: context.into(),
            source: Some(source),
        }
    }

    /// True for `NoSpace` reported by the host (a full file system or quota) rather than by
    /// the pool's own allocator: freeing pool blocks does not help it, so it is not queued.
    pub fn is_host_no_space(&self) -> bool {
        self.kind == ErrorKind::NoSpace && self.raw_os_error().is_some()
    }

    pub fn corrupt(context: impl Into<String>) -> Self {
        Error::new(ErrorKind::Corrupt, context)
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn context(&self) -> &str {
        &self.context
    }

    /// Adds an outer layer of context ("while doing X: inner context").
    pub fn within(mut self, outer: impl fmt::Display) -> Self {
        self.context = format!("{outer}: {}", self.context);
        self
    }

    /// The OS errno of the source, when the cause was an OS error.
    pub fn raw_os_error(&self) -> Option<i32> {
        self.source.as_ref().and_then(|e| e.raw_os_error())
    }

    /// A copy that keeps kind and message (io::Error is not Clone); used where one failure
    /// must be reported to several waiters, such as a coalesced flush.
    pub fn duplicate(&self) -> Self {
        let source = self
            .source
            .as_ref()
            .map(|e| io::Error::new(e.kind(), e.to_string()));
        Error {
            kind: self.kind,
            context: self.context.clone(),
            source,
        }
    }
}

impl Error {
    /// The message without the kind's prefix: context, then the cause. This is what crosses the
    /// control socket, where the kind travels separately (sending `to_string()` would make the
    /// receiver print the kind twice).
    pub fn message(&self) -> String {
        match &self.source {
            Some(src) => format!("{}: {src}", self.context),
            None => self.context.clone(),
        }
    }

    fn kind_text(&self) -> &'static str {
        match self.kind {
            ErrorKind::Io => "I/O error",
            ErrorKind::NoSpace => "no space",
            ErrorKind::Corrupt => "corrupt metadata",
            ErrorKind::ReadOnly => "read-only",
            ErrorKind::OutOfBounds => "out of bounds",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Busy => "busy",
            ErrorKind::NotFound => "not found",
            ErrorKind::InvalidInput => "invalid input",
            ErrorKind::Fenced => "fenced",
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind_text(), self.message())
    }
}

/// `source()` stays `None` on purpose: `Display` already prints the cause, and chain printers
/// (`anyhow`'s `{:#}`, `tracing`'s error chains) would print it a second time. The OS error
/// stays reachable through `raw_os_error`.
impl std::error::Error for Error {}

/// Shorthand for `Err(Error::new(kind, context))`.
pub fn fail<T>(kind: ErrorKind, context: impl Into<String>) -> Result<T> {
    Err(Error::new(kind, context))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_crosses_the_control_socket_by_name() {
        for (kind, _) in ErrorKind::NAMES {
            assert_eq!(ErrorKind::from_name(kind.name()), kind);
        }
        assert_eq!(ErrorKind::from_name("fenced"), ErrorKind::Fenced);
    }

    #[test]
    fn a_full_host_file_system_is_no_space_on_the_data_device() {
        for errno in [libc::ENOSPC, libc::EDQUOT] {
            let e = Error::data_io("writing", io::Error::from_raw_os_error(errno));
            assert_eq!(e.kind(), ErrorKind::NoSpace, "{e}");
            assert!(e.is_host_no_space());
        }
        let e = Error::data_io("writing", io::Error::from_raw_os_error(libc::EIO));
        assert_eq!(e.kind(), ErrorKind::Io);
        assert!(!e.is_host_no_space());
        assert!(!Error::new(ErrorKind::NoSpace, "pool full").is_host_no_space());
        // Metadata I/O stays `Io`, which makes the pool fail-stop.
        let e = Error::io(
            "writing metadata",
            io::Error::from_raw_os_error(libc::ENOSPC),
        );
        assert_eq!(e.kind(), ErrorKind::Io);
    }
}
