//! The README's "Relay services" examples, end to end. Each block is taken as written
//! and only pointed at a local server: `host` and `port` name an aiosmtpd upstream
//! (`tests/peers/upstream.py`) that speaks the block's TLS mode with a certificate from
//! a throwaway CA, which `ca_file` names, and that accepts exactly the block's username
//! with a password made up here. The password goes where the block says: into the
//! environment variable it names, or into a file that takes the place of the one it
//! names. One message per block must arrive over TLS, logged in as that username.
//!
//! `crates/config` checks the same blocks against the services' documented settings;
//! this test checks that tsubame, given those settings, logs in and delivers.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use toml_edit::{DocumentMut, Item, Table, value};
use tsubame_tests::peers::Smtplib;
use tsubame_tests::pki::TestPki;
use tsubame_tests::process::hard_limit;
use tsubame_tests::server::{Server, ServerOptions};
use tsubame_tests::upstream::{Aiosmtpd, free_port};

/// Long enough for a delivery on a loaded CI machine; a healthy one takes milliseconds.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

/// The README blocks are fragments for a configuration that has its own listeners;
/// `serve --listen` replaces this one's address.
const LISTENER: &str = "[[listener]]\naddress = \"127.0.0.1:2525\"\n\n";

/// The `toml` blocks of the README's "Relay services" section.
fn readme_relay_service_blocks() -> Vec<String> {
    let readme = std::fs::read_to_string(tsubame_tests::workspace_directory().join("README.md"))
        .unwrap_or_else(|error| panic!("README.md: {error}"));
    let heading = "### Relay services";
    let start = readme
        .find(heading)
        .unwrap_or_else(|| panic!("README.md has no {heading:?} section"));
    let body = &readme[start + heading.len()..];
    let end = ["\n## ", "\n### "]
        .iter()
        .filter_map(|next| body.find(next))
        .min()
        .unwrap_or(body.len());
    body[..end]
        .split("```toml\n")
        .skip(1)
        .map(|rest| rest[..rest.find("```").expect("toml block end")].to_string())
        .collect()
}

/// Where a block takes its upstream password from.
#[derive(Debug)]
enum PasswordSource {
    Env(String),
    File,
}

/// What the test needs to know about one README block.
#[derive(Debug)]
struct Example {
    /// The block with the test's listener on top.
    document: DocumentMut,
    upstream: String,
    /// `required` or `implicit`: the TLS the local upstream must speak.
    tls: String,
    username: String,
    password: PasswordSource,
    /// An envelope sender and recipient whose mail the block sends to its upstream.
    sender: String,
    recipient: String,
}

fn string_of(table: &Table, key: &str) -> Option<String> {
    table.get(key).and_then(Item::as_str).map(str::to_string)
}

/// The first entry of a route's domain list as an address domain (`.example.com`
/// matches subdomains only, so it becomes `mail.example.com`).
fn first_domain(route: &Table, key: &str) -> Option<String> {
    let domain = route.get(key)?.as_array()?.iter().next()?.as_str()?;
    Some(match domain.strip_prefix('.') {
        Some(parent) => format!("mail.{parent}"),
        None => domain.to_string(),
    })
}

impl Example {
    #[track_caller]
    fn parse(block: &str) -> Example {
        let document: DocumentMut = format!("{LISTENER}{block}")
            .parse()
            .unwrap_or_else(|error| panic!("README block is not TOML: {error}\n{block}"));
        let upstreams = document
            .get("upstream")
            .and_then(Item::as_array_of_tables)
            .unwrap_or_else(|| panic!("README block without [[upstream]]:\n{block}"));
        let [upstream] = &upstreams.iter().collect::<Vec<_>>()[..] else {
            panic!("README block with more than one [[upstream]]:\n{block}");
        };
        let name = string_of(upstream, "name").expect("upstream name");
        assert_eq!(
            string_of(upstream, "kind").as_deref(),
            Some("smtp"),
            "{name}"
        );
        let tls = string_of(upstream, "tls").unwrap_or_else(|| "required".to_string());
        let username = string_of(upstream, "username")
            .unwrap_or_else(|| panic!("{name}: a relay service needs a username"));
        let password = match (
            string_of(upstream, "password_env"),
            upstream.contains_key("password_file"),
        ) {
            (Some(variable), false) => PasswordSource::Env(variable),
            (None, true) => PasswordSource::File,
            other => panic!("{name}: expected password_env or password_file, got {other:?}"),
        };
        let default = document
            .get("delivery")
            .and_then(|delivery| delivery.get("default_upstream"))
            .and_then(Item::as_str);
        let (sender, recipient) = if default == Some(name.as_str()) {
            (
                "device@example.com".to_string(),
                "rcpt@example.net".to_string(),
            )
        } else {
            let route = document
                .get("route")
                .and_then(Item::as_array_of_tables)
                .and_then(|routes| {
                    routes
                        .iter()
                        .find(|route| string_of(route, "upstream").as_deref() == Some(&name))
                })
                .unwrap_or_else(|| panic!("{name}: neither default_upstream nor a route"));
            assert!(
                !route.contains_key("client_networks") && !route.contains_key("users"),
                "{name}: the test sends from 127.0.0.1 without AUTH"
            );
            let sender_domain =
                first_domain(route, "sender_domains").unwrap_or_else(|| "example.com".into());
            let recipient_domain =
                first_domain(route, "recipient_domains").unwrap_or_else(|| "example.net".into());
            (
                format!("device@{sender_domain}"),
                format!("rcpt@{recipient_domain}"),
            )
        };
        Example {
            document,
            upstream: name,
            tls,
            username,
            password,
            sender,
            recipient,
        }
    }

