//! A small tmpfs mounted in a temp dir, so tests can fill a host file system for real. Mounting
//! needs root: under CI=true a missing privilege fails the test, elsewhere it is skipped.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs of a chosen size; unmounted (and its mount point removed) on drop.
pub struct SmallFs {
    dir: tempfile::TempDir,
    mounted: bool,
}

impl SmallFs {
    /// Mounts a tmpfs of `size` (as `mount -o size=` takes it, e.g. "48m"). `None` (with a
    /// note) when not root outside CI; panics under CI=true or when mount fails as root.
    pub fn mount(size: &str) -> Option<SmallFs> {
        // SAFETY: geteuid has no preconditions and touches no memory.
        if unsafe { libc::geteuid() } != 0 {
            assert!(
                !crate::common::in_ci(),
                "mounting a tmpfs needs root (CI=true): run the tests as root"
            );
            eprintln!("SKIP: mounting a tmpfs needs root");
            return None;
        }
        let dir = tempfile::tempdir().expect("mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount -t tmpfs -o size={size} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(SmallFs { dir, mounted: true })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg(self.dir.path()).status();
            self.mounted = false;
        }
    }
}
