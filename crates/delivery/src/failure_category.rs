//! What kind of trouble a failed or deferred delivery ran into, in plain words, for the
//! delivery log and `tsubame log search --category`.
//!
//! The input is the detail the relay keeps for a recipient: an upstream's reply as
//! `550 5.1.1 no such user` (code, enhanced code, text), or our own explanation
//! (`connecting to 192.0.2.1:25: Connection refused`), which may carry a reply inside
//! (`… refused the session at Greeting: 421 4.7.0 Try again later`). The first
//! reply code found and its enhanced status code (RFC 3463) decide first; phrases of
//! the text decide what the codes leave open. Google's quota and rate-limit replies are
//! recognised by [`crate::reply_class::classify`], not again here.
//!
//! No I/O; the text examined is bounded like [`crate::reply_class`]'s.

use crate::reply_class::{UpstreamSignal, classify, normalise};

/// One category per failure, in plain words (see [`FailureCategory::as_str`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureCategory {
    Authentication,
    Quota,
    RecipientUnknown,
    MailboxFull,
    PolicySpam,
    Dns,
    Tls,
    Timeout,
    Connection,
    Other,
}

impl FailureCategory {
    /// Every category, in the order of [`FailureCategory::as_str`]'s documentation.
    pub const ALL: [FailureCategory; 10] = [
        Self::Authentication,
        Self::Quota,
        Self::RecipientUnknown,
        Self::MailboxFull,
        Self::PolicySpam,
        Self::Dns,
        Self::Tls,
        Self::Timeout,
        Self::Connection,
        Self::Other,
    ];

    /// `authentication`, `quota`, `recipient unknown`, `mailbox full`, `policy/spam`,
    /// `dns`, `tls`, `timeout`, `connection` or `other`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Authentication => "authentication",
            Self::Quota => "quota",
            Self::RecipientUnknown => "recipient unknown",
            Self::MailboxFull => "mailbox full",
            Self::PolicySpam => "policy/spam",
            Self::Dns => "dns",
            Self::Tls => "tls",
            Self::Timeout => "timeout",
            Self::Connection => "connection",
            Self::Other => "other",
        }
    }
}

impl std::fmt::Display for FailureCategory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rule on the enhanced status code: subject and detail (RFC 3463 §3), `None` for
/// any detail. The class (4 or 5) does not change the kind of trouble.
type EnhancedRule = ((u16, Option<u16>), FailureCategory);

/// Enhanced codes that say what happened on their own, most specific first.
const ENHANCED_RULES: &[EnhancedRule] = &[
    // X.7.8 authentication credentials invalid, X.7.9 mechanism too weak (RFC 4954),
    // X.7.14 trust relationship required, X.7.0 with AUTH's 530/535 is left to phrases.
    ((7, Some(8)), FailureCategory::Authentication),
    ((7, Some(9)), FailureCategory::Authentication),
    ((7, Some(14)), FailureCategory::Authentication),
    // X.7.10 encryption needed (RFC 5248), X.7.11 encryption required for the
    // mechanism (RFC 4954).
    ((7, Some(10)), FailureCategory::Tls),
    ((7, Some(11)), FailureCategory::Tls),
    // X.2.2 mailbox full.
    ((2, Some(2)), FailureCategory::MailboxFull),
    // X.1.1 bad destination mailbox address, X.1.6 mailbox has moved, X.1.10
    // recipient address has null MX (RFC 7505) is a DNS answer.
    ((1, Some(1)), FailureCategory::RecipientUnknown),
    ((1, Some(6)), FailureCategory::RecipientUnknown),
    ((1, Some(10)), FailureCategory::Dns),
    // X.1.2 bad destination system address, X.4.3 directory server failure, X.4.4
    // unable to route.
    ((1, Some(2)), FailureCategory::Dns),
    ((4, Some(3)), FailureCategory::Dns),
    ((4, Some(4)), FailureCategory::Dns),
    // X.4.7 delivery time expired.
    ((4, Some(7)), FailureCategory::Timeout),
    // X.4.1 no answer from host, X.4.2 bad connection.
    ((4, Some(1)), FailureCategory::Connection),
    ((4, Some(2)), FailureCategory::Connection),
];

