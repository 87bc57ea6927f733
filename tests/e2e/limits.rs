//! Every limit answered with its SMTP reply (STYLE.md rule 4), on small configured
//! limits.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use tsubame_tests::cli::show;
use tsubame_tests::peers::Smtplib;
use tsubame_tests::process::hard_limit;
use tsubame_tests::server::{Server, ServerOptions};
use tsubame_tests::smtp::{Next, RawClient};
use tsubame_tests::{assert_bytes_eq, crlf};

use crate::assert_spool_ids;

/// A configuration with one listener (replaced by `--listen`) and these `[limits]`.
fn with_limits(limits: &str) -> ServerOptions {
    ServerOptions::new().config(&format!(
        "[server]\nhostname = \"limits.tsubame.test\"\n\n[[listener]]\naddress = \"127.0.0.1:0\"\n\n\
         [limits]\n{limits}\n"
    ))
}

/// A message of exactly `size_bytes` bytes in lines of at most 100 bytes.
fn message_of_size(size_bytes: usize) -> Vec<u8> {
    let mut message = b"Subject: sized\r\n\r\n".to_vec();
    while message.len() < size_bytes {
        let remaining = size_bytes - message.len();
        let line_bytes = remaining.min(100);
        if line_bytes < 3 {
            message.extend(std::iter::repeat_n(b'x', remaining));
            break;
        }
        message.extend(std::iter::repeat_n(b'y', line_bytes - 2));
        message.extend_from_slice(b"\r\n");
    }
    message
}

#[test]
fn size_parameter_over_the_limit_is_refused_at_mail() {
    let _limit = hard_limit(Duration::from_secs(60));
    let server = Server::start(&with_limits("max_message_size_bytes = 10000"));
    let outcomes = Smtplib::new(server.address())
        .ehlo()
        .mail("big@example.com", &["SIZE=10001"])
        .mail("exact@example.com", &["SIZE=10000"])
        .rset()
        .quit()
        .run();
    outcomes[1].expect(552, "5.3.4", "MAIL SIZE=10001");
    outcomes[2].expect(250, "2.1.0", "MAIL SIZE=10000");

    // smtplib's sendmail() declares the size itself when the server advertises SIZE.
    let outcomes = Smtplib::new(server.address())
        .sendmail(
            "big@example.com",
            &["r@example.net"],
            &message_of_size(12_000),
            &[],
        )
        .run();
    assert_eq!(
        outcomes[0].exception.as_deref(),
        Some("SMTPSenderRefused"),
        "{:?}",
        outcomes[0]
    );
    outcomes[0].expect(552, "5.3.4", "sendmail of 12000 bytes");
    assert_spool_ids(server.spool(), &[]);
}

#[test]
fn oversize_message_without_size_is_refused_after_data_and_not_spooled() {
    let _limit = hard_limit(Duration::from_secs(60));
    let server = Server::start(&with_limits("max_message_size_bytes = 10000"));
    let small = message_of_size(9_000);
    let outcomes = Smtplib::new(server.address())
        .ehlo()
        .mail("big@example.com", &[])
        .rcpt("r@example.net", &[])
        .data(&message_of_size(12_000))
        // The session goes on: the next message in it is accepted.
        .mail("small@example.com", &[])
        .rcpt("r@example.net", &[])
        .data(&small)
        .quit()
        .run();
    outcomes[3].expect(552, "5.3.4", "DATA of 12000 bytes");
    outcomes[4].expect(250, "2.1.0", "MAIL after the refused message");
    outcomes[6].expect(250, "2.0.0", "DATA of 9000 bytes");
    let id = outcomes[6].queued_id();
    assert_spool_ids(server.spool(), &[&id]);
    assert_bytes_eq(
        tsubame_tests::without_received(&show(server.spool(), &id).content),
        &small,
        "small message",
    );

    // Far over the limit (20x) in one raw write: still one 552, still in step.
    let mut client = RawClient::connect(server.address());
    client.hello();
    let mut wire = b"MAIL FROM:<huge@example.com>\r\nRCPT TO:<r@example.net>\r\nDATA\r\n".to_vec();
    wire.extend_from_slice(&message_of_size(200_000));
    wire.extend_from_slice(b".\r\nNOOP\r\n");
    client.send(&wire);
    client.expect(250, "2.1.0", "MAIL");
    client.expect(250, "2.1.5", "RCPT");
    assert_eq!(client.reply().code, 354);
    client.expect(552, "5.3.4", "end of the 200 kB message");
    client.expect(250, "2.0.0", "NOOP after it");
    client.command_expect("QUIT", 221, "2.0.0");
    assert_spool_ids(server.spool(), &[&id]);
}

