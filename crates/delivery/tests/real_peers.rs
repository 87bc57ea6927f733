//! The connection driver against SMTP servers nobody here wrote, over loopback:
//! Postfix's `smtp-sink` (Debian package `postfix`) and Python's `aiosmtpd`.
//!
//! These tests fail, never skip, when a peer is missing: CI must install it.
//! Every child process is killed when its guard drops, every socket has a timeout,
//! and every wait has a deadline, so no test can hang.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::{
    Aiosmtpd, ChildGuard, START_ATTEMPTS, STARTUP_DEADLINE, TEST_TIMEOUT, free_port, wait_until,
};

use tsubame_config::TlsMode;
use tsubame_delivery::{
    BodyType, DeliveryError, LocalFailure, Message, Reason, RecipientOutcome, Stage, Timeouts,
    UpstreamConnection,
};

const SMTP_SINK: &str = "/usr/sbin/smtp-sink";
const HELO_NAME: &str = "client.tsubame.test";

fn timeouts() -> Timeouts {
    Timeouts::uniform(TEST_TIMEOUT)
}

fn connect(address: SocketAddr) -> UpstreamConnection {
    UpstreamConnection::connect(address, HELO_NAME, timeouts())
        .unwrap_or_else(|error| panic!("connect to {address}: {error}"))
}

// ---------------------------------------------------------------------------------
// smtp-sink

struct SmtpSink {
    _child: ChildGuard,
    address: SocketAddr,
    /// Every transaction appended by `-D` (LF line endings, content dot-unstuffed).
    dump: PathBuf,
    _dir: tempfile::TempDir,
}

/// Starts `smtp-sink -u root -D DUMP [extra] 127.0.0.1:PORT 100` on a free port.
fn start_smtp_sink(extra_arguments: &[&str]) -> SmtpSink {
    assert!(
        Path::new(SMTP_SINK).exists(),
        "{SMTP_SINK} is missing: install the Debian package postfix \
         (apt-get install postfix, with debconf main_mailer_type 'No configuration')"
    );
    let dir = tempfile::tempdir().expect("temporary directory");
    let dump = dir.path().join("dump");
    for _ in 0..START_ATTEMPTS {
        let address = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let child = Command::new(SMTP_SINK)
            .args(["-c", "-u", "root", "-D"])
            .arg(&dump)
            .args(extra_arguments)
            .arg(address.to_string())
            .arg("100")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| panic!("spawn {SMTP_SINK}: {error}"));
        let mut child = ChildGuard(child);
        let listening = wait_until(&mut child, || {
            std::net::TcpStream::connect_timeout(&address, TEST_TIMEOUT).is_ok()
        });
        if listening {
            return SmtpSink {
                _child: child,
                address,
                dump,
                _dir: dir,
            };
        }
    }
    panic!("{SMTP_SINK} did not start listening after {START_ATTEMPTS} attempts");
}

fn recipients(names: &[&str]) -> Vec<String> {
    names.iter().map(|name| (*name).to_owned()).collect()
}

fn message<'a>(recipients: &'a [String], body: &'a [u8]) -> Message<'a> {
    Message {
        mail_from: "sender@tsubame.test",
        recipients,
        body_type: BodyType::SevenBit,
        smtputf8: false,
        added_fields: &[],
        body,
    }
}

fn assert_all_delivered(outcomes: &[RecipientOutcome]) {
    for outcome in outcomes {
        assert!(
            matches!(outcome, RecipientOutcome::Delivered { .. }),
            "not delivered: {outcome:?}"
        );
    }
}

