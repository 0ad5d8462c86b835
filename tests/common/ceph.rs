//! A throwaway Ceph cluster for the RADOS tests: `tests/ceph/micro-cluster.sh` run in a temp
//! dir, one cluster per test binary (a start costs ~10 s) shared by its tests, each test in a
//! RADOS pool of its own. Also the cluster's side of the checks: `rados ls`/`get` of the
//! objects thinnbd wrote, stopping and restarting the OSD, and `thinnbd` commands with the
//! cluster's client settings (`CEPH_CONF`) in their environment.
//!
//! The CI rule of `super::tools`: under `CI=true` missing Ceph packages, a cluster that does not
//! start, or a `thinnbd` built without RADOS support fail the test; elsewhere the first two
//! skip with a note. A cluster that fails to start with Ceph installed always fails.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use super::process::{describe, exit_within, free_port, run};
use super::server::{succeeded, Server, BIN};
use super::tools::{find_tool, in_ci};

/// How long a `thinnbd` command may take.
const COMMAND_LIMIT: Duration = Duration::from_secs(120);

/// The Ceph programs a cluster needs (Debian: ceph-mon ceph-osd ceph-common).
const CEPH_TOOLS: [&str; 5] = ["ceph-mon", "ceph-osd", "monmaptool", "ceph", "rados"];

/// The micro-cluster script in the checkout.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ceph/micro-cluster.sh")
}

/// A running single-node cluster in `dir`, stopped on Drop (the shared one is stopped by the
/// script's watcher when the test binary exits, since statics are never dropped).
pub struct CephCluster {
    pub dir: PathBuf,
    pub conf: PathBuf,
    /// Held shared by each [`RadosPool`] and exclusively while the OSD is stopped, so a test
    /// that stops the OSD does not time out the other tests of its binary.
    osd_in_use: RwLock<()>,
    owned: bool,
}

