//! Limits on logged-in devices and their clients: `[rate_limits]` per user and per
//! client address, answered with a 4xx and enhanced code 4.7.1 (never a 5xx: the client
//! keeps the message and tries later), and `[login_guard]`, the growing delay and then
//! the lockout after failed logins, per address and per user name.
//!
//! Small limits and short times keep every test within seconds; each delay and lockout
//! is checked by the clock, not only by the reply code.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use tsubame_tests::cli::inspect;
use tsubame_tests::peers::Smtplib;
use tsubame_tests::process::hard_limit;
use tsubame_tests::server::Server;
use tsubame_tests::smtp::Reply;
use tsubame_tests::tls_client::TlsClient;

use crate::login::{Fixture, OTHER_USER, USER, plain_response, start, test_password, user_entry};
use crate::{assert_spool_ids, test_message};

// ---------------------------------------------------------------------------------------
// 8. Rate limits

#[test]
fn per_user_messages_per_minute_refuses_the_third_message_at_mail() {
    let _limit = hard_limit(Duration::from_secs(120));
    let fixture = Fixture::new();
    let password = test_password("rate-user");
    let other_password = test_password("rate-other");
    let server = start(
        &format!("{}relay_networks = []\n", fixture.tls_keys()),
        &format!(
            "{}{}[rate_limits.per_user]\nmessages_per_minute = 2\n",
            user_entry(USER, &password, ""),
            user_entry(OTHER_USER, &other_password, "")
        ),
    );
    let messages: Vec<Vec<u8>> = (1..=3)
        .map(|number| test_message(&format!("rate-user-{number}"), "counted per user\n"))
        .collect();
    let mut session = Smtplib::new(server.address())
        .tls_ca(&fixture.ca())
        .starttls()
        .login(USER, &password);
    for message in &messages {
        session = session.sendmail(
            "scans@example.com",
            &["someone@remote.example"],
            message,
            &[],
        );
    }
    let outcomes = session.quit().run_to_end();
    outcomes[1].expect(235, "2.7.0", "login");
    for (index, outcome) in outcomes[2..4].iter().enumerate() {
        assert!(
            outcome.code == Some(250) && outcome.exception.is_none(),
            "message {} within the limit: {}",
            index + 1,
            outcome.raw
        );
    }
    assert_eq!(
        outcomes[4].exception.as_deref(),
        Some("SMTPSenderRefused"),
        "third message: {}",
        outcomes[4].raw
    );
    outcomes[4].expect(451, "4.7.1", "MAIL of the third message in a minute");

    // The limit is the user's, not the session's.
    let again = Smtplib::new(server.address())
        .tls_ca(&fixture.ca())
        .starttls()
        .login(USER, &password)
        .mail("scans@example.com", &[])
        .quit()
        .run_to_end();
    again[2].expect(451, "4.7.1", "MAIL in a new session of the same user");

    // Another user is not affected.
    let other = Smtplib::new(server.address())
        .tls_ca(&fixture.ca())
        .starttls()
        .login(OTHER_USER, &other_password)
        .sendmail(
            "printer@example.com",
            &["someone@remote.example"],
            &test_message("rate-other-user", "another user's budget\n"),
            &[],
        )
        .quit()
        .run_to_end();
    assert!(
        other[2].code == Some(250) && other[2].exception.is_none(),
        "the other user: {}",
        other[2].raw
    );

    // Exactly the accepted messages are spooled.
    let inspection = inspect(server.spool());
    assert_eq!(inspection.messages().len(), 3, "{}", inspection.json);
    server.stop();
}

