//! Real-kernel NBD tests in a QEMU guest: the Linux NBD driver attaching a volume
//! (`nbd-client`, ext4, fstrim, re-attach) and QEMU's own NBD client using a volume as a virtio
//! disk. The build machine's kernel has no NBD driver, so a Debian kernel boots under QEMU with an
//! initramfs built by `tests/vm/build-initramfs.sh`; the guest half is `tests/vm/guest-init.sh`.
//!
//! The tests drive `tests/vm/run-guest-attach.sh` and `tests/vm/run-host-drive.sh`, which can also
//! be run by hand (`--help`). The attach test runs twice: in clear, and over TLS with client
//! certificates (`--tls-dir`). Each run keeps its work directory with the guest console log under
//! `CARGO_TARGET_TMPDIR/vm-*`; its path is printed on failure.
//!
//! The server under test is chosen by [`SERVER`] (or env `THINNBD_VM_SERVER=thinnbd|nbdkit|auto`).
//! Packages: qemu-system-x86, linux-image-amd64, busybox-static, nbd-client, e2fsprogs,
//! thin-provisioning-tools, libnbd-bin (and nbdkit for the nbdkit server). Missing ones make the
//! tests fail under `CI=true` and skip otherwise.

mod common;

use std::ffi::OsStr;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::in_ci;
use common::tls::Credentials;

/// Which NBD server the guest tests run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Server {
    /// The thinnbd binary built by cargo (`thinnbd serve`, pools, `pool status`, thin_check).
    Thinnbd,
    /// nbdkit (file plugin in the guest, memory plugin on the host): exercises the harness only.
    Nbdkit,
    /// thinnbd once its CLI has `serve`, nbdkit before that.
    Auto,
}

/// The one line to change to pin the server (e.g. `Server::Thinnbd` once the CLI has landed).
const SERVER: Server = Server::Thinnbd;

/// Bound for one guest run, boot to power-off (TCG on a shared machine is slow, ~30 s normally).
const GUEST_TIMEOUT_SECS: u64 = 240;
/// Bound for one script (initramfs build, host server, guest, host checks).
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(GUEST_TIMEOUT_SECS + 90);
/// The scripts' exit status for "a package is missing".
const EXIT_MISSING: i32 = 77;

fn vm_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vm")
}

/// `thinnbd serve --help` works and describes `serve`: the CLI has landed.
fn thinnbd_has_serve(bin: &str) -> bool {
    Command::new(bin)
        .args(["serve", "--help"])
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("--pool"))
}

/// The server binary to hand to the scripts.
fn server_bin() -> String {
    let thinnbd = env!("CARGO_BIN_EXE_thinnbd").to_string();
    let choice = match std::env::var("THINNBD_VM_SERVER").as_deref() {
        Ok("thinnbd") => Server::Thinnbd,
        Ok("nbdkit") => Server::Nbdkit,
        Ok("auto") => Server::Auto,
        _ => SERVER,
    };
    let use_thinnbd = match choice {
        Server::Thinnbd => true,
        Server::Nbdkit => false,
        Server::Auto => thinnbd_has_serve(&thinnbd),
    };
    if use_thinnbd {
        thinnbd
    } else {
        eprintln!(
            "vm_attach: NOTE: running the VM harness with nbdkit, not thinnbd \
             (SERVER={choice:?}; thinnbd `serve` available: {})",
            thinnbd_has_serve(&thinnbd)
        );
        "nbdkit".to_string()
    }
}

/// KVM if a guest really boots with it, else TCG. Probed once per test process (a probe that
/// hangs costs ~20 s), and remembered in the target dir for this machine and guest kernel.
fn accel() -> &'static str {
    static ACCEL: OnceLock<String> = OnceLock::new();
    ACCEL.get_or_init(|| {
        let key = shell_line(r#"echo "$(vm_kernel) $(uname -r) $(hostname)""#);
        let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("vm-accel.txt");
        if let Ok(text) = std::fs::read_to_string(&cache) {
            if let Some((k, a)) = text.trim().rsplit_once(' ') {
                if k == key && (a == "kvm" || a == "tcg") {
                    return a.to_string();
                }
            }
        }
        let accel = match shell_line("vm_pick_accel").as_str() {
            "kvm" => "kvm",
            _ => "tcg",
        };
        let _ = std::fs::write(&cache, format!("{key} {accel}\n"));
        accel.to_string()
    })
}

/// The trimmed stdout of a bash snippet run with tests/vm/lib.sh sourced ("" on failure).
fn shell_line(snippet: &str) -> String {
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(r#". "$1/lib.sh" && {snippet}"#))
        .arg("bash")
        .arg(vm_dir())
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        _ => String::new(),
    }
}

/// A fresh work directory for one test, kept after the run for its logs.
fn workdir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create work dir");
    dir
}

/// Ends the script's whole process group (bash, timeout, qemu, a host server).
fn kill_group(pgid: u32) {
    let Ok(pgid) = i32::try_from(pgid) else {
        return;
    };
    // SAFETY: kill(2) with a negative pid signals the process group the child leads (it was
    // spawned with process_group(0)); no memory is shared with the callee.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
}

enum Outcome {
    Pass(String),
    Missing(String),
}

