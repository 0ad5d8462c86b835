//! `thinnbd serve` with TLS (`--tls`, `--tls-certificates`, `--tls-verify-peer`, `--tls-psk`):
//! real clients (libnbd's nbdinfo, nbdcopy and nbdsh, qemu-io and qemu-img) over X.509 and PSK,
//! TLS 1.2 and 1.3; proto.md's rules for STARTTLS checked byte by byte with the raw client;
//! clients that must be turned away (plain against require, a foreign CA, a revoked or expired
//! certificate, a wrong or unknown PSK, garbage, a handshake that stops half way), each with a
//! reason in the log while the server and its other clients go on; connections that never finish
//! their handshake; SIGHUP reloading the credentials. Credentials are made by the tests.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::nbd_client::Client;
use common::process::{free_port, run, run_failing, stdout_of};
use common::require_tools;
use common::server::{serve_refused, Server, TestPool};
use common::tls::{raw_client, start_tls, Ca, Credentials};
use thinnbd::nbd::codec::{
    OptionReplyKind, OptionRequest, OPT_STARTTLS, REP_ERR_INVALID, REP_ERR_TLS_REQD,
};

const MIB: u64 = 1 << 20;

/// A pool with a 64 MiB volume `v`, and the test's credentials under its temp dir.
fn pool_and_credentials() -> (TestPool, Credentials) {
    let pool = TestPool::create("1G");
    pool.create_volume("v", "64M");
    let creds = Credentials::make(&pool.tmp.path().join("creds"));
    (pool, creds)
}

/// `thinnbd serve` of `pool` on a port and a unix socket, with `args`, and a config file
/// setting `config` in `[server]`.
fn serve(pool: &TestPool, config: &str, args: &[&str]) -> Server {
    let socket = pool.tmp.path().join("nbd.sock");
    let config_file = pool.tmp.path().join("thinnbd.toml");
    std::fs::write(&config_file, format!("[server]\n{config}\n")).unwrap();
    Server::start(
        |cmd| {
            cmd.arg("--pool")
                .arg(&pool.dir)
                .arg("--config")
                .arg(&config_file)
                .args(args);
        },
        pool.tmp.path(),
        Some(socket),
        None,
    )
}

/// A server that requires TLS and client certificates.
fn verify_peer_server(pool: &TestPool, creds: &Credentials, config: &str) -> Server {
    let args = [
        "--tls",
        "require",
        "--tls-certificates",
        p(&creds.server),
        "--tls-verify-peer",
    ];
    serve(pool, config, &args)
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

fn nbds(server: &Server, user: &str, export: &str, query: &str) -> String {
    format!("nbds://{user}localhost:{}/{export}?{query}", server.port)
}

fn nbds_unix(server: &Server, user: &str, export: &str, query: &str) -> String {
    let socket = server.socket.as_ref().expect("unix socket");
    format!(
        "nbds+unix://{user}/{export}?socket={}&{query}",
        socket.display()
    )
}

/// qemu's `--object` for X.509 client credentials in `dir` (`priority`: a GnuTLS priority
/// string, e.g. to hold the client to TLS 1.2).
fn x509_object(dir: &Path, priority: Option<&str>) -> String {
    let mut o = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        dir.display()
    );
    if let Some(p) = priority {
        o.push_str(&format!(",priority={p}"));
    }
    o
}

/// qemu's `--object` for PSK client credentials: `dir/keys.psk`, user `user`.
fn psk_object(psk_file: &Path, user: &str, priority: Option<&str>) -> String {
    let dir = psk_file.parent().expect("psk dir");
    let mut o = format!(
        "tls-creds-psk,id=tls0,dir={},username={user},endpoint=client",
        dir.display()
    );
    if let Some(p) = priority {
        o.push_str(&format!(",priority={p}"));
    }
    o
}

/// qemu-io over TLS with credentials `object` on the TCP port; its output.
fn qemu_io_tls(server: &Server, object: &str, cmds: &[&str]) -> std::process::Output {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["--object", object, "--image-opts"]).arg(format!(
        "driver=nbd,host=localhost,port={},export=v,tls-creds=tls0",
        server.port
    ));
    for c in cmds {
        cmd.args(["-c", c]);
    }
    cmd.stdin(std::process::Stdio::null())
        .output()
        .expect("qemu-io")
}

