//! STARTTLS, implicit TLS and AUTH against aiosmtpd (Python's `ssl`, so OpenSSL, on
//! the server side), with certificates made by the `openssl` CLI for each test.
//!
//! These tests fail, never skip, when python3, aiosmtpd or openssl is missing.
//! Every server is a child process killed when its guard drops; every socket has a
//! timeout. The credentials are generated per test and handed to the server through
//! its environment; no secret is committed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use common::{Aiosmtpd, SERVER_NAME, TestPki, open, send, start_aiosmtpd};
use tsubame_config::TlsMode;
use tsubame_delivery::{AuthError, Credentials, DeliveryError, Secret, TlsSettings};

const USERNAME: &str = "relay-user@tsubame.test";

/// A password made up for this test run: never a real secret, and different each
/// time, so a leak into an error message cannot go unnoticed by a fixed allow-list.
fn generated_password() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.subsec_nanos())
        .unwrap_or_default();
    format!("pw-{}-{nanos:09}-Zq", std::process::id())
}

fn credentials(password: &str) -> Credentials {
    Credentials::Password {
        username: USERNAME.to_owned(),
        password: Secret::new(password),
    }
}

/// Starts aiosmtpd with `arguments`; the valid login is `USERNAME` / `password`.
fn start(arguments: &[String], password: &str) -> Aiosmtpd {
    let arguments: Vec<&str> = arguments.iter().map(String::as_str).collect();
    start_aiosmtpd(
        &arguments,
        &[
            ("TSUBAME_TEST_SMTP_USERNAME", USERNAME),
            ("TSUBAME_TEST_SMTP_PASSWORD", password),
        ],
    )
}

fn arguments(base: Vec<String>, extra: &[&str]) -> Vec<String> {
    let mut all = base;
    all.extend(extra.iter().map(|argument| (*argument).to_owned()));
    all
}

fn settings(mode: TlsMode, ca_file: Option<&Path>) -> TlsSettings {
    TlsSettings::new(mode, ca_file).unwrap_or_else(|error| panic!("TLS settings: {error}"))
}

/// Dot lines, 8-bit bytes, a line that looks like an SMTP reply: all must arrive as
/// they are.
const BODY: &[u8] = b"Subject: over TLS\r\n\
    Content-Type: text/plain; charset=utf-8\r\n\
    Content-Transfer-Encoding: 8bit\r\n\r\n\
    .starts with a dot\r\n\
    ..two dots\r\n\
    .\r\n\
    250 2.0.0 not a reply\r\n\
    caf\xc3\xa9 \xff\x80 raw bytes\r\n";

#[test]
fn required_starttls_with_auth_plain_delivers_byte_exact() {
    let pki = TestPki::generate();
    let password = generated_password();
    let server = start(
        &arguments(
            pki.server_arguments(),
            &[
                "--starttls",
                "--require-starttls",
                "--auth",
                "PLAIN,LOGIN",
                "--auth-required",
            ],
        ),
        &password,
    );
    let tls = settings(TlsMode::Required, Some(&pki.ca));
    let credentials = credentials(&password);
    let mut connection = open(server.address, &tls, SERVER_NAME, Some(&credentials)).expect("open");

    let summary = connection.tls_summary().expect("encrypted");
    assert!(summary.starts_with("TLSv1.3 TLS13_"), "{summary}");
    // The capabilities are those of the EHLO over TLS (RFC 3207 §4.2).
    let capabilities = connection.capabilities();
    assert!(!capabilities.starttls, "{capabilities:?}");
    assert!(capabilities.offers_auth("PLAIN"), "{capabilities:?}");

    // Two messages over one TLS connection (RSET in between), then QUIT.
    send(&mut connection, BODY);
    send(&mut connection, b"Subject: second\r\n\r\nno final CRLF");
    connection.quit().expect("quit");

    let (envelope, content) = server.received(1);
    assert_eq!(content, BODY, "content not byte-exact");
    assert_eq!(envelope["tls"], "TLSv1.3", "{envelope}");
    // PLAIN is preferred when both are offered.
    assert_eq!(envelope["auth_mechanism"], "PLAIN", "{envelope}");
    assert_eq!(envelope["auth_login"], USERNAME, "{envelope}");
    let (envelope, content) = server.received(2);
    assert_eq!(content, b"Subject: second\r\n\r\nno final CRLF\r\n");
    assert_eq!(envelope["tls"], "TLSv1.3", "{envelope}");
}

#[test]
fn auth_login_when_only_login_is_offered() {
    let pki = TestPki::generate();
    let password = generated_password();
    let server = start(
        &arguments(
            pki.server_arguments(),
            &["--starttls", "--auth", "LOGIN", "--auth-required"],
        ),
        &password,
    );
    let tls = settings(TlsMode::Required, Some(&pki.ca));
    let credentials = credentials(&password);
    let mut connection = open(server.address, &tls, SERVER_NAME, Some(&credentials)).expect("open");
    send(&mut connection, BODY);
    connection.quit().expect("quit");
    let (envelope, content) = server.received(1);
    assert_eq!(content, BODY);
    assert_eq!(envelope["auth_mechanism"], "LOGIN", "{envelope}");
    assert_eq!(envelope["auth_login"], USERNAME, "{envelope}");
}

