//! The one place that calls librados: a connection to the cluster with an I/O context on the
//! RADOS pool, whole-object and positioned object I/O, asynchronous writes, object locks, the
//! blocklist, and the mapping of librados' negative errnos to error kinds.
//!
//! `ceph::rados` declares most of librados' C API; what it lacks (`rados_getaddrs`,
//! `rados_blocklist_add`) is declared in the small extern block below.

use std::ffi::{CStr, CString};
use std::io;
use std::os::raw::{c_char, c_int};
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ceph::rados::{self as ffi, rados_completion_t, rados_ioctx_t, rados_t};

use super::RadosLocation;
use crate::error::{Error, ErrorKind, Result};

#[link(name = "rados", kind = "dylib")]
extern "C" {
    /// `*addrs` is a `strdup`ed string the caller frees.
    fn rados_getaddrs(cluster: rados_t, addrs: *mut *mut c_char) -> c_int;
    fn rados_blocklist_add(cluster: rados_t, client_address: *mut c_char, expire: u32) -> c_int;
}

/// `LIBRADOS_LOCK_FLAG_MUST_RENEW` (librados.h): extend a lock we hold, and fail when we no
/// longer hold it (expired, broken or taken), where plain `RENEW` would quietly take it again.
pub const LOCK_FLAG_MUST_RENEW: u8 = 2;

/// `EBLOCKLISTED` in Ceph is `ESHUTDOWN`: this client is on the OSD map's blocklist.
const EBLOCKLISTED: i32 = libc::ESHUTDOWN;

/// The error of a librados call that returned `ret` (a negative errno), about `context`
/// (which names the object): full -> `NoSpace`, blocklisted -> `Fenced`, anything else `Io`.
pub fn rados_error(ret: i64, context: impl Into<String>) -> Error {
    let errno = i32::try_from(ret.unsigned_abs()).unwrap_or(libc::EIO);
    let (kind, context) = match errno {
        libc::ENOSPC | libc::EDQUOT => (ErrorKind::NoSpace, context.into()),
        // The errno's own text ("Cannot send after transport endpoint shutdown") says
        // nothing of the cause.
        EBLOCKLISTED => (
            ErrorKind::Fenced,
            format!(
                "{} (this client is blocklisted: another host owns the pool)",
                context.into()
            ),
        ),
        _ => (ErrorKind::Io, context.into()),
    };
    Error::with_source(kind, context, io::Error::from_raw_os_error(errno))
}

fn check(ret: c_int, context: impl FnOnce() -> String) -> Result<()> {
    if ret < 0 {
        return Err(rados_error(ret.into(), context()));
    }
    Ok(())
}

fn c_string(text: &str) -> Result<CString> {
    CString::new(text).map_err(|_| {
        Error::new(
            ErrorKind::InvalidInput,
            format!("{text:?}: a NUL byte in a Ceph name"),
        )
    })
}

/// One holder of an object lock, as `rados_list_lockers` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Locker {
    /// `client.4123`
    pub client: String,
    pub cookie: String,
    /// The holder's address (`127.0.0.1:0/3872641`), what the blocklist takes.
    pub address: String,
}

/// A connection to a Ceph cluster and an I/O context on one RADOS pool. Shared (`Arc`) by the
/// data store, the metadata device and the owner lock of a pool; librados handles are
/// thread-safe, so every method takes `&self` and calls may run on many threads at once.
pub struct Cluster {
    handle: rados_t,
    ioctx: rados_ioctx_t,
    pool: String,
    /// Set when this process lost the pool's ownership: from then on nothing it writes may
    /// land, even where the blocklist has not reached the OSDs yet.
    fenced: AtomicBool,
    fenced_reason: Mutex<String>,
}

// SAFETY: librados' rados_t and rados_ioctx_t may be used from any thread and from many at
// once (librados is thread-safe; the ioctx is only destroyed in Drop, with `&mut self`).
unsafe impl Send for Cluster {}
// SAFETY: as for Send: every librados call through `&self` is thread-safe.
unsafe impl Sync for Cluster {}

