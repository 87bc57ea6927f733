//! The DATA receiver (RFC 5321 §4.1.1.4, §4.5.2) with SMTP smuggling defences.
//!
//! # What ends DATA
//!
//! Only `<CRLF>.<CRLF>` where both CRLFs are real CR LF pairs sent by the client (the
//! first one may also be the start of the DATA content, which RFC 5321 §4.1.1.4 treats
//! as following the CRLF of the DATA command). SMTP smuggling (CVE-2023-51764/5/6) abuses
//! servers that disagree on this: a sender hides `<LF>.<LF>` or `<CR>.<CR>` in one
//! message, a lenient server downstream reads it as the end, and the bytes after it as a
//! second, spoofed message. None of `<LF>.<LF>`, `<CR>.<CR>`, `<CR>.<LF>`,
//! `<LF>.<CR><LF>`, `<CR><LF>.<LF>` or `<CR><LF>.<CR>` ends DATA here.
//!
//! # What is stored
//!
//! Every bare LF and every bare CR in the content is turned into CRLF before it is
//! appended to the body. We chose to normalise bare CR (instead of rejecting the message
//! or keeping the CR) because:
//!
//! * the stored message then has exactly one kind of line ending, so no downstream
//!   server, however it reads line endings, can find an end of data inside it once we
//!   dot-stuff it again for relaying (every line that starts with `.` is stuffed, and
//!   there is no bare CR or LF left to hide a line start);
//! * rejecting would refuse mail from the old printers and scanners this relay exists
//!   for, several of which send bare LF (and a few bare CR) line endings;
//! * keeping a bare CR would pass an ambiguous byte to servers we do not control.
//!
//! A `.` line that does not end DATA (for instance `<CRLF>.<LF>`) is stored as `.` CRLF:
//! the dot is kept, and the relaying side stuffs it to `..`, so it can never be read as
//! an end of data. A line that starts with `.` followed by anything else loses that first
//! dot (dot-unstuffing, RFC 5321 §4.5.2), at every line start, whether its preceding line
//! ending was real or normalised.
//!
//! # Limits
//!
//! Once the message exceeds `max_message_bytes`, or a line exceeds `max_line_bytes`,
//! nothing more is appended; the receiver keeps reading up to the terminator so the
//! session stays in step with the client, and reports the outcome there. The body then
//! holds a prefix of the content that may end in the middle of a line (even between the
//! CR and LF of a CRLF): the caller must discard it.

use crate::content::{LimitedAppender, Overflow, split_at_line_break};

/// Receives DATA content incrementally.
#[derive(Debug)]
pub struct DataReceiver {
    /// Where in the line structure the next input byte falls.
    state: State,
    appender: LimitedAppender,
    /// Set once the terminator was read; further `feed` calls consume nothing.
    finished: Option<DataOutcome>,
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

/// The receiver's position in the line structure. The states that wait for one more
/// byte (`Cr`, `Dot`, `DotCr`) are what let a CRLF or a terminator be split across
/// `feed` calls: nothing is buffered, the state alone remembers what was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the first byte of a line. `after_real_crlf`: the previous line ended with a
    /// CRLF the client sent, or this is the first line of the content. Only such a line
    /// can be the terminator.
    LineStart { after_real_crlf: bool },
    /// Inside a line, after at least one content byte (or after a removed dot).
    Text,
    /// A CR was read (inside a line or as its first byte); the next byte tells whether it
    /// was half of a CRLF or a bare CR.
    Cr,
    /// The line so far is a single `.`.
    Dot { after_real_crlf: bool },
    /// The line so far is `.` CR.
    DotCr { after_real_crlf: bool },
}

