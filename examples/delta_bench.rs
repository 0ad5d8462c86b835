//! Delta benchmark: one metadata file with a thin device of 1,000,000 mapped blocks and a
//! snapshot of it in which 1% of the blocks were then rewritten (copy-on-write), compared by
//! `thinnbd delta` and by Debian's `thin_delta` on the same file, plus the in-process walk that
//! serves an NBD `qemu:dirty-bitmap` context (changed runs only, shared subtrees skipped).
//!
//! `cargo build --release && cargo run --release --example delta_bench [-- MAPPINGS [REPS]]`.
//! Prints the median of REPS runs (default 5) of each, in wall time and in CPU time (user +
//! system, from getrusage of the finished child), and the ratios; both tools' outputs are
//! checked identical first; `DELTA_BENCH_DIR=DIR` keeps the metadata file in DIR. Target:
//! `thinnbd delta` at least 10x faster than `thin_delta`.

mod common;

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::seq::index::sample;
use rand::SeedableRng;
use thinnbd::pdata::block_io::FileBlockIo;
use thinnbd::thin::{delta, ThinMetadata};

const META_BYTES: u64 = 512 << 20;

fn open_metadata(path: &Path, format: bool) -> ThinMetadata {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(format)
        .truncate(format)
        .open(path)
        .expect("open metadata file");
    if format {
        f.set_len(META_BYTES).expect("size metadata file");
    }
    let io = Arc::new(FileBlockIo::new(f).expect("metadata block io"));
    if format {
        ThinMetadata::format(io, 128, 4_000_000).expect("format metadata")
    } else {
        ThinMetadata::open(io).expect("open metadata")
    }
}

/// CPU time (user + system) used so far by this process's children that have been waited for.
fn children_cpu() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: getrusage writes a whole rusage into the pointer it is given, which points to
    // one; it is read only after the call reports success.
    let usage = unsafe {
        assert_eq!(
            libc::getrusage(libc::RUSAGE_CHILDREN, usage.as_mut_ptr()),
            0,
            "getrusage"
        );
        usage.assume_init()
    };
    let time = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec.unsigned_abs())
            + Duration::from_micros(t.tv_usec.unsigned_abs())
    };
    time(usage.ru_utime) + time(usage.ru_stime)
}

/// Median wall and CPU (user + system) time of a command's runs.
struct Timing {
    wall: Duration,
    cpu: Duration,
}

/// Runs `cmd` `reps` times; returns the median times and the last run's stdout.
fn time_command(reps: usize, mut cmd: impl FnMut() -> Command) -> (Timing, Vec<u8>) {
    let mut wall = Vec::with_capacity(reps);
    let mut cpu = Vec::with_capacity(reps);
    let mut out = Vec::new();
    for _ in 0..reps {
        let cpu_before = children_cpu();
        let t = Instant::now();
        let o = cmd().output().expect("run command");
        wall.push(t.elapsed());
        cpu.push(children_cpu() - cpu_before);
        assert!(
            o.status.success(),
            "command failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        out = o.stdout;
    }
    wall.sort();
    cpu.sort();
    let timing = Timing {
        wall: wall[reps / 2],
        cpu: cpu[reps / 2],
    };
    (timing, out)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let n: u64 = args
        .next()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let reps: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(5);
    let changed = (n / 100).max(1);
    // DELTA_BENCH_DIR keeps the metadata file there, for profiling either tool on it.
    let kept = std::env::var_os("DELTA_BENCH_DIR").map(PathBuf::from);
    let tmp = tempfile::tempdir()?;
    let meta = kept.as_deref().unwrap_or(tmp.path()).join("metadata");

    let mut md = open_metadata(&meta, true);
    md.create_thin(1)?;
    for v in 0..n {
        let d = md.alloc_data_block()?;
        md.insert(1, v, d)?;
    }
    md.commit()?;
    md.create_snapshot(2, 1)?;
    let mut rng = SmallRng::seed_from_u64(7);
    let mut rewritten: Vec<u64> = sample(&mut rng, usize::try_from(n)?, usize::try_from(changed)?)
        .into_iter()
        .map(|i| i as u64)
        .collect();
    rewritten.sort_unstable();
    for &v in &rewritten {
        let d = md.alloc_data_block()?;
        md.insert(2, v, d)?;
    }
    md.commit()?;
    drop(md);
    println!(
        "metadata: {n} mapped blocks in thin 1; thin 2 is its snapshot with {changed} rewritten"
    );

    let ours = common::our_binary();
    let meta_arg = meta.to_str().expect("utf-8 path").to_owned();
    let (t_ours, out_ours) = time_command(reps, || {
        let mut c = Command::new(&ours);
        c.args(["delta", &meta_arg, "--snap1", "1", "--snap2", "2"]);
        c
    });
    let (t_theirs, out_theirs) = time_command(reps, || {
        let mut c = Command::new("thin_delta");
        c.args(["--snap1", "1", "--snap2", "2", &meta_arg]);
        c
    });
    assert!(
        out_ours == out_theirs,
        "thinnbd delta and thin_delta printed different XML"
    );
    println!(
        "thinnbd delta: {:.3}s  thin_delta: {:.3}s  (median of {reps}; identical XML, {} bytes); \
         ratio {:.1}x (target >= 10)",
        t_ours.wall.as_secs_f64(),
        t_theirs.wall.as_secs_f64(),
        out_ours.len(),
        t_theirs.wall.as_secs_f64() / t_ours.wall.as_secs_f64()
    );
    println!(
        "CPU time (user + system): thinnbd delta {:.3}s  thin_delta {:.3}s  (median of {reps}); \
         ratio {:.1}x",
        t_ours.cpu.as_secs_f64(),
        t_theirs.cpu.as_secs_f64(),
        t_theirs.cpu.as_secs_f64() / t_ours.cpu.as_secs_f64()
    );

    // The NBD context's question: only the changed runs, shared subtrees never read.
    let md = open_metadata(&meta, false);
    let mut times = Vec::with_capacity(reps);
    let mut runs = 0u64;
    let mut blocks = 0u64;
    let mut nodes = 0u64;
    for _ in 0..reps {
        let (mut r, mut b) = (0u64, 0u64);
        let t = Instant::now();
        let stats = delta::changed_extents(&md, 1, 2, 0..n, &mut |_, len| {
            r += 1;
            b += len;
            Ok(true)
        })?;
        times.push(t.elapsed());
        (runs, blocks, nodes) = (r, b, stats.nodes_read);
    }
    times.sort();
    assert_eq!(
        blocks, changed,
        "the walk found another number of changed blocks"
    );
    println!(
        "changed runs in process: {runs} runs, {blocks} blocks, {nodes} metadata nodes read, \
         {:.1} ms (median of {reps})",
        times[reps / 2].as_secs_f64() * 1e3
    );
    Ok(())
}
