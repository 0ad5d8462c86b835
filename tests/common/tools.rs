//! External tools in tests (thin_check, nbdkit, nbdinfo, nbdsh, qemu-io, fio, python3) and the
//! CI rule: under `CI=true` a missing tool fails the test; elsewhere the test prints a skip
//! note and returns. Also where the independent metadata checker `verify_meta.py` is found.

use std::path::{Path, PathBuf};

/// True when running in CI, where a missing external tool is a failure, not a skip.
pub fn in_ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// Where `name` is installed: on PATH, or in the sbin directories that thin-provisioning-tools
/// installs into and that are often off a user's PATH.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    let sbin = ["/usr/sbin", "/sbin"].map(PathBuf::from);
    on_path
        .into_iter()
        .chain(sbin)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// A command that runs `name` from where [`find_tool`] found it (or by name).
pub fn tool(name: &str) -> std::process::Command {
    std::process::Command::new(find_tool(name).unwrap_or_else(|| PathBuf::from(name)))
}

/// Whether `name` is installed. Missing: panics under CI=true, else prints a skip note.
pub fn require_tool(name: &str) -> bool {
    if find_tool(name).is_some() {
        return true;
    }
    assert!(
        !in_ci(),
        "required tool {name} is missing (CI=true): tests/run-all.sh installs it"
    );
    eprintln!("SKIP: {name} not installed");
    false
}

/// [`require_tool`] for several tools at once.
pub fn require_tools(names: &[&str]) -> bool {
    names.iter().all(|n| require_tool(n))
}

/// The independent metadata checker: `$THINNBD_VERIFY_META`, else
/// `../shared/tools/verify_meta.py` beside the checkout, with python3 to run it. Missing:
/// panics under CI=true, else prints a skip note and gives None.
pub fn verify_meta_script() -> Option<PathBuf> {
    let script = match std::env::var_os("THINNBD_VERIFY_META") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/tools/verify_meta.py"),
    };
    if !script.exists() {
        assert!(!in_ci(), "{} is required when CI=true", script.display());
        eprintln!("SKIP: verify_meta.py not found at {}", script.display());
        return None;
    }
    require_tool("python3").then_some(script)
}