impl DataReceiver {
    /// `max_message_bytes`: content bytes after unstuffing and normalisation;
    /// `max_line_bytes`: one text line including its CRLF.
    ///
    /// A line is measured as stored: unstuffed and with a CRLF ending, which is how
    /// RFC 5321 §4.5.3.1.6 counts it ("not counting the leading dot duplicated for
    /// transparency"). A `max_line_bytes` below 2 leaves no room for content.
    pub fn new(max_message_bytes: usize, max_line_bytes: usize) -> Self {
        Self {
            state: State::LineStart {
                after_real_crlf: true,
            },
            appender: LimitedAppender::new(
                max_message_bytes,
                max_line_bytes.saturating_sub(crate::content::CRLF.len()),
            ),
            finished: None,
        }
    }

    /// Feeds received bytes. Appends content to `body`: dot-unstuffed, every bare LF
    /// and bare CR turned into CRLF. Ends only at a `.` line that follows a CRLF that the
    /// client really sent and is itself terminated by a real CRLF.
    ///
    /// After `Done`, further calls consume nothing and report `Done` again.
    pub fn feed(&mut self, input: &[u8], body: &mut Vec<u8>) -> DataStatus {
        if let Some(outcome) = self.finished {
            return DataStatus::Done {
                consumed: 0,
                outcome,
            };
        }
        let mut rest = input;
        while let Some((&byte, after_byte)) = rest.split_first() {
            // Each arm either consumes `byte` (`rest = after_byte`) or leaves it for the
            // next state to look at; every such state change moves towards a consuming
            // arm, so the loop always makes progress.
            match self.state {
                State::LineStart { after_real_crlf } => match byte {
                    b'.' => {
                        self.state = State::Dot { after_real_crlf };
                        rest = after_byte;
                    }
                    _ => self.state = State::Text,
                },
                State::Text => {
                    let (run, line_break) = split_at_line_break(rest);
                    self.appender.content(run, body);
                    match line_break.split_first() {
                        Some((b'\r', after_cr)) => {
                            self.state = State::Cr;
                            rest = after_cr;
                        }
                        Some((_line_feed, after_line_feed)) => {
                            // A bare LF.
                            self.appender.line_end(body);
                            self.state = State::LineStart {
                                after_real_crlf: false,
                            };
                            rest = after_line_feed;
                        }
                        None => rest = line_break,
                    }
                }
                State::Cr => {
                    self.appender.line_end(body);
                    if byte == b'\n' {
                        self.state = State::LineStart {
                            after_real_crlf: true,
                        };
                        rest = after_byte;
                    } else {
                        // A bare CR: it ended the line, and `byte` starts the next one.
                        self.state = State::LineStart {
                            after_real_crlf: false,
                        };
                    }
                }
                State::Dot { after_real_crlf } => match byte {
                    b'\r' => {
                        self.state = State::DotCr { after_real_crlf };
                        rest = after_byte;
                    }
                    b'\n' => {
                        // `.` LF: never an end; keep the dot (see the module docs).
                        self.lone_dot_line(body);
                        self.state = State::LineStart {
                            after_real_crlf: false,
                        };
                        rest = after_byte;
                    }
                    // Dot-unstuffing: the first dot is dropped and `byte` is content.
                    _ => self.state = State::Text,
                },
                State::DotCr { after_real_crlf } => {
                    if byte == b'\n' && after_real_crlf {
                        let consumed = input.len() - after_byte.len();
                        let outcome = match self.appender.overflow() {
                            None => DataOutcome::Complete,
                            Some(Overflow::Message) => DataOutcome::TooLarge,
                            Some(Overflow::Line) => DataOutcome::LineTooLong,
                        };
                        self.finished = Some(outcome);
                        return DataStatus::Done { consumed, outcome };
                    }
                    self.lone_dot_line(body);
                    if byte == b'\n' {
                        // `<LF>.<CR><LF>` or `<CR>.<CR><LF>`: the dot line itself ended
                        // with a real CRLF, the line before it did not.
                        self.state = State::LineStart {
                            after_real_crlf: true,
                        };
                        rest = after_byte;
                    } else {
                        // `.` then a bare CR: `byte` starts the next line.
                        self.state = State::LineStart {
                            after_real_crlf: false,
                        };
                    }
                }
            }
        }
        DataStatus::NeedMore
    }

