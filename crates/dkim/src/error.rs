use std::path::PathBuf;

/// Everything that can go wrong in this crate. No variant carries key material: a key
/// file is named by its path, and a parse failure by a fixed description.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read DKIM key file {path}: {source}")]
    ReadKey {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The PEM text holds no private key block, or one that does not decode.
    #[error("{origin}: {reason}")]
    KeyFormat {
        origin: String,
        reason: &'static str,
    },
    /// RFC 8301 section 3.2: signers must use RSA keys of at least 1024 bits; we follow
    /// the (and current practice's) 2048.
    #[error(
        "{origin}: RSA key is smaller than {min} bits; generate a new one with `tsubame dkim keygen --algorithm rsa`",
        min = crate::RSA_BITS_MIN
    )]
    RsaKeyTooSmall { origin: String },
    #[error("invalid DKIM signing domain {domain:?}: {reason}")]
    InvalidDomain {
        domain: String,
        reason: &'static str,
    },
    #[error("invalid DKIM selector {selector:?}: {reason}")]
    InvalidSelector {
        selector: String,
        reason: &'static str,
    },
    #[error("invalid DKIM signed header list: {reason}")]
    InvalidHeaderList { reason: String },
    #[error(
        "invalid DKIM canonicalization {text:?}: use relaxed/relaxed, relaxed/simple, simple/relaxed or simple/simple"
    )]
    InvalidCanonicalization { text: String },
    #[error("a DKIM signer needs one key, or two of different algorithms for a dual signature")]
    InvalidKeySet,
    /// mail-auth refused to sign (for example, a message with no header at all).
    #[error("DKIM signing for {domain} (selector {selector}) failed: {reason}")]
    Sign {
        domain: String,
        selector: String,
        reason: String,
    },
    #[error("unsupported RSA key size {bits} bits (allowed: 2048, 3072, 4096)")]
    UnsupportedRsaBits { bits: u32 },
    #[error("cannot generate DKIM key: {reason}")]
    Generate { reason: String },
    #[error("{path} already exists; pass --force to replace it")]
    KeyFileExists { path: PathBuf },
    #[error("cannot write DKIM key file {path}: {source}")]
    WriteKey {
        path: PathBuf,
        source: std::io::Error,
    },
}
