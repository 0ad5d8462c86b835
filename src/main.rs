//! The `thinnbd` command: serve a pool over NBD, manage pools and volumes, and the metadata
//! tools named after thin-provisioning-tools (dump, restore, check).

use std::io::{BufReader, BufWriter, IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use serde::Serialize;
use thinnbd::config::Config;
use thinnbd::pdata::block_io::{BlockIo, FileBlockIo, BLOCK_SIZE};
use thinnbd::service::control::{self, Request};
use thinnbd::thin::{check, ThinMetadata};
use thinnbd::util::{format_size, parse_size, resolve_listen_addr};
use thinnbd::volume::registry::Registry;
use thinnbd::volume::{
    backing, take_lock, AccessChange, CheckReport, CreateOptions, Grant, NewSize, OwnerPolicy,
    PoolBacking, PoolLocation, PoolPaths, PoolReport, VolumeInfo, Volumes,
};

/// Exit status of a command that failed (an error was printed).
const EXIT_FAILED: u8 = 2;
/// Exit status of `check` when it found problems.
const EXIT_PROBLEMS: u8 = 1;
/// Exit status of a command line that could not be parsed (sysexits' EX_USAGE), kept apart
/// from failures so that scripts can tell a typo from a refusal.
const EXIT_USAGE: u8 = 64;

#[derive(Parser)]
#[command(
    name = "thinnbd",
    version,
    about = "Thin-provisioned volumes in a dm-thin format pool, served over NBD",
    after_help = "Sizes: a whole number with an optional binary unit K, M, G, T or P (powers of \
                  1024), optionally followed by i and/or B, in any case: 1g = 1G = 1GiB = 1GB.\n\
                  Exit status: 0 success, 1 check found problems, 2 the command failed, \
                  64 the command line is wrong (usage error)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// `--json`, on every command that prints a result (a plain comment: a doc comment on a
// flattened struct could become the command's description).
#[derive(Args)]
struct JsonOutput {
    /// Print the result as JSON (for scripts) instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Serve every volume of a pool as an NBD export (creates ./thinnbd-pool on first start;
    /// any other missing pool only with --create).
    Serve(ServeArgs),
    /// Create a pool or show its status.
    #[command(subcommand)]
    Pool(PoolCommand),
    /// Create, list, resize, rename or delete volumes.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Snapshot a volume (instant; shares blocks with its origin until either is written).
    Snapshot {
        /// The pool: a directory, or rados:POOL/NAME.
        #[arg(long, value_name = "LOCATION", value_parser = location_value)]
        pool: PoolLocation,
        /// The volume to snapshot.
        origin: String,
        /// The new snapshot's name (it becomes an export).
        name: String,
        /// Make the snapshot read-only (clients cannot write to it).
        #[arg(long)]
        read_only: bool,
        /// A description shown by `volume list` (default: "snapshot of ORIGIN").
        #[arg(long)]
        description: Option<String>,
        #[command(flatten)]
        output: JsonOutput,
    },
    /// Check a metadata file (like thin_check) or a pool (metadata and registry).
    Check {
        /// A metadata file, or a pool: a directory, or rados:POOL/NAME.
        #[arg(value_name = "META|LOCATION", value_parser = location_value)]
        path: PoolLocation,
        #[command(flatten)]
        output: JsonOutput,
    },
    /// Print a metadata file (or a RADOS pool's metadata) as thin_dump XML.
    Dump {
        /// The metadata file (e.g. POOL/metadata), or rados:POOL/NAME.
        #[arg(value_name = "META", value_parser = location_value)]
        metadata: PoolLocation,
        /// Dump the metadata snapshot instead of the live metadata.
        #[arg(short = 'm', long)]
        metadata_snap: bool,
        /// Write the XML to this file instead of standard output.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Print the blocks that differ between two thin devices as thin_delta XML (same,
    /// different, left_only, right_only): `delta META --snap1 ID --snap2 ID` on a metadata file
    /// or device, or `delta --pool LOCATION A B` on two volumes or snapshots of a pool that is
    /// not being served.
    Delta(DeltaArgs),
    /// Write a metadata file from thin_dump XML (like thin_restore; the output must already
    /// exist with its final size, e.g. made by `truncate -s 64M`). Refused while the output's
    /// pool is open, and over valid metadata unless --force.
    Restore {
        /// The thin_dump XML to read.
        #[arg(short, long)]
        input: PathBuf,
        /// The metadata file to write (it must already exist with its final size).
        #[arg(short, long)]
        output: PathBuf,
        /// Overwrite metadata that is still valid (its current content is lost).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Args)]
struct DeltaArgs {
    /// The metadata file or device (e.g. POOL/metadata); with --pool, the first volume.
    #[arg(value_name = "META|A")]
    first: PathBuf,
    /// With --pool: the second volume or snapshot.
    #[arg(
        value_name = "B",
        requires = "pool",
        conflicts_with_all = ["snap1", "snap2", "metadata_snap"]
    )]
    second: Option<String>,
    /// The pool (a directory, or rados:POOL/NAME) whose volumes A and B are compared (its
    /// lock is taken: refused while the pool is served).
    #[arg(
        long,
        value_name = "LOCATION",
        value_parser = location_value,
        requires = "second",
        conflicts_with_all = ["snap1", "snap2", "metadata_snap"]
    )]
    pool: Option<PoolLocation>,
    /// The left thin device id.
    #[arg(long, visible_alias = "thin1", required_unless_present = "pool")]
    snap1: Option<u32>,
    /// The right thin device id.
    #[arg(long, visible_alias = "thin2", required_unless_present = "pool")]
    snap2: Option<u32>,
    /// Read the metadata snapshot instead of the live metadata; `-mBLOCKNR` or
    /// `--metadata-snap=BLOCKNR` only if the superblock's metadata snapshot is at that block.
    #[arg(
        short = 'm',
        long,
        value_name = "BLOCKNR",
        num_args = 0..=1,
        require_equals = true
    )]
    metadata_snap: Option<Option<u64>>,
    /// Every run with its data blocks, grouped by kind (as thin_delta --verbose).
    #[arg(long)]
    verbose: bool,
    #[command(flatten)]
    output: JsonOutput,
}

