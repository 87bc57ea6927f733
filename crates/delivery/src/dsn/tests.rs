#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;

use super::*;

const ONE_RECIPIENT: [DsnRecipient<'static>; 1] = [DsnRecipient {
    address: "bob@example.net",
    action: DsnAction::Failed,
    status: "5.1.1",
    remote_mta: Some("mx.example.net"),
    diagnostic: Some("550 5.1.1 <bob@example.net>: no such user"),
    last_attempt_unix_ms: Some(1_709_210_096_000),
}];

fn input<'a>(recipients: &'a [DsnRecipient<'a>], original: &'a [u8]) -> DsnInput<'a> {
    DsnInput {
        reporting_mta: "relay.example.org",
        original_mail_from: "alice@example.com",
        arrival_unix_ms: 1_709_210_000_000,
        now_unix_ms: 1_709_210_100_000,
        queue_id: "Q0001",
        message_id: "dsn.Q0001@relay.example.org",
        original_message: original,
        recipients,
    }
}

/// The boundary parameter of the top-level Content-Type.
fn boundary_of(dsn: &[u8]) -> String {
    let text = String::from_utf8_lossy(dsn);
    let start = text.find("boundary=\"").unwrap() + "boundary=\"".len();
    let end = start + text[start..].find('"').unwrap();
    text[start..end].to_owned()
}

/// The lines of a message that must use CRLF only: panics on a bare CR or LF.
fn crlf_lines(dsn: &[u8]) -> Vec<&[u8]> {
    let body = dsn.strip_suffix(b"\r\n").expect("ends with CRLF");
    let segments: Vec<&[u8]> = body.split(|&byte| byte == b'\n').collect();
    let last = segments.len() - 1;
    let lines: Vec<&[u8]> = segments
        .into_iter()
        .enumerate()
        .map(|(index, segment)| {
            // Every segment but the last lost its LF to the split and must end in CR.
            if index == last {
                segment
            } else {
                segment.strip_suffix(b"\r").expect("LF without CR")
            }
        })
        .collect();
    for line in &lines {
        assert!(!line.contains(&b'\r'), "bare CR in {line:?}");
    }
    lines
}

/// Structural checks every report must pass, whatever the input: CRLF only, no line over
/// the limit, exactly three parts whose boundary occurs nowhere else, and part header
/// sections holding only the fields written here.
fn assert_well_formed(dsn: &[u8]) {
    let boundary = boundary_of(dsn);
    let lines = crlf_lines(dsn);
    for line in &lines {
        assert!(line.len() <= LINE_MAX_BYTES, "line of {} bytes", line.len());
    }
    let opening = format!("--{boundary}");
    let closing = format!("--{boundary}--");
    let openings: Vec<usize> = (0..lines.len())
        .filter(|&index| lines[index] == opening.as_bytes())
        .collect();
    assert_eq!(openings.len(), 3, "three parts");
    assert_eq!(
        lines
            .iter()
            .filter(|line| **line == closing.as_bytes())
            .count(),
        1
    );
    assert_eq!(lines.last().unwrap(), &closing.as_bytes());
    // The boundary occurs in the Content-Type parameter and in the four delimiter lines,
    // nowhere else.
    let occurrences = dsn
        .windows(boundary.len())
        .filter(|window| *window == boundary.as_bytes())
        .count();
    assert_eq!(occurrences, 5);
    for &opening_index in &openings {
        let part_header: Vec<&[u8]> = lines[opening_index + 1..]
            .iter()
            .take_while(|line| !line.is_empty())
            .copied()
            .collect();
        assert!((2..=3).contains(&part_header.len()), "{part_header:?}");
        for field in part_header {
            assert!(
                field.starts_with(b"Content-"),
                "{:?}",
                String::from_utf8_lossy(field)
            );
        }
    }
}

/// The content of part `index` (0-based) between its blank line and the next delimiter.
fn part_content(dsn: &[u8], index: usize) -> Vec<u8> {
    let boundary = boundary_of(dsn);
    let delimiter = format!("\r\n--{boundary}");
    let text = dsn.to_vec();
    let mut positions = Vec::new();
    let mut from = 0;
    while let Some(found) = memchr::memmem::find(&text[from..], delimiter.as_bytes()) {
        positions.push(from + found);
        from += found + 1;
    }
    let start = positions[index] + delimiter.len() + 2;
    let end = positions[index + 1];
    let part = &text[start..end];
    let blank = memchr::memmem::find(part, b"\r\n\r\n").unwrap();
    part[blank + 4..].to_vec()
}

fn unfold(field_lines: &str) -> String {
    field_lines.replace("\r\n ", " ")
}

