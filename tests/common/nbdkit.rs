//! Helpers for the nbdkit plugin tests: the built plugin, nbdkit and `thinnbd serve` as child
//! processes (unix socket or 127.0.0.1 on a free port, stopped with SIGTERM by the test), and
//! the external clients. Pools come from `server::TestPool`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::process::{exit_within, free_port};
use super::server::{Server, TestPool};

/// How long a server may take to start or stop before the test gives up.
const PATIENCE: Duration = Duration::from_secs(60);

/// The plugin's file name, as `cargo build --release -p thinnbd-nbdkit` leaves it in
/// target/release.
pub const PLUGIN_FILE: &str = "libnbdkit_thinnbd_plugin.so";

/// The plugin built with this test: the `thinnbd-nbdkit` package is a dev-dependency, so
/// `cargo test` builds it in the same run, into target/PROFILE/deps (a cdylib keeps its plain
/// name there). That copy, never an older one in target/PROFILE, is the one tested.
pub fn plugin() -> PathBuf {
    let so = Path::new(env!("CARGO_BIN_EXE_thinnbd"))
        .parent()
        .expect("target dir")
        .join("deps")
        .join(PLUGIN_FILE);
    let out = Command::new("nbdkit")
        .arg(&so)
        .arg("--dump-plugin")
        .output()
        .expect("running nbdkit");
    assert!(
        out.status.success(),
        "{} is not an nbdkit plugin: {}",
        so.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    so
}

fn sigterm(child: &Child) {
    let pid = libc::pid_t::try_from(child.id()).expect("pid");
    // SAFETY: kill(2) on our own child's pid; it has not been waited for, so the pid is ours.
    let r = unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(r, 0, "kill -TERM {pid}");
}

/// Waits (bounded) for a child to exit.
fn wait_bounded(child: &mut Child, what: &str) -> ExitStatus {
    exit_within(child, PATIENCE).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{what} did not exit within {PATIENCE:?}");
    })
}

/// A server process with its stderr in a file, stopped by SIGTERM.
pub struct Process {
    child: Option<Child>,
    what: String,
    log: PathBuf,
}

