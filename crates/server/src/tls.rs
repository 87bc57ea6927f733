//! The listener side's TLS configuration: a certificate chain and its private key from
//! PEM files, served with rustls (TLS 1.2 and 1.3 only, the ring provider), and
//! reloadable so that a renewed certificate takes effect without a restart.
//!
//! Not wired into the listeners yet (device login, STARTTLS and implicit TLS on the
//! listening side come with it); loading and reloading are complete and tested against
//! `openssl s_client`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Largest certificate chain or key file read: a chain of a few certificates is a few
/// KiB; anything past this is not a PEM file we want.
pub const PEM_FILE_BYTES_MAX: u64 = 1024 * 1024;

/// Why a certificate or key could not be loaded. Names files, never key material.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("cannot read {path}: {source}")]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is larger than {PEM_FILE_BYTES_MAX} bytes; is it really a PEM file?")]
    TooLarge { path: PathBuf },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path}: certificate {number} is not valid PEM: {reason}")]
    BadCertificate {
        path: PathBuf,
        number: usize,
        reason: String,
    },
    #[error("{path} holds no usable private key (PKCS#8, PKCS#1 or SEC1 PEM): {reason}")]
    BadKey { path: PathBuf, reason: String },
    /// rustls refused the pair, typically because the key does not match the
    /// certificate.
    #[error("certificate {certificate} and key {key} do not form a usable pair: {reason}")]
    Mismatch {
        certificate: PathBuf,
        key: PathBuf,
        reason: String,
    },
}

fn read_limited(path: &Path) -> Result<Vec<u8>, TlsConfigError> {
    let file = std::fs::File::open(path).map_err(|source| TlsConfigError::Unreadable {
        path: path.to_path_buf(),
        source,
    })?;
    let mut bytes = Vec::new();
    file.take(PEM_FILE_BYTES_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| TlsConfigError::Unreadable {
            path: path.to_path_buf(),
            source,
        })?;
    if bytes.len() as u64 > PEM_FILE_BYTES_MAX {
        return Err(TlsConfigError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    Ok(bytes)
}

/// Builds a server configuration from a PEM certificate chain (leaf first) and its key.
pub fn load_server_config(
    certificate_file: &Path,
    key_file: &Path,
) -> Result<Arc<ServerConfig>, TlsConfigError> {
    let chain_pem = read_limited(certificate_file)?;
    let mut chain = Vec::new();
    for (index, certificate) in CertificateDer::pem_slice_iter(&chain_pem).enumerate() {
        chain.push(certificate.map_err(|error| TlsConfigError::BadCertificate {
            path: certificate_file.to_path_buf(),
            number: index + 1,
            reason: error.to_string(),
        })?);
    }
    if chain.is_empty() {
        return Err(TlsConfigError::NoCertificate {
            path: certificate_file.to_path_buf(),
        });
    }
    let key_pem = read_limited(key_file)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|error| TlsConfigError::BadKey {
        path: key_file.to_path_buf(),
        // The pem error says what was wrong with the framing, not the key's bytes.
        reason: error.to_string(),
    })?;
    let mismatch = |reason: String| TlsConfigError::Mismatch {
        certificate: certificate_file.to_path_buf(),
        key: key_file.to_path_buf(),
        reason,
    };
    let config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|error| mismatch(error.to_string()))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|error| mismatch(error.to_string()))?;
    Ok(Arc::new(config))
}

/// The certificate in use, replaceable while connections run: a connection takes the
/// current configuration when its handshake starts and keeps it; a reload affects only
/// later handshakes.
#[derive(Debug)]
pub struct ReloadableTls {
    certificate_file: PathBuf,
    key_file: PathBuf,
    current: RwLock<Arc<ServerConfig>>,
}

impl ReloadableTls {
    pub fn load(certificate_file: &Path, key_file: &Path) -> Result<Self, TlsConfigError> {
        let config = load_server_config(certificate_file, key_file)?;
        Ok(Self {
            certificate_file: certificate_file.to_path_buf(),
            key_file: key_file.to_path_buf(),
            current: RwLock::new(config),
        })
    }

    /// The configuration for a new handshake.
    pub fn current(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Reads the files again. On any error the old certificate stays in use and the
    /// error says why (for the log).
    pub fn reload(&self) -> Result<(), TlsConfigError> {
        let config = load_server_config(&self.certificate_file, &self.key_file)?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = config;
        Ok(())
    }
}
