//! The DATA content encoder: dot-stuffing and the end-of-data indicator
//! (RFC 5321 §4.5.2, §4.1.1.4) without copying the body.

/// Written before a line that starts with `.` (RFC 5321 §4.5.2).
const STUFFED_DOT: &[u8] = b".";
/// Ends content that already ends in CRLF.
const TERMINATOR_AFTER_CRLF: &[u8] = b".\r\n";
/// Ends content whose last line has no CRLF yet: the body is sent with CRLF appended,
/// since the end-of-data indicator must start a line.
const TERMINATOR_WITH_CRLF: &[u8] = b"\r\n.\r\n";

/// The wire form of a body, as borrowed slices: runs of the body, a `.` before every
/// body line that starts with `.`, and the end-of-data indicator. Suitable for
/// `write_vectored` (map each slice to an `IoSlice`).
///
/// A line starts after every LF, bare or not: the spool holds CRLF-only bodies, but if a
/// bare LF ever slipped through, stuffing after it too means no `<LF>.<CR><LF>` can
/// reach a lenient upstream and end the data early (SMTP smuggling).
#[derive(Debug, Clone)]
pub struct DotStuffed<'a> {
    /// Bytes of the current part not yet returned.
    rest: &'a [u8],
    /// The body, while `rest` is still the prefix; empty after.
    next_part: &'a [u8],
    /// True when `rest` starts a line and begins with `.` whose stuffing dot was already
    /// returned.
    stuffed: bool,
    /// False when `rest` continues a line begun in the part before (a prefix that does
    /// not end in LF): its first byte is then not a line start.
    at_line_start: bool,
    /// The terminator still to return, chosen from the whole content up front.
    terminator: Option<&'static [u8]>,
}

impl<'a> DotStuffed<'a> {
    pub fn new(body: &'a [u8]) -> Self {
        Self::with_prefix(&[], body)
    }

    /// The wire form of `prefix` followed by `body`, as one content: header fields added
    /// at sending time (a DKIM signature) before the stored message, neither copied.
    pub fn with_prefix(prefix: &'a [u8], body: &'a [u8]) -> Self {
        // The last two bytes of the whole content, which may straddle the two parts.
        let mut last_two = body.iter().rev().chain(prefix.iter().rev());
        let (last, before_last) = (last_two.next(), last_two.next());
        let ends_in_crlf = last == Some(&b'\n') && before_last == Some(&b'\r');
        let terminator = if last.is_none() || ends_in_crlf {
            TERMINATOR_AFTER_CRLF
        } else {
            TERMINATOR_WITH_CRLF
        };
        let (rest, next_part) = if prefix.is_empty() {
            (body, &[][..])
        } else {
            (prefix, body)
        };
        Self {
            rest,
            next_part,
            // The first line starts at offset 0; `next` handles it like any other.
            stuffed: false,
            at_line_start: true,
            terminator: Some(terminator),
        }
    }

    /// Bytes on the wire for `body`, stuffing dots and terminator included.
    pub fn encoded_len(body: &[u8]) -> usize {
        DotStuffed::new(body).map(<[u8]>::len).sum()
    }
}