impl Process {
    pub fn spawn(mut cmd: Command, what: &str, log: PathBuf) -> Process {
        let err = File::create(&log).expect("log file");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(err));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        Process {
            child: Some(child),
            what: what.to_string(),
            log,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (bounded) until `ready` holds; fails if the process exits first.
    pub fn wait_until(&mut self, ready: impl Fn() -> bool) {
        let deadline = Instant::now() + PATIENCE;
        while !ready() {
            let child = self.child.as_mut().expect("running");
            if let Some(status) = child.try_wait().expect("try_wait") {
                panic!("{} exited early: {status}\n{}", self.what, self.log());
            }
            assert!(
                Instant::now() < deadline,
                "{} not ready within {PATIENCE:?}\n{}",
                self.what,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then waits (bounded); returns the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        sigterm(&child);
        wait_bounded(&mut child, &self.what)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Where a server listens.
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(u16),
}

impl Endpoint {
    pub fn uri(&self, export: &str) -> String {
        match self {
            Endpoint::Unix(p) => format!("nbd+unix:///{export}?socket={}", p.display()),
            Endpoint::Tcp(port) => format!("nbd://127.0.0.1:{port}/{export}"),
        }
    }
}

/// nbdkit serving a pool with the plugin, in the foreground.
pub struct Nbdkit {
    pub proc: Process,
    pub endpoint: Endpoint,
}

impl Nbdkit {
    /// `nbdkit -f -U SOCK -P PIDFILE [nbdkit_args] PLUGIN [plugin_args]`.
    pub fn start_unix(pool: &TestPool, nbdkit_args: &[&str], plugin_args: &[&str]) -> Nbdkit {
        let sock = pool.path("nbdkit.sock");
        Self::start(
            pool,
            Endpoint::Unix(sock.clone()),
            &["-U".to_string(), sock.display().to_string()],
            nbdkit_args,
            plugin_args,
        )
    }

    /// `nbdkit -f -i 127.0.0.1 -p PORT ...` on a free port.
    pub fn start_tcp(pool: &TestPool, nbdkit_args: &[&str], plugin_args: &[&str]) -> Nbdkit {
        let port = free_port();
        Self::start(
            pool,
            Endpoint::Tcp(port),
            &[
                "-i".to_string(),
                "127.0.0.1".into(),
                "-p".into(),
                port.to_string(),
            ],
            nbdkit_args,
            plugin_args,
        )
    }

    fn start(
        pool: &TestPool,
        endpoint: Endpoint,
        listen: &[String],
        nbdkit_args: &[&str],
        plugin_args: &[&str],
    ) -> Nbdkit {
        let pidfile = pool.path("nbdkit.pid");
        let _ = std::fs::remove_file(&pidfile);
        let mut cmd = Command::new("nbdkit");
        cmd.arg("-f")
            .args(listen)
            .arg("-P")
            .arg(&pidfile)
            .args(nbdkit_args)
            .arg(plugin())
            .arg(pool.pool_arg())
            .args(plugin_args);
        let mut proc = Process::spawn(cmd, "nbdkit", pool.path("nbdkit.log"));
        // nbdkit writes the pid file once it listens (after after_fork).
        proc.wait_until(|| {
            std::fs::read_to_string(&pidfile)
                .map(|s| !s.trim().is_empty())
                .unwrap_or(false)
        });
        Nbdkit { proc, endpoint }
    }

    pub fn uri(&self, export: &str) -> String {
        self.endpoint.uri(export)
    }

    /// SIGTERM; nbdkit must exit 0 (the plugin shut the pool down cleanly).
    pub fn stop_cleanly(&mut self) {
        let status = self.proc.stop();
        assert!(
            status.success(),
            "nbdkit exit: {status}\n{}",
            self.proc.log()
        );
    }
}

/// Runs nbdkit with the plugin and arguments that must make it fail at start; returns stderr.
pub fn nbdkit_start_failure(args: &[&str]) -> String {
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut cmd = Command::new("nbdkit");
    cmd.arg("-f")
        .arg("-U")
        .arg(tmp.path().join("sock"))
        .arg(plugin())
        .args(args);
    let log = tmp.path().join("log");
    let mut proc = Process::spawn(cmd, "nbdkit", log);
    let mut child = proc.child.take().expect("child");
    let status = wait_bounded(&mut child, "nbdkit (expected to fail)");
    let stderr = proc.log();
    assert!(
        !status.success(),
        "nbdkit started with {args:?} but should have failed\n{stderr}"
    );
    stderr
}

/// `thinnbd serve --pool DIR` on a free 127.0.0.1 port, its log in the pool's temp dir.
pub fn serve_pool(pool: &TestPool) -> Server {
    Server::start(
        |cmd| {
            cmd.arg("--pool").arg(&pool.dir);
        },
        pool.tmp.path(),
        None,
        None,
    )
}

/// A daemonized nbdkit, known by its pid file.
pub struct Daemon {
    pid: libc::pid_t,
}

/// Running: exists and is not a zombie (a container's init may never reap the orphaned daemon).
fn alive(pid: libc::pid_t) -> bool {
    // SAFETY: signal 0 only checks that the process exists; no signal is sent.
    let exists = unsafe { libc::kill(pid, 0) == 0 };
    let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z'))
        })
        .unwrap_or(false);
    exists && !zombie
}

impl Daemon {
    /// Runs nbdkit without -f; returns once it has daemonized (the parent exits then).
    pub fn start(cmd: &mut Command, log: &Path, pidfile: &Path) -> Daemon {
        // The daemon may keep the parent's stderr, so output goes to a file, not a pipe that
        // would stay open until the daemon exits.
        let err = File::create(log).expect("log file");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(err))
            .spawn()
            .expect("starting nbdkit");
        let status = wait_bounded(&mut child, "nbdkit (daemonizing)");
        let text = std::fs::read_to_string(log).unwrap_or_default();
        assert!(status.success(), "nbdkit failed: {status}\n{text}");
        Daemon::from_pidfile(pidfile)
    }

    pub fn from_pidfile(path: &Path) -> Daemon {
        let text = std::fs::read_to_string(path).expect("pid file");
        let pid = text.trim().parse().expect("pid in pid file");
        assert!(alive(pid), "daemon {pid} is not running");
        Daemon { pid }
    }

    /// SIGTERM, then waits (bounded) for the process to go away.
    pub fn stop(mut self) {
        let pid = std::mem::replace(&mut self.pid, 0);
        // SAFETY: kill(2) on the pid nbdkit wrote for its daemon, checked alive just before.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let deadline = Instant::now() + PATIENCE;
        while alive(pid) {
            assert!(Instant::now() < deadline, "daemon {pid} still running");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.pid > 0 && alive(self.pid) {
            // SAFETY: as in stop; a test that failed must not leave the daemon behind.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
        }
    }
}
