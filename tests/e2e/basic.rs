//! The main flows: a message sent by smtplib, by swaks, pipelined, with dots, 8-bit,
//! UTF-8 and BDAT, each checked through `spool inspect --json` and `--show`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tsubame_tests::cli::{inspect, show};
use tsubame_tests::peers::{Smtplib, swaks, swaks_queued_id, swaks_sent_content};
use tsubame_tests::process::hard_limit;
use tsubame_tests::server::{Server, ServerOptions};
use tsubame_tests::smtp::RawClient;
use tsubame_tests::{assert_bytes_eq, crlf};

use crate::{assert_spool_ids, test_message};

fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

#[test]
fn smtplib_message_is_spooled_with_its_envelope_and_exact_content() {
    let _limit = hard_limit(Duration::from_secs(60));
    let server = Server::start(&ServerOptions::new());
    let message = test_message(
        "smtplib-basic",
        "Hello from smtplib.\n\nA second paragraph\twith a tab.\n",
    );
    let before_ms = unix_ms_now();
    let outcomes = Smtplib::new(server.address())
        .ehlo()
        .mail("sender@example.com", &[])
        .rcpt("first@example.net", &[])
        .rcpt("second@example.org", &[])
        .data(&message)
        .quit()
        .run();
    let after_ms = unix_ms_now();
    assert_eq!(outcomes.len(), 6, "{outcomes:?}");
    outcomes[1].expect(250, "2.1.0", "MAIL");
    outcomes[2].expect(250, "2.1.5", "RCPT 1");
    outcomes[3].expect(250, "2.1.5", "RCPT 2");
    outcomes[4].expect(250, "2.0.0", "DATA");
    assert!(
        outcomes[4].message.contains("Ok: queued as "),
        "{:?}",
        outcomes[4]
    );
    assert_eq!(outcomes[5].code, Some(221), "QUIT: {:?}", outcomes[5]);
    let id = outcomes[4].queued_id();

    let inspection = inspect(server.spool());
    assert_eq!(
        inspection.exit_code(),
        Some(0),
        "{}",
        inspection.run.describe()
    );
    assert_eq!(inspection.ids(), vec![id.clone()]);
    assert!(inspection.quarantined().is_empty());
    let listed = inspection.expect_message(&id);
    assert_eq!(listed["from"], "sender@example.com");
    assert_eq!(
        listed["recipients"],
        serde_json::json!(["first@example.net", "second@example.org"])
    );
    assert_eq!(listed["helo"], "peer.tsubame.test");
    assert_eq!(listed["parameters"], "");
    assert_eq!(listed["state"], "queued");
    assert!(
        listed["client"]
            .as_str()
            .is_some_and(|client| client.starts_with("127.0.0.1:")),
        "client: {}",
        listed["client"]
    );
    let received = listed["received_at_unix_ms"].as_u64().unwrap_or(0);
    assert!(
        (before_ms.saturating_sub(1000)..=after_ms + 1000).contains(&received),
        "received_at_unix_ms {received} is outside the send window {before_ms}..{after_ms}"
    );

    let shown = show(server.spool(), &id);
    assert_bytes_eq(
        tsubame_tests::without_received(&shown.content),
        &message,
        "stored content",
    );
    // The size is of what was stored: tsubame's Received header and the content.
    assert_eq!(listed["size_bytes"], shown.content.len() as u64);
    assert_eq!(shown.field("id"), vec![id.as_str()]);
    assert_eq!(shown.field("from"), vec!["<sender@example.com>"]);
    assert_eq!(
        shown.field("to"),
        vec!["<first@example.net>", "<second@example.org>"]
    );

    // `--show ID --json` carries the same content in "body".
    let spool = server.spool().display().to_string();
    let json_show = tsubame_tests::cli::tsubame(&[
        "spool", "inspect", "--spool", &spool, "--show", &id, "--json",
    ]);
    json_show.assert_code(0);
    let value: serde_json::Value = serde_json::from_slice(&json_show.stdout)
        .unwrap_or_else(|error| panic!("--show --json: {error}: {}", json_show.describe()));
    assert_eq!(value["id"], id.as_str());
    assert_eq!(
        value["body"].as_str().map(str::as_bytes),
        Some(shown.content.as_slice())
    );
}

