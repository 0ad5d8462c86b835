//! `thinnbd delta` against Debian's `thin_delta` (0.9.0): byte for byte, plain and
//! `--verbose`, for every pair of devices of pools with many snapshots (made through the engine,
//! through the metadata API with a deep tree, and with a held metadata snapshot for `-m`);
//! the by-name form on a pool directory; `--json` against the XML; bad ids and names.

mod common;

use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

use common::metadata::build_pool;
use common::pattern::pattern_at;
use common::pool::{temp_pool, KIB, MIB};
use common::tools::{require_tool, tool};
use thinnbd::engine::EngineConfig;
use thinnbd::pdata::block_io::FileBlockIo;
use thinnbd::thin::ThinMetadata;
use thinnbd::volume::{take_lock, CreateOptions, PoolPaths, Volumes};

fn thinnbd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_thinnbd"))
        .args(args)
        .output()
        .expect("run thinnbd")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `thinnbd delta` output, which must succeed.
fn ours(args: &[&str]) -> String {
    let out = thinnbd(&[&["delta"], args].concat());
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "thinnbd delta {args:?}: {stderr}");
    stdout
}

fn theirs(meta: &Path, args: &[&str]) -> String {
    let out = tool("thin_delta")
        .args(args)
        .arg(meta)
        .output()
        .expect("run thin_delta");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "thin_delta {args:?}: {stderr}");
    stdout
}

/// Compares both tools on every ordered pair of `ids` (a device with itself too), plain and
/// verbose; returns the element names seen, so callers can tell the pools differ in every way.
fn compare_all_pairs(meta: &Path, ids: &[u32], extra: &[&str]) -> BTreeSet<String> {
    let m = meta.to_str().unwrap();
    let mut kinds = BTreeSet::new();
    for &l in ids {
        for &r in ids {
            for verbose in [false, true] {
                let (l, r) = (l.to_string(), r.to_string());
                let mut args = vec!["--snap1", &l, "--snap2", &r];
                args.extend_from_slice(extra);
                if verbose {
                    args.push("--verbose");
                }
                let want = theirs(meta, &args);
                args.push(m);
                let got = ours(&args);
                assert_eq!(got, want, "thinnbd delta {args:?} differs from thin_delta");
                for line in got.lines().skip(2) {
                    let name = line.trim_start().trim_start_matches('<');
                    let name = name.split([' ', '>', '/']).next().unwrap_or_default();
                    if !name.is_empty() && name != "range" {
                        kinds.insert(name.to_string());
                    }
                }
            }
        }
    }
    kinds
}

fn all_kinds() -> BTreeSet<String> {
    ["same", "different", "left_only", "right_only"]
        .map(String::from)
        .into()
}

#[test]
fn engine_pool_with_snapshots_of_snapshots_matches_thin_delta_for_every_pair() {
    if !require_tool("thin_delta") {
        return;
    }
    const BS: u64 = 64 * KIB;
    let tp = temp_pool(64 * MIB, BS, EngineConfig::default());
    let pool = tp.pool.clone();
    let size = 48 * MIB;
    let write = |id: u32, blocks: &mut dyn Iterator<Item = u64>, seed: u64| {
        let h = pool.activate(id, size, false).unwrap();
        for b in blocks {
            h.write(b * BS, &pattern_at(seed, b * BS, BS as usize), false)
                .unwrap();
        }
        pool.teardown(h).unwrap();
    };
    pool.create_thin(1).unwrap();
    // A sequential stretch, then scattered blocks written backwards (data blocks out of order).
    write(1, &mut (0..200), 1);
    write(1, &mut (0..40).rev().map(|i| 300 + 7 * i), 2);
    pool.create_snapshot(2, 1).unwrap();
    write(1, &mut [5, 6, 7, 150, 199, 600, 601].into_iter(), 3);
    pool.create_snapshot(3, 2).unwrap(); // a snapshot of a snapshot
    write(3, &mut (100..120).chain([400, 700]), 4);
    {
        let h = pool.activate(2, size, false).unwrap();
        h.discard(50 * BS, 30 * BS, false).unwrap();
        h.discard(307 * BS, BS, false).unwrap();
        pool.teardown(h).unwrap();
    }
    pool.create_snapshot(4, 1).unwrap();
    write(4, &mut (0..600).step_by(25), 5);
    pool.create_thin(5).unwrap(); // unrelated, interleaved with the others on the data device
    write(5, &mut (190..260), 6);
    pool.create_thin(6).unwrap(); // empty
    pool.create_snapshot(7, 6).unwrap();
    write(7, &mut [0].into_iter(), 7);
    drop(pool);
    let (_dir, meta, _data) = tp.close_checked();
    let kinds = compare_all_pairs(&meta, &[1, 2, 3, 4, 5, 6, 7], &[]);
    assert_eq!(kinds, all_kinds());
}

