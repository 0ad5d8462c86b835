//! Hostile clients against the real `thinnbd serve`: random bytes, truncated handshakes, bad
//! magic, huge lengths, requests past the end, and 10,000 connections opened and dropped. The
//! server must not crash or hang, well-behaved clients keep working, and its memory stays bounded.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::nbd_client::{Client, Command as NbdCommand, NBD_EINVAL, NBD_ENOSPC};
use common::pattern::pattern;
use common::qemu::qemu_io_at;
use common::server::*;
use common::tools::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use thinnbd::nbd::codec::{
    decode_greeting, OptionHeader, OptionReplyKind, OptionRequest, Request, CLIENT_FIXED_NEWSTYLE,
    CLIENT_NO_ZEROES, GREETING_LEN, IHAVEOPT, OPT_GO,
};

const SIZE: u64 = 64 << 20;

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    s.set_write_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    s
}

/// Reads until the server closes the connection. False if it is still open after the read
/// timeout (a hang detector, 60 s).
fn closed_by_server(s: &mut dyn Read) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false
            }
            Err(_) => return true,
        }
    }
}

fn read_greeting(s: &mut TcpStream) {
    let mut g = [0u8; GREETING_LEN];
    s.read_exact(&mut g).expect("greeting");
    decode_greeting(&g).expect("a fixed newstyle greeting");
}

