//! The volume commands as LVM users guess them, run through the built binary offline and
//! against a running server: relative resize sizes and refused shrinks, help on every command
//! and flag, `volume list` columns, rename and descriptions, `--json` everywhere, errors said
//! once with documented exit codes, one size rule, host names for `--listen`, and the server's
//! log (no colour codes in a file, a line for each change made through the control socket).

mod common;

use std::process::Command;

use common::nbd_client::Client;
use common::pattern::pattern;
use common::process::free_port;
use common::server::*;
use common::tools::*;

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 64 << 10;

/// Exit status of a failed command and of a usage error, as README documents them.
const EXIT_FAILED: i32 = 2;
const EXIT_USAGE: i32 = 64;

/// `thinnbd ARGS...`, expected to fail with `code`; returns stderr.
fn failing_with(code: i32, args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().expect("run thinnbd");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(code),
        "thinnbd {args:?}\nstdout: {}\nstderr: {stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    stderr
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}):\n{text}"))
}

/// `volume list --json` of a pool, as an array.
fn list(pool: &TestPool) -> Vec<serde_json::Value> {
    let v = json(&cli_ok(&[
        "volume",
        "list",
        "--pool",
        pool.dir_str(),
        "--json",
    ]));
    v.as_array().expect("a JSON array").clone()
}

fn volume<'a>(list: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    list.iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no volume {name} in {list:?}"))
}

fn size_of(pool: &TestPool, name: &str) -> u64 {
    volume(&list(pool), name)["size"].as_u64().expect("size")
}

#[test]
fn resize_plus_grows_and_keeps_the_data() {
    let pool = TestPool::create("2G");
    let p = pool.dir_str();
    pool.create_volume("vm1", "1536M");
    let data = pattern(1, 64 << 10);
    let server = pool.serve();
    let (mut c, size, _) = Client::open(server.port, "vm1");
    assert_eq!(size, 1536 * MIB);
    assert_eq!(c.write_at(1, 1200 * MIB, &data), 0);
    c.disconnect();

    // Online: `+512M` grows by 512 MiB (it used to set the size to 512 MiB).
    let out = cli_ok(&["volume", "resize", "--pool", p, "vm1", "--size", "+512M"]);
    assert!(out.contains("2147483648"), "{out}");
    assert_eq!(size_of(&pool, "vm1"), 2048 * MIB);
    let (mut c, size, _) = Client::open(server.port, "vm1");
    assert_eq!(size, 2048 * MIB);
    assert_eq!(c.read_at(2, 1200 * MIB, 64 << 10), Ok(data.clone()));
    c.disconnect();
    server.stop();

    // Offline, and the other spellings: `+1g`, an absolute size that grows.
    cli_ok(&["volume", "resize", "--pool", p, "vm1", "--size", "+1g"]);
    assert_eq!(size_of(&pool, "vm1"), 3072 * MIB);
    cli_ok(&["volume", "resize", "--pool", p, "vm1", "--size", "4G"]);
    assert_eq!(size_of(&pool, "vm1"), 4096 * MIB);
    let server = pool.serve();
    let (mut c, _, _) = Client::open(server.port, "vm1");
    assert_eq!(c.read_at(3, 1200 * MIB, 64 << 10), Ok(data));
    c.disconnect();
    server.stop();
    assert_pool_clean(&pool.dir);
}

