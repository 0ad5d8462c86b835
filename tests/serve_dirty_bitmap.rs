//! The `qemu:dirty-bitmap:NAME` metadata contexts of `thinnbd serve`: what real clients
//! (nbdinfo, qemu-img, nbdsh) see of the blocks two snapshots map differently, the option and
//! request rules at the protocol's edges through the raw client, a snapshot deleted while a
//! client holds its context, and the incremental backup example.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::nbd_client::{Client, Reply, NBD_EINVAL};
use common::nbdsh::nbdsh;
use common::process::{run, run_failing, stdout_of};
use common::qemu::{nbdinfo_map_of, qemu_io_at};
use common::server::*;
use common::tools::*;
use thinnbd::nbd::codec::{
    BlockDescriptor, Chunk, OptionReplyKind, OptionRequest, CMD_FLAG_REQ_ONE, IHAVEOPT,
    META_BASE_ALLOCATION, OPT_LIST_META_CONTEXT, REP_ERR_INVALID, REP_ERR_UNKNOWN, STATE_DIRTY,
};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

/// What changed on `v` between its snapshots `s1` and `s2`, as (offset, length), in order:
/// overwrites of shared blocks, a discard, and a first write to a block never written.
const CHANGED: [(u64, u64); 4] = [
    (MIB, 128 * KIB),
    (4 * MIB, 64 * KIB),
    (20 * MIB, MIB),
    (63 * MIB, 64 * KIB),
];

/// A served pool: `v` (64 MiB) written, snapshot `s1`, the [`CHANGED`] writes, snapshot `s2`;
/// and `other` with its snapshot `other-snap`, a family of its own.
fn family() -> (TestPool, Server) {
    let pool = TestPool::create("1G");
    pool.create_volume("v", "64M");
    pool.create_volume("other", "64M");
    let server = pool.serve();
    let dir = pool.dir_str();
    qemu_io_at(&server.uri("v"), false, &["write -P 0x11 0 8M", "flush"]);
    qemu_io_at(
        &server.uri("other"),
        false,
        &["write -P 0x12 0 8M", "flush"],
    );
    cli_ok(&["snapshot", "--pool", dir, "v", "s1", "--read-only"]);
    cli_ok(&["snapshot", "--pool", dir, "other", "other-snap"]);
    qemu_io_at(
        &server.uri("v"),
        false,
        &[
            "write -P 0x21 1M 128k",
            "discard 4M 64k",
            "write -P 0x22 20M 1M",
            "write -P 0x23 63M 64k",
            "flush",
        ],
    );
    cli_ok(&["snapshot", "--pool", dir, "v", "s2", "--read-only"]);
    (pool, server)
}

/// Rows of a map (offset, length, flags) must tile the export; the dirty ones come back.
fn dirty_ranges(rows: &[(u64, u64, u32)], dirty_bit: u32) -> Vec<(u64, u64)> {
    let mut at = 0;
    for &(offset, length, _) in rows {
        assert_eq!(offset, at, "rows do not follow on: {rows:?}");
        at += length;
    }
    assert_eq!(at, SIZE, "rows do not cover the export: {rows:?}");
    rows.iter()
        .filter(|r| r.2 & dirty_bit != 0)
        .map(|r| (r.0, r.1))
        .collect()
}