#[test]
fn implicit_tls_verifies_an_ip_address_name() {
    let pki = TestPki::generate();
    let password = generated_password();
    let server = start(
        &arguments(
            pki.server_arguments(),
            &["--implicit-tls", "--auth", "PLAIN", "--auth-required"],
        ),
        &password,
    );
    let tls = settings(TlsMode::Implicit, Some(&pki.ca));
    let credentials = credentials(&password);
    // The certificate names 127.0.0.1 too; no SNI is sent for an address.
    let mut connection = open(server.address, &tls, "127.0.0.1", Some(&credentials)).expect("open");
    assert!(connection.tls_summary().is_some());
    send(&mut connection, BODY);
    connection.quit().expect("quit");
    let (envelope, content) = server.received(1);
    assert_eq!(content, BODY);
    assert_eq!(envelope["tls"], "TLSv1.3", "{envelope}");
    assert_eq!(envelope["auth_login"], USERNAME, "{envelope}");
}

#[test]
fn tls12_only_server_negotiates_tls12() {
    let pki = TestPki::generate();
    let server = start(
        &arguments(
            pki.server_arguments(),
            &["--implicit-tls", "--tls-max", "1.2"],
        ),
        "unused",
    );
    let tls = settings(TlsMode::Implicit, Some(&pki.ca));
    let mut connection = open(server.address, &tls, SERVER_NAME, None).expect("open");
    let summary = connection.tls_summary().expect("encrypted");
    assert!(summary.starts_with("TLSv1.2 TLS_ECDHE_ECDSA_"), "{summary}");
    send(&mut connection, BODY);
    connection.quit().expect("quit");
    let (envelope, _) = server.received(1);
    assert_eq!(envelope["tls"], "TLSv1.2", "{envelope}");
}

#[test]
fn opportunistic_accepts_a_self_signed_certificate_and_encrypts() {
    let pki = TestPki::generate();
    let server = start(
        &arguments(pki.self_signed_arguments(), &["--starttls"]),
        "unused",
    );
    // RFC 7435: encrypt without authenticating; a MX name that matches nothing
    // does not matter either.
    let tls = settings(TlsMode::Opportunistic, None);
    let mut connection = open(server.address, &tls, "mx.elsewhere.test", None).expect("open");
    assert!(connection.tls_summary().is_some());
    send(&mut connection, BODY);
    connection.quit().expect("quit");
    let (envelope, content) = server.received(1);
    assert_eq!(content, BODY);
    assert_eq!(envelope["tls"], "TLSv1.3", "the server saw TLS: {envelope}");
}

#[test]
fn opportunistic_without_starttls_delivers_in_plain_text() {
    let server = start(&[], "unused");
    let tls = settings(TlsMode::Opportunistic, None);
    let mut connection = open(server.address, &tls, SERVER_NAME, None).expect("open");
    assert_eq!(connection.tls_summary(), None);
    send(&mut connection, BODY);
    connection.quit().expect("quit");
    let (envelope, content) = server.received(1);
    assert_eq!(content, BODY);
    assert_eq!(envelope["tls"], serde_json::Value::Null, "{envelope}");
}

#[test]
fn required_without_starttls_fails_before_any_mail() {
    let pki = TestPki::generate();
    let server = start(&[], "unused");
    let tls = settings(TlsMode::Required, Some(&pki.ca));
    let error = open(server.address, &tls, SERVER_NAME, None).expect_err("must fail");
    assert!(
        matches!(error, DeliveryError::StartTlsNotOffered { .. }),
        "{error:?}"
    );
    assert!(!error.is_permanent());
    assert_eq!(server.mail_log(), "", "no transaction may be attempted");
}

#[test]
fn opportunistic_with_credentials_but_no_starttls_sends_no_credentials() {
    let password = generated_password();
    // The server offers AUTH in plain text only if told to; it is not, so any AUTH
    // would get 538, and the client must not even try.
    let server = start(&[], &password);
    let tls = settings(TlsMode::Opportunistic, None);
    let credentials = credentials(&password);
    let error = open(server.address, &tls, SERVER_NAME, Some(&credentials)).expect_err("must fail");
    assert!(
        matches!(error, DeliveryError::AuthWithoutTls { .. }),
        "{error:?}"
    );
    assert_eq!(server.mail_log(), "");
}

#[test]
fn untrusted_certificate_fails_the_handshake() {
    let pki = TestPki::generate();
    // Self-signed, so it does not chain to the CA the client trusts.
    let server = start(
        &arguments(pki.self_signed_arguments(), &["--starttls"]),
        "unused",
    );
    let tls = settings(TlsMode::Required, Some(&pki.ca));
    let error = open(server.address, &tls, SERVER_NAME, None).expect_err("must fail");
    match &error {
        DeliveryError::TlsHandshake { reason, .. } => {
            assert!(reason.contains("UnknownIssuer"), "{reason}")
        }
        other => panic!("expected a handshake failure, got {other:?}"),
    }
    assert_eq!(server.mail_log(), "");

    // The web PKI roots do not know the test CA either.
    let tls = settings(TlsMode::Required, None);
    let error = open(server.address, &tls, SERVER_NAME, None).expect_err("must fail");
    assert!(
        matches!(error, DeliveryError::TlsHandshake { .. }),
        "{error:?}"
    );
}

