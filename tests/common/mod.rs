//! Helpers shared by the integration tests, one module per subject. Each test crate includes
//! the whole folder with `mod common;` and uses what it needs.
#![allow(dead_code, unused_imports)]

pub mod load;
pub mod memory_server;
pub mod metadata;
pub mod model;
pub mod nbd_client;
pub mod nbdkit;
pub mod nbdsh;
pub mod pool;
pub mod power;
pub mod qemu;
pub mod serve;
pub mod server;
pub mod small_fs;

use std::path::{Path, PathBuf};
use std::process::Command;

pub mod docs;

/// True when running in CI, where a missing external tool is a failure, not a skip.
pub fn in_ci() -> bool {
    std::env::var("CI").map(|v| v == "true").unwrap_or(false)
}

/// Whether `tool` can be run. Missing: panics under CI=true, else prints a skip note.
pub fn require_tool(tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !found {
        if in_ci() {
            panic!(
                "required tool `{tool}` is missing (CI=true): install it (tests/run-all.sh does)"
            );
        }
        eprintln!("SKIP: `{tool}` is not installed");
    }
    found
}

/// ../shared/tools/verify_meta.py beside the checkout, if present (required under CI).
pub fn verify_meta_script() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/tools/verify_meta.py");
    if p.exists() {
        return Some(p);
    }
    if in_ci() {
        panic!("../shared/tools/verify_meta.py is required when CI=true");
    }
    eprintln!("SKIP: ../shared/tools/verify_meta.py not found");
    None
}

/// Runs Debian's thin_check and the independent checker on a metadata file; panics with their
/// output on any finding.
pub fn assert_metadata_clean(meta: &Path) {
    if require_tool("thin_check") {
        let out = Command::new("thin_check")
            .arg(meta)
            .output()
            .expect("run thin_check");
        assert!(
            out.status.success(),
            "thin_check failed on {}:\n{}{}",
            meta.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if let Some(script) = verify_meta_script() {
        if require_tool("python3") {
            let out = Command::new("python3")
                .arg(&script)
                .arg("check")
                .arg(meta)
                .output()
                .expect("run verify_meta.py");
            assert!(
                out.status.success(),
                "verify_meta.py check failed on {}:\n{}{}",
                meta.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// Mappings per device from `thin_dump` XML: device id -> sorted (vblock, data block).
pub fn thin_dump_mappings(meta: &Path) -> std::collections::BTreeMap<u32, Vec<(u64, u64)>> {
    let out = Command::new("thin_dump")
        .arg(meta)
        .output()
        .expect("run thin_dump");
    assert!(
        out.status.success(),
        "thin_dump failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_dump(&String::from_utf8_lossy(&out.stdout))
}

fn attr(line: &str, name: &str) -> u64 {
    let key = format!(" {name}=\"");
    let start = line
        .find(&key)
        .unwrap_or_else(|| panic!("no {name} in {line}"))
        + key.len();
    let end = start + line[start..].find('"').expect("closing quote");
    line[start..end].parse().expect("number")
}

pub fn parse_dump(xml: &str) -> std::collections::BTreeMap<u32, Vec<(u64, u64)>> {
    let mut devs = std::collections::BTreeMap::new();
    let mut current = None;
    for line in xml.lines() {
        let l = line.trim();
        if l.starts_with("<device ") {
            let id = attr(l, "dev_id") as u32;
            devs.insert(id, Vec::new());
            current = Some(id);
        } else if l.starts_with("<single_mapping") {
            let v = devs.get_mut(&current.expect("in device")).expect("device");
            v.push((attr(l, "origin_block"), attr(l, "data_block")));
        } else if l.starts_with("<range_mapping") {
            let v = devs.get_mut(&current.expect("in device")).expect("device");
            let (o, d, n) = (
                attr(l, "origin_begin"),
                attr(l, "data_begin"),
                attr(l, "length"),
            );
            for i in 0..n {
                v.push((o + i, d + i));
            }
        }
    }
    devs
}
