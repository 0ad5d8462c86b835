//! The NBD server driven byte by byte: option negotiation, simple and structured replies,
//! error replies, pipelining, and graceful shutdown with requests in flight.

mod common;

use std::io::Read;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use common::memory_server::*;
use common::nbd_client::{Client, Reply};
use common::pattern::pattern;
use thinnbd::error::Result;
use thinnbd::nbd::codec::*;
use thinnbd::nbd::memory::MemoryExport;
use thinnbd::nbd::{ExportBackend, ExportInfo, ExportSource, Extent, PeerIdentity, ServerConfig};

const EPERM: u32 = 1;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const ENOTSUP: u32 = 95;

#[test]
fn list_info_and_option_errors() {
    let server = TestServer::start(standard_source());
    let mut c = Client::connect_tcp(server.port);
    assert_eq!(c.handshake_flags, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);

    let list = c.option(&OptionRequest::List);
    let mut servers: Vec<(String, String)> = list
        .iter()
        .filter_map(|r| match &r.kind {
            OptionReplyKind::Server { name, description } => {
                Some((name.clone(), description.clone()))
            }
            _ => None,
        })
        .collect();
    servers.sort();
    assert_eq!(
        servers,
        vec![
            ("disk".into(), "the main test disk".into()),
            ("ro".into(), "a read-only disk".into()),
            ("small".into(), "a small disk".into()),
        ]
    );
    assert_eq!(list.last().unwrap().kind, OptionReplyKind::Ack);

    let info = c.option(&OptionRequest::Info {
        go: false,
        name: "ro".into(),
        requests: vec![INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE],
    });
    let kinds: Vec<_> = info.iter().map(|r| r.kind.clone()).collect();
    let flags = kinds
        .iter()
        .find_map(|k| match k {
            OptionReplyKind::Info(InfoReply::Export { size, flags }) => {
                assert_eq!(*size, 1 << 20);
                Some(*flags)
            }
            _ => None,
        })
        .expect("NBD_INFO_EXPORT");
    assert_ne!(flags & TFLAG_READ_ONLY, 0);
    for bit in [
        TFLAG_HAS_FLAGS,
        TFLAG_SEND_FLUSH,
        TFLAG_SEND_FUA,
        TFLAG_SEND_TRIM,
    ] {
        assert_ne!(flags & bit, 0, "flag {bit:#x}");
    }
    for bit in [
        TFLAG_SEND_WRITE_ZEROES,
        TFLAG_SEND_FAST_ZERO,
        TFLAG_CAN_MULTI_CONN,
        TFLAG_SEND_CACHE,
    ] {
        assert_ne!(flags & bit, 0, "flag {bit:#x}");
    }
    assert!(kinds.contains(&OptionReplyKind::Info(InfoReply::Name("ro".into()))));
    assert!(
        kinds.contains(&OptionReplyKind::Info(InfoReply::Description(
            "a read-only disk".into()
        )))
    );
    assert!(kinds.contains(&OptionReplyKind::Info(InfoReply::BlockSize {
        minimum: 1,
        preferred: 4096,
        maximum: 64 << 20
    })));
    assert_eq!(kinds.last(), Some(&OptionReplyKind::Ack));

    // Unknown export: an error reply, not a hang-up.
    let r = c.option(&OptionRequest::Info {
        go: true,
        name: "nope".into(),
        requests: vec![],
    });
    assert!(
        matches!(
            r[0].kind,
            OptionReplyKind::Error {
                code: REP_ERR_UNKNOWN,
                ..
            }
        ),
        "{r:?}"
    );
    // Unknown option.
    let r = c.option(&OptionRequest::Unknown {
        option: 0xabcd,
        data: vec![1, 2, 3],
    });
    assert!(
        matches!(
            r[0].kind,
            OptionReplyKind::Error {
                code: REP_ERR_UNSUP,
                ..
            }
        ),
        "{r:?}"
    );
    // STARTTLS is not offered.
    let r = c.option(&OptionRequest::Unknown {
        option: OPT_STARTTLS,
        data: vec![],
    });
    assert!(
        matches!(
            r[0].kind,
            OptionReplyKind::Error {
                code: REP_ERR_UNSUP,
                ..
            }
        ),
        "{r:?}"
    );
    // Malformed GO data.
    let r = c.option(&OptionRequest::Unknown {
        option: OPT_GO,
        data: vec![0, 0, 0, 9, b'x'],
    });
    assert!(
        matches!(
            r[0].kind,
            OptionReplyKind::Error {
                code: REP_ERR_INVALID,
                ..
            }
        ),
        "{r:?}"
    );
    // SET_META_CONTEXT needs structured replies first; LIST does not.
    let set = OptionRequest::MetaContext {
        set: true,
        export: "disk".into(),
        queries: vec![META_BASE_ALLOCATION.into()],
    };
    let r = c.option(&set);
    assert!(
        matches!(
            r[0].kind,
            OptionReplyKind::Error {
                code: REP_ERR_INVALID,
                ..
            }
        ),
        "{r:?}"
    );
    let r = c.option(&OptionRequest::MetaContext {
        set: false,
        export: "disk".into(),
        queries: vec![],
    });
    assert_eq!(
        r[0].kind,
        OptionReplyKind::MetaContext {
            id: 1,
            name: META_BASE_ALLOCATION.into()
        }
    );
    let r = c.option(&OptionRequest::MetaContext {
        set: false,
        export: "disk".into(),
        queries: vec!["qemu:dirty-bitmap:x".into()],
    });
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].kind, OptionReplyKind::Ack);

    // Still usable after all that: the default export via "".
    let (size, _) = c.go("", true);
    assert_eq!(size, 64 << 20);
    c.request(Command::Disc, 0, 0, 0, 0);
    assert!(server.is_running());
}

