//! DKIM private keys: loaded from PEM (RSA in PKCS#1 or PKCS#8, Ed25519 in PKCS#8),
//! checked, and described as the DNS TXT record that publishes their public half.

use std::fmt;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use mail_auth::common::crypto::{Ed25519Key, RsaKey, Sha256};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject as _;

use crate::Error;

/// The smallest RSA modulus we sign with. RFC 8301 section 3.2 sets 1024 as the floor
/// and recommends 2048; mailbox providers treat 1024 as weak, and ring refuses to sign
/// with less than 2048 anyway.
pub const RSA_BITS_MIN: usize = 2048;

/// Longest key file we read. A 4096-bit RSA PKCS#1 PEM is about 3.3 KiB; 64 KiB leaves
/// room for comments and bundles without reading an arbitrary file into memory.
const KEY_FILE_BYTES_MAX: u64 = 64 * 1024;

/// The DKIM signing algorithms we produce (RFC 6376 section 3.3, RFC 8463).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// `a=rsa-sha256`, `k=rsa`.
    RsaSha256,
    /// `a=ed25519-sha256`, `k=ed25519` (RFC 8463).
    Ed25519Sha256,
}

impl Algorithm {
    /// The `k=` tag value of the key record.
    pub fn key_type(self) -> &'static str {
        match self {
            Algorithm::RsaSha256 => "rsa",
            Algorithm::Ed25519Sha256 => "ed25519",
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            Algorithm::RsaSha256 => "rsa-sha256",
            Algorithm::Ed25519Sha256 => "ed25519-sha256",
        })
    }
}

pub(crate) enum KeyMaterial {
    Rsa(RsaKey<Sha256>),
    Ed25519(Ed25519Key),
}

/// A checked DKIM private key. Its `Debug` shows the algorithm and size, never the key.
pub struct SigningKey {
    /// Invariant: an RSA key has a modulus of at least `RSA_BITS_MIN` bits.
    pub(crate) material: KeyMaterial,
    /// The public key as it goes into the `p=` tag, before base64: for RSA a DER
    /// SubjectPublicKeyInfo (what dkimpy and OpenDKIM expect), for Ed25519 the raw 32
    /// bytes (RFC 8463 section 4.2).
    public_key_bytes: Vec<u8>,
    /// RSA modulus size; 256 for Ed25519.
    bits: usize,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("SigningKey")
            .field("algorithm", &self.algorithm())
            .field("bits", &self.bits)
            .finish_non_exhaustive()
    }
}

/// The text of a PEM key file, at most 64 KiB (a key file is a few KiB; this keeps an
/// arbitrary file out of memory). Errors name the file, never its content.
pub fn read_key_pem(path: &Path) -> Result<Vec<u8>, Error> {
    use std::io::Read as _;
    let read_error = |source| Error::ReadKey {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_error)?;
    let mut pem = Vec::new();
    file.take(KEY_FILE_BYTES_MAX + 1)
        .read_to_end(&mut pem)
        .map_err(read_error)?;
    if pem.len() as u64 > KEY_FILE_BYTES_MAX {
        return Err(Error::KeyFormat {
            origin: path.display().to_string(),
            reason: "file is larger than 64 KiB, not a DKIM key",
        });
    }
    Ok(pem)
}

impl SigningKey {
    /// Reads a PEM key file. Errors name the file, never its content.
    pub fn from_pem_file(path: &Path) -> Result<Self, Error> {
        let pem = read_key_pem(path)?;
        Self::from_pem(&pem, &path.display().to_string())
    }

    /// Parses PEM text; `origin` names it in errors (a path, or "generated key").
    pub fn from_pem(pem: &[u8], origin: &str) -> Result<Self, Error> {
        let format_error = |reason| Error::KeyFormat {
            origin: origin.to_string(),
            reason,
        };
        // The pem error's Display can quote a line of the file; map it to fixed text.
        let der = PrivateKeyDer::from_pem_slice(pem)
            .map_err(|_| format_error("no PEM private key block (BEGIN PRIVATE KEY or BEGIN RSA PRIVATE KEY) that decodes"))?;
        match der {
            PrivateKeyDer::Pkcs1(pkcs1) => Self::rsa(PrivateKeyDer::Pkcs1(pkcs1), origin),
            PrivateKeyDer::Pkcs8(pkcs8) => {
                if let Ok(pair) = ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(
                    pkcs8.secret_pkcs8_der(),
                ) {
                    use ring::signature::KeyPair as _;
                    let public_key_bytes = pair.public_key().as_ref().to_vec();
                    let key = Ed25519Key::from_pkcs8_maybe_unchecked_der(pkcs8.secret_pkcs8_der())
                        .map_err(|_| format_error("Ed25519 PKCS#8 key rejected"))?;
                    return Ok(SigningKey {
                        material: KeyMaterial::Ed25519(key),
                        public_key_bytes,
                        bits: 256,
                    });
                }
                Self::rsa(PrivateKeyDer::Pkcs8(pkcs8), origin)
            }
            _ => Err(format_error(
                "unsupported key type (only RSA and Ed25519 keys sign DKIM)",
            )),
        }
    }