#[test]
fn shrink_needs_force_and_no_client() {
    let pool = TestPool::create("2G");
    let p = pool.dir_str();
    pool.create_volume("vm1", "1536M");
    let data = pattern(2, 64 << 10);

    // Offline, without --force: refused, size kept.
    for size in ["1G", "-512M"] {
        let err = failing_with(
            EXIT_FAILED,
            &["volume", "resize", "--pool", p, "vm1", "--size", size],
        );
        assert!(err.contains("--force"), "says how to shrink anyway: {err}");
        assert_eq!(size_of(&pool, "vm1"), 1536 * MIB);
    }

    let server = pool.serve();
    let (mut c, _, _) = Client::open(server.port, "vm1");
    assert_eq!(c.write_at(1, 1200 * MIB, &data), 0);
    // Online, without --force: refused.
    let err = failing_with(
        EXIT_FAILED,
        &["volume", "resize", "--pool", p, "vm1", "--size=-512M"],
    );
    assert!(err.contains("--force"), "{err}");
    // With --force while a client has it open: still refused, naming the volume and the fix.
    let err = failing_with(
        EXIT_FAILED,
        &[
            "volume", "resize", "--pool", p, "vm1", "--size", "-512M", "--force",
        ],
    );
    assert!(
        err.contains("\"vm1\"") && err.contains("disconnect"),
        "names the volume and the fix: {err}"
    );
    assert_eq!(size_of(&pool, "vm1"), 1536 * MIB);
    assert_eq!(c.read_at(2, 1200 * MIB, 64 << 10), Ok(data.clone()));
    c.disconnect();

    // Once the client has gone, --force shrinks.
    cli_ok_when_idle(&[
        "volume", "resize", "--pool", p, "vm1", "--size", "-512M", "--force",
    ]);
    assert_eq!(size_of(&pool, "vm1"), 1024 * MIB);
    // A shrink past zero is an error, not a wrap-around.
    failing_with(
        EXIT_FAILED,
        &[
            "volume", "resize", "--pool", p, "vm1", "--size", "-2G", "--force",
        ],
    );
    assert_eq!(size_of(&pool, "vm1"), 1024 * MIB);
    server.stop();
    assert_pool_clean(&pool.dir);
}

/// Subcommand names listed under "Commands:" in a help text (without `help`).
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| *n != "help")
        .map(str::to_owned)
        .collect()
}

/// Entries of the "Arguments:" and "Options:" sections of a help text that have no text.
fn undocumented(help: &str) -> Vec<String> {
    let indent = |l: &str| l.len() - l.trim_start().len();
    // An entry starts at most 6 columns in with a flag or an argument; wrapped help text sits
    // further in.
    let is_entry = |l: &str| indent(l) <= 6 && l.trim_start().starts_with(['-', '<', '[']);
    let mut missing = Vec::new();
    let mut in_section = false;
    let lines: Vec<&str> = help.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if !line.starts_with(' ') {
            in_section = line.starts_with("Arguments:") || line.starts_with("Options:");
            continue;
        }
        if !in_section || !is_entry(line) {
            continue;
        }
        let entry = line.trim_start();
        // Text on the same line after a gap of two spaces, or on the next, deeper line.
        let same_line = entry
            .split_once("  ")
            .is_some_and(|(_, t)| !t.trim().is_empty());
        let next_line = lines
            .get(i + 1)
            .is_some_and(|n| !n.trim().is_empty() && !is_entry(n) && indent(n) > indent(line));
        if !same_line && !next_line {
            missing.push(entry.to_owned());
        }
    }
    missing
}

#[test]
fn every_subcommand_and_flag_has_help() {
    let mut todo = vec![Vec::<String>::new()];
    let mut seen = 0;
    let mut problems = Vec::new();
    while let Some(path) = todo.pop() {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let help = cli_ok(&args);
        seen += 1;
        // The line after "Usage:" is the command's own description (clap prints it first).
        if !path.is_empty() && help.starts_with("Usage:") {
            problems.push(format!("{}: no description", path.join(" ")));
        }
        for entry in undocumented(&help) {
            problems.push(format!("{}: {entry} has no help", path.join(" ")));
        }
        for sub in subcommands(&help) {
            let mut p = path.clone();
            p.push(sub);
            todo.push(p);
        }
    }
    assert!(seen >= 15, "walked only {seen} commands");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    let top = cli_ok(&["--help"]);
    assert!(top.contains("Exit status"), "exit codes documented: {top}");
}

