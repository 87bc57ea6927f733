//! The delivery log end to end: a message delivered, one deferred then delivered, one
//! bounced by aiosmtpd, then the JSON lines, `tsubame log export --csv` read by
//! Python's csv module, and `tsubame log search --json`.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use tsubame_tests::cli::tsubame;
use tsubame_tests::process::hard_limit;
use tsubame_tests::server::{Server, ServerOptions};
use tsubame_tests::upstream::{Aiosmtpd, wait_until};

use crate::delivery::{send, upstream_config};

/// Long enough for a retry (1 s) and the log's flush (1 s) on a loaded machine.
const LOG_TIMEOUT: Duration = Duration::from_secs(30);

const DEFERRED: &str = "later@example.net";
const DELIVERED: &str = "ok@example.net";
const REJECTED: &str = "nobody@example.net";

fn send_one(server: &Server, recipient: &str, subject: &str) -> String {
    let content = tsubame_tests::crlf(&format!(
        "From: sender@example.com\nTo: {recipient}\nSubject: {subject}\n\
         Message-Id: <{subject}@log.tsubame.test>\n\nbody, with \"quotes\"\n"
    ));
    send(server, "sender@example.com", &[recipient], &content)
}

/// The log's lines as JSON, in order.
pub(crate) fn events(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}")))
        .collect()
}

fn of<'a>(events: &'a [Value], recipient: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|event| event["recipient"] == recipient)
        .collect()
}

fn has(events: &[Value], recipient: &str, event: &str) -> bool {
    of(events, recipient)
        .iter()
        .any(|logged| logged["event"] == event)
}

