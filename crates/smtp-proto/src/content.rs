//! Appending message content under a size limit, shared by the DATA and BDAT receivers.

/// CRLF, the only line ending a stored body contains.
pub(crate) const CRLF: &[u8] = b"\r\n";

/// Which limit stopped the appending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Overflow {
    Message,
    Line,
}

/// Appends content to a body until a limit is reached, then discards the rest.
///
/// The bytes kept are always exactly the first bytes of the content, however the
/// content arrived: whether a run is appended in one call or in ten, the limit cuts it
/// at the same byte. That keeps the result independent of how the network split the
/// input (the receivers' property tests check this).
#[derive(Debug)]
pub(crate) struct LimitedAppender {
    /// Content bytes allowed in the whole message.
    max_message_bytes: usize,
    /// Content bytes allowed in one line, its CRLF not counted (the CRLF is always
    /// reserved, so a line that fits is never cut before its ending).
    max_line_content_bytes: usize,
    /// Content bytes appended so far. Invariant: `<= max_message_bytes`.
    stored_bytes: usize,
    /// Bytes appended to the current line, CRLF excluded. Invariant:
    /// `<= max_line_content_bytes`.
    line_content_bytes: usize,
    /// Set once a limit was hit; nothing is appended afterwards.
    overflow: Option<Overflow>,
}

impl LimitedAppender {
    pub(crate) fn new(max_message_bytes: usize, max_line_content_bytes: usize) -> Self {
        Self {
            max_message_bytes,
            max_line_content_bytes,
            stored_bytes: 0,
            line_content_bytes: 0,
            overflow: None,
        }
    }

    pub(crate) fn overflow(&self) -> Option<Overflow> {
        self.overflow
    }

    /// True when anything was appended to the current line since its last CRLF.
    pub(crate) fn line_open(&self) -> bool {
        self.line_content_bytes > 0
    }

    /// Appends bytes of one line (no CR or LF in them).
    pub(crate) fn content(&mut self, bytes: &[u8], body: &mut Vec<u8>) {
        if self.overflow.is_some() || bytes.is_empty() {
            return;
        }
        let message_room = self.max_message_bytes.saturating_sub(self.stored_bytes);
        let line_room = self
            .max_line_content_bytes
            .saturating_sub(self.line_content_bytes);
        let fit = bytes.len().min(message_room).min(line_room);
        body.extend_from_slice(bytes.get(..fit).unwrap_or_default());
        self.stored_bytes += fit;
        self.line_content_bytes += fit;
        if fit < bytes.len() {
            // The smaller room is the one that ran out first; on a tie the message
            // limit wins, so the outcome does not depend on how the input was split.
            self.overflow = Some(if message_room <= line_room {
                Overflow::Message
            } else {
                Overflow::Line
            });
        }
    }

    /// Ends the current line with CRLF. The CRLF counts toward the message limit only.
    pub(crate) fn line_end(&mut self, body: &mut Vec<u8>) {
        if self.overflow.is_some() {
            return;
        }
        let message_room = self.max_message_bytes.saturating_sub(self.stored_bytes);
        let fit = CRLF.len().min(message_room);
        body.extend_from_slice(CRLF.get(..fit).unwrap_or_default());
        self.stored_bytes += fit;
        self.line_content_bytes = 0;
        if fit < CRLF.len() {
            self.overflow = Some(Overflow::Message);
        }
    }

    /// Ends the current line with CRLF even if that goes past the message limit (by at
    /// most two bytes), unless a limit was already hit. Used when the receiver, not the
    /// client, closes the last line, so a complete body always ends in a whole CRLF.
    pub(crate) fn closing_line_end(&mut self, body: &mut Vec<u8>) {
        if self.overflow.is_some() {
            return;
        }
        body.extend_from_slice(CRLF);
        self.stored_bytes = self.stored_bytes.saturating_add(CRLF.len());
        self.line_content_bytes = 0;
    }
}

