//! The connection driver against a scripted loopback server that misbehaves in ways
//! real servers rarely do on demand: silence, garbage, endless lines, refusal, and
//! the STARTTLS and AUTH corner cases (injection after 220, refusals, a handshake
//! that never ends).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use tsubame_config::TlsMode;
use tsubame_delivery::{
    BodyType, ConnectOptions, ConnectionStage, Credentials, DeliveryError, LocalFailure, Message,
    Reason, RecipientOutcome, Secret, Stage, Timeouts, TlsSettings, UpstreamConnection,
};

/// Short enough to keep the suite fast, long enough for loopback.
const SHORT_TIMEOUT: Duration = Duration::from_millis(300);
/// The fake server's own socket timeout, so its thread always ends.
const SERVER_TIMEOUT: Duration = Duration::from_secs(5);

/// Accepts one connection and runs `script` on it in a thread.
fn fake_server(
    script: impl FnOnce(TcpStream, &mut BufReader<TcpStream>) + Send + 'static,
) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let handle = thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        stream.set_read_timeout(Some(SERVER_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(SERVER_TIMEOUT)).unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        script(stream, &mut reader);
    });
    (address, handle)
}

/// Greets, answers EHLO without extensions (so commands go one at a time).
fn greet(stream: &mut TcpStream, reader: &mut BufReader<TcpStream>) {
    stream.write_all(b"220 fake ESMTP\r\n").unwrap();
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("EHLO "), "{line:?}");
    stream.write_all(b"250 fake\r\n").unwrap();
}

fn send_one(address: SocketAddr) -> (UpstreamConnection, tsubame_delivery::TransactionResult) {
    let mut connection =
        UpstreamConnection::connect(address, "client.test", Timeouts::uniform(SHORT_TIMEOUT))
            .unwrap();
    let recipients = vec!["a@fake.test".to_owned(), "b@fake.test".to_owned()];
    let result = connection
        .send(Message {
            mail_from: "sender@fake.test",
            recipients: &recipients,
            body_type: BodyType::SevenBit,
            smtputf8: false,
            added_fields: &[],
            body: b"Subject: x\r\n\r\nbody\r\n",
        })
        .unwrap();
    (connection, result)
}

fn lost_detail(outcome: &RecipientOutcome) -> &str {
    match outcome {
        RecipientOutcome::Deferred(Reason::Local(LocalFailure::ConnectionLost { detail })) => {
            detail
        }
        other => panic!("expected a lost-connection deferral, got {other:?}"),
    }
}

#[test]
fn silence_after_rcpt_times_out_and_defers() {
    let (address, server) = fake_server(|mut stream, reader| {
        greet(&mut stream, reader);
        let mut line = String::new();
        reader.read_line(&mut line).unwrap(); // MAIL
        stream.write_all(b"250 ok\r\n").unwrap();
        line.clear();
        reader.read_line(&mut line).unwrap(); // RCPT a
        stream.write_all(b"550 no\r\n").unwrap();
        line.clear();
        reader.read_line(&mut line).unwrap(); // RCPT b: never answered
        // Wait for the client to give up and close.
        line.clear();
        let _ = reader.read_line(&mut line);
    });
    let (connection, result) = send_one(address);
    assert!(!result.connection_usable && !connection.is_usable());
    assert!(matches!(
        &result.outcomes[0],
        RecipientOutcome::Failed(Reason::Reply {
            stage: Stage::Rcpt,
            ..
        })
    ));
    let detail = lost_detail(&result.outcomes[1]);
    assert!(
        detail.contains("timed out") && detail.contains("Rcpt"),
        "{detail}"
    );
    drop(connection);
    server.join().unwrap();
}

#[test]
fn garbage_reply_defers() {
    let (address, server) = fake_server(|mut stream, reader| {
        greet(&mut stream, reader);
        let mut line = String::new();
        reader.read_line(&mut line).unwrap(); // MAIL
        stream.write_all(b"hello there\r\n").unwrap();
    });
    let (_connection, result) = send_one(address);
    for outcome in &result.outcomes {
        assert!(
            lost_detail(outcome).contains("invalid reply"),
            "{outcome:?}"
        );
    }
    server.join().unwrap();
}

