//! Finding a working nbdsh. nbdsh is `python3 -m nbd` with whatever `python3` is first on PATH;
//! when that one lacks the module (a pyenv or venv python ahead of the system one), the system
//! python that has python3-libnbd is used directly. Shared by the test crates' support modules.

use std::process::{Command, Stdio};

/// A command that runs nbdsh, or None after a skip note; panics under CI=true.
pub fn nbdsh() -> Option<Command> {
    let works = |cmd: &mut Command| {
        cmd.args(["-c", "pass"])
            .stdin(Stdio::null())
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    if works(&mut Command::new("nbdsh")) {
        return Some(Command::new("nbdsh"));
    }
    for py in ["/usr/bin/python3", "/usr/local/bin/python3"] {
        if works(Command::new(py).args(["-m", "nbd"])) {
            let mut cmd = Command::new(py);
            cmd.args(["-m", "nbd"]);
            return Some(cmd);
        }
    }
    assert!(
        !super::tools::in_ci(),
        "nbdsh (python3-libnbd) is missing or broken (CI=true)"
    );
    eprintln!("SKIP: nbdsh / python3-libnbd not usable");
    None
}

/// An nbdsh script for URI (a 64 MiB export) that checks what both frontends must answer at
/// the edges: ENOSPC for a write or write-zeroes past the end, EINVAL for a read or trim
/// there, nothing written, a 64 MiB maximum, and a 48 MiB write and read. Prints "nbdsh ok".
/// libnbd checks ranges and sizes itself unless told not to; the server's answers are tested.
pub const EDGES_OF_THE_EXPORT: &str = r#"
import os
M = 1048576
h.set_strict_mode(0)
h.connect_uri(os.environ["URI"])
size = h.get_size()

def errno_of(f):
    try:
        f()
    except nbd.Error as e:
        return e.errno
    return None

got = {
    "pwrite": errno_of(lambda: h.pwrite(b"\x01" * 1024, size - 512)),
    "zero": errno_of(lambda: h.zero(1024, size - 512)),
    "pread": errno_of(lambda: h.pread(1024, size - 512)),
    "trim": errno_of(lambda: h.trim(1024, size - 512)),
}
want = {"pwrite": "ENOSPC", "zero": "ENOSPC", "pread": "EINVAL", "trim": "EINVAL"}
assert got == want, got
assert h.pread(512, size - 512) == bytes(512), "a refused write wrote"

# nbd-server and nbdkit take 64 MiB requests; so does the default configuration.
assert h.get_block_size(nbd.SIZE_MAXIMUM) == 64 * M, h.get_block_size(nbd.SIZE_MAXIMUM)
data = bytes(range(251)) * (48 * M // 251)
h.pwrite(data, 4096)
assert h.pread(len(data), 4096) == data, "48 MiB read back differs"
h.shutdown()
print("nbdsh ok")
"#;
