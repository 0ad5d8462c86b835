//! A full pool end to end through NBD with the real binary and qemu-io.
//! With `no_space_policy = "error"` a write needing a new block gets ENOSPC ("No space left on
//! device", never EIO) and writes to provisioned blocks still succeed. With "queue" the write
//! waits, and a volume deleted online (`thinnbd volume delete`) or a discard that frees space
//! lets it complete, and so does an online `thinnbd pool grow`. A pool whose metadata fills
//! refuses new volumes and new blocks with ENOSPC, keeps serving the rest, and a metadata grow
//! brings everything back; under "queue" the writes refused for want of metadata wait for that
//! grow.

mod common;

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::qemu::{qemu_io, qemu_io_cmd, qemu_io_ok};
use common::server::{cli, cli_ok, make_pool, pool_status, Server};

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

/// Serves a pool of `data_size` with 1 MiB of metadata under `policy`: a volume "a" as large
/// as the data with 1 MiB of 0x11 at its start, and volumes until the metadata refused one.
/// Returns the pool directory, the config, the server and the refused volume's name.
fn serve_with_full_metadata(
    dir: &Path,
    policy: &str,
    data_size: &str,
) -> (std::path::PathBuf, std::path::PathBuf, Server, String) {
    let pool = dir.join("pool");
    let p = pool.to_str().unwrap();
    // 256 metadata blocks: a few hundred volumes fill them.
    cli_ok(&[
        "pool",
        "create",
        p,
        "--data-size",
        data_size,
        "--metadata-size",
        "1M",
    ]);
    cli_ok(&["volume", "create", "--pool", p, "a", "--size", data_size]);
    let cfg = config(dir, policy);
    let server = Server::start_on_pool(&pool, Some(&cfg), &dir.join("log"));
    qemu_io_ok(server.port, "a", &["write -P 0x11 0 1M"]);
    let refused = fill_metadata_with_volumes(&pool);
    (pool, cfg, server, refused)
}

/// Creates 1 MiB volumes until the metadata refuses one, which must be "no space" for want of
/// metadata; returns the refused name.
fn fill_metadata_with_volumes(pool: &Path) -> String {
    let p = pool.to_str().unwrap();
    for i in 0..1000 {
        let name = format!("v{i}");
        let out = cli(&["volume", "create", "--pool", p, &name, "--size", "1M"]);
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(
                err.contains("no space") && err.contains("metadata"),
                "{err}"
            );
            return name;
        }
    }
    panic!("the metadata never filled");
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
    let mut server = Server::start_on_pool(&pool, Some(&cfg), &dir.path().join("log"));
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
    assert!(server.terminate().success(), "{}", server.log_text());
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
    let mut server = Server::start_on_pool(&pool, Some(&cfg), &dir.path().join("log"));
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
    assert!(server.terminate().success(), "{}", server.log_text());
    common::assert_metadata_clean(&pool.join("metadata"));
}