#[test]
fn per_client_recipients_per_minute_refuses_the_fourth_recipient() {
    let _limit = hard_limit(Duration::from_secs(90));
    // A plain listener; loopback relays without logging in, counted per client address.
    let server = start("", "[rate_limits.per_client]\nrecipients_per_minute = 3\n");
    let message = test_message("rate-client", "three recipients are within the limit\n");
    let outcomes = Smtplib::new(server.address())
        .ehlo()
        .mail("device@example.com", &[])
        .rcpt("one@example.net", &[])
        .rcpt("two@example.net", &[])
        .rcpt("three@example.net", &[])
        .rcpt("four@example.net", &[])
        .data(&message)
        .mail("device@example.com", &[])
        .rcpt("five@example.net", &[])
        .quit()
        .run_to_end();
    outcomes[1].expect(250, "2.1.0", "MAIL");
    for outcome in &outcomes[2..5] {
        outcome.expect(250, "2.1.5", "RCPT within the limit");
    }
    // Four recipients in one transaction can never fit a limit of three: the client is
    // told to send the rest in another transaction (RFC 5321 §4.5.3.1.10), which the
    // limit then holds back (below).
    let refused = &outcomes[5];
    assert!(
        refused.code == Some(452) && refused.enhanced() == Some("4.5.3"),
        "the fourth recipient of one transaction: expected 452 4.5.3, got {}",
        refused.raw
    );
    outcomes[6].expect(250, "2.0.0", "DATA with the three accepted recipients");
    let id = outcomes[6].queued_id();
    outcomes[7].expect(250, "2.1.0", "MAIL of the next transaction");
    let next = &outcomes[8];
    assert!(
        matches!(next.code, Some(451 | 452)) && next.enhanced() == Some("4.7.1"),
        "a recipient in the next transaction of the same minute: {}",
        next.raw
    );
    assert_spool_ids(server.spool(), &[&id]);
    assert_eq!(
        inspect(server.spool()).expect_message(&id)["recipients"],
        serde_json::json!(["one@example.net", "two@example.net", "three@example.net"])
    );
    server.stop();
}

// ---------------------------------------------------------------------------------------
// The login guard

/// Small numbers: delays from the third failure on (600 ms, then 1200 ms), lockout on the
/// fourth for 4 s. The delay is far above an argon2 verification (tens of ms) so that it
/// cannot be mistaken for one; the lockout leaves room for the checks made during it
/// on a slow machine.
const LOGIN_GUARD: &str = "[login_guard]\ndelay_after_failures = 2\nlockout_after_failures = 4\n\
                           initial_delay_ms = 600\nmax_delay_ms = 2000\nlockout_secs = 4\n\
                           failure_window_secs = 60\n";
const INITIAL_DELAY: Duration = Duration::from_millis(600);
const LOCKOUT: Duration = Duration::from_secs(4);

/// One login attempt on a fresh connection (from `source` if given): STARTTLS, EHLO,
/// then AUTH PLAIN, timed from sending AUTH to its reply.
#[track_caller]
fn attempt(
    server: &Server,
    fixture: &Fixture,
    source: Option<IpAddr>,
    user: &str,
    password: &str,
) -> (Reply, Duration) {
    let mut options = fixture.client_options();
    if let Some(source) = source {
        options = options.source(source);
    }
    let mut client = TlsClient::connect(server.address(), &options);
    client.greeting();
    client.ehlo("device.tsubame.test");
    client.starttls();
    client.ehlo("device.tsubame.test");
    client.timed_command(&format!("AUTH PLAIN {}", plain_response(user, password)))
}

#[track_caller]
fn assert_locked(reply: &Reply, what: &str) {
    assert!(
        reply.is(454, "4.7.0"),
        "{what}: expected 454 4.7.0, got {reply}"
    );
    assert!(
        reply.text().to_ascii_lowercase().contains("failed login"),
        "{what}: the text should say there were too many failed logins: {reply}"
    );
}

/// A check made during the lockout must have been answered before it could end;
/// otherwise the machine is too slow for these numbers and the reply proves nothing.
#[track_caller]
fn assert_within_lockout(locked_at: Instant) {
    assert!(
        locked_at.elapsed() < LOCKOUT,
        "a check meant for the lockout came {:?} after it began, past its {LOCKOUT:?}",
        locked_at.elapsed()
    );
}

#[track_caller]
fn assert_invalid(reply: &Reply, what: &str) {
    assert!(
        reply.is(535, "5.7.8"),
        "{what}: expected 535 5.7.8, got {reply}"
    );
}

