//! Delivery status notifications read back by a parser nobody here wrote: Python 3's
//! standard `email` package, with the strict `email.policy.default`.
//!
//! Each report is piped into `python3`, which parses it and prints what it found as JSON:
//! every defect it noticed in any part or header, the MIME structure, the fields of each
//! delivery-status block, and the returned headers. These tests fail, never skip, when
//! `python3` is missing: CI must install it. Every wait has a deadline.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use tsubame_delivery::dsn::{
    DsnAction, DsnInput, DsnRecipient, build_dsn, needs_smtputf8, rfc5322_date,
};

const PYTHON: &str = "python3";
/// Parsing a report takes Python milliseconds; this only stops a hung child.
const PYTHON_DEADLINE: Duration = Duration::from_secs(30);
const NOW_UNIX_MS: u64 = 1_709_210_100_000;

/// Reads a report from stdin and prints its parse as JSON.
const PARSE_SCRIPT: &str = r#"
import email, email.policy, json, sys

POLICY = email.policy.default

def defects_of(message):
    found = []
    for index, part in enumerate(message.walk()):
        for defect in part.defects:
            found.append(f"part {index} {part.get_content_type()}: {type(defect).__name__}: {defect}")
        for name, value in part.items():
            for defect in getattr(value, "defects", ()):
                found.append(f"part {index} field {name}: {type(defect).__name__}: {defect}")
    return found

def fields(block):
    return [[name, str(value)] for name, value in block.items()]

data = sys.stdin.buffer.read()
try:
    data.decode("ascii")
    seven_bit = True
    message = email.message_from_bytes(data, policy=POLICY)
except UnicodeDecodeError:
    seven_bit = False
    message = email.message_from_string(data.decode("utf-8"), policy=POLICY)

parts = []
for part in message.iter_parts():
    content_type = part.get_content_type()
    info = {
        "content_type": content_type,
        "charset": part.get_content_charset(),
        "transfer_encoding": part.get("content-transfer-encoding"),
    }
    if content_type == "text/plain":
        if part.get("content-transfer-encoding", "7bit").lower() in ("7bit", "8bit"):
            # Parsed from a str, an 8bit payload is already text; get_content() would
            # encode it with raw-unicode-escape and decode that as the charset.
            info["text"] = part.get_payload()
        else:
            info["text"] = part.get_content()
    elif content_type == "message/delivery-status":
        # Python splits this type into one header block per blank-line group.
        info["blocks"] = [fields(block) for block in part.get_payload()]
    elif content_type == "message/global-delivery-status":
        # Python reads other message/* types as one message: the first block is its
        # header, the other blocks its body; split and parse those here.
        (inner,) = part.get_payload()
        rest = inner.get_payload().replace("\r\n", "\n").strip("\n")
        blocks = [inner] + [
            email.message_from_string(block, policy=POLICY) for block in rest.split("\n\n") if block
        ]
        info["blocks"] = [fields(block) for block in blocks]
        info["defects"] = [d for block in blocks for d in defects_of(block)]
    elif content_type == "text/rfc822-headers":
        info["bytes"] = part.get_payload(decode=True).decode("latin-1")
    elif content_type == "message/global-headers":
        (inner,) = part.get_payload()
        info["fields"] = fields(inner)
        info["body"] = inner.get_payload()
    parts.append(info)

print(json.dumps({
    "seven_bit": seven_bit,
    "defects": defects_of(message),
    "content_type": message.get_content_type(),
    "params": dict(message["content-type"].params),
    "headers": fields(message),
    "to": [address.addr_spec for address in message["to"].addresses],
    "from": [address.addr_spec for address in message["from"].addresses],
    "date": message["date"].datetime.timestamp(),
    "parts": parts,
}))
"#;

/// Reads unix milliseconds (one per line) and prints Python's RFC 5322 date for each.
const DATE_SCRIPT: &str = r#"
import datetime, email.utils, sys
for line in sys.stdin:
    moment = datetime.datetime.fromtimestamp(int(line) // 1000, datetime.timezone.utc)
    print(email.utils.format_datetime(moment))
"#;

/// Runs `script` with `input` on stdin; its stdout.
fn run_python(script: &str, input: Vec<u8>) -> Vec<u8> {
    let mut child = Command::new(PYTHON)
        .arg("-c")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| {
            panic!("cannot run {PYTHON} ({error}): these tests need it on PATH")
        });
    let mut stdin = child.stdin.take().unwrap();
    let writer = thread::spawn(move || stdin.write_all(&input));
    let mut stdout = child.stdout.take().unwrap();
    let reader = thread::spawn(move || {
        let mut out = Vec::new();
        stdout.read_to_end(&mut out).map(|_| out)
    });
    let mut stderr = child.stderr.take().unwrap();
    let error_reader = thread::spawn(move || {
        let mut out = String::new();
        stderr.read_to_string(&mut out).map(|_| out)
    });
    let deadline = Instant::now() + PYTHON_DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{PYTHON} did not finish within {PYTHON_DEADLINE:?}");
        }
        thread::sleep(Duration::from_millis(10));
    };
    writer.join().unwrap().unwrap();
    let stdout = reader.join().unwrap().unwrap();
    let stderr = error_reader.join().unwrap().unwrap();
    assert!(status.success(), "{PYTHON} failed: {stderr}");
    stdout
}