fn qemu_io_tls_ok(server: &Server, object: &str, cmds: &[&str]) -> String {
    let out = qemu_io_tls(server, object, cmds);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !text.contains("failed") && !text.contains("error"),
        "qemu-io {cmds:?}: {}\n{text}",
        out.status
    );
    text
}

/// Waits (bounded) until the server's log has `count` lines holding every one of `parts`.
fn wait_for_log(server: &Server, parts: &[&str], count: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = server.log_text();
        let n = log
            .lines()
            .filter(|l| parts.iter().all(|p| l.contains(p)))
            .count();
        if n >= count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no {count} log lines with {parts:?} in:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// nbdinfo on `uri` succeeds and says TLS is on.
fn nbdinfo_over_tls(uri: &str) {
    let out = stdout_of(Command::new("nbdinfo").arg(uri));
    assert!(out.contains("with TLS"), "{uri}: {out}");
    assert!(out.contains("export-size: 67108864"), "{uri}: {out}");
}

fn tools_there() -> bool {
    require_tools(&["openssl", "nbdinfo", "nbdcopy", "qemu-io", "qemu-img"])
}

#[test]
fn x509_clients_with_verified_certificates_read_and_write() {
    if !tools_there() {
        return;
    }
    let Some(mut nbdsh) = common::nbdsh::nbdsh() else {
        return;
    };
    let (pool, creds) = pool_and_credentials();
    let server = verify_peer_server(&pool, &creds, "");
    let certs = format!("tls-certificates={}", creds.client.display());
    nbdinfo_over_tls(&nbds(&server, "", "v", &certs));
    nbdinfo_over_tls(&nbds_unix(&server, "", "v", &certs));
    wait_for_log(&server, &["client connected", "x509:CN=alice"], 2);

    // 4 MiB of a pattern in with nbdcopy, back out with nbdcopy over the unix socket.
    let input = pool.tmp.path().join("in.bin");
    let data: Vec<u8> = (0..4 * MIB).map(|i| (i % 251) as u8).collect();
    std::fs::write(&input, &data).unwrap();
    run(Command::new("nbdcopy")
        .arg(&input)
        .arg(nbds(&server, "", "v", &certs)));
    let output = pool.tmp.path().join("out.bin");
    run(Command::new("nbdcopy")
        .arg(nbds_unix(&server, "", "v", &certs))
        .arg(&output));
    let back = std::fs::read(&output).unwrap();
    assert_eq!(back.len() as u64, 64 * MIB);
    assert!(
        back[..data.len()] == data[..],
        "nbdcopy read back other data"
    );

    // nbdsh writes over TLS; qemu-io reads it back over TLS 1.3 and TLS 1.2.
    let script = "import os\nh.set_uri_allow_local_file(True)\nh.connect_uri(os.environ['URI'])\n\
                  h.pwrite(b'\\x5a' * 65536, 8 * 1048576)\nh.flush()\n\
                  assert h.pread(4096, 0) == bytes(i % 251 for i in range(4096))\n\
                  h.shutdown()\nprint('nbdsh ok')\n";
    let out = stdout_of(
        nbdsh
            .env("URI", nbds(&server, "", "v", &certs))
            .args(["-c", script]),
    );
    assert!(out.contains("nbdsh ok"), "{out}");
    qemu_io_tls_ok(
        &server,
        &x509_object(&creds.client, None),
        &["read -P 0x5a 8M 64K"],
    );
    let tls12 = x509_object(&creds.client, Some("NORMAL:-VERS-TLS1.3"));
    qemu_io_tls_ok(
        &server,
        &tls12,
        &["write -P 0x33 9M 64K", "read -P 0x33 9M 64K"],
    );
    wait_for_log(&server, &["client connected", "TLSv1.2 x509:CN=alice"], 1);
    wait_for_log(&server, &["client connected", "TLSv1.3 x509:CN=alice"], 1);
    let img = stdout_of(Command::new("qemu-img").args([
        "info",
        "--object",
        &x509_object(&creds.client, None),
        "--image-opts",
        &format!(
            "driver=nbd,host=localhost,port={},export=v,tls-creds=tls0",
            server.port
        ),
    ]));
    assert!(img.contains("64 MiB"), "{img}");
    // Clients that end with NBD_CMD_DISC end cleanly, whether or not they send close_notify.
    let log = server.log_text();
    assert!(
        !log.lines()
            .any(|l| l.contains("export=v") && l.contains("error=")),
        "{log}"
    );
    server.stop();
}

#[test]
fn bad_x509_clients_are_turned_away_with_a_reason_and_the_server_goes_on() {
    if !tools_there() {
        return;
    }
    let (pool, creds) = pool_and_credentials();
    let server = verify_peer_server(&pool, &creds, "handshake_timeout_secs = 2");
    let good = nbds(
        &server,
        "",
        "v",
        &format!("tls-certificates={}", creds.client.display()),
    );

    // A plain client: nothing is served in clear, not even the list of exports.
    let plain = run_failing(Command::new("nbdinfo").arg(server.uri("v")));
    assert!(!plain.contains("export-size"), "{plain}");
    let list = run_failing(Command::new("nbdinfo").arg("--list").arg(server.uri("")));
    assert!(!list.contains("\"v\""), "{list}");

    // GnuTLS sends no certificate that the server's CA list does not name: a certificate of
    // another CA comes through the raw client (OpenSSL sends it anyway) below.
    for (n, (dir, reason)) in [
        (&creds.anonymous, "peer did not return a certificate"),
        (&creds.stranger, "peer did not return a certificate"),
        (&creds.revoked, "certificate revoked"),
        (&creds.expired, "certificate has expired"),
    ]
    .into_iter()
    .enumerate()
    {
        let uri = nbds(
            &server,
            "",
            "v",
            &format!("tls-certificates={}", dir.display()),
        );
        let out = run_failing(Command::new("nbdinfo").arg(&uri));
        assert!(!out.contains("export-size"), "{uri}: {out}");
        wait_for_log(&server, &["TLS handshake failed", reason], 1);
        wait_for_log(&server, &["TLS handshake failed"], n + 1);
        nbdinfo_over_tls(&good);
    }
    let (mut c, socket) = raw_client(server.port);
    starttls(&mut c);
    // In TLS 1.3 the client is done before the server has checked its certificate.
    if start_tls(&mut c, socket, &creds.ca.cert(), Some(&creds.stranger)).is_ok() {
        assert_closed(&mut c, "a certificate of another CA");
    }
    wait_for_log(
        &server,
        &["TLS handshake failed", "certificate verify failed"],
        1,
    );
    // X.509 clients of the verify-peer server need no PSK, and a PSK client gets nothing.
    let psk = nbds(
        &server,
        "alice@",
        "v",
        &format!("tls-psk-file={}", creds.psk.display()),
    );
    run_failing(Command::new("nbdinfo").arg(&psk));

    // Before STARTTLS every option but ABORT gets NBD_REP_ERR_TLS_REQD.
    let (mut c, _socket) = raw_client(server.port);
    let go = OptionRequest::Info {
        go: true,
        name: "v".into(),
        requests: vec![],
    };
    for req in [
        OptionRequest::List,
        OptionRequest::StructuredReply,
        OptionRequest::Info {
            go: false,
            name: "v".into(),
            requests: vec![],
        },
        go.clone(),
    ] {
        let replies = c.option(&req);
        assert_eq!(replies.len(), 1, "{req:?}: {replies:?}");
        match &replies[0].kind {
            OptionReplyKind::Error { code, .. } => assert_eq!(*code, REP_ERR_TLS_REQD, "{req:?}"),
            other => panic!("{req:?}: {other:?}"),
        }
    }
    let starttls_with_data = OptionRequest::Unknown {
        option: OPT_STARTTLS,
        data: vec![1],
    };
    match &c.option(&starttls_with_data)[0].kind {
        OptionReplyKind::Error { code, .. } => assert_eq!(*code, REP_ERR_INVALID),
        other => panic!("STARTTLS with data: {other:?}"),
    }
    // NBD_OPT_EXPORT_NAME has no error reply: before TLS it ends the session.
    let (mut c, _socket) = raw_client(server.port);
    c.s.write_all(&OptionRequest::ExportName("v".into()).encode())
        .unwrap();
    assert_closed(&mut c, "EXPORT_NAME before STARTTLS");

    // Garbage instead of a ClientHello.
    let (mut c, _socket) = raw_client(server.port);
    starttls(&mut c);
    c.s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_closed(&mut c, "garbage after STARTTLS");
    // A ClientHello that stops half way: cut off at the handshake timeout.
    let (mut c, _socket) = raw_client(server.port);
    starttls(&mut c);
    let started = Instant::now();
    c.s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00])
        .unwrap();
    assert_closed(&mut c, "half a ClientHello");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(20),
        "closed after {waited:?}"
    );
    wait_for_log(&server, &["client disconnected (handshake timed out)"], 1);

    nbdinfo_over_tls(&good);
    server.stop();
}

