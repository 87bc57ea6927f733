//! Delivery through an upstream that takes OAuth 2.0 access tokens (Gmail's XOAUTH2, RFC
//! 7628's OAUTHBEARER), end to end with real peers:
//!
//! * devices log in to tsubame with AUTH PLAIN over STARTTLS (Python's smtplib, accounts
//!   made with `tsubame user add`);
//! * tsubame gets access tokens from the token endpoint peer
//!   (`crates/oauth/tests/peers/token_endpoint.py`, the one tsubame-oauth's own tests
//!   use) with each account's refresh token from `token_directory`, or with a signed
//!   service-account assertion;
//! * and logs in, over STARTTLS verified against the test CA, to the delivery crate's
//!   aiosmtpd peer (`crates/delivery/tests/peers/aiosmtpd_sink.py`), which checks the
//!   initial response byte for byte and takes a token only if the endpoint's request log
//!   shows it was issued for the account the response names (`--issued-tokens`); a
//!   wrong token gets Gmail's error challenge, then 535 5.7.8.
//!
//! The endpoint issues the access tokens `at-1`, `at-2`, ... in order, so a test knows
//! which one each login used. Every secret here (client secret, refresh tokens, device
//! passwords, the service account's key) is made up for the run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use tempfile::TempDir;
use tsubame_tests::cli::{queue_list, tsubame, user_add};
use tsubame_tests::oauth::{
    ServiceAccountKey, TokenEndpoint, TokenEndpointOptions, throwaway_secret,
};
use tsubame_tests::peers::Smtplib;
use tsubame_tests::pki::TestPki;
use tsubame_tests::process::hard_limit;
use tsubame_tests::server::{Server, ServerOptions};
use tsubame_tests::upstream::{Aiosmtpd, Received, free_port, wait_until};

use crate::assert_spool_ids;
use crate::login::{test_password, toml_string};

/// The OAuth client (a "Desktop app" client's id; the secret is made up per run).
const CLIENT_ID: &str = "e2e-client.apps.googleusercontent.com";
/// `[server] hostname`.
const HOSTNAME: &str = "relay.tsubame.test";
/// The two devices and the Google accounts `account_map` sends their mail as.
const SCANNER: &str = "scanner-3f";
const PRINTER: &str = "printer-2a";
const SCANS_ACCOUNT: &str = "scans@example.com";
const PRINT_ACCOUNT: &str = "print@example.com";
/// The upstream's `account`, for devices no `account_map` entry names.
const DEFAULT_ACCOUNT: &str = "relay@example.com";
/// The envelope sender of every device: only the login tells their mail apart.
const SENDER: &str = "office@example.com";
const RECIPIENT: &str = "rcpt@example.net";
/// The service account of the service-account test (its key is made per run).
const SERVICE_ACCOUNT: &str = "relay@tsubame-e2e.iam.gserviceaccount.com";
/// A delivery on a loaded CI machine; a healthy one takes milliseconds.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);
/// After a failed refresh the token cache asks the endpoint again only after 10 s
/// (`DEFAULT_BACKOFF_INITIAL` in crates/oauth/src/cache.rs); the revoked-grant test waits
/// that out plus a delivery.
const AFTER_BACKOFF_TIMEOUT: Duration = Duration::from_secs(45);

/// The SASL mechanism the upstream offers and tsubame must use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mechanism {
    Xoauth2,
    Oauthbearer,
}

impl Mechanism {
    fn name(self) -> &'static str {
        match self {
            Mechanism::Xoauth2 => "XOAUTH2",
            Mechanism::Oauthbearer => "OAUTHBEARER",
        }
    }
}

/// Where tokens come from.
enum Grant {
    /// `kind = "refresh-token"`: one refresh token file per account.
    RefreshTokens,
    /// `kind = "service-account"`: this key, with domain-wide delegation.
    ServiceAccount(ServiceAccountKey),
}

/// One test's world: the PKI, the token endpoint, the secrets and files tsubame reads.
struct World {
    pki: TestPki,
    /// The listener's certificate and key (from the same CA as the upstream's).
    listener: (PathBuf, PathBuf),
    /// Holds `client.secret`, `tokens/` and `users.toml`.
    directory: TempDir,
    client_secret: String,
    /// Each account's refresh token, as the endpoint knows it.
    refresh_tokens: BTreeMap<String, String>,
    /// Each device's password.
    passwords: BTreeMap<String, String>,
    endpoint: TokenEndpoint,
    grant: Grant,
}

/// Writes `text` to `path` with mode 0600, atomically (a new file renamed over the old
/// one, as `tsubame oauth google authorize` stores a token).
fn write_private(path: &Path, text: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let temporary = path.with_extension("tmp");
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temporary)
        .and_then(|mut file| file.write_all(text.as_bytes()))
        .and_then(|()| std::fs::rename(&temporary, path))
        .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
}

impl World {
    /// A refresh-token world: `accounts` each get a refresh token the endpoint honours,
    /// in their token file; `devices` each get an account in the users file.
    fn refresh_tokens(accounts: &[&str], devices: &[&str]) -> World {
        let refresh_tokens: BTreeMap<String, String> = accounts
            .iter()
            .map(|account| (account.to_string(), throwaway_secret("1//e2e-refresh")))
            .collect();
        let client_secret = throwaway_secret("GOCSPX-e2e");
        let endpoint = TokenEndpoint::start(&TokenEndpointOptions {
            client_id: CLIENT_ID.to_string(),
            client_secret: client_secret.clone(),
            refresh_tokens: refresh_tokens.values().cloned().collect(),
            service_account: None,
        });
        let world = Self::new(
            client_secret,
            refresh_tokens,
            devices,
            endpoint,
            Grant::RefreshTokens,
        );
        for (account, refresh_token) in &world.refresh_tokens {
            world.write_refresh_token(account, refresh_token);
        }
        world
    }