#[test]
fn export_name_option() {
    let server = TestServer::start(standard_source());
    // Unknown name: the only possible answer is closing the connection.
    let mut c = Client::connect_tcp(server.port);
    c.s.write_all(&OptionRequest::ExportName("nope".into()).encode())
        .unwrap();
    let mut b = [0u8; 1];
    assert_eq!(c.s.read(&mut b).unwrap_or(0), 0);

    let mut c = Client::connect_unix(&server.socket);
    let (size, flags) = c.export_name("small");
    assert_eq!(size, 1 << 20);
    assert_ne!(flags & TFLAG_HAS_FLAGS, 0);
    assert_eq!(flags & TFLAG_READ_ONLY, 0);
    c.request_write(1, 0, &[7u8; 512]);
    assert_eq!(c.simple_reply(), (0, 1));
    c.request(Command::Read, 0, 2, 0, 512);
    match c.any_reply(512) {
        Reply::Simple {
            error: 0,
            cookie: 2,
            data,
        } => assert_eq!(data, vec![7u8; 512]),
        other => panic!("{other:?}"),
    }
}

use std::io::Write;

#[test]
fn simple_replies_and_error_replies_keep_the_connection() {
    let server = TestServer::start(standard_source());
    let mut c = Client::connect_tcp(server.port);
    let (size, _) = c.go("small", false);
    let data = pattern(1, 12_345);
    c.request_write(10, 777, &data);
    assert_eq!(c.simple_reply(), (0, 10));
    c.request(Command::Read, 0, 11, 777, data.len() as u32);
    match c.any_reply(data.len()) {
        Reply::Simple {
            error: 0,
            cookie: 11,
            data: back,
        } => assert_eq!(back, data),
        other => panic!("{other:?}"),
    }
    // Past the end, straddling the end, offset overflow, zero length: EINVAL (writes and
    // write-zeroes past the end get ENOSPC: see below).
    let bad = [
        (Command::Read, size, 1),
        (Command::Read, size - 100, 200),
        (Command::Write, u64::MAX - 10, 0),
        (Command::Trim, size - 1, 2),
        (Command::Cache, size + 4096, 1),
        (Command::Read, 0, 0),
        (Command::Trim, 0, 0),
        (Command::Other(99), 0, 0),
        // BLOCK_STATUS without a negotiated metadata context.
        (Command::BlockStatus, 0, 4096),
        // Reads above the advertised maximum.
        (Command::Read, 0, (64 << 20) + 1),
    ];
    for (i, (cmd, off, len)) in bad.into_iter().enumerate() {
        let cookie = 100 + i as u64;
        if cmd == Command::Write {
            c.request_write(cookie, off, &[]);
        } else {
            c.request(cmd, 0, cookie, off, len);
        }
        assert_eq!(c.simple_reply(), (EINVAL, cookie), "{cmd:?} {off} {len}");
    }
    // A write whose range is invalid still has its payload consumed.
    c.request_write(200, size - 10, &[1u8; 20]);
    assert_eq!(c.simple_reply(), (ENOSPC, 200));
    c.request(Command::Flush, 0, 201, 0, 0);
    assert_eq!(c.simple_reply(), (0, 201));
    c.request(Command::Read, 0, 202, 777, 16);
    match c.any_reply(16) {
        Reply::Simple {
            error: 0,
            data: back,
            ..
        } => assert_eq!(back, &data[..16]),
        other => panic!("{other:?}"),
    }

    // Writes of every kind to a read-only export: EPERM; reads work.
    let mut c = Client::connect_tcp(server.port);
    c.go("ro", false);
    c.request_write(1, 0, &[1u8; 512]);
    assert_eq!(c.simple_reply(), (EPERM, 1));
    c.request(Command::Trim, 0, 2, 0, 4096);
    assert_eq!(c.simple_reply(), (EPERM, 2));
    c.request(Command::WriteZeroes, 0, 3, 0, 4096);
    assert_eq!(c.simple_reply(), (EPERM, 3));
    c.request(Command::Read, 0, 4, 0, 4096);
    assert_eq!(c.any_reply(4096).error(), 0);
}

