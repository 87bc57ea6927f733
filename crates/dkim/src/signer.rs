//! Signing a message for one domain with one key, or two (RSA and Ed25519, RFC 8463
//! section 1: a dual signature for verifiers that do not know Ed25519 yet).

use std::fmt;

use mail_auth::common::crypto::{Ed25519Key, RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter as _;
use mail_auth::dkim::{Canonicalization as Mode, DkimSigner, Done};

use crate::key::KeyMaterial;
use crate::{Algorithm, Error, SigningKey};

/// The header fields signed when the configuration names none: those whose change
/// would change what a reader sees or how the message threads and decodes (RFC 6376
/// section 5.4.1's list, less Sender and the List-* fields that mailing lists rewrite).
pub const DEFAULT_SIGNED_HEADERS: [&str; 12] = [
    "From",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "Reply-To",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
];

/// Over-signing lists these once more than the message has them, so that adding a
/// second From, To or Subject after signing breaks the signature (RFC 6376 section
/// 8.15).
pub const OVER_SIGNED_HEADERS: [&str; 3] = ["From", "To", "Subject"];

/// Most header names one signature lists; the `h=` tag grows with it and every name is
/// searched for in every header. 64 is over five times the default list.
pub const SIGNED_HEADERS_MAX: usize = 64;

/// Which header fields a signature covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedHeaders {
    /// Invariant: 1 to `SIGNED_HEADERS_MAX` field names, each printable ASCII without
    /// ':' (RFC 5322 section 3.6.8), no two equal ignoring case, "From" among them (RFC
    /// 6376 section 5.4: From must be signed).
    names: Vec<String>,
    over_sign: bool,
}

impl Default for SignedHeaders {
    fn default() -> Self {
        SignedHeaders {
            names: DEFAULT_SIGNED_HEADERS.map(String::from).to_vec(),
            over_sign: false,
        }
    }
}

impl SignedHeaders {
    /// A checked list; duplicates (ignoring case) are dropped.
    pub fn new(names: &[impl AsRef<str>], over_sign: bool) -> Result<Self, Error> {
        let mut checked: Vec<String> = Vec::with_capacity(names.len());
        for name in names {
            let name = name.as_ref().trim();
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|byte| (33..=126).contains(&byte) && byte != b':')
            {
                return Err(Error::InvalidHeaderList {
                    reason: format!("{name:?} is not a header field name"),
                });
            }
            if !checked.iter().any(|seen| seen.eq_ignore_ascii_case(name)) {
                checked.push(name.to_string());
            }
        }
        if checked.len() > SIGNED_HEADERS_MAX {
            return Err(Error::InvalidHeaderList {
                reason: format!("more than {SIGNED_HEADERS_MAX} names"),
            });
        }
        if !checked.iter().any(|name| name.eq_ignore_ascii_case("From")) {
            return Err(Error::InvalidHeaderList {
                reason: "From must be signed (RFC 6376 section 5.4)".to_string(),
            });
        }
        Ok(SignedHeaders {
            names: checked,
            over_sign,
        })
    }

    /// The default list, with or without over-signing.
    pub fn default_with_over_sign(over_sign: bool) -> Self {
        SignedHeaders {
            over_sign,
            ..SignedHeaders::default()
        }
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn over_sign(&self) -> bool {
        self.over_sign
    }

    /// The list as mail-auth takes it. mail-auth signs every instance of a listed name
    /// that the message has, and lists once more each name whose list position matched
    /// no header: a name listed twice therefore ends up in `h=` once more than the
    /// message has it, which is over-signing. (A listed name the message lacks is also
    /// signed as absent, so it cannot be added later either.)
    fn for_mail_auth(&self) -> Vec<String> {
        let mut list = self.names.clone();
        if self.over_sign {
            for name in OVER_SIGNED_HEADERS {
                if !list.iter().any(|listed| listed.eq_ignore_ascii_case(name)) {
                    list.push(name.to_string());
                }
                list.push(name.to_string());
            }
        }
        list
    }
}

/// How a signature canonicalises the header and the body (RFC 6376 section 3.4), the
/// `c=` tag. Relaxed/relaxed, the default, survives what relays commonly do to a message
/// (refolding headers, trimming trailing space); simple survives nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Canonicalization {
    pub relaxed_header: bool,
    pub relaxed_body: bool,
}

impl Canonicalization {
    pub const RELAXED: Canonicalization = Canonicalization {
        relaxed_header: true,
        relaxed_body: true,
    };

