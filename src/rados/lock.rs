//! Ownership of a pool: one process at a time writes it. The owner holds an exclusive
//! `cls_lock` (`thinnbd`) on `NAME.pool` for a duration D and renews it every D/3 from a
//! thread; a lock not renewed for D has expired, and its holder is presumed dead.
//!
//! A new owner fences the previous one before writing anything: it reads `NAME.owner`, and
//! when that names another client, blocklists that client's address and waits for the OSD map
//! that carries the entry; only then does it write its own owner record. An owner whose
//! renewal fails (blocklisted, or the lock was broken or taken) stops writing: its connection
//! is fenced, so every later write fails with `Fenced`, and its `on_lost` callback is told.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::cluster::{Cluster, Locker, LOCK_FLAG_MUST_RENEW};
use super::header::unix_now;
use super::{PoolObjects, RadosLocation};
use crate::error::{Error, ErrorKind, Result};

/// The name of the lock on `NAME.pool`.
pub const LOCK_NAME: &str = "thinnbd";

/// How long a fenced client stays on the blocklist: far longer than any stall it could wake
/// from still believing it owns the pool.
pub const BLOCKLIST_EXPIRY: Duration = Duration::from_secs(3600);

/// Default lock duration (`[pool] rados_lock_duration_secs`).
pub const DEFAULT_LOCK_DURATION: Duration = Duration::from_secs(30);

/// How often a waiting opener tries the lock again, and how often it says who holds it.
const RETRY_EVERY: Duration = Duration::from_secs(1);
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Whether [`OwnerLock::acquire`] waits for the current owner to go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Poll every second until the lock is free or has expired (a server taking over).
    Yes,
    /// Fail at once with `Busy` naming the owner (administrative commands).
    No,
}

/// Who owns a pool: the record in `NAME.owner`, or what the lock itself says of its holder
/// when there is no record of it (then `host` is empty and `pid` and `since` are 0).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// The librados client, `client.4123`.
    pub client: String,
    /// Its address, as the blocklist takes it.
    pub address: String,
    pub host: String,
    pub pid: u32,
    /// When it took the pool, in seconds since the Unix epoch.
    pub since: u64,
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.client, self.address)?;
        if self.host.is_empty() {
            write!(f, " (no owner record)")
        } else {
            write!(
                f,
                " ({} pid {}) since {}",
                self.host,
                self.pid,
                format_utc(self.since)
            )
        }
    }
}

/// The lock and the state its renewal thread shares with the holder.
struct Held {
    cluster: Arc<Cluster>,
    location: String,
    objects: PoolObjects,
    cookie: String,
    description: String,
    duration: Duration,
    stop: Mutex<bool>,
    wake: Condvar,
    lost: AtomicBool,
}

/// This process's ownership of a pool. Renewed by its own thread while it lives; dropping it
/// (after the pool has stopped writing) removes the owner record and unlocks, so the next
/// owner need not fence anybody.
pub struct OwnerLock {
    held: Arc<Held>,
    renewer: Option<JoinHandle<()>>,
    owner: Owner,
}

