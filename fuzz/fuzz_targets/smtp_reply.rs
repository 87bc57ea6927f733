//! Server replies as the delivery client reads them: the input is parsed whole and in
//! every prefix chosen by a fuzzer-chosen split; a prefix must either ask for more or
//! give exactly the whole input's answer, and a parsed reply must respect its limits and
//! be classified (`reply_class`) without a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tsubame_delivery::{MAX_REPLY_LINES, parse_reply};

fuzz_target!(|input: &[u8]| {
    // Two bytes choose the split point.
    let [split_high, split_low, content @ ..] = input else {
        return;
    };
    let split_point =
        usize::from(u16::from_be_bytes([*split_high, *split_low])) % (content.len() + 1);
    let whole = parse_reply(content);
    let prefix = parse_reply(&content[..split_point]);
    if prefix != Ok(None) {
        assert_eq!(prefix, whole);
    }
    if let Ok(Some((reply, consumed))) = &whole {
        assert!(*consumed <= content.len());
        assert!((200..600).contains(&reply.code));
        assert!(!reply.lines.is_empty() && reply.lines.len() <= MAX_REPLY_LINES);
        // What the relay asks of every refusal: any reply has an answer.
        let _ = tsubame_delivery::classify_reply(reply);
        // The rest of the buffer parses on its own, as the next reply would.
        let _ = parse_reply(&content[*consumed..]);
    }
});
