//! The Received header tsubame puts at the top of every message it accepts
//! (RFC 5321 §4.4), with the protocol names of RFC 3848 and RFC 6531.
//!
//! ```text
//! Received: from printer.lan ([192.0.2.7])
//!     by relay.example.com (tsubame) with ESMTPSA
//!     (TLSv1.3 TLS13_AES_256_GCM_SHA384) (authenticated user scanner);
//!     Thu, 26 Nov 2026 11:30:01 +0000
//! ```
//!
//! The user's name appears only when the listener says so (`received_header_user`):
//! the header travels with the message to every recipient.

use std::borrow::Cow;
use std::net::IpAddr;

use tsubame_smtp_proto::date::rfc5322_date;

use crate::session::TlsInfo;

/// What the header records.
#[derive(Debug)]
pub struct Trace<'a> {
    /// The EHLO or HELO argument; `None` if the client sent neither (not possible for a
    /// message, kept total).
    pub helo: Option<&'a str>,
    /// EHLO rather than HELO.
    pub extended: bool,
    pub client: IpAddr,
    pub hostname: &'a str,
    pub tls: Option<&'a TlsInfo>,
    pub user: Option<&'a str>,
    /// Name the user in the header.
    pub show_user: bool,
    /// The transaction used SMTPUTF8.
    pub smtputf8: bool,
    pub now_unix_ms: u64,
}

/// The header, folded, ending in CRLF.
#[cfg(test)]
pub fn header(trace: &Trace<'_>) -> String {
    let mut out = Vec::new();
    write_header(trace, &mut out);
    String::from_utf8(out).unwrap_or_default()
}

/// Appends the header, folded, ending in CRLF, to `out` (once per message: no
/// intermediate strings unless a name needs its control characters replaced).
pub fn write_header(trace: &Trace<'_>, out: &mut Vec<u8>) {
    use std::io::Write as _;
    // Writing into a Vec cannot fail.
    let helo = trace.helo.map_or(Cow::Borrowed("unknown"), printable);
    let _ = write!(out, "Received: from {helo} (");
    let _ = match trace.client {
        IpAddr::V4(address) => write!(out, "[{address}]"),
        IpAddr::V6(address) => write!(out, "[IPv6:{address}]"),
    };
    let _ = write!(
        out,
        ")\r\n\tby {} (tsubame) with {}",
        printable(trace.hostname),
        protocol(trace)
    );
    if let Some(tls) = trace.tls {
        let _ = write!(out, "\r\n\t({} {})", tls.version, printable(&tls.cipher));
    }
    if let (true, Some(user)) = (trace.show_user, trace.user) {
        let _ = write!(
            out,
            " (authenticated user {})",
            printable(user).replace(['(', ')', '\\'], "_")
        );
    }
    out.extend_from_slice(b";\r\n\t");
    out.extend_from_slice(rfc5322_date(trace.now_unix_ms).as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// RFC 3848 (ESMTP, ESMTPA, ESMTPS, ESMTPSA) and RFC 6531 §3.7.4 (UTF8SMTP...).
fn protocol(trace: &Trace<'_>) -> &'static str {
    if !trace.extended {
        return "SMTP";
    }
    match (trace.smtputf8, trace.tls.is_some(), trace.user.is_some()) {
        (false, false, false) => "ESMTP",
        (false, true, false) => "ESMTPS",
        (false, false, true) => "ESMTPA",
        (false, true, true) => "ESMTPSA",
        (true, false, false) => "UTF8SMTP",
        (true, true, false) => "UTF8SMTPS",
        (true, false, true) => "UTF8SMTPA",
        (true, true, true) => "UTF8SMTPSA",
    }
}

/// Header text must not break the header: control characters become `?`. The parser
/// refuses them in commands already; this keeps the function total.
fn printable(text: &str) -> Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return Cow::Borrowed(text);
    }
    Cow::Owned(
        text.chars()
            .map(|c| if c.is_control() { '?' } else { c })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace() -> Trace<'static> {
        Trace {
            helo: Some("printer.lan"),
            extended: true,
            client: "192.0.2.7".parse().unwrap(),
            hostname: "relay.test",
            tls: None,
            user: None,
            show_user: false,
            smtputf8: false,
            now_unix_ms: 1_234_567_890_000,
        }
    }

    #[test]
    fn plain_esmtp() {
        assert_eq!(
            header(&trace()),
            "Received: from printer.lan ([192.0.2.7])\r\n\tby relay.test (tsubame) with ESMTP;\r\n\tFri, 13 Feb 2009 23:31:30 +0000\r\n"
        );
    }

    #[test]
    fn tls_and_login_name_the_protocol_and_the_user_only_when_asked() {
        let tls = TlsInfo {
            version: "TLSv1.3",
            cipher: "TLS13_AES_256_GCM_SHA384".to_string(),
        };
        let mut with_login = Trace {
            tls: Some(&tls),
            user: Some("scan(ner)"),
            ..trace()
        };
        let hidden = header(&with_login);
        assert!(
            hidden.contains("with ESMTPSA\r\n\t(TLSv1.3 TLS13_AES_256_GCM_SHA384);"),
            "{hidden}"
        );
        assert!(!hidden.contains("scan"), "{hidden}");
        with_login.show_user = true;
        let shown = header(&with_login);
        assert!(shown.contains("(authenticated user scan_ner_);"), "{shown}");
    }

    #[test]
    fn protocols() {
        let tls = TlsInfo {
            version: "TLSv1.2",
            cipher: "X".to_string(),
        };
        let cases = [
            (false, false, false, false, "SMTP"),
            (true, false, false, false, "ESMTP"),
            (true, true, false, false, "ESMTPS"),
            (true, false, true, false, "ESMTPA"),
            (true, true, true, true, "UTF8SMTPSA"),
        ];
        for (extended, secure, login, utf8, want) in cases {
            let trace = Trace {
                extended,
                tls: secure.then_some(&tls),
                user: login.then_some("u"),
                smtputf8: utf8,
                ..trace()
            };
            assert_eq!(protocol(&trace), want);
        }
    }

    #[test]
    fn ipv6_literal_and_control_characters() {
        let text = header(&Trace {
            client: "2001:db8::1".parse().unwrap(),
            helo: Some("bad\r\nX-Injected: yes"),
            ..trace()
        });
        assert!(
            text.starts_with("Received: from bad??X-Injected: yes ([IPv6:2001:db8::1])"),
            "{text}"
        );
        assert_eq!(text.matches("\r\n").count(), 3, "{text}");
    }
}
