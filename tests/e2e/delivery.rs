//! Delivery end to end: clients (smtplib, swaks) → tsubame → upstreams nobody here wrote
//! (aiosmtpd through `tests/peers/upstream.py`, Postfix's smtp-sink).

use std::time::Duration;

use serde_json::Value;
use tsubame_tests::cli::{queue_list, tsubame};
use tsubame_tests::peers::Smtplib;
use tsubame_tests::process::hard_limit;
use tsubame_tests::server::{Server, ServerOptions};
use tsubame_tests::upstream::{Aiosmtpd, SmtpSink, free_port, wait_until};

/// Long enough for a delivery on a loaded CI machine; a healthy one takes milliseconds.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

/// A config whose only upstream is `host:port` without TLS, retrying after 1 s.
pub fn upstream_config(port: u16, extra_upstream_keys: &str) -> String {
    format!(
        "[[listener]]\naddress = \"127.0.0.1:2525\"\n\
         [delivery]\ndefault_upstream = \"sink\"\nretry_schedule_secs = [1]\n\
         [[upstream]]\nname = \"sink\"\nkind = \"smtp\"\nhost = \"127.0.0.1\"\nport = {port}\n\
         tls = \"none\"\ntimeout_secs = 5\n{extra_upstream_keys}\n"
    )
}

/// A delivering server whose only upstream is `127.0.0.1:port` (`upstream_config`).
fn start_delivering_to(port: u16) -> Server {
    Server::start(
        &ServerOptions::new()
            .deliver()
            .config(&upstream_config(port, "")),
    )
}

fn message(subject: &str, body: &str) -> Vec<u8> {
    tsubame_tests::crlf(&format!(
        "From: sender@example.com\nTo: rcpt@example.net\nSubject: {subject}\n\
         Message-Id: <{subject}@delivery.tsubame.test>\n\n{body}"
    ))
}

#[track_caller]
pub fn send(server: &Server, from: &str, recipients: &[&str], content: &[u8]) -> String {
    let mut session = Smtplib::new(server.address()).ehlo().mail(from, &[]);
    for recipient in recipients {
        session = session.rcpt(recipient, &[]);
    }
    let outcomes = session.data(content).quit().run();
    let data = outcomes
        .get(2 + recipients.len())
        .unwrap_or_else(|| panic!("smtplib session ended early: {outcomes:?}"));
    data.expect(250, "2.0.0", "DATA");
    data.queued_id()
}

fn queued_messages(server: &Server) -> usize {
    queue_list(server.spool())["messages"]
        .as_array()
        .map_or(0, Vec::len)
}

#[test]
fn message_arrives_byte_exact_at_aiosmtpd() {
    let _limit = hard_limit(Duration::from_secs(90));
    let upstream = Aiosmtpd::start(&[]);
    let server = start_delivering_to(upstream.port());
    // Dot lines, 8-bit text, a long line: what the body must survive unchanged.
    let content = message(
        "byte-exact",
        "line one\n.starts with a dot\n..two dots\n.\nnot the end\nbjörk ünïcode\n",
    );
    let id = send(
        &server,
        "sender@example.com",
        &["rcpt@example.net"],
        &content,
    );
    let received = upstream.wait_for(1, DELIVERY_TIMEOUT);
    assert_eq!(received.len(), 1);
    tsubame_tests::assert_bytes_eq(
        tsubame_tests::without_received(&received[0].content),
        &content,
        "delivered content",
    );
    assert_eq!(received[0].mail_from(), "sender@example.com");
    assert_eq!(
        received[0].recipients(),
        vec!["rcpt@example.net".to_string()]
    );
    crate::assert_delivered_line(&server, &id, DELIVERY_TIMEOUT);
    assert!(wait_until(DELIVERY_TIMEOUT, || queued_messages(&server) == 0));
    server.stop();
}

#[test]
fn smtp_sink_receives_with_the_envelope_given_by_swaks() {
    let _limit = hard_limit(Duration::from_secs(90));
    let sink = SmtpSink::start();
    let server = Server::start(
        &ServerOptions::new()
            .deliver()
            .arg("--upstream")
            .arg(&format!("smtp://{}", sink.address())),
    );
    let run = tsubame_tests::peers::swaks(&[
        "--server",
        &server.address().to_string(),
        "--from",
        "device@example.com",
        "--to",
        "one@example.net,two@example.org",
        "--header",
        "Subject: via smtp-sink",
        "--body",
        "printed page attached",
    ]);
    run.assert_code(0);
    let expected = [
        "X-Mail-Args: <device@example.com>",
        "X-Rcpt-Args: <one@example.net>",
        "X-Rcpt-Args: <two@example.org>",
        "Subject: via smtp-sink",
        "printed page attached",
    ];
    // smtp-sink writes its dump file as the message arrives: wait for the whole of it,
    // not for the file (CI once read it empty).
    let complete = || {
        sink.dumps()
            .first()
            .is_some_and(|dump| expected.iter().all(|line| dump.contains(line)))
    };
    wait_until(DELIVERY_TIMEOUT, complete);
    let dumps = sink.dumps();
    let Some(dump) = dumps.first() else {
        panic!("smtp-sink received nothing:\n{}", server.log());
    };
    for expected in expected {
        assert!(
            dump.contains(expected),
            "{expected:?} missing from the dump:\n{dump}"
        );
    }
    server.stop();
}

