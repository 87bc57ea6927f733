//! Devices log in: STARTTLS (RFC 3207) and implicit TLS (RFC 8314) on the listening side,
//! SMTP AUTH (RFC 4954) with PLAIN (RFC 4616) and LOGIN, each user's sender and
//! recipient restrictions, `require_auth`, the legacy-device profile, never an open
//! relay, certificate reload on SIGHUP, and the Received header (RFC 3848).
//!
//! The peers are Python's smtplib and ssl, swaks and `openssl s_client`. Byte-exact
//! exchanges (commands pipelined behind STARTTLS, AUTH continuations) go through
//! [`TlsClient`], which is Python's ssl driven step by step. Rate limits and the login
//! guard are in `login_limits.rs`, which shares this file's fixture.
//!
//! Passwords are made up by each test run ([`test_password`]), never real secrets; their
//! argon2id hashes come from `tsubame user add`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tsubame_tests::cli::{inspect, password_hash, show, tsubame, user_add};
use tsubame_tests::peers::{Outcome, Smtplib, openssl_s_client, swaks};
use tsubame_tests::pki::TestPki;
use tsubame_tests::process::{Signal, hard_limit, send_signal};
use tsubame_tests::server::{Server, ServerOptions};
use tsubame_tests::smtp::Next;
use tsubame_tests::smtp::{RawClient, Reply};
use tsubame_tests::tls_client::{TlsClient, TlsClientOptions};
use tsubame_tests::upstream::{Aiosmtpd, wait_until};

use crate::{assert_spool_ids, test_message};

/// The common name of the listener's certificate (its SAN names 127.0.0.1 and
/// localhost, so clients verify it as usual).
pub(crate) const CERTIFICATE_CN: &str = "login.tsubame.test";
/// `[server] hostname` of every server here: the greeting, EHLO and Received name.
pub(crate) const HOSTNAME: &str = "relay.tsubame.test";
/// The device account most tests log in with.
pub(crate) const USER: &str = "scanner-7q";
/// A second account, for "the other user is not affected".
pub(crate) const OTHER_USER: &str = "printer-3f";
/// The EHLO name smtplib sends (`tests/peers/smtp_client.py`).
const SMTPLIB_HELO: &str = "peer.tsubame.test";
/// A delivery on a loaded CI machine; a healthy one takes milliseconds.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

/// A password made up for this test run (never a real secret): `tag` keeps the
/// passwords of different tests apart, the process id makes each run's differ.
pub(crate) fn test_password(tag: &str) -> String {
    format!("correct horse test {tag} {}", std::process::id())
}

/// A TOML basic string holding `text` (JSON's escapes are TOML's).
pub(crate) fn toml_string(text: &str) -> String {
    serde_json::Value::from(text).to_string()
}

/// Standard base64 with padding (RFC 4648 §4), as AUTH exchanges carry it.
pub(crate) fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let byte = |index: usize| u32::from(chunk.get(index).copied().unwrap_or(0));
        let triple = (byte(0) << 16) | (byte(1) << 8) | byte(2);
        let sextet = |shift: u32| char::from(ALPHABET[((triple >> shift) & 63) as usize]);
        out.push(sextet(18));
        out.push(sextet(12));
        out.push(if chunk.len() > 1 { sextet(6) } else { '=' });
        out.push(if chunk.len() > 2 { sextet(0) } else { '=' });
    }
    out
}

/// The AUTH PLAIN message (RFC 4616 §2): no authorization identity, then the
/// authentication identity and the password, NUL-separated; base64-encoded.
pub(crate) fn plain_response(user: &str, password: &str) -> String {
    base64(format!("\0{user}\0{password}").as_bytes())
}

/// The throwaway PKI of one test and the listener certificate it issued.
pub(crate) struct Fixture {
    pki: TestPki,
    certificate: PathBuf,
    key: PathBuf,
}

impl Fixture {
    #[track_caller]
    pub(crate) fn new() -> Fixture {
        let pki = TestPki::new();
        let (certificate, key) = pki.issue("login", CERTIFICATE_CN);
        Fixture {
            pki,
            certificate,
            key,
        }
    }

    pub(crate) fn ca(&self) -> PathBuf {
        self.pki.ca()
    }

    /// `certificate_file` and `key_file` lines for a listener.
    pub(crate) fn tls_keys(&self) -> String {
        tls_keys(&self.certificate, &self.key)
    }

    /// Options for a [`TlsClient`] that verifies the listener against the test CA.
    pub(crate) fn client_options(&self) -> TlsClientOptions {
        TlsClientOptions::new(&self.ca())
    }
}

fn tls_keys(certificate: &Path, key: &Path) -> String {
    format!(
        "certificate_file = {}\nkey_file = {}\n",
        toml_string(&certificate.display().to_string()),
        toml_string(&key.display().to_string())
    )
}

/// A `[[user]]` entry for `name` with `password`'s hash and `extra` keys.
pub(crate) fn user_entry(name: &str, password: &str, extra: &str) -> String {
    format!(
        "[[user]]\nname = {}\npassword_hash = {}\n{extra}\n",
        toml_string(name),
        toml_string(&password_hash(password))
    )
}

/// A configuration with one listener (its port replaced by the suite's `--listen
/// 127.0.0.1:0`, its policy kept) with `listener_keys`, then `rest` (users, tables).
pub(crate) fn config(listener_keys: &str, rest: &str) -> String {
    format!(
        "[server]\nhostname = \"{HOSTNAME}\"\n\n[[listener]]\naddress = \"127.0.0.1:0\"\n\
         {listener_keys}\n{rest}\n"
    )
}

/// Starts a server (`--hold`) on [`config`]`(listener_keys, rest)`.
#[track_caller]
pub(crate) fn start(listener_keys: &str, rest: &str) -> Server {
    Server::start(&ServerOptions::new().config(&config(listener_keys, rest)))
}

/// The EHLO keywords (every line after the greeting line), upper-cased, with their
/// parameters.
fn ehlo_lines<'a>(lines: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    lines
        .into_iter()
        .skip(1)
        .map(|line| line.trim().to_ascii_uppercase())
        .collect()
}

/// Whether the EHLO reply advertises `keyword` (with or without parameters).
fn advertises(ehlo: &[String], keyword: &str) -> bool {
    ehlo.iter()
        .any(|line| line.split_whitespace().next() == Some(keyword))
}

/// The mechanisms of the EHLO reply's AUTH line, if it has one.
fn auth_mechanisms(ehlo: &[String]) -> Option<BTreeSet<String>> {
    ehlo.iter().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next() == Some("AUTH")).then(|| words.map(str::to_string).collect())
    })
}

/// Asserts the EHLO reply advertises exactly AUTH PLAIN LOGIN (in any order).
#[track_caller]
fn assert_auth_plain_login(ehlo: &[String], what: &str) {
    let expected: BTreeSet<String> = ["PLAIN", "LOGIN"].map(str::to_string).into();
    assert_eq!(
        auth_mechanisms(ehlo).as_ref(),
        Some(&expected),
        "{what}: expected AUTH PLAIN LOGIN in {ehlo:?}"
    );
}

fn reply_ehlo(reply: &Reply) -> Vec<String> {
    ehlo_lines(reply.lines.iter().map(String::as_str))
}

fn outcome_ehlo(outcome: &Outcome) -> Vec<String> {
    assert_eq!(outcome.code, Some(250), "EHLO: {}", outcome.raw);
    ehlo_lines(outcome.message.lines())
}

/// Asserts smtplib negotiated TLS 1.2 or 1.3 at its `starttls` action.
#[track_caller]
fn assert_starttls_outcome(outcome: &Outcome) {
    outcome.expect(220, "2.0.0", "STARTTLS");
    let version = outcome.raw["tls"]["version"].as_str().unwrap_or_default();
    assert!(
        matches!(version, "TLSv1.2" | "TLSv1.3"),
        "STARTTLS negotiated {version:?}: {}",
        outcome.raw
    );
}

/// Asserts an smtplib `sendmail` went through.
#[track_caller]
fn assert_sent(outcome: &Outcome, what: &str) {
    assert!(
        outcome.code == Some(250) && outcome.exception.is_none(),
        "{what}: sendmail failed: {}",
        outcome.raw
    );
}

