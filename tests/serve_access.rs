//! Access per volume with `thinnbd serve` over TLS: each client lists and opens only the
//! volumes granted to it (X.509 common names through the raw client, PSK users through
//! nbdinfo); asking for another volume gets the same answer as a name that does not exist;
//! a read-only grant reads but cannot write (EPERM); a change made online through the control
//! socket holds for the next connection.

mod common;

use std::path::Path;
use std::process::Command;

use common::nbd_client::Client;
use common::process::stdout_of;
use common::require_tools;
use common::server::{cli_ok, Server, TestPool};
use common::tls::{raw_client, start_tls, Credentials};
use thinnbd::nbd::codec::{
    OptionReply, OptionReplyKind, OptionRequest, OPT_STARTTLS, TFLAG_READ_ONLY,
};
use thinnbd::nbd::NBD_EPERM;

/// A pool with volumes `vol-a` and `vol-b`, and the test's credentials.
fn pool_and_credentials() -> (TestPool, Credentials) {
    let pool = TestPool::create("1G");
    pool.create_volume("vol-a", "16M");
    pool.create_volume("vol-b", "16M");
    let creds = Credentials::make(&pool.tmp.path().join("creds"));
    (pool, creds)
}

fn access(pool: &TestPool, name: &str, change: &[&str]) {
    let mut args = vec!["volume", "access", "--pool", pool.dir_str(), name];
    args.extend_from_slice(change);
    cli_ok(&args);
}

fn serve(pool: &TestPool, args: &[&str]) -> Server {
    Server::start(
        |cmd| {
            cmd.arg("--pool").arg(&pool.dir).args(args);
        },
        pool.tmp.path(),
        None,
        None,
    )
}

/// A raw client that went through STARTTLS with the client certificate in `client_dir`.
fn tls_client(server: &Server, creds: &Credentials, client_dir: &Path) -> Client {
    let (mut c, socket) = raw_client(server.port);
    let starttls = OptionRequest::Unknown {
        option: OPT_STARTTLS,
        data: vec![],
    };
    let replies = c.option(&starttls);
    assert!(
        matches!(replies[..], [ref r] if r.kind == OptionReplyKind::Ack),
        "{replies:?}"
    );
    start_tls(&mut c, socket, &creds.ca.cert(), Some(client_dir)).expect("TLS handshake");
    c
}

fn listed(c: &mut Client) -> Vec<String> {
    let replies = c.option(&OptionRequest::List);
    assert_eq!(replies.last().map(|r| &r.kind), Some(&OptionReplyKind::Ack));
    replies
        .into_iter()
        .filter_map(|r| match r.kind {
            OptionReplyKind::Server { name, .. } => Some(name),
            _ => None,
        })
        .collect()
}

/// The bytes of the replies to INFO, GO and SET_META_CONTEXT for `name`, with the name the
/// client sent (which an error message repeats) replaced, so that two names compare.
fn refusals(c: &mut Client, name: &str) -> Vec<Vec<u8>> {
    let requests = [
        OptionRequest::Info {
            go: false,
            name: name.into(),
            requests: vec![],
        },
        OptionRequest::StructuredReply,
        OptionRequest::MetaContext {
            set: true,
            export: name.into(),
            queries: vec!["base:allocation".into()],
        },
        OptionRequest::Info {
            go: true,
            name: name.into(),
            requests: vec![],
        },
    ];
    requests
        .iter()
        .flat_map(|req| c.option(req))
        .map(|r: OptionReply| {
            assert!(
                !matches!(
                    r.kind,
                    OptionReplyKind::Info(_) | OptionReplyKind::MetaContext { .. }
                ),
                "{name}: {r:?}"
            );
            let encoded = r.encode();
            String::from_utf8_lossy(&encoded)
                .replace(&format!("{name:?}"), "NAME")
                .into_bytes()
        })
        .collect()
}