#[test]
fn writes_past_the_end_get_enospc_reads_and_trims_einval() {
    let server = TestServer::start(standard_source());
    for structured in [false, true] {
        let mut c = Client::connect_unix(&server.socket);
        let (size, _) = c.go("small", structured);
        // Straddling the end, at the end, and an offset whose end overflows.
        let cases = [
            (Command::Write, size - 512, 1024, ENOSPC),
            (Command::Write, size, 512, ENOSPC),
            (Command::Write, u64::MAX - 511, 512, ENOSPC),
            (Command::WriteZeroes, size - 512, 1024, ENOSPC),
            (Command::WriteZeroes, size, 4096, ENOSPC),
            (Command::WriteZeroes, u64::MAX - 511, 512, ENOSPC),
            (Command::Read, size - 512, 1024, EINVAL),
            (Command::Read, size, 512, EINVAL),
            (Command::Trim, size - 512, 1024, EINVAL),
            (Command::Trim, u64::MAX - 511, 512, EINVAL),
        ];
        for (i, (cmd, off, len, want)) in cases.into_iter().enumerate() {
            let cookie = i as u64;
            if cmd == Command::Write {
                c.request_write(cookie, off, &vec![9u8; len as usize]);
            } else {
                c.request(cmd, 0, cookie, off, len);
            }
            let r = c.any_reply(0);
            assert_eq!(
                (r.cookie(), r.error()),
                (cookie, want),
                "structured={structured} {cmd:?} at {off} of {len}"
            );
        }
        // Nothing was written, and the connection goes on.
        c.request(Command::Read, 0, 99, size - 4096, 4096);
        let r = c.any_reply(4096);
        assert_eq!(r.error(), 0);
        assert_eq!(r.read_data(size - 4096, 4096), vec![0u8; 4096]);
    }
}

#[test]
fn requests_of_48_mib_are_served_on_the_default_config() {
    // As nbd-tester-client's `integrityhuge`: a client that opens with EXPORT_NAME never
    // hears the maximum and sends what nbd-server and nbdkit take.
    let server = TestServer::start(standard_source());
    let mut c = Client::connect_tcp(server.port);
    let (size, _) = c.export_name("disk");
    let len = 48 << 20;
    assert!(size >= 4096 + len as u64);
    let data = pattern(48, len);
    c.request_write(1, 4096, &data);
    assert_eq!(c.simple_reply(), (0, 1));
    c.request(Command::Read, 0, 2, 4096, len as u32);
    match c.any_reply(len) {
        Reply::Simple {
            error: 0,
            cookie: 2,
            data: back,
        } => assert!(back == data, "48 MiB read back differs"),
        Reply::Simple { error, cookie, .. } => panic!("read {cookie}: error {error}"),
        Reply::Structured { cookie, .. } => panic!("structured reply {cookie}"),
    }
}

