//! `thinnbd serve`: opens (or creates) the pool directory, serves every volume over NBD on the
//! configured listeners and the control socket, and shuts down cleanly on SIGINT/SIGTERM.

pub mod control;
pub mod exports;

use std::sync::Arc;

use crate::config::Config;
use crate::error::{Error, Result};
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

/// Runs the server until a signal, then finishes in-flight requests, commits and returns.
pub async fn run(config: Config) -> Result<()> {
    // Before the pool is opened (or created): a path that is not ours to take stops the start.
    if let Some(path) = &config.listen.socket {
        crate::util::remove_stale_socket(path)?;
    }
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
    nbd::serve(listeners, source, config.server, shutdown_signal()).await;
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