#[test]
fn smtplib_sendmail_sends_size_and_is_spooled() {
    let _limit = hard_limit(Duration::from_secs(60));
    let server = Server::start(&ServerOptions::new());
    let message = test_message("smtplib-sendmail", "Sent with SMTP.sendmail().\n");
    let outcomes = Smtplib::new(server.address())
        .sendmail(
            "sendmail@example.com",
            &["a@example.net", "b@example.net"],
            &message,
            &[],
        )
        .quit()
        .run();
    assert_eq!(
        outcomes[0].code,
        Some(250),
        "sendmail raised: {:?}",
        outcomes[0]
    );
    let inspection = inspect(server.spool());
    assert_eq!(inspection.messages().len(), 1, "{}", inspection.json);
    let listed = &inspection.messages()[0];
    assert_eq!(listed["from"], "sendmail@example.com");
    assert_eq!(
        listed["recipients"],
        serde_json::json!(["a@example.net", "b@example.net"])
    );
    // smtplib adds SIZE= because the server advertises SIZE.
    assert_eq!(listed["parameters"], format!("SIZE={}", message.len()));
    let id = listed["id"].as_str().unwrap_or_default().to_string();
    assert_bytes_eq(
        tsubame_tests::without_received(&show(server.spool(), &id).content),
        &message,
        "stored content",
    );
}

#[test]
fn swaks_message_is_spooled_with_its_envelope_and_exact_content() {
    let _limit = hard_limit(Duration::from_secs(60));
    let server = Server::start(&ServerOptions::new());
    let scratch = tempfile::tempdir().unwrap();
    let body_file = scratch.path().join("body.txt");
    std::fs::write(
        &body_file,
        "Body from swaks.\n.a line that starts with a dot\n..two dots\n.\nlast line\n",
    )
    .unwrap();
    let server_argument = server.address().to_string();
    let body_argument = format!("@{}", body_file.display());
    let run = swaks(&[
        "--server",
        &server_argument,
        "--helo",
        "swaks.tsubame.test",
        "--from",
        "swaks@example.com",
        "--to",
        "one@example.net,two@example.org",
        "--header",
        "Subject: from swaks",
        "--body",
        &body_argument,
        "--pipeline",
    ]);
    run.assert_code(0);
    let transcript = run.stdout_text();
    let id = swaks_queued_id(&transcript);
    let sent = swaks_sent_content(&transcript);
    assert!(
        sent.windows(17)
            .any(|window| window == b"Body from swaks.\r"),
        "swaks did not send the body file: {transcript}"
    );

    let inspection = inspect(server.spool());
    assert_eq!(inspection.ids(), vec![id.clone()], "{}", inspection.json);
    let listed = inspection.expect_message(&id);
    assert_eq!(listed["from"], "swaks@example.com");
    assert_eq!(
        listed["recipients"],
        serde_json::json!(["one@example.net", "two@example.org"])
    );
    assert_eq!(listed["helo"], "swaks.tsubame.test");
    let shown = show(server.spool(), &id);
    assert_eq!(listed["size_bytes"], shown.content.len() as u64);
    assert_bytes_eq(
        tsubame_tests::without_received(&shown.content),
        &sent,
        "stored content vs what swaks sent",
    );
    // The dot lines came back unstuffed.
    let content = String::from_utf8_lossy(&shown.content);
    assert!(
        content.contains("\r\n.a line that starts with a dot\r\n..two dots\r\n.\r\nlast line\r\n"),
        "{content:?}"
    );
}