    /// A service-account world: the endpoint checks assertions with a key made now.
    fn service_account(devices: &[&str]) -> World {
        let key = ServiceAccountKey::generate("e2e-key-1");
        let endpoint = TokenEndpoint::start(&TokenEndpointOptions {
            client_id: CLIENT_ID.to_string(),
            client_secret: String::new(),
            refresh_tokens: Vec::new(),
            service_account: Some((
                key.public_key_path(),
                key.key_id.clone(),
                SERVICE_ACCOUNT.to_string(),
            )),
        });
        Self::new(
            String::new(),
            BTreeMap::new(),
            devices,
            endpoint,
            Grant::ServiceAccount(key),
        )
    }

    fn new(
        client_secret: String,
        refresh_tokens: BTreeMap<String, String>,
        devices: &[&str],
        endpoint: TokenEndpoint,
        grant: Grant,
    ) -> World {
        let pki = TestPki::new();
        let listener = pki.issue("listener", HOSTNAME);
        let directory = tempfile::Builder::new()
            .prefix("tsubame-gmail-")
            .tempdir()
            .unwrap();
        write_private(
            &directory.path().join("client.secret"),
            &format!("{client_secret}\n"),
        );
        std::fs::create_dir(directory.path().join("tokens")).unwrap();
        let mut passwords = BTreeMap::new();
        for device in devices {
            let password = test_password(&format!("gmail {device}"));
            user_add(&directory.path().join("users.toml"), device, &password);
            passwords.insert(device.to_string(), password);
        }
        World {
            pki,
            listener,
            directory,
            client_secret,
            refresh_tokens,
            passwords,
            endpoint,
            grant,
        }
    }

    /// `token_directory/<account>.token`: tsubame_config::oauth::token_file_in's name for
    /// an address made only of letters, digits and `@ . _ + -`.
    fn token_file(&self, account: &str) -> PathBuf {
        self.directory
            .path()
            .join("tokens")
            .join(format!("{account}.token"))
    }

    fn write_refresh_token(&self, account: &str, refresh_token: &str) {
        write_private(&self.token_file(account), &format!("{refresh_token}\n"));
    }

    /// The upstream peer: STARTTLS required with the test CA's certificate for
    /// 127.0.0.1, AUTH `mechanism` required after it, valid tokens being the ones the
    /// endpoint issued for the account named; `extra` options after those.
    fn start_upstream(&self, mechanism: Mechanism, extra: &[&str]) -> Aiosmtpd {
        self.start_upstream_on(free_port(), mechanism, extra)
    }

    /// [`World::start_upstream`] on `port`.
    fn start_upstream_on(&self, port: u16, mechanism: Mechanism, extra: &[&str]) -> Aiosmtpd {
        let certificate = self.pki.certificate().display().to_string();
        let key = self.pki.key().display().to_string();
        let log = self.endpoint.log_path().display().to_string();
        let grants = serde_json::to_string(&self.refresh_tokens).unwrap();
        let mut options = vec![
            "--cert",
            &certificate,
            "--key",
            &key,
            "--starttls",
            "--require-starttls",
            "--auth",
            mechanism.name(),
            "--auth-required",
            // RFC 7628's host=: tsubame names the host it connected to, the configured one.
            "--bearer-host",
            "127.0.0.1",
            "--issued-tokens",
            &log,
            "--grants",
            &grants,
        ];
        options.extend_from_slice(extra);
        Aiosmtpd::start_delivery_sink_on(port, &options)
    }

    /// The whole configuration: a STARTTLS listener where devices must log in, delivery
    /// through `upstream` (an `[[upstream]]` block), tokens from the `[[oauth]]` source
    /// "google", retries after `retry_secs`.
    fn config(&self, upstream: &str, retry_secs: u64) -> String {
        let path = |path: &Path| toml_string(&path.display().to_string());
        let oauth = match &self.grant {
            Grant::RefreshTokens => format!(
                "[[oauth]]\nname = \"google\"\nkind = \"refresh-token\"\nclient_id = \"{CLIENT_ID}\"\n\
                 client_secret_file = {}\ntoken_directory = {}\ntoken_endpoint = \"{}\"\n",
                path(&self.directory.path().join("client.secret")),
                path(&self.directory.path().join("tokens")),
                self.endpoint.url()
            ),
            Grant::ServiceAccount(key) => format!(
                "[[oauth]]\nname = \"google\"\nkind = \"service-account\"\nkey_file = {}\n\
                 token_endpoint = \"{}\"\nscope = \"https://mail.google.com/\"\n",
                path(&key.write_key_file(SERVICE_ACCOUNT, &self.endpoint.url())),
                self.endpoint.url()
            ),
        };
        format!(
            "[server]\nhostname = \"{HOSTNAME}\"\n\n\
             [[listener]]\naddress = \"127.0.0.1:0\"\ncertificate_file = {}\nkey_file = {}\n\
             require_auth = true\n\n\
             [auth]\nusers_file = {}\n\n\
             [delivery]\ndefault_upstream = \"gmail\"\nretry_schedule_secs = [{retry_secs}]\n\n\
             {upstream}\n{oauth}",
            path(&self.listener.0),
            path(&self.listener.1),
            path(&self.directory.path().join("users.toml")),
        )
    }