/// Either guard on the cluster: a pool in use, or the OSD being stopped.
enum Use {
    Shared(#[allow(dead_code)] RwLockReadGuard<'static, ()>),
    Exclusive(#[allow(dead_code)] RwLockWriteGuard<'static, ()>),
}

static SHARED: OnceLock<Option<CephCluster>> = OnceLock::new();

impl CephCluster {
    /// The cluster of this test binary, started on first use; None after a skip note.
    pub fn shared() -> Option<&'static CephCluster> {
        SHARED
            .get_or_init(|| CephCluster::start_with(false))
            .as_ref()
    }

    /// A cluster of its own, stopped and removed on Drop; None after a skip note.
    pub fn start() -> Option<CephCluster> {
        CephCluster::start_with(true)
    }

    fn start_with(owned: bool) -> Option<CephCluster> {
        if let Some(missing) = CEPH_TOOLS.iter().find(|t| find_tool(t).is_none()) {
            assert!(
                !in_ci(),
                "{missing} is missing (CI=true): tests/run-all.sh installs ceph-mon ceph-osd \
                 ceph-common"
            );
            eprintln!("SKIP: Ceph not installed ({missing} missing)");
            return None;
        }
        let dir = std::env::temp_dir().join(format!(
            "thinnbd-ceph-{}-{}",
            std::process::id(),
            free_port()
        ));
        let started = Instant::now();
        let mut cmd = Command::new("bash");
        cmd.arg(script())
            .arg("start")
            .arg(&dir)
            // Plain RADOS I/O needs no mgr, and the mgr costs CPU on a 2-core machine.
            .env("MICRO_CLUSTER_MGR", "0")
            .env("MICRO_CLUSTER_OWNER_PID", std::process::id().to_string())
            .env("MICRO_CLUSTER_REMOVE_WITH_OWNER", "1")
            .stdin(Stdio::null());
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
        if !out.status.success() {
            let logs = tail_logs(&dir);
            panic!(
                "the test Ceph cluster did not start: {}\n{logs}",
                describe(&cmd, &out)
            );
        }
        eprintln!(
            "ceph: test cluster up in {:.1} s in {}",
            started.elapsed().as_secs_f64(),
            dir.display()
        );
        Some(CephCluster {
            conf: dir.join("ceph.conf"),
            dir,
            osd_in_use: RwLock::new(()),
            owned,
        })
    }

    /// Puts the cluster's client settings into `cmd`'s environment (and the caller's own
    /// `CEPH_ARGS`, which could name another cluster, out of it).
    pub fn env<'c>(&self, cmd: &'c mut Command) -> &'c mut Command {
        cmd.env("CEPH_CONF", &self.conf).env_remove("CEPH_ARGS")
    }

    /// A command for `program` with the cluster's environment.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        self.env(&mut cmd).stdin(Stdio::null());
        cmd
    }

    /// `thinnbd ARGS` against this cluster, whatever its exit status. Bounded: a command
    /// still running after 2 minutes (a hung cluster or server) is killed and fails the test.
    pub fn thinnbd(&self, args: &[&str]) -> Output {
        let out = tempfile::tempfile().expect("temp file");
        let err = tempfile::tempfile().expect("temp file");
        let mut child = self
            .command(BIN)
            .args(args)
            .env("NO_COLOR", "1")
            .stdout(out.try_clone().expect("dup"))
            .stderr(err.try_clone().expect("dup"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run thinnbd {args:?}: {e}"));
        let read = |mut f: std::fs::File| {
            use std::io::{Read, Seek};
            let mut bytes = Vec::new();
            f.rewind().expect("rewind");
            f.read_to_end(&mut bytes).expect("read output");
            bytes
        };
        let Some(status) = exit_within(&mut child, COMMAND_LIMIT) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "thinnbd {args:?} still ran after {COMMAND_LIMIT:?}:\n{}",
                String::from_utf8_lossy(&read(err))
            );
        };
        Output {
            status,
            stdout: read(out),
            stderr: read(err),
        }
    }

    /// `thinnbd ARGS` that must succeed; returns stdout.
    pub fn thinnbd_ok(&self, args: &[&str]) -> String {
        succeeded(args, &self.thinnbd(args))
    }

    /// `thinnbd ARGS` that must fail; returns stdout and stderr together.
    pub fn thinnbd_failing(&self, args: &[&str]) -> String {
        let out = self.thinnbd(args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !out.status.success(),
            "thinnbd {args:?} unexpectedly succeeded:\n{text}"
        );
        text
    }

    /// `ceph ARGS` (bounded), stdout.
    pub fn ceph(&self, args: &[&str]) -> String {
        let mut cmd = self.command("ceph");
        cmd.args(["--connect-timeout", "60"]).args(args);
        String::from_utf8_lossy(&run(&mut cmd).stdout).into_owned()
    }

    /// A new RADOS pool for one test, named `NAME-PID`: unique on the host, so that the
    /// control sockets of its thin pools (named after the RADOS pool and the thin pool) never
    /// meet those of another test binary's cluster. Each test takes one pool: the pool holds a
    /// shared use of the cluster that [`CephCluster::osd_stop`]'s test waits out.
    pub fn pool(&'static self, name: &str) -> RadosPool {
        self.create_pool(
            name,
            Use::Shared(self.osd_in_use.read().unwrap_or_else(|p| p.into_inner())),
        )
    }

    /// A new RADOS pool for a test that stops the OSD: it waits until no other test of the
    /// binary uses the cluster, and keeps them out until it is dropped.
    pub fn pool_exclusive(&'static self, name: &str) -> RadosPool {
        self.create_pool(
            name,
            Use::Exclusive(self.osd_in_use.write().unwrap_or_else(|p| p.into_inner())),
        )
    }

    fn create_pool(&'static self, name: &str, guard: Use) -> RadosPool {
        let name = format!("{name}-{}", std::process::id());
        self.ceph(&["osd", "pool", "create", &name, "8", "8"]);
        self.ceph(&["osd", "pool", "application", "enable", &name, "thinnbd"]);
        RadosPool {
            cluster: self,
            name,
            _use: guard,
        }
    }

    /// Stops the OSD (its data stays): RADOS requests wait from now on.
    pub fn osd_stop(&self) {
        self.script_action("osd-stop");
    }

    /// Starts the OSD again and waits until it serves I/O.
    pub fn osd_start(&self) {
        self.script_action("osd-start");
    }

    fn script_action(&self, action: &str) {
        let mut cmd = Command::new("bash");
        cmd.arg(script()).arg(action).arg(&self.dir);
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
        assert!(
            out.status.success(),
            "{}\n{}",
            describe(&cmd, &out),
            tail_logs(&self.dir)
        );
    }

    /// Starts `thinnbd serve --pool LOCATION --listen 127.0.0.1:0` plus `extra` (e.g.
    /// `--config FILE`) with the cluster's environment; does not wait: a second server waits
    /// for the owner lock before it serves. [`Server::wait_serving`] waits.
    pub fn spawn_server(&self, location: &str, extra: &[&str], log: &Path) -> Server {
        let mut cmd = self.command(BIN);
        cmd.arg("serve")
            .args(extra)
            .args(["--pool", location, "--listen", "127.0.0.1:0"])
            .env("NO_COLOR", "1")
            .env("THINNBD_LOG", "thinnbd=info,warn");
        Server::launch(cmd, log.to_path_buf())
    }

    /// [`CephCluster::spawn_server`] and waits until it serves.
    pub fn serve(&self, location: &str, extra: &[&str], log: &Path) -> Server {
        let mut server = self.spawn_server(location, extra, log);
        server.wait_serving(Duration::from_secs(120));
        server
    }

    /// Whether the tested binary has RADOS support (asked before any cluster starts). Without:
    /// fails under CI=true (run-all.sh builds with `--features thinnbd/rados`), else prints a
    /// skip note.
    pub fn binary_supports_rados() -> bool {
        let out = Command::new(BIN)
            .args(["pool", "status", "rados:thinnbd-probe/none"])
            .env("NO_COLOR", "1")
            // No cluster: a RADOS build fails to connect, which is all this needs to see.
            .env("CEPH_CONF", "/nonexistent/ceph.conf")
            .stdin(Stdio::null())
            .output()
            .expect("run thinnbd");
        let err = String::from_utf8_lossy(&out.stderr);
        if !err.contains("built without RADOS support") {
            return true;
        }
        assert!(
            !in_ci(),
            "thinnbd was built without RADOS support (CI=true): build and test with \
             --features thinnbd/rados"
        );
        eprintln!("SKIP: thinnbd built without RADOS support (--features thinnbd/rados)");
        false
    }
}

