//! External clients against an export of a test server, as a user would run them: qemu-io
//! (by port on 127.0.0.1 or by URI) and `nbdinfo --map`.

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
