//! AUTH exchanges (RFC 4954) from hostile clients: the first byte picks the mechanism
//! and whether the first line is an initial response; the rest, split at LF, are the
//! client's lines. Every step must keep its invariants, and every line the strict base64
//! decoder accepts must be exactly what a canonical encoder writes for its output.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tsubame_smtp_proto::sasl::{
    MAX_BASE64_INPUT_BYTES, MAX_FIELD_BYTES, Mechanism, ServerExchange, Step, decode_base64,
    write_challenge,
};

/// A plain RFC 4648 §4 encoder, independent of the decoder under test.
fn encode(input: &[u8]) -> Vec<u8> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut output = Vec::with_capacity(input.len().div_ceil(3) * 4);
    for group in input.chunks(3) {
        let octet = |index: usize| u32::from(group.get(index).copied().unwrap_or(0));
        let bits = (octet(0) << 16) | (octet(1) << 8) | octet(2);
        for position in 0..4 {
            if position <= group.len() {
                output.push(ALPHABET[((bits >> (18 - 6 * position)) & 0x3f) as usize]);
            } else {
                output.push(b'=');
            }
        }
    }
    output
}

fn check_base64(line: &[u8]) {
    if let Ok(decoded) = decode_base64(line) {
        assert!(line.len() <= MAX_BASE64_INPUT_BYTES);
        assert_eq!(encode(&decoded), line, "accepted non-canonical base64");
    }
}

fuzz_target!(|input: &[u8]| {
    let [selector, rest @ ..] = input else {
        return;
    };
    let mechanism = if selector & 1 == 0 {
        Mechanism::Plain
    } else {
        Mechanism::Login
    };
    let mut lines = rest
        .split(|&byte| byte == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line));
    let initial_response = if selector & 2 != 0 {
        lines.next()
    } else {
        None
    };
    if let Some(initial_response) = initial_response {
        check_base64(initial_response);
    }
    let (mut exchange, mut step) = ServerExchange::start(mechanism, initial_response);
    let mut out = Vec::new();
    loop {
        match step {
            Step::Challenge(challenge) => {
                write_challenge(challenge, &mut out);
                let Some(line) = lines.next() else {
                    break;
                };
                check_base64(line);
                step = exchange.on_line(line);
            }
            Step::Done(credentials) => {
                let password = credentials.password().expose();
                assert!(!credentials.username.is_empty());
                assert!(credentials.username.len() <= MAX_FIELD_BYTES);
                assert!(!password.is_empty() && password.len() <= MAX_FIELD_BYTES);
                assert!(std::str::from_utf8(password).is_ok());
                assert!(!password.contains(&0));
                if let Some(authzid) = &credentials.authzid {
                    assert!(!authzid.is_empty() && authzid.len() <= MAX_FIELD_BYTES);
                    assert_ne!(authzid, &credentials.username);
                }
                // Debug shows the names and `***`, nothing derived from the password.
                assert_eq!(
                    format!("{credentials:?}"),
                    format!(
                        "Credentials {{ username: {:?}, authzid: {:?}, password: *** }}",
                        credentials.username, credentials.authzid
                    )
                );
                // The exchange is over: any further line fails.
                assert!(matches!(exchange.on_line(b"*"), Step::Failed(_)));
                break;
            }
            Step::Failed(failure) => {
                failure.reply().write_to(&mut out);
                assert!(matches!(exchange.on_line(b""), Step::Failed(_)));
                break;
            }
        }
    }
    // Done straight from an initial response writes nothing; anything written is lines.
    assert!(out.is_empty() || out.ends_with(b"\r\n"));
});
