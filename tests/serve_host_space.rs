//! The host's own space: a full file system under the data file reaches the
//! client as ENOSPC (never EIO) and leaves the pool consistent and writable; the metadata file
//! is allocated in full at creation, so a commit never needs host space; `pool create
//! --preallocate` allocates the data file; and `pool status` and the server's start warn when
//! the file system has less free space than the pool's free data.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::qemu::{qemu_io, qemu_io_ok};
use common::server::{cli, cli_ok, make_pool, pool_status, Server};
use common::small_fs::SmallFs;

const HOST_WARNING: &str = "file system holding the data file";

/// (apparent size, bytes the host allocated) of a file.
fn sizes(path: &Path) -> (u64, u64) {
    let m = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (m.len(), m.blocks() * 512)
}

fn warnings(status: &serde_json::Value) -> Vec<String> {
    status["warnings"]
        .as_array()
        .unwrap_or_else(|| panic!("pool status has no warnings list: {status}"))
        .iter()
        .map(|w| w.as_str().expect("a warning is text").to_owned())
        .collect()
}

#[test]
fn a_full_host_file_system_gives_the_client_enospc_and_the_pool_stays_consistent() {
    if !common::require_tool("qemu-io") {
        return;
    }
    let Some(fs) = SmallFs::mount("48m") else {
        return;
    };
    let pool = fs.join("pool");
    make_pool(&pool, "1G", &[("a", "1G")]);
    // Host space the test gives back later, to show that writes that fit work again.
    std::fs::write(fs.join("filler"), vec![0xa5u8; 8 << 20]).unwrap();
    // The log lives off the small file system, which the test fills.
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("log");
    let mut server = Server::start_on_pool(&pool, None, &log);
    let port = server.port;
    assert!(
        server.log_text().contains(HOST_WARNING),
        "no host-space warning at start:\n{}",
        server.log_text()
    );
    qemu_io_ok(port, "a", &["write -P 0x11 0 1M"]);

    let out = qemu_io(port, "a", &["write -P 0x22 1M 64M"]);
    assert!(
        out.contains("No space left on device"),
        "a write past the host's space did not get ENOSPC:\n{out}"
    );
    assert!(
        !out.contains("Input/output error"),
        "ENOSPC became EIO:\n{out}"
    );
    let status = pool_status(&pool);
    assert_eq!(status["mode"], "write", "{status}");
    assert!(
        warnings(&status).iter().any(|w| w.contains(HOST_WARNING)),
        "{status}"
    );

    // Blocks already provisioned are overwritten in place: no host space needed.
    qemu_io_ok(port, "a", &["write -P 0x33 0 64k", "read -P 0x33 0 64k"]);
    std::fs::remove_file(fs.join("filler")).unwrap();
    qemu_io_ok(
        port,
        "a",
        &[
            "write -P 0x44 512M 4M",
            "flush",
            "read -P 0x44 512M 4M",
            "read -P 0x11 64k 960k",
        ],
    );
    assert!(server.terminate().success(), "{}", server.log_text());
    common::assert_metadata_clean(&pool.join("metadata"));
}

#[test]
fn pool_create_allocates_the_metadata_file_in_full() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    make_pool(&pool, "2G", &[]);
    let (len, allocated) = sizes(&pool.join("metadata"));
    assert!(len > 0);
    assert!(
        allocated >= len,
        "metadata file is sparse: {allocated} of {len} bytes allocated"
    );
    let (len, allocated) = sizes(&pool.join("data"));
    assert!(
        allocated < len,
        "without --preallocate the data file stays sparse ({allocated} of {len})"
    );
    // Metadata added by a grow is allocated in full too.
    let (before, _) = sizes(&pool.join("metadata"));
    cli_ok(&[
        "pool",
        "grow",
        pool.to_str().unwrap(),
        "--metadata-size",
        &format!("{}", before + (8 << 20)),
    ]);
    let (len, allocated) = sizes(&pool.join("metadata"));
    assert_eq!(len, before + (8 << 20));
    assert!(
        allocated >= len,
        "grown metadata file is sparse: {allocated} of {len} bytes allocated"
    );
}