/// Over a logged-in or relaying connection: MAIL, RCPT, DATA; returns the queued id.
#[track_caller]
fn send_raw(client: &mut TlsClient, from: &str, to: &str, content: &[u8]) -> String {
    client.command_expect(&format!("MAIL FROM:<{from}>"), 250, "2.1.0");
    client.command_expect(&format!("RCPT TO:<{to}>"), 250, "2.1.5");
    let reply = client.command("DATA");
    assert_eq!(reply.code, 354, "DATA: {reply}");
    let mut data = content.to_vec();
    data.extend_from_slice(b".\r\n");
    client.send(&data);
    let reply = client.expect(250, "2.0.0", "end of data");
    reply
        .queued_id()
        .unwrap_or_else(|| panic!("no queued id in {reply}"))
}

/// A TLS client connected, greeted, EHLO'd, switched to TLS by STARTTLS and EHLO'd
/// again; returns the client and the EHLO reply under TLS.
#[track_caller]
fn connect_starttls(server: &Server, fixture: &Fixture) -> (TlsClient, Reply) {
    let mut client = TlsClient::connect(server.address(), &fixture.client_options());
    client.greeting();
    client.ehlo("device.tsubame.test");
    client.starttls();
    let ehlo = client.ehlo("device.tsubame.test");
    (client, ehlo)
}

/// The queued id in a swaks transcript of a TLS session (`<~  250 ...` lines).
#[track_caller]
fn swaks_tls_queued_id(transcript: &str) -> String {
    transcript
        .lines()
        .filter(|line| line.starts_with("<~  250"))
        .find_map(tsubame_tests::smtp::queued_id)
        .unwrap_or_else(|| panic!("no `queued as <id>` reply under TLS in:\n{transcript}"))
}

// ---------------------------------------------------------------------------------------
// The test helpers themselves

#[test]
fn base64_matches_rfc_4648_and_a_real_auth_plain_exchange() {
    for (input, expected) in [
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg=="),
        ("fooba", "Zm9vYmE="),
        ("foobar", "Zm9vYmFy"),
    ] {
        assert_eq!(base64(input.as_bytes()), expected, "{input:?}");
    }
    // What swaks sent for this login (AUTH PLAIN, RFC 4616).
    assert_eq!(
        plain_response("scanner", "correct horse test"),
        "AHNjYW5uZXIAY29ycmVjdCBob3JzZSB0ZXN0"
    );
}

// ---------------------------------------------------------------------------------------
// 1. smtplib: STARTTLS, login, send

#[test]
fn smtplib_starttls_login_and_send() {
    let _limit = hard_limit(Duration::from_secs(120));
    let fixture = Fixture::new();
    let password = test_password("smtplib");
    // Nobody relays without logging in: the message below goes through because of AUTH.
    let server = start(
        &format!("{}relay_networks = []\n", fixture.tls_keys()),
        &user_entry(USER, &password, ""),
    );
    let message = test_message("login-smtplib", "sent after STARTTLS and AUTH\n");
    let outcomes = Smtplib::new(server.address())
        .tls_ca(&fixture.ca())
        .ehlo()
        .starttls()
        .ehlo()
        .login(USER, &password)
        .sendmail(
            "scans@example.com",
            &["someone@remote.example"],
            &message,
            &[],
        )
        .quit()
        .run_to_end();
    let before = outcome_ehlo(&outcomes[0]);
    assert!(advertises(&before, "STARTTLS"), "no STARTTLS in {before:?}");
    assert!(
        !advertises(&before, "AUTH"),
        "AUTH offered before TLS although require_tls_for_auth is on: {before:?}"
    );
    assert_starttls_outcome(&outcomes[1]);
    let after = outcome_ehlo(&outcomes[2]);
    assert!(
        !advertises(&after, "STARTTLS"),
        "STARTTLS under TLS: {after:?}"
    );
    assert_auth_plain_login(&after, "EHLO under TLS");
    outcomes[3].expect(235, "2.7.0", "login");
    assert!(
        outcomes[3].message.contains("Authentication succeeded"),
        "{}",
        outcomes[3].raw
    );
    assert_sent(&outcomes[4], "sendmail after login");

    let inspection = inspect(server.spool());
    assert_eq!(inspection.messages().len(), 1, "{}", inspection.json);
    let listed = &inspection.messages()[0];
    assert_eq!(listed["from"], "scans@example.com");
    assert_eq!(
        listed["recipients"],
        serde_json::json!(["someone@remote.example"])
    );
    let id = listed["id"].as_str().unwrap_or_default().to_string();
    // Whether the Received header is stored or added at delivery is the server's choice;
    // the message itself must be there unchanged.
    let stored = show(server.spool(), &id).content;
    assert!(
        stored.ends_with(&message),
        "stored content: \"{}\"",
        tsubame_tests::escape(&stored)
    );

    // The successful login above is in the login cache ([auth] login_cache_secs, on by
    // default): a wrong password for the same account must still be refused.
    for (user, password, what) in [
        (USER, "not the password", "wrong password"),
        ("nobody-here", password.as_str(), "unknown user"),
    ] {
        let refused = Smtplib::new(server.address())
            .tls_ca(&fixture.ca())
            .starttls()
            .login(user, password)
            .quit()
            .run_to_end();
        assert_starttls_outcome(&refused[0]);
        assert_eq!(
            refused[1].exception.as_deref(),
            Some("SMTPAuthenticationError"),
            "{what}: {}",
            refused[1].raw
        );
        refused[1].expect(535, "5.7.8", what);
        assert!(
            refused[1]
                .message
                .contains("Authentication credentials invalid"),
            "{what}: {}",
            refused[1].raw
        );
    }
    assert_eq!(inspect(server.spool()).messages().len(), 1);
    // And the right one, remembered, logs in again at once.
    let again = Smtplib::new(server.address())
        .tls_ca(&fixture.ca())
        .starttls()
        .login(USER, &password)
        .quit()
        .run_to_end();
    again[1].expect(235, "2.7.0", "second login");
    server.stop();
}

// ---------------------------------------------------------------------------------------
// 2. swaks: STARTTLS with AUTH PLAIN and LOGIN; implicit TLS

fn swaks_login_arguments<'a>(
    server: &'a str,
    ca: &'a str,
    tls: &'a str,
    mechanism: &'a str,
    user: &'a str,
    password: &'a str,
    subject: &'a str,
) -> Vec<&'a str> {
    vec![
        "--server",
        server,
        tls,
        "--tls-verify",
        "--tls-ca-path",
        ca,
        "--auth",
        mechanism,
        "--auth-user",
        user,
        "--auth-password",
        password,
        "--helo",
        "swaks.tsubame.test",
        "--from",
        "scans@example.com",
        "--to",
        "someone@remote.example",
        "--header",
        subject,
        "--body",
        "sent by swaks after AUTH",
    ]
}

/// Checks a successful swaks TLS + AUTH transcript and returns the queued id.
#[track_caller]
fn assert_swaks_logged_in(run: &tsubame_tests::process::Finished, mechanism: &str) -> String {
    run.assert_code(0);
    let transcript = run.stdout_text();
    assert!(
        transcript.contains("TLS started with cipher TLSv1.3")
            || transcript.contains("TLS started with cipher TLSv1.2"),
        "{mechanism}: no TLS 1.2/1.3 session:\n{transcript}"
    );
    assert!(
        transcript.contains(&format!("TLS peer DN=\"/CN={CERTIFICATE_CN}\"")),
        "{mechanism}: not the configured certificate:\n{transcript}"
    );
    assert!(
        transcript.contains(&format!("~> AUTH {mechanism}")),
        "{mechanism}: swaks did not use AUTH {mechanism}:\n{transcript}"
    );
    assert!(
        transcript.contains("<~  235 2.7.0"),
        "{mechanism}: no 235 2.7.0:\n{transcript}"
    );
    swaks_tls_queued_id(&transcript)
}

#[test]
fn swaks_starttls_with_auth_plain_and_auth_login() {
    let _limit = hard_limit(Duration::from_secs(120));
    let fixture = Fixture::new();
    let password = test_password("swaks");
    let server = start(
        &format!("{}relay_networks = []\n", fixture.tls_keys()),
        &user_entry(USER, &password, ""),
    );
    let address = server.address().to_string();
    let ca = fixture.ca().display().to_string();
    let mut ids = Vec::new();
    for mechanism in ["PLAIN", "LOGIN"] {
        let subject = format!("Subject: swaks STARTTLS AUTH {mechanism}");
        let run = swaks(&swaks_login_arguments(
            &address, &ca, "--tls", mechanism, USER, &password, &subject,
        ));
        ids.push(assert_swaks_logged_in(&run, mechanism));
    }
    let refused = swaks(&swaks_login_arguments(
        &address,
        &ca,
        "--tls",
        "PLAIN",
        USER,
        "not the password",
        "Subject: wrong password",
    ));
    // swaks exits 28 when authentication fails.
    refused.assert_code(28);
    assert!(
        refused.stdout_text().contains("535 5.7.8"),
        "{}",
        refused.describe()
    );
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    assert_spool_ids(server.spool(), &ids);
    server.stop();
}

