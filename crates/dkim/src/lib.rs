//! DKIM for tsubame: signing keys (load from PEM, generate, publish as a DNS TXT record)
//! signing of raw RFC 5322 messages with mail-auth, relaxed/relaxed (RFC 6376), and
//! checking a published key record (RFC 6376 section 3.6.1) against a key.
//!
//! The crate does no sockets, threads or clocks of its own (mail-auth reads the system
//! clock for the `t=` tag); key generation for RSA runs `openssl genpkey`, because the
//! workspace's one crypto provider, ring, cannot generate RSA keys.
//!
//! Nothing here prints or returns key material in an error: errors name the file and
//! what is wrong with it, never its content.

#![forbid(unsafe_code)]

/// The longest domain name in text form, RFC 1035 section 2.3.4.
const DNS_NAME_BYTES_MAX: usize = 253;
/// The longest label of a domain name, RFC 1035 section 2.3.4.
const DNS_LABEL_BYTES_MAX: usize = 63;

mod error;
mod from_domain;
mod key;
mod keygen;
mod record;
mod signer;

pub use error::Error;
pub use from_domain::{from_domain, has_header, message_id};
pub use key::{Algorithm, RSA_BITS_MIN, SigningKey, read_key_pem};
pub use keygen::{RSA_BITS_ALLOWED, generate_ed25519_pem, generate_rsa_pem, write_key_file};
pub use record::{
    KEY_RECORD_BYTES_MAX, KeyRecord, PublicKey, RecordSyntaxError, RecordVerdict, check_key_record,
    parse_key_record,
};
pub use signer::{
    Canonicalization, DEFAULT_SIGNED_HEADERS, OVER_SIGNED_HEADERS, SIGNED_HEADERS_MAX,
    SignedHeaders, Signer, SignerKey, check_domain_and_selector,
};
