//! The DATA receiver (RFC 5321 §4.1.1.4, §4.5.2) with SMTP smuggling defences.

/// Receives DATA content incrementally.
#[derive(Debug)]
pub struct DataReceiver {
    _private: (),
}

/// What one `feed` call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataStatus {
    /// All of the input was consumed; the terminator has not been seen yet.
    NeedMore,
    /// The terminator `<CRLF>.<CRLF>` ended at `consumed`; the bytes after it are the
    /// next (pipelined) commands and were not consumed.
    Done {
        consumed: usize,
        outcome: DataOutcome,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataOutcome {
    /// `body` holds the whole message.
    Complete,
    /// The message exceeded `max_message_bytes`; content after the limit was discarded.
    TooLarge,
    /// A line exceeded `max_line_bytes`; content after it was discarded.
    LineTooLong,
}

impl DataReceiver {
    /// `max_message_bytes`: content bytes after unstuffing and normalisation;
    /// `max_line_bytes`: one text line including its CRLF.
    pub fn new(max_message_bytes: usize, max_line_bytes: usize) -> Self {
        let _ = (max_message_bytes, max_line_bytes);
        todo!()
    }

    /// Feeds received bytes. Appends content to `body`: dot-unstuffed, every bare LF
    /// and bare CR turned into CRLF. Ends only at a `.` line that follows a CRLF that the
    /// client really sent and is itself terminated by a real CRLF.
    pub fn feed(&mut self, input: &[u8], body: &mut Vec<u8>) -> DataStatus {
        let _ = (input, body);
        todo!()
    }
}
