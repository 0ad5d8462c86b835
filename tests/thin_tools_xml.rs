//! thin_dump / thin_restore compatibility with Debian's thin-provisioning-tools 0.9.0, and
//! the checker against thin_check and verify_meta.py on good metadata.

mod common;

use std::fs::{File, OpenOptions};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use common::metadata::*;
use common::tools::*;
use thinnbd::pdata::block_io::{BlockIo, FileBlockIo};
use thinnbd::pdata::mem_block_io::MemBlockIo;
use thinnbd::thin::{check, xml, ThinMetadata};

const META_BYTES: u64 = 16 << 20;

fn sized_file(path: &Path) {
    let f = File::create(path).unwrap();
    f.set_len(META_BYTES).unwrap();
}

fn file_io(path: &Path) -> Arc<dyn BlockIo> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    Arc::new(FileBlockIo::new(f).unwrap())
}

fn thin_dump(args: &[&str], path: &Path) -> String {
    let (ok, out, err) = run(Command::new("thin_dump").args(args).arg(path));
    assert!(ok, "thin_dump {args:?} failed: {err}");
    out
}

fn our_dump(md: &ThinMetadata) -> String {
    let mut out = Vec::new();
    xml::dump(md, &mut out).unwrap();
    String::from_utf8(out).unwrap()
}

fn fixture() -> String {
    std::fs::read_to_string(testdata("pool.xml")).unwrap()
}

#[test]
fn debian_restore_reads_back_and_dumps_byte_for_byte() {
    if !require_tool("thin_restore") || !require_tool("thin_dump") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let meta = dir.path().join("meta");
    sized_file(&meta);
    let (ok, _, err) = run(Command::new("thin_restore")
        .arg("-i")
        .arg(testdata("pool.xml"))
        .arg("-o")
        .arg(&meta));
    assert!(ok, "thin_restore: {err}");

    let debian = ThinMetadata::open(file_io(&meta)).unwrap();
    let ours = xml::restore(&mut fixture().as_bytes(), Arc::new(MemBlockIo::new(4096))).unwrap();
    let debian_view = view(&debian).unwrap();
    assert_eq!(
        debian_view,
        view(&ours).unwrap(),
        "mappings read back differ from the XML's"
    );
    assert_eq!(debian_view.len(), 5);
    let total: usize = debian_view.iter().map(|d| d.2.len()).sum();
    let declared: u64 = debian_view.iter().map(|d| d.1.mapped_blocks).sum();
    assert_eq!(total as u64, declared);
    assert!(
        total > 3000,
        "fixture should hold thousands of mappings, has {total}"
    );
    // Some data blocks are shared by all three of 0, 1 and 2 (count 3: overflow tree).
    assert_eq!(debian.data_block_refs(0).unwrap(), 3);

    let dumped = our_dump(&debian);
    assert_eq!(
        dumped,
        thin_dump(&[], &meta),
        "our dump differs from thin_dump"
    );
    assert_eq!(dumped, fixture());
    let report = check::check(file_io(&meta));
    assert!(report.is_clean(), "{:#?}", report.problems);
}

#[test]
fn our_restore_passes_debian_tools_and_round_trips() {
    if !require_tool("thin_dump") || !require_tool("thin_check") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let meta = dir.path().join("meta");
    sized_file(&meta);
    let md = xml::restore(&mut fixture().as_bytes(), file_io(&meta)).unwrap();
    drop(md);
    assert_eq!(
        thin_dump(&[], &meta),
        fixture(),
        "thin_dump of our restore changed the XML"
    );
    thin_check(&meta);
    verify_meta(&meta);
    let report = check::check(file_io(&meta));
    assert!(report.is_clean(), "{:#?}", report.problems);
    assert_eq!(report.nr_devices, 5);
}

#[test]
fn api_pool_dump_and_snapshot_dump_match_debian() {
    if !require_tool("thin_dump") || !require_tool("thin_check") {
        return;
    }
    let (image, md) = build_pool(4096);
    let dir = tempfile::tempdir().unwrap();
    let meta = dir.path().join("meta");
    std::fs::write(&meta, &image).unwrap();

    assert_eq!(our_dump(&md), thin_dump(&[], &meta));
    let mut snap = Vec::new();
    xml::dump_metadata_snap(file_io(&meta), &mut snap).unwrap();
    let snap = String::from_utf8(snap).unwrap();
    assert_eq!(snap, thin_dump(&["-m"], &meta));
    assert!(snap.contains("nr_data_blocks=\"0\""));

    // The checker agrees with thin_check and verify_meta.py on good metadata.
    thin_check(&meta);
    verify_meta(&meta);
    let report = check::check(file_io(&meta));
    assert!(report.is_clean(), "{:#?}", report.problems);
    assert_eq!(report.nr_devices, 6);
}

#[test]
fn restore_of_api_dump_is_equivalent() {
    // No external tools: dump through the API, restore, and dump again.
    let (_image, md) = build_pool(4096);
    let text = our_dump(&md);
    let restored = xml::restore(&mut text.as_bytes(), Arc::new(MemBlockIo::new(4096))).unwrap();
    assert_eq!(our_dump(&restored), text);
    assert_eq!(view(&restored).unwrap(), view(&md).unwrap());
}

#[test]
fn version_1_and_flags_survive_a_restore() {
    if !require_tool("thin_dump") {
        return;
    }
    let xml = fixture().replacen(r#"flags="0" version="2""#, r#"flags="1" version="1""#, 1);
    let dir = tempfile::tempdir().unwrap();
    let meta = dir.path().join("meta");
    sized_file(&meta);
    drop(xml::restore(&mut xml.as_bytes(), file_io(&meta)).unwrap());
    assert_eq!(thin_dump(&[], &meta), xml);
    let md = ThinMetadata::open(file_io(&meta)).unwrap();
    assert_eq!(md.superblock().version, 1);
    assert_eq!(our_dump(&md), xml);
}
