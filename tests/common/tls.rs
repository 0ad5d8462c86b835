//! TLS credentials made by the tests with `openssl` (never committed keys): a CA with a server
//! certificate and a CRL, client certificate directories in the layout libnbd and qemu read
//! (`ca-cert.pem`, `client-cert.pem`, `client-key.pem`) — a good one, a revoked one, an expired
//! one, one from another CA — and PSK files. Also a raw client's switch to TLS after STARTTLS, and
//! a real ClientHello's bytes for tests that cut it short.

use std::fs;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;

use openssl::ssl::{SslConnector, SslFiletype, SslMethod, SslVerifyMode};

use super::nbd_client::{Client, Stream};
use super::process::run;
use thinnbd::nbd::codec::{OptionReplyKind, OptionRequest, OPT_STARTTLS};

/// Extensions for `openssl ca`: what GnuTLS (libnbd, qemu) checks of a CA and of its leaves.
const EXTENSIONS: &str = "\
[ca_ext]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server_ext]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost,IP:127.0.0.1
[client_ext]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = clientAuth
subjectAltName = email:alice@example.com
";

/// A minimal `openssl ca` setup: it signs, revokes and writes the CRL.
const CA_CONFIG: &str = "\
[ca]
default_ca = ca_default
[ca_default]
dir = .
database = index.txt
new_certs_dir = issued
serial = serial
crlnumber = crlnumber
default_md = sha256
default_days = 30
default_crl_days = 30
policy = any_name
unique_subject = no
copy_extensions = none
[any_name]
commonName = supplied
[req]
distinguished_name = dn
[dn]
";

/// One certificate authority in its own directory.
pub struct Ca {
    pub dir: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    run(Command::new("openssl").current_dir(dir).args(args));
}

