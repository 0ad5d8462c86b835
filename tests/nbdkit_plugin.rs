//! The nbdkit plugin (the `thinnbd-nbdkit` package, libnbdkit_thinnbd_plugin.so) under nbdkit
//! 1.32 with real clients: nbdinfo, qemu-io, nbdcopy, the stats filter, thin_check, and
//! `thinnbd serve` reading back what nbdkit wrote; the README's and the example script's
//! command lines as written. Each test fails under CI=true when a tool is missing. The plugin
//! is a dev-dependency, so `cargo test` builds the copy these tests load.

mod common;

use std::process::Command;

use common::docs;
use common::nbdkit::*;
use common::nbdsh::{nbdsh, EDGES_OF_THE_EXPORT};
use common::pattern::pattern;
use common::process::{free_port, run, stdout_of};
use common::qemu::{nbdcopy_round_trip, nbdinfo_map, qemu_io_at};
use common::server::{cli_ok, TestPool};
use common::tools::*;
use thinnbd::service::exports::describe;

const MIB: u64 = 1 << 20;

/// Every kind of request through nbdkit, a clean stop, thin_check, then the same data through
/// `thinnbd serve`.
#[test]
fn nbdkit_serves_the_pool_and_thinnbd_serve_reads_it_back() {
    if !require_tools(&["nbdkit", "nbdinfo", "qemu-io", "nbdcopy", "thin_check"]) {
        return;
    }
    let pool = TestPool::with_volumes(&[("disk", "64M"), ("copy", "16M")]);
    cli_ok(&[
        "snapshot",
        "--pool",
        pool.dir_str(),
        "disk",
        "snap",
        "--read-only",
    ]);
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
    qemu_io_at(
        &disk,
        false,
        &[
            "write -P 0xab 0 1M",
            "write -P 0xcd 8M 128K",
            "read -P 0xab 0 1M",
            "read -P 0xcd 8M 128K",
            "read -P 0 1M 7M",
            "flush",
        ],
    );
    let rows = nbdinfo_map(&disk);
    let expect = [
        (0, MIB, 0),
        (MIB, 7 * MIB, 3),
        (8 * MIB, 128 << 10, 0),
        (8 * MIB + (128 << 10), 56 * MIB - (128 << 10), 3),
    ];
    assert_eq!(rows, expect, "map of disk");

    // Trim and zeroing with unmap punch holes (64 KiB pool blocks).
    qemu_io_at(
        &disk,
        false,
        &[
            "discard 0 512K",
            "write -z -u 8M 64K",
            "read -P 0 0 512K",
            "read -P 0xab 512K 512K",
            "read -P 0 8M 64K",
            "read -P 0xcd 8256K 64K",
        ],
    );
    let rows = nbdinfo_map(&disk);
    assert_eq!(rows.first(), Some(&(0, 512 << 10, 3)), "{rows:?}");
    assert!(rows.contains(&(512 << 10, 512 << 10, 0)), "{rows:?}");
    assert!(
        rows.contains(&(8 * MIB + (64 << 10), 64 << 10, 0)),
        "{rows:?}"
    );

    // The snapshot was taken before any write: all holes, read-only.
    assert_eq!(nbdinfo_map(&nbdkit.uri("snap")), [(0, 64 * MIB, 3)]);
    let json = stdout_of(Command::new("nbdinfo").args(["--json", &nbdkit.uri("snap")]));
    assert!(json.contains("\"is_read_only\": true"), "{json}");

    // nbdcopy in and out (several connections, extents, zero detection).
    let mut image = pattern(7, (16 * MIB) as usize);
    image[(2 * MIB) as usize..(5 * MIB) as usize].fill(0);
    let copy = nbdkit.uri("copy");
    nbdcopy_round_trip(pool.tmp.path(), &image, &copy, &copy);

    // SIGTERM: nbdkit closes connections, the plugin commits and shuts the pool down.
    nbdkit.stop_cleanly();
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
    let serve = serve_pool(&pool);
    qemu_io_at(
        &serve.uri("disk"),
        false,
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
    serve.stop();
    run(Command::new("thin_check").arg(pool.dir.join("metadata")));
}

/// `export=NAME` over TCP: one volume listed, and it is the default export; what a client
/// negotiates (sizes, flags, block sizes) is what the plugin answers.
#[test]
fn export_key_serves_one_volume_as_the_default() {
    if !require_tools(&["nbdkit", "nbdinfo", "qemu-io"]) {
        return;
    }
    let pool = TestPool::with_volumes(&[("a", "16M"), ("b", "32M")]);
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
        // 64 MiB, as `thinnbd serve` advertises by default.
        "\"block_size_maximum\":67108864",
    ] {
        assert!(compact.contains(field), "missing {field} in:\n{json}");
    }
    let d = describe("b", 32 * MIB, None, false);
    assert!(json.contains(&d), "missing description {d:?} in:\n{json}");

    // Written through the default export, read back by name.
    qemu_io_at(&nbdkit.uri(""), false, &["write -P 0x5a 1M 64K"]);
    qemu_io_at(&nbdkit.uri("b"), false, &["read -P 0x5a 1M 64K"]);
    let refused = Command::new("nbdinfo")
        .arg(nbdkit.uri("a"))
        .output()
        .unwrap();
    assert!(!refused.status.success(), "export a should be refused");

    nbdkit.stop_cleanly();
}

