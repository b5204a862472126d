//! TLS configurations: the node's certificate (configured, or self-signed on first start),
//! the agent's pinned verifier, and the client for https webhooks. The one place that builds
//! rustls configurations, and the only module that reads certificates (rustls-webpki for the
//! pinned key, x509-parser for the names shown to operators).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};

/// How the agent decides the node is the node.
#[derive(Debug, Clone, Copy, Default, serde::Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TrustMode {
    /// The SPKI pin from the invitation (default): no CA involved.
    #[default]
    Pin,
    /// Certificates chaining to the CAs in `agent.ca_file` (a private CA, or a TLS-inspecting
    /// proxy's CA).
    Ca,
    /// The operating system's trusted CAs (plus `agent.ca_file`, if set).
    System,
}

impl std::fmt::Display for TrustMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TrustMode::Pin => "pin",
            TrustMode::Ca => "ca",
            TrustMode::System => "system",
        })
    }
}

/// How an https webhook's certificate is checked.
#[derive(Debug, Clone, Copy, Default, serde::Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum WebhookTrust {
    /// The operating system's trusted CAs (default; the built-in web roots on a system that
    /// has none), plus `delivery.ca_file` if set.
    #[default]
    System,
    /// The built-in public web roots, plus `delivery.ca_file` if set.
    Web,
    /// Only the CAs in `delivery.ca_file` (an internal CA).
    Ca,
}

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Reading or writing a certificate or key file failed.
    #[error("{path}: {detail}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// Generating or parsing a certificate failed.
    #[error("certificate: {0}")]
    Certificate(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn file_err(path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_owned(),
        detail: e.to_string(),
    }
}

/// Text in front of the hex of a pin, naming the hash so other hashes can be added later.
pub const PIN_PREFIX: &str = "sha256/";

/// Pin as text for humans: "sha256/" + lowercase hex.
pub fn format_pin(pin: &[u8; 32]) -> String {
    format!("{PIN_PREFIX}{}", crate::crypto::hex(pin))
}

/// The SPKI pin: SHA-256 of the certificate's DER SubjectPublicKeyInfo, SEQUENCE header
/// included, read by the same webpki that checks the handshake. webpki hands back the key's
/// content re-wrapped in a header of the shortest length form; it refuses any other length
/// form, so these are exactly the bytes in the certificate.
pub fn spki_pin(cert: &CertificateDer<'_>) -> Result<[u8; 32], webpki::Error> {
    let parsed = webpki::EndEntityCert::try_from(cert)?;
    Ok(crate::crypto::sha256(&parsed.subject_public_key_info()))
}

/// What an operator is shown of a certificate: who it names, who issued it, and when it is
/// valid. Never used to decide trust.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertNames {
    /// Subject, e.g. `CN=relay-node, O=Example`, in certificate order.
    pub subject: String,
    /// Issuer, rendered like `subject`.
    pub issuer: String,
    /// Start and end of validity, unix seconds.
    pub valid: Option<(i64, i64)>,
}

impl CertNames {
    /// Reads the names of a DER certificate; empty when it cannot be read, since the caller is
    /// already reporting a more precise error.
    pub fn of(cert: &[u8]) -> CertNames {
        let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert) else {
            return CertNames::default();
        };
        let validity = parsed.validity();
        CertNames {
            subject: printable(&parsed.subject().to_string()),
            issuer: printable(&parsed.issuer().to_string()),
            valid: Some((validity.not_before.timestamp(), validity.not_after.timestamp())),
        }
    }

    /// `"; valid 2026-01-01T00:00:00Z to 2027-01-01T00:00:00Z (in 30 d)"`, or nothing when
    /// unknown.
    pub fn validity(&self) -> String {
        let Some((from, until)) = self.valid else {
            return String::new();
        };
        let at = |unix: i64| u64::try_from(unix).unwrap_or(0).saturating_mul(1000);
        format!(
            "; valid {} to {}",
            crate::clock::rfc3339(at(from)),
            crate::clock::when(at(until), crate::clock::now_ms())
        )
    }
}

