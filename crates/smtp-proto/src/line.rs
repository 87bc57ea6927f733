//! Finding command lines in a receive buffer.

/// A complete line at the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Line {
    /// Bytes of the line without its terminator (CRLF, or a bare LF which we accept on
    /// command lines for legacy clients). Invariant: `content_bytes <= length_bytes`.
    pub content_bytes: usize,
    /// Bytes of the line including its terminator: how much to consume from the buffer.
    pub length_bytes: usize,
}

/// The buffer holds no line terminator within the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    #[error("command line longer than {limit_bytes} bytes")]
    TooLong { limit_bytes: usize },
}

/// Finds the first line in `buffer`.
///
/// `Ok(None)`: no terminator yet and fewer than `max_line_bytes` bytes buffered: read more.
/// `Err(TooLong)`: `max_line_bytes` bytes (terminator included) hold no terminator; the
/// caller discards input up to the next LF (see [`skip_past_line_end`]) and replies 500.
///
/// Only the first `max_line_bytes` bytes are searched, so a client that streams an
/// endless line costs one bounded scan per call, not a scan of everything it sent.
/// A CR that is not followed by LF stays part of the line content; the command parser
/// rejects it as a control character.
pub fn next_line(buffer: &[u8], max_line_bytes: usize) -> Result<Option<Line>, LineError> {
    let window = buffer.get(..max_line_bytes).unwrap_or(buffer);
    match window.iter().position(|&byte| byte == b'\n') {
        Some(line_feed) => {
            let content_bytes = match line_feed.checked_sub(1) {
                Some(before) if window.get(before) == Some(&b'\r') => before,
                _ => line_feed,
            };
            Ok(Some(Line {
                content_bytes,
                length_bytes: line_feed + 1,
            }))
        }
        // An empty buffer is never "too long", whatever the limit.
        None if !buffer.is_empty() && buffer.len() >= max_line_bytes => Err(LineError::TooLong {
            limit_bytes: max_line_bytes,
        }),
        None => Ok(None),
    }
}

/// After a too-long line: the number of bytes to drop up to and including the next LF,
/// or `None` when the buffer holds no LF (drop all of it and keep skipping).
pub fn skip_past_line_end(buffer: &[u8]) -> Option<usize> {
    buffer
        .iter()
        .position(|&byte| byte == b'\n')
        .map(|line_feed| line_feed + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    type Found = Result<Option<Line>, LineError>;

    fn line(content_bytes: usize, length_bytes: usize) -> Found {
        Ok(Some(Line {
            content_bytes,
            length_bytes,
        }))
    }

    #[test]
    fn next_line_cases() {
        let too_long = Err(LineError::TooLong { limit_bytes: 8 });
        let cases: &[(&str, &[u8], Found)] = &[
            ("empty buffer", b"", Ok(None)),
            ("crlf", b"NOOP\r\n", line(4, 6)),
            ("bare lf", b"NOOP\n", line(4, 5)),
            ("empty line crlf", b"\r\n", line(0, 2)),
            ("empty line lf", b"\n", line(0, 1)),
            (
                "pipelined: first line only",
                b"RSET\r\nQUIT\r\n",
                line(4, 6),
            ),
            ("incomplete", b"NOOP", Ok(None)),
            ("incomplete with cr", b"NOOP\r", Ok(None)),
            ("bare cr stays content", b"A\rB\r\n", line(3, 5)),
            ("exactly at limit", b"ABCDEF\r\n", line(6, 8)),
            ("limit reached without lf", b"ABCDEFG\r", too_long),
            ("one over the limit", b"ABCDEFG\r\n", too_long),
            ("far over the limit", b"ABCDEFGHIJKLMNOP\r\n", too_long),
            ("short line then long", b"A\r\nBCDEFGHIJKLMNOP", line(1, 3)),
        ];
        for (name, input, expected) in cases {
            assert_eq!(&next_line(input, 8), expected, "{name}");
        }
    }

    #[test]
    fn skip_past_line_end_cases() {
        let cases: &[(&str, &[u8], Option<usize>)] = &[
            ("empty", b"", None),
            ("no lf", b"XXXX\r", None),
            ("crlf", b"XX\r\nNOOP\r\n", Some(4)),
            ("lf first", b"\nNOOP", Some(1)),
        ];
        for (name, input, expected) in cases {
            assert_eq!(skip_past_line_end(input), *expected, "{name}");
        }
    }
}