impl OwnerLock {
    /// Takes ownership of the pool at `loc` for `duration` (renewed every third of it).
    /// Someone else holding it: with [`Wait::No`] a `Busy` error naming the owner; with
    /// [`Wait::Yes`] it polls every second, logging every 10 s who holds it, until the lock
    /// is released, broken or expires. Then it fences the previous owner (see the module
    /// docs) and writes its own record. `on_lost` is called once, from the renewal thread,
    /// if the ownership is lost later; by then every write through `cluster` fails with
    /// `Fenced`.
    ///
    /// The lock takes `NAME.pool` into being if there is none (an empty object, which
    /// [`PoolHeader::read`](super::PoolHeader::read) takes for no pool): a creator locks,
    /// then writes the header.
    pub fn acquire(
        cluster: &Arc<Cluster>,
        loc: &RadosLocation,
        duration: Duration,
        wait: Wait,
        on_lost: Box<dyn Fn(Error) + Send>,
    ) -> Result<OwnerLock> {
        if duration < Duration::from_secs(1) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("lock duration {duration:?}: at least one second"),
            ));
        }
        let objects = PoolObjects::new(loc);
        let host = hostname();
        let pid = std::process::id();
        let held = Arc::new(Held {
            cluster: cluster.clone(),
            location: loc.to_string(),
            objects,
            cookie: random_cookie(),
            description: format!("{host} {pid}"),
            duration,
            stop: Mutex::new(false),
            wake: Condvar::new(),
            lost: AtomicBool::new(false),
        });
        let started = Instant::now();
        let mut last_said: Option<Instant> = None;
        while !held.lock(0)? {
            let holder = describe_owner(cluster, loc)?;
            let Some(holder) = holder else {
                // Released between our attempt and the look: try again at once.
                continue;
            };
            if wait == Wait::No {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!("pool {loc} is owned by {holder}"),
                ));
            }
            if last_said.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
                info!(
                    "waiting for pool {loc}, owned by {holder} (waited {}s; the lock expires \
                     {}s after its owner's last renewal; `thinnbd pool takeover {loc}` takes it now)",
                    started.elapsed().as_secs(),
                    duration.as_secs()
                );
                last_said = Some(Instant::now());
            }
            std::thread::sleep(RETRY_EVERY);
        }
        // Held from here: an error below unlocks as the half-built lock drops.
        let mut lock = OwnerLock {
            held: held.clone(),
            renewer: None,
            owner: Owner {
                client: cluster.client_name(),
                address: String::new(),
                host,
                pid,
                since: unix_now(),
            },
        };
        lock.owner.address = cluster.address()?;
        if let Some(previous) = read_owner_record(cluster, &held.objects)? {
            if previous.client != lock.owner.client && !previous.address.is_empty() {
                warn!(
                    "taking pool {loc} over from {previous}: blocklisting {}",
                    previous.address
                );
                cluster.blocklist(&previous.address, BLOCKLIST_EXPIRY)?;
            }
        }
        // The blocklist entry must be in force before our first write, so that no write of
        // the previous owner lands after one of ours.
        cluster.wait_for_latest_osdmap()?;
        // Fencing may have been slow: the lock must still be ours (renewed, so it lasts a
        // whole duration from now) before the record says so and anything is written.
        if !held.lock(LOCK_FLAG_MUST_RENEW)? {
            return Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "pool {loc}: the lock expired while the previous owner was being fenced \
                     (longer than {}s); try again",
                    duration.as_secs()
                ),
            ));
        }
        write_owner_record(cluster, &held.objects, &lock.owner)?;
        info!("pool {loc}: owned by {}", lock.owner);
        let renewing = held.clone();
        lock.renewer = Some(
            std::thread::Builder::new()
                .name("rados-lock".into())
                .spawn(move || renewing.renew_until_stopped(on_lost))
                .map_err(|e| Error::io("starting the lock renewal thread", e))?,
        );
        Ok(lock)
    }

    /// This process's owner record.
    pub fn owner(&self) -> &Owner {
        &self.owner
    }

    /// True once the ownership was lost (renewal failed).
    pub fn is_lost(&self) -> bool {
        self.held.lost.load(Ordering::Acquire)
    }

    /// Stops renewing without unlocking, as a stalled or dead owner would: the lock expires
    /// after its duration (tests).
    #[cfg(any(test, feature = "testing"))]
    pub fn stop_renewing(&mut self) {
        self.held.stop_renewer(self.renewer.take());
    }

    /// Who owns the pool at `loc` now; `None` when nobody holds its lock.
    pub fn describe_owner(cluster: &Cluster, loc: &RadosLocation) -> Result<Option<Owner>> {
        describe_owner(cluster, loc)
    }

    /// Takes the pool at `loc` from whoever holds it, for a new owner that is waiting: each
    /// holder's address is blocklisted, then its lock broken. Returns who held it.
    pub fn takeover(cluster: &Cluster, loc: &RadosLocation) -> Result<Vec<Owner>> {
        let objects = PoolObjects::new(loc);
        let lockers = cluster.lockers(&objects.header(), LOCK_NAME)?;
        let record = read_owner_record(cluster, &objects)?;
        let mut owners = Vec::new();
        for locker in lockers {
            warn!(
                "pool {loc}: blocklisting {} ({}) and breaking its lock",
                locker.client, locker.address
            );
            cluster.blocklist(&locker.address, BLOCKLIST_EXPIRY)?;
            cluster.break_lock(&objects.header(), LOCK_NAME, &locker)?;
            owners.push(owner_of(&locker, record.as_ref()));
        }
        cluster.wait_for_latest_osdmap()?;
        Ok(owners)
    }
}

impl Drop for OwnerLock {
    fn drop(&mut self) {
        let renewer = self.renewer.take();
        self.held.stop_renewer(renewer);
        if self.held.lost.load(Ordering::Acquire) {
            return;
        }
        let cluster = &self.held.cluster;
        // Our record goes first, while we still hold the lock: the next owner then finds
        // nobody to fence. A record that names someone else is theirs to keep.
        let record = read_owner_record(cluster, &self.held.objects);
        if matches!(&record, Ok(Some(r)) if r.client == self.owner.client) {
            if let Err(e) = cluster.remove_object(&self.held.objects.owner()) {
                warn!(
                    "pool {}: removing the owner record: {e}",
                    self.held.location
                );
            }
        }
        if let Err(e) = cluster.unlock(&self.held.objects.header(), LOCK_NAME, &self.held.cookie) {
            warn!("pool {}: unlocking: {e}", self.held.location);
        }
    }
}

impl Held {
    /// Tries the lock once; `Ok(false)`: somebody else holds it.
    fn lock(&self, flags: u8) -> Result<bool> {
        self.cluster.lock_exclusive(
            &self.objects.header(),
            LOCK_NAME,
            &self.cookie,
            &self.description,
            self.duration,
            flags,
        )
    }

    fn stop_renewer(&self, renewer: Option<JoinHandle<()>>) {
        *self.stop.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.wake.notify_all();
        if let Some(thread) = renewer {
            let _ = thread.join();
        }
    }

