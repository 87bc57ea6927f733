//! What an upstream's refusal means beyond its code: Google's quota and rate-limit
//! replies.
//!
//! Google answers an account over its daily sending quota with `550 5.4.5`: a 5yz, which
//! would bounce the mail, though the quota frees up within a day as the oldest sends
//! leave Google's rolling window. It slows down a sender that goes too fast with 4yz
//! replies that a plain retry schedule would keep hammering. [`classify`] recognises
//! these replies so that the relay defers (with a wait) or fails over to another
//! upstream instead of bouncing, and blocks the account in its own quota counts
//! (`tsubame_relay::quota`) so it stops trying.
//!
//! The patterns are the replies documented on Google's "Gmail SMTP errors and codes"
//! page (Google Workspace Admin Help, answer 3726730) and its "SMTP relay service error
//! messages" page. Each rule names a reply code and an enhanced status code (RFC 3463),
//! and where the codes alone are ambiguous, phrases of the documented text. The codes
//! are matched first: a phrase inside a reply with other codes means nothing (a
//! `550 5.7.1` spam rejection that mentions an "unusual rate" stays a permanent
//! failure). Phrases are matched case-insensitively with runs of white space (line
//! breaks of a multi-line reply included) taken as one space, so a reply wrapped
//! differently still matches. A reply without an enhanced code matches a rule by its
//! reply code and a phrase; a rule with no phrase needs the enhanced code.
//!
//! Everything else is [`UpstreamSignal::Normal`]: the usual rules of RFC 5321 apply (4yz
//! retried, 5yz final), so `550 5.1.1` (no such user) still bounces.
//!
//! No I/O and no clock; the text examined is bounded ([`MAX_CLASSIFIED_TEXT_BYTES`]).

use std::time::Duration;

use crate::reply::Reply;

/// How long to wait before trying an account whose daily quota is spent. Google
/// documents no time: its window is rolling, so capacity comes back gradually as the
/// oldest sends of the last 24 hours leave it. One probe an hour costs one refused
/// transaction an hour and finds the capacity within an hour of its return.
pub const QUOTA_EXCEEDED_RETRY_HINT: Duration = Duration::from_secs(60 * 60);

/// How long to leave an upstream alone after it said we go too fast (connections,
/// logins, or mail from our address). Google documents no time; 10 minutes is the order
/// of the first retry delays of common MTAs (Postfix's `minimal_backoff_time` is 300 s,
/// its `maximal_backoff_time` 4000 s), and long enough for a per-minute limiter to
/// recover.
pub const UPSTREAM_RATE_LIMIT_RETRY_HINT: Duration = Duration::from_secs(10 * 60);

/// How long to wait before trying again a recipient whose mailbox receives mail too
/// fast. Only that recipient waits; Google asks to "resend your message at a later
/// time" and documents no time.
pub const RECIPIENT_RATE_LIMIT_RETRY_HINT: Duration = Duration::from_secs(10 * 60);

/// Bytes of reply text examined: every documented phrase is in the first line, and
/// bounding the text bounds the work on a hostile upstream's 400 KB reply.
pub const MAX_CLASSIFIED_TEXT_BYTES: usize = 2048;

/// What a refusal means for the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamSignal {
    /// Nothing special: 4yz is retried, 5yz is final.
    Normal,
    /// A daily sending quota is spent. Even as 5yz the recipients are deferred (or sent
    /// through a fallback upstream), never bounced.
    QuotaExceeded {
        scope: QuotaScope,
        retry_after_hint: Duration,
    },
    /// We send too fast. Defer and slow down.
    RateLimited {
        scope: RateScope,
        retry_after_hint: Duration,
    },
    /// `452 4.5.3`: too many recipients in this transaction (RFC 5321 §4.5.3.1.10). The
    /// refused recipients go in another transaction, at once; nothing is wrong with the
    /// account.
    TooManyRecipients,
}

impl UpstreamSignal {
    /// Whether the reply must not bounce even if it is a 5yz.
    pub fn defers(&self) -> bool {
        !matches!(self, Self::Normal)
    }
}

/// Whose quota is spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaScope {
    /// The account (the authenticated user, or on smtp-relay the sending user): other
    /// accounts on the same upstream may still send.
    Account,
    /// Every account on the upstream: the Workspace customer's relay limit.
    Upstream,
}

