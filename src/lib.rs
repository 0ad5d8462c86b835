//! thinnbd: a userspace thin-provisioning pool in the dm-thin metadata format, served over NBD.
//!
//! Layers, lowest first; each depends only on those below it (docs/architecture.md draws them):
//!
//! ```text
//! pdata    persistent data: BlockIo, checksums, transaction manager, btrees, space maps
//! thin     the dm-thin metadata: devices, mappings, snapshots; check, dump/restore, delta
//! engine   the I/O engine: Pool, thin handles, prison, worker, group commit; the DataStore seam
//! rados    (feature `rados`) a pool kept in Ceph: cluster connection, the data store and
//!          metadata device over RADOS objects, the pool header, the owner lock
//! volume   names, sizes, the registry and the pool directory
//! nbd      the protocol: codec, the export seam (backend), server and connections; beside
//!          (not above) engine and volume: it never imports them
//! config   the TOML file validated into each layer's settings (EngineConfig, ServerConfig, ...)
//! service  `thinnbd serve`: the one adapter from a volume to an export, control socket, signals
//! ```
//!
//! Above them: the CLI (src/main.rs) and the nbdkit plugin (the `thinnbd-nbdkit` package in
//! nbdkit-plugin/), both on this library's public API. `error` and `util` serve every layer;
//! `sync` is the one module whose primitives the loom model swaps.

// Sizes, block numbers and lengths come from disk and from peers: a cast that can lose data must
// be a `try_from` with an error, or say (an `#[expect]` with its reason) why it cannot.
#![deny(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

pub mod config;
pub mod engine;
pub mod error;
pub mod nbd;
pub mod pdata;
#[cfg(feature = "rados")]
pub mod rados;
pub mod service;
pub mod sync;
pub mod thin;
pub mod util;
pub mod volume;

pub use error::{Error, ErrorKind, Result};
