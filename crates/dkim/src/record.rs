//! DKIM key records (RFC 6376 section 3.6.1), the TXT value at
//! `SELECTOR._domainkey.DOMAIN`: parsed from bytes, and compared with a [`SigningKey`].
//!
//! No DNS here: the caller looks the record up and joins its character-strings (RFC
//! 6376 section 3.6.2.2) before parsing.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use crate::{Algorithm, SigningKey};

/// Longest key record we parse. A 4096-bit RSA record is about 750 bytes and an 8192-bit
/// one about 1.4 KiB; 8 KiB leaves room for notes (`n=`) and whitespace while bounding
/// the work for a record that is not a key record at all.
pub const KEY_RECORD_BYTES_MAX: usize = 8 * 1024;

/// Why a TXT value is not a valid key record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordSyntaxError {
    #[error("the record is longer than {KEY_RECORD_BYTES_MAX} bytes")]
    TooLong,
    #[error("the record is not ASCII text")]
    NotAscii,
    #[error("{tag_spec:?} is not a tag=value pair (RFC 6376 section 3.2)")]
    NoEquals { tag_spec: String },
    #[error("{tag:?} is not a valid tag name (RFC 6376 section 3.2)")]
    InvalidTagName { tag: String },
    #[error("the tag {tag}= appears twice (RFC 6376 section 3.2)")]
    DuplicateTag { tag: String },
    #[error("v= must be the first tag (RFC 6376 section 3.6.1)")]
    VersionNotFirst,
    #[error("v={version} is not DKIM1 (RFC 6376 section 3.6.1)")]
    WrongVersion { version: String },
    #[error("the required p= tag is missing (RFC 6376 section 3.6.1)")]
    NoPublicKey,
    #[error("p= is not valid base64")]
    PublicKeyNotBase64,
}

/// The `p=` tag: a public key, or empty for a revoked key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicKey {
    /// The decoded key data.
    Key(Vec<u8>),
    /// `p=` with an empty value: "the key has been revoked" (RFC 6376 section 3.6.1).
    Revoked,
}

/// The tags of a key record that a check needs; unknown tags are ignored, as RFC 6376
/// section 3.2 requires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord<'a> {
    /// `k=`, "rsa" when absent. Not checked against a list: an unknown type is a
    /// mismatch for any key of ours, reported as such.
    pub key_type: &'a str,
    pub public_key: PublicKey,
    /// `h=`: the hash algorithms the domain allows; `None` allows all.
    pub hash_algorithms: Option<Vec<&'a str>>,
    /// `t=y`: the domain is testing DKIM (RFC 6376 section 3.6.1).
    pub testing: bool,
    /// `t=s`: the `i=` domain must equal `d=`, no subdomains.
    pub strict_identity: bool,
}

/// Whitespace that may surround tags and values: FWS (RFC 6376 section 2.8) is spaces,
/// tabs and CRLF.
fn is_folding_whitespace(byte: u8) -> bool {
    matches!(byte, b' ' | b'\t' | b'\r' | b'\n')
}

fn trim(text: &str) -> &str {
    text.trim_matches(|character: char| {
        character.is_ascii() && is_folding_whitespace(character as u8)
    })
}

/// A tag name: ALPHA *(ALPHA / DIGIT / "_") (RFC 6376 section 3.2).
fn is_tag_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|first| first.is_ascii_alphabetic())
        && bytes.all(|byte| byte.is_ascii_alphanumeric() || byte == b'_')
}

/// Colon-separated values of `h=` and `t=`, whitespace around each trimmed.
fn colon_list(value: &str) -> impl Iterator<Item = &str> {
    value.split(':').map(trim).filter(|item| !item.is_empty())
}