/// Sends STARTTLS and expects its ACK.
fn starttls(c: &mut Client) {
    let starttls = OptionRequest::Unknown {
        option: OPT_STARTTLS,
        data: vec![],
    };
    let replies = c.option(&starttls);
    assert!(
        matches!(replies[..], [ref r] if matches!(r.kind, OptionReplyKind::Ack)),
        "{replies:?}"
    );
}

/// The server closes the connection (bounded wait): a read ends in end-of-file or an error.
fn assert_closed(c: &mut Client, what: &str) {
    c.s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut buf = [0u8; 1024];
    loop {
        match c.s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e) => {
                assert!(
                    e.kind() != std::io::ErrorKind::WouldBlock
                        && e.kind() != std::io::ErrorKind::TimedOut,
                    "{what}: the server kept the connection open"
                );
                return;
            }
        }
    }
}

#[test]
fn psk_clients_over_tls_1_2_and_1_3_and_bad_keys() {
    if !tools_there() {
        return;
    }
    let (pool, creds) = pool_and_credentials();
    let server = serve(&pool, "", &["--tls", "require", "--tls-psk", p(&creds.psk)]);
    let key = |file: &Path| format!("tls-psk-file={}", file.display());
    nbdinfo_over_tls(&nbds(&server, "alice@", "v", &key(&creds.psk)));
    nbdinfo_over_tls(&nbds_unix(&server, "alice@", "v", &key(&creds.psk)));
    qemu_io_tls_ok(
        &server,
        &psk_object(&creds.psk, "alice", None),
        &["write -P 0x44 0 64K", "read -P 0x44 0 64K"],
    );
    qemu_io_tls_ok(
        &server,
        &psk_object(
            &creds.psk,
            "alice",
            Some("NORMAL:-VERS-TLS1.3:+PSK:+ECDHE-PSK"),
        ),
        &["read -P 0x44 0 64K"],
    );
    wait_for_log(&server, &["client connected", "TLSv1.3 psk:alice"], 3);
    wait_for_log(&server, &["client connected", "TLSv1.2 psk:alice"], 1);

    // A wrong key for alice, a user the server does not know: refused, nothing served.
    let out = run_failing(Command::new("nbdinfo").arg(nbds(
        &server,
        "alice@",
        "v",
        &key(&creds.wrong_psk),
    )));
    assert!(!out.contains("export-size"), "{out}");
    let out = run_failing(Command::new("nbdinfo").arg(nbds(
        &server,
        "mallory@",
        "v",
        &key(&creds.unknown_psk),
    )));
    assert!(!out.contains("export-size"), "{out}");
    wait_for_log(&server, &["unknown username", "mallory"], 1);
    wait_for_log(&server, &["TLS handshake failed"], 2);
    let out = qemu_io_tls(
        &server,
        &psk_object(&creds.wrong_psk, "alice", None),
        &["read 0 4K"],
    );
    assert!(!out.status.success(), "qemu-io with a wrong key succeeded");

    nbdinfo_over_tls(&nbds(&server, "alice@", "v", &key(&creds.psk)));
    server.stop();
}