/// Run one script (with `args` after the common ones) with a wall-clock bound; panics with the
/// console log path on failure.
fn run_script(script: &str, name: &str, args: &[&OsStr]) -> Outcome {
    use std::os::unix::process::CommandExt;

    let dir = workdir(name);
    let console = dir.join("console.log");
    let log_path = dir.join("script.log");
    let log = std::fs::File::create(&log_path).expect("create script log");
    let mut child = Command::new(vm_dir().join(script))
        .arg("--server-bin")
        .arg(server_bin())
        .arg("--workdir")
        .arg(&dir)
        .arg("--console")
        .arg(&console)
        .arg("--timeout")
        .arg(GUEST_TIMEOUT_SECS.to_string())
        .arg("--accel")
        .arg(accel())
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup log"))
        .stderr(log)
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {script}: {e}"));

    let start = Instant::now();
    let status = loop {
        match child.try_wait().expect("wait for script") {
            Some(st) => break Some(st),
            None if start.elapsed() > SCRIPT_TIMEOUT => {
                kill_group(child.id());
                let _ = child.wait();
                break None;
            }
            None => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(&log_path) {
        let _ = f.read_to_string(&mut text);
    }
    match status {
        Some(st) if st.success() => Outcome::Pass(text),
        Some(st) if st.code() == Some(EXIT_MISSING) => Outcome::Missing(text),
        other => {
            let why = match other {
                None => format!("timed out after {SCRIPT_TIMEOUT:?}"),
                Some(st) => format!("failed ({st})"),
            };
            panic!(
                "{script} {why}\n--- script output ---\n{text}\n--- end ---\n\
                 guest console log: {}\nwork dir: {}",
                console.display(),
                dir.display()
            );
        }
    }
}

fn run_vm_test(script: &str, name: &str, args: &[&OsStr]) {
    match run_script(script, name, args) {
        Outcome::Pass(text) => {
            // Keep logs, drop the big images.
            let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
            let _ = std::fs::remove_file(dir.join("pool.img"));
            let _ = std::fs::remove_dir_all(dir.join("pool"));
            assert!(
                text.contains("PASS"),
                "{script} exited 0 without PASS:\n{text}"
            );
        }
        Outcome::Missing(text) => {
            assert!(
                !in_ci(),
                "{script}: needed packages missing under CI=true:\n{text}"
            );
            eprintln!("SKIP {name}: {}", text.trim());
        }
    }
}

#[test]
fn guest_kernel_attaches_volume_with_nbd_client() {
    run_vm_test("run-guest-attach.sh", "vm-guest-attach", &[]);
}

/// The same attach, mkfs, write, checksum, trim and detach with nbd-client over TLS (1.2, its
/// only version), presenting a client certificate to a server that requires TLS and verifies
/// peers; certificates made here with openssl.
#[test]
fn guest_kernel_attaches_volume_with_nbd_client_over_tls() {
    if server_bin() != env!("CARGO_BIN_EXE_thinnbd") {
        assert!(
            !in_ci(),
            "the TLS attach test needs the thinnbd server under CI=true"
        );
        eprintln!("SKIP: the TLS attach test runs the thinnbd server only");
        return;
    }
    if !common::require_tool("openssl") {
        return;
    }
    let creds_root = tempfile::tempdir().expect("temp dir");
    let creds = Credentials::make(creds_root.path());
    assert_eq!(creds.server.parent(), Some(creds_root.path()));
    assert_eq!(creds.client.parent(), Some(creds_root.path()));
    let tls_dir = creds_root.path().as_os_str();
    run_vm_test(
        "run-guest-attach.sh",
        "vm-guest-attach-tls",
        &[OsStr::new("--tls-dir"), tls_dir],
    );
}

#[test]
fn qemu_nbd_drive_from_host_server() {
    run_vm_test("run-host-drive.sh", "vm-host-drive", &[]);
}

/// The host and guest parsers of `thinnbd pool status` accept the likely line shapes, under the
/// host's awk and busybox awk (the guest's).
#[test]
fn pool_status_mapped_parser() {
    let cases = [
        ("volume vol size=1073741824 mapped=12582912", "12582912"),
        ("vol: size 1.0 GiB, mapped 12 MiB", "12582912"),
        ("  vol  1073741824  mapped: 65536 bytes", "65536"),
        ("other mapped=1\nvol mapped 2K", "2048"),
        ("data used 4 MiB\nvolume vol mapped=0", "0"),
        ("volumes: 1 mapped=5\nvol mapped=7", "7"),
        ("name=vol mapped 12 GiB", "12884901888"),
        ("vol mapped: 192 blocks", ""),
    ];
    let mut awks = vec!["awk"];
    if Path::new("/bin/busybox").exists() {
        awks.push("/bin/busybox awk");
    } else {
        assert!(!in_ci(), "busybox-static is missing under CI=true");
        eprintln!("busybox-static missing: guest awk not checked");
    }
    for awk in awks {
        for (text, want) in cases {
            let out = Command::new("bash")
                .arg("-c")
                .arg(r#"AWK=$3; awk() { command $AWK "$@"; }; . "$1/lib.sh" && printf '%s\n' "$2" | vm_parse_mapped vol"#)
                .arg("bash")
                .arg(vm_dir())
                .arg(text)
                .arg(awk)
                .output()
                .expect("run bash");
            assert!(out.status.success(), "parser failed on {text:?} with {awk}");
            let got = String::from_utf8_lossy(&out.stdout);
            assert_eq!(got.trim(), want, "status text {text:?} with {awk}");
        }
    }
    // The guest keeps a copy of the parser; both must stay the same.
    let lib = std::fs::read_to_string(vm_dir().join("lib.sh")).expect("read lib.sh");
    let guest = std::fs::read_to_string(vm_dir().join("guest-init.sh")).expect("read guest-init");
    let body = |s: &str| -> String {
        let start = s.find("function unit(u)").expect("parser body");
        let end = s[start..].find("}'").expect("parser end") + start;
        s[start..end]
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(
        body(&lib),
        body(&guest),
        "lib.sh and guest-init.sh parsers differ"
    );
}