    /// Sleeps for `period` unless stopped; true when stopped.
    fn stopped_after(&self, period: Duration) -> bool {
        let stop = self.stop.lock().unwrap_or_else(|e| e.into_inner());
        let (stop, _) = self
            .wake
            .wait_timeout_while(stop, period, |stop| !*stop)
            .unwrap_or_else(|e| e.into_inner());
        *stop
    }

    /// Renews every third of the duration. A failed renewal is retried until the lock would
    /// have expired (a slow monitor or OSD is no reason to give up a lock we may still hold),
    /// except when we are blocklisted or somebody else holds it: then the pool is lost.
    fn renew_until_stopped(&self, on_lost: Box<dyn Fn(Error) + Send>) {
        let period = self.duration / 3;
        let mut renewed = Instant::now();
        let cause = loop {
            if self.stopped_after(period) {
                return;
            }
            match self.lock(LOCK_FLAG_MUST_RENEW) {
                Ok(true) => renewed = Instant::now(),
                Ok(false) => break "its lock was broken, expired or taken".to_string(),
                Err(e) if e.kind() == ErrorKind::Fenced => break e.message(),
                Err(e) if renewed.elapsed() >= self.duration => {
                    break format!("the lock expired: renewing failed: {e}")
                }
                Err(e) => warn!("pool {}: renewing the lock: {e}", self.location),
            }
        };
        self.cluster.fence(&cause);
        self.lost.store(true, Ordering::Release);
        on_lost(Error::new(
            ErrorKind::Fenced,
            format!("lost ownership of pool {}: {cause}", self.location),
        ));
    }
}

fn describe_owner(cluster: &Cluster, loc: &RadosLocation) -> Result<Option<Owner>> {
    let objects = PoolObjects::new(loc);
    let lockers = cluster.lockers(&objects.header(), LOCK_NAME)?;
    let Some(locker) = lockers.first() else {
        return Ok(None);
    };
    let record = read_owner_record(cluster, &objects)?;
    Ok(Some(owner_of(locker, record.as_ref())))
}

/// The owner record when it is the locker's, else what the lock says.
fn owner_of(locker: &Locker, record: Option<&Owner>) -> Owner {
    match record {
        Some(r) if r.client == locker.client => r.clone(),
        _ => Owner {
            client: locker.client.clone(),
            address: locker.address.clone(),
            host: String::new(),
            pid: 0,
            since: 0,
        },
    }
}

fn read_owner_record(cluster: &Cluster, objects: &PoolObjects) -> Result<Option<Owner>> {
    let oid = objects.owner();
    match cluster.read_object(&oid)? {
        None => Ok(None),
        Some(bytes) if bytes.is_empty() => Ok(None),
        Some(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::corrupt(format!("the owner record {oid}: {e}"))),
    }
}

fn write_owner_record(cluster: &Cluster, objects: &PoolObjects, owner: &Owner) -> Result<()> {
    let mut bytes = serde_json::to_vec_pretty(owner)
        .map_err(|e| Error::new(ErrorKind::Io, format!("encoding the owner record: {e}")))?;
    bytes.push(b'\n');
    cluster.write_object_atomically(&objects.owner(), &bytes)
}

/// `2026-12-07 15:38:04 UTC` for `secs` since the Unix epoch.
pub fn format_utc(secs: u64) -> String {
    // Days to a civil date: Howard Hinnant's algorithm, in unsigned arithmetic (the epoch is
    // a March-based era boundary after shifting by 719468 days).
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is valid for writes of its length; gethostname NUL-terminates within it
    // (the last byte stays 0 whatever it does).
    let ret = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len() - 1) };
    if ret != 0 {
        return "unknown-host".to_string();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// A lock cookie unique to this lock holder: random bits, so that two processes (or two
/// opens in one) never pass for each other.
fn random_cookie() -> String {
    let mut bytes = [0u8; 16];
    // SAFETY: `bytes` is valid for writes of its length.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if usize::try_from(n).ok() != Some(bytes.len()) {
        // No entropy source: the time and pid still set this holder apart.
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        return format!("{nanos:x}-{}", std::process::id());
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates_are_civil() {
        assert_eq!(format_utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(format_utc(1_796_657_884), "2026-12-07 15:38:04 UTC");
    }

    #[test]
    fn an_owner_shows_who_where_and_since_when() {
        let owner = Owner {
            client: "client.4123".into(),
            address: "10.0.0.1:0/77".into(),
            host: "node1".into(),
            pid: 42,
            since: 0,
        };
        assert_eq!(
            owner.to_string(),
            "client.4123 10.0.0.1:0/77 (node1 pid 42) since 1970-01-01 00:00:00 UTC"
        );
        let bare = Owner {
            host: String::new(),
            ..owner
        };
        assert_eq!(
            bare.to_string(),
            "client.4123 10.0.0.1:0/77 (no owner record)"
        );
    }

    #[test]
    fn cookies_differ() {
        assert_ne!(random_cookie(), random_cookie());
    }
}