#[test]
fn a_write_over_the_maximum_is_drained_and_refused_and_the_connection_goes_on() {
    let max = 1 << 20;
    let config = ServerConfig {
        max_request_bytes: max,
        ..ServerConfig::default()
    };
    let server = TestServer::start_with(standard_source(), config);
    // The payload is made of request headers (disconnects): a server that read any of it as
    // requests would hang up.
    let disc = Request {
        flags: 0,
        command: Command::Disc,
        cookie: 0,
        offset: 0,
        length: 0,
    }
    .encode();
    let oversized: Vec<u8> = disc
        .iter()
        .copied()
        .cycle()
        .take(max as usize + 4096)
        .collect();
    for structured in [false, true] {
        // Each round on a fresh region of the export.
        let base = if structured { 8 << 20 } else { 0 };
        let mut c = Client::connect_tcp(server.port);
        c.go("disk", structured);
        let next = pattern(2, 4096);
        // Sent back to back: the next request follows the oversized payload at once.
        c.request(Command::Write, 0, 1, base, oversized.len() as u32);
        c.s.write_all(&oversized).unwrap();
        c.request_write(2, base + 4096, &next);
        let mut got = [c.any_reply(0), c.any_reply(0)].map(|r| (r.cookie(), r.error()));
        got.sort_unstable();
        assert_eq!(got, [(1, EINVAL), (2, 0)], "structured={structured}");
        // The refused write wrote nothing; the one after it landed.
        c.request(Command::Read, 0, 3, base, 8192);
        let r = c.any_reply(8192);
        assert_eq!(r.error(), 0);
        let back = r.read_data(base, 8192);
        assert_eq!(back[..4096], [0u8; 4096]);
        assert_eq!(back[4096..], next[..]);
        // A write of exactly the maximum is taken.
        c.request_write(4, base, &vec![7u8; max as usize]);
        assert_eq!(c.any_reply(0).error(), 0);
        c.request(Command::Disc, 0, 5, 0, 0);
    }
    assert!(server.is_running());
}