impl Cluster {
    /// Connects as librados' own tools do: the configuration file (`loc.ceph_conf`, else
    /// `$CEPH_CONF`, else /etc/ceph/ceph.conf), then `$CEPH_ARGS`, then the location's client
    /// id and keyring, which override both. Opens an I/O context on `loc.pool`.
    pub fn connect(loc: &RadosLocation) -> Result<Arc<Cluster>> {
        let what = || format!("connecting to Ceph for {loc}");
        let id = loc.client_id.as_deref().map(c_string).transpose()?;
        let mut handle: rados_t = ptr::null_mut();
        // SAFETY: `handle` is a valid out pointer; `id` is NUL-terminated or null (the
        // default client id), and librados copies it.
        let ret = unsafe {
            ffi::rados_create(&mut handle, id.as_ref().map_or(ptr::null(), |c| c.as_ptr()))
        };
        check(ret, what)?;
        // From here on `cluster`'s Drop shuts the handle down on any error.
        let mut cluster = Cluster {
            handle,
            ioctx: ptr::null_mut(),
            pool: loc.pool.clone(),
            fenced: AtomicBool::new(false),
            fenced_reason: Mutex::new(String::new()),
        };
        let conf = loc
            .ceph_conf
            .as_ref()
            .map(|p| c_string(&p.to_string_lossy()))
            .transpose()?;
        // SAFETY: `handle` is a created, unconnected cluster; a null path searches the
        // default places ($CEPH_CONF first); the path is NUL-terminated.
        let ret = unsafe {
            ffi::rados_conf_read_file(handle, conf.as_ref().map_or(ptr::null(), |c| c.as_ptr()))
        };
        // No file in the default places is fine when $CEPH_ARGS names the monitors, as for
        // Ceph's own tools; a file named in the configuration must be there.
        let no_default_file = ret == -libc::ENOENT && loc.ceph_conf.is_none();
        if !no_default_file {
            check(ret, || {
                format!(
                    "{}: reading the Ceph configuration {}",
                    what(),
                    loc.ceph_conf
                        .as_ref()
                        .map_or_else(|| "$CEPH_CONF".to_string(), |p| p.display().to_string())
                )
            })?;
        }
        // SAFETY: a null variable name means $CEPH_ARGS.
        let ret = unsafe { ffi::rados_conf_parse_env(handle, ptr::null()) };
        check(ret, || format!("{}: parsing $CEPH_ARGS", what()))?;
        if let Some(keyring) = &loc.keyring {
            cluster.set_option("keyring", &keyring.to_string_lossy())?;
        }
        // SAFETY: a configured, unconnected handle.
        let ret = unsafe { ffi::rados_connect(handle) };
        check(ret, || {
            if no_default_file {
                format!(
                    "{}: no Ceph configuration found ($CEPH_CONF, /etc/ceph/ceph.conf), \
                     and $CEPH_ARGS names no monitors",
                    what()
                )
            } else {
                what()
            }
        })?;
        let pool = c_string(&loc.pool)?;
        let mut ioctx: rados_ioctx_t = ptr::null_mut();
        // SAFETY: a connected handle, a NUL-terminated pool name and a valid out pointer.
        let ret = unsafe { ffi::rados_ioctx_create(handle, pool.as_ptr(), &mut ioctx) };
        check(ret, || {
            format!(
                "{}: opening RADOS pool {:?} (does it exist?)",
                what(),
                loc.pool
            )
        })?;
        cluster.ioctx = ioctx;
        Ok(Arc::new(cluster))
    }

    fn set_option(&self, option: &str, value: &str) -> Result<()> {
        let (o, v) = (c_string(option)?, c_string(value)?);
        // SAFETY: an unconnected handle and two NUL-terminated strings librados copies.
        let ret = unsafe { ffi::rados_conf_set(self.handle, o.as_ptr(), v.as_ptr()) };
        check(ret, || format!("setting Ceph option {option} = {value}"))
    }

    /// The RADOS pool this connection does its I/O in.
    pub fn pool(&self) -> &str {
        &self.pool
    }

