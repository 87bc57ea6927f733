//! The BDAT receiver (RFC 3030 CHUNKING).
//!
//! BDAT content is counted, not terminated, so there is no end-of-data sequence to
//! smuggle and no dot-stuffing. The content is still normalised like DATA content (see
//! [`crate::data`]): every bare LF and bare CR becomes CRLF, because the message is
//! relayed later, possibly with DATA, to servers that may read line endings loosely. A
//! CRLF may be split between two chunks (RFC 3030 §2 lets chunk boundaries fall
//! anywhere), so a CR at the end of a chunk waits for the first byte of the next one.

use crate::content::{LimitedAppender, split_at_line_break};

/// Receives the chunks of one message. Content is counted in wire bytes (RFC 3030 §2)
/// and normalised like DATA content (bare LF / bare CR become CRLF), with state carried
/// across chunk boundaries.
#[derive(Debug)]
pub struct BdatReceiver {
    appender: LimitedAppender,
    /// Wire bytes of the current chunk not read yet.
    chunk_remaining_bytes: u64,
    /// The last content byte was a CR whose follower has not been seen yet.
    pending_cr: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BdatStatus {
    /// All input consumed and the chunk still needs more bytes.
    NeedMore,
    /// The chunk is complete after `consumed` bytes of the input.
    ChunkDone { consumed: usize },
}

impl BdatReceiver {
    /// `max_message_bytes` counts content bytes after normalisation. BDAT has no
    /// line-length limit: RFC 3030 content is not made of text lines.
    pub fn new(max_message_bytes: usize) -> Self {
        Self {
            appender: LimitedAppender::new(max_message_bytes, usize::MAX),
            chunk_remaining_bytes: 0,
            pending_cr: false,
        }
    }

    /// Starts a chunk of `chunk_size_bytes` wire bytes. The chunk is always read in full
    /// (even past the size limit, so the session stays in sync with the client).
    ///
    /// Nothing is allocated from `chunk_size_bytes`: it is a number the peer sent.
    pub fn start_chunk(&mut self, chunk_size_bytes: u64) {
        self.chunk_remaining_bytes = chunk_size_bytes;
    }

    /// Reads at most the rest of the current chunk from `input`. With no chunk started
    /// (or a chunk of size 0) the chunk is done at once, having consumed nothing.
    pub fn feed(&mut self, input: &[u8], body: &mut Vec<u8>) -> BdatStatus {
        let take = usize::try_from(self.chunk_remaining_bytes)
            .map_or(input.len(), |remaining| remaining.min(input.len()));
        let (chunk_part, _) = input.split_at_checked(take).unwrap_or((input, &[]));
        self.normalise(chunk_part, body);
        // `take <= chunk_remaining_bytes`, and usize is at most 64 bits wide.
        self.chunk_remaining_bytes = self
            .chunk_remaining_bytes
            .saturating_sub(u64::try_from(chunk_part.len()).unwrap_or(u64::MAX));
        if self.chunk_remaining_bytes == 0 {
            BdatStatus::ChunkDone {
                consumed: chunk_part.len(),
            }
        } else {
            BdatStatus::NeedMore
        }
    }

    /// True once the message grew past `max_message_bytes`; content after that point
    /// was discarded.
    pub fn exceeded(&self) -> bool {
        self.appender.overflow().is_some()
    }

    /// After the LAST chunk: flushes a pending CR and makes sure `body` ends with CRLF.
    ///
    /// The CRLF added here is ours, not the client's, and is appended whole even when it
    /// takes the message up to two bytes past `max_message_bytes`: a body that passed the
    /// limit check never ends in half a line ending. An empty message stays empty. After
    /// an overflow nothing is appended (the caller discards the body).
    pub fn finish(&mut self, body: &mut Vec<u8>) {
        if self.pending_cr || self.appender.line_open() {
            self.appender.closing_line_end(body);
        }
        self.pending_cr = false;
    }