#[test]
fn status_codes_are_validated_against_the_action() {
    use DsnAction::{Delayed, Failed};
    let table: &[(&str, DsnAction, &str)] = &[
        ("5.1.1", Failed, "5.1.1"),
        ("5.7.26", Failed, "5.7.26"),
        ("5.123.123", Failed, "5.123.123"),
        ("4.4.7", Failed, "4.4.7"),
        ("4.4.1", Delayed, "4.4.1"),
        // Class contradicting the action.
        ("5.1.1", Delayed, "4.0.0"),
        ("2.0.0", Failed, "5.0.0"),
        ("2.0.0", Delayed, "4.0.0"),
        // Malformed.
        ("", Failed, "5.0.0"),
        ("550", Failed, "5.0.0"),
        ("5.1", Failed, "5.0.0"),
        ("5.1.1.1", Failed, "5.0.0"),
        ("5..1", Failed, "5.0.0"),
        ("5.1234.1", Failed, "5.0.0"),
        ("5.1.x", Failed, "5.0.0"),
        ("5.1.1 ", Failed, "5.0.0"),
        ("5.1.1\r\nX: y", Failed, "5.0.0"),
        ("6.1.1", Failed, "5.0.0"),
        ("+5.1.1", Failed, "5.0.0"),
        ("5.+1.1", Failed, "5.0.0"),
        ("4.٣.1", Delayed, "4.0.0"),
    ];
    for &(status, action, expected) in table {
        assert_eq!(
            status_code(status, action),
            expected,
            "{status:?} {action:?}"
        );
    }
}

#[test]
fn untrusted_text_becomes_one_ascii_line() {
    let table: &[(&str, &str)] = &[
        ("550 5.1.1 no such user", "550 5.1.1 no such user"),
        (
            "550-5.1.1 first\r\n550 5.1.1 second",
            "550-5.1.1 first 550 5.1.1 second",
        ),
        (
            "a\r\nContent-Type: text/html\r\n\r\nb",
            "a Content-Type: text/html b",
        ),
        ("  lead\t\ttabs  trail \r\n", "lead tabs trail"),
        ("bare\rcr bare\nlf", "bare cr bare lf"),
        ("nul\0byte del\u{7f}", "nul byte del"),
        ("nel\u{85}ls\u{2028}ps\u{2029}end", "nel ls ps end"),
        ("caf\u{e9} \u{fffd}", "caf? ?"),
        ("", ""),
        ("\r\n", ""),
    ];
    for &(text, expected) in table {
        assert_eq!(single_line_ascii(text), expected, "{text:?}");
    }
}

#[test]
fn long_diagnostics_are_cut() {
    let long = "x".repeat(DIAGNOSTIC_MAX_BYTES + 1);
    let cut = diagnostic_text(&long);
    assert_eq!(cut.len(), DIAGNOSTIC_MAX_BYTES + TRUNCATION_MARK.len());
    assert!(cut.ends_with(TRUNCATION_MARK));
    let exact = "y".repeat(DIAGNOSTIC_MAX_BYTES);
    assert_eq!(diagnostic_text(&exact), exact);
}

#[test]
fn addresses_keep_their_text_but_lose_line_breaks() {
    let table: &[(&str, bool, &str)] = &[
        ("bob@example.net", false, "bob@example.net"),
        ("\"a b\"@example.net", false, "\"a b\"@example.net"),
        ("evil@x\r\nBcc: y", false, "evil@x??Bcc: y"),
        ("j\u{f6}rg@example.de", false, "j?rg@example.de"),
        ("j\u{f6}rg@example.de", true, "j\u{f6}rg@example.de"),
        ("a\u{2028}b@x", true, "a?b@x"),
    ];
    for &(address, utf8_allowed, expected) in table {
        assert_eq!(address_text(address, utf8_allowed), expected, "{address:?}");
    }
}

#[test]
fn utf8_addresses_use_the_unitext_form() {
    let table: &[(&str, &str)] = &[
        ("j\u{f6}rg@example.de", "j\u{f6}rg@example.de"),
        (
            "\u{7528}\u{6237}@\u{4f8b}\u{5b50}.\u{4e2d}\u{56fd}",
            "\u{7528}\u{6237}@\u{4f8b}\u{5b50}.\u{4e2d}\u{56fd}",
        ),
        ("a+tag=1@\u{e9}.fr", "a\\x{2B}tag\\x{3D}1@\u{e9}.fr"),
        ("\"a b\\c\"@\u{e9}.fr", "\"a\\x{20}b\\x{5C}c\"@\u{e9}.fr"),
        ("\u{e9}\r\nX: y@x", "\u{e9}??X:\\x{20}y@x"),
        ("\u{e9}\u{85}\u{2029}@x", "\u{e9}??@x"),
    ];
    for &(address, expected) in table {
        assert_eq!(utf8_addr_unitext(address), expected, "{address:?}");
    }
}

#[test]
fn message_ids_lose_brackets_spaces_and_controls() {
    assert_eq!(
        message_id_text("dsn.1@relay.example"),
        "dsn.1@relay.example"
    );
    assert_eq!(message_id_text("<a b>\r\n@c\u{e9}"), "ab@c");
}

