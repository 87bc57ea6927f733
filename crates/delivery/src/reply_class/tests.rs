use proptest::prelude::*;

use super::*;
use crate::reply::parse_reply;

fn parsed(raw: &str) -> Reply {
    let (reply, used) = parse_reply(raw.as_bytes()).unwrap().unwrap();
    assert_eq!(used, raw.len(), "one whole reply: {raw:?}");
    reply
}

/// Replies as Google sends them: the texts of the "Gmail SMTP errors and codes" and
/// "SMTP relay service error messages" pages, wrapped and suffixed the way Gmail's
/// servers do (`<session id> - gsmtp`).
#[test]
fn google_quota_and_rate_limit_replies_are_recognised() {
    let cases: &[(&str, UpstreamSignal)] = &[
        // ---- daily quotas: defer, never bounce ----
        (
            "550 5.4.5 Daily sending quota exceeded. d2sm1234567pfa.12 - gsmtp\r\n",
            QUOTA_ACCOUNT,
        ),
        (
            "550-5.4.5 Daily user sending quota exceeded.\r\n\
             550 5.4.5  https://support.google.com/mail/?p=DailyLimitExceeded x1sm99 - gsmtp\r\n",
            QUOTA_ACCOUNT,
        ),
        (
            "550-5.4.5 Daily user sending limit exceeded. For more information on Gmail\r\n\
             550-5.4.5 sending limits go to\r\n\
             550 5.4.5  https://support.google.com/a/answer/166852 a1sm42 - gsmtp\r\n",
            QUOTA_ACCOUNT,
        ),
        (
            "550-5.4.5 Daily SMTP relay limit exceeded for user. For more information on\r\n\
             550-5.4.5 SMTP relay sending limits please contact your administrator or\r\n\
             550 5.4.5 visit https://support.google.com/a/answer/6140680 q7sm1 - gsmtp\r\n",
            QUOTA_ACCOUNT,
        ),
        (
            "550-5.7.1 Daily SMTP relay limit exceeded for customer. For more information on\r\n\
             550-5.7.1 SMTP relay sending limits please contact your administrator or\r\n\
             550 5.7.1 visit https://support.google.com/a/answer/6140680 q7sm1 - gsmtp\r\n",
            QUOTA_UPSTREAM,
        ),
        // A daily limit given as 452 4.5.3 is still the daily limit.
        (
            "452 4.5.3 Daily user sending limit exceeded. - gsmtp\r\n",
            QUOTA_ACCOUNT,
        ),
        // ---- too fast: defer and slow down ----
        (
            "421-4.7.0 Try again later, closing connection. (EHLO)\r\n\
             421 4.7.0  https://support.google.com/a/answer/3221692 a7sm1 - gsmtp\r\n",
            RATE_UPSTREAM,
        ),
        (
            "421 4.7.0 Try again later, closing connection. (MAIL) z9sm1 - gsmtp\r\n",
            RATE_UPSTREAM,
        ),
        (
            "454 4.7.0 Too many login attempts, please try again later. k8sm3 - gsmtp\r\n",
            RATE_UPSTREAM,
        ),
        (
            "421-4.7.0 [192.0.2.10      15] Our system has detected an unusual rate of\r\n\
             421-4.7.0 unsolicited mail originating from your IP address. To protect our\r\n\
             421-4.7.0 users from spam, mail sent from your IP address has been temporarily\r\n\
             421-4.7.0 rate limited. Please visit\r\n\
             421-4.7.0  https://support.google.com/mail/?p=UnsolicitedRateLimitError to\r\n\
             421 4.7.0 review our Bulk Email Senders Guidelines. p4si35 - gsmtp\r\n",
            RATE_UPSTREAM,
        ),
        (
            "421-4.7.28 [192.0.2.10      15] Our system has detected an unusual rate of\r\n\
             421-4.7.28 unsolicited mail originating from your IP address. To protect our\r\n\
             421-4.7.28 users from spam, mail sent from your IP address has been temporarily\r\n\
             421-4.7.28 rate limited. Please visit\r\n\
             421-4.7.28  https://support.google.com/mail/?p=UnsolicitedRateLimitError to\r\n\
             421 4.7.28 review our Bulk Email Senders Guidelines. p4si35 - gsmtp\r\n",
            RATE_UPSTREAM,
        ),
        (
            "421-4.7.28 Gmail has detected an unusual rate of mail originating from your\r\n\
             421 4.7.28 DKIM domain. Please slow down. b2sm5 - gsmtp\r\n",
            RATE_UPSTREAM,
        ),
        (
            "450-4.2.1 Peak SMTP relay limit exceeded for customer. This is a temporary\r\n\
             450-4.2.1 error. For more information on SMTP relay limits, please contact\r\n\
             450 4.2.1 your administrator or visit https://support.google.com/a/answer/6140680 - gsmtp\r\n",
            RATE_UPSTREAM,
        ),
        (
            "450-4.2.1 The user you are trying to contact is receiving mail at a rate that\r\n\
             450-4.2.1 prevents additional messages from being delivered. Please resend your\r\n\
             450-4.2.1 message at a later time. If the user is able to receive mail at that\r\n\
             450-4.2.1 time, your message will be delivered. For more information, please\r\n\
             450 4.2.1  https://support.google.com/mail/?p=ReceivingRate d2si8 - gsmtp\r\n",
            RATE_RECIPIENT,
        ),
        (
            "450 4.2.1 The user you are trying to contact is receiving mail too quickly. Please resend your message at a later time. - gsmtp\r\n",
            RATE_RECIPIENT,
        ),
        // ---- too many recipients in one transaction: split, not a quota ----
        (
            "452-4.5.3 Your message has too many recipients. For more information regarding\r\n\
             452-4.5.3 Google's sending limits, visit\r\n\
             452 4.5.3  https://support.google.com/mail/?p=TooManyRecipientsError x3sm - gsmtp\r\n",
            UpstreamSignal::TooManyRecipients,
        ),
        (
            "452 4.5.3 Domain policy size per transaction exceeded, please try this recipient in a separate transaction. - gsmtp\r\n",
            UpstreamSignal::TooManyRecipients,
        ),
        // Any server's (RFC 5321 §4.5.3.1.10).
        (
            "452 4.5.3 Error: too many recipients\r\n",
            UpstreamSignal::TooManyRecipients,
        ),
    ];
    for (raw, expected) in cases {
        let reply = parsed(raw);
        assert_eq!(classify_reply(&reply), *expected, "{raw}");
        assert!(expected.defers(), "{raw}");
        // The same through `classify`, with the text as one string.
        let enhanced = reply.enhanced.map(|e| (e.class, e.subject, e.detail));
        assert_eq!(
            classify(reply.code, enhanced, &reply.text()),
            *expected,
            "{raw}"
        );
    }
}