#[test]
fn structured_reads_and_block_status() {
    let server = TestServer::start(standard_source());
    let mut c = Client::connect_tcp(server.port);
    let (_, flags) = c.go("disk", true);
    assert_ne!(flags & TFLAG_SEND_DF, 0);
    let data = pattern(2, 8192);
    c.request_write(1, 65536, &data);
    assert_eq!(c.simple_reply(), (0, 1));

    // [0, 64K) hole, [64K, 72K) data, [72K, 128K) hole.
    c.request(Command::Read, 0, 2, 0, 128 << 10);
    let reply = c.any_reply(0);
    let Reply::Structured { cookie: 2, chunks } = &reply else {
        panic!("{reply:?}")
    };
    let shape: Vec<_> = chunks
        .iter()
        .map(|(_, ch)| match ch {
            Chunk::OffsetHole { offset, length } => ("hole", *offset, *length as usize),
            Chunk::OffsetData { offset, data } => ("data", *offset, data.len()),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        shape,
        vec![
            ("hole", 0, 65536),
            ("data", 65536, 8192),
            ("hole", 73728, 57344)
        ]
    );
    let all = reply.read_data(0, 128 << 10);
    assert_eq!(&all[65536..73728], &data[..]);

    // DF: one data chunk.
    c.request(Command::Read, CMD_FLAG_DF, 3, 60000, 10000);
    let reply = c.any_reply(0);
    let Reply::Structured { chunks, .. } = &reply else {
        panic!("{reply:?}")
    };
    assert_eq!(chunks.len(), 1);
    assert_eq!(
        &reply.read_data(60000, 10000)[5536..],
        &data[..10000 - 5536]
    );

    // Block status, also with REQ_ONE.
    c.request(Command::BlockStatus, 0, 4, 0, 128 << 10);
    let expect = vec![
        BlockDescriptor {
            length: 65536,
            flags: STATE_HOLE | STATE_ZERO,
        },
        BlockDescriptor {
            length: 8192,
            flags: 0,
        },
        BlockDescriptor {
            length: 57344,
            flags: STATE_HOLE | STATE_ZERO,
        },
    ];
    match c.any_reply(0) {
        Reply::Structured { cookie: 4, chunks } => assert_eq!(
            chunks[0].1,
            Chunk::BlockStatus {
                context_id: 1,
                descriptors: expect.clone()
            }
        ),
        other => panic!("{other:?}"),
    }
    c.request(Command::BlockStatus, CMD_FLAG_REQ_ONE, 5, 0, 128 << 10);
    match c.any_reply(0) {
        Reply::Structured { chunks, .. } => assert_eq!(
            chunks[0].1,
            Chunk::BlockStatus {
                context_id: 1,
                descriptors: expect[..1].to_vec()
            }
        ),
        other => panic!("{other:?}"),
    }

    // Trim the data: everything is a hole again; NO_HOLE zeroing allocates.
    c.request(Command::Trim, 0, 6, 65536, 8192);
    assert_eq!(c.simple_reply(), (0, 6));
    assert_eq!(server.export("disk").allocated_pages(), 0);
    c.request(
        Command::WriteZeroes,
        CMD_FLAG_NO_HOLE | CMD_FLAG_FUA,
        7,
        0,
        8192,
    );
    assert_eq!(c.simple_reply(), (0, 7));
    assert_eq!(server.export("disk").allocated_pages(), 2);
    c.request(Command::BlockStatus, 0, 8, 0, 16384);
    match c.any_reply(0) {
        Reply::Structured { chunks, .. } => assert_eq!(
            chunks[0].1,
            Chunk::BlockStatus {
                context_id: 1,
                descriptors: vec![
                    BlockDescriptor {
                        length: 8192,
                        flags: 0
                    },
                    BlockDescriptor {
                        length: 8192,
                        flags: STATE_HOLE | STATE_ZERO
                    },
                ]
            }
        ),
        other => panic!("{other:?}"),
    }
    // Structured read errors are error chunks.
    c.request(Command::Read, 0, 9, 64 << 20, 1);
    let r = c.any_reply(0);
    assert!(matches!(r, Reply::Structured { cookie: 9, .. }), "{r:?}");
    assert_eq!(r.error(), EINVAL);
}

#[test]
fn fast_zero_that_would_be_slow_is_enotsup() {
    let source = standard_source();
    source.add("slowzero", "", MemoryExport::new(1 << 20).fast_zero(false));
    let server = TestServer::start(source);
    let mut c = Client::connect_tcp(server.port);
    c.go("slowzero", false);
    c.request(Command::WriteZeroes, CMD_FLAG_FAST_ZERO, 1, 0, 4096);
    assert_eq!(c.simple_reply(), (ENOTSUP, 1));
    c.request(Command::WriteZeroes, 0, 2, 0, 4096);
    assert_eq!(c.simple_reply(), (0, 2));
}

#[test]
fn many_pipelined_requests_all_get_exactly_one_reply() {
    pipelined_requests_from_two_clients_at_once(ServerConfig::default());
}

#[test]
fn connections_on_the_shared_worker_threads_serve_the_same() {
    pipelined_requests_from_two_clients_at_once(ServerConfig {
        thread_per_connection: false,
        ..ServerConfig::default()
    });
}

fn pipelined_requests_from_two_clients_at_once(config: ServerConfig) {
    let server = TestServer::start_with(standard_source(), config);
    std::thread::scope(|s| {
        // Disjoint ranges: the second client's region starts past the first one's.
        for base in [0, 32 << 20] {
            let socket = &server.socket;
            s.spawn(move || pipelined_requests(socket, base));
        }
    });
}

fn pipelined_requests(socket: &std::path::Path, base: u64) {
    let mut c = Client::connect_unix(socket);
    c.go("disk", true);
    const N: u64 = 300;
    // Everything is sent before any reply is read.
    for i in 0..N {
        c.request_write(i, base + i * 70_000, &pattern(i, 5000 + i as usize));
    }
    let mut seen = vec![false; N as usize];
    for _ in 0..N {
        let r = c.any_reply(0);
        assert_eq!(r.error(), 0);
        assert!(
            !std::mem::replace(&mut seen[r.cookie() as usize], true),
            "duplicate reply"
        );
    }
    for i in 0..N {
        c.request(
            Command::Read,
            0,
            1000 + i,
            base + i * 70_000,
            5000 + i as u32,
        );
    }
    let mut got = 0;
    for _ in 0..N {
        let r = c.any_reply(0);
        let i = r.cookie() - 1000;
        assert_eq!(
            r.read_data(base + i * 70_000, 5000 + i as usize),
            pattern(i, 5000 + i as usize)
        );
        got += 1;
    }
    assert_eq!(got, N);
}

/// An export whose writes wait at a gate, to hold requests in flight on purpose.
struct Gated {
    inner: MemoryExport,
    entered: AtomicUsize,
    open: Mutex<bool>,
    cv: Condvar,
}

impl Gated {
    fn open_gate(&self) {
        *self.open.lock().unwrap() = true;
        self.cv.notify_all();
    }
}

impl ExportBackend for Gated {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn preferred_block_size(&self) -> u32 {
        4096
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.inner.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.entered.fetch_add(1, Ordering::SeqCst);
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.cv.wait(open).unwrap();
        }
        drop(open);
        self.inner.write(offset, data, fua)
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.inner.trim(offset, len, fua)
    }
    fn write_zeroes(&self, o: u64, l: u64, u: bool, f: bool, fua: bool) -> Result<()> {
        self.inner.write_zeroes(o, l, u, f, fua)
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.inner.block_status(offset, len)
    }
    fn cache(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.cache(offset, len)
    }
}

