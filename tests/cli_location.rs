//! Pool locations on the command line, without a Ceph cluster: a `rados:` location on a build
//! without RADOS support is refused with the way out, a malformed one is a usage error, and
//! the commands new with locations (takeover, export-metadata) do what they can for a local
//! pool directory.

mod common;

use std::process::Output;

use common::server::*;

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The stderr of a command refused with `status` (2: the command failed, 64: usage error).
fn refused_with(out: &Output, status: i32, what: &str) -> String {
    let err = stderr_of(out);
    assert_eq!(out.status.code(), Some(status), "{what}: {err}");
    err
}

#[cfg(not(feature = "rados"))]
#[test]
fn a_rados_location_without_rados_support_says_how_to_get_it() {
    let dir = tempfile::tempdir().unwrap();
    let runs: [&[&str]; 10] = [
        &["pool", "create", "rados:rbd/tank", "--data-size", "1G"],
        &["pool", "status", "rados:rbd/tank"],
        &["pool", "grow", "rados:rbd/tank", "--data-size", "2G"],
        &["pool", "takeover", "rados:rbd/tank"],
        &[
            "pool",
            "export-metadata",
            "rados:rbd/tank",
            "/nonexistent/meta",
        ],
        &["volume", "list", "--pool", "rados:rbd/tank"],
        &["snapshot", "--pool", "rados:rbd/tank", "a", "b"],
        &["check", "rados:rbd/tank"],
        &["dump", "rados:rbd/tank"],
        &["delta", "--pool", "rados:rbd/tank", "a", "b"],
    ];
    for args in runs {
        let err = refused_with(&cli(args), 2, &args.join(" "));
        assert!(
            err.contains("rados:rbd/tank")
                && err.contains("built without RADOS support; rebuild with --features rados"),
            "{}: {err}",
            args.join(" ")
        );
    }
    let (status, err) = serve_refused(dir.path(), |cmd| {
        cmd.args(["--pool", "rados:rbd/tank"]);
    });
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("built without RADOS support"), "{err}");
}

#[test]
fn a_malformed_rados_location_is_a_usage_error_naming_the_problem() {
    for (location, says) in [
        ("rados:rbd", "after '/' is missing"),
        ("rados:rbd/a.b", "no '/' or '.'"),
        ("rados:/tank", "RADOS pool name is empty"),
    ] {
        let out = cli(&["pool", "status", location]);
        let err = refused_with(&out, 64, location);
        assert!(
            err.contains(says) && err.contains(location),
            "{location}: {err}"
        );
        let out = cli(&["volume", "list", "--pool", location]);
        refused_with(&out, 64, location);
    }
}

#[test]
fn takeover_of_a_local_pool_is_refused() {
    let pool = TestPool::create("1G");
    let out = cli(&["pool", "takeover", pool.dir_str()]);
    let err = refused_with(&out, 2, "takeover");
    assert!(
        err.contains("a local pool has no owner to take over"),
        "{err}"
    );
    assert_pool_clean(&pool.dir);
}

#[test]
fn export_metadata_copies_a_local_pools_metadata_and_is_refused_while_served() {
    let pool = TestPool::with_volumes(&[("vm1", "64M")]);
    let copy = pool.path("exported-metadata");
    let copy_str = copy.to_str().unwrap();
    cli_ok(&["pool", "export-metadata", pool.dir_str(), copy_str]);
    let original = std::fs::read(pool.dir.join("metadata")).unwrap();
    assert_eq!(
        std::fs::read(&copy).unwrap(),
        original,
        "a byte-for-byte copy"
    );

    let server = pool.serve();
    std::fs::remove_file(&copy).unwrap();
    let out = cli(&["pool", "export-metadata", pool.dir_str(), copy_str]);
    let err = refused_with(&out, 2, "export-metadata while served");
    assert!(
        err.contains("not exported") && err.contains("in use"),
        "{err}"
    );
    assert!(!copy.exists(), "nothing written while the pool is served");
    server.stop();
    assert_pool_clean(&pool.dir);
}