    /// Appends `bytes` with every bare CR and bare LF turned into CRLF.
    fn normalise(&mut self, mut bytes: &[u8], body: &mut Vec<u8>) {
        loop {
            if self.pending_cr {
                let Some((&first, after_first)) = bytes.split_first() else {
                    return;
                };
                // CRLF or a bare CR: either way the line ends here.
                self.appender.line_end(body);
                self.pending_cr = false;
                if first == b'\n' {
                    bytes = after_first;
                }
            }
            let (run, line_break) = split_at_line_break(bytes);
            self.appender.content(run, body);
            match line_break.split_first() {
                Some((b'\r', after_cr)) => {
                    self.pending_cr = true;
                    bytes = after_cr;
                }
                Some((_line_feed, after_line_feed)) => {
                    // A bare LF.
                    self.appender.line_end(body);
                    bytes = after_line_feed;
                }
                None => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Large enough that no table case hits the limit by accident.
    const ROOMY_BYTES: usize = 1 << 20;

    /// Receives `chunks` as one message: each chunk is fed with a pipelined command
    /// after it, which must stay unconsumed. Returns the body and `exceeded()`.
    fn receive(chunks: &[&[u8]], max_message_bytes: usize) -> (Vec<u8>, bool) {
        let mut receiver = BdatReceiver::new(max_message_bytes);
        let mut body = Vec::new();
        for chunk in chunks {
            receiver.start_chunk(u64::try_from(chunk.len()).unwrap_or(u64::MAX));
            let mut input = chunk.to_vec();
            input.extend_from_slice(b"BDAT 5 LAST\r\n");
            assert_eq!(
                receiver.feed(&input, &mut body),
                BdatStatus::ChunkDone {
                    consumed: chunk.len()
                },
                "{chunk:?}"
            );
        }
        receiver.finish(&mut body);
        (body, receiver.exceeded())
    }

    #[test]
    fn normalisation_across_chunks() {
        /// Name, chunks, stored body.
        type Case = (&'static str, &'static [&'static [u8]], &'static [u8]);
        let cases: &[Case] = &[
            ("empty message", &[], b""),
            ("one empty chunk", &[b""], b""),
            ("crlf kept", &[b"a\r\nb\r\n"], b"a\r\nb\r\n"),
            ("missing final crlf added", &[b"a\r\nb"], b"a\r\nb\r\n"),
            ("bare lf", &[b"a\nb\n"], b"a\r\nb\r\n"),
            ("bare cr", &[b"a\rb\r"], b"a\r\nb\r\n"),
            (
                "crlf split between chunks",
                &[b"a\r", b"\nb\r\n"],
                b"a\r\nb\r\n",
            ),
            ("bare cr at a chunk end", &[b"a\r", b"b\r\n"], b"a\r\nb\r\n"),
            ("cr at the end of the last chunk", &[b"a\r"], b"a\r\n"),
            ("cr cr lf", &[b"a\r\r\n"], b"a\r\n\r\n"),
            (
                "lone cr chunk then lf chunk",
                &[b"a", b"\r", b"\n"],
                b"a\r\n",
            ),
            ("no dot-stuffing", &[b"..\r\n.\r\n"], b"..\r\n.\r\n"),
            (
                "smuggling sequences normalised",
                &[b"a\n.\nb\r.\rc\r\n"],
                b"a\r\n.\r\nb\r\n.\r\nc\r\n",
            ),
        ];
        for (name, chunks, expected) in cases {
            let (body, exceeded) = receive(chunks, ROOMY_BYTES);
            assert_eq!(
                String::from_utf8_lossy(&body),
                String::from_utf8_lossy(expected),
                "{name}"
            );
            assert!(!exceeded, "{name}");
        }
    }

    #[test]
    fn limit() {
        /// Name, chunks, `max_message_bytes`, stored body, `exceeded()`.
        type Case = (
            &'static str,
            &'static [&'static [u8]],
            usize,
            &'static [u8],
            bool,
        );
        let cases: &[Case] = &[
            (
                "exactly at the limit",
                &[b"abcd\r\n"],
                6,
                b"abcd\r\n",
                false,
            ),
            ("one byte over", &[b"abcde\r\n"], 6, b"abcde\r", true),
            (
                "over in a later chunk",
                &[b"abc", b"defgh"],
                5,
                b"abcde",
                true,
            ),
            (
                "normalised ending counts as crlf",
                &[b"abcd\n"],
                5,
                b"abcd\r",
                true,
            ),
            // The CRLF that finish adds is ours: appended whole, never half.
            (
                "closing crlf may pass the limit",
                &[b"abcd"],
                4,
                b"abcd\r\n",
                false,
            ),
            ("zero limit, empty message", &[b""], 0, b"", false),
            ("zero limit", &[b"a"], 0, b"", true),
        ];
        for (name, chunks, max_message_bytes, expected, exceeded) in cases {
            let (body, actual_exceeded) = receive(chunks, *max_message_bytes);
            assert_eq!(
                String::from_utf8_lossy(&body),
                String::from_utf8_lossy(expected),
                "{name}"
            );
            assert_eq!(actual_exceeded, *exceeded, "{name}");
        }
    }

    #[test]
    fn chunk_is_read_in_pieces() {
        let mut receiver = BdatReceiver::new(ROOMY_BYTES);
        let mut body = Vec::new();
        receiver.start_chunk(10);
        assert_eq!(receiver.feed(b"", &mut body), BdatStatus::NeedMore);
        assert_eq!(receiver.feed(b"abcd", &mut body), BdatStatus::NeedMore);
        assert_eq!(
            receiver.feed(b"efghijQUIT", &mut body),
            BdatStatus::ChunkDone { consumed: 6 }
        );
        assert_eq!(body, b"abcdefghij");
    }

    #[test]
    fn zero_size_and_unstarted_chunks_are_done_at_once() {
        let mut receiver = BdatReceiver::new(ROOMY_BYTES);
        let mut body = Vec::new();
        assert_eq!(
            receiver.feed(b"QUIT\r\n", &mut body),
            BdatStatus::ChunkDone { consumed: 0 }
        );
        receiver.start_chunk(0);
        assert_eq!(
            receiver.feed(b"QUIT\r\n", &mut body),
            BdatStatus::ChunkDone { consumed: 0 }
        );
        assert!(body.is_empty());
    }

    #[test]
    fn huge_chunk_size_allocates_nothing_and_keeps_reading() {
        let mut receiver = BdatReceiver::new(4);
        let mut body = Vec::new();
        receiver.start_chunk(u64::MAX);
        assert_eq!(receiver.feed(&[b'x'; 100], &mut body), BdatStatus::NeedMore);
        assert_eq!(body, b"xxxx");
        assert!(receiver.exceeded());
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn content_bytes() -> impl Strategy<Value = Vec<u8>> {
            // Mostly single bytes; sometimes a run long enough to cross the
            // receiver's scan blocks.
            proptest::collection::vec(
                prop_oneof![
                    3 => Just(vec![b'\r']),
                    3 => Just(vec![b'\n']),
                    2 => Just(vec![b'.']),
                    2 => Just(vec![b'a']),
                    1 => any::<u8>().prop_map(|byte| vec![byte]),
                    1 => (1usize..48).prop_map(|length| vec![b'x'; length]),
                ],
                0..120,
            )
            .prop_map(|pieces| pieces.concat())
        }

        /// Cut points in `0..=length`, sorted, with both ends included.
        fn cuts(points: &[usize], length: usize) -> Vec<usize> {
            let mut cuts: Vec<usize> = points.iter().map(|point| point % (length + 1)).collect();
            cuts.extend([0, length]);
            cuts.sort_unstable();
            cuts
        }

        /// Sends `content` as BDAT chunks cut at `chunk_points`, and feeds each chunk in
        /// pieces cut at `feed_points` (relative to the chunk).
        fn receive_chunked(
            content: &[u8],
            chunk_points: &[usize],
            feed_points: &[usize],
            max_message_bytes: usize,
        ) -> (Vec<u8>, bool) {
            let mut receiver = BdatReceiver::new(max_message_bytes);
            let mut body = Vec::new();
            for chunk_window in cuts(chunk_points, content.len()).windows(2) {
                let [chunk_start, chunk_end] = *chunk_window else {
                    continue;
                };
                let chunk = content.get(chunk_start..chunk_end).unwrap_or_default();
                receiver.start_chunk(u64::try_from(chunk.len()).unwrap_or(u64::MAX));
                let feed_cuts = cuts(feed_points, chunk.len());
                let mut done = false;
                for feed_window in feed_cuts.windows(2) {
                    let [start, end] = *feed_window else { continue };
                    // The last piece runs on past the chunk, into the next one: the
                    // receiver must stop at the chunk's end by itself.
                    let input = if end == chunk.len() {
                        content.get(chunk_start + start..)
                    } else {
                        content.get(chunk_start + start..chunk_start + end)
                    };
                    match receiver.feed(input.unwrap_or_default(), &mut body) {
                        BdatStatus::NeedMore => assert!(end < chunk.len() || start == end),
                        BdatStatus::ChunkDone { consumed } => {
                            assert_eq!(start + consumed, chunk.len());
                            done = true;
                            break;
                        }
                    }
                }
                assert!(done, "the chunk never completed");
            }
            receiver.finish(&mut body);
            (body, receiver.exceeded())
        }

        /// An independent model: split into lines by their endings, join with CRLF.
        fn model(content: &[u8]) -> Vec<u8> {
            let mut body = Vec::new();
            let mut position = 0;
            while position < content.len() {
                let rest = &content[position..];
                let line_end = rest
                    .iter()
                    .position(|&b| b == b'\r' || b == b'\n')
                    .unwrap_or(rest.len());
                body.extend_from_slice(&rest[..line_end]);
                body.extend_from_slice(b"\r\n");
                position += line_end
                    + match (rest.get(line_end), rest.get(line_end + 1)) {
                        (Some(b'\r'), Some(b'\n')) => 2,
                        (Some(_), _) => 1,
                        (None, _) => 0,
                    };
            }
            body
        }

        proptest! {
            #[test]
            fn chunking_and_splits_do_not_change_the_body(
                content in content_bytes(),
                chunk_points in proptest::collection::vec(any::<usize>(), 0..6),
                feed_points in proptest::collection::vec(any::<usize>(), 0..6),
                max_message_bytes in prop_oneof![Just(ROOMY_BYTES), 0usize..150],
            ) {
                let whole = receive_chunked(&content, &[], &[], max_message_bytes);
                let chunked = receive_chunked(&content, &chunk_points, &feed_points, max_message_bytes);
                prop_assert_eq!(&whole, &chunked);
                let (body, exceeded) = whole;
                let expected = model(&content);
                if exceeded {
                    prop_assert!(expected.starts_with(&body));
                    prop_assert!(body.len() <= max_message_bytes);
                } else {
                    prop_assert_eq!(body, expected);
                }
            }
        }
    }
}