#[test]
fn lines_end_at_crlf_lf_and_cr() {
    let table: &[(&[u8], &[&[u8]])] = &[
        (b"", &[]),
        (b"a", &[b"a"]),
        (b"a\r\n", &[b"a"]),
        (b"a\r\nb", &[b"a", b"b"]),
        (b"a\nb\n", &[b"a", b"b"]),
        (b"a\rb\r", &[b"a", b"b"]),
        (b"a\r\n\r\nb", &[b"a", b"", b"b"]),
        (b"a\n\nb", &[b"a", b"", b"b"]),
        (b"a\r\r\nb", &[b"a", b"", b"b"]),
        (b"\r\n", &[b""]),
    ];
    for &(bytes, expected) in table {
        assert_eq!(lines(bytes).collect::<Vec<_>>(), expected, "{bytes:?}");
    }
}

#[test]
fn returned_headers_are_the_header_section_only() {
    /// Original, international, expected content, expected transfer encoding.
    type Case = (&'static [u8], bool, &'static [u8], Option<&'static str>);
    let table: &[Case] = &[
        (
            b"Subject: hi\r\nFrom: a@b\r\n\r\nbody\r\n",
            false,
            b"Subject: hi\r\nFrom: a@b\r\n",
            None,
        ),
        // No blank line: all of it is headers.
        (
            b"Subject: hi\r\nFrom: a@b\r\n",
            false,
            b"Subject: hi\r\nFrom: a@b\r\n",
            None,
        ),
        (b"Subject: hi", false, b"Subject: hi\r\n", None),
        // Bare LF, and a folded field, come out as CRLF lines.
        (
            b"Subject: hi\n there\nFrom: a@b\n\nbody\n",
            false,
            b"Subject: hi\r\n there\r\nFrom: a@b\r\n",
            None,
        ),
        (b"", false, b"", None),
        (b"\r\nbody only\r\n", false, b"", None),
        // 8-bit headers in a 7-bit report are quoted-printable.
        (
            b"Subject: caf\xc3\xa9\r\n\r\n",
            false,
            b"Subject: caf=C3=A9\r\n",
            Some("quoted-printable"),
        ),
        (
            b"Subject: caf\xe9\r\n\r\n",
            false,
            b"Subject: caf=E9\r\n",
            Some("quoted-printable"),
        ),
        (
            b"Subject: a\0b\r\n\r\n",
            false,
            b"Subject: a=00b\r\n",
            Some("quoted-printable"),
        ),
        // UTF-8 headers in an international report stay as they are; other 8-bit bytes
        // do not.
        (
            b"Subject: caf\xc3\xa9\r\n\r\n",
            true,
            b"Subject: caf\xc3\xa9\r\n",
            Some("8bit"),
        ),
        (
            b"Subject: caf\xe9\r\n\r\n",
            true,
            b"Subject: caf=E9\r\n",
            Some("quoted-printable"),
        ),
        (b"Subject: plain\r\n\r\n", true, b"Subject: plain\r\n", None),
    ];
    for &(original, international, content, transfer_encoding) in table {
        let returned = returned_headers(original, international);
        assert!(!returned.truncated);
        assert_eq!(
            String::from_utf8_lossy(&returned.part.content),
            String::from_utf8_lossy(content),
            "{original:?}"
        );
        let header = &returned.part.header;
        match transfer_encoding {
            Some(encoding) => assert!(
                header.contains(&format!("Content-Transfer-Encoding: {encoding}\r\n")),
                "{header}"
            ),
            None => assert!(!header.contains("Content-Transfer-Encoding"), "{header}"),
        }
        let content_type = if international {
            "Content-Type: message/global-headers\r\n"
        } else {
            "Content-Type: text/rfc822-headers\r\n"
        };
        assert!(header.starts_with(content_type), "{header}");
    }
}

#[test]
fn over_long_header_lines_are_quoted_printable() {
    let original = format!("X-Long: {}\r\n\r\n", "a".repeat(LINE_MAX_BYTES));
    let returned = returned_headers(original.as_bytes(), false);
    assert!(
        returned
            .part
            .header
            .contains("Content-Transfer-Encoding: quoted-printable")
    );
    assert_eq!(
        quoted_printable_decode(&returned.part.content),
        original
            .trim_end()
            .as_bytes()
            .iter()
            .chain(b"\r\n")
            .copied()
            .collect::<Vec<_>>()
    );
}

#[test]
fn returned_headers_are_cut_at_the_limit() {
    // Without a blank line a large message is all "headers": only the limit's worth of
    // whole lines comes back.
    let line = format!("X-Filler: {}\r\n", "f".repeat(90));
    let original = line.repeat(2 * RETURNED_HEADERS_MAX_BYTES / line.len());
    let returned = returned_headers(original.as_bytes(), false);
    assert!(returned.truncated);
    assert!(returned.part.content.len() <= RETURNED_HEADERS_MAX_BYTES);
    assert!(returned.part.content.len() > RETURNED_HEADERS_MAX_BYTES - line.len());
    assert!(original.as_bytes().starts_with(&returned.part.content));

    // One line over the limit on its own keeps its start.
    let huge = format!("X-Huge: {}", "h".repeat(RETURNED_HEADERS_MAX_BYTES));
    let returned = returned_headers(huge.as_bytes(), false);
    assert!(returned.truncated);
    let decoded = quoted_printable_decode(&returned.part.content);
    assert_eq!(decoded.len(), RETURNED_HEADERS_MAX_BYTES);
    assert!(huge.as_bytes().starts_with(&decoded[..decoded.len() - 2]));

    // The text part says so.
    let recipients = ONE_RECIPIENT;
    let dsn = build_dsn(&input(&recipients, original.as_bytes()));
    let text = String::from_utf8(part_content(&dsn, 0)).unwrap();
    assert!(text.contains("cut short"), "{text}");
    let dsn = build_dsn(&input(&recipients, b"Subject: short\r\n\r\n"));
    let text = String::from_utf8(part_content(&dsn, 0)).unwrap();
    assert!(!text.contains("cut short"), "{text}");
}

/// A quoted-printable decoder for the tests (RFC 2045 §6.7), strict about what the
/// encoder may produce: hex digits upper-case, nothing but `=HH` and soft breaks after
/// `=`, no line over 76 characters.
fn quoted_printable_decode(encoded: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    if encoded.is_empty() {
        return out;
    }
    for line in crlf_lines(&[encoded, b"\r\n"].concat()) {
        assert!(line.len() <= QUOTED_PRINTABLE_LINE_MAX_BYTES, "{line:?}");
        assert!(!line.ends_with(b" ") && !line.ends_with(b"\t"), "{line:?}");
        let (body, soft) = match line.strip_suffix(b"=") {
            Some(body) => (body, true),
            None => (line, false),
        };
        let mut index = 0;
        while index < body.len() {
            if body[index] == b'=' {
                let hex = std::str::from_utf8(&body[index + 1..index + 3]).unwrap();
                assert_eq!(hex, hex.to_uppercase());
                out.push(u8::from_str_radix(hex, 16).unwrap());
                index += 3;
            } else {
                assert!(matches!(body[index], b' ' | b'\t' | b'!'..=b'~'));
                out.push(body[index]);
                index += 1;
            }
        }
        if !soft {
            out.extend_from_slice(b"\r\n");
        }
    }
    // The helper's extra CRLF makes one empty last line; drop its CRLF.
    out.truncate(out.len().saturating_sub(2));
    out
}

#[test]
fn quoted_printable_known_encodings() {
    let table: &[(&[u8], &[u8])] = &[
        (b"a=b\r\n", b"a=3Db\r\n"),
        (b"trailing space \r\n", b"trailing space=20\r\n"),
        (b"trailing tab\t\r\n", b"trailing tab=09\r\n"),
        (b"mid space ok\r\n", b"mid space ok\r\n"),
        (b"\xff\x00\x7f\r\n", b"=FF=00=7F\r\n"),
        (b"", b""),
    ];
    for &(plain, encoded) in table {
        assert_eq!(quoted_printable(plain), encoded, "{plain:?}");
        assert_eq!(quoted_printable_decode(encoded), plain, "{plain:?}");
    }
    // Soft line breaks: 100 letters become a 75-letter line with `=` and the rest.
    let encoded = quoted_printable(&[b"a".repeat(100), b"\r\n".to_vec()].concat());
    assert_eq!(
        encoded,
        [
            b"a".repeat(75),
            b"=\r\n".to_vec(),
            b"a".repeat(25),
            b"\r\n".to_vec()
        ]
        .concat()
    );
    // Exactly 76 fits without a soft break (the last byte needs no room for `=`).
    let encoded = quoted_printable(&[b"a".repeat(76), b"\r\n".to_vec()].concat());
    assert_eq!(encoded, [b"a".repeat(76), b"\r\n".to_vec()].concat());
}

#[test]
fn boundary_avoids_every_occurrence_in_the_content() {
    let base = boundary_base("dsn.Q1@relay.example");
    assert_eq!(base, "=_tsubame_dsn_dsn.Q1relay.example");
    // Absent: the base itself.
    assert_eq!(
        choose_boundary(&base, [b"nothing here".as_slice()].into_iter()),
        base
    );
    // Present anywhere, even mid-line: the first counter.
    let content = format!("x{base}y");
    assert_eq!(
        choose_boundary(&base, [content.as_bytes()].into_iter()),
        format!("{base}.0000000000000000")
    );
    // The first counters taken too, in different parts: the next free one.
    let first = format!("--{base}.0000000000000000\r\n");
    let second = format!("{base}.0000000000000001--");
    let third = format!("{base}.0000000000000003");
    assert_eq!(
        choose_boundary(
            &base,
            [first.as_bytes(), second.as_bytes(), third.as_bytes()].into_iter()
        ),
        format!("{base}.0000000000000002")
    );
    // A Message-ID of only unusable characters still gives a boundary, and long ones are
    // cut so the boundary with its counter stays within RFC 2046's 70 characters.
    assert_eq!(boundary_base("<>@ \r\n"), BOUNDARY_PREFIX);
    let long = boundary_base(&"m".repeat(200));
    assert_eq!(long.len() + 1 + BOUNDARY_COUNTER_DIGITS, BOUNDARY_MAX_BYTES);
}

#[test]
fn wrapping_folds_at_spaces_and_unfolds_back() {
    let words = "lorem ipsum dolor sit amet ".repeat(20);
    let text = words.trim_end();
    let mut out = Vec::new();
    push_wrapped(&mut out, "Diagnostic-Code: ", " ", text);
    let folded = String::from_utf8(out).unwrap();
    assert!(folded.ends_with("\r\n"));
    for line in folded.trim_end().split("\r\n") {
        assert!(line.len() <= LINE_PREFERRED_BYTES, "{line:?}");
        assert!(!line.trim().is_empty());
    }
    assert_eq!(
        unfold(folded.trim_end()),
        format!("Diagnostic-Code: {text}")
    );

    // A word longer than a line is split, within the hard limit.
    let word = "w".repeat(3 * LINE_MAX_BYTES);
    let mut out = Vec::new();
    push_wrapped(
        &mut out,
        "Final-Recipient: ",
        " ",
        &format!("rfc822; {word}"),
    );
    let folded = String::from_utf8(out).unwrap();
    for line in folded.trim_end().split("\r\n") {
        assert!(line.len() <= LINE_MAX_BYTES, "{}", line.len());
    }
    assert_eq!(
        unfold(folded.trim_end()).replace(' ', ""),
        format!("Final-Recipient:rfc822;{word}")
    );

    // Splitting respects UTF-8 character boundaries.
    let word = "\u{e9}".repeat(LINE_MAX_BYTES);
    let mut out = Vec::new();
    push_wrapped(&mut out, "", "    ", &word);
    let wrapped = String::from_utf8(out).expect("split inside a character");
    for line in wrapped.trim_end().split("\r\n") {
        assert!(line.len() <= LINE_MAX_BYTES);
    }

    // Short text: one line.
    let mut out = Vec::new();
    push_wrapped(&mut out, "Action: ", " ", "failed");
    assert_eq!(out, b"Action: failed\r\n");
}

#[test]
fn is_bounceable_refuses_only_the_null_sender() {
    let table: &[(&str, bool)] = &[
        ("", false),
        ("alice@example.com", true),
        ("MAILER-DAEMON@example.com", true),
        ("postmaster", true),
    ];
    for &(mail_from, expected) in table {
        assert_eq!(is_bounceable(mail_from), expected, "{mail_from:?}");
    }
}

#[test]
fn one_recipient_report_reads_as_expected() {
    let recipients = ONE_RECIPIENT;
    let original = b"From: Alice <alice@example.com>\r\nTo: bob@example.net\r\nSubject: lunch\r\n\r\nSee you at noon.\r\n";
    let dsn = build_dsn(&input(&recipients, original));
    let expected = "\
From: Mail Delivery System <MAILER-DAEMON@relay.example.org>\r
To: <alice@example.com>\r
Subject: Undelivered Mail Returned to Sender\r
Date: Thu, 29 Feb 2024 12:35:00 +0000\r
Message-ID: <dsn.Q0001@relay.example.org>\r
Auto-Submitted: auto-replied\r
MIME-Version: 1.0\r
Content-Type: multipart/report; report-type=delivery-status;\r
 boundary=\"=_tsubame_dsn_dsn.Q0001relay.example.org\"\r
\r
This is a MIME-encapsulated delivery status notification.\r
\r
--=_tsubame_dsn_dsn.Q0001relay.example.org\r
Content-Type: text/plain; charset=us-ascii\r
Content-Description: Notification\r
\r
This is the mail delivery system at relay.example.org.\r
\r
Your message could not be delivered to the recipients marked \"failed\" below.\r
This is a permanent error: it will not be retried for them.\r
\r
Queue ID: Q0001\r
Arrived:  Thu, 29 Feb 2024 12:33:20 +0000\r
\r
<bob@example.net>: failed (status 5.1.1)\r
    mx.example.net said: 550 5.1.1 <bob@example.net>: no such user\r
\r
The headers of your message are attached.\r
\r
--=_tsubame_dsn_dsn.Q0001relay.example.org\r
Content-Type: message/delivery-status\r
Content-Description: Delivery report\r
\r
Reporting-MTA: dns; relay.example.org\r
Arrival-Date: Thu, 29 Feb 2024 12:33:20 +0000\r
\r
Final-Recipient: rfc822; bob@example.net\r
Action: failed\r
Status: 5.1.1\r
Remote-MTA: dns; mx.example.net\r
Diagnostic-Code: smtp; 550 5.1.1 <bob@example.net>: no such user\r
Last-Attempt-Date: Thu, 29 Feb 2024 12:34:56 +0000\r
\r
--=_tsubame_dsn_dsn.Q0001relay.example.org\r
Content-Type: text/rfc822-headers\r
Content-Description: Undelivered message headers\r
\r
From: Alice <alice@example.com>\r
To: bob@example.net\r
Subject: lunch\r
\r
--=_tsubame_dsn_dsn.Q0001relay.example.org--\r
";
    assert_eq!(String::from_utf8(dsn.clone()).unwrap(), expected);
    assert_well_formed(&dsn);
    assert!(!needs_smtputf8(&input(&recipients, original)));
}

#[test]
fn several_recipients_get_one_group_each() {
    let recipients = [
        ONE_RECIPIENT[0],
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
            status: "not a status",
            remote_mta: None,
            diagnostic: Some("connection refused"),
            last_attempt_unix_ms: Some(0),
        },
    ];
    let dsn = build_dsn(&input(&recipients, b"Subject: x\r\n\r\n"));
    assert_well_formed(&dsn);
    let text = String::from_utf8(dsn.clone()).unwrap();
    assert!(text.contains("Subject: Undelivered Mail Returned to Sender\r\n"));
    let report = String::from_utf8(part_content(&dsn, 1)).unwrap();
    let groups: Vec<&str> = report.trim_end().split("\r\n\r\n").collect();
    assert_eq!(groups.len(), 4, "{report}");
    assert!(groups[0].starts_with("Reporting-MTA: dns; relay.example.org\r\n"));
    assert_eq!(
        groups[2],
        "Final-Recipient: rfc822; carol@example.net\r\nAction: delayed\r\nStatus: 4.4.1"
    );
    assert_eq!(
        groups[3],
        "Final-Recipient: rfc822; dave@example.org\r\nAction: failed\r\nStatus: 5.0.0\r\n\
         Diagnostic-Code: smtp; connection refused\r\n\
         Last-Attempt-Date: Thu, 01 Jan 1970 00:00:00 +0000"
    );
    let human = String::from_utf8(part_content(&dsn, 0)).unwrap();
    for expected in [
        "<bob@example.net>: failed (status 5.1.1)",
        "<carol@example.net>: delayed (status 4.4.1)\r\n    No remote server replied.",
        "<dave@example.org>: failed (status 5.0.0)\r\n    Reason: connection refused",
        "marked \"failed\"",
        "marked \"delayed\"",
    ] {
        assert!(human.contains(expected), "{expected:?} in {human}");
    }
}