#[test]
fn optional_tls_serves_both_and_starttls_forgets_what_came_before() {
    if !tools_there() {
        return;
    }
    let (pool, creds) = pool_and_credentials();
    // A second listener beyond the loopback: TLS is optional there, so the start warns.
    let wide = format!("0.0.0.0:{}", free_port());
    let local = format!("127.0.0.1:{}", free_port());
    let server = serve(
        &pool,
        "tls = \"on\"",
        &[
            "--tls-certificates",
            p(&creds.server),
            "--listen",
            &wide,
            "--listen",
            &local,
        ],
    );
    wait_for_log(&server, &["WARN", "without --tls=require", "0.0.0.0"], 1);
    assert!(
        !server
            .log_text()
            .lines()
            .any(|l| l.contains("without --tls=require") && l.contains("127.0.0.1")),
        "{}",
        server.log_text()
    );
    let plain = stdout_of(Command::new("nbdinfo").arg(server.uri("v")));
    assert!(plain.contains("without TLS"), "{plain}");
    let ca_only = format!("tls-certificates={}", creds.anonymous.display());
    nbdinfo_over_tls(&nbds(&server, "", "v", &ca_only));
    wait_for_log(&server, &["client connected", "anonymous"], 1);

    // Structured replies chosen in clear do not survive STARTTLS.
    let (mut c, socket) = raw_client(server.port);
    assert!(matches!(
        c.option(&OptionRequest::StructuredReply)[0].kind,
        OptionReplyKind::Ack
    ));
    starttls(&mut c);
    start_tls(&mut c, socket, &creds.ca.cert(), None).expect("TLS handshake");
    let set_meta = OptionRequest::MetaContext {
        set: true,
        export: "v".into(),
        queries: vec!["base:allocation".into()],
    };
    match &c.option(&set_meta)[0].kind {
        OptionReplyKind::Error { code, .. } => assert_eq!(*code, REP_ERR_INVALID),
        other => panic!("SET_META_CONTEXT after STARTTLS without structured replies: {other:?}"),
    }
    // A second STARTTLS over TLS is invalid.
    let again = OptionRequest::Unknown {
        option: OPT_STARTTLS,
        data: vec![],
    };
    match &c.option(&again)[0].kind {
        OptionReplyKind::Error { code, .. } => assert_eq!(*code, REP_ERR_INVALID),
        other => panic!("STARTTLS over TLS: {other:?}"),
    }
    let (size, _) = c.go("v", false);
    assert_eq!(size, 64 * MIB);
    assert_eq!(c.write_at(1, 0, &[7u8; 4096]), 0);
    assert_eq!(c.read_at(2, 0, 4096).expect("read"), vec![7u8; 4096]);
    // NBD_CMD_DISC: the server answers with close_notify, a clean end of TLS (a read of 0
    // bytes; an end without close_notify would be an error here).
    c.request(common::nbd_client::Command::Disc, 0, 3, 0, 0);
    let mut rest = Vec::new();
    let n =
        c.s.read_to_end(&mut rest)
            .expect("close_notify, then end of file");
    assert_eq!(n, 0);
    wait_for_log(
        &server,
        &["client disconnected (NBD_CMD_DISC)", "export=v"],
        3,
    );
    server.stop();
}