#[derive(Args)]
struct ServeArgs {
    /// A TOML configuration file (see config/thinnbd.toml); defaults apply without one.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The pool to serve: a directory, or rados:POOL/NAME (overrides pool.dir and
    /// pool.location of the configuration).
    #[arg(long, value_name = "LOCATION", value_parser = location_value)]
    pool: Option<PoolLocation>,
    /// HOST:PORT to listen on (repeatable); replaces the configured list. A host name listens
    /// on every address it resolves to (localhost: 127.0.0.1 and ::1).
    #[arg(long, value_parser = listen_value)]
    listen: Vec<ListenAddrs>,
    /// A unix socket to listen on (a stale socket there is replaced; anything else is an error).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Create the pool if the directory holds none (without it, only the default
    /// ./thinnbd-pool is created on first start).
    #[arg(long)]
    create: bool,
    /// TLS: off, on (clients choose) or require (overrides server.tls).
    #[arg(long, value_name = "off|on|require", value_parser = tls_mode_value)]
    tls: Option<thinnbd::nbd::tls::TlsMode>,
    /// A directory with ca-cert.pem, server-cert.pem, server-key.pem and optionally ca-crl.pem.
    #[arg(long, value_name = "DIR")]
    tls_certificates: Option<PathBuf>,
    /// Require client certificates, checked against ca-cert.pem and ca-crl.pem.
    #[arg(long)]
    tls_verify_peer: bool,
    /// A file of username:hexkey lines (the keys.psk of nbdkit and qemu).
    #[arg(long, value_name = "FILE")]
    tls_psk: Option<PathBuf>,
}

fn tls_mode_value(text: &str) -> Result<thinnbd::nbd::tls::TlsMode, String> {
    thinnbd::nbd::tls::TlsMode::parse(text).ok_or_else(|| "must be off, on or require".to_owned())
}