impl<'a> Iterator for DotStuffed<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if self.rest.is_empty() {
            if self.next_part.is_empty() {
                return self.terminator.take();
            }
            // The part before ended here: the body starts a line if it ended in LF.
            self.rest = std::mem::take(&mut self.next_part);
            self.stuffed = false;
        }
        // Only the start of a part reaches here at a line start with a dot not yet
        // stuffed; later line starts are split off below with `stuffed == false` and
        // handled on the next call the same way.
        if !self.stuffed && self.at_line_start && self.rest.first() == Some(&b'.') {
            self.stuffed = true;
            return Some(STUFFED_DOT);
        }
        // The run ends right after the next LF that is followed by a dot.
        let run_end = self
            .rest
            .windows(2)
            .position(|pair| pair == b"\n.")
            .map_or(self.rest.len(), |newline| newline + 1);
        let (run, rest) = self.rest.split_at(run_end);
        self.rest = rest;
        self.stuffed = false;
        // A run ends at a LF (a dot line follows) or at the end of its part.
        self.at_line_start = run.ends_with(b"\n");
        Some(run)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use proptest::prelude::*;

    fn encode(body: &[u8]) -> Vec<u8> {
        DotStuffed::new(body).collect::<Vec<_>>().concat()
    }

    /// Reference un-stuffer: removes the terminator, then one leading dot from every
    /// line (a line starts at offset 0 and after every LF).
    fn unstuff(wire: &[u8]) -> Vec<u8> {
        let content = if wire == b".\r\n" {
            &[][..]
        } else {
            wire.strip_suffix(b".\r\n").unwrap()
        };
        let mut out = Vec::new();
        let mut line_start = true;
        for &byte in content {
            if !(line_start && byte == b'.') {
                out.push(byte);
            }
            line_start = byte == b'\n';
        }
        out
    }

    #[test]
    fn encoding_cases() {
        let cases: &[(&str, &[u8], &[u8])] = &[
            ("empty", b"", b".\r\n"),
            ("one line", b"hi\r\n", b"hi\r\n.\r\n"),
            ("no final crlf", b"hi", b"hi\r\n.\r\n"),
            ("leading dot", b".hi\r\n", b"..hi\r\n.\r\n"),
            (
                "lone dot line",
                b"a\r\n.\r\nb\r\n",
                b"a\r\n..\r\nb\r\n.\r\n",
            ),
            ("dot at end without crlf", b"a\r\n.", b"a\r\n..\r\n.\r\n"),
            ("two dots", b"..\r\n", b"...\r\n.\r\n"),
            ("dot mid-line", b"a.b\r\n", b"a.b\r\n.\r\n"),
            ("bare lf dot", b"a\n.\r\n", b"a\n..\r\n.\r\n"),
            ("consecutive dot lines", b".\r\n.\r\n", b"..\r\n..\r\n.\r\n"),
            ("ends in bare cr", b"a\r", b"a\r\r\n.\r\n"),
        ];
        for (name, body, wire) in cases {
            assert_eq!(
                String::from_utf8_lossy(&encode(body)),
                String::from_utf8_lossy(wire),
                "{name}"
            );
            assert_eq!(DotStuffed::encoded_len(body), wire.len(), "{name}");
        }
    }

    #[test]
    fn runs_borrow_the_body() {
        let body = b"first\r\n.second\r\nthird\r\n";
        let range = body.as_ptr_range();
        let pieces: Vec<&[u8]> = DotStuffed::new(body).collect();
        // Two body runs, one stuffing dot, one terminator: no copy of the body.
        assert_eq!(pieces.len(), 4);
        for piece in [pieces[0], pieces[2]] {
            assert!(range.contains(&piece.as_ptr()));
        }
    }

    fn body_bytes() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(
            prop::sample::select(vec![b'.', b'\r', b'\n', b'a', b' ']),
            0..64,
        )
    }

    #[test]
    fn a_prefix_is_sent_before_the_body_as_one_content() {
        let wire = |prefix: &[u8], body: &[u8]| {
            DotStuffed::with_prefix(prefix, body)
                .collect::<Vec<_>>()
                .concat()
        };
        assert_eq!(wire(b"A: 1\r\n", b".x\r\n"), b"A: 1\r\n..x\r\n.\r\n");
        assert_eq!(wire(b"A: 1\r\n", b""), b"A: 1\r\n.\r\n");
        assert_eq!(wire(b"", b"b\r\n"), b"b\r\n.\r\n");
        // A prefix without a final LF: the body's first dot is mid-line, not stuffed.
        assert_eq!(wire(b"A", b".x\r\n"), b"A.x\r\n.\r\n");
        // The final CRLF split between the parts (found by the property below).
        assert_eq!(wire(b"..\r", b"\n"), b"...\r\n.\r\n");
        assert_eq!(wire(b"A: .\r\n.\r\n", b"b"), b"A: .\r\n..\r\nb\r\n.\r\n");
    }

    proptest! {
        #[test]
        fn a_split_anywhere_encodes_like_the_whole(body in body_bytes(), cut in 0usize..64) {
            let cut = cut.min(body.len());
            let (prefix, rest) = body.split_at(cut);
            let split: Vec<u8> = DotStuffed::with_prefix(prefix, rest).collect::<Vec<_>>().concat();
            prop_assert_eq!(split, encode(&body));
        }

        #[test]
        fn unstuffing_returns_the_body(body in body_bytes()) {
            let wire = encode(&body);
            let mut expected = body.clone();
            if !body.is_empty() && !body.ends_with(b"\r\n") {
                expected.extend_from_slice(b"\r\n");
            }
            prop_assert_eq!(unstuff(&wire), expected);
        }

        #[test]
        fn terminator_only_at_the_end(body in body_bytes()) {
            let wire = encode(&body);
            let framed = [b"\r\n".as_slice(), &wire].concat();
            let first = framed.windows(5).position(|window| window == b"\r\n.\r\n");
            prop_assert_eq!(first, Some(framed.len() - 5));
            // No line of the content is a lone dot, whatever the line ending.
            let bare = framed.windows(3).position(|window| window == b"\n.\n");
            prop_assert_eq!(bare, None);
        }
    }
}