/// Parses a key record: the joined character-strings of one TXT record.
pub fn parse_key_record(record: &[u8]) -> Result<KeyRecord<'_>, RecordSyntaxError> {
    if record.len() > KEY_RECORD_BYTES_MAX {
        return Err(RecordSyntaxError::TooLong);
    }
    if !record.is_ascii() {
        return Err(RecordSyntaxError::NotAscii);
    }
    // ASCII was checked above, so this cannot fail; map rather than unwrap anyway.
    let text = std::str::from_utf8(record).map_err(|_| RecordSyntaxError::NotAscii)?;
    let mut seen: Vec<&str> = Vec::new();
    let mut parsed = KeyRecord {
        key_type: "rsa",
        public_key: PublicKey::Revoked,
        hash_algorithms: None,
        testing: false,
        strict_identity: false,
    };
    let mut has_public_key = false;
    // A trailing ';' is allowed (tag-list = tag-spec *( ";" tag-spec ) [ ";" ]).
    for (index, tag_spec) in text.split(';').enumerate() {
        if trim(tag_spec).is_empty() {
            continue;
        }
        let Some((name, value)) = tag_spec.split_once('=') else {
            return Err(RecordSyntaxError::NoEquals {
                tag_spec: trim(tag_spec).to_string(),
            });
        };
        let (name, value) = (trim(name), trim(value));
        if !is_tag_name(name) {
            return Err(RecordSyntaxError::InvalidTagName {
                tag: name.to_string(),
            });
        }
        // Tag names are case-sensitive (RFC 6376 section 3.2).
        if seen.contains(&name) {
            return Err(RecordSyntaxError::DuplicateTag {
                tag: name.to_string(),
            });
        }
        seen.push(name);
        match name {
            "v" => {
                if index != 0 {
                    return Err(RecordSyntaxError::VersionNotFirst);
                }
                if value != "DKIM1" {
                    return Err(RecordSyntaxError::WrongVersion {
                        version: value.to_string(),
                    });
                }
            }
            "k" => parsed.key_type = value,
            "h" => parsed.hash_algorithms = Some(colon_list(value).collect()),
            "t" => {
                for flag in colon_list(value) {
                    parsed.testing |= flag == "y";
                    parsed.strict_identity |= flag == "s";
                }
            }
            "p" => {
                has_public_key = true;
                // Base64 in a tag value may be folded (RFC 6376 section 3.6.1).
                let compact: Vec<u8> = value
                    .bytes()
                    .filter(|&byte| !is_folding_whitespace(byte))
                    .collect();
                parsed.public_key = if compact.is_empty() {
                    PublicKey::Revoked
                } else {
                    PublicKey::Key(
                        BASE64
                            .decode(&compact)
                            .map_err(|_| RecordSyntaxError::PublicKeyNotBase64)?,
                    )
                };
            }
            _ => {}
        }
    }
    if !has_public_key {
        return Err(RecordSyntaxError::NoPublicKey);
    }
    Ok(parsed)
}

/// What a key record says about a signing key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordVerdict {
    /// The record publishes this key; verifiers can check its signatures.
    Matches,
    /// `p=` is empty.
    Revoked,
    /// `k=` names another key type than the key's.
    KeyTypeMismatch { record_key_type: String },
    /// `h=` does not allow SHA-256, the only hash we sign with (RFC 8301 section 3.1).
    HashNotAllowed,
    /// Same key type, different public key.
    DifferentKey,
}

