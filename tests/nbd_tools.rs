//! The NBD server against real clients: nbdinfo, qemu-io, qemu-img, nbdcopy, nbdsh and fio,
//! over TCP and the unix socket. Each test fails under CI=true when its tool is missing.

mod common;

use std::process::Command;

use common::memory_server::*;
use common::nbd_client::Client;
use common::nbdsh::nbdsh;
use common::pattern::{pattern, pattern_with_zero_runs};
use common::process::{run, stdout_of};
use common::qemu::{fio_verify_two_connections, nbdcopy_round_trip, nbdinfo_map, qemu_io_at};
use common::tools::*;
use thinnbd::nbd::memory::MemoryExport;

#[test]
fn nbdinfo_lists_exports_and_maps_holes() {
    if !require_tool("nbdinfo") {
        return;
    }
    let server = TestServer::start(standard_source());
    let list = stdout_of(Command::new("nbdinfo").args(["--list", &server.uri("")]));
    for (name, description) in [
        ("disk", "the main test disk"),
        ("small", "a small disk"),
        ("ro", "a read-only disk"),
    ] {
        assert!(
            list.contains(&format!("export=\"{name}\"")) || list.contains(name),
            "{list}"
        );
        assert!(
            list.contains(description),
            "missing {description:?} in:\n{list}"
        );
    }

    // 0..1 MiB written, then 256 KiB..512 KiB trimmed.
    let disk = server.export("disk");
    let mut c = Client::connect_tcp(server.port);
    c.go("disk", false);
    c.request_write(1, 0, &pattern(5, 1 << 20));
    assert_eq!(c.simple_reply(), (0, 1));
    c.request(
        thinnbd::nbd::codec::Command::Trim,
        0,
        2,
        256 << 10,
        256 << 10,
    );
    assert_eq!(c.simple_reply(), (0, 2));
    assert_eq!(disk.allocated_pages(), 192);

    let rows = nbdinfo_map(&server.unix_uri("disk"));
    assert_eq!(
        rows,
        vec![
            (0, 256 << 10, 0),
            (256 << 10, 256 << 10, 3),
            (512 << 10, 512 << 10, 0),
            (1 << 20, (64 << 20) - (1 << 20), 3)
        ],
        "{rows:?}"
    );
}

#[test]
fn qemu_io_patterns_including_unaligned_io() {
    if !require_tool("qemu-io") {
        return;
    }
    let server = TestServer::start(standard_source());
    for uri in [server.uri("disk"), server.unix_uri("disk")] {
        let cmds: Vec<String> = [
            "write -P 0xab 0 64k",
            "read -P 0xab 0 64k",
            // 512-byte I/O across the 4 KiB boundary and the 64 KiB boundary.
            "write -P 0x11 3584 1024",
            "write -P 0x22 65024 1024",
            "read -P 0xab 0 3584",
            "read -P 0x11 3584 1024",
            "read -P 0xab 4608 60416",
            "read -P 0x22 65024 1024",
            "read -P 0 66048 512",
            // Odd sizes at odd places, across a 1 MiB boundary.
            "write -P 0x33 1048064 1536",
            "read -P 0x33 1048064 1536",
            "write -z 8192 8192",
            "read -P 0 8192 8192",
            "flush",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        qemu_io_at(
            &uri,
            false,
            &cmds.iter().map(String::as_str).collect::<Vec<_>>(),
        );
    }
    // The bytes really are where qemu-io put them.
    let disk = server.export("disk");
    let mut buf = vec![0u8; 1024];
    thinnbd::nbd::ExportBackend::read(disk.as_ref(), 3072, &mut buf).unwrap();
    assert_eq!(&buf[..512], &[0xab; 512][..]);
    assert_eq!(&buf[512..], &[0x11; 512][..]);

    // Writes to the read-only export fail, reads work.
    let out = Command::new("qemu-io")
        .args(["-f", "raw", &server.uri("ro"), "-c", "write -P 1 0 4k"])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success()
            || text.contains("ermission")
            || text.contains("read-only")
            || text.contains("failed"),
        "{text}"
    );
    // qemu-io opens read-write unless told otherwise (7.2 refuses a read-only export).
    let out = Command::new("qemu-io")
        .args([
            "-r",
            "-f",
            "raw",
            &server.uri("ro"),
            "-c",
            "read -P 0 0 64k",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn qemu_img_convert_in_and_out() {
    if !require_tool("qemu-img") {
        return;
    }
    let source = standard_source();
    source.add("img", "32 MiB image", MemoryExport::new(32 << 20));
    let server = TestServer::start(source);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.raw");
    let output = dir.path().join("out.raw");
    let data = pattern_with_zero_runs(7, 32 << 20);
    std::fs::write(&input, &data).expect("write the image");
    let uri = server.uri("img");
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&input)
        .arg(&uri));
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &uri])
        .arg(&output));
    assert!(
        std::fs::read(&output).unwrap() == data,
        "image differs after the round trip"
    );
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&input)
        .arg(&uri));
}

