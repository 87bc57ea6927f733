//! AUTH XOAUTH2 and OAUTHBEARER (RFC 7628) against aiosmtpd over STARTTLS, with
//! certificates made by the `openssl` CLI for each test.
//!
//! The peer (tests/peers/aiosmtpd_sink.py) checks the initial response byte for byte
//! against the documented format, answers a wrong token as Gmail does (a 334 error
//! challenge, which must be answered, then 535 5.7.8), and logs each bearer AUTH to
//! `auth.log` without the token.
//!
//! These tests fail, never skip, when python3, aiosmtpd or openssl is missing. Every
//! server is a child process killed when its guard drops; every socket has a timeout.
//! The tokens are generated per test (never a real one) and handed to the server
//! through its environment.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use common::{Aiosmtpd, HELO_NAME, SERVER_NAME, TEST_TIMEOUT, TestPki, send, start_aiosmtpd};
use tsubame_config::TlsMode;
use tsubame_delivery::{
    AuthError, BearerErrorDetail, BearerMechanism, ConnectOptions, Credentials, DeliveryError,
    Secret, Timeouts, TlsSettings, UpstreamConnection,
};

const USERNAME: &str = "relay-user@tsubame.test";
/// An authorization identity with both characters RFC 7628 §3.1 escapes.
const AWKWARD_USERNAME: &str = "relay,user=1@tsubame.test";

/// A made-up token of about `length` bytes in RFC 6750's b64token alphabet, different
/// each run so that a leak into an error message cannot pass a fixed allow-list.
/// Google's access tokens run to 2 KB and more: the long ones check that the AUTH line
/// goes out whole.
fn generated_token(label: &str, length: usize) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.subsec_nanos())
        .unwrap_or_default();
    let mut token = format!("ya29.{label}-{}-{nanos:09}.", std::process::id());
    let filler = "Az09-._~+/";
    while token.len() < length {
        token.push_str(filler);
    }
    token.truncate(length);
    token
}

fn bearer(username: &str, token: &str, mechanism: BearerMechanism) -> Credentials {
    Credentials::Bearer {
        username: username.to_owned(),
        token: Secret::new(token),
        mechanism,
    }
}

/// Starts aiosmtpd with STARTTLS (required) and `mechanisms` offered after it; the
/// one valid login is `username` with `token`.
fn start(pki: &TestPki, mechanisms: &str, username: &str, token: &str) -> Aiosmtpd {
    let mut arguments = pki.server_arguments();
    arguments.extend(
        [
            "--starttls",
            "--require-starttls",
            "--auth",
            mechanisms,
            "--auth-required",
            "--bearer-host",
            SERVER_NAME,
        ]
        .map(str::to_owned),
    );
    let arguments: Vec<&str> = arguments.iter().map(String::as_str).collect();
    start_aiosmtpd(
        &arguments,
        &[
            ("TSUBAME_TEST_SMTP_USERNAME", username),
            ("TSUBAME_TEST_SMTP_TOKEN", token),
        ],
    )
}

fn open(
    address: SocketAddr,
    pki: &TestPki,
    mode: TlsMode,
    credentials: &Credentials,
) -> Result<UpstreamConnection, DeliveryError> {
    let settings = TlsSettings::new(mode, Some(&pki.ca))
        .unwrap_or_else(|error| panic!("TLS settings: {error}"));
    common::open(address, &settings, SERVER_NAME, Some(credentials))
}

/// Dot lines, 8-bit bytes, a line that looks like an SMTP reply: all must arrive as
/// they are.
const BODY: &[u8] = b"Subject: sent with a bearer token\r\n\
    Content-Type: text/plain; charset=utf-8\r\n\
    Content-Transfer-Encoding: 8bit\r\n\r\n\
    .starts with a dot\r\n\
    ..two dots\r\n\
    .\r\n\
    235 2.7.0 not a reply\r\n\
    caf\xc3\xa9 \xff\x80 raw bytes\r\n";