#[test]
fn list_shows_sizes_use_sharing_and_deleted_origins() {
    let pool = TestPool::create("1G");
    let p = pool.dir_str();
    pool.create_volume("vm1", "1G");
    let server = pool.serve();
    let (mut c, _, _) = Client::open(server.port, "vm1");
    assert_eq!(c.write_at(1, 0, &pattern(1, BLOCK as usize)), 0);
    assert_eq!(c.write_at(2, MIB, &pattern(2, BLOCK as usize)), 0);
    c.disconnect();
    cli_ok(&["snapshot", "--pool", p, "vm1", "s1"]);
    // vm1 overwrites block 0 (copied away from s1) and writes a new block: three mapped
    // blocks, two its own; s1 keeps the old block 0 alone and shares the one at 1 MiB.
    let (mut c, _, _) = Client::open(server.port, "vm1");
    assert_eq!(c.write_at(3, 0, &pattern(3, BLOCK as usize)), 0);
    assert_eq!(c.write_at(4, 2 * MIB, &pattern(4, BLOCK as usize)), 0);
    c.disconnect();

    let l = list(&pool);
    let vm1 = volume(&l, "vm1");
    assert_eq!(vm1["mapped_bytes"], 3 * BLOCK);
    assert_eq!(vm1["exclusive_bytes"], 2 * BLOCK);
    assert_eq!(vm1["shared_bytes"], BLOCK);
    let s1 = volume(&l, "s1");
    assert_eq!(s1["mapped_bytes"], 2 * BLOCK);
    assert_eq!(s1["exclusive_bytes"], BLOCK);
    assert_eq!(s1["shared_bytes"], BLOCK);
    assert_eq!(s1["origin"], "vm1");

    let text = cli_ok(&["volume", "list", "--pool", p]);
    let header = text.lines().next().expect("a header");
    for col in ["NAME", "SIZE", "USED%", "EXCLUSIVE", "SHARED", "ORIGIN"] {
        assert!(header.contains(col), "no {col} column: {text}");
    }
    let row = text
        .lines()
        .find(|l| l.starts_with("vm1 "))
        .unwrap_or_else(|| panic!("no vm1 row: {text}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    // NAME THIN SIZE USED% MAPPED EXCLUSIVE SHARED MODE ORIGIN
    assert_eq!(&cells[2..7], ["1G", "0.02", "192K", "128K", "64K"], "{row}");
    let bytes = cli_ok(&["volume", "list", "--pool", p, "--bytes"]);
    let row = bytes.lines().find(|l| l.starts_with("vm1 ")).expect("vm1");
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        &cells[2..7],
        ["1073741824", "0.02", "196608", "131072", "65536"]
    );

    // The origin goes; a new volume takes its name (and its thin id): s1 shows the origin as
    // deleted, never the newcomer.
    cli_ok_when_idle(&["volume", "delete", "--pool", p, "vm1"]);
    pool.create_volume("vm1", "1G");
    let l = list(&pool);
    let s1 = volume(&l, "s1");
    assert_eq!(s1["origin"], serde_json::Value::Null, "{s1}");
    assert_eq!(s1["origin_deleted"], true, "{s1}");
    assert_eq!(
        s1["exclusive_bytes"],
        2 * BLOCK,
        "alone with its blocks now"
    );
    let text = cli_ok(&["volume", "list", "--pool", p]);
    let row = text.lines().find(|l| l.starts_with("s1 ")).expect("s1 row");
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells[8], "(deleted)", "ORIGIN: {row}");
    server.stop();
    // Offline, too.
    let row_offline = cli_ok(&["volume", "list", "--pool", p]);
    assert!(row_offline.contains("(deleted)"), "{row_offline}");
}

