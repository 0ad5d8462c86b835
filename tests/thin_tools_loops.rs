//! A resealed node whose child pointer leads back to itself (a loop a byte flip plus a valid
//! checksum can make). The checker must report it; `ThinMetadata::open` must return `Corrupt`
//! rather than recurse until the stack overflows. The open runs in a child process so that a
//! stack overflow (an abort, not a panic) fails this test instead of killing the test binary.

mod common;

use std::process::Command;

use common::metadata::*;
use thinnbd::pdata::block_io::BLOCK_SIZE;
use thinnbd::pdata::checksum::{seal, BlockKind};
use thinnbd::thin::{check, ThinMetadata};

const CHILD_ENV: &str = "THINNBD_LOOP_IMAGE";

/// The pool with its top-level mapping root turned into an internal node whose every child
/// is the node itself.
fn looped_image() -> Vec<u8> {
    let (mut image, md) = build_pool(2048);
    let top = md.superblock().mapping_root;
    let off = top as usize * BLOCK_SIZE;
    let block: &mut [u8; BLOCK_SIZE] = (&mut image[off..off + BLOCK_SIZE]).try_into().unwrap();
    block[4..8].copy_from_slice(&1u32.to_le_bytes());
    let nr = u32::from_le_bytes(block[16..20].try_into().unwrap()) as usize;
    for i in 0..nr {
        let v = 32 + 8 * 252 + 8 * i;
        block[v..v + 8].copy_from_slice(&top.to_le_bytes());
    }
    seal(block, BlockKind::Node, top);
    image
}

#[test]
fn check_reports_a_self_loop() {
    let report = check::check(ImageIo::new(looped_image()));
    assert!(!report.is_clean());
}

#[test]
fn open_returns_corrupt_on_a_self_loop() {
    if let Ok(path) = std::env::var(CHILD_ENV) {
        let image = std::fs::read(path).unwrap();
        let r = ThinMetadata::open(ImageIo::new(image));
        assert!(r.is_err(), "a looped tree opened without error");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("looped.img");
    std::fs::write(&path, looped_image()).unwrap();
    let exe = std::env::current_exe().unwrap();
    let out = Command::new(exe)
        .args([
            "--exact",
            "open_returns_corrupt_on_a_self_loop",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ThinMetadata::open on a looped tree did not return an error (status {:?}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .rev()
            .take(5)
            .collect::<Vec<_>>()
            .join(" | ")
    );
}
