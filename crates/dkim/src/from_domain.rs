//! The signing domain is the domain of the From header's address (RFC 6376 section
//! 3.10 lets any domain sign, but DMARC alignment, RFC 7489 section 3.1.1, wants the
//! From domain).

/// Longest header section we scan. The relay's own limit on a message is larger, but a
/// From header that is not in the first 1 MiB of headers is not one we sign for.
const HEADER_SECTION_BYTES_MAX: usize = 1024 * 1024;

/// The lower-cased ASCII domain of the first address in the one From header of an RFC
/// 5322 message (CRLF or bare LF line ends, folded or not). `None` when there is no From
/// header, more than one (RFC 5322 section 3.6 allows exactly one), no address with a
/// domain, a domain literal, or a domain that is not a plain ASCII host name.
pub fn from_domain(message: &[u8]) -> Option<String> {
    let headers = &message[..message.len().min(HEADER_SECTION_BYTES_MAX)];
    let mut from_value: Option<Vec<u8>> = None;
    let mut lines = HeaderLines { rest: headers };
    while let Some(field) = lines.next_field() {
        let Some(colon) = field.iter().position(|&byte| byte == b':') else {
            continue;
        };
        let name = field[..colon].trim_ascii();
        if name.eq_ignore_ascii_case(b"from") {
            if from_value.is_some() {
                return None;
            }
            from_value = Some(unfold(&field[colon + 1..]));
        }
    }
    address_domain(&from_value?)
}

/// Does the header section of `message` hold a field called `name` (ignoring case)?
/// Only the first `HEADER_SECTION_BYTES_MAX` bytes are looked at.
pub fn has_header(message: &[u8], name: &str) -> bool {
    let headers = &message[..message.len().min(HEADER_SECTION_BYTES_MAX)];
    let mut lines = HeaderLines { rest: headers };
    while let Some(field) = lines.next_field() {
        if let Some(colon) = field.iter().position(|&byte| byte == b':')
            && field[..colon]
                .trim_ascii()
                .eq_ignore_ascii_case(name.as_bytes())
        {
            return true;
        }
    }
    false
}

/// Longest Message-ID value returned: RFC 5322 section 2.1.1's line limit. A longer
/// one is not an identifier anyone will search for.
const MESSAGE_ID_BYTES_MAX: usize = 998;

/// The value of the first Message-ID field of `message`'s header section (RFC 5322
/// section 3.6.4), unfolded and trimmed, for logs: `<id@example.com>`. `None` when there
/// is none, it is empty, longer than 998 bytes, not UTF-8, or holds a control character.
pub fn message_id(message: &[u8]) -> Option<String> {
    let headers = &message[..message.len().min(HEADER_SECTION_BYTES_MAX)];
    let mut lines = HeaderLines { rest: headers };
    while let Some(field) = lines.next_field() {
        let Some(colon) = field.iter().position(|&byte| byte == b':') else {
            continue;
        };
        if !field[..colon]
            .trim_ascii()
            .eq_ignore_ascii_case(b"message-id")
        {
            continue;
        }
        let value = unfold(&field[colon + 1..]);
        let value = String::from_utf8(value.trim_ascii().to_vec()).ok()?;
        let usable = !value.is_empty()
            && value.len() <= MESSAGE_ID_BYTES_MAX
            && !value
                .chars()
                .any(|character| character.is_control() && character != '\t');
        return usable.then_some(value);
    }
    None
}

/// Splits the header section into fields, each with its continuation lines, and stops
/// at the empty line that ends it.
struct HeaderLines<'a> {
    rest: &'a [u8],
}

impl<'a> HeaderLines<'a> {
    fn next_field(&mut self) -> Option<&'a [u8]> {
        if self.rest.is_empty() || self.rest.starts_with(b"\r\n") || self.rest.starts_with(b"\n") {
            return None;
        }
        let mut end = 0;
        loop {
            match self.rest[end..].iter().position(|&byte| byte == b'\n') {
                None => {
                    end = self.rest.len();
                    break;
                }
                Some(newline) => {
                    end += newline + 1;
                    // RFC 5322 section 2.2.3: a line starting with WSP continues the field.
                    if !matches!(self.rest.get(end), Some(b' ' | b'\t')) {
                        break;
                    }
                }
            }
        }
        let (field, rest) = self.rest.split_at(end);
        self.rest = rest;
        Some(field)
    }
}

/// Removes the CRLF (or LF) of folding; the WSP after it stays, as RFC 5322 section
/// 2.2.3 says.
fn unfold(value: &[u8]) -> Vec<u8> {
    value
        .iter()
        .copied()
        .filter(|&byte| byte != b'\r' && byte != b'\n')
        .collect()
}

