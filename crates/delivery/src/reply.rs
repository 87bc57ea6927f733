//! Parsing server replies (RFC 5321 §4.2) with optional enhanced status codes
//! (RFC 3463, RFC 2034), incrementally from a byte buffer.

pub use tsubame_smtp_proto::EnhancedCode;

/// Longest reply line accepted, CRLF included.
///
/// RFC 5321 §4.5.3.1.5 sets 512 bytes as the minimum a peer must accept, but servers
/// in the wild send longer lines (long EHLO AUTH lists, policy rejections quoting URLs),
/// and a client that gives up on those would defer mail for no reason. Eight times the
/// RFC minimum still bounds the buffer the caller keeps for one line.
pub const MAX_REPLY_LINE_BYTES: usize = 4096;

/// Most lines accepted in one multi-line reply.
///
/// RFC 5321 sets no limit; the longest replies seen in practice are EHLO lists of a few
/// dozen extensions. 100 lines of [`MAX_REPLY_LINE_BYTES`] bound one reply at 400 KiB.
pub const MAX_REPLY_LINES: usize = 100;

/// One server reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Invariant: 200..=599 (first digit 2 to 5, RFC 5321 §4.2.1; 1yz is unused in SMTP).
    pub code: u16,
    /// The enhanced status code of the first line, when it had one whose class matches
    /// the first digit of `code` (RFC 3463 §2).
    pub enhanced: Option<EnhancedCode>,
    /// The text of every line, without code, separator, enhanced code or line ending.
    /// Invariant: `1..=MAX_REPLY_LINES` entries. Bytes that are not UTF-8 are replaced
    /// with U+FFFD: the text is for logs and bounces, never interpreted byte-exactly.
    pub lines: Vec<String>,
}

impl Reply {
    /// 2yz: the command was accepted.
    pub fn is_positive_completion(&self) -> bool {
        (200..300).contains(&self.code)
    }

    /// 3yz: the command was accepted, more is expected (354 to DATA, 334 to AUTH).
    pub fn is_intermediate(&self) -> bool {
        (300..400).contains(&self.code)
    }

    /// 4yz: transient failure, retry later.
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// 5yz: permanent failure.
    pub fn is_permanent(&self) -> bool {
        (500..600).contains(&self.code)
    }

    /// The lines joined with `\n`, for logs and bounce messages.
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }
}

/// Why bytes are not a valid reply. Every variant is a protocol violation by the
/// server; the caller should close the connection and defer the recipients.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("reply line {line_index} longer than {MAX_REPLY_LINE_BYTES} bytes")]
    LineTooLong { line_index: usize },
    #[error("reply has more than {MAX_REPLY_LINES} lines")]
    TooManyLines,
    #[error("reply line {line_index} does not start with a reply code 200..599")]
    BadCode { line_index: usize },
    #[error("reply line {line_index} has code {found}, the reply started with {first}")]
    MixedCodes {
        line_index: usize,
        first: u16,
        found: u16,
    },
    #[error("reply line {line_index}: the code is followed by neither space, '-' nor the end")]
    BadSeparator { line_index: usize },
}