/// Phrases (lowercase, single-spaced) and their category, tried in order after the
/// enhanced codes: the first phrase found wins, so the more specific come first.
const PHRASE_RULES: &[(&str, FailureCategory)] = &[
    ("authentication", FailureCategory::Authentication),
    ("credentials", FailureCategory::Authentication),
    ("password", FailureCategory::Authentication),
    ("access token", FailureCategory::Authentication),
    ("login", FailureCategory::Authentication),
    ("mailbox full", FailureCategory::MailboxFull),
    ("mailbox is full", FailureCategory::MailboxFull),
    ("over quota", FailureCategory::MailboxFull),
    ("insufficient storage", FailureCategory::MailboxFull),
    ("quota", FailureCategory::Quota),
    ("rate limit", FailureCategory::Quota),
    ("sending limit", FailureCategory::Quota),
    ("too many messages", FailureCategory::Quota),
    ("user unknown", FailureCategory::RecipientUnknown),
    ("unknown user", FailureCategory::RecipientUnknown),
    ("no such user", FailureCategory::RecipientUnknown),
    ("no such mailbox", FailureCategory::RecipientUnknown),
    ("mailbox unavailable", FailureCategory::RecipientUnknown),
    ("does not exist", FailureCategory::RecipientUnknown),
    ("tls", FailureCategory::Tls),
    ("certificate", FailureCategory::Tls),
    ("handshake", FailureCategory::Tls),
    ("spam", FailureCategory::PolicySpam),
    ("blocked", FailureCategory::PolicySpam),
    ("blacklist", FailureCategory::PolicySpam),
    ("blocklist", FailureCategory::PolicySpam),
    ("policy", FailureCategory::PolicySpam),
    ("reputation", FailureCategory::PolicySpam),
    ("dmarc", FailureCategory::PolicySpam),
    ("spf", FailureCategory::PolicySpam),
    ("dns", FailureCategory::Dns),
    ("cannot resolve", FailureCategory::Dns),
    ("no such domain", FailureCategory::Dns),
    ("null mx", FailureCategory::Dns),
    ("timed out", FailureCategory::Timeout),
    ("timeout", FailureCategory::Timeout),
    ("connection", FailureCategory::Connection),
    ("connecting to", FailureCategory::Connection),
    ("refused the session", FailureCategory::Connection),
    ("no address to connect to", FailureCategory::Connection),
];

/// The category of a failed or deferred recipient's `detail` (see the module docs).
pub fn failure_category(detail: &str) -> FailureCategory {
    let text = normalise(detail);
    let (code, enhanced) = first_reply_code(&text);
    if let Some(code) = code {
        let signal = classify(code, enhanced, &text);
        if matches!(
            signal,
            UpstreamSignal::QuotaExceeded { .. } | UpstreamSignal::RateLimited { .. }
        ) {
            return FailureCategory::Quota;
        }
    }
    if let Some((_, subject, detail)) = enhanced {
        for &((rule_subject, rule_detail), category) in ENHANCED_RULES {
            if subject == rule_subject && rule_detail.is_none_or(|wanted| wanted == detail) {
                return category;
            }
        }
    }
    if let Some(&(_, category)) = PHRASE_RULES
        .iter()
        .find(|(phrase, _)| text.contains(phrase))
    {
        return category;
    }
    // What is left of X.7.* is a security or policy refusal (RFC 3463 §3.8); 530 and
    // 535 without an enhanced code are AUTH's (RFC 4954 §6).
    match (code, enhanced) {
        (_, Some((_, 7, _))) => FailureCategory::PolicySpam,
        (Some(530 | 534 | 535), None) => FailureCategory::Authentication,
        (Some(421), None) => FailureCategory::Connection,
        _ => FailureCategory::Other,
    }
}

/// The first reply code in `text` (a word of three digits, 2xx to 5xx) and the
/// enhanced status code right after it, if any.
fn first_reply_code(text: &str) -> (Option<u16>, Option<(u8, u16, u16)>) {
    let mut words = text.split(' ');
    while let Some(word) = words.next() {
        let word = word.trim_end_matches([':', ',', ';']);
        let bytes = word.as_bytes();
        let is_code = bytes.len() == 3
            && bytes.iter().all(u8::is_ascii_digit)
            && (b'2'..=b'5').contains(&bytes[0]);
        if !is_code {
            continue;
        }
        let Ok(code) = word.parse::<u16>() else {
            continue;
        };
        let enhanced = words.next().and_then(parse_enhanced);
        return (Some(code), enhanced);
    }
    (None, None)
}

