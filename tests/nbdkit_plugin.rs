//! The nbdkit plugin (libthinnbd.so) under nbdkit 1.32 with real clients: nbdinfo, qemu-io,
//! nbdcopy, the stats filter, thin_check, and `thinnbd serve` reading back what nbdkit wrote.
//! Each test fails under CI=true when a tool is missing. Needs the plugin built:
//! `cargo build --release --features nbdkit --lib` (tests/run-all.sh does it).
#![cfg(feature = "nbdkit")]

mod nbdkit_support;

use std::process::Command;

use nbdkit_support::*;
use thinnbd::service::exports::describe;

const MIB: u64 = 1 << 20;

/// Every kind of request through nbdkit, a clean stop, thin_check, then the same data through
/// `thinnbd serve`.
#[test]
fn nbdkit_serves_the_pool_and_thinnbd_serve_reads_it_back() {
    if !require_tools(&["nbdkit", "nbdinfo", "qemu-io", "nbdcopy", "thin_check"]) {
        return;
    }
    let pool = TestPool::new(&[("disk", "64M"), ("copy", "16M")]);
    run(thinnbd().args(["snapshot", "--pool"]).arg(&pool.dir).args([
        "disk",
        "snap",
        "--read-only",
    ]));
    let stats = pool.path("stats.txt");
    let mut nbdkit = Nbdkit::start_unix(
        &pool,
        &["--filter=stats"],
        &[&format!("statsfile={}", stats.display())],
    );

    // The list: every volume with its description.
    let list = stdout_of(Command::new("nbdinfo").args(["--list", &nbdkit.uri("")]));
    for (name, size, origin, ro) in [
        ("disk", 64 * MIB, None, false),
        ("copy", 16 * MIB, None, false),
        ("snap", 64 * MIB, Some("disk"), true),
    ] {
        assert!(list.contains(&format!("export=\"{name}\"")), "{list}");
        let d = describe(name, size, origin, ro);
        assert!(list.contains(&d), "missing {d:?} in:\n{list}");
    }

    // Pattern writes and reads back; unwritten space reads as zeros.
    let disk = nbdkit.uri("disk");
    qemu_io(
        &disk,
        &[
            "write -P 0xab 0 1M",
            "write -P 0xcd 8M 128K",
            "read -P 0xab 0 1M",
            "read -P 0xcd 8M 128K",
            "read -P 0 1M 7M",
            "flush",
        ],
    );
    let rows = map(&disk);
    let expect = [
        (0, MIB, 0),
        (MIB, 7 * MIB, 3),
        (8 * MIB, 128 << 10, 0),
        (8 * MIB + (128 << 10), 56 * MIB - (128 << 10), 3),
    ];
    assert_eq!(rows, expect, "map of disk");

    // Trim and zeroing with unmap punch holes (64 KiB pool blocks).
    qemu_io(
        &disk,
        &[
            "discard 0 512K",
            "write -z -u 8M 64K",
            "read -P 0 0 512K",
            "read -P 0xab 512K 512K",
            "read -P 0 8M 64K",
            "read -P 0xcd 8256K 64K",
        ],
    );
    let rows = map(&disk);
    assert_eq!(rows.first(), Some(&(0, 512 << 10, 3)), "{rows:?}");
    assert!(rows.contains(&(512 << 10, 512 << 10, 0)), "{rows:?}");
    assert!(
        rows.contains(&(8 * MIB + (64 << 10), 64 << 10, 0)),
        "{rows:?}"
    );

    // The snapshot was taken before any write: all holes, read-only.
    assert_eq!(map(&nbdkit.uri("snap")), [(0, 64 * MIB, 3)]);
    let json = stdout_of(Command::new("nbdinfo").args(["--json", &nbdkit.uri("snap")]));
    assert!(json.contains("\"is_read_only\": true"), "{json}");

    // nbdcopy in and out (several connections, extents, zero detection).
    let mut image = pattern(7, (16 * MIB) as usize);
    image[(2 * MIB) as usize..(5 * MIB) as usize].fill(0);
    let input = pool.path("in.img");
    let output = pool.path("out.img");
    std::fs::write(&input, &image).unwrap();
    run(Command::new("nbdcopy").arg(&input).arg(nbdkit.uri("copy")));
    run(Command::new("nbdcopy").arg(nbdkit.uri("copy")).arg(&output));
    assert!(
        std::fs::read(&output).unwrap() == image,
        "nbdcopy round trip differs"
    );

    // SIGTERM: nbdkit closes connections, the plugin commits and shuts the pool down.
    let status = nbdkit.proc.stop();
    assert!(
        status.success(),
        "nbdkit exit: {status}\n{}",
        nbdkit.proc.log()
    );
    let stats = std::fs::read_to_string(&stats).expect("stats file");
    for op in ["read", "write", "trim", "zero", "flush", "extents"] {
        let ops: u64 = stats
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{op}: ")))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {op} line in stats:\n{stats}"));
        assert!(ops > 0, "no {op} operations counted:\n{stats}");
    }
    run(Command::new("thin_check").arg(pool.dir.join("metadata")));

    // The same pool, the same data, through the NBD server of the CLI.
    let mut serve = Serve::start(&pool);
    qemu_io(
        &serve.uri("disk"),
        &[
            "read -P 0 0 512K",
            "read -P 0xab 512K 512K",
            "read -P 0 8M 64K",
            "read -P 0xcd 8256K 64K",
        ],
    );
    let again = pool.path("again.img");
    run(Command::new("nbdcopy").arg(serve.uri("copy")).arg(&again));
    assert!(
        std::fs::read(&again).unwrap() == image,
        "thinnbd serve reads other data"
    );
    let status = serve.proc.stop();
    assert!(
        status.success(),
        "thinnbd serve exit: {status}\n{}",
        serve.proc.log()
    );
    run(Command::new("thin_check").arg(pool.dir.join("metadata")));
}