    /// A `kind = "gmail"` upstream pointed at the peer on `port` (the preset's host and
    /// port replaced, its STARTTLS and XOAUTH2 kept), with `account_map` entries for
    /// devices and `account` for the rest.
    fn gmail_upstream(&self, port: u16, account_map: &[(&str, &str)]) -> String {
        let mut upstream = format!(
            "[[upstream]]\nname = \"gmail\"\nkind = \"gmail\"\nhost = \"127.0.0.1\"\nport = {port}\n\
             ca_file = {}\noauth = \"google\"\naccount = \"{DEFAULT_ACCOUNT}\"\ntimeout_secs = 10\n",
            toml_string(&self.pki.ca().display().to_string())
        );
        for (user, account) in account_map {
            upstream.push_str(&format!(
                "[[upstream.account_map]]\nuser = \"{user}\"\naccount = \"{account}\"\n"
            ));
        }
        upstream
    }

    /// Starts a delivering server on `config`.
    fn start_server(&self, config: &str) -> Server {
        Server::start(&ServerOptions::new().deliver().config(config))
    }

    /// `device` connects, STARTTLS (verified against the test CA), AUTH PLAIN, and sends
    /// `content` from [`SENDER`] to [`RECIPIENT`]; returns the queued id.
    #[track_caller]
    fn send_as(&self, server: &Server, device: &str, content: &[u8]) -> String {
        let password = &self.passwords[device];
        let outcomes = Smtplib::new(server.address())
            .tls_ca(&self.pki.ca())
            .starttls()
            .login(device, password)
            .mail(SENDER, &[])
            .rcpt(RECIPIENT, &[])
            .data(content)
            .quit()
            .run_to_end();
        outcomes[0].expect(220, "2.0.0", "STARTTLS");
        outcomes[1].expect(235, "2.7.0", "AUTH");
        outcomes[4].expect(250, "2.0.0", "DATA");
        outcomes[4].queued_id()
    }

    /// Asserts the server log holds none of the world's secrets, nor an AUTH payload.
    #[track_caller]
    fn assert_no_secret_in(&self, log: &str) {
        let mut secrets: Vec<&str> = self.refresh_tokens.values().map(String::as_str).collect();
        secrets.extend(self.passwords.values().map(String::as_str));
        if !self.client_secret.is_empty() {
            secrets.push(&self.client_secret);
        }
        for secret in secrets {
            assert!(
                !log.contains(secret),
                "a secret is in the server log:\n{log}"
            );
        }
        assert!(
            !log.contains("auth=Bearer"),
            "a bearer login is in the server log:\n{log}"
        );
    }
}

/// A message with what a body must survive unchanged: dot lines, 8-bit text, a line
/// that looks like an SMTP reply.
fn message(subject: &str) -> Vec<u8> {
    tsubame_tests::crlf(&format!(
        "From: {SENDER}\nTo: {RECIPIENT}\nSubject: {subject}\n\
         Message-Id: <{subject}@gmail.e2e.tsubame.test>\nContent-Type: text/plain; charset=utf-8\n\n\
         scanned page 1\n.starts with a dot\n..two dots\n.\n235 2.7.0 not a reply\ncaf\u{e9} \u{263a}\n"
    ))
}

/// Length of the base64 of `bytes` bytes (RFC 4648 §4, padded).
fn base64_len(bytes: usize) -> usize {
    bytes.div_ceil(3) * 4
}

/// The peer's auth.log line for an accepted XOAUTH2 login as `account` with `token`:
/// the peer takes only `user=ACCOUNT ^A auth=Bearer TOKEN ^A ^A` (its prefix and end
/// checked byte for byte, the token checked against the endpoint's log), and logs its
/// base64 length, which pins the whole initial response down.
fn xoauth2_accepted(account: &str, token: &str) -> String {
    let response = format!("user={account}\x01auth=Bearer {token}\x01\x01");
    format!(
        "XOAUTH2 accepted, initial response {} base64 bytes",
        base64_len(response.len())
    )
}

/// The message whose Subject is `subject`.
#[track_caller]
fn with_subject<'a>(received: &'a [Received], subject: &str) -> &'a Received {
    let needle = format!("Subject: {subject}\r\n");
    received
        .iter()
        .find(|message| message.text().contains(&needle))
        .unwrap_or_else(|| panic!("no delivered message with {needle:?}: {received:?}"))
}