/// Refusals that must keep their usual meaning: Google's own other replies, and other
/// servers' replies that share a word or a code with the ones above.
#[test]
fn other_replies_stay_normal() {
    let cases: &[&str] = &[
        // A real user unknown is still final.
        "550-5.1.1 The email account that you tried to reach does not exist. Please try\r\n\
         550-5.1.1 double-checking the recipient's email address for typos or\r\n\
         550-5.1.1 unnecessary spaces. For more information, go to\r\n\
         550 5.1.1  https://support.google.com/mail/?p=NoSuchUser x7si1 - gsmtp\r\n",
        "550 5.1.1 <nobody@example.org>: Recipient address rejected: User unknown in virtual mailbox table\r\n",
        // The recipient's mailbox is full: "quota", but not ours.
        "552-5.2.2 The email account that you tried to reach is over quota. Please direct\r\n\
         552 5.2.2 the recipient to https://support.google.com/mail/?p=OverQuotaPerm - gsmtp\r\n",
        "452-4.2.2 The email account that you tried to reach is over quota. Please direct\r\n\
         452 4.2.2 the recipient to https://support.google.com/mail/?p=OverQuotaTemp - gsmtp\r\n",
        "552 5.2.2 Mailbox full: quota exceeded\r\n",
        "552 Mailbox over quota\r\n",
        // Spam and policy rejections, final, even when they speak of a rate or a limit.
        "550-5.7.1 [192.0.2.10      12] Our system has detected an unusual rate of\r\n\
         550-5.7.1 unsolicited mail originating from your IP address. To protect our\r\n\
         550-5.7.1 users from spam, mail sent from your IP address has been blocked.\r\n\
         550 5.7.1 Please visit https://support.google.com/mail/?p=UnsolicitedIPError - gsmtp\r\n",
        "550-5.7.28 [192.0.2.10      15] Our system has detected an unusual rate of\r\n\
         550 5.7.28 unsolicited mail originating from your IP address. - gsmtp\r\n",
        "550 5.7.1 This message violates example.com email policy. - gcdp <sessionid> - gsmtp\r\n",
        "554 5.7.1 <a@example.org>: Recipient address rejected: You have exceeded your Outmail quota.\r\n",
        "550 5.7.0 Mail relay denied [192.0.2.10]. Invalid credentials for relay for one of the domains in: example.org - gsmtp\r\n",
        "552-5.3.4 Your message exceeded Google's message size limits. For more\r\n\
         552 5.3.4 information, go to https://support.google.com/mail/?p=MaxSizeError - gsmtp\r\n",
        "550-5.7.26 This mail has been blocked because the sender is unauthenticated.\r\n\
         550 5.7.26 Gmail requires all senders to authenticate. - gsmtp\r\n",
        // Temporary, and plainly so: the usual retry is right.
        "421 4.7.0 IP not in whitelist for RCPT domain, closing connection. - gsmtp\r\n",
        "421 4.7.0 TLS required for RCPT domain, closing connection. - gsmtp\r\n",
        "421 4.7.0 Temporary System Problem. Try again later. - gsmtp\r\n",
        "421 4.3.0 Temporary System Problem. Try again later. - gsmtp\r\n",
        "421 4.4.5 Server busy, try again later. - gsmtp\r\n",
        "454 4.7.0 Cannot authenticate due to temporary system problem. Try again later. - gsmtp\r\n",
        "451 4.3.0 Mail server temporarily rejected message. - gsmtp\r\n",
        "421 4.7.0 mail.example.org Error: too many connections from 192.0.2.1\r\n",
        // Authentication and protocol refusals.
        "535-5.7.8 Username and Password not accepted. For more information, go to\r\n\
         535 5.7.8  https://support.google.com/mail/?p=BadCredentials - gsmtp\r\n",
        "530 5.7.0 Must issue a STARTTLS command first. - gsmtp\r\n",
        "554 5.6.0 Mail message is malformed. Not accepted. - gsmtp\r\n",
        // X.4.5 is "mail system congestion" in RFC 3463: without a quota's words it is
        // what its code says.
        "550 5.4.5 Mail system congestion\r\n",
        "250 2.0.0 OK  1700000000 x1si2 - gsmtp\r\n",
    ];
    for raw in cases {
        let reply = parsed(raw);
        assert_eq!(classify_reply(&reply), UpstreamSignal::Normal, "{raw}");
    }
    assert!(!UpstreamSignal::Normal.defers());
}

