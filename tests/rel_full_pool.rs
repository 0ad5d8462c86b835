//! A full pool end to end through NBD with the real binary and qemu-io (issue 6, point 4).
//! With `no_space_policy = "error"` a write needing a new block gets ENOSPC ("No space left on
//! device", never EIO) and writes to provisioned blocks still succeed. With "queue" the write
//! waits, and a volume deleted online (`thinnbd volume delete`) or a discard that frees space
//! lets it complete.

mod common;
mod rel_support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rel_support::server::{cli_ok, make_pool, pool_status, Server};

fn config(dir: &Path, policy: &str) -> std::path::PathBuf {
    let path = dir.join(format!("{policy}.toml"));
    std::fs::write(
        &path,
        format!(
            "[pool]\nno_space_policy = \"{policy}\"\nno_space_timeout_secs = 120\n\
             low_water_mark = \"64K\"\ncreate_if_missing = false\n"
        ),
    )
    .unwrap();
    path
}

fn qemu_io_cmd(port: u16, export: &str, cmds: &[&str]) -> Command {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", &format!("nbd://127.0.0.1:{port}/{export}")]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.stdin(Stdio::null());
    c
}

/// Runs qemu-io; returns stdout and stderr together.
fn qemu_io(port: u16, export: &str, cmds: &[&str]) -> String {
    let out = qemu_io_cmd(port, export, cmds)
        .output()
        .expect("run qemu-io");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn qemu_io_ok(port: u16, export: &str, cmds: &[&str]) -> String {
    let out = qemu_io(port, export, cmds);
    for bad in ["fail", "error", "Error", "mismatch", "No space"] {
        assert!(
            !out.contains(bad),
            "qemu-io {cmds:?} reported {bad:?}:\n{out}"
        );
    }
    out
}

fn wait_for_mode(pool: &Path, mode: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if pool_status(pool)["mode"] == mode {
            return;
        }
        assert!(Instant::now() < deadline, "pool never reached mode {mode}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits up to 120 s for a background qemu-io; returns its output.
fn finish(mut child: Child) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the queued write did not complete within 120 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("qemu-io output");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn spawn_queued_write(port: u16, export: &str, cmd: &str) -> Child {
    qemu_io_cmd(port, export, &[cmd])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn qemu-io")
}

#[test]
fn error_policy_gives_enospc_not_eio_and_provisioned_writes_still_work() {
    if !common::require_tool("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    // 64 blocks of 64 KiB behind a 16 MiB volume.
    make_pool(&pool, "4M", &[("a", "16M")]);
    let cfg = config(dir.path(), "error");
    let mut server = Server::start(&pool, Some(&cfg), &dir.path().join("log"));
    let port = server.port;
    qemu_io_ok(port, "a", &["write -P 0x11 0 1M"]);
    let out = qemu_io(port, "a", &["write -P 0x22 1M 8M"]);
    assert!(
        out.contains("No space left on device"),
        "qemu-io output:\n{out}"
    );
    assert!(
        !out.contains("Input/output error"),
        "ENOSPC became EIO:\n{out}"
    );
    assert_eq!(pool_status(&pool)["mode"], "out-of-space");
    qemu_io_ok(port, "a", &["write -P 0x33 0 1M", "read -P 0x33 0 1M"]);
    let out = qemu_io(port, "a", &["write -P 0x44 12M 64k"]);
    assert!(out.contains("No space left on device"), "{out}");
    assert!(server.stop().success(), "{}", server.log_text());
    common::assert_metadata_clean(&pool.join("metadata"));
}

#[test]
fn queue_policy_completes_after_an_online_delete_or_a_discard() {
    if !common::require_tool("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    make_pool(&pool, "4M", &[("a", "16M"), ("b", "4M")]);
    let cfg = config(dir.path(), "queue");
    let mut server = Server::start(&pool, Some(&cfg), &dir.path().join("log"));
    let port = server.port;
    qemu_io_ok(port, "b", &["write -P 0x0b 0 1M"]);
    qemu_io_ok(port, "a", &["write -P 0x0a 0 3M"]);
    assert_eq!(
        pool_status(&pool)["data_used_bytes"],
        4 << 20,
        "the pool is full"
    );

    // 1: a write waits on the full pool until volume b is deleted online.
    let child = spawn_queued_write(port, "a", "write -P 0x44 3M 64k");
    wait_for_mode(&pool, "out-of-space");
    std::thread::sleep(Duration::from_millis(200));
    let mut child = child;
    assert!(
        child.try_wait().unwrap().is_none(),
        "the write did not wait"
    );
    cli_ok(&["volume", "delete", "--pool", pool.to_str().unwrap(), "b"]);
    let out = finish(child);
    assert!(!out.contains("error") && !out.contains("No space"), "{out}");
    qemu_io_ok(port, "a", &["read -P 0x44 3M 64k", "read -P 0x0a 0 3M"]);

    // 2: refill, then a write waits until a discard on another connection frees space.
    qemu_io_ok(port, "a", &["write -P 0x0c 4M 960k"]);
    let mut child = spawn_queued_write(port, "a", "write -P 0x55 8M 64k");
    wait_for_mode(&pool, "out-of-space");
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the write did not wait"
    );
    qemu_io_ok(port, "a", &["discard 0 1M"]);
    let out = finish(child);
    assert!(!out.contains("error") && !out.contains("No space"), "{out}");
    qemu_io_ok(
        port,
        "a",
        &[
            "read -P 0x55 8M 64k",
            "read -P 0 0 1M",
            "read -P 0x0c 4M 960k",
        ],
    );
    assert_eq!(pool_status(&pool)["mode"], "write");
    assert!(server.stop().success(), "{}", server.log_text());
    common::assert_metadata_clean(&pool.join("metadata"));
}
