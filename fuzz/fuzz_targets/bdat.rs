//! BDAT: the content is sent as chunks of fuzzer-chosen sizes and each chunk is fed in
//! two pieces; the body must equal the one from a single chunk fed at once, and hold no
//! bare CR or LF.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tsubame_smtp_proto::{BdatReceiver, BdatStatus};

fn receive(
    content: &[u8],
    chunk_sizes: &[u8],
    split: usize,
    max_message_bytes: usize,
) -> (Vec<u8>, bool) {
    let mut receiver = BdatReceiver::new(max_message_bytes);
    let mut body = Vec::new();
    let mut rest = content;
    let mut sizes = chunk_sizes.iter().map(|&size| usize::from(size));
    while !rest.is_empty() {
        // Chunks of the chosen sizes, then one for whatever is left.
        let size = sizes.next().unwrap_or(rest.len()).min(rest.len());
        receiver.start_chunk(size as u64);
        let first_length = split % (size + 1);
        let mut consumed = 0;
        // The first piece stays inside the chunk; the second runs past its end.
        match receiver.feed(&rest[..first_length], &mut body) {
            BdatStatus::ChunkDone { consumed: used } => consumed += used,
            BdatStatus::NeedMore => match receiver.feed(&rest[first_length..], &mut body) {
                BdatStatus::ChunkDone { consumed: used } => consumed += first_length + used,
                BdatStatus::NeedMore => panic!("a complete chunk must be done"),
            },
        }
        assert_eq!(consumed, size);
        rest = &rest[size..];
    }
    receiver.finish(&mut body);
    (body, receiver.exceeded())
}

fn has_bare_cr_or_lf(body: &[u8]) -> bool {
    body.iter().enumerate().any(|(index, &byte)| match byte {
        b'\r' => body.get(index + 1) != Some(&b'\n'),
        b'\n' => index == 0 || body[index - 1] != b'\r',
        _ => false,
    })
}

fuzz_target!(|input: &[u8]| {
    // One byte: the split point; one byte: the limit (0 = none); one byte: how many
    // chunk sizes follow (at most 8).
    let [split, limit, count, rest @ ..] = input else {
        return;
    };
    let count = usize::from(count % 9).min(rest.len());
    let (chunk_sizes, content) = rest.split_at(count);
    let max_message_bytes = if *limit == 0 {
        usize::MAX
    } else {
        usize::from(*limit)
    };

    let reference = receive(content, &[], 0, max_message_bytes);
    let chunked = receive(content, chunk_sizes, usize::from(*split), max_message_bytes);
    assert_eq!(reference, chunked);
    let (body, exceeded) = reference;
    if !exceeded {
        assert!(!has_bare_cr_or_lf(&body), "bare CR or LF in {body:?}");
        assert!(body.is_empty() || body.ends_with(b"\r\n"));
    }
});
