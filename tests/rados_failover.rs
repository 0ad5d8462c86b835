//! Two hosts, one RADOS pool: failover and fencing with the real binary on the test cluster
//! (tests/ceph/micro-cluster.sh).
//!
//! - Crash and failover: server A serves, server B waits for the owner lock (and names A as
//!   the owner), two clients write, trim and flush, A is killed with SIGKILL at a random moment,
//!   and B takes over, through `thinnbd pool takeover` in most rounds and through the expiry of
//!   A's lock in some. Every write acknowledged before a completed flush reads back through B;
//!   every other 4 KiB piece holds its flushed version or a later write (tests/common/model.rs).
//!   Some rounds have no B: the pool left by the kill is taken over and checked (thinnbd check,
//!   thin_check and verify_meta.py on the exported metadata) before a new server opens it.
//! - Fencing: A is stopped with SIGSTOP, B takes over once A's lock expires and serves writes;
//!   A, continued with a write queued on its connection, exits non-zero and not one byte of
//!   RADOS changes: every object of the pool is as B left it.
//! - The OSD is stopped for a few seconds and started again under a writing client: requests
//!   wait and complete, and every acknowledged write reads back.
//!
//! THINNBD_FAILOVER_ROUNDS (default 20) sets the rounds of the first; THINNBD_SEED replays one.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::ceph::{rados_pool, CephCluster, RadosPool};
use common::model::{Model, PIECE};
use common::nbd_client::Client;
use common::server::Server;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// The thin pool's name inside each test's RADOS pool.
const THIN: &str = "tp";
/// Each client writes its own region of the volume.
const REGION: u64 = 8 << 20;
const NR_PIECES: u64 = REGION / PIECE as u64;
/// How long an owner's lock lasts unrenewed. Short, so that expiry rounds are quick, yet well
/// above the renewal period (a third of it) on a loaded 2-core machine.
const LOCK_SECS: u64 = 6;

/// A config with a short lock; the pool exists already.
fn short_lock_config(dir: &Path) -> PathBuf {
    let path = dir.join("short-lock.toml");
    std::fs::write(
        &path,
        format!("[pool]\nrados_lock_duration_secs = {LOCK_SECS}\ncreate_if_missing = false\n"),
    )
    .expect("write config");
    path
}

/// A server of the pool (not yet serving: it may wait for the lock), its log numbered.
fn spawn(rados: &RadosPool, location: &str, config: &Path, scratch: &Path, n: usize) -> Server {
    let config = config.to_str().expect("utf-8 path");
    rados.cluster.spawn_server(
        location,
        &["--config", config],
        &scratch.join(format!("serve-{n}.log")),
    )
}

fn kill(pid: u32, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).expect("pid fits");
    // SAFETY: kill(2) on a server child this test spawned and has not reaped.
    let r = unsafe { libc::kill(pid, signal) };
    assert_eq!(r, 0, "kill({pid}, {signal})");
}

