//! `[[dkim]]`: the signing domains, their keys and what they sign; and the per-route
//! bulk-sender headers (`list_unsubscribe`, RFC 2369 and RFC 8058).
//!
//! This module checks the shape of the settings only. The key files are read, and the
//! keys checked, when the relay starts and by `tsubame check-config`.

use std::path::PathBuf;

use serde::Deserialize;

/// Most `[[dkim]]` entries; each holds one or two loaded keys in memory.
pub const DKIM_DOMAINS_MAX: usize = 10_000;

/// Longest `list_unsubscribe` value: RFC 5322 section 2.1.1's 998-character line, less
/// the field name.
pub const LIST_UNSUBSCRIBE_BYTES_MAX: usize = 900;

/// One signing domain.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DkimConfig {
    /// The `d=` domain. Signs mail whose From header's domain is this domain or one of
    /// its subdomains (relaxed DMARC alignment, RFC 7489 section 3.1.1), unless a route
    /// names the domain to use.
    pub domain: String,
    /// Shorthand for one key: its selector, with `key_file`.
    #[serde(default)]
    pub selector: Option<String>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// One key, or two of different algorithms (RSA and Ed25519: a dual signature, RFC
    /// 8463 section 1). Instead of `selector` and `key_file`.
    #[serde(default)]
    pub keys: Vec<DkimKeyConfig>,
    /// The header fields to sign; the default list when absent.
    #[serde(default)]
    pub headers: Option<Vec<String>>,
    /// Sign From, To and Subject once more than the message has them, so that none can
    /// be added after signing (RFC 6376 section 8.15).
    #[serde(default)]
    pub over_sign: bool,
    /// `header/body`, each `relaxed` or `simple` (RFC 6376 section 3.4); default
    /// relaxed/relaxed.
    #[serde(default)]
    pub canonicalization: Option<String>,
}

/// One key of a signing domain.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DkimKeyConfig {
    pub selector: String,
    /// PEM: RSA (PKCS#1 or PKCS#8, at least 2048 bits) or Ed25519 (PKCS#8). Its
    /// algorithm is read from the file.
    pub key_file: PathBuf,
}

impl DkimConfig {
    /// The keys, whichever way they were written.
    pub fn key_list(&self) -> Vec<DkimKeyConfig> {
        match (&self.selector, &self.key_file) {
            (Some(selector), Some(key_file)) => vec![DkimKeyConfig {
                selector: selector.clone(),
                key_file: key_file.clone(),
            }],
            _ => self.keys.clone(),
        }
    }

    /// Does this entry sign for mail from `domain` (lower-case ASCII)?
    pub fn covers(&self, domain: &str) -> bool {
        let own = self.domain.trim_end_matches('.');
        domain.eq_ignore_ascii_case(own)
            || (domain.len() > own.len()
                && domain
                    .get(domain.len() - own.len()..)
                    .is_some_and(|tail| tail.eq_ignore_ascii_case(own))
                && domain.as_bytes().get(domain.len() - own.len() - 1) == Some(&b'.'))
    }

