//! `thinnbd serve` on a pool in RADOS (`rados:POOL/NAME`, the test cluster of
//! tests/ceph/micro-cluster.sh) against real NBD clients: qemu-io patterns, an nbdcopy round
//! trip, fio verifying from two connections, snapshots of snapshots taken while served,
//! discards that remove data objects and show as holes in `nbdinfo --map`, a full thin pool
//! answering ENOSPC, and the owner line of `pool status`. After each stop the pool checks clean
//! (`thinnbd check`, and the metadata exported with `pool export-metadata` through thin_check
//! and verify_meta.py). Under CI=true a missing tool, Ceph, or RADOS support fails the test.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::ceph::{rados_pool, RadosPool};
use common::pattern::pattern;
use common::process::stdout_of;
use common::qemu::{
    discard_one_mib_of_four, fio_verify_two_connections, nbdcopy_round_trip, qemu_io, qemu_io_at,
    ACROSS_BOUNDARIES, ACROSS_BOUNDARIES_READ_BACK,
};
use common::server::Server;
use common::tools::require_tools;

const MIB: u64 = 1 << 20;
/// The thin pool's name inside each test's RADOS pool.
const THIN: &str = "tp";

/// The RADOS pool of one test (named after it) with a thin pool in it holding `volumes`, plus
/// a scratch dir for logs and files; None after a skip note.
fn setup(
    test: &str,
    data_size: &str,
    volumes: &[(&str, &str)],
) -> Option<(RadosPool, String, tempfile::TempDir)> {
    let rados = rados_pool(test)?;
    let location = rados.create_thin_pool(THIN, data_size, &[], volumes);
    Some((rados, location, tempfile::tempdir().expect("temp dir")))
}

fn serve(rados: &RadosPool, location: &str, scratch: &Path) -> Server {
    rados
        .cluster
        .serve(location, &[], &scratch.join("serve.log"))
}

/// Stops the server gracefully and checks the pool it leaves.
fn stop_and_check(server: Server, rados: &RadosPool, scratch: &Path) {
    server.stop();
    rados.assert_clean(THIN, scratch);
}

#[test]
fn qemu_io_patterns_across_block_boundaries_and_a_second_client() {
    if !require_tools(&["qemu-io"]) {
        return;
    }
    let Some((rados, location, scratch)) = setup("clients-qemu-io", "1G", &[("vol", "64M")]) else {
        return;
    };
    let server = serve(&rados, &location, scratch.path());
    // Partial writes of data objects at an offset, across object (= pool block) boundaries.
    qemu_io_at(&server.uri("vol"), false, &ACROSS_BOUNDARIES);
    qemu_io_at(&server.uri("vol"), true, &ACROSS_BOUNDARIES_READ_BACK);
    stop_and_check(server, &rados, scratch.path());
    // The data is in RADOS, not in the server: a new server reads it back.
    let server = serve(&rados, &location, scratch.path());
    qemu_io_at(
        &server.uri("vol"),
        true,
        &["read -P 0x11 3584 1024", "read -P 0x33 196096 1024"],
    );
    stop_and_check(server, &rados, scratch.path());
}

#[test]
fn nbdcopy_round_trip_of_a_random_image() {
    if !require_tools(&["nbdcopy"]) {
        return;
    }
    let Some((rados, location, scratch)) = setup("clients-nbdcopy", "1G", &[("img", "64M")]) else {
        return;
    };
    let server = serve(&rados, &location, scratch.path());
    let uri = server.uri("img");
    nbdcopy_round_trip(scratch.path(), &pattern(12, 64 << 20), &uri, &uri);
    // Every 64 KiB block of the image holds data: one object each.
    assert_eq!(rados.data_objects(THIN).len(), 1024);
    stop_and_check(server, &rados, scratch.path());
}

#[test]
fn fio_crc32c_verify_on_two_connections() {
    if !require_tools(&["fio"]) {
        return;
    }
    let Some((rados, location, scratch)) = setup("clients-fio", "1G", &[("fio", "64M")]) else {
        return;
    };
    let mut server = serve(&rados, &location, scratch.path());
    let work = scratch.path().join("fio");
    std::fs::create_dir(&work).expect("mkdir");
    fio_verify_two_connections(&server.uri("fio"), &work, 20);
    assert!(server.is_running(), "server died:\n{}", server.log_text());
    assert!(!rados.data_objects(THIN).is_empty());
    stop_and_check(server, &rados, scratch.path());
}