#[test]
fn recipients_beyond_the_limit_get_452() {
    let _limit = hard_limit(Duration::from_secs(60));
    let server = Server::start(&with_limits("max_recipients = 100"));
    let recipients: Vec<String> = (0..101).map(|n| format!("r{n}@example.net")).collect();
    let mut session = Smtplib::new(server.address())
        .ehlo()
        .mail("many@example.com", &[]);
    for recipient in &recipients {
        session = session.rcpt(recipient, &[]);
    }
    let message = crlf("Subject: 100 recipients\n\nbody\n");
    let outcomes = session.data(&message).quit().run();
    for (index, outcome) in outcomes[2..102].iter().enumerate() {
        outcome.expect(250, "2.1.5", &format!("RCPT {}", index + 1));
    }
    outcomes[102].expect(452, "4.5.3", "RCPT 101");
    outcomes[103].expect(250, "2.0.0", "DATA");
    let id = outcomes[103].queued_id();
    let inspection = tsubame_tests::cli::inspect(server.spool());
    assert_eq!(
        inspection.expect_message(&id)["recipients"],
        serde_json::json!(recipients[..100])
    );
}

#[test]
fn command_line_longer_than_the_limit_gets_500_and_the_session_goes_on() {
    let _limit = hard_limit(Duration::from_secs(60));
    let server = Server::start(&with_limits("max_command_line_bytes = 512"));
    let mut client = RawClient::connect(server.address());
    client.hello();
    // 512 bytes including CRLF is allowed; 513 is not.
    let at_limit = format!("NOOP {}", "a".repeat(512 - 2 - 5));
    assert_eq!(at_limit.len() + 2, 512);
    client.command_expect(&at_limit, 250, "2.0.0");
    let over_limit = format!("NOOP {}", "a".repeat(512 - 2 - 5 + 1));
    client.command_expect(&over_limit, 500, "5.5.6");
    // Far over, as a MAIL command split across writes: one reply, then in step.
    client.send(format!("MAIL FROM:<{}", "b".repeat(3000)).as_bytes());
    client.send(format!("{}@example.com>\r\n", "c".repeat(3000)).as_bytes());
    client.expect(500, "5.5.6", "6 kB MAIL line");
    client.command_expect("NOOP", 250, "2.0.0");
    client.command_expect("MAIL FROM:<ok@example.com>", 250, "2.1.0");
    client.command_expect("QUIT", 221, "2.0.0");
}

#[test]
fn text_line_longer_than_the_limit_gets_554_after_data_and_is_not_spooled() {
    let _limit = hard_limit(Duration::from_secs(60));
    let server = Server::start(&with_limits("max_text_line_bytes = 1000"));
    // 998 characters + CRLF = 1000 bytes: allowed (RFC 5321 §4.5.3.1.6).
    let mut fits = b"Subject: long line that fits\r\n\r\n".to_vec();
    fits.extend(std::iter::repeat_n(b'f', 998));
    fits.extend_from_slice(b"\r\nend\r\n");
    let mut too_long = b"Subject: long line\r\n\r\nshort\r\n".to_vec();
    too_long.extend(std::iter::repeat_n(b'l', 1500));
    too_long.extend_from_slice(b"\r\nend\r\n");
    let outcomes = Smtplib::new(server.address())
        .ehlo()
        .mail("long@example.com", &[])
        .rcpt("r@example.net", &[])
        .data(&too_long)
        .mail("fits@example.com", &[])
        .rcpt("r@example.net", &[])
        .data(&fits)
        .quit()
        .run();
    outcomes[3].expect(554, "5.6.0", "DATA with a 1502-byte line");
    outcomes[6].expect(250, "2.0.0", "DATA with a 1000-byte line");
    let id = outcomes[6].queued_id();
    assert_spool_ids(server.spool(), &[&id]);
    assert_bytes_eq(
        tsubame_tests::without_received(&show(server.spool(), &id).content),
        &fits,
        "1000-byte line",
    );
}