#[test]
fn nbdinfo_qemu_img_and_nbdsh_see_the_changed_blocks() {
    if !require_tools(&["nbdinfo", "qemu-io", "qemu-img"]) {
        return;
    }
    let (_pool, server) = family();
    let bitmap = |export: &str, reference: &str| {
        let context = format!("qemu:dirty-bitmap:{reference}");
        dirty_ranges(&nbdinfo_map_of(&server.uri(export), &context), 1)
    };
    assert_eq!(bitmap("s2", "s1"), CHANGED);
    assert_eq!(bitmap("s1", "s2"), CHANGED, "the difference is symmetric");
    assert_eq!(bitmap("v", "s1"), CHANGED);
    assert_eq!(bitmap("s2", "v"), [], "v has not changed since s2");

    // Each export offers exactly the other members of its family.
    let list = stdout_of(Command::new("nbdinfo").args(["--list", &server.uri("")]));
    let contexts_of = |export: &str| -> Vec<String> {
        let section = list
            .split("export=")
            .find(|s| s.starts_with(&format!("\"{export}\":")))
            .unwrap_or_else(|| panic!("no export {export} in:\n{list}"));
        section
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("qemu:") || l.starts_with("base:"))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(
        contexts_of("s2"),
        [
            "base:allocation",
            "qemu:dirty-bitmap:v",
            "qemu:dirty-bitmap:s1"
        ],
        "{list}"
    );
    assert_eq!(
        contexts_of("other"),
        ["base:allocation", "qemu:dirty-bitmap:other-snap"],
        "{list}"
    );

    // qemu-img reads a dirty bitmap in place of allocation: dirty shows as "data": false.
    let opts = format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={},export=s2,\
         x-dirty-bitmap=qemu:dirty-bitmap:s1",
        server.port
    );
    let out =
        stdout_of(Command::new("qemu-img").args(["map", "--output=json", "--image-opts", &opts]));
    let map: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("qemu-img map ({e}): {out}"));
    let rows: Vec<(u64, u64, u32)> = map
        .as_array()
        .expect("qemu-img map rows")
        .iter()
        .map(|r| {
            let dirty = r["data"] == serde_json::Value::Bool(false);
            (
                r["start"].as_u64().expect("start"),
                r["length"].as_u64().expect("length"),
                u32::from(dirty),
            )
        })
        .collect();
    assert_eq!(dirty_ranges(&rows, 1), CHANGED, "{out}");
    // An unrelated name is not offered: qemu-img refuses to open.
    let opts = opts.replace("dirty-bitmap:s1", "dirty-bitmap:other-snap");
    let err =
        run_failing(Command::new("qemu-img").args(["map", "--output=json", "--image-opts", &opts]));
    assert!(err.contains("Could not open"), "{err}");

    // nbdsh: both contexts selected, one block status answers both.
    let Some(mut sh) = nbdsh() else { return };
    let script = format!(
        r#"
h.add_meta_context("base:allocation")
h.add_meta_context("qemu:dirty-bitmap:s1")
h.add_meta_context("qemu:dirty-bitmap:other-snap")
h.connect_uri("{uri}")
assert h.can_meta_context("base:allocation")
assert h.can_meta_context("qemu:dirty-bitmap:s1")
assert not h.can_meta_context("qemu:dirty-bitmap:other-snap")
seen = {{}}
def answer(context, offset, entries, err):
    seen[context] = list(entries)
    return 0
h.block_status(2 << 20, 0, answer)
assert seen == {{
    "base:allocation": [2 << 20, 0],
    "qemu:dirty-bitmap:s1": [1 << 20, 0, 128 << 10, 1, (1 << 20) - (128 << 10), 0],
}}, seen
print("nbdsh ok")
"#,
        uri = server.uri("s2")
    );
    let out = run(sh.args(["-c", &script]));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("nbdsh ok"),
        "nbdsh: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    server.stop();
}

/// The context queries of LIST (`set == false`) or SET for `export`.
fn meta(c: &mut Client, set: bool, export: &str, queries: &[&str]) -> Vec<OptionReplyKind> {
    let req = OptionRequest::MetaContext {
        set,
        export: export.to_owned(),
        queries: queries.iter().map(|q| q.to_string()).collect(),
    };
    c.option(&req).into_iter().map(|r| r.kind).collect()
}