#[derive(Subcommand)]
enum PoolCommand {
    /// Create an empty pool in DIR, or in RADOS as rados:POOL/NAME.
    Create {
        /// The pool directory (created if missing; must not hold a pool yet), or
        /// rados:POOL/NAME (the RADOS pool must exist).
        #[arg(value_name = "LOCATION", value_parser = location_value)]
        dir: PoolLocation,
        /// Size of the data file, e.g. 64G (or of the part of --data to use).
        #[arg(long, value_parser = size_value)]
        data_size: u64,
        /// Size of a data block, the unit of allocation and sharing (64K to 1G, a power of
        /// two; default 64K in a directory, 1M in RADOS, where each block is an object).
        #[arg(long, value_parser = size_value)]
        block_size: Option<u64>,
        /// A data file or block device to use instead of DIR/data (not for a RADOS pool).
        #[arg(long)]
        data: Option<PathBuf>,
        #[command(flatten)]
        output: JsonOutput,
        /// Size of the metadata file (default: sized for the data and 1000 volumes and
        /// snapshots, as thin_metadata_size estimates).
        #[arg(long, value_name = "SIZE", value_parser = size_value)]
        metadata_size: Option<u64>,
        /// Allocate the data file in full now (like `qemu-img create -o
        /// preallocation=falloc`), so no write can fail for lack of host space.
        #[arg(long)]
        preallocate: bool,
    },
    /// Grow a pool's data and/or metadata, online through a running server or offline.
    /// Without --data-size the data file or device is taken up at its size now (a block
    /// device that was enlarged, a file grown with truncate). Shrinking is refused.
    Grow {
        /// The pool: a directory, or rados:POOL/NAME.
        #[arg(value_name = "LOCATION", value_parser = location_value)]
        dir: PoolLocation,
        /// New size of the data device (a file is extended; a block device must be that
        /// large already).
        #[arg(long, value_name = "SIZE", value_parser = size_value)]
        data_size: Option<u64>,
        /// New size of the metadata file; lifts a refusal for want of metadata space.
        #[arg(long, value_name = "SIZE", value_parser = size_value)]
        metadata_size: Option<u64>,
        #[command(flatten)]
        output: JsonOutput,
    },
    /// Data and metadata used/total, mode, and each volume's mapped size; the owner of a
    /// RADOS pool (read without its lock, also while another host serves it).
    Status {
        /// The pool: a directory, or rados:POOL/NAME.
        #[arg(value_name = "LOCATION", value_parser = location_value)]
        dir: PoolLocation,
        #[command(flatten)]
        output: JsonOutput,
    },
    /// Take a RADOS pool from its owner: blocklist the owner's client (no write of it lands
    /// any more) and break its lock, so that a waiting server takes the pool at once.
    Takeover {
        /// rados:POOL/NAME.
        #[arg(value_name = "LOCATION", value_parser = location_value)]
        location: PoolLocation,
        #[command(flatten)]
        output: JsonOutput,
    },
    /// Copy a pool's metadata device byte for byte to FILE (for thin_check and other tools of
    /// thin-provisioning-tools); takes the pool's lock, so refused while it is served.
    ExportMetadata {
        /// The pool: a directory, or rados:POOL/NAME.
        #[arg(value_name = "LOCATION", value_parser = location_value)]
        location: PoolLocation,
        /// The file to write (replaced if it exists).
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum VolumeCommand {
    /// Create a thin volume (it takes no space until written).
    Create {
        /// The pool: a directory, or rados:POOL/NAME.
        #[arg(long, value_name = "LOCATION", value_parser = location_value)]
        pool: PoolLocation,
        /// The volume's name, also its NBD export name.
        name: String,
        /// The volume's size as clients see it, e.g. 10G.
        #[arg(long, value_parser = size_value)]
        size: u64,
        /// A description shown by `volume list` and sent to NBD clients.
        #[arg(long)]
        description: Option<String>,
        #[command(flatten)]
        output: JsonOutput,
    },
    /// List volumes like lvs: size, data used, exclusive and shared bytes, mode, origin.
    List {
        /// The pool: a directory, or rados:POOL/NAME.
        #[arg(long, value_name = "LOCATION", value_parser = location_value)]
        pool: PoolLocation,
        /// Print sizes in bytes instead of K/M/G/T units.
        #[arg(long)]
        bytes: bool,
        #[command(flatten)]
        output: JsonOutput,
    },
    /// Change a volume's size: SIZE sets it, +SIZE grows by SIZE, -SIZE shrinks by SIZE.
    Resize {
        /// The pool: a directory, or rados:POOL/NAME.
        #[arg(long, value_name = "LOCATION", value_parser = location_value)]
        pool: PoolLocation,
        /// The volume to resize.
        name: String,
        /// The new size (10G), or a change of size (+512M, -1G) as lvresize reads it.
        #[arg(long, allow_hyphen_values = true, value_parser = new_size_value)]
        size: NewSize,
        /// Allow a shrink, which discards the data past the new end (refused without it, and
        /// refused even with it while a client has the volume open).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        output: JsonOutput,
    },
    /// Set which clients may see and open a volume (`KIND:NAME` with KIND cn, dn, san or psk;
    /// `,ro` for read-only). A volume without grants is open to every client the server lets
    /// in; a client not granted sees no such export. New connections follow at once.
    #[command(group(clap::ArgGroup::new("change").required(true).args(["allow", "deny", "clear"])))]
    Access {
        /// The pool: a directory, or rados:POOL/NAME.
        #[arg(long, value_name = "LOCATION", value_parser = location_value)]
        pool: PoolLocation,
        /// The volume.
        name: String,
        /// Grant a client identity, e.g. cn:alice, psk:bob,ro, dn:CN=carol,O=example,
        /// san:host.example (replaces its earlier grant).
        #[arg(long, value_parser = grant_value)]
        allow: Option<Grant>,
        /// Remove the grant of this identity (as it was allowed, without ,ro).
        #[arg(long)]
        deny: Option<String>,
        /// Remove every grant: the volume is open to every client again.
        #[arg(long)]
        clear: bool,
        #[command(flatten)]
        output: JsonOutput,
    },
    /// Rename a volume (its export name changes; refused while a client has it open).
    Rename {
        /// The pool: a directory, or rados:POOL/NAME.
        #[arg(long, value_name = "LOCATION", value_parser = location_value)]
        pool: PoolLocation,
        /// The volume's current name.
        name: String,
        /// The new name.
        new_name: String,
        #[command(flatten)]
        output: JsonOutput,
    },
    /// Delete a volume and free the blocks only it uses (refused while a client has it open).
    Delete {
        /// The pool: a directory, or rados:POOL/NAME.
        #[arg(long, value_name = "LOCATION", value_parser = location_value)]
        pool: PoolLocation,
        /// The volume to delete.
        name: String,
        #[command(flatten)]
        output: JsonOutput,
    },
}

/// The addresses one `--listen` argument stands for.
#[derive(Clone)]
struct ListenAddrs(Vec<SocketAddr>);

fn listen_value(text: &str) -> Result<ListenAddrs, String> {
    resolve_listen_addr(text).map(ListenAddrs)
}

fn location_value(text: &str) -> Result<PoolLocation, String> {
    PoolLocation::parse(text).map_err(|e| e.message())
}

fn grant_value(text: &str) -> Result<Grant, String> {
    Grant::parse(text).map_err(|e| e.message())
}

fn size_value(text: &str) -> Result<u64, String> {
    parse_size(text).ok_or_else(|| {
        format!("{text:?} is not a size (a whole number with an optional K, M, G, T or P, e.g. 4096, 64K, 10G, 1GiB)")
    })
}

fn new_size_value(text: &str) -> Result<NewSize, String> {
    let t = text.trim();
    if let Some(rest) = t.strip_prefix('+') {
        size_value(rest).map(NewSize::GrowBy)
    } else if let Some(rest) = t.strip_prefix('-') {
        size_value(rest).map(NewSize::ShrinkBy)
    } else {
        size_value(t).map(NewSize::Exactly)
    }
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("THINNBD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("thinnbd={level},warn")));
    // Colour only for a person at a terminal: log files and journals get plain text, and
    // NO_COLOR (https://no-color.org: set and not empty) turns it off everywhere.
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr)
        .try_init();
}

fn open_meta(path: &Path, write: bool) -> anyhow::Result<Arc<dyn BlockIo>> {
    Ok(Arc::new(FileBlockIo::open(path, write)?))
}

/// The lock of the pool a metadata file belongs to (its directory, when that holds a pool
/// lock file): a metadata file must not change under a process that has its pool open.
fn lock_pool_of(metadata: &Path) -> anyhow::Result<Option<std::fs::File>> {
    let dir = match metadata.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let paths = PoolPaths::new(dir);
    if !paths.lock.exists() {
        return Ok(None);
    }
    Ok(Some(take_lock(&paths)?))
}

/// Runs `req` on the server that has the pool open on this host, or locally when none does
/// (taking the pool's ownership: Busy, naming the owner, when another process or host has it).
/// The status of a RADOS pool needs no ownership: it is read as the last commit left it.
fn online_or_local(pool: &PoolLocation, req: Request) -> anyhow::Result<serde_json::Value> {
    online_or_local_at(backing(pool)?, req)
}

/// [`online_or_local`] on a backing already at hand (one connection to a cluster, not two).
fn online_or_local_at(
    backing: Box<dyn PoolBacking>,
    req: Request,
) -> anyhow::Result<serde_json::Value> {
    /// How long a RADOS pool's status waits for the server on this host: one that does not
    /// answer (stopped while another host takes the pool) must not hang the command.
    const STATUS_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
    let socket = backing.control_socket();
    if backing.location().is_rados() && matches!(req, Request::Status) {
        if let Some(v) = control::call_within(&socket, &req, STATUS_WAIT)? {
            return Ok(v);
        }
        return Ok(serde_json::to_value(Volumes::status_unowned(&*backing)?)?);
    }
    if let Some(v) = control::call(&socket, &req)? {
        return Ok(v);
    }
    let volumes =
        Volumes::open_backing(backing, Config::default().engine, &OwnerPolicy::default())?;
    let result = control::execute(&volumes, req);
    volumes.shutdown()?;
    Ok(result?)
}

/// The backing of a pool that must exist.
fn existing_pool(location: &PoolLocation) -> anyhow::Result<Box<dyn PoolBacking>> {
    let backing = backing(location)?;
    if !backing.exists()? {
        return Err(backing.no_pool().into());
    }
    Ok(backing)
}

/// Prints the `warnings` list of a control reply to stderr, as LVM prints its warnings.
fn print_warnings(reply: &serde_json::Value) {
    for w in control::reply_warnings(reply) {
        eprintln!("WARNING: {w}");
    }
}

/// Prints `value` as JSON when asked, else the text `human` makes of it.
fn print_result<T: Serialize>(
    output: &JsonOutput,
    value: &T,
    human: impl FnOnce(&T),
) -> anyhow::Result<()> {
    if output.json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        human(value);
    }
    Ok(())
}

fn origin_text(v: &VolumeInfo) -> &str {
    match (&v.origin, v.origin_deleted) {
        (Some(o), _) => o,
        (None, true) => "(deleted)",
        (None, false) => "-",
    }
}

/// A volume's access list as `volume list` shows it.
fn access_text(v: &VolumeInfo) -> String {
    if v.access.is_empty() {
        return "all".into();
    }
    let grants: Vec<String> = (v.access.iter())
        .map(|g| format!("{}{}", g.who, if g.read_only { ",ro" } else { "" }))
        .collect();
    grants.join(" ")
}

fn print_volumes(list: &[VolumeInfo], bytes: bool) {
    let size = |n: u64| if bytes { n.to_string() } else { format_size(n) };
    let optional = |n: Option<u64>| n.map_or_else(|| "?".to_string(), size);
    println!(
        "{:<24} {:>6} {:>10} {:>6} {:>10} {:>10} {:>10} {:<4} {:<24} {:<16} DESCRIPTION",
        "NAME",
        "THIN",
        "SIZE",
        "USED%",
        "MAPPED",
        "EXCLUSIVE",
        "SHARED",
        "MODE",
        "ORIGIN",
        "ACCESS"
    );
    for v in list {
        #[allow(clippy::cast_precision_loss)] // a percentage for display
        let used = 100.0 * v.mapped_bytes as f64 / v.size.max(1) as f64;
        println!(
            "{:<24} {:>6} {:>10} {:>6.2} {:>10} {:>10} {:>10} {:<4} {:<24} {:<16} {}",
            v.name,
            v.thin_id,
            size(v.size),
            used,
            size(v.mapped_bytes),
            optional(v.exclusive_bytes),
            optional(v.shared_bytes),
            if v.read_only { "ro" } else { "rw" },
            origin_text(v),
            access_text(v),
            v.description
        );
    }
}

/// `thinnbd pool export-metadata`: the metadata device, byte for byte, into `file`, under the
/// pool's ownership (so the copy is one commit's). Returns the bytes copied.
fn export_metadata(location: &PoolLocation, file: &Path) -> anyhow::Result<u64> {
    /// Blocks read at once: one RADOS metadata object.
    const CHUNK_BLOCKS: u64 = 256;
    let backing = existing_pool(location)?;
    let _owner = backing
        .take_ownership(&OwnerPolicy::default())
        .with_context(|| format!("{location}: not exported (stop the server first)"))?;
    let io = backing.metadata(false)?;
    let nr_blocks = io.nr_blocks();
    let mut out = BufWriter::new(
        std::fs::File::create(file).with_context(|| format!("creating {}", file.display()))?,
    );
    let mut buf = vec![0u8; thinnbd::util::usize_from_u64(CHUNK_BLOCKS) * BLOCK_SIZE];
    let mut at = 0;
    while at < nr_blocks {
        let count = CHUNK_BLOCKS.min(nr_blocks - at);
        let chunk = &mut buf[..thinnbd::util::usize_from_u64(count) * BLOCK_SIZE];
        io.read_blocks(at, chunk)?;
        out.write_all(chunk)
            .with_context(|| format!("writing {}", file.display()))?;
        at += count;
    }
    out.into_inner()
        .map_err(|e| e.into_error())
        .and_then(|f| f.sync_all())
        .with_context(|| format!("writing {}", file.display()))?;
    Ok(nr_blocks * BLOCK_SIZE as u64)
}

fn print_status(r: &PoolReport) {
    println!("pool:      {}", r.dir.display());
    if let Some(owner) = &r.owner {
        println!("owner:     {owner}");
    }
    println!(
        "mode:      {}{}",
        r.mode,
        if r.low_water_crossed {
            " (below low-water mark)"
        } else {
            ""
        }
    );
    println!("block:     {} bytes", r.block_size);
    println!(
        "data:      {} / {} bytes used",
        r.data_used_bytes, r.data_total_bytes
    );
    println!(
        "metadata:  {} / {} blocks used, {} free, {} kept in reserve",
        r.metadata_used_blocks,
        r.metadata_total_blocks,
        r.metadata_free_blocks,
        r.metadata_reserve_blocks
    );
    if r.metadata_low_water_crossed {
        println!(
            "warning:   free metadata is at or below its low-water mark ({} blocks, {} bytes): grow it with `thinnbd pool grow {} --metadata-size SIZE`",
            r.metadata_low_water_blocks,
            r.metadata_low_water_blocks * 4096,
            r.dir.display()
        );
    }
    println!("low-water: {} bytes of free data", r.low_water_mark_bytes);
    if let Some(free) = r.host_free_bytes {
        println!("host free: {free} bytes on the data file's file system");
    }
    for w in &r.warnings {
        println!("warning:   {w}");
    }
    for v in &r.volumes {
        println!(
            "volume {} thin={} size={} mode={} origin={} mapped={}",
            v.name,
            v.thin_id,
            v.size,
            if v.read_only { "ro" } else { "rw" },
            origin_text(v),
            v.mapped_bytes
        );
    }
}

/// What `check --json` prints.
#[derive(Serialize)]
struct CheckOutput {
    path: PathBuf,
    clean: bool,
    problems: Vec<String>,
    notes: Vec<String>,
}

/// `thinnbd check`: a metadata file, or a pool (a directory or RADOS location).
fn check(location: &PoolLocation, output: &JsonOutput) -> anyhow::Result<ExitCode> {
    const NOT_CHECKED: &str = "not checked";
    let mut problems = Vec::new();
    let mut notes = Vec::new();
    let (meta, report, how) = if let Some(file) = location.dir().filter(|p| !p.is_dir()) {
        (file.display().to_string(), check_unserved(file)?, "")
    } else {
        let backing = backing(location)?;
        let served = control::call(&backing.control_socket(), &Request::CheckMetadata)
            .context(NOT_CHECKED)?;
        let (report, how) = match served {
            Some(v) => (
                serde_json::from_value::<check::Report>(v)?,
                " (the last commit, checked through the running server)",
            ),
            None => (check_pool_unserved(&*backing)?, ""),
        };
        if report.is_clean() {
            let v = online_or_local_at(backing, Request::Check).context(NOT_CHECKED)?;
            let registry: CheckReport = serde_json::from_value(v)?;
            for id in &registry.orphans {
                problems.push(format!(
                    "orphan thin device {id}: in the metadata but named by no volume"
                ));
            }
            problems.extend(registry.problems);
        } else {
            notes.push(
                "the pool's volume registry was not checked: the metadata has problems".into(),
            );
        }
        (metadata_name(location), report, how)
    };
    problems.extend(report.problems.iter().cloned());
    if report.nr_problems > report.problems.len() {
        problems.push(format!(
            "... and {} more problems",
            report.nr_problems - report.problems.len()
        ));
    }
    notes.push(format!(
        "{meta}: transaction {}, {} devices, {} mappings, {} metadata blocks, {} data blocks in use{how}",
        report.transaction_id,
        report.nr_devices,
        report.nr_mappings,
        report.metadata_blocks_used,
        report.data_blocks_used
    ));
    finish_check(location, problems, notes, output)
}

/// A pool's metadata device, named for messages.
fn metadata_name(location: &PoolLocation) -> String {
    match location {
        PoolLocation::Dir(dir) => PoolPaths::new(dir).metadata.display().to_string(),
        PoolLocation::Rados(_) => format!("{location} metadata"),
    }
}

/// Checks the metadata of a pool no server on this host has open, holding the pool's
/// ownership meanwhile (refused while another process or host has it).
fn check_pool_unserved(backing: &dyn PoolBacking) -> anyhow::Result<check::Report> {
    let location = backing.location();
    if let Some(dir) = location.dir() {
        return check_unserved(&PoolPaths::new(dir).metadata);
    }
    if !backing.exists()? {
        return Err(backing.no_pool().into());
    }
    let _owner = backing
        .take_ownership(&OwnerPolicy::default())
        .with_context(|| format!("{location} not checked"))?;
    Ok(check::check(backing.metadata(false)?))
}

fn finish_check(
    location: &PoolLocation,
    problems: Vec<String>,
    notes: Vec<String>,
    output: &JsonOutput,
) -> anyhow::Result<ExitCode> {
    let result = CheckOutput {
        path: PathBuf::from(location.to_string()),
        clean: problems.is_empty(),
        problems,
        notes,
    };
    print_result(output, &result, |r| {
        for n in &r.notes {
            if n.starts_with("the pool") {
                println!("note: {n}");
            } else {
                println!("{n}");
            }
        }
        if r.clean {
            println!("clean");
        }
        for p in &r.problems {
            println!("problem: {p}");
        }
    })?;
    Ok(if result.clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_PROBLEMS)
    })
}

