//! Fault injection. EIO on chosen data-device reads and writes fails only
//! that request, in the engine and through NBD: other requests, other blocks and other
//! volumes keep working and the pool stays writable. A metadata write failure turns the pool
//! read-only; the engine's status and the `thinnbd pool status` mode string say so (the latter
//! on the real server, whose metadata writes past a file-size limit fail with EFBIG).

mod common;

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::nbd_client::{Client, NBD_EIO};
use thinnbd::engine::{DataStore, DataTap, EngineConfig, FileStore, Pool, PoolMode};
use thinnbd::pdata::block_io::BlockIo;
use thinnbd::pdata::mem_block_io::MemBlockIo;
use thinnbd::ErrorKind;

const BS: u64 = 64 << 10;

/// Remembers the data block of the last write at each byte offset, so a test can aim a fault
/// at the block behind a virtual block it just wrote.
#[derive(Default)]
struct Recorder {
    last_block: Mutex<Option<u64>>,
}

impl DataTap for Recorder {
    fn before_change(&self, _data: &dyn DataStore, offset: u64, _len: u64) -> io::Result<()> {
        *self.last_block.lock().unwrap() = Some(offset / BS);
        Ok(())
    }
    fn before_sync(&self) -> io::Result<()> {
        Ok(())
    }
}

impl Recorder {
    fn take(&self) -> u64 {
        self.last_block
            .lock()
            .unwrap()
            .take()
            .expect("a data write")
    }
}

fn mem_pool(dir: &std::path::Path, mem: &MemBlockIo) -> Arc<Pool> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.join("data"))
        .unwrap();
    file.set_len(256 * BS).unwrap();
    Pool::create_from_parts(
        Arc::new(mem.clone()) as Arc<dyn BlockIo>,
        Arc::new(FileStore::new(file, true)),
        BS,
        256,
        EngineConfig::default(),
    )
    .unwrap()
}

#[test]
fn engine_eio_on_chosen_blocks_fails_only_those_requests() {
    let dir = common::pool::fast_tempdir();
    let pool = mem_pool(dir.path(), &MemBlockIo::new(1024));
    let rec = Arc::new(Recorder::default());
    pool.data_faults().set_tap(Some(rec.clone()));
    pool.create_thin(1).unwrap();
    pool.create_thin(2).unwrap();
    let a = pool.activate(1, 64 * BS, false).unwrap();
    let b = pool.activate(2, 64 * BS, false).unwrap();
    let mut blocks = HashMap::new();
    for (h, name, vb) in [(&a, "a", 0u64), (&a, "a", 1), (&b, "b", 0)] {
        h.write(vb * BS, &vec![vb as u8 + 1; BS as usize], false)
            .unwrap();
        blocks.insert((name, vb), rec.take());
    }
    a.flush().unwrap();
    let faults = pool.data_faults();
    let before = faults.injected();

    // A read fault on a's block 0 fails reads of it, and nothing else.
    faults.fail_reads_of(blocks[&("a", 0)]);
    let mut buf = vec![0u8; 4096];
    for _ in 0..3 {
        let e = a.read(100, &mut buf).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io, "{e}");
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    }
    a.read(BS, &mut buf).unwrap();
    assert_eq!(buf, vec![2u8; 4096]);
    b.read(0, &mut buf).unwrap();
    assert_eq!(buf, vec![1u8; 4096]);
    a.write(0, &[9u8; 512], false)
        .expect("a write to the block with a read fault still works");
    a.write(5 * BS, &[5u8; 4096], false)
        .expect("provisioning elsewhere still works");
    faults.clear();

    // A write fault on a's block 1: overwrites of it fail, the rest works.
    faults.fail_writes_of(blocks[&("a", 1)]);
    let e = a.write(BS + 4096, &[7u8; 4096], false).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    a.write(0, &[8u8; 4096], false).unwrap();
    b.write(BS, &[8u8; 4096], false).unwrap();
    a.flush()
        .expect("a flush after a failed data write succeeds");
    assert_eq!(
        pool.status().mode,
        PoolMode::Write,
        "data faults never fail-stop the pool"
    );
    faults.clear();
    a.read(BS, &mut buf).unwrap();
    assert_eq!(buf, vec![2u8; 4096], "the failed write changed nothing");
    assert!(faults.injected() >= before + 4);

    // A fault on the block a provisioning write would get: the write fails, maps nothing.
    let mapped = a.mapped_blocks().unwrap();
    faults.fail_all_writes(true);
    assert_eq!(
        a.write(20 * BS, &[1u8; 4096], false).unwrap_err().kind(),
        ErrorKind::Io
    );
    faults.clear();
    assert_eq!(a.mapped_blocks().unwrap(), mapped);
    a.write(20 * BS, &[1u8; 4096], true).unwrap();
    pool.teardown(a).unwrap();
    pool.teardown(b).unwrap();
    pool.shutdown().unwrap();
}