#[test]
fn endless_reply_line_is_bounded() {
    let (address, server) = fake_server(|mut stream, reader| {
        greet(&mut stream, reader);
        let mut line = String::new();
        reader.read_line(&mut line).unwrap(); // MAIL
        // Far more than any buffer should hold, without a line ending; the client
        // closes long before the end, so write errors are expected.
        let chunk = [b'2'; 64 * 1024];
        for _ in 0..64 {
            if stream.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    let (connection, result) = send_one(address);
    for outcome in &result.outcomes {
        assert!(
            lost_detail(outcome).contains("invalid reply"),
            "{outcome:?}"
        );
    }
    // Close the socket before joining: a shut-down socket still holds the server's
    // unread bytes, so the server's writes block until its own timeout instead of
    // failing at once.
    drop(connection);
    server.join().unwrap();
}

#[test]
fn close_after_content_defers() {
    let (address, server) = fake_server(|mut stream, reader| {
        greet(&mut stream, reader);
        let mut line = String::new();
        for answer in [
            &b"250 ok\r\n"[..],
            b"250 ok\r\n",
            b"250 ok\r\n",
            b"354 go\r\n",
        ] {
            line.clear();
            reader.read_line(&mut line).unwrap();
            stream.write_all(answer).unwrap();
        }
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            if line == ".\r\n" {
                break;
            }
        }
        // Hang up instead of answering the content.
    });
    let (_connection, result) = send_one(address);
    for outcome in &result.outcomes {
        assert!(
            lost_detail(outcome).contains("closed the connection"),
            "{outcome:?}"
        );
    }
    server.join().unwrap();
}

#[test]
fn refused_greeting_is_an_error_with_context() {
    let (address, server) = fake_server(|mut stream, reader| {
        stream.write_all(b"554 5.7.1 go away\r\n").unwrap();
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert_eq!(line, "QUIT\r\n");
    });
    let error =
        UpstreamConnection::connect(address, "client.test", Timeouts::uniform(SHORT_TIMEOUT))
            .unwrap_err();
    match &error {
        DeliveryError::Rejected { stage, reply, .. } => {
            assert_eq!(*stage, Stage::Greeting);
            assert_eq!(reply.code, 554);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(error.to_string().contains(&address.to_string()));
    server.join().unwrap();
}

/// Regression: a PIPELINING group's replies were all read with the MAIL timeout and a
/// missing 354 was reported "at Mail", so the DATA initiation timeout (RFC 5321
/// §4.5.3.2.4) never applied.
#[test]
fn pipelined_data_reply_gets_the_data_initiation_timeout() {
    let (address, server) = fake_server(|mut stream, reader| {
        stream.write_all(b"220 fake ESMTP\r\n").unwrap();
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert!(line.starts_with("EHLO "), "{line:?}");
        stream.write_all(b"250-fake\r\n250 PIPELINING\r\n").unwrap();
        for expected in ["MAIL FROM:", "RCPT TO:", "DATA"] {
            line.clear();
            reader.read_line(&mut line).unwrap();
            assert!(line.starts_with(expected), "{line:?}");
        }
        // MAIL and RCPT are answered; DATA never is.
        stream.write_all(b"250 ok\r\n250 ok\r\n").unwrap();
        line.clear();
        let _ = reader.read_line(&mut line);
    });
    let long = Duration::from_secs(3);
    let timeouts = Timeouts {
        data_initiation: SHORT_TIMEOUT,
        ..Timeouts::uniform(long)
    };
    let mut connection = UpstreamConnection::connect(address, "client.test", timeouts).unwrap();
    let recipients = vec!["a@fake.test".to_owned()];
    let started = std::time::Instant::now();
    let result = connection
        .send(Message {
            mail_from: "sender@fake.test",
            recipients: &recipients,
            body_type: BodyType::SevenBit,
            smtputf8: false,
            added_fields: &[],
            body: b"Subject: x\r\n\r\nbody\r\n",
        })
        .unwrap();
    let elapsed = started.elapsed();
    let detail = lost_detail(&result.outcomes[0]);
    assert!(
        detail.contains(&format!("timed out after {SHORT_TIMEOUT:?} at Data")),
        "{detail}"
    );
    assert!(elapsed < long, "waited {elapsed:?}, the MAIL timeout");
    drop(connection);
    server.join().unwrap();
}

/// Each stage gets its own timeout, also after a shorter one on the same connection: a
/// final reply that comes after the DATA-initiation timeout but within the
/// DATA-termination one is a delivery, and one that never comes times out at the
/// termination deadline, not at the shorter one.
#[test]
fn a_longer_stage_gets_its_whole_timeout_after_a_shorter_one() {
    let (address, server) = fake_server(|mut stream, reader| {
        stream.write_all(b"220 fake ESMTP\r\n").unwrap();
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        stream.write_all(b"250 fake\r\n").unwrap();
        for (number, delay) in [
            (1, Duration::from_millis(1500)),
            (2, Duration::from_secs(30)),
        ] {
            if number == 2 {
                line.clear();
                reader.read_line(&mut line).unwrap();
                assert!(line.starts_with("RSET"), "{line:?}");
                stream.write_all(b"250 reset\r\n").unwrap();
            }
            for (expected, reply) in [
                ("MAIL FROM:", &b"250 ok\r\n"[..]),
                ("RCPT TO:", &b"250 ok\r\n"[..]),
                ("DATA", &b"354 go\r\n"[..]),
            ] {
                line.clear();
                reader.read_line(&mut line).unwrap();
                assert!(line.starts_with(expected), "{line:?}");
                stream.write_all(reply).unwrap();
            }
            loop {
                line.clear();
                if reader.read_line(&mut line).unwrap() == 0 || line == ".\r\n" {
                    break;
                }
            }
            if number == 1 {
                std::thread::sleep(delay);
                stream.write_all(b"250 queued\r\n").unwrap();
            } else {
                line.clear();
                let _ = reader.read_line(&mut line);
            }
        }
    });
    let termination = Duration::from_secs(3);
    let timeouts = Timeouts {
        data_initiation: Duration::from_millis(500),
        data_termination: termination,
        ..Timeouts::uniform(Duration::from_secs(10))
    };
    let mut connection = UpstreamConnection::connect(address, "client.test", timeouts).unwrap();
    let recipients = vec!["a@fake.test".to_owned()];
    let message = Message {
        mail_from: "sender@fake.test",
        recipients: &recipients,
        body_type: BodyType::SevenBit,
        smtputf8: false,
        added_fields: &[],
        body: b"Subject: x\r\n\r\nbody\r\n",
    };
    let first = connection.send(message).unwrap();
    assert!(
        matches!(first.outcomes[0], RecipientOutcome::Delivered { .. }),
        "a reply 1.5 s after the content is within the 3 s termination timeout: {:?}",
        first.outcomes[0]
    );
    let started = std::time::Instant::now();
    let second = connection.send(message).unwrap();
    let elapsed = started.elapsed();
    let detail = lost_detail(&second.outcomes[0]);
    assert!(
        detail.contains(&format!("timed out after {termination:?} at Content")),
        "{detail}"
    );
    assert!(
        elapsed >= termination && elapsed < termination + Duration::from_secs(2),
        "waited {elapsed:?} for a {termination:?} deadline"
    );
    drop(connection);
    server.join().unwrap();
}

/// Greets and answers EHLO offering STARTTLS (and nothing that needs pipelining).
fn greet_with_starttls(stream: &mut TcpStream, reader: &mut BufReader<TcpStream>) {
    stream.write_all(b"220 fake ESMTP\r\n").unwrap();
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("EHLO "), "{line:?}");
    stream
        .write_all(b"250-fake\r\n250-STARTTLS\r\n250 8BITMIME\r\n")
        .unwrap();
}

fn expect_line(reader: &mut BufReader<TcpStream>, expected: &str) {
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, expected);
}

/// Options for `mode` with a configuration from [`TlsSettings`] and short timeouts.
fn options<'a>(
    mode: TlsMode,
    settings: &TlsSettings,
    credentials: Option<&'a Credentials>,
) -> ConnectOptions<'a> {
    ConnectOptions {
        helo_name: "client.test",
        tls: mode,
        server_name: "mx.fake.test",
        tls_config: settings.config(),
        credentials,
        timeouts: Timeouts::uniform(SHORT_TIMEOUT),
    }
}