/// The names a LIST or SET reply offers, in order, when it ends in ACK.
fn names(replies: &[OptionReplyKind]) -> Vec<String> {
    assert_eq!(replies.last(), Some(&OptionReplyKind::Ack), "{replies:?}");
    replies
        .iter()
        .filter_map(|r| match r {
            OptionReplyKind::MetaContext { name, .. } => Some(name.clone()),
            _ => None,
        })
        .collect()
}

fn is_error(replies: &[OptionReplyKind], code: u32) -> bool {
    matches!(replies, [OptionReplyKind::Error { code: c, .. }] if *c == code)
}

/// The block status chunks of a reply as (context id, descriptors); panics on an error.
fn status_chunks(reply: &Reply) -> Vec<(u32, Vec<BlockDescriptor>)> {
    let Reply::Structured { chunks, .. } = reply else {
        panic!("block status answered with {reply:?}")
    };
    chunks
        .iter()
        .map(|(_, c)| match c {
            Chunk::BlockStatus {
                context_id,
                descriptors,
            } => (*context_id, descriptors.clone()),
            other => panic!("unexpected chunk {other:?}"),
        })
        .collect()
}

fn block_status(c: &mut Client, flags: u16, offset: u64, length: u32) -> Reply {
    let cookie = c
        .send(
            common::nbd_client::Command::BlockStatus,
            flags,
            offset,
            length,
            &[],
        )
        .expect("send block status");
    let reply = c.any_reply(0);
    assert_eq!(reply.cookie(), cookie);
    reply
}