    /// The block pointed at `upstream` on 127.0.0.1, trusting `ca`, with the password
    /// file (if it names one) replaced by `password_file`.
    fn pointed_at(&self, port: u16, ca: &Path, password_file: &Path) -> String {
        let mut document = self.document.clone();
        let upstream = document["upstream"]
            .as_array_of_tables_mut()
            .and_then(|upstreams| upstreams.get_mut(0))
            .expect("the upstream");
        upstream["host"] = value("127.0.0.1");
        upstream["port"] = value(i64::from(port));
        upstream["ca_file"] = value(ca.display().to_string());
        if matches!(self.password, PasswordSource::File) {
            upstream["password_file"] = value(password_file.display().to_string());
        }
        document.to_string()
    }
}

/// aiosmtpd with the PKI's certificate, speaking `tls` (`required`: STARTTLS, refusing
/// mail before it; `implicit`: TLS from the first byte) and accepting only this login.
fn local_upstream(pki: &TestPki, tls: &str, username: &str, password: &str) -> Aiosmtpd {
    let certificate = pki.certificate().display().to_string();
    let key = pki.key().display().to_string();
    let mut options = vec![
        "--cert",
        certificate.as_str(),
        "--key",
        key.as_str(),
        "--auth",
    ];
    match tls {
        "required" => options.extend(["--starttls", "--require-starttls"]),
        "implicit" => options.push("--implicit-tls"),
        other => panic!("a relay service example with tls = {other:?}: credentials need TLS"),
    }
    Aiosmtpd::start_with_env(
        SocketAddr::from(([127, 0, 0, 1], free_port())),
        &options,
        &[
            ("TSUBAME_TEST_SMTP_USERNAME", username),
            ("TSUBAME_TEST_SMTP_PASSWORD", password),
        ],
    )
}

#[test]
fn every_readme_relay_service_example_logs_in_over_tls_and_delivers() {
    let _limit = hard_limit(Duration::from_secs(180));
    let blocks = readme_relay_service_blocks();
    assert!(
        blocks.len() >= 4,
        "the README's Relay services section lost its examples"
    );
    let pki = TestPki::new();
    let scratch = tempfile::tempdir().unwrap();
    for (index, block) in blocks.iter().enumerate() {
        let example = Example::parse(block);
        let name = &example.upstream;
        // Made up for this run; never a real secret.
        let password = format!("{name}-pw-{}-{index}", std::process::id());
        let upstream = local_upstream(&pki, &example.tls, &example.username, &password);
        let password_file = scratch.path().join(format!("{name}.secret"));
        std::fs::write(&password_file, format!("{password}\n")).unwrap();
        let config = example.pointed_at(upstream.port(), &pki.ca(), &password_file);
        let mut options = ServerOptions::new().deliver().config(&config);
        if let PasswordSource::Env(variable) = &example.password {
            options = options.env(variable, &password);
        }
        let server = Server::start(&options);

        let content = tsubame_tests::crlf(&format!(
            "From: {}\nTo: {}\nSubject: through {name}\n\
             Message-Id: <{name}@relay-services.tsubame.test>\n\nvia the README example\n",
            example.sender, example.recipient
        ));
        let outcomes = Smtplib::new(server.address())
            .ehlo()
            .mail(&example.sender, &[])
            .rcpt(&example.recipient, &[])
            .data(&content)
            .quit()
            .run();
        outcomes
            .get(3)
            .unwrap_or_else(|| panic!("{name}: smtplib session ended early: {outcomes:?}"))
            .expect(250, "2.0.0", "DATA");

        let arrived = tsubame_tests::upstream::wait_until(DELIVERY_TIMEOUT, || {
            !upstream.received().is_empty()
        });
        assert!(
            arrived,
            "{name}: nothing arrived within {DELIVERY_TIMEOUT:?}\n--- config ---\n{config}\n\
             --- server log ---\n{}",
            server.log()
        );
        let received = upstream.received();
        let envelope = &received[0].envelope;
        tsubame_tests::assert_bytes_eq(
            tsubame_tests::without_received(&received[0].content),
            &content,
            &format!("{name}: content"),
        );
        assert_eq!(envelope["mail_from"], example.sender.as_str(), "{name}");
        assert_eq!(
            envelope["rcpt_tos"][0],
            example.recipient.as_str(),
            "{name}"
        );
        assert!(
            envelope["tls"].as_str().unwrap_or("").starts_with("TLSv1."),
            "{name}: not delivered over TLS: {envelope}"
        );
        // The peer accepts only this username with this password.
        assert_eq!(envelope["auth_login"], example.username.as_str(), "{name}");
        assert_eq!(envelope["auth_mechanism"], "PLAIN", "{name}: {envelope}");
        assert!(
            !server.log().contains(&password),
            "{name}: the password appears in the log"
        );
        server.stop();
    }
}