#[test]
fn smtp_sink_takes_several_messages_over_one_connection() {
    let sink = start_smtp_sink(&[]);
    let mut connection = connect(sink.address);
    assert!(connection.capabilities().pipelining);
    assert!(connection.capabilities().eight_bit_mime);

    let bodies: [&[u8]; 3] = [
        b"Subject: first\r\n\r\nHello.\r\n",
        b"Subject: dots\r\n\r\n.leading dot\r\n..two dots\r\n.\r\nafter a lone dot\r\n",
        b"Subject: third\r\n\r\nno final line ending",
    ];
    let envelope = recipients(&["one@sink.test", "two@sink.test"]);
    for body in bodies {
        let result = connection.send(message(&envelope, body)).expect("send");
        assert_eq!(result.outcomes.len(), 2);
        assert_all_delivered(&result.outcomes);
        assert!(result.connection_usable);
    }
    connection.quit().expect("quit");

    // smtp-sink writes the dump after its reply; give it a moment.
    let expected_lines = [
        "Subject: dots",
        ".leading dot",
        "..two dots",
        ".",
        "after a lone dot",
        "no final line ending",
    ];
    let deadline = Instant::now() + STARTUP_DEADLINE;
    loop {
        let dump = std::fs::read_to_string(&sink.dump).unwrap_or_default();
        let lines: Vec<&str> = dump.lines().collect();
        let complete = dump.matches("X-Mail-Args:").count() == 3
            && expected_lines.iter().all(|line| lines.contains(line));
        if complete {
            assert!(!lines.contains(&"...two dots"), "dot-stuffing leaked");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "smtp-sink dump incomplete:\n{dump}"
        );
        sleep(Duration::from_millis(50));
    }
}

#[test]
fn smtp_sink_without_pipelining_reuses_the_connection() {
    // -p: do not announce PIPELINING, so each command waits for its reply.
    let sink = start_smtp_sink(&["-p"]);
    let mut connection = connect(sink.address);
    assert!(!connection.capabilities().pipelining);
    let envelope = recipients(&["a@sink.test", "b@sink.test", "c@sink.test"]);
    for _ in 0..3 {
        let result = connection
            .send(message(&envelope, b"Subject: x\r\n\r\n.dot\r\n"))
            .expect("send");
        assert_all_delivered(&result.outcomes);
    }
    connection.quit().expect("quit");
}

#[test]
fn smtp_sink_rcpt_rejection_fails_the_recipients() {
    // -f RCPT: answer every RCPT with a hard (5xx) error.
    let sink = start_smtp_sink(&["-f", "RCPT"]);
    let mut connection = connect(sink.address);
    let envelope = recipients(&["one@sink.test", "two@sink.test"]);
    for _ in 0..2 {
        let result = connection
            .send(message(&envelope, b"Subject: x\r\n\r\nbody\r\n"))
            .expect("send");
        for outcome in &result.outcomes {
            match outcome {
                RecipientOutcome::Failed(Reason::Reply {
                    stage: Stage::Rcpt,
                    reply,
                }) => assert!(reply.is_permanent(), "{reply:?}"),
                other => panic!("expected a 5xx at RCPT, got {other:?}"),
            }
        }
        // A refused RCPT leaves the session fine for the next message.
        assert!(result.connection_usable);
    }
    connection.quit().expect("quit");
}

#[test]
fn smtp_sink_disconnect_at_data_defers_the_recipients() {
    // -q DATA: hang up, without a reply, on DATA.
    let sink = start_smtp_sink(&["-q", "DATA"]);
    let mut connection = connect(sink.address);
    let envelope = recipients(&["one@sink.test", "two@sink.test"]);
    let result = connection
        .send(message(&envelope, b"Subject: x\r\n\r\nbody\r\n"))
        .expect("a lost connection is an outcome, not an error");
    assert!(!result.connection_usable);
    assert!(!connection.is_usable());
    for outcome in &result.outcomes {
        match outcome {
            RecipientOutcome::Deferred(Reason::Local(LocalFailure::ConnectionLost { detail })) => {
                assert!(detail.contains(&sink.address.to_string()), "{detail}")
            }
            other => panic!("expected a deferral for the lost connection, got {other:?}"),
        }
    }
    let again = connection.send(message(&envelope, b"body\r\n"));
    assert!(
        matches!(again, Err(DeliveryError::Unusable { .. })),
        "{again:?}"
    );
    connection
        .quit()
        .expect("quitting an unusable connection only closes it");
}