/// Who is sending too fast.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateScope {
    /// We are, towards this upstream: connections, logins, or mail from our address or
    /// customer. Slow the whole upstream down (or fail over).
    Upstream,
    /// One recipient's mailbox receives too much: only that recipient waits; the
    /// upstream and the other recipients are fine.
    Recipient,
}

/// One line of the table: a reply code, an enhanced code, phrases of the text.
struct Rule {
    /// The reply code; `None` matches any code of the enhanced code's class.
    code: Option<u16>,
    enhanced: (u8, u16, u16),
    /// Lowercase, single-spaced. One must appear in the text; none means the codes
    /// suffice.
    phrases: &'static [&'static str],
    /// Whether a reply without an enhanced code matches by its reply code and a phrase:
    /// only where the phrases are Google's own wording, not words any server may use.
    without_enhanced: bool,
    signal: UpstreamSignal,
}

const QUOTA_ACCOUNT: UpstreamSignal = UpstreamSignal::QuotaExceeded {
    scope: QuotaScope::Account,
    retry_after_hint: QUOTA_EXCEEDED_RETRY_HINT,
};

const QUOTA_UPSTREAM: UpstreamSignal = UpstreamSignal::QuotaExceeded {
    scope: QuotaScope::Upstream,
    retry_after_hint: QUOTA_EXCEEDED_RETRY_HINT,
};

const RATE_UPSTREAM: UpstreamSignal = UpstreamSignal::RateLimited {
    scope: RateScope::Upstream,
    retry_after_hint: UPSTREAM_RATE_LIMIT_RETRY_HINT,
};

const RATE_RECIPIENT: UpstreamSignal = UpstreamSignal::RateLimited {
    scope: RateScope::Recipient,
    retry_after_hint: RECIPIENT_RATE_LIMIT_RETRY_HINT,
};

/// Phrases of Google's daily quota replies ("Daily user sending quota exceeded",
/// "Daily user sending limit exceeded", "Daily sending quota exceeded", "Daily SMTP
/// relay limit exceeded for user").
const DAILY_QUOTA_PHRASES: &[&str] = &[
    "daily sending quota",
    "daily user sending quota",
    "daily user sending limit",
    "daily smtp relay limit",
];

/// First match wins.
const RULES: &[Rule] = &[
    // 550 5.7.1 Daily SMTP relay limit exceeded for customer. (Other 5.7.1 replies are
    // policy and spam rejections, final.) First: without an enhanced code, its text
    // would otherwise match the per-user rule below.
    Rule {
        code: None,
        enhanced: (5, 7, 1),
        phrases: &["daily smtp relay limit exceeded for customer"],
        without_enhanced: true,
        signal: QUOTA_UPSTREAM,
    },
    // 550 5.4.5 Daily sending quota exceeded. / Daily user sending quota exceeded. /
    // Daily user sending limit exceeded. / Daily SMTP relay limit exceeded for user.
    Rule {
        code: None,
        enhanced: (5, 4, 5),
        phrases: DAILY_QUOTA_PHRASES,
        without_enhanced: true,
        signal: QUOTA_ACCOUNT,
    },
    // RFC 3463 X.4.5 is "mail system congestion", so the codes alone do not say
    // "quota"; under them, any wording of a spent quota or limit does. Deferring by
    // mistake delays mail; bouncing by mistake loses it.
    Rule {
        code: None,
        enhanced: (5, 4, 5),
        phrases: &["quota", "limit exceeded"],
        without_enhanced: false,
        signal: QUOTA_ACCOUNT,
    },
    // 452 4.5.3 with a daily quota's text: the quota, not the transaction's size.
    Rule {
        code: None,
        enhanced: (4, 5, 3),
        phrases: DAILY_QUOTA_PHRASES,
        without_enhanced: true,
        signal: QUOTA_ACCOUNT,
    },
    // 452 4.5.3 Your message has too many recipients. / Domain policy size per
    // transaction exceeded, please try this recipient in a separate transaction.
    Rule {
        code: None,
        enhanced: (4, 5, 3),
        phrases: &[],
        without_enhanced: false,
        signal: UpstreamSignal::TooManyRecipients,
    },
    Rule {
        code: Some(452),
        enhanced: (4, 5, 3),
        phrases: &["too many recipients", "separate transaction"],
        without_enhanced: true,
        signal: UpstreamSignal::TooManyRecipients,
    },
    // 421 4.7.0 Try again later, closing connection. (Denial of service protection of
    // the SMTP relay at HELO.) / Our system has detected an unusual rate of unsolicited
    // mail originating from your IP address. ... temporarily rate limited / blocked.
    // (Not: IP not in whitelist, TLS required, Temporary System Problem.)
    Rule {
        code: Some(421),
        enhanced: (4, 7, 0),
        phrases: &["try again later, closing connection", "unusual rate"],
        without_enhanced: true,
        signal: RATE_UPSTREAM,
    },
    // 421 4.7.28: Gmail's rate limiting of mail from our IP address or domain.
    Rule {
        code: None,
        enhanced: (4, 7, 28),
        phrases: &[],
        without_enhanced: false,
        signal: RATE_UPSTREAM,
    },
    // 454 4.7.0 Too many login attempts, please try again later. (Not: Cannot
    // authenticate due to temporary system problem.)
    Rule {
        code: Some(454),
        enhanced: (4, 7, 0),
        phrases: &["too many login attempts"],
        without_enhanced: true,
        signal: RATE_UPSTREAM,
    },
    // 450 4.2.1 Peak SMTP relay limit exceeded for customer. This is a temporary error.
    Rule {
        code: Some(450),
        enhanced: (4, 2, 1),
        phrases: &["peak smtp relay limit exceeded"],
        without_enhanced: true,
        signal: RATE_UPSTREAM,
    },
    // 450 4.2.1 The user you are trying to contact is receiving mail at a rate that
    // prevents additional messages from being delivered. / ... is receiving mail too
    // quickly.
    Rule {
        code: Some(450),
        enhanced: (4, 2, 1),
        phrases: &[
            "at a rate that prevents additional messages",
            "receiving mail too quickly",
            "receiving email too quickly",
        ],
        without_enhanced: true,
        signal: RATE_RECIPIENT,
    },
];