/// Waits (bounded) until the waiting server `standby` logs the owner's pid, and checks it does
/// not serve meanwhile and that `pool status` names the same owner.
fn assert_waits_for(standby: &mut Server, owner_pid: u32, rados: &RadosPool, location: &str) {
    let pid = owner_pid.to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !standby.log_text().contains(&pid) {
        assert!(
            standby.is_running(),
            "the standby server exited:\n{}",
            standby.log_text()
        );
        assert!(
            Instant::now() < deadline,
            "the standby server does not name the owner (pid {pid}) after 20 s:\n{}",
            standby.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !standby.is_serving(),
        "the standby serves while pid {pid} owns the pool:\n{}",
        standby.log_text()
    );
    let status = rados.cluster.thinnbd_ok(&["pool", "status", location]);
    assert!(
        status
            .lines()
            .any(|l| l.trim_start().starts_with("owner:") && l.contains(&pid)),
        "pool status does not name pid {pid} as owner:\n{status}"
    );
}

#[derive(Default, Debug)]
struct Tally {
    writes: u64,
    trims: u64,
    flushes: u64,
    cut_off: u64,
}

/// One client's share of a round: random writes and trims of 4 KiB pieces with flushes in
/// between, recorded in `model`, until the connection breaks (the kill) or `budget` ends.
/// `on_flush_sent(n)` runs right after the n-th flush request leaves (it may kill the server).
fn write_until_cut(
    client: &mut Client,
    base: u64,
    model: &mut Model,
    rng: &mut SmallRng,
    budget: Duration,
    on_flush_sent: &dyn Fn(u32),
    tally: &mut Tally,
) {
    let end = Instant::now() + budget;
    let mut flushes = 0;
    while Instant::now() < end {
        let first = rng.gen_range(0..NR_PIECES);
        let count = rng.gen_range(1..=16).min(NR_PIECES - first);
        let offset = base + first * PIECE as u64;
        let roll = rng.gen_range(0..100);
        let reply = if roll < 80 {
            let (versions, bytes) = model.begin_write(first, count, false);
            client.write(offset, &bytes, false).map(|e| (e, versions))
        } else if roll < 88 {
            let (versions, _) = model.begin_write(first, count, true);
            let len = u32::try_from(count as usize * PIECE).expect("small trim");
            client.trim(offset, len).map(|e| (e, versions))
        } else {
            flushes += 1;
            client
                .send(common::nbd_client::Command::Flush, 0, 0, 0, &[])
                .and_then(|_cookie| {
                    on_flush_sent(flushes);
                    client.reply(&mut [])
                })
                .map(|(e, _)| (e, Vec::new()))
        };
        match reply {
            Ok((0, versions)) if versions.is_empty() => {
                model.flushed();
                tally.flushes += 1;
            }
            Ok((0, versions)) => {
                model.acked(first, &versions, false);
                if roll < 80 {
                    tally.writes += 1;
                } else {
                    tally.trims += 1;
                }
            }
            Ok((errno, _)) => panic!("request at {offset} failed with errno {errno}"),
            Err(_) => {
                tally.cut_off += 1;
                return;
            }
        }
    }
}

/// Reads a client's region through the server on `port` and checks it against its model; the
/// state found becomes the model's (writes of unknown fate are settled).
fn verify_after_crash(port: u16, base: u64, model: &mut Model, round: usize, seed: u64) {
    let mut c = Client::connect(port, "vol").expect("connect to the new owner");
    if let Err(why) = model.verify_region_after_crash(&mut c, base) {
        panic!("seed {seed}, round {round}: {why}");
    }
    c.disconnect();
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Handover {
    /// B waits; `thinnbd pool takeover` fences A and breaks its lock.
    Takeover,
    /// B waits until A's lock expires.
    Expiry,
    /// No B: the crashed pool is taken over and checked offline, then a new server opens it.
    CheckOffline,
}

#[test]
fn sigkill_and_failover_lose_nothing_flushed() {
    let rounds = common::load::env_count("THINNBD_FAILOVER_ROUNDS", 20) as usize;
    let seed = common::load::base_seed("failover");
    let Some(rados) = rados_pool("failover-crash") else {
        return;
    };
    let location = rados.create_thin_pool(THIN, "256M", &[], &[("vol", "16M")]);
    let scratch = tempfile::tempdir().expect("temp dir");
    let config = short_lock_config(scratch.path());
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut models = [
        Model::new(seed, NR_PIECES),
        Model::new(seed ^ 0xb, NR_PIECES),
    ];
    let mut tally = [Tally::default(), Tally::default()];
    let mut handovers = Vec::new();
    let mut owner = spawn(&rados, &location, &config, scratch.path(), 0);
    owner.wait_serving(Duration::from_secs(60));
    for round in 0..rounds {
        let handover = match round % 5 {
            3 => Handover::Expiry,
            4 => Handover::CheckOffline,
            _ => Handover::Takeover,
        };
        handovers.push(handover);
        let owner_pid = owner.pid();
        let mut standby = (handover != Handover::CheckOffline)
            .then(|| spawn(&rados, &location, &config, scratch.path(), round + 1));
        if let Some(b) = standby.as_mut() {
            assert_waits_for(b, owner_pid, &rados, &location);
        }

        // Two writers; the kill comes from a timer or right after a flush is sent.
        let killed = Arc::new(AtomicBool::new(false));
        let kill_once = {
            let killed = killed.clone();
            move || {
                if !killed.swap(true, Ordering::SeqCst) {
                    kill(owner_pid, libc::SIGKILL);
                }
            }
        };
        let kill_at_flush = rng.gen_bool(0.4).then(|| rng.gen_range(1..=3u32));
        let delay = Duration::from_millis(rng.gen_range(50..1500));
        // Connected before the timer starts, so that the kill never comes before a client.
        let clients: Vec<Client> = (0..2)
            .map(|_| Client::connect(owner.port, "vol").expect("connect"))
            .collect();
        let writers: Vec<_> = clients
            .into_iter()
            .enumerate()
            .map(|(i, mut client)| {
                let mut model = std::mem::replace(&mut models[i], Model::new(0, 0));
                let mut t = std::mem::take(&mut tally[i]);
                let mut r = SmallRng::seed_from_u64(rng.gen());
                let kill_once = kill_once.clone();
                std::thread::spawn(move || {
                    let on_flush = |n: u32| {
                        if i == 0 && kill_at_flush == Some(n) {
                            kill_once();
                        }
                    };
                    let budget = Duration::from_secs(5);
                    let base = i as u64 * REGION;
                    write_until_cut(
                        &mut client,
                        base,
                        &mut model,
                        &mut r,
                        budget,
                        &on_flush,
                        &mut t,
                    );
                    (model, t)
                })
            })
            .collect();
        let timer_end = Instant::now() + delay;
        while Instant::now() < timer_end && !killed.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
        kill_once();
        for (i, w) in writers.into_iter().enumerate() {
            (models[i], tally[i]) = w.join().expect("writer thread");
        }
        owner.kill();

        let handed_at = Instant::now();
        if handover != Handover::Expiry {
            let out = rados.cluster.thinnbd_ok(&["pool", "takeover", &location]);
            assert!(
                out.contains(&owner_pid.to_string()),
                "takeover does not name the fenced owner (pid {owner_pid}):\n{out}"
            );
        }
        if handover == Handover::CheckOffline {
            rados.assert_clean(THIN, scratch.path());
        }
        owner = match standby {
            Some(b) => b,
            None => spawn(&rados, &location, &config, scratch.path(), round + 1),
        };
        owner.wait_serving(Duration::from_secs(LOCK_SECS + 60));
        let took = handed_at.elapsed();
        if handover == Handover::Takeover {
            // A broken lock is taken at the standby's next poll (every second).
            assert!(took < Duration::from_secs(LOCK_SECS + 10), "{took:?}");
        }
        verify_after_crash(owner.port, 0, &mut models[0], round, seed);
        verify_after_crash(owner.port, REGION, &mut models[1], round, seed);
    }
    let status = owner.terminate();
    assert!(status.success(), "{status}:\n{}", owner.log_text());
    rados.assert_clean(THIN, scratch.path());
    println!(
        "failover: {rounds} SIGKILLs and handovers ({} takeover, {} expiry, {} checked \
         offline); {} writes, {} trims, {} flushes acknowledged; {} requests cut off; lost 0",
        handovers
            .iter()
            .filter(|h| **h == Handover::Takeover)
            .count(),
        handovers.iter().filter(|h| **h == Handover::Expiry).count(),
        handovers
            .iter()
            .filter(|h| **h == Handover::CheckOffline)
            .count(),
        tally[0].writes + tally[1].writes,
        tally[0].trims + tally[1].trims,
        tally[0].flushes + tally[1].flushes,
        tally[0].cut_off + tally[1].cut_off,
    );
}

/// Every object of the thin pool with its bytes.
fn snapshot_objects(rados: &RadosPool) -> Vec<(String, Vec<u8>)> {
    rados
        .ls(&format!("{THIN}."))
        .into_iter()
        .filter(|name| name != &format!("{THIN}.owner"))
        .map(|name| {
            let bytes = rados
                .get(&name)
                .unwrap_or_else(|| panic!("{name} vanished"));
            (name, bytes)
        })
        .collect()
}

#[test]
fn a_stalled_owner_is_fenced_and_writes_nothing_after_takeover() {
    let Some(rados) = rados_pool("failover-fence") else {
        return;
    };
    let location = rados.create_thin_pool(THIN, "64M", &[], &[("vol", "4M")]);
    let scratch = tempfile::tempdir().expect("temp dir");
    let config = short_lock_config(scratch.path());
    let mut a = spawn(&rados, &location, &config, scratch.path(), 0);
    a.wait_serving(Duration::from_secs(60));
    let a_pid = a.pid();
    let mut from_a = Client::connect(a.port, "vol").expect("connect to A");
    // A writes the first MiB; the second stays unprovisioned.
    let first_mib = vec![0xaa; 1 << 20];
    assert_eq!(from_a.write(0, &first_mib, false).expect("write"), 0);
    assert_eq!(from_a.flush().expect("flush"), 0);
    let mut b = spawn(&rados, &location, &config, scratch.path(), 1);
    assert_waits_for(&mut b, a_pid, &rados, &location);

    kill(a_pid, libc::SIGSTOP);
    let stopped_at = Instant::now();
    // A cannot renew: its lock expires and B takes the pool, fencing A.
    b.wait_serving(Duration::from_secs(LOCK_SECS + 60));
    // A renewed at most a third of the duration before it stopped.
    let earliest = Duration::from_secs(LOCK_SECS * 2 / 3 - 1);
    assert!(
        stopped_at.elapsed() >= earliest,
        "B served {:?} after A stopped, before A's lock could expire",
        stopped_at.elapsed()
    );
    let mut from_b = Client::connect(b.port, "vol").expect("connect to B");
    let b_bytes = vec![0xbb; 512 << 10];
    assert_eq!(from_b.write(256 << 10, &b_bytes, false).expect("write"), 0);
    assert_eq!(from_b.flush().expect("flush"), 0);
    let before = snapshot_objects(&rados);

    // Queued while A is stopped: over the first MiB (mapped in A's view) and the second
    // (a new block for A), then a flush. A sees them as soon as it runs again.
    let rogue = vec![0x66; 2 << 20];
    from_a
        .send(common::nbd_client::Command::Write, 0, 0, 2 << 20, &rogue)
        .expect("queue a write on A's connection");
    let flush_cookie = from_a
        .send(common::nbd_client::Command::Flush, 0, 0, 0, &[])
        .expect("queue a flush on A's connection");
    kill(a_pid, libc::SIGCONT);
    let status = a.wait_exit(Duration::from_secs(60)).unwrap_or_else(|| {
        panic!(
            "A still runs 60 s after it lost the pool:\n{}",
            a.log_text()
        )
    });
    assert!(
        !status.success(),
        "A exited with {status}:\n{}",
        a.log_text()
    );
    let a_log = a.log_text();
    assert!(
        a_log.contains("lost ownership of pool"),
        "A's log does not say it lost the pool:\n{a_log}"
    );
    // A flush is acknowledged only after a round trip proves ownership: A answers its write
    // and flush with an error, or not at all (the connection dropped).
    let mut replies = Vec::new();
    while let Ok(reply) = from_a.reply(&mut []) {
        replies.push(reply);
    }
    assert!(
        !replies.contains(&(0, flush_cookie)),
        "A acknowledged a flush after losing the pool: {replies:?}\n{a_log}"
    );
    println!("fence: A exited with {status}; its answers (errno, cookie): {replies:?}");
    let after = snapshot_objects(&rados);
    let names = |s: &[(String, Vec<u8>)]| s.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(&after), names(&before), "A added or removed objects");
    for ((name, was), (_, now)) in before.iter().zip(&after) {
        assert!(was == now, "A changed object {name}");
    }
    // B's data and A's flushed data read back through B.
    let mut got = vec![0u8; 2 << 20];
    assert_eq!(from_b.read(0, &mut got).expect("read"), 0);
    assert!(
        got[..256 << 10].iter().all(|&x| x == 0xaa),
        "A's flushed data"
    );
    assert!(
        got[256 << 10..768 << 10].iter().all(|&x| x == 0xbb),
        "B's data"
    );
    assert!(
        got[768 << 10..1 << 20].iter().all(|&x| x == 0xaa),
        "A's flushed data"
    );
    assert!(
        got[1 << 20..].iter().all(|&x| x == 0),
        "A's rogue write reached the volume"
    );
    from_b.disconnect();
    let status = b.terminate();
    assert!(status.success(), "{status}:\n{}", b.log_text());
    rados.assert_clean(THIN, scratch.path());
}

#[test]
fn osd_restart_under_a_writing_client_loses_nothing() {
    if !CephCluster::binary_supports_rados() {
        return;
    }
    let Some(cluster) = CephCluster::shared() else {
        return;
    };
    // Alone on the cluster while its OSD is down: the other tests of this binary wait.
    let rados = cluster.pool_exclusive("failover-osd");
    let location = rados.create_thin_pool(THIN, "256M", &[], &[("vol", "16M")]);
    let scratch = tempfile::tempdir().expect("temp dir");
    let server = cluster.serve(&location, &[], &scratch.path().join("serve.log"));
    let seed = common::load::base_seed("osd-restart");
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let port = server.port;
        std::thread::spawn(move || {
            let mut client = Client::connect(port, "vol").expect("connect");
            let mut model = Model::new(seed, NR_PIECES);
            let mut rng = SmallRng::seed_from_u64(seed);
            let mut tally = Tally::default();
            // Bounded: the main thread stops it after the OSD is back; 5 minutes at most.
            let deadline = Instant::now() + Duration::from_secs(300);
            let mut longest = Duration::ZERO;
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                let first = rng.gen_range(0..NR_PIECES);
                let count = rng.gen_range(1..=16).min(NR_PIECES - first);
                let (versions, bytes) = model.begin_write(first, count, false);
                let sent = Instant::now();
                let errno = client
                    .write(first * PIECE as u64, &bytes, false)
                    .expect("the server dropped the connection");
                assert_eq!(errno, 0, "write failed while the OSD restarted");
                model.acked(first, &versions, false);
                tally.writes += 1;
                if rng.gen_ratio(1, 8) {
                    assert_eq!(client.flush().expect("flush"), 0, "flush failed");
                    model.flushed();
                    tally.flushes += 1;
                }
                longest = longest.max(sent.elapsed());
            }
            (client, model, tally, longest)
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    cluster.osd_stop();
    std::thread::sleep(Duration::from_secs(5));
    cluster.osd_start();
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::SeqCst);
    let (mut client, model, tally, longest) = writer.join().expect("writer");
    // Some request waited for the OSD: the test stopped it while requests flowed.
    assert!(
        longest >= Duration::from_secs(3),
        "no request waited for the OSD (longest {longest:?}, {tally:?})"
    );
    assert_eq!(client.flush().expect("flush"), 0);
    let mut buf = vec![0u8; REGION as usize];
    assert_eq!(client.read(0, &mut buf).expect("read"), 0);
    if let Err(why) = model.check_exact(0, &buf) {
        panic!("seed {seed}: {why}");
    }
    client.disconnect();
    server.stop();
    rados.assert_clean(THIN, scratch.path());
    println!("osd restart: {tally:?}, longest request {longest:?}");
}