#[test]
fn temporary_failure_then_acceptance_delivers_exactly_once() {
    let _limit = hard_limit(Duration::from_secs(90));
    let upstream = Aiosmtpd::start(&["--defer-first", "1"]);
    let server = start_delivering_to(upstream.port());
    let content = message("deferred-once", "first attempt gets 451\n");
    let id = send(
        &server,
        "sender@example.com",
        &["rcpt@example.net"],
        &content,
    );
    let received = upstream.wait_for(1, DELIVERY_TIMEOUT);
    tsubame_tests::assert_bytes_eq(
        tsubame_tests::without_received(&received[0].content),
        &content,
        "content after retry",
    );
    assert_eq!(
        upstream.events(),
        vec!["defer rcpt@example.net".to_string()]
    );
    assert!(server.log().contains(&format!("deferred id={id}")));
    // No second copy turns up.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(upstream.received().len(), 1, "delivered more than once");
    assert_eq!(queued_messages(&server), 0);
    server.stop();
}

#[test]
fn permanent_failure_bounces_a_dsn_to_the_sender() {
    let _limit = hard_limit(Duration::from_secs(90));
    let upstream = Aiosmtpd::start(&["--reject", "nobody@example.net"]);
    let server = start_delivering_to(upstream.port());
    let content = message("bounce-me", "one good, one bad recipient\n");
    let id = send(
        &server,
        "sender@example.com",
        &["good@example.net", "nobody@example.net"],
        &content,
    );
    // The original (for the good recipient) and the bounce (to the sender, from <>).
    let received = upstream.wait_for(2, DELIVERY_TIMEOUT);
    let original = received
        .iter()
        .find(|message| message.mail_from() == "sender@example.com")
        .unwrap_or_else(|| panic!("original not delivered: {received:?}"));
    assert_eq!(original.recipients(), vec!["good@example.net".to_string()]);
    let bounce = received
        .iter()
        .find(|message| message.mail_from().is_empty())
        .unwrap_or_else(|| panic!("no bounce with MAIL FROM:<> arrived: {received:?}"));
    assert_eq!(bounce.recipients(), vec!["sender@example.com".to_string()]);
    let text = bounce.text();
    for expected in [
        "Content-Type: multipart/report; report-type=delivery-status",
        "Final-Recipient: rfc822; nobody@example.net",
        "Action: failed",
        "Status: 5.1.1",
        "Diagnostic-Code: smtp; 550 5.1.1 <nobody@example.net>: no such user here",
        "Subject: bounce-me",
    ] {
        assert!(
            text.contains(expected),
            "{expected:?} missing from the bounce:\n{text}"
        );
    }
    assert!(
        !text.contains("Final-Recipient: rfc822; good@example.net"),
        "the delivered recipient must not be reported:\n{text}"
    );
    // The log line goes through the log writer thread; the bounce it announces can reach
    // the upstream first.
    assert!(
        wait_until(DELIVERY_TIMEOUT, || server
            .log()
            .contains(&format!("bounced id={id}"))),
        "no 'bounced id={id}' line:\n{}",
        server.log()
    );
    assert!(wait_until(DELIVERY_TIMEOUT, || queued_messages(&server) == 0));
    server.stop();
}

#[test]
fn a_null_sender_message_is_never_bounced() {
    let _limit = hard_limit(Duration::from_secs(90));
    let upstream = Aiosmtpd::start(&["--reject", "nobody@example.net"]);
    let server = start_delivering_to(upstream.port());
    let content = message("null-sender", "a bounce that bounces\n");
    let id = send(&server, "", &["nobody@example.net"], &content);
    assert!(
        wait_until(DELIVERY_TIMEOUT, || server
            .log()
            .contains(&format!("bounced id={id}"))),
        "{}",
        server.log()
    );
    assert!(wait_until(DELIVERY_TIMEOUT, || queued_messages(&server) == 0));
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        upstream.received().is_empty(),
        "something was sent for a null-sender failure"
    );
    assert!(!server.log().contains("bounce queued"), "{}", server.log());
    server.stop();
}

