//! The real `thinnbd` binary in tests: pool and volume creation through the CLI, a server
//! process on 127.0.0.1 with a port the kernel picks (read back from its log), SIGKILL and
//! SIGTERM, and its resident set size from /proc.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_thinnbd")
}

/// Runs the CLI and returns its output whatever the exit status.
pub fn cli(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run thinnbd {args:?}: {e}"))
}

/// Runs the CLI and fails the test unless it succeeds; returns stdout.
pub fn cli_ok(args: &[&str]) -> String {
    let out = cli(args);
    assert!(
        out.status.success(),
        "thinnbd {args:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Creates a pool in `dir` with `volumes` (name, size) in it.
pub fn make_pool(dir: &Path, data_size: &str, volumes: &[(&str, &str)]) {
    let d = dir.to_str().unwrap();
    cli_ok(&["pool", "create", d, "--data-size", data_size]);
    for (name, size) in volumes {
        cli_ok(&["volume", "create", "--pool", d, name, "--size", size]);
    }
}

/// `pool status --json` as JSON.
pub fn pool_status(dir: &Path) -> serde_json::Value {
    let out = cli_ok(&["pool", "status", dir.to_str().unwrap(), "--json"]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status is not JSON ({e}): {out}"))
}

pub struct Server {
    child: Option<Child>,
    pub port: u16,
    pub log: PathBuf,
    pub pool: PathBuf,
}

impl Server {
    /// Starts `thinnbd serve` on the pool (optionally with a config file) and waits until it
    /// listens. Panics with the server's log when it exits or does not come up in 60 s.
    pub fn start(pool: &Path, config: Option<&Path>, log: &Path) -> Server {
        Server::start_limited(pool, config, log, None)
    }

    /// Like [`Server::start`]; with `fsize_limit`, the server's writes past that file offset
    /// fail with EFBIG (RLIMIT_FSIZE, with SIGXFSZ ignored): a failing device, made real.
    pub fn start_limited(
        pool: &Path,
        config: Option<&Path>,
        log: &Path,
        fsize_limit: Option<u64>,
    ) -> Server {
        let mut cmd = Command::new(bin());
        if let Some(limit) = fsize_limit {
            use std::os::unix::process::CommandExt;
            let lim = libc::rlimit {
                rlim_cur: limit as libc::rlim_t,
                rlim_max: limit as libc::rlim_t,
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
            .env("THINNBD_LOG", "thinnbd=info,warn")
            .stdin(Stdio::null())
            .stdout(Stdio::from(File::create(log).expect("server log")))
            .stderr(Stdio::from(
                File::options().append(true).open(log).expect("server log"),
            ));
        let child = cmd.spawn().expect("spawn thinnbd serve");
        let mut s = Server {
            child: Some(child),
            port: 0,
            log: log.to_path_buf(),
            pool: pool.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            if let Some(port) = listening_port(&text) {
                s.port = port;
                return s;
            }
            if let Some(st) = s.child.as_mut().unwrap().try_wait().expect("try_wait") {
                s.child = None;
                panic!("thinnbd serve exited with {st} before listening:\n{text}");
            }
            if Instant::now() > deadline {
                panic!("thinnbd serve did not listen within 60 s:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// True while the process has not exited.
    pub fn alive(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().expect("try_wait").is_none(),
            None => false,
        }
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM (graceful stop) and wait up to 60 s; returns the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("running");
        let pid = i32::try_from(c.id()).expect("pid");
        // SAFETY: kill(2) with a pid of a child we spawned and have not reaped yet.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = c.try_wait().expect("try_wait") {
                return st;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!(
                    "thinnbd serve did not stop within 60 s of SIGTERM:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
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

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
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