fn parse(dsn: &[u8]) -> Value {
    let stdout = run_python(PARSE_SCRIPT, dsn.to_vec());
    serde_json::from_slice(&stdout).unwrap()
}

fn input<'a>(recipients: &'a [DsnRecipient<'a>], original: &'a [u8]) -> DsnInput<'a> {
    DsnInput {
        reporting_mta: "relay.example.org",
        original_mail_from: "alice@example.com",
        arrival_unix_ms: 1_709_210_000_000,
        now_unix_ms: NOW_UNIX_MS,
        queue_id: "Q0001",
        message_id: "dsn.Q0001@relay.example.org",
        original_message: original,
        recipients,
    }
}

fn bob() -> DsnRecipient<'static> {
    DsnRecipient {
        address: "bob@example.net",
        action: DsnAction::Failed,
        status: "5.1.1",
        remote_mta: Some("mx.example.net"),
        diagnostic: Some("550 5.1.1 <bob@example.net>: no such user"),
        last_attempt_unix_ms: Some(1_709_210_096_000),
    }
}

fn field_pairs(value: &Value) -> Vec<(String, String)> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|pair| {
            (
                pair[0].as_str().unwrap().to_owned(),
                pair[1].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
    expected
        .iter()
        .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
        .collect()
}

fn header<'a>(parsed: &'a Value, name: &str) -> &'a str {
    parsed["headers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|pair| pair[0].as_str().unwrap().eq_ignore_ascii_case(name))
        .and_then(|pair| pair[1].as_str())
        .unwrap_or_else(|| panic!("no {name} field"))
}

/// The checks every report must pass, returning the parse for case-specific ones: no
/// defects anywhere, multipart/report with report-type=delivery-status, the three parts
/// of the right types, the top-level fields, and one delivery-status block per
/// recipient after the per-message block.
fn parse_and_check(dsn_input: &DsnInput<'_>) -> Value {
    let dsn = build_dsn(dsn_input);
    let parsed = parse(&dsn);
    let international = needs_smtputf8(dsn_input);
    for defect in parsed["defects"].as_array().unwrap() {
        // Python's address parser predates RFC 6532 and flags a UTF-8 local part, which
        // RFC 6532 §3.2 allows in an internationalized message (in our To: or in the
        // returned headers); no other defect is tolerated.
        let tolerated =
            international && defect.as_str().unwrap().contains("NonASCIILocalPartDefect");
        assert!(tolerated, "{parsed:#}");
    }
    assert_eq!(parsed["content_type"], "multipart/report");
    assert_eq!(parsed["params"]["report-type"], "delivery-status");
    assert_eq!(parsed["seven_bit"], !needs_smtputf8(dsn_input));

    let parts = parsed["parts"].as_array().unwrap();
    assert_eq!(parts.len(), 3, "{parsed:#}");
    let expected_types = if international {
        [
            "text/plain",
            "message/global-delivery-status",
            "message/global-headers",
        ]
    } else {
        [
            "text/plain",
            "message/delivery-status",
            "text/rfc822-headers",
        ]
    };
    for (part, expected) in parts.iter().zip(expected_types) {
        assert_eq!(part["content_type"], expected);
    }
    if let Some(defects) = parts[1].get("defects") {
        assert_eq!(defects, &serde_json::json!([]));
    }

    assert_eq!(
        parsed["from"],
        serde_json::json!(["MAILER-DAEMON@relay.example.org"])
    );
    assert_eq!(
        parsed["to"],
        serde_json::json!([dsn_input.original_mail_from])
    );
    assert_eq!(header(&parsed, "Auto-Submitted"), "auto-replied");
    assert_eq!(
        header(&parsed, "Message-ID"),
        "<dsn.Q0001@relay.example.org>"
    );
    assert_eq!(
        parsed["date"].as_f64().unwrap(),
        (dsn_input.now_unix_ms / 1000) as f64
    );

    let blocks = parts[1]["blocks"].as_array().unwrap();
    assert_eq!(blocks.len(), 1 + dsn_input.recipients.len(), "{parsed:#}");
    assert_eq!(
        field_pairs(&blocks[0]),
        pairs(&[
            ("Reporting-MTA", "dns; relay.example.org"),
            ("Arrival-Date", "Thu, 29 Feb 2024 12:33:20 +0000"),
        ])
    );
    parsed
}