/// Escapes control characters, so a hostile certificate's names cannot act on a terminal.
fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// The node's server identity: the configuration to serve and the pin to put in codes.
pub struct ServerIdentity {
    /// rustls configuration offering h2 and http/1.1.
    pub config: Arc<rustls::ServerConfig>,
    /// SHA-256 of the served certificate's SubjectPublicKeyInfo.
    pub pin: [u8; 32],
}

/// Loads `cert`/`key` when given; otherwise the self-signed certificate in `tls_dir`, created
/// on first use for `hosts` (plus localhost).
pub fn server_identity(
    cert: Option<&Path>,
    key: Option<&Path>,
    tls_dir: &Path,
    hosts: &[String],
) -> Result<ServerIdentity, TlsError> {
    let (cert_path, key_path) = match (cert, key) {
        (Some(c), Some(k)) => (c.to_owned(), k.to_owned()),
        _ => {
            let c = tls_dir.join("node.crt");
            let k = tls_dir.join("node.key");
            if !c.exists() || !k.exists() {
                generate_self_signed(tls_dir, &c, &k, hosts)?;
            }
            (c, k)
        }
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
        .map_err(|e| file_err(&cert_path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(&cert_path, e))?;
    let first = chain
        .first()
        .ok_or_else(|| file_err(&cert_path, "no certificate in the file"))?;
    let pin = spki_pin(first).map_err(|e| {
        let why = match e {
            // Agents check certificates with the same library, so refuse it here, at start.
            webpki::Error::UnsupportedCertVersion => {
                "it is not an X.509 v3 certificate (sign it with extensions such as subjectAltName)".to_owned()
            }
            other => format!("it is not a usable X.509 certificate ({other})"),
        };
        file_err(&cert_path, why)
    })?;
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| file_err(&key_path, e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(format!("{}: {e}", cert_path.display())))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(ServerIdentity {
        config: Arc::new(config),
        pin,
    })
}

fn generate_self_signed(dir: &Path, cert_path: &Path, key_path: &Path, hosts: &[String]) -> Result<(), TlsError> {
    std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
    let mut names: Vec<String> = hosts.to_vec();
    for default in ["localhost", "127.0.0.1", "::1"] {
        if !names.iter().any(|n| n == default) {
            names.push(default.to_owned());
        }
    }
    let key_pair = rcgen::KeyPair::generate().map_err(|e| TlsError::Certificate(e.to_string()))?;
    let mut params = rcgen::CertificateParams::new(names).map_err(|e| TlsError::Certificate(e.to_string()))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "relay node (self-signed)");
    let cert = params
        .self_signed(&key_pair)
        .map_err(|e| TlsError::Certificate(e.to_string()))?;
    crate::fsutil::write_private(key_path, key_pair.serialize_pem().as_bytes()).map_err(|e| file_err(key_path, e))?;
    crate::fsutil::write_atomic(cert_path, cert.pem().as_bytes()).map_err(|e| file_err(cert_path, e))?;
    Ok(())
}

/// The presented certificate's public key is not the pinned one.
#[derive(Debug)]
pub struct PinMismatch {
    /// Pin from the invitation.
    pub expected: [u8; 32],
    /// Pin of the presented certificate.
    pub presented: [u8; 32],
    /// Presented certificate's subject.
    pub subject: String,
    /// Presented certificate's issuer.
    pub issuer: String,
}

impl std::fmt::Display for PinMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "certificate pin mismatch: the server presented a certificate for \"{}\" issued by \"{}\" with key {}, \
             but the invitation pins {}; refusing to talk to it (a different node, or something intercepting the connection: \
             if a TLS-inspecting firewall sits in between, set agent.trust = \"ca\" and agent.ca_file to its CA)",
            self.subject,
            self.issuer,
            format_pin(&self.presented),
            format_pin(&self.expected)
        )
    }
}

