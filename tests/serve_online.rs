//! Pool administration while `thinnbd serve` runs: a snapshot taken while fio writes to its
//! origin, volume create/resize/delete through the control socket, a clean pool after the
//! graceful stop, and the nbdcopy snapshot backup example.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::nbd_client::Client;
use common::process::{run, run_failing, stdout_of};
use common::qemu::qemu_io_at;
use common::server::*;
use common::tools::*;

const MIB: u64 = 1 << 20;

#[test]
fn snapshot_while_fio_writes_to_the_origin() {
    if !require_tools(&["qemu-io", "fio", "nbdcopy"]) {
        return;
    }
    let pool = TestPool::create("1G");
    pool.create_volume("origin", "256M");
    let mut server = pool.serve();
    let uri = server.uri("origin");

    // The marker: 0..8 MiB, which fio never touches.
    qemu_io_at(&uri, false, &["write -P 0x6d 0 8M", "flush"]);
    let marker_bytes = pool.mapped_bytes("origin");
    assert_eq!(marker_bytes, 8 * MIB);

    // fio rewrites 64..192 MiB of the origin over two connections for 30 s.
    let work = pool.tmp.path().join("fio");
    std::fs::create_dir(&work).expect("mkdir");
    let mut fio = Command::new("fio")
        .current_dir(&work)
        .args([
            "--name=writer",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=8",
            "--numjobs=2",
            "--offset=64m",
            "--size=64m",
            "--offset_increment=64m",
            "--time_based",
            "--runtime=30",
            "--group_reporting",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start fio");
    // Wait (bounded) until fio's writes are provisioning blocks.
    let deadline = Instant::now() + Duration::from_secs(120);
    while pool.mapped_bytes("origin") <= marker_bytes {
        assert!(
            fio.try_wait().expect("try_wait").is_none(),
            "fio ended before writing anything"
        );
        assert!(Instant::now() < deadline, "fio wrote nothing in 120 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    // A connection opened before the snapshot and used after it must break the sharing too.
    let (mut early, _, _) = Client::open(server.port, "origin");
    assert_eq!(early.read_at(1, 0, 4096).expect("read"), vec![0x6d; 4096]);
    assert!(fio.try_wait().expect("try_wait").is_none());
    let out = cli_ok(&["snapshot", "--pool", pool.dir_str(), "origin", "snap"]);
    assert!(out.contains("created snapshot snap of origin"), "{out}");
    let fio_ran_past_snapshot = fio.try_wait().expect("try_wait").is_none();

    // The snapshot holds the marker, and nothing fio writes afterwards reaches it: two copies of
    // the whole snapshot, one taken while fio still runs and one after, are identical.
    let snap_uri = server.uri("snap");
    qemu_io_at(&snap_uri, true, &["read -P 0x6d 0 8M"]);
    assert_eq!(early.write_at(2, 4 << 20, &[0x5e; 4096]), 0);
    assert_eq!(
        early.read_at(3, 4 << 20, 4096).expect("read"),
        vec![0x5e; 4096]
    );
    early.disconnect();
    qemu_io_at(&snap_uri, true, &["read -P 0x6d 0 8M"]);
    let copy1 = pool.tmp.path().join("snap1.raw");
    let copy2 = pool.tmp.path().join("snap2.raw");
    run(Command::new("nbdcopy").arg(&snap_uri).arg(&copy1));

    let fio_out = fio.wait_with_output().expect("wait for fio");
    let fio_text = String::from_utf8_lossy(&fio_out.stdout);
    assert!(
        fio_out.status.success() && fio_text.contains("err= 0"),
        "fio failed:\n{fio_text}\n{}",
        String::from_utf8_lossy(&fio_out.stderr)
    );
    assert!(
        fio_ran_past_snapshot,
        "fio had finished before the snapshot returned; the test did not overlap them"
    );
    run(Command::new("nbdcopy")
        .arg(server.unix_uri("snap"))
        .arg(&copy2));
    run(Command::new("cmp").arg(&copy1).arg(&copy2));
    let snap = std::fs::read(&copy1).expect("read copy");
    assert!(snap[..8 << 20].iter().all(|&b| b == 0x6d), "marker area");
    // What lay outside fio's range and the marker was never written: zeros.
    assert!(snap[8 << 20..64 << 20].iter().all(|&b| b == 0));
    assert!(snap[192 << 20..].iter().all(|&b| b == 0));

    // Overwriting the marker on the origin leaves the snapshot's copy alone.
    qemu_io_at(&uri, false, &["write -P 0x99 0 8M", "flush"]);
    qemu_io_at(&uri, true, &["read -P 0x99 0 8M"]);
    qemu_io_at(&snap_uri, true, &["read -P 0x6d 0 8M"]);

    // Deleting the origin leaves the snapshot whole (the blocks they shared stay referenced).
    delete_when_idle(pool.dir_str(), "origin");
    run(Command::new("nbdcopy")
        .arg(&snap_uri)
        .arg(pool.tmp.path().join("snap3.raw")));
    run(Command::new("cmp")
        .arg(&copy1)
        .arg(pool.tmp.path().join("snap3.raw")));

    assert!(server.is_running());
    server.stop();
    assert_pool_clean(&pool.dir);
}

/// `thinnbd volume delete`, retried while the server still counts a client that has just
/// disconnected.
fn delete_when_idle(pool: &str, name: &str) {
    cli_ok_when_idle(&["volume", "delete", "--pool", pool, name]);
}

/// Export names from `nbdinfo --list`.
fn exports(uri: &str) -> Vec<String> {
    let list = stdout_of(Command::new("nbdinfo").args(["--list", uri]));
    list.lines()
        .filter_map(|l| l.strip_prefix("export=\"")?.strip_suffix("\":"))
        .map(str::to_owned)
        .collect()
}

fn nbdinfo_size(uri: &str) -> u64 {
    let out = stdout_of(Command::new("nbdinfo").args(["--size", uri]));
    out.trim()
        .parse()
        .unwrap_or_else(|e| panic!("nbdinfo --size said {out:?}: {e}"))
}

#[test]
fn volume_commands_act_online_and_delete_waits_for_clients() {
    if !require_tools(&["nbdinfo", "qemu-io"]) {
        return;
    }
    let pool = TestPool::create("1G");
    pool.create_volume("keep", "32M");
    let server = pool.serve();
    let dir = pool.dir_str();
    assert_eq!(exports(&server.uri("")), ["keep"]);

    // Create: a new export at once, usable by clients.
    let out = cli_ok(&["volume", "create", "--pool", dir, "extra", "--size", "32M"]);
    assert!(out.contains("created volume extra"), "{out}");
    assert_eq!(exports(&server.uri("")), ["keep", "extra"]);
    qemu_io_at(
        &server.uri("extra"),
        false,
        &["write -P 0x42 0 1M", "read -P 0x42 0 1M"],
    );

    // Resize: new connections see the new size, and the data stays.
    cli_ok(&["volume", "resize", "--pool", dir, "extra", "--size", "96M"]);
    assert_eq!(nbdinfo_size(&server.uri("extra")), 96 * MIB);
    qemu_io_at(
        &server.uri("extra"),
        false,
        &[
            "read -P 0x42 0 1M",
            "read -P 0 32M 1M",
            "write -P 0x43 95M 1M",
        ],
    );
    let list: serde_json::Value =
        serde_json::from_str(&cli_ok(&["volume", "list", "--pool", dir, "--json"])).unwrap();
    let extra = list
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "extra")
        .expect("extra listed");
    assert_eq!(extra["size"], 96 * MIB);
    // Shrinking: refused without --force, and refused even with it while a client has the
    // volume open (the client would lose data under it); the client reads on undisturbed.
    let (mut held, _, _) = Client::open(server.port, "extra");
    assert_eq!(
        held.read_at(1, 95 * MIB, 512).expect("read"),
        vec![0x43; 512]
    );
    let err = run_failing(
        Command::new(BIN).args(["volume", "resize", "--pool", dir, "extra", "--size", "16M"]),
    );
    assert!(err.contains("--force"), "{err}");
    let err = run_failing(Command::new(BIN).args([
        "volume", "resize", "--pool", dir, "extra", "--size", "16M", "--force",
    ]));
    assert!(
        err.contains("in use") && err.contains("disconnect"),
        "{err}"
    );
    assert_eq!(nbdinfo_size(&server.unix_uri("extra")), 96 * MIB);
    assert_eq!(
        held.read_at(2, 95 * MIB, 512).expect("read"),
        vec![0x43; 512]
    );
    held.disconnect();
    // With the client gone, --force shrinks, and the cut-off data is gone (growing again shows
    // zeros there).
    cli_ok_when_idle(&[
        "volume", "resize", "--pool", dir, "extra", "--size", "16M", "--force",
    ]);
    assert_eq!(nbdinfo_size(&server.unix_uri("extra")), 16 * MIB);
    qemu_io_at(&server.uri("extra"), true, &["read -P 0x42 0 1M"]);
    cli_ok(&["volume", "resize", "--pool", dir, "extra", "--size", "96M"]);
    qemu_io_at(&server.uri("extra"), true, &["read -P 0 16M 80M"]);
    cli_ok_when_idle(&[
        "volume", "resize", "--pool", dir, "extra", "--size", "-80M", "--force",
    ]);

    // Delete with a client connected: refused as busy, nothing changes.
    let (mut client, size, _) = Client::open(server.port, "extra");
    assert_eq!(size, 16 * MIB);
    assert_eq!(client.read_at(1, 0, 512).expect("read"), vec![0x42; 512]);
    let err = run_failing(Command::new(BIN).args(["volume", "delete", "--pool", dir, "extra"]));
    assert!(err.contains("in use"), "{err}");
    assert_eq!(exports(&server.uri("")), ["keep", "extra"]);
    assert_eq!(client.read_at(2, 512, 512).expect("read"), vec![0x42; 512]);

    // The client leaves: the delete goes through (once the server has seen the disconnect).
    client.disconnect();
    delete_when_idle(dir, "extra");
    assert_eq!(exports(&server.uri("")), ["keep"]);
    let gone = run_failing(Command::new("nbdinfo").arg(server.uri("extra")));
    assert!(!gone.is_empty());

    // A name can be reused, and the new volume starts empty.
    cli_ok(&["volume", "create", "--pool", dir, "extra", "--size", "8M"]);
    qemu_io_at(&server.uri("extra"), true, &["read -P 0 0 8M"]);
    server.stop();
    assert_pool_clean(&pool.dir);
    // Offline, the same commands work on the pool directly.
    let list = cli_ok(&["volume", "list", "--pool", dir]);
    assert!(list.contains("keep") && list.contains("extra"), "{list}");
}

#[test]
fn pool_is_clean_after_a_graceful_stop_under_load() {
    if !require_tools(&["fio", "thin_check"]) {
        return;
    }
    let pool = TestPool::create("1G");
    pool.create_volume("a", "64M");
    pool.create_volume("b", "64M");
    cli_ok(&["snapshot", "--pool", pool.dir_str(), "a", "a-snap"]);
    let server = pool.serve();
    let work = pool.tmp.path().join("fio");
    std::fs::create_dir(&work).expect("mkdir");
    for (vol, seed) in [("a", "1"), ("a-snap", "2"), ("b", "3")] {
        run(Command::new("fio").current_dir(&work).args([
            "--name=fill",
            "--ioengine=nbd",
            &format!("--uri={}", server.uri(vol)),
            "--rw=randwrite",
            "--bs=16k",
            "--iodepth=8",
            "--size=32m",
            &format!("--randseed={seed}"),
            "--io_size=16m",
        ]));
    }
    // Leave a client connected over the stop: the server must still close the pool cleanly.
    let (mut c, _, _) = Client::open(server.port, "b");
    assert_eq!(c.write_at(1, 0, &[7u8; 4096]), 0);
    server.stop();
    assert_pool_clean(&pool.dir);
    // And the pool serves again with the data in place.
    let server = pool.serve();
    let (mut c, _, _) = Client::open(server.port, "b");
    assert_eq!(c.read_at(1, 0, 4096).expect("read"), vec![7u8; 4096]);
    c.disconnect();
    server.stop();
    assert_pool_clean(&pool.dir);
}

/// Runs examples/nbdcopy-snapshot-backup.sh with a fixed server address.
fn backup_example(pool: &Path, volume: &str, out: &Path, port: u16) -> std::process::Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/nbdcopy-snapshot-backup.sh");
    Command::new("sh")
        .arg(&script)
        .arg(pool)
        .arg(volume)
        .arg(out)
        .env("PATH", path_with_bin())
        .env("THINNBD_PORT", port.to_string())
        .stdin(Stdio::null())
        .output()
        .expect("run the backup example")
}

#[test]
fn nbdcopy_snapshot_backup_example() {
    if !require_tools(&["nbdcopy", "qemu-io"]) {
        return;
    }
    let pool = TestPool::create("1G");
    pool.create_volume("data", "64M");
    let server = pool.serve();
    qemu_io_at(
        &server.uri("data"),
        false,
        &["write -P 0x31 0 2M", "write -P 0x32 40M 3M", "flush"],
    );
    let image = pool.tmp.path().join("backup.img");
    let out = backup_example(&pool.dir, "data", &image, server.port);
    assert!(
        out.status.success(),
        "backup example failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let img = std::fs::read(&image).expect("backup image");
    assert_eq!(img.len() as u64, 64 * MIB);
    assert!(img[..2 << 20].iter().all(|&b| b == 0x31));
    assert!(img[2 << 20..40 << 20].iter().all(|&b| b == 0));
    assert!(img[40 << 20..43 << 20].iter().all(|&b| b == 0x32));
    assert!(img[43 << 20..].iter().all(|&b| b == 0));
    // The temporary snapshot is gone again; only the volume is left.
    let list = cli_ok(&["volume", "list", "--pool", pool.dir_str(), "--json"]);
    let names: Vec<String> = serde_json::from_str::<serde_json::Value>(&list)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["data"]);
    // A missing volume: the example fails and leaves nothing behind.
    let out = backup_example(
        &pool.dir,
        "nosuch",
        &pool.tmp.path().join("x.img"),
        server.port,
    );
    assert!(!out.status.success());
    server.stop();
    assert_pool_clean(&pool.dir);
}