#[test]
fn all_delayed_reports_say_so_in_the_subject() {
    let recipients = [DsnRecipient {
        address: "carol@example.net",
        action: DsnAction::Delayed,
        status: "4.4.1",
        remote_mta: Some("mx.example.net"),
        diagnostic: Some("421 4.4.1 try later"),
        last_attempt_unix_ms: Some(1_709_210_096_000),
    }];
    let dsn = build_dsn(&input(&recipients, b""));
    assert_well_formed(&dsn);
    let text = String::from_utf8(dsn.clone()).unwrap();
    assert!(text.contains("Subject: Delayed Mail (still being retried)\r\n"));
    let human = String::from_utf8(part_content(&dsn, 0)).unwrap();
    assert!(!human.contains("could not be delivered"), "{human}");
    assert!(!human.contains("permanent"), "{human}");
    assert!(human.contains("still being retried"));
    assert_eq!(part_content(&dsn, 2), b"");
}

#[test]
fn reply_text_cannot_inject_fields_or_parts() {
    let original = b"Subject: x\r\n\r\n";
    // The would-be boundary, so the injection would work if the boundary were not
    // checked against the diagnostic too.
    let base = boundary_base("dsn.Q0001@relay.example.org");
    let diagnostic = format!(
        "550 5.1.1 bad\r\nContent-Type: text/html\r\n\r\n--{base}\r\nX-Injected: yes\r\n\r\n<b>hi</b>\n.\r\n"
    );
    let recipients = [DsnRecipient {
        address: "evil@example.net\r\nX-Injected-Address: yes",
        action: DsnAction::Failed,
        status: "5.1.1\r\nX-Injected-Status: yes",
        remote_mta: Some("mx.example.net\r\nX-Injected-Remote: yes"),
        diagnostic: Some(&diagnostic),
        last_attempt_unix_ms: None,
    }];
    let mut dsn_input = input(&recipients, original);
    dsn_input.reporting_mta = "relay.example.org\r\nX-Injected-Reporting: yes";
    dsn_input.queue_id = "Q\r\nX-Injected-Queue: yes";
    let dsn = build_dsn(&dsn_input);
    assert_well_formed(&dsn);
    assert_ne!(boundary_of(&dsn), base);
    for line in crlf_lines(&dsn) {
        assert!(
            !line.starts_with(b"X-Injected"),
            "{:?}",
            String::from_utf8_lossy(line)
        );
        assert!(!line.starts_with(b"Content-Type: text/html"));
    }
    let report = String::from_utf8(part_content(&dsn, 1)).unwrap();
    let unfolded = unfold(&report);
    assert!(
        unfolded.contains(&format!(
            "Diagnostic-Code: smtp; 550 5.1.1 bad Content-Type: text/html --{base} \
             X-Injected: yes <b>hi</b> .\r\n"
        )),
        "{unfolded}"
    );
    assert!(
        unfolded.contains("Final-Recipient: rfc822; evil@example.net??X-Injected-Address: yes\r\n")
    );
    assert!(unfolded.contains("Status: 5.0.0\r\n"));
    assert!(unfolded.contains("Remote-MTA: dns; mx.example.net X-Injected-Remote: yes\r\n"));
}

