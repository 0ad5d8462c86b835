//! Crash test with the real server: two clients, each on its own 16 MiB
//! region, write random patterns with periodic flushes, trims and FUA writes while the server
//! is killed with SIGKILL at random moments: by a timer, or right after the first client sent
//! a flush (so the kill often lands inside a commit). After each kill the metadata must pass
//! thin_check and verify_meta.py, the server must start again without repair, every write
//! acknowledged before the last completed flush must read back, and every other 4 KiB piece
//! must hold its flushed version or a later write.
//!
//! THINNBD_CRASH_CYCLES (default 50) sets the number of kills; THINNBD_SEED replays a run.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::model::{Model, PIECE};
use common::nbd_client::Client;
use common::server::{make_pool, Server};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// The part of the volume the writer uses (the whole of it is read back after each crash).
const REGION: u64 = 16 << 20;
const NR_PIECES: u64 = REGION / PIECE as u64;

#[derive(Default, Debug)]
struct Tally {
    writes_acked: u64,
    trims_acked: u64,
    flushes_acked: u64,
    kills_after_flush: u64,
    kills_by_timer: u64,
    in_flight_at_kill: u64,
}

fn send_kill(pid: u32) {
    // SAFETY: kill(2) on the server child, which the test reaps only after this thread ends.
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
}

/// Random requests until the connection breaks (the kill) or the op budget runs out. With
/// `kill_at_flush = Some(n)`, the n-th flush is sent and the server killed at once.
#[allow(clippy::too_many_arguments)]
fn writer(
    client: &mut Client,
    base: u64,
    model: &mut Model,
    rng: &mut SmallRng,
    kill_at_flush: Option<u32>,
    pid: u32,
    tally: &mut Tally,
    killed: &AtomicBool,
) {
    let mut flushes = 0u32;
    let deadline = Instant::now() + Duration::from_secs(20);
    for _ in 0..5_000 {
        if Instant::now() > deadline {
            break;
        }
        let first = rng.gen_range(0..NR_PIECES);
        let count = rng.gen_range(1..=32).min(NR_PIECES - first);
        let off = base + first * PIECE as u64;
        let roll = rng.gen_range(0..100);
        if roll < 75 {
            let fua = rng.gen_bool(0.05);
            let (versions, bytes) = model.begin_write(first, count, false);
            match client.write(off, &bytes, fua) {
                Ok(0) => {
                    model.acked(first, &versions, fua);
                    tally.writes_acked += 1;
                }
                Ok(e) => panic!("write at {off} failed with errno {e}"),
                Err(_) => {
                    tally.in_flight_at_kill += 1;
                    return;
                }
            }
        } else if roll < 85 {
            let (versions, _) = model.begin_write(first, count, true);
            match client.trim(off, (count as usize * PIECE) as u32) {
                Ok(0) => {
                    model.acked(first, &versions, false);
                    tally.trims_acked += 1;
                }
                Ok(e) => panic!("trim at {off} failed with errno {e}"),
                Err(_) => {
                    tally.in_flight_at_kill += 1;
                    return;
                }
            }
        } else {
            flushes += 1;
            if kill_at_flush == Some(flushes) {
                let _ = client.send(common::nbd_client::Command::Flush, 0, 0, 0, &[]);
                if rng.gen_bool(0.5) {
                    std::thread::sleep(Duration::from_micros(rng.gen_range(0..3_000)));
                }
                // The timer may have killed the server first; count the kill once.
                if !killed.swap(true, Ordering::SeqCst) {
                    send_kill(pid);
                    tally.kills_after_flush += 1;
                }
                return;
            }
            match client.flush() {
                Ok(0) => {
                    model.flushed();
                    tally.flushes_acked += 1;
                }
                Ok(e) => panic!("flush failed with errno {e}"),
                Err(_) => return,
            }
        }
    }
}

