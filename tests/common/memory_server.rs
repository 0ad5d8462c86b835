//! Helpers for the NBD integration tests: an in-process server on 127.0.0.1:0 and a unix
//! socket, a small blocking raw-protocol client, and `require_tool` for external clients.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use thinnbd::nbd::codec::*;
use thinnbd::nbd::memory::{MemoryExport, MemorySource};
use thinnbd::nbd::{serve, Listener, ServerConfig};
use tokio::sync::oneshot;

fn init_tracing() {
    // RUST_LOG=thinnbd=debug shows the server's logs in failing tests.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A memory source with the usual test exports: "disk" (64 MiB, default), "small" (1 MiB) and
/// "ro" (read-only, 1 MiB).
pub fn standard_source() -> Arc<MemorySource> {
    let s = Arc::new(MemorySource::new());
    s.add("disk", "the main test disk", MemoryExport::new(64 << 20));
    s.add("small", "a small disk", MemoryExport::new(1 << 20));
    s.add(
        "ro",
        "a read-only disk",
        MemoryExport::new(1 << 20).read_only(true),
    );
    s
}

/// A server running in its own runtime, on TCP 127.0.0.1:0 and a unix socket in a temp dir.
pub struct TestServer {
    rt: tokio::runtime::Runtime,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<()>>,
    pub port: u16,
    pub socket: PathBuf,
    _dir: tempfile::TempDir,
    pub source: Arc<MemorySource>,
}

impl TestServer {
    pub fn start(source: Arc<MemorySource>) -> Self {
        Self::start_with(source, ServerConfig::default())
    }

    pub fn start_with(source: Arc<MemorySource>, config: ServerConfig) -> Self {
        init_tracing();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("nbd.sock");
        let (tcp, unix) = rt.block_on(async {
            let tcp = Listener::bind_tcp("127.0.0.1:0").await.expect("bind tcp");
            let unix = Listener::bind_unix(&socket).expect("bind unix");
            (tcp, unix)
        });
        let port = tcp.port().expect("tcp port");
        let (tx, rx) = oneshot::channel::<()>();
        let src: Arc<dyn thinnbd::nbd::ExportSource> = source.clone();
        let handle = rt.spawn(serve(vec![tcp, unix], src, config, async {
            let _ = rx.await;
        }));
        TestServer {
            rt,
            stop: Some(tx),
            handle: Some(handle),
            port,
            socket,
            _dir: dir,
            source,
        }
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.port)
    }

    pub fn unix_uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    pub fn export(&self, name: &str) -> Arc<MemoryExport> {
        self.source.get(name).expect("export exists")
    }

    /// The serve() task has not returned (nor panicked).
    pub fn is_running(&self) -> bool {
        self.handle.as_ref().is_some_and(|h| !h.is_finished())
    }

    /// Requests shutdown and waits for serve() to return; panics if it does not within 60 s.
    pub fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            let r = self
                .rt
                .block_on(async { tokio::time::timeout(Duration::from_secs(60), h).await });
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => panic!("server task failed: {e}"),
                Err(_) => panic!("server did not stop within 60 s"),
            }
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Do not turn a test failure into an abort by panicking again.
            if let Some(tx) = self.stop.take() {
                let _ = tx.send(());
            }
            return;
        }
        self.stop();
    }
}

/// A stream a raw client can use: TCP or unix.
pub trait Stream: Read + Write + Send {
    /// Shuts down the sending side, so the server sees end-of-file.
    fn half_close(&self);
}
impl Stream for TcpStream {
    fn half_close(&self) {
        let _ = self.shutdown(std::net::Shutdown::Write);
    }
}
impl Stream for UnixStream {
    fn half_close(&self) {
        let _ = self.shutdown(std::net::Shutdown::Write);
    }
}

/// A blocking client speaking the protocol byte by byte, for tests that need exact control.
pub struct RawClient {
    pub s: Box<dyn Stream>,
    pub handshake_flags: u16,
}

impl RawClient {
    pub fn connect_tcp(port: u16) -> Self {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        s.set_nodelay(true).expect("nodelay");
        Self::after_connect(Box::new(s))
    }