    pub(crate) fn validate(&self) -> Result<(), (&'static str, String)> {
        if let Err(error) = tsubame_dkim::check_domain_and_selector(&self.domain, "s") {
            return Err(("domain", error.to_string()));
        }
        let shorthand = self.selector.is_some() || self.key_file.is_some();
        if shorthand && !self.keys.is_empty() {
            return Err((
                "keys",
                format!(
                    "dkim domain {:?}: give either selector and key_file, or keys, not both",
                    self.domain
                ),
            ));
        }
        if shorthand && (self.selector.is_none() || self.key_file.is_none()) {
            let missing = if self.selector.is_none() {
                "selector"
            } else {
                "key_file"
            };
            return Err((
                missing,
                format!(
                    "dkim domain {:?}: selector and key_file go together; {missing} is missing",
                    self.domain
                ),
            ));
        }
        let keys = self.key_list();
        if keys.is_empty() || keys.len() > 2 {
            return Err((
                "keys",
                format!(
                    "dkim domain {:?} needs one key (selector and key_file) or two of different algorithms (keys = [...]) for a dual signature",
                    self.domain
                ),
            ));
        }
        for key in &keys {
            if let Err(error) = tsubame_dkim::check_domain_and_selector(&self.domain, &key.selector)
            {
                return Err((
                    "selector",
                    format!("dkim domain {:?}: {error}", self.domain),
                ));
            }
        }
        if let [first, second] = keys.as_slice()
            && first.selector.eq_ignore_ascii_case(&second.selector)
        {
            return Err((
                "keys",
                format!(
                    "dkim domain {:?}: the two keys need different selectors (each is its own DNS record)",
                    self.domain
                ),
            ));
        }
        if let Some(text) = &self.canonicalization
            && let Err(error) = text.parse::<tsubame_dkim::Canonicalization>()
        {
            return Err((
                "canonicalization",
                format!("dkim domain {:?}: {error}", self.domain),
            ));
        }
        if let Some(headers) = &self.headers
            && let Err(error) = tsubame_dkim::SignedHeaders::new(headers, self.over_sign)
        {
            return Err(("headers", format!("dkim domain {:?}: {error}", self.domain)));
        }
        Ok(())
    }
}

/// The index of the entry that signs mail from `domain`: the most specific one covering
/// it (a subdomain's own entry before its parent's).
pub fn most_specific(entries: &[DkimConfig], domain: &str) -> Option<usize> {
    entries
        .iter()
        .enumerate()
        .filter(|(_, dkim)| dkim.covers(domain))
        .max_by_key(|(_, dkim)| dkim.domain.trim_end_matches('.').len())
        .map(|(index, _)| index)
}