/// Reads the region back and checks it against the model; then the state found is the base.
fn verify(port: u16, base: u64, model: &mut Model, cycle: u64, seed: u64) {
    let mut c = Client::connect(port, "vol").expect("connect after restart");
    if let Err(why) = model.verify_region_after_crash(&mut c, base) {
        panic!("seed {seed}, after kill {cycle}: {why}");
    }
    c.disconnect();
}

#[test]
fn sigkill_at_random_moments_loses_nothing_flushed() {
    let cycles = common::load::env_count("THINNBD_CRASH_CYCLES", 50);
    let seed = common::load::base_seed("crash");
    let dir = tempfile::tempdir().expect("temp dir");
    let pool = dir.path().join("pool");
    make_pool(&pool, "256M", &[("vol", "64M")]);
    let log = dir.path().join("server.log");
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut model = Model::new(seed, NR_PIECES);
    // A second connection writes its own region at the same time, so kills also land with
    // several requests in flight from different clients.
    let mut model2 = Model::new(seed ^ 0xb0b, NR_PIECES);
    let mut tally = Tally::default();
    let mut tally2 = Tally::default();
    for cycle in 0..cycles {
        let mut server = Server::start_on_pool(&pool, None, &log);
        if cycle > 0 {
            verify(server.port, 0, &mut model, cycle, seed);
            verify(server.port, REGION, &mut model2, cycle, seed);
        }
        let pid = server.pid();
        let killed = Arc::new(AtomicBool::new(false));
        let kill_at_flush = if rng.gen_bool(0.4) {
            Some(rng.gen_range(1..=4))
        } else {
            None
        };
        let mut client = Client::connect(server.port, "vol").expect("connect");
        let second = {
            let mut c = Client::connect(server.port, "vol").expect("connect");
            let killed = killed.clone();
            let mut m = std::mem::replace(&mut model2, Model::new(0, 0));
            let mut t = std::mem::take(&mut tally2);
            let mut r = SmallRng::seed_from_u64(rng.gen());
            std::thread::spawn(move || {
                writer(&mut c, REGION, &mut m, &mut r, None, pid, &mut t, &killed);
                (m, t)
            })
        };
        // The timer kill: a random moment within the first ~0.8 s of writing.
        let delay = Duration::from_millis(rng.gen_range(5..800));
        let timer = {
            let killed = killed.clone();
            std::thread::spawn(move || {
                let start = Instant::now();
                while start.elapsed() < delay {
                    if killed.load(Ordering::SeqCst) {
                        return false;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                if killed.swap(true, Ordering::SeqCst) {
                    return false;
                }
                send_kill(pid);
                true
            })
        };
        writer(
            &mut client,
            0,
            &mut model,
            &mut rng,
            kill_at_flush,
            pid,
            &mut tally,
            &killed,
        );
        if timer.join().expect("timer thread") {
            tally.kills_by_timer += 1;
        }
        // If the writer ran out of work before either kill, kill now.
        send_kill(pid);
        (model2, tally2) = second.join().expect("second writer");
        server.kill();
        drop(client);
        common::assert_metadata_clean(&pool.join("metadata"));
    }
    // Last start: the server comes up, the data checks, and a graceful stop is clean.
    let mut server = Server::start_on_pool(&pool, None, &log);
    verify(server.port, 0, &mut model, cycles, seed);
    verify(server.port, REGION, &mut model2, cycles, seed);
    let st = server.terminate();
    assert!(
        st.success(),
        "graceful stop failed: {st}\n{}",
        server.log_text()
    );
    common::assert_metadata_clean(&pool.join("metadata"));
    println!(
        "crash: {cycles} SIGKILLs survived ({} right after a flush was sent, {} by timer, \
         {} requests in flight at a kill); {} writes, {} trims, {} flushes acknowledged; \
         bytes lost = 0",
        tally.kills_after_flush,
        tally.kills_by_timer,
        tally.in_flight_at_kill + tally2.in_flight_at_kill,
        tally.writes_acked + tally2.writes_acked,
        tally.trims_acked + tally2.trims_acked,
        tally.flushes_acked + tally2.flushes_acked
    );
}