impl std::error::Error for PinMismatch {}

/// "outer: inner: innermost", skipping repeats, so TLS and socket causes reach the operator.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    crate::error::error_chain_with(e, describe)
}

/// A readable account of a TLS certificate error (rustls prints custom errors with `Debug`).
pub fn describe(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    // io::Error hides the wrapped error from `source()`, and may wrap another io::Error.
    if let Some(io) = err.downcast_ref::<std::io::Error>() {
        return describe(io.get_ref()?);
    }
    match err.downcast_ref::<rustls::Error>()? {
        rustls::Error::InvalidCertificate(CertificateError::Other(other)) => Some(other.0.to_string()),
        rustls::Error::InvalidCertificate(e) => Some(format!("the server's certificate was refused: {e:?}")),
        _ => None,
    }
}

/// Trusts exactly one public key, and still has rustls check every handshake signature.
#[derive(Debug)]
struct PinVerifier {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The pin names the key itself, so the host name and CA chain add nothing.
        let presented =
            spki_pin(end_entity).map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        if crate::crypto::ct_eq(&presented, &self.pin) {
            return Ok(ServerCertVerified::assertion());
        }
        let names = CertNames::of(end_entity);
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            rustls::OtherError(Arc::new(PinMismatch {
                expected: self.pin,
                presented,
                subject: names.subject,
                issuer: names.issuer,
            })),
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Client configuration for talking to a node, per the trust mode: the invitation's pin (or,
/// when it carried none, the system roots), the CAs in `ca_file`, or the system roots.
pub fn node_client_config(
    pin: Option<[u8; 32]>,
    trust: TrustMode,
    ca_file: Option<&Path>,
) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let verifier: Arc<dyn ServerCertVerifier> = match (trust, pin) {
        (TrustMode::Pin, Some(pin)) => Arc::new(PinVerifier { pin, provider }),
        (TrustMode::Ca, _) => {
            let path = ca_file.ok_or_else(|| TlsError::Config("agent.trust = \"ca\" needs agent.ca_file".into()))?;
            let mut roots = rustls::RootCertStore::empty();
            add_pem_bundle(&mut roots, path)?;
            DescribingVerifier::shared(
                roots,
                format!("a certificate issued by a CA in {}", path.display()),
                NODE_HINT,
                provider,
            )?
        }
        (TrustMode::System, _) | (TrustMode::Pin, None) => {
            let mut roots = system_roots()?;
            let mut expected = "a certificate issued by a CA the system trusts".to_owned();
            if let Some(path) = ca_file {
                add_pem_bundle(&mut roots, path)?;
                expected = format!("{expected} or by a CA in {}", path.display());
            }
            DescribingVerifier::shared(roots, expected, NODE_HINT, provider)?
        }
    };
    Ok(builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

/// Performs a TLS handshake with the node over `tcp` as the agent would, and describes what
/// the node presented; on failure, the verifier's explanation.
pub async fn handshake(
    tcp: tokio::net::TcpStream,
    host: &str,
    pin: Option<[u8; 32]>,
    trust: TrustMode,
    ca_file: Option<&Path>,
    timeout: std::time::Duration,
) -> Result<String, String> {
    let config = node_client_config(pin, trust, ca_file).map_err(|e| e.to_string())?;
    handshake_with(config, tcp, host, timeout).await
}

/// Performs a TLS handshake with an https webhook over `tcp` as delivery would, with
/// `delivery.trust`, and describes what it presented; on failure, the verifier's explanation.
pub async fn webhook_handshake(
    tcp: tokio::net::TcpStream,
    host: &str,
    (trust, ca_file): (WebhookTrust, Option<&Path>),
    timeout: std::time::Duration,
) -> Result<String, String> {
    let config = webhook_client_config(trust, ca_file).map_err(|e| e.to_string())?;
    handshake_with(config, tcp, host, timeout).await
}

async fn handshake_with(
    mut config: rustls::ClientConfig,
    tcp: tokio::net::TcpStream,
    host: &str,
    timeout: std::time::Duration,
) -> Result<String, String> {
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let name = ServerName::try_from(host.to_owned()).map_err(|e| format!("{host}: {e}"))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let stream = match tokio::time::timeout(timeout, connector.connect(name, tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(error_chain(&e)),
        Err(_) => return Err(format!("no TLS handshake within {timeout:?}")),
    };
    let (_, conn) = stream.get_ref();
    let version = conn.protocol_version().map(|v| format!("{v:?}")).unwrap_or_default();
    let alpn = conn
        .alpn_protocol()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_else(|| "http/1.1".into());
    let seen = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| {
            let pin = spki_pin(c).ok()?;
            let names = CertNames::of(c);
            Some(format!(
                "presented \"{}\" issued by \"{}\", key {}{}",
                names.subject,
                names.issuer,
                format_pin(&pin),
                names.validity()
            ))
        })
        .unwrap_or_else(|| "presented a certificate".into());
    Ok(format!("{seen}; {version}, {alpn}"))
}

/// One line for status and doctor: how this agent trusts its node.
pub fn describe_trust(pin: Option<[u8; 32]>, trust: TrustMode, ca_file: Option<&Path>) -> String {
    match (trust, pin, ca_file) {
        (TrustMode::Pin, Some(pin), _) => format!("pin {}", format_pin(&pin)),
        (TrustMode::Ca, _, Some(path)) => format!("ca {}", path.display()),
        (TrustMode::Ca, _, None) => "ca (agent.ca_file missing)".to_owned(),
        (_, _, Some(path)) => format!("system roots + {}", path.display()),
        _ => "system roots".to_owned(),
    }
}

fn add_pem_bundle(roots: &mut rustls::RootCertStore, path: &Path) -> Result<(), TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(path, e))?;
    if certs.is_empty() {
        return Err(file_err(path, "no certificate in the file"));
    }
    for cert in certs {
        roots.add(cert).map_err(|e| file_err(path, e))?;
    }
    Ok(())
}