/// `export=NAME` over TCP: one volume listed, and it is the default export; what a client
/// negotiates (sizes, flags, block sizes) is what the plugin answers.
#[test]
fn export_key_serves_one_volume_as_the_default() {
    if !require_tools(&["nbdkit", "nbdinfo", "qemu-io"]) {
        return;
    }
    let pool = TestPool::new(&[("a", "16M"), ("b", "32M")]);
    let mut nbdkit = Nbdkit::start_tcp(&pool, &[], &["export=b"]);
    let list = stdout_of(Command::new("nbdinfo").args(["--list", &nbdkit.uri("")]));
    assert!(list.contains("export=\"b\""), "{list}");
    assert!(!list.contains("export=\"a\""), "{list}");

    let json = stdout_of(Command::new("nbdinfo").args(["--json", &nbdkit.uri("")]));
    let compact: String = json.split_whitespace().collect();
    for field in [
        "\"export-size\":33554432",
        "\"is_read_only\":false",
        "\"can_multi_conn\":true",
        "\"can_fua\":true",
        "\"can_flush\":true",
        "\"can_trim\":true",
        "\"can_zero\":true",
        "\"can_fast_zero\":true",
        "\"can_cache\":true",
        "\"block_size_minimum\":1",
        "\"block_size_preferred\":65536",
        "\"block_size_maximum\":33554432",
    ] {
        assert!(compact.contains(field), "missing {field} in:\n{json}");
    }
    let d = describe("b", 32 * MIB, None, false);
    assert!(json.contains(&d), "missing description {d:?} in:\n{json}");

    // Written through the default export, read back by name.
    qemu_io(&nbdkit.uri(""), &["write -P 0x5a 1M 64K"]);
    qemu_io(&nbdkit.uri("b"), &["read -P 0x5a 1M 64K"]);
    let refused = Command::new("nbdinfo")
        .arg(nbdkit.uri("a"))
        .output()
        .unwrap();
    assert!(!refused.status.success(), "export a should be refused");

    let status = nbdkit.proc.stop();
    assert!(
        status.success(),
        "nbdkit exit: {status}\n{}",
        nbdkit.proc.log()
    );
}