    fn rsa(der: PrivateKeyDer<'_>, origin: &str) -> Result<Self, Error> {
        let parsed = match &der {
            PrivateKeyDer::Pkcs1(pkcs1) => ring::rsa::KeyPair::from_der(pkcs1.secret_pkcs1_der()),
            PrivateKeyDer::Pkcs8(pkcs8) => ring::rsa::KeyPair::from_pkcs8(pkcs8.secret_pkcs8_der()),
            _ => {
                return Err(Error::KeyFormat {
                    origin: origin.to_string(),
                    reason: "unsupported key type",
                });
            }
        };
        let pair = parsed.map_err(|rejected| {
            if rejected.to_string() == "TooSmall" {
                Error::RsaKeyTooSmall {
                    origin: origin.to_string(),
                }
            } else {
                Error::KeyFormat {
                    origin: origin.to_string(),
                    reason: "not an RSA or Ed25519 private key ring accepts",
                }
            }
        })?;
        let bits = pair.public().modulus_len() * 8;
        if bits < RSA_BITS_MIN {
            return Err(Error::RsaKeyTooSmall {
                origin: origin.to_string(),
            });
        }
        let public_key_bytes = rsa_subject_public_key_info(pair.public().as_ref());
        let key =
            RsaKey::<Sha256>::from_key_der(der.clone_key()).map_err(|_| Error::KeyFormat {
                origin: origin.to_string(),
                reason: "RSA key rejected by the signer",
            })?;
        Ok(SigningKey {
            material: KeyMaterial::Rsa(key),
            public_key_bytes,
            bits,
        })
    }

    pub fn algorithm(&self) -> Algorithm {
        match self.material {
            KeyMaterial::Rsa(_) => Algorithm::RsaSha256,
            KeyMaterial::Ed25519(_) => Algorithm::Ed25519Sha256,
        }
    }

    /// RSA modulus size in bits; 256 for Ed25519.
    pub fn bits(&self) -> usize {
        self.bits
    }

    /// The public key as the `p=` tag holds it, before base64: for RSA a DER
    /// SubjectPublicKeyInfo, for Ed25519 the raw 32 bytes. Public data, safe to print.
    pub fn public_key_bytes(&self) -> &[u8] {
        &self.public_key_bytes
    }

    /// The value of the DKIM key record: `v=DKIM1; k=rsa; p=BASE64` (RFC 6376 section
    /// 3.6.1).
    pub fn dns_txt_value(&self) -> String {
        format!(
            "v=DKIM1; k={}; p={}",
            self.algorithm().key_type(),
            BASE64.encode(&self.public_key_bytes)
        )
    }

    /// The zone-file line that publishes this key for `selector` under `domain`:
    /// `S._domainkey.D. IN TXT "..."`, the value split into strings of at most 255
    /// bytes (RFC 1035 section 3.3.14: a character-string holds up to 255 octets; a
    /// 2048-bit RSA record is longer, and resolvers join the strings, RFC 6376 section
    /// 3.6.2.2).
    pub fn dns_txt_record(&self, domain: &str, selector: &str) -> String {
        let value = self.dns_txt_value();
        let strings: Vec<String> = value
            .as_bytes()
            .chunks(TXT_STRING_BYTES_MAX)
            // The value is ASCII (tags and base64), so every chunk is valid UTF-8.
            .map(|chunk| format!("\"{}\"", String::from_utf8_lossy(chunk)))
            .collect();
        format!(
            "{selector}._domainkey.{}. IN TXT {}",
            domain.trim_end_matches('.'),
            strings.join(" ")
        )
    }
}

/// RFC 1035 section 3.3.14.
const TXT_STRING_BYTES_MAX: usize = 255;