/// The client flags a well-behaved client answers the greeting with.
const CLIENT_FLAGS: [u8; 4] = (CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes();

fn option_header(option: u32, length: u32) -> [u8; 16] {
    OptionHeader { option, length }.encode()
}

/// The well-behaved client: data written before the attack must read back.
fn good_client_reads(server: &Server, with_qemu: bool) {
    let (mut c, size, _) = Client::open(server.port, "vol");
    assert_eq!(size, SIZE);
    assert_eq!(c.read_at(7, 1 << 20, 4096).expect("read"), pattern(3, 4096));
    c.disconnect();
    if with_qemu {
        qemu_io_at(
            &server.uri("vol"),
            true,
            &["read -P 0x77 0 1M", "read -P 0 2M 1M"],
        );
    }
}

#[test]
fn hostile_clients_do_not_crash_hang_or_bloat_the_server() {
    if !require_tool("qemu-io") {
        return;
    }
    let pool = TestPool::create("1G");
    pool.create_volume("vol", "64M");
    let mut server = pool.serve();
    let port = server.port;
    qemu_io_at(&server.uri("vol"), false, &["write -P 0x77 0 1M", "flush"]);
    {
        let (mut c, _, _) = Client::open(port, "vol");
        assert_eq!(c.write_at(1, 1 << 20, &pattern(3, 4096)), 0);
        c.disconnect();
    }
    good_client_reads(&server, true);
    let rss_before = server.rss_bytes();
    let mut rng = SmallRng::seed_from_u64(0x7468_696e);

    // Random bytes, sent before and after reading the greeting.
    for i in 0..300 {
        let mut s = connect(port);
        if i % 2 == 0 {
            read_greeting(&mut s);
        }
        let n = rng.gen_range(1..8192);
        let junk: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
        let _ = s.write_all(&junk);
        // Twenty or more random bytes cannot be valid flags and an option header: the server
        // must hang up by itself. Shorter junk is a truncated handshake; just drop it.
        if i % 10 == 0 && n >= 20 {
            assert!(
                closed_by_server(&mut s),
                "server kept a junk connection open"
            );
        }
    }
    good_client_reads(&server, false);

    // Truncated handshakes, dropped at each step.
    for step in 0..6 {
        for _ in 0..20 {
            let mut s = connect(port);
            let mut hello = [0u8; 18];
            match step {
                0 => {}
                1 => {
                    let _ = s.read(&mut hello[..5]);
                }
                2 => {
                    read_greeting(&mut s);
                    let _ = s.write_all(&[0, 0]);
                }
                3 => {
                    read_greeting(&mut s);
                    let _ = s.write_all(&CLIENT_FLAGS);
                    let _ = s.write_all(&IHAVEOPT.to_be_bytes()[..6]);
                }
                4 => {
                    // An option announcing 100 bytes and sending 10.
                    read_greeting(&mut s);
                    let _ = s.write_all(&CLIENT_FLAGS);
                    let _ = s.write_all(&option_header(OPT_GO, 100));
                    let _ = s.write_all(&[0u8; 10]);
                }
                _ => {
                    // A GO naming the export, then gone before reading the replies.
                    read_greeting(&mut s);
                    let _ = s.write_all(&CLIENT_FLAGS);
                    let go = OptionRequest::Info {
                        go: true,
                        name: "vol".into(),
                        requests: vec![],
                    };
                    let _ = s.write_all(&go.encode());
                }
            }
        }
    }
    good_client_reads(&server, false);

    // Bad magic: in an option header, and in a transmission request.
    for _ in 0..20 {
        let mut s = connect(port);
        read_greeting(&mut s);
        let _ = s.write_all(&CLIENT_FLAGS);
        let mut bad_magic = option_header(OPT_GO, 0);
        bad_magic[..8].copy_from_slice(b"BADMAGIC");
        let _ = s.write_all(&bad_magic);
        assert!(closed_by_server(&mut s), "bad option magic: not closed");

        let (mut c, _, _) = Client::open(port, "vol");
        let mut req = Request {
            flags: 0,
            command: NbdCommand::Read,
            cookie: 1,
            offset: 0,
            length: 512,
        }
        .encode();
        req[..4].copy_from_slice(&0xdead_beefu32.to_be_bytes());
        let _ = c.s.write_all(&req);
        assert!(closed_by_server(&mut c.s), "bad request magic: not closed");
    }

    // Huge lengths: a 4 GiB option must not be buffered; a 4 GiB write cannot be taken; a
    // 4 GiB read is refused with EINVAL and the connection goes on.
    for _ in 0..10 {
        let mut s = connect(port);
        read_greeting(&mut s);
        let _ = s.write_all(&CLIENT_FLAGS);
        let _ = s.write_all(&option_header(OPT_GO, u32::MAX));
        let _ = s.write_all(&[0u8; 4096]);
        assert!(closed_by_server(&mut s), "4 GiB option: not closed");

        let (mut c, _, _) = Client::open(port, "vol");
        c.request(NbdCommand::Write, 0, 1, 0, u32::MAX);
        let _ = c.s.write_all(&[0u8; 65536]);
        assert!(closed_by_server(&mut c.s), "4 GiB write: not closed");

        let (mut c, _, _) = Client::open(port, "vol");
        assert_eq!(c.read_at(2, 0, u32::MAX), Err(NBD_EINVAL));
        assert_eq!(c.read_at(3, 1 << 20, 4096).expect("read"), pattern(3, 4096));
        c.disconnect();
    }

    // Requests past the end: EINVAL (ENOSPC for writes), the data untouched, the connection
    // usable.
    {
        let (mut c, size, _) = Client::open(port, "vol");
        assert_eq!(c.read_at(1, size - 512, 1024), Err(NBD_EINVAL));
        assert_eq!(c.read_at(2, size, 512), Err(NBD_EINVAL));
        assert_eq!(c.read_at(3, u64::MAX - 100, 512), Err(NBD_EINVAL));
        assert_eq!(c.write_at(4, size - 512, &[1u8; 1024]), NBD_ENOSPC);
        assert_eq!(c.write_at(5, u64::MAX - 511, &[1u8; 512]), NBD_ENOSPC);
        c.request(NbdCommand::Trim, 0, 6, size - 65536, 1 << 20);
        assert_eq!(c.simple_reply(), (NBD_EINVAL, 6));
        assert_eq!(
            c.read_at(7, size - 1024, 1024).expect("read"),
            vec![0u8; 1024]
        );
        assert_eq!(c.read_at(8, 1 << 20, 4096).expect("read"), pattern(3, 4096));
        c.disconnect();
    }
    // Asking for a volume that does not exist is an option error, not a crash.
    {
        let mut c = Client::connect_tcp(port);
        let replies = c.option(&OptionRequest::Info {
            go: true,
            name: "nosuch".into(),
            requests: vec![],
        });
        assert!(
            matches!(replies[..], [ref r] if matches!(r.kind, OptionReplyKind::Error { .. })),
            "GO nosuch: {replies:?}"
        );
    }

    // 100 idle half-open connections held while a real client works.
    let held: Vec<TcpStream> = (0..100).map(|_| connect(port)).collect();
    good_client_reads(&server, true);
    drop(held);

    // 10,000 connections opened and dropped, from 4 threads; bounded at 300 s (a hang).
    let deadline = Instant::now() + Duration::from_secs(300);
    let threads: Vec<_> = (0..4)
        .map(|t| {
            std::thread::spawn(move || {
                for i in 0..2500 {
                    assert!(
                        Instant::now() < deadline,
                        "10,000 connections not done in 300 s"
                    );
                    let mut s = connect(port);
                    match (i + t) % 3 {
                        0 => {}
                        1 => read_greeting(&mut s),
                        _ => {
                            read_greeting(&mut s);
                            let _ = s.write_all(&CLIENT_FLAGS);
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("connection thread");
    }

    // The server really saw them all: at `info` it logs one line per disconnect (bounded wait,
    // as it may still be closing the last ones).
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let seen = server.log_text().matches("client disconnected").count();
        if seen >= 10_000 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {seen} disconnects logged after 10,000 connections"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(server.is_running(), "server died:\n{}", server.log_text());
    good_client_reads(&server, true);
    let rss_after = server.rss_bytes();
    eprintln!(
        "server RSS: {} KiB before, {} KiB after",
        rss_before >> 10,
        rss_after >> 10
    );
    assert!(
        rss_after < rss_before + (64 << 20),
        "RSS grew from {rss_before} to {rss_after} bytes"
    );
    server.stop();
    assert_pool_clean(&pool.dir);
}