/// What a refusal means: `code` is the reply code, `enhanced` its enhanced status code
/// (class, subject, detail) if it had one, `text` the reply's text (lines joined by any
/// white space; codes of continuation lines removed, as [`Reply::lines`] holds them).
pub fn classify(code: u16, enhanced: Option<(u8, u16, u16)>, text: &str) -> UpstreamSignal {
    let mut normalised: Option<String> = None;
    for rule in RULES {
        let code_matches = match rule.code {
            Some(rule_code) => code == rule_code,
            None => code / 100 == u16::from(rule.enhanced.0),
        };
        if !code_matches {
            continue;
        }
        let enhanced_matches = match enhanced {
            Some(enhanced) => enhanced == rule.enhanced,
            None => rule.without_enhanced,
        };
        if !enhanced_matches {
            continue;
        }
        if rule.phrases.is_empty() {
            return rule.signal;
        }
        let text = normalised.get_or_insert_with(|| normalise(text));
        if rule.phrases.iter().any(|phrase| text.contains(phrase)) {
            return rule.signal;
        }
    }
    UpstreamSignal::Normal
}

/// [`classify`] for a parsed reply.
pub fn classify_reply(reply: &Reply) -> UpstreamSignal {
    let enhanced = reply
        .enhanced
        .map(|enhanced| (enhanced.class, enhanced.subject, enhanced.detail));
    // Lines joined by a space: the normalisation makes any white space one space.
    let mut text = String::new();
    for line in &reply.lines {
        if text.len() >= MAX_CLASSIFIED_TEXT_BYTES {
            break;
        }
        if !text.is_empty() {
            text.push(' ');
        }
        text.push_str(line);
    }
    classify(reply.code, enhanced, &text)
}

/// The first `MAX_CLASSIFIED_TEXT_BYTES` of `text`, ASCII-lowercased, each run of white
/// space one space, leading white space dropped.
pub(crate) fn normalise(text: &str) -> String {
    let mut normalised = String::with_capacity(text.len().min(MAX_CLASSIFIED_TEXT_BYTES));
    let mut space_pending = false;
    for character in text.chars() {
        if character.is_whitespace() {
            space_pending = !normalised.is_empty();
            continue;
        }
        let needed_bytes = character.len_utf8() + usize::from(space_pending);
        if normalised.len() + needed_bytes > MAX_CLASSIFIED_TEXT_BYTES {
            break;
        }
        if space_pending {
            normalised.push(' ');
            space_pending = false;
        }
        normalised.push(character.to_ascii_lowercase());
    }
    normalised
}

#[cfg(test)]
mod tests;