#[test]
fn swaks_implicit_tls_with_auth_on_an_smtps_listener() {
    let _limit = hard_limit(Duration::from_secs(120));
    let fixture = Fixture::new();
    let password = test_password("swaks-smtps");
    let server = start(
        &format!(
            "mode = \"smtps\"\n{}relay_networks = []\n",
            fixture.tls_keys()
        ),
        &user_entry(USER, &password, ""),
    );
    let address = server.address().to_string();
    let ca = fixture.ca().display().to_string();
    let mut ids = Vec::new();
    for mechanism in ["PLAIN", "LOGIN"] {
        let subject = format!("Subject: swaks implicit TLS AUTH {mechanism}");
        let run = swaks(&swaks_login_arguments(
            &address, &ca, "--tlsc", mechanism, USER, &password, &subject,
        ));
        let transcript = run.stdout_text();
        // Implicit TLS: the greeting itself came encrypted, and STARTTLS is not offered.
        assert!(
            transcript.contains("<~  220 "),
            "greeting not under TLS:\n{transcript}"
        );
        assert!(
            !transcript.contains("<~  250-STARTTLS") && !transcript.contains("<~  250 STARTTLS"),
            "STARTTLS offered under implicit TLS:\n{transcript}"
        );
        ids.push(assert_swaks_logged_in(&run, mechanism));
    }
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    assert_spool_ids(server.spool(), &ids);
    server.stop();
}

// ---------------------------------------------------------------------------------------
// 3. openssl s_client: the configured certificate, TLS 1.2 and 1.3, never TLS 1.0

/// Runs s_client against `address` (`-starttls smtp` when `starttls`) with
/// `version_flag` and checks the session and the certificate.
#[track_caller]
fn assert_s_client_accepts(
    address: &str,
    starttls: bool,
    ca: &str,
    version_flag: &str,
    version: &str,
) {
    let mut arguments = vec!["-connect", address];
    if starttls {
        arguments.extend(["-starttls", "smtp"]);
    }
    arguments.extend(["-CAfile", ca, "-verify_return_error", version_flag]);
    let run = openssl_s_client(&arguments);
    let said = run.describe();
    run.assert_code(0);
    let stdout = run.stdout_text();
    assert!(
        stdout.contains(&format!("subject=CN = {CERTIFICATE_CN}")),
        "not the configured certificate: {said}"
    );
    assert!(
        stdout.contains("Verify return code: 0 (ok)"),
        "certificate did not verify: {said}"
    );
    assert!(
        stdout.contains(&format!("New, {version}, Cipher is ")),
        "no {version} session: {said}"
    );
}

/// TLS 1.0 must be refused: the handshake fails. SECLEVEL=0 makes OpenSSL 3 offer it at
/// all, so the refusal is the server's.
#[track_caller]
fn assert_s_client_refuses_tls_1_0(address: &str, starttls: bool) {
    let mut arguments = vec!["-connect", address];
    if starttls {
        arguments.extend(["-starttls", "smtp"]);
    }
    arguments.extend(["-tls1", "-cipher", "DEFAULT@SECLEVEL=0"]);
    let run = openssl_s_client(&arguments);
    let said = run.describe();
    assert_ne!(run.code(), Some(0), "TLS 1.0 was accepted: {said}");
    assert!(
        run.stdout_text().contains("Cipher is (NONE)"),
        "a TLS 1.0 session was set up: {said}"
    );
    assert!(
        !said.contains("no protocols available") && !said.contains("no ciphers available"),
        "the client refused to offer TLS 1.0 at all, so the test proves nothing: {said}"
    );
}

#[test]
fn openssl_sees_the_configured_certificate_over_starttls() {
    let _limit = hard_limit(Duration::from_secs(120));
    let fixture = Fixture::new();
    let server = start(
        &fixture.tls_keys(),
        &user_entry(USER, &test_password("s_client"), ""),
    );
    let address = server.address().to_string();
    let ca = fixture.ca().display().to_string();
    assert_s_client_accepts(&address, true, &ca, "-tls1_2", "TLSv1.2");
    assert_s_client_accepts(&address, true, &ca, "-tls1_3", "TLSv1.3");
    assert_s_client_refuses_tls_1_0(&address, true);
    // The server is still fine after the refused handshake.
    let mut client = RawClient::connect(server.address());
    client.hello();
    server.stop();
}

#[test]
fn openssl_sees_the_configured_certificate_on_the_smtps_port() {
    let _limit = hard_limit(Duration::from_secs(120));
    let fixture = Fixture::new();
    let server = start(
        &format!("mode = \"smtps\"\n{}", fixture.tls_keys()),
        &user_entry(USER, &test_password("s_client-smtps"), ""),
    );
    let address = server.address().to_string();
    let ca = fixture.ca().display().to_string();
    assert_s_client_accepts(&address, false, &ca, "-tls1_2", "TLSv1.2");
    assert_s_client_accepts(&address, false, &ca, "-tls1_3", "TLSv1.3");
    assert_s_client_refuses_tls_1_0(&address, false);
    let mut client = TlsClient::connect(server.address(), &fixture.client_options().implicit());
    client.greeting();
    server.stop();
}

// ---------------------------------------------------------------------------------------
// 4. STARTTLS command injection (CVE-2011-0411 and its kin)

/// Sends `STARTTLS` with `injected` behind it in one write, does the handshake, and
/// returns the client (under TLS). Asserts the reply to STARTTLS is the only clear-text
/// reply.
#[track_caller]
fn starttls_with_injection(client: &mut TlsClient, injected: &str) {
    client.greeting();
    client.ehlo("device.tsubame.test");
    client.send(format!("STARTTLS\r\n{injected}").as_bytes());
    let reply = client.reply();
    assert!(
        reply.is(220, "2.0.0"),
        "STARTTLS with commands behind it: expected 220 2.0.0, got {reply}"
    );
    let handshake = client.handshake();
    assert!(
        handshake.leftover.is_empty(),
        "the server answered injected commands in clear text: \"{}\"",
        tsubame_tests::escape(&handshake.leftover)
    );
    if let Err(error) = handshake.result {
        panic!("TLS handshake after STARTTLS with commands behind it failed: {error}");
    }
}

#[test]
fn commands_pipelined_behind_starttls_are_discarded_quit() {
    let _limit = hard_limit(Duration::from_secs(90));
    let fixture = Fixture::new();
    let server = start(
        &fixture.tls_keys(),
        &user_entry(USER, &test_password("inject-quit"), ""),
    );
    let mut client = TlsClient::connect(server.address(), &fixture.client_options());
    starttls_with_injection(&mut client, "QUIT\r\n");
    // Had the injected QUIT run inside TLS, the first reply here would be its 221 and
    // the connection would close.
    let ehlo = client.command("EHLO device.tsubame.test");
    assert_eq!(ehlo.code, 250, "first reply under TLS: {ehlo}");
    client.assert_silent(Duration::from_millis(500), "after EHLO under TLS");
    client.command_expect("NOOP", 250, "2.0.0");
    client.assert_silent(Duration::from_millis(500), "after NOOP under TLS");
    client.command_expect("QUIT", 221, "2.0.0");
    server.stop();
}

#[test]
fn commands_pipelined_behind_starttls_are_discarded_mail_transaction() {
    let _limit = hard_limit(Duration::from_secs(90));
    let fixture = Fixture::new();
    let server = start(
        &fixture.tls_keys(),
        &user_entry(USER, &test_password("inject-mail"), ""),
    );
    let mut client = TlsClient::connect(server.address(), &fixture.client_options());
    starttls_with_injection(
        &mut client,
        "MAIL FROM:<evil@attacker.example>\r\nRCPT TO:<victim@example.net>\r\nNOOP\r\n",
    );
    // Exactly one reply per command of ours: none of the three injected ones ran.
    let ehlo = client.command("EHLO device.tsubame.test");
    assert_eq!(ehlo.code, 250, "first reply under TLS: {ehlo}");
    client.assert_silent(Duration::from_millis(500), "after EHLO under TLS");
    client.command_expect("RCPT TO:<victim@example.net>", 503, "5.5.1");
    client.assert_silent(Duration::from_millis(500), "after RCPT under TLS");
    client.command_expect("DATA", 503, "5.5.1");
    client.command_expect("QUIT", 221, "2.0.0");
    assert!(inspect(server.spool()).messages().is_empty());
    server.stop();
}

