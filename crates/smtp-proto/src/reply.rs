//! SMTP replies with enhanced status codes (RFC 5321 §4.2, RFC 3463, RFC 2034).

use std::borrow::Cow;

/// An enhanced status code `class.subject.detail` (RFC 3463 §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnhancedCode {
    pub class: u8,
    pub subject: u16,
    pub detail: u16,
}

impl EnhancedCode {
    pub const fn new(class: u8, subject: u16, detail: u16) -> Self {
        Self {
            class,
            subject,
            detail,
        }
    }
}

/// One reply: a three-digit code, an optional enhanced code, and text that may span
/// several lines (separated by `\n` in `text`; written as `250-` continuation lines).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Invariant: 200..=599.
    pub code: u16,
    pub enhanced: Option<EnhancedCode>,
    pub text: Cow<'static, str>,
}

impl Reply {
    pub const fn new(code: u16, enhanced: EnhancedCode, text: &'static str) -> Self {
        Self {
            code,
            enhanced: Some(enhanced),
            text: Cow::Borrowed(text),
        }
    }

    pub fn owned(code: u16, enhanced: Option<EnhancedCode>, text: String) -> Self {
        Self {
            code,
            enhanced,
            text: Cow::Owned(text),
        }
    }

    /// Appends the wire form (every line CRLF-terminated, `code-` on all lines but the
    /// last, the enhanced code repeated on every line when present) to `out`.
    ///
    /// A `\r` right before a `\n` separator is dropped and any other control character
    /// (a stray CR, a tab) is written as a space: the text is ours, but it may quote what
    /// a client sent, and a stray CR must never split a reply line on the wire.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let mut lines = self.text.split('\n').peekable();
        while let Some(line) = lines.next() {
            let separator = if lines.peek().is_some() { b'-' } else { b' ' };
            push_decimal(out, self.code);
            let line = line.strip_suffix('\r').unwrap_or(line);
            match self.enhanced {
                Some(enhanced) => {
                    out.push(separator);
                    push_decimal(out, u16::from(enhanced.class));
                    out.push(b'.');
                    push_decimal(out, enhanced.subject);
                    out.push(b'.');
                    push_decimal(out, enhanced.detail);
                    if !line.is_empty() {
                        out.push(b' ');
                    }
                }
                // RFC 5321 §4.2: `Reply-code [ SP textstring ] CRLF` on the last line;
                // `Reply-code "-" [ textstring ] CRLF` on the others.
                None if !line.is_empty() || separator == b'-' => out.push(separator),
                None => {}
            }
            out.extend(
                line.bytes()
                    .map(|byte| if byte.is_ascii_control() { b' ' } else { byte }),
            );
            out.extend_from_slice(b"\r\n");
        }
    }

    /// True for 4xx and 5xx.
    pub fn is_error(&self) -> bool {
        self.code >= 400
    }
}

/// Appends `value` in decimal without allocating (reply codes are written on every
/// reply, so this stays off the formatter).
fn push_decimal(out: &mut Vec<u8>, value: u16) {
    // u16::MAX has five digits.
    let mut digits = [0u8; 5];
    let mut start = digits.len();
    let mut rest = value;
    loop {
        start -= 1;
        if let Some(slot) = digits.get_mut(start) {
            // `rest % 10` is below 10, so the cast cannot truncate.
            *slot = b'0' + (rest % 10) as u8;
        }
        rest /= 10;
        if rest == 0 || start == 0 {
            break;
        }
    }
    out.extend_from_slice(digits.get(start..).unwrap_or_default());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_to_cases() {
        let cases: &[(&str, Reply, &str)] = &[
            (
                "single line with enhanced code",
                Reply::new(250, EnhancedCode::new(2, 1, 0), "Sender OK"),
                "250 2.1.0 Sender OK\r\n",
            ),
            (
                "single line without enhanced code",
                Reply::owned(220, None, "tsubame ESMTP".to_owned()),
                "220 tsubame ESMTP\r\n",
            ),
            (
                "multiline without enhanced code",
                Reply::owned(250, None, "first\nsecond\nlast".to_owned()),
                "250-first\r\n250-second\r\n250 last\r\n",
            ),
            (
                "multiline with enhanced code on every line",
                Reply::new(250, EnhancedCode::new(2, 1, 0), "first\nlast"),
                "250-2.1.0 first\r\n250 2.1.0 last\r\n",
            ),
            (
                "empty text",
                Reply::owned(250, None, String::new()),
                "250\r\n",
            ),
            (
                "empty text with enhanced code",
                Reply::new(250, EnhancedCode::new(2, 0, 0), ""),
                "250 2.0.0\r\n",
            ),
            (
                "crlf separators",
                Reply::owned(250, None, "a\r\nb".to_owned()),
                "250-a\r\n250 b\r\n",
            ),
            (
                "stray cr and control characters become spaces",
                Reply::owned(550, None, "x\ry\tz".to_owned()),
                "550 x y z\r\n",
            ),
            (
                "multi-digit enhanced parts",
                Reply::new(554, EnhancedCode::new(5, 10, 123), "odd"),
                "554 5.10.123 odd\r\n",
            ),
        ];
        for (name, reply, expected) in cases {
            let mut out = Vec::new();
            reply.write_to(&mut out);
            assert_eq!(String::from_utf8_lossy(&out), *expected, "{name}");
        }
    }

    #[test]
    fn write_to_appends() {
        let mut out = b"prefix ".to_vec();
        Reply::new(221, EnhancedCode::new(2, 0, 0), "Bye").write_to(&mut out);
        assert_eq!(out, b"prefix 221 2.0.0 Bye\r\n");
    }

    #[test]
    fn push_decimal_cases() {
        for (value, expected) in [(0u16, "0"), (7, "7"), (250, "250"), (u16::MAX, "65535")] {
            let mut out = Vec::new();
            push_decimal(&mut out, value);
            assert_eq!(out, expected.as_bytes());
        }
    }

    #[test]
    fn is_error_cases() {
        assert!(!Reply::owned(354, None, String::new()).is_error());
        assert!(Reply::owned(421, None, String::new()).is_error());
        assert!(Reply::owned(554, None, String::new()).is_error());
    }
}