/// What the peer logged about bearer AUTH, one line per attempt.
fn auth_log(server: &Aiosmtpd) -> String {
    std::fs::read_to_string(server.dir.path().join("auth.log")).unwrap_or_default()
}

/// Length of the base64 of `bytes` (RFC 4648 §4, padded).
fn base64_len(bytes: usize) -> usize {
    bytes.div_ceil(3) * 4
}

/// The error, its `Display` and `Debug`, and the credentials' `Debug` hold neither the
/// token nor a piece of it.
fn assert_no_token_in(error: &DeliveryError, credentials: &Credentials, token: &str) {
    let shown = [
        error.to_string(),
        format!("{error:?}"),
        format!("{credentials:?}"),
    ];
    // The generated part: the "ya29." prefix and the filler are not secret.
    let secret_part = token.get(5..30).unwrap();
    for text in shown {
        assert!(!text.contains(secret_part), "token leaked: {text}");
    }
}

#[test]
fn xoauth2_with_the_right_token_delivers_byte_exact() {
    let pki = TestPki::generate();
    let token = generated_token("right", 2_600);
    // PLAIN is offered too: bearer credentials use their own mechanism.
    let server = start(&pki, "PLAIN,XOAUTH2", USERNAME, &token);
    let credentials = bearer(USERNAME, &token, BearerMechanism::XOAuth2);
    let mut connection = open(server.address, &pki, TlsMode::Required, &credentials).expect("open");
    assert!(connection.capabilities().offers_auth("XOAUTH2"));
    send(&mut connection, BODY);
    connection.quit().expect("quit");

    let (envelope, content) = server.received(1);
    assert_eq!(content, BODY, "content not byte-exact");
    assert_eq!(envelope["tls"], "TLSv1.3", "{envelope}");
    assert_eq!(envelope["auth_mechanism"], "XOAUTH2", "{envelope}");
    assert_eq!(envelope["auth_login"], USERNAME, "{envelope}");
    // "user=" USER ^A "auth=Bearer " TOKEN ^A ^A, whole: a ~3.5 KB AUTH line, seven
    // times RFC 5321's 512-octet command line.
    let message_bytes = "user=".len() + USERNAME.len() + "\x01auth=Bearer ".len() + token.len() + 2;
    assert_eq!(
        auth_log(&server),
        format!(
            "XOAUTH2 accepted, initial response {} base64 bytes\n",
            base64_len(message_bytes)
        )
    );
}

#[test]
fn xoauth2_with_a_wrong_token_is_token_rejected_after_the_empty_answer() {
    let pki = TestPki::generate();
    let token = generated_token("right", 2_600);
    let wrong = generated_token("wrong", 2_600);
    let server = start(&pki, "XOAUTH2", USERNAME, &token);
    let credentials = bearer(USERNAME, &wrong, BearerMechanism::XOAuth2);
    let error = open(server.address, &pki, TlsMode::Required, &credentials).expect_err("must fail");
    match &error {
        DeliveryError::Auth {
            source: AuthError::TokenRejected { reply, detail },
            ..
        } => {
            assert_eq!(reply.code, 535);
            assert_eq!(reply.lines.len(), 2, "Gmail's two-line reply: {reply:?}");
            assert_eq!(
                detail.as_deref(),
                Some(&BearerErrorDetail {
                    status: Some("401".to_owned()),
                    scope: Some("https://mail.google.com/".to_owned()),
                    schemes: Some("Bearer".to_owned()),
                })
            );
        }
        other => panic!("expected a rejected token, got {other:?}"),
    }
    assert!(error.is_token_rejected());
    assert!(!error.is_permanent(), "a refused token defers the mail");
    // Google's protocol: the error challenge is answered with an empty line.
    assert_eq!(
        auth_log(&server),
        "XOAUTH2 wrong token; challenge answered b''\n"
    );
    assert_eq!(server.mail_log(), "", "no transaction may be attempted");
    assert_no_token_in(&error, &credentials, &wrong);
    assert_no_token_in(&error, &credentials, &token);
}