/// Asserts what the upstream got: the content byte-exact under tsubame's Received
/// header (which says the device logged in over TLS), the envelope, and a session over
/// TLS logged in with `mechanism` as `account` with `token`.
#[track_caller]
fn assert_delivered(
    received: &Received,
    content: &[u8],
    mechanism: Mechanism,
    account: &str,
    token: &str,
) {
    let original = tsubame_tests::without_received(&received.content);
    tsubame_tests::assert_bytes_eq(original, content, "delivered content");
    // The device's submission: over TLS and logged in (RFC 3848).
    let header = received
        .content
        .get(..received.content.len() - original.len())
        .unwrap_or_default();
    let header = String::from_utf8_lossy(header);
    assert!(
        header
            .split_whitespace()
            .collect::<Vec<_>>()
            .windows(2)
            .any(|words| words == ["with", "ESMTPSA"]),
        "{header}"
    );
    assert_eq!(received.mail_from(), SENDER);
    assert_eq!(received.recipients(), vec![RECIPIENT.to_string()]);
    let envelope = &received.envelope;
    assert!(
        envelope["tls"].as_str().unwrap_or("").starts_with("TLSv1."),
        "not delivered over TLS: {envelope}"
    );
    assert_eq!(envelope["auth_mechanism"], mechanism.name(), "{envelope}");
    assert_eq!(envelope["auth_login"], account, "{envelope}");
    assert_eq!(envelope["auth_token"], token, "{envelope}");
}

#[track_caller]
fn wait_until_queue_is_empty(server: &Server) {
    assert!(
        wait_until(DELIVERY_TIMEOUT, || queue_list(server.spool())["messages"]
            .as_array()
            .is_some_and(Vec::is_empty)),
        "the queue did not empty: {}\n{}",
        queue_list(server.spool()),
        server.log()
    );
}

/// The endpoint's refresh-token grants so far, as (refresh token presented, access
/// token issued or null, why refused or null).
fn refresh_grants(endpoint: &TokenEndpoint) -> Vec<(Value, Value, Value)> {
    endpoint
        .token_requests()
        .into_iter()
        .map(|request| {
            assert_eq!(request["grant_type"], "refresh_token", "{request}");
            (
                request["refresh_token"].clone(),
                request["access_token"].clone(),
                request["why"].clone(),
            )
        })
        .collect()
}

#[test]
fn a_device_mails_through_a_gmail_upstream_as_its_mapped_account() {
    let _limit = hard_limit(Duration::from_secs(120));
    let world = World::refresh_tokens(&[SCANS_ACCOUNT, DEFAULT_ACCOUNT], &[SCANNER]);
    let upstream = world.start_upstream(Mechanism::Xoauth2, &[]);
    let server = world.start_server(&world.config(
        &world.gmail_upstream(upstream.port(), &[(SCANNER, SCANS_ACCOUNT)]),
        1,
    ));
    let content = message("gmail-scan");
    let id = world.send_as(&server, SCANNER, &content);

    let received = upstream.wait_for(1, DELIVERY_TIMEOUT);
    assert_eq!(received.len(), 1);
    assert_delivered(
        &received[0],
        &content,
        Mechanism::Xoauth2,
        SCANS_ACCOUNT,
        "at-1",
    );
    // One login, exactly the documented initial response for the account and at-1.
    assert_eq!(
        upstream.log_lines("auth.log"),
        vec![xoauth2_accepted(SCANS_ACCOUNT, "at-1")]
    );
    // at-1 came from the scanner's account's refresh token, in one request; the default
    // account's token was never asked for.
    assert_eq!(
        refresh_grants(&world.endpoint),
        vec![(
            Value::from(world.refresh_tokens[SCANS_ACCOUNT].as_str()),
            Value::from("at-1"),
            Value::Null
        )]
    );
    crate::assert_delivered_line(&server, &id, DELIVERY_TIMEOUT);
    wait_until_queue_is_empty(&server);
    world.assert_no_secret_in(&server.log());
    server.stop();
}

#[test]
fn a_refused_token_is_replaced_by_a_fresh_one_and_the_mail_goes_out_once() {
    let _limit = hard_limit(Duration::from_secs(120));
    let world = World::refresh_tokens(&[SCANS_ACCOUNT], &[SCANNER]);
    // at-1, the first token issued, has expired (or been revoked) by the time it is used.
    let upstream = world.start_upstream(Mechanism::Xoauth2, &["--expired-token", "at-1"]);
    // A long retry delay: only the immediate second try with a fresh token can deliver.
    let server = world.start_server(&world.config(
        &world.gmail_upstream(upstream.port(), &[(SCANNER, SCANS_ACCOUNT)]),
        600,
    ));
    let content = message("gmail-expired");
    let id = world.send_as(&server, SCANNER, &content);

    let received = upstream.wait_for(1, DELIVERY_TIMEOUT);
    assert_delivered(
        &received[0],
        &content,
        Mechanism::Xoauth2,
        SCANS_ACCOUNT,
        "at-2",
    );
    // Gmail's protocol: the error challenge (334) answered with an empty line, then
    // 535; then a new session with the fresh token.
    assert_eq!(
        upstream.log_lines("auth.log"),
        vec![
            "XOAUTH2 wrong token; challenge answered b''".to_string(),
            xoauth2_accepted(SCANS_ACCOUNT, "at-2"),
        ]
    );
    // Exactly two refreshes, both with the account's refresh token.
    let refresh_token = Value::from(world.refresh_tokens[SCANS_ACCOUNT].as_str());
    assert_eq!(
        refresh_grants(&world.endpoint),
        vec![
            (refresh_token.clone(), Value::from("at-1"), Value::Null),
            (refresh_token, Value::from("at-2"), Value::Null),
        ]
    );
    crate::assert_delivered_line(&server, &id, DELIVERY_TIMEOUT);
    wait_until_queue_is_empty(&server);
    // Delivered in the first attempt, once: no deferral, no second copy, one MAIL.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(upstream.received().len(), 1, "delivered more than once");
    assert_eq!(
        upstream.log_lines("mail.log"),
        vec![format!("MAIL {SENDER}")]
    );
    let log = server.log();
    assert!(!log.contains(&format!("deferred id={id}")), "{log}");
    assert!(
        log.contains("the upstream refused the access token"),
        "the refusal is not logged:\n{log}"
    );
    world.assert_no_secret_in(&log);
    server.stop();
}