/// The delivery-status block of recipient `index`.
fn recipient_block(parsed: &Value, index: usize) -> Vec<(String, String)> {
    field_pairs(&parsed["parts"][1]["blocks"][index + 1])
}

fn returned_header_bytes(parsed: &Value) -> Vec<u8> {
    parsed["parts"][2]["bytes"]
        .as_str()
        .unwrap()
        .chars()
        .map(|c| u8::try_from(u32::from(c)).unwrap())
        .collect()
}

#[test]
fn one_recipient() {
    let recipients = [bob()];
    let original = b"From: Alice <alice@example.com>\r\nTo: bob@example.net\r\nSubject: lunch\r\n\r\nSee you at noon.\r\n";
    let parsed = parse_and_check(&input(&recipients, original));
    assert_eq!(
        header(&parsed, "Subject"),
        "Undelivered Mail Returned to Sender"
    );
    assert_eq!(
        recipient_block(&parsed, 0),
        pairs(&[
            ("Final-Recipient", "rfc822; bob@example.net"),
            ("Action", "failed"),
            ("Status", "5.1.1"),
            ("Remote-MTA", "dns; mx.example.net"),
            (
                "Diagnostic-Code",
                "smtp; 550 5.1.1 <bob@example.net>: no such user"
            ),
            ("Last-Attempt-Date", "Thu, 29 Feb 2024 12:34:56 +0000"),
        ])
    );
    let text = parsed["parts"][0]["text"].as_str().unwrap();
    assert!(
        text.contains("<bob@example.net>: failed (status 5.1.1)"),
        "{text}"
    );
    assert!(text.contains("mx.example.net said: 550 5.1.1"), "{text}");
    assert_eq!(parsed["parts"][0]["charset"], "us-ascii");
    assert_eq!(
        returned_header_bytes(&parsed),
        b"From: Alice <alice@example.com>\r\nTo: bob@example.net\r\nSubject: lunch\r\n"
    );
}

#[test]
fn several_recipients() {
    let recipients = [
        bob(),
        DsnRecipient {
            address: "carol@example.net",
            action: DsnAction::Delayed,
            status: "4.4.1",
            remote_mta: None,
            diagnostic: None,
            last_attempt_unix_ms: None,
        },
        DsnRecipient {
            address: "dave@example.org",
            action: DsnAction::Failed,
            status: "5.7.1",
            remote_mta: Some("mx.example.org"),
            diagnostic: Some(
                "554-5.7.1 rejected by policy; see https://example.org/policy for the long \
                 explanation that goes on well past seventy-eight characters\r\n\
                 554 5.7.1 second line",
            ),
            last_attempt_unix_ms: Some(951_782_400_000),
        },
    ];
    let parsed = parse_and_check(&input(&recipients, b"Subject: x\r\n\r\nbody\r\n"));
    assert_eq!(
        header(&parsed, "Subject"),
        "Undelivered Mail Returned to Sender"
    );
    assert_eq!(recipient_block(&parsed, 0)[0].1, "rfc822; bob@example.net");
    assert_eq!(
        recipient_block(&parsed, 1),
        pairs(&[
            ("Final-Recipient", "rfc822; carol@example.net"),
            ("Action", "delayed"),
            ("Status", "4.4.1"),
        ])
    );
    // The long diagnostic was folded; Python unfolds it back to one line.
    assert_eq!(
        recipient_block(&parsed, 2),
        pairs(&[
            ("Final-Recipient", "rfc822; dave@example.org"),
            ("Action", "failed"),
            ("Status", "5.7.1"),
            ("Remote-MTA", "dns; mx.example.org"),
            (
                "Diagnostic-Code",
                "smtp; 554-5.7.1 rejected by policy; see https://example.org/policy for \
                 the long explanation that goes on well past seventy-eight characters \
                 554 5.7.1 second line"
            ),
            ("Last-Attempt-Date", "Tue, 29 Feb 2000 00:00:00 +0000"),
        ])
    );
    let text = parsed["parts"][0]["text"].as_str().unwrap();
    for line in text.lines() {
        assert!(line.len() <= 78, "{line:?}");
    }
}