#[test]
fn content_holding_the_boundary_moves_it() {
    let base = boundary_base("dsn.Q0001@relay.example.org");
    let original = format!(
        "Subject: x\r\nX-Trap: --{base}\r\nX-Trap-2: --{base}.0000000000000000--\r\n\r\n--{base}--\r\n"
    );
    let recipients = ONE_RECIPIENT;
    let dsn = build_dsn(&input(&recipients, original.as_bytes()));
    assert_well_formed(&dsn);
    assert_eq!(boundary_of(&dsn), format!("{base}.0000000000000001"));
    assert_eq!(
        part_content(&dsn, 2),
        format!("Subject: x\r\nX-Trap: --{base}\r\nX-Trap-2: --{base}.0000000000000000--\r\n")
            .as_bytes()
    );
}

#[test]
fn utf8_addresses_make_an_international_report() {
    let recipients = [
        DsnRecipient {
            address: "j\u{f6}rg@b\u{fc}cher.example",
            action: DsnAction::Failed,
            status: "5.1.1",
            remote_mta: Some("mx.b\u{fc}cher.example"),
            diagnostic: Some("550 5.1.1 unknown user j\u{f6}rg"),
            last_attempt_unix_ms: None,
        },
        ONE_RECIPIENT[0],
    ];
    let original = "Subject: Gr\u{fc}\u{df}e\r\n\r\nbody\r\n".as_bytes();
    let dsn_input = input(&recipients, original);
    assert!(needs_smtputf8(&dsn_input));
    let dsn = build_dsn(&dsn_input);
    assert_well_formed(&dsn);
    let text = String::from_utf8(dsn.clone()).unwrap();
    assert!(text.contains("\r\nContent-Type: message/global-delivery-status\r\n"));
    assert!(text.contains("\r\nContent-Type: message/global-headers\r\n"));
    assert!(text.contains("\r\nContent-Type: text/plain; charset=utf-8\r\n"));
    let report = String::from_utf8(part_content(&dsn, 1)).unwrap();
    assert!(report.contains("Final-Recipient: utf-8; j\u{f6}rg@b\u{fc}cher.example\r\n"));
    assert!(report.contains("Final-Recipient: rfc822; bob@example.net\r\n"));
    // Host names and replies stay ASCII even here.
    assert!(report.contains("Remote-MTA: dns; mx.b?cher.example\r\n"));
    assert!(report.contains("Diagnostic-Code: smtp; 550 5.1.1 unknown user j?rg\r\n"));
    assert_eq!(
        part_content(&dsn, 2),
        "Subject: Gr\u{fc}\u{df}e\r\n".as_bytes()
    );

    // A UTF-8 sender alone makes it international too, with the address in To:.
    let mut dsn_input = input(&ONE_RECIPIENT, b"");
    dsn_input.original_mail_from = "\u{7528}\u{6237}@example.cn";
    assert!(needs_smtputf8(&dsn_input));
    let text = String::from_utf8(build_dsn(&dsn_input)).unwrap();
    assert!(text.contains("\r\nTo: <\u{7528}\u{6237}@example.cn>\r\n"));
}

