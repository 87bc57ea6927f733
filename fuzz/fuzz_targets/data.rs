//! DATA: the input is fed whole and split at a fuzzer-chosen point; both must give the
//! same status and body, and a complete body must hold no bare CR or LF.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tsubame_smtp_proto::{DataOutcome, DataReceiver, DataStatus};

fn receive(
    pieces: &[&[u8]],
    max_message_bytes: usize,
    max_line_bytes: usize,
) -> (DataStatus, Vec<u8>) {
    let mut receiver = DataReceiver::new(max_message_bytes, max_line_bytes);
    let mut body = Vec::new();
    let mut offset = 0;
    for piece in pieces {
        if let DataStatus::Done { consumed, outcome } = receiver.feed(piece, &mut body) {
            assert!(consumed <= piece.len());
            return (
                DataStatus::Done {
                    consumed: offset + consumed,
                    outcome,
                },
                body,
            );
        }
        offset += piece.len();
    }
    (DataStatus::NeedMore, body)
}

fn has_bare_cr_or_lf(body: &[u8]) -> bool {
    body.iter().enumerate().any(|(index, &byte)| match byte {
        b'\r' => body.get(index + 1) != Some(&b'\n'),
        b'\n' => index == 0 || body[index - 1] != b'\r',
        _ => false,
    })
}

fuzz_target!(|input: &[u8]| {
    // Two bytes choose the split point, one byte small limits (or none).
    let [split_high, split_low, limits, content @ ..] = input else {
        return;
    };
    let split_point =
        usize::from(u16::from_be_bytes([*split_high, *split_low])) % (content.len() + 1);
    let (max_message_bytes, max_line_bytes) = match limits % 4 {
        0 => (usize::MAX, usize::MAX),
        1 => (usize::from(*limits), usize::MAX),
        2 => (usize::MAX, usize::from(*limits / 4)),
        _ => (usize::from(*limits), usize::from(*limits / 4)),
    };
    let (first, second) = content.split_at(split_point);
    let whole = receive(&[content], max_message_bytes, max_line_bytes);
    let split = receive(&[first, second], max_message_bytes, max_line_bytes);
    assert_eq!(whole, split);

    let (status, body) = whole;
    let complete = matches!(
        status,
        DataStatus::Done {
            outcome: DataOutcome::Complete,
            ..
        }
    );
    if complete || max_message_bytes == usize::MAX && max_line_bytes == usize::MAX {
        assert!(!has_bare_cr_or_lf(&body), "bare CR or LF in {body:?}");
    }
    if complete {
        assert!(body.is_empty() || body.ends_with(b"\r\n"));
    }
});
