//! Daily quotas per upstream account and Google's quota replies, end to end: tsubame
//! between smtplib and two aiosmtpd upstreams (`tests/peers/upstream.py`), one the
//! other's `fallback`.

use std::time::Duration;

use tsubame_tests::cli::queue_list;
use tsubame_tests::process::hard_limit;
use tsubame_tests::server::{Server, ServerOptions};
use tsubame_tests::upstream::{Aiosmtpd, wait_until};

const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

/// `primary` (with `primary_keys`) and, when given, `fallback` named as its fallback.
fn config(primary: u16, primary_keys: &str, fallback: Option<u16>) -> String {
    let mut text = format!(
        "[[listener]]\naddress = \"127.0.0.1:2525\"\n\
         [delivery]\ndefault_upstream = \"primary\"\nretry_schedule_secs = [1]\n\
         [[upstream]]\nname = \"primary\"\nkind = \"smtp\"\nhost = \"127.0.0.1\"\nport = {primary}\n\
         tls = \"none\"\ntimeout_secs = 5\n{primary_keys}\n"
    );
    if let Some(port) = fallback {
        text.push_str(&format!(
            "fallback = \"spare\"\n\
             [[upstream]]\nname = \"spare\"\nkind = \"smtp\"\nhost = \"127.0.0.1\"\nport = {port}\n\
             tls = \"none\"\ntimeout_secs = 5\n"
        ));
    }
    text
}

fn message(subject: &str) -> Vec<u8> {
    crate::test_message(subject, &format!("body of {subject}\n"))
}

fn send(server: &Server, subject: &str) -> String {
    crate::send_with_smtplib(server.address(), &message(subject))
}

/// The messages in the queue, as (id, the first recipient's state).
fn queued(server: &Server) -> Vec<(String, String)> {
    queue_list(server.spool())["messages"]
        .as_array()
        .map(|messages| {
            messages
                .iter()
                .map(|message| {
                    (
                        message["id"].as_str().unwrap_or_default().to_string(),
                        message["recipients"][0]["state"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

const GOOGLE_QUOTA_REPLY: &str = "550 5.4.5 Daily user sending quota exceeded. Learn more at https://support.google.com/mail/?p=ReachedSendingLimit";

#[test]
fn a_quota_reply_sends_the_mail_through_the_fallback_and_never_bounces() {
    let _limit = hard_limit(Duration::from_secs(90));
    let primary = Aiosmtpd::start(&["--rcpt-reply", GOOGLE_QUOTA_REPLY]);
    let spare = Aiosmtpd::start(&[]);
    let server = Server::start(&ServerOptions::new().deliver().config(&config(
        primary.port(),
        "",
        Some(spare.port()),
    )));
    send(&server, "spill-on-reply");
    let received = spare.wait_for(1, DELIVERY_TIMEOUT);
    tsubame_tests::assert_bytes_eq(
        tsubame_tests::without_received(&received[0].content),
        &message("spill-on-reply"),
        "content at the fallback",
    );
    assert!(
        primary.received().is_empty(),
        "the primary refused every RCPT"
    );
    assert!(
        wait_until(DELIVERY_TIMEOUT, || queued(&server).is_empty()),
        "{:?}",
        queue_list(server.spool())
    );
    let log = server.log();
    assert!(log.contains("daily quota is spent"), "{log}");
    assert!(log.contains("sending it through the fallback"), "{log}");
    assert!(
        !log.contains("bounced"),
        "a quota reply bounced the mail:\n{log}"
    );
    // The account is blocked now: the next message goes to the fallback without asking
    // the primary again.
    let asked = primary.events().len();
    send(&server, "while-blocked");
    spare.wait_for(2, DELIVERY_TIMEOUT);
    assert_eq!(primary.events().len(), asked, "{:?}", primary.events());
    server.stop();
}

#[test]
fn without_a_fallback_a_quota_reply_defers() {
    let _limit = hard_limit(Duration::from_secs(90));
    let primary = Aiosmtpd::start(&["--rcpt-reply", GOOGLE_QUOTA_REPLY]);
    let server = Server::start(&ServerOptions::new().deliver().config(&config(
        primary.port(),
        "",
        None,
    )));
    let id = send(&server, "defer-on-reply");
    assert!(
        wait_until(DELIVERY_TIMEOUT, || queued(&server)
            == vec![(id.clone(), "deferred".to_string())]),
        "{:?}",
        queue_list(server.spool())
    );
    let log = server.log();
    assert!(!log.contains("bounced"), "{log}");
    // No bounce was made: the only message in the spool is the one sent.
    assert_eq!(queued(&server).len(), 1);
    server.stop();
}

#[test]
fn a_spent_daily_quota_spills_to_the_fallback_and_survives_a_restart() {
    let _limit = hard_limit(Duration::from_secs(120));
    let primary = Aiosmtpd::start(&[]);
    let spare = Aiosmtpd::start(&[]);
    let text = config(primary.port(), "messages_per_day = 2", Some(spare.port()));
    // Outlives both servers (a server's own spool goes with it).
    let directory = tempfile::tempdir().unwrap();
    let spool = directory.path().join("spool");
    let server = Server::start(&ServerOptions::new().deliver().config(&text).spool(&spool));
    for number in 1..=3 {
        send(&server, &format!("quota-{number}"));
        // One at a time, so the count is what decides, not the race between jobs.
        assert!(
            wait_until(DELIVERY_TIMEOUT, || primary.received().len()
                + spare.received().len()
                == number),
            "message {number}"
        );
    }
    assert_eq!(primary.received().len(), 2);
    assert_eq!(spare.received().len(), 1);
    server.stop();
    assert!(
        spool.join("quotas.json").exists(),
        "no quota file in {}",
        spool.display()
    );

    // The count survives the restart: the primary's quota is still spent.
    let restarted = Server::start(&ServerOptions::new().deliver().config(&text).spool(&spool));
    send(&restarted, "quota-after-restart");
    spare.wait_for(2, DELIVERY_TIMEOUT);
    assert_eq!(primary.received().len(), 2);
    restarted.stop();
}