fn file_metadata(path: &Path, bytes: u64) -> ThinMetadata {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap();
    f.set_len(bytes).unwrap();
    ThinMetadata::format(Arc::new(FileBlockIo::new(f).unwrap()), 128, 200_000).unwrap()
}

#[test]
fn deep_trees_match_thin_delta_for_every_pair() {
    if !require_tool("thin_delta") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let meta = dir.path().join("meta");
    let mut md = file_metadata(&meta, 32 * MIB);
    let map = |md: &mut ThinMetadata, dev: u32, v: u64| {
        let d = md.alloc_data_block().unwrap();
        md.insert(dev, v, d).unwrap();
    };
    md.create_thin(1).unwrap();
    // 300 half-full leaves: the root's children are internal nodes.
    for v in 0..40_000 {
        map(&mut md, 1, v);
    }
    md.commit().unwrap();
    md.create_snapshot(2, 1).unwrap();
    map(&mut md, 2, 23_456);
    md.create_snapshot(3, 2).unwrap();
    for v in (0..40_000).step_by(997) {
        map(&mut md, 3, v);
    }
    for v in 10_000..10_300 {
        md.remove(3, v).unwrap();
    }
    md.commit().unwrap();
    md.create_snapshot(4, 1).unwrap();
    for v in 40_000..41_000 {
        map(&mut md, 4, v); // grows past the origin's end
    }
    md.create_thin(5).unwrap();
    for v in (0..20_000).rev().step_by(3) {
        map(&mut md, 5, v);
    }
    md.commit().unwrap();
    drop(md);
    let kinds = compare_all_pairs(&meta, &[1, 2, 3, 4, 5], &[]);
    assert_eq!(kinds, all_kinds());
}

#[test]
fn metadata_snapshot_and_live_metadata_match_thin_delta() {
    if !require_tool("thin_delta") {
        return;
    }
    let (image, md) = build_pool(4096);
    let ids = md.thin_ids();
    assert!(ids.len() >= 6, "{ids:?}");
    drop(md);
    let dir = tempfile::tempdir().unwrap();
    let meta = dir.path().join("meta");
    std::fs::write(&meta, &image).unwrap();
    // The live superblock names the metadata snapshot; the snapshot's does not, and has no
    // space map (nr_data_blocks 0). Device 12 is newer than the metadata snapshot.
    let live = ours(&["--snap1", "1", "--snap2", "10", meta.to_str().unwrap()]);
    assert!(
        live.lines().next().unwrap().contains(" metadata_snap=\""),
        "{live}"
    );
    let kinds = compare_all_pairs(&meta, &ids, &[]);
    assert_eq!(kinds, all_kinds());
    let snap_ids: Vec<u32> = ids.iter().copied().filter(|&i| i != 12).collect();
    let kinds = compare_all_pairs(&meta, &snap_ids, &["-m"]);
    assert_eq!(kinds, all_kinds());
    // Device 12 is not in the metadata snapshot.
    let out = thinnbd(&[
        "delta",
        "-m",
        "--snap1",
        "1",
        "--snap2",
        "12",
        meta.to_str().unwrap(),
    ]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stdout.is_empty(),
        "nothing is printed for a bad id: {stdout}"
    );
    assert!(
        stderr.contains("thin device 12"),
        "the error names the id: {stderr}"
    );
}

