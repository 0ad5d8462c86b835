//! Dirty-bitmap benchmark over NBD: how soon a client gets the first `qemu:dirty-bitmap:s1`
//! block status reply on a volume with 1,000,000 mapped blocks of which 1% changed between
//! snapshots `s1` and `s2`, and what an incremental backup (`examples/incremental-backup.sh`)
//! costs against a full `nbdcopy` of the same snapshot of a 1 GiB volume with 1% changed.
//!
//! `cargo build --release && cargo run --release --example dirty_bitmap_bench [-- MAPPINGS]`.
//! The pool is built through the library without writing gigabytes: 64 KiB data blocks,
//! and one 4 KiB write at the start of each block maps it (a new block of a sparse data file
//! reads zeros, so the rest is not written). Then `thinnbd serve` serves it on a unix socket
//! and 127.0.0.1; the timings are of the public clients (nbdsh, nbdinfo, nbdcopy, the
//! backup script). `DIRTY_BENCH_DIR=DIR` builds the pool in DIR (else a temporary directory).
//! Needs `nbdsh`, `nbdinfo`, `nbdcopy` (Debian: libnbd-bin, python3-libnbd).

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::seq::index::sample;
use rand::SeedableRng;
use thinnbd::config::Config;
use thinnbd::volume::Volumes;

const BLOCK: u64 = 64 << 10;
const BACKUP_VOLUME: u64 = 1 << 30;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run command");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// Writes 4 KiB at the start of each of `blocks` (block numbers) of `volume`.
fn touch_blocks(volumes: &Volumes, volume: &str, blocks: impl Iterator<Item = u64>, fill: u8) {
    let v = volumes.open_volume(volume).expect("open volume");
    let buf = vec![fill; 4096];
    for b in blocks {
        v.thin.write(b * BLOCK, &buf, false).expect("write");
    }
    v.thin.flush().expect("flush");
    drop(v);
    volumes.release_if_idle(volume);
}

