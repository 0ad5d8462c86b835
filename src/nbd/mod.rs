//! The NBD protocol (codec, no I/O) and the tokio server.