#[test]
fn pipelined_transaction_in_one_write_gets_every_reply_in_order() {
    let _limit = hard_limit(Duration::from_secs(60));
    let server = Server::start(&ServerOptions::new());
    let mut client = RawClient::connect(server.address());
    let first = crlf("Subject: pipelined one\n\nfirst body\n");
    let second = crlf("Subject: pipelined two\n\nsecond body\n");
    let mut wire = Vec::new();
    wire.extend_from_slice(
        b"EHLO pipeliner.tsubame.test\r\nMAIL FROM:<p@example.com>\r\nRCPT TO:<r1@example.net>\r\n\
          RCPT TO:<r2@example.net>\r\nDATA\r\n",
    );
    wire.extend_from_slice(&first);
    wire.extend_from_slice(
        b".\r\nNOOP\r\nMAIL FROM:<q@example.com>\r\nRCPT TO:<r3@example.net>\r\nDATA\r\n",
    );
    wire.extend_from_slice(&second);
    wire.extend_from_slice(b".\r\nQUIT\r\n");
    client.send(&wire);

    client.greeting();
    let ehlo = client.reply();
    assert_eq!(ehlo.code, 250, "EHLO: {ehlo}");
    assert!(ehlo.lines.iter().any(|line| line == "PIPELINING"), "{ehlo}");
    client.expect(250, "2.1.0", "MAIL 1");
    client.expect(250, "2.1.5", "RCPT 1");
    client.expect(250, "2.1.5", "RCPT 2");
    let start = client.reply();
    assert_eq!(start.code, 354, "DATA 1: {start}");
    let first_id = client
        .expect(250, "2.0.0", "end of message 1")
        .queued_id()
        .expect("queued id of message 1");
    client.expect(250, "2.0.0", "NOOP");
    client.expect(250, "2.1.0", "MAIL 2");
    client.expect(250, "2.1.5", "RCPT 3");
    let start = client.reply();
    assert_eq!(start.code, 354, "DATA 2: {start}");
    let second_id = client
        .expect(250, "2.0.0", "end of message 2")
        .queued_id()
        .expect("queued id of message 2");
    client.expect(221, "2.0.0", "QUIT");
    client.expect_closed(Duration::from_secs(5), "after QUIT");
    assert_ne!(first_id, second_id);

    assert_spool_ids(server.spool(), &[&first_id, &second_id]);
    assert_bytes_eq(
        tsubame_tests::without_received(&show(server.spool(), &first_id).content),
        &first,
        "message 1",
    );
    assert_bytes_eq(
        tsubame_tests::without_received(&show(server.spool(), &second_id).content),
        &second,
        "message 2",
    );
    let inspection = inspect(server.spool());
    assert_eq!(
        inspection.expect_message(&first_id)["recipients"],
        serde_json::json!(["r1@example.net", "r2@example.net"])
    );
}

#[test]
fn ehlo_advertises_the_extensions() {
    let _limit = hard_limit(Duration::from_secs(60));
    let server = Server::start(&ServerOptions::new().config(
        "[server]\nhostname = \"relay.tsubame.test\"\n\n[[listener]]\naddress = \"127.0.0.1:0\"\n\n\
         [limits]\nmax_message_size_bytes = 123456\n",
    ));
    let mut client = RawClient::connect(server.address());
    let greeting = client.greeting();
    assert!(
        greeting.text().starts_with("relay.tsubame.test"),
        "greeting names the configured host: {greeting}"
    );
    let ehlo = client.command("EHLO client.tsubame.test");
    assert_eq!(ehlo.code, 250, "{ehlo}");
    for extension in [
        "PIPELINING",
        "SIZE 123456",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "CHUNKING",
        "HELP",
    ] {
        assert!(
            ehlo.lines.iter().any(|line| line == extension),
            "EHLO does not advertise {extension:?}: {ehlo}"
        );
    }
    let help = client.command("HELP");
    assert_eq!(help.code, 214, "{help}");
    client.command_expect("QUIT", 221, "2.0.0");
}

#[test]
fn dot_lines_arrive_unstuffed_byte_exact() {
    let _limit = hard_limit(Duration::from_secs(60));
    let server = Server::start(&ServerOptions::new());
    // smtplib stuffs every line that starts with "." (RFC 5321 §4.5.2); the server must
    // hand back exactly these lines.
    let message = crlf("Subject: dots\n\n.\n..foo\n.bar\n..\n...\n. space\nend\n.\n");
    let id = crate::send_with_smtplib(server.address(), &message);
    assert_bytes_eq(
        tsubame_tests::without_received(&show(server.spool(), &id).content),
        &message,
        "dot-transparent content",
    );

    // The same through a raw client that stuffs by hand, including a dot line first.
    let mut client = RawClient::connect(server.address());
    client.hello();
    client.command_expect("MAIL FROM:<raw@example.com>", 250, "2.1.0");
    client.command_expect("RCPT TO:<raw@example.net>", 250, "2.1.5");
    assert_eq!(client.command("DATA").code, 354);
    client.send(b"..first\r\n..\r\n...two\r\nplain\r\n.\r\n");
    let raw_id = client
        .expect(250, "2.0.0", "end of data")
        .queued_id()
        .expect("queued id");
    client.command_expect("QUIT", 221, "2.0.0");
    assert_bytes_eq(
        tsubame_tests::without_received(&show(server.spool(), &raw_id).content),
        b".first\r\n.\r\n..two\r\nplain\r\n",
        "unstuffed raw content",
    );
}