#[test]
fn rename_and_description() {
    let pool = TestPool::create("1G");
    let p = pool.dir_str();
    cli_ok(&[
        "volume",
        "create",
        "--pool",
        p,
        "vm1",
        "--size",
        "1G",
        "--description",
        "web server disk",
    ]);
    cli_ok(&[
        "snapshot",
        "--pool",
        p,
        "vm1",
        "s1",
        "--description",
        "before the upgrade",
    ]);
    let l = list(&pool);
    assert_eq!(volume(&l, "vm1")["description"], "web server disk");
    assert_eq!(volume(&l, "s1")["description"], "before the upgrade");
    let text = cli_ok(&["volume", "list", "--pool", p]);
    assert!(text.contains("web server disk"), "{text}");

    // Offline rename; the snapshot follows its origin's new name.
    cli_ok(&["volume", "rename", "--pool", p, "vm1", "web1"]);
    let l = list(&pool);
    assert!(l.iter().all(|v| v["name"] != "vm1"), "{l:?}");
    assert_eq!(volume(&l, "web1")["description"], "web server disk");
    assert_eq!(volume(&l, "s1")["origin"], "web1");

    // Online: the export takes the new name; refused while a client has the volume open.
    let server = pool.serve();
    let (c, _, _) = Client::open(server.port, "web1");
    let err = failing_with(
        EXIT_FAILED,
        &["volume", "rename", "--pool", p, "web1", "web2"],
    );
    assert!(
        err.contains("in use") && err.contains("disconnect"),
        "{err}"
    );
    c.disconnect();
    cli_ok_when_idle(&["volume", "rename", "--pool", p, "web1", "web2"]);
    let (c, size, _) = Client::open(server.port, "web2");
    assert_eq!(size, 1 << 30);
    c.disconnect();
    let err = failing_with(
        EXIT_FAILED,
        &["volume", "rename", "--pool", p, "s1", "web2"],
    );
    assert!(err.contains("already exists"), "{err}");
    server.stop();
}

#[test]
fn every_printing_command_speaks_json() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pool");
    let p = dir.to_str().unwrap();
    let v = json(&cli_ok(&[
        "pool",
        "create",
        p,
        "--data-size",
        "1G",
        "--json",
    ]));
    assert_eq!(v["data_size"], 1u64 << 30);
    let v = json(&cli_ok(&[
        "volume", "create", "--pool", p, "vm1", "--size", "1G", "--json",
    ]));
    assert_eq!(
        (v["name"].as_str(), v["size"].as_u64()),
        (Some("vm1"), Some(1 << 30))
    );
    let v = json(&cli_ok(&[
        "volume", "resize", "--pool", p, "vm1", "--size", "+1G", "--json",
    ]));
    assert_eq!(v["size"], 2u64 << 30);
    let v = json(&cli_ok(&["snapshot", "--pool", p, "vm1", "s1", "--json"]));
    assert_eq!(
        (v["name"].as_str(), v["origin"].as_str()),
        (Some("s1"), Some("vm1"))
    );
    let v = json(&cli_ok(&[
        "volume", "rename", "--pool", p, "s1", "s2", "--json",
    ]));
    assert_eq!(v["name"], "s2");
    let v = json(&cli_ok(&["volume", "list", "--pool", p, "--json"]));
    assert_eq!(v.as_array().map(Vec::len), Some(2));
    let v = json(&cli_ok(&["pool", "status", p, "--json"]));
    assert_eq!(v["volumes"].as_array().map(Vec::len), Some(2));
    let v = json(&cli_ok(&["check", p, "--json"]));
    assert_eq!(v["clean"], true, "{v}");
    assert_eq!(v["problems"].as_array().map(Vec::len), Some(0));
    let v = json(&cli_ok(&["volume", "delete", "--pool", p, "s2", "--json"]));
    assert_eq!(v["deleted"], "s2");
}

