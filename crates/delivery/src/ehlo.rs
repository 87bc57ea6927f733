//! The service extensions an upstream advertises in its EHLO reply (RFC 5321 §4.1.1.1).

use crate::reply::Reply;

/// Most AUTH mechanisms remembered. Real servers list fewer than ten; the cap keeps a
/// hostile list from growing the capabilities beyond the reply's own bound.
pub const MAX_AUTH_MECHANISMS: usize = 32;

/// Longest AUTH mechanism name kept (RFC 4422 §3.1: at most 20 characters).
pub const MAX_AUTH_MECHANISM_BYTES: usize = 20;

/// What the upstream offers. `Default` is a server that offers nothing (the HELO case).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// RFC 2920.
    pub pipelining: bool,
    /// RFC 1870: SIZE was advertised (the `SIZE=` parameter may be sent).
    pub size: bool,
    /// RFC 1870: the advertised maximum message size in bytes. `None` when SIZE was not
    /// advertised, advertised without a number, or with 0 ("no fixed maximum").
    pub max_message_bytes: Option<u64>,
    /// RFC 6152.
    pub eight_bit_mime: bool,
    /// RFC 6531.
    pub smtputf8: bool,
    /// RFC 3207.
    pub starttls: bool,
    /// RFC 3030.
    pub chunking: bool,
    /// RFC 2034.
    pub enhanced_status_codes: bool,
    /// RFC 4954: the mechanisms offered, upper-cased, without duplicates, in the
    /// server's order. Invariant: at most [`MAX_AUTH_MECHANISMS`] entries, each at most
    /// [`MAX_AUTH_MECHANISM_BYTES`] bytes.
    pub auth_mechanisms: Vec<String>,
}

impl Capabilities {
    /// Reads the capabilities from a positive EHLO reply. The first line is the
    /// server's name and greeting; each further line is `keyword [params]`, compared
    /// case-insensitively. Unknown keywords are ignored.
    pub fn from_ehlo_reply(reply: &Reply) -> Self {
        let mut capabilities = Self::default();
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split_ascii_whitespace();
            let Some(keyword) = words.next() else {
                continue;
            };
            // Old servers advertise `AUTH=LOGIN PLAIN` (pre-RFC 4954 Outlook clients
            // needed it); treat it like `AUTH LOGIN PLAIN`.
            if let Some(first) = strip_prefix_ignore_case(keyword, "AUTH=") {
                capabilities.add_auth_mechanisms(std::iter::once(first).chain(words));
                continue;
            }
            match keyword.to_ascii_uppercase().as_str() {
                "PIPELINING" => capabilities.pipelining = true,
                "SIZE" => {
                    capabilities.size = true;
                    // A number that does not parse is treated like no number: the
                    // server will still say 552 if the message is too large.
                    capabilities.max_message_bytes = words
                        .next()
                        .and_then(|number| number.parse::<u64>().ok())
                        .filter(|&bytes| bytes > 0);
                }
                "8BITMIME" => capabilities.eight_bit_mime = true,
                "SMTPUTF8" => capabilities.smtputf8 = true,
                "STARTTLS" => capabilities.starttls = true,
                "CHUNKING" => capabilities.chunking = true,
                "ENHANCEDSTATUSCODES" => capabilities.enhanced_status_codes = true,
                "AUTH" => capabilities.add_auth_mechanisms(words),
                _ => {}
            }
        }
        capabilities
    }

    /// True when `mechanism` (any case) was offered.
    pub fn offers_auth(&self, mechanism: &str) -> bool {
        self.auth_mechanisms
            .iter()
            .any(|offered| offered.eq_ignore_ascii_case(mechanism))
    }

    fn add_auth_mechanisms<'a>(&mut self, mechanisms: impl Iterator<Item = &'a str>) {
        for mechanism in mechanisms {
            if self.auth_mechanisms.len() >= MAX_AUTH_MECHANISMS {
                return;
            }
            if mechanism.is_empty()
                || mechanism.len() > MAX_AUTH_MECHANISM_BYTES
                || self.offers_auth(mechanism)
            {
                continue;
            }
            self.auth_mechanisms.push(mechanism.to_ascii_uppercase());
        }
    }
}

fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| text.get(prefix.len()..))
        .flatten()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::reply::parse_reply;

    fn capabilities(lines: &[&str]) -> Capabilities {
        let mut wire = String::new();
        for (index, line) in lines.iter().enumerate() {
            let separator = if index + 1 == lines.len() { ' ' } else { '-' };
            wire.push_str(&format!("250{separator}{line}\r\n"));
        }
        let (reply, _) = parse_reply(wire.as_bytes()).unwrap().unwrap();
        Capabilities::from_ehlo_reply(&reply)
    }

    #[test]
    fn capability_cases() {
        let all = Capabilities {
            pipelining: true,
            size: true,
            max_message_bytes: Some(35_882_577),
            eight_bit_mime: true,
            smtputf8: true,
            starttls: true,
            chunking: true,
            enhanced_status_codes: true,
            auth_mechanisms: vec!["PLAIN".into(), "LOGIN".into()],
        };
        let cases: &[(&str, &[&str], Capabilities)] = &[
            ("greeting only", &["mx.example"], Capabilities::default()),
            (
                "everything",
                &[
                    "mx.example at your service",
                    "SIZE 35882577",
                    "8BITMIME",
                    "STARTTLS",
                    "ENHANCEDSTATUSCODES",
                    "PIPELINING",
                    "CHUNKING",
                    "SMTPUTF8",
                    "AUTH PLAIN LOGIN",
                ],
                all.clone(),
            ),
            (
                "lower case",
                &[
                    "mx.example",
                    "size 35882577",
                    "8bitmime",
                    "starttls",
                    "enhancedstatuscodes",
                    "pipelining",
                    "chunking",
                    "smtputf8",
                    "auth plain login",
                ],
                all,
            ),
            (
                "size without number",
                &["mx", "SIZE"],
                Capabilities {
                    size: true,
                    ..Capabilities::default()
                },
            ),
            (
                "size zero means no fixed maximum",
                &["mx", "SIZE 0"],
                Capabilities {
                    size: true,
                    ..Capabilities::default()
                },
            ),
            (
                "size garbage",
                &["mx", "SIZE lots"],
                Capabilities {
                    size: true,
                    ..Capabilities::default()
                },
            ),
            (
                "old AUTH= form merged without duplicates",
                &["mx", "AUTH LOGIN PLAIN", "AUTH=LOGIN CRAM-MD5"],
                Capabilities {
                    auth_mechanisms: vec!["LOGIN".into(), "PLAIN".into(), "CRAM-MD5".into()],
                    ..Capabilities::default()
                },
            ),
            (
                "first line is never a keyword",
                &["PIPELINING"],
                Capabilities::default(),
            ),
            (
                "unknown keywords and extra spaces ignored",
                &["mx", "X-FOO bar", "  PIPELINING  ", "DSN"],
                Capabilities {
                    pipelining: true,
                    ..Capabilities::default()
                },
            ),
        ];
        for (name, lines, expected) in cases {
            assert_eq!(&capabilities(lines), expected, "{name}");
        }
    }

    #[test]
    fn auth_mechanisms_are_bounded() {
        let long = format!("AUTH {}", "M".repeat(MAX_AUTH_MECHANISM_BYTES + 1));
        assert!(capabilities(&["mx", &long]).auth_mechanisms.is_empty());
        let many: Vec<String> = (0..MAX_AUTH_MECHANISMS * 2)
            .map(|index| format!("X{index}"))
            .collect();
        let line = format!("AUTH {}", many.join(" "));
        let parsed = capabilities(&["mx", &line]);
        assert_eq!(parsed.auth_mechanisms.len(), MAX_AUTH_MECHANISMS);
        assert!(parsed.offers_auth("x0"));
    }
}
