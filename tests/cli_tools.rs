//! The metadata commands of the binary against Debian's thin-provisioning-tools:
//! `thinnbd dump` equals `thin_dump`, `thinnbd restore` round-trips through `thin_dump`, and
//! `thinnbd check` exits 0 on clean metadata and 1 with a list of problems on damaged metadata.

mod common;

use std::path::Path;
use std::process::Command;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/testdata/pool.xml");

fn thinnbd(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_thinnbd"))
        .args(args)
        .output()
        .expect("run thinnbd")
}

fn sized_file(path: &Path, bytes: u64) {
    std::fs::File::create(path).unwrap().set_len(bytes).unwrap();
}

#[test]
fn dump_restore_check_agree_with_thin_provisioning_tools() {
    if !common::require_tool("thin_restore") || !common::require_tool("thin_dump") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let theirs = dir.path().join("theirs.meta");
    let ours = dir.path().join("ours.meta");
    sized_file(&theirs, 16 << 20);
    sized_file(&ours, 16 << 20);
    let st = Command::new("thin_restore")
        .args(["-i", FIXTURE, "-o"])
        .arg(&theirs)
        .status()
        .unwrap();
    assert!(st.success());

    // thinnbd dump of metadata written by thin_restore equals thin_dump of it.
    let their_dump = Command::new("thin_dump").arg(&theirs).output().unwrap();
    let our_dump = thinnbd(&["dump", theirs.to_str().unwrap()]);
    assert!(
        our_dump.status.success(),
        "{}",
        String::from_utf8_lossy(&our_dump.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&our_dump.stdout),
        String::from_utf8_lossy(&their_dump.stdout)
    );

    // thinnbd restore, then thin_dump, gives the fixture back unchanged.
    let out = thinnbd(&["restore", "-i", FIXTURE, "-o", ours.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let round = Command::new("thin_dump").arg(&ours).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&round.stdout),
        std::fs::read_to_string(FIXTURE).unwrap()
    );
    common::assert_metadata_clean(&ours);

    // check: clean is exit 0.
    let out = thinnbd(&["check", ours.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // A mapping leaf with a flipped byte: exit 1 and a problem naming a block.
    let bytes = std::fs::read(&ours).unwrap();
    let leaf = (1..bytes.len() / 4096)
        .find(|b| {
            let blk = &bytes[b * 4096..(b + 1) * 4096];
            // A btree leaf (flags 2) with u64 values and entries: a mapping leaf.
            blk[4] == 2 && blk[24] == 8 && blk[16] > 20
        })
        .expect("a mapping leaf");
    let mut damaged = bytes.clone();
    damaged[leaf * 4096 + 3000] ^= 0x40;
    let bad = dir.path().join("bad.meta");
    std::fs::write(&bad, &damaged).unwrap();
    let out = thinnbd(&["check", bad.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("problem:") && text.contains(&leaf.to_string()),
        "{text}"
    );
}

#[test]
fn restore_refuses_a_missing_output_and_bad_xml() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("none.meta");
    let out = thinnbd(&["restore", "-i", FIXTURE, "-o", missing.to_str().unwrap()]);
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));

    let xml = dir.path().join("bad.xml");
    std::fs::write(
        &xml,
        "<superblock uuid=\"\" time=\"0\"><device dev_id=\"x\"/></superblock>",
    )
    .unwrap();
    let meta = dir.path().join("m");
    sized_file(&meta, 4 << 20);
    let out = thinnbd(&[
        "restore",
        "-i",
        xml.to_str().unwrap(),
        "-o",
        meta.to_str().unwrap(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a clean error, not a panic (101)"
    );
    assert!(!String::from_utf8_lossy(&out.stderr).is_empty());
}