/// `openssl req` with a new P-256 key (fast to make), and `args`.
fn new_key_and_request(dir: &Path, args: &[&str]) {
    let req = [
        "req",
        "-config",
        "ca.cnf",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    openssl(dir, &req.iter().chain(args).copied().collect::<Vec<_>>());
}

impl Ca {
    /// A new CA (P-256 keys, fast to make) named `name` in `dir`.
    pub fn new(dir: &Path, name: &str) -> Ca {
        fs::create_dir_all(dir.join("issued")).unwrap();
        fs::write(dir.join("ca.cnf"), format!("{CA_CONFIG}{EXTENSIONS}")).unwrap();
        fs::write(dir.join("index.txt"), "").unwrap();
        fs::write(dir.join("serial"), "1000\n").unwrap();
        fs::write(dir.join("crlnumber"), "1000\n").unwrap();
        let subject = format!("/CN={name}");
        let self_signed = [
            "-x509",
            "-extensions",
            "ca_ext",
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca-cert.pem",
            "-days",
            "30",
            "-subj",
            &subject,
        ];
        new_key_and_request(dir, &self_signed);
        Ca {
            dir: dir.to_path_buf(),
        }
    }

    /// Issues a certificate for `cn` with `extensions` (`server_ext`, `client_ext`); its key
    /// and certificate go to `key` and `cert`. `dates`: (start, end) as YYMMDDHHMMSSZ, else
    /// valid from now for 30 days.
    pub fn issue(
        &self,
        cn: &str,
        extensions: &str,
        key: &Path,
        cert: &Path,
        dates: Option<(&str, &str)>,
    ) {
        let csr = self.dir.join(format!("{cn}.csr"));
        let subject = format!("/CN={cn}");
        let request = [
            "-new",
            "-keyout",
            path(key),
            "-out",
            path(&csr),
            "-subj",
            &subject,
        ];
        new_key_and_request(&self.dir, &request);
        let mut args = vec![
            "-extfile",
            "ca.cnf",
            "-extensions",
            extensions,
            "-in",
            path(&csr),
            "-out",
            path(cert),
        ];
        if let Some((start, end)) = dates {
            args.extend(["-startdate", start, "-enddate", end]);
        }
        self.ca(&args);
    }

    /// Revokes `cert` and writes the CRL to `crl`.
    pub fn revoke(&self, cert: &Path, crl: &Path) {
        self.ca(&["-revoke", path(cert)]);
        self.write_crl(crl);
    }

    /// Writes the current CRL to `crl`.
    pub fn write_crl(&self, crl: &Path) {
        self.ca(&["-gencrl", "-out", path(crl)]);
    }

    /// `openssl ca` as this CA, with `args`.
    fn ca(&self, args: &[&str]) {
        let ca = [
            "ca",
            "-batch",
            "-config",
            "ca.cnf",
            "-cert",
            "ca-cert.pem",
            "-keyfile",
            "ca-key.pem",
        ];
        openssl(
            &self.dir,
            &ca.iter().chain(args).copied().collect::<Vec<_>>(),
        );
    }

    pub fn cert(&self) -> PathBuf {
        self.dir.join("ca-cert.pem")
    }

    /// The server's directory for `--tls-certificates`: `ca-cert.pem`, `server-cert.pem`,
    /// `server-key.pem`, and `ca-crl.pem` (nothing revoked yet).
    pub fn server_dir(&self, dir: &Path) {
        fs::create_dir_all(dir).unwrap();
        fs::copy(self.cert(), dir.join("ca-cert.pem")).unwrap();
        self.issue(
            "localhost",
            "server_ext",
            &dir.join("server-key.pem"),
            &dir.join("server-cert.pem"),
            None,
        );
        self.write_crl(&dir.join("ca-crl.pem"));
    }

    /// A client's directory for libnbd's `tls-certificates=` and qemu's `tls-creds-x509`: the
    /// certificate of `trusted` (the server's CA) and a client certificate of this CA.
    pub fn client_dir(&self, dir: &Path, cn: &str, trusted: &Ca, dates: Option<(&str, &str)>) {
        fs::create_dir_all(dir).unwrap();
        fs::copy(trusted.cert(), dir.join("ca-cert.pem")).unwrap();
        self.issue(
            cn,
            "client_ext",
            &dir.join("client-key.pem"),
            &dir.join("client-cert.pem"),
            dates,
        );
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// Everything the TLS tests use, made under `root`.
pub struct Credentials {
    pub ca: Ca,
    /// `--tls-certificates` of the server (its CRL revokes `revoked`).
    pub server: PathBuf,
    /// alice: a good client certificate.
    pub client: PathBuf,
    /// A client certificate of the CA, revoked.
    pub revoked: PathBuf,
    /// A client certificate of the CA that expired.
    pub expired: PathBuf,
    /// A client certificate of another CA.
    pub stranger: PathBuf,
    /// The CA's certificate alone: a client with no certificate of its own.
    pub anonymous: PathBuf,
    /// `alice:KEY` (libnbd's tls-psk-file; qemu's tls-creds-psk reads `dir/keys.psk`).
    pub psk: PathBuf,
    /// alice with another key.
    pub wrong_psk: PathBuf,
    /// A user the server does not know.
    pub unknown_psk: PathBuf,
}

impl Credentials {
    pub fn make(root: &Path) -> Credentials {
        let ca = Ca::new(&root.join("ca"), "thinnbd test CA");
        let server = root.join("server");
        ca.server_dir(&server);
        let client = root.join("client");
        ca.client_dir(&client, "alice", &ca, None);
        let revoked = root.join("revoked");
        ca.client_dir(&revoked, "mallory", &ca, None);
        ca.revoke(&revoked.join("client-cert.pem"), &server.join("ca-crl.pem"));
        let expired = root.join("expired");
        ca.client_dir(
            &expired,
            "bob",
            &ca,
            Some(("200101000000Z", "200201000000Z")),
        );
        let other = Ca::new(&root.join("other-ca"), "another CA");
        let stranger = root.join("stranger");
        other.client_dir(&stranger, "alice", &ca, None);
        let anonymous = root.join("anonymous");
        fs::create_dir_all(&anonymous).unwrap();
        fs::copy(ca.cert(), anonymous.join("ca-cert.pem")).unwrap();
        let psk_file = |dir: &str, line: String| {
            let d = root.join(dir);
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("keys.psk"), line + "\n").unwrap();
            d.join("keys.psk")
        };
        let psk = psk_file("psk", format!("alice:{}", random_hex()));
        let wrong_psk = psk_file("wrong-psk", format!("alice:{}", random_hex()));
        let unknown_psk = psk_file("unknown-psk", format!("mallory:{}", random_hex()));
        Credentials {
            ca,
            server,
            client,
            revoked,
            expired,
            stranger,
            anonymous,
            psk,
            wrong_psk,
            unknown_psk,
        }
    }
}

/// 32 random bytes in hex, from openssl.
fn random_hex() -> String {
    let out = run(Command::new("openssl").args(["rand", "-hex", "32"]));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

impl Stream for openssl::ssl::SslStream<TcpStream> {
    fn half_close(&self) {
        let _ = self.get_ref().shutdown(std::net::Shutdown::Write);
    }
    fn set_read_timeout(&self, timeout: Option<std::time::Duration>) -> std::io::Result<()> {
        self.get_ref().set_read_timeout(timeout)
    }
}

/// A raw client over TCP that has been greeted and is in option negotiation, with a second
/// handle on its socket for [`start_tls`].
pub fn raw_client(port: u16) -> (Client, TcpStream) {
    let tcp = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let handle = tcp.try_clone().unwrap();
    (Client::greet(Box::new(tcp)).expect("greeting"), handle)
}

/// After the server acknowledged STARTTLS: the TLS handshake on `socket` (trusting `ca`,
/// with the client certificate in `client_dir` if given); the client then speaks over TLS.
pub fn start_tls(
    c: &mut Client,
    socket: TcpStream,
    ca: &Path,
    client_dir: Option<&Path>,
) -> Result<(), String> {
    let mut b = SslConnector::builder(SslMethod::tls_client()).unwrap();
    b.set_ca_file(ca).unwrap();
    b.set_verify(SslVerifyMode::PEER);
    if let Some(d) = client_dir {
        b.set_certificate_file(d.join("client-cert.pem"), SslFiletype::PEM)
            .unwrap();
        b.set_private_key_file(d.join("client-key.pem"), SslFiletype::PEM)
            .unwrap();
    }
    let tls = b
        .build()
        .connect("localhost", socket)
        .map_err(|e| e.to_string())?;
    c.s = Box::new(tls);
    Ok(())
}

/// Sends NBD_OPT_STARTTLS on a client in option negotiation and expects its ACK.
pub fn ask_starttls(c: &mut Client) -> std::io::Result<()> {
    let starttls = OptionRequest::Unknown {
        option: OPT_STARTTLS,
        data: vec![],
    };
    let replies = c.option(&starttls);
    match replies.first().map(|r| &r.kind) {
        Some(OptionReplyKind::Ack) => Ok(()),
        other => Err(std::io::Error::other(format!(
            "STARTTLS refused: {other:?}"
        ))),
    }
}

/// A raw client over TLS trusting `ca`, in option negotiation after STARTTLS and the handshake,
/// with a second handle on its socket (to send bytes beneath TLS).
pub fn tls_client(port: u16, ca: &Path) -> std::io::Result<(Client, TcpStream)> {
    let (mut c, socket) = raw_client(port);
    let beneath = socket.try_clone()?;
    ask_starttls(&mut c)?;
    start_tls(&mut c, socket, ca, None).map_err(std::io::Error::other)?;
    Ok((c, beneath))
}

/// The bytes of a real ClientHello (trusting `ca`), as the TLS library would send them first.
pub fn client_hello(ca: &Path) -> Vec<u8> {
    /// Keeps what is written; a read would block, so the handshake stops after its first flight.
    #[derive(Debug)]
    struct Capture(Vec<u8>);
    impl std::io::Read for Capture {
        fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::WouldBlock.into())
        }
    }
    impl std::io::Write for Capture {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut b = SslConnector::builder(SslMethod::tls_client()).unwrap();
    b.set_ca_file(ca).unwrap();
    match b.build().connect("localhost", Capture(Vec::new())) {
        Err(openssl::ssl::HandshakeError::WouldBlock(mid)) => mid.get_ref().0.clone(),
        other => panic!("a handshake without a server went on: {other:?}"),
    }
}