#[test]
fn delivered_deferred_and_bounced_mail_is_logged_searched_and_exported() {
    let _limit = hard_limit(Duration::from_secs(120));
    let upstream = Aiosmtpd::start(&["--reject", REJECTED, "--defer-first", "1"]);
    let server = Server::start(
        &ServerOptions::new()
            .deliver()
            .config(&upstream_config(upstream.port(), "")),
    );
    let log = server.spool().join("delivery.log");
    // First: it takes the upstream's one 451.
    let deferred_id = send_one(&server, DEFERRED, "deferred");
    assert!(
        wait_until(LOG_TIMEOUT, || has(&events(&log), DEFERRED, "deferred")),
        "no deferred event:\n{:#?}\n{}",
        events(&log),
        server.log()
    );
    let delivered_id = send_one(&server, DELIVERED, "delivered");
    let rejected_id = send_one(&server, REJECTED, "rejected");
    let complete = || {
        let events = events(&log);
        has(&events, DEFERRED, "delivered")
            && has(&events, DELIVERED, "delivered")
            && has(&events, REJECTED, "bounced")
    };
    assert!(
        wait_until(LOG_TIMEOUT, complete),
        "events missing:\n{:#?}\n{}",
        events(&log),
        server.log()
    );
    let all = events(&log);

    let summary = |recipient: &str| -> Vec<(String, u64)> {
        of(&all, recipient)
            .iter()
            .map(|event| {
                (
                    event["event"].as_str().unwrap().to_string(),
                    event["attempt"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let pairs = |expected: &[(&str, u64)]| -> Vec<(String, u64)> {
        expected
            .iter()
            .map(|(event, attempt)| (event.to_string(), *attempt))
            .collect()
    };
    assert_eq!(
        summary(DEFERRED),
        pairs(&[("received", 0), ("deferred", 1), ("delivered", 2)])
    );
    assert_eq!(
        summary(DELIVERED),
        pairs(&[("received", 0), ("delivered", 1)])
    );
    assert_eq!(summary(REJECTED), pairs(&[("received", 0), ("bounced", 1)]));

    for (recipient, id, subject) in [
        (DEFERRED, &deferred_id, "deferred"),
        (DELIVERED, &delivered_id, "delivered"),
        (REJECTED, &rejected_id, "rejected"),
    ] {
        for event in of(&all, recipient) {
            assert_eq!(event["id"], id.as_str(), "{event}");
            assert_eq!(event["sender"], "sender@example.com", "{event}");
            assert_eq!(event["upstream"], "sink", "{event}");
            assert!(event["size_bytes"].as_u64().unwrap() > 0, "{event}");
            let time = event["time"].as_str().unwrap();
            assert!(
                time.len() == 24 && time.ends_with('Z') && time.as_bytes()[10] == b'T',
                "{event}"
            );
            assert!(event.get("since_received_ms").is_some(), "{event}");
            if event["event"] == "received" {
                assert!(event.get("reply").is_none(), "{event}");
                // Known once a worker has read the message.
                assert!(event.get("message_id").is_none(), "{event}");
            } else {
                assert!(event.get("attempt_ms").is_some(), "{event}");
                assert_eq!(
                    event["message_id"],
                    format!("<{subject}@log.tsubame.test>"),
                    "{event}"
                );
            }
            if event["event"] == "delivered" || event["event"] == "received" {
                assert!(event.get("category").is_none(), "{event}");
            }
        }
    }
    let find = |recipient: &str, wanted: &str| -> &Value {
        of(&all, recipient)
            .into_iter()
            .find(|event| event["event"] == wanted)
            .unwrap()
    };
    let deferred = find(DEFERRED, "deferred");
    assert_eq!(deferred["reply"], "451 4.3.0 try again later");
    assert_eq!(deferred["category"], "other");
    assert_eq!(deferred["remote"], "127.0.0.1");
    assert!(
        find(DEFERRED, "delivered")["reply"]
            .as_str()
            .unwrap()
            .starts_with("250 "),
        "{all:#?}"
    );
    let bounced = find(REJECTED, "bounced");
    assert_eq!(
        bounced["reply"],
        format!("550 5.1.1 <{REJECTED}>: no such user here")
    );
    assert_eq!(bounced["category"], "recipient unknown");
    // The bounce itself is queued from <> to the sender.
    assert!(
        all.iter()
            .any(|event| event["event"] == "received" && event["sender"] == ""),
        "{all:#?}"
    );
    // The mode of a file that names senders and recipients.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&log).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    let spool = server.spool().to_str().unwrap().to_string();
    // Export: every line, read back by Python's csv module.
    let export = tsubame(&["log", "export", "--csv", "--spool", &spool]);
    export.assert_code(0);
    let csv_text = export.stdout_text();
    assert!(csv_text.starts_with("time,event,id,message_id,sender,recipient,upstream,remote,reply,category,attempt,size_bytes,tls,since_received_ms,attempt_ms\r\n"));
    assert!(
        csv_text
            .split_inclusive('\n')
            .all(|row| row.ends_with("\r\n")),
        "{csv_text}"
    );
    let rows = parse_csv_with_python(&csv_text);
    let written = events(&log);
    assert_eq!(rows.len(), written.len(), "{csv_text}");
    for (row, event) in rows.iter().zip(&written) {
        for key in ["time", "event", "id", "sender", "recipient", "upstream"] {
            assert_eq!(row[key], event[key], "{key} of {event}");
        }
        for key in ["reply", "message_id", "remote"] {
            assert_eq!(
                row[key],
                event[key].as_str().unwrap_or(""),
                "{key} of {event}"
            );
        }
        assert_eq!(
            row["category"],
            event["category"].as_str().unwrap_or(""),
            "{event}"
        );
        assert_eq!(row["attempt"], event["attempt"].to_string(), "{event}");
        assert_eq!(
            row["size_bytes"],
            event["size_bytes"].to_string(),
            "{event}"
        );
    }
    // Filters: only the bounce, exported.
    let bounces = tsubame(&[
        "log",
        "export",
        "--csv",
        "--spool",
        &spool,
        "--status",
        "bounced",
        "--category",
        "recipient unknown",
    ]);
    bounces.assert_code(0);
    let bounce_rows = parse_csv_with_python(&bounces.stdout_text());
    assert_eq!(bounce_rows.len(), 1, "{}", bounces.stdout_text());
    assert_eq!(bounce_rows[0]["recipient"], REJECTED);

    // Search: the same events as the file, for one recipient.
    let found = search_json(&spool, &["--recipient", "LATER@example.net"]);
    let expected: Vec<Value> = of(&written, DEFERRED).into_iter().cloned().collect();
    assert_eq!(found, expected);
    // Plain output: one readable line per event.
    let plain = tsubame(&["log", "search", "--spool", &spool, "--recipient", REJECTED]);
    plain.assert_code(0);
    let lines: Vec<String> = plain.stdout_text().lines().map(str::to_string).collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(
        lines[1].contains("bounced")
            && lines[1].contains(&format!("sender@example.com -> {REJECTED} via sink"))
            && lines[1].ends_with("no such user here [recipient unknown]"),
        "{lines:?}"
    );
    // A time window before everything finds nothing.
    let none = tsubame(&["log", "search", "--spool", &spool, "--until", "2000-01-01"]);
    none.assert_code(0);
    assert_eq!(none.stdout_text(), "");
    server.stop();
}

/// `tsubame log search --spool SPOOL FILTERS --json`, its lines parsed.
fn search_json(spool: &str, filters: &[&str]) -> Vec<Value> {
    let mut arguments = vec!["log", "search", "--spool", spool, "--json"];
    arguments.extend_from_slice(filters);
    let search = tsubame(&arguments);
    search.assert_code(0);
    search
        .stdout_text()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

/// Rows of `csv_text` as Python's `csv.DictReader` reads them, through JSON.
fn parse_csv_with_python(csv_text: &str) -> Vec<serde_json::Map<String, Value>> {
    use std::io::Write;
    let mut child = std::process::Command::new("python3")
        .args([
            "-c",
            "import csv, io, json, sys\n\
             text = sys.stdin.buffer.read().decode('utf-8')\n\
             rows = list(csv.DictReader(io.StringIO(text, newline=''), strict=True))\n\
             json.dump(rows, sys.stdout)\n",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 on PATH");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(csv_text.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "python3 failed on:\n{csv_text}");
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn tls_and_expiry_are_logged() {
    let _limit = hard_limit(Duration::from_secs(120));
    let pki = tsubame_tests::pki::TestPki::new();
    // Every message gets 451 at the end of data, over STARTTLS.
    let upstream =
        crate::delivery::tls_upstream(&pki, &["--starttls", "--defer-first", "1000"], None);
    let config = upstream_config(upstream.port(), "")
        .replace("tls = \"none\"", "tls = \"opportunistic\"")
        .replace(
            "retry_schedule_secs = [1]",
            "retry_schedule_secs = [1]\nmax_age_secs = 3",
        );
    let server = Server::start(&ServerOptions::new().deliver().config(&config));
    let log = server.spool().join("delivery.log");
    let id = send_one(&server, DEFERRED, "expiring");
    assert!(
        wait_until(LOG_TIMEOUT, || has(&events(&log), DEFERRED, "expired")),
        "no expired event:\n{:#?}\n{}",
        events(&log),
        server.log()
    );
    let all = events(&log);
    let mine = of(&all, DEFERRED);
    let deferred: Vec<&&Value> = mine
        .iter()
        .filter(|event| event["event"] == "deferred")
        .collect();
    assert!(!deferred.is_empty(), "{all:#?}");
    for event in &deferred {
        assert_eq!(event["reply"], "451 4.3.0 try again later", "{event}");
        assert_eq!(event["category"], "other", "{event}");
        assert!(
            event["tls"].as_str().unwrap_or("").starts_with("TLSv1."),
            "{event}"
        );
    }
    let expired = mine
        .iter()
        .find(|event| event["event"] == "expired")
        .unwrap();
    assert_eq!(expired["id"], id.as_str());
    assert!(
        expired["reply"]
            .as_str()
            .unwrap()
            .contains("expired after the maximum queue time; last: 451 4.3.0 try again later"),
        "{expired}"
    );
    // Categorised by its last reply.
    assert_eq!(expired["category"], "other");
    assert!(expired["attempt"].as_u64().unwrap() >= 1, "{expired}");
    assert_eq!(expired["message_id"], "<expiring@log.tsubame.test>");
    let found = search_json(
        server.spool().to_str().unwrap(),
        &["--status", "expired", "--recipient", DEFERRED],
    );
    assert_eq!(found, vec![(*expired).clone()]);
    server.stop();
}
