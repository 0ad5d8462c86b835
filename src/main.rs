//! The `thinnbd` command: serve a pool over NBD, manage pools and volumes, and the metadata
//! tools named after thin-provisioning-tools (dump, restore, check).

use std::fs::OpenOptions;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use thinnbd::config::Config;
use thinnbd::pdata::block_io::{BlockIo, FileBlockIo};
use thinnbd::service::control::{self, Request};
use thinnbd::thin::ThinMetadata;
use thinnbd::util::parse_size;
use thinnbd::volume::{CheckReport, CreateOptions, PoolPaths, PoolReport, VolumeInfo, Volumes};

#[derive(Parser)]
#[command(
    name = "thinnbd",
    version,
    about = "Thin-provisioned volumes in a dm-thin format pool, served over NBD"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve every volume of a pool as an NBD export (creates the default pool on first start).
    Serve(ServeArgs),
    /// Create a pool or show its status.
    #[command(subcommand)]
    Pool(PoolCommand),
    /// Create, list, resize or delete volumes.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Snapshot a volume (instant; shares blocks with its origin until either is written).
    Snapshot {
        #[arg(long)]
        pool: PathBuf,
        origin: String,
        name: String,
        #[arg(long)]
        read_only: bool,
    },
    /// Check a metadata file (like thin_check) or a pool directory (metadata and registry).
    Check {
        /// A metadata file, or a pool directory.
        path: PathBuf,
    },
    /// Print a metadata file as thin_dump XML.
    Dump {
        metadata: PathBuf,
        /// Dump the metadata snapshot instead of the live metadata.
        #[arg(short = 'm', long)]
        metadata_snap: bool,
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Write a metadata file from thin_dump XML (like thin_restore; the output must already
    /// exist with its final size, e.g. made by `truncate -s 64M`).
    Restore {
        #[arg(short, long)]
        input: PathBuf,
        #[arg(short, long)]
        output: PathBuf,
    },
}

#[derive(Args)]
struct ServeArgs {
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    pool: Option<PathBuf>,
    /// ADDR:PORT to listen on (repeatable); replaces the configured list.
    #[arg(long)]
    listen: Vec<String>,
    /// A unix socket to listen on.
    #[arg(long)]
    socket: Option<PathBuf>,
}

#[derive(Subcommand)]
enum PoolCommand {
    /// Create an empty pool in DIR.
    Create {
        dir: PathBuf,
        #[arg(long)]
        data_size: String,
        #[arg(long, default_value = "64K")]
        block_size: String,
        /// A data file or block device to use instead of DIR/data.
        #[arg(long)]
        data: Option<PathBuf>,
    },
    /// Data and metadata used/total, mode, and each volume's mapped size.
    Status {
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum VolumeCommand {
    Create {
        #[arg(long)]
        pool: PathBuf,
        name: String,
        #[arg(long)]
        size: String,
    },
    List {
        #[arg(long)]
        pool: PathBuf,
        #[arg(long)]
        json: bool,
    },
    Resize {
        #[arg(long)]
        pool: PathBuf,
        name: String,
        #[arg(long)]
        size: String,
    },
    Delete {
        #[arg(long)]
        pool: PathBuf,
        name: String,
    },
}

fn size_arg(what: &str, text: &str) -> anyhow::Result<u64> {
    match parse_size(text) {
        Some(n) => Ok(n),
        None => bail!("{what} {text:?} is not a size (e.g. 4096, 64K, 10G, 1T)"),
    }
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("THINNBD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("thinnbd={level},warn")));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn open_meta(path: &Path, write: bool) -> anyhow::Result<Arc<dyn BlockIo>> {
    let f = OpenOptions::new()
        .read(true)
        .write(write)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    Ok(Arc::new(FileBlockIo::new(f)?))
}

/// Runs `req` on the server that has the pool open, or locally when none does.
fn online_or_local(pool: &Path, req: Request) -> anyhow::Result<serde_json::Value> {
    let paths = PoolPaths::new(pool);
    if let Some(v) = control::call(&paths.control_socket, &req)? {
        return Ok(v);
    }
    let volumes = Volumes::open(
        pool,
        thinnbd::service::pool_config(&Config::default_config()),
    )?;
    let result = control::execute(&volumes, req);
    volumes.shutdown()?;
    Ok(result?)
}

fn print_volumes(list: &[VolumeInfo]) {
    println!(
        "{:<24} {:>6} {:>14} {:>14} {:<4} ORIGIN",
        "NAME", "THIN", "SIZE", "MAPPED", "MODE"
    );
    for v in list {
        println!(
            "{:<24} {:>6} {:>14} {:>14} {:<4} {}",
            v.name,
            v.thin_id,
            v.size,
            v.mapped_bytes,
            if v.read_only { "ro" } else { "rw" },
            v.origin.as_deref().unwrap_or("-")
        );
    }
}

fn print_status(r: &PoolReport) {
    println!("pool:      {}", r.dir.display());
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
        "metadata:  {} / {} blocks used",
        r.metadata_used_blocks, r.metadata_total_blocks
    );
    for v in &r.volumes {
        println!(
            "volume {} thin={} size={} mode={} origin={} mapped={}",
            v.name,
            v.thin_id,
            v.size,
            if v.read_only { "ro" } else { "rw" },
            v.origin.as_deref().unwrap_or("-"),
            v.mapped_bytes
        );
    }
}

fn check(path: &Path) -> anyhow::Result<ExitCode> {
    let (meta, dir) = if path.is_dir() {
        (path.join("metadata"), Some(path))
    } else {
        (path.to_path_buf(), None)
    };
    let mut problems = Vec::new();
    if let Some(dir) = dir {
        let v = online_or_local(dir, Request::Check)?;
        let report: CheckReport = serde_json::from_value(v)?;
        for id in &report.orphans {
            problems.push(format!(
                "orphan thin device {id}: in the metadata but named by no volume"
            ));
        }
        problems.extend(report.problems);
        if control::call(&PoolPaths::new(dir).control_socket, &Request::List)?.is_some() {
            println!("note: the pool is being served; its metadata was not checked (stop the server first)");
            return finish_check(problems);
        }
    }
    let report = thinnbd::thin::check::check(open_meta(&meta, false)?);
    problems.extend(report.problems.iter().cloned());
    if report.nr_problems > report.problems.len() {
        problems.push(format!(
            "... and {} more problems",
            report.nr_problems - report.problems.len()
        ));
    }
    println!(
        "{}: transaction {}, {} devices, {} mappings, {} metadata blocks, {} data blocks in use",
        meta.display(),
        report.transaction_id,
        report.nr_devices,
        report.nr_mappings,
        report.metadata_blocks_used,
        report.data_blocks_used
    );
    finish_check(problems)
}

fn finish_check(problems: Vec<String>) -> anyhow::Result<ExitCode> {
    if problems.is_empty() {
        println!("clean");
        return Ok(ExitCode::SUCCESS);
    }
    for p in &problems {
        println!("problem: {p}");
    }
    Ok(ExitCode::from(1))
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => {
            let mut config = match &args.config {
                Some(path) => Config::load(path)?,
                None => Config::default_config(),
            };
            if let Some(p) = args.pool {
                config.pool.dir = p;
            }
            if !args.listen.is_empty() {
                config.server.listen = args
                    .listen
                    .iter()
                    .map(|a| {
                        a.parse()
                            .with_context(|| format!("--listen {a:?} is not ADDR:PORT"))
                    })
                    .collect::<anyhow::Result<_>>()?;
            }
            if args.socket.is_some() {
                // Like qemu-nbd: a socket given alone replaces the TCP listeners.
                if args.listen.is_empty() {
                    config.server.listen.clear();
                }
                config.server.socket = args.socket;
            }
            init_logging(&config.log_level);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(thinnbd::service::run(config))?;
        }
        Command::Pool(PoolCommand::Create {
            dir,
            data_size,
            block_size,
            data,
        }) => {
            init_logging("warn");
            let opts = CreateOptions {
                data,
                data_size: size_arg("--data-size", &data_size)?,
                block_size: size_arg("--block-size", &block_size)?,
            };
            let config = thinnbd::service::pool_config(&Config::default_config());
            Volumes::create_pool(&dir, &opts, config)?;
            println!(
                "created pool {} ({} bytes of data, {} byte blocks)",
                dir.display(),
                opts.data_size,
                opts.block_size
            );
        }
        Command::Pool(PoolCommand::Status { dir, json }) => {
            let report: PoolReport =
                serde_json::from_value(online_or_local(&dir, Request::Status)?)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print_status(&report);
            }
        }
        Command::Volume(VolumeCommand::Create { pool, name, size }) => {
            let size = size_arg("--size", &size)?;
            let v: VolumeInfo =
                serde_json::from_value(online_or_local(&pool, Request::Create { name, size })?)?;
            println!(
                "created volume {} ({} bytes, thin {})",
                v.name, v.size, v.thin_id
            );
        }
        Command::Volume(VolumeCommand::List { pool, json }) => {
            let list: Vec<VolumeInfo> =
                serde_json::from_value(online_or_local(&pool, Request::List)?)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print_volumes(&list);
            }
        }
        Command::Volume(VolumeCommand::Resize { pool, name, size }) => {
            let size = size_arg("--size", &size)?;
            let v: VolumeInfo =
                serde_json::from_value(online_or_local(&pool, Request::Resize { name, size })?)?;
            println!("resized volume {} to {} bytes", v.name, v.size);
        }
        Command::Volume(VolumeCommand::Delete { pool, name }) => {
            online_or_local(&pool, Request::Delete { name: name.clone() })?;
            println!("deleted volume {name}");
        }
        Command::Snapshot {
            pool,
            origin,
            name,
            read_only,
        } => {
            let v: VolumeInfo = serde_json::from_value(online_or_local(
                &pool,
                Request::Snapshot {
                    origin,
                    name,
                    read_only,
                },
            )?)?;
            println!(
                "created snapshot {} of {} (thin {})",
                v.name,
                v.origin.unwrap_or_default(),
                v.thin_id
            );
        }
        Command::Check { path } => return check(&path),
        Command::Dump {
            metadata,
            metadata_snap,
            output,
        } => {
            let io = open_meta(&metadata, false)?;
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
        Command::Restore { input, output } => {
            let xml = std::fs::File::open(&input)
                .with_context(|| format!("opening {}", input.display()))?;
            if !output.exists() {
                bail!(
                    "{} does not exist: create it with its final size first (e.g. truncate -s 64M)",
                    output.display()
                );
            }
            let md =
                thinnbd::thin::xml::restore(&mut BufReader::new(xml), open_meta(&output, true)?)?;
            drop(md);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("thinnbd: {e:#}");
            ExitCode::from(2)
        }
    }
}