#[test]
fn too_many_errors_end_the_session_with_421() {
    let _limit = hard_limit(Duration::from_secs(60));
    let server = Server::start(&with_limits("max_errors_per_session = 3"));
    let mut client = RawClient::connect(server.address());
    client.hello();
    for attempt in 1..=3 {
        let reply = client.command("BOGUS command");
        assert!(
            (500..600).contains(&reply.code),
            "error {attempt} should be a 5xx: {reply}"
        );
    }
    client.expect(421, "4.7.0", "after the third error");
    client.expect_closed(Duration::from_secs(5), "after 421");
}

#[test]
fn too_many_commands_end_the_session_with_421() {
    let _limit = hard_limit(Duration::from_secs(60));
    let server = Server::start(&with_limits("max_commands_per_session = 5"));
    let mut client = RawClient::connect(server.address());
    client.hello(); // command 1
    for _ in 2..=5 {
        client.command_expect("NOOP", 250, "2.0.0");
    }
    client.command_expect("NOOP", 421, "4.7.0");
    client.expect_closed(Duration::from_secs(5), "after 421");
}

/// Waits for a timeout reply and the close, and checks it came neither too early nor
/// too late.
#[track_caller]
fn expect_timeout_reply(client: &mut RawClient, started: Instant, at_least: Duration) {
    let reply = match client.next(Duration::from_secs(10)) {
        Next::Reply(reply) => reply,
        other => panic!("expected 421 4.4.2 within 10 s, got {other:?}"),
    };
    let elapsed = started.elapsed();
    assert!(reply.is(421, "4.4.2"), "expected 421 4.4.2, got {reply}");
    assert!(
        elapsed >= at_least,
        "timed out after {elapsed:?}, before the configured {at_least:?}"
    );
    client.expect_closed(Duration::from_secs(5), "after the timeout reply");
}

#[test]
fn idle_session_times_out_with_421() {
    let _limit = hard_limit(Duration::from_secs(60));
    let server = Server::start(&with_limits("command_timeout_secs = 1"));
    let mut client = RawClient::connect(server.address());
    client.hello();
    let started = Instant::now();
    expect_timeout_reply(&mut client, started, Duration::from_millis(900));
}

#[test]
fn stalled_data_times_out_with_421_and_nothing_is_spooled() {
    let _limit = hard_limit(Duration::from_secs(60));
    let server = Server::start(&with_limits(
        "command_timeout_secs = 60\ndata_block_timeout_secs = 1",
    ));
    let mut client = RawClient::connect(server.address());
    client.hello();
    client.command_expect("MAIL FROM:<slow@example.com>", 250, "2.1.0");
    client.command_expect("RCPT TO:<r@example.net>", 250, "2.1.5");
    assert_eq!(client.command("DATA").code, 354);
    client.send(b"Subject: stalled\r\n\r\npart of a body\r\n");
    let started = Instant::now();
    expect_timeout_reply(&mut client, started, Duration::from_millis(900));
    assert_spool_ids(server.spool(), &[]);
}