/// Wraps a PKCS#1 RSAPublicKey in a SubjectPublicKeyInfo (RFC 5280 section 4.1,
/// algorithm rsaEncryption from RFC 8017 appendix A.1), the form `openssl rsa -pubout`
/// writes and DKIM verifiers expect in `p=`.
pub(crate) fn rsa_subject_public_key_info(rsa_public_key: &[u8]) -> Vec<u8> {
    // SEQUENCE { OID 1.2.840.113549.1.1.1, NULL }
    const ALGORITHM: [u8; 15] = [
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    let mut bit_string = Vec::with_capacity(rsa_public_key.len() + 6);
    bit_string.push(0x03);
    der_length(rsa_public_key.len() + 1, &mut bit_string);
    bit_string.push(0x00); // no unused bits
    bit_string.extend_from_slice(rsa_public_key);
    let mut info = Vec::with_capacity(ALGORITHM.len() + bit_string.len() + 4);
    info.push(0x30);
    der_length(ALGORITHM.len() + bit_string.len(), &mut info);
    info.extend_from_slice(&ALGORITHM);
    info.extend_from_slice(&bit_string);
    info
}

/// DER definite length (X.690 section 8.1.3).
fn der_length(length: usize, out: &mut Vec<u8>) {
    if length < 0x80 {
        out.push(length as u8);
        return;
    }
    let bytes = length.to_be_bytes();
    let skip = bytes.iter().take_while(|&&byte| byte == 0).count();
    let significant = &bytes[skip..];
    out.push(0x80 | significant.len() as u8);
    out.extend_from_slice(significant);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;
    use std::process::{Command, Stdio};

    fn openssl(arguments: &[&str], input: &[u8]) -> Vec<u8> {
        let mut child = Command::new("openssl")
            .args(arguments)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success(), "openssl {arguments:?}");
        output.stdout
    }

    fn rsa_pkcs8(bits: u32) -> Vec<u8> {
        let option = format!("rsa_keygen_bits:{bits}");
        openssl(&["genpkey", "-algorithm", "RSA", "-pkeyopt", &option], b"")
    }

    #[test]
    fn rsa_pkcs8_and_pkcs1_load_and_publish_what_openssl_derives() {
        let pkcs8 = rsa_pkcs8(2048);
        let pkcs1 = openssl(&["rsa", "-traditional"], &pkcs8);
        assert!(pkcs1.starts_with(b"-----BEGIN RSA PRIVATE KEY-----"));
        // openssl's own SubjectPublicKeyInfo is what `p=` must hold.
        let spki = openssl(&["pkey", "-pubout", "-outform", "DER"], &pkcs8);
        let expected = format!("v=DKIM1; k=rsa; p={}", BASE64.encode(spki));
        for pem in [&pkcs8, &pkcs1] {
            let key = SigningKey::from_pem(pem, "test").unwrap();
            assert_eq!(key.algorithm(), Algorithm::RsaSha256);
            assert_eq!(key.bits(), 2048);
            assert_eq!(key.dns_txt_value(), expected);
        }
    }

    #[test]
    fn rsa_keys_under_2048_bits_are_refused() {
        let pem = rsa_pkcs8(1024);
        let error = SigningKey::from_pem(&pem, "small.pem").unwrap_err();
        assert!(matches!(error, Error::RsaKeyTooSmall { .. }), "{error}");
        assert!(
            error
                .to_string()
                .contains("small.pem: RSA key is smaller than 2048 bits")
        );
    }

    #[test]
    fn errors_never_quote_the_key_file() {
        let pem = rsa_pkcs8(2048);
        let text = String::from_utf8(pem).unwrap();
        let body_line = text.lines().nth(1).unwrap();
        // A corrupted key, an EC key and plain garbage.
        let corrupted = text.replacen(body_line, &body_line.replace('A', "*"), 1);
        let ec = openssl(
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ],
            b"",
        );
        for input in [
            corrupted.as_bytes(),
            &ec,
            b"secret-looking garbage".as_slice(),
        ] {
            let error = SigningKey::from_pem(input, "key.pem")
                .unwrap_err()
                .to_string();
            assert!(error.starts_with("key.pem: "), "{error}");
            assert!(!error.contains(&body_line[..16]), "{error}");
            assert!(!error.contains("garbage"), "{error}");
        }
        let debug = format!("{:?}", SigningKey::from_pem(text.as_bytes(), "k").unwrap());
        assert_eq!(debug, "SigningKey { algorithm: RsaSha256, bits: 2048, .. }");
    }

    #[test]
    fn txt_record_is_split_into_255_byte_strings() {
        let key = SigningKey::from_pem(&rsa_pkcs8(4096), "test").unwrap();
        let value = key.dns_txt_value();
        let record = key.dns_txt_record("example.com.", "s1");
        let prefix = "s1._domainkey.example.com. IN TXT ";
        assert!(record.starts_with(prefix), "{record}");
        let quoted = &record[prefix.len()..];
        assert!(quoted.starts_with('"') && quoted.ends_with('"'));
        let strings: Vec<&str> = quoted[1..quoted.len() - 1].split("\" \"").collect();
        assert!(strings.len() > 2);
        assert!(strings.iter().all(|string| string.len() <= 255));
        assert!(
            strings[..strings.len() - 1]
                .iter()
                .all(|string| string.len() == 255)
        );
        assert_eq!(strings.concat(), value);
    }
}