/// Parses the first complete reply in `buf`.
///
/// Returns `Ok(None)` when `buf` holds only the beginning of a reply (read more and
/// call again with the whole buffer), or the reply and how many bytes it took.
/// Lines end in CRLF; a bare LF is tolerated as a line ending (the text loses a trailing
/// CR either way). The result does not depend on how the bytes arrived: a prefix of
/// `buf` either returns `Ok(None)` or the same result as `buf` itself.
pub fn parse_reply(buf: &[u8]) -> Result<Option<(Reply, usize)>, ReplyError> {
    let mut offset = 0;
    let mut code = None;
    let mut enhanced = None;
    let mut lines = Vec::new();
    for line_index in 0..MAX_REPLY_LINES {
        let rest = buf.get(offset..).unwrap_or_default();
        let window = rest.get(..MAX_REPLY_LINE_BYTES).unwrap_or(rest);
        let Some(newline) = window.iter().position(|&byte| byte == b'\n') else {
            if rest.len() >= MAX_REPLY_LINE_BYTES {
                return Err(ReplyError::LineTooLong { line_index });
            }
            return Ok(None);
        };
        let line = window.get(..newline).unwrap_or_default();
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        offset += newline + 1;

        let parsed = parse_line(line, line_index)?;
        match code {
            None => code = Some(parsed.code),
            Some(first) if first != parsed.code => {
                return Err(ReplyError::MixedCodes {
                    line_index,
                    first,
                    found: parsed.code,
                });
            }
            Some(_) => {}
        }
        let mut text = parsed.text;
        let line_enhanced = parse_enhanced(text, parsed.code);
        if let Some((line_code, after)) = line_enhanced {
            // RFC 2034 §4 puts the enhanced code on every line; keep the first line's,
            // and strip a matching one from the other lines' text.
            match enhanced {
                None if line_index == 0 => {
                    enhanced = Some(line_code);
                    text = after;
                }
                Some(first) if first == line_code => text = after,
                _ => {}
            }
        }
        lines.push(String::from_utf8_lossy(text).into_owned());
        if parsed.last {
            let reply = Reply {
                code: parsed.code,
                enhanced,
                lines,
            };
            return Ok(Some((reply, offset)));
        }
    }
    Err(ReplyError::TooManyLines)
}

struct ParsedLine<'a> {
    code: u16,
    last: bool,
    text: &'a [u8],
}

fn parse_line(line: &[u8], line_index: usize) -> Result<ParsedLine<'_>, ReplyError> {
    let (code, rest) = match line {
        [
            first @ b'2'..=b'5',
            second @ b'0'..=b'9',
            third @ b'0'..=b'9',
            rest @ ..,
        ] => {
            let code = u16::from(first - b'0') * 100
                + u16::from(second - b'0') * 10
                + u16::from(third - b'0');
            (code, rest)
        }
        _ => return Err(ReplyError::BadCode { line_index }),
    };
    // RFC 5321 §4.2: `Reply-code [ SP textstring ] CRLF` ends a reply,
    // `Reply-code "-" [ textstring ] CRLF` continues it.
    let (last, text) = match rest {
        [] => (true, rest),
        [b' ', text @ ..] => (true, text),
        [b'-', text @ ..] => (false, text),
        _ => return Err(ReplyError::BadSeparator { line_index }),
    };
    Ok(ParsedLine { code, last, text })
}

/// Reads `class.subject.detail` (RFC 3463 §2: class one digit matching the reply
/// class, subject and detail one to three digits) followed by a space or the end.
/// Returns the code and the text after it.
fn parse_enhanced(text: &[u8], code: u16) -> Option<(EnhancedCode, &[u8])> {
    let (class, rest) = match text {
        [class @ (b'2' | b'4' | b'5'), b'.', rest @ ..] => (class - b'0', rest),
        _ => return None,
    };
    if u16::from(class) != code / 100 {
        return None;
    }
    let (subject, rest) = parse_number(rest)?;
    let rest = rest.strip_prefix(b".")?;
    let (detail, rest) = parse_number(rest)?;
    let rest = match rest {
        [] => rest,
        [b' ', after @ ..] => after,
        _ => return None,
    };
    Some((EnhancedCode::new(class, subject, detail), rest))
}