    fn mode(relaxed: bool) -> Mode {
        if relaxed { Mode::Relaxed } else { Mode::Simple }
    }
}

impl std::str::FromStr for Canonicalization {
    type Err = Error;

    /// `header/body`, each `relaxed` or `simple`; one word alone is the header's, with a
    /// simple body (RFC 6376 section 3.5, the `c=` tag).
    fn from_str(text: &str) -> Result<Self, Error> {
        let word = |word: &str| match word.trim().to_ascii_lowercase().as_str() {
            "relaxed" => Some(true),
            "simple" => Some(false),
            _ => None,
        };
        let (header, body) = match text.split_once('/') {
            Some((header, body)) => (word(header), word(body)),
            None => (word(text), Some(false)),
        };
        match (header, body) {
            (Some(relaxed_header), Some(relaxed_body)) => Ok(Canonicalization {
                relaxed_header,
                relaxed_body,
            }),
            _ => Err(Error::InvalidCanonicalization {
                text: text.to_string(),
            }),
        }
    }
}

impl fmt::Display for Canonicalization {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let word = |relaxed| if relaxed { "relaxed" } else { "simple" };
        write!(
            formatter,
            "{}/{}",
            word(self.relaxed_header),
            word(self.relaxed_body)
        )
    }
}

/// One key of a signer, with the selector its public key is published under.
#[derive(Debug)]
pub struct SignerKey {
    pub selector: String,
    pub key: SigningKey,
}

enum KeySigner {
    Rsa(DkimSigner<RsaKey<Sha256>, Done>),
    Ed25519(DkimSigner<Ed25519Key, Done>),
}

/// Signs messages for one domain. `Send + Sync`: one signer serves every thread of a
/// signing pool.
pub struct Signer {
    domain: String,
    /// Invariant: one or two entries, of different algorithms, RSA first (a verifier
    /// that stops at the first signature it can check then checks the RSA one).
    keys: Vec<(String, Algorithm, KeySigner)>,
}

impl fmt::Debug for Signer {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys: Vec<(&str, Algorithm)> = self
            .keys
            .iter()
            .map(|(selector, algorithm, _)| (selector.as_str(), *algorithm))
            .collect();
        formatter
            .debug_struct("Signer")
            .field("domain", &self.domain)
            .field("keys", &keys)
            .finish()
    }
}

impl Signer {
    /// A signer for `domain` with one key, or an RSA and an Ed25519 key for a dual
    /// signature, relaxed/relaxed canonicalisation.
    pub fn new(domain: &str, keys: Vec<SignerKey>, headers: &SignedHeaders) -> Result<Self, Error> {
        Self::with_canonicalization(domain, keys, headers, Canonicalization::RELAXED)
    }

    /// [`Signer::new`] with another canonicalisation.
    pub fn with_canonicalization(
        domain: &str,
        keys: Vec<SignerKey>,
        headers: &SignedHeaders,
        canonicalization: Canonicalization,
    ) -> Result<Self, Error> {
        let header_mode = Canonicalization::mode(canonicalization.relaxed_header);
        let body_mode = Canonicalization::mode(canonicalization.relaxed_body);
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        check_dns_name(&domain).map_err(|reason| Error::InvalidDomain {
            domain: domain.clone(),
            reason,
        })?;
        let algorithms: Vec<Algorithm> = keys.iter().map(|entry| entry.key.algorithm()).collect();
        let distinct = algorithms.first() != algorithms.get(1);
        if keys.is_empty() || keys.len() > 2 || !distinct {
            return Err(Error::InvalidKeySet);
        }
        let list = headers.for_mail_auth();
        let mut signers = Vec::with_capacity(keys.len());
        for SignerKey { selector, key } in keys {
            check_dns_name(&selector).map_err(|reason| Error::InvalidSelector {
                selector: selector.clone(),
                reason,
            })?;
            let algorithm = key.algorithm();
            let signer = match key.material {
                KeyMaterial::Rsa(rsa) => KeySigner::Rsa(
                    DkimSigner::from_key(rsa)
                        .domain(domain.clone())
                        .selector(selector.clone())
                        .headers(list.clone())
                        .header_canonicalization(header_mode)
                        .body_canonicalization(body_mode),
                ),
                KeyMaterial::Ed25519(ed25519) => KeySigner::Ed25519(
                    DkimSigner::from_key(ed25519)
                        .domain(domain.clone())
                        .selector(selector.clone())
                        .headers(list.clone())
                        .header_canonicalization(header_mode)
                        .body_canonicalization(body_mode),
                ),
            };
            signers.push((selector, algorithm, signer));
        }
        signers.sort_by_key(|(_, algorithm, _)| *algorithm != Algorithm::RsaSha256);
        Ok(Signer {
            domain,
            keys: signers,
        })
    }

    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The DKIM-Signature header field(s) for `message` (CRLF line ends, as the relay
    /// stores it), each CRLF-terminated, to be put before the message's first header.
    /// A dual signer returns two fields, RSA first.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, Error> {
        self.sign_parts(&[message])
    }