    pub fn connect_unix(path: &Path) -> Self {
        let s = UnixStream::connect(path).expect("connect unix");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        Self::after_connect(Box::new(s))
    }

    fn after_connect(mut s: Box<dyn Stream>) -> Self {
        let mut g = [0u8; GREETING_LEN];
        s.read_exact(&mut g).expect("greeting");
        let handshake_flags = decode_greeting(&g).expect("valid greeting");
        s.write_all(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes())
            .expect("flags");
        RawClient { s, handshake_flags }
    }

    /// Sends an option and collects replies up to and including the final ACK or error.
    pub fn option(&mut self, req: &OptionRequest) -> Vec<OptionReply> {
        self.s.write_all(&req.encode()).expect("send option");
        let mut replies = Vec::new();
        loop {
            let r = self.read_option_reply();
            let last = !matches!(
                r.kind,
                OptionReplyKind::Server { .. }
                    | OptionReplyKind::Info(_)
                    | OptionReplyKind::MetaContext { .. }
            );
            replies.push(r);
            if last {
                return replies;
            }
        }
    }

    pub fn read_option_reply(&mut self) -> OptionReply {
        let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
        self.s.read_exact(&mut h).expect("option reply header");
        let (_, _, len) = OptionReply::decode_header(&h).expect("option reply header");
        let mut all = h.to_vec();
        all.resize(OPTION_REPLY_HEADER_LEN + len as usize, 0);
        self.s
            .read_exact(&mut all[OPTION_REPLY_HEADER_LEN..])
            .expect("option reply data");
        OptionReply::decode(&all).expect("valid option reply")
    }

    /// Negotiates structured replies and base:allocation (when asked), then GO. Returns the
    /// export size and transmission flags.
    pub fn go(&mut self, name: &str, structured: bool) -> (u64, u16) {
        if structured {
            let r = self.option(&OptionRequest::StructuredReply);
            assert_eq!(r[0].kind, OptionReplyKind::Ack);
            let r = self.option(&OptionRequest::MetaContext {
                set: true,
                export: name.to_owned(),
                queries: vec![META_BASE_ALLOCATION.to_owned()],
            });
            assert_eq!(r.len(), 2, "{r:?}");
        }
        let replies = self.option(&OptionRequest::Info {
            go: true,
            name: name.to_owned(),
            requests: vec![INFO_BLOCK_SIZE],
        });
        assert_eq!(
            replies.last().map(|r| &r.kind),
            Some(&OptionReplyKind::Ack),
            "{replies:?}"
        );
        for r in &replies {
            if let OptionReplyKind::Info(InfoReply::Export { size, flags }) = r.kind {
                return (size, flags);
            }
        }
        panic!("GO without NBD_INFO_EXPORT: {replies:?}");
    }

    /// Opens `name` the old way, with NBD_OPT_EXPORT_NAME (no block size limits are told);
    /// returns the export size and transmission flags.
    pub fn export_name(&mut self, name: &str) -> (u64, u16) {
        self.s
            .write_all(&OptionRequest::ExportName(name.to_owned()).encode())
            .expect("send EXPORT_NAME");
        let mut reply = [0u8; 10];
        self.s.read_exact(&mut reply).expect("EXPORT_NAME reply");
        let size = u64::from_be_bytes(reply[..8].try_into().expect("8 bytes"));
        (size, u16::from_be_bytes([reply[8], reply[9]]))
    }

    pub fn send(&mut self, command: Command, flags: u16, cookie: u64, offset: u64, length: u32) {
        let req = Request {
            flags,
            command,
            cookie,
            offset,
            length,
        };
        self.s.write_all(&req.encode()).expect("send request");
    }

    pub fn write(&mut self, cookie: u64, offset: u64, data: &[u8]) {
        self.send(Command::Write, 0, cookie, offset, data.len() as u32);
        self.s.write_all(data).expect("send payload");
    }