#[test]
fn hanging_upstream_times_out_and_the_message_is_delivered_when_it_answers() {
    let _limit = hard_limit(Duration::from_secs(90));
    // The first transaction stalls for 20 s; tsubame's timeout for this upstream is 2 s.
    let upstream = Aiosmtpd::start(&["--hang-first", "1", "--hang-secs", "20"]);
    let config =
        upstream_config(upstream.port(), "").replace("timeout_secs = 5", "timeout_secs = 2");
    let server = Server::start(&ServerOptions::new().deliver().config(&config));
    let content = message("hang", "the upstream stalls first\n");
    let id = send(
        &server,
        "sender@example.com",
        &["rcpt@example.net"],
        &content,
    );
    let received = upstream.wait_for(1, DELIVERY_TIMEOUT);
    tsubame_tests::assert_bytes_eq(
        tsubame_tests::without_received(&received[0].content),
        &content,
        "content after the stall",
    );
    let log = server.log();
    assert!(
        log.contains(&format!("deferred id={id}")) && log.contains("timed out"),
        "the stall must show as a timeout and a deferral:\n{log}"
    );
    server.stop();
}

#[test]
fn upstream_down_then_up_is_delivered_and_queue_commands_see_it() {
    let _limit = hard_limit(Duration::from_secs(120));
    let port = free_port();
    // A long retry delay: only `queue flush` makes the next attempt happen soon.
    let config = upstream_config(port, "")
        .replace("retry_schedule_secs = [1]", "retry_schedule_secs = [600]");
    let server = Server::start(&ServerOptions::new().deliver().config(&config));
    let content = message("down-up", "nobody listens yet\n");
    let id = send(
        &server,
        "sender@example.com",
        &["rcpt@example.net"],
        &content,
    );
    assert!(wait_until(DELIVERY_TIMEOUT, || {
        queue_list(server.spool())["messages"][0]["recipients"][0]["state"] == "deferred"
    }));
    let list = queue_list(server.spool());
    assert_eq!(list["messages"][0]["id"], id.as_str());
    let last = list["messages"][0]["recipients"][0]["last_reply"]
        .as_str()
        .unwrap_or("");
    assert!(
        last.contains("refused"),
        "last reply should say the connection was refused: {last}"
    );
    let spool = server.spool().display().to_string();
    let show = tsubame(&["queue", "show", &id, "--spool", &spool]);
    show.assert_code(0);
    assert!(
        show.stdout_text().contains("rcpt@example.net"),
        "{}",
        show.describe()
    );
    let unknown = tsubame(&["queue", "show", "00000000000000ff", "--spool", &spool]);
    unknown.assert_code(1);
    assert!(
        unknown.stderr_text().contains("not queued"),
        "{}",
        unknown.describe()
    );

    let upstream = Aiosmtpd::start_on(std::net::SocketAddr::from(([127, 0, 0, 1], port)), &[]);
    tsubame(&["queue", "flush", "--spool", &spool]).assert_code(0);
    let received = upstream.wait_for(1, DELIVERY_TIMEOUT);
    tsubame_tests::assert_bytes_eq(
        tsubame_tests::without_received(&received[0].content),
        &content,
        "content after the upstream came up",
    );
    assert!(wait_until(DELIVERY_TIMEOUT, || queued_messages(&server) == 0));
    server.stop();
}

#[test]
fn queue_delete_removes_a_message_without_delivering_it() {
    let _limit = hard_limit(Duration::from_secs(90));
    let port = free_port();
    let config = upstream_config(port, "")
        .replace("retry_schedule_secs = [1]", "retry_schedule_secs = [600]");
    let server = Server::start(&ServerOptions::new().deliver().config(&config));
    let id = send(
        &server,
        "sender@example.com",
        &["rcpt@example.net"],
        &message("delete", "x\n"),
    );
    assert!(wait_until(DELIVERY_TIMEOUT, || queued_messages(&server) == 1));
    let spool = server.spool().display().to_string();
    let deleted = tsubame(&["queue", "delete", &id, "--spool", &spool, "--json"]);
    deleted.assert_code(0);
    let answer: Value = serde_json::from_str(&deleted.stdout_text()).unwrap();
    assert_eq!(answer["status"], "deleted");
    assert_eq!(answer["id"], id.as_str());
    assert_eq!(queued_messages(&server), 0);
    let upstream = Aiosmtpd::start_on(std::net::SocketAddr::from(([127, 0, 0, 1], port)), &[]);
    tsubame(&["queue", "flush", "--spool", &spool]).assert_code(0);
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        upstream.received().is_empty(),
        "a deleted message was delivered"
    );
    // The deletion is journalled: a restart does not bring it back.
    let spool_path = server.spool().to_path_buf();
    server.stop();
    let restarted = Server::start(
        &ServerOptions::new()
            .deliver()
            .config(&config)
            .spool(&spool_path),
    );
    assert_eq!(queued_messages(&restarted), 0);
    restarted.stop();
}

