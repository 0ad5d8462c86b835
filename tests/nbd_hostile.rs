//! Hostile and broken clients: random bytes, truncated handshakes, bad magic, huge lengths,
//! requests past the end, and a flood of connections opened and dropped. After each, the
//! server must still be running and serve a normal client.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::memory_server::*;
use common::nbd_client::Client;
use common::pattern::pattern;
use thinnbd::nbd::codec::*;
use thinnbd::nbd::ServerConfig;

const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

/// A normal client still gets correct data.
fn assert_healthy(server: &TestServer) {
    assert!(server.is_running(), "server task ended");
    let mut c = Client::connect_tcp(server.port);
    c.go("small", true);
    let data = pattern(99, 4096);
    c.request_write(1, 8192, &data);
    assert_eq!(c.any_reply(0).error(), 0);
    c.request(Command::Read, 0, 2, 8192, 4096);
    assert_eq!(c.any_reply(0).read_data(8192, 4096), data);
    c.request(Command::Disc, 0, 3, 0, 0);
}

/// Reads until the server closes the connection (or 30 s pass, which fails the test).
fn assert_closed(s: &mut dyn Read) {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("connection not closed by the server: {e}"),
        }
    }
}

fn tcp(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s
}

#[test]
fn random_bytes_in_every_phase() {
    let server = TestServer::start(standard_source());
    for seed in 0..60u64 {
        let junk = pattern(seed, 1 + (seed as usize * 997) % 5000);
        match seed % 3 {
            // Junk instead of client flags.
            0 => {
                let mut s = tcp(server.port);
                let _ = s.write_all(&junk);
                let _ = s.shutdown(Shutdown::Write);
                assert_closed(&mut s);
            }
            // Junk instead of an option.
            1 => {
                let mut c = Client::connect_tcp(server.port);
                let _ = c.s.write_all(&junk);
                c.s.half_close();
                assert_closed(&mut c.s);
            }
            // Junk instead of a request.
            _ => {
                let mut c = Client::connect_tcp(server.port);
                c.go("small", seed % 2 == 0);
                let _ = c.s.write_all(&junk);
                c.s.half_close();
                assert_closed(&mut c.s);
            }
        }
    }
    assert_healthy(&server);
}

#[test]
fn truncated_handshakes_and_bad_magic() {
    let server = TestServer::start(standard_source());
    // Client leaves after part of its flags.
    let mut s = tcp(server.port);
    let mut g = [0u8; GREETING_LEN];
    s.read_exact(&mut g).unwrap();
    s.write_all(&[0, 0]).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert_closed(&mut s);

    // Unknown client flags.
    let mut s = tcp(server.port);
    s.read_exact(&mut g).unwrap();
    s.write_all(&0x8000_0001u32.to_be_bytes()).unwrap();
    assert_closed(&mut s);

    // Half an option header, then gone.
    let mut c = Client::connect_tcp(server.port);
    c.s.write_all(&OptionRequest::List.encode()[..10]).unwrap();
    drop(c);

    // Option announcing more data than it sends.
    let mut c = Client::connect_unix(&server.socket);
    let mut opt = OptionHeader {
        option: OPT_GO,
        length: 100,
    }
    .encode()
    .to_vec();
    opt.extend_from_slice(&[0u8; 20]);
    c.s.write_all(&opt).unwrap();
    drop(c);

    // Bad option magic.
    let mut c = Client::connect_tcp(server.port);
    let mut opt = OptionRequest::List.encode();
    opt[0] ^= 0x55;
    c.s.write_all(&opt).unwrap();
    assert_closed(&mut c.s);

    // Huge option length.
    let mut c = Client::connect_tcp(server.port);
    c.s.write_all(
        &OptionHeader {
            option: OPT_GO,
            length: u32::MAX,
        }
        .encode(),
    )
    .unwrap();
    assert_closed(&mut c.s);

    // Bad request magic after a good handshake.
    let mut c = Client::connect_tcp(server.port);
    c.go("small", false);
    let mut req = Request {
        flags: 0,
        command: Command::Read,
        cookie: 1,
        offset: 0,
        length: 512,
    }
    .encode();
    req[3] ^= 1;
    c.s.write_all(&req).unwrap();
    assert_closed(&mut c.s);

    // A request header cut short.
    let mut c = Client::connect_tcp(server.port);
    c.go("small", false);
    c.s.write_all(&req[..13]).unwrap();
    drop(c);

    // A write that announces more payload than it sends, then leaves.
    let mut c = Client::connect_tcp(server.port);
    c.go("small", false);
    c.request(Command::Write, 0, 1, 0, 65536);
    c.s.write_all(&[1u8; 1000]).unwrap();
    drop(c);

    assert_healthy(&server);
}