#[test]
fn bare_lf_and_bare_cr_in_content_are_stored_as_crlf() {
    let _limit = hard_limit(Duration::from_secs(60));
    let server = Server::start(&ServerOptions::new());
    // smtplib passes bytes through as given (it only fixes line endings of str input).
    let sent = b"Subject: line endings\n\nlf line\nanother\rcr line\r\ncrlf line\n\nend";
    let outcomes = Smtplib::new(server.address())
        .ehlo()
        .mail("eol@example.com", &[])
        .rcpt("eol@example.net", &[])
        .data(sent)
        .run();
    outcomes[3].expect(250, "2.0.0", "DATA");
    let id = outcomes[3].queued_id();
    assert_bytes_eq(
        tsubame_tests::without_received(&show(server.spool(), &id).content),
        b"Subject: line endings\r\n\r\nlf line\r\nanother\r\ncr line\r\ncrlf line\r\n\r\nend\r\n",
        "normalised content",
    );
}

#[test]
fn eight_bit_body_with_body_8bitmime_is_stored_byte_exact() {
    let _limit = hard_limit(Duration::from_secs(60));
    let server = Server::start(&ServerOptions::new());
    let mut message = crlf(
        "Subject: 8bit\nMIME-Version: 1.0\nContent-Type: text/plain; charset=iso-8859-1\n\
         Content-Transfer-Encoding: 8bit\n\n",
    );
    message.extend_from_slice(b"caf\xe9 \xfcber na\xefve\r\n");
    // Every 8-bit byte value, 32 to a line.
    for line in (0x80_u8..=0xff).collect::<Vec<u8>>().chunks(32) {
        message.extend_from_slice(line);
        message.extend_from_slice(b"\r\n");
    }
    // Invalid UTF-8 and a NUL-free control mix.
    message.extend_from_slice(b"\xc3\x28 \xff\xfe\x01\x7f end\r\n");
    let outcomes = Smtplib::new(server.address())
        .sendmail(
            "eight@example.com",
            &["bits@example.net"],
            &message,
            &["BODY=8BITMIME"],
        )
        .quit()
        .run();
    assert_eq!(outcomes[0].code, Some(250), "{:?}", outcomes[0]);
    let inspection = inspect(server.spool());
    assert_eq!(inspection.messages().len(), 1, "{}", inspection.json);
    let listed = &inspection.messages()[0];
    let parameters = listed["parameters"].as_str().unwrap_or_default();
    assert!(
        parameters
            .split(' ')
            .any(|parameter| parameter == "BODY=8BITMIME"),
        "parameters: {parameters:?}"
    );
    let id = listed["id"].as_str().unwrap_or_default().to_string();
    assert_bytes_eq(
        tsubame_tests::without_received(&show(server.spool(), &id).content),
        &message,
        "8-bit content",
    );
}

#[test]
fn smtputf8_addresses_and_content_are_stored_exactly() {
    let _limit = hard_limit(Duration::from_secs(60));
    let server = Server::start(&ServerOptions::new());
    let from = "jörg.müller@bücher.example";
    let to = ["ユーザー@例え.jp", "δοκιμή@παράδειγμα.δοκιμή"];
    let message = tsubame_tests::crlf(
        "From: Jörg <jörg.müller@bücher.example>\nTo: ユーザー@例え.jp\nSubject: ✉ héllo\n\
         MIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n\nこんにちは, мир! 🦀\n",
    );
    let outcomes = Smtplib::new(server.address())
        .sendmail(from, &to, &message, &["SMTPUTF8"])
        .quit()
        .run();
    assert_eq!(outcomes[0].code, Some(250), "{:?}", outcomes[0]);
    let inspection = inspect(server.spool());
    assert_eq!(inspection.messages().len(), 1, "{}", inspection.json);
    let listed = &inspection.messages()[0];
    assert_eq!(listed["from"], from);
    assert_eq!(listed["recipients"], serde_json::json!(to));
    let parameters = listed["parameters"].as_str().unwrap_or_default();
    assert!(
        parameters
            .split(' ')
            .any(|parameter| parameter == "SMTPUTF8"),
        "parameters: {parameters:?}"
    );
    let id = listed["id"].as_str().unwrap_or_default().to_string();
    let shown = show(server.spool(), &id);
    assert_bytes_eq(
        tsubame_tests::without_received(&shown.content),
        &message,
        "UTF-8 content",
    );
    assert_eq!(shown.field("from"), vec![format!("<{from}>").as_str()]);
}