#[test]
fn raw_protocol_lists_selects_and_answers_at_the_edges() {
    if !require_tool("qemu-io") {
        return;
    }
    let (pool, server) = family();
    let mut c = Client::connect_tcp(server.port);

    // Before structured replies LIST works, SET is refused.
    assert_eq!(
        names(&meta(&mut c, false, "s2", &["qemu:dirty-bitmap:"])),
        ["qemu:dirty-bitmap:v", "qemu:dirty-bitmap:s1"]
    );
    let r = meta(&mut c, true, "s2", &["qemu:dirty-bitmap:s1"]);
    assert!(is_error(&r, REP_ERR_INVALID), "{r:?}");
    let r = c.option(&OptionRequest::StructuredReply);
    assert_eq!(r[0].kind, OptionReplyKind::Ack);

    // LIST: everything, a namespace, a prefix, exact names; unrelated and unknown names are
    // not offered; an unknown export is an error.
    let all = [
        "base:allocation",
        "qemu:dirty-bitmap:v",
        "qemu:dirty-bitmap:s1",
    ];
    assert_eq!(names(&meta(&mut c, false, "s2", &[])), all);
    assert_eq!(names(&meta(&mut c, false, "s2", &["qemu:"])), all[1..]);
    assert_eq!(names(&meta(&mut c, false, "s2", &["qemu"])), all[1..]);
    assert_eq!(
        names(&meta(
            &mut c,
            false,
            "s2",
            &["qemu:dirty-bitmap:s1", "base:"]
        )),
        ["base:allocation", "qemu:dirty-bitmap:s1"]
    );
    let unrelated = [
        "qemu:dirty-bitmap:other-snap",
        "qemu:dirty-bitmap:nosuch",
        "qemu:dirty-bitmap:s2",
        "qemu:dirty-bit",
        "qemu:allocation-depth",
    ];
    assert_eq!(
        names(&meta(&mut c, false, "s2", &unrelated)),
        [] as [&str; 0]
    );
    let r = meta(&mut c, false, "nosuch", &["qemu:"]);
    assert!(is_error(&r, REP_ERR_UNKNOWN), "{r:?}");
    // A name longer than the protocol allows (4096 bytes) is an invalid option, no more. The
    // codec would clamp it, so the option is built by hand.
    let long = format!("qemu:dirty-bitmap:{}", "x".repeat(4096));
    let mut data = Vec::new();
    for string in ["s2", long.as_str()] {
        data.extend_from_slice(&(string.len() as u32).to_be_bytes());
        data.extend_from_slice(string.as_bytes());
        if string == "s2" {
            data.extend_from_slice(&1u32.to_be_bytes());
        }
    }
    let mut option = IHAVEOPT.to_be_bytes().to_vec();
    option.extend_from_slice(&OPT_LIST_META_CONTEXT.to_be_bytes());
    option.extend_from_slice(&(data.len() as u32).to_be_bytes());
    option.extend_from_slice(&data);
    c.write_bytes(&option).expect("send the long query");
    let r = [c.read_option_reply().kind];
    assert!(is_error(&r, REP_ERR_INVALID), "{r:?}");

    // SET takes exact names only, and gives each its own id.
    let set = meta(
        &mut c,
        true,
        "s2",
        &["qemu:", "qemu:dirty-bitmap:other-snap"],
    );
    assert_eq!(names(&set), [] as [&str; 0]);
    let set = meta(
        &mut c,
        true,
        "s2",
        &[
            META_BASE_ALLOCATION,
            "qemu:dirty-bitmap:s1",
            "qemu:dirty-bitmap:s1",
        ],
    );
    assert_eq!(names(&set), ["base:allocation", "qemu:dirty-bitmap:s1"]);
    let ids: Vec<u32> = set
        .iter()
        .filter_map(|r| match r {
            OptionReplyKind::MetaContext { id, .. } => Some(*id),
            _ => None,
        })
        .collect();
    assert_eq!(ids.len(), 2);
    assert_ne!(ids[0], ids[1]);
    let (base_id, bitmap_id) = (ids[0], ids[1]);
    c.go("s2", false);

    // One chunk per context, each within the request; the bitmap's are the changed blocks.
    let chunks = status_chunks(&block_status(&mut c, 0, 0, SIZE as u32));
    assert_eq!(chunks.len(), 2, "{chunks:?}");
    assert_eq!(chunks[0].0, base_id);
    assert_eq!(chunks[1].0, bitmap_id);
    let mut rows = Vec::new();
    let mut at = 0;
    for d in &chunks[1].1 {
        rows.push((at, u64::from(d.length), d.flags));
        at += u64::from(d.length);
    }
    assert_eq!(dirty_ranges(&rows, STATE_DIRTY), CHANGED);
    // Unaligned: cut to the request on both ends.
    let chunks = status_chunks(&block_status(&mut c, 0, MIB + 1000, 4096));
    assert_eq!(
        chunks[1].1,
        [BlockDescriptor {
            length: 4096,
            flags: STATE_DIRTY
        }]
    );
    let chunks = status_chunks(&block_status(&mut c, 0, MIB - 100, 300));
    assert_eq!(
        chunks[1].1,
        [
            BlockDescriptor {
                length: 100,
                flags: 0
            },
            BlockDescriptor {
                length: 200,
                flags: STATE_DIRTY
            }
        ]
    );
    // REQ_ONE: one descriptor per context.
    let chunks = status_chunks(&block_status(&mut c, CMD_FLAG_REQ_ONE, 0, SIZE as u32));
    assert_eq!(
        chunks[1].1,
        [BlockDescriptor {
            length: MIB as u32,
            flags: 0
        }]
    );
    assert_eq!(chunks[0].1.len(), 1);
    // Past the end: EINVAL, and the connection goes on.
    assert_eq!(
        block_status(&mut c, 0, SIZE - 4096, 8192).error(),
        NBD_EINVAL
    );
    assert_eq!(block_status(&mut c, 0, SIZE, 1).error(), NBD_EINVAL);
    assert_eq!(status_chunks(&block_status(&mut c, 0, 0, 4096)).len(), 2);

    // The reference snapshot deleted while this client holds its context: the next block
    // status fails (no stale answer), reads still work, the server is fine.
    cli_ok_when_idle(&["volume", "delete", "--pool", pool.dir_str(), "s1"]);
    let reply = block_status(&mut c, 0, 0, 4096);
    assert_eq!(reply.error(), NBD_EINVAL, "{reply:?}");
    c.request(common::nbd_client::Command::Read, 0, 999, 0, 4096);
    let reply = c.any_reply(4096);
    assert_eq!((reply.cookie(), reply.error()), (999, 0));
    assert!(reply.read_data(0, 4096).iter().all(|&b| b == 0x11));
    c.disconnect();

    // Selecting only what is not offered selects nothing: block status is then invalid.
    let mut c = Client::connect_tcp(server.port);
    let r = c.option(&OptionRequest::StructuredReply);
    assert_eq!(r[0].kind, OptionReplyKind::Ack);
    let set = meta(&mut c, true, "s2", &["qemu:dirty-bitmap:s1"]);
    assert_eq!(names(&set), [] as [&str; 0], "s1 was deleted");
    c.go("s2", false);
    assert_eq!(block_status(&mut c, 0, 0, 4096).error(), NBD_EINVAL);
    c.disconnect();
    server.stop();
}

