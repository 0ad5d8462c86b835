//! Starting `thinnbd serve`: the default first start (a new `./thinnbd-pool` with a 10 GiB
//! `default` volume on a 64 GiB sparse data file), restarting on the same pool, config files
//! that are refused with a message naming the key and the file, a missing pool elsewhere that
//! is created only with `--create`, and a `--socket` path that is replaced only when stale.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};

use common::nbd_client::Client;
use common::process::{free_port, stdout_of};
use common::qemu::qemu_io_at;
use common::server::*;
use common::tools::*;

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

    let status: serde_json::Value = serde_json::from_str(&cli_ok(&[
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

    qemu_io_at(
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
    qemu_io_at(&server.uri("default"), true, &["read -P 0x5d 5G 1M"]);
    server.stop();
    assert_pool_clean(&dir);
}

/// Runs `thinnbd serve --config FILE`, which must refuse the file; returns its exit status and
/// stderr.
fn serve_with_config(cwd: &Path, config: &Path) -> (std::process::ExitStatus, String) {
    serve_refused(cwd, |cmd| {
        cmd.arg("--config").arg(config);
    })
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

    // A good file is taken: its pool settings are used when `--create` makes the pool (the
    // server is stopped at once).
    let good = tmp.path().join("good.toml");
    std::fs::write(
        &good,
        "[pool]\ndir = \"custom-pool\"\ndata_size = \"4G\"\ndefault_volume = \"vm0\"\n\
         default_volume_size = \"1G\"\n[log]\nlevel = \"warn\"\n",
    )
    .expect("write config");
    let server = Server::start(
        |cmd| {
            cmd.arg("--config").arg(&good).arg("--create");
        },
        tmp.path(),
        None,
        Some(tmp.path().join("custom-pool/control.sock")),
    );
    let list = cli_ok(&[
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
    assert!(
        err.contains(&format!(
            "in use by process {} (thinnbd serve)",
            first.pid()
        )),
        "the error does not name the server holding the pool:\n{err}"
    );
    // The first one is unharmed, and SIGINT (Ctrl-C) is as graceful as SIGTERM.
    let (mut c, size, _) = Client::open(first.port, "default");
    assert_eq!(size, 10 * GIB);
    assert_eq!(c.write_at(1, 0, &[3u8; 4096]), 0);
    c.disconnect();
    first.stop_with(libc::SIGINT);
    assert!(!tmp.path().join("thinnbd-pool/control.sock").exists());
    assert_pool_clean(&tmp.path().join("thinnbd-pool"));
}

#[test]
fn a_missing_pool_other_than_the_default_is_not_created() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let typo = tmp.path().join("pooll");
    let (status, err) = serve_refused(tmp.path(), |cmd| {
        cmd.arg("--pool").arg(&typo);
    });
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!("thinnbd pool create {}", typo.display())),
        "no `pool create` command for the missing pool:\n{err}"
    );
    assert!(err.contains("--create"), "{err}");
    assert!(!typo.exists(), "a pool was created at the mistyped path");

    // A config that names another directory is no different.
    let config = tmp.path().join("other.toml");
    std::fs::write(&config, "[pool]\ndir = \"elsewhere\"\n").expect("write config");
    let (status, err) = serve_refused(tmp.path(), |cmd| {
        cmd.arg("--config").arg(&config);
    });
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("thinnbd pool create elsewhere"), "{err}");
    assert!(!tmp.path().join("elsewhere").exists());

    // With --create the pool is made there, with the default volume.
    let server = Server::start(
        |cmd| {
            cmd.arg("--pool").arg(&typo).arg("--create");
        },
        tmp.path(),
        None,
        Some(typo.join("control.sock")),
    );
    let list = cli_ok(&["volume", "list", "--pool", typo.to_str().unwrap()]);
    assert!(list.contains("default"), "{list}");
    server.stop();
    assert_pool_clean(&typo);
}

/// Reads the NBD server greeting from a unix socket: proof that a server answers there.
fn greeting_at(socket: &Path) -> Vec<u8> {
    use std::io::Read;
    let mut s = std::os::unix::net::UnixStream::connect(socket)
        .unwrap_or_else(|e| panic!("{} does not answer: {e}", socket.display()));
    let mut magic = vec![0u8; 8];
    s.read_exact(&mut magic).expect("read the greeting");
    magic
}

#[test]
fn the_socket_of_a_live_server_is_not_taken() {
    let first_pool = TestPool::create("1G");
    let first = first_pool.serve();
    let socket = first.socket.clone().expect("a unix socket");
    let second_pool = TestPool::create("1G");
    let (status, err) = serve_refused(second_pool.tmp.path(), |cmd| {
        cmd.arg("--pool")
            .arg(&second_pool.dir)
            .arg("--socket")
            .arg(&socket);
    });
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(
        err.contains(&socket.display().to_string()),
        "the error does not name the socket:\n{err}"
    );
    // The first server still answers on its socket.
    assert_eq!(greeting_at(&socket), b"NBDMAGIC");
    first.stop();
}

#[test]
fn a_file_at_the_socket_path_is_left_untouched() {
    let pool = TestPool::create("1G");
    let file = pool.tmp.path().join("notes.txt");
    std::fs::write(&file, b"not a socket").expect("write file");
    let (status, err) = serve_refused(pool.tmp.path(), |cmd| {
        cmd.arg("--pool").arg(&pool.dir).arg("--socket").arg(&file);
    });
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains(&file.display().to_string()), "{err}");
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(
        std::fs::read(&file).expect("the file is still there"),
        b"not a socket"
    );
}

#[test]
fn a_stale_socket_is_replaced() {
    let pool = TestPool::create("1G");
    let socket = pool.tmp.path().join("nbd.sock");
    // A socket whose listener is gone, as a killed server leaves it.
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("bind"));
    assert!(socket.exists());
    let server = pool.serve();
    assert_eq!(greeting_at(&socket), b"NBDMAGIC");
    server.stop();
}