#[test]
fn held_messages_wait_across_a_restart_until_released_and_filters_choose_them() {
    let _limit = hard_limit(Duration::from_secs(120));
    let port = free_port();
    let config = upstream_config(port, "")
        .replace("retry_schedule_secs = [1]", "retry_schedule_secs = [600]");
    let spool_directory = tempfile::tempdir().expect("temporary directory");
    let options = ServerOptions::new()
        .deliver()
        .config(&config)
        .spool(spool_directory.path());
    let server = Server::start(&options);
    for (subject, to) in [
        ("hold-a1", "one@a.example"),
        ("hold-a2", "two@a.example"),
        ("free-b", "three@b.example"),
    ] {
        send(
            &server,
            "sender@example.com",
            &[to],
            &message(subject, "x\n"),
        );
    }
    assert!(wait_until(DELIVERY_TIMEOUT, || queued_messages(&server) == 3));
    let spool = spool_directory.path().display().to_string();
    let queue = |arguments: &[&str]| {
        let mut all = vec!["queue"];
        all.extend_from_slice(arguments);
        all.extend_from_slice(&["--spool", &spool]);
        tsubame(&all)
    };
    // The control socket takes at most 1000 ids per request, and a full request fits
    // in its line limit.
    let raw = |count: usize| {
        let script = format!(
            "import json, socket, sys\n\
             s = socket.socket(socket.AF_UNIX)\n\
             s.connect(sys.argv[1])\n\
             ids = ['%016x' % (0xf000000000000000 + n) for n in range({count})]\n\
             s.sendall((json.dumps({{'command': 'apply', 'action': 'hold', 'ids': ids}}) + '\\n').encode())\n\
             print(s.makefile().readline())"
        );
        let socket = spool_directory.path().join("control.sock");
        let output = std::process::Command::new("python3")
            .args(["-c", &script])
            .arg(&socket)
            .output()
            .expect("python3");
        let answer: Value =
            serde_json::from_slice(&output.stdout).unwrap_or_else(|_| panic!("{output:?}"));
        answer
    };
    let full = raw(1000);
    assert_eq!(full["status"], "applied", "{full}");
    assert_eq!(full["missing"].as_array().map(Vec::len), Some(1000));
    let over = raw(1001);
    assert_eq!(over["status"], "error", "{over}");
    assert!(
        over["message"]
            .as_str()
            .unwrap_or("")
            .contains("at most 1000"),
        "{over}"
    );
    // Nothing chosen: refused, nothing held.
    let refused = queue(&["hold"]);
    assert_eq!(refused.code(), Some(1), "{}", refused.describe());
    assert!(
        refused.stderr_text().contains("--all"),
        "{}",
        refused.describe()
    );
    let held = queue(&["hold", "--recipient-domain", "A.example"]);
    held.assert_code(0);
    assert!(
        held.stdout_text().contains("held 2 message(s)"),
        "{}",
        held.describe()
    );
    let listed = |status: &str| -> Vec<String> {
        let run = queue(&["list", "--status", status, "--json"]);
        run.assert_code(0);
        let answer: Value = serde_json::from_str(&run.stdout_text()).expect("json");
        answer["messages"]
            .as_array()
            .map(|messages| {
                messages
                    .iter()
                    .flat_map(|m| m["recipients"].as_array().cloned().unwrap_or_default())
                    .map(|r| r["address"].as_str().unwrap_or("").to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut on_hold = listed("held");
    on_hold.sort();
    assert_eq!(on_hold, ["one@a.example", "two@a.example"]);

    // The upstream comes up; a flush sends only what is not held.
    let upstream = Aiosmtpd::start_on(std::net::SocketAddr::from(([127, 0, 0, 1], port)), &[]);
    queue(&["flush"]).assert_code(0);
    let received = upstream.wait_for(1, DELIVERY_TIMEOUT);
    std::thread::sleep(Duration::from_secs(2));
    let received_now = upstream.received();
    assert_eq!(received_now.len(), 1, "a held message was delivered");
    assert_eq!(received[0].recipients(), ["three@b.example"]);

    // Holds outlast a restart.
    server.stop();
    let server = Server::start(&options);
    let mut on_hold = listed("held");
    on_hold.sort();
    assert_eq!(on_hold, ["one@a.example", "two@a.example"]);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        upstream.received().len(),
        1,
        "a held message left after the restart"
    );

    // An unknown id is an error; releasing by filter, then a flush, sends them.
    let unknown = queue(&["release", "ffffffffffffffff"]);
    assert_eq!(unknown.code(), Some(1), "{}", unknown.describe());
    let released = queue(&["release", "--status", "held"]);
    released.assert_code(0);
    assert!(
        released.stdout_text().contains("released 2 message(s)"),
        "{}",
        released.describe()
    );
    queue(&["flush"]).assert_code(0);
    let received = upstream.wait_for(3, DELIVERY_TIMEOUT);
    assert_eq!(received.len(), 3);
    assert!(wait_until(DELIVERY_TIMEOUT, || queued_messages(&server) == 0));
    server.stop();
}

#[test]
fn recipients_on_two_routes_go_to_their_own_upstreams() {
    let _limit = hard_limit(Duration::from_secs(90));
    let corporate = Aiosmtpd::start(&[]);
    let everything_else = Aiosmtpd::start(&[]);
    let config = format!(
        "{}\n[[upstream]]\nname = \"corp\"\nkind = \"smtp\"\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\n\
         [[route]]\nrecipient_domains = [\"corp.example\"]\nupstream = \"corp\"\n",
        upstream_config(everything_else.port(), ""),
        corporate.port()
    );
    let server = Server::start(&ServerOptions::new().deliver().config(&config));
    let content = message("two-routes", "split me\n");
    send(
        &server,
        "sender@example.com",
        &[
            "alice@corp.example",
            "bob@elsewhere.example",
            "carol@CORP.example",
        ],
        &content,
    );
    let corporate_received = corporate.wait_for(1, DELIVERY_TIMEOUT);
    let other_received = everything_else.wait_for(1, DELIVERY_TIMEOUT);
    assert_eq!(
        corporate_received[0].recipients(),
        vec![
            "alice@corp.example".to_string(),
            "carol@CORP.example".to_string()
        ]
    );
    assert_eq!(
        other_received[0].recipients(),
        vec!["bob@elsewhere.example".to_string()]
    );
    tsubame_tests::assert_bytes_eq(
        tsubame_tests::without_received(&corporate_received[0].content),
        &content,
        "corp copy",
    );
    tsubame_tests::assert_bytes_eq(
        tsubame_tests::without_received(&other_received[0].content),
        &content,
        "other copy",
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        corporate.received().len() + everything_else.received().len(),
        2
    );
    server.stop();
}

/// The zone for the MX tests: `pref.test` has two MX hosts (10 → 127.0.0.2, 20 →
/// 127.0.0.1); `implicit.test` has only an A record; `nullmx.test` publishes a null MX
/// (RFC 7505); anything else does not exist.
const ZONE: &str = "\
pref.test. 60 IN MX 10 mx1.pref.test.
pref.test. 60 IN MX 20 mx2.pref.test.
mx1.pref.test. 60 IN A 127.0.0.2
mx2.pref.test. 60 IN A 127.0.0.1
implicit.test. 60 IN A 127.0.0.1
nullmx.test. 60 IN MX 0 .
";

fn mx_config(nameserver: std::net::SocketAddr, port: u16) -> String {
    format!(
        "[[listener]]\naddress = \"127.0.0.1:2525\"\n\
         [delivery]\ndefault_upstream = \"direct\"\nretry_schedule_secs = [1]\n\
         [[upstream]]\nname = \"direct\"\nkind = \"mx\"\nport = {port}\ntls = \"none\"\n\
         nameserver = \"{nameserver}\"\ntimeout_secs = 5\n"
    )
}

#[test]
fn mx_lookup_uses_the_preferred_host_when_it_answers() {
    let _limit = hard_limit(Duration::from_secs(90));
    let dns = tsubame_tests::dns::DnsZone::start(ZONE);
    let port = free_port();
    let preferred = Aiosmtpd::start_on(std::net::SocketAddr::from(([127, 0, 0, 2], port)), &[]);
    let backup = Aiosmtpd::start_on(std::net::SocketAddr::from(([127, 0, 0, 1], port)), &[]);
    let server = Server::start(
        &ServerOptions::new()
            .deliver()
            .config(&mx_config(dns.address(), port)),
    );
    let content = message("mx-preferred", "to the lowest preference\n");
    send(&server, "sender@pref.test", &["rcpt@pref.test"], &content);
    let received = preferred.wait_for(1, DELIVERY_TIMEOUT);
    tsubame_tests::assert_bytes_eq(
        tsubame_tests::without_received(&received[0].content),
        &content,
        "content at mx1",
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        backup.received().is_empty(),
        "the backup MX got mail while mx1 answered"
    );
    server.stop();
}

#[test]
fn mx_lookup_falls_back_to_the_next_host_and_to_the_address_record() {
    let _limit = hard_limit(Duration::from_secs(90));
    let dns = tsubame_tests::dns::DnsZone::start(ZONE);
    let port = free_port();
    // Nothing listens on mx1 (127.0.0.2): the connection is refused, mx2 takes it.
    let backup = Aiosmtpd::start_on(std::net::SocketAddr::from(([127, 0, 0, 1], port)), &[]);
    let server = Server::start(
        &ServerOptions::new()
            .deliver()
            .config(&mx_config(dns.address(), port)),
    );
    let first = message("mx-fallback", "mx1 is down\n");
    send(&server, "sender@pref.test", &["rcpt@pref.test"], &first);
    let received = backup.wait_for(1, DELIVERY_TIMEOUT);
    tsubame_tests::assert_bytes_eq(
        tsubame_tests::without_received(&received[0].content),
        &first,
        "content at mx2",
    );
    // A domain without MX records is its own mail host (RFC 5321 §5.1).
    let second = message("mx-implicit", "no MX, an A record\n");
    send(
        &server,
        "sender@pref.test",
        &["rcpt@implicit.test"],
        &second,
    );
    let received = backup.wait_for(2, DELIVERY_TIMEOUT);
    assert_eq!(
        received[1].recipients(),
        vec!["rcpt@implicit.test".to_string()]
    );
    server.stop();
}

#[test]
fn mx_permanent_dns_failures_bounce_with_the_reason() {
    let _limit = hard_limit(Duration::from_secs(90));
    let dns = tsubame_tests::dns::DnsZone::start(ZONE);
    let port = free_port();
    let sender_host = Aiosmtpd::start_on(std::net::SocketAddr::from(([127, 0, 0, 1], port)), &[]);
    let server = Server::start(
        &ServerOptions::new()
            .deliver()
            .config(&mx_config(dns.address(), port)),
    );
    send(
        &server,
        "sender@implicit.test",
        &["a@nowhere.test", "b@nullmx.test"],
        &message("mx-bounce", "two undeliverable domains\n"),
    );
    // One bounce, delivered to the sender's domain, naming both recipients.
    let received = sender_host.wait_for(1, DELIVERY_TIMEOUT);
    let bounce = &received[0];
    assert_eq!(bounce.mail_from(), "");
    assert_eq!(
        bounce.recipients(),
        vec!["sender@implicit.test".to_string()]
    );
    let text = bounce.text();
    for expected in ["a@nowhere.test", "5.1.2", "b@nullmx.test", "5.1.10"] {
        assert!(
            text.contains(expected),
            "{expected:?} missing from the bounce:\n{text}"
        );
    }
    server.stop();
}

/// A login made up for one test (never a real secret).
fn generated_login() -> (String, String) {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos());
    (
        format!("device{}", nanos % 1000),
        format!("pw-{nanos:x}-{}", std::process::id()),
    )
}

/// aiosmtpd with the test PKI's certificate and the given TLS flags (`--starttls`,
/// `--require-starttls`, `--implicit-tls`), requiring `login` (AUTH) when given.
pub fn tls_upstream(
    pki: &tsubame_tests::pki::TestPki,
    tls_flags: &[&str],
    login: Option<&(String, String)>,
) -> Aiosmtpd {
    let certificate = pki.certificate().display().to_string();
    let key = pki.key().display().to_string();
    let mut options = vec!["--cert", certificate.as_str(), "--key", key.as_str()];
    options.extend_from_slice(tls_flags);
    let mut environment = Vec::new();
    if let Some((username, password)) = login {
        options.push("--auth");
        environment.push(("TSUBAME_TEST_SMTP_USERNAME", username.as_str()));
        environment.push(("TSUBAME_TEST_SMTP_PASSWORD", password.as_str()));
    }
    Aiosmtpd::start_with_env(
        std::net::SocketAddr::from(([127, 0, 0, 1], free_port())),
        &options,
        &environment,
    )
}

/// The one-upstream config with TLS `mode`, the test CA, and `username` whose password
/// comes from the environment variable UPSTREAM_PASSWORD.
fn tls_upstream_config(
    port: u16,
    mode: &str,
    pki: &tsubame_tests::pki::TestPki,
    username: &str,
) -> String {
    upstream_config(port, "").replace(
        "tls = \"none\"",
        &format!(
            "tls = \"{mode}\"\nca_file = \"{}\"\nusername = \"{username}\"\npassword_env = \"UPSTREAM_PASSWORD\"",
            pki.ca().display()
        ),
    )
}

#[test]
fn starttls_required_with_auth_against_aiosmtpd() {
    let _limit = hard_limit(Duration::from_secs(90));
    let pki = tsubame_tests::pki::TestPki::new();
    let login = generated_login();
    let (username, password) = &login;
    let upstream = tls_upstream(&pki, &["--starttls", "--require-starttls"], Some(&login));
    let config = tls_upstream_config(upstream.port(), "required", &pki, username);
    let server = Server::start(
        &ServerOptions::new()
            .deliver()
            .config(&config)
            .env("UPSTREAM_PASSWORD", password),
    );
    let content = message("starttls-auth", "over TLS, logged in\n");
    send(
        &server,
        "sender@example.com",
        &["rcpt@example.net"],
        &content,
    );
    let received = upstream.wait_for(1, DELIVERY_TIMEOUT);
    tsubame_tests::assert_bytes_eq(
        tsubame_tests::without_received(&received[0].content),
        &content,
        "content over STARTTLS",
    );
    let tls = received[0].envelope["tls"].as_str().unwrap_or("");
    assert!(
        tls.starts_with("TLSv1."),
        "not delivered over TLS: {}",
        received[0].envelope
    );
    assert_eq!(received[0].envelope["auth_login"], username.as_str());
    assert!(
        !server.log().contains(password.as_str()),
        "the password appears in the log"
    );
    server.stop();
}

#[test]
fn implicit_tls_with_auth_and_a_wrong_password_defers_until_fixed() {
    let _limit = hard_limit(Duration::from_secs(90));
    let pki = tsubame_tests::pki::TestPki::new();
    let login = generated_login();
    let (username, password) = &login;
    let upstream = tls_upstream(&pki, &["--implicit-tls"], Some(&login));
    // smtps:// verifies the certificate against the public roots, which do not know the
    // test CA: the config names the CA, and --upstream is not used here.
    let config = tls_upstream_config(upstream.port(), "implicit", &pki, username);
    let spool = tempfile::tempdir().unwrap();
    let wrong = Server::start(
        &ServerOptions::new()
            .deliver()
            .config(&config)
            .spool(spool.path())
            .env("UPSTREAM_PASSWORD", "not-the-password"),
    );
    let content = message("implicit-tls", "over implicit TLS\n");
    let id = send(
        &wrong,
        "sender@example.com",
        &["rcpt@example.net"],
        &content,
    );
    assert!(
        wait_until(DELIVERY_TIMEOUT, || wrong
            .log()
            .contains(&format!("deferred id={id}"))),
        "a refused login must defer, not bounce:\n{}",
        wrong.log()
    );
    assert!(!wrong.log().contains("not-the-password"));
    assert!(!wrong.log().contains("bounced"), "{}", wrong.log());
    wrong.stop();
    // The right password: the queued message goes out at the next start.
    let right = Server::start(
        &ServerOptions::new()
            .deliver()
            .config(&config)
            .spool(spool.path())
            .env("UPSTREAM_PASSWORD", password),
    );
    assert!(
        wait_until(DELIVERY_TIMEOUT, || !upstream.received().is_empty()),
        "not delivered after the restart with the right password:\n{}",
        right.log()
    );
    let received = upstream.received();
    tsubame_tests::assert_bytes_eq(
        tsubame_tests::without_received(&received[0].content),
        &content,
        "content over implicit TLS",
    );
    assert!(
        received[0].envelope["tls"]
            .as_str()
            .unwrap_or("")
            .starts_with("TLSv1.")
    );
    right.stop();
}

#[test]
fn opportunistic_tls_encrypts_when_offered_even_with_an_unverifiable_certificate() {
    let _limit = hard_limit(Duration::from_secs(90));
    let pki = tsubame_tests::pki::TestPki::new();
    let upstream = tls_upstream(&pki, &["--starttls"], None);
    // smtp:// is opportunistic STARTTLS; the test CA is unknown to tsubame here.
    let server = Server::start(
        &ServerOptions::new()
            .deliver()
            .arg("--upstream")
            .arg(&format!("smtp://{}", upstream.address())),
    );
    let content = message("opportunistic", "encrypted, not authenticated\n");
    send(
        &server,
        "sender@example.com",
        &["rcpt@example.net"],
        &content,
    );
    let received = upstream.wait_for(1, DELIVERY_TIMEOUT);
    assert!(
        received[0].envelope["tls"]
            .as_str()
            .unwrap_or("")
            .starts_with("TLSv1."),
        "opportunistic TLS did not encrypt: {}",
        received[0].envelope
    );
    server.stop();
}

#[test]
fn required_tls_never_sends_to_an_upstream_without_starttls() {
    let _limit = hard_limit(Duration::from_secs(90));
    let upstream = Aiosmtpd::start(&[]);
    let server = Server::start(
        &ServerOptions::new()
            .deliver()
            .arg("--upstream")
            .arg(&format!("smtp+starttls://{}", upstream.address())),
    );
    let id = send(
        &server,
        "sender@example.com",
        &["rcpt@example.net"],
        &message("no-tls", "x\n"),
    );
    assert!(
        wait_until(DELIVERY_TIMEOUT, || server
            .log()
            .contains(&format!("deferred id={id}"))),
        "{}",
        server.log()
    );
    assert!(server.log().contains("STARTTLS"), "{}", server.log());
    assert!(
        upstream.received().is_empty(),
        "mail went out in clear to a TLS-required upstream"
    );
    server.stop();
}

/// The spool's segment files.
fn segment_files(spool: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(spool)
        .unwrap()
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".segment"))
        .collect();
    names.sort();
    names
}