#[test]
fn certificate_clients_see_and_open_only_their_volumes() {
    if !require_tools(&["openssl"]) {
        return;
    }
    let (pool, creds) = pool_and_credentials();
    let bob = pool.tmp.path().join("creds/bob");
    creds.ca.client_dir(&bob, "bob", &creds.ca, None);
    access(&pool, "vol-a", &["--allow", "cn:alice"]);
    access(&pool, "vol-b", &["--allow", "cn:bob,ro"]);
    let listing = cli_ok(&["volume", "list", "--pool", pool.dir_str()]);
    assert!(
        listing.contains("cn:alice") && listing.contains("cn:bob,ro"),
        "{listing}"
    );
    let json = cli_ok(&["volume", "list", "--pool", pool.dir_str(), "--json"]);
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        json[1]["access"],
        serde_json::json!([{"who": "cn:bob", "read_only": true}]),
        "{json}"
    );
    let server = serve(
        &pool,
        &[
            "--tls",
            "require",
            "--tls-certificates",
            creds.server.to_str().unwrap(),
            "--tls-verify-peer",
        ],
    );

    let mut alice = tls_client(&server, &creds, &creds.client);
    assert_eq!(listed(&mut alice), ["vol-a"]);
    let mut bob_c = tls_client(&server, &creds, &bob);
    assert_eq!(listed(&mut bob_c), ["vol-b"]);

    // No oracle: another client's volume is answered as a name nobody has.
    for (client, theirs) in [(&creds.client, "vol-b"), (&bob, "vol-a")] {
        let mut c = tls_client(&server, &creds, client);
        let other = refusals(&mut c, theirs);
        let mut c = tls_client(&server, &creds, client);
        let missing = refusals(&mut c, "vol-z");
        assert_eq!(other, missing, "{theirs}");
        assert_eq!(other.len(), 4);
        // NBD_OPT_EXPORT_NAME has no error reply: both end in a hang-up.
        for name in [theirs, "vol-z"] {
            let mut c = tls_client(&server, &creds, client);
            assert!(c.try_export_name(name).is_err(), "{name}");
        }
    }

    // alice writes her volume; bob's read-only grant reads and gets EPERM on writes.
    let (_, flags) = alice.go("vol-a", false);
    assert_eq!(flags & TFLAG_READ_ONLY, 0);
    assert_eq!(alice.write_at(1, 0, &[7u8; 4096]), 0);
    let (_, flags) = bob_c.go("vol-b", false);
    assert_ne!(flags & TFLAG_READ_ONLY, 0);
    assert_eq!(bob_c.write_at(1, 0, &[7u8; 4096]), NBD_EPERM);
    assert_eq!(bob_c.read_at(2, 0, 4096).expect("read"), vec![0u8; 4096]);

    // Online, through the control socket: bob may now read vol-a too, on his next connection.
    access(&pool, "vol-a", &["--allow", "cn:bob,ro"]);
    let mut bob_again = tls_client(&server, &creds, &bob);
    assert_eq!(listed(&mut bob_again), ["vol-a", "vol-b"]);
    bob_again.go("vol-a", false);
    assert_eq!(
        bob_again.read_at(1, 0, 4096).expect("read"),
        vec![7u8; 4096]
    );
    assert_eq!(bob_again.write_at(2, 0, &[1u8; 4096]), NBD_EPERM);
    // And alice loses vol-a.
    access(&pool, "vol-a", &["--deny", "cn:alice"]);
    let mut alice_again = tls_client(&server, &creds, &creds.client);
    assert!(listed(&mut alice_again).is_empty());
    drop((alice, bob_c, bob_again, alice_again));
    server.stop();
}

#[test]
fn psk_users_list_only_their_volumes_with_nbdinfo() {
    if !require_tools(&["openssl", "nbdinfo"]) {
        return;
    }
    let (pool, creds) = pool_and_credentials();
    access(&pool, "vol-b", &["--allow", "psk:alice,ro"]);
    access(&pool, "vol-a", &["--allow", "psk:mallory"]);
    let server = serve(
        &pool,
        &["--tls", "require", "--tls-psk", creds.psk.to_str().unwrap()],
    );
    let uri = |export: &str| {
        format!(
            "nbds://alice@localhost:{}/{export}?tls-psk-file={}",
            server.port,
            creds.psk.display()
        )
    };
    let list = stdout_of(
        Command::new("nbdinfo")
            .args(["--list", "--json"])
            .arg(uri("")),
    );
    let v: serde_json::Value = serde_json::from_str(&list).expect("nbdinfo --json");
    let names: Vec<&str> = v["exports"]
        .as_array()
        .expect("exports")
        .iter()
        .filter_map(|e| e["export-name"].as_str())
        .collect();
    assert_eq!(names, ["vol-b"], "{list}");
    let info = stdout_of(Command::new("nbdinfo").arg(uri("vol-b")));
    assert!(info.contains("is_read_only: true"), "{info}");
    // nbdinfo on the other volume fails as on a name that does not exist.
    let failure = |export: &str| {
        let out = Command::new("nbdinfo").arg(uri(export)).output().unwrap();
        assert!(!out.status.success(), "{export}");
        String::from_utf8_lossy(&out.stderr).replace(export, "NAME")
    };
    assert_eq!(failure("vol-a"), failure("vol-z"));
    server.stop();
}