    /// Like [`Signer::sign`] for a message given in parts, read one after the other as
    /// one byte stream (header fields to add, then the stored message), without joining
    /// them.
    pub fn sign_parts(&self, parts: &[&[u8]]) -> Result<Vec<u8>, Error> {
        let mut fields = Vec::new();
        for (selector, _, signer) in &self.keys {
            let chunks = parts.iter().copied();
            let signature = match signer {
                KeySigner::Rsa(signer) => signer.sign_chained(chunks),
                KeySigner::Ed25519(signer) => signer.sign_chained(chunks),
            }
            .map_err(|error| Error::Sign {
                domain: self.domain.clone(),
                selector: selector.clone(),
                reason: error.to_string(),
            })?;
            fields.extend_from_slice(signature.to_header().as_bytes());
        }
        Ok(fields)
    }
}

/// Checks a signing domain and selector the way `Signer::new` does, before anything
/// expensive (key generation) is done with them.
pub fn check_domain_and_selector(domain: &str, selector: &str) -> Result<(), Error> {
    check_dns_name(domain.trim_end_matches('.')).map_err(|reason| Error::InvalidDomain {
        domain: domain.to_string(),
        reason,
    })?;
    check_dns_name(selector).map_err(|reason| Error::InvalidSelector {
        selector: selector.to_string(),
        reason,
    })
}

/// A domain or selector: dot-separated labels of letters, digits, hyphens and (for
/// selectors and service labels) underscores, RFC 6376 section 3.1.
fn check_dns_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > crate::DNS_NAME_BYTES_MAX {
        return Err("must be 1 to 253 characters");
    }
    let valid = name.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= crate::DNS_LABEL_BYTES_MAX
            && label
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_')
    });
    if !valid {
        return Err("must be dot-separated labels of letters, digits, '-' and '_'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_list_checks() {
        assert!(
            SignedHeaders::new(&["To", "Subject"], false).is_err(),
            "From missing"
        );
        assert!(SignedHeaders::new(&["From", "Bad:Name"], false).is_err());
        assert!(SignedHeaders::new(&["From", ""], false).is_err());
        let many: Vec<String> = (0..=SIGNED_HEADERS_MAX)
            .map(|n| format!("X-H{n}"))
            .collect();
        let mut many = many;
        many.push("From".to_string());
        assert!(SignedHeaders::new(&many, false).is_err());
        let deduplicated = SignedHeaders::new(&["From", "from", "To"], false).unwrap();
        assert_eq!(deduplicated.names(), ["From", "To"]);
    }

    #[test]
    fn over_signing_lists_from_to_subject_twice() {
        let list = SignedHeaders::new(&["From", "Date"], true)
            .unwrap()
            .for_mail_auth();
        let count = |name: &str| list.iter().filter(|listed| listed.as_str() == name).count();
        assert_eq!(
            (count("From"), count("To"), count("Subject"), count("Date")),
            (2, 2, 2, 1)
        );
        let plain = SignedHeaders::default().for_mail_auth();
        assert_eq!(plain.len(), DEFAULT_SIGNED_HEADERS.len());
    }

    #[test]
    fn canonicalization_texts() {
        let parse = |text: &str| text.parse::<Canonicalization>().map(|c| c.to_string());
        assert_eq!(parse("relaxed/relaxed").unwrap(), "relaxed/relaxed");
        assert_eq!(parse("Simple/Relaxed").unwrap(), "simple/relaxed");
        // RFC 6376 section 3.5: one word names the header's; the body's is simple.
        assert_eq!(parse("relaxed").unwrap(), "relaxed/simple");
        assert_eq!(parse("simple").unwrap(), "simple/simple");
        for bad in ["", "loose", "relaxed/", "relaxed/relaxed/relaxed"] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn dns_name_checks() {
        assert!(check_dns_name("example.com").is_ok());
        assert!(check_dns_name("sel_2026-a").is_ok());
        for bad in ["", "a..b", "a b", "ex\u{e4}mple.com", ".example.com"] {
            assert!(check_dns_name(bad).is_err(), "{bad:?}");
        }
    }
}