#[test]
fn delivered_segments_are_reclaimed_so_the_spool_does_not_grow() {
    let _limit = hard_limit(Duration::from_secs(180));
    let upstream = Aiosmtpd::start(&[]);
    let spool = tempfile::tempdir().unwrap();
    // 1 MiB segments (the smallest allowed): 400 messages of 10 KiB fill several.
    let config = format!(
        "{}\n[spool]\nsegment_size_bytes = 1048576\n",
        upstream_config(upstream.port(), "")
    );
    let server = Server::start(
        &ServerOptions::new()
            .deliver()
            .config(&config)
            .spool(spool.path()),
    );
    let run = tsubame(&[
        "bench",
        "--target",
        &server.address().to_string(),
        "-n",
        "400",
        "-s",
        "10240",
        "-c",
        "4",
        "--quiet",
    ]);
    assert_eq!(run.code(), Some(0), "{}", run.describe());
    upstream.wait_for(400, Duration::from_secs(90));
    assert!(wait_until(DELIVERY_TIMEOUT, || queued_messages(&server) == 0));
    // At most the active segment and the spare remain once reclaim has run.
    let reclaimed = wait_until(DELIVERY_TIMEOUT, || segment_files(spool.path()).len() <= 2);
    assert!(
        reclaimed,
        "segments left after everything was delivered: {:?}\n{}",
        segment_files(spool.path()),
        server.log()
    );
    assert!(
        server.log().contains("spool segments reclaimed"),
        "{}",
        server.log()
    );
    server.stop();
    // After a restart the old active segment is sealed; it holds only finished
    // messages, so the first reclaim pass removes it too.
    let before = segment_files(spool.path());
    assert!(!before.is_empty());
    let restarted = Server::start(
        &ServerOptions::new()
            .deliver()
            .config(&config)
            .spool(spool.path()),
    );
    let gone = wait_until(DELIVERY_TIMEOUT, || {
        segment_files(spool.path())
            .iter()
            .all(|name| !before.contains(name))
    });
    assert!(
        gone,
        "segments from before the restart survived: before {before:?}, now {:?}",
        segment_files(spool.path())
    );
    assert_eq!(queued_messages(&restarted), 0);
    restarted.stop();
}