#[test]
fn ascii_reports_are_seven_bit_whatever_the_original_holds() {
    let recipients = ONE_RECIPIENT;
    let original = b"Subject: caf\xe9\r\nX-Nul: a\0b\r\n\r\n\xff\xfe";
    let dsn = build_dsn(&input(&recipients, original));
    assert_well_formed(&dsn);
    assert!(dsn.iter().all(|&byte| byte != 0 && byte < 0x80));
    assert_eq!(
        quoted_printable_decode(&part_content(&dsn, 2)),
        b"Subject: caf\xe9\r\nX-Nul: a\0b\r\n"
    );
}

/// Pieces that make collisions with the boundary, line-ending confusion and injection
/// likely when strung together at random.
fn hostile_fragment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("=_tsubame_dsn_dsn.Q0001relay.example.org".to_owned()),
        Just(".0000000000000000".to_owned()),
        Just(".0000000000000001".to_owned()),
        Just("--".to_owned()),
        Just("\r\n".to_owned()),
        Just("\n".to_owned()),
        Just("\r".to_owned()),
        Just("\r\n\r\n".to_owned()),
        Just("Content-Type: text/html".to_owned()),
        Just(" ".to_owned()),
        Just("\0".to_owned()),
        Just("\u{e9}".to_owned()),
        "[a-z]{1,200}",
        any::<String>(),
    ]
}