impl Drop for CephCluster {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        let _ = Command::new("bash")
            .arg(script())
            .arg("stop")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The shared cluster of this test binary and a new RADOS pool `name` in it, when Ceph and a
/// RADOS-capable binary are there; None after a skip note.
pub fn rados_pool(name: &str) -> Option<RadosPool> {
    if !CephCluster::binary_supports_rados() {
        return None;
    }
    Some(CephCluster::shared()?.pool(name))
}

/// The last lines of the cluster's logs, for a failure message.
fn tail_logs(dir: &Path) -> String {
    let mut text = String::new();
    for name in ["mon.a.log", "osd.0.log", "osd.0.stdout", "mon.a.stdout"] {
        let path = dir.join("log").join(name);
        if let Ok(all) = std::fs::read_to_string(&path) {
            let lines: Vec<&str> = all.lines().collect();
            let tail = &lines[lines.len().saturating_sub(15)..];
            text.push_str(&format!(
                "--- {} ---\n{}\n",
                path.display(),
                tail.join("\n")
            ));
        }
    }
    text
}

/// A RADOS pool of one test in the cluster.
pub struct RadosPool {
    pub cluster: &'static CephCluster,
    pub name: String,
    _use: Use,
}

impl RadosPool {
    /// The location string of thin pool `thin` in this RADOS pool: `rados:POOL/THIN`.
    pub fn location(&self, thin: &str) -> String {
        format!("rados:{}/{thin}", self.name)
    }

    /// The names of the objects in this pool that start with `prefix`, sorted.
    pub fn ls(&self, prefix: &str) -> Vec<String> {
        let mut cmd = self.cluster.command("rados");
        cmd.args(["-p", &self.name, "ls"]);
        let out = String::from_utf8_lossy(&run(&mut cmd).stdout).into_owned();
        let mut names: Vec<String> = out
            .lines()
            .filter(|l| l.starts_with(prefix))
            .map(str::to_string)
            .collect();
        names.sort();
        names
    }

    /// The data objects of thin pool `thin` (`THIN.data.*`): one per provisioned pool block.
    pub fn data_objects(&self, thin: &str) -> Vec<String> {
        self.ls(&format!("{thin}.data."))
    }

    /// The bytes of object `object`, or None when it does not exist.
    pub fn get(&self, object: &str) -> Option<Vec<u8>> {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        let mut cmd = self.cluster.command("rados");
        cmd.args(["-p", &self.name, "get", object]).arg(file.path());
        let out = cmd.output().expect("run rados get");
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains("No such file or directory"),
                "{}",
                describe(&cmd, &out)
            );
            return None;
        }
        Some(std::fs::read(file.path()).expect("read the fetched object"))
    }

    /// `thinnbd pool create rados:POOL/THIN --data-size SIZE` plus `extra`, then the volumes.
    /// In blocks of 64 KiB unless `extra` says otherwise (not the RADOS default of 1 MiB):
    /// the tests' block boundaries and object counts are in those, and a small pool has many.
    pub fn create_thin_pool(
        &self,
        thin: &str,
        data_size: &str,
        extra: &[&str],
        volumes: &[(&str, &str)],
    ) -> String {
        let location = self.location(thin);
        let mut args = vec![
            "pool",
            "create",
            location.as_str(),
            "--data-size",
            data_size,
        ];
        args.extend_from_slice(extra);
        if !extra.contains(&"--block-size") {
            args.extend_from_slice(&["--block-size", "64K"]);
        }
        self.cluster.thinnbd_ok(&args);
        for (name, size) in volumes {
            self.cluster.thinnbd_ok(&[
                "volume", "create", "--pool", &location, name, "--size", size,
            ]);
        }
        location
    }

    /// `thinnbd pool status LOCATION --json`, parsed.
    pub fn status(&self, thin: &str) -> serde_json::Value {
        let out = self
            .cluster
            .thinnbd_ok(&["pool", "status", &self.location(thin), "--json"]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("status is not JSON ({e}): {out}"))
    }

    /// For a thin pool no server holds: `thinnbd check` says clean, and the metadata exported
    /// with `pool export-metadata` passes thin_check and verify_meta.py.
    pub fn assert_clean(&self, thin: &str, scratch: &Path) {
        let location = self.location(thin);
        let text = self.cluster.thinnbd_ok(&["check", &location]);
        assert!(text.contains("clean"), "thinnbd check {location}:\n{text}");
        let image = scratch.join(format!("{thin}.metadata"));
        let _ = std::fs::remove_file(&image);
        self.cluster.thinnbd_ok(&[
            "pool",
            "export-metadata",
            &location,
            image.to_str().expect("utf-8 path"),
        ]);
        super::metadata::assert_metadata_clean(&image);
    }
}
