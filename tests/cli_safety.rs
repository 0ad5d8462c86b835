//! Commands that must not lose data or hide its state: `restore` refuses the metadata of a pool
//! that is open and valid metadata without `--force`; a corrupt pool's error names the file and
//! the way out; a missing pool's error gives the `pool create` command.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::nbd_client::{Client, Command as NbdCommand};
use common::server::*;

/// `thinnbd ARGS...` to completion, whatever its exit status.
fn thinnbd_output(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run thinnbd")
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The stderr of a command that must have failed with exit status 2 (a refused command).
fn refused(out: &Output, what: &str) -> String {
    let err = stderr_of(out);
    assert_eq!(out.status.code(), Some(2), "{what}: {err}");
    err
}

/// A pool with volume `vm1` holding 64 KiB of 0x5a at 1 MiB, written through a server that
/// was stopped again.
fn pool_with_data() -> TestPool {
    let pool = TestPool::create("1G");
    pool.create_volume("vm1", "64M");
    let server = pool.serve();
    let (mut c, _, _) = Client::open(server.port, "vm1");
    assert_eq!(c.write_at(1, 1 << 20, &[0x5a; 64 << 10]), 0);
    c.disconnect();
    server.stop();
    pool
}

/// The 64 KiB at 1 MiB of `vm1` read back through a fresh server.
fn assert_data_intact(pool: &TestPool) {
    let server = pool.serve();
    let (mut c, _, _) = Client::open(server.port, "vm1");
    let data = c.read_at(2, 1 << 20, 64 << 10).expect("read vm1");
    assert!(data.iter().all(|&b| b == 0x5a), "vm1 lost its data");
    c.disconnect();
    server.stop();
}

/// `thinnbd restore -i XML -o META [--force]`.
fn restore(xml: &Path, meta: &Path, force: bool) -> Output {
    let mut args = vec![
        "restore",
        "-i",
        xml.to_str().unwrap(),
        "-o",
        meta.to_str().unwrap(),
    ];
    if force {
        args.push("--force");
    }
    thinnbd_output(&args)
}

/// `restore --force` of the pool's own dump succeeds, and the pool is clean with its data.
fn restore_forced_keeps_the_data(pool: &TestPool, saved: &Path, meta: &Path) {
    let out = restore(saved, meta, true);
    assert!(out.status.success(), "restore --force: {}", stderr_of(&out));
    assert_pool_clean(&pool.dir);
    assert_data_intact(pool);
}

/// The first btree leaf (flags 2) in a metadata image with `value_size`-byte values and
/// `entries` entries or more.
fn btree_leaf(image: &[u8], value_size: u8, entries: u8) -> Option<usize> {
    (1..image.len() / 4096).find(|b| {
        let blk = &image[b * 4096..(b + 1) * 4096];
        blk[4] == 2 && blk[24] == value_size && blk[16] >= entries
    })
}

/// `pool_with_data`, its metadata file, and a dump of it in `saved.xml`.
fn pool_with_a_dump() -> (TestPool, PathBuf, PathBuf) {
    let pool = pool_with_data();
    let meta = pool.dir.join("metadata");
    let saved = pool.tmp.path().join("saved.xml");
    cli_ok(&[
        "dump",
        meta.to_str().unwrap(),
        "-o",
        saved.to_str().unwrap(),
    ]);
    (pool, meta, saved)
}

#[test]
fn restore_refuses_the_metadata_of_a_served_pool() {
    let (pool, meta, saved) = pool_with_a_dump();
    let server = pool.serve();
    for force in [false, true] {
        let out = restore(&saved, &meta, force);
        let err = refused(&out, "restore over a served pool");
        assert!(err.contains(meta.to_str().unwrap()), "{err}");
        assert!(
            err.contains(&format!(
                "in use by process {} (thinnbd serve)",
                server.pid()
            )),
            "the error does not name the server: {err}"
        );
    }
    server.stop();
    assert_pool_clean(&pool.dir);
    assert_data_intact(&pool);
}

#[test]
fn restore_over_valid_metadata_needs_force() {
    let (pool, meta, saved) = pool_with_a_dump();
    let before = std::fs::read(&meta).expect("read metadata");
    let out = restore(&saved, &meta, false);
    let err = refused(&out, "restore over valid metadata");
    assert!(err.contains(meta.to_str().unwrap()), "{err}");
    assert!(err.contains("--force"), "{err}");
    assert_eq!(
        std::fs::read(&meta).expect("read metadata"),
        before,
        "the refused restore changed the metadata"
    );
    restore_forced_keeps_the_data(&pool, &saved, &meta);
}

#[test]
fn corrupt_metadata_names_the_file_and_the_way_out() {
    let (pool, meta, saved) = pool_with_a_dump();
    // Damage the device details leaf (a btree leaf, flags 2, of 24-byte values), which every
    // open reads.
    let mut bytes = std::fs::read(&meta).expect("read metadata");
    let leaf = btree_leaf(&bytes, 24, 1).expect("a device details leaf");
    bytes[leaf * 4096 + 3000] ^= 0x40;
    std::fs::write(&meta, &bytes).expect("write metadata");

    let dir = pool.dir_str();
    let out = thinnbd_output(&["pool", "status", dir]);
    let err = refused(&out, "pool status");
    assert!(err.contains("corrupt metadata"), "{err}");
    assert!(err.contains(meta.to_str().unwrap()), "no file named: {err}");
    assert!(
        err.contains(&format!("thinnbd check {dir}")),
        "no check hint: {err}"
    );
    let restore_hint = format!("thinnbd restore -i DUMP.xml -o {} --force", meta.display());
    assert!(err.contains(&restore_hint), "no restore hint: {err}");
    let (status, err) = serve_refused(pool.tmp.path(), |cmd| {
        cmd.arg("--pool").arg(&pool.dir);
    });
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains(&restore_hint), "serve: no restore hint: {err}");

    // The way out works as written.
    restore_forced_keeps_the_data(&pool, &saved, &meta);
}