#[test]
fn queue_policy_completes_after_an_online_pool_grow() {
    if !common::require_tool("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let p = pool.to_str().unwrap();
    make_pool(&pool, "4M", &[("a", "32M")]);
    let cfg = config(dir.path(), "queue");
    let mut server = Server::start_on_pool(&pool, Some(&cfg), &dir.path().join("log"));
    let port = server.port;
    qemu_io_ok(port, "a", &["write -P 0x0a 0 4M"]);
    assert_eq!(pool_status(&pool)["data_used_bytes"], 4 << 20);

    // Four writers queue on the full pool.
    let writers: Vec<(Child, String)> = (0..4u64)
        .map(|i| {
            let at = format!("{}M", 4 + 2 * i);
            let cmd = format!("write -P 0x{:x} {at} 1M", 0x40 + i);
            (spawn_queued_write(port, "a", &cmd), at)
        })
        .collect();
    wait_for_mode(&pool, "out-of-space");
    std::thread::sleep(Duration::from_millis(200));
    let mut writers = writers;
    for (w, _) in writers.iter_mut() {
        assert!(w.try_wait().unwrap().is_none(), "a write did not wait");
    }
    // Shrinking is refused, online as offline, and changes nothing.
    let out = cli(&["pool", "grow", p, "--data-size", "2M"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("shrinking"), "{err}");
    cli_ok(&["pool", "grow", p, "--data-size", "16M"]);
    assert!(
        server.log_text().contains("control: grow pool"),
        "the grow is not logged:\n{}",
        server.log_text()
    );
    for (i, (w, at)) in writers.into_iter().enumerate() {
        let out = finish(w);
        assert!(!out.contains("error") && !out.contains("No space"), "{out}");
        qemu_io_ok(port, "a", &[&format!("read -P 0x{:x} {at} 1M", 0x40 + i)]);
    }
    qemu_io_ok(port, "a", &["read -P 0x0a 0 4M"]);
    let st = pool_status(&pool);
    assert_eq!(st["data_total_bytes"], 16 << 20);
    assert_eq!(st["mode"], "write");
    assert!(server.terminate().success(), "{}", server.log_text());
    common::assert_metadata_clean(&pool.join("metadata"));
    // The new size is durable.
    assert_eq!(pool_status(&pool)["data_total_bytes"], 16 << 20);
}

#[test]
fn full_metadata_refuses_with_enospc_and_a_metadata_grow_brings_it_back() {
    if !common::require_tool("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Volumes fill the metadata: the one refused gets "no space", the pool stays writable.
    let (pool, cfg, mut server, name) = serve_with_full_metadata(dir.path(), "error", "64M");
    let p = pool.to_str().unwrap();
    let port = server.port;
    let st = pool_status(&pool);
    assert_eq!(st["mode"], "write", "{st}");
    assert!(st["metadata_free_blocks"].as_u64().unwrap() > 0, "{st}");
    // Below the metadata low-water mark (20% by default): `pool status` and the log say so.
    assert_eq!(st["metadata_low_water_crossed"], true, "{st}");
    let text = cli_ok(&["pool", "status", p]);
    assert!(
        text.contains("metadata") && text.contains("low-water mark"),
        "{text}"
    );
    assert!(
        server.log_text().contains("metadata low-water mark"),
        "{}",
        server.log_text()
    );

    // New blocks until the metadata refuses one: ENOSPC, never EIO or EPERM.
    let out = qemu_io(port, "a", &["write -P 0x22 1M 60M"]);
    assert!(out.contains("No space left on device"), "{out}");
    assert!(!out.contains("Input/output error"), "{out}");
    // Overwrites, reads, discards and flushes go on, on this connection and new ones.
    qemu_io_ok(
        port,
        "a",
        &[
            "write -P 0x33 0 1M",
            "flush",
            "read -P 0x33 0 1M",
            "discard 512k 512k",
            "flush",
        ],
    );
    assert_eq!(pool_status(&pool)["mode"], "write");

    // A metadata grow online lifts the refusal.
    cli_ok(&["pool", "grow", p, "--metadata-size", "8M"]);
    assert_eq!(pool_status(&pool)["metadata_total_blocks"], 2048);
    cli_ok(&["volume", "create", "--pool", p, &name, "--size", "1M"]);
    qemu_io_ok(
        port,
        "a",
        &["write -P 0x44 32M 16M", "read -P 0x44 32M 16M"],
    );
    assert!(server.terminate().success(), "{}", server.log_text());
    common::assert_metadata_clean(&pool.join("metadata"));
    let server = Server::start_on_pool(&pool, Some(&cfg), &dir.path().join("log2"));
    qemu_io_ok(
        server.port,
        "a",
        &[
            "read -P 0x33 0 512k",
            "read -P 0 512k 512k",
            "read -P 0x44 32M 16M",
        ],
    );
}

/// Under the queue policy a write refused for want of metadata waits instead of failing, and an
/// online metadata grow lets the queued writes finish.
#[test]
fn queue_policy_completes_writes_queued_on_full_metadata_after_a_metadata_grow() {
    if !common::require_tool("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The writers need more mapping leaves than the full metadata has left, and the data
    // device has room for all they write.
    let (pool, cfg, mut server, _) = serve_with_full_metadata(dir.path(), "queue", "512M");
    let p = pool.to_str().unwrap();
    let port = server.port;
    let refusals = |text: &str| text.matches("refused a request").count();
    let before = refusals(&server.log_text());

    // Writers needing new blocks: the metadata runs out under them and they wait.
    let writers: Vec<(Child, &str)> = [
        ("write -P 0x22 1M 240M", "read -P 0x22 1M 240M"),
        ("write -P 0x23 256M 240M", "read -P 0x23 256M 240M"),
    ]
    .into_iter()
    .map(|(w, r)| (spawn_queued_write(port, "a", w), r))
    .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while refusals(&server.log_text()) == before {
        assert!(
            Instant::now() < deadline,
            "the metadata never refused the writers:\n{}",
            server.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(200));
    let mut writers = writers;
    for (w, _) in writers.iter_mut() {
        assert!(w.try_wait().unwrap().is_none(), "a write did not wait");
    }
    assert_ne!(pool_status(&pool)["mode"], "read-only");

    cli_ok(&["pool", "grow", p, "--metadata-size", "8M"]);
    for (w, read) in writers {
        let out = finish(w);
        assert!(!out.contains("error") && !out.contains("No space"), "{out}");
        qemu_io_ok(port, "a", &[read]);
    }
    qemu_io_ok(port, "a", &["read -P 0x11 0 1M"]);
    let st = pool_status(&pool);
    assert_eq!(st["metadata_total_blocks"], 2048, "{st}");
    assert_eq!(st["mode"], "write", "{st}");
    assert!(server.terminate().success(), "{}", server.log_text());
    common::assert_metadata_clean(&pool.join("metadata"));
    let server = Server::start_on_pool(&pool, Some(&cfg), &dir.path().join("log2"));
    qemu_io_ok(
        server.port,
        "a",
        &[
            "read -P 0x11 0 1M",
            "read -P 0x22 1M 240M",
            "read -P 0x23 256M 240M",
        ],
    );
}

/// The operator's guide case: the data file grown with `truncate` is taken up by `pool grow`
/// (a restart alone leaves the pool at its old size), metadata grows, shrinking is refused.
#[test]
fn pool_grow_offline_takes_up_a_grown_data_file_and_refuses_shrinking() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let p = pool.to_str().unwrap();
    make_pool(&pool, "64M", &[("a", "16M")]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(pool.join("data"))
        .unwrap()
        .set_len(128 << 20)
        .unwrap();
    assert_eq!(pool_status(&pool)["data_total_bytes"], 64 << 20);
    cli_ok(&["pool", "grow", p]);
    assert_eq!(pool_status(&pool)["data_total_bytes"], 128 << 20);

    let meta_blocks = pool_status(&pool)["metadata_total_blocks"]
        .as_u64()
        .unwrap();
    for (flag, size) in [("--data-size", "64M"), ("--metadata-size", "1M")] {
        let out = cli(&["pool", "grow", p, flag, size]);
        assert!(!out.status.success(), "{flag} {size} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("shrinking"), "{err}");
    }
    cli_ok(&[
        "pool",
        "grow",
        p,
        "--metadata-size",
        "16M",
        "--data-size",
        "256M",
    ]);
    let st = pool_status(&pool);
    assert_eq!(st["metadata_total_blocks"], 4096, "{st}");
    assert!(meta_blocks < 4096);
    assert_eq!(st["data_total_bytes"], 256 << 20);
    assert_eq!(
        std::fs::metadata(pool.join("metadata")).unwrap().len(),
        16 << 20
    );
    common::assert_metadata_clean(&pool.join("metadata"));
}