/// RFC 3207 §5 and CVE-2011-0411: replies injected in plain text right after the 220
/// must be neither parsed nor given to TLS; the client hangs up without a handshake.
#[test]
fn plaintext_injected_after_starttls_220_is_refused() {
    let (address, server) = fake_server(|mut stream, reader| {
        greet_with_starttls(&mut stream, reader);
        expect_line(reader, "STARTTLS\r\n");
        // One write, so the injected lines arrive with the 220.
        stream
            .write_all(b"220 go ahead\r\n250-injected\r\n250 AUTH PLAIN\r\n")
            .unwrap();
        // The client must send nothing more: no ClientHello, no QUIT.
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "client sent {rest:?}");
    });
    let settings = TlsSettings::new(TlsMode::Opportunistic, None).unwrap();
    let error =
        UpstreamConnection::open(address, &options(TlsMode::Opportunistic, &settings, None))
            .unwrap_err();
    match &error {
        DeliveryError::PlaintextAfterStartTls { bytes, .. } => {
            assert_eq!(*bytes, "250-injected\r\n250 AUTH PLAIN\r\n".len())
        }
        other => panic!("expected the injection to be caught, got {other:?}"),
    }
    server.join().unwrap();
}

#[test]
fn required_starttls_refused_quits_without_mail() {
    let (address, server) = fake_server(|mut stream, reader| {
        greet_with_starttls(&mut stream, reader);
        expect_line(reader, "STARTTLS\r\n");
        stream
            .write_all(b"454 4.7.0 TLS not available\r\n")
            .unwrap();
        expect_line(reader, "QUIT\r\n");
    });
    let settings = TlsSettings::new(TlsMode::Required, None).unwrap();
    let error = UpstreamConnection::open(address, &options(TlsMode::Required, &settings, None))
        .unwrap_err();
    match &error {
        DeliveryError::StartTlsRefused { reply, .. } => assert_eq!(reply.code, 454),
        other => panic!("expected STARTTLS refused, got {other:?}"),
    }
    assert!(
        error.to_string().contains("454 TLS not available"),
        "{error}"
    );
    server.join().unwrap();
}

