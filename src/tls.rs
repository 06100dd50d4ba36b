//! TLS: PEM loading and the rustls configurations of the data port (server side, optionally
//! requiring client certificates) and of upstream connections (client side, verifying model
//! servers against the system roots or `--upstream-ca`, optionally presenting a certificate).
//!
//! Everything uses rustls with the `ring` provider. Key material is read from files, kept in
//! rustls' own types and never formatted: errors name the file and the setting, never the bytes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The ALPN protocol both sides speak: gRPC is HTTP/2.
const ALPN_H2: &[u8] = b"h2";

/// The crypto provider every configuration is built with.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate of a PEM file; at least one is required.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not a valid PEM certificate file: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

/// Reads the first private key (PKCS#8, PKCS#1 or SEC1) of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    // The parser's error could quote part of the file: only its kind is reported.
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => {
            format!("{}: no PEM private key in it", path.display())
        }
        _ => format!("{}: not a valid PEM private key file", path.display()),
    })
}

/// A root store of every certificate in a PEM bundle.
fn load_roots(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots
            .add(cert)
            .map_err(|e| format!("{}: unusable CA certificate: {e}", path.display()))?;
    }
    Ok(roots)
}

/// What went wrong building a TLS configuration, and which setting it is about (the flag's name
/// with underscores, as [`crate::config::ConfigError`] wants it).
#[derive(Debug)]
pub struct TlsError {
    /// The setting at fault.
    pub setting: &'static str,
    /// What is wrong.
    pub message: String,
}

impl TlsError {
    fn new(setting: &'static str, message: String) -> Self {
        TlsError { setting, message }
    }
}

impl std::fmt::Display for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "--{}: {}", self.setting.replace('_', "-"), self.message)
    }
}

impl std::error::Error for TlsError {}

/// The data port's TLS files: `--tls-cert`, `--tls-key`, `--tls-client-ca`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerTlsFiles {
    /// Certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
    /// CA bundle (PEM) that client certificates must chain to; none means no client
    /// certificates are asked for.
    pub client_ca: Option<PathBuf>,
}

impl ServerTlsFiles {
    /// Builds the server configuration: TLS 1.2 and 1.3, ALPN `h2`, client certificates
    /// required when a client CA is set. Checks that the key belongs to the certificate.
    pub fn server_config(
        &self,
        settings: [&'static str; 3],
    ) -> Result<Arc<ServerConfig>, TlsError> {
        let [cert_setting, key_setting, ca_setting] = settings;
        let certs = load_certs(&self.cert).map_err(|m| TlsError::new(cert_setting, m))?;
        let key = load_key(&self.key).map_err(|m| TlsError::new(key_setting, m))?;
        let builder = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError::new(cert_setting, e.to_string()))?;
        let builder = match &self.client_ca {
            Some(ca) => {
                let roots = load_roots(ca).map_err(|m| TlsError::new(ca_setting, m))?;
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                        .build()
                        .map_err(|e| TlsError::new(ca_setting, format!("{}: {e}", ca.display())))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|e| key_error(key_setting, &self.key, &self.cert, e))?;
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Arc::new(config))
    }
}

fn key_error(setting: &'static str, key: &Path, cert: &Path, e: rustls::Error) -> TlsError {
    let message = match e {
        rustls::Error::InconsistentKeys(_) => format!(
            "the private key in {} does not match the certificate in {}",
            key.display(),
            cert.display()
        ),
        e => format!("{}: unusable private key: {e}", key.display()),
    };
    TlsError::new(setting, message)
}

/// TLS towards upstreams: `--upstream-ca`, `--upstream-cert`, `--upstream-key`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UpstreamTlsFiles {
    /// CA bundle that model servers' certificates must chain to; none means the system roots.
    pub ca: Option<PathBuf>,
    /// Client certificate chain presented to model servers (with `key`).
    pub cert: Option<PathBuf>,
    /// The client certificate's private key.
    pub key: Option<PathBuf>,
}

impl UpstreamTlsFiles {
    /// Builds the client configuration for `https://` upstreams: TLS 1.2 and 1.3, ALPN `h2`.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        self.build(true)
    }

    /// Reads and checks the files given (CA bundle, client certificate and key, the key
    /// matching the certificate) without loading the system roots.
    pub fn check(&self) -> Result<(), TlsError> {
        self.build(false).map(drop)
    }

    fn build(&self, system: bool) -> Result<Arc<ClientConfig>, TlsError> {
        let roots = match &self.ca {
            Some(ca) => load_roots(ca).map_err(|m| TlsError::new("upstream_ca", m))?,
            None if system => system_roots(),
            None => RootCertStore::empty(),
        };
        let builder = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError::new("upstream_ca", e.to_string()))?
            .with_root_certificates(roots);
        let mut config = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let certs = load_certs(cert).map_err(|m| TlsError::new("upstream_cert", m))?;
                let k = load_key(key).map_err(|m| TlsError::new("upstream_key", m))?;
                builder
                    .with_client_auth_cert(certs, k)
                    .map_err(|e| key_error("upstream_key", key, cert, e))?
            }
            (Some(_), None) => {
                return Err(TlsError::new(
                    "upstream_key",
                    "required with --upstream-cert".into(),
                ))
            }
            (None, Some(_)) => {
                return Err(TlsError::new(
                    "upstream_cert",
                    "required with --upstream-key".into(),
                ))
            }
            (None, None) => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Arc::new(config))
    }
}

/// The operating system's trust store (what `openssl` would use); certificates it cannot parse
/// are skipped, and a store that cannot be read at all gives an empty set, so that `https://`
/// upstreams then fail verification with a clear error rather than modelgate failing to start.
fn system_roots() -> RootCertStore {
    let loaded = rustls_native_certs::load_native_certs();
    for e in &loaded.errors {
        tracing::warn!(error = %e, "cannot read part of the system's trusted certificates");
    }
    let mut roots = RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(loaded.certs);
    if ignored > 0 {
        tracing::debug!(added, ignored, "system trust store loaded");
    }
    roots
}

/// A TLS error from a connection attempt, named the way operators search for it, e.g.
/// `certificate verify failed: UnknownIssuer`.
pub fn describe_io_error(e: &std::io::Error) -> String {
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return e.to_string();
    };
    match tls {
        rustls::Error::InvalidCertificate(c) => format!("certificate verify failed: {c:?}"),
        rustls::Error::NoApplicationProtocol => {
            "the server does not speak HTTP/2 over TLS (no ALPN h2)".to_string()
        }
        rustls::Error::AlertReceived(a) => format!("the server refused the handshake: {a:?}"),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreadable_and_bad_files_are_named_without_their_contents() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        assert!(load_certs(&missing).unwrap_err().contains("missing.pem"));
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate secretstuff").unwrap();
        let err = load_certs(&junk).unwrap_err();
        assert!(err.contains("no PEM certificate"), "{err}");
        let err = load_key(&junk).unwrap_err();
        assert!(err.contains("no PEM private key"), "{err}");
        assert!(!err.contains("secretstuff"), "{err}");
    }
}