struct GatedSource(Arc<Gated>);

impl ExportSource for GatedSource {
    fn list(&self, _peer: &PeerIdentity) -> Vec<ExportInfo> {
        vec![ExportInfo {
            name: "gated".into(),
            description: String::new(),
        }]
    }
    fn default_export(&self, _peer: &PeerIdentity) -> Option<String> {
        Some("gated".into())
    }
    fn open(&self, _name: &str, _peer: &PeerIdentity) -> Result<Arc<dyn ExportBackend>> {
        Ok(self.0.clone())
    }
}

#[test]
fn shutdown_lets_in_flight_requests_finish_and_reply() {
    let gated = Arc::new(Gated {
        inner: MemoryExport::new(1 << 20),
        entered: AtomicUsize::new(0),
        open: Mutex::new(false),
        cv: Condvar::new(),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(thinnbd::nbd::Listener::bind_tcp("127.0.0.1:0"))
        .unwrap();
    let port = listener.port().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let source: Arc<dyn ExportSource> = Arc::new(GatedSource(gated.clone()));
    let server = rt.spawn(thinnbd::nbd::serve(
        vec![listener],
        source,
        thinnbd::nbd::ServerConfig::default(),
        async {
            let _ = stop_rx.await;
        },
    ));

    let mut c = Client::connect_tcp(port);
    c.go("gated", false);
    const N: usize = 8;
    for i in 0..N {
        c.request_write(i as u64, (i * 4096) as u64, &[i as u8 + 1; 4096]);
    }
    // Wait (bounded) until every write is inside the backend.
    let mut waited = 0;
    while gated.entered.load(Ordering::SeqCst) < N {
        std::thread::sleep(Duration::from_millis(10));
        waited += 1;
        assert!(waited < 6000, "writes never reached the backend");
    }
    stop_tx.send(()).unwrap();
    // Give the server a moment to see the shutdown before the writes may finish.
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !server.is_finished(),
        "serve returned with requests in flight"
    );
    gated.open_gate();
    let mut cookies: Vec<u64> = (0..N)
        .map(|_| c.simple_reply())
        .map(|(e, k)| {
            assert_eq!(e, 0);
            k
        })
        .collect();
    cookies.sort();
    assert_eq!(cookies, (0..N as u64).collect::<Vec<_>>());
    // Then the server closes the connection and serve() returns.
    let mut b = [0u8; 1];
    assert_eq!(c.s.read(&mut b).unwrap_or(0), 0);
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(60), server).await })
        .expect("serve returned")
        .expect("serve did not panic");
    let mut back = [0u8; 4096];
    gated.inner.read(3 * 4096, &mut back).unwrap();
    assert_eq!(back, [4u8; 4096]);
}