/// The pool: `big` with `mappings` blocks mapped, snapshot `s1`, 1% of them rewritten,
/// snapshot `s2`; and `b` (1 GiB, every byte written) for the backup comparison.
fn build_pool(bin: &Path, dir: &Path, mappings: u64) {
    let data_size = (mappings + BACKUP_VOLUME / BLOCK) * BLOCK * 2;
    let dir_s = dir.to_str().expect("utf-8 dir");
    run(Command::new(bin).args([
        "pool",
        "create",
        dir_s,
        "--data-size",
        &data_size.to_string(),
        "--block-size",
        &BLOCK.to_string(),
    ]));
    let volumes = Volumes::open(dir, Config::default().engine).expect("open pool");
    volumes
        .create_volume("big", mappings * BLOCK)
        .expect("create big");
    touch_blocks(&volumes, "big", 0..mappings, 0x11);
    volumes.snapshot("big", "s1", true).expect("snapshot s1");
    let mut rng = SmallRng::seed_from_u64(21);
    let changed = sample(&mut rng, mappings as usize, (mappings / 100) as usize);
    let mut changed: Vec<u64> = changed.into_iter().map(|b| b as u64).collect();
    changed.sort_unstable();
    touch_blocks(&volumes, "big", changed.into_iter(), 0x22);
    volumes.snapshot("big", "s2", true).expect("snapshot s2");

    volumes.create_volume("b", BACKUP_VOLUME).expect("create b");
    let v = volumes.open_volume("b").expect("open b");
    let chunk = vec![0x33u8; 4 << 20];
    for off in (0..BACKUP_VOLUME).step_by(chunk.len()) {
        v.thin.write(off, &chunk, false).expect("write b");
    }
    v.thin.flush().expect("flush b");
    drop(v);
    volumes.release_if_idle("b");
    volumes.shutdown().expect("shut the pool down");
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn serve(bin: &Path, dir: &Path, port: u16) -> Server {
    let socket = dir.join("nbd.sock");
    let child = Command::new(bin)
        .arg("serve")
        .arg("--pool")
        .arg(dir)
        .arg("--socket")
        .arg(&socket)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start thinnbd serve");
    let server = Server(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(socket.exists() && dir.join("control.sock").exists()) {
        assert!(Instant::now() < deadline, "the server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    server
}

/// Seconds to connect, and to the first dirty-bitmap block status reply after that, in nbdsh.
const FIRST_REPLY: &str = r#"
import os, time
t0 = time.perf_counter()
h = nbd.NBD()
h.add_meta_context("qemu:dirty-bitmap:s1")
h.set_export_name("s2")
h.connect_unix(os.environ["SOCKET"])
t1 = time.perf_counter()
seen = []
def extent(metacontext, offset, entries, err):
    if metacontext == "qemu:dirty-bitmap:s1":
        seen.append(len(entries) // 2)
h.block_status(min(h.get_size(), 1 << 31), 0, extent)
t2 = time.perf_counter()
print(t1 - t0, t2 - t1, seen[0], h.get_size())
"#;

/// nbdsh, or the system python's libnbd module when the first python3 on PATH lacks it.
fn nbdsh() -> Command {
    let usable = |mut c: Command| {
        c.args(["-c", "pass"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if usable(Command::new("nbdsh")) {
        return Command::new("nbdsh");
    }
    let mut system = Command::new("/usr/bin/python3");
    system.args(["-m", "nbd"]);
    let mut probe = Command::new("/usr/bin/python3");
    probe.args(["-m", "nbd"]);
    assert!(usable(probe), "nbdsh (python3-libnbd) is not usable");
    system
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn timed(cmd: &mut Command) -> (f64, String) {
    let t = Instant::now();
    let out = run(cmd);
    (t.elapsed().as_secs_f64(), out)
}

fn main() {
    let mappings: u64 = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("MAPPINGS is a number"))
        .unwrap_or(1_000_000);
    let bin = common::our_binary();
    let tmp = tempfile::tempdir().expect("temporary directory");
    let dir = std::env::var_os("DIRTY_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| tmp.path().join("pool"));
    let t = Instant::now();
    build_pool(&bin, &dir, mappings);
    println!(
        "pool: `big` maps {mappings} blocks of 64 KiB, 1% rewritten between snapshots s1 and s2; \
         built in {:.1}s",
        t.elapsed().as_secs_f64()
    );

    let port = free_port();
    let server = serve(&bin, &dir, port);
    let socket = dir.join("nbd.sock");

    let (mut connect, mut first) = (Vec::new(), Vec::new());
    let mut first_extents = 0;
    for _ in 0..5 {
        let out = run(nbdsh().env("SOCKET", &socket).args(["-c", FIRST_REPLY]));
        let f: Vec<&str> = out.split_whitespace().collect();
        connect.push(f[0].parse::<f64>().expect("seconds"));
        first.push(f[1].parse::<f64>().expect("seconds"));
        first_extents = f[2].parse().expect("extents");
    }
    println!(
        "first qemu:dirty-bitmap:s1 reply on s2: connect {:.1} ms, then block_status {:.1} ms \
         ({first_extents} extents in the reply; median of 5, nbdsh)",
        median(connect) * 1e3,
        median(first) * 1e3
    );
    let uri = format!("nbd+unix:///s2?socket={}", socket.display());
    let mut whole = Vec::new();
    let mut dirty_rows = 0;
    for _ in 0..3 {
        let (secs, map) = timed(Command::new("nbdinfo").args(["--map=qemu:dirty-bitmap:s1", &uri]));
        whole.push(secs);
        dirty_rows = map
            .lines()
            .filter(|l| {
                l.split_whitespace()
                    .nth(2)
                    .and_then(|t| t.parse::<u32>().ok())
                    .is_some_and(|t| t & 1 == 1)
            })
            .count();
    }
    println!(
        "whole map: nbdinfo --map=qemu:dirty-bitmap:s1 {:.3}s ({dirty_rows} dirty extents; \
         median of 3, whole process)",
        median(whole)
    );

    // The backup comparison on `b`: a full backup as the reference, 1% of the blocks changed,
    // then the incremental backup against a full nbdcopy of the same new snapshot.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/incremental-backup.sh");
    let bin_dir = bin.parent().expect("binary dir");
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let work = dir.join("backups");
    std::fs::create_dir_all(&work).expect("backup dir");
    let backup = |args: &[&str]| {
        timed(
            Command::new("sh")
                .arg(&script)
                .args(args)
                .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .env("PATH", &path),
        )
    };
    let dir_s = dir.to_str().expect("utf-8 dir");
    let img = |name: &str| work.join(name).to_str().expect("utf-8").to_owned();
    backup(&["full", dir_s, "b", "b1", &img("b1.img")]);
    let blocks = BACKUP_VOLUME / BLOCK;
    let mut rng = SmallRng::seed_from_u64(22);
    let offsets: Vec<String> = sample(&mut rng, blocks as usize, (blocks / 100) as usize)
        .into_iter()
        .map(|b| (b as u64 * BLOCK).to_string())
        .collect();
    run(nbdsh()
        .env("OFFSETS", offsets.join(" "))
        .args([
            "-u",
            &format!("nbd+unix:///b?socket={}", socket.display()),
            "-c",
            "import os\nfor o in os.environ['OFFSETS'].split(): h.pwrite(b'\\x44' * 65536, int(o))\nh.flush()",
        ]));
    let (inc_secs, inc_out) = backup(&[
        "incremental",
        dir_s,
        "b",
        "b1",
        &img("b1.img"),
        "b2",
        &img("b2.img"),
        "--keep",
    ]);
    let read_bytes: u64 = inc_out
        .split_whitespace()
        .skip_while(|w| *w != "read")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("the script prints the bytes it read");
    // --flush: the script syncs its image before it reports, so the full copy does too.
    let (full_secs, _) = timed(Command::new("nbdcopy").args([
        "--flush",
        &format!("nbd+unix:///b2?socket={}", socket.display()),
        &img("full.img"),
    ]));
    let verify = run(Command::new("cmp").args([&img("b2.img"), &img("full.img")]));
    assert!(verify.is_empty());
    println!(
        "1 GiB volume, {} of {blocks} blocks changed: incremental-backup.sh read {read_bytes} \
         bytes in {inc_secs:.2}s (whole script, copying the previous image included); \
         full `nbdcopy --flush` of the same snapshot read {BACKUP_VOLUME} bytes in {full_secs:.2}s; \
         the two images are identical",
        blocks / 100
    );
    drop(server);
}