#[test]
fn a_revoked_grant_defers_with_a_hint_to_authorise_and_delivers_once_authorised_again() {
    let _limit = hard_limit(Duration::from_secs(180));
    let world = World::refresh_tokens(&[SCANS_ACCOUNT], &[SCANNER]);
    // The account's token file holds a refresh token the endpoint no longer honours, as
    // after a password change or access removed at myaccount.google.com.
    let revoked = throwaway_secret("1//e2e-revoked");
    world.write_refresh_token(SCANS_ACCOUNT, &revoked);
    let upstream = world.start_upstream(Mechanism::Xoauth2, &[]);
    // A long retry delay: after the first attempt, only `queue flush` tries again.
    let server = world.start_server(&world.config(
        &world.gmail_upstream(upstream.port(), &[(SCANNER, SCANS_ACCOUNT)]),
        600,
    ));
    let content = message("gmail-revoked");
    let id = world.send_as(&server, SCANNER, &content);

    // Deferred, not bounced.
    assert!(
        wait_until(DELIVERY_TIMEOUT, || {
            queue_list(server.spool())["messages"][0]["recipients"][0]["state"] == "deferred"
        }),
        "not deferred: {}\n{}",
        queue_list(server.spool()),
        server.log()
    );
    let list = queue_list(server.spool());
    let messages = list["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 1, "a bounce was queued: {list}");
    assert_eq!(messages[0]["id"], id.as_str());
    let last_reply = messages[0]["recipients"][0]["last_reply"]
        .as_str()
        .unwrap_or_default();
    assert!(
        last_reply.contains(&format!("no access token for {SCANS_ACCOUNT}"))
            && last_reply.contains("Token has been expired or revoked."),
        "the deferral should say why: {last_reply}"
    );
    // No DSN in the spool either: the message is the only one.
    assert_spool_ids(server.spool(), &[&id]);
    let log = server.log();
    assert!(!log.contains("bounce"), "{log}");
    let hint = log
        .lines()
        .find(|line| line.contains("tsubame oauth google authorize"))
        .unwrap_or_else(|| panic!("no line says to authorise again:\n{log}"));
    assert!(
        hint.contains("ERROR")
            && hint.contains(&format!(
                "tsubame oauth google authorize --account {SCANS_ACCOUNT}"
            )),
        "the hint should be an error with the command for the account: {hint}"
    );
    assert!(upstream.received().is_empty());
    assert!(
        upstream.log_lines("mail.log").is_empty() && upstream.log_lines("auth.log").is_empty(),
        "nothing may be tried upstream without a token"
    );
    let refused = refresh_grants(&world.endpoint);
    assert_eq!(
        refused,
        vec![(
            Value::from(revoked.as_str()),
            Value::Null,
            Value::from("Token has been expired or revoked.")
        )]
    );

    // Authorised again: the new refresh token replaces the file, no restart. The cache
    // waits 10 s after the failure before it asks the endpoint again; each flush until
    // then defers the mail once more without a request.
    let good = world.refresh_tokens[SCANS_ACCOUNT].clone();
    world.write_refresh_token(SCANS_ACCOUNT, &good);
    let spool = server.spool().display().to_string();
    let delivered = wait_until(AFTER_BACKOFF_TIMEOUT, || {
        if !upstream.received().is_empty() {
            return true;
        }
        tsubame(&["queue", "flush", "--spool", &spool]).assert_code(0);
        std::thread::sleep(Duration::from_secs(2));
        !upstream.received().is_empty()
    });
    assert!(
        delivered,
        "not delivered after the grant was fixed:\n{}",
        server.log()
    );
    let received = upstream.wait_for(1, DELIVERY_TIMEOUT);
    assert_delivered(
        &received[0],
        &content,
        Mechanism::Xoauth2,
        SCANS_ACCOUNT,
        "at-1",
    );
    // The one refused request, then one with the new token: the backoff spared the
    // endpoint the flushes in between.
    assert_eq!(
        refresh_grants(&world.endpoint),
        vec![
            refused[0].clone(),
            (Value::from(good.as_str()), Value::from("at-1"), Value::Null),
        ]
    );
    wait_until_queue_is_empty(&server);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(upstream.received().len(), 1, "delivered more than once");
    let log = server.log();
    assert!(!log.contains("bounce"), "{log}");
    assert!(
        !log.contains(&revoked),
        "the revoked refresh token is in the log"
    );
    world.assert_no_secret_in(&log);
    server.stop();
}

#[test]
fn two_devices_send_as_their_own_accounts_with_their_own_refresh_tokens() {
    let _limit = hard_limit(Duration::from_secs(120));
    let world = World::refresh_tokens(&[SCANS_ACCOUNT, PRINT_ACCOUNT], &[SCANNER, PRINTER]);
    let upstream = world.start_upstream(Mechanism::Xoauth2, &[]);
    let server = world.start_server(&world.config(
        &world.gmail_upstream(
            upstream.port(),
            &[(SCANNER, SCANS_ACCOUNT), (PRINTER, PRINT_ACCOUNT)],
        ),
        1,
    ));
    let scan = message("gmail-from-scanner");
    let print = message("gmail-from-printer");
    world.send_as(&server, SCANNER, &scan);
    world.send_as(&server, PRINTER, &print);

    let received = upstream.wait_for(2, DELIVERY_TIMEOUT);
    assert_eq!(received.len(), 2);
    // Each device's message went out in a session logged in as its own account, with a
    // token the endpoint issued from that account's refresh token (the peer takes no
    // other), whichever of the two tokens was issued first.
    let grants = refresh_grants(&world.endpoint);
    assert_eq!(grants.len(), 2, "one refresh per account: {grants:?}");
    for (content, subject, account) in [
        (&scan, "gmail-from-scanner", SCANS_ACCOUNT),
        (&print, "gmail-from-printer", PRINT_ACCOUNT),
    ] {
        let delivered = with_subject(&received, subject);
        let token = delivered.envelope["auth_token"]
            .as_str()
            .unwrap_or_default();
        let issued_from = grants
            .iter()
            .find(|(_, access_token, _)| access_token == token)
            .map(|(refresh_token, _, _)| refresh_token)
            .unwrap_or_else(|| panic!("{token:?} was not issued: {grants:?}"));
        assert_eq!(
            issued_from,
            world.refresh_tokens[account].as_str(),
            "{subject} went out with another account's token"
        );
        assert_delivered(delivered, content, Mechanism::Xoauth2, account, token);
    }
    let mut logins = upstream.log_lines("auth.log");
    logins.sort();
    let mut expected: Vec<String> = received
        .iter()
        .map(|message| {
            xoauth2_accepted(
                message.envelope["auth_login"].as_str().unwrap_or_default(),
                message.envelope["auth_token"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    expected.sort();
    assert_eq!(logins, expected);
    wait_until_queue_is_empty(&server);
    world.assert_no_secret_in(&server.log());
    server.stop();
}

#[test]
fn oauthbearer_on_a_plain_smtp_upstream_delivers_as_the_default_account() {
    let _limit = hard_limit(Duration::from_secs(120));
    let world = World::refresh_tokens(&[DEFAULT_ACCOUNT], &[PRINTER]);
    let upstream = world.start_upstream(Mechanism::Oauthbearer, &[]);
    let upstream_config = format!(
        "[[upstream]]\nname = \"gmail\"\nkind = \"smtp\"\nhost = \"127.0.0.1\"\nport = {}\n\
         tls = \"required\"\nca_file = {}\nauth = \"oauthbearer\"\noauth = \"google\"\n\
         account = \"{DEFAULT_ACCOUNT}\"\ntimeout_secs = 10\n",
        upstream.port(),
        toml_string(&world.pki.ca().display().to_string())
    );
    let server = world.start_server(&world.config(&upstream_config, 1));
    let content = message("oauthbearer");
    world.send_as(&server, PRINTER, &content);

    let received = upstream.wait_for(1, DELIVERY_TIMEOUT);
    assert_delivered(
        &received[0],
        &content,
        Mechanism::Oauthbearer,
        DEFAULT_ACCOUNT,
        "at-1",
    );
    // RFC 7628 §3.1: "n,a=" USER "," ^A "host=" HOST ^A "port=" PORT ^A "auth=Bearer "
    // TOKEN ^A ^A, checked byte for byte by the peer; its length pins it down.
    let response = format!(
        "n,a={DEFAULT_ACCOUNT},\x01host=127.0.0.1\x01port={}\x01auth=Bearer at-1\x01\x01",
        upstream.port()
    );
    assert_eq!(
        upstream.log_lines("auth.log"),
        vec![format!(
            "OAUTHBEARER accepted, initial response {} base64 bytes",
            base64_len(response.len())
        )]
    );
    assert_eq!(
        refresh_grants(&world.endpoint),
        vec![(
            Value::from(world.refresh_tokens[DEFAULT_ACCOUNT].as_str()),
            Value::from("at-1"),
            Value::Null
        )]
    );
    wait_until_queue_is_empty(&server);
    world.assert_no_secret_in(&server.log());
    server.stop();
}

#[test]
fn a_service_account_signs_for_the_mapped_account() {
    let _limit = hard_limit(Duration::from_secs(120));
    let world = World::service_account(&[SCANNER]);
    let upstream = world.start_upstream(Mechanism::Xoauth2, &[]);
    let server = world.start_server(&world.config(
        &world.gmail_upstream(upstream.port(), &[(SCANNER, SCANS_ACCOUNT)]),
        1,
    ));
    let content = message("service-account");
    world.send_as(&server, SCANNER, &content);

    let received = upstream.wait_for(1, DELIVERY_TIMEOUT);
    // The peer takes a token issued by assertion only for the assertion's sub.
    assert_delivered(
        &received[0],
        &content,
        Mechanism::Xoauth2,
        SCANS_ACCOUNT,
        "at-1",
    );
    let requests = world.endpoint.token_requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    // The endpoint checked the RS256 signature with the public key, the header's kid,
    // iss, scope, aud and the lifetime; sub is the mapped account.
    assert_eq!(
        requests[0]["grant_type"],
        "urn:ietf:params:oauth:grant-type:jwt-bearer"
    );
    assert_eq!(requests[0]["ok"], true, "{}", requests[0]);
    assert_eq!(requests[0]["sub"], SCANS_ACCOUNT);
    assert_eq!(requests[0]["access_token"], "at-1");
    wait_until_queue_is_empty(&server);
    let log = server.log();
    world.assert_no_secret_in(&log);
    assert!(
        !log.contains("PRIVATE KEY"),
        "the key is in the log:\n{log}"
    );
    server.stop();
}

#[test]
fn check_config_accepts_the_gmail_config_and_names_xoauth2_and_the_accounts() {
    let _limit = hard_limit(Duration::from_secs(60));
    let world = World::refresh_tokens(&[SCANS_ACCOUNT, PRINT_ACCOUNT], &[SCANNER, PRINTER]);
    let config = world.config(
        &world.gmail_upstream(
            free_port(),
            &[(SCANNER, SCANS_ACCOUNT), (PRINTER, PRINT_ACCOUNT)],
        ),
        1,
    );
    let file = world.directory.path().join("tsubame.toml");
    std::fs::write(&file, &config).unwrap();
    let run = tsubame(&["check-config", &file.display().to_string()]);
    run.assert_code(0);
    let stdout = run.stdout_text();
    let line = stdout
        .lines()
        .find(|line| line.starts_with("upstream gmail"))
        .unwrap_or_else(|| panic!("no summary line for the upstream:\n{}", run.describe()));
    for expected in [
        "127.0.0.1:",
        "AUTH XOAUTH2 with tokens from oauth \"google\"",
        &format!("{SCANS_ACCOUNT} for user {SCANNER}"),
        &format!("{PRINT_ACCOUNT} for user {PRINTER}"),
        &format!("{DEFAULT_ACCOUNT} otherwise"),
    ] {
        assert!(
            line.contains(expected),
            "{expected:?} missing from {line:?}"
        );
    }
    world.assert_no_secret_in(&format!("{stdout}{}", run.stderr_text()));
}

/// A server delivering to the gmail upstream on `port` over one connection, so that
/// a message finds the session of the one before it open; with a long retry delay, so
/// that only an immediate try with a fresh token can deliver after a refusal.
fn start_one_connection_server(world: &World, port: u16) -> Server {
    let upstream = world
        .gmail_upstream(port, &[(SCANNER, SCANS_ACCOUNT)])
        .replace(
            "timeout_secs = 10\n",
            "timeout_secs = 10\nmax_connections = 1\n",
        );
    world.start_server(&world.config(&upstream, 600))
}

#[test]
fn a_token_refused_after_a_reused_connection_was_closed_is_still_replaced_at_once() {
    let _limit = hard_limit(Duration::from_secs(120));
    let world = World::refresh_tokens(&[SCANS_ACCOUNT], &[SCANNER]);
    let port = free_port();
    let first = world.start_upstream_on(port, Mechanism::Xoauth2, &[]);
    let server = start_one_connection_server(&world, port);
    let before = message("before-restart");
    world.send_as(&server, SCANNER, &before);
    let received = first.wait_for(1, DELIVERY_TIMEOUT);
    assert_delivered(
        &received[0],
        &before,
        Mechanism::Xoauth2,
        SCANS_ACCOUNT,
        "at-1",
    );
    // The upstream restarts, closing the session tsubame keeps open for the next
    // message, and at-1 has been revoked meanwhile.
    drop(first);
    let second = world.start_upstream_on(port, Mechanism::Xoauth2, &["--expired-token", "at-1"]);
    let after = message("after-restart");
    let id = world.send_as(&server, SCANNER, &after);
    let received = second.wait_for(1, DELIVERY_TIMEOUT);
    assert_delivered(
        &received[0],
        &after,
        Mechanism::Xoauth2,
        SCANS_ACCOUNT,
        "at-2",
    );
    assert_eq!(
        second.log_lines("auth.log"),
        vec![
            "XOAUTH2 wrong token; challenge answered b''".to_string(),
            xoauth2_accepted(SCANS_ACCOUNT, "at-2"),
        ]
    );
    assert_eq!(refresh_grants(&world.endpoint).len(), 2);
    let log = server.log();
    assert!(!log.contains(&format!("deferred id={id}")), "{log}");
    world.assert_no_secret_in(&log);
    server.stop();
}

/// Regression: the token cache counted refusals "in a row" across logins the upstream
/// had accepted, so a token that worked and was refused later counted as the second
/// refusal of a row; it backed off instead of fetching a fresh token at once, and the
/// mail waited for its next retry, logged as a scope or delegation problem.
#[test]
fn a_token_that_worked_and_is_refused_later_is_replaced_at_once() {
    let _limit = hard_limit(Duration::from_secs(120));
    let world = World::refresh_tokens(&[SCANS_ACCOUNT], &[SCANNER]);
    let port = free_port();
    // at-1 is refused at once, at-2 works: one refusal so far.
    let first = world.start_upstream_on(port, Mechanism::Xoauth2, &["--expired-token", "at-1"]);
    let server = start_one_connection_server(&world, port);
    let before = message("token-worked");
    world.send_as(&server, SCANNER, &before);
    let received = first.wait_for(1, DELIVERY_TIMEOUT);
    assert_delivered(
        &received[0],
        &before,
        Mechanism::Xoauth2,
        SCANS_ACCOUNT,
        "at-2",
    );
    // Later at-2, which worked, is refused too; the upstream restarts meanwhile, so
    // the next message needs a new session.
    drop(first);
    let second = world.start_upstream_on(
        port,
        Mechanism::Xoauth2,
        &["--expired-token", "at-1", "--expired-token", "at-2"],
    );
    let after = message("token-refused-later");
    let id = world.send_as(&server, SCANNER, &after);
    let received = second.wait_for(1, DELIVERY_TIMEOUT);
    assert_delivered(
        &received[0],
        &after,
        Mechanism::Xoauth2,
        SCANS_ACCOUNT,
        "at-3",
    );
    assert_eq!(
        second.log_lines("auth.log"),
        vec![
            "XOAUTH2 wrong token; challenge answered b''".to_string(),
            xoauth2_accepted(SCANS_ACCOUNT, "at-3"),
        ]
    );
    assert_eq!(refresh_grants(&world.endpoint).len(), 3);
    let log = server.log();
    assert!(!log.contains(&format!("deferred id={id}")), "{log}");
    assert!(!log.contains("keeps refusing"), "{log}");
    world.assert_no_secret_in(&log);
    server.stop();
}

/// `tsubame oauth test` logs in as an account without sending mail, and says why when it
/// cannot; `tsubame oauth status` lists the configuration's accounts with the running
/// server's token state.
#[test]
fn oauth_test_and_status_report_each_account() {
    let _limit = hard_limit(Duration::from_secs(120));
    let world = World::refresh_tokens(&[SCANS_ACCOUNT, DEFAULT_ACCOUNT], &[SCANNER]);
    let upstream = world.start_upstream(Mechanism::Xoauth2, &[]);
    let config_text = world.config(
        &world.gmail_upstream(upstream.port(), &[(SCANNER, SCANS_ACCOUNT)]),
        1,
    );
    let config_file = world.directory.path().join("tsubame.toml");
    std::fs::write(&config_file, &config_text).unwrap();
    let config_arg = config_file.display().to_string();

    let run = tsubame(&["oauth", "test", SCANS_ACCOUNT, "--config", &config_arg]);
    run.assert_code(0);
    let said = run.stdout_text();
    assert!(
        said.contains(&format!("as {SCANS_ACCOUNT}: accepted")) && said.contains("TLS"),
        "{}",
        run.describe()
    );
    assert_eq!(
        upstream.log_lines("auth.log"),
        vec![xoauth2_accepted(SCANS_ACCOUNT, "at-1")],
        "the test logged in once, with the account's first token"
    );
    assert!(upstream.received().is_empty(), "oauth test sent mail");
    world.assert_no_secret_in(&format!("{}{}", said, run.stderr_text()));

    // An account nobody authorised: no refresh token file, a clear failure.
    let run = tsubame(&[
        "oauth",
        "test",
        "nobody@example.com",
        "--config",
        &config_arg,
    ]);
    run.assert_code(1);
    let reason = run.stderr_text();
    assert!(
        reason.contains("login as nobody@example.com failed")
            && reason.contains("nobody@example.com.token"),
        "{}",
        run.describe()
    );

    // The running server writes its token state; status joins it to the configuration.
    let server = world.start_server(&config_text);
    world.send_as(&server, SCANNER, &message("oauth-status"));
    upstream.wait_for(1, DELIVERY_TIMEOUT);
    let spool = server.spool().display().to_string();
    let status = || {
        let run = tsubame(&[
            "oauth",
            "status",
            "--config",
            &config_arg,
            "--spool",
            &spool,
            "--json",
        ]);
        run.assert_code(0);
        serde_json::from_str::<Value>(&run.stdout_text()).unwrap()
    };
    let scans_state = |status: &Value| {
        status["accounts"]
            .as_array()
            .and_then(|accounts| {
                accounts
                    .iter()
                    .find(|account| account["account"] == SCANS_ACCOUNT)
                    .cloned()
            })
            .unwrap_or(Value::Null)
    };
    assert!(
        wait_until(
            Duration::from_secs(15),
            || scans_state(&status())["live"]["has_token"] == true
        ),
        "{}",
        status()
    );
    let listed = status();
    let scans = scans_state(&listed);
    assert_eq!(scans["refresh_token_file_present"], true, "{listed}");
    assert_eq!(scans["live"]["refresh_count"], 1, "{listed}");
    assert_eq!(scans["live"]["needs_reauthorization"], false, "{listed}");
    let default = listed["accounts"]
        .as_array()
        .and_then(|accounts| {
            accounts
                .iter()
                .find(|account| account["account"] == DEFAULT_ACCOUNT)
        })
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(default["refresh_token_file_present"], true, "{listed}");
    assert_eq!(
        default["live"],
        Value::Null,
        "unused since the start: {listed}"
    );
    let table = tsubame(&[
        "oauth",
        "status",
        "--config",
        &config_arg,
        "--spool",
        &spool,
    ]);
    table.assert_code(0);
    let table = table.stdout_text();
    assert!(
        table.contains(&format!(
            "gmail {SCANS_ACCOUNT} (oauth google), refresh token file present, token valid for"
        )),
        "{table}"
    );
    world.assert_no_secret_in(&table);
    world.assert_no_secret_in(
        &std::fs::read_to_string(server.spool().join("oauth-status.json")).unwrap(),
    );
    server.stop();
}
