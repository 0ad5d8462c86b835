//! The thin I/O engine: data device, bio prison, deferred-bio worker, active thins.