#[test]
fn opportunistic_starttls_refused_goes_on_in_plain_text() {
    let (address, server) = fake_server(|mut stream, reader| {
        greet_with_starttls(&mut stream, reader);
        expect_line(reader, "STARTTLS\r\n");
        stream
            .write_all(b"454 4.7.0 TLS not available\r\n")
            .unwrap();
        let mut line = String::new();
        for answer in [&b"250 ok\r\n"[..], b"250 ok\r\n", b"354 go\r\n"] {
            line.clear();
            reader.read_line(&mut line).unwrap();
            stream.write_all(answer).unwrap();
        }
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            if line == ".\r\n" {
                break;
            }
        }
        stream.write_all(b"250 queued\r\n").unwrap();
        expect_line(reader, "QUIT\r\n");
        stream.write_all(b"221 bye\r\n").unwrap();
    });
    let settings = TlsSettings::new(TlsMode::Opportunistic, None).unwrap();
    let mut connection =
        UpstreamConnection::open(address, &options(TlsMode::Opportunistic, &settings, None))
            .unwrap();
    assert_eq!(connection.tls_summary(), None);
    let recipients = vec!["a@fake.test".to_owned()];
    let result = connection
        .send(Message {
            mail_from: "sender@fake.test",
            recipients: &recipients,
            body_type: BodyType::SevenBit,
            smtputf8: false,
            added_fields: &[],
            body: b"Subject: x\r\n\r\nbody\r\n",
        })
        .unwrap();
    assert!(matches!(
        result.outcomes[0],
        RecipientOutcome::Delivered { .. }
    ));
    connection.quit().unwrap();
    server.join().unwrap();
}