#[test]
fn connections_that_never_finish_their_handshake_do_not_lock_out_others() {
    let pool = TestPool::create("1G");
    pool.create_volume("v", "64M");
    let server = serve(
        &pool,
        "max_connections = 4\nhandshake_timeout_secs = 3",
        &[],
    );
    // Twenty connections that take the greeting and say nothing more.
    let idle: Vec<TcpStream> = (0..20)
        .map(|_| TcpStream::connect(("127.0.0.1", server.port)).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // Honest clients get in at once, not after the idle ones time out.
    for round in 0..3 {
        let started = Instant::now();
        let (mut c, size, _) = Client::open(server.port, "v");
        assert_eq!(size, 64 * MIB);
        assert_eq!(c.write_at(1, 0, &[round; 512]), 0);
        c.disconnect();
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "an honest client waited {:?}",
            started.elapsed()
        );
    }
    wait_for_log(
        &server,
        &["too many connections in their handshake: dropping the oldest"],
        16,
    );
    // Every idle connection is closed: pushed out by newer ones or at the timeout.
    for mut s in idle {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut all = Vec::new();
        if let Err(e) = s.read_to_end(&mut all) {
            let open = matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            );
            assert!(!open, "an idle connection is still open after 30 s");
        }
        assert!(
            all.len() <= 18,
            "an idle connection got {} bytes",
            all.len()
        );
    }
    wait_for_log(&server, &["client disconnected (handshake timed out)"], 1);
    server.stop();
}