/// Compares a parsed record with the public half of `key`.
pub fn check_key_record(key: &SigningKey, record: &KeyRecord<'_>) -> RecordVerdict {
    let public_key = match &record.public_key {
        PublicKey::Revoked => return RecordVerdict::Revoked,
        PublicKey::Key(bytes) => bytes,
    };
    // Key types are compared ignoring case, as verifiers do.
    if !record
        .key_type
        .eq_ignore_ascii_case(key.algorithm().key_type())
    {
        return RecordVerdict::KeyTypeMismatch {
            record_key_type: record.key_type.to_string(),
        };
    }
    if let Some(hashes) = &record.hash_algorithms
        && !hashes
            .iter()
            .any(|hash| hash.eq_ignore_ascii_case("sha256"))
    {
        return RecordVerdict::HashNotAllowed;
    }
    let same = match key.algorithm() {
        Algorithm::Ed25519Sha256 => public_key.as_slice() == key.public_key_bytes(),
        // RFC 6376 section 3.6.1 names a bare RSAPublicKey, but what signers publish and
        // verifiers accept is a SubjectPublicKeyInfo (erratum 3017); accept either.
        Algorithm::RsaSha256 => {
            public_key.as_slice() == key.public_key_bytes()
                || crate::key::rsa_subject_public_key_info(public_key) == key.public_key_bytes()
        }
    };
    if same {
        RecordVerdict::Matches
    } else {
        RecordVerdict::DifferentKey
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the syntax table checks of a parsed record: `k=`, testing, strict identity.
    type Parsed<'a> = Result<(&'a str, bool, bool), RecordSyntaxError>;

    #[test]
    fn syntax() {
        let cases: [(&str, Parsed<'_>); 14] = [
            ("v=DKIM1; k=rsa; p=AAAA", Ok(("rsa", false, false))),
            ("p=AAAA", Ok(("rsa", false, false))),
            (
                "  v = DKIM1 ;\tk=ed25519;p=AA AA;",
                Ok(("ed25519", false, false)),
            ),
            (
                "v=DKIM1; t=y:s; p=AAAA; x_new=anything",
                Ok(("rsa", true, true)),
            ),
            ("v=DKIM1; p=", Ok(("rsa", false, false))),
            ("v=DKIM1; k=rsa", Err(RecordSyntaxError::NoPublicKey)),
            (
                "k=rsa; v=DKIM1; p=AAAA",
                Err(RecordSyntaxError::VersionNotFirst),
            ),
            (
                "v=DKIM2; p=AAAA",
                Err(RecordSyntaxError::WrongVersion {
                    version: "DKIM2".into(),
                }),
            ),
            (
                "p=AAAA; p=BBBB",
                Err(RecordSyntaxError::DuplicateTag { tag: "p".into() }),
            ),
            (
                "v=DKIM1; rsa; p=AAAA",
                Err(RecordSyntaxError::NoEquals {
                    tag_spec: "rsa".into(),
                }),
            ),
            (
                "1k=rsa; p=AAAA",
                Err(RecordSyntaxError::InvalidTagName { tag: "1k".into() }),
            ),
            ("p=A*AA", Err(RecordSyntaxError::PublicKeyNotBase64)),
            ("p=AAAA; n=caf\u{e9}", Err(RecordSyntaxError::NotAscii)),
            (
                "google-site-verification=abc",
                Err(RecordSyntaxError::InvalidTagName {
                    tag: "google-site-verification".into(),
                }),
            ),
        ];
        for (input, expected) in cases {
            let parsed = parse_key_record(input.as_bytes())
                .map(|record| (record.key_type, record.testing, record.strict_identity));
            assert_eq!(parsed, expected, "{input:?}");
        }
        let too_long = format!("p={}", "A".repeat(KEY_RECORD_BYTES_MAX));
        assert_eq!(
            parse_key_record(too_long.as_bytes()),
            Err(RecordSyntaxError::TooLong)
        );
        assert_eq!(
            parse_key_record(b"p=").map(|record| record.public_key),
            Ok(PublicKey::Revoked)
        );
        assert_eq!(
            parse_key_record(b"p=AA AA").map(|record| record.public_key),
            Ok(PublicKey::Key(vec![0, 0, 0]))
        );
    }

    fn key(pem: &[u8]) -> SigningKey {
        SigningKey::from_pem(pem, "test").unwrap()
    }

    #[test]
    fn verdicts() {
        let ed25519 = key(&crate::generate_ed25519_pem().unwrap());
        let other_ed25519 = key(&crate::generate_ed25519_pem().unwrap());
        let rsa = key(&crate::generate_rsa_pem(2048).unwrap());
        let own = ed25519.dns_txt_value();
        let rsa_value = rsa.dns_txt_value();
        let verdict = |key: &SigningKey, value: &str| {
            check_key_record(key, &parse_key_record(value.as_bytes()).unwrap())
        };
        assert_eq!(verdict(&ed25519, &own), RecordVerdict::Matches);
        assert_eq!(verdict(&rsa, &rsa_value), RecordVerdict::Matches);
        assert_eq!(verdict(&other_ed25519, &own), RecordVerdict::DifferentKey);
        assert_eq!(
            verdict(&rsa, &own),
            RecordVerdict::KeyTypeMismatch {
                record_key_type: "ed25519".into()
            }
        );
        assert_eq!(
            verdict(&ed25519, "v=DKIM1; k=ed25519; p="),
            RecordVerdict::Revoked
        );
        assert_eq!(
            verdict(&ed25519, &own.replace("; p=", "; h=sha1; p=")),
            RecordVerdict::HashNotAllowed
        );
        assert_eq!(
            verdict(&ed25519, &own.replace("; p=", "; h=sha1:SHA256; p=")),
            RecordVerdict::Matches
        );
        // The bare RSAPublicKey of RFC 6376's text, without the SubjectPublicKeyInfo.
        let spki = rsa.public_key_bytes();
        let bare = &spki[24..];
        assert_eq!(
            crate::key::rsa_subject_public_key_info(bare),
            spki,
            "a 2048-bit key's SubjectPublicKeyInfo header is 24 bytes"
        );
        let bare_record = format!("k=rsa; p={}", BASE64.encode(bare));
        assert_eq!(verdict(&rsa, &bare_record), RecordVerdict::Matches);
    }
}