#[test]
fn starttls_421_is_a_refused_session() {
    let (address, server) = fake_server(|mut stream, reader| {
        greet_with_starttls(&mut stream, reader);
        expect_line(reader, "STARTTLS\r\n");
        stream.write_all(b"421 4.3.2 shutting down\r\n").unwrap();
        let mut rest = String::new();
        let _ = reader.read_line(&mut rest);
    });
    let settings = TlsSettings::new(TlsMode::Opportunistic, None).unwrap();
    let error =
        UpstreamConnection::open(address, &options(TlsMode::Opportunistic, &settings, None))
            .unwrap_err();
    assert!(
        matches!(
            error,
            DeliveryError::Rejected {
                stage: Stage::StartTls,
                ..
            }
        ),
        "{error:?}"
    );
    server.join().unwrap();
}

#[test]
fn silent_tls_handshake_times_out() {
    let (address, server) = fake_server(|_stream, reader| {
        // Take the ClientHello and never answer; wait for the client to give up.
        let mut rest = Vec::new();
        let _ = reader.read_to_end(&mut rest);
        assert!(!rest.is_empty(), "a ClientHello was expected");
    });
    let settings = TlsSettings::new(TlsMode::Implicit, None).unwrap();
    let mut options = options(TlsMode::Implicit, &settings, None);
    options.timeouts = Timeouts {
        tls_handshake: SHORT_TIMEOUT,
        ..Timeouts::uniform(SERVER_TIMEOUT * 2)
    };
    let error = UpstreamConnection::open(address, &options).unwrap_err();
    match error {
        DeliveryError::TimedOut { stage, timeout, .. } => {
            assert_eq!(stage, ConnectionStage::TlsHandshake);
            assert_eq!(timeout, SHORT_TIMEOUT);
        }
        other => panic!("expected a handshake timeout, got {other:?}"),
    }
    server.join().unwrap();
}

/// Options that cannot work are refused before any connection: nothing listens on
/// the port, so trying to connect would show as `Connect`.
#[test]
fn impossible_options_are_refused_before_connecting() {
    let address = {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let required = TlsSettings::new(TlsMode::Required, None).unwrap();
    let none = TlsSettings::new(TlsMode::None, None).unwrap();
    let credentials = Credentials::Password {
        username: "user".to_owned(),
        password: Secret::new("not-a-real-password"),
    };

    let mut missing_config = options(TlsMode::Required, &none, None);
    missing_config.tls_config = None;
    let mut bad_name = options(TlsMode::Required, &required, None);
    bad_name.server_name = "not a host name";
    let mut bad_helo = options(TlsMode::None, &none, None);
    bad_helo.helo_name = "two words";
    let plain_credentials = options(TlsMode::None, &none, Some(&credentials));

    /// Name, options, the error expected.
    type Case<'a> = (&'static str, ConnectOptions<'a>, fn(&DeliveryError) -> bool);
    let cases: [Case<'_>; 4] = [
        ("missing TLS configuration", missing_config, |error| {
            matches!(error, DeliveryError::TlsConfigMissing { .. })
        }),
        ("invalid server name", bad_name, |error| {
            matches!(error, DeliveryError::InvalidServerName { .. })
        }),
        ("invalid EHLO name", bad_helo, |error| {
            matches!(error, DeliveryError::Protocol { .. })
        }),
        ("credentials over plain text", plain_credentials, |error| {
            matches!(error, DeliveryError::AuthWithoutTls { .. })
        }),
    ];
    for (name, options, expected) in cases {
        let error = UpstreamConnection::open(address, &options).unwrap_err();
        assert!(expected(&error), "{name}: {error:?}");
        assert!(!error.to_string().contains("not-a-real-password"), "{name}");
    }
}
