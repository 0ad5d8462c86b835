//! Volumes: named thin devices of a pool directory (metadata, data, registry, lock, control
//! socket), built on the I/O engine and used by the server, the plugin and the CLI.

pub mod registry;