/// Runs examples/incremental-backup.sh with `args` against the server on `port`.
fn backup_example(port: u16, args: &[&str]) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/incremental-backup.sh");
    let out = Command::new("sh")
        .arg(&script)
        .args(args)
        .env("PATH", path_with_bin())
        .env("THINNBD_PORT", port.to_string())
        .stdin(Stdio::null())
        .output()
        .expect("run the incremental backup example");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "incremental backup example failed:\n{text}"
    );
    text
}

#[test]
fn incremental_backup_example_copies_only_what_changed() {
    if !require_tools(&["nbdcopy", "nbdinfo", "qemu-io"]) || nbdsh().is_none() {
        return;
    }
    let pool = TestPool::create("1G");
    pool.create_volume("data", "256M");
    let server = pool.serve();
    let uri = server.uri("data");
    qemu_io_at(
        &uri,
        false,
        &["write -P 0x31 0 32M", "write -P 0x32 100M 16M", "flush"],
    );
    let tmp = pool.tmp.path();
    let (full, incremental, check) = (
        tmp.join("full.img"),
        tmp.join("incremental.img"),
        tmp.join("s2.img"),
    );
    let path = |p: &Path| p.to_str().expect("utf-8 temp path").to_owned();
    let (full, incremental, check) = (path(&full), path(&incremental), path(&check));
    let dir = pool.dir_str();
    let out = backup_example(server.port, &["full", dir, "data", "s1", &full]);
    assert!(out.contains("full backup of data"), "{out}");

    // 2 MiB + 64 KiB + 3 x 64 KiB change, all aligned to the pool's 64 KiB blocks, plus one
    // unaligned 1-byte write that makes one more block differ.
    qemu_io_at(
        &uri,
        false,
        &[
            "write -P 0x41 4M 2M",
            "write -P 0x42 101M 64k",
            "discard 110M 192k",
            "write -P 0x43 200M 1",
            "flush",
        ],
    );
    let changed = 2 * MIB + 64 * KIB + 192 * KIB + 64 * KIB;
    let out = backup_example(
        server.port,
        &["incremental", dir, "data", "s1", &full, "s2", &incremental],
    );
    let read: u64 = out
        .split("read ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no byte count in:\n{out}"));
    assert_eq!(read, changed, "{out}");

    let copy = run(Command::new("nbdcopy").arg(server.uri("s2")).arg(&check));
    assert!(copy.status.success(), "nbdcopy s2: {copy:?}");
    let cmp = run(Command::new("cmp").args([&incremental, &check]));
    assert!(
        cmp.status.success(),
        "the incremental backup differs from s2: {cmp:?}"
    );
    let names = cli_ok(&["volume", "list", "--pool", dir]);
    assert!(!names.contains("s1 "), "s1 was not deleted:\n{names}");
    assert!(names.contains("s2 "), "{names}");
    server.stop();
}
