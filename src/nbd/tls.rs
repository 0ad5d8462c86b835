//! TLS at the protocol edge: the settings (`TlsSettings`, nbdkit's `--tls`, `--tls-certificates`,
//! `--tls-verify-peer`, `--tls-psk`), the credentials they load (`TlsCredentials`: an OpenSSL
//! server context, swapped whole on reload), the server side of a TLS handshake (`accept`), and
//! who the peer turned out to be (`PeerIdentity`). The engine never sees any of it.
//!
//! OpenSSL rather than rustls because rustls has no external pre-shared keys, which qemu and
//! libnbd clients use (`keys.psk`). A context holds either X.509 certificates or PSKs, as in
//! nbdkit; both TLS 1.2 and 1.3 are offered.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use openssl::nid::Nid;
use openssl::ssl::{
    Ssl, SslAcceptor, SslContext, SslContextBuilder, SslFiletype, SslMethod, SslOptions,
    SslSessionCacheMode, SslVerifyMode, SslVersion,
};
use openssl::x509::store::X509Lookup;
use openssl::x509::verify::X509VerifyFlags;
use openssl::x509::{X509Name, X509NameRef, X509Ref, X509VerifyResult};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_openssl::SslStream;

use crate::error::{Error, ErrorKind, Result};

/// `--tls`: whether clients may, must or cannot use TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMode {
    /// No TLS: `NBD_OPT_STARTTLS` is not supported.
    #[default]
    Off,
    /// TLS for the clients that ask for it; the others are served in clear.
    On,
    /// Every client must start TLS before anything else (proto.md's FORCEDTLS).
    Require,
}

impl TlsMode {
    /// `off`, `on` or `require`, as nbdkit spells them.
    pub fn parse(text: &str) -> Option<TlsMode> {
        match text {
            "off" => Some(TlsMode::Off),
            "on" => Some(TlsMode::On),
            "require" => Some(TlsMode::Require),
            _ => None,
        }
    }
}

/// What `[server] tls*` and `thinnbd serve --tls*` set. Plain paths: the files are read when the
/// server starts (`TlsCredentials::load`) and again on reload.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TlsSettings {
    pub mode: TlsMode,
    /// A directory with `ca-cert.pem`, `server-cert.pem`, `server-key.pem` and optionally
    /// `ca-crl.pem` (nbdkit's and qemu's layout).
    pub certificates: Option<PathBuf>,
    /// Client certificates required, checked against the CA and the CRL.
    pub verify_peer: bool,
    /// A `username:hexkey` file (qemu's and nbdkit's `keys.psk`).
    pub psk: Option<PathBuf>,
}

impl TlsSettings {
    /// The combination is one the server can run with; `key` names the setting at fault the
    /// way the caller spells it (config key or flag).
    pub fn validate(&self) -> std::result::Result<(), (&'static str, &'static str)> {
        if self.certificates.is_some() && self.psk.is_some() {
            return Err(("tls_psk", "cannot be used together with tls_certificates"));
        }
        if self.verify_peer && self.certificates.is_none() {
            return Err(("tls_verify_peer", "needs tls_certificates"));
        }
        if self.mode != TlsMode::Off && self.certificates.is_none() && self.psk.is_none() {
            return Err(("tls", "needs tls_certificates or tls_psk"));
        }
        Ok(())
    }
}

/// Who the peer proved to be during the TLS handshake: kept in the connection's state for
/// access checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerIdentity {
    /// A client certificate that verified against the CA.
    X509 {
        /// The subject distinguished name, one line (`CN=alice, O=example`).
        subject: String,
        /// The subject's common names.
        common_names: Vec<String>,
        /// DNS, e-mail and URI subject alternative names.
        alt_names: Vec<String>,
    },
    /// The PSK username the key was found under.
    Psk(String),
    /// X.509 without client certificates (`tls_verify_peer` off): the client is not known.
    Anonymous,
}

