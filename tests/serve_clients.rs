//! `thinnbd serve` (the real binary, a real pool) against real NBD clients: nbdinfo, qemu-io,
//! qemu-img, nbdcopy, nbdsh and fio. Each test fails under CI=true when its tool is missing.

mod common;

use std::process::Command;

use common::nbd_client::Client;
use common::nbdsh::{nbdsh, EDGES_OF_THE_EXPORT};
use common::pattern::pattern_with_zero_runs;
use common::process::{run, stdout_of};
use common::qemu::{
    discard_one_mib_of_four, fio_verify_two_connections, nbdcopy_round_trip, qemu_io_at,
    ACROSS_BOUNDARIES, ACROSS_BOUNDARIES_READ_BACK,
};
use common::server::*;
use common::tools::*;

const MIB: u64 = 1 << 20;

#[test]
fn nbdinfo_lists_every_volume_with_its_description() {
    if !require_tool("nbdinfo") {
        return;
    }
    let pool = TestPool::create("2G");
    pool.create_volume("alpha", "512M");
    pool.create_volume("beta", "64M");
    pool.create_volume("gamma", "1G");
    cli_ok(&[
        "snapshot",
        "--pool",
        pool.dir_str(),
        "alpha",
        "alpha-snap",
        "--read-only",
    ]);
    let server = pool.serve();
    for uri in [server.uri(""), server.unix_uri("")] {
        let list = stdout_of(Command::new("nbdinfo").args(["--list", &uri]));
        for (name, description, size) in [
            ("alpha", "thin volume alpha, 512 MiB", 512 * MIB),
            ("beta", "thin volume beta, 64 MiB", 64 * MIB),
            ("gamma", "thin volume gamma, 1024 MiB", 1024 * MIB),
            (
                "alpha-snap",
                "thin volume alpha-snap, 512 MiB, snapshot of alpha, read-only",
                512 * MIB,
            ),
        ] {
            // nbdinfo prints `export="NAME":` then indented `description: ...` and
            // `export-size: N` lines for each export.
            let start = list
                .find(&format!("export=\"{name}\":"))
                .unwrap_or_else(|| panic!("no export {name} in:\n{list}"));
            let block: String = list[start..]
                .lines()
                .skip(1)
                .take_while(|l| l.starts_with(char::is_whitespace))
                .collect::<Vec<_>>()
                .join("\n");
            assert!(
                block.contains(&format!("description: {description}")),
                "{name}: want description {description:?} in:\n{block}"
            );
            assert!(
                block.contains(&format!("export-size: {size}")),
                "{name}: want size {size} in:\n{block}"
            );
        }
        assert_eq!(
            list.matches("export=\"").count(),
            4,
            "exactly the four volumes:\n{list}"
        );
    }
    let list = stdout_of(Command::new("nbdinfo").args(["--list", &server.uri("")]));
    assert!(list.contains("is_read_only: true"), "{list}");
    server.stop();
}

#[test]
fn qemu_io_patterns_including_unaligned_io_across_block_boundaries() {
    if !require_tool("qemu-io") {
        return;
    }
    let pool = TestPool::create("1G");
    pool.create_volume("vol", "64M");
    let server = pool.serve();
    qemu_io_at(&server.uri("vol"), false, &ACROSS_BOUNDARIES);
    // A second client over the unix socket sees what the first wrote.
    qemu_io_at(&server.unix_uri("vol"), true, &ACROSS_BOUNDARIES_READ_BACK);
    // And so does a raw client, byte for byte.
    let (mut c, size, _) = Client::open(server.port, "vol");
    assert_eq!(size, 64 * MIB);
    let got = c.read_at(1, 65024 - 512, 2048).expect("read");
    assert_eq!(&got[..512], &[0xab; 512][..]);
    assert_eq!(&got[512..1536], &[0x22; 1024][..]);
    assert_eq!(&got[1536..], &[0xab; 512][..]);
    c.disconnect();
    server.stop();
}

fn assert_files_equal(a: &std::path::Path, b: &std::path::Path) {
    run(Command::new("cmp").arg(a).arg(b));
}

