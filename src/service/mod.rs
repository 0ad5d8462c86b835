//! `thinnbd serve`: opens (or creates) the pool, serves every volume over NBD on the configured
//! listeners and the control socket, reloads its TLS credentials on SIGHUP, and shuts down
//! cleanly on SIGINT/SIGTERM. A RADOS pool is served once its ownership is ours (waiting for
//! another owner to let go); losing it stops the server at once, with an error.

pub mod control;
pub mod exports;

use std::sync::Arc;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::nbd::tls::{TlsCredentials, TlsMode};
use crate::nbd::{self, Listener};
use crate::volume::{backing, CreateOptions, OnLost, OwnerPolicy, Volumes};

/// Opens the configured pool, creating it (with its default volume) when missing and
/// `create_if_missing` (which `thinnbd serve` keeps only for the default directory or `--create`).
/// Ownership is taken as `policy` says.
pub fn open_or_create(config: &Config, policy: &OwnerPolicy) -> Result<Arc<Volumes>> {
    let location = config.pool.location();
    // One backing for the lot: for a RADOS pool, one connection to the cluster.
    let backing = backing(&location)?;
    let mut created = false;
    if !backing.exists()? {
        if !config.pool.create_if_missing {
            let missing = backing.no_pool();
            return Err(Error::new(
                missing.kind(),
                format!(
                    "{}, or start `thinnbd serve --pool {location} --create` to create it with \
                     the configured pool.data_size ({})",
                    missing.context(),
                    crate::util::format_size(config.pool.data_size)
                ),
            ));
        }
        let opts = CreateOptions {
            data: config.pool.data.clone(),
            data_size: config.pool.data_size,
            block_size: config.pool.new_pool_block_size(),
            metadata_size: None,
            preallocate: false,
        };
        backing.create(&opts, config.engine.clone())?;
        created = true;
        tracing::info!(pool = %location, "created pool");
    }
    let volumes = Volumes::open_backing(backing, config.engine.clone(), policy)?;
    if created && !config.pool.default_volume.is_empty() {
        volumes.create_volume(&config.pool.default_volume, config.pool.default_volume_size)?;
    }
    log_space(&volumes);
    Ok(volumes)
}

/// Logs the low-water mark in bytes, and what the operator should know about space at start:
/// a host file system short of the pool's free data, volumes over-committing the pool. The
/// server and the nbdkit plugin both call it once the pool is open.
pub fn log_space(volumes: &Volumes) {
    let s = volumes.pool().status();
    let block = volumes.pool().block_size();
    tracing::info!(
        "data: {} of {} bytes free; low-water mark {} bytes",
        s.data_free * block,
        s.data_total * block,
        s.low_water_blocks * block
    );
    for w in volumes
        .host_space_warning()
        .into_iter()
        .chain(volumes.overcommit_warning())
    {
        tracing::warn!("{w}");
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers there is no graceful stop; serve until killed.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}

fn load_tls(config: &Config) -> Result<Option<Arc<TlsCredentials>>> {
    let settings = &config.server.tls;
    if let Err((key, why)) = settings.validate() {
        return Err(Error::new(
            crate::ErrorKind::InvalidInput,
            format!("server.{key} (--{}): {why}", key.replace('_', "-")),
        ));
    }
    let tls = TlsCredentials::load(settings)?;
    if let Some(t) = &tls {
        tracing::info!(mode = ?t.mode(), "TLS credentials loaded");
    }
    Ok(tls)
}

/// A listener others than this host can reach, serving clients that may not use TLS, is
/// worth a warning: their data crosses the network in clear.
fn warn_clear_listeners(listeners: &[Listener], mode: Option<TlsMode>) {
    if mode == Some(TlsMode::Require) {
        return;
    }
    for l in listeners {
        if let Listener::Tcp(tcp) = l {
            if tcp.local_addr().is_ok_and(|a| !a.ip().is_loopback()) {
                tracing::warn!(
                    listener = %l.describe(),
                    "serving beyond this host without --tls=require: clients may send data in clear"
                );
            }
        }
    }
}

/// SIGHUP reads the TLS credentials again; connections already up keep theirs, and a file that
/// does not load leaves the old credentials in use. The handler is in place when this returns.
fn reload_on_sighup(tls: Arc<TlsCredentials>) -> Result<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup())
        .map_err(|e| Error::io("installing the SIGHUP handler".to_owned(), e))?;
    Ok(tokio::spawn(async move {
        while hup.recv().await.is_some() {
            reload(&tls).await;
        }
    }))
}

async fn reload(tls: &Arc<TlsCredentials>) {
    let t = Arc::clone(tls);
    match tokio::task::spawn_blocking(move || t.reload()).await {
        Ok(Ok(())) => tracing::info!("SIGHUP: TLS credentials reloaded"),
        Ok(Err(e)) => tracing::error!(
            error = %e,
            "SIGHUP: TLS credentials not reloaded, the old ones stay in use"
        ),
        Err(e) => tracing::error!(error = %e, "SIGHUP: TLS reload failed"),
    }
}