#[test]
fn errors_are_said_once_with_exit_codes_apart() {
    let pool = TestPool::create("1G");
    let p = pool.dir_str();
    pool.create_volume("vm1", "1G");
    let once = |err: &str, needle: &str| {
        assert_eq!(err.matches(needle).count(), 1, "{needle:?} once in: {err}");
    };
    // Offline, then through the control socket (which used to rebuild the error around its
    // own text).
    let err = failing_with(EXIT_FAILED, &["volume", "delete", "--pool", p, "vm2"]);
    once(&err, "not found");
    once(&err, "no volume named \"vm2\"");
    assert!(
        err.contains("volume list --pool"),
        "says how to see the names: {err}"
    );
    let server = pool.serve();
    let err = failing_with(EXIT_FAILED, &["volume", "delete", "--pool", p, "vm2"]);
    once(&err, "not found");
    once(&err, "no volume named \"vm2\"");
    assert!(err.contains("volume list --pool"), "{err}");
    let err = failing_with(
        EXIT_FAILED,
        &["volume", "create", "--pool", p, "vm1", "--size", "1G"],
    );
    once(&err, "busy");
    once(&err, "already exists");

    // A second server on a port in use: the OS error once.
    let other = TestPool::create("1G");
    let err = failing_with(
        EXIT_FAILED,
        &[
            "serve",
            "--pool",
            other.dir_str(),
            "--listen",
            &format!("127.0.0.1:{}", server.port),
        ],
    );
    once(&err, "Address already in use");
    server.stop();

    // Usage errors have their own exit code.
    let err = failing_with(
        EXIT_USAGE,
        &["volume", "create", "--pool", p, "vm3", "--size", "lots"],
    );
    assert!(err.contains("is not a size"), "{err}");
    failing_with(EXIT_USAGE, &["volume", "frobnicate"]);
    failing_with(EXIT_USAGE, &["serve", "--listen", "nowhere"]);
}

#[test]
fn sizes_follow_one_rule() {
    let pool = TestPool::create("1G");
    for (name, text, bytes) in [
        ("a", "1gb", 1u64 << 30),
        ("b", "10GB", 10 << 30),
        ("c", "1GiB", 1 << 30),
        ("d", "1g", 1 << 30),
        ("e", "512m", 512 * MIB),
        ("f", "2T", 2 << 40),
    ] {
        pool.create_volume(name, text);
        assert_eq!(size_of(&pool, name), bytes, "{text}");
    }
    for bad in ["1.5G", "1x", "G", "10 GB"] {
        let err = failing_with(
            EXIT_USAGE,
            &[
                "volume",
                "create",
                "--pool",
                pool.dir_str(),
                "z",
                "--size",
                bad,
            ],
        );
        assert!(err.contains("is not a size"), "{bad}: {err}");
    }
    // The same rule in the configuration file.
    let config = pool.tmp.path().join("c.toml");
    std::fs::write(&config, "[server]\nmax_request_size = \"64mb\"\n").unwrap();
    let server = Server::start(
        |cmd| {
            cmd.arg("--pool")
                .arg(&pool.dir)
                .arg("--config")
                .arg(&config);
        },
        pool.tmp.path(),
        None,
        Some(pool.dir.join("control.sock")),
    );
    server.stop();
}

#[test]
fn listen_takes_a_host_name() {
    let pool = TestPool::create("1G");
    pool.create_volume("vm1", "1G");
    let port = free_port();
    let server = Server::start(
        |cmd| {
            cmd.arg("--pool")
                .arg(&pool.dir)
                .args(["--listen", &format!("localhost:{port}")]);
        },
        pool.tmp.path(),
        None,
        Some(pool.dir.join("control.sock")),
    );
    let (c, size, _) = Client::open(port, "vm1");
    assert_eq!(size, 1 << 30);
    c.disconnect();
    server.stop();
}

