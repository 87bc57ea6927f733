//! rustls client configurations for STARTTLS (RFC 3207) and implicit TLS (RFC 8314).
//!
//! Two kinds of configuration, both TLS 1.2 and 1.3 on the `ring` provider:
//!
//! * [`client_config`]: verifies the server's certificate chain and name, against the
//!   public web PKI roots (`webpki-roots`) or, when a CA file is given, only against
//!   the CAs in it (a private relay signed by its own CA). Used for
//!   [`TlsMode::Implicit`] and [`TlsMode::Required`].
//! * [`opportunistic_config`]: encrypts without authenticating, for
//!   [`TlsMode::Opportunistic`]. RFC 7435 (opportunistic security) asks for exactly
//!   this: protection against passive eavesdropping whenever the peer can do TLS at
//!   all, without demanding authentication that MX hosts cannot offer. Many MX hosts
//!   present self-signed, expired or mismatched certificates, and the sender has no
//!   name to check them against that an attacker could not also forge (the MX lookup
//!   is not authenticated without DNSSEC/DANE). Refusing such a certificate would
//!   only push the message back to plain text, which is worse; Postfix's `may`
//!   security level makes the same choice. The handshake signatures are still
//!   checked, so the peer has to hold the key of the certificate it shows.
//!
//! Build a [`TlsSettings`] once per upstream and hand its configuration to every
//! connection: a `ClientConfig` holds the session resumption cache, so sharing one
//! lets later connections to the same upstream resume instead of doing a full
//! handshake, and the CA file is read once, not per connection.

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{self, CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tsubame_config::TlsMode;

/// Largest CA file read: 4 MiB, about twenty times Debian's whole
/// `/etc/ssl/certs/ca-certificates.crt` (≈ 215 KB, 2025), so any real CA file fits and
/// a wrong path (a log, a device) fails fast instead of filling memory.
pub const CA_FILE_BYTES_MAX: u64 = 4 * 1024 * 1024;

/// The TLS versions offered. TLS 1.2 is still what many MX hosts speak best; older
/// versions are deprecated by RFC 8996 and rustls does not implement them.
static PROTOCOL_VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// Why a TLS configuration could not be built. Names the CA file; never holds key
/// material (a CA file holds only public certificates).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("CA file {}: cannot read it: {source}", .path.display())]
    CaFileUnreadable { path: PathBuf, source: io::Error },
    #[error("CA file {}: larger than {CA_FILE_BYTES_MAX} bytes", .path.display())]
    CaFileTooLarge { path: PathBuf },
    #[error("CA file {}: not valid PEM: {reason}", .path.display())]
    CaFileInvalidPem { path: PathBuf, reason: String },
    #[error("CA file {}: holds no PEM certificate (-----BEGIN CERTIFICATE-----)", .path.display())]
    CaFileEmpty { path: PathBuf },
    /// The PEM decoded but the certificate inside is not one rustls can anchor
    /// trust in (not DER X.509, or unsupported). `number` counts from 1.
    #[error("CA file {}: certificate {number} is not usable as a trust anchor: {reason}", .path.display())]
    CaCertificateInvalid {
        path: PathBuf,
        number: usize,
        reason: String,
    },
    /// rustls refused the configuration (no cipher suite for the versions asked).
    #[error("building the TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// One upstream's TLS: its mode and the rustls configuration that goes with it,
/// built once and shared (the `Arc` is cloned per connection).
#[derive(Debug, Clone)]
pub struct TlsSettings {
    mode: TlsMode,
    /// Invariant: `None` exactly when `mode` is [`TlsMode::None`]; the verifying
    /// configuration for `Implicit` and `Required`, the opportunistic one for
    /// `Opportunistic`.
    config: Option<Arc<ClientConfig>>,
}

impl TlsSettings {
    /// The configuration `mode` needs. `ca_file` replaces the web PKI roots for
    /// `Implicit` and `Required`; it is not read for `Opportunistic` (no certificate
    /// is checked at that level) nor for `None`.
    pub fn new(mode: TlsMode, ca_file: Option<&Path>) -> Result<Self, TlsError> {
        let config = match mode {
            TlsMode::Implicit | TlsMode::Required => Some(client_config(ca_file)?),
            TlsMode::Opportunistic => Some(opportunistic_config()?),
            TlsMode::None => None,
        };
        Ok(Self { mode, config })
    }

    pub fn mode(&self) -> TlsMode {
        self.mode
    }

    /// The configuration to put in [`crate::connection::ConnectOptions::tls_config`];
    /// `None` for [`TlsMode::None`].
    pub fn config(&self) -> Option<Arc<ClientConfig>> {
        self.config.clone()
    }
}

/// A configuration that verifies the server's certificate: against the CAs in
/// `ca_file` only when given, else against the web PKI roots of `webpki-roots`.
pub fn client_config(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = match ca_file {
        Some(path) => roots_from_file(path)?,
        None => RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        },
    };
    let config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(PROTOCOL_VERSIONS)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A configuration that encrypts but accepts any certificate (RFC 7435; see the
/// module documentation for why). For [`TlsMode::Opportunistic`] only.
pub fn opportunistic_config() -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let verifier = AnyCertificate {
        algorithms: provider.signature_verification_algorithms,
    };
    let config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(PROTOCOL_VERSIONS)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Always `ring`, named explicitly: the process-wide default provider is not relied on,
/// and aws-lc is not built.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(crypto::ring::default_provider())
}

/// Reads every certificate of a PEM file into a root store. Other PEM sections
/// (a private key by mistake, parameters) are skipped by the PEM reader.
fn roots_from_file(path: &Path) -> Result<RootCertStore, TlsError> {
    let unreadable = |source| TlsError::CaFileUnreadable {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(unreadable)?;
    let mut pem = Vec::new();
    file.take(CA_FILE_BYTES_MAX + 1)
        .read_to_end(&mut pem)
        .map_err(unreadable)?;
    if u64::try_from(pem.len()).unwrap_or(u64::MAX) > CA_FILE_BYTES_MAX {
        return Err(TlsError::CaFileTooLarge {
            path: path.to_owned(),
        });
    }
    let mut roots = RootCertStore::empty();
    for (index, certificate) in CertificateDer::pem_slice_iter(&pem).enumerate() {
        let certificate = certificate.map_err(|error| TlsError::CaFileInvalidPem {
            path: path.to_owned(),
            reason: error.to_string(),
        })?;
        roots
            .add(certificate)
            .map_err(|error| TlsError::CaCertificateInvalid {
                path: path.to_owned(),
                number: index + 1,
                reason: error.to_string(),
            })?;
    }
    if roots.is_empty() {
        return Err(TlsError::CaFileEmpty {
            path: path.to_owned(),
        });
    }
    Ok(roots)
}

/// Accepts any certificate chain and name, but checks the handshake signatures with
/// the certificate's key, so the peer must hold that key (RFC 7435 opportunistic
/// security: encrypted, not authenticated).
struct AnyCertificate {
    algorithms: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for AnyCertificate {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("AnyCertificate")
    }
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        crypto::verify_tls12_signature(message, certificate, signature, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        crypto::verify_tls13_signature(message, certificate, signature, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn write(dir: &Path, name: &str, contents: &[u8]) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    #[test]
    fn web_pki_and_opportunistic_configs_build() {
        client_config(None).unwrap();
        opportunistic_config().unwrap();
        for mode in [TlsMode::Implicit, TlsMode::Required, TlsMode::Opportunistic] {
            let settings = TlsSettings::new(mode, None).unwrap();
            assert_eq!(settings.mode(), mode);
            assert!(settings.config().is_some(), "{mode:?}");
        }
        assert!(
            TlsSettings::new(TlsMode::None, None)
                .unwrap()
                .config()
                .is_none()
        );
    }

    #[test]
    fn settings_share_one_config() {
        let settings = TlsSettings::new(TlsMode::Required, None).unwrap();
        let first = settings.config().unwrap();
        let second = settings.clone().config().unwrap();
        assert!(Arc::ptr_eq(&first, &second));
    }

    #[test]
    fn opportunistic_ignores_the_ca_file() {
        let missing = Path::new("/nonexistent/tsubame-test/ca.pem");
        assert!(TlsSettings::new(TlsMode::Opportunistic, Some(missing)).is_ok());
        assert!(TlsSettings::new(TlsMode::None, Some(missing)).is_ok());
    }

    #[test]
    fn bad_ca_files_are_named_in_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let empty = write(dir.path(), "empty.pem", b"");
        let garbage = write(
            dir.path(),
            "garbage.pem",
            b"this is not PEM at all\n\x00\xff",
        );
        let key_only = write(
            dir.path(),
            "key.pem",
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        );
        let bad_base64 = write(
            dir.path(),
            "bad-base64.pem",
            b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        );
        let not_der = write(
            dir.path(),
            "not-der.pem",
            b"-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n",
        );
        let unterminated = write(
            dir.path(),
            "unterminated.pem",
            b"-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n",
        );
        let cases: &[(&Path, &str)] = &[
            (&missing, "cannot read it"),
            (&empty, "holds no PEM certificate"),
            (&garbage, "holds no PEM certificate"),
            (&key_only, "holds no PEM certificate"),
            (&bad_base64, "not valid PEM"),
            (&not_der, "certificate 1 is not usable as a trust anchor"),
            (&unterminated, "not valid PEM"),
        ];
        for (path, expected) in cases {
            let error = client_config(Some(path)).expect_err("must fail");
            let message = error.to_string();
            assert!(message.contains(expected), "{path:?}: {message}");
            assert!(
                message.contains(&path.display().to_string()),
                "{path:?}: {message}"
            );
            let settings = TlsSettings::new(TlsMode::Required, Some(path));
            assert!(settings.is_err(), "{path:?}");
        }
    }

    #[test]
    fn oversized_ca_file_is_refused_before_parsing() {
        let dir = tempfile::tempdir().unwrap();
        let size = usize::try_from(CA_FILE_BYTES_MAX).unwrap() + 1;
        let huge = write(dir.path(), "huge.pem", &vec![b'A'; size]);
        let error = client_config(Some(&huge)).expect_err("must fail");
        assert!(matches!(error, TlsError::CaFileTooLarge { .. }), "{error}");
    }
}