/// Replies to a pipeline under TLS that exceed the TLS session's send buffer (64 KiB)
/// several times over all arrive: the server keeps encrypting and writing until the
/// socket would block, instead of waiting for a writable edge that never comes.
#[test]
fn replies_larger_than_the_tls_send_buffer_all_arrive() {
    let _limit = hard_limit(Duration::from_secs(120));
    let fixture = Fixture::new();
    let server = start(
        &fixture.tls_keys(),
        &user_entry(USER, &test_password("tls-big-output"), ""),
    );
    let (mut client, ehlo) = connect_starttls(&server, &fixture);
    assert_eq!(ehlo.code, 250, "EHLO under TLS: {ehlo}");
    // About 200 bytes of reply per 8 bytes of command: some 400 KiB of replies to
    // 16 KiB of commands, all in one write.
    const PIPELINED: usize = 2_000;
    client.send("EHLO big.example\r\n".repeat(PIPELINED).as_bytes());
    for index in 0..PIPELINED {
        match client.next(Duration::from_secs(10)) {
            Next::Reply(reply) => assert_eq!(reply.code, 250, "reply {index}: {reply}"),
            other => panic!("reply {index} of {PIPELINED}: {other:?}"),
        }
    }
    client.command_expect("QUIT", 221, "2.0.0");
    server.stop();
}

// ---------------------------------------------------------------------------------------
// STARTTLS and implicit TLS: what is offered when

#[test]
fn starttls_offer_handshake_and_session_reset() {
    let _limit = hard_limit(Duration::from_secs(90));
    let fixture = Fixture::new();
    let password = test_password("starttls");
    let server = start(
        &format!("{}relay_networks = []\n", fixture.tls_keys()),
        &user_entry(USER, &password, ""),
    );
    let mut client = TlsClient::connect(server.address(), &fixture.client_options());
    client.greeting();
    let before = reply_ehlo(&client.ehlo("device.tsubame.test"));
    assert!(
        advertises(&before, "STARTTLS"),
        "no STARTTLS before TLS: {before:?}"
    );
    assert!(!advertises(&before, "AUTH"), "AUTH before TLS: {before:?}");

    let reply = client.command("STARTTLS");
    assert!(reply.is(220, "2.0.0"), "STARTTLS: {reply}");
    assert!(reply.text().contains("Ready to start TLS"), "{reply}");
    let handshake = client.handshake();
    assert!(handshake.leftover.is_empty());
    let session = handshake
        .result
        .unwrap_or_else(|error| panic!("handshake: {error}"));
    assert!(
        matches!(session.version.as_str(), "TLSv1.2" | "TLSv1.3"),
        "{session:?}"
    );
    assert_eq!(
        session.peer_common_name.as_deref(),
        Some(CERTIFICATE_CN),
        "{session:?}"
    );

    // RFC 3207 §4.2: the session starts over; the client must EHLO again.
    client.command_expect("MAIL FROM:<scans@example.com>", 503, "5.5.1");
    let after = reply_ehlo(&client.ehlo("device.tsubame.test"));
    assert!(
        !advertises(&after, "STARTTLS"),
        "STARTTLS under TLS: {after:?}"
    );
    assert_auth_plain_login(&after, "EHLO under TLS");
    client.command_expect("STARTTLS", 503, "5.5.1");

    let reply = client.command_expect(
        &format!("AUTH PLAIN {}", plain_response(USER, &password)),
        235,
        "2.7.0",
    );
    assert!(reply.text().contains("Authentication succeeded"), "{reply}");
    let id = send_raw(
        &mut client,
        "scans@example.com",
        "someone@remote.example",
        &test_message("after-starttls", "raw session under TLS\n"),
    );
    client.command_expect("QUIT", 221, "2.0.0");
    assert_spool_ids(server.spool(), &[&id]);
    server.stop();
}

#[test]
fn auth_before_tls_gets_538_when_tls_is_required_for_auth() {
    let _limit = hard_limit(Duration::from_secs(90));
    let fixture = Fixture::new();
    let password = test_password("538");
    let server = start(&fixture.tls_keys(), &user_entry(USER, &password, ""));
    let mut client = RawClient::connect(server.address());
    client.hello();
    for command in [
        format!("AUTH PLAIN {}", plain_response(USER, &password)),
        "AUTH LOGIN".to_string(),
        "AUTH PLAIN".to_string(),
    ] {
        let reply = client.command_expect(&command, 538, "5.7.11");
        assert!(
            reply
                .text()
                .contains("Encryption required for requested authentication mechanism"),
            "{command}: {reply}"
        );
    }
    // Still not logged in: the connection carries on as before.
    client.command_expect("NOOP", 250, "2.0.0");
    client.command_expect("QUIT", 221, "2.0.0");
    server.stop();
}

#[test]
fn starttls_is_not_offered_without_a_certificate() {
    let _limit = hard_limit(Duration::from_secs(60));
    let server = start("", &user_entry(USER, &test_password("no-cert"), ""));
    let mut client = RawClient::connect(server.address());
    let ehlo = reply_ehlo(&client.hello());
    assert!(!advertises(&ehlo, "STARTTLS"), "{ehlo:?}");
    // Users exist, but AUTH needs TLS (the default) and there is none here.
    assert!(!advertises(&ehlo, "AUTH"), "{ehlo:?}");
    client.command_expect("STARTTLS", 502, "5.5.1");
    client.command_expect("QUIT", 221, "2.0.0");
    server.stop();
}

#[test]
fn auth_is_not_offered_without_users() {
    let _limit = hard_limit(Duration::from_secs(60));
    let fixture = Fixture::new();
    let server = start(&fixture.tls_keys(), "");
    let (mut client, ehlo) = connect_starttls(&server, &fixture);
    let ehlo = reply_ehlo(&ehlo);
    assert!(
        !advertises(&ehlo, "AUTH"),
        "AUTH offered with no users: {ehlo:?}"
    );
    let reply = client.command(&format!(
        "AUTH PLAIN {}",
        plain_response(USER, "anything at all")
    ));
    assert!(reply.code >= 500, "AUTH with no users: {reply}");
    server.stop();
}

#[test]
fn implicit_tls_listener_serves_the_certificate_and_auth() {
    let _limit = hard_limit(Duration::from_secs(120));
    let fixture = Fixture::new();
    let password = test_password("smtps");
    let server = start(
        &format!(
            "mode = \"smtps\"\n{}relay_networks = []\n",
            fixture.tls_keys()
        ),
        &user_entry(USER, &password, ""),
    );
    let mut client = TlsClient::try_connect(server.address(), &fixture.client_options().implicit())
        .unwrap_or_else(|error| panic!("implicit TLS handshake failed: {error}"));
    let session = client
        .tls()
        .cloned()
        .unwrap_or_else(|| panic!("no TLS session"));
    assert_eq!(session.peer_common_name.as_deref(), Some(CERTIFICATE_CN));
    assert!(
        matches!(session.version.as_str(), "TLSv1.2" | "TLSv1.3"),
        "{session:?}"
    );
    client.greeting();
    let ehlo = reply_ehlo(&client.ehlo("device.tsubame.test"));
    assert!(!advertises(&ehlo, "STARTTLS"), "{ehlo:?}");
    assert_auth_plain_login(&ehlo, "EHLO under implicit TLS");
    client.command_expect("STARTTLS", 503, "5.5.1");
    client.command_expect(
        &format!("AUTH PLAIN {}", plain_response(USER, &password)),
        235,
        "2.7.0",
    );
    let raw_id = send_raw(
        &mut client,
        "scans@example.com",
        "someone@remote.example",
        &test_message("smtps-raw", "implicit TLS, raw\n"),
    );
    client.command_expect("QUIT", 221, "2.0.0");

    // smtplib.SMTP_SSL, the way a Python application sends through port 465.
    let message = test_message("smtps-smtplib", "implicit TLS, smtplib\n");
    let outcomes = Smtplib::new(server.address())
        .tls_ca(&fixture.ca())
        .implicit_tls()
        .ehlo()
        .login(USER, &password)
        .sendmail(
            "scans@example.com",
            &["other@remote.example"],
            &message,
            &[],
        )
        .quit()
        .run_to_end();
    outcomes[1].expect(235, "2.7.0", "SMTP_SSL login");
    assert_sent(&outcomes[2], "SMTP_SSL sendmail");
    let inspection = inspect(server.spool());
    assert_eq!(inspection.messages().len(), 2, "{}", inspection.json);
    assert!(inspection.message(&raw_id).is_some());
    server.stop();
}