#[test]
fn non_ascii_address_without_smtputf8_is_refused() {
    let _limit = hard_limit(Duration::from_secs(60));
    let server = Server::start(&ServerOptions::new());
    let mut client = RawClient::connect(server.address());
    client.hello();
    client.command_expect("MAIL FROM:<jörg@example.com>", 553, "5.6.7");
    client.command_expect("MAIL FROM:<ascii@example.com>", 250, "2.1.0");
    client.command_expect("RCPT TO:<ユーザー@example.jp>", 553, "5.6.7");
    client.command_expect("RCPT TO:<ascii@example.jp>", 250, "2.1.5");
    client.command_expect("QUIT", 221, "2.0.0");
    assert_spool_ids(server.spool(), &[]);
}

#[test]
fn commands_out_of_sequence_get_503() {
    let _limit = hard_limit(Duration::from_secs(60));
    let server = Server::start(&ServerOptions::new());
    let mut client = RawClient::connect(server.address());
    client.greeting();
    client.command_expect("MAIL FROM:<early@example.com>", 503, "5.5.1");
    assert_eq!(client.command("EHLO late.tsubame.test").code, 250);
    client.command_expect("RCPT TO:<r@example.net>", 503, "5.5.1");
    client.command_expect("DATA", 503, "5.5.1");
    client.command_expect("MAIL FROM:<a@example.com>", 250, "2.1.0");
    client.command_expect("MAIL FROM:<b@example.com>", 503, "5.5.1");
    client.command_expect("QUIT", 221, "2.0.0");
}

#[test]
fn vrfy_answers_252() {
    let _limit = hard_limit(Duration::from_secs(60));
    let server = Server::start(&ServerOptions::new());
    let outcomes = Smtplib::new(server.address())
        .ehlo()
        .verify("postmaster")
        .noop()
        .rset()
        .quit()
        .run();
    assert_eq!(outcomes[1].code, Some(252), "VRFY: {:?}", outcomes[1]);
    outcomes[2].expect(250, "2.0.0", "NOOP");
    outcomes[3].expect(250, "2.0.0", "RSET");
}

/// swaks 20201014 (Debian's) has no BDAT/CHUNKING support (its source never mentions
/// BDAT) and smtplib has none either, so CHUNKING is driven from a raw socket.
#[test]
fn bdat_chunks_are_stored_without_unstuffing() {
    let _limit = hard_limit(Duration::from_secs(60));
    let server = Server::start(&ServerOptions::new());
    let mut client = RawClient::connect(server.address());
    let ehlo = client.hello();
    assert!(ehlo.lines.iter().any(|line| line == "CHUNKING"), "{ehlo}");
    client.command_expect("MAIL FROM:<chunks@example.com>", 250, "2.1.0");
    client.command_expect("RCPT TO:<chunks@example.net>", 250, "2.1.5");
    // Chunk 1 ends between CR and LF; chunk 2 starts with the LF and holds lines that
    // would be stuffed or end DATA under DATA rules: BDAT stores them as they are.
    let chunk_one = b"Subject: bdat\r\n\r\nfirst chunk\r";
    let chunk_two = b"\n.hidden\r\n.\r\n..two\r\n";
    let chunk_three = b"bare lf\nend\r\n";
    let mut wire = format!("BDAT {}\r\n", chunk_one.len()).into_bytes();
    wire.extend_from_slice(chunk_one);
    client.send(&wire);
    let reply = client.expect(250, "2.0.0", "BDAT chunk 1");
    assert!(
        reply.text().contains(&chunk_one.len().to_string()),
        "{reply}"
    );
    let mut wire = format!("BDAT {}\r\n", chunk_two.len()).into_bytes();
    wire.extend_from_slice(chunk_two);
    wire.extend_from_slice(format!("BDAT {}\r\n", chunk_three.len()).as_bytes());
    wire.extend_from_slice(chunk_three);
    wire.extend_from_slice(b"BDAT 0 LAST\r\n");
    client.send(&wire);
    client.expect(250, "2.0.0", "BDAT chunk 2");
    client.expect(250, "2.0.0", "BDAT chunk 3");
    let first_id = client
        .expect(250, "2.0.0", "BDAT 0 LAST")
        .queued_id()
        .expect("queued id after BDAT LAST");

    // A one-chunk message with LAST, pipelined with everything else in one write.
    let single = b"Subject: single chunk\r\n\r\n.\r\nonly chunk\r\n";
    let mut wire = b"MAIL FROM:<one@example.com>\r\nRCPT TO:<one@example.net>\r\n".to_vec();
    wire.extend_from_slice(format!("BDAT {} LAST\r\n", single.len()).as_bytes());
    wire.extend_from_slice(single);
    wire.extend_from_slice(b"QUIT\r\n");
    client.send(&wire);
    client.expect(250, "2.1.0", "MAIL");
    client.expect(250, "2.1.5", "RCPT");
    let second_id = client
        .expect(250, "2.0.0", "BDAT LAST")
        .queued_id()
        .expect("queued id of the single chunk");
    client.expect(221, "2.0.0", "QUIT");

    assert_spool_ids(server.spool(), &[&first_id, &second_id]);
    assert_bytes_eq(
        tsubame_tests::without_received(&show(server.spool(), &first_id).content),
        b"Subject: bdat\r\n\r\nfirst chunk\r\n.hidden\r\n.\r\n..two\r\nbare lf\r\nend\r\n",
        "BDAT content (CRLF split across chunks, no unstuffing, bare LF normalised)",
    );
    assert_bytes_eq(
        tsubame_tests::without_received(&show(server.spool(), &second_id).content),
        single,
        "single BDAT chunk",
    );
}