/// The domain of the first address in a From value: `Name <local@domain>`,
/// `local@domain`, `"quoted, name" <local@domain> (comment)`, `a@b, c@d`.
fn address_domain(value: &[u8]) -> Option<String> {
    // Strip comments and quoted strings, so that '<', '@' and ',' in them do not count.
    let mut plain = Vec::with_capacity(value.len());
    let mut comment_depth = 0usize;
    let mut in_quotes = false;
    let mut escaped = false;
    for &byte in value {
        if escaped {
            escaped = false;
            continue;
        }
        match byte {
            b'\\' if in_quotes || comment_depth > 0 => escaped = true,
            b'"' if comment_depth == 0 => {
                in_quotes = !in_quotes;
                plain.push(b' ');
            }
            b'(' if !in_quotes => comment_depth += 1,
            b')' if !in_quotes && comment_depth > 0 => {
                comment_depth -= 1;
                plain.push(b' ');
            }
            _ if in_quotes || comment_depth > 0 => {}
            _ => plain.push(byte),
        }
    }
    // RFC 5322 group syntax ("Team: a@b;"): the addresses follow the colon.
    let after_group = match plain.iter().position(|&byte| byte == b':') {
        Some(colon) if !plain[..colon].contains(&b'<') && !plain[..colon].contains(&b'@') => {
            &plain[colon + 1..]
        }
        _ => &plain[..],
    };
    let first = after_group.split(|&byte| byte == b',').next()?;
    let address = match first.iter().position(|&byte| byte == b'<') {
        Some(open) => {
            let inside = &first[open + 1..];
            let close = inside.iter().position(|&byte| byte == b'>')?;
            &inside[..close]
        }
        None => first,
    };
    let at = address.iter().rposition(|&byte| byte == b'@')?;
    let domain = address[at + 1..].trim_ascii();
    let domain = domain.strip_suffix(b";").unwrap_or(domain).trim_ascii();
    let domain = domain.strip_suffix(b".").unwrap_or(domain);
    if !is_host_name(domain) {
        return None;
    }
    Some(String::from_utf8_lossy(domain).to_ascii_lowercase())
}

/// Letters, digits and hyphens in dot-separated labels of 1 to 63 characters, at most
/// 253 in all (RFC 1035 section 2.3.4).
fn is_host_name(domain: &[u8]) -> bool {
    !domain.is_empty()
        && domain.len() <= crate::DNS_NAME_BYTES_MAX
        && domain.split(|&byte| byte == b'.').all(|label| {
            !label.is_empty()
                && label.len() <= crate::DNS_LABEL_BYTES_MAX
                && label
                    .iter()
                    .all(|&byte| byte.is_ascii_alphanumeric() || byte == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_id_is_the_first_fields_unfolded_value() {
        let table: &[(&[u8], Option<&str>)] = &[
            (
                b"Message-ID: <a@example.com>\r\n\r\n",
                Some("<a@example.com>"),
            ),
            (
                b"message-id:<a@example.com>  \r\nSubject: x\r\n\r\n",
                Some("<a@example.com>"),
            ),
            (
                b"Message-Id:\r\n <folded@example.com>\r\n\r\n",
                Some("<folded@example.com>"),
            ),
            (
                b"Message-ID: <1@x>\r\nMessage-ID: <2@x>\r\n\r\n",
                Some("<1@x>"),
            ),
            (b"Subject: x\r\n\r\nMessage-ID: <body@x>\r\n", None),
            (b"Message-ID:   \r\n\r\n", None),
            (b"Message-ID: <\x01@x>\r\n\r\n", None),
            (b"Message-ID: <\xff@x>\r\n\r\n", None),
            (b"", None),
        ];
        for &(message, expected) in table {
            assert_eq!(
                message_id(message).as_deref(),
                expected,
                "{}",
                String::from_utf8_lossy(message)
            );
        }
        let long = format!("Message-ID: <{}@x>\r\n\r\n", "a".repeat(1000));
        assert_eq!(message_id(long.as_bytes()), None);
    }

    #[test]
    fn from_domain_table() {
        let cases: &[(&str, &[u8], Option<&str>)] = &[
            ("bare address", b"From: alice@Example.COM\r\n\r\nbody", Some("example.com")),
            ("angle address", b"Subject: x\r\nFrom: Alice <alice@example.com>\r\n\r\n", Some("example.com")),
            ("lower-case name", b"from:bob@example.org\r\n\r\n", Some("example.org")),
            (
                "folded between name and address",
                b"From: \"A very long display name\"\r\n <alice@mail.example.net>\r\n\r\n",
                Some("mail.example.net"),
            ),
            ("folded with tab", b"From:\r\n\talice@example.com\r\nTo: b@c.d\r\n\r\n", Some("example.com")),
            ("bare LF", b"From: alice@example.com\nTo: x@y.z\n\n", Some("example.com")),
            (
                "quoted name holding an address",
                b"From: \"evil@attacker.example, <x@attacker.example>\" <alice@example.com>\r\n\r\n",
                Some("example.com"),
            ),
            (
                "comment holding an address",
                b"From: alice@example.com (sent for bob@attacker.example)\r\n\r\n",
                Some("example.com"),
            ),
            ("first of a list", b"From: a@one.example, b@two.example\r\n\r\n", Some("one.example")),
            ("group", b"From: Team: a@team.example;\r\n\r\n", Some("team.example")),
            ("trailing dot", b"From: a@example.com.\r\n\r\n", Some("example.com")),
            ("no From", b"To: a@example.com\r\n\r\nFrom: b@example.com\r\n", None),
            ("From in the body only", b"Subject: x\r\n\r\nFrom: b@example.com\r\n", None),
            ("two From headers", b"From: a@one.example\r\nFrom: b@two.example\r\n\r\n", None),
            ("no domain", b"From: alice\r\n\r\n", None),
            ("domain literal", b"From: a@[192.0.2.1]\r\n\r\n", None),
            ("non-ASCII domain", "From: a@bücher.example\r\n\r\n".as_bytes(), None),
            ("unclosed angle", b"From: Alice <alice@example.com\r\n\r\n", None),
            ("Fromage is not From", b"Fromage: a@cheese.example\r\nFrom: b@example.com\r\n\r\n", Some("example.com")),
            ("no header end", b"From: a@example.com", Some("example.com")),
            ("empty", b"", None),
        ];
        for (name, message, expected) in cases {
            assert_eq!(from_domain(message).as_deref(), *expected, "case {name}");
        }
    }
}
