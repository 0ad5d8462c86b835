//! The C edge the `nbdkit` crate 0.3.0 does not cover: `plugin_init`, which returns the
//! crate's plugin struct with the newer callbacks of nbdkit-plugin.h appended (export list,
//! default export, export description, cleanup, block size), and the nbdkit functions those
//! callbacks need.
//!
//! nbdkit copies `_struct_size` bytes of the struct it gets, so fields it knows past the
//! crate's end are found by layout: the appended fields follow nbdkit-plugin.h (1.32) exactly.
//! The crate's `disconnect()` is never used: it names a symbol nbdkit 1.32 does not export, and
//! a reference to it would keep the plugin from loading.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::panic::catch_unwind;
use std::sync::OnceLock;

use crate::config::MAX_REQUEST;
use crate::reply::{c_text, errno_of};
use crate::{guard, served, shutdown_pool, ThinExport};
use thinnbd::error::{Error, ErrorKind, Result};
use thinnbd::nbd::BlockSizes;

/// nbdkit's opaque export list.
#[repr(C)]
pub struct NbdkitExports {
    _opaque: [u8; 0],
}

extern "C" {
    fn nbdkit_add_export(
        exports: *mut NbdkitExports,
        name: *const c_char,
        description: *const c_char,
    ) -> c_int;
    fn nbdkit_export_name() -> *const c_char;
    fn nbdkit_strdup_intern(s: *const c_char) -> *const c_char;
    fn nbdkit_error(fmt: *const c_char, ...);
    fn nbdkit_set_error(err: c_int);
}

/// The crate's `struct nbdkit_plugin` followed by the fields it lacks, in header order.
#[repr(C)]
struct PluginV2 {
    base: nbdkit::Plugin,
    list_exports: Option<extern "C" fn(c_int, c_int, *mut NbdkitExports) -> c_int>,
    default_export: Option<extern "C" fn(c_int, c_int) -> *const c_char>,
    export_description: Option<extern "C" fn(*mut c_void) -> *const c_char>,
    cleanup: Option<extern "C" fn()>,
    block_size: Option<extern "C" fn(*mut c_void, *mut u32, *mut u32, *mut u32) -> c_int>,
}

fn build() -> *const PluginV2 {
    let mut b = nbdkit::Builder::new();
    b.after_fork = true;
    b.cache = true;
    b.can_cache = true;
    b.can_extents = true;
    b.can_flush = true;
    b.can_fast_zero = true;
    b.can_fua = true;
    b.can_multi_conn = true;
    b.can_trim = true;
    b.can_write = true;
    b.can_zero = true;
    b.config = true;
    b.config_complete = true;
    b.config_help = true;
    b.dump_plugin = true;
    b.extents = true;
    b.flush = true;
    b.get_ready = true;
    b.is_rotational = true;
    b.thread_model = true;
    b.trim = true;
    b.unload = true;
    b.write_at = true;
    b.zero = true;
    let raw = b.into_ptr::<ThinExport>().cast_mut();
    // SAFETY: `into_ptr` returns `Box::into_raw` of a fresh `Box<Plugin>` and keeps no copy of
    // the pointer, so taking the box back is the only ownership of it. `Plugin` holds plain
    // pointers and integers (no Drop), and the strings it points to are the crate's statics.
    let base = *unsafe { Box::from_raw(raw) };
    let mut plugin = PluginV2 {
        base,
        list_exports: Some(list_exports),
        default_export: Some(default_export),
        export_description: Some(export_description),
        cleanup: Some(cleanup),
        block_size: Some(block_size),
    };
    plugin.base._struct_size = std::mem::size_of::<PluginV2>() as u64;
    // nbdkit keeps the struct for the life of the process.
    Box::into_raw(Box::new(plugin))
}

/// nbdkit's entry point into the plugin.
#[no_mangle]
pub extern "C" fn plugin_init() -> *const c_void {
    // Pointers are not Sync; the address is, and the struct is never freed.
    static PLUGIN: OnceLock<usize> = OnceLock::new();
    let built = catch_unwind(|| *PLUGIN.get_or_init(|| build() as usize));
    match built {
        Ok(addr) => addr as *const c_void,
        Err(_) => std::ptr::null(),
    }
}

/// Tells nbdkit about an error: the message for its log, the errno for the client.
fn report(e: &Error) {
    let msg = c_text(&e.to_string());
    // SAFETY: nbdkit_error is printf-like; the format is a static "%s" and its one argument a
    // NUL-terminated string alive for the call. nbdkit_set_error only stores the number.
    unsafe {
        nbdkit_error(c"%s".as_ptr(), msg.as_ptr());
        nbdkit_set_error(errno_of(e.kind()));
    }
}