// ---------------------------------------------------------------------------------------
// 5. AUTH exchanges byte by byte (over TLS)

/// A login guard that stays out of the way of tests that fail on purpose a few times.
const LENIENT_LOGIN_GUARD: &str = "[login_guard]\ndelay_after_failures = 50\n\
                                   lockout_after_failures = 100\n";

#[test]
fn auth_plain_and_login_exchanges() {
    let _limit = hard_limit(Duration::from_secs(120));
    let fixture = Fixture::new();
    let password = test_password("exchanges");
    let server = start(
        &format!("{}relay_networks = []\n", fixture.tls_keys()),
        &format!("{}{LENIENT_LOGIN_GUARD}", user_entry(USER, &password, "")),
    );
    let (mut client, _) = connect_starttls(&server, &fixture);
    client.command_expect("AUTH NOSUCH-MECHANISM", 504, "5.5.4");
    for (response, what) in [
        (plain_response(USER, "not the password"), "wrong password"),
        (plain_response("nobody-here", &password), "unknown user"),
    ] {
        let reply = client.command(&format!("AUTH PLAIN {response}"));
        assert!(reply.is(535, "5.7.8"), "{what}: {reply}");
        assert!(
            reply.text().contains("Authentication credentials invalid"),
            "{what}: {reply}"
        );
    }
    // Cancelled exchanges (RFC 4954 §4: the client answers a challenge with "*").
    let user_step = base64(USER.as_bytes());
    for (steps, what) in [
        (vec!["AUTH PLAIN"], "AUTH PLAIN without initial response"),
        (vec!["AUTH LOGIN"], "AUTH LOGIN at the user name"),
        (
            vec!["AUTH LOGIN", user_step.as_str()],
            "AUTH LOGIN at the password",
        ),
    ] {
        for step in steps {
            let reply = client.command(step);
            assert_eq!(reply.code, 334, "{what}: {step}: {reply}");
        }
        let reply = client.command("*");
        assert!(reply.is(501, "5.0.0"), "{what}: cancel: {reply}");
        assert!(
            reply.text().contains("Authentication cancelled"),
            "{what}: {reply}"
        );
    }
    // `=` is an initial response of zero length (RFC 4954 §4), not a request for a
    // challenge: an empty PLAIN message holds no credentials (RFC 4616 §2), so the
    // exchange fails at once and the session goes on.
    let reply = client.command("AUTH PLAIN =");
    assert!(reply.is(501, "5.5.2"), "AUTH PLAIN =: {reply}");
    // The empty challenge's answer is the initial response (RFC 4422 §5).
    let reply = client.command("AUTH PLAIN");
    assert_eq!(reply.code, 334, "AUTH PLAIN: {reply}");
    client.command_expect(&plain_response(USER, &password), 235, "2.7.0");
    client.command_expect(
        &format!("AUTH PLAIN {}", plain_response(USER, &password)),
        503,
        "5.5.1",
    );
    let id = send_raw(
        &mut client,
        "scans@example.com",
        "someone@remote.example",
        &test_message("auth-plain-empty", "after AUTH PLAIN =\n"),
    );
    client.command_expect("QUIT", 221, "2.0.0");

    // AUTH LOGIN, one step at a time.
    let (mut client, _) = connect_starttls(&server, &fixture);
    let reply = client.command("AUTH LOGIN");
    assert_eq!(reply.code, 334, "{reply}");
    let reply = client.command(&base64(USER.as_bytes()));
    assert_eq!(reply.code, 334, "{reply}");
    client.command_expect(&base64(password.as_bytes()), 235, "2.7.0");
    client.command_expect("AUTH LOGIN", 503, "5.5.1");
    let login_id = send_raw(
        &mut client,
        "scans@example.com",
        "someone@remote.example",
        &test_message("auth-login", "after AUTH LOGIN\n"),
    );
    client.command_expect("QUIT", 221, "2.0.0");
    assert_spool_ids(server.spool(), &[&id, &login_id]);
    server.stop();
}

#[test]
fn longest_names_and_passwords_log_in() {
    let _limit = hard_limit(Duration::from_secs(120));
    let fixture = Fixture::new();
    // RFC 4616 §2: PLAIN servers take identities and passwords of up to 255 octets.
    let long_user: String = "device-"
        .chars()
        .chain(std::iter::repeat_n('x', 248))
        .collect();
    assert_eq!(long_user.len(), 255);
    let generated = test_password("long");
    let long_password: String = generated
        .chars()
        .chain(std::iter::repeat_n('p', 255 - generated.len()))
        .collect();
    assert_eq!(long_password.len(), 255);
    let server = start(
        &fixture.tls_keys(),
        &user_entry(&long_user, &long_password, ""),
    );
    let response = plain_response(&long_user, &long_password);
    let line = format!("AUTH PLAIN {response}");
    // Past RFC 5321's 512-octet command line: RFC 4954 §4 allows 12288 for AUTH.
    assert!(line.len() > 512, "{}", line.len());
    let (mut client, _) = connect_starttls(&server, &fixture);
    client.command_expect(&line, 235, "2.7.0");
    client.command_expect("QUIT", 221, "2.0.0");

    let (mut client, _) = connect_starttls(&server, &fixture);
    assert_eq!(client.command("AUTH LOGIN").code, 334);
    assert_eq!(client.command(&base64(long_user.as_bytes())).code, 334);
    client.command_expect(&base64(long_password.as_bytes()), 235, "2.7.0");
    client.command_expect("QUIT", 221, "2.0.0");
    server.stop();
}

#[test]
fn auth_after_helo_is_refused_unless_the_listener_allows_it() {
    let _limit = hard_limit(Duration::from_secs(90));
    let fixture = Fixture::new();
    let password = test_password("helo");
    let server = start(&fixture.tls_keys(), &user_entry(USER, &password, ""));
    let (mut client, _) = connect_starttls(&server, &fixture);
    let reply = client.command("HELO device.tsubame.test");
    assert_eq!(reply.code, 250, "HELO: {reply}");
    let reply = client.command(&format!("AUTH PLAIN {}", plain_response(USER, &password)));
    assert!(
        reply.code >= 500,
        "AUTH after HELO with auth_after_helo off (the default): {reply}"
    );
    server.stop();
}

// ---------------------------------------------------------------------------------------
// Who may relay, and as whom

#[test]
fn outside_relay_networks_only_a_logged_in_user_relays() {
    let _limit = hard_limit(Duration::from_secs(120));
    let fixture = Fixture::new();
    let password = test_password("relay");
    let server = start(
        &format!("{}relay_networks = []\n", fixture.tls_keys()),
        &user_entry(USER, &password, ""),
    );
    let anonymous = Smtplib::new(server.address())
        .tls_ca(&fixture.ca())
        .starttls()
        .ehlo()
        .mail("scans@example.com", &[])
        .rcpt("someone@remote.example", &[])
        .quit()
        .run_to_end();
    assert_starttls_outcome(&anonymous[0]);
    anonymous[3].expect(550, "5.7.1", "RCPT under TLS without login");

    let message = test_message("logged-in-relay", "any domain once logged in\n");
    let outcomes = Smtplib::new(server.address())
        .tls_ca(&fixture.ca())
        .starttls()
        .login(USER, &password)
        .mail("scans@example.com", &[])
        .rcpt("a@remote.example", &[])
        .rcpt("b@example.org", &[])
        .rcpt("c@elsewhere.example", &[])
        .data(&message)
        .quit()
        .run_to_end();
    outcomes[1].expect(235, "2.7.0", "login");
    outcomes[2].expect(250, "2.1.0", "MAIL");
    for outcome in &outcomes[3..=5] {
        outcome.expect(250, "2.1.5", "RCPT after login");
    }
    outcomes[6].expect(250, "2.0.0", "DATA");
    let id = outcomes[6].queued_id();
    assert_spool_ids(server.spool(), &[&id]);
    server.stop();
}

