//! The NBD server in-process for the protocol tests: `serve` over memory exports, on
//! 127.0.0.1:0 and a unix socket, in a runtime of its own. Clients: `super::nbd_client`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

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
