//! Space promises the CLI makes: volumes whose sizes add up to more than
//! the pool's data get LVM's over-commit warning, whether the command ran offline or through a
//! running server; the default low-water mark is a share of the pool, so a new pool is not
//! born below it; and the mark is logged in bytes.

mod common;

use common::qemu::qemu_io_ok;
use common::server::{cli, cli_ok, make_pool, pool_status, Server};

const OVERCOMMIT: &str = "WARNING: sum of all thin volume sizes";

/// Runs the CLI, requires success, returns stderr.
fn stderr_ok(args: &[&str]) -> String {
    let out = cli(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "thinnbd {args:?} failed:\n{}{err}",
        String::from_utf8_lossy(&out.stdout)
    );
    err
}

#[test]
fn sizes_beyond_the_pool_warn_offline_and_online() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let p = pool.to_str().unwrap();
    make_pool(&pool, "2G", &[]);
    let err = stderr_ok(&["volume", "create", "--pool", p, "small", "--size", "1G"]);
    assert!(
        !err.contains("WARNING"),
        "1G of 2G is no over-commit: {err}"
    );

    let err = stderr_ok(&["volume", "create", "--pool", p, "huge", "--size", "100T"]);
    assert!(err.contains(OVERCOMMIT), "offline create: {err}");
    assert!(
        err.contains("exceeds the size of thin pool") && err.contains("2147483648 bytes"),
        "{err}"
    );
    let w = pool_status(&pool)["warnings"].to_string();
    assert!(w.contains("sum of all thin volume sizes"), "{w}");

    let mut server = Server::start_on_pool(&pool, None, &dir.path().join("log"));
    let err = stderr_ok(&["snapshot", "--pool", p, "huge", "huge-snap"]);
    assert!(err.contains(OVERCOMMIT), "online snapshot: {err}");
    let err = stderr_ok(&["volume", "create", "--pool", p, "more", "--size", "1T"]);
    assert!(err.contains(OVERCOMMIT), "online create: {err}");
    let err = stderr_ok(&["volume", "resize", "--pool", p, "small", "--size", "2G"]);
    assert!(err.contains(OVERCOMMIT), "online resize: {err}");
    assert!(
        server.log_text().contains("sum of all thin volume sizes"),
        "the server does not log the over-commit:\n{}",
        server.log_text()
    );
    assert!(server.terminate().success(), "{}", server.log_text());

    // Once the volumes fit again, the warning goes away.
    for name in ["huge-snap", "huge", "more"] {
        cli_ok(&["volume", "delete", "--pool", p, name]);
    }
    let err = stderr_ok(&[
        "volume", "resize", "--pool", p, "small", "--size", "1500M", "--force",
    ]);
    assert!(!err.contains("WARNING"), "{err}");
    assert_eq!(pool_status(&pool)["warnings"], serde_json::json!([]));
}

#[test]
fn the_default_low_water_mark_is_a_share_of_the_pool() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    make_pool(&pool, "1G", &[]);
    let status = pool_status(&pool);
    assert_eq!(
        status["low_water_crossed"], false,
        "a new pool is born below its low-water mark: {status}"
    );
    // 10% of 16384 blocks of 64 KiB.
    assert_eq!(status["low_water_mark_bytes"], 1638 * 65536, "{status}");
    assert!(status["mode"] == "write", "{status}");
}

#[test]
fn a_percentage_mark_is_logged_in_bytes_when_set_and_when_crossed() {
    if !common::require_tool("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    make_pool(&pool, "64M", &[("a", "64M")]);
    let config = dir.path().join("half.toml");
    std::fs::write(
        &config,
        "[pool]\nlow_water_mark = \"50%\"\ncreate_if_missing = false\n",
    )
    .unwrap();
    let mut server = Server::start_on_pool(&pool, Some(&config), &dir.path().join("log"));
    assert!(
        server
            .log_text()
            .contains(&format!("low-water mark {} bytes", 32 << 20)),
        "{}",
        server.log_text()
    );
    qemu_io_ok(server.port, "a", &["write -P 0x5a 0 40M", "flush"]);
    assert_eq!(pool_status(&pool)["low_water_crossed"], true);
    assert!(server.terminate().success(), "{}", server.log_text());
    let log = server.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("reached its low-water mark"))
        .unwrap_or_else(|| panic!("no low-water line:\n{log}"));
    assert!(
        line.contains(&format!("mark {} bytes", 32 << 20)) && !line.contains("blocks"),
        "{line}"
    );
}
