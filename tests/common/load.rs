//! How long and how hard a load test runs: counts and durations from the environment (long
//! runs on demand) and a printed seed to replay a failure.

/// A count from the environment (long runs on demand), or `default`.
pub fn env_count(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Seconds from the environment, or `default`.
pub fn env_secs(name: &str, default: u64) -> std::time::Duration {
    std::time::Duration::from_secs(env_count(name, default))
}

/// A base seed: THINNBD_SEED when set (to replay a failure), else from the clock. Printed so a
/// failing run can be repeated.
pub fn base_seed(test: &str) -> u64 {
    let seed = std::env::var("THINNBD_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("{test}: THINNBD_SEED={seed}");
    seed
}
