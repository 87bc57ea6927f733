//! SMTP smuggling: DATA ends at `<CRLF>.<CRLF>` and nothing else, and what is stored can
//! never be read as two messages downstream.
//!
//! Each case hides a lone dot between sloppy line endings, followed by a whole second
//! transaction. The server must not end DATA there (no reply at all), must end it at the
//! real terminator that follows (exactly one 250), and must store the bytes with every
//! bare CR and bare LF turned into CRLF and the lone dot kept as a `.` line, which a
//! relaying client stuffs to `..` (crates/smtp-proto/src/data.rs).

use std::time::Duration;

use tsubame_tests::cli::{inspect, show};
use tsubame_tests::process::hard_limit;
use tsubame_tests::server::{Server, ServerOptions};
use tsubame_tests::smtp::RawClient;
use tsubame_tests::{assert_bytes_eq, escape};

/// The smuggled second transaction.
const SMUGGLED: &[u8] = b"MAIL FROM:<spoofed@bank.example>\r\nRCPT TO:<victim@example.net>\r\n\
DATA\r\nFrom: ceo@bank.example\r\n\r\nwire the money\r\n";

/// Sequences that contain a dot between line endings but are not `<CRLF>.<CRLF>`.
/// Every one becomes a `.` line between CRLFs.
const CASES: &[(&str, &[u8])] = &[
    ("<LF>.<LF>", b"\n.\n"),
    ("<CR>.<CR>", b"\r.\r"),
    ("<CR>.<LF>", b"\r.\n"),
    ("<LF>.<CR><LF>", b"\n.\r\n"),
    ("<CR><LF>.<LF>", b"\r\n.\n"),
    ("<CR><LF>.<CR>", b"\r\n.\r"),
    ("<LF>.<CR>", b"\n.\r"),
];

/// What the server must store for `before` + case + SMUGGLED + `after` CRLF.
fn expected_content() -> Vec<u8> {
    let mut expected = b"Subject: smuggling\r\n\r\nbefore\r\n.\r\n".to_vec();
    expected.extend_from_slice(SMUGGLED);
    expected.extend_from_slice(b"after\r\n");
    expected
}

/// A correct relaying client's view of stored content: it must contain no bare CR or
/// bare LF, and once every line that starts with "." is stuffed again, no line break
/// may be followed by a lone dot and a line break of any kind: no downstream server,
/// however lax about line endings, could find an end of data inside it.
#[track_caller]
fn assert_relay_safe(stored: &[u8], what: &str) {
    for (index, byte) in stored.iter().enumerate() {
        let previous = index.checked_sub(1).and_then(|i| stored.get(i));
        let next = stored.get(index + 1);
        match byte {
            b'\r' => assert!(
                next == Some(&b'\n'),
                "{what}: bare CR at byte {index} in \"{}\"",
                escape(stored)
            ),
            b'\n' => assert!(
                previous == Some(&b'\r'),
                "{what}: bare LF at byte {index} in \"{}\"",
                escape(stored)
            ),
            _ => {}
        }
    }
    assert!(
        stored.is_empty() || stored.ends_with(b"\r\n"),
        "{what}: stored content does not end with CRLF: \"{}\"",
        escape(stored)
    );
    let mut restuffed = Vec::new();
    for line in stored.split_inclusive(|byte| *byte == b'\n') {
        if line.first() == Some(&b'.') {
            restuffed.push(b'.');
        }
        restuffed.extend_from_slice(line);
    }
    for pattern in [&b"\n.\r"[..], b"\n.\n", b"\r.\r", b"\r.\n"] {
        assert!(
            !restuffed
                .windows(pattern.len())
                .any(|window| window == pattern),
            "{what}: re-stuffed content still holds \"{}\": \"{}\"",
            escape(pattern),
            escape(&restuffed)
        );
    }
}

/// Opens a transaction up to the 354.
fn start_data(server: &Server) -> RawClient {
    let mut client = RawClient::connect(server.address());
    client.hello();
    client.command_expect("MAIL FROM:<honest@example.com>", 250, "2.1.0");
    client.command_expect("RCPT TO:<friend@example.net>", 250, "2.1.5");
    assert_eq!(client.command("DATA").code, 354);
    client
}