#[test]
fn metadata_snapshot_by_block_number_as_thin_delta_takes_it() {
    if !require_tool("thin_delta") {
        return;
    }
    let (image, md) = build_pool(4096);
    drop(md);
    let dir = tempfile::tempdir().unwrap();
    let meta = dir.path().join("meta");
    std::fs::write(&meta, &image).unwrap();
    let m = meta.to_str().unwrap();
    let live = ours(&["--snap1", "1", "--snap2", "10", m]);
    let snap = attr(live.lines().next().unwrap(), "metadata_snap").expect("a metadata snapshot");
    let plain = ours(&["-m", "--snap1", "1", "--snap2", "10", m]);
    assert_ne!(
        plain, live,
        "the metadata snapshot is older than the live metadata"
    );
    // thin_delta takes the block glued to -m or after --metadata-snap=.
    for block_arg in [format!("-m{snap}"), format!("--metadata-snap={snap}")] {
        for verbose in [&[][..], &["--verbose"][..]] {
            let args = [
                &[block_arg.as_str(), "--snap1", "1", "--snap2", "10"][..],
                verbose,
            ]
            .concat();
            let want = theirs(&meta, &args);
            let got = ours(&[&args[..], &[m]].concat());
            assert_eq!(got, want, "thinnbd delta {args:?} differs from thin_delta");
            if verbose.is_empty() {
                assert_eq!(got, plain, "{block_arg} reads the snapshot -m reads");
            }
        }
    }
    // Another block than the superblock's metadata snapshot: both tools refuse.
    let other = (snap + 1).to_string();
    for block_arg in [format!("-m{other}"), format!("--metadata-snap={other}")] {
        let args = [block_arg.as_str(), "--snap1", "1", "--snap2", "10"];
        let out = tool("thin_delta").args(args).arg(&meta).output().unwrap();
        assert!(!out.status.success(), "thin_delta {args:?} succeeded");
        let out = thinnbd(&[&["delta"], &args[..], &[m]].concat());
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stdout.is_empty(), "{args:?} printed {stdout}");
        assert!(
            stderr.contains(&format!("block {other}")) && stderr.contains(&format!("block {snap}")),
            "the error names both blocks: {stderr}"
        );
    }
    // Not a block number: a usage error, as thin_delta's is (-m=8 gives it "=8").
    for bad in ["-mfoo", "-m=8", "--metadata-snap=x"] {
        let out = thinnbd(&["delta", bad, "--snap1", "1", "--snap2", "10", m]);
        assert_eq!(out.status.code(), Some(64), "{bad}: {}", text(&out).1);
    }
    // After `--` an argument is the metadata path, never an option.
    let out = thinnbd(&["delta", "--snap1", "1", "--snap2", "10", "--", "-m8"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("-m8"), "the path is named: {stderr}");
}

/// A pool directory with volumes made through the library, as `thinnbd` commands make them.
fn pool_dir_with_snapshots(dir: &Path) -> Vec<(String, u32)> {
    const BS: u64 = 64 * KIB;
    let config = thinnbd::config::Config::default().engine;
    let opts = CreateOptions {
        data: None,
        data_size: 32 * MIB,
        block_size: BS,
        metadata_size: None,
        preallocate: false,
    };
    Volumes::create_pool(dir, &opts, config.clone()).unwrap();
    let volumes = Volumes::open(dir, config).unwrap();
    let write = |name: &str, blocks: &[u64], seed: u64| {
        let v = volumes.open_volume(name).unwrap();
        for &b in blocks {
            v.thin
                .write(b * BS, &pattern_at(seed, b * BS, BS as usize), false)
                .unwrap();
        }
        drop(v);
        volumes.release_if_idle(name);
    };
    volumes.create_volume("base", 16 * MIB).unwrap();
    write("base", &(0..64).collect::<Vec<_>>(), 1);
    volumes.snapshot("base", "monday", true).unwrap();
    write("base", &[3, 4, 100, 101], 2);
    volumes.snapshot("base", "tuesday", false).unwrap();
    write("tuesday", &[200], 3);
    volumes.snapshot("tuesday", "tuesday.copy", false).unwrap();
    let names = volumes
        .list()
        .into_iter()
        .map(|v| (v.name, v.thin_id))
        .collect();
    volumes.shutdown().unwrap();
    names
}