/// Runs a callback body under [`guard`]; an error is reported and replaced by `failed`.
fn run<T>(what: &str, failed: T, f: impl FnOnce() -> Result<T>) -> T {
    match guard(what, f) {
        Ok(v) => v,
        Err(e) => {
            report(&e);
            failed
        }
    }
}

/// A string nbdkit keeps until the connection ends (for the `const char *` callbacks); null
/// on failure, which nbdkit takes as "none".
fn intern(s: &str) -> *const c_char {
    let c = c_text(s);
    // SAFETY: `c` is NUL-terminated and alive for the call; nbdkit copies it.
    unsafe { nbdkit_strdup_intern(c.as_ptr()) }
}

/// The export name the client asked for ("" for the default export).
pub(super) fn export_name() -> Result<String> {
    // SAFETY: called from an nbdkit connection thread (open/export_description), where nbdkit
    // returns its own copy of the name, valid at least until the connection closes, or null.
    let p = unsafe { nbdkit_export_name() };
    if p.is_null() {
        return Err(Error::new(ErrorKind::InvalidInput, "no export name"));
    }
    // SAFETY: non-null and NUL-terminated, as above; copied out at once.
    let name = unsafe { CStr::from_ptr(p) };
    name.to_str()
        .map(str::to_string)
        .map_err(|_| Error::new(ErrorKind::InvalidInput, "export name is not UTF-8"))
}

extern "C" fn list_exports(_readonly: c_int, _is_tls: c_int, exports: *mut NbdkitExports) -> c_int {
    run("list_exports", -1, || {
        for e in served()?.list() {
            let name = c_text(&e.name);
            let description = c_text(&e.description);
            // SAFETY: `exports` is the list nbdkit passed to this call; both strings are
            // NUL-terminated and alive for the call, and nbdkit copies them.
            let r = unsafe { nbdkit_add_export(exports, name.as_ptr(), description.as_ptr()) };
            if r != 0 {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!("adding export {:?} to the list", e.name),
                ));
            }
        }
        Ok(0)
    })
}

extern "C" fn default_export(_readonly: c_int, _is_tls: c_int) -> *const c_char {
    run("default_export", std::ptr::null(), || {
        Ok(served()?
            .default_export()
            .map_or(std::ptr::null(), |n| intern(&n)))
    })
}

extern "C" fn export_description(_handle: *mut c_void) -> *const c_char {
    run("export_description", std::ptr::null(), || {
        let name = export_name()?;
        Ok(served()?
            .description(&name)
            .map_or(std::ptr::null(), |d| intern(&d)))
    })
}

extern "C" fn cleanup() {
    run("cleanup", (), shutdown_pool)
}

extern "C" fn block_size(
    _handle: *mut c_void,
    minimum: *mut u32,
    preferred: *mut u32,
    maximum: *mut u32,
) -> c_int {
    run("block_size", -1, || {
        if minimum.is_null() || preferred.is_null() || maximum.is_null() {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "null block size pointer",
            ));
        }
        let sizes = BlockSizes::new(served()?.exports.preferred_block_size(), MAX_REQUEST);
        // SAFETY: nbdkit passes three valid, aligned, writable u32s (checked non-null above)
        // that outlive the call.
        unsafe {
            *minimum = sizes.minimum;
            *preferred = sizes.preferred;
            *maximum = sizes.maximum;
        }
        Ok(0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The appended fields sit where nbdkit-plugin.h (1.32) puts them: right after the crate's
    /// struct, one pointer each.
    #[test]
    fn layout_matches_the_header() {
        let p = std::mem::size_of::<*const c_void>();
        let base = std::mem::size_of::<nbdkit::Plugin>();
        assert_eq!(std::mem::offset_of!(PluginV2, list_exports), base);
        assert_eq!(std::mem::offset_of!(PluginV2, default_export), base + p);
        assert_eq!(
            std::mem::offset_of!(PluginV2, export_description),
            base + 2 * p
        );
        assert_eq!(std::mem::offset_of!(PluginV2, cleanup), base + 3 * p);
        assert_eq!(std::mem::offset_of!(PluginV2, block_size), base + 4 * p);
        assert_eq!(std::mem::size_of::<PluginV2>(), base + 5 * p);
        // The crate's struct ends with after_fork; nothing sits between it and ours.
        assert_eq!(std::mem::offset_of!(nbdkit::Plugin, after_fork) + p, base);
    }
}