#[test]
fn allowed_senders_restrict_mail_from() {
    let _limit = hard_limit(Duration::from_secs(120));
    let fixture = Fixture::new();
    let password = test_password("senders");
    let server = start(
        &fixture.tls_keys(),
        &user_entry(
            USER,
            &password,
            "allowed_senders = [\"scans@example.com\", \"@example.org\"]",
        ),
    );
    // (sender, allowed): the address exactly (its domain in any case), any address at
    // the domain, nothing else, and not the null sender.
    let cases = [
        ("scans@example.com", true),
        ("scans@EXAMPLE.COM", true),
        ("anyone@example.org", true),
        ("other@example.com", false),
        ("Scans@example.com", false),
        ("scans@sub.example.org", false),
        ("", false),
    ];
    let mut session = Smtplib::new(server.address())
        .tls_ca(&fixture.ca())
        .starttls()
        .login(USER, &password);
    for (sender, _) in cases {
        session = session.mail(sender, &[]).rset();
    }
    let outcomes = session.quit().run_to_end();
    outcomes[1].expect(235, "2.7.0", "login");
    for (index, (sender, allowed)) in cases.iter().enumerate() {
        let outcome = &outcomes[2 + 2 * index];
        if *allowed {
            outcome.expect(250, "2.1.0", &format!("MAIL FROM:<{sender}>"));
        } else {
            outcome.expect(550, "5.7.1", &format!("MAIL FROM:<{sender}>"));
        }
    }
    server.stop();
}

#[test]
fn allowed_recipient_domains_restrict_rcpt() {
    let _limit = hard_limit(Duration::from_secs(120));
    let fixture = Fixture::new();
    let password = test_password("recipients");
    let server = start(
        &format!("{}relay_networks = []\n", fixture.tls_keys()),
        &user_entry(
            USER,
            &password,
            "allowed_recipient_domains = [\"example.net\"]",
        ),
    );
    let cases = [
        ("a@example.net", true),
        ("b@EXAMPLE.NET", true),
        ("c@example.org", false),
        ("d@sub.example.net", false),
        ("e@example.net.evil.example", false),
    ];
    let message = test_message("recipient-domains", "only example.net\n");
    let mut session = Smtplib::new(server.address())
        .tls_ca(&fixture.ca())
        .starttls()
        .login(USER, &password)
        .mail("scans@example.com", &[]);
    for (recipient, _) in cases {
        session = session.rcpt(recipient, &[]);
    }
    let outcomes = session.data(&message).quit().run_to_end();
    outcomes[1].expect(235, "2.7.0", "login");
    outcomes[2].expect(250, "2.1.0", "MAIL");
    for (index, (recipient, allowed)) in cases.iter().enumerate() {
        let outcome = &outcomes[3 + index];
        if *allowed {
            outcome.expect(250, "2.1.5", &format!("RCPT TO:<{recipient}>"));
        } else {
            outcome.expect(550, "5.7.1", &format!("RCPT TO:<{recipient}>"));
        }
    }
    let data = &outcomes[3 + cases.len()];
    data.expect(250, "2.0.0", "DATA");
    let id = data.queued_id();
    let inspection = inspect(server.spool());
    assert_eq!(
        inspection.expect_message(&id)["recipients"],
        serde_json::json!(["a@example.net", "b@EXAMPLE.NET"])
    );
    server.stop();
}

#[test]
fn require_auth_refuses_mail_before_login_even_from_relay_networks() {
    let _limit = hard_limit(Duration::from_secs(120));
    let fixture = Fixture::new();
    let password = test_password("require-auth");
    // Loopback is in the default relay_networks: it would relay without require_auth.
    let server = start(
        &format!("{}require_auth = true\n", fixture.tls_keys()),
        &user_entry(USER, &password, ""),
    );
    let message = test_message("require-auth", "sent after login\n");
    let outcomes = Smtplib::new(server.address())
        .tls_ca(&fixture.ca())
        .ehlo()
        .mail("scans@example.com", &[])
        .rset()
        .starttls()
        .ehlo()
        .mail("scans@example.com", &[])
        .rset()
        .login(USER, &password)
        .mail("scans@example.com", &[])
        .rcpt("someone@example.net", &[])
        .data(&message)
        .quit()
        .run_to_end();
    for (index, what) in [(1, "MAIL before TLS"), (5, "MAIL under TLS, not logged in")] {
        outcomes[index].expect(530, "5.7.0", what);
        assert!(
            outcomes[index].message.contains("Authentication required"),
            "{what}: {}",
            outcomes[index].raw
        );
    }
    outcomes[7].expect(235, "2.7.0", "login");
    outcomes[8].expect(250, "2.1.0", "MAIL after login");
    outcomes[9].expect(250, "2.1.5", "RCPT after login");
    outcomes[10].expect(250, "2.0.0", "DATA after login");
    let id = outcomes[10].queued_id();
    assert_spool_ids(server.spool(), &[&id]);
    server.stop();
}

// ---------------------------------------------------------------------------------------
// 6. The legacy-device profile

#[test]
fn legacy_device_profile_takes_auth_login_in_clear_text_after_helo() {
    let _limit = hard_limit(Duration::from_secs(120));
    let password = test_password("legacy");
    // The account comes from a users file written by `tsubame user add`.
    let directory = tempfile::tempdir().unwrap();
    let users_file = directory.path().join("users.toml");
    user_add(&users_file, USER, &password);
    let server = start(
        "profile = \"legacy-device\"\nrelay_networks = []\n",
        &format!(
            "[auth]\nusers_file = {}\n",
            toml_string(&users_file.display().to_string())
        ),
    );
    // Loud at start: passwords will cross the network in clear text.
    assert!(
        wait_until(Duration::from_secs(5), || server.log().lines().any(
            |line| { line.contains("WARN") && line.contains("AUTH without TLS") }
        )),
        "no warning about AUTH without TLS at start:\n{}",
        server.log()
    );

    // An old scanner: HELO, then AUTH LOGIN in clear text.
    let mut client = RawClient::connect(server.address());
    client.greeting();
    let reply = client.command("HELO scanner.tsubame.test");
    assert_eq!(reply.code, 250, "HELO: {reply}");
    assert_eq!(client.command("AUTH LOGIN").code, 334);
    assert_eq!(client.command(&base64(USER.as_bytes())).code, 334);
    client.command_expect(&base64(password.as_bytes()), 235, "2.7.0");
    client.command_expect("MAIL FROM:<scans@example.com>", 250, "2.1.0");
    client.command_expect("RCPT TO:<someone@remote.example>", 250, "2.1.5");
    let reply = client.command("DATA");
    assert_eq!(reply.code, 354, "DATA: {reply}");
    let mut content = test_message("legacy-helo", "scanned page\n");
    content.extend_from_slice(b".\r\n");
    client.send(&content);
    let raw_id = client
        .expect(250, "2.0.0", "end of data")
        .queued_id()
        .unwrap_or_else(|| panic!("no queued id"));
    client.command_expect("QUIT", 221, "2.0.0");

    // swaks in clear text with EHLO: AUTH is advertised without TLS here.
    let address = server.address().to_string();
    let run = swaks(&[
        "--server",
        &address,
        "--auth",
        "LOGIN",
        "--auth-user",
        USER,
        "--auth-password",
        &password,
        "--from",
        "scans@example.com",
        "--to",
        "someone@remote.example",
        "--header",
        "Subject: legacy swaks",
        "--body",
        "clear-text AUTH LOGIN",
    ]);
    run.assert_code(0);
    let transcript = run.stdout_text();
    assert!(
        transcript.contains("<-  235 2.7.0"),
        "no 235 in clear text:\n{transcript}"
    );
    let swaks_id = tsubame_tests::peers::swaks_queued_id(&transcript);
    assert_spool_ids(server.spool(), &[&raw_id, &swaks_id]);

    // Old firmware sends long, odd greeting names (spaces, a model string): accepted,
    // and echoed back cut to 255 characters.
    let mut client = RawClient::connect(server.address());
    client.greeting();
    let long_name = format!("Brother MFC-L2750DW series {}", "x".repeat(400));
    let reply = client.command(&format!("EHLO {long_name}"));
    assert_eq!(reply.code, 250, "long EHLO: {reply}");
    let reply = client.command(&format!("HELO {long_name}"));
    assert_eq!(reply.code, 250, "long HELO: {reply}");
    client.command_expect("QUIT", 221, "2.0.0");
    server.stop();
}

#[test]
fn check_config_lists_the_legacy_device_relaxations() {
    let _limit = hard_limit(Duration::from_secs(60));
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("legacy.toml");
    std::fs::write(
        &path,
        config(
            "profile = \"legacy-device\"\n",
            &user_entry(USER, &test_password("check-config"), ""),
        ),
    )
    .unwrap();
    let path_text = path.display().to_string();
    let run = tsubame(&["check-config", &path_text]);
    run.assert_code(0);
    let said = run.stdout_text();
    assert!(said.contains("relaxed:"), "{}", run.describe());
    assert!(said.contains("AUTH without TLS"), "{}", run.describe());
    assert!(said.contains("AUTH after HELO"), "{}", run.describe());
}