/// What the relay does with a cached token the upstream refuses: drop it, fetch a
/// fresh one and connect again, once.
#[test]
fn an_expired_token_then_a_fresh_one() {
    let pki = TestPki::generate();
    let fresh = generated_token("fresh", 2_048);
    let expired = generated_token("expired", 2_048);
    let server = start(&pki, "XOAUTH2", USERNAME, &fresh);

    let stale = bearer(USERNAME, &expired, BearerMechanism::XOAuth2);
    let error = open(server.address, &pki, TlsMode::Required, &stale).expect_err("must fail");
    assert!(error.is_token_rejected(), "{error:?}");

    let renewed = bearer(USERNAME, &fresh, BearerMechanism::XOAuth2);
    let mut connection = open(server.address, &pki, TlsMode::Required, &renewed).expect("open");
    send(&mut connection, BODY);
    connection.quit().expect("quit");
    let (envelope, content) = server.received(1);
    assert_eq!(content, BODY);
    assert_eq!(envelope["auth_mechanism"], "XOAUTH2", "{envelope}");
    let log = auth_log(&server);
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 2, "{log}");
    assert_eq!(lines[0], "XOAUTH2 wrong token; challenge answered b''");
    assert!(lines[1].starts_with("XOAUTH2 accepted"), "{log}");
}

#[test]
fn oauthbearer_with_the_right_token_delivers_byte_exact() {
    let pki = TestPki::generate();
    let token = generated_token("right", 2_600);
    // The peer expects "a=relay=2Cuser=3D1@tsubame.test", host=SERVER_NAME and
    // port=its own port (RFC 7628 §3.1).
    let server = start(&pki, "OAUTHBEARER,XOAUTH2", AWKWARD_USERNAME, &token);
    let credentials = bearer(AWKWARD_USERNAME, &token, BearerMechanism::OAuthBearer);
    let mut connection = open(server.address, &pki, TlsMode::Required, &credentials).expect("open");
    send(&mut connection, BODY);
    connection.quit().expect("quit");

    let (envelope, content) = server.received(1);
    assert_eq!(content, BODY, "content not byte-exact");
    assert_eq!(envelope["auth_mechanism"], "OAUTHBEARER", "{envelope}");
    assert_eq!(envelope["auth_login"], AWKWARD_USERNAME, "{envelope}");
    assert!(
        auth_log(&server).starts_with("OAUTHBEARER accepted"),
        "{}",
        auth_log(&server)
    );
}

#[test]
fn oauthbearer_with_a_wrong_token_is_token_rejected_after_the_kvsep_answer() {
    let pki = TestPki::generate();
    let token = generated_token("right", 600);
    let wrong = generated_token("wrong", 600);
    let server = start(&pki, "OAUTHBEARER", USERNAME, &token);
    let credentials = bearer(USERNAME, &wrong, BearerMechanism::OAuthBearer);
    let error = open(server.address, &pki, TlsMode::Required, &credentials).expect_err("must fail");
    match &error {
        DeliveryError::Auth {
            source: AuthError::TokenRejected { reply, detail },
            ..
        } => {
            assert_eq!(reply.code, 535);
            let detail = detail.as_deref().expect("the error challenge was read");
            assert_eq!(detail.status.as_deref(), Some("invalid_token"));
            assert_eq!(detail.scope.as_deref(), Some("https://mail.tsubame.test/"));
        }
        other => panic!("expected a rejected token, got {other:?}"),
    }
    assert!(error.is_token_rejected());
    // RFC 7628 §3.2.3: the answer to the error challenge is a single %x01.
    assert_eq!(
        auth_log(&server),
        "OAUTHBEARER wrong token; challenge answered b'\\x01'\n"
    );
    assert_eq!(server.mail_log(), "");
    assert_no_token_in(&error, &credentials, &wrong);
}