#[test]
fn snapshots_of_snapshots_taken_while_served() {
    if !require_tools(&["qemu-io", "nbdinfo"]) {
        return;
    }
    let Some((rados, location, scratch)) = setup("clients-snap", "1G", &[("vol", "16M")]) else {
        return;
    };
    let cluster = rados.cluster;
    let server = serve(&rados, &location, scratch.path());
    let vol = server.uri("vol");
    qemu_io_at(&vol, false, &["write -P 0xa1 0 4M", "flush"]);
    let out = cluster.thinnbd_ok(&["snapshot", "--pool", &location, "vol", "s1"]);
    assert!(out.contains("created snapshot s1 of vol"), "{out}");
    // The origin moves on; s1 must not see it (copy-on-write of shared data objects).
    qemu_io_at(&vol, false, &["write -P 0xb2 1M 1M", "flush"]);
    // A snapshot of the snapshot, then a write to the first snapshot.
    let out = cluster.thinnbd_ok(&["snapshot", "--pool", &location, "s1", "s2"]);
    assert!(out.contains("created snapshot s2 of s1"), "{out}");
    qemu_io_at(&server.uri("s1"), false, &["write -P 0xc3 2M 64k", "flush"]);

    qemu_io_at(
        &vol,
        true,
        &[
            "read -P 0xa1 0 1M",
            "read -P 0xb2 1M 1M",
            "read -P 0xa1 2M 2M",
        ],
    );
    qemu_io_at(
        &server.uri("s1"),
        true,
        &[
            "read -P 0xa1 0 2M",
            "read -P 0xc3 2M 64k",
            "read -P 0xa1 2162688 1984k",
        ],
    );
    qemu_io_at(&server.uri("s2"), true, &["read -P 0xa1 0 4M"]);
    let list = stdout_of(Command::new("nbdinfo").args(["--list", &server.uri("")]));
    for name in ["vol", "s1", "s2"] {
        assert!(list.contains(&format!("export=\"{name}\":")), "{list}");
    }
    stop_and_check(server, &rados, scratch.path());
}

