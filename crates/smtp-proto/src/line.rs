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
pub fn next_line(buffer: &[u8], max_line_bytes: usize) -> Result<Option<Line>, LineError> {
    let _ = (buffer, max_line_bytes);
    todo!()
}

/// After a too-long line: the number of bytes to drop up to and including the next LF,
/// or `None` when the buffer holds no LF (drop all of it and keep skipping).
pub fn skip_past_line_end(buffer: &[u8]) -> Option<usize> {
    let _ = buffer;
    todo!()
}