#[test]
fn pool_form_compares_volumes_by_name_and_refuses_a_pool_in_use() {
    if !require_tool("thin_delta") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let names = pool_dir_with_snapshots(dir.path());
    assert_eq!(names.len(), 4, "{names:?}");
    let pool = dir.path().to_str().unwrap();
    let meta = PoolPaths::new(dir.path()).metadata;
    for (a, ia) in &names {
        for (b, ib) in &names {
            for verbose in [&[][..], &["--verbose"][..]] {
                let got = ours(&[&["--pool", pool, a, b], verbose].concat());
                let (ia, ib) = (ia.to_string(), ib.to_string());
                let want = theirs(
                    &meta,
                    &[&["--snap1", &ia, "--snap2", &ib], verbose].concat(),
                );
                assert_eq!(got, want, "{a} against {b} {verbose:?}");
            }
        }
    }
    let base_monday = ours(&["--pool", pool, "monday", "base"]);
    assert!(
        base_monday.contains("<different begin=\"3\" length=\"2\"/>"),
        "{base_monday}"
    );
    assert!(
        base_monday.contains("<right_only begin=\"100\" length=\"2\"/>"),
        "{base_monday}"
    );

    let out = thinnbd(&["delta", "--pool", pool, "base", "friday"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stdout.is_empty());
    assert!(
        stderr.contains("\"friday\""),
        "the error names the volume: {stderr}"
    );

    let _lock = take_lock(&PoolPaths::new(dir.path())).unwrap();
    let out = thinnbd(&["delta", "--pool", pool, "base", "monday"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stdout.is_empty());
    assert!(stderr.contains("in use"), "{stderr}");
}

/// The ranges of XML output as (kind, begin, length, left data, right data).
type Ranges = Vec<(String, u64, u64, Option<u64>, Option<u64>)>;

fn attr(line: &str, name: &str) -> Option<u64> {
    let start = line.find(&format!(" {name}=\""))? + name.len() + 3;
    line[start..].split('"').next()?.parse().ok()
}

fn xml_ranges(xml: &str) -> Ranges {
    let mut out = Vec::new();
    let mut open = String::new();
    for line in xml.lines().skip(2) {
        let t = line.trim_start();
        let name = t
            .trim_start_matches('<')
            .split([' ', '>', '/'])
            .next()
            .unwrap();
        match name {
            "range" => out.push((
                open.clone(),
                attr(t, "begin").unwrap(),
                attr(t, "length").unwrap(),
                attr(t, "left_data_begin").or(attr(t, "data_begin")),
                attr(t, "right_data_begin").or(attr(t, "data_begin")),
            )),
            _ if t.ends_with("/>") => out.push((
                name.to_string(),
                attr(t, "begin").unwrap(),
                attr(t, "length").unwrap(),
                None,
                None,
            )),
            _ if !t.starts_with("</") => open = name.to_string(),
            _ => {}
        }
    }
    out
}

fn json_ranges(v: &serde_json::Value) -> Ranges {
    v["ranges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let kind = r["kind"].as_str().unwrap().to_string();
            let (l, rd) = (
                r["left_data_begin"].as_u64(),
                r["right_data_begin"].as_u64(),
            );
            // The verbose XML gives a one-sided run's data block as data_begin.
            let (l, rd) = match kind.as_str() {
                "left_only" => (l, l),
                "right_only" => (rd, rd),
                _ => (l, rd),
            };
            (
                kind,
                r["begin"].as_u64().unwrap(),
                r["length"].as_u64().unwrap(),
                l,
                rd,
            )
        })
        .collect()
}

#[test]
fn json_holds_the_ranges_of_the_xml() {
    let dir = tempfile::tempdir().unwrap();
    let names = pool_dir_with_snapshots(dir.path());
    let pool = dir.path().to_str().unwrap();
    let meta = PoolPaths::new(dir.path()).metadata;
    let m = meta.to_str().unwrap();
    let mut nonempty = 0;
    for (_, a) in &names {
        for (_, b) in &names {
            let (a, b) = (a.to_string(), b.to_string());
            let ids = ["--snap1", &a, "--snap2", &b, m];
            for verbose in [&[][..], &["--verbose"][..]] {
                let xml = ours(&[&ids[..], verbose].concat());
                let json = ours(&[&ids[..], verbose, &["--json"]].concat());
                let v: serde_json::Value = serde_json::from_str(&json).unwrap();
                assert_eq!(v["left"].as_u64().unwrap().to_string(), a);
                assert_eq!(v["right"].as_u64().unwrap().to_string(), b);
                let header = xml.lines().next().unwrap();
                for field in ["time", "transaction", "data_block_size", "nr_data_blocks"] {
                    assert_eq!(
                        v["superblock"][field].as_u64(),
                        attr(header, field),
                        "{field}: {header}"
                    );
                }
                let want = xml_ranges(&xml);
                nonempty += usize::from(!want.is_empty());
                assert_eq!(json_ranges(&v), want, "{ids:?} {verbose:?}\n{xml}\n{json}");
            }
        }
    }
    assert!(nonempty > 0);
    // The by-name form gives the document of the ids, with the names beside them.
    let by_name = ours(&["--pool", pool, "monday", "base", "--json"]);
    let id_of = |name: &str| names.iter().find(|n| n.0 == name).unwrap().1.to_string();
    let (monday, base) = (id_of("monday"), id_of("base"));
    let by_id = ours(&["--snap1", &monday, "--snap2", &base, m, "--json"]);
    let mut named: serde_json::Value = serde_json::from_str(&by_name).unwrap();
    let fields = named.as_object_mut().unwrap();
    assert_eq!(
        fields.remove("left_name"),
        Some("monday".into()),
        "{by_name}"
    );
    assert_eq!(
        fields.remove("right_name"),
        Some("base".into()),
        "{by_name}"
    );
    let by_id: serde_json::Value = serde_json::from_str(&by_id).unwrap();
    assert!(by_id.get("left_name").is_none(), "{by_id}");
    assert_eq!(named, by_id);
}

#[test]
fn bad_ids_and_missing_metadata_snapshot_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let meta = dir.path().join("meta");
    let mut md = file_metadata(&meta, 4 * MIB);
    md.create_thin(1).unwrap();
    md.commit().unwrap();
    drop(md);
    let m = meta.to_str().unwrap();
    for (args, named) in [
        (vec!["--snap1", "1", "--snap2", "99", m], "99"),
        (vec!["--snap1", "77", "--snap2", "1", m], "77"),
        (
            vec!["-m", "--snap1", "1", "--snap2", "1", m],
            "metadata snapshot",
        ),
    ] {
        let out = thinnbd(&[&["delta"], &args[..]].concat());
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stdout.is_empty(), "{args:?} printed {stdout}");
        assert!(stderr.contains(named), "{args:?}: {stderr}");
    }
    // Usage errors: ids missing, a second name without --pool, --pool with ids.
    for args in [
        vec!["delta", m],
        vec!["delta", m, "other", "--snap1", "1", "--snap2", "1"],
        vec!["delta", "--pool", m, "a", "b", "--snap1", "1"],
        vec!["delta", "--snap1", "x", "--snap2", "1", m],
    ] {
        assert_eq!(thinnbd(&args).status.code(), Some(64), "{args:?}");
    }
}