/// Writes `path` until the file system is full (to the last page).
fn fill_file_system(path: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    for chunk in [1usize << 20, 4096] {
        let buf = vec![0x5au8; chunk];
        loop {
            match f.write_all(&buf) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
    }
}

#[test]
fn a_preallocated_pool_on_a_full_host_provisions_and_commits() {
    if !common::require_tool("qemu-io") {
        return;
    }
    let Some(fs) = SmallFs::mount("48m") else {
        return;
    };
    let pool = fs.join("pool");
    let p = pool.to_str().unwrap();
    cli_ok(&["pool", "create", p, "--data-size", "24M", "--preallocate"]);
    cli_ok(&["volume", "create", "--pool", p, "a", "--size", "64M"]);
    fill_file_system(&fs.join("filler"));
    // The log lives off the small file system, which the test fills.
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("log");
    let mut server = Server::start_on_pool(&pool, None, &log);
    // Every new block and each flush's commit must do without host space: the data file was
    // allocated by --preallocate, the metadata file at creation.
    for i in 0..6u32 {
        let at = format!("{}M", i * 4);
        qemu_io_ok(
            server.port,
            "a",
            &[&format!("write -P {} {at} 4M", 0x10 + i), "flush"],
        );
    }
    assert_eq!(pool_status(&pool)["mode"], "write");
    qemu_io_ok(
        server.port,
        "a",
        &["read -P 0x15 20M 4M", "read -P 0x10 0 4M"],
    );
    assert!(server.terminate().success(), "{}", server.log_text());
    common::assert_metadata_clean(&pool.join("metadata"));
}

#[test]
fn a_create_the_full_host_refuses_says_no_space_and_leaves_no_orphan() {
    let Some(fs) = SmallFs::mount("48m") else {
        return;
    };
    let pool = fs.join("pool");
    let p = pool.to_str().unwrap();
    make_pool(&pool, "64M", &[("a", "16M")]);
    fill_file_system(&fs.join("filler"));
    for args in [
        vec!["volume", "create", "--pool", p, "b", "--size", "16M"],
        vec!["snapshot", "--pool", p, "a", "a-snap"],
    ] {
        let out = cli(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded on a full host");
        assert!(
            err.contains("no space") && err.contains("No space left on device"),
            "{args:?}: {err}"
        );
    }
    std::fs::remove_file(fs.join("filler")).unwrap();
    let out = cli_ok(&["check", p]);
    assert!(out.contains("clean"), "{out}");
    let status = pool_status(&pool);
    assert_eq!(status["mode"], "write");
    assert_eq!(status["volumes"].as_array().unwrap().len(), 1, "{status}");
    cli_ok(&["volume", "create", "--pool", p, "b", "--size", "16M"]);
}

#[test]
fn pool_create_preallocate_allocates_the_data_file_or_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let p = pool.to_str().unwrap();
    cli_ok(&["pool", "create", p, "--data-size", "64M", "--preallocate"]);
    let (len, allocated) = sizes(&pool.join("data"));
    assert_eq!(len, 64 << 20);
    assert!(
        allocated >= len,
        "--preallocate left the data file sparse: {allocated} of {len} bytes"
    );
    cli_ok(&["volume", "create", "--pool", p, "a", "--size", "32M"]);
    let status = pool_status(&pool);
    assert!(
        !warnings(&status).iter().any(|w| w.contains(HOST_WARNING)),
        "a preallocated pool needs no host space: {status}"
    );

    // Preallocation that does not fit: a clear error, and the directory as it was.
    let Some(fs) = SmallFs::mount("48m") else {
        return;
    };
    let small = fs.join("pool");
    let s = small.to_str().unwrap();
    let out = cli(&["pool", "create", s, "--data-size", "1G", "--preallocate"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "1G preallocated on 48M succeeded");
    assert!(
        err.contains("no space") && err.contains("No space left on device"),
        "{err}"
    );
    assert!(
        !small.join("metadata").exists(),
        "half-made pool left behind"
    );
    assert!(!small.join("data").exists(), "data file left behind");
    cli_ok(&["pool", "create", s, "--data-size", "1G"]);
}

#[test]
fn pool_status_warns_when_the_host_cannot_hold_the_free_data() {
    let Some(fs) = SmallFs::mount("48m") else {
        return;
    };
    let sparse = fs.join("sparse");
    make_pool(&sparse, "1G", &[("a", "512M")]);
    let status = pool_status(&sparse);
    let free = status["host_free_bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("no host_free_bytes: {status}"));
    assert!(free < 48 << 20, "{status}");
    let w = warnings(&status);
    assert!(w.iter().any(|w| w.contains(HOST_WARNING)), "{status}");
    let text = cli_ok(&["pool", "status", sparse.to_str().unwrap()]);
    assert!(
        text.lines()
            .any(|l| l.starts_with("warning:") && l.contains(HOST_WARNING)),
        "{text}"
    );
    assert!(text.contains("host free:"), "{text}");

    let fits = fs.join("fits");
    cli_ok(&[
        "pool",
        "create",
        fits.to_str().unwrap(),
        "--data-size",
        "8M",
    ]);
    let status = pool_status(&fits);
    assert!(
        !warnings(&status).iter().any(|w| w.contains(HOST_WARNING)),
        "8M of free data fits the host: {status}"
    );
    let text = cli_ok(&["pool", "status", fits.to_str().unwrap()]);
    assert!(!text.contains("warning:"), "{text}");
}