impl PeerIdentity {
    /// The names access rules may know this peer by: `dn:SUBJECT`, `cn:NAME` for each common
    /// name, `san:TYPE:NAME` for each alternative name (`san:DNS:host`), or `psk:USER`; none
    /// for an anonymous peer.
    pub fn names(&self) -> Vec<String> {
        match self {
            PeerIdentity::X509 {
                subject,
                common_names,
                alt_names,
            } => std::iter::once(format!("dn:{subject}"))
                .chain(common_names.iter().map(|cn| format!("cn:{cn}")))
                .chain(alt_names.iter().map(|san| format!("san:{san}")))
                .collect(),
            PeerIdentity::Psk(user) => vec![format!("psk:{user}")],
            PeerIdentity::Anonymous => Vec::new(),
        }
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerIdentity::X509 { subject, .. } => write!(f, "x509:{subject}"),
            PeerIdentity::Psk(user) => write!(f, "psk:{user}"),
            PeerIdentity::Anonymous => write!(f, "anonymous"),
        }
    }
}

/// The loaded credentials; `reload` swaps in a new context, which only new handshakes use.
pub struct TlsCredentials {
    settings: TlsSettings,
    context: ArcSwap<SslContext>,
}

impl fmt::Debug for TlsCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsCredentials")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl TlsCredentials {
    /// Reads the files `settings` names. `None` when TLS is off.
    pub fn load(settings: &TlsSettings) -> Result<Option<Arc<TlsCredentials>>> {
        if settings.mode == TlsMode::Off {
            return Ok(None);
        }
        let context = build_context(settings)?;
        Ok(Some(Arc::new(TlsCredentials {
            settings: settings.clone(),
            context: ArcSwap::from_pointee(context),
        })))
    }

    pub fn mode(&self) -> TlsMode {
        self.settings.mode
    }

    /// Reads the files again. On error the old credentials stay in use.
    pub fn reload(&self) -> Result<()> {
        let context = build_context(&self.settings)?;
        self.context.store(Arc::new(context));
        Ok(())
    }

    /// The server side of a TLS handshake over `stream`; the caller bounds its time.
    pub(super) async fn accept<S>(&self, stream: S) -> Result<(SslStream<S>, PeerIdentity)>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let context = self.context.load_full();
        let ssl = Ssl::new(&context).map_err(|e| tls_error("starting a TLS session", e))?;
        let mut tls =
            SslStream::new(ssl, stream).map_err(|e| tls_error("starting a TLS session", e))?;
        if let Err(e) = Pin::new(&mut tls).accept().await {
            let mut why = match e.ssl_error() {
                Some(stack) => stack.to_string(),
                None => e.to_string(),
            };
            // The error stack says only "certificate verify failed"; this says why.
            let verified = tls.ssl().verify_result();
            if verified != X509VerifyResult::OK {
                why = format!("client certificate: {verified} ({why})");
            }
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("TLS handshake failed: {why}"),
            ));
        }
        let ssl = tls.ssl();
        let peer = match ssl.ex_data(psk_user_index()?) {
            Some(user) => PeerIdentity::Psk(user.clone()),
            None => match ssl.peer_certificate() {
                Some(cert) => x509_identity(&cert),
                None => PeerIdentity::Anonymous,
            },
        };
        Ok((tls, peer))
    }
}

fn tls_error(what: &str, e: openssl::error::ErrorStack) -> Error {
    Error::new(ErrorKind::InvalidInput, format!("{what}: {e}"))
}

/// Where the PSK callback leaves the username it found a key for.
fn psk_user_index() -> Result<openssl::ex_data::Index<Ssl, String>> {
    static INDEX: OnceLock<std::result::Result<openssl::ex_data::Index<Ssl, String>, String>> =
        OnceLock::new();
    INDEX
        .get_or_init(|| Ssl::new_ex_index::<String>().map_err(|e| e.to_string()))
        .clone()
        .map_err(|e| Error::new(ErrorKind::Io, format!("OpenSSL ex-data index: {e}")))
}

fn x509_identity(cert: &X509Ref) -> PeerIdentity {
    let subject = name_line(cert.subject_name());
    let common_names = cert
        .subject_name()
        .entries_by_nid(Nid::COMMONNAME)
        .filter_map(|e| e.data().to_string().ok())
        .collect();
    let alt_names = cert
        .subject_alt_names()
        .map(|names| {
            names
                .iter()
                .filter_map(|n| {
                    n.dnsname()
                        .map(|d| format!("DNS:{d}"))
                        .or_else(|| n.email().map(|m| format!("email:{m}")))
                        .or_else(|| n.uri().map(|u| format!("URI:{u}")))
                })
                .collect()
        })
        .unwrap_or_default();
    PeerIdentity::X509 {
        subject,
        common_names,
        alt_names,
    }
}