/// Bad or missing parameters, a missing pool, an unknown export and a pool in use all stop
/// nbdkit at start with a message saying so.
#[test]
fn bad_parameters_fail_at_start_with_a_message() {
    if !require_tools(&["nbdkit"]) {
        return;
    }
    let pool = TestPool::with_volumes(&[("disk", "16M")]);
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

    let serve = serve_pool(&pool);
    let stderr = nbdkit_start_failure(&[&p]);
    assert!(stderr.contains("in use"), "{stderr}");
    serve.stop();
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
    let pool = TestPool::with_volumes(&[("disk", "16M")]);
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
    qemu_io_at(
        &uri,
        false,
        &["write -P 0x77 3M 256K", "read -P 0x77 3M 256K"],
    );
    daemon.stop();
    run(Command::new("thin_check").arg(pool.dir.join("metadata")));

    // What the daemon wrote was committed.
    let serve = serve_pool(&pool);
    qemu_io_at(
        &serve.uri("disk"),
        false,
        &["read -P 0x77 3M 256K", "read -P 0 0 3M"],
    );
    serve.stop();
}

/// examples/nbdkit-serve.sh runs the command line the README shows.
#[test]
fn example_script_serves_a_pool() {
    if !require_tools(&["nbdkit", "nbdinfo"]) {
        return;
    }
    let pool = TestPool::with_volumes(&[("vm1", "16M"), ("vm2", "16M")]);
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

/// Runs a cargo command on this checkout's workspace (offline: it only reads manifests and
/// the lock file).
fn cargo(args: &[&str]) -> String {
    stdout_of(
        Command::new(env!("CARGO"))
            .args(args)
            .args(["--offline", "--manifest-path"])
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")),
    )
}

/// The features each package is built with when `cargo build -p PACKAGE` builds it and its
/// normal dependencies.
fn built_features(package: &str) -> std::collections::BTreeMap<String, String> {
    cargo(&[
        "tree", "-p", package, "-e", "no-dev", "--prefix", "none", "-f", "{p}|{f}",
    ])
    .lines()
    .filter_map(|l| l.trim_end_matches(" (*)").split_once('|'))
    .map(|(p, f)| (p.to_string(), f.to_string()))
    .collect()
}

/// Switching between `cargo build --release` and `cargo build --release -p thinnbd-nbdkit`
/// recompiles only the plugin: the library and every one of its dependencies are built with
/// the same features both ways, so both builds share them.
#[test]
fn the_plugin_build_reuses_the_library_as_built() {
    let plain = built_features("thinnbd");
    let plugin = built_features("thinnbd-nbdkit");
    assert!(
        plain.keys().any(|p| p.starts_with("thinnbd v")),
        "{plain:#?}"
    );
    for (package, features) in &plain {
        assert_eq!(
            plugin.get(package),
            Some(features),
            "{package}: features with the plugin build against the plain build"
        );
    }
}

/// A plain `cargo build` builds the workspace's default members: none of them makes a shared
/// library (nbdkit refuses one without `plugin_init`). The one package that does is the plugin,
/// built only on request, and its file is a plugin nbdkit loads.
#[test]
fn only_the_plugin_package_makes_a_shared_library() {
    let out = cargo(&["metadata", "--no-deps", "--format-version", "1"]);
    let meta: serde_json::Value = serde_json::from_str(&out).expect("cargo metadata JSON");
    let default_members = meta["workspace_default_members"]
        .as_array()
        .expect("workspace_default_members");
    let mut shared = Vec::new();
    for package in meta["packages"].as_array().expect("packages") {
        let built_by_default = default_members.contains(&package["id"]);
        for target in package["targets"].as_array().expect("targets") {
            let kinds = target["crate_types"].as_array().expect("crate_types");
            if kinds.iter().any(|k| k == "cdylib" || k == "dylib") {
                shared.push((
                    package["name"].as_str().unwrap_or_default().to_string(),
                    format!("lib{}.so", target["name"].as_str().unwrap_or_default()),
                    built_by_default,
                ));
            }
        }
    }
    assert_eq!(
        shared,
        [("thinnbd-nbdkit".to_string(), PLUGIN_FILE.to_string(), false)],
        "(package, shared library, built by a plain `cargo build`)"
    );

    if !require_tools(&["nbdkit", "nm"]) {
        return;
    }
    let so = plugin();
    let symbols = stdout_of(Command::new("nm").args(["-D", "--defined-only"]).arg(&so));
    assert!(
        symbols.lines().any(|l| l.ends_with(" T plugin_init")),
        "no plugin_init in {}",
        so.display()
    );
}

/// The README's nbdkit block as written, from a directory laid out like the checkout (the
/// pool `thinnbd serve` makes in ./thinnbd-pool, config/thinnbd.toml): each nbdkit line
/// serves, and the nbdinfo lines after it reach the export named. Only what a test must not
/// share is swapped: the plugin for the copy this test run built, the port for a free one,
/// the socket for one in the test's directory.
#[test]
fn readme_plugin_examples_work_as_written() {
    if !require_tools(&["nbdkit", "nbdinfo", "sh"]) {
        return;
    }
    let block = docs::sh_block(&docs::read_doc("README.md"), "## Serve it with nbdkit");
    assert_eq!(
        block.first().map(String::as_str),
        Some("cargo build --release -p thinnbd-nbdkit"),
        "{block:#?}"
    );
    let pool = TestPool::named("thinnbd-pool", "1G", &[("default", "16M"), ("vm2", "16M")]);
    let work = pool.tmp.path();
    std::fs::create_dir(work.join("config")).unwrap();
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/config/thinnbd.toml"),
        work.join("config/thinnbd.toml"),
    )
    .unwrap();

    let built_at = format!("./target/release/{PLUGIN_FILE}");
    let so = plugin().display().to_string();
    let sock = work.join("thinnbd.sock");
    let port = free_port();
    let as_here = |line: &str| {
        line.replace(&built_at, &so)
            .replace("/tmp/thinnbd.sock", &sock.display().to_string())
            .replace("10809", &port.to_string())
    };
    let shell = |line: String| {
        let mut cmd = Command::new("sh");
        cmd.current_dir(work).arg("-c").arg(line);
        cmd
    };
    let stop = |mut server: Process| {
        let status = server.stop();
        assert!(status.success(), "nbdkit exit: {status}\n{}", server.log());
    };

    // (server line, client lines run against it)
    let mut served: Vec<(&str, usize)> = Vec::new();
    let mut server: Option<Process> = None;
    for line in &block[1..] {
        if line.starts_with("nbdkit ") {
            if let Some(previous) = server.take() {
                stop(previous);
            }
            assert!(line.contains(&built_at), "{line}\nloads no {built_at}");
            let log = work.join(format!("nbdkit-{}.log", served.len()));
            // exec: SIGTERM reaches nbdkit itself.
            let mut proc = Process::spawn(shell(format!("exec {}", as_here(line))), line, log);
            if line.contains(" -U ") {
                proc.wait_until(|| std::os::unix::net::UnixStream::connect(&sock).is_ok());
            } else {
                assert!(
                    line.contains(" -i 127.0.0.1 "),
                    "{line}\nlistens beyond 127.0.0.1"
                );
                proc.wait_until(|| std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
            }
            served.push((line, 0));
            server = Some(proc);
        } else if line.starts_with("nbdinfo ") {
            let out = stdout_of(&mut shell(as_here(line)));
            assert!(out.contains("export=\"default\""), "{line}\n{out}");
            served.last_mut().expect("an nbdkit line before").1 += 1;
        } else {
            panic!("a line the test does not know how to run: {line}");
        }
    }
    if let Some(last) = server.take() {
        stop(last);
    }
    assert!(
        served.iter().any(|(l, _)| l.contains(" -U "))
            && served.iter().any(|(l, _)| l.contains(" -i 127.0.0.1 ")),
        "{served:#?}"
    );
    assert!(
        served.iter().all(|(_, clients)| *clients > 0),
        "{served:#?}"
    );
}

/// Without THINNBD_PLUGIN the example script builds the plugin package and serves the file
/// that build leaves, in CARGO_TARGET_DIR when that is set.
#[test]
fn example_script_builds_and_serves_the_plugin_package() {
    let pool = TestPool::with_volumes(&[("vm1", "16M")]);
    let root = env!("CARGO_MANIFEST_DIR");
    let elsewhere = pool.path("target");
    for (target_dir, plugin_at) in [
        (None, format!("{root}/target/release/{PLUGIN_FILE}")),
        (
            Some(&elsewhere),
            format!("{}/release/{PLUGIN_FILE}", elsewhere.display()),
        ),
    ] {
        let mut cmd = Command::new("bash");
        cmd.arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/nbdkit-serve.sh"
        ))
        .arg(&pool.dir)
        .arg("--dry-run")
        .env_remove("THINNBD_PLUGIN")
        .env_remove("CARGO_TARGET_DIR");
        if let Some(dir) = target_dir {
            cmd.env("CARGO_TARGET_DIR", dir);
        }
        let out = stdout_of(&mut cmd);
        assert!(
            out.lines()
                .any(|l| l == "cargo build --release -p thinnbd-nbdkit"),
            "{out}"
        );
        let pool_key = format!("pool={}", pool.dir.display());
        assert!(
            out.lines().any(|l| l.starts_with("nbdkit -f ")
                && l.contains(&plugin_at)
                && l.ends_with(&pool_key)),
            "want nbdkit with {plugin_at} in:\n{out}"
        );
    }
}