#[test]
fn engine_metadata_write_failure_turns_the_pool_read_only() {
    let dir = common::pool::fast_tempdir();
    let mem = MemBlockIo::new(1024);
    let pool = mem_pool(dir.path(), &mem);
    pool.create_thin(1).unwrap();
    let h = pool.activate(1, 64 * BS, false).unwrap();
    h.write(0, &[3u8; 8192], true).unwrap();
    assert_eq!(pool.status().mode, PoolMode::Write);
    mem.fail_writes(true);
    h.write(4 * BS, &[4u8; 4096], false).unwrap();
    let e = h.flush().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    let st = pool.status();
    assert_eq!(st.mode, PoolMode::ReadOnly);
    let why = st.read_only_reason.expect("a reason");
    assert!(why.contains("metadata"), "{why}");
    // Fail-stop: writes, discards and admin changes are refused even with the device healed;
    // reads of committed data keep working.
    mem.fail_writes(false);
    for r in [
        h.write(0, &[1u8; 10], false),
        h.discard(0, BS, false),
        pool.create_thin(7),
    ] {
        assert_eq!(r.unwrap_err().kind(), ErrorKind::ReadOnly);
    }
    let mut back = vec![0u8; 8192];
    h.read(0, &mut back).unwrap();
    assert_eq!(back, vec![3u8; 8192]);
    drop(h);
    drop(pool);
    // What was committed before the failure is what the metadata reopens to.
    let pool = Pool::from_parts(
        Arc::new(mem.crash()) as Arc<dyn BlockIo>,
        Arc::new(FileStore::new(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(dir.path().join("data"))
                .unwrap(),
            false,
        )),
        EngineConfig::default(),
    )
    .unwrap();
    let h = pool.activate(1, 64 * BS, false).unwrap();
    h.read(0, &mut back).unwrap();
    assert_eq!(back, vec![3u8; 8192]);
    assert_eq!(h.mapped_blocks().unwrap(), 1);
}

/// An in-process server over a real pool directory, with the pool at hand for faults.
struct InProcess {
    rt: tokio::runtime::Runtime,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    port: u16,
    volumes: Arc<thinnbd::volume::Volumes>,
}

impl InProcess {
    fn start(dir: &std::path::Path) -> InProcess {
        use thinnbd::volume::{CreateOptions, Volumes};
        let config = EngineConfig::default();
        let opts = CreateOptions {
            data: None,
            data_size: 64 << 20,
            block_size: BS,
            metadata_size: None,
            preallocate: false,
        };
        Volumes::create_pool(dir, &opts, config.clone()).unwrap();
        let volumes = Volumes::open(dir, config).unwrap();
        volumes.create_volume("a", 16 << 20).unwrap();
        volumes.create_volume("b", 16 << 20).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let tcp = rt
            .block_on(thinnbd::nbd::Listener::bind_tcp("127.0.0.1:0"))
            .unwrap();
        let port = tcp.port().unwrap();
        let source: Arc<dyn thinnbd::nbd::ExportSource> = Arc::new(
            thinnbd::service::exports::VolumeExports::new(volumes.clone(), None),
        );
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = rt.spawn(thinnbd::nbd::serve(
            vec![tcp],
            source,
            thinnbd::nbd::ServerConfig::default(),
            async {
                let _ = rx.await;
            },
        ));
        InProcess {
            rt,
            stop: Some(tx),
            task: Some(task),
            port,
            volumes,
        }
    }

    fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            self.rt
                .block_on(async { tokio::time::timeout(Duration::from_secs(60), t).await })
                .expect("server stops within 60 s")
                .expect("server task");
        }
    }
}

