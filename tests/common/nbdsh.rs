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
        std::env::var("CI").as_deref() != Ok("true"),
        "nbdsh (python3-libnbd) is missing or broken (CI=true)"
    );
    eprintln!("SKIP: nbdsh / python3-libnbd not usable");
    None
}