/// One to three ASCII digits.
fn parse_number(text: &[u8]) -> Option<(u16, &[u8])> {
    let digits = text
        .iter()
        .take(4)
        .take_while(|byte| byte.is_ascii_digit())
        .count();
    if !(1..=3).contains(&digits) {
        return None;
    }
    let (number, rest) = text.split_at_checked(digits)?;
    let value = number
        .iter()
        .fold(0u16, |value, &byte| value * 10 + u16::from(byte - b'0'));
    Some((value, rest))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use proptest::prelude::*;

    /// Parses a complete reply for tests.
    pub(crate) fn reply(text: &str) -> Reply {
        let (reply, consumed) = parse_reply(text.as_bytes()).unwrap().unwrap();
        assert_eq!(consumed, text.len(), "{text:?}");
        reply
    }

    #[test]
    fn valid_replies() {
        type Case = (
            &'static str,
            &'static str,
            u16,
            Option<(u8, u16, u16)>,
            &'static [&'static str],
        );
        let cases: &[Case] = &[
            ("simple", "250 OK\r\n", 250, None, &["OK"]),
            ("bare code", "250\r\n", 250, None, &[""]),
            ("bare lf", "220 hello\n", 220, None, &["hello"]),
            (
                "enhanced",
                "250 2.1.0 Sender OK\r\n",
                250,
                Some((2, 1, 0)),
                &["Sender OK"],
            ),
            (
                "enhanced only",
                "250 2.0.0\r\n",
                250,
                Some((2, 0, 0)),
                &[""],
            ),
            (
                "enhanced three digits",
                "554 5.7.123 no\r\n",
                554,
                Some((5, 7, 123)),
                &["no"],
            ),
            (
                "enhanced class mismatch is text",
                "550 2.1.0 odd\r\n",
                550,
                None,
                &["2.1.0 odd"],
            ),
            (
                "four-digit subject is text",
                "550 5.1234.0 odd\r\n",
                550,
                None,
                &["5.1234.0 odd"],
            ),
            (
                "number without dots is text",
                "550 5 apples\r\n",
                550,
                None,
                &["5 apples"],
            ),
            (
                "multi-line",
                "250-mx.example\r\n250-PIPELINING\r\n250 SIZE 100\r\n",
                250,
                None,
                &["mx.example", "PIPELINING", "SIZE 100"],
            ),
            (
                "multi-line enhanced on every line",
                "550-5.7.1 first\r\n550 5.7.1 second\r\n",
                550,
                Some((5, 7, 1)),
                &["first", "second"],
            ),
            (
                "empty continuation",
                "250-\r\n250 end\r\n",
                250,
                None,
                &["", "end"],
            ),
            ("not utf-8", "550 caf\u{e9}\r\n", 550, None, &["caf\u{e9}"]),
        ];
        for (name, input, code, enhanced, lines) in cases {
            let parsed = reply(input);
            assert_eq!(parsed.code, *code, "{name}");
            assert_eq!(
                parsed.enhanced,
                enhanced.map(|(c, s, d)| EnhancedCode::new(c, s, d)),
                "{name}"
            );
            assert_eq!(parsed.lines, *lines, "{name}");
        }
    }

    #[test]
    fn invalid_bytes_become_replacement_characters() {
        let (parsed, _) = parse_reply(b"550 a\xffb\r\n").unwrap().unwrap();
        assert_eq!(parsed.lines, ["a\u{fffd}b"]);
    }

    #[test]
    fn consumed_stops_after_the_reply() {
        let (parsed, consumed) = parse_reply(b"250 a\r\n354 b\r\n").unwrap().unwrap();
        assert_eq!(parsed.code, 250);
        assert_eq!(consumed, 7);
    }

    #[test]
    fn incomplete_replies() {
        for input in [
            "",
            "2",
            "250",
            "250 OK",
            "250 OK\r",
            "250-a\r\n",
            "250-a\r\n250 b",
        ] {
            assert_eq!(parse_reply(input.as_bytes()), Ok(None), "{input:?}");
        }
    }

    #[test]
    fn malformed_replies() {
        let long_line = format!("250 {}\r\n", "x".repeat(MAX_REPLY_LINE_BYTES));
        let long_unfinished = "x".repeat(MAX_REPLY_LINE_BYTES);
        let many_lines = "250-x\r\n".repeat(MAX_REPLY_LINES) + "250 x\r\n";
        let cases: &[(&str, &str, ReplyError)] = &[
            ("letters", "abc\r\n", ReplyError::BadCode { line_index: 0 }),
            ("1yz", "150 x\r\n", ReplyError::BadCode { line_index: 0 }),
            ("6yz", "600 x\r\n", ReplyError::BadCode { line_index: 0 }),
            (
                "two digits",
                "25\r\n",
                ReplyError::BadCode { line_index: 0 },
            ),
            ("empty line", "\r\n", ReplyError::BadCode { line_index: 0 }),
            (
                "bad code on a later line",
                "250-a\r\nxyz\r\n",
                ReplyError::BadCode { line_index: 1 },
            ),
            (
                "four digits",
                "2500 x\r\n",
                ReplyError::BadSeparator { line_index: 0 },
            ),
            (
                "tab separator",
                "250\tx\r\n",
                ReplyError::BadSeparator { line_index: 0 },
            ),
            (
                "mixed codes",
                "250-a\r\n251 b\r\n",
                ReplyError::MixedCodes {
                    line_index: 1,
                    first: 250,
                    found: 251,
                },
            ),
            (
                "line too long",
                &long_line,
                ReplyError::LineTooLong { line_index: 0 },
            ),
            (
                "unfinished line too long",
                &long_unfinished,
                ReplyError::LineTooLong { line_index: 0 },
            ),
            ("too many lines", &many_lines, ReplyError::TooManyLines),
        ];
        for (name, input, error) in cases {
            assert_eq!(parse_reply(input.as_bytes()), Err(error.clone()), "{name}");
        }
    }

    #[test]
    fn limits_are_inclusive() {
        // A line of exactly MAX_REPLY_LINE_BYTES including CRLF is accepted.
        let text = "y".repeat(MAX_REPLY_LINE_BYTES - 6);
        let line = format!("250 {text}\r\n");
        assert_eq!(line.len(), MAX_REPLY_LINE_BYTES);
        assert_eq!(reply(&line).lines, [text]);
        // MAX_REPLY_LINES lines are accepted.
        let lines = "250-x\r\n".repeat(MAX_REPLY_LINES - 1) + "250 x\r\n";
        assert_eq!(reply(&lines).lines.len(), MAX_REPLY_LINES);
    }

    #[test]
    fn classes() {
        let cases = [
            (220, [true, false, false, false]),
            (354, [false, true, false, false]),
            (421, [false, false, true, false]),
            (554, [false, false, false, true]),
        ];
        for (code, expected) in cases {
            let parsed = Reply {
                code,
                enhanced: None,
                lines: vec![String::new()],
            };
            let actual = [
                parsed.is_positive_completion(),
                parsed.is_intermediate(),
                parsed.is_transient(),
                parsed.is_permanent(),
            ];
            assert_eq!(actual, expected, "{code}");
        }
    }

    fn reply_bytes() -> impl Strategy<Value = Vec<u8>> {
        let line = (
            prop::sample::select(vec!["250", "250", "251", "550", "2x0"]),
            prop::sample::select(vec!["-", " ", "", "\t"]),
            "[ -~]{0,12}",
            prop::sample::select(vec!["\r\n", "\n", "\r"]),
        )
            .prop_map(|(code, separator, text, ending)| {
                format!("{code}{separator}{text}{ending}").into_bytes()
            });
        prop::collection::vec(line, 0..6).prop_map(|lines| lines.concat())
    }

    proptest! {
        #[test]
        fn any_split_agrees(input in reply_bytes(), split in any::<prop::sample::Index>()) {
            let whole = parse_reply(&input);
            let split_point = split.index(input.len() + 1);
            let prefix = parse_reply(&input[..split_point]);
            match prefix {
                Ok(None) => {}
                other => prop_assert_eq!(other, whole.clone()),
            }
            // Feeding byte by byte finds the reply at the same place.
            let first_answer = (0..=input.len())
                .map(|end| parse_reply(&input[..end]))
                .find(|result| !matches!(result, Ok(None)))
                .unwrap_or(Ok(None));
            prop_assert_eq!(first_answer, whole);
        }

        #[test]
        fn arbitrary_bytes_do_not_panic(input in prop::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse_reply(&input);
        }
    }
}