fn name_line(name: &X509NameRef) -> String {
    name.entries()
        .map(|e| {
            let key = e.object().nid().short_name().unwrap_or("?");
            let value = e.data().to_string().unwrap_or_default();
            format!("{key}={value}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn build_context(settings: &TlsSettings) -> Result<SslContext> {
    match (&settings.certificates, &settings.psk) {
        (Some(dir), None) => x509_context(dir, settings.verify_peer),
        (None, Some(file)) => psk_context(file),
        _ => {
            let (key, why) = settings
                .validate()
                .err()
                .unwrap_or(("tls", "needs tls_certificates or tls_psk"));
            Err(Error::new(ErrorKind::InvalidInput, format!("{key} {why}")))
        }
    }
}

/// Options every context shares: TLS 1.2 and 1.3 only, no session resumption (a session per
/// connection is all NBD needs, and resumption would skip the CRL and PSK checks of a
/// reload), and a peer that just closes the socket reads as end of file.
fn common_options(b: &mut SslContextBuilder) -> Result<()> {
    b.set_min_proto_version(Some(SslVersion::TLS1_2))
        .and_then(|()| b.set_max_proto_version(Some(SslVersion::TLS1_3)))
        .and_then(|()| b.set_num_tickets(0))
        .map_err(|e| tls_error("TLS options", e))?;
    b.set_session_cache_mode(SslSessionCacheMode::OFF);
    b.set_options(SslOptions::IGNORE_UNEXPECTED_EOF | SslOptions::NO_TICKET);
    Ok(())
}

fn x509_context(dir: &Path, verify_peer: bool) -> Result<SslContext> {
    let file = |name: &str| dir.join(name);
    let bad = |path: &Path, e: openssl::error::ErrorStack| {
        Error::new(
            ErrorKind::InvalidInput,
            format!("server.tls_certificates: {}: {e}", path.display()),
        )
    };
    for needed in ["server-cert.pem", "server-key.pem"]
        .into_iter()
        .chain(verify_peer.then_some("ca-cert.pem"))
    {
        let path = file(needed);
        if !path.is_file() {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("server.tls_certificates: {} is missing", path.display()),
            ));
        }
    }
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server())
        .map_err(|e| tls_error("TLS context", e))?;
    common_options(&mut b)?;
    let cert = file("server-cert.pem");
    b.set_certificate_chain_file(&cert)
        .map_err(|e| bad(&cert, e))?;
    let key = file("server-key.pem");
    b.set_private_key_file(&key, SslFiletype::PEM)
        .map_err(|e| bad(&key, e))?;
    b.check_private_key().map_err(|e| bad(&key, e))?;
    if verify_peer {
        let ca = file("ca-cert.pem");
        b.set_ca_file(&ca).map_err(|e| bad(&ca, e))?;
        b.set_client_ca_list(X509Name::load_client_ca_file(&ca).map_err(|e| bad(&ca, e))?);
        let crl = file("ca-crl.pem");
        if crl.is_file() {
            b.cert_store_mut()
                .add_lookup(X509Lookup::file())
                .and_then(|l| l.load_crl_file(&crl, SslFiletype::PEM))
                .map_err(|e| bad(&crl, e))?;
            b.verify_param_mut()
                .set_flags(X509VerifyFlags::CRL_CHECK)
                .map_err(|e| bad(&crl, e))?;
        }
        b.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
    }
    Ok(b.build().into_context())
}

fn psk_context(file: &Path) -> Result<SslContext> {
    let keys = read_psk_file(file)?;
    let mut b =
        SslContextBuilder::new(SslMethod::tls_server()).map_err(|e| tls_error("TLS context", e))?;
    common_options(&mut b)?;
    // Key exchanges with forward secrecy first; plain PSK for clients that offer nothing else.
    b.set_cipher_list("ECDHEPSK:DHEPSK:PSK:!eNULL:!3DES")
        .map_err(|e| tls_error("TLS PSK ciphers", e))?;
    // TLS 1.3 takes the callback's key only with a SHA-256 suite.
    b.set_ciphersuites("TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256")
        .map_err(|e| tls_error("TLS 1.3 ciphersuites", e))?;
    let index = psk_user_index()?;
    b.set_psk_server_callback(move |ssl, identity, out| {
        let Some(user) = identity.and_then(|i| std::str::from_utf8(i).ok()) else {
            return Ok(0);
        };
        let Some(key) = keys.get(user) else {
            tracing::info!(user, "TLS PSK: unknown username");
            return Ok(0);
        };
        if key.len() > out.len() {
            return Ok(0);
        }
        out[..key.len()].copy_from_slice(key);
        ssl.set_ex_data(index, user.to_owned());
        Ok(key.len())
    });
    Ok(b.build())
}