#[test]
fn all_delayed() {
    let recipients = [DsnRecipient {
        address: "carol@example.net",
        action: DsnAction::Delayed,
        status: "4.7.0",
        remote_mta: Some("mx.example.net"),
        diagnostic: Some("421 4.7.0 greylisted, try again later"),
        last_attempt_unix_ms: Some(NOW_UNIX_MS),
    }];
    let parsed = parse_and_check(&input(&recipients, b"Subject: x\r\n\r\n"));
    assert_eq!(
        header(&parsed, "Subject"),
        "Delayed Mail (still being retried)"
    );
    assert_eq!(
        recipient_block(&parsed, 0)[1],
        ("Action".into(), "delayed".into())
    );
}

#[test]
fn diagnostic_with_injected_fields_and_parts() {
    let diagnostic = "550 5.1.1 bad\r\nContent-Type: text/html\r\n\r\n\
                      --=_tsubame_dsn_dsn.Q0001relay.example.org\r\n\
                      Content-Type: text/plain\r\n\r\nX-Injected: yes\r\n";
    let recipients = [
        DsnRecipient {
            address: "bob@example.net\r\nX-Injected-Address: yes",
            action: DsnAction::Failed,
            status: "5.1.1",
            remote_mta: Some("mx.example.net\r\n\r\nX-Injected-Remote: yes"),
            diagnostic: Some(diagnostic),
            last_attempt_unix_ms: None,
        },
        bob(),
    ];
    let parsed = parse_and_check(&input(&recipients, b"Subject: x\r\n\r\n"));
    assert_eq!(
        recipient_block(&parsed, 0),
        pairs(&[
            (
                "Final-Recipient",
                "rfc822; bob@example.net??X-Injected-Address: yes"
            ),
            ("Action", "failed"),
            ("Status", "5.1.1"),
            ("Remote-MTA", "dns; mx.example.net X-Injected-Remote: yes"),
            (
                "Diagnostic-Code",
                "smtp; 550 5.1.1 bad Content-Type: text/html \
                 --=_tsubame_dsn_dsn.Q0001relay.example.org Content-Type: text/plain \
                 X-Injected: yes"
            ),
        ])
    );
    // The second recipient's group is intact after the hostile one.
    assert_eq!(recipient_block(&parsed, 1)[0].1, "rfc822; bob@example.net");
    let serialized = parsed.to_string();
    assert!(!serialized.contains("text/html\",") && !serialized.contains("[\"X-Injected"));
}

#[test]
fn original_holding_the_would_be_boundary() {
    let original = b"Subject: trap\r\n\
                     X-Trap: --=_tsubame_dsn_dsn.Q0001relay.example.org\r\n\
                     X-Trap-End: --=_tsubame_dsn_dsn.Q0001relay.example.org--\r\n\
                     \r\n\
                     --=_tsubame_dsn_dsn.Q0001relay.example.org\r\n\
                     Content-Type: text/html\r\n\r\nbody\r\n";
    let recipients = [bob()];
    let dsn_input = input(&recipients, original);
    let parsed = parse_and_check(&dsn_input);
    assert_eq!(
        returned_header_bytes(&parsed),
        b"Subject: trap\r\n\
          X-Trap: --=_tsubame_dsn_dsn.Q0001relay.example.org\r\n\
          X-Trap-End: --=_tsubame_dsn_dsn.Q0001relay.example.org--\r\n"
    );
    let dsn = String::from_utf8(build_dsn(&dsn_input)).unwrap();
    assert!(dsn.contains("boundary=\"=_tsubame_dsn_dsn.Q0001relay.example.org.0000000000000000\""));
}

#[test]
fn header_only_bare_lf_and_empty_originals() {
    let table: &[(&[u8], &[u8])] = &[
        // No blank line: the whole original is its header section.
        (
            b"Subject: headers only\r\nFrom: a@example.com\r\n",
            b"Subject: headers only\r\nFrom: a@example.com\r\n",
        ),
        (
            b"Subject: no final newline",
            b"Subject: no final newline\r\n",
        ),
        // Bare LF line ends come back as CRLF.
        (
            b"Subject: unix\nX-Folded: a\n b\n\nbody\n",
            b"Subject: unix\r\nX-Folded: a\r\n b\r\n",
        ),
        (b"", b""),
        (b"\r\nbody without headers\r\n", b""),
    ];
    let recipients = [bob()];
    for &(original, expected) in table {
        let parsed = parse_and_check(&input(&recipients, original));
        assert_eq!(
            String::from_utf8_lossy(&returned_header_bytes(&parsed)),
            String::from_utf8_lossy(expected),
            "{:?}",
            String::from_utf8_lossy(original)
        );
    }
}