fn system_roots() -> Result<rustls::RootCertStore, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        return Err(TlsError::Config(
            "no trusted CA certificates found on this system (install ca-certificates, or use agent.trust = \"ca\" with agent.ca_file)".into(),
        ));
    }
    Ok(roots)
}

/// The presented certificate does not chain to the trusted CAs.
#[derive(Debug)]
pub struct TrustFailure {
    /// What would have been accepted.
    pub expected: String,
    /// Presented certificate's subject.
    pub subject: String,
    /// Presented certificate's issuer.
    pub issuer: String,
    /// SHA-256 of the presented certificate (DER).
    pub fingerprint: [u8; 32],
    /// rustls' reason.
    pub reason: String,
    /// Which setting would make it trusted.
    pub hint: &'static str,
}

impl std::fmt::Display for TrustFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "certificate not trusted: the server presented \"{}\" issued by \"{}\" (certificate SHA-256 {}) but expected {} ({}); \
             {}",
            self.subject,
            self.issuer,
            crate::crypto::hex(&self.fingerprint),
            self.expected,
            self.reason,
            self.hint
        )
    }
}

impl std::error::Error for TrustFailure {}

/// WebPKI verification that, on failure, says what was presented and what was expected.
#[derive(Debug)]
struct DescribingVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    expected: String,
    hint: &'static str,
}

/// What to change when the node's certificate is not trusted.
const NODE_HINT: &str = "if a TLS-inspecting firewall sits in between, put its CA in agent.ca_file";
/// What to change when a webhook's certificate is not trusted.
const WEBHOOK_HINT: &str =
    "if the webhook's certificate comes from an internal CA, set delivery.ca_file to that CA's PEM file";
/// What to change when the tracker's certificate is not trusted.
const TRACKER_HINT: &str =
    "if the tracker's certificate comes from an internal CA, set tracker.ca_file to that CA's PEM file (and tracker.trust = \"ca\" to trust only it)";