/// Polls (bounded) until the thin pool has `want` data objects; returns the last count.
fn wait_for_data_objects(rados: &RadosPool, want: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n = rados.data_objects(THIN).len();
        if n == want || Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn discard_removes_data_objects_and_leaves_holes_in_the_map() {
    if !require_tools(&["qemu-io", "nbdinfo"]) {
        return;
    }
    let Some((rados, location, scratch)) = setup("clients-discard", "1G", &[("vol", "64M")]) else {
        return;
    };
    let server = serve(&rados, &location, scratch.path());
    let uri = server.uri("vol");
    assert!(
        rados.data_objects(THIN).is_empty(),
        "objects before any write"
    );
    discard_one_mib_of_four(
        &uri,
        &uri,
        // 4 MiB of 64 KiB pool blocks: 64 data objects.
        || assert_eq!(rados.data_objects(THIN).len(), 64),
        // The 16 whole blocks discarded are freed by the commit of the flush and their
        // objects removed; the rest keep theirs.
        || {
            assert_eq!(
                wait_for_data_objects(&rados, 48),
                48,
                "data objects after the discard"
            )
        },
    );
    let status = rados.status(THIN);
    let vol = status["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == "vol")
        .unwrap_or_else(|| panic!("no volume vol in {status}"));
    assert_eq!(vol["mapped_bytes"], 3 * MIB, "{status}");
    stop_and_check(server, &rados, scratch.path());
}

#[test]
fn a_full_thin_pool_gives_enospc_not_eio() {
    if !require_tools(&["qemu-io"]) {
        return;
    }
    // 64 blocks of 64 KiB behind a 16 MiB volume.
    let Some((rados, location, scratch)) = setup("clients-full", "4M", &[("a", "16M")]) else {
        return;
    };
    let config = scratch.path().join("error.toml");
    std::fs::write(
        &config,
        "[pool]\nno_space_policy = \"error\"\nlow_water_mark = \"64K\"\n\
         create_if_missing = false\n",
    )
    .expect("write config");
    let config = config.to_str().expect("utf-8 path");
    let server = rados.cluster.serve(
        &location,
        &["--config", config],
        &scratch.path().join("serve.log"),
    );
    let port = server.port;
    qemu_io_at(&server.uri("a"), false, &["write -P 0x11 0 1M"]);
    let out = qemu_io(port, "a", &["write -P 0x22 1M 8M"]);
    assert!(out.contains("No space left on device"), "{out}");
    assert!(
        !out.contains("Input/output error"),
        "ENOSPC became EIO:\n{out}"
    );
    assert_eq!(rados.status(THIN)["mode"], "out-of-space");
    // Provisioned blocks still take writes.
    qemu_io_at(
        &server.uri("a"),
        false,
        &["write -P 0x33 0 1M", "read -P 0x33 0 1M"],
    );
    assert_eq!(rados.data_objects(THIN).len(), 64);
    stop_and_check(server, &rados, scratch.path());
}

/// A RADOS pool made without `--block-size` has 1 MiB blocks, one object each: a 1 MiB
/// write is one object, a 4 KiB write elsewhere one more, the rest reads zeros.
#[test]
fn a_new_rados_pool_has_one_mebibyte_blocks_by_default() {
    if !require_tools(&["qemu-io"]) {
        return;
    }
    let Some(rados) = rados_pool("clients-default-block") else {
        return;
    };
    let scratch = tempfile::tempdir().expect("temp dir");
    let location = rados.location(THIN);
    rados
        .cluster
        .thinnbd_ok(&["pool", "create", &location, "--data-size", "64M"]);
    rados.cluster.thinnbd_ok(&[
        "volume", "create", "--pool", &location, "vol", "--size", "8M",
    ]);
    assert_eq!(rados.status(THIN)["block_size"], MIB);
    let server = serve(&rados, &location, scratch.path());
    qemu_io_at(
        &server.uri("vol"),
        false,
        &["write -P 0x5a 0 1M", "write -P 0x5b 3M 4K"],
    );
    assert_eq!(rados.data_objects(THIN).len(), 2);
    qemu_io_at(
        &server.uri("vol"),
        true,
        &[
            "read -P 0x5a 0 1M",
            "read -P 0 1M 2M",
            "read -P 0x5b 3M 4K",
            "read -P 0 3076K 1020K",
        ],
    );
    stop_and_check(server, &rados, scratch.path());
}

#[test]
fn status_names_the_serving_process_as_owner() {
    let Some((rados, location, scratch)) = setup("clients-status", "1G", &[("vol", "16M")]) else {
        return;
    };
    let server = serve(&rados, &location, scratch.path());
    let pid = server.pid();
    // Read by another process while the pool is served: no lock needed.
    let text = rados.cluster.thinnbd_ok(&["pool", "status", &location]);
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("owner:"))
        .unwrap_or_else(|| panic!("no owner line in:\n{text}"));
    assert!(line.contains("client."), "{line}");
    assert!(line.contains(&format!("pid {pid}")), "{line}");
    assert!(line.contains("since"), "{line}");
    let owner = &rados.status(THIN)["owner"];
    assert!(
        owner.to_string().contains(&pid.to_string()),
        "JSON owner {owner} does not name pid {pid}"
    );
    // The pool's objects are where rados-api says.
    let objects = rados.ls(&format!("{THIN}."));
    for name in ["tp.pool", "tp.volumes", "tp.owner"] {
        assert!(
            objects.iter().any(|o| o == name),
            "no {name} in {objects:?}"
        );
    }
    assert!(
        objects.iter().any(|o| o.starts_with("tp.meta.")),
        "no metadata objects in {objects:?}"
    );
    // Served elsewhere: a command that needs the lock is refused at once, naming the owner.
    let image = scratch.path().join("meta.img");
    let err = rados.cluster.thinnbd_failing(&[
        "pool",
        "export-metadata",
        &location,
        image.to_str().expect("utf-8 path"),
    ]);
    assert!(err.contains(&pid.to_string()), "{err}");
    stop_and_check(server, &rados, scratch.path());
}