/// Bad or missing parameters, a missing pool, an unknown export and a pool in use all stop
/// nbdkit at start with a message saying so.
#[test]
fn bad_parameters_fail_at_start_with_a_message() {
    if !require_tools(&["nbdkit"]) {
        return;
    }
    let pool = TestPool::new(&[("disk", "16M")]);
    let p = pool.pool_arg();
    let missing_config = format!("config={}", pool.path("none.toml").display());
    let empty = pool.path("empty");
    std::fs::create_dir(&empty).unwrap();
    let empty_pool = format!("pool={}", empty.display());
    let cases: [(Vec<&str>, &str); 6] = [
        (vec![], "pool=DIR is required"),
        (vec![&p, "size=1G"], "unknown parameter size=1G"),
        (vec![&p, &p], "given twice"),
        (vec![&empty_pool], "holds no pool"),
        (vec![&p, "export=nosuch"], "no such volume"),
        (vec![&p, &missing_config], "reading config"),
    ];
    for (args, message) in cases {
        let stderr = nbdkit_start_failure(&args);
        assert!(
            stderr.contains(message),
            "{args:?}: want {message:?} in:\n{stderr}"
        );
    }

    let mut serve = Serve::start(&pool);
    let stderr = nbdkit_start_failure(&[&p]);
    assert!(stderr.contains("in use"), "{stderr}");
    assert!(serve.proc.stop().success());
}

/// `--help` and `--dump-plugin` load and unload the plugin without a pool.
#[test]
fn help_and_dump_plugin_need_no_pool() {
    if !require_tools(&["nbdkit"]) {
        return;
    }
    let so = plugin();
    let help = stdout_of(Command::new("nbdkit").arg(&so).arg("--help"));
    assert!(help.contains("pool=DIR"), "{help}");
    let dump = stdout_of(Command::new("nbdkit").arg(&so).arg("--dump-plugin"));
    for line in [
        "name=thinnbd",
        "thread_model=parallel",
        "has_list_exports=1",
        "has_default_export=1",
        "has_export_description=1",
        "has_block_size=1",
        "has_cleanup=1",
        "has_after_fork=1",
        "thinnbd_version=",
    ] {
        assert!(dump.contains(line), "missing {line} in:\n{dump}");
    }
}

/// Without -f nbdkit forks into the background and changes directory to /: the pool (given
/// by a relative path) is opened after the fork, serves, and SIGTERM to the daemon still
/// commits a pool that thin_check accepts.
#[test]
fn daemonized_nbdkit_opens_the_pool_after_the_fork() {
    if !require_tools(&["nbdkit", "qemu-io", "thin_check"]) {
        return;
    }
    let pool = TestPool::new(&[("disk", "16M")]);
    let sock = pool.path("daemon.sock");
    let pidfile = pool.path("daemon.pid");
    // nbdkit returns once the daemon is ready (after after_fork) and has written the pid file.
    let daemon = Daemon::start(
        Command::new("nbdkit")
            .current_dir(pool.tmp.path())
            .arg("-U")
            .arg(&sock)
            .arg("-P")
            .arg(&pidfile)
            .arg(plugin())
            .arg("pool=pool"),
        &pool.path("daemon.log"),
        &pidfile,
    );
    let uri = Endpoint::Unix(sock).uri("disk");
    qemu_io(&uri, &["write -P 0x77 3M 256K", "read -P 0x77 3M 256K"]);
    daemon.stop();
    run(Command::new("thin_check").arg(pool.dir.join("metadata")));

    // What the daemon wrote was committed.
    let mut serve = Serve::start(&pool);
    qemu_io(
        &serve.uri("disk"),
        &["read -P 0x77 3M 256K", "read -P 0 0 3M"],
    );
    assert!(serve.proc.stop().success());
}

/// examples/nbdkit-serve.sh runs the command line the README shows.
#[test]
fn example_script_serves_a_pool() {
    if !require_tools(&["nbdkit", "nbdinfo"]) {
        return;
    }
    let pool = TestPool::new(&[("vm1", "16M"), ("vm2", "16M")]);
    let sock = pool.path("example.sock");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/nbdkit-serve.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(&script)
        .arg(&pool.dir)
        .arg("--socket")
        .arg(&sock)
        .env("THINNBD_PLUGIN", plugin());
    let mut proc = Process::spawn(cmd, "examples/nbdkit-serve.sh", pool.path("example.log"));
    let uri = Endpoint::Unix(sock.clone()).uri("");
    proc.wait_until(|| sock.exists());
    let list = stdout_of(Command::new("nbdinfo").args(["--list", &uri]));
    for name in ["vm1", "vm2"] {
        assert!(list.contains(&format!("export=\"{name}\"")), "{list}");
    }
    // The script execs nbdkit, so SIGTERM reaches it and the pool is committed.
    let status = proc.stop();
    assert!(status.success(), "exit: {status}\n{}", proc.log());
}
