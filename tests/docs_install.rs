//! The README's way to put `thinnbd` on the PATH, run as written (into a scratch root instead
//! of ~/.cargo), and a README `thinnbd` command through the command it installs.

mod common;

use std::path::Path;
use std::process::Command;

use common::docs::{read_doc, sh_block};

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?}: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

#[test]
fn readme_install_puts_thinnbd_on_the_path() {
    let readme = read_doc("README.md");
    let mut run_it = sh_block(&readme, "## Run it");
    // The packages the build needs: installed here by tests/run-all.sh, so checked, not run.
    let packages = run_it.remove(0);
    assert_eq!(
        packages, "apt-get update && apt-get install -y pkg-config libssl-dev",
        "README's first step installs what the TLS build needs: {run_it:#?}"
    );
    run_ok(Command::new("dpkg").args(["-s", "pkg-config", "libssl-dev"]));
    assert_eq!(
        run_it.first().map(String::as_str),
        Some("cargo install --locked --path ."),
        "README's next step installs thinnbd: {run_it:#?}"
    );
    assert!(
        run_it.iter().skip(1).all(|l| l.starts_with("thinnbd ")),
        "{run_it:#?}"
    );
    assert!(
        readme.contains("`~/.cargo/bin`, which must be on your `PATH`"),
        "README says where thinnbd goes and that it must be on PATH"
    );

    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("cargo-home");
    // The target dir this test was built in already holds the release binary, so the install
    // is a copy rather than a second build.
    let target_dir = Path::new(env!("CARGO_BIN_EXE_thinnbd"))
        .ancestors()
        .nth(2)
        .expect("target dir");
    // The install relinks target/release/thinnbd, which the tests after this one run: built
    // with the features of the tested binary, or the RADOS tests would find a binary without
    // RADOS support.
    let features = if cfg!(feature = "rados") {
        " --features rados"
    } else {
        ""
    };
    run_ok(
        Command::new("sh")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .arg("-c")
            .arg(format!(
                "{}{features} --root '{}'",
                run_it[0],
                home.display()
            ))
            .env("CARGO_TARGET_DIR", target_dir),
    );

    let path = std::env::join_paths(std::iter::once(home.join("bin")).chain(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
    ))
    .unwrap();
    let shell = |line: &str| {
        let mut cmd = Command::new("sh");
        cmd.current_dir(tmp.path())
            .env("PATH", &path)
            .arg("-c")
            .arg(line);
        cmd
    };
    let found = run_ok(&mut shell("command -v thinnbd"));
    assert_eq!(found.trim(), home.join("bin/thinnbd").display().to_string());

    // README's status line, on a pool where `thinnbd serve` would have made it.
    let status = readme
        .lines()
        .map(|l| l.split(" #").next().unwrap_or_default().trim())
        .find(|l| l.starts_with("thinnbd pool status "))
        .expect("README shows `thinnbd pool status`");
    assert_eq!(status, "thinnbd pool status ./thinnbd-pool");
    run_ok(&mut shell(
        "thinnbd pool create ./thinnbd-pool --data-size 64M",
    ));
    let out = run_ok(&mut shell(status));
    assert!(out.contains("data"), "{out}");
}