/// Splits `bytes` before its first CR or LF: the run of plain line content, and the rest
/// (empty, or starting with CR or LF).
pub(crate) fn split_at_line_break(bytes: &[u8]) -> (&[u8], &[u8]) {
    match find_line_break(bytes) {
        Some(index) => bytes.split_at_checked(index).unwrap_or((bytes, &[])),
        None => (bytes, &[]),
    }
}

/// Bytes tested per step by [`find_line_break`]: one SSE2/NEON register.
const SCAN_BLOCK_BYTES: usize = 16;

fn is_line_break(byte: u8) -> bool {
    byte == b'\r' || byte == b'\n'
}

/// The index of the first CR or LF. Whole blocks are tested without an early exit, which
/// the compiler turns into a few vector instructions; only the block that holds the
/// break (and the tail) is searched byte by byte.
fn find_line_break(bytes: &[u8]) -> Option<usize> {
    let mut blocks = bytes.chunks_exact(SCAN_BLOCK_BYTES);
    let mut offset = 0;
    for block in blocks.by_ref() {
        if block
            .iter()
            .fold(false, |found, &byte| found | is_line_break(byte))
        {
            break;
        }
        offset += SCAN_BLOCK_BYTES;
    }
    let rest = bytes.get(offset..)?;
    rest.iter()
        .position(|&byte| is_line_break(byte))
        .map(|index| offset + index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_at_line_break_cases() {
        let cases: &[(&[u8], &[u8], &[u8])] = &[
            (b"", b"", b""),
            (b"abc", b"abc", b""),
            (b"ab\rc", b"ab", b"\rc"),
            (b"ab\nc", b"ab", b"\nc"),
            (b"\r\n", b"", b"\r\n"),
        ];
        for (input, run, rest) in cases {
            assert_eq!(split_at_line_break(input), (*run, *rest));
        }
    }

    #[test]
    fn find_line_break_agrees_with_a_plain_search_around_block_edges() {
        for length in 0..3 * SCAN_BLOCK_BYTES + 3 {
            for break_at in 0..=length {
                for line_break in [b'\r', b'\n'] {
                    let mut bytes = vec![b'x'; length];
                    if let Some(byte) = bytes.get_mut(break_at) {
                        *byte = line_break;
                    }
                    let expected = bytes.iter().position(|&byte| is_line_break(byte));
                    assert_eq!(find_line_break(&bytes), expected, "{length} {break_at}");
                }
            }
        }
    }

    #[test]
    fn message_limit_cuts_at_the_same_byte_however_split() {
        let mut whole = Vec::new();
        let mut appender = LimitedAppender::new(5, 100);
        appender.content(b"abcdefg", &mut whole);
        assert_eq!(appender.overflow(), Some(Overflow::Message));

        let mut pieces = Vec::new();
        let mut appender = LimitedAppender::new(5, 100);
        for piece in [&b"ab"[..], b"cd", b"efg"] {
            appender.content(piece, &mut pieces);
        }
        assert_eq!(appender.overflow(), Some(Overflow::Message));
        assert_eq!(whole, b"abcde");
        assert_eq!(pieces, whole);
    }

    #[test]
    fn line_limit_resets_at_line_end() {
        let mut body = Vec::new();
        let mut appender = LimitedAppender::new(100, 3);
        appender.content(b"abc", &mut body);
        appender.line_end(&mut body);
        appender.content(b"def", &mut body);
        assert_eq!(appender.overflow(), None);
        appender.content(b"g", &mut body);
        assert_eq!(appender.overflow(), Some(Overflow::Line));
        assert_eq!(body, b"abc\r\ndef");
    }

    #[test]
    fn tie_goes_to_message_limit() {
        let mut body = Vec::new();
        let mut appender = LimitedAppender::new(3, 3);
        appender.content(b"abcd", &mut body);
        assert_eq!(appender.overflow(), Some(Overflow::Message));
    }

    #[test]
    fn nothing_is_appended_after_overflow() {
        let mut body = Vec::new();
        let mut appender = LimitedAppender::new(3, 100);
        appender.content(b"abcd", &mut body);
        appender.line_end(&mut body);
        appender.closing_line_end(&mut body);
        appender.content(b"x", &mut body);
        assert_eq!(body, b"abc");
    }
}
