//! The admin HTTP server end to end: mail through the real binary to aiosmtpd, then
//! `/metrics` parsed by prometheus_client's parser, `/api/log` and `/api/log.csv`
//! against the log file and `tsubame log`, the queue endpoints, the token, and the web
//! page in headless Chromium (playwright-core). The HTTP client is Python's urllib
//! (`tests/peers/admin_client.py`).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use tsubame_tests::cli::tsubame;
use tsubame_tests::peers::run_python;
use tsubame_tests::process::{find_program, hard_limit, run};
use tsubame_tests::server::{Server, ServerOptions};
use tsubame_tests::upstream::{Aiosmtpd, free_port, wait_until};

use crate::delivery::{send, upstream_config};
use crate::delivery_log::events as log_events;
use crate::test_message;

/// Long enough for deliveries and the log's flush (1 s) on a loaded machine.
const EVENTS_TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) const ADMIN_ON: &str = "[admin]\nenabled = true\naddress = \"127.0.0.1:0\"\n";

/// A delivering server whose upstream is `127.0.0.1:port`, with the admin server on a
/// free loopback port and `extra` appended to its configuration.
fn start(port: u16, extra: &str) -> Server {
    Server::start(
        &ServerOptions::new()
            .deliver()
            .config(&format!("{}{extra}", upstream_config(port, ""))),
    )
}

/// `http://ADDRESS` of the admin server, from its start-up line.
pub(crate) fn admin_url(server: &Server) -> String {
    let found = || {
        server
            .log()
            .lines()
            .find(|line| line.contains("admin HTTP listening"))
            .and_then(|line| line.split("address=").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_string)
    };
    assert!(
        wait_until(Duration::from_secs(10), || found().is_some()),
        "no 'admin HTTP listening' line:\n{}",
        server.log()
    );
    format!("http://{}", found().unwrap())
}

/// Runs the requests with Python's urllib; one result per request.
fn http(requests: Vec<Value>) -> Vec<Value> {
    let finished = run_python(
        "admin_client.py",
        &json!({ "requests": requests }),
        Duration::from_secs(60),
    );
    finished.assert_code(0);
    let results: Value = serde_json::from_str(&finished.stdout_text()).unwrap_or_else(|error| {
        panic!(
            "admin_client.py printed no JSON: {error}\n{}",
            finished.describe()
        )
    });
    results.as_array().cloned().unwrap_or_default()
}

pub(crate) fn get(url: String, parse: &str) -> Value {
    json!({ "method": "GET", "url": url, "parse": parse })
}

fn post(url: String) -> Value {
    json!({ "method": "POST", "url": url, "parse": "json", "body": "" })
}

/// One request's result.
pub(crate) fn one(request: Value) -> Value {
    http(vec![request]).remove(0)
}

fn count(events: &[Value], event: &str) -> usize {
    events
        .iter()
        .filter(|logged| logged["event"] == event)
        .count()
}

/// The value of the sample `name` with exactly `labels`, from parsed metrics.
pub(crate) fn sample(samples: &Value, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples.as_array()?.iter().find_map(|sample| {
        let wanted: serde_json::Map<String, Value> = labels
            .iter()
            .map(|(key, value)| (key.to_string(), Value::from(*value)))
            .collect();
        (sample[0] == name && sample[1].as_object() == Some(&wanted)).then(|| sample[2].as_f64())?
    })
}