/// Parses a `keys.psk` file: `username:hexkey` lines (blank lines ignored).
pub fn read_psk_file(file: &Path) -> Result<HashMap<String, Vec<u8>>> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| Error::io(format!("server.tls_psk: reading {}", file.display()), e))?;
    parse_psk(&text).map_err(|(line, why)| {
        Error::new(
            ErrorKind::InvalidInput,
            format!("server.tls_psk: {} line {line}: {why}", file.display()),
        )
    })
}

fn parse_psk(text: &str) -> std::result::Result<HashMap<String, Vec<u8>>, (usize, String)> {
    let mut keys = HashMap::new();
    for (n, line) in (1..).zip(text.lines()) {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let Some((user, hex)) = line.split_once(':') else {
            return Err((n, "not username:hexkey".to_owned()));
        };
        if user.is_empty() {
            return Err((n, "empty username".to_owned()));
        }
        let key = decode_hex(hex.trim()).ok_or((n, "the key is not hexadecimal".to_owned()))?;
        // OpenSSL's PSK buffer holds at most 512 bytes.
        if key.is_empty() || key.len() > 256 {
            return Err((n, "the key must be 1 to 256 bytes".to_owned()));
        }
        keys.insert(user.to_owned(), key);
    }
    if keys.is_empty() {
        return Err((0, "no keys".to_owned()));
    }
    Ok(keys)
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_is_known_by_every_name_its_credentials_carry() {
        let cert = PeerIdentity::X509 {
            subject: "CN=alice, O=example".into(),
            common_names: vec!["alice".into()],
            alt_names: vec!["DNS:host.example".into(), "email:a@example".into()],
        };
        assert_eq!(
            cert.names(),
            [
                "dn:CN=alice, O=example",
                "cn:alice",
                "san:DNS:host.example",
                "san:email:a@example"
            ]
        );
        assert_eq!(PeerIdentity::Psk("bob".into()).names(), ["psk:bob"]);
        assert!(PeerIdentity::Anonymous.names().is_empty());
    }

    #[test]
    fn psk_files_in_the_keys_psk_format() {
        let keys = parse_psk("alice:0123abCD\n\nbob:ff\r\n").unwrap();
        assert_eq!(keys["alice"], vec![0x01, 0x23, 0xab, 0xcd]);
        assert_eq!(keys["bob"], vec![0xff]);
        assert_eq!(parse_psk("alice 0123").unwrap_err().0, 1);
        assert_eq!(parse_psk("a:00\nb:0g").unwrap_err().0, 2);
        assert_eq!(parse_psk("a:012").unwrap_err().0, 1);
        assert_eq!(parse_psk(":00").unwrap_err().0, 1);
        assert!(parse_psk("\n").is_err());
    }

    #[test]
    fn settings_need_credentials_of_one_kind() {
        let mut s = TlsSettings {
            mode: TlsMode::Require,
            ..Default::default()
        };
        assert_eq!(s.validate().unwrap_err().0, "tls");
        s.psk = Some("k".into());
        assert!(s.validate().is_ok());
        s.certificates = Some("d".into());
        assert_eq!(s.validate().unwrap_err().0, "tls_psk");
        s.psk = None;
        s.verify_peer = true;
        assert!(s.validate().is_ok());
        s.certificates = None;
        s.psk = Some("k".into());
        assert_eq!(s.validate().unwrap_err().0, "tls_verify_peer");
        assert!(TlsSettings::default().validate().is_ok());
        assert_eq!(TlsMode::parse("require"), Some(TlsMode::Require));
        assert_eq!(TlsMode::parse("yes"), None);
    }
}
