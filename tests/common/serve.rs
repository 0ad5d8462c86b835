//! Helpers for the end-to-end tests of the `thinnbd` binary: a pool in a temp dir, a `thinnbd
//! serve` child process on a free 127.0.0.1 port and a unix socket (stopped with SIGTERM, killed
//! if a test panics), running the CLI and external clients, and a small raw NBD client.

use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::process::{exit_within, free_port, run, stdout_of};

pub const BIN: &str = env!("CARGO_BIN_EXE_thinnbd");

/// `thinnbd ARGS...`, which must succeed; returns stdout.
pub fn thinnbd(args: &[&str]) -> String {
    stdout_of(Command::new(BIN).args(args))
}

/// `thinnbd ARGS...` for a change that needs an idle volume, retried (bounded, 60 s) while the
/// server still counts a client that has just disconnected; any error other than "in use"
/// fails at once. Returns stdout.
pub fn thinnbd_when_idle(args: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = Command::new(BIN).args(args).output().expect("run thinnbd");
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

/// Runs `thinnbd serve --listen 127.0.0.1:PORT` plus what `args` adds, in `cwd`, for a start
/// that must fail; returns its exit status and stderr. Bounded: a server that starts instead is
/// killed after 60 s and the test fails.
pub fn serve_refused(
    cwd: &Path,
    args: impl FnOnce(&mut Command),
) -> (std::process::ExitStatus, String) {
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

/// A temp dir holding a pool at `dir/pool`.
pub struct TestPool {
    pub tmp: tempfile::TempDir,
    pub dir: PathBuf,
}

impl TestPool {
    /// A new pool with a sparse data file of `data_size` and 64 KiB blocks.
    pub fn create(data_size: &str) -> TestPool {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path().join("pool");
        run(Command::new(BIN)
            .args(["pool", "create"])
            .arg(&dir)
            .args(["--data-size", data_size]));
        TestPool { tmp, dir }
    }

    pub fn dir_str(&self) -> &str {
        self.dir.to_str().expect("utf-8 temp path")
    }

    /// `thinnbd volume create --pool DIR NAME --size SIZE`.
    pub fn create_volume(&self, name: &str, size: &str) {
        thinnbd(&[
            "volume",
            "create",
            "--pool",
            self.dir_str(),
            name,
            "--size",
            size,
        ]);
    }

    /// `thinnbd pool status DIR --json`, parsed.
    pub fn status(&self) -> serde_json::Value {
        let text = thinnbd(&["pool", "status", self.dir_str(), "--json"]);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("bad status JSON ({e}):\n{text}"))
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

/// A running `thinnbd serve`. Dropping it kills the process (a test that wants the graceful
/// stop calls `stop`).
pub struct Server {
    child: Option<Child>,
    pub port: u16,
    pub socket: Option<PathBuf>,
    pub log: PathBuf,
}

impl Server {
    /// Spawns `thinnbd serve --listen 127.0.0.1:PORT [--socket S]` plus what `args` adds, in
    /// `cwd`, with its stderr in `cwd/serve-N.log`; waits until the port, the socket and (when
    /// given) the control socket accept connections.
    pub fn start(
        args: impl FnOnce(&mut Command),
        cwd: &Path,
        socket: Option<PathBuf>,
        control: Option<PathBuf>,
    ) -> Server {
        let mut n = 0;
        let log = loop {
            let p = cwd.join(format!("serve-{n}.log"));
            if !p.exists() {
                break p;
            }
            n += 1;
        };
        let port = free_port();
        let mut cmd = Command::new(BIN);
        // Plain logs in the file the tests print on failure.
        cmd.current_dir(cwd)
            .env("NO_COLOR", "1")
            .arg("serve")
            .args(["--listen", &format!("127.0.0.1:{port}")]);
        if let Some(s) = &socket {
            cmd.arg("--socket").arg(s);
        }
        args(&mut cmd);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("log file"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let mut server = Server {
            child: Some(child),
            port,
            socket,
            log,
        };
        server.wait_ready(control.as_deref());
        server
    }

    fn wait_ready(&mut self, control: Option<&Path>) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let tcp = TcpStream::connect(("127.0.0.1", self.port)).is_ok();
            let unix = self
                .socket
                .as_ref()
                .is_none_or(|s| UnixStream::connect(s).is_ok());
            let ctl = control.is_none_or(|c| UnixStream::connect(c).is_ok());
            if tcp && unix && ctl {
                return;
            }
            if let Some(status) = self.child_mut().try_wait().expect("try_wait") {
                panic!(
                    "thinnbd serve exited during start-up ({status}):\n{}",
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "thinnbd serve not ready after 120 s:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
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

    /// Still running (has not exited or crashed).
    pub fn is_running(&mut self) -> bool {
        self.child_mut().try_wait().expect("try_wait").is_none()
    }

    /// Resident memory of the server in bytes (VmRSS from /proc/PID/status).
    pub fn rss_bytes(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("proc status");
        let line = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .expect("VmRSS line");
        let kb: u64 = line
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .expect("VmRSS value");
        kb * 1024
    }

    /// SIGTERM, then waits (at most 60 s) for the exit; asserts a clean exit 0.
    pub fn stop(self) {
        self.stop_with(libc::SIGTERM);
    }

    /// Sends `signal` (SIGTERM or SIGINT), then waits (at most 60 s); asserts exit 0.
    pub fn stop_with(mut self, signal: libc::c_int) {
        let mut child = self.child.take().expect("server running");
        let pid = libc::pid_t::try_from(child.id()).expect("pid fits");
        // SAFETY: kill(2) on the pid of a child we spawned and have not reaped yet.
        let r = unsafe { libc::kill(pid, signal) };
        assert_eq!(r, 0, "kill({signal}) failed");
        let Some(status) = exit_within(&mut child, Duration::from_secs(60)) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "thinnbd serve did not stop within 60 s of signal {signal}:\n{}",
                self.log_text()
            );
        };
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

// The raw client speaks the wire through the public codec: its constants and encoders.
pub use thinnbd::nbd::codec::{
    Command as NbdCommand, OptionHeader, OptionReply, Request, SimpleReply, IHAVEOPT, NBD_MAGIC,
    OPTION_REPLY_HEADER_LEN, OPT_GO, REP_ACK, REP_INFO, SIMPLE_REPLY_LEN,
};
#[allow(unused_imports)] // the errors its replies carry, for the tests that check them
pub use thinnbd::nbd::{NBD_EINVAL, NBD_ENOSPC};

/// A blocking client that speaks the fixed-newstyle handshake and simple replies byte by byte.
pub struct RawClient {
    pub s: TcpStream,
}

impl RawClient {
    /// Connects and reads the greeting (without answering it).
    pub fn connect(port: u16) -> RawClient {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("read timeout");
        s.set_write_timeout(Some(Duration::from_secs(30)))
            .expect("write timeout");
        let mut c = RawClient { s };
        let magic = c.u64();
        let opt = c.u64();
        assert_eq!((magic, opt), (NBD_MAGIC, IHAVEOPT), "bad greeting");
        let _flags = c.u16();
        c
    }

    /// Connects and negotiates `export` with OPT_GO; returns (size, transmission flags).
    pub fn open(port: u16, export: &str) -> (RawClient, u64, u16) {
        let mut c = RawClient::connect(port);
        // Fixed newstyle, no zeroes.
        c.s.write_all(&3u32.to_be_bytes()).expect("client flags");
        let mut data = Vec::new();
        data.extend_from_slice(&u32::try_from(export.len()).expect("name").to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        c.send_option(OPT_GO, &data);
        let mut size_flags = None;
        loop {
            let (opt, kind, payload) = c.option_reply();
            assert_eq!(opt, OPT_GO);
            match kind {
                REP_ACK => break,
                REP_INFO if payload.len() >= 12 && payload[..2] == [0, 0] => {
                    let size = u64::from_be_bytes(payload[2..10].try_into().expect("8 bytes"));
                    let flags = u16::from_be_bytes(payload[10..12].try_into().expect("2 bytes"));
                    size_flags = Some((size, flags));
                }
                REP_INFO => {}
                other => panic!("OPT_GO {export}: reply {other:#x}"),
            }
        }
        let (size, flags) = size_flags.expect("NBD_INFO_EXPORT before the ACK");
        (c, size, flags)
    }

    pub fn u16(&mut self) -> u16 {
        let mut b = [0u8; 2];
        self.s.read_exact(&mut b).expect("read u16");
        u16::from_be_bytes(b)
    }

    pub fn u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.s.read_exact(&mut b).expect("read u32");
        u32::from_be_bytes(b)
    }

    pub fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.s.read_exact(&mut b).expect("read u64");
        u64::from_be_bytes(b)
    }

    pub fn send_option(&mut self, opt: u32, data: &[u8]) {
        let header = OptionHeader {
            option: opt,
            length: u32::try_from(data.len()).expect("len"),
        };
        let mut m = header.encode().to_vec();
        m.extend_from_slice(data);
        self.s.write_all(&m).expect("send option");
    }

    /// One option reply: (option, reply type, payload).
    pub fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
        self.s.read_exact(&mut h).expect("option reply header");
        let (opt, kind, len) = OptionReply::decode_header(&h).expect("option reply header");
        assert!(len <= 1 << 20, "option reply of {len} bytes");
        let mut payload = vec![0u8; len as usize];
        self.s.read_exact(&mut payload).expect("option reply data");
        (opt, kind, payload)
    }

    /// A transmission request header (the caller sends any payload).
    pub fn request(&mut self, command: NbdCommand, cookie: u64, offset: u64, length: u32) {
        let header = Request {
            flags: 0,
            command,
            cookie,
            offset,
            length,
        };
        self.s.write_all(&header.encode()).expect("send request");
    }

    /// A simple reply header: (errno, cookie).
    pub fn simple_reply(&mut self) -> (u32, u64) {
        let mut h = [0u8; SIMPLE_REPLY_LEN];
        self.s.read_exact(&mut h).expect("simple reply");
        let reply = SimpleReply::decode(&h).expect("simple reply header");
        (reply.error, reply.cookie)
    }

    pub fn write(&mut self, cookie: u64, offset: u64, data: &[u8]) -> u32 {
        self.request(
            NbdCommand::Write,
            cookie,
            offset,
            u32::try_from(data.len()).expect("len"),
        );
        self.s.write_all(data).expect("write payload");
        let (err, c) = self.simple_reply();
        assert_eq!(c, cookie);
        err
    }

    /// Reads; Ok(data) or Err(errno).
    pub fn read(&mut self, cookie: u64, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.request(NbdCommand::Read, cookie, offset, len);
        let (err, c) = self.simple_reply();
        assert_eq!(c, cookie);
        if err != 0 {
            return Err(err);
        }
        let mut data = vec![0u8; len as usize];
        self.s.read_exact(&mut data).expect("read data");
        Ok(data)
    }

    pub fn disconnect(mut self) {
        self.request(NbdCommand::Disc, 0, 0, 0);
    }
}

/// For a pool whose server has stopped: `thinnbd check DIR`, Debian's `thin_check` and
/// `verify_meta.py check` on its metadata all exit 0.
pub fn assert_pool_clean(dir: &Path) {
    let out = run(Command::new(BIN).arg("check").arg(dir));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("clean"), "thinnbd check:\n{text}");
    super::metadata::assert_metadata_clean(&dir.join("metadata"));
}