// ---------------------------------------------------------------------------------------
// 7. Never an open relay

/// Recipients that try to sneak mail to another domain through a relay: every one must
/// be refused to a client outside relay_networks that has not logged in.
const RELAY_PROBES: &[&str] = &[
    "user@remote.example",
    "user%remote.example@relay.test",
    "\"user@remote.example\"@relay.test",
    "@a.example,@b.example:user@remote.example",
    "user@remote.example@relay.test",
    "USER@REMOTE.EXAMPLE",
    "user@例え.jp",
    "user@xn--r8jz45g.jp",
    "remote.example!user@relay.test",
    "user@[192.0.2.1]",
];

#[test]
fn open_relay_battery_from_outside_relay_networks() {
    let _limit = hard_limit(Duration::from_secs(90));
    let server = start(
        "relay_networks = []\n",
        &user_entry(USER, &test_password("relay-battery"), ""),
    );
    let mut client = RawClient::connect(server.address());
    client.hello();
    client.command_expect("MAIL FROM:<probe@example.com> SMTPUTF8", 250, "2.1.0");
    for recipient in RELAY_PROBES {
        let reply = client.command(&format!("RCPT TO:<{recipient}>"));
        let refused = reply.is(550, "5.7.1")
            || (matches!(reply.code, 501 | 553) && reply.enhanced().is_some());
        assert!(refused, "RCPT TO:<{recipient}> was not refused: {reply}");
    }
    let data = client.command("DATA");
    assert!(
        data.code >= 500,
        "DATA with every recipient refused: {data}"
    );
    client.command_expect("QUIT", 221, "2.0.0");

    // smtplib, the plain probes and the IDN one with SMTPUTF8.
    let outcomes = Smtplib::new(server.address())
        .ehlo()
        .mail("probe@example.com", &["SMTPUTF8"])
        .rcpt("user@remote.example", &[])
        .rcpt("USER@REMOTE.EXAMPLE", &[])
        .rcpt("user@例え.jp", &[])
        .rcpt("user@xn--r8jz45g.jp", &[])
        .quit()
        .run_to_end();
    outcomes[1].expect(250, "2.1.0", "MAIL with SMTPUTF8");
    for outcome in &outcomes[2..6] {
        outcome.expect(550, "5.7.1", "smtplib RCPT from outside relay_networks");
    }
    let inspection = inspect(server.spool());
    assert!(
        inspection.messages().is_empty(),
        "something was spooled: {}",
        inspection.json
    );
    server.stop();
}

// ---------------------------------------------------------------------------------------
// 9. Certificate reload on SIGHUP

/// The CN that `openssl s_client` sees on a new STARTTLS connection, if the handshake
/// works.
fn served_common_name(address: &str, ca: &str) -> Option<String> {
    let run = openssl_s_client(&[
        "-connect",
        address,
        "-starttls",
        "smtp",
        "-CAfile",
        ca,
        "-verify_return_error",
    ]);
    if run.code() != Some(0) {
        return None;
    }
    run.stdout_text()
        .lines()
        .find_map(|line| line.strip_prefix("subject=CN = ").map(str::to_string))
}

/// Replaces `target` with `source`'s bytes by rename, as certificate tools do.
fn replace_file(source: &Path, target: &Path) {
    let temporary = target.with_extension("new");
    std::fs::copy(source, &temporary).unwrap();
    std::fs::rename(&temporary, target).unwrap();
}

