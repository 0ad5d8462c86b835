//! qemu-io against an export of a test server on 127.0.0.1, as a client would see it.

use std::process::{Command, Stdio};

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