#[test]
fn smtp_sink_without_esmtp_gets_helo() {
    // -e: no ESMTP, so EHLO is refused with a 5xx and the driver falls back to HELO.
    let sink = start_smtp_sink(&["-e"]);
    let mut connection = connect(sink.address);
    assert_eq!(
        connection.capabilities(),
        &tsubame_delivery::Capabilities::default()
    );
    let envelope = recipients(&["one@sink.test"]);
    let result = connection
        .send(message(&envelope, b"Subject: x\r\n\r\nbody\r\n"))
        .expect("send");
    assert_all_delivered(&result.outcomes);
    connection.quit().expect("quit");
}

/// Opens a session in TLS mode `tls` without credentials, trusting the web PKI roots
/// and taking the IP address as the server name.
fn connect_with_tls(
    address: SocketAddr,
    helo_name: &str,
    tls: TlsMode,
    timeouts: Timeouts,
) -> Result<UpstreamConnection, DeliveryError> {
    let settings = tsubame_delivery::TlsSettings::new(tls, None).expect("TLS settings");
    let server_name = address.ip().to_string();
    UpstreamConnection::open(
        address,
        &tsubame_delivery::ConnectOptions {
            helo_name,
            tls,
            server_name: &server_name,
            tls_config: settings.config(),
            credentials: None,
            timeouts,
        },
    )
}

