//! thinnbd: a userspace thin-provisioning pool in the dm-thin metadata format, served over NBD.
//!
//! Layers, lowest first; each depends only on those below it:
//! `pdata` (persistent data) -> `thin` (pool metadata) -> `engine` (I/O) -> `nbd` (protocol
//! and server) -> the CLI (src/main.rs) and the nbdkit plugin (the `thinnbd-nbdkit` package in
//! nbdkit-plugin/, built on this library).

// Sizes, block numbers and lengths come from disk and from peers: a cast that can lose data must
// be a `try_from` with an error, or say (an `#[expect]` with its reason) why it cannot.
#![deny(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

pub mod config;
pub mod engine;
pub mod error;
pub mod nbd;
pub mod pdata;
pub mod service;
pub mod sync;
pub mod thin;
pub mod util;
pub mod volume;

pub use error::{Error, ErrorKind, Result};