#[test]
fn qemu_img_convert_256m_in_and_out() {
    if !require_tool("qemu-img") {
        return;
    }
    let pool = TestPool::create("1G");
    pool.create_volume("img", "256M");
    let server = pool.serve();
    let input = pool.tmp.path().join("in.raw");
    let output = pool.tmp.path().join("out.raw");
    std::fs::write(&input, pattern_with_zero_runs(11, 256 << 20)).expect("write the image");
    let uri = server.uri("img");
    // -n: the target exists (the volume); qemu-img must not try to create it.
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&input)
        .arg(&uri));
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &server.unix_uri("img")])
        .arg(&output));
    assert_files_equal(&input, &output);
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&input)
        .arg(&uri));
    server.stop();
}

#[test]
fn nbdcopy_in_and_out() {
    if !require_tool("nbdcopy") {
        return;
    }
    let pool = TestPool::create("1G");
    pool.create_volume("img", "128M");
    let server = pool.serve();
    nbdcopy_round_trip(
        pool.tmp.path(),
        &pattern_with_zero_runs(12, 128 << 20),
        &server.uri("img"),
        &server.unix_uri("img"),
    );
    server.stop();
}

#[test]
fn trim_leaves_a_hole_in_the_map_and_frees_pool_space() {
    if !require_tools(&["qemu-io", "nbdinfo"]) {
        return;
    }
    let pool = TestPool::create("1G");
    pool.create_volume("vol", "64M");
    let server = pool.serve();
    discard_one_mib_of_four(
        &server.uri("vol"),
        &server.unix_uri("vol"),
        || assert_eq!(pool.mapped_bytes("vol"), 4 * MIB),
        || assert_eq!(pool.mapped_bytes("vol"), 3 * MIB),
    );
    server.stop();
}

/// Runs an nbdsh script (which connects to `$URI` and prints "nbdsh ok") against `export`
/// over TCP and over the unix socket.
fn nbdsh_script_over_tcp_and_unix(server: &Server, export: &str, script: &str) {
    for uri in [server.uri(export), server.unix_uri(export)] {
        let mut cmd = nbdsh().expect("nbdsh");
        let out = stdout_of(cmd.env("URI", &uri).args(["-c", script]));
        assert!(out.contains("nbdsh ok"), "{out}");
    }
}

#[test]
fn nbdsh_structured_reads_and_block_status() {
    let Some(_) = nbdsh() else {
        return;
    };
    let pool = TestPool::create("1G");
    pool.create_volume("vol", "64M");
    let server = pool.serve();
    // Pool blocks are 64 KiB. Two blocks written at 1 MiB, the first trimmed again: from
    // 1M-64K there is hole, hole, data, hole. Servers may split or merge chunks and extents
    // freely, so adjacent pieces of the same kind are merged before comparing.
    let script = r#"
import os
B = 65536
M = 1048576
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(os.environ["URI"])
assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
assert h.can_trim() and h.can_zero() and h.can_flush()
assert h.get_size() == 64 * M
h.pwrite(b"\xab" * (2 * B), M)
h.trim(B, M)
h.flush()

def merge(pieces):
    out = []
    for off, n, kind in sorted(pieces):
        if out and out[-1][2] == kind and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + n, kind)
        else:
            out.append((off, n, kind))
    return out

chunks = []
def on_chunk(buf, offset, status, err):
    chunks.append((offset, len(buf), status))
    if status == nbd.READ_DATA:
        assert buf == b"\xab" * len(buf), "bad data at %d" % offset
    return 0

buf = h.pread_structured(4 * B, M - B, on_chunk)
assert buf == bytes(2 * B) + b"\xab" * B + bytes(B), "pread contents"
got = merge(chunks)
assert got == [
    (M - B, 2 * B, nbd.READ_HOLE),
    (M + B, B, nbd.READ_DATA),
    (M + 2 * B, B, nbd.READ_HOLE),
], got

entries = []
def on_extent(metacontext, offset, e, err):
    assert metacontext == nbd.CONTEXT_BASE_ALLOCATION
    entries.extend(e)
    return 0

h.block_status(4 * B, M - B, on_extent)
pieces = []
off = M - B
for i in range(0, len(entries), 2):
    pieces.append((off, entries[i], entries[i + 1]))
    off += entries[i]
assert off >= M + 3 * B, pieces
got = [p for p in merge(pieces) if p[0] < M + 3 * B]
HZ = nbd.STATE_HOLE | nbd.STATE_ZERO
assert got[:2] == [(M - B, 2 * B, HZ), (M + B, B, 0)], got
assert got[2][0] == M + 2 * B and got[2][2] == HZ, got