    /// Reads a simple reply header: (error, cookie).
    pub fn simple_reply(&mut self) -> (u32, u64) {
        let mut h = [0u8; SIMPLE_REPLY_LEN];
        self.s.read_exact(&mut h).expect("simple reply");
        let r = SimpleReply::decode(&h).expect("valid simple reply");
        (r.error, r.cookie)
    }

    /// Reads one reply of either kind: (cookie, magic-specific parts). For structured replies,
    /// reads chunks until DONE.
    pub fn any_reply(&mut self, read_len: usize) -> Reply {
        let mut magic = [0u8; 4];
        self.s.read_exact(&mut magic).expect("reply magic");
        match u32::from_be_bytes(magic) {
            SIMPLE_REPLY_MAGIC => {
                let mut rest = [0u8; SIMPLE_REPLY_LEN - 4];
                self.s.read_exact(&mut rest).expect("simple reply");
                let mut all = magic.to_vec();
                all.extend_from_slice(&rest);
                let r = SimpleReply::decode(&all).expect("simple reply");
                let mut data = Vec::new();
                if r.error == 0 && read_len > 0 {
                    data.resize(read_len, 0);
                    self.s.read_exact(&mut data).expect("read data");
                }
                Reply::Simple {
                    error: r.error,
                    cookie: r.cookie,
                    data,
                }
            }
            STRUCTURED_REPLY_MAGIC => {
                let mut chunks = Vec::new();
                let mut first = Some(magic);
                loop {
                    let mut h = [0u8; STRUCTURED_HEADER_LEN];
                    match first.take() {
                        Some(m) => {
                            h[..4].copy_from_slice(&m);
                            self.s.read_exact(&mut h[4..]).expect("chunk header");
                        }
                        None => self.s.read_exact(&mut h).expect("chunk header"),
                    }
                    let ch = ChunkHeader::decode(&h).expect("chunk header");
                    let mut payload = vec![0u8; ch.length as usize];
                    self.s.read_exact(&mut payload).expect("chunk payload");
                    let c = Chunk::decode(ch.chunk_type, &payload).expect("chunk");
                    chunks.push((ch.cookie, c));
                    if ch.flags & REPLY_FLAG_DONE != 0 {
                        return Reply::Structured {
                            cookie: ch.cookie,
                            chunks,
                        };
                    }
                }
            }
            other => panic!("bad reply magic {other:#x}"),
        }
    }
}

#[derive(Debug)]
pub enum Reply {
    Simple {
        error: u32,
        cookie: u64,
        data: Vec<u8>,
    },
    Structured {
        cookie: u64,
        chunks: Vec<(u64, Chunk)>,
    },
}

impl Reply {
    pub fn cookie(&self) -> u64 {
        match self {
            Reply::Simple { cookie, .. } | Reply::Structured { cookie, .. } => *cookie,
        }
    }

    /// The errno of a reply (0 for success).
    pub fn error(&self) -> u32 {
        match self {
            Reply::Simple { error, .. } => *error,
            Reply::Structured { chunks, .. } => chunks
                .iter()
                .find_map(|(_, c)| match c {
                    Chunk::Error { error, .. } | Chunk::ErrorOffset { error, .. } => Some(*error),
                    _ => None,
                })
                .unwrap_or(0),
        }
    }

    /// Reassembles read data from a structured reply covering [offset, offset+len).
    pub fn read_data(&self, offset: u64, len: usize) -> Vec<u8> {
        match self {
            Reply::Simple { data, .. } => data.clone(),
            Reply::Structured { chunks, .. } => {
                let mut out = vec![0xeeu8; len];
                let mut covered = 0usize;
                for (_, c) in chunks {
                    match c {
                        Chunk::OffsetData { offset: o, data } => {
                            let at = (o - offset) as usize;
                            out[at..at + data.len()].copy_from_slice(data);
                            covered += data.len();
                        }
                        Chunk::OffsetHole { offset: o, length } => {
                            let at = (o - offset) as usize;
                            out[at..at + *length as usize].fill(0);
                            covered += *length as usize;
                        }
                        other => panic!("unexpected chunk in read reply: {other:?}"),
                    }
                }
                assert_eq!(covered, len, "read reply chunks do not cover the request");
                out
            }
        }
    }
}