/// nbdkit answers requests past the end itself, and the plugin advertises the same maximum
/// as `thinnbd serve`: a client sees the same errors and limits from both frontends.
#[test]
fn past_the_end_and_large_requests_answer_as_under_thinnbd_serve() {
    if !require_tools(&["nbdkit"]) {
        return;
    }
    let Some(_) = nbdsh() else {
        return;
    };
    let pool = TestPool::with_volumes(&[("vol", "64M")]);
    let mut nbdkit = Nbdkit::start_unix(&pool, &[], &[]);
    let mut cmd = nbdsh().expect("nbdsh");
    let out = stdout_of(
        cmd.env("URI", nbdkit.uri("vol"))
            .args(["-c", EDGES_OF_THE_EXPORT]),
    );
    assert!(out.contains("nbdsh ok"), "{out}");
    nbdkit.stop_cleanly();
}

/// nbdkit does the TLS (`--tls=require` with X.509 certificates, or with a PSK file) in front of
/// the plugin; nbdinfo reads the pool through it, and a client without TLS gets nothing.
#[test]
fn the_plugin_under_nbdkits_tls() {
    if !require_tools(&["nbdkit", "nbdinfo", "openssl"]) {
        return;
    }
    let pool = TestPool::with_volumes(&[("disk", "16M")]);
    let creds = common::tls::Credentials::make(&pool.path("creds"));
    let server_dir = creds.server.display().to_string();
    let psk_file = creds.psk.display().to_string();
    for (nbdkit_args, query, user) in [
        (
            ["--tls=require", "--tls-certificates", &server_dir],
            format!("tls-certificates={}", creds.client.display()),
            "",
        ),
        (
            ["--tls=require", "--tls-psk", &psk_file],
            format!("tls-psk-file={psk_file}"),
            "alice@",
        ),
    ] {
        let mut nbdkit = Nbdkit::start_tcp(&pool, &nbdkit_args, &[]);
        let Endpoint::Tcp(port) = nbdkit.endpoint else {
            unreachable!("started on TCP")
        };
        let uri = format!("nbds://{user}localhost:{port}/disk?{query}");
        let info = stdout_of(Command::new("nbdinfo").arg(&uri));
        assert!(info.contains("with TLS"), "{info}");
        assert!(info.contains("export-size: 16777216"), "{info}");
        let plain = Command::new("nbdinfo")
            .arg(nbdkit.uri("disk"))
            .output()
            .unwrap();
        assert!(!plain.status.success(), "a client without TLS was served");
        nbdkit.stop_cleanly();
    }
}