#[test]
fn required_tls_without_starttls_sends_no_mail() {
    let sink = start_smtp_sink(&[]);
    let error = connect_with_tls(sink.address, HELO_NAME, TlsMode::Required, timeouts())
        .expect_err("smtp-sink offers no STARTTLS");
    assert!(
        matches!(error, DeliveryError::StartTlsNotOffered { .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("does not offer STARTTLS"));
    // Nothing but EHLO and QUIT was said: no transaction reached the dump.
    sleep(Duration::from_millis(200));
    let dump = std::fs::read_to_string(&sink.dump).unwrap_or_default();
    assert!(!dump.contains("X-Mail-Args"), "{dump}");
}

#[test]
fn implicit_tls_against_a_plain_text_server_fails_the_handshake() {
    // smtp-sink greets in plain text, which is no TLS record.
    let sink = start_smtp_sink(&[]);
    let error = connect_with_tls(sink.address, HELO_NAME, TlsMode::Implicit, timeouts())
        .expect_err("no TLS on the other side");
    assert!(
        matches!(error, DeliveryError::TlsHandshake { .. }),
        "{error:?}"
    );
}

#[test]
fn opportunistic_tls_proceeds_in_plain_text() {
    let sink = start_smtp_sink(&[]);
    let mut connection =
        connect_with_tls(sink.address, HELO_NAME, TlsMode::Opportunistic, timeouts())
            .expect("connect");
    assert_eq!(
        connection.tls_summary(),
        None,
        "smtp-sink offers no STARTTLS"
    );
    let envelope = recipients(&["one@sink.test"]);
    let result = connection
        .send(message(&envelope, b"Subject: x\r\n\r\nbody\r\n"))
        .expect("send");
    assert_all_delivered(&result.outcomes);
    connection.quit().expect("quit");
}

// ---------------------------------------------------------------------------------
// aiosmtpd

const REJECTED: &str = "rejected@aiosmtpd.test";
const DEFERRED: &str = "deferred@aiosmtpd.test";

fn start_aiosmtpd() -> Aiosmtpd {
    common::start_aiosmtpd(&["--reject", REJECTED, "--defer", DEFERRED], &[])
}

fn received(server: &Aiosmtpd, number: usize) -> (serde_json::Value, Vec<u8>) {
    server.received(number)
}

#[test]
fn aiosmtpd_receives_exact_content_and_per_recipient_outcomes() {
    let server = start_aiosmtpd();
    let mut connection = connect(server.address);
    let capabilities = connection.capabilities().clone();
    assert!(capabilities.eight_bit_mime, "{capabilities:?}");
    assert!(capabilities.smtputf8, "{capabilities:?}");

    // 1. Dot lines, 8-bit bytes, mixed recipient outcomes.
    let body: &[u8] = b"Subject: =?utf-8?q?caf=C3=A9?=\r\n\
        Content-Type: text/plain; charset=utf-8\r\n\
        Content-Transfer-Encoding: 8bit\r\n\r\n\
        .starts with a dot\r\n\
        ..two dots\r\n\
        .\r\n\
        caf\xc3\xa9 \xe2\x82\xac \xff\x80 raw bytes\r\n\
        end.\r\n";
    let envelope = recipients(&[
        "first@aiosmtpd.test",
        REJECTED,
        DEFERRED,
        "last@aiosmtpd.test",
    ]);
    let result = connection
        .send(Message {
            mail_from: "sender@tsubame.test",
            recipients: &envelope,
            body_type: BodyType::EightBitMime,
            smtputf8: false,
            added_fields: &[],
            body,
        })
        .expect("send");
    assert!(result.connection_usable);
    assert!(matches!(
        result.outcomes[0],
        RecipientOutcome::Delivered { .. }
    ));
    match &result.outcomes[1] {
        RecipientOutcome::Failed(Reason::Reply {
            stage: Stage::Rcpt,
            reply,
        }) => assert_eq!(reply.code, 550),
        other => panic!("expected 550 at RCPT, got {other:?}"),
    }
    match &result.outcomes[2] {
        RecipientOutcome::Deferred(Reason::Reply {
            stage: Stage::Rcpt,
            reply,
        }) => assert_eq!(reply.code, 451),
        other => panic!("expected 451 at RCPT, got {other:?}"),
    }
    assert!(matches!(
        result.outcomes[3],
        RecipientOutcome::Delivered { .. }
    ));
    let (received_envelope, content) = received(&server, 1);
    assert_eq!(content, body, "content not byte-exact");
    assert_eq!(received_envelope["mail_from"], "sender@tsubame.test");
    assert_eq!(
        received_envelope["rcpt_tos"],
        serde_json::json!(["first@aiosmtpd.test", "last@aiosmtpd.test"])
    );
    assert!(
        received_envelope["mail_options"]
            .as_array()
            .expect("mail_options")
            .iter()
            .any(|option| option == "BODY=8BITMIME"),
        "{received_envelope}"
    );

    // 2. SMTPUTF8 on the same connection: a non-ASCII recipient and UTF-8 headers.
    let utf8_recipient = "用户@例子.test".to_owned();
    let envelope = vec![utf8_recipient.clone()];
    let body = "Subject: 件名\r\nFrom: sender@tsubame.test\r\n\r\nこんにちは\r\n.点\r\n".as_bytes();
    let result = connection
        .send(Message {
            mail_from: "sender@tsubame.test",
            recipients: &envelope,
            body_type: BodyType::EightBitMime,
            smtputf8: true,
            added_fields: &[],
            body,
        })
        .expect("send");
    assert_all_delivered(&result.outcomes);
    let (received_envelope, content) = received(&server, 2);
    assert_eq!(content, body, "content not byte-exact");
    assert_eq!(
        received_envelope["rcpt_tos"],
        serde_json::json!([utf8_recipient])
    );
    assert_eq!(received_envelope["smtp_utf8"], true, "{received_envelope}");

    // 3. A body without a final CRLF gets one, nothing else changes.
    let envelope = recipients(&["first@aiosmtpd.test"]);
    let result = connection
        .send(message(&envelope, b"Subject: x\r\n\r\n.no final CRLF"))
        .expect("send");
    assert_all_delivered(&result.outcomes);
    let (_, content) = received(&server, 3);
    assert_eq!(content, b"Subject: x\r\n\r\n.no final CRLF\r\n");

    connection.quit().expect("quit");
}