    /// This connection's client name (`client.4123`), unique in the cluster, as lock holders
    /// are listed.
    pub fn client_name(&self) -> String {
        // SAFETY: a connected handle.
        let id = unsafe { ffi::rados_get_instance_id(self.handle) };
        format!("client.{id}")
    }

    /// This connection's address, the form the blocklist takes (`127.0.0.1:0/3872641`).
    pub fn address(&self) -> Result<String> {
        let mut addrs: *mut c_char = ptr::null_mut();
        // SAFETY: a connected handle and a valid out pointer.
        let ret = unsafe { rados_getaddrs(self.handle, &mut addrs) };
        check(ret, || "reading this client's address".to_string())?;
        if addrs.is_null() {
            return Err(Error::new(ErrorKind::Io, "librados gave no client address"));
        }
        // SAFETY: librados returned a NUL-terminated string from strdup, which we own.
        let text = unsafe { CStr::from_ptr(addrs) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: `addrs` came from strdup and is freed once, here.
        unsafe { libc::free(addrs.cast()) };
        Ok(one_address(&text))
    }

    /// Stops every later write through this connection with `Fenced` (the owner lock was
    /// lost): whatever the blocklist has reached, nothing more of ours may land.
    pub fn fence(&self, reason: &str) {
        *self.fenced_reason.lock().unwrap_or_else(|e| e.into_inner()) = reason.to_string();
        self.fenced.store(true, Ordering::Release);
    }

    fn check_not_fenced(&self, oid: &str) -> Result<()> {
        if !self.fenced.load(Ordering::Acquire) {
            return Ok(());
        }
        let reason = self
            .fenced_reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        Err(Error::new(
            ErrorKind::Fenced,
            format!("writing {oid}: this process lost the pool ({reason})"),
        ))
    }

    /// The size of object `oid`, `None` when there is none.
    pub fn object_size(&self, oid: &str) -> Result<Option<u64>> {
        let c = c_string(oid)?;
        let mut size = 0u64;
        let mut mtime: libc::time_t = 0;
        // SAFETY: valid ioctx, NUL-terminated name, valid out pointers.
        let ret = unsafe { ffi::rados_stat(self.ioctx, c.as_ptr(), &mut size, &mut mtime) };
        if ret == -libc::ENOENT {
            return Ok(None);
        }
        check(ret, || format!("looking up {}", self.describe(oid)))?;
        Ok(Some(size))
    }

    /// A whole small object (the header, registry, owner record); `None` when there is none.
    pub fn read_object(&self, oid: &str) -> Result<Option<Vec<u8>>> {
        // Read more than the size says, so an object that grew since the stat is still read
        // whole: a short read ends it.
        let Some(size) = self.object_size(oid)? else {
            return Ok(None);
        };
        let mut buf = Vec::new();
        let mut chunk = usize::try_from(size).unwrap_or(usize::MAX).max(4096) + 4096;
        loop {
            let start = buf.len();
            buf.resize(start + chunk, 0);
            let Some(n) = self.read_at(oid, &mut buf[start..], start as u64)? else {
                return Ok(None);
            };
            buf.truncate(start + n);
            if n < chunk {
                return Ok(Some(buf));
            }
            chunk = chunk.saturating_mul(2);
        }
    }

    /// Reads into `buf` from byte `offset` of object `oid`: the bytes read (fewer at the
    /// object's end), or `None` when there is no such object.
    pub fn read_at(&self, oid: &str, buf: &mut [u8], offset: u64) -> Result<Option<usize>> {
        let c = c_string(oid)?;
        let mut done = 0usize;
        // librados returns an int: read at most 1 GiB per call.
        while done < buf.len() {
            let want = (buf.len() - done).min(1 << 30);
            // SAFETY: `buf[done..]` is valid for writes of `want` bytes for the whole call.
            let ret = unsafe {
                ffi::rados_read(
                    self.ioctx,
                    c.as_ptr(),
                    buf[done..].as_mut_ptr().cast(),
                    want,
                    offset + done as u64,
                )
            };
            if ret == -libc::ENOENT {
                return Ok((done > 0).then_some(done));
            }
            check(ret, || {
                format!(
                    "reading {want} bytes at byte {} of {}",
                    offset + done as u64,
                    self.describe(oid)
                )
            })?;
            let n = usize::try_from(ret).unwrap_or(0);
            done += n;
            if n < want {
                break;
            }
        }
        Ok(Some(done))
    }

    /// Writes `buf` at byte `offset` of object `oid` (created when missing), durable on
    /// every replica when this returns.
    pub fn write_at(&self, oid: &str, buf: &[u8], offset: u64) -> Result<()> {
        self.check_not_fenced(oid)?;
        let c = c_string(oid)?;
        // SAFETY: `buf` is valid for reads of its length for the whole call.
        let ret = unsafe {
            ffi::rados_write(
                self.ioctx,
                c.as_ptr(),
                buf.as_ptr().cast(),
                buf.len(),
                offset,
            )
        };
        check(ret, || {
            format!(
                "writing {} bytes at byte {offset} of {}",
                buf.len(),
                self.describe(oid)
            )
        })
    }

    /// Replaces object `oid` with `bytes` in one operation: a reader sees the old or the new
    /// contents, never a mix.
    pub fn write_object_atomically(&self, oid: &str, bytes: &[u8]) -> Result<()> {
        self.check_not_fenced(oid)?;
        let c = c_string(oid)?;
        // SAFETY: `bytes` is valid for reads of its length for the whole call.
        let ret = unsafe {
            ffi::rados_write_full(self.ioctx, c.as_ptr(), bytes.as_ptr().cast(), bytes.len())
        };
        check(ret, || format!("replacing {}", self.describe(oid)))
    }

    /// Makes `len` bytes at `offset` of object `oid` read zeros (nothing when it is missing).
    pub fn zero(&self, oid: &str, offset: u64, len: u64) -> Result<()> {
        self.check_not_fenced(oid)?;
        let c = c_string(oid)?;
        // SAFETY: creates a write op, released below on every path.
        let op = unsafe { ffi::rados_create_write_op() };
        if op.is_null() {
            return Err(Error::new(ErrorKind::Io, "librados: out of memory"));
        }
        // SAFETY: `op` is a live write op; the ioctx and name are valid for the call; a null
        // mtime means now. The op is released once, right after.
        let ret = unsafe {
            ffi::rados_write_op_zero(op, offset, len);
            let ret = ffi::rados_write_op_operate(op, self.ioctx, c.as_ptr(), ptr::null_mut(), 0);
            ffi::rados_release_write_op(op);
            ret
        };
        if ret == -libc::ENOENT {
            return Ok(());
        }
        check(ret, || {
            format!(
                "zeroing {len} bytes at byte {offset} of {}",
                self.describe(oid)
            )
        })
    }

    /// Removes object `oid`; one that is missing already is fine.
    pub fn remove_object(&self, oid: &str) -> Result<()> {
        self.check_not_fenced(oid)?;
        let c = c_string(oid)?;
        // SAFETY: valid ioctx and NUL-terminated name.
        let ret = unsafe { ffi::rados_remove(self.ioctx, c.as_ptr()) };
        if ret == -libc::ENOENT {
            return Ok(());
        }
        check(ret, || format!("removing {}", self.describe(oid)))
    }

    /// The names of the objects whose name starts with `prefix` (RADOS lists a whole pool, so
    /// this costs a walk over all of its objects).
    pub fn list_objects(&self, prefix: &str) -> Result<Vec<String>> {
        let mut list: ffi::rados_list_ctx_t = ptr::null_mut();
        // SAFETY: valid ioctx and out pointer; the listing is closed below on every path.
        let ret = unsafe { ffi::rados_nobjects_list_open(self.ioctx, &mut list) };
        check(ret, || {
            format!("listing the objects of RADOS pool {}", self.pool)
        })?;
        let mut names = Vec::new();
        let result = loop {
            let mut entry: *const c_char = ptr::null();
            // SAFETY: `list` is open; `entry` is a valid out pointer (the crate declares it
            // with one indirection too many, hence the cast); key and namespace are not
            // wanted (null).
            let ret = unsafe {
                ffi::rados_nobjects_list_next(
                    list,
                    (&mut entry as *mut *const c_char).cast(),
                    ptr::null_mut(),
                    ptr::null_mut(),
                )
            };
            if ret == -libc::ENOENT {
                break Ok(());
            }
            if ret < 0 {
                break Err(rados_error(
                    ret.into(),
                    format!("listing the objects of RADOS pool {}", self.pool),
                ));
            }
            // SAFETY: on success `entry` is a NUL-terminated name valid until the next call.
            let name = unsafe { CStr::from_ptr(entry) }.to_string_lossy();
            if name.starts_with(prefix) {
                names.push(name.into_owned());
            }
        };
        // SAFETY: `list` is open and closed once.
        unsafe { ffi::rados_nobjects_list_close(list) };
        result.map(|()| names)
    }

    /// Starts an asynchronous operation: `start` issues it on a new completion (and returns
    /// librados' status of the issue).
    fn start(
        &self,
        what: impl FnOnce() -> String,
        start: impl FnOnce(rados_completion_t) -> c_int,
    ) -> Result<PendingOp> {
        let mut completion: rados_completion_t = ptr::null_mut();
        // SAFETY: no callbacks; a valid out pointer.
        let ret = unsafe {
            ffi::rados_aio_create_completion(ptr::null_mut(), None, None, &mut completion)
        };
        check(ret, || "creating a librados completion".to_string())?;
        // From here the completion is released by the op's Drop, on every path.
        let op = PendingOp {
            completion,
            what: what(),
            missing_is_fine: false,
        };
        check(start(completion), || op.what.clone())?;
        Ok(op)
    }

    /// Starts writing `buf` at `offset` of object `oid`; the returned write reports the
    /// outcome when waited for. librados copies `buf` before this returns.
    pub fn write_async(&self, oid: &str, buf: &[u8], offset: u64) -> Result<PendingOp> {
        self.check_not_fenced(oid)?;
        let c = c_string(oid)?;
        self.start(
            || {
                format!(
                    "writing {} bytes at byte {offset} of {}",
                    buf.len(),
                    self.describe(oid)
                )
            },
            // SAFETY: live completion and ioctx; librados copies `buf` into its own buffer
            // before returning.
            |completion| unsafe {
                ffi::rados_aio_write(
                    self.ioctx,
                    c.as_ptr(),
                    completion,
                    buf.as_ptr().cast(),
                    buf.len(),
                    offset,
                )
            },
        )
    }

    /// Writes each `(object, bytes, offset)` with all of them in flight at once (at most
    /// [`MAX_IN_FLIGHT`] at a time); the first failure is the error, after every write ended.
    pub fn write_many(&self, writes: &[(String, &[u8], u64)]) -> Result<()> {
        self.run_many(writes, |(oid, buf, offset)| {
            self.write_async(oid, buf, *offset)
        })
    }

    /// Removes each object with all removals in flight at once (at most [`MAX_IN_FLIGHT`]);
    /// missing ones are fine.
    pub fn remove_many(&self, oids: &[String]) -> Result<()> {
        self.run_many(oids, |oid| {
            self.check_not_fenced(oid)?;
            let c = c_string(oid)?;
            self.start(
                || format!("removing {}", self.describe(oid)),
                // SAFETY: live completion and ioctx; the name is copied by librados.
                |completion| unsafe { ffi::rados_aio_remove(self.ioctx, c.as_ptr(), completion) },
            )
            .map(PendingOp::missing_is_fine)
        })
    }

    fn run_many<T>(&self, items: &[T], start: impl Fn(&T) -> Result<PendingOp>) -> Result<()> {
        let mut first_error = None;
        for window in items.chunks(MAX_IN_FLIGHT) {
            let mut ops = Vec::with_capacity(window.len());
            for item in window {
                match start(item) {
                    Ok(op) => ops.push(op),
                    Err(e) => {
                        first_error.get_or_insert(e);
                        break;
                    }
                }
            }
            for op in ops {
                if let Err(e) = op.wait() {
                    first_error.get_or_insert(e);
                }
            }
            if first_error.is_some() {
                break;
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Fills each `(object, buffer, offset)` with all reads in flight at once (at most
    /// [`MAX_IN_FLIGHT`]); bytes past an object's end, or of a missing object, read zeros
    /// (as sparse objects are). Every read has ended when this returns, whatever the outcome,
    /// so the buffers are only borrowed for the call.
    pub fn read_many(&self, reads: &mut [(String, &mut [u8], u64)]) -> Result<()> {
        for window in reads.chunks_mut(MAX_IN_FLIGHT) {
            // `ops` is dropped (each op waited for) before the buffers' borrow ends, on every
            // path: a read never lands in memory that is no longer the caller's.
            let mut ops = Vec::with_capacity(window.len());
            for (oid, buf, offset) in window.iter_mut() {
                let c = c_string(oid)?;
                let (len, offset) = (buf.len(), *offset);
                if i32::try_from(len).is_err() {
                    return Err(Error::new(
                        ErrorKind::OutOfBounds,
                        format!("one read of {len} bytes"),
                    ));
                }
                let target = buf.as_mut_ptr();
                ops.push(
                    self.start(
                        || {
                            format!(
                                "reading {len} bytes at byte {offset} of {}",
                                self.describe(oid)
                            )
                        },
                        // SAFETY: `target` is valid for writes of `len` bytes until the op
                        // ended: `ops` is waited for before `window`'s borrow ends.
                        |completion| unsafe {
                            ffi::rados_aio_read(
                                self.ioctx,
                                c.as_ptr(),
                                completion,
                                target.cast(),
                                len,
                                offset,
                            )
                        },
                    )?
                    .missing_is_fine(),
                );
            }
            let lengths: Vec<Result<usize>> =
                ops.into_iter().map(PendingOp::wait_for_length).collect();
            for ((_, buf, _), got) in window.iter_mut().zip(lengths) {
                let got = got?.min(buf.len());
                buf[got..].fill(0);
            }
        }
        Ok(())
    }

    /// Takes (or, with [`LOCK_FLAG_MUST_RENEW`], extends) exclusive lock `name` on object
    /// `oid` for `duration`. `Ok(false)`: someone else holds it (or, renewing, we do not).
    pub fn lock_exclusive(
        &self,
        oid: &str,
        name: &str,
        cookie: &str,
        description: &str,
        duration: Duration,
        flags: u8,
    ) -> Result<bool> {
        let (c, n, k, d) = (
            c_string(oid)?,
            c_string(name)?,
            c_string(cookie)?,
            c_string(description)?,
        );
        let mut tv = libc::timeval {
            tv_sec: libc::time_t::try_from(duration.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_usec: libc::suseconds_t::from(duration.subsec_micros()),
        };
        // SAFETY: valid ioctx, NUL-terminated strings and a timeval valid for the call.
        let ret = unsafe {
            ffi::rados_lock_exclusive(
                self.ioctx,
                c.as_ptr(),
                n.as_ptr(),
                k.as_ptr(),
                d.as_ptr(),
                &mut tv,
                flags,
            )
        };
        // EBUSY: held by another; EEXIST: by this client under another cookie; ENOENT: a
        // renewal of a lock that is not ours any more.
        if ret == -libc::EBUSY || ret == -libc::EEXIST || ret == -libc::ENOENT {
            return Ok(false);
        }
        check(ret, || format!("locking {}", self.describe(oid)))?;
        Ok(true)
    }

    /// Releases lock `name` on `oid` taken with `cookie`; one not held (expired, broken) is
    /// fine.
    pub fn unlock(&self, oid: &str, name: &str, cookie: &str) -> Result<()> {
        let (c, n, k) = (c_string(oid)?, c_string(name)?, c_string(cookie)?);
        // SAFETY: valid ioctx and NUL-terminated strings.
        let ret = unsafe { ffi::rados_unlock(self.ioctx, c.as_ptr(), n.as_ptr(), k.as_ptr()) };
        if ret == -libc::ENOENT {
            return Ok(());
        }
        check(ret, || format!("unlocking {}", self.describe(oid)))
    }

    /// Who holds lock `name` on `oid` now (an expired lock is not held).
    pub fn lockers(&self, oid: &str, name: &str) -> Result<Vec<Locker>> {
        let (c, n) = (c_string(oid)?, c_string(name)?);
        let mut cap = 1024usize;
        loop {
            let mut exclusive: c_int = 0;
            let mut tag = vec![0u8; cap];
            let mut clients = vec![0u8; cap];
            let mut cookies = vec![0u8; cap];
            let mut addrs = vec![0u8; cap];
            let (mut tag_len, mut clients_len, mut cookies_len, mut addrs_len) =
                (cap, cap, cap, cap);
            // SAFETY: every buffer is valid for writes of the length passed with it.
            let ret = unsafe {
                ffi::rados_list_lockers(
                    self.ioctx,
                    c.as_ptr(),
                    n.as_ptr(),
                    &mut exclusive,
                    tag.as_mut_ptr().cast(),
                    &mut tag_len,
                    clients.as_mut_ptr().cast(),
                    &mut clients_len,
                    cookies.as_mut_ptr().cast(),
                    &mut cookies_len,
                    addrs.as_mut_ptr().cast(),
                    &mut addrs_len,
                )
            };
            if ret == -(libc::ERANGE as isize) {
                cap = [tag_len, clients_len, cookies_len, addrs_len, cap * 2]
                    .into_iter()
                    .max()
                    .unwrap_or(cap * 2);
                continue;
            }
            if ret == -(libc::ENOENT as isize) {
                return Ok(Vec::new());
            }
            if ret < 0 {
                return Err(rados_error(
                    ret as i64,
                    format!("listing the lockers of {}", self.describe(oid)),
                ));
            }
            let split = |buf: &[u8], len: usize| -> Vec<String> {
                buf[..len.min(buf.len())]
                    .split(|b| *b == 0)
                    .filter(|s| !s.is_empty())
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect()
            };
            let clients = split(&clients, clients_len);
            let cookies = split(&cookies, cookies_len);
            let addrs = split(&addrs, addrs_len);
            return Ok(clients
                .into_iter()
                .zip(cookies)
                .zip(addrs)
                .map(|((client, cookie), address)| Locker {
                    client,
                    cookie,
                    address: one_address(&address),
                })
                .collect());
        }
    }

    /// Breaks `locker`'s hold of lock `name` on `oid` (gone already is fine).
    pub fn break_lock(&self, oid: &str, name: &str, locker: &Locker) -> Result<()> {
        let (c, n, l, k) = (
            c_string(oid)?,
            c_string(name)?,
            c_string(&locker.client)?,
            c_string(&locker.cookie)?,
        );
        // SAFETY: valid ioctx and NUL-terminated strings.
        let ret = unsafe {
            ffi::rados_break_lock(self.ioctx, c.as_ptr(), n.as_ptr(), l.as_ptr(), k.as_ptr())
        };
        if ret == -libc::ENOENT {
            return Ok(());
        }
        check(ret, || {
            format!(
                "breaking {}'s lock on {}",
                locker.client,
                self.describe(oid)
            )
        })
    }

    /// Puts `address` on the cluster's blocklist for `expire`: the OSDs refuse every request
    /// of that client from the OSD map that carries the entry on.
    pub fn blocklist(&self, address: &str, expire: Duration) -> Result<()> {
        let c = c_string(address)?;
        let secs = u32::try_from(expire.as_secs()).unwrap_or(u32::MAX);
        // SAFETY: a connected handle; librados only reads the NUL-terminated address (the
        // C API takes it as `char *`).
        let ret = unsafe { rados_blocklist_add(self.handle, c.as_ptr().cast_mut(), secs) };
        check(ret, || format!("blocklisting client {address}"))
    }

    /// Waits until this client has the newest OSD map, so that a blocklist entry just added
    /// is in force before anything that relies on it.
    pub fn wait_for_latest_osdmap(&self) -> Result<()> {
        // SAFETY: a connected handle.
        let ret = unsafe { ffi::rados_wait_for_latest_osdmap(self.handle) };
        check(ret, || "waiting for the latest OSD map".to_string())
    }

    fn describe(&self, oid: &str) -> String {
        format!("RADOS object {}/{oid}", self.pool)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: the handles are ours and destroyed once; no other reference remains
        // (`&mut self`). A null ioctx was never created.
        unsafe {
            if !self.ioctx.is_null() {
                ffi::rados_ioctx_destroy(self.ioctx);
            }
            ffi::rados_shutdown(self.handle);
        }
    }
}

/// The first address of an address vector (`[v2:1.2.3.4:0/5,v1:...]` or a single address),
/// with no type prefix: the form `osd blocklist add` takes.
fn one_address(text: &str) -> String {
    let inner = text.trim().trim_start_matches('[').trim_end_matches(']');
    let first = inner.split(',').next().unwrap_or("").trim();
    first
        .strip_prefix("v2:")
        .or_else(|| first.strip_prefix("v1:"))
        .or_else(|| first.strip_prefix("any:"))
        .unwrap_or(first)
        .to_string()
}

/// Operations [`Cluster::read_many`], [`write_many`](Cluster::write_many) and
/// [`remove_many`](Cluster::remove_many) keep in flight at once.
pub const MAX_IN_FLIGHT: usize = 64;

/// An asynchronous operation in flight; [`wait`](Self::wait) reports how it ended. Dropping
/// it unwaited waits too: librados must be done with a completion (and any buffer it writes)
/// before it is released.
pub struct PendingOp {
    completion: rados_completion_t,
    what: String,
    /// A missing object is no error (a removal of one, a read of one: zeros).
    missing_is_fine: bool,
}

// SAFETY: a librados completion may be waited for and released from any thread.
unsafe impl Send for PendingOp {}

impl PendingOp {
    fn missing_is_fine(mut self) -> Self {
        self.missing_is_fine = true;
        self
    }

    /// Waits until the operation ended (a write: durable on every replica).
    pub fn wait(self) -> Result<()> {
        self.wait_for_length().map(|_| ())
    }

    /// Waits; the non-negative result (bytes, for a read), 0 for a missing object where
    /// that is fine.
    fn wait_for_length(self) -> Result<usize> {
        // SAFETY: a live completion, released by Drop after this.
        let ret = unsafe {
            ffi::rados_aio_wait_for_complete(self.completion);
            ffi::rados_aio_get_return_value(self.completion)
        };
        if ret == -libc::ENOENT && self.missing_is_fine {
            return Ok(0);
        }
        check(ret, || self.what.clone())?;
        Ok(usize::try_from(ret).unwrap_or(0))
    }
}

impl Drop for PendingOp {
    fn drop(&mut self) {
        // SAFETY: the completion is live; waiting first means librados is done with it when
        // it is released, once.
        unsafe {
            ffi::rados_aio_wait_for_complete(self.completion);
            ffi::rados_aio_release(self.completion);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_address_takes_the_first_without_its_type() {
        assert_eq!(
            one_address("[v2:10.0.0.1:0/123,v1:10.0.0.1:0/123]"),
            "10.0.0.1:0/123"
        );
        assert_eq!(one_address("127.0.0.1:0/3872641"), "127.0.0.1:0/3872641");
        assert_eq!(one_address("[any:127.0.0.1:0/9]"), "127.0.0.1:0/9");
    }

    #[test]
    fn librados_errnos_map_to_kinds() {
        assert_eq!(
            rados_error(-i64::from(libc::ENOSPC), "x").kind(),
            ErrorKind::NoSpace
        );
        assert_eq!(
            rados_error(-i64::from(libc::EDQUOT), "x").kind(),
            ErrorKind::NoSpace
        );
        let fenced = rados_error(-108, "writing rbd/tank.data.0");
        assert_eq!(fenced.kind(), ErrorKind::Fenced);
        assert!(fenced.to_string().contains("blocklisted"), "{fenced}");
        let e = rados_error(-i64::from(libc::ETIMEDOUT), "reading rbd/tank.pool");
        assert_eq!(e.kind(), ErrorKind::Io);
        assert!(e.to_string().contains("tank.pool"), "{e}");
    }
}