#[test]
fn sighup_reloads_credentials_and_keeps_connections() {
    if !require_tools(&["openssl"]) {
        return;
    }
    let (pool, creds) = pool_and_credentials();
    let live = pool.tmp.path().join("live");
    std::fs::create_dir_all(&live).unwrap();
    for f in ["ca-cert.pem", "server-cert.pem", "server-key.pem"] {
        std::fs::copy(creds.server.join(f), live.join(f)).unwrap();
    }
    let server = serve(
        &pool,
        "",
        &["--tls", "require", "--tls-certificates", p(&live)],
    );
    let open_tls = |ca: &Path| -> Result<Client, String> {
        let (mut c, socket) = raw_client(server.port);
        starttls(&mut c);
        start_tls(&mut c, socket, ca, None)?;
        c.go("v", false);
        Ok(c)
    };
    let mut kept = open_tls(&creds.ca.cert()).expect("TLS with the first CA");
    assert_eq!(kept.write_at(1, 0, &[1u8; 4096]), 0);

    // New credentials from a new CA: new clients need it, the open connection goes on.
    let ca2 = Ca::new(&pool.tmp.path().join("ca2"), "second CA");
    ca2.server_dir(&live);
    hangup(&server);
    wait_for_log(&server, &["SIGHUP: TLS credentials reloaded"], 1);
    assert_eq!(kept.read_at(2, 0, 4096).expect("read"), vec![1u8; 4096]);
    assert!(
        open_tls(&creds.ca.cert()).is_err(),
        "the old server certificate is still in use"
    );
    open_tls(&ca2.cert())
        .expect("TLS with the second CA")
        .disconnect();

    // A key that does not load: the old credentials stay, and the log says why.
    std::fs::write(live.join("server-key.pem"), "not a key\n").unwrap();
    hangup(&server);
    wait_for_log(&server, &["not reloaded", "server-key.pem"], 1);
    open_tls(&ca2.cert())
        .expect("TLS after a failed reload")
        .disconnect();
    assert_eq!(kept.read_at(3, 0, 4096).expect("read"), vec![1u8; 4096]);
    kept.disconnect();
    server.stop();
}

fn hangup(server: &Server) {
    let pid = libc::pid_t::try_from(server.pid()).expect("pid fits");
    // SAFETY: kill(2) on the pid of the server child this test spawned and has not reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
}

#[test]
fn bad_tls_settings_stop_the_start_with_the_setting_named() {
    let tmp = tempfile::tempdir().unwrap();
    let pool = tmp.path().join("pool");
    common::server::make_pool(&pool, "1G", &[]);
    let cases: [(&[&str], &str); 4] = [
        (&["--tls", "require"], "server.tls"),
        (
            &["--tls", "on", "--tls-psk", "/nonexistent/keys.psk"],
            "/nonexistent/keys.psk",
        ),
        (
            &["--tls", "on", "--tls-certificates", "/nonexistent"],
            "/nonexistent/server-cert.pem is missing",
        ),
        (
            &["--tls", "on", "--tls-psk", "k", "--tls-verify-peer"],
            "tls_verify_peer",
        ),
    ];
    for (args, says) in cases {
        let (status, stderr) = serve_refused(tmp.path(), |cmd| {
            cmd.arg("--pool").arg(&pool).args(args);
        });
        assert!(!status.success());
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}