/// Runs a volume command and decodes the volume it reports.
fn volume_request(pool: &PoolLocation, req: Request) -> anyhow::Result<VolumeInfo> {
    let reply = volume_change(pool, req)?;
    print_warnings(&reply);
    Ok(serde_json::from_value(reply)?)
}

/// Runs a command that names volumes; a name that is not there gets the command that lists
/// the ones that are.
fn volume_change(pool: &PoolLocation, req: Request) -> anyhow::Result<serde_json::Value> {
    online_or_local(pool, req).map_err(|e| {
        let missing_volume = e
            .downcast_ref::<thinnbd::Error>()
            .is_some_and(|e| e.kind() == thinnbd::ErrorKind::NotFound)
            && backing(pool).and_then(|b| b.exists()).unwrap_or(false);
        if missing_volume {
            anyhow::anyhow!("{e} (`thinnbd volume list --pool {pool}` lists the volumes)")
        } else {
            e
        }
    })
}

/// Checks a metadata file read directly, holding its pool's lock (when it has one) so that no
/// server changes it meanwhile; a pool that is open elsewhere is "not checked".
fn check_unserved(meta: &Path) -> anyhow::Result<check::Report> {
    let _lock = lock_pool_of(meta).with_context(|| {
        format!(
            "{} not checked (`thinnbd check POOL_DIR` checks a pool through its running server)",
            meta.display()
        )
    })?;
    Ok(check::check(open_meta(meta, false)?))
}