#[test]
fn metrics_log_api_and_csv_agree_with_what_was_sent() {
    let _limit = hard_limit(Duration::from_secs(120));
    let upstream = Aiosmtpd::start(&["--reject", "nobody@example.net"]);
    let server = start(upstream.port(), ADMIN_ON);
    let url = admin_url(&server);
    let mut ids = Vec::new();
    for number in 1..=3 {
        let recipient = format!("ok{number}@example.net");
        ids.push(send(
            &server,
            "sender@example.com",
            &[&recipient],
            &test_message(&format!("ok{number}"), "body\n"),
        ));
    }
    send(
        &server,
        "sender@example.com",
        &["nobody@example.net"],
        &test_message("rejected", "body\n"),
    );
    let log = server.spool().join("delivery.log");
    // Three delivered, one bounced, and the bounce (a message of its own, received and
    // delivered to sender@example.com through the same upstream).
    assert!(
        wait_until(EVENTS_TIMEOUT, || {
            let events = log_events(&log);
            count(&events, "delivered") == 4 && count(&events, "bounced") == 1
        }),
        "events missing:\n{:#?}\n{}",
        log_events(&log),
        server.log()
    );

    // /metrics: parsed by prometheus_client; the counters match what was sent. The
    // queue gauge follows the dispatcher's next round, so wait for it.
    let metrics = || one(get(format!("{url}/metrics"), "prometheus"));
    assert!(
        wait_until(EVENTS_TIMEOUT, || {
            sample(&metrics()["body"], "tsubame_queue_messages", &[]) == Some(0.0)
        }),
        "the queue never emptied: {}",
        metrics()["raw"]
    );
    let scrape = metrics();
    assert_eq!(scrape["status"], 200, "{scrape}");
    assert!(
        scrape["headers"]["content-type"]
            .as_str()
            .is_some_and(|value| value.starts_with("text/plain; version=0.0.4")),
        "{scrape}"
    );
    let samples = &scrape["body"];
    let by_route = [("route", "default"), ("upstream", "sink")];
    // Per recipient: four sent and the bounce received; three and the bounce delivered.
    // prometheus_client names a counter's sample with its _total suffix.
    let all_events = log_events(&log);
    assert_eq!(count(&all_events, "received"), 5);
    assert_eq!(
        sample(samples, "tsubame_received_total", &by_route),
        Some(5.0),
        "{}",
        scrape["raw"]
    );
    assert_eq!(
        sample(samples, "tsubame_delivered_total", &by_route),
        Some(4.0)
    );
    assert_eq!(
        sample(samples, "tsubame_bounced_total", &by_route),
        Some(1.0)
    );
    assert_eq!(sample(samples, "tsubame_deferred_total", &by_route), None);
    assert_eq!(
        sample(
            samples,
            "tsubame_queue_recipients",
            &[("state", "deferred")]
        ),
        Some(0.0)
    );
    // Four smtplib sessions.
    let accepted = sample(
        samples,
        "tsubame_connections_total",
        &[("result", "accepted")],
    );
    assert_eq!(accepted, Some(4.0), "{}", scrape["raw"]);
    assert_eq!(sample(samples, "tsubame_connections_open", &[]), Some(0.0));
    assert_eq!(
        sample(
            samples,
            "tsubame_login_failures_total",
            &[("reason", "invalid")]
        ),
        Some(0.0)
    );
    assert_eq!(
        sample(samples, "tsubame_delivery_latency_seconds_count", &[]),
        Some(4.0)
    );
    let syncs = sample(samples, "tsubame_spool_sync_seconds_count", &[]).unwrap_or(0.0);
    assert!(
        syncs >= 4.0,
        "one commit per accepted message at least: {syncs}"
    );
    let inf = sample(
        samples,
        "tsubame_spool_sync_seconds_bucket",
        &[("le", "+Inf")],
    );
    assert_eq!(inf, Some(syncs));
    assert!(sample(samples, "tsubame_spool_bytes", &[]).is_some_and(|bytes| bytes > 0.0));

    // /api/log returns the log file's events; newest first by default.
    let results = http(vec![
        get(format!("{url}/api/log?order=asc&limit=1000"), "json"),
        get(format!("{url}/api/log?limit=2"), "json"),
        get(
            format!("{url}/api/log?address=OK2%40example&order=asc"),
            "json",
        ),
        get(
            format!("{url}/api/log?status=bounced&category=recipient+unknown"),
            "json",
        ),
        get(format!("{url}/api/log.csv"), "csv"),
        get(format!("{url}/api/log.csv?status=delivered"), "csv"),
        get(format!("{url}/api/log?stauts=bounced"), "json"),
        get(format!("{url}/api/log?since=yesterday"), "json"),
        get(format!("{url}/healthz"), "text"),
        get(format!("{url}/api/log?limit=5000"), "json"),
    ]);
    let api_all = &results[0]["body"];
    assert_eq!(api_all["total"], all_events.len(), "{api_all}");
    assert_eq!(
        api_all["records"].as_array().cloned().unwrap_or_default(),
        all_events
    );
    let newest = &results[1]["body"];
    assert_eq!(newest["total"], all_events.len());
    let newest_two: Vec<Value> = all_events.iter().rev().take(2).cloned().collect();
    assert_eq!(
        newest["records"].as_array().cloned().unwrap_or_default(),
        newest_two
    );
    let ok2 = &results[2]["body"]["records"];
    let ok2_events: Vec<&str> = ok2
        .as_array()
        .map(|records| records.iter().filter_map(|r| r["event"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(ok2_events, ["received", "delivered"], "{ok2}");
    assert!(ok2.as_array().is_some_and(|records| {
        records
            .iter()
            .all(|r| r["recipient"] == "ok2@example.net" && r["id"] == ids[1].as_str())
    }));
    let bounced = &results[3]["body"];
    assert_eq!(bounced["total"], 1, "{bounced}");
    assert_eq!(bounced["records"][0]["recipient"], "nobody@example.net");
    assert!(
        bounced["records"][0]["reply"]
            .as_str()
            .is_some_and(|reply| reply.starts_with("550"))
    );

    // The CSV, parsed by Python's csv module: the same rows as `tsubame log export`,
    // which its own test checks against the file.
    let spool = server.spool().to_str().unwrap().to_string();
    let exported = tsubame(&["log", "export", "--csv", "--spool", &spool]);
    exported.assert_code(0);
    let csv = &results[4];
    assert_eq!(csv["status"], 200);
    assert!(
        csv["headers"]["content-disposition"]
            .as_str()
            .is_some_and(|value| value.contains("attachment"))
    );
    assert_eq!(csv["raw"].as_str(), Some(exported.stdout_text().as_str()));
    let rows = csv["body"].as_array().cloned().unwrap_or_default();
    assert_eq!(
        rows.len(),
        all_events.len() + 1,
        "a header row and one per event"
    );
    assert_eq!(rows[0][0], "time");
    assert_eq!(rows[0][5], "recipient");
    for (row, event) in rows[1..].iter().zip(&all_events) {
        assert_eq!(row[1], event["event"]);
        assert_eq!(row[2], event["id"]);
        assert_eq!(row[5], event["recipient"]);
    }
    let delivered_rows = results[5]["body"].as_array().map_or(0, Vec::len);
    assert_eq!(delivered_rows, 5, "header and four delivered");
    // A misspelt filter is refused rather than ignored; a bad time says why.
    assert_eq!(results[6]["status"], 400);
    assert!(
        results[6]["body"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("unknown parameter \"stauts\""))
    );
    assert_eq!(results[7]["status"], 400);
    assert!(
        results[7]["body"]["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("since: expected an RFC 3339 time"))
    );
    assert_eq!(results[8]["status"], 200);
    assert_eq!(results[8]["raw"], "ok\n");
    // A page holds at most LOG_PAGE_MAX events.
    assert_eq!(results[9]["body"]["limit"], 1000);
    server.stop();
}

#[test]
fn queue_endpoints_page_hold_release_flush_and_delete() {
    let _limit = hard_limit(Duration::from_secs(120));
    // Nothing listens there: every attempt is deferred.
    let server = start(free_port(), ADMIN_ON);
    let url = admin_url(&server);
    let first = send(
        &server,
        "sender@example.com",
        &["a@example.net"],
        &test_message("a", "body\n"),
    );
    let second = send(
        &server,
        "other@example.org",
        &["b@example.net"],
        &test_message("b", "body\n"),
    );
    let third = send(
        &server,
        "other@example.org",
        &["c@example.org"],
        &test_message("c", "body\n"),
    );
    let deferred = || {
        let page = one(get(format!("{url}/api/queue?status=deferred"), "json"));
        page["body"]["total"] == 3
    };
    assert!(
        wait_until(EVENTS_TIMEOUT, deferred),
        "not all deferred:\n{}",
        server.log()
    );

    let results = http(vec![
        get(format!("{url}/api/queue?limit=2"), "json"),
        get(format!("{url}/api/queue?limit=2&offset=2"), "json"),
        get(
            format!("{url}/api/queue?sender=%40example.org&recipient_domain=example.net"),
            "json",
        ),
        get(format!("{url}/api/queue/{first}"), "json"),
        post(format!("{url}/api/queue/{first}/hold")),
        get(format!("{url}/api/queue?status=held"), "json"),
        post(format!("{url}/api/queue/{first}/release")),
        get(format!("{url}/api/queue?status=held"), "json"),
        post(format!("{url}/api/queue/{second}/flush")),
        post(format!("{url}/api/queue/{third}/delete")),
        get(format!("{url}/api/queue/{third}"), "json"),
        post(format!("{url}/api/queue/00000000000000ff/hold")),
        post(format!("{url}/api/queue/{first}/explode")),
        get(format!("{url}/api/queue/{first}/hold"), "json"),
        get(format!("{url}/api/queue?status=lost"), "json"),
        get(format!("{url}/api/queue?older_than=forever"), "json"),
        get(format!("{url}/api/queue"), "json"),
        get(format!("{url}/api/queue?limit=5000"), "json"),
        get(format!("{url}/api/queue/not-an-id"), "json"),
        get(format!("{url}/api/summary"), "json"),
    ]);
    let ids = |page: &Value| -> Vec<String> {
        page["body"]["messages"]
            .as_array()
            .map(|messages| {
                messages
                    .iter()
                    .filter_map(|m| m["id"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(results[0]["body"]["total"], 3, "{}", results[0]);
    assert_eq!(ids(&results[0]), [first.as_str(), second.as_str()]);
    assert_eq!(results[0]["body"]["counts"]["messages"], 3);
    assert_eq!(ids(&results[1]), [third.as_str()]);
    assert_eq!(ids(&results[2]), [second.as_str()], "both filters hold");
    let shown = &results[3]["body"]["message"];
    assert_eq!(shown["id"], first.as_str());
    assert_eq!(shown["recipients"][0]["state"], "deferred");
    assert!(
        shown["recipients"][0]["last_reply"]
            .as_str()
            .is_some_and(|reply| reply.contains("refused"))
    );
    assert_eq!(results[4]["status"], 200, "{}", results[4]);
    assert_eq!(results[4]["body"]["result"], "held");
    assert_eq!(ids(&results[5]), [first.as_str()]);
    assert_eq!(results[6]["body"]["result"], "released");
    assert_eq!(results[7]["body"]["total"], 0);
    assert_eq!(results[8]["body"]["result"], "flushed");
    assert_eq!(results[9]["body"]["result"], "deleted");
    assert_eq!(results[10]["status"], 404, "deleted: {}", results[10]);
    assert_eq!(results[11]["status"], 404);
    assert!(
        results[11]["body"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("not queued"))
    );
    assert_eq!(results[12]["status"], 404);
    assert!(
        results[12]["body"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("flush, delete, hold or release"))
    );
    assert_eq!(results[13]["status"], 405);
    assert_eq!(results[14]["status"], 400);
    assert_eq!(results[15]["status"], 400);
    assert_eq!(ids(&results[16]), [first.as_str(), second.as_str()]);
    // A page holds at most LIST_PAGE_MAX messages.
    assert_eq!(results[17]["body"]["limit"], 1000);
    assert_eq!(results[18]["status"], 400, "{}", results[18]);
    assert!(
        results[18]["body"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("is not a message id"))
    );
    // The page's header counts: the dispatcher's last round, no listing.
    assert_eq!(
        results[19]["body"]["counts"]["messages"], 2,
        "{}",
        results[19]
    );
    assert_eq!(
        results[19]["body"]["counts"]["deferred"], 2,
        "{}",
        results[19]
    );

    // Requests a browser would send from another site are refused, and change nothing.
    let cross_site = http(vec![
        json!({ "method": "POST", "url": format!("{url}/api/queue/{first}/delete"), "headers": { "Origin": "http://evil.example" }, "body": "", "parse": "json" }),
        json!({ "method": "GET", "url": format!("{url}/api/queue"), "headers": { "Host": "evil.example:8025" }, "parse": "json" }),
        json!({ "method": "POST", "url": format!("{url}/api/queue/{first}/hold"), "headers": { "Origin": url }, "body": "", "parse": "json" }),
        get(format!("{url}/api/queue/{first}"), "json"),
        // Behind a TLS proxy the page's origin is https: the host is what counts.
        json!({ "method": "POST", "url": format!("{url}/api/queue/{first}/release"), "headers": { "Origin": url.replace("http://", "https://") }, "body": "", "parse": "json" }),
    ]);
    assert_eq!(cross_site[0]["status"], 403, "{}", cross_site[0]);
    assert_eq!(cross_site[1]["status"], 403, "{}", cross_site[1]);
    assert_eq!(
        cross_site[2]["status"], 200,
        "the page's own origin: {}",
        cross_site[2]
    );
    assert_eq!(
        cross_site[3]["body"]["message"]["held"], true,
        "still queued, now held"
    );
    assert_eq!(cross_site[4]["status"], 200, "{}", cross_site[4]);
    // Logged before the answer, but through the log writer thread.
    assert!(
        wait_until(Duration::from_secs(10), || server
            .log()
            .contains("queue action from the admin HTTP server")),
        "{}",
        server.log()
    );
    server.stop();
}

#[test]
fn a_token_guards_the_api_and_metrics_but_not_the_page_or_health() {
    let _limit = hard_limit(Duration::from_secs(90));
    let directory = tempfile::tempdir().unwrap();
    let token_file = directory.path().join("admin.token");
    let token = "5f0c2d9a7b1e4c3f8a6d2e1b9c7f4a3d5e6b8c1a2f3d4e5b6c7a8d9e0f1a2b3c";
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let admin = format!(
        "[admin]\nenabled = true\naddress = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n",
        token_file.display()
    );
    let server = start(free_port(), &admin);
    let url = admin_url(&server);
    let bearer = |value: &str| json!({ "Authorization": format!("Bearer {value}") });
    let results = http(vec![
        get(format!("{url}/metrics"), "text"),
        json!({ "method": "GET", "url": format!("{url}/metrics"), "headers": bearer(&token[1..]), "parse": "text" }),
        json!({ "method": "GET", "url": format!("{url}/metrics"), "headers": bearer(token), "parse": "prometheus" }),
        json!({ "method": "GET", "url": format!("{url}/api/log"), "headers": bearer(token), "parse": "json" }),
        get(format!("{url}/api/queue"), "json"),
        get(format!("{url}/healthz"), "text"),
        get(format!("{url}/"), "text"),
        // With a token, another site's Origin is no matter: a browser never adds the
        // token by itself. The id is not queued: 404, not 403.
        json!({ "method": "POST", "url": format!("{url}/api/queue/00000000000000ff/flush"), "headers": { "Authorization": format!("Bearer {token}"), "Origin": "https://admin.example" }, "body": "", "parse": "json" }),
        // With a token, any Host is fine: the token is the guard.
        json!({ "method": "GET", "url": format!("{url}/api/queue"), "headers": { "Authorization": format!("Bearer {token}"), "Host": "relay.example:8025" }, "parse": "json" }),
    ]);
    assert_eq!(results[0]["status"], 401, "{}", results[0]);
    assert_eq!(results[0]["headers"]["www-authenticate"], "Bearer");
    assert_eq!(results[1]["status"], 401);
    assert_eq!(results[2]["status"], 200);
    assert_eq!(results[3]["status"], 200);
    assert_eq!(results[4]["status"], 401);
    assert_eq!(results[5]["status"], 200);
    assert_eq!(results[6]["status"], 200);
    assert!(
        results[6]["raw"]
            .as_str()
            .is_some_and(|page| page.contains("<title>tsubame</title>"))
    );
    assert_eq!(results[7]["status"], 404, "{}", results[7]);
    assert_eq!(results[8]["status"], 200);
    assert!(!server.log().contains(token), "the token is in the log");
    // A second relay whose admin address is taken does not start (and accepts no mail).
    let taken = format!(
        "{}[admin]\nenabled = true\naddress = \"{}\"\n",
        upstream_config(2525, ""),
        url.trim_start_matches("http://")
    );
    let Err(failure) = Server::try_start(&ServerOptions::new().config(&taken)) else {
        panic!("a relay started with its admin address in use");
    };
    let text = failure.to_string();
    assert!(text.contains("admin HTTP: cannot listen on"), "{text}");
    assert!(
        !text.contains("listening address="),
        "it listened for mail: {text}"
    );
    server.stop();

    // Off loopback without a token: refused before anything starts.
    let open = format!(
        "{}[admin]\nenabled = true\naddress = \"0.0.0.0:8025\"\n",
        upstream_config(2525, "")
    );
    let config = directory.path().join("open.toml");
    std::fs::write(&config, open).unwrap();
    let checked = tsubame(&["check-config", config.to_str().unwrap()]);
    assert_ne!(checked.code(), Some(0));
    assert!(
        checked.stderr_text().contains("needs token_file"),
        "{}",
        checked.describe()
    );
    // A short token: serve refuses to start and names the file, not the token.
    std::fs::write(&token_file, "short-token\n").unwrap();
    // check-config reads the token file as serve does.
    let short = directory.path().join("short.toml");
    std::fs::write(&short, format!("{}{admin}", upstream_config(2525, ""))).unwrap();
    let checked = tsubame(&["check-config", short.to_str().unwrap()]);
    assert_ne!(checked.code(), Some(0));
    assert!(
        checked.stderr_text().contains("at least 32 characters"),
        "{}",
        checked.describe()
    );
    assert!(!checked.stderr_text().contains("short-token"));
    let refused = Server::try_start(
        &ServerOptions::new().config(&format!("{}{admin}", upstream_config(2525, ""))),
    );
    let Err(failure) = refused else {
        panic!("a short token must stop the start");
    };
    let text = failure.to_string();
    assert!(
        text.contains("at least 32 characters") && text.contains("admin.token"),
        "{text}"
    );
    assert!(!text.contains("short-token"), "{text}");
}

#[test]
fn the_web_page_finds_a_message_and_downloads_its_csv_in_chromium() {
    let _limit = hard_limit(Duration::from_secs(150));
    let node = find_program("node")
        .expect("node is not installed: scripts/test installs the browser peer");
    let chromium = Path::new("/usr/bin/chromium");
    assert!(
        chromium.is_file(),
        "Debian's chromium is not installed: scripts/test installs it"
    );
    let driver = tsubame_tests::peers::peer_script("browser/admin_page.mjs");
    assert!(
        tsubame_tests::peers::peer_script("browser/node_modules/playwright-core").is_dir(),
        "playwright-core is not installed in tests/peers/browser: scripts/test installs it (npm ci)"
    );
    let upstream = Aiosmtpd::start(&[]);
    // Mail for stuck.example goes to an upstream where nothing listens: it stays queued.
    let stuck_route = format!(
        "[[upstream]]\nname = \"dead\"\nkind = \"smtp\"\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\n\
         [[route]]\nrecipient_domains = [\"stuck.example\"]\nupstream = \"dead\"\n{ADMIN_ON}",
        free_port()
    );
    let server = start(upstream.port(), &stuck_route);
    let url = admin_url(&server);
    let stuck = send(
        &server,
        "sender@example.com",
        &["held-one@stuck.example"],
        &test_message("stuck", "body\n"),
    );
    let wanted = "page-reader@example.net";
    let id = send(
        &server,
        "sender@example.com",
        &[wanted],
        &test_message("page", "body\n"),
    );
    send(
        &server,
        "sender@example.com",
        &["someone-else@example.net"],
        &test_message("other", "body\n"),
    );
    let log = server.spool().join("delivery.log");
    assert!(
        wait_until(EVENTS_TIMEOUT, || count(&log_events(&log), "delivered")
            == 2),
        "not delivered:\n{}",
        server.log()
    );
    let downloads = tempfile::tempdir().unwrap();
    let job = json!({
        "url": format!("{url}/"),
        "address": "page-reader@",
        "download_dir": downloads.path(),
        "hold_address": "held-one@stuck",
    });
    let finished = run(
        Command::new(node).arg(&driver).arg(job.to_string()),
        None,
        Duration::from_secs(120),
        "node admin_page.mjs (headless chromium)",
    );
    let page: Value = serde_json::from_str(&finished.stdout_text()).unwrap_or_else(|error| {
        panic!(
            "the browser driver printed no JSON: {error}\n{}",
            finished.describe()
        )
    });
    assert_eq!(page["ok"], true, "{page:#}\n{}", finished.describe());
    // The search found the message, and only it: received then delivered.
    let rows = page["rows"].as_array().cloned().unwrap_or_default();
    let events: Vec<&str> = rows.iter().filter_map(|row| row[1].as_str()).collect();
    assert_eq!(events, ["delivered", "received"], "{page:#}");
    assert!(rows.iter().all(|row| row[3] == wanted), "{page:#}");
    assert!(
        rows[0][5]
            .as_str()
            .is_some_and(|reply| reply.starts_with("250")),
        "the upstream's reply: {page:#}"
    );
    // The message view: its events with the upstream's reply; no longer queued.
    assert_eq!(page["detail_id"], id.as_str());
    assert!(
        page["detail_rows"]
            .as_array()
            .is_some_and(|rows| rows.iter().any(|row| row[1] == "delivered"
                && row[7]
                    .as_str()
                    .is_some_and(|reply| reply.starts_with("250")))),
        "{page:#}"
    );
    assert!(
        page["detail_queue"]
            .as_str()
            .is_some_and(|text| text.contains("Not in the queue")),
        "{page:#}"
    );
    // The header's count: the stuck message is the one queued.
    assert_eq!(page["queued_messages"], "1", "{page:#}");
    // The CSV button downloaded the search's rows.
    let path = page["download_path"].as_str().expect("a download");
    let csv = std::fs::read_to_string(path).unwrap();
    let lines: Vec<&str> = csv.split("\r\n").filter(|line| !line.is_empty()).collect();
    assert!(lines[0].starts_with("time,event,id,"), "{csv}");
    assert_eq!(
        lines.len(),
        3,
        "a header and the message's two events: {csv}"
    );
    assert!(
        lines[1..]
            .iter()
            .all(|line| line.contains(&id) && line.contains(wanted)),
        "{csv}"
    );
    assert!(
        lines.iter().any(|line| line.contains(",delivered,")),
        "{csv}"
    );
    // The Hold button of a queued message: the page shows it held, and it is.
    assert!(
        page["queued_before"]
            .as_str()
            .is_some_and(|text| text.starts_with("In the queue: held-one@stuck.example: ")),
        "{page:#}"
    );
    assert_eq!(
        page["queued_after"].as_str(),
        Some("In the queue (held): held-one@stuck.example: deferred"),
        "{page:#}"
    );
    assert_eq!(
        page["status_after_hold"].as_str(),
        Some(format!("Message {stuck} held.").as_str()),
        "{page:#}"
    );
    let shown = one(get(format!("{url}/api/queue/{stuck}"), "json"));
    assert_eq!(shown["body"]["message"]["held"], true, "{shown}");
    // No script errors. The one failed load expected is the queue lookup of the
    // delivered message, which is rightly 404 (the page says "Not in the queue").
    let expected_404 = format!("/api/queue/{id}");
    let errors: Vec<&str> = page["console"]
        .as_array()
        .map(|lines| {
            lines
                .iter()
                .filter_map(Value::as_str)
                .filter(|line| line.starts_with("error") || line.starts_with("pageerror"))
                .filter(|line| !(line.contains("404") && line.ends_with(&expected_404)))
                .collect()
        })
        .unwrap_or_default();
    assert!(errors.is_empty(), "the page logged errors: {errors:?}");
    server.stop();
}

#[test]
fn connection_tls_and_login_counters_follow_real_sessions() {
    use crate::login::{Fixture, USER, config, test_password, user_entry};
    use tsubame_tests::peers::Smtplib;
    use tsubame_tests::smtp::RawClient;

    let _limit = hard_limit(Duration::from_secs(120));
    let fixture = Fixture::new();
    let password = test_password("metrics");
    let server = Server::start(&ServerOptions::new().config(&config(
        &format!("{}relay_networks = []\n", fixture.tls_keys()),
        &format!("{}{ADMIN_ON}", user_entry(USER, &password, "")),
    )));
    let url = admin_url(&server);
    // 1: STARTTLS, login, send.
    let outcomes = Smtplib::new(server.address())
        .tls_ca(&fixture.ca())
        .ehlo()
        .starttls()
        .ehlo()
        .login(USER, &password)
        .quit()
        .run_to_end();
    outcomes[3].expect(235, "2.7.0", "login");
    // 2: STARTTLS, a wrong password. smtplib tries PLAIN, then LOGIN after the 535:
    // two refused logins.
    let outcomes = Smtplib::new(server.address())
        .tls_ca(&fixture.ca())
        .ehlo()
        .starttls()
        .ehlo()
        .login(USER, "not the password")
        .run();
    assert_eq!(
        outcomes.last().and_then(|outcome| outcome.code),
        Some(535),
        "{outcomes:?}"
    );
    // 3: STARTTLS, then bytes that are no TLS handshake.
    let mut client = RawClient::connect(server.address());
    client.hello();
    client.command_expect("STARTTLS", 220, "2.0.0");
    client.send(b"this is not a ClientHello\r\n\r\n");
    client.expect_closed(Duration::from_secs(10), "after a broken handshake");

    let counters = || {
        let scrape = one(get(format!("{url}/metrics"), "prometheus"));
        let value = |name: &str, labels: &[(&str, &str)]| sample(&scrape["body"], name, labels);
        (
            value("tsubame_connections_total", &[("result", "accepted")]),
            value("tsubame_tls_handshakes_total", &[("result", "ok")]),
            value("tsubame_tls_handshakes_total", &[("result", "failed")]),
            value("tsubame_login_failures_total", &[("reason", "invalid")]),
            value("tsubame_connections_open", &[]),
        )
    };
    let expected = (Some(3.0), Some(2.0), Some(1.0), Some(2.0), Some(0.0));
    assert!(
        wait_until(Duration::from_secs(10), || counters() == expected),
        "counters {:?}, expected {expected:?}\n{}",
        counters(),
        server.log()
    );
    server.stop();
}