#[test]
fn eight_bit_original_headers_in_an_ascii_report() {
    let recipients = [bob()];
    let original = b"Subject: caf\xe9 \xc3\xa9\r\nX-Nul: a\0b\r\n\r\n\xff";
    let parsed = parse_and_check(&input(&recipients, original));
    assert_eq!(parsed["parts"][2]["transfer_encoding"], "quoted-printable");
    assert_eq!(
        returned_header_bytes(&parsed),
        b"Subject: caf\xe9 \xc3\xa9\r\nX-Nul: a\0b\r\n"
    );
}

#[test]
fn utf8_recipient() {
    let recipients = [
        DsnRecipient {
            address: "j\u{f6}rg@b\u{fc}cher.example",
            action: DsnAction::Failed,
            status: "5.1.1",
            remote_mta: Some("mx.example.net"),
            diagnostic: Some("550 5.1.1 unknown user"),
            last_attempt_unix_ms: None,
        },
        bob(),
    ];
    let original = "From: alice@example.com\r\nTo: j\u{f6}rg@b\u{fc}cher.example\r\n\
                    Subject: Gr\u{fc}\u{df}e\r\n\r\nHallo\r\n";
    let parsed = parse_and_check(&input(&recipients, original.as_bytes()));
    assert_eq!(
        recipient_block(&parsed, 0),
        pairs(&[
            ("Final-Recipient", "utf-8; j\u{f6}rg@b\u{fc}cher.example"),
            ("Action", "failed"),
            ("Status", "5.1.1"),
            ("Remote-MTA", "dns; mx.example.net"),
            ("Diagnostic-Code", "smtp; 550 5.1.1 unknown user"),
        ])
    );
    assert_eq!(recipient_block(&parsed, 1)[0].1, "rfc822; bob@example.net");
    let text = &parsed["parts"][0];
    assert_eq!(text["charset"], "utf-8");
    assert!(
        text["text"]
            .as_str()
            .unwrap()
            .contains("<j\u{f6}rg@b\u{fc}cher.example>: failed")
    );
    let returned = &parsed["parts"][2];
    assert_eq!(
        field_pairs(&returned["fields"]),
        pairs(&[
            ("From", "alice@example.com"),
            ("To", "j\u{f6}rg@b\u{fc}cher.example"),
            ("Subject", "Gr\u{fc}\u{df}e"),
        ])
    );
    assert_eq!(returned["body"], "");
}

#[test]
fn utf8_sender() {
    let recipients = [bob()];
    let mut dsn_input = input(&recipients, b"Subject: x\r\n\r\n");
    dsn_input.original_mail_from = "al\u{ef}ce@example.com";
    let parsed = parse_and_check(&dsn_input);
    let defects = parsed["defects"].as_array().unwrap();
    assert_eq!(defects.len(), 1, "{parsed:#}");
    assert!(
        defects[0]
            .as_str()
            .unwrap()
            .starts_with("part 0 field To: NonASCIILocalPartDefect")
    );
    assert_eq!(recipient_block(&parsed, 0)[0].1, "rfc822; bob@example.net");
}

#[test]
fn dates_agree_with_python() {
    // Edge values and a spread over 1970..=9999 (Python's datetime stops at 9999).
    const LAST_MS_OF_9999: u64 = 253_402_300_799_999;
    let mut moments: Vec<u64> = vec![
        0,
        999,
        86_399_999,
        86_400_000,
        951_782_400_000,
        951_868_799_999,
        1_709_210_096_000,
        4_107_542_400_000,
        LAST_MS_OF_9999,
    ];
    // A fixed linear congruential sequence (Knuth's MMIX constants): reproducible, no
    // dependency.
    let mut state: u64 = 0x5eed;
    for _ in 0..5000 {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        moments.push(state % (LAST_MS_OF_9999 + 1));
    }
    let stdin: String = moments.iter().map(|ms| format!("{ms}\n")).collect();
    let stdout = String::from_utf8(run_python(DATE_SCRIPT, stdin.into_bytes())).unwrap();
    let expected: Vec<&str> = stdout.lines().collect();
    assert_eq!(expected.len(), moments.len());
    for (ms, python) in moments.iter().zip(expected) {
        assert_eq!(rfc5322_date(*ms), python, "{ms} ms");
    }
}
