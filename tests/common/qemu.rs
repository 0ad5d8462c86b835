//! External clients against an export of a test server, as a user would run them: qemu-io
//! (by port on 127.0.0.1 or by URI, one pattern of unaligned I/O across block boundaries and
//! one of a discard), `nbdinfo --map`, an nbdcopy round trip, and fio verifying its writes from
//! two connections.

use std::path::Path;
use std::process::{Command, Stdio};

use super::process::{run, stdout_of};

/// A qemu-io command running `cmds` on export `export` of the server on `port`.
pub fn qemu_io_cmd(port: u16, export: &str, cmds: &[&str]) -> Command {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", &format!("nbd://127.0.0.1:{port}/{export}")]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.stdin(Stdio::null());
    c
}

/// Runs qemu-io; returns stdout and stderr together.
pub fn qemu_io(port: u16, export: &str, cmds: &[&str]) -> String {
    let out = qemu_io_cmd(port, export, cmds)
        .output()
        .expect("run qemu-io");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs qemu-io and fails the test if it reports any failure, error, mismatch or ENOSPC.
pub fn qemu_io_ok(port: u16, export: &str, cmds: &[&str]) -> String {
    let out = qemu_io(port, export, cmds);
    for bad in ["fail", "error", "Error", "mismatch", "No space"] {
        assert!(
            !out.contains(bad),
            "qemu-io {cmds:?} reported {bad:?}:\n{out}"
        );
    }
    out
}

/// Runs qemu-io commands against a URI (`-r` opens read-only); fails on a non-zero exit or a
/// reported failure (qemu-io exits 0 after a failed `read -P`, so the output is searched).
pub fn qemu_io_at(uri: &str, read_only: bool, cmds: &[&str]) -> String {
    let mut cmd = Command::new("qemu-io");
    if read_only {
        cmd.arg("-r");
    }
    cmd.args(["-f", "raw", uri]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    let out = run(&mut cmd);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for bad in ["fail", "error", "Error", "mismatch"] {
        assert!(!text.contains(bad), "qemu-io reported {bad:?}:\n{text}");
    }
    text
}

/// qemu-io commands for a fresh export of at least 2 MiB: 512-byte-granular writes and reads
/// straddling the 4 KiB boundary, the 64 KiB pool block boundary (a provisioned and an
/// unprovisioned block) and the 1 MiB boundary, a write of zeros, then a flush.
pub const ACROSS_BOUNDARIES: [&str; 18] = [
    "write -P 0xab 0 128k",
    "read -P 0xab 0 128k",
    "write -P 0x11 3584 1024",
    "write -P 0x22 65024 1024",
    "write -P 0x33 196096 1024",
    "read -P 0xab 0 3584",
    "read -P 0x11 3584 1024",
    "read -P 0xab 4608 60416",
    "read -P 0x22 65024 1024",
    "read -P 0xab 66048 65024",
    // 128k..191.5k was never written: zeros; then the straddling write; then zeros.
    "read -P 0 131072 65024",
    "read -P 0x33 196096 1024",
    "read -P 0 197120 64000",
    "write -P 0x44 1048064 1536",
    "read -P 0x44 1048064 1536",
    "write -z 8192 8192",
    "read -P 0 8192 8192",
    "flush",
];

/// What another client reads back after [`ACROSS_BOUNDARIES`].
pub const ACROSS_BOUNDARIES_READ_BACK: [&str; 6] = [
    "read -P 0xab 0 3584",
    "read -P 0x11 3584 1024",
    "read -P 0 8192 8192",
    "read -P 0x22 65024 1024",
    "read -P 0x33 196096 1024",
    "read -P 0x44 1048064 1536",
];

/// fio random 4 KiB reads and writes with crc32c verification for `runtime_secs`, from two
/// connections (jobs) each on its own 16 MiB of the export at `uri` (at least 32 MiB), run in
/// `work` (fio leaves state files there). Fails the test on an error or a verify failure;
/// returns fio's output.
pub fn fio_verify_two_connections(uri: &str, work: &Path, runtime_secs: u32) -> String {
    let out = super::process::stdout_of(Command::new("fio").current_dir(work).args([
        "--verify_state_save=0",
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randrw",
        "--bs=4k",
        "--iodepth=16",
        "--numjobs=2",
        "--size=16m",
        "--offset_increment=16m",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--time_based",
        &format!("--runtime={runtime_secs}"),
        "--group_reporting",
    ]));
    assert!(out.contains("err= 0"), "{out}");
    // fio names the failure, e.g. "verify: bad magic header" or "crc32c: verify failed".
    for bad in ["verify failed", "bad magic", "bad header", "verify: bad"] {
        assert!(!out.contains(bad), "fio reported {bad:?}:\n{out}");
    }
    out
}

/// The discard check on a 64 MiB export nothing was written to: 4 MiB written, then 1 MiB at
/// 1 MiB discarded, the map after each step, and the hole reads zeros, the rest its data.
/// `after_write` and `after_discard` check the storage under the export at those points; the
/// map after the discard is read through `map_uri_after` (the same export, perhaps by another
/// transport).
pub fn discard_one_mib_of_four(
    uri: &str,
    map_uri_after: &str,
    after_write: impl FnOnce(),
    after_discard: impl FnOnce(),
) {
    const MIB: u64 = 1 << 20;
    qemu_io_at(uri, false, &["write -P 0x5a 0 4M", "flush"]);
    after_write();
    assert_eq!(
        nbdinfo_map(uri),
        vec![(0, 4 * MIB, 0), (4 * MIB, 60 * MIB, 3)]
    );
    qemu_io_at(uri, false, &["discard 1M 1M", "flush"]);
    after_discard();
    assert_eq!(
        nbdinfo_map(map_uri_after),
        vec![
            (0, MIB, 0),
            (MIB, MIB, 3),
            (2 * MIB, 2 * MIB, 0),
            (4 * MIB, 60 * MIB, 3)
        ],
        "nbdinfo --map after discarding 1M at 1M"
    );
    qemu_io_at(
        uri,
        true,
        &["read -P 0x5a 0 1M", "read -P 0 1M 1M", "read -P 0x5a 2M 2M"],
    );
}

/// `image` copied into the export at `write_uri` and back out of `read_uri` by nbdcopy, both
/// through files in `dir`; fails the test when what comes back differs.
pub fn nbdcopy_round_trip(dir: &Path, image: &[u8], write_uri: &str, read_uri: &str) {
    let input = dir.join("in.raw");
    let output = dir.join("out.raw");
    std::fs::write(&input, image).expect("write the image");
    run(Command::new("nbdcopy").arg(&input).arg(write_uri));
    run(Command::new("nbdcopy").arg(read_uri).arg(&output));
    assert!(
        std::fs::read(&output).expect("read the copy") == image,
        "the image read back differs from the one written"
    );
}

/// `nbdinfo --map URI` as (offset, length, type) rows.
pub fn nbdinfo_map(uri: &str) -> Vec<(u64, u64, u32)> {
    nbdinfo_map_of(uri, "base:allocation")
}

/// `nbdinfo --map=CONTEXT URI` as (offset, length, type) rows.
pub fn nbdinfo_map_of(uri: &str, context: &str) -> Vec<(u64, u64, u32)> {
    let map = format!("--map={context}");
    let out = stdout_of(Command::new("nbdinfo").args([map.as_str(), uri]));
    // Lines look like: "     262144      262144    3  hole,zero".
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((
                f.first()?.parse().ok()?,
                f.get(1)?.parse().ok()?,
                f.get(2)?.parse().ok()?,
            ))
        })
        .collect()
}
