//! Command lines: `next_line` over arbitrary bytes, as the session does it (skipping
//! too-long lines), then `parse_command` on every line and the reply of every error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tsubame_smtp_proto::{LineError, next_line, parse_command, skip_past_line_end};

/// RFC 5321 §4.5.3.1.4: a command line is at most 512 octets with its CRLF.
const MAX_COMMAND_LINE_BYTES: usize = 512;

fuzz_target!(|input: &[u8]| {
    let mut rest = input;
    let mut replies = Vec::new();
    while !rest.is_empty() {
        let consumed = match next_line(rest, MAX_COMMAND_LINE_BYTES) {
            Ok(Some(line)) => {
                assert!(line.content_bytes <= line.length_bytes);
                assert!(line.length_bytes <= MAX_COMMAND_LINE_BYTES);
                let text = &rest[..line.content_bytes];
                if let Err(error) = parse_command(text) {
                    error.reply().write_to(&mut replies);
                }
                line.length_bytes
            }
            Ok(None) => {
                // The unterminated tail is still a line to the parser.
                let _ = parse_command(rest);
                break;
            }
            Err(LineError::TooLong { .. }) => match skip_past_line_end(rest) {
                Some(length) => length,
                None => break,
            },
        };
        assert!(consumed > 0, "no progress");
        rest = &rest[consumed..];
    }
    assert!(replies.ends_with(b"\r\n") || replies.is_empty());
});