/// A server with the login guard (`LOGIN_GUARD`) and two users, `USER` and
/// `OTHER_USER`, with passwords made from `tag`; returns it and the two passwords.
fn start_guarded(fixture: &Fixture, tag: &str) -> (Server, String, String) {
    let password = test_password(tag);
    let other_password = test_password(&format!("{tag}-other"));
    let server = start(
        &fixture.tls_keys(),
        &format!(
            "{}{}{LOGIN_GUARD}",
            user_entry(USER, &password, ""),
            user_entry(OTHER_USER, &other_password, "")
        ),
    );
    (server, password, other_password)
}

#[test]
fn failed_logins_from_one_address_are_delayed_then_locked_out_until_the_lockout_ends() {
    let _limit = hard_limit(Duration::from_secs(120));
    let fixture = Fixture::new();
    let (server, password, other_password) = start_guarded(&fixture, "guard-address");
    let wrong = "not the password";
    let (reply, _) = attempt(&server, &fixture, None, USER, wrong);
    assert_invalid(&reply, "failure 1");
    let (reply, _) = attempt(&server, &fixture, None, USER, wrong);
    assert_invalid(&reply, "failure 2");
    // From delay_after_failures (2) on, each answer waits, and the wait grows.
    let (reply, third) = attempt(&server, &fixture, None, USER, wrong);
    assert_invalid(&reply, "failure 3");
    assert!(
        third >= INITIAL_DELAY,
        "failure 3 was answered after {third:?}, before the {INITIAL_DELAY:?} delay"
    );
    let (reply, fourth) = attempt(&server, &fixture, None, USER, wrong);
    assert_invalid(&reply, "failure 4");
    let locked_at = Instant::now();
    assert!(
        fourth >= INITIAL_DELAY * 2,
        "failure 4 was answered after {fourth:?}, before the doubled delay {:?}",
        INITIAL_DELAY * 2
    );

    // Locked: even the right password is refused, and so is another user from this
    // address (the address is locked as well as the name).
    let (reply, _) = attempt(&server, &fixture, None, USER, &password);
    assert_within_lockout(locked_at);
    assert_locked(&reply, "the right password during the lockout");
    let (reply, _) = attempt(&server, &fixture, None, OTHER_USER, &other_password);
    assert_within_lockout(locked_at);
    assert_locked(&reply, "another user from the locked address");

    // After lockout_secs the right password works again.
    std::thread::sleep(LOCKOUT.saturating_sub(locked_at.elapsed()) + Duration::from_millis(500));
    let (reply, _) = attempt(&server, &fixture, None, USER, &password);
    assert!(
        reply.is(235, "2.7.0"),
        "the right password after the lockout: {reply}"
    );
    server.stop();
}

#[test]
fn failed_logins_for_one_user_from_many_addresses_lock_that_user_out() {
    let _limit = hard_limit(Duration::from_secs(120));
    let fixture = Fixture::new();
    let (server, password, other_password) = start_guarded(&fixture, "guard-user");
    let address = |last: u8| Some(IpAddr::from([127, 0, 0, last]));
    // One failure from each address: only the user name's count reaches the limits.
    for (number, last) in (2..=5).enumerate() {
        let (reply, elapsed) = attempt(&server, &fixture, address(last), USER, "guessed");
        assert_invalid(
            &reply,
            &format!("failure {} from 127.0.0.{last}", number + 1),
        );
        if number >= 2 {
            assert!(
                elapsed >= INITIAL_DELAY,
                "failure {} (the user's) was answered after {elapsed:?}, before the delay",
                number + 1
            );
        }
    }
    let locked_at = Instant::now();
    let (reply, _) = attempt(&server, &fixture, address(6), USER, &password);
    assert_within_lockout(locked_at);
    assert_locked(&reply, "the locked user from a fresh address");
    // The fresh address is not locked: another user logs in from it.
    let (reply, _) = attempt(&server, &fixture, address(6), OTHER_USER, &other_password);
    assert!(
        reply.is(235, "2.7.0"),
        "another user from an address with no failures: {reply}"
    );
    std::thread::sleep(LOCKOUT.saturating_sub(locked_at.elapsed()) + Duration::from_millis(500));
    let (reply, _) = attempt(&server, &fixture, address(7), USER, &password);
    assert!(
        reply.is(235, "2.7.0"),
        "the user's right password after the lockout: {reply}"
    );
    server.stop();
}