#[test]
fn a_missing_pool_gives_the_pool_create_command() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let typo = tmp.path().join("pooll");
    let typo = typo.to_str().unwrap();
    for args in [
        vec!["volume", "list", "--pool", typo],
        vec!["pool", "status", typo],
        vec!["volume", "create", "--pool", typo, "vm1", "--size", "1G"],
    ] {
        let out = thinnbd_output(&args);
        let err = refused(&out, &format!("{args:?}"));
        assert!(
            err.contains(&format!("thinnbd pool create {typo} --data-size")),
            "{args:?}: no `pool create` command: {err}"
        );
    }
    assert!(!Path::new(typo).exists());
}

#[test]
fn check_of_a_served_pool_checks_the_last_commit() {
    let pool = pool_with_data();
    let server = pool.serve();
    let (mut c, _, _) = Client::open(server.port, "vm1");
    for i in 0..4u64 {
        assert_eq!(c.write_at(10 + i, (8 + i * 2) << 20, &[0x33; 4096]), 0);
    }
    c.request(NbdCommand::Flush, 0, 20, 0, 0);
    assert_eq!(c.simple_reply(), (0, 20), "flush");
    c.disconnect();

    let dir = pool.dir_str();
    let out = thinnbd_output(&["check", dir]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{text}{}", stderr_of(&out));
    assert!(
        text.contains("1 devices, 5 mappings"),
        "the report does not show the committed mappings:\n{text}"
    );
    assert!(
        text.contains("checked through the running server"),
        "{text}"
    );
    assert!(text.lines().any(|l| l == "clean"), "{text}");

    // The metadata file on its own cannot be read consistently under the server.
    let meta = pool.dir.join("metadata");
    let out = thinnbd_output(&["check", meta.to_str().unwrap()]);
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        stderr_of(&out)
    );
    assert_eq!(out.status.code(), Some(2), "{all}");
    assert!(all.contains("not checked"), "{all}");
    assert!(!all.contains("clean"), "{all}");

    // Bit rot in a block of the last commit (vm1's mapping leaf: flags 2, 8-byte values, five
    // entries or more) is found through the server too.
    let mut bytes = std::fs::read(&meta).expect("read metadata");
    let leaf = btree_leaf(&bytes, 8, 5).expect("vm1's mapping leaf");
    bytes[leaf * 4096 + 3000] ^= 0x40;
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&meta)
            .expect("open metadata");
        f.write_all_at(&bytes[leaf * 4096..(leaf + 1) * 4096], (leaf * 4096) as u64)
            .expect("damage the leaf");
    }
    let out = thinnbd_output(&["check", dir]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{text}{}", stderr_of(&out));
    assert!(
        text.contains("problem:") && text.contains(&format!("block {leaf}")),
        "the damaged block {leaf} is not reported:\n{text}"
    );
    assert!(!text.lines().any(|l| l == "clean"), "{text}");
    server.stop();
}
