//! `thinnbd serve`: opens (or creates) the pool directory, serves every volume over NBD on the
//! configured listeners and the control socket, reloads its TLS credentials on SIGHUP, and shuts
//! down cleanly on SIGINT/SIGTERM.

pub mod control;
pub mod exports;

use std::sync::Arc;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::nbd::tls::{TlsCredentials, TlsMode};
use crate::nbd::{self, Listener};
use crate::volume::{no_pool_in, CreateOptions, PoolPaths, Volumes};

/// Opens the configured pool, creating it (with its default volume) when missing and
/// `create_if_missing` (which `thinnbd serve` keeps only for the default directory or `--create`).
pub fn open_or_create(config: &Config) -> Result<Arc<Volumes>> {
    let paths = PoolPaths::new(&config.pool.dir);
    let mut created = false;
    if !paths.exists() {
        if !config.pool.create_if_missing {
            let missing = no_pool_in(&paths.dir);
            return Err(Error::new(
                missing.kind(),
                format!(
                    "{}, or start `thinnbd serve --pool {} --create` to create it with the \
                     configured pool.data_size ({})",
                    missing.context(),
                    paths.dir.display(),
                    crate::util::format_size(config.pool.data_size)
                ),
            ));
        }
        let opts = CreateOptions {
            data: config.pool.data.clone(),
            data_size: config.pool.data_size,
            block_size: config.pool.block_size,
            metadata_size: None,
            preallocate: false,
        };
        Volumes::create_pool(&paths.dir, &opts, config.engine.clone())?;
        created = true;
        tracing::info!(pool = %paths.dir.display(), "created pool");
    }
    let volumes = Volumes::open(&paths.dir, config.engine.clone())?;
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

/// Runs the server until a signal, then finishes in-flight requests, commits and returns.
pub async fn run(config: Config) -> Result<()> {
    // Before the pool is opened (or created): a path that is not ours to take stops the start.
    if let Some(path) = &config.listen.socket {
        crate::util::remove_stale_socket(path)?;
    }
    // Before the pool is opened: bad TLS settings or files stop the start.
    let tls = load_tls(&config)?;
    let cfg = config.clone();
    let volumes = tokio::task::spawn_blocking(move || open_or_create(&cfg))
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
    let control_path = volumes.paths().control_socket.clone();
    // Without a control socket the volumes are still served; volume commands then say the
    // pool is busy.
    let control = match control::bind(&control_path) {
        Ok(listener) => Some(tokio::spawn(control::serve(listener, volumes.clone()))),
        Err(e) => {
            tracing::error!("control socket: {e}");
            None
        }
    };
    let names = volumes.volume_names().join(", ");
    let wheres: Vec<String> = listeners.iter().map(|l| l.describe()).collect();
    tracing::info!(pool = %volumes.paths().dir.display(), listen = %wheres.join(" "), volumes = %names, "serving");
    let default_export = config.pool.default_export();
    let source = Arc::new(exports::VolumeExports::new(volumes.clone(), default_export));
    warn_clear_listeners(&listeners, tls.as_ref().map(|t| t.mode()));
    let reloader = match &tls {
        Some(t) => Some(reload_on_sighup(Arc::clone(t))?),
        None => None,
    };
    nbd::serve_with_tls(listeners, source, config.server, tls, shutdown_signal()).await;
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
    tokio::task::spawn_blocking(move || volumes.shutdown())
        .await
        .map_err(|e| Error::new(crate::ErrorKind::Io, format!("shutting down: {e}")))??;
    tracing::info!("pool closed cleanly");
    Ok(())
}