#[test]
fn slow_data_hits_the_total_transfer_timeout() {
    let _limit = hard_limit(Duration::from_secs(60));
    let server = Server::start(&with_limits(
        "command_timeout_secs = 60\ndata_block_timeout_secs = 5\ndata_total_timeout_secs = 2",
    ));
    let mut client = RawClient::connect(server.address());
    client.hello();
    client.command_expect("MAIL FROM:<trickle@example.com>", 250, "2.1.0");
    client.command_expect("RCPT TO:<r@example.net>", 250, "2.1.5");
    assert_eq!(client.command("DATA").code, 354);
    let started = Instant::now();
    // A line every 300 ms: never idle for the 5 s block timeout, but the whole
    // transfer passes 2 s.
    let reply = loop {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "no total-transfer timeout after 15 s of trickling"
        );
        if client.try_send(b"trickle\r\n").is_err() {
            panic!("the server closed the connection without a 421 4.4.2");
        }
        match client.next(Duration::from_millis(300)) {
            Next::TimedOut => continue,
            Next::Reply(reply) => break reply,
            Next::Closed => panic!("the server closed the connection without a reply"),
        }
    };
    assert!(reply.is(421, "4.4.2"), "expected 421 4.4.2, got {reply}");
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "total timeout after {:?}, before the configured 2 s",
        started.elapsed()
    );
    assert_spool_ids(server.spool(), &[]);
}

/// Connects and reads what the server says first: the greeting or a refusal.
fn first_reply(server: &Server, source: &str) -> (RawClient, tsubame_tests::smtp::Reply) {
    let source: IpAddr = source.parse().unwrap();
    let mut client = RawClient::connect_from(server.address(), source);
    let reply = client.reply();
    (client, reply)
}