#[test]
fn nbdcopy_in_and_out() {
    if !require_tool("nbdcopy") {
        return;
    }
    let source = standard_source();
    source.add("img", "32 MiB image", MemoryExport::new(32 << 20));
    let server = TestServer::start(source);
    let dir = tempfile::tempdir().unwrap();
    nbdcopy_round_trip(
        dir.path(),
        &pattern_with_zero_runs(8, 32 << 20),
        &server.uri("img"),
        &server.unix_uri("img"),
    );
}

#[test]
fn nbdsh_structured_reads_and_block_status() {
    if nbdsh().is_none() {
        return;
    }
    let server = TestServer::start(standard_source());
    let script = r#"
import os
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(os.environ["URI"])
assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
assert h.can_multi_conn() and h.can_trim() and h.can_zero() and h.can_fua() and h.can_cache()
assert h.get_size() == 64 * 1024 * 1024
h.pwrite(b"\xab" * 65536, 1048576)
h.trim(16384, 1048576)

chunks = []
def on_chunk(buf, offset, status, err):
    chunks.append((offset, len(buf), status))
    if status == nbd.READ_DATA:
        assert buf == b"\xab" * len(buf), "bad data at %d" % offset
    return 0

buf = h.pread_structured(3 * 65536, 1048576 - 65536, on_chunk)
assert buf == bytes(65536) + bytes(16384) + b"\xab" * (65536 - 16384) + bytes(65536), "pread"
chunks.sort()
assert chunks == [
    (1048576 - 65536, 65536 + 16384, nbd.READ_HOLE),
    (1048576 + 16384, 65536 - 16384, nbd.READ_DATA),
    (1048576 + 65536, 65536, nbd.READ_HOLE),
], chunks

entries = []
def on_extent(metacontext, offset, e, err):
    assert metacontext == nbd.CONTEXT_BASE_ALLOCATION
    entries.extend(e)
    return 0

h.block_status(3 * 65536, 1048576 - 65536, on_extent)
assert entries == [
    65536 + 16384, nbd.STATE_HOLE | nbd.STATE_ZERO,
    65536 - 16384, 0,
    65536, nbd.STATE_HOLE | nbd.STATE_ZERO,
], entries

h.zero(8192, 1048576 + 16384, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(8192, 1048576 + 16384) == bytes(8192)
h.flush()
h.shutdown()
print("nbdsh ok")
"#;
    for uri in [server.uri("disk"), server.unix_uri("disk")] {
        let mut cmd = nbdsh().expect("found above");
        let out = stdout_of(cmd.env("URI", &uri).args(["-c", script]));
        assert!(out.contains("nbdsh ok"), "{out}");
    }
}

#[test]
fn fio_randrw_with_verification_on_two_connections() {
    if !require_tool("fio") {
        return;
    }
    let server = TestServer::start(standard_source());
    // fio leaves state files in its working directory.
    let dir = tempfile::tempdir().unwrap();
    fio_verify_two_connections(&server.uri("disk"), dir.path(), 10);
    assert!(server.is_running());
}