/// nbdkit 1.32 tells a plugin nothing of who a TLS client is, so even a client a volume's
/// grants name is unknown to the plugin: a volume with grants is neither listed nor opened,
/// and `export=` naming one stops nbdkit at start with the reason.
#[test]
fn the_plugin_never_serves_a_volume_with_grants() {
    if !require_tools(&["nbdkit", "nbdinfo", "openssl"]) {
        return;
    }
    let pool = TestPool::with_volumes(&[("open", "16M"), ("kept", "16M")]);
    cli_ok(&[
        "volume",
        "access",
        "--pool",
        pool.dir_str(),
        "kept",
        "--allow",
        "psk:alice",
    ]);
    let creds = common::tls::Credentials::make(&pool.path("creds"));
    let psk_file = creds.psk.display().to_string();
    let mut nbdkit = Nbdkit::start_tcp(&pool, &["--tls=require", "--tls-psk", &psk_file], &[]);
    let Endpoint::Tcp(port) = nbdkit.endpoint else {
        unreachable!("started on TCP")
    };
    let uri =
        |export: &str| format!("nbds://alice@localhost:{port}/{export}?tls-psk-file={psk_file}");
    let list = stdout_of(Command::new("nbdinfo").arg("--list").arg(uri("")));
    assert!(list.contains("export=\"open\""), "{list}");
    assert!(!list.contains("kept"), "{list}");
    let info = stdout_of(Command::new("nbdinfo").arg(uri("open")));
    assert!(info.contains("export-size: 16777216"), "{info}");
    let refused = Command::new("nbdinfo").arg(uri("kept")).output().unwrap();
    assert!(!refused.status.success(), "a volume with grants was served");
    nbdkit.stop_cleanly();

    let stderr = nbdkit_start_failure(&[&pool.pool_arg(), "export=kept"]);
    assert!(
        stderr.contains("export=kept: the volume has an access list"),
        "{stderr}"
    );
}
