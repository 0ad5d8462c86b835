//! Starting `thinnbd serve`: the default first start (a new `./thinnbd-pool` with a 10 GiB
//! `default` volume on a 64 GiB sparse data file), restarting on the same pool, and config files
//! that are refused with a message naming the key and the file.

mod serve_support;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serve_support::*;

const GIB: u64 = 1 << 30;

/// `thinnbd serve` with no pool arguments in `cwd` (only --listen, never the real 10809).
fn serve_default(cwd: &Path) -> Server {
    Server::start(
        |_| {},
        cwd,
        None,
        Some(cwd.join("thinnbd-pool/control.sock")),
    )
}

#[test]
fn default_start_creates_the_pool_and_default_volume() {
    if !require_tools(&["nbdinfo", "qemu-io"]) {
        return;
    }
    let tmp = tempfile::tempdir().expect("temp dir");
    let server = serve_default(tmp.path());
    let dir = tmp.path().join("thinnbd-pool");
    assert!(dir.join("metadata").is_file(), "no ./thinnbd-pool/metadata");
    let data = std::fs::metadata(dir.join("data")).expect("./thinnbd-pool/data");
    assert_eq!(data.len(), 64 * GIB, "data file size");
    assert!(
        data.blocks() * 512 < GIB,
        "data file is not sparse: {} bytes allocated",
        data.blocks() * 512
    );

    let list = stdout_of(Command::new("nbdinfo").args(["--list", &server.uri("")]));
    assert!(list.contains("export=\"default\":"), "{list}");
    assert_eq!(list.matches("export=\"").count(), 1, "{list}");
    assert!(
        list.contains(&format!("export-size: {}", 10 * GIB)),
        "{list}"
    );
    // With no export name, a client gets the default volume.
    let size = stdout_of(Command::new("nbdinfo").args(["--size", &server.uri("")]));
    assert_eq!(size.trim(), (10 * GIB).to_string());

    let status: serde_json::Value = serde_json::from_str(&thinnbd(&[
        "pool",
        "status",
        dir.to_str().unwrap(),
        "--json",
    ]))
    .unwrap();
    assert_eq!(status["data_total_bytes"], 64 * GIB);
    assert_eq!(status["block_size"], 64 << 10);
    assert_eq!(status["volumes"][0]["name"], "default");
    assert_eq!(status["volumes"][0]["size"], 10 * GIB);

    qemu_io(
        &server.uri("default"),
        false,
        &["write -P 0x5d 5G 1M", "flush"],
    );
    server.stop();
    assert_pool_clean(&dir);

    // The second start opens the same pool: no second volume, the data is still there.
    let server = serve_default(tmp.path());
    let list = stdout_of(Command::new("nbdinfo").args(["--list", &server.uri("")]));
    assert_eq!(list.matches("export=\"").count(), 1, "{list}");
    qemu_io(&server.uri("default"), true, &["read -P 0x5d 5G 1M"]);
    server.stop();
    assert_pool_clean(&dir);
}

/// Runs `thinnbd serve --config FILE` (with a test port, in case the file were accepted) and
/// returns its exit status and stderr. Bounded: killed after 60 s.
fn serve_with_config(cwd: &Path, config: &Path) -> (std::process::ExitStatus, String) {
    let log = cwd.join("config-test.log");
    let mut child = Command::new(BIN)
        .current_dir(cwd)
        .arg("serve")
        .arg("--config")
        .arg(config)
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("start thinnbd serve");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "thinnbd serve --config {} did not exit: it accepted the file",
                config.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status, std::fs::read_to_string(&log).unwrap_or_default())
}

#[test]
fn bad_config_files_are_refused_naming_key_and_file() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "unknown-key.toml",
            "[pool]\nbogus_key = 1\n",
            &["bogus_key"],
        ),
        ("unknown-section.toml", "[poool]\ndir = \"x\"\n", &["poool"]),
        (
            "block-size.toml",
            "[pool]\nblock_size = \"3K\"\n",
            &["pool.block_size"],
        ),
        (
            "zero-connections.toml",
            "[server]\nmax_connections = 0\n",
            &["server.max_connections"],
        ),
        (
            "listen.toml",
            "[server]\nlisten = [\"not-an-address\"]\n",
            &["server.listen"],
        ),
        (
            "policy.toml",
            "[pool]\nno_space_policy = \"maybe\"\n",
            &["pool.no_space_policy"],
        ),
        (
            "wrong-type.toml",
            "[pool]\ncreate_if_missing = \"yes\"\n",
            &["create_if_missing"],
        ),
        ("syntax.toml", "[pool\ndir = \n", &[]),
    ];
    for (file, text, words) in cases {
        let path = tmp.path().join(file);
        std::fs::write(&path, text).expect("write config");
        let (status, err) = serve_with_config(tmp.path(), &path);
        assert!(!status.success(), "{file}: exited {status}");
        assert!(
            err.contains(file),
            "{file}: message does not name the file:\n{err}"
        );
        for w in *words {
            assert!(err.contains(w), "{file}: message does not name {w}:\n{err}");
        }
    }
    let (status, err) = serve_with_config(tmp.path(), &tmp.path().join("missing.toml"));
    assert!(!status.success());
    assert!(err.contains("missing.toml"), "{err}");
    // None of them got as far as creating a pool.
    assert!(!tmp.path().join("thinnbd-pool").exists());

    // A good file is taken: its pool settings are used (the server is stopped at once).
    let good = tmp.path().join("good.toml");
    std::fs::write(
        &good,
        "[pool]\ndir = \"custom-pool\"\ndata_size = \"4G\"\ndefault_volume = \"vm0\"\n\
         default_volume_size = \"1G\"\n[log]\nlevel = \"warn\"\n",
    )
    .expect("write config");
    let server = Server::start(
        |cmd| {
            cmd.arg("--config").arg(&good);
        },
        tmp.path(),
        None,
        Some(tmp.path().join("custom-pool/control.sock")),
    );
    let list = thinnbd(&[
        "volume",
        "list",
        "--bytes",
        "--pool",
        tmp.path().join("custom-pool").to_str().unwrap(),
    ]);
    assert!(
        list.contains("vm0") && list.contains(&GIB.to_string()),
        "{list}"
    );
    server.stop();
    assert_pool_clean(&tmp.path().join("custom-pool"));
}

#[test]
fn a_second_server_on_the_same_pool_is_refused_and_sigint_stops_cleanly() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let first = serve_default(tmp.path());
    let out = Command::new(BIN)
        .current_dir(tmp.path())
        .args(["serve", "--listen", &format!("127.0.0.1:{}", free_port())])
        .stdin(Stdio::null())
        .output()
        .expect("run a second thinnbd serve");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "second server started:\n{err}");
    assert!(err.contains("in use"), "{err}");
    // The first one is unharmed, and SIGINT (Ctrl-C) is as graceful as SIGTERM.
    let (mut c, size, _) = RawClient::open(first.port, "default");
    assert_eq!(size, 10 * GIB);
    assert_eq!(c.write(1, 0, &[3u8; 4096]), 0);
    c.disconnect();
    first.stop_with(libc::SIGINT);
    assert!(!tmp.path().join("thinnbd-pool/control.sock").exists());
    assert_pool_clean(&tmp.path().join("thinnbd-pool"));
}