/// The shared runtime directory of a RADOS pool's control socket (`/tmp/thinnbd-UID` without
/// `$XDG_RUNTIME_DIR`) must be this user's alone: another user's could swap the socket for one
/// that answers volume commands falsely. Made (0700) when missing.
fn private_runtime_dir(socket: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let Some(dir) = socket.parent() else {
        return Ok(());
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let meta = std::fs::metadata(dir)
        .map_err(|e| Error::io(format!("inspecting {}", dir.display()), e))?;
    // SAFETY: geteuid has no arguments and cannot fail.
    let uid = unsafe { libc::geteuid() };
    if meta.uid() != uid || meta.mode() & 0o022 != 0 {
        return Err(Error::new(
            crate::ErrorKind::InvalidInput,
            format!(
                "{} belongs to another user or others may write to it: not putting the control \
                 socket there (set XDG_RUNTIME_DIR to a private directory)",
                dir.display()
            ),
        ));
    }
    Ok(())
}

/// How long connections get to finish once the pool's ownership is lost: their writes fail
/// (fenced) rather than land, so this only bounds how long a hung cluster keeps the process.
const LOST_OWNERSHIP_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// The news that the pool's ownership was lost, from the thread that finds out to the server.
#[derive(Clone)]
struct LostOwnership {
    why: tokio::sync::watch::Sender<Option<String>>,
}

impl LostOwnership {
    fn new() -> Self {
        LostOwnership {
            why: tokio::sync::watch::Sender::new(None),
        }
    }

    /// The callback for the pool's owner lock, whose error says "lost ownership of pool
    /// LOCATION: why".
    fn callback(&self) -> OnLost {
        let why = self.why.clone();
        Arc::new(move |e: &Error| {
            tracing::error!("{e}");
            why.send_replace(Some(e.message()));
        })
    }

    /// Returns once ownership is lost (never, while it is not).
    async fn wait(&self) {
        let mut rx = self.why.subscribe();
        if rx.wait_for(Option::is_some).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    fn why(&self) -> Option<String> {
        self.why.borrow().clone()
    }
}

/// Runs the server until a signal, then finishes in-flight requests, commits and returns. A
/// lost ownership stops it at once with an error, committing nothing.
pub async fn run(config: Config) -> Result<()> {
    // Before the pool is opened (or created): a path that is not ours to take stops the start.
    if let Some(path) = &config.listen.socket {
        crate::util::remove_stale_socket(path)?;
    }
    // Before the pool is opened: bad TLS settings or files stop the start.
    let tls = load_tls(&config)?;
    let cfg = config.clone();
    let location = config.pool.location();
    let lost = LostOwnership::new();
    let policy = OwnerPolicy {
        wait: true,
        on_lost: Some(lost.callback()),
        lock_duration: config.pool.rados_lock_duration,
    };
    let volumes = tokio::task::spawn_blocking(move || open_or_create(&cfg, &policy))
        .await
        .map_err(|e| Error::new(crate::ErrorKind::Io, format!("opening the pool: {e}")))??;
    let mut listeners = Vec::new();
    for addr in &config.listen.tcp {
        listeners.push(
            Listener::bind_tcp(addr)
                .await
                .map_err(|e| Error::io(format!("listening on {addr}"), e))?,
        );
    }
    if let Some(path) = &config.listen.socket {
        listeners.push(
            Listener::bind_unix(path)
                .map_err(|e| Error::io(format!("listening on {}", path.display()), e))?,
        );
    }
    let control_path = volumes.control_socket();
    let control_dir_ok = if location.is_rados() {
        private_runtime_dir(&control_path)
    } else {
        Ok(())
    };
    // Without a control socket the volumes are still served; volume commands then say the
    // pool is busy.
    let control = match control_dir_ok.and_then(|()| control::bind(&control_path)) {
        Ok(listener) => Some(tokio::spawn(control::serve(listener, volumes.clone()))),
        Err(e) => {
            tracing::error!("control socket: {e}");
            None
        }
    };
    let names = volumes.volume_names().join(", ");
    let wheres: Vec<String> = listeners.iter().map(|l| l.describe()).collect();
    tracing::info!(pool = %location, listen = %wheres.join(" "), volumes = %names, "serving");
    let default_export = config.pool.default_export();
    let source = Arc::new(exports::VolumeExports::new(volumes.clone(), default_export));
    warn_clear_listeners(&listeners, tls.as_ref().map(|t| t.mode()));
    let reloader = match &tls {
        Some(t) => Some(reload_on_sighup(Arc::clone(t))?),
        None => None,
    };
    let stop = async {
        tokio::select! {
            () = shutdown_signal() => {}
            () = lost.wait() => {}
        }
    };
    let serving = nbd::serve_with_tls(listeners, source, config.server, tls, stop);
    tokio::select! {
        () = serving => {}
        () = async {
            lost.wait().await;
            tokio::time::sleep(LOST_OWNERSHIP_GRACE).await;
        } => tracing::warn!("connections still open {LOST_OWNERSHIP_GRACE:?} after losing the pool: leaving them"),
    }
    if let Some(reloader) = reloader {
        reloader.abort();
    }
    if let Some(control) = control {
        control.abort();
        let _ = std::fs::remove_file(&control_path);
    }
    if let Some(path) = &config.listen.socket {
        let _ = std::fs::remove_file(path);
    }
    if let Some(why) = lost.why() {
        // The pool is another owner's now: nothing of it may be written, not even the commit
        // that closing it would make (fenced writes fail anyway; this does not even try).
        std::mem::forget(volumes);
        return Err(Error::new(crate::ErrorKind::Fenced, why));
    }
    tokio::task::spawn_blocking(move || volumes.shutdown())
        .await
        .map_err(|e| Error::new(crate::ErrorKind::Io, format!("shutting down: {e}")))??;
    tracing::info!("pool closed cleanly");
    Ok(())
}