/// `thinnbd serve` as a service manager starts it: stderr is a file, NO_COLOR is not set.
fn serve_without_no_color(pool: &TestPool) -> Server {
    Server::start(
        |cmd| {
            cmd.env_remove("NO_COLOR").arg("--pool").arg(&pool.dir);
        },
        pool.tmp.path(),
        None,
        Some(pool.dir.join("control.sock")),
    )
}

#[test]
fn log_file_has_no_colour_codes() {
    let pool = TestPool::create("1G");
    let server = serve_without_no_color(&pool);
    pool.create_volume("vm1", "1G");
    let (c, _, _) = Client::open(server.port, "vm1");
    c.disconnect();
    server.stop();
    let log = std::fs::read_to_string(pool.tmp.path().join("serve-0.log")).unwrap();
    assert!(log.contains("serving"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a log file:\n{log}"
    );
}

#[test]
fn log_has_a_line_per_change() {
    let pool = TestPool::create("1G");
    let p = pool.dir_str();
    let server = serve_without_no_color(&pool);
    cli_ok(&["volume", "create", "--pool", p, "vm1", "--size", "1G"]);
    cli_ok(&["snapshot", "--pool", p, "vm1", "s1"]);
    cli_ok(&["volume", "resize", "--pool", p, "vm1", "--size", "+1G"]);
    cli_ok(&["volume", "rename", "--pool", p, "s1", "s2"]);
    cli_ok(&["volume", "delete", "--pool", p, "s2"]);
    failing_with(
        EXIT_FAILED,
        &["volume", "resize", "--pool", p, "vm1", "--size", "1G"],
    );
    cli_ok(&["volume", "list", "--pool", p]);
    server.stop();
    let log = std::fs::read_to_string(pool.tmp.path().join("serve-0.log")).unwrap();
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a log file:\n{log}"
    );
    let control: Vec<&str> = log.lines().filter(|l| l.contains("control: ")).collect();
    for change in [
        "create volume \"vm1\"",
        "snapshot volume \"vm1\" as \"s1\"",
        "resize volume \"vm1\" to +1073741824 bytes: done",
        "rename volume \"s1\" to \"s2\"",
        "delete volume \"s2\"",
        "resize volume \"vm1\" to 1073741824 bytes: refused",
    ] {
        assert_eq!(
            control.iter().filter(|l| l.contains(change)).count(),
            1,
            "one line for {change:?} in:\n{log}"
        );
    }
    assert_eq!(control.len(), 6, "reads are not logged as changes:\n{log}");
}

/// Runs `thinnbd serve` under a pseudo-terminal (util-linux `script`), makes one change
/// through its control socket (so that it logs a line), stops it, and returns what the
/// terminal showed.
fn serve_output_on_a_terminal(pool: &TestPool, name: &str, no_color: bool) -> String {
    let p = pool.dir_str();
    let cmd = format!(
        "{}{BIN} serve --pool {p} --listen 127.0.0.1:{port} & pid=$!; \
         for i in $(seq 1200); do [ -S {p}/control.sock ] && break; sleep 0.1; done; \
         {BIN} volume create --pool {p} {name} --size 1G >/dev/null; kill $pid; wait $pid",
        if no_color { "export NO_COLOR=1; " } else { "" },
        port = free_port()
    );
    let out = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .env_remove("NO_COLOR")
        .env("SHELL", "/bin/sh")
        .output()
        .expect("run script");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn terminal_log_is_coloured_unless_no_color() {
    if !require_tool("script") {
        return;
    }
    let pool = TestPool::create("1G");
    let coloured = serve_output_on_a_terminal(&pool, "a", false);
    assert!(coloured.contains("create volume \"a\""), "{coloured}");
    assert!(
        coloured.contains('\u{1b}'),
        "a terminal gets colour: {coloured}"
    );
    let plain = serve_output_on_a_terminal(&pool, "b", true);
    assert!(plain.contains("create volume \"b\""), "{plain}");
    assert!(!plain.contains('\u{1b}'), "NO_COLOR is honoured: {plain}");
}