# Never provisioned: one hole|zero extent to the end of the request.
entries.clear()
h.block_status(8 * M, 32 * M, on_extent)
assert entries[1] == HZ and entries[0] >= B, entries

# A plain read of a hole is zeros.
assert h.pread(B, 40 * M) == bytes(B)
h.shutdown()
print("nbdsh ok")
"#;
    nbdsh_script_over_tcp_and_unix(&server, "vol", script);
    server.stop();
}

#[test]
fn fio_randrw_crc32c_verify_on_two_connections_for_30s() {
    if !require_tool("fio") {
        return;
    }
    let pool = TestPool::create("1G");
    pool.create_volume("fio", "64M");
    let mut server = pool.serve();
    let work = pool.tmp.path().join("fio");
    std::fs::create_dir(&work).expect("mkdir");
    fio_verify_two_connections(&server.uri("fio"), &work, 30);
    assert!(server.is_running(), "server died:\n{}", server.log_text());
    assert!(pool.mapped_bytes("fio") > 0);
    server.stop();
}

/// The -drive value printed by examples/qemu-drive.sh, minus the keys only `-drive` knows (`if`,
/// `cache`), as `qemu-io --image-opts` takes it.
fn drive_opts(args: &[&str]) -> String {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/qemu-drive.sh");
    let line = stdout_of(
        Command::new("bash")
            .arg(script)
            .arg("--print-drive")
            .args(args),
    );
    line.trim()
        .split(',')
        .filter(|kv| !kv.starts_with("if=") && !kv.starts_with("cache="))
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn qemu_drive_example_line_reaches_the_volume_and_passes_discards() {
    if !require_tool("qemu-io") {
        return;
    }
    let pool = TestPool::create("1G");
    pool.create_volume("vm", "64M");
    let server = pool.serve();
    let port = server.port.to_string();
    let tcp = drive_opts(&["--port", &port, "--export", "vm"]);
    let socket = server.socket.as_ref().expect("socket").to_str().unwrap();
    let unix = drive_opts(&["--socket", socket, "--export", "vm"]);
    assert!(tcp.contains("discard=unmap"), "{tcp}");
    run(Command::new("qemu-io")
        .args(["-t", "none", "--image-opts", &tcp])
        .args(["-c", "write -P 7 0 1M", "-c", "flush"]));
    assert_eq!(pool.mapped_bytes("vm"), MIB);
    // With discard=unmap, a discard through QEMU gives the block back to the pool.
    let out = stdout_of(
        Command::new("qemu-io")
            .args(["-t", "none", "--image-opts", &unix])
            .args(["-c", "discard 0 64k", "-c", "read -P 0 0 64k"])
            .args(["-c", "read -P 7 64k 960k"]),
    );
    assert!(!out.contains("fail") && !out.contains("mismatch"), "{out}");
    assert_eq!(pool.mapped_bytes("vm"), MIB - (64 << 10));
    server.stop();
}

#[test]
fn nbdsh_gets_enospc_past_the_end_and_48_mib_requests_on_the_default_config() {
    let Some(_) = nbdsh() else {
        return;
    };
    let pool = TestPool::create("1G");
    pool.create_volume("vol", "64M");
    let server = pool.serve();
    nbdsh_script_over_tcp_and_unix(&server, "vol", EDGES_OF_THE_EXPORT);
    server.stop();
}

#[test]
fn connect_and_disconnect_log_lines_name_the_export() {
    let pool = TestPool::create("1G");
    pool.create_volume("alpha", "64M");
    pool.create_volume("beta", "64M");
    let server = pool.serve();
    let log = server.log.clone();
    for export in ["alpha", "beta"] {
        let (c, _, _) = Client::open(server.port, export);
        c.disconnect();
    }
    // The stop waits for every connection to end, so both lines of both clients are written.
    server.stop();
    let text = std::fs::read_to_string(&log).expect("server log");
    for export in ["alpha", "beta"] {
        for what in ["client connected", "client disconnected"] {
            assert!(
                text.lines()
                    .any(|l| l.contains(what) && l.contains(&format!("export={export}"))),
                "no {what:?} line naming export={export} in:\n{text}"
            );
        }
    }
}