impl DescribingVerifier {
    fn shared(
        roots: rustls::RootCertStore,
        expected: String,
        hint: &'static str,
        provider: Arc<CryptoProvider>,
    ) -> Result<Arc<dyn ServerCertVerifier>, TlsError> {
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        Ok(Arc::new(DescribingVerifier { inner, expected, hint }))
    }
}

impl ServerCertVerifier for DescribingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .map_err(|e| {
                let names = CertNames::of(end_entity);
                let validity = names.validity();
                rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(TrustFailure {
                    expected: format!("{} for {}", self.expected, server_name.to_str()),
                    subject: names.subject,
                    issuer: names.issuer,
                    fingerprint: crate::crypto::sha256(end_entity),
                    reason: format!("{e}{validity}"),
                    hint: self.hint,
                }))))
            })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Client configuration for https webhooks, per `delivery.trust`: the system's CAs (falling
/// back to the built-in web roots on a system that has none), the built-in web roots, or only
/// the CAs in `delivery.ca_file`; with `system` and `web`, `delivery.ca_file` adds to them.
pub fn webhook_client_config(trust: WebhookTrust, ca_file: Option<&Path>) -> Result<rustls::ClientConfig, TlsError> {
    client_config_for(trust, ca_file, "delivery", WEBHOOK_HINT)
}

/// Client configuration for the issue tracker, per `tracker.trust` and `tracker.ca_file`, with
/// the same rules as webhooks (the two share one builder).
pub fn tracker_client_config(trust: WebhookTrust, ca_file: Option<&Path>) -> Result<rustls::ClientConfig, TlsError> {
    client_config_for(trust, ca_file, "tracker", TRACKER_HINT)
}

/// The builder behind webhooks and the tracker; `section` names the settings in messages.
fn client_config_for(
    trust: WebhookTrust,
    ca_file: Option<&Path>,
    section: &str,
    hint: &'static str,
) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let (mut roots, mut expected) = match trust {
        WebhookTrust::System => match system_roots() {
            Ok(roots) => (roots, "a certificate issued by a CA the system trusts".to_owned()),
            Err(_) => {
                // Minimal images ship no CA store; public servers should still work there.
                tracing::warn!(
                    "no trusted CA certificates found on this system; https {section} peers are checked \
                     against the built-in web roots (install ca-certificates, or set {section}.trust = \"web\")"
                );
                (
                    web_roots(),
                    "a certificate issued by a public web CA (built-in roots)".to_owned(),
                )
            }
        },
        WebhookTrust::Web => (
            web_roots(),
            "a certificate issued by a public web CA (built-in roots)".to_owned(),
        ),
        WebhookTrust::Ca => {
            let path =
                ca_file.ok_or_else(|| TlsError::Config(format!("{section}.trust = \"ca\" needs {section}.ca_file")))?;
            let mut roots = rustls::RootCertStore::empty();
            add_pem_bundle(&mut roots, path)?;
            (roots, format!("a certificate issued by a CA in {}", path.display()))
        }
    };
    if trust != WebhookTrust::Ca {
        if let Some(path) = ca_file {
            add_pem_bundle(&mut roots, path)?;
            expected = format!("{expected} or by a CA in {}", path.display());
        }
    }
    let verifier = DescribingVerifier::shared(roots, expected, hint, provider.clone())?;
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

/// Client configuration for the local plain-http APIs the CLI, the demo and the benchmark
/// talk to: https is not expected there, so no system trust store is read for it.
pub fn local_client_config() -> Result<rustls::ClientConfig, TlsError> {
    webhook_client_config(WebhookTrust::Web, None)
}