#[test]
fn sighup_reloads_the_certificate_and_open_sessions_finish() {
    let _limit = hard_limit(Duration::from_secs(120));
    let fixture = Fixture::new();
    let password = test_password("reload");
    // The listener reads copies that the test replaces.
    let live = tempfile::tempdir().unwrap();
    let certificate = live.path().join("certificate.pem");
    let key = live.path().join("key.pem");
    std::fs::copy(&fixture.certificate, &certificate).unwrap();
    std::fs::copy(&fixture.key, &key).unwrap();
    let mut server = start(
        &format!("{}relay_networks = []\n", tls_keys(&certificate, &key)),
        &user_entry(USER, &password, ""),
    );
    let address = server.address().to_string();
    let ca = fixture.ca().display().to_string();
    assert_eq!(
        served_common_name(&address, &ca).as_deref(),
        Some(CERTIFICATE_CN),
        "openssl s_client -starttls smtp does not see the configured certificate before SIGHUP"
    );

    // A session under the old certificate, in the middle of a transaction.
    let (mut old_session, _) = connect_starttls(&server, &fixture);
    assert_eq!(
        old_session
            .tls()
            .and_then(|tls| tls.peer_common_name.as_deref()),
        Some(CERTIFICATE_CN)
    );
    old_session.command_expect(
        &format!("AUTH PLAIN {}", plain_response(USER, &password)),
        235,
        "2.7.0",
    );
    old_session.command_expect("MAIL FROM:<scans@example.com>", 250, "2.1.0");

    let (new_certificate, new_key) = fixture.pki.issue("reloaded", "reloaded.tsubame.test");
    replace_file(&new_key, &key);
    replace_file(&new_certificate, &certificate);
    send_signal(server.pid(), Signal::HUP).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut seen = None;
    while Instant::now() < deadline {
        seen = served_common_name(&address, &ca);
        if seen.as_deref() == Some("reloaded.tsubame.test") {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(
        seen.as_deref(),
        Some("reloaded.tsubame.test"),
        "the new certificate was not served after SIGHUP:\n{}",
        server.log()
    );
    assert!(
        server.try_wait().is_none(),
        "SIGHUP ended the server:\n{}",
        server.log()
    );

    // The old session carries on under its old keys.
    old_session.command_expect("RCPT TO:<someone@remote.example>", 250, "2.1.5");
    let reply = old_session.command("DATA");
    assert_eq!(reply.code, 354, "DATA: {reply}");
    let mut content = test_message("across-reload", "started before SIGHUP\n");
    content.extend_from_slice(b".\r\n");
    old_session.send(&content);
    let old_id = old_session
        .expect(250, "2.0.0", "end of data in the old session")
        .queued_id()
        .unwrap_or_else(|| panic!("no queued id"));
    old_session.command_expect("QUIT", 221, "2.0.0");

    // And a new session logs in and sends under the new one.
    let (mut new_session, _) = connect_starttls(&server, &fixture);
    assert_eq!(
        new_session
            .tls()
            .and_then(|tls| tls.peer_common_name.as_deref()),
        Some("reloaded.tsubame.test")
    );
    new_session.command_expect(
        &format!("AUTH PLAIN {}", plain_response(USER, &password)),
        235,
        "2.7.0",
    );
    let new_id = send_raw(
        &mut new_session,
        "scans@example.com",
        "someone@remote.example",
        &test_message("after-reload", "after SIGHUP\n"),
    );
    assert_spool_ids(server.spool(), &[&old_id, &new_id]);
    server.stop();
}

// ---------------------------------------------------------------------------------------
// 10. The Received header (RFC 5321 §4.4, RFC 3848)

/// A server that delivers to `upstream` with its listener's TLS and `listener_keys`.
fn delivering_server(
    fixture: &Fixture,
    upstream: &Aiosmtpd,
    listener_keys: &str,
    users: &str,
) -> Server {
    let rest = format!(
        "[delivery]\ndefault_upstream = \"sink\"\nretry_schedule_secs = [1]\n\n\
         [[upstream]]\nname = \"sink\"\nkind = \"smtp\"\nhost = \"127.0.0.1\"\nport = {}\n\
         tls = \"none\"\ntimeout_secs = 5\n\n{users}",
        upstream.port()
    );
    Server::start(&ServerOptions::new().deliver().config(&config(
        &format!("{}{listener_keys}", fixture.tls_keys()),
        &rest,
    )))
}

/// The first header of `content`, unfolded (RFC 5322 §2.2.3) with its white space
/// collapsed, and the bytes after it.
fn first_header(content: &[u8]) -> (String, &[u8]) {
    let mut end = 0;
    loop {
        let rest = content.get(end..).unwrap_or_default();
        let Some(line_end) = rest.windows(2).position(|pair| pair == b"\r\n") else {
            panic!(
                "no complete header in \"{}\"",
                tsubame_tests::escape(content)
            );
        };
        end += line_end + 2;
        match content.get(end) {
            Some(b' ' | b'\t') => continue,
            _ => break,
        }
    }
    // Unfolded, and each run of white space (a folding tab, say) made one space.
    let header = String::from_utf8_lossy(content.get(..end).unwrap_or_default())
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    (header, content.get(end..).unwrap_or_default())
}

/// Whether `text` is an RFC 5322 §3.3 date-time: `[Day, ]D Mon YYYY HH:MM[:SS] +ZZZZ`.
fn is_rfc5322_date(text: &str) -> bool {
    let mut words: Vec<&str> = text.split_whitespace().collect();
    if let Some(first) = words.first()
        && first.ends_with(',')
    {
        let day = first.trim_end_matches(',');
        if !["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"].contains(&day) {
            return false;
        }
        words.remove(0);
    }
    let [day, month, year, time, zone] = words.as_slice() else {
        return false;
    };
    let digits = |text: &str, lengths: &[usize]| {
        lengths.contains(&text.len()) && text.bytes().all(|byte| byte.is_ascii_digit())
    };
    let months = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let time_parts: Vec<&str> = time.split(':').collect();
    digits(day, &[1, 2])
        && months.contains(month)
        && digits(year, &[4])
        && matches!(time_parts.len(), 2 | 3)
        && time_parts.iter().all(|part| digits(part, &[2]))
        && zone.len() == 5
        && (zone.starts_with('+') || zone.starts_with('-'))
        && digits(zone.get(1..).unwrap_or_default(), &[4])
}

/// The word after ` with ` in a Received header.
fn received_protocol(header: &str) -> Option<&str> {
    let start = header.find(" with ")? + " with ".len();
    header
        .get(start..)?
        .split(|c: char| c.is_whitespace() || c == ';')
        .next()
}

/// Checks the Received header tsubame put on `content` (as the upstream got it), and
/// that the original message follows unchanged; returns the header.
#[track_caller]
fn assert_received(content: &[u8], original: &[u8], protocol: &str, tls: bool) -> String {
    assert!(
        content.starts_with(b"Received: "),
        "the delivered message does not start with a Received header: \"{}\"",
        tsubame_tests::escape(content)
    );
    let (header, rest) = first_header(content);
    tsubame_tests::assert_bytes_eq(rest, original, "the message after the Received header");
    let expected_start = format!(
        "Received: from {SMTPLIB_HELO} ([127.0.0.1]) by {HOSTNAME} (tsubame) with {protocol}"
    );
    assert!(
        header.starts_with(&expected_start),
        "Received header:\n  {header}\nexpected it to start with:\n  {expected_start}"
    );
    assert_eq!(received_protocol(&header), Some(protocol), "{header}");
    let (_, date) = header
        .rsplit_once(';')
        .unwrap_or_else(|| panic!("no `; date` in {header}"));
    assert!(
        is_rfc5322_date(date),
        "not an RFC 5322 date: {date:?} in {header}"
    );
    if tls {
        let clauses = header.get(expected_start.len()..).unwrap_or_default();
        assert!(clauses.contains("TLS"), "no TLS version in {header}");
        assert!(
            clauses.contains("AES") || clauses.contains("CHACHA"),
            "no cipher suite in {header}"
        );
    } else {
        assert!(!header.contains("TLS"), "TLS named without TLS: {header}");
    }
    header
}

#[test]
fn received_header_helpers_read_a_folded_header() {
    let content = b"Received: from peer.tsubame.test ([127.0.0.1])\r\n\tby relay.tsubame.test \
        (tsubame) with ESMTPSA (TLSv1.3 TLS_AES_256_GCM_SHA384)\r\n id 0006452c8f3a1b07;\r\n \
        Thu, 26 Nov 2026 11:20:40 +0000\r\nSubject: x\r\n\r\nbody\r\n";
    let (header, rest) = first_header(content);
    assert_eq!(
        header,
        "Received: from peer.tsubame.test ([127.0.0.1]) by relay.tsubame.test (tsubame) with \
         ESMTPSA (TLSv1.3 TLS_AES_256_GCM_SHA384) id 0006452c8f3a1b07; Thu, 26 Nov 2026 \
         11:20:40 +0000"
    );
    assert_eq!(rest, b"Subject: x\r\n\r\nbody\r\n");
    assert_eq!(received_protocol(&header), Some("ESMTPSA"));
    assert_eq!(
        received_protocol("Received: from a by b with ESMTP; date"),
        Some("ESMTP")
    );
    for date in [
        "Thu, 26 Nov 2026 11:20:40 +0000",
        "26 Nov 2026 11:20 -0500",
        " Thu, 6 Nov 2026 01:02:03 +0900 ",
    ] {
        assert!(is_rfc5322_date(date), "{date:?}");
    }
    for not_a_date in [
        "",
        "2026-11-26T11:20:40Z",
        "Thu, 26 Nov 2026 11:20:40",
        "Thu 26 Nov 2026 11:20:40 +0000",
        "Thu, 26 November 2026 11:20:40 +0000",
        "Thu, 26 Nov 26 11:20:40 +0000",
        "Thu, 26 Nov 2026 11:20:40 UTC",
    ] {
        assert!(!is_rfc5322_date(not_a_date), "{not_a_date:?}");
    }
}

/// The delivered message whose content contains `Subject: {subject}`.
#[track_caller]
fn delivered_with_subject<'a>(
    received: &'a [tsubame_tests::upstream::Received],
    subject: &str,
) -> &'a tsubame_tests::upstream::Received {
    let needle = format!("Subject: {subject}\r\n");
    received
        .iter()
        .find(|message| message.text().contains(&needle))
        .unwrap_or_else(|| panic!("no delivered message with {needle:?}: {received:?}"))
}

#[test]
fn received_header_names_protocol_and_tls_and_the_user_only_when_configured() {
    let _limit = hard_limit(Duration::from_secs(150));
    let fixture = Fixture::new();
    let password = test_password("received");
    let users = user_entry(USER, &password, "");

    // received_header_user off (the default): ESMTPSA, ESMTPS and ESMTP, no user name.
    let upstream = Aiosmtpd::start(&[]);
    let server = delivering_server(&fixture, &upstream, "", &users);
    let authenticated = test_message("received-esmtpsa", "TLS and AUTH\n");
    let encrypted = test_message("received-esmtps", "TLS, no AUTH\n");
    let plain = test_message("received-esmtp", "neither\n");
    let outcomes = Smtplib::new(server.address())
        .tls_ca(&fixture.ca())
        .starttls()
        .login(USER, &password)
        .sendmail(
            "scans@example.com",
            &["rcpt@example.net"],
            &authenticated,
            &[],
        )
        .quit()
        .run_to_end();
    assert_sent(&outcomes[2], "STARTTLS + AUTH");
    let outcomes = Smtplib::new(server.address())
        .tls_ca(&fixture.ca())
        .starttls()
        .sendmail("scans@example.com", &["rcpt@example.net"], &encrypted, &[])
        .quit()
        .run_to_end();
    assert_sent(&outcomes[1], "STARTTLS from a relay network");
    let outcomes = Smtplib::new(server.address())
        .sendmail("scans@example.com", &["rcpt@example.net"], &plain, &[])
        .quit()
        .run_to_end();
    assert_sent(&outcomes[0], "plain from a relay network");
    let received = upstream.wait_for(3, DELIVERY_TIMEOUT);
    let header = assert_received(
        &delivered_with_subject(&received, "received-esmtpsa").content,
        &authenticated,
        "ESMTPSA",
        true,
    );
    assert!(
        !header.contains(USER),
        "the user's name is in the header although received_header_user is off: {header}"
    );
    assert_received(
        &delivered_with_subject(&received, "received-esmtps").content,
        &encrypted,
        "ESMTPS",
        true,
    );
    assert_received(
        &delivered_with_subject(&received, "received-esmtp").content,
        &plain,
        "ESMTP",
        false,
    );
    server.stop();

    // received_header_user on: the user's name is there.
    let upstream = Aiosmtpd::start(&[]);
    let server = delivering_server(&fixture, &upstream, "received_header_user = true\n", &users);
    let named = test_message("received-user", "TLS and AUTH, user named\n");
    let outcomes = Smtplib::new(server.address())
        .tls_ca(&fixture.ca())
        .starttls()
        .login(USER, &password)
        .sendmail("scans@example.com", &["rcpt@example.net"], &named, &[])
        .quit()
        .run_to_end();
    assert_sent(&outcomes[2], "STARTTLS + AUTH, user named");
    let received = upstream.wait_for(1, DELIVERY_TIMEOUT);
    let header = assert_received(&received[0].content, &named, "ESMTPSA", true);
    assert!(header.contains(USER), "no user name in {header}");
    server.stop();
}