#[test]
fn a_quoted_local_part_with_a_space_is_delivered_with_its_neighbours() {
    let _limit = hard_limit(Duration::from_secs(90));
    let upstream = Aiosmtpd::start(&[]);
    let server = start_delivering_to(upstream.port());
    let content = message(
        "quoted-local-part",
        "RFC 5321 allows a space between quotes\n",
    );
    send(
        &server,
        "sender@example.com",
        &["\"john doe\"@example.net", "plain@example.net"],
        &content,
    );
    let received = upstream.wait_for(1, DELIVERY_TIMEOUT);
    assert_eq!(
        received[0].recipients(),
        vec![
            "\"john doe\"@example.net".to_string(),
            "plain@example.net".to_string()
        ],
        "{:?}",
        received[0]
    );
    server.stop();
}

#[test]
fn credentials_never_go_to_an_unverified_server_even_with_opportunistic_tls() {
    let _limit = hard_limit(Duration::from_secs(90));
    let pki = tsubame_tests::pki::TestPki::new();
    let login = generated_login();
    let (username, password) = &login;
    // The upstream's certificate is signed by a CA tsubame does not know.
    let upstream = tls_upstream(&pki, &["--starttls"], Some(&login));
    // smtp:// is opportunistic; with a login it must verify the server anyway.
    let server = Server::start(
        &ServerOptions::new()
            .deliver()
            .arg("--upstream")
            .arg(&format!("smtp://{username}@{}", upstream.address()))
            .env("TSUBAME_UPSTREAM_PASSWORD", password),
    );
    let id = send(
        &server,
        "sender@example.com",
        &["rcpt@example.net"],
        &message("no-leak", "x\n"),
    );
    assert!(
        wait_until(DELIVERY_TIMEOUT, || server
            .log()
            .contains(&format!("deferred id={id}"))),
        "{}",
        server.log()
    );
    let log = server.log();
    assert!(
        log.contains("certificate") || log.contains("UnknownIssuer"),
        "{log}"
    );
    assert!(!log.contains(password.as_str()));
    assert!(
        upstream.received().is_empty(),
        "mail went to an unverified server with our login"
    );
    server.stop();
}