#[test]
fn nbd_eio_reaches_the_client_for_that_request_only() {
    let dir = common::pool::fast_tempdir();
    let mut srv = InProcess::start(&dir.path().join("pool"));
    let faults = srv.volumes.pool().data_faults();
    let rec = Arc::new(Recorder::default());
    faults.set_tap(Some(rec.clone()));
    let mut a = Client::connect(srv.port, "a").unwrap();
    let mut b = Client::connect(srv.port, "b").unwrap();
    let block = vec![0x11u8; BS as usize];
    assert_eq!(a.write(0, &block, false).unwrap(), 0);
    let a0 = rec.take();
    assert_eq!(a.write(BS, &block, false).unwrap(), 0);
    assert_eq!(b.write(0, &block, false).unwrap(), 0);
    assert_eq!(a.flush().unwrap(), 0);

    faults.fail_reads_of(a0);
    let mut buf = vec![0u8; 4096];
    // Pipelined: the failing read sits between good ones on the same connection.
    let c1 = a
        .send(common::nbd_client::Command::Read, 0, BS, 4096, &[])
        .unwrap();
    let c2 = a
        .send(common::nbd_client::Command::Read, 0, 0, 4096, &[])
        .unwrap();
    let c3 = a
        .send(common::nbd_client::Command::Read, 0, BS + 4096, 4096, &[])
        .unwrap();
    let mut errs = HashMap::new();
    for _ in 0..3 {
        // A failed read carries no payload; a good one carries 4096 bytes. Read the header
        // first by asking for no data, then the payload for the good ones.
        let (err, cookie) = a.reply(&mut []).unwrap();
        if err == 0 {
            let mut data = vec![0u8; 4096];
            a.s.read_exact(&mut data).unwrap();
            assert_eq!(data, vec![0x11u8; 4096]);
        }
        errs.insert(cookie, err);
    }
    assert_eq!(errs[&c1], 0);
    assert_eq!(errs[&c2], NBD_EIO, "the read of the faulty block gets EIO");
    assert_eq!(errs[&c3], 0);
    assert_eq!(
        b.read(0, &mut buf).unwrap(),
        0,
        "another volume is unaffected"
    );
    assert_eq!(
        a.write(2 * BS, &block, true).unwrap(),
        0,
        "writes elsewhere work"
    );
    faults.clear();
    faults.fail_all_writes(true);
    assert_eq!(a.write(BS, &block[..4096], false).unwrap(), NBD_EIO);
    faults.clear();
    assert_eq!(a.read(0, &mut buf).unwrap(), 0, "the connection survived");
    assert_eq!(a.flush().unwrap(), 0);
    let st = srv.volumes.status();
    assert_eq!(st.mode, "write");
    a.disconnect();
    b.disconnect();
    srv.stop();
    srv.volumes.shutdown().unwrap();
    common::assert_metadata_clean(&dir.path().join("pool/metadata"));
}

/// The real server with RLIMIT_FSIZE at 64 KiB: data block 0 can be written, but metadata
/// blocks past the 16th cannot; creating volumes (one new btree root each) soon needs one.
#[test]
fn real_server_metadata_write_failure_shows_read_only_in_pool_status() {
    use common::server::{cli, make_pool, pool_status, Server};
    if !common::require_tool("thin_check") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let p = pool.to_str().unwrap();
    make_pool(&pool, "64M", &[("vol", "16M")]);
    let used = pool_status(&pool)["metadata_used_blocks"].as_u64().unwrap();
    assert!(
        used < 16,
        "the test needs a pool whose metadata fits in 16 blocks ({used})"
    );
    let log = dir.path().join("log");
    let mut server = Server::start_limited(&pool, None, &log, Some(BS));
    let mut c = Client::connect(server.port, "vol").unwrap();
    let block = vec![0x5au8; BS as usize];
    assert_eq!(c.write(0, &block, false).unwrap(), 0);
    let mut failed = c.flush().unwrap() != 0;
    let mut created = 0;
    while !failed && created < 200 {
        let out = cli(&[
            "volume",
            "create",
            "--pool",
            p,
            &format!("v{created}"),
            "--size",
            "1M",
        ]);
        assert_ne!(out.status.code(), Some(101), "the CLI panicked");
        failed = !out.status.success();
        created += 1;
    }
    assert!(failed, "no metadata write failed: {}", server.log_text());
    let st = pool_status(&pool);
    let mode = st["mode"].as_str().unwrap().to_owned();
    assert!(mode.starts_with("read-only ("), "pool status mode: {mode}");
    assert!(
        mode.contains("metadata"),
        "the reason names the metadata: {mode}"
    );
    let text = String::from_utf8_lossy(&cli(&["pool", "status", p]).stdout).into_owned();
    assert!(text.contains("mode:      read-only"), "{text}");
    assert_ne!(
        c.write(4096, &block[..4096], false).unwrap(),
        0,
        "writes are refused"
    );
    let mut buf = vec![0u8; 4096];
    assert_eq!(c.read(0, &mut buf).unwrap(), 0, "reads keep working");
    assert_eq!(buf, block[..4096]);
    c.disconnect();
    let st = server.terminate();
    assert_ne!(
        st.code(),
        Some(101),
        "the server panicked: {}",
        server.log_text()
    );
    // Without the limit the pool opens at its last commit, clean, and writable.
    common::assert_metadata_clean(&pool.join("metadata"));
    let mut server = Server::start_on_pool(&pool, None, &log);
    assert_eq!(pool_status(&pool)["mode"], "write");
    let mut c = Client::connect(server.port, "vol").unwrap();
    assert_eq!(c.write(4096, &block[..4096], true).unwrap(), 0);
    c.disconnect();
    assert!(server.terminate().success());
    println!("metadata failure: mode after the failure: {mode}");
}