#[test]
fn huge_lengths() {
    let server = TestServer::start(standard_source());
    // A write too large even to drain closes the connection without reading it.
    let mut c = Client::connect_tcp(server.port);
    c.go("disk", false);
    c.request(Command::Write, 0, 1, 0, u32::MAX);
    assert_closed(&mut c.s);

    // A huge read gets EINVAL; the connection goes on.
    let mut c = Client::connect_tcp(server.port);
    c.go("disk", true);
    c.request(Command::Read, 0, 1, 0, u32::MAX);
    assert_eq!(c.any_reply(0).error(), EINVAL);
    // Huge trims, zeroes and block status are range-checked, not size-limited.
    c.request(Command::Trim, 0, 2, u64::MAX - 5, u32::MAX);
    assert_eq!(c.any_reply(0).error(), EINVAL);
    c.request(Command::BlockStatus, 0, 3, 0, u32::MAX);
    assert_eq!(c.any_reply(0).error(), EINVAL);
    c.request(Command::WriteZeroes, 0, 4, 0, (64 << 20) - 4096);
    assert_eq!(c.any_reply(0).error(), 0);
    c.request(Command::Read, 0, 5, 0, 4096);
    assert_eq!(c.any_reply(0).read_data(0, 4096), vec![0u8; 4096]);
    assert_healthy(&server);
}

#[test]
fn requests_past_the_end_are_refused_and_the_connection_stays() {
    let server = TestServer::start(standard_source());
    let mut c = Client::connect_unix(&server.socket);
    let (size, _) = c.go("small", true);
    for (i, off) in [size, size + 1, u64::MAX, u64::MAX - 511]
        .into_iter()
        .enumerate()
    {
        let cookie = 10 * i as u64;
        c.request(Command::Read, 0, cookie, off, 512);
        assert_eq!(c.any_reply(0).error(), EINVAL);
        c.request_write(cookie + 1, off, &[9u8; 512]);
        assert_eq!(c.any_reply(0).error(), ENOSPC);
        c.request(Command::Cache, 0, cookie + 2, off, 512);
        assert_eq!(c.any_reply(0).error(), EINVAL);
        c.request(Command::BlockStatus, 0, cookie + 3, off, 512);
        assert_eq!(c.any_reply(0).error(), EINVAL);
    }
    // The last 512 bytes are fine.
    c.request_write(100, size - 512, &[9u8; 512]);
    assert_eq!(c.any_reply(0).error(), 0);
    c.request(Command::Read, 0, 101, size - 512, 512);
    assert_eq!(c.any_reply(0).read_data(size - 512, 512), vec![9u8; 512]);
    assert_healthy(&server);
}

#[test]
fn ten_thousand_connections_opened_and_dropped() {
    // A small connection cap proves permits come back when clients vanish.
    let config = ServerConfig {
        max_connections: 64,
        ..ServerConfig::default()
    };
    let server = TestServer::start_with(standard_source(), config);
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut done = 0u32;
    for i in 0..10_000u32 {
        if Instant::now() > deadline {
            break;
        }
        match i % 4 {
            // Connect and vanish at once.
            0 => drop(TcpStream::connect(("127.0.0.1", server.port)).unwrap()),
            // Over the unix socket.
            1 => drop(UnixStream::connect(&server.socket).unwrap()),
            // Read the greeting first, so the server is mid-handshake.
            2 => {
                let mut s = tcp(server.port);
                let mut g = [0u8; GREETING_LEN];
                s.read_exact(&mut g).unwrap();
            }
            // Finish the handshake, then vanish without NBD_CMD_DISC.
            _ => {
                let mut c = Client::connect_tcp(server.port);
                c.s.write_all(&OptionRequest::ExportName("small".into()).encode())
                    .unwrap();
                let mut r = [0u8; 10];
                c.s.read_exact(&mut r).unwrap();
            }
        }
        done += 1;
    }
    eprintln!("opened and dropped {done} connections");
    assert!(done >= 1000, "only {done} connections in 120 s");
    assert_healthy(&server);
}

#[test]
fn stalled_handshake_times_out_and_frees_its_slot() {
    let config = ServerConfig {
        max_connections: 1,
        handshake_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    };
    let server = TestServer::start_with(standard_source(), config);
    // Holds the only slot without ever negotiating.
    let mut idle = tcp(server.port);
    let mut g = [0u8; GREETING_LEN];
    idle.read_exact(&mut g).unwrap();
    // The next client is served once the idle one has been dropped by the server.
    assert_healthy(&server);
    assert_closed(&mut idle);
}

#[test]
fn shutdown_is_not_held_up_by_a_client_that_never_reads_replies() {
    let config = ServerConfig {
        shutdown_grace: Duration::from_millis(200),
        max_inflight_per_connection: 4,
        ..ServerConfig::default()
    };
    let mut server = TestServer::start_with(standard_source(), config);
    let mut c = Client::connect_tcp(server.port);
    c.go("disk", false);
    // 64 reads of 1 MiB: far more than the socket buffers hold. The sends themselves may
    // block once the server stops reading, so they run on their own thread.
    let sender = std::thread::spawn(move || {
        for i in 0..64u64 {
            let req = Request {
                flags: 0,
                command: Command::Read,
                cookie: i,
                offset: i << 20,
                length: 1 << 20,
            };
            if c.s.write_all(&req.encode()).is_err() {
                break;
            }
        }
        c
    });
    // Let the server fill the socket with replies nobody reads.
    std::thread::sleep(Duration::from_millis(300));
    // stop() panics if serve() has not returned within 60 s.
    server.stop();
    let c = sender.join().unwrap();
    drop(c);
}
