//! Never an open relay: clients outside `relay_networks` get `550 5.7.1` at RCPT.

use std::time::Duration;

use tsubame_tests::cli::inspect;
use tsubame_tests::peers::{Smtplib, swaks, swaks_queued_id};
use tsubame_tests::process::hard_limit;
use tsubame_tests::server::{Server, ServerOptions};

use crate::{assert_spool_ids, test_message};

#[test]
fn smtplib_client_outside_relay_networks_is_refused_at_rcpt() {
    let _limit = hard_limit(Duration::from_secs(60));
    let server = Server::start(
        &ServerOptions::new()
            .arg("--relay-network")
            .arg("127.0.0.1/32"),
    );
    let message = test_message("relay-smtplib", "relay test\n");

    let outcomes = Smtplib::new(server.address())
        .source("127.0.0.2")
        .ehlo()
        .mail("outsider@example.com", &[])
        .rcpt("victim@example.net", &[])
        .data(&message)
        .quit()
        .run();
    outcomes[1].expect(250, "2.1.0", "MAIL from 127.0.0.2");
    outcomes[2].expect(550, "5.7.1", "RCPT from 127.0.0.2");
    assert!(
        outcomes[3].code.is_some_and(|code| code >= 500),
        "DATA without an accepted recipient must fail: {:?}",
        outcomes[3]
    );
    let refused = Smtplib::new(server.address())
        .source("127.0.0.2")
        .sendmail(
            "outsider@example.com",
            &["victim@example.net"],
            &message,
            &[],
        )
        .run();
    assert_eq!(
        refused[0].exception.as_deref(),
        Some("SMTPRecipientsRefused"),
        "{:?}",
        refused[0]
    );
    assert_eq!(
        refused[0].raw["refused"]["victim@example.net"]["code"], 550,
        "{:?}",
        refused[0]
    );

    let id = {
        let outcomes = Smtplib::new(server.address())
            .source("127.0.0.1")
            .ehlo()
            .mail("insider@example.com", &[])
            .rcpt("friend@example.net", &[])
            .data(&message)
            .quit()
            .run();
        outcomes[2].expect(250, "2.1.5", "RCPT from 127.0.0.1");
        outcomes[3].expect(250, "2.0.0", "DATA from 127.0.0.1");
        outcomes[3].queued_id()
    };
    assert_spool_ids(server.spool(), &[&id]);
    let inspection = inspect(server.spool());
    let client = inspection.expect_message(&id)["client"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(client.starts_with("127.0.0.1:"), "client {client}");
}

#[test]
fn swaks_client_outside_relay_networks_is_refused_at_rcpt() {
    let _limit = hard_limit(Duration::from_secs(60));
    let server = Server::start(
        &ServerOptions::new()
            .arg("--relay-network")
            .arg("127.0.0.1/32"),
    );
    let address = server.address().to_string();
    let outsider = swaks(&[
        "--server",
        &address,
        "--local-interface",
        "127.0.0.2",
        "--from",
        "outsider@example.com",
        "--to",
        "victim@example.net",
    ]);
    assert_ne!(outsider.code(), Some(0), "{}", outsider.describe());
    let transcript = outsider.stdout_text();
    assert!(
        transcript
            .lines()
            .any(|line| line.starts_with("<** 550 5.7.1")),
        "swaks from 127.0.0.2 should see 550 5.7.1 at RCPT:\n{transcript}"
    );

    let insider = swaks(&[
        "--server",
        &address,
        "--local-interface",
        "127.0.0.1",
        "--from",
        "insider@example.com",
        "--to",
        "friend@example.net",
    ]);
    insider.assert_code(0);
    let id = swaks_queued_id(&insider.stdout_text());
    assert_spool_ids(server.spool(), &[&id]);
}

#[test]
fn relay_networks_from_the_config_file_apply() {
    let _limit = hard_limit(Duration::from_secs(60));
    // Only 127.0.0.2 may relay; `--listen` keeps the first listener's relay networks.
    let server =
        Server::start(&ServerOptions::new().config(
            "[[listener]]\naddress = \"127.0.0.1:0\"\nrelay_networks = [\"127.0.0.2/32\"]\n",
        ));
    let message = test_message("relay-config", "config relay test\n");
    let refused = Smtplib::new(server.address())
        .source("127.0.0.1")
        .ehlo()
        .mail("a@example.com", &[])
        .rcpt("b@example.net", &[])
        .quit()
        .run();
    refused[2].expect(550, "5.7.1", "RCPT from 127.0.0.1");
    let accepted = Smtplib::new(server.address())
        .source("127.0.0.2")
        .ehlo()
        .mail("a@example.com", &[])
        .rcpt("b@example.net", &[])
        .data(&message)
        .quit()
        .run();
    accepted[3].expect(250, "2.0.0", "DATA from 127.0.0.2");
    assert_spool_ids(server.spool(), &[&accepted[3].queued_id()]);
}