#[test]
fn wrong_server_name_fails_the_handshake() {
    let pki = TestPki::generate();
    let server = start(
        &arguments(pki.server_arguments(), &["--starttls"]),
        "unused",
    );
    let tls = settings(TlsMode::Required, Some(&pki.ca));
    let error = open(server.address, &tls, "other.tsubame.test", None).expect_err("must fail");
    match &error {
        DeliveryError::TlsHandshake {
            reason,
            server_name,
            ..
        } => {
            assert!(reason.contains("not valid for name"), "{reason}");
            assert_eq!(server_name, "other.tsubame.test");
        }
        other => panic!("expected a handshake failure, got {other:?}"),
    }
    assert!(error.to_string().contains("other.tsubame.test"), "{error}");
    assert_eq!(server.mail_log(), "");
}

#[test]
fn wrong_password_is_an_auth_error_without_the_password() {
    let pki = TestPki::generate();
    let password = generated_password();
    let server = start(
        &arguments(
            pki.server_arguments(),
            &["--starttls", "--auth", "PLAIN", "--auth-required"],
        ),
        &password,
    );
    let tls = settings(TlsMode::Required, Some(&pki.ca));
    let wrong = format!("{password}-wrong");
    let credentials = credentials(&wrong);
    let error = open(server.address, &tls, SERVER_NAME, Some(&credentials)).expect_err("must fail");
    match &error {
        DeliveryError::Auth {
            source: AuthError::Rejected(reply),
            ..
        } => assert_eq!(reply.code, 535),
        other => panic!("expected a refused AUTH, got {other:?}"),
    }
    assert!(!error.is_permanent(), "an operator fixes the password");
    let shown = [
        error.to_string(),
        format!("{error:?}"),
        format!("{credentials:?}"),
    ];
    for text in shown {
        assert!(!text.contains(&wrong), "password leaked: {text}");
        assert!(!text.contains(&password), "password leaked: {text}");
        // Nor its base64 (the AUTH PLAIN line's payload starts with the username).
        assert!(
            !text.contains("AHJlbGF5"),
            "encoded credentials leaked: {text}"
        );
    }
    assert_eq!(server.mail_log(), "");
}

#[test]
fn no_supported_auth_mechanism_is_a_clear_error() {
    let pki = TestPki::generate();
    let password = generated_password();
    let server = start(
        &arguments(
            pki.server_arguments(),
            &["--starttls", "--auth", "CRAM-MD5"],
        ),
        &password,
    );
    let tls = settings(TlsMode::Required, Some(&pki.ca));
    let credentials = credentials(&password);
    let error = open(server.address, &tls, SERVER_NAME, Some(&credentials)).expect_err("must fail");
    match &error {
        DeliveryError::AuthMechanismUnsupported { offered, .. } => {
            assert_eq!(offered, &["CRAM-MD5".to_owned()])
        }
        other => panic!("expected no usable mechanism, got {other:?}"),
    }
    assert!(error.to_string().contains("offered: CRAM-MD5"), "{error}");
}

#[test]
fn unusable_ca_files_are_clear_errors() {
    let pki = TestPki::generate();
    let garbage = pki.dir.path().join("garbage.pem");
    std::fs::write(&garbage, b"not a certificate\n").unwrap();
    // A private key where the CA should be: no certificate in it.
    for path in [garbage.as_path(), pki.ca_key.as_path()] {
        let error = TlsSettings::new(TlsMode::Required, Some(path)).expect_err("must fail");
        let message = error.to_string();
        assert!(message.contains("holds no PEM certificate"), "{message}");
        assert!(message.contains(&path.display().to_string()), "{message}");
    }
    let missing = pki.dir.path().join("missing.pem");
    let error = TlsSettings::new(TlsMode::Implicit, Some(&missing)).expect_err("must fail");
    assert!(error.to_string().contains("cannot read it"), "{error}");
}

#[test]
fn one_settings_value_serves_many_connections() {
    let pki = TestPki::generate();
    let server = start(
        &arguments(pki.server_arguments(), &["--starttls"]),
        "unused",
    );
    let tls = settings(TlsMode::Required, Some(&pki.ca));
    let shared = tls.config().unwrap();
    for number in 1..=3 {
        let mut connection = open(server.address, &tls, SERVER_NAME, None).expect("open");
        send(&mut connection, BODY);
        connection.quit().expect("quit");
        let (envelope, _) = server.received(number);
        assert_eq!(envelope["tls"], "TLSv1.3", "{envelope}");
    }
    // The same configuration (and so the same resumption cache) every time.
    assert!(Arc::ptr_eq(&shared, &tls.config().unwrap()));
}