#[test]
fn a_bearer_mechanism_the_upstream_does_not_offer_is_a_clear_error() {
    let pki = TestPki::generate();
    let token = generated_token("right", 200);
    let cases = [
        ("PLAIN,LOGIN", BearerMechanism::XOAuth2, "LOGIN PLAIN"),
        ("OAUTHBEARER", BearerMechanism::XOAuth2, "OAUTHBEARER"),
        ("XOAUTH2", BearerMechanism::OAuthBearer, "XOAUTH2"),
    ];
    for (offered, mechanism, offered_text) in cases {
        let server = start(&pki, offered, USERNAME, &token);
        let credentials = bearer(USERNAME, &token, mechanism);
        let error =
            open(server.address, &pki, TlsMode::Required, &credentials).expect_err("must fail");
        match &error {
            DeliveryError::AuthMechanismNotOffered {
                mechanism: missing, ..
            } => assert_eq!(*missing, mechanism),
            other => panic!("expected a mechanism not offered, got {other:?}"),
        }
        assert!(
            error.to_string().ends_with(&format!(
                "does not offer AUTH {}; offered: {offered_text}",
                mechanism.name()
            )),
            "{error}"
        );
        assert!(!error.is_permanent());
        assert!(!error.is_token_rejected());
        assert_eq!(auth_log(&server), "", "no AUTH may be sent");
        assert_eq!(server.mail_log(), "");
    }
}

#[test]
fn bearer_credentials_never_go_over_plain_text() {
    let pki = TestPki::generate();
    let token = generated_token("right", 200);
    let credentials = bearer(USERNAME, &token, BearerMechanism::XOAuth2);

    // TLS off: refused before connecting. Nothing listens on the port, so an attempt
    // to connect would be a connect error instead.
    let nowhere = SocketAddr::from(([127, 0, 0, 1], common::free_port()));
    let error = UpstreamConnection::open(
        nowhere,
        &ConnectOptions {
            helo_name: HELO_NAME,
            tls: TlsMode::None,
            server_name: SERVER_NAME,
            tls_config: None,
            credentials: Some(&credentials),
            timeouts: Timeouts::uniform(TEST_TIMEOUT),
        },
    )
    .expect_err("must fail");
    assert!(
        matches!(error, DeliveryError::AuthWithoutTls { .. }),
        "{error:?}"
    );

    // Opportunistic TLS with a server that offers no STARTTLS: the session stays in
    // plain text, and AUTH is refused before it is sent.
    let plain = start_aiosmtpd(&[], &[]);
    let error =
        open(plain.address, &pki, TlsMode::Opportunistic, &credentials).expect_err("must fail");
    assert!(
        matches!(error, DeliveryError::AuthWithoutTls { .. }),
        "{error:?}"
    );
    assert_eq!(auth_log(&plain), "");
    assert_eq!(plain.mail_log(), "");
}

#[test]
fn a_token_that_is_not_a_b64token_is_refused_before_connecting() {
    let pki = TestPki::generate();
    // A token read from a file with its line break. Nothing listens on the port, so
    // an attempt to connect would be a connect error instead.
    let token = generated_token("right", 200);
    let nowhere = SocketAddr::from(([127, 0, 0, 1], common::free_port()));
    for mechanism in [BearerMechanism::XOAuth2, BearerMechanism::OAuthBearer] {
        let credentials = bearer(USERNAME, &format!("{token}\n"), mechanism);
        let error = open(nowhere, &pki, TlsMode::Required, &credentials).expect_err("must fail");
        assert!(
            matches!(
                error,
                DeliveryError::Auth {
                    source: AuthError::NotEncodable { .. },
                    ..
                }
            ),
            "{error:?}"
        );
        assert!(
            error.to_string().contains("not an RFC 6750 b64token"),
            "{error}"
        );
        assert!(!error.is_token_rejected());
        assert_no_token_in(&error, &credentials, &token);
    }
}
