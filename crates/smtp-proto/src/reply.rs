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
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let _ = out;
        todo!()
    }

    /// True for 4xx and 5xx.
    pub fn is_error(&self) -> bool {
        self.code >= 400
    }
}
