//! What the benchmark examples share: finding the `thinnbd` binary built beside them.

use std::path::{Path, PathBuf};

/// The release `thinnbd` binary of the same target directory as the running example.
pub fn our_binary() -> PathBuf {
    // examples live in target/<profile>/examples/, the binary one level up.
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("thinnbd");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --release` first",
        bin.display()
    );
    bin
}