/// One line for status and doctor: how https webhooks are trusted.
pub fn describe_webhook_trust(trust: WebhookTrust, ca_file: Option<&Path>) -> String {
    let base = match trust {
        WebhookTrust::System => "system roots",
        WebhookTrust::Web => "web roots",
        WebhookTrust::Ca => "ca",
    };
    match ca_file {
        Some(path) if trust == WebhookTrust::Ca => format!("ca {}", path.display()),
        Some(path) => format!("{base} + {}", path.display()),
        None if trust == WebhookTrust::Ca => "ca (delivery.ca_file missing)".to_owned(),
        None => base.to_owned(),
    }
}

fn web_roots() -> rustls::RootCertStore {
    rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key_pair(kind: u8) -> rcgen::KeyPair {
        let algorithm = match kind % 3 {
            0 => &rcgen::PKCS_ECDSA_P256_SHA256,
            1 => &rcgen::PKCS_ECDSA_P384_SHA384,
            _ => &rcgen::PKCS_ED25519,
        };
        rcgen::KeyPair::generate_for(algorithm).unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// webpki and relay agree on the pinned key: for any names and key type, the pin is
        /// the SHA-256 of the SPKI DER rcgen wrote, and the names read back as given.
        #[test]
        fn pin_is_the_sha256_of_the_spki_rcgen_wrote(
            kind in any::<u8>(),
            common_name in "[A-Za-z0-9 .-]{1,40}",
            organization in proptest::option::of("[A-Za-z0-9 ]{1,20}"),
            dns in proptest::collection::vec("[a-z][a-z0-9-]{0,20}(\\.[a-z][a-z0-9-]{0,10}){0,3}", 1..4),
            signed_by_ca in any::<bool>(),
        ) {
            let key = key_pair(kind);
            let mut params = rcgen::CertificateParams::new(dns).unwrap();
            params.distinguished_name = rcgen::DistinguishedName::new();
            params.distinguished_name.push(rcgen::DnType::CommonName, common_name.clone());
            if let Some(o) = &organization {
                params.distinguished_name.push(rcgen::DnType::OrganizationName, o.clone());
            }
            let (cert, issuer) = if signed_by_ca {
                let ca_key = key_pair(kind.wrapping_add(1));
                let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
                ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
                ca.distinguished_name.push(rcgen::DnType::CommonName, "Test CA");
                let ca_cert = ca.self_signed(&ca_key).unwrap();
                (params.signed_by(&key, &ca_cert, &ca_key).unwrap(), "CN=Test CA".to_owned())
            } else {
                let cert = params.self_signed(&key).unwrap();
                let name = CertNames::of(cert.der()).subject;
                (cert, name)
            };
            let pin = spki_pin(cert.der()).unwrap();
            prop_assert_eq!(pin, crate::crypto::sha256(&key.public_key_der()));
            prop_assert_eq!(format_pin(&pin), format!("sha256/{}", crate::crypto::hex(&pin)));
            let names = CertNames::of(cert.der());
            prop_assert!(names.subject.contains(&format!("CN={common_name}")), "{}", names.subject);
            if let Some(o) = &organization {
                prop_assert!(names.subject.contains(&format!("O={o}")), "{}", names.subject);
            }
            prop_assert_eq!(&names.issuer, &issuer);
            prop_assert!(names.validity().starts_with("; valid "));
        }

        /// Anything that is not a certificate is refused, never a panic or a pin.
        #[test]
        fn garbage_has_no_pin(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            prop_assert!(spki_pin(&CertificateDer::from(bytes.clone())).is_err());
            let _ = CertNames::of(&bytes);
        }
    }

    #[test]
    fn names_escape_control_characters() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "evil\u{1b}[2J");
        let cert = params.self_signed(&key).unwrap();
        let names = CertNames::of(cert.der());
        assert!(!names.subject.contains('\u{1b}'), "{}", names.subject);
        assert!(names.subject.contains("CN=evil"), "{}", names.subject);
    }

    #[test]
    fn a_pin_mismatch_names_both_keys_and_the_certificate() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "intercepting proxy");
        let cert = params.self_signed(&key).unwrap();
        let verifier = PinVerifier {
            pin: [7; 32],
            provider: provider(),
        };
        let err = verifier
            .verify_server_cert(
                cert.der(),
                &[],
                &ServerName::try_from("localhost").unwrap(),
                &[],
                UnixTime::now(),
            )
            .unwrap_err();
        let text = describe(&err).unwrap();
        assert!(text.contains("certificate pin mismatch"), "{text}");
        assert!(
            text.contains("\"CN=intercepting proxy\" issued by \"CN=intercepting proxy\""),
            "{text}"
        );
        assert!(
            text.contains(&format_pin(&crate::crypto::sha256(&key.public_key_der()))),
            "{text}"
        );
        assert!(text.contains(&format_pin(&[7; 32])), "{text}");
        let ok = PinVerifier {
            pin: crate::crypto::sha256(&key.public_key_der()),
            provider: provider(),
        };
        assert!(ok
            .verify_server_cert(
                cert.der(),
                &[],
                &ServerName::try_from("x").unwrap(),
                &[],
                UnixTime::now()
            )
            .is_ok());
    }

    #[test]
    fn webhook_trust_is_described_and_a_ca_needs_its_file() {
        assert_eq!(describe_webhook_trust(WebhookTrust::System, None), "system roots");
        assert!(
            webhook_client_config(WebhookTrust::System, None).is_ok(),
            "system roots, or the web roots as fallback"
        );
        let err = webhook_client_config(WebhookTrust::Ca, None).err().unwrap().to_string();
        assert!(err.contains("delivery.ca_file"), "{err}");
        let missing = Some(Path::new("/nonexistent/ca.pem"));
        let err = webhook_client_config(WebhookTrust::Ca, missing)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
        assert_eq!(
            describe_webhook_trust(WebhookTrust::Ca, missing),
            "ca /nonexistent/ca.pem"
        );
        assert_eq!(
            describe_webhook_trust(WebhookTrust::Web, missing),
            "web roots + /nonexistent/ca.pem"
        );
    }

    #[test]
    fn self_signed_identity_is_created_once_and_pinned() {
        let dir = tempfile::tempdir().unwrap();
        let a = server_identity(None, None, dir.path(), &["relay.example".into()]).unwrap();
        let b = server_identity(None, None, dir.path(), &[]).unwrap();
        assert_eq!(a.pin, b.pin, "the certificate is kept across restarts");
        let key = dir.path().join("node.key");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(key).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn configured_certificate_is_served_and_pinned() {
        let dir = tempfile::tempdir().unwrap();
        let key_pair = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["node.example".into()])
            .unwrap()
            .self_signed(&key_pair)
            .unwrap();
        let (c, k) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key_pair.serialize_pem()).unwrap();
        let id = server_identity(Some(&c), Some(&k), &dir.path().join("tls"), &[]).unwrap();
        assert_eq!(id.pin, crate::crypto::sha256(&key_pair.public_key_der()));
        assert!(!dir.path().join("tls").exists());
    }

    #[test]
    fn a_broken_certificate_file_is_refused_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let key_pair = rcgen::KeyPair::generate().unwrap();
        let (c, k) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        // Valid PEM around bytes that are no certificate.
        let body = data_encoding::BASE64.encode(b"garbage");
        let pem = format!("-----BEGIN CERTIFICATE-----\n{body}\n-----END CERTIFICATE-----\n");
        std::fs::write(&c, pem).unwrap();
        std::fs::write(&k, key_pair.serialize_pem()).unwrap();
        let err = server_identity(Some(&c), Some(&k), dir.path(), &[])
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("c.pem") && err.contains("not a usable X.509 certificate"),
            "{err}"
        );
    }

    #[test]
    fn missing_files_name_the_path() {
        let err = server_identity(
            Some(Path::new("/nonexistent/c.pem")),
            Some(Path::new("/nonexistent/k.pem")),
            Path::new("/tmp"),
            &[],
        )
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("/nonexistent/c.pem"), "{err}");
    }
}