    /// Stores a `.` line that did not end DATA as `.` CRLF.
    fn lone_dot_line(&mut self, body: &mut Vec<u8>) {
        self.appender.content(b".", body);
        self.appender.line_end(body);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Large enough that no table case hits a limit by accident.
    const ROOMY_BYTES: usize = 1 << 20;

    /// Feeds `input` in one call and again one byte at a time; both must agree.
    fn receive(
        input: &[u8],
        max_message_bytes: usize,
        max_line_bytes: usize,
    ) -> (DataStatus, Vec<u8>) {
        let mut whole_body = Vec::new();
        let whole =
            DataReceiver::new(max_message_bytes, max_line_bytes).feed(input, &mut whole_body);

        let mut receiver = DataReceiver::new(max_message_bytes, max_line_bytes);
        let mut bytewise_body = Vec::new();
        let mut bytewise = DataStatus::NeedMore;
        for (offset, byte) in input.iter().enumerate() {
            if let DataStatus::Done { consumed, outcome } =
                receiver.feed(std::slice::from_ref(byte), &mut bytewise_body)
            {
                bytewise = DataStatus::Done {
                    consumed: offset + consumed,
                    outcome,
                };
                break;
            }
        }
        assert_eq!(
            whole, bytewise,
            "status differs when fed byte by byte: {input:?}"
        );
        assert_eq!(
            whole_body, bytewise_body,
            "body differs when fed byte by byte: {input:?}"
        );
        (whole, whole_body)
    }

    fn done(consumed: usize) -> DataStatus {
        DataStatus::Done {
            consumed,
            outcome: DataOutcome::Complete,
        }
    }

    type Case = (&'static str, &'static [u8], DataStatus, &'static [u8]);

    fn check(cases: &[Case]) {
        for (name, input, status, body) in cases {
            let (actual_status, actual_body) = receive(input, ROOMY_BYTES, ROOMY_BYTES);
            assert_eq!(actual_status, *status, "{name}: status");
            assert_eq!(
                String::from_utf8_lossy(&actual_body),
                String::from_utf8_lossy(body),
                "{name}: body"
            );
        }
    }

    #[test]
    fn termination() {
        check(&[
            ("empty message", b".\r\n", done(3), b""),
            ("one line", b"hello\r\n.\r\n", done(10), b"hello\r\n"),
            (
                "headers and body",
                b"Subject: x\r\n\r\nbody\r\n.\r\n",
                done(23),
                b"Subject: x\r\n\r\nbody\r\n",
            ),
            (
                "pipelined command stays unconsumed",
                b"a\r\n.\r\nQUIT\r\n",
                done(6),
                b"a\r\n",
            ),
            ("nothing yet", b"", DataStatus::NeedMore, b""),
            ("incomplete line", b"hello", DataStatus::NeedMore, b"hello"),
            (
                "terminator cut before its lf",
                b"a\r\n.\r",
                DataStatus::NeedMore,
                b"a\r\n",
            ),
            (
                "terminator cut after the dot",
                b"a\r\n.",
                DataStatus::NeedMore,
                b"a\r\n",
            ),
            (
                "empty line before the end",
                b"a\r\n\r\n.\r\n",
                done(8),
                b"a\r\n\r\n",
            ),
            (
                "cr cr lf: the crlf before the dot is real",
                b"a\r\r\n.\r\n",
                done(7),
                b"a\r\n\r\n",
            ),
            (
                "dot with trailing space is content",
                b". \r\n.\r\n",
                done(7),
                b" \r\n",
            ),
        ]);
    }

    /// Every way of writing an end of data that is not `<CRLF>.<CRLF>` (SMTP smuggling).
    /// Each sequence sits between `a` and `b`; DATA must not end at it, and the stored
    /// line must be `.` CRLF, dot kept, so the relaying side stuffs it again. The real
    /// terminator after `b` then ends DATA at the very end of the input.
    #[test]
    fn smuggling_sequences_do_not_end_data() {
        let cases: &[(&str, &[u8])] = &[
            ("lf dot lf", b"\n.\n"),
            ("cr dot cr", b"\r.\r"),
            ("cr dot lf", b"\r.\n"),
            ("lf dot crlf", b"\n.\r\n"),
            ("crlf dot lf", b"\r\n.\n"),
            ("crlf dot cr", b"\r\n.\r"),
            ("cr dot crlf", b"\r.\r\n"),
            ("lf dot cr", b"\n.\r"),
        ];
        for (name, sequence) in cases {
            let mut input = b"a".to_vec();
            input.extend_from_slice(sequence);
            input.extend_from_slice(b"b\r\n");
            let (status, body) = receive(&input, ROOMY_BYTES, ROOMY_BYTES);
            assert_eq!(status, DataStatus::NeedMore, "{name}: must not end DATA");
            assert_eq!(body, b"a\r\n.\r\nb\r\n", "{name}: stored bytes");

            input.extend_from_slice(b".\r\nQUIT\r\n");
            let (status, body) = receive(&input, ROOMY_BYTES, ROOMY_BYTES);
            assert_eq!(
                status,
                done(input.len() - 6),
                "{name}: the real terminator ends DATA"
            );
            assert_eq!(
                body, b"a\r\n.\r\nb\r\n",
                "{name}: stored bytes before the real end"
            );
        }
    }

    #[test]
    fn smuggling_at_the_start_of_content() {
        check(&[
            (
                "dot lf at start",
                b".\nb\r\n",
                DataStatus::NeedMore,
                b".\r\nb\r\n",
            ),
            (
                "dot cr at start",
                b".\rb\r\n",
                DataStatus::NeedMore,
                b".\r\nb\r\n",
            ),
            (
                "lf then dot crlf",
                b"\n.\r\nb\r\n",
                DataStatus::NeedMore,
                b"\r\n.\r\nb\r\n",
            ),
            (
                "cr then dot crlf",
                b"\r.\r\nb\r\n",
                DataStatus::NeedMore,
                b"\r\n.\r\nb\r\n",
            ),
            ("dot cr then lf-less end", b".\r", DataStatus::NeedMore, b""),
        ]);
    }

    #[test]
    fn line_ending_normalisation() {
        check(&[
            ("bare lf", b"a\nb\n", DataStatus::NeedMore, b"a\r\nb\r\n"),
            (
                "bare cr, the last one still undecided",
                b"a\rb\r",
                DataStatus::NeedMore,
                b"a\r\nb",
            ),
            ("cr cr", b"a\r\rb", DataStatus::NeedMore, b"a\r\n\r\nb"),
            ("lf cr", b"a\n\rb", DataStatus::NeedMore, b"a\r\n\r\nb"),
            ("lf lf", b"a\n\nb", DataStatus::NeedMore, b"a\r\n\r\nb"),
            ("crlf kept", b"a\r\nb", DataStatus::NeedMore, b"a\r\nb"),
            ("lone cr line", b"\r", DataStatus::NeedMore, b""),
            (
                "bare lf lines then real end",
                b"a\nb\r\n.\r\n",
                done(8),
                b"a\r\nb\r\n",
            ),
        ]);
    }

    #[test]
    fn dot_transparency() {
        check(&[
            ("stuffed lone dot", b"..\r\n.\r\n", done(7), b".\r\n"),
            ("stuffed double dot", b"...\r\n.\r\n", done(8), b"..\r\n"),
            ("stuffed dot text", b"..x\r\n.\r\n", done(8), b".x\r\n"),
            ("dot text loses its dot", b".x\r\n.\r\n", done(7), b"x\r\n"),
            (
                "dot only at line start",
                b"a.b\r\n.\r\n",
                done(8),
                b"a.b\r\n",
            ),
            (
                "unstuffed after a bare lf",
                b"a\n..b\r\n.\r\n",
                done(10),
                b"a\r\n.b\r\n",
            ),
            (
                "unstuffed after a bare cr",
                b"a\r..b\r\n.\r\n",
                done(10),
                b"a\r\n.b\r\n",
            ),
            (
                "stuffed line split by bare cr",
                b"..\r.\r\n",
                DataStatus::NeedMore,
                b".\r\n.\r\n",
            ),
        ]);
    }

    /// Dot-stuffs `body` the way a relaying client does (RFC 5321 §4.5.2).
    fn stuff(body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for line in body.split_inclusive(|&byte| byte == b'\n') {
            if line.first() == Some(&b'.') {
                out.push(b'.');
            }
            out.extend_from_slice(line);
        }
        out
    }

    #[test]
    fn stuffed_and_unstuffed_round_trip() {
        let bodies: &[&[u8]] = &[
            b"",
            b".\r\n",
            b"..\r\n",
            b"a\r\n.\r\nb\r\n",
            b".a\r\n..\r\n\r\n",
        ];
        for body in bodies {
            let mut input = stuff(body);
            input.extend_from_slice(b".\r\n");
            let (status, received) = receive(&input, ROOMY_BYTES, ROOMY_BYTES);
            assert_eq!(status, done(input.len()));
            assert_eq!(received, *body);
        }
    }

    #[test]
    fn limits() {
        let too_large = |consumed| DataStatus::Done {
            consumed,
            outcome: DataOutcome::TooLarge,
        };
        let line_too_long = |consumed| DataStatus::Done {
            consumed,
            outcome: DataOutcome::LineTooLong,
        };
        /// Name, input, `max_message_bytes`, `max_line_bytes`, status, stored body.
        type LimitCase = (
            &'static str,
            &'static [u8],
            usize,
            usize,
            DataStatus,
            &'static [u8],
        );
        let cases: &[LimitCase] = &[
            (
                "message exactly at the limit",
                b"abcd\r\n.\r\n",
                6,
                100,
                done(9),
                b"abcd\r\n",
            ),
            (
                "message one byte over",
                b"abcd\r\n.\r\n",
                5,
                100,
                too_large(9),
                b"abcd\r",
            ),
            (
                "removed dot is not counted",
                b"..\r\n.\r\n",
                3,
                100,
                done(7),
                b".\r\n",
            ),
            (
                "normalised ending counts as crlf",
                b"abcd\nx\r\n.\r\n",
                5,
                100,
                too_large(11),
                b"abcd\r",
            ),
            (
                "reading goes on to the terminator",
                b"abcdef\r\nmore\r\n.\r\nQUIT\r\n",
                3,
                100,
                too_large(17),
                b"abc",
            ),
            ("zero limit", b"a\r\n.\r\n", 0, 100, too_large(6), b""),
            ("zero limit, empty message", b".\r\n", 0, 100, done(3), b""),
            (
                "line exactly at the limit",
                b"abcd\r\n.\r\n",
                100,
                6,
                done(9),
                b"abcd\r\n",
            ),
            (
                "line one byte over",
                b"abcde\r\n.\r\n",
                100,
                6,
                line_too_long(10),
                b"abcd",
            ),
            (
                "line limit after unstuffing",
                b"..bcd\r\n.\r\n",
                100,
                6,
                done(10),
                b".bcd\r\n",
            ),
            (
                "line limit on a bare lf line",
                b"abcd\nxy\r\n.\r\n",
                100,
                6,
                done(12),
                b"abcd\r\nxy\r\n",
            ),
            (
                "long line later in the message",
                b"ab\r\nabcdefgh\r\nok\r\n.\r\n",
                100,
                6,
                line_too_long(21),
                b"ab\r\nabcd",
            ),
            (
                "first limit hit wins",
                b"abcdefgh\r\n.\r\n",
                5,
                6,
                line_too_long(13),
                b"abcd",
            ),
            (
                "tie goes to the message limit",
                b"abcdefgh\r\n.\r\n",
                4,
                6,
                too_large(13),
                b"abcd",
            ),
            (
                "over limit without terminator",
                b"abcdef",
                3,
                100,
                DataStatus::NeedMore,
                b"abc",
            ),
        ];
        for (name, input, max_message_bytes, max_line_bytes, status, body) in cases {
            let (actual_status, actual_body) = receive(input, *max_message_bytes, *max_line_bytes);
            assert_eq!(actual_status, *status, "{name}: status");
            assert_eq!(
                String::from_utf8_lossy(&actual_body),
                String::from_utf8_lossy(body),
                "{name}: body"
            );
        }
    }

    #[test]
    fn after_done_nothing_is_consumed() {
        let mut receiver = DataReceiver::new(ROOMY_BYTES, ROOMY_BYTES);
        let mut body = Vec::new();
        assert_eq!(receiver.feed(b"a\r\n.\r\nMAIL", &mut body), done(6));
        assert_eq!(receiver.feed(b"MAIL FROM:<>\r\n", &mut body), done(0));
        assert_eq!(body, b"a\r\n");
    }

    #[test]
    fn body_is_appended_to_what_the_caller_put_there() {
        let mut receiver = DataReceiver::new(4, ROOMY_BYTES);
        let mut body = b"Received: by us\r\n".to_vec();
        assert_eq!(receiver.feed(b"ab\r\n.\r\n", &mut body), done(7));
        assert_eq!(body, b"Received: by us\r\nab\r\n");
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Bytes that matter to the receiver, with plain text in between.
        fn wire_bytes() -> impl Strategy<Value = Vec<u8>> {
            // Mostly single bytes; sometimes a run long enough to cross the
            // receiver's scan blocks.
            proptest::collection::vec(
                prop_oneof![
                    3 => Just(vec![b'\r']),
                    3 => Just(vec![b'\n']),
                    3 => Just(vec![b'.']),
                    2 => Just(vec![b'a']),
                    1 => any::<u8>().prop_map(|byte| vec![byte]),
                    1 => (1usize..48).prop_map(|length| vec![b'x'; length]),
                ],
                0..120,
            )
            .prop_map(|pieces| pieces.concat())
        }

        /// Feeds `input` in the pieces that `splits` cuts it into; the status carries
        /// the absolute offset of the end.
        fn receive_split(
            input: &[u8],
            splits: &[usize],
            max_message_bytes: usize,
            max_line_bytes: usize,
        ) -> (DataStatus, Vec<u8>) {
            let mut cuts: Vec<usize> = splits
                .iter()
                .map(|split| split % (input.len() + 1))
                .collect();
            cuts.push(0);
            cuts.push(input.len());
            cuts.sort_unstable();
            let mut receiver = DataReceiver::new(max_message_bytes, max_line_bytes);
            let mut body = Vec::new();
            for window in cuts.windows(2) {
                let [start, end] = *window else { continue };
                let piece = input.get(start..end).unwrap_or_default();
                if let DataStatus::Done { consumed, outcome } = receiver.feed(piece, &mut body) {
                    return (
                        DataStatus::Done {
                            consumed: start + consumed,
                            outcome,
                        },
                        body,
                    );
                }
            }
            (DataStatus::NeedMore, body)
        }

        /// An independent model of the receiver for inputs without limits: cut the wire
        /// into lines by their endings first, then apply the DATA rules line by line.
        fn model(input: &[u8]) -> (DataStatus, Vec<u8>) {
            #[derive(PartialEq)]
            enum Ending {
                CrLf,
                BareLf,
                BareCr,
                Unfinished,
            }
            let unstuff = |line: &[u8]| -> Vec<u8> {
                match line {
                    [b'.'] => b".".to_vec(),
                    [b'.', rest @ ..] => rest.to_vec(),
                    _ => line.to_vec(),
                }
            };
            let mut body = Vec::new();
            let mut position = 0;
            let mut after_real_crlf = true;
            while position < input.len() {
                let rest = &input[position..];
                let line_end = rest
                    .iter()
                    .position(|&b| b == b'\r' || b == b'\n')
                    .unwrap_or(rest.len());
                let content = &rest[..line_end];
                let (ending, ending_bytes) = match (rest.get(line_end), rest.get(line_end + 1)) {
                    (Some(b'\r'), Some(b'\n')) => (Ending::CrLf, 2),
                    (Some(b'\r'), Some(_)) => (Ending::BareCr, 1),
                    (Some(b'\n'), _) => (Ending::BareLf, 1),
                    _ => (Ending::Unfinished, 0),
                };
                if ending == Ending::Unfinished {
                    // What has been seen of a line is stored, except a lone dot, which
                    // waits for its ending.
                    if content != b"." {
                        body.extend_from_slice(&unstuff(content));
                    }
                    break;
                }
                position += line_end + ending_bytes;
                if after_real_crlf && content == b"." && ending == Ending::CrLf {
                    return (done(position), body);
                }
                body.extend_from_slice(&unstuff(content));
                body.extend_from_slice(b"\r\n");
                after_real_crlf = ending == Ending::CrLf;
            }
            (DataStatus::NeedMore, body)
        }

        fn has_bare_cr_or_lf(body: &[u8]) -> bool {
            body.iter().enumerate().any(|(index, &byte)| match byte {
                b'\r' => body.get(index + 1) != Some(&b'\n'),
                b'\n' => index == 0 || body.get(index - 1) != Some(&b'\r'),
                _ => false,
            })
        }

        proptest! {
            #[test]
            fn any_split_gives_the_same_result(
                input in wire_bytes(),
                splits in proptest::collection::vec(any::<usize>(), 0..8),
                max_message_bytes in prop_oneof![Just(ROOMY_BYTES), 0usize..120],
                max_line_bytes in prop_oneof![Just(ROOMY_BYTES), 0usize..40],
            ) {
                let whole = receive_split(&input, &[], max_message_bytes, max_line_bytes);
                let split = receive_split(&input, &splits, max_message_bytes, max_line_bytes);
                prop_assert_eq!(whole, split);
            }

            #[test]
            fn agrees_with_the_line_model(input in wire_bytes(), splits in proptest::collection::vec(any::<usize>(), 0..8)) {
                prop_assert_eq!(receive_split(&input, &splits, ROOMY_BYTES, ROOMY_BYTES), model(&input));
            }

            /// The stored body has no bare CR or LF, and once dot-stuffed again for
            /// relaying (every line starting with `.` gets one more), nothing in it reads
            /// as an end of data: `<CRLF>` + stuffed body + `.<CRLF>` holds `<CRLF>.<CRLF>`
            /// only at its very end. (`<CRLF>` stands for the DATA command's line end.)
            #[test]
            fn stored_body_cannot_end_data_downstream(input in wire_bytes()) {
                let (status, body) = receive_split(&input, &[], ROOMY_BYTES, ROOMY_BYTES);
                prop_assert!(!has_bare_cr_or_lf(&body), "bare CR or LF in {:?}", body);
                if matches!(status, DataStatus::Done { .. }) {
                    prop_assert!(body.is_empty() || body.ends_with(b"\r\n"));
                    let mut relayed = b"\r\n".to_vec();
                    relayed.extend_from_slice(&stuff(&body));
                    relayed.extend_from_slice(b".\r\n");
                    let first_end = relayed.windows(5).position(|window| window == b"\r\n.\r\n");
                    prop_assert_eq!(first_end, Some(relayed.len() - 5));
                }
            }

            /// Under limits the body is a prefix of what it would be without them.
            #[test]
            fn limited_body_is_a_prefix(input in wire_bytes(), max_message_bytes in 0usize..120, max_line_bytes in 0usize..40) {
                let (_, limited) = receive_split(&input, &[], max_message_bytes, max_line_bytes);
                let (_, unlimited) = receive_split(&input, &[], ROOMY_BYTES, ROOMY_BYTES);
                prop_assert!(unlimited.starts_with(&limited));
                prop_assert!(limited.len() <= max_message_bytes);
            }
        }
    }
}