#[test]
fn bdat_without_transaction_is_refused_after_reading_the_chunk() {
    let _limit = hard_limit(Duration::from_secs(60));
    let server = Server::start(&ServerOptions::new());
    let mut client = RawClient::connect(server.address());
    client.hello();
    // RFC 3030 §3: the chunk's bytes follow whatever the reply; they must not be read
    // as commands. The chunk holds text that would be a command.
    let chunk = b"MAIL FROM:<smuggled@example.com>\r\n";
    let mut wire = format!("BDAT {} LAST\r\n", chunk.len()).into_bytes();
    wire.extend_from_slice(chunk);
    wire.extend_from_slice(b"NOOP\r\n");
    client.send(&wire);
    let refused = client.reply();
    assert_eq!(refused.code, 503, "BDAT without MAIL: {refused}");
    client.expect(250, "2.0.0", "NOOP after the discarded chunk");
    client.command_expect("QUIT", 221, "2.0.0");
    assert_spool_ids(server.spool(), &[]);
}

#[test]
fn null_reverse_path_is_accepted_and_spooled() {
    let _limit = hard_limit(Duration::from_secs(60));
    let server = Server::start(&ServerOptions::new());
    // Bounces and delivery notifications use MAIL FROM:<> (RFC 5321 §4.5.5).
    let message = test_message("bounce", "a delivery status notification\n");
    let outcomes = Smtplib::new(server.address())
        .ehlo()
        .mail("", &[])
        .rcpt("postmaster@example.net", &[])
        .data(&message)
        .quit()
        .run();
    outcomes[1].expect(250, "2.1.0", "MAIL FROM:<>");
    outcomes[3].expect(250, "2.0.0", "DATA");
    let id = outcomes[3].queued_id();
    let inspection = inspect(server.spool());
    assert_eq!(inspection.expect_message(&id)["from"], "");
    let shown = show(server.spool(), &id);
    assert_eq!(shown.field("from"), vec!["<>"]);
    assert_bytes_eq(
        tsubame_tests::without_received(&shown.content),
        &message,
        "bounce content",
    );
}

#[test]
fn helo_session_works_but_refuses_esmtp_parameters() {
    let _limit = hard_limit(Duration::from_secs(60));
    let server = Server::start(&ServerOptions::new());
    let mut client = RawClient::connect(server.address());
    client.greeting();
    assert_eq!(client.command("HELO old.tsubame.test").code, 250);
    // MAIL parameters are ESMTP: not after HELO (RFC 5321 §4.1.1.2).
    client.command_expect("MAIL FROM:<old@example.com> SIZE=100", 555, "5.5.4");
    client.command_expect("MAIL FROM:<old@example.com>", 250, "2.1.0");
    client.command_expect("RCPT TO:<old@example.net>", 250, "2.1.5");
    assert_eq!(client.command("DATA").code, 354);
    client.send(b"Subject: helo\r\n\r\nplain old SMTP\r\n.\r\n");
    let id = client
        .expect(250, "2.0.0", "end of data")
        .queued_id()
        .expect("queued id");
    client.command_expect("QUIT", 221, "2.0.0");
    let inspection = inspect(server.spool());
    assert_eq!(inspection.expect_message(&id)["helo"], "old.tsubame.test");
}
