//! The real `thinnbd` binary in tests: the CLI (pool and volume creation, status), a pool in a
//! temp dir, and the one wrapper of a `thinnbd serve` process (on 127.0.0.1, optionally a unix
//! socket; stopped with SIGTERM or SIGINT, killed if a test panics; its resident set size from
//! /proc). Raw NBD clients for it: `super::nbd_client`.

use std::fs::File;
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use super::process::{exit_within, free_port};

pub const BIN: &str = env!("CARGO_BIN_EXE_thinnbd");

/// `$PATH` with the tested `thinnbd` first, for scripts (the examples) that run it by name.
pub fn path_with_bin() -> String {
    let bin_dir = Path::new(BIN).parent().expect("bin dir");
    format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// How long a server may take to listen, and to stop after a signal.
const START_LIMIT: Duration = Duration::from_secs(120);
const STOP_LIMIT: Duration = Duration::from_secs(60);

// === The CLI =====================================================================================

/// Runs the CLI and returns its output whatever the exit status.
pub fn cli(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run thinnbd {args:?}: {e}"))
}

/// Runs the CLI and fails the test unless it succeeds; returns stdout.
pub fn cli_ok(args: &[&str]) -> String {
    succeeded(args, &cli(args))
}

/// The stdout of `thinnbd ARGS` that gave `out`; fails the test unless it succeeded.
pub fn succeeded(args: &[&str], out: &Output) -> String {
    assert!(
        out.status.success(),
        "thinnbd {args:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `thinnbd ARGS...` for a change that needs an idle volume, retried (bounded, 60 s) while the
/// server still counts a client that has just disconnected; any error other than "in use"
/// fails at once. Returns stdout.
pub fn cli_ok_when_idle(args: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = cli(args);
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).into_owned();
        }
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("in use"),
            "thinnbd {args:?}: unexpected failure: {err}"
        );
        assert!(
            Instant::now() < deadline,
            "thinnbd {args:?}: still busy 60 s after the clients left"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Creates a pool in `dir` with `volumes` (name, size) in it.
pub fn make_pool(dir: &Path, data_size: &str, volumes: &[(&str, &str)]) {
    let d = dir.to_str().expect("utf-8 pool path");
    cli_ok(&["pool", "create", d, "--data-size", data_size]);
    for (name, size) in volumes {
        cli_ok(&["volume", "create", "--pool", d, name, "--size", size]);
    }
}

/// `pool status --json` as JSON.
pub fn pool_status(dir: &Path) -> serde_json::Value {
    let out = cli_ok(&[
        "pool",
        "status",
        dir.to_str().expect("utf-8 pool path"),
        "--json",
    ]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status is not JSON ({e}): {out}"))
}

/// For a pool whose server has stopped: `thinnbd check DIR`, Debian's `thin_check` and
/// `verify_meta.py check` on its metadata all exit 0.
pub fn assert_pool_clean(dir: &Path) {
    let text = cli_ok(&["check", dir.to_str().expect("utf-8 pool path")]);
    assert!(text.contains("clean"), "thinnbd check:\n{text}");
    super::metadata::assert_metadata_clean(&dir.join("metadata"));
}

/// A temp dir holding a pool at `dir/pool`.
pub struct TestPool {
    pub tmp: tempfile::TempDir,
    pub dir: PathBuf,
}

impl TestPool {
    /// A new pool with a sparse data file of `data_size` and 64 KiB blocks.
    pub fn create(data_size: &str) -> TestPool {
        TestPool::named("pool", data_size, &[])
    }

    /// A 1 GiB pool holding the given `(name, size)` volumes.
    pub fn with_volumes(volumes: &[(&str, &str)]) -> TestPool {
        TestPool::named("pool", "1G", volumes)
    }

    /// The pool in `TMP/NAME`, for command lines that name it as the docs do.
    pub fn named(name: &str, data_size: &str, volumes: &[(&str, &str)]) -> TestPool {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path().join(name);
        make_pool(&dir, data_size, volumes);
        TestPool { tmp, dir }
    }

    /// A path in the pool's temp dir, beside the pool.
    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// The nbdkit plugin's `pool=DIR` parameter.
    pub fn pool_arg(&self) -> String {
        format!("pool={}", self.dir.display())
    }

    pub fn dir_str(&self) -> &str {
        self.dir.to_str().expect("utf-8 temp path")
    }

    /// `thinnbd volume create --pool DIR NAME --size SIZE`.
    pub fn create_volume(&self, name: &str, size: &str) {
        let pool = self.dir_str();
        cli_ok(&["volume", "create", "--pool", pool, name, "--size", size]);
    }

    /// `thinnbd pool status DIR --json`, parsed.
    pub fn status(&self) -> serde_json::Value {
        pool_status(&self.dir)
    }

    /// Mapped bytes of one volume from `pool status --json`.
    pub fn mapped_bytes(&self, volume: &str) -> u64 {
        let s = self.status();
        s["volumes"]
            .as_array()
            .expect("volumes array")
            .iter()
            .find(|v| v["name"] == volume)
            .unwrap_or_else(|| panic!("no volume {volume} in {s}"))["mapped_bytes"]
            .as_u64()
            .expect("mapped_bytes")
    }

    /// Starts `thinnbd serve --pool DIR` on a free port and a unix socket in the temp dir.
    pub fn serve(&self) -> Server {
        let socket = self.tmp.path().join("nbd.sock");
        Server::start(
            |cmd| {
                cmd.arg("--pool").arg(&self.dir);
            },
            self.tmp.path(),
            Some(socket),
            Some(self.dir.join("control.sock")),
        )
    }
}

// === The server ==================================================================================

/// Runs `thinnbd serve --listen 127.0.0.1:PORT` plus what `args` adds, in `cwd`, for a start
/// that must fail; returns its exit status and stderr. Bounded: a server that starts instead is
/// killed after 60 s and the test fails.
pub fn serve_refused(cwd: &Path, args: impl FnOnce(&mut Command)) -> (ExitStatus, String) {
    let log = cwd.join("refused-start.log");
    let mut cmd = Command::new(BIN);
    cmd.current_dir(cwd)
        .env("NO_COLOR", "1")
        .arg("serve")
        .args(["--listen", &format!("127.0.0.1:{}", free_port())]);
    args(&mut cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&log).expect("log"))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let Some(status) = exit_within(&mut child, Duration::from_secs(60)) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "{cmd:?} did not exit: the server started\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    };
    (status, std::fs::read_to_string(&log).unwrap_or_default())
}

/// A running `thinnbd serve`, its stdout and stderr in `log`. Dropping it kills the process
/// (and prints the log if the test is failing); `stop` is the graceful way.
pub struct Server {
    child: Option<Child>,
    pub port: u16,
    pub socket: Option<PathBuf>,
    pub log: PathBuf,
}

impl Server {
    /// Spawns `thinnbd serve --listen 127.0.0.1:PORT [--socket S]` plus what `args` adds, in
    /// `cwd`, its log in `cwd/serve-N.log`; waits until the port, the socket and (when given)
    /// the control socket accept connections.
    pub fn start(
        args: impl FnOnce(&mut Command),
        cwd: &Path,
        socket: Option<PathBuf>,
        control: Option<PathBuf>,
    ) -> Server {
        let log = (0..)
            .map(|n| cwd.join(format!("serve-{n}.log")))
            .find(|p| !p.exists())
            .expect("a free log name");
        let port = free_port();
        let mut cmd = Command::new(BIN);
        cmd.current_dir(cwd)
            .env("NO_COLOR", "1")
            .arg("serve")
            .args(["--listen", &format!("127.0.0.1:{port}")]);
        if let Some(s) = &socket {
            cmd.arg("--socket").arg(s);
        }
        args(&mut cmd);
        Server::spawn(cmd, log, port, socket, control.as_deref())
    }

    /// Starts `thinnbd serve --pool POOL [--config CONFIG]` on a port the kernel picks (read
    /// back from the log, which is at `info`).
    pub fn start_on_pool(pool: &Path, config: Option<&Path>, log: &Path) -> Server {
        Server::start_limited(pool, config, log, None)
    }

    /// Like [`Server::start_on_pool`]; with `fsize_limit`, the server's writes past that file
    /// offset fail with EFBIG (RLIMIT_FSIZE, with SIGXFSZ ignored): a failing device, made real.
    pub fn start_limited(
        pool: &Path,
        config: Option<&Path>,
        log: &Path,
        fsize_limit: Option<u64>,
    ) -> Server {
        let mut cmd = Command::new(BIN);
        if let Some(limit) = fsize_limit {
            use std::os::unix::process::CommandExt;
            let lim = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            // SAFETY: runs in the forked child before exec; signal() and setrlimit() are
            // async-signal-safe and touch only the child's own state.
            unsafe {
                cmd.pre_exec(move || {
                    libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                    if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        cmd.arg("serve");
        if let Some(c) = config {
            cmd.arg("--config").arg(c);
        }
        cmd.arg("--pool")
            .arg(pool)
            .args(["--listen", "127.0.0.1:0"])
            .env("NO_COLOR", "1")
            .env("THINNBD_LOG", "thinnbd=info,warn");
        Server::spawn(cmd, log.to_path_buf(), 0, None, None)
    }

    /// Spawns `cmd` with its output in `log` and waits until it serves. Port 0: the port is
    /// read from the log's "serving" line.
    fn spawn(
        cmd: Command,
        log: PathBuf,
        port: u16,
        socket: Option<PathBuf>,
        control: Option<&Path>,
    ) -> Server {
        let mut server = Server::spawn_unready(cmd, log, port, socket);
        server.wait_ready(control, START_LIMIT);
        server
    }

    /// Spawns a `thinnbd serve` command line that listens on `127.0.0.1:0` and logs at
    /// `info`, without waiting for it to serve (a server that first waits for a pool's owner
    /// lock); [`Server::wait_serving`] waits, and reads the port from the log.
    pub fn launch(cmd: Command, log: PathBuf) -> Server {
        Server::spawn_unready(cmd, log, 0, None)
    }

    fn spawn_unready(mut cmd: Command, log: PathBuf, port: u16, socket: Option<PathBuf>) -> Server {
        let out = File::create(&log).expect("server log");
        let err = out.try_clone().expect("server log");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        Server {
            child: Some(child),
            port,
            socket,
            log,
        }
    }

    /// Waits (at most `limit`) until a [`Server::launch`]ed server serves; fails the test if it
    /// exits first.
    pub fn wait_serving(&mut self, limit: Duration) {
        self.wait_ready(None, limit);
    }

    /// Whether the server has logged its "serving" line yet (it may still be waiting).
    pub fn is_serving(&mut self) -> bool {
        if self.port == 0 {
            self.port = listening_port(&self.log_text()).unwrap_or(0);
        }
        self.port != 0
    }

    /// The exit status once the server exits by itself within `limit` (reaped), or None if it
    /// still runs.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let status = exit_within(self.child_mut(), limit)?;
        self.child = None;
        Some(status)
    }

    fn wait_ready(&mut self, control: Option<&Path>, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let tcp = if self.port == 0 {
                // The line is logged once the listener is bound.
                self.is_serving()
            } else {
                TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            };
            let unix = self
                .socket
                .as_ref()
                .is_none_or(|s| UnixStream::connect(s).is_ok());
            let ctl = control.is_none_or(|c| UnixStream::connect(c).is_ok());
            if tcp && unix && ctl {
                return;
            }
            if let Some(status) = self.child_mut().try_wait().expect("try_wait") {
                self.child = None;
                panic!(
                    "thinnbd serve exited during start-up ({status}):\n{}",
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "thinnbd serve not ready after {limit:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("server running")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server running").id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.port)
    }

    pub fn unix_uri(&self, export: &str) -> String {
        let s = self.socket.as_ref().expect("server has a unix socket");
        format!("nbd+unix:///{export}?socket={}", s.display())
    }

    /// Still running (not exited, crashed or killed).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().expect("try_wait").is_none(),
            None => false,
        }
    }

    /// Resident memory of the server in bytes.
    pub fn rss_bytes(&self) -> u64 {
        rss_kib(self.pid()).expect("VmRSS of the server") * 1024
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends `signal` and waits (bounded) for the exit; returns how the server exited.
    pub fn signal(&mut self, signal: libc::c_int) -> ExitStatus {
        let mut child = self.child.take().expect("server running");
        let pid = libc::pid_t::try_from(child.id()).expect("pid fits");
        // SAFETY: kill(2) on the pid of a child we spawned and have not reaped yet.
        let r = unsafe { libc::kill(pid, signal) };
        assert_eq!(r, 0, "kill({signal}) failed");
        let Some(status) = exit_within(&mut child, STOP_LIMIT) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "thinnbd serve did not stop within {STOP_LIMIT:?} of signal {signal}:\n{}",
                self.log_text()
            );
        };
        status
    }

    /// SIGTERM (the graceful stop); returns how the server exited.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM)
    }

    /// SIGTERM; asserts a clean exit 0.
    pub fn stop(self) {
        self.stop_with(libc::SIGTERM);
    }

    /// Sends `signal` (SIGTERM or SIGINT); asserts a clean exit 0.
    pub fn stop_with(mut self, signal: libc::c_int) {
        let status = self.signal(signal);
        assert!(
            status.success(),
            "thinnbd serve exited with {status} after signal {signal}:\n{}",
            self.log_text()
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            if std::thread::panicking() {
                eprintln!("--- thinnbd serve log ---\n{}", self.log_text());
            }
        }
    }
}

/// Resident set size in KiB of process `pid`, from /proc/PID/status (a sampler thread holds
/// only the pid, not the `Server`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The TCP port in the server's "serving ... listen=tcp:127.0.0.1:PORT" log line.
pub fn listening_port(log: &str) -> Option<u16> {
    let line = log.lines().find(|l| l.contains("serving"))?;
    let at = line.find("tcp:127.0.0.1:")? + "tcp:127.0.0.1:".len();
    let digits: String = line[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}