fn hostile_text() -> impl Strategy<Value = String> {
    proptest::collection::vec(hostile_fragment(), 0..12).prop_map(|pieces| pieces.concat())
}

proptest! {
    #[test]
    fn any_input_gives_a_well_formed_report(
        international in any::<bool>(),
        local_part in "[!-~]{1,64}",
        address_noise in hostile_text(),
        diagnostic in proptest::option::of(hostile_text()),
        remote_mta in proptest::option::of(hostile_text()),
        status in hostile_text(),
        queue_id in hostile_text(),
        original in hostile_text(),
        original_bytes in proptest::collection::vec(any::<u8>(), 0..300),
        delayed in any::<bool>(),
        now_unix_ms in any::<u64>(),
    ) {
        let address = if international {
            format!("{local_part}\u{e9}{address_noise}@example.net")
        } else {
            format!("{local_part}{}@example.net", address_noise.replace(|c: char| !c.is_ascii(), ""))
        };
        let recipients = [
            DsnRecipient {
                address: &address,
                action: if delayed { DsnAction::Delayed } else { DsnAction::Failed },
                status: &status,
                remote_mta: remote_mta.as_deref(),
                diagnostic: diagnostic.as_deref(),
                last_attempt_unix_ms: Some(now_unix_ms / 2),
            },
            ONE_RECIPIENT[0],
        ];
        let original = [original.as_bytes(), &original_bytes].concat();
        let mut dsn_input = input(&recipients, &original);
        dsn_input.queue_id = &queue_id;
        dsn_input.now_unix_ms = now_unix_ms;
        prop_assert_eq!(needs_smtputf8(&dsn_input), international);
        let dsn = build_dsn(&dsn_input);
        assert_well_formed(&dsn);
        if international {
            prop_assert!(std::str::from_utf8(&dsn).is_ok());
        } else {
            prop_assert!(dsn.iter().all(|&byte| byte != 0 && byte < 0x80));
        }
        let report = String::from_utf8(part_content(&dsn, 1)).unwrap();
        let groups: Vec<&str> = report.trim_end().split("\r\n\r\n").collect();
        prop_assert_eq!(groups.len(), 3);
        for group in &groups[1..] {
            let names: Vec<&str> = group
                .split("\r\n")
                .filter(|line| !line.starts_with(' '))
                .map(|line| line.split(':').next().unwrap())
                .collect();
            prop_assert!(names.starts_with(&["Final-Recipient", "Action", "Status"]), "{:?}", names);
            for name in names {
                prop_assert!(
                    ["Final-Recipient", "Action", "Status", "Remote-MTA", "Diagnostic-Code", "Last-Attempt-Date"].contains(&name),
                    "{:?}", name
                );
            }
        }
    }
}

#[test]
fn runs_of_spaces_after_a_long_word_never_pass_the_line_limit() {
    // A word that fills a line to the maximum, then spaces, then more words: the spaces
    // must fold, not grow the line (the dsn fuzz target's crash, reduced).
    for first in [LINE_MAX_BYTES - 1, LINE_MAX_BYTES, LINE_MAX_BYTES + 7] {
        let text = format!("{}{}tail word", "+".repeat(first), " ".repeat(30));
        for (first_prefix, continuation) in [("", "    "), ("Final-Recipient: ", " ")] {
            let mut out = Vec::new();
            push_wrapped(&mut out, first_prefix, continuation, &text);
            for line in out.split(|&byte| byte == b'\n') {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                assert!(
                    line.len() <= LINE_MAX_BYTES,
                    "a line of {} bytes ({first} then spaces, prefix {first_prefix:?})",
                    line.len()
                );
            }
            let written = String::from_utf8(out).expect("UTF-8");
            assert!(written.ends_with("tail word\r\n"), "{written:?}");
            assert_eq!(
                written.matches('+').count(),
                first,
                "the word is kept whole"
            );
        }
    }
}