/// thin_delta's `-m` takes the metadata snapshot's block glued on (`-m8`, getopt's optional
/// argument), which clap would read as the flags `-m -8`: for `delta`, whatever follows `-m`
/// in one argument is passed on as `--metadata-snap=` that. (`-m` cannot take a separate
/// value: it would be META.)
fn delta_glued_snap_block(
    args: impl Iterator<Item = std::ffi::OsString>,
) -> Vec<std::ffi::OsString> {
    let mut args: Vec<_> = args.collect();
    if args.get(1).is_some_and(|a| a == "delta") {
        for a in args.iter_mut().skip(2).take_while(|a| *a != "--") {
            let glued = a.to_str().and_then(|s| s.strip_prefix("-m"));
            if let Some(block) = glued.filter(|b| !b.is_empty()) {
                *a = format!("--metadata-snap={block}").into();
            }
        }
    }
    args
}

/// `thinnbd delta`: by thin ids on a metadata file, or by volume names on an unserved pool.
fn delta(args: DeltaArgs) -> anyhow::Result<()> {
    use thinnbd::thin::delta::{write_delta, DeltaFormat, DeltaRoot, DeltaSide, DeltaSource};
    let format = match (args.output.json, args.verbose) {
        (true, verbose) => DeltaFormat::Json { verbose },
        (false, true) => DeltaFormat::XmlVerbose,
        (false, false) => DeltaFormat::Xml,
    };
    // With --pool, the first volume's name (the sides borrow it).
    let first = args.first.to_string_lossy();
    let (_owner, io, meta, left, right) = match (&args.pool, &args.second) {
        (Some(pool), Some(b)) => {
            let backing = existing_pool(pool)?;
            // A served pool rewrites its metadata: hold its ownership while reading it.
            let owner = backing
                .take_ownership(&OwnerPolicy::default())
                .with_context(|| match pool {
                    PoolLocation::Dir(_) => format!(
                        "not compared: stop the server first, or compare a metadata snapshot \
                         with `thinnbd delta {} -m --snap1 ID --snap2 ID`",
                        metadata_name(pool)
                    ),
                    PoolLocation::Rados(_) => "not compared: stop the server first".to_owned(),
                })?;
            let registry = Registry::load_from(backing.registry_store())?;
            let side = |name| {
                let v = registry.get(name).map_err(|e| {
                    anyhow::anyhow!(
                        "{e} in pool {pool} (`thinnbd volume list --pool {pool}` lists the volumes)"
                    )
                })?;
                anyhow::Ok(DeltaSide {
                    id: v.thin_id,
                    name: Some(name),
                })
            };
            (
                Some(owner),
                backing.metadata(false)?,
                metadata_name(pool),
                side(&first)?,
                side(b)?,
            )
        }
        // clap requires --snap1 and --snap2 without --pool.
        _ => (
            None,
            open_meta(&args.first, false)?,
            args.first.display().to_string(),
            DeltaSide::id(args.snap1.context("--snap1 is required")?),
            DeltaSide::id(args.snap2.context("--snap2 is required")?),
        ),
    };
    let root = args
        .metadata_snap
        .map_or(DeltaRoot::Live, DeltaRoot::MetadataSnap);
    let source = DeltaSource::open(io, root).with_context(|| format!("reading {meta}"))?;
    // A large volume's XML runs to megabytes: written a pipe's default capacity at a time.
    let mut out = BufWriter::with_capacity(64 << 10, std::io::stdout().lock());
    write_delta(&source, left, right, format, &mut out).with_context(|| {
        format!(
            "comparing thin devices {} and {} of {meta}",
            left.id, right.id
        )
    })?;
    out.flush()?;
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => {
            let mut config = match &args.config {
                Some(path) => Config::load(path)?,
                None => Config::default(),
            };
            config.apply(thinnbd::config::Overrides {
                pool: args.pool,
                create: args.create,
                listen: args.listen.iter().flat_map(|a| a.0.clone()).collect(),
                socket: args.socket,
                tls: args.tls,
                tls_certificates: args.tls_certificates,
                tls_verify_peer: args.tls_verify_peer,
                tls_psk: args.tls_psk,
            });
            init_logging(&config.log_level);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let served = rt.block_on(thinnbd::service::run(config));
            // A server that lost its pool may leave requests hung in the cluster's client:
            // they must not hold the exit up.
            rt.shutdown_timeout(std::time::Duration::from_secs(1));
            served?;
        }
        Command::Pool(PoolCommand::Create {
            dir,
            data_size,
            block_size,
            data,
            output,
            metadata_size,
            preallocate,
        }) => {
            init_logging("warn");
            let opts = CreateOptions {
                data,
                data_size,
                block_size: block_size.unwrap_or_else(|| dir.default_block_size()),
                metadata_size,
                preallocate,
            };
            Volumes::create_pool(&dir, &opts, Config::default().engine)?;
            let created = serde_json::json!({
                "dir": dir.to_string(),
                "data_size": opts.data_size,
                "block_size": opts.block_size,
            });
            print_result(&output, &created, |_| {
                println!(
                    "created pool {dir} ({} bytes of data, {} byte blocks)",
                    opts.data_size, opts.block_size
                );
            })?;
        }
        Command::Pool(PoolCommand::Grow {
            dir,
            data_size,
            metadata_size,
            output,
        }) => {
            init_logging("warn");
            let req = Request::Grow {
                data_size,
                metadata_size,
            };
            let report: PoolReport = serde_json::from_value(online_or_local(&dir, req)?)?;
            print_result(&output, &report, |r| {
                println!(
                    "pool {dir}: {} bytes of data, {} bytes of metadata",
                    r.data_total_bytes,
                    r.metadata_total_blocks * 4096
                );
            })?;
        }
        Command::Pool(PoolCommand::Status { dir, output }) => {
            let report: PoolReport =
                serde_json::from_value(online_or_local(&dir, Request::Status)?)?;
            print_result(&output, &report, print_status)?;
        }
        Command::Pool(PoolCommand::Takeover { location, output }) => {
            init_logging("warn");
            let fenced = existing_pool(&location)?.take_over()?;
            let result = serde_json::json!({ "pool": location.to_string(), "fenced": fenced });
            print_result(&output, &result, |_| {
                if fenced.is_empty() {
                    println!("pool {location} had no owner to fence");
                }
                for owner in &fenced {
                    println!("fenced {owner}: pool {location} is free to take");
                }
            })?;
        }
        Command::Pool(PoolCommand::ExportMetadata { location, file }) => {
            init_logging("warn");
            let bytes = export_metadata(&location, &file)?;
            eprintln!(
                "copied {bytes} bytes of metadata of {location} to {}",
                file.display()
            );
        }
        Command::Volume(VolumeCommand::Create {
            pool,
            name,
            size,
            description,
            output,
        }) => {
            let v = volume_request(
                &pool,
                Request::Create {
                    name,
                    size,
                    description: description.unwrap_or_default(),
                },
            )?;
            print_result(&output, &v, |v| {
                println!(
                    "created volume {} ({} bytes, thin {})",
                    v.name, v.size, v.thin_id
                );
            })?;
        }
        Command::Volume(VolumeCommand::List {
            pool,
            bytes,
            output,
        }) => {
            let list: Vec<VolumeInfo> =
                serde_json::from_value(online_or_local(&pool, Request::List)?)?;
            print_result(&output, &list, |l| print_volumes(l, bytes))?;
        }
        Command::Volume(VolumeCommand::Resize {
            pool,
            name,
            size,
            force,
            output,
        }) => {
            let v = volume_request(&pool, Request::Resize { name, size, force })?;
            print_result(&output, &v, |v| {
                println!("resized volume {} to {} bytes", v.name, v.size);
            })?;
        }
        Command::Volume(VolumeCommand::Rename {
            pool,
            name,
            new_name,
            output,
        }) => {
            let v = volume_request(
                &pool,
                Request::Rename {
                    name: name.clone(),
                    new_name,
                },
            )?;
            print_result(&output, &v, |v| {
                println!("renamed volume {name} to {}", v.name);
            })?;
        }
        Command::Volume(VolumeCommand::Access {
            pool,
            name,
            allow,
            deny,
            clear,
            output,
        }) => {
            let change = match (allow, deny) {
                (Some(grant), _) => AccessChange::Allow(grant),
                (None, Some(who)) => AccessChange::Deny(who),
                (None, None) => {
                    debug_assert!(clear, "clap requires one of the three");
                    AccessChange::Clear
                }
            };
            let v = volume_request(&pool, Request::Access { name, change })?;
            print_result(&output, &v, |v| {
                println!("volume {}: access {}", v.name, access_text(v));
            })?;
        }
        Command::Volume(VolumeCommand::Delete { pool, name, output }) => {
            volume_change(&pool, Request::Delete { name: name.clone() })?;
            print_result(&output, &serde_json::json!({ "deleted": name }), |_| {
                println!("deleted volume {name}");
            })?;
        }
        Command::Snapshot {
            pool,
            origin,
            name,
            read_only,
            description,
            output,
        } => {
            let v = volume_request(
                &pool,
                Request::Snapshot {
                    origin: origin.clone(),
                    name,
                    read_only,
                    description,
                },
            )?;
            print_result(&output, &v, |v| {
                println!(
                    "created snapshot {} of {origin} (thin {})",
                    v.name, v.thin_id
                );
            })?;
        }
        Command::Check { path, output } => return check(&path, &output),
        Command::Dump {
            metadata,
            metadata_snap,
            output,
        } => {
            let io = match &metadata {
                PoolLocation::Dir(file) => open_meta(file, false)?,
                // Read as it is, as a metadata file is: a dump of a served pool may race a
                // commit (`-m` reads its metadata snapshot, which holds still).
                PoolLocation::Rados(_) => existing_pool(&metadata)?.metadata(false)?,
            };
            let mut out: Box<dyn Write> = match output {
                Some(p) => Box::new(BufWriter::new(
                    std::fs::File::create(&p)
                        .with_context(|| format!("creating {}", p.display()))?,
                )),
                None => Box::new(BufWriter::new(std::io::stdout().lock())),
            };
            if metadata_snap {
                thinnbd::thin::xml::dump_metadata_snap(io, &mut out)?;
            } else {
                thinnbd::thin::xml::dump(&ThinMetadata::open(io)?, &mut out)?;
            }
            out.flush()?;
        }
        Command::Delta(args) => delta(args)?,
        Command::Restore {
            input,
            output,
            force,
        } => {
            let xml = std::fs::File::open(&input)
                .with_context(|| format!("opening {}", input.display()))?;
            if !output.exists() {
                bail!(
                    "{} does not exist: create it with its final size first (e.g. truncate -s 64M)",
                    output.display()
                );
            }
            // Held until the restore is done, so no server opens the pool half-way either.
            let _pool_lock = lock_pool_of(&output).with_context(|| {
                format!(
                    "refusing to write {}: stop the process that has its pool open first",
                    output.display()
                )
            })?;
            let io = open_meta(&output, true)?;
            if let (Some(sb), false) = (thinnbd::thin::superblock::read_valid(&*io), force) {
                bail!(
                    "{} holds valid metadata (transaction {}): restoring would replace it; \
                     add --force to overwrite it (save it first with `thinnbd dump {} -o SAVED.xml`)",
                    output.display(),
                    sb.transaction_id,
                    output.display()
                );
            }
            let md = thinnbd::thin::xml::restore(&mut BufReader::new(xml), io)?;
            drop(md);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse_from(delta_glued_snap_block(std::env::args_os())) {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version are not errors; they print to stdout and exit 0.
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("thinnbd: {e:#}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}