/// Checks a `list_unsubscribe` value: one or more `<URI>`, comma-separated (RFC 2369
/// section 2), each `mailto:` or `https:`; with `one_click`, at least one `https:` URI
/// (RFC 8058 section 3.1).
pub(crate) fn check_list_unsubscribe(value: &str, one_click: bool) -> Result<(), String> {
    if value.len() > LIST_UNSUBSCRIBE_BYTES_MAX {
        return Err(format!(
            "list_unsubscribe is longer than {LIST_UNSUBSCRIBE_BYTES_MAX} bytes"
        ));
    }
    if !value.bytes().all(|byte| (32..=126).contains(&byte)) {
        return Err(
            "list_unsubscribe must be printable ASCII on one line (URIs with non-ASCII characters must be percent-encoded)"
                .to_string(),
        );
    }
    // Items are `<URI>` separated by commas (RFC 2369 section 2); a comma inside the
    // brackets belongs to the URI.
    let mut https = false;
    let mut rest = value.trim();
    loop {
        let Some(after_open) = rest.strip_prefix('<') else {
            return Err(format!(
                "list_unsubscribe: {rest:?} is not a URI in angle brackets, e.g. <mailto:unsubscribe@example.com>, <https://example.com/unsubscribe?id=...>"
            ));
        };
        let Some((uri, after)) = after_open.split_once('>') else {
            return Err(format!("list_unsubscribe: {rest:?} has no closing '>'"));
        };
        let scheme = uri
            .split_once(':')
            .map(|(scheme, _)| scheme.to_ascii_lowercase());
        match scheme.as_deref() {
            Some("https") => https = true,
            Some("mailto") => {}
            _ => {
                return Err(format!(
                    "list_unsubscribe: {uri:?} is neither a mailto: nor an https: URI"
                ));
            }
        }
        if uri.contains(['<', ' ']) {
            return Err(format!(
                "list_unsubscribe: {uri:?} contains a space or an angle bracket"
            ));
        }
        let after = after.trim_start();
        if after.is_empty() {
            break;
        }
        let Some(next) = after.strip_prefix(',') else {
            return Err(format!(
                "list_unsubscribe: {after:?} follows a URI; separate URIs with commas"
            ));
        };
        rest = next.trim_start();
    }
    if one_click && !https {
        return Err(
            "list_unsubscribe_post needs an https: URI in list_unsubscribe (RFC 8058 section 3.1)"
                .to_string(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(domain: &str) -> DkimConfig {
        DkimConfig {
            domain: domain.to_string(),
            selector: Some("s1".to_string()),
            key_file: Some(PathBuf::from("k.pem")),
            keys: Vec::new(),
            headers: None,
            over_sign: false,
            canonicalization: None,
        }
    }

    #[test]
    fn covers_the_domain_and_its_subdomains_only() {
        let dkim = entry("example.com");
        assert!(dkim.covers("example.com"));
        assert!(dkim.covers("news.example.com"));
        assert!(!dkim.covers("badexample.com"));
        assert!(!dkim.covers("example.org"));
        assert!(!dkim.covers("com"));
    }

    const BASE: &str = "[[listener]]\naddress = \"127.0.0.1:2525\"\n";

    fn error_line_and_message(text: &str) -> (usize, String) {
        let (line, _, message) = crate::tests::invalid(crate::Config::parse(text, "t.toml"));
        (line, message)
    }

    #[test]
    fn dkim_entries_are_checked_with_their_line() {
        let config = crate::Config::parse(
            &format!(
                "{BASE}[[dkim]]\ndomain = \"example.com\"\nselector = \"s1\"\nkey_file = \"a.pem\"\n\
                 [[dkim]]\ndomain = \"news.example.com\"\n\
                 keys = [{{ selector = \"r\", key_file = \"r.pem\" }}, {{ selector = \"e\", key_file = \"e.pem\" }}]\n"
            ),
            "t.toml",
        )
        .unwrap();
        assert_eq!(config.dkim.len(), 2);
        // The most specific entry signs.
        assert_eq!(
            config
                .dkim_for("a.news.example.com")
                .map(|d| d.domain.as_str()),
            Some("news.example.com")
        );
        assert_eq!(
            config.dkim_for("example.com").map(|d| d.domain.as_str()),
            Some("example.com")
        );
        assert!(config.dkim_for("example.org").is_none());

        let cases = [
            (
                "domain = \"bad domain\"\nselector = \"s\"\nkey_file = \"k\"",
                "invalid DKIM signing domain",
            ),
            (
                "domain = \"example.com\"\nselector = \"s\"",
                "key_file is missing",
            ),
            ("domain = \"example.com\"", "needs one key"),
            (
                "domain = \"example.com\"\nselector = \"s\"\nkey_file = \"k\"\nkeys = [{ selector = \"t\", key_file = \"k\" }]",
                "not both",
            ),
            (
                "domain = \"example.com\"\nkeys = [{ selector = \"s\", key_file = \"a\" }, { selector = \"S\", key_file = \"b\" }]",
                "different selectors",
            ),
            (
                "domain = \"example.com\"\nselector = \"s\"\nkey_file = \"k\"\nheaders = [\"To\"]",
                "From must be signed",
            ),
            (
                "domain = \"example.com\"\nselector = \"s\"\nkey_file = \"k\"\ncanonicalization = \"loose\"",
                "invalid DKIM canonicalization",
            ),
        ];
        for (entry, expected) in cases {
            let (line, message) = error_line_and_message(&format!("{BASE}[[dkim]]\n{entry}\n"));
            assert!(message.contains(expected), "{entry}: {message}");
            assert!(line >= 3, "{entry}: line {line}");
        }
        let twice = format!(
            "{BASE}[[dkim]]\ndomain = \"example.com\"\nselector = \"s\"\nkey_file = \"k\"\n\
             [[dkim]]\ndomain = \"Example.com.\"\nselector = \"t\"\nkey_file = \"k\"\n"
        );
        let (line, message) = error_line_and_message(&twice);
        assert!(message.contains("configured twice"), "{message}");
        assert_eq!(line, 8, "the second entry's domain");
    }

    #[test]
    fn at_most_dkim_domains_max_entries() {
        let entries = |count: usize| {
            let mut text = String::from(BASE);
            for n in 0..count {
                text.push_str(&format!(
                    "[[dkim]]\ndomain = \"d{n}.example\"\nselector = \"s\"\nkey_file = \"k\"\n"
                ));
            }
            crate::Config::parse(&text, "t.toml")
        };
        assert_eq!(
            entries(DKIM_DOMAINS_MAX).unwrap().dkim.len(),
            DKIM_DOMAINS_MAX
        );
        let (_, message) = error_line_and_message_of(entries(DKIM_DOMAINS_MAX + 1));
        assert!(message.contains("at most"), "{message}");
    }

    fn error_line_and_message_of(
        result: Result<crate::Config, crate::ConfigError>,
    ) -> (usize, String) {
        let (line, _, message) = crate::tests::invalid(result);
        (line, message)
    }

    #[test]
    fn route_signing_keys_are_checked() {
        let route = |keys: &str| {
            format!(
                "{BASE}[[route]]\nsender_domains = [\"a.example\"]\nupstream = \"mx\"\n{keys}\n"
            )
        };
        let (_, message) = error_line_and_message(&route("dkim_domain = \"a.example\""));
        assert!(message.contains("has no [[dkim]] entry"), "{message}");
        let (_, message) = error_line_and_message(&route("list_unsubscribe_post = true"));
        assert!(message.contains("needs list_unsubscribe"), "{message}");
        let (_, message) = error_line_and_message(&route(
            "list_unsubscribe = \"<mailto:u@a.example>\"\nlist_unsubscribe_post = true",
        ));
        assert!(message.contains("https"), "{message}");
        let config = crate::Config::parse(
            &route("dkim = false\nlist_unsubscribe = \"<https://a.example/u>\"\nlist_unsubscribe_post = true"),
            "t.toml",
        )
        .unwrap();
        assert!(!config.routes[0].dkim);
        assert!(config.routes[0].list_unsubscribe_post);
        let threads = |count: usize| {
            crate::Config::parse(
                &format!("{BASE}[delivery]\nsigning_threads = {count}\n"),
                "t.toml",
            )
        };
        assert!(threads(crate::SIGNING_THREADS_MAX).is_ok());
        let (_, message) = error_line_and_message_of(threads(crate::SIGNING_THREADS_MAX + 1));
        assert!(message.contains("signing_threads"), "{message}");
        // dkim_domain names an entry whatever its final dot and case.
        let dotted = format!(
            "{BASE}[[dkim]]\ndomain = \"a.example.\"\nselector = \"s\"\nkey_file = \"k\"\n\
             [[route]]\nsender_domains = [\"a.example\"]\nupstream = \"mx\"\ndkim_domain = \"A.example\"\n"
        );
        assert!(crate::Config::parse(&dotted, "t.toml").is_ok());
    }

    #[test]
    fn list_unsubscribe_values() {
        assert!(check_list_unsubscribe("<mailto:u@example.com>", false).is_ok());
        assert!(
            check_list_unsubscribe("<mailto:u@example.com>, <https://example.com/u?x=1>", true)
                .is_ok()
        );
        assert!(check_list_unsubscribe("<mailto:u@example.com>", true).is_err());
        assert!(check_list_unsubscribe("mailto:u@example.com", false).is_err());
        assert!(check_list_unsubscribe("<ftp://example.com>", false).is_err());
        assert!(check_list_unsubscribe("<https://example.com/\r\nBcc: x>", false).is_err());
        // A comma inside a URI is part of it.
        assert!(check_list_unsubscribe("<https://example.com/u?a=1,2>", true).is_ok());
        assert!(
            check_list_unsubscribe("<mailto:u@example.com> <https://e.example>", false).is_err()
        );
        assert!(check_list_unsubscribe("<mailto:u@example.com>,", false).is_err());
        // The limit, exactly: a value of LIST_UNSUBSCRIBE_BYTES_MAX bytes passes, one more fails.
        let at_limit = |extra: usize| {
            let frame = "<https://example.com/>".len();
            format!(
                "<https://example.com/{}>",
                "a".repeat(LIST_UNSUBSCRIBE_BYTES_MAX - frame + extra)
            )
        };
        assert_eq!(at_limit(0).len(), LIST_UNSUBSCRIBE_BYTES_MAX);
        assert!(check_list_unsubscribe(&at_limit(0), false).is_ok());
        assert!(check_list_unsubscribe(&at_limit(1), false).is_err());
    }
}
