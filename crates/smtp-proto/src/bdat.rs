//! The BDAT receiver (RFC 3030 CHUNKING).

/// Receives the chunks of one message. Content is counted in wire bytes (RFC 3030 §2)
/// and normalised like DATA content (bare LF / bare CR become CRLF), with state carried
/// across chunk boundaries.
#[derive(Debug)]
pub struct BdatReceiver {
    _private: (),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BdatStatus {
    /// All input consumed and the chunk still needs more bytes.
    NeedMore,
    /// The chunk is complete after `consumed` bytes of the input.
    ChunkDone { consumed: usize },
}

impl BdatReceiver {
    pub fn new(max_message_bytes: usize) -> Self {
        let _ = max_message_bytes;
        todo!()
    }

    /// Starts a chunk of `chunk_size_bytes` wire bytes. The chunk is always read in full
    /// (even past the size limit, so the session stays in sync with the client).
    pub fn start_chunk(&mut self, chunk_size_bytes: u64) {
        let _ = chunk_size_bytes;
        todo!()
    }

    pub fn feed(&mut self, input: &[u8], body: &mut Vec<u8>) -> BdatStatus {
        let _ = (input, body);
        todo!()
    }

    /// True once the message grew past `max_message_bytes`; content after that point
    /// was discarded.
    pub fn exceeded(&self) -> bool {
        todo!()
    }

    /// After the LAST chunk: flushes a pending CR and makes sure `body` ends with CRLF.
    pub fn finish(&mut self, body: &mut Vec<u8>) {
        let _ = body;
        todo!()
    }
}