/// Ends the session and checks no reply to a smuggled command ever came.
#[track_caller]
fn finish(client: &mut RawClient, case: &str) -> String {
    let id = client
        .expect(250, "2.0.0", &format!("{case}: the real end of data"))
        .queued_id()
        .unwrap_or_else(|| panic!("{case}: no queued id"));
    // The next reply must answer our QUIT, not a smuggled command.
    client.command_expect("QUIT", 221, "2.0.0");
    client.expect_closed(Duration::from_secs(5), case);
    id
}

#[test]
fn smuggled_end_of_data_sequences_do_not_end_data() {
    let _limit = hard_limit(Duration::from_secs(120));
    let server = Server::start(&ServerOptions::new());
    let mut ids = Vec::new();
    for (case, sequence) in CASES {
        // Two writes: the smuggling attempt, a pause in which no reply may come, then
        // the real terminator.
        let mut client = start_data(&server);
        let mut wire = b"Subject: smuggling\r\n\r\nbefore".to_vec();
        wire.extend_from_slice(sequence);
        wire.extend_from_slice(SMUGGLED);
        client.send(&wire);
        client.assert_silent(
            Duration::from_millis(500),
            &format!("{case}: DATA must not end at the smuggled dot"),
        );
        client.send(b"after\r\n.\r\n");
        let id = finish(&mut client, case);
        let stored = show(server.spool(), &id).content;
        assert_bytes_eq(
            tsubame_tests::without_received(&stored),
            &expected_content(),
            &format!("{case} (two writes)"),
        );
        assert_relay_safe(&stored, case);
        ids.push(id);

        // One write: smuggling attempt and real terminator together.
        let mut client = start_data(&server);
        let mut wire = b"Subject: smuggling\r\n\r\nbefore".to_vec();
        wire.extend_from_slice(sequence);
        wire.extend_from_slice(SMUGGLED);
        wire.extend_from_slice(b"after\r\n.\r\n");
        client.send(&wire);
        let id = finish(&mut client, case);
        let stored = show(server.spool(), &id).content;
        assert_bytes_eq(
            tsubame_tests::without_received(&stored),
            &expected_content(),
            &format!("{case} (one write)"),
        );
        assert_relay_safe(&stored, case);
        ids.push(id);
    }
    // Exactly one message per transaction: nothing smuggled into the spool.
    let inspection = inspect(server.spool());
    assert_eq!(
        inspection.messages().len(),
        ids.len(),
        "{}",
        inspection.json
    );
    for message in inspection.messages() {
        assert_eq!(message["from"], "honest@example.com", "{message}");
    }
}

#[test]
fn lone_dot_with_bare_lf_right_after_data_does_not_end_it() {
    let _limit = hard_limit(Duration::from_secs(60));
    let server = Server::start(&ServerOptions::new());
    // The CRLF that ends the DATA command counts as the CRLF before the content: a
    // first line of "." + LF is `<CRLF>.<LF>`, not an end of data.
    for (case, first_line) in [
        ("<CRLF of DATA>.<LF>", &b".\n"[..]),
        ("<CRLF of DATA>.<CR>", b".\r"),
    ] {
        let mut client = start_data(&server);
        let mut wire = first_line.to_vec();
        wire.extend_from_slice(SMUGGLED);
        client.send(&wire);
        client.assert_silent(Duration::from_millis(500), case);
        client.send(b"after\r\n.\r\n");
        let id = finish(&mut client, case);
        let mut expected = b".\r\n".to_vec();
        expected.extend_from_slice(SMUGGLED);
        expected.extend_from_slice(b"after\r\n");
        let stored = show(server.spool(), &id).content;
        assert_bytes_eq(tsubame_tests::without_received(&stored), &expected, case);
        assert_relay_safe(&stored, case);
    }
}

#[test]
fn stuffed_dot_lines_with_bare_line_endings_are_unstuffed_and_safe() {
    let _limit = hard_limit(Duration::from_secs(60));
    let server = Server::start(&ServerOptions::new());
    let mut client = start_data(&server);
    // `..` after a bare LF is a stuffed lone dot; `..x` after a bare CR a stuffed `.x`.
    client.send(b"Subject: stuffed\r\n\r\na\n..\nb\r..x\rc\r\n.\r\n");
    let id = finish(&mut client, "stuffed dots after bare line endings");
    let stored = show(server.spool(), &id).content;
    assert_bytes_eq(
        tsubame_tests::without_received(&stored),
        b"Subject: stuffed\r\n\r\na\r\n.\r\nb\r\n.x\r\nc\r\n",
        "unstuffed content",
    );
    assert_relay_safe(&stored, "stuffed dots");
}