#[test]
fn recipients_beyond_max_recipients_per_transaction_go_in_another_transaction() {
    let _limit = hard_limit(Duration::from_secs(90));
    let upstream = Aiosmtpd::start(&[]);
    let config = upstream_config(upstream.port(), "max_recipients_per_transaction = 2\n");
    let server = Server::start(&ServerOptions::new().deliver().config(&config));
    let content = message(
        "split-transactions",
        "three recipients, two per transaction\n",
    );
    send(
        &server,
        "sender@example.com",
        &["a@example.net", "b@example.net", "c@example.net"],
        &content,
    );
    let received = upstream.wait_for(2, DELIVERY_TIMEOUT);
    let mut sizes: Vec<usize> = received
        .iter()
        .map(|message| message.recipients().len())
        .collect();
    sizes.sort_unstable();
    assert_eq!(sizes, vec![1, 2], "{received:?}");
    let mut everyone: Vec<String> = received
        .iter()
        .flat_map(|message| message.recipients())
        .collect();
    everyone.sort();
    assert_eq!(
        everyone,
        vec!["a@example.net", "b@example.net", "c@example.net"]
    );
    for message in &received {
        tsubame_tests::assert_bytes_eq(
            tsubame_tests::without_received(&message.content),
            &content,
            "content of each part",
        );
    }
    server.stop();
}