#[test]
fn codes_come_first_then_the_text_in_any_case_and_wrapping() {
    type Case = (u16, Option<(u8, u16, u16)>, &'static str, UpstreamSignal);
    let cases: &[Case] = &[
        (
            550,
            Some((5, 4, 5)),
            "DAILY USER SENDING QUOTA EXCEEDED",
            QUOTA_ACCOUNT,
        ),
        (
            550,
            Some((5, 4, 5)),
            "Daily\n user  sending\tquota exceeded",
            QUOTA_ACCOUNT,
        ),
        (
            552,
            Some((5, 4, 5)),
            "Sending limit exceeded for today",
            QUOTA_ACCOUNT,
        ),
        // The text of a quota under another code means nothing.
        (
            550,
            Some((5, 1, 1)),
            "Daily user sending quota exceeded",
            UpstreamSignal::Normal,
        ),
        (
            421,
            Some((4, 7, 1)),
            "Try again later, closing connection",
            UpstreamSignal::Normal,
        ),
        (
            454,
            Some((4, 7, 0)),
            "too many LOGIN attempts",
            RATE_UPSTREAM,
        ),
        (451, Some((4, 7, 28)), "anything", RATE_UPSTREAM),
        // A 4.7.28 needs no words; the same words under 4.7.0 need the right reply code.
        (
            450,
            Some((4, 7, 0)),
            "Try again later, closing connection",
            UpstreamSignal::Normal,
        ),
        // Without an enhanced code: the reply code and Google's own wording.
        (
            550,
            None,
            "Daily sending quota exceeded. - gsmtp",
            QUOTA_ACCOUNT,
        ),
        (
            550,
            None,
            "Daily SMTP relay limit exceeded for customer.",
            QUOTA_UPSTREAM,
        ),
        (
            421,
            None,
            "Try again later, closing connection.",
            RATE_UPSTREAM,
        ),
        (
            454,
            None,
            "Too many login attempts, please try again later.",
            RATE_UPSTREAM,
        ),
        (
            452,
            None,
            "Too many recipients",
            UpstreamSignal::TooManyRecipients,
        ),
        // ... but not words any server uses, nor a code that needs its enhanced code.
        (550, None, "quota exceeded", UpstreamSignal::Normal),
        (
            452,
            None,
            "Error: insufficient system storage",
            UpstreamSignal::Normal,
        ),
        (421, None, "Service not available", UpstreamSignal::Normal),
        (550, None, "", UpstreamSignal::Normal),
    ];
    for &(code, enhanced, text, expected) in cases {
        assert_eq!(
            classify(code, enhanced, text),
            expected,
            "{code} {enhanced:?} {text:?}"
        );
    }
}

#[test]
fn only_the_beginning_of_a_long_text_is_examined() {
    let padding = "x ".repeat(MAX_CLASSIFIED_TEXT_BYTES);
    let late = format!("{padding}Daily user sending quota exceeded");
    assert_eq!(
        classify(550, Some((5, 4, 5)), &late),
        UpstreamSignal::Normal
    );
    let early = format!("Daily user sending quota exceeded {padding}");
    assert_eq!(classify(550, Some((5, 4, 5)), &early), QUOTA_ACCOUNT);
    assert!(normalise(&early).len() <= MAX_CLASSIFIED_TEXT_BYTES);
    // Multi-byte text is cut at a character boundary (a String cannot be cut
    // elsewhere), and lowercasing is ASCII only.
    let wide = "\u{3042}".repeat(MAX_CLASSIFIED_TEXT_BYTES);
    assert!(normalise(&wide).len() <= MAX_CLASSIFIED_TEXT_BYTES);
    assert_eq!(normalise("  A\r\n\tB\u{c9} "), "a b\u{c9}");
}

proptest! {
    /// Any reply is classified without a panic, and only the documented codes ever
    /// defer a 5yz.
    #[test]
    fn classify_is_total_and_defers_5yz_only_for_a_quota(
        code in 200u16..600,
        enhanced in proptest::option::of((2u8..6, 0u16..30, 0u16..30)),
        text in "(?s).{0,300}|(Daily user sending quota exceeded|too many|quota|limit exceeded| |\n){0,8}",
    ) {
        let signal = classify(code, enhanced, &text);
        if code >= 500 && signal.defers() {
            let quota = matches!(signal, UpstreamSignal::QuotaExceeded { .. });
            prop_assert!(quota, "{code} {enhanced:?} {text:?}: {signal:?}");
            prop_assert!(matches!(enhanced, None | Some((5, 4, 5)) | Some((5, 7, 1))));
        }
        prop_assert!(normalise(&text).len() <= MAX_CLASSIFIED_TEXT_BYTES);
    }
}