/// `5.1.1` as (class, subject, detail); RFC 3463 §2 allows up to three digits each for
/// subject and detail.
fn parse_enhanced(word: &str) -> Option<(u8, u16, u16)> {
    let mut parts = word.split('.');
    let class: u8 = parts.next()?.parse().ok()?;
    let subject: u16 = parts.next()?.parse().ok()?;
    let detail: u16 = parts.next()?.parse().ok()?;
    if parts.next().is_some() || !matches!(class, 2 | 4 | 5) {
        return None;
    }
    Some((class, subject, detail))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn categories_of_replies_and_local_failures() {
        use FailureCategory::*;
        let table: &[(&str, FailureCategory)] = &[
            ("550 5.1.1 no such user here", RecipientUnknown),
            (
                "550 5.1.1 <x@example.com>: Recipient address rejected",
                RecipientUnknown,
            ),
            (
                "550 Requested action not taken: mailbox unavailable",
                RecipientUnknown,
            ),
            (
                "552 5.2.2 The email account that you tried to reach is over quota",
                MailboxFull,
            ),
            ("452 4.2.2 mailbox full", MailboxFull),
            // Google's daily quota: reply_class's rule, not the mailbox's.
            ("550 5.4.5 Daily user sending limit exceeded.", Quota),
            (
                "421 4.7.28 Our system has detected an unusual rate of unsolicited mail",
                Quota,
            ),
            ("451 4.7.1 Sending rate limit exceeded, try later", Quota),
            (
                "535 5.7.8 Username and Password not accepted.",
                Authentication,
            ),
            ("535 Authentication failed", Authentication),
            (
                "AUTH with 192.0.2.1:587: authentication rejected: 535 5.7.8 bad",
                Authentication,
            ),
            (
                "no access token for a@example.com: invalid_grant",
                Authentication,
            ),
            ("530 5.7.0 Must issue a STARTTLS command first", Tls),
            (
                "538 5.7.11 Encryption required for requested authentication mechanism",
                Tls,
            ),
            (
                "TLS handshake with 192.0.2.1:25 (mx.example.com) failed: bad cert",
                Tls,
            ),
            ("550 5.7.1 Message rejected as spam", PolicySpam),
            (
                "554 5.7.26 Unauthenticated email from example.com is not accepted due to domain's DMARC policy",
                PolicySpam,
            ),
            ("550 5.7.1 Relaying denied", PolicySpam),
            (
                "554 Service unavailable; Client host blocked using zen.spamhaus.org",
                PolicySpam,
            ),
            (
                "cannot resolve smtp.example.net: failed to lookup address",
                Dns,
            ),
            (
                "DNS lookup for example.com failed temporarily: SERVFAIL",
                Dns,
            ),
            ("550 5.1.10 null MX", Dns),
            ("192.0.2.1:25 timed out after 300s at Data", Timeout),
            (
                "message expired after the maximum queue time; last: 451 4.4.7 gone",
                Timeout,
            ),
            (
                "connecting to 192.0.2.1:25: Connection refused (os error 111)",
                Connection,
            ),
            ("connection lost: reset by peer", Connection),
            (
                "192.0.2.1:25 refused the session at Greeting: 421 4.3.2 shutting down",
                Connection,
            ),
            ("421 Service not available", Connection),
            ("451 4.4.1 no answer", Connection),
            ("451 4.3.0 Temporary local problem", Other),
            ("554 5.6.0 message content rejected", Other),
            (
                "the message (99 bytes) is larger than the upstream's limit (10 bytes)",
                Other,
            ),
            ("", Other),
        ];
        for &(detail, expected) in table {
            assert_eq!(failure_category(detail), expected, "{detail:?}");
        }
    }

    #[test]
    fn names_are_unique_plain_words() {
        let names: std::collections::HashSet<&str> = FailureCategory::ALL
            .iter()
            .map(|category| category.as_str())
            .collect();
        assert_eq!(names.len(), FailureCategory::ALL.len());
    }
}