/// Tries to connect for a few seconds until the server greets (a closed connection's
/// slot is released asynchronously).
#[track_caller]
fn eventually_greeted(server: &Server, source: &str) -> RawClient {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (client, reply) = first_reply(server, source);
        if reply.code == 220 {
            return client;
        }
        assert!(
            Instant::now() < deadline,
            "still refused 5 s after a connection closed: {reply}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn connections_beyond_the_per_ip_limit_get_421() {
    let _limit = hard_limit(Duration::from_secs(60));
    let server = Server::start(&with_limits("max_connections_per_ip = 2"));
    let (mut first, reply) = first_reply(&server, "127.0.0.1");
    assert_eq!(reply.code, 220, "{reply}");
    let (_second, reply) = first_reply(&server, "127.0.0.1");
    assert_eq!(reply.code, 220, "{reply}");
    let (mut third, reply) = first_reply(&server, "127.0.0.1");
    assert!(reply.is(421, "4.7.0"), "third connection: {reply}");
    third.expect_closed(Duration::from_secs(5), "refused connection");
    // The limit is per address: another loopback address still gets in.
    let (_other, reply) = first_reply(&server, "127.0.0.2");
    assert_eq!(reply.code, 220, "connection from 127.0.0.2: {reply}");
    // Closing one frees its slot.
    first.command_expect("QUIT", 221, "2.0.0");
    first.expect_closed(Duration::from_secs(5), "after QUIT");
    let mut again = eventually_greeted(&server, "127.0.0.1");
    again.command_expect("QUIT", 221, "2.0.0");
}

#[test]
fn connections_beyond_the_global_limit_get_421() {
    let _limit = hard_limit(Duration::from_secs(60));
    let server = Server::start(&with_limits(
        "max_connections = 2\nmax_connections_per_ip = 10",
    ));
    let (mut first, reply) = first_reply(&server, "127.0.0.1");
    assert_eq!(reply.code, 220, "{reply}");
    let (_second, reply) = first_reply(&server, "127.0.0.2");
    assert_eq!(reply.code, 220, "{reply}");
    let (mut third, reply) = first_reply(&server, "127.0.0.3");
    assert!(reply.is(421, "4.7.0"), "third connection: {reply}");
    third.expect_closed(Duration::from_secs(5), "refused connection");
    first.command_expect("QUIT", 221, "2.0.0");
    first.expect_closed(Duration::from_secs(5), "after QUIT");
    let mut again = eventually_greeted(&server, "127.0.0.3");
    again.command_expect("QUIT", 221, "2.0.0");
}

/// A client that pipelines commands and never reads the replies: the server stops reading
/// it (its unread replies are capped), times it out, and, since not even the 421 can be
/// written, closes it after a grace period, so it cannot hold a connection slot forever.
#[test]
fn client_that_never_reads_is_closed_and_frees_its_slot() {
    use std::io::{Read, Write};
    let _limit = hard_limit(Duration::from_secs(90));
    let server = Server::start(&with_limits(
        "command_timeout_secs = 1\nmax_connections_per_ip = 1\nmax_commands_per_session = 100000000",
    ));
    let mut stuck = std::net::TcpStream::connect(server.address()).unwrap();
    let mut greeting = [0u8; 512];
    assert!(stuck.read(&mut greeting).unwrap() > 0);
    // Write NOOPs until the server's receive side is full (it stopped reading us), or
    // 64 MiB went out.
    stuck
        .set_write_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let burst = b"NOOP\r\n".repeat(16 * 1024);
    let mut sent = 0usize;
    let mut ended_by = None;
    while sent < 64 * 1024 * 1024 {
        match stuck.write(&burst) {
            Ok(written) => sent += written,
            Err(error) => {
                ended_by = Some(error.kind());
                break;
            }
        }
    }
    assert!(
        sent < 64 * 1024 * 1024,
        "the server kept reading a client that reads nothing"
    );
    let closed_already = matches!(
        ended_by,
        Some(std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset)
    );
    if closed_already {
        // On a starved machine the writes can outlast the timeout and the flush grace:
        // the server has already closed the stuck client, which must have been its
        // timeout (not a crash or a limit).
        assert!(
            server.log().contains("session timed out"),
            "the stuck client was closed without a timeout:\n{}",
            server.log()
        );
    } else {
        // Slot held: a second client from the same address is turned away.
        let mut second = RawClient::connect(server.address());
        match second.next(Duration::from_secs(5)) {
            Next::Reply(reply) => assert_eq!(
                reply.code, 421,
                "{reply:?} (the stuck client's writes ended with {ended_by:?})"
            ),
            other => panic!("expected 421 while the stuck client holds the slot, got {other:?}"),
        }
    }
    // Command timeout (1 s) + flush grace (10 s) + sweeps: the slot must come free.
    let started = Instant::now();
    loop {
        let mut client = RawClient::connect(server.address());
        match client.next(Duration::from_secs(5)) {
            Next::Reply(reply) if reply.code == 220 => break,
            Next::Reply(reply) if reply.code == 421 => {}
            other => panic!("unexpected greeting {other:?}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the client that never reads still holds its slot after {:?}",
            started.elapsed()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    drop(stuck);
}

/// A pipeline far longer than the server's reply buffer (it pauses reading while 64 KiB of
/// replies are unwritten) is answered in full once the client reads: reading resumes when
/// the replies drain, though no new input arrives to wake the connection. (Regression:
/// the session stalled until its command timeout.)
#[test]
fn long_pipeline_is_answered_in_full() {
    use std::io::{Read, Write};
    const COMMANDS: usize = 200_000;
    let _limit = hard_limit(Duration::from_secs(90));
    let server = Server::start(&with_limits(
        "command_timeout_secs = 30\nmax_commands_per_session = 1000000",
    ));
    let mut client = std::net::TcpStream::connect(server.address()).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut writer = client.try_clone().unwrap();
    let sender = std::thread::spawn(move || writer.write_all(&b"NOOP\r\n".repeat(COMMANDS)));
    let mut replies = 0usize;
    let mut received = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let started = Instant::now();
    while replies < COMMANDS {
        let read = client.read(&mut chunk).unwrap_or_else(|error| {
            panic!(
                "after {replies} of {COMMANDS} replies in {:?}: {error}",
                started.elapsed()
            )
        });
        assert!(read > 0, "server closed after {replies} replies");
        received.extend_from_slice(&chunk[..read]);
        let complete = received
            .iter()
            .rposition(|byte| *byte == b'\n')
            .map_or(0, |end| end + 1);
        replies += received[..complete]
            .split(|byte| *byte == b'\n')
            .filter(|line| line.starts_with(b"250 "))
            .count();
        received.drain(..complete);
    }
    sender.join().unwrap().unwrap();
    assert_eq!(replies, COMMANDS);
}
