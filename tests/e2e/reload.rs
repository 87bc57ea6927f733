//! SIGHUP reloads the configuration file: routes, upstreams and users change for new
//! mail and new sessions without a restart, mail queued on a removed upstream takes the
//! new route, and a configuration that does not load is refused with the old one kept.

use std::time::Duration;

use tsubame_tests::peers::Smtplib;
use tsubame_tests::process::{Signal, hard_limit, send_signal};
use tsubame_tests::server::{Server, ServerOptions};
use tsubame_tests::upstream::{Aiosmtpd, free_port, wait_until};

use crate::delivery::send;
use crate::login::{test_password, user_entry};
use crate::test_message;

/// Longest a reload takes to show in the log: it reads one file and starts a few threads.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest a delivery over loopback takes here (one 1 s retry included).
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

/// Upstreams `a` and `b` (aiosmtpd on `a_port`, `b_port`) and, with `with_dead`, `dead`
/// (nothing listens there), retried after 1 s; `default_upstream` and `routes` as given.
fn upstreams(
    a_port: u16,
    b_port: u16,
    with_dead: bool,
    default_upstream: &str,
    routes: &str,
) -> String {
    let dead = if with_dead {
        format!(
            "[[upstream]]\nname = \"dead\"\nkind = \"smtp\"\nhost = \"127.0.0.1\"\n\
             port = {}\ntls = \"none\"\ntimeout_secs = 5\n",
            free_port()
        )
    } else {
        String::new()
    };
    format!(
        "[[listener]]\naddress = \"127.0.0.1:2525\"\n\
         [delivery]\ndefault_upstream = \"{default_upstream}\"\nretry_schedule_secs = [1]\n\
         [[upstream]]\nname = \"a\"\nkind = \"smtp\"\nhost = \"127.0.0.1\"\nport = {a_port}\n\
         tls = \"none\"\ntimeout_secs = 5\n\
         [[upstream]]\nname = \"b\"\nkind = \"smtp\"\nhost = \"127.0.0.1\"\nport = {b_port}\n\
         tls = \"none\"\ntimeout_secs = 5\n\
         {dead}{routes}\n"
    )
}

/// Sends SIGHUP and waits for the `count`-th line containing `marker`.
#[track_caller]
fn sighup_and_wait(server: &Server, marker: &str) {
    let before = server.log().matches(marker).count();
    send_signal(server.pid(), Signal::HUP).unwrap();
    let seen = wait_until(RELOAD_TIMEOUT, || {
        server.log().matches(marker).count() > before
    });
    assert!(seen, "no {marker:?} line after SIGHUP:\n{}", server.log());
}

#[test]
fn sighup_with_a_changed_route_sends_new_mail_the_new_way_and_loses_nothing() {
    let _limit = hard_limit(Duration::from_secs(120));
    let upstream_a = Aiosmtpd::start(&[]);
    let upstream_b = Aiosmtpd::start(&[]);
    let routes = format!(
        "[[route]]\nrecipient_domains = [\"stuck.example\"]\nupstream = \"dead\"\n{}",
        crate::admin::ADMIN_ON
    );
    let mut server = Server::start(&ServerOptions::new().deliver().config(&upstreams(
        upstream_a.port(),
        upstream_b.port(),
        true,
        "a",
        &routes,
    )));
    let admin = crate::admin::admin_url(&server);

    let first = send(
        &server,
        "sender@example.com",
        &["rcpt@example.net"],
        &test_message("before-reload", "routed to a\n"),
    );
    let at_a = upstream_a.wait_for(1, DELIVERY_TIMEOUT);
    assert_eq!(at_a.len(), 1, "upstream a:\n{}", server.log());
    // Queued for an upstream that refuses connections: deferred, retried every second.
    let stuck = send(
        &server,
        "sender@example.com",
        &["someone@stuck.example"],
        &test_message(
            "stuck-before-reload",
            "queued on an upstream the reload removes\n",
        ),
    );
    let deferred = wait_until(DELIVERY_TIMEOUT, || {
        server
            .log()
            .lines()
            .any(|line| line.contains("deferred") && line.contains(&format!("id={stuck}")))
    });
    assert!(deferred, "{stuck} was not deferred:\n{}", server.log());

    // The new file: no `dead` upstream, no route to it, everything to b.
    server.rewrite_config(&upstreams(
        upstream_a.port(),
        upstream_b.port(),
        false,
        "b",
        crate::admin::ADMIN_ON,
    ));
    sighup_and_wait(&server, "configuration reloaded");
    assert!(
        server.try_wait().is_none(),
        "SIGHUP ended the server:\n{}",
        server.log()
    );

    let second = send(
        &server,
        "sender@example.com",
        &["rcpt@example.net"],
        &test_message("after-reload", "routed to b\n"),
    );
    let at_b = upstream_b.wait_for(2, DELIVERY_TIMEOUT);
    let subjects: Vec<String> = at_b
        .iter()
        .filter_map(|received| {
            received
                .text()
                .lines()
                .find(|line| line.starts_with("Subject: "))
                .map(str::to_string)
        })
        .collect();
    assert!(
        subjects.contains(&"Subject: after-reload".to_string())
            && subjects.contains(&"Subject: stuck-before-reload".to_string()),
        "upstream b got {subjects:?}\n{}",
        server.log()
    );
    assert_eq!(
        upstream_a.received().len(),
        1,
        "only the first message goes to a"
    );
    assert!(
        upstream_a.received()[0]
            .text()
            .contains("Subject: before-reload")
    );
    for id in [&first, &second, &stuck] {
        crate::assert_delivered_line(&server, id, DELIVERY_TIMEOUT);
    }
    // /metrics names the upstreams of the reloaded table: one delivered by a before
    // the reload, two by b after it (by the default route), and the stuck one's
    // deferrals on `dead` (the first route, retired).
    let delivered = |upstream: &str| {
        let scrape = crate::admin::one(crate::admin::get(format!("{admin}/metrics"), "prometheus"));
        crate::admin::sample(
            &scrape["body"],
            "tsubame_delivered_total",
            &[("route", "default"), ("upstream", upstream)],
        )
    };
    assert!(
        wait_until(DELIVERY_TIMEOUT, || delivered("b") == Some(2.0)),
        "delivered by b: {:?}",
        delivered("b")
    );
    assert_eq!(delivered("a"), Some(1.0));
    // The stuck message's deferrals count under the route that sent it to `dead` (the
    // first file's route 1), not under what routes it now.
    let scrape = crate::admin::one(crate::admin::get(format!("{admin}/metrics"), "prometheus"));
    let deferred = |route: &str| {
        crate::admin::sample(
            &scrape["body"],
            "tsubame_deferred_total",
            &[("route", route), ("upstream", "dead")],
        )
    };
    assert!(
        deferred("1").is_some_and(|count| count >= 1.0),
        "{}",
        scrape["raw"]
    );
    assert_eq!(deferred("default"), None, "{}", scrape["raw"]);
    server.stop();
}

#[test]
fn a_changed_upstream_delivers_after_sighup_and_keeps_one_metric_series() {
    let _limit = hard_limit(Duration::from_secs(120));
    let upstream_a = Aiosmtpd::start(&[]);
    let upstream_b = Aiosmtpd::start(&[]);
    let first_file = upstreams(
        upstream_a.port(),
        upstream_b.port(),
        false,
        "a",
        crate::admin::ADMIN_ON,
    );
    let server = Server::start(&ServerOptions::new().deliver().config(&first_file));
    let admin = crate::admin::admin_url(&server);
    let first = send(
        &server,
        "sender@example.com",
        &["rcpt@example.net"],
        &test_message("before-change", "through a\n"),
    );
    crate::assert_delivered_line(&server, &first, DELIVERY_TIMEOUT);
    // The same upstream `a`, one setting changed: a new pool for it, the old one retired.
    server.rewrite_config(&first_file.replacen("timeout_secs = 5", "timeout_secs = 7", 1));
    sighup_and_wait(&server, "configuration reloaded");
    assert!(
        server.log().contains("upstreams_added=1") && server.log().contains("upstreams_retired=1"),
        "{}",
        server.log()
    );
    let second = send(
        &server,
        "sender@example.com",
        &["rcpt@example.net"],
        &test_message("after-change", "through the changed a\n"),
    );
    crate::assert_delivered_line(&server, &second, DELIVERY_TIMEOUT);
    assert_eq!(upstream_a.wait_for(2, DELIVERY_TIMEOUT).len(), 2);
    // Both indexes of `a` add up in one series.
    let scrape = crate::admin::one(crate::admin::get(format!("{admin}/metrics"), "prometheus"));
    let series: Vec<&serde_json::Value> = scrape["body"]
        .as_array()
        .map(|samples| {
            samples
                .iter()
                .filter(|sample| {
                    sample[0] == "tsubame_delivered_total" && sample[1]["upstream"] == "a"
                })
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(series.len(), 1, "{}", scrape["raw"]);
    assert_eq!(series[0][2], 2.0, "{}", scrape["raw"]);
    server.stop();
}

#[test]
fn sighup_with_an_invalid_configuration_keeps_the_old_one_and_says_why() {
    let _limit = hard_limit(Duration::from_secs(90));
    let upstream_a = Aiosmtpd::start(&[]);
    let upstream_b = Aiosmtpd::start(&[]);
    let good = upstreams(upstream_a.port(), upstream_b.port(), false, "a", "");
    let server = Server::start(&ServerOptions::new().deliver().config(&good));

    // A route to an upstream that does not exist: the file does not load.
    server.rewrite_config(&format!(
        "{good}\n[[route]]\nrecipient_domains = [\"example.net\"]\nupstream = \"nowhere\"\n"
    ));
    sighup_and_wait(&server, "configuration not reloaded");
    let log = server.log();
    let refusal = log
        .lines()
        .find(|line| line.contains("configuration not reloaded"))
        .unwrap_or_default();
    assert!(
        refusal.contains("nowhere") && refusal.contains("previous configuration stays in use"),
        "the refusal does not say why: {refusal}"
    );
    assert!(
        !log.contains("configuration reloaded"),
        "the invalid file was put in force:\n{log}"
    );

    // Mail still flows on the old configuration (to a).
    let id = crate::send_with_smtplib(server.address(), &test_message("after-refusal", "to a\n"));
    assert_eq!(upstream_a.wait_for(1, DELIVERY_TIMEOUT).len(), 1);
    crate::assert_delivered_line(&server, &id, DELIVERY_TIMEOUT);
    assert!(upstream_b.received().is_empty());
    server.stop();
}

#[test]
fn sighup_lets_a_user_added_to_the_configuration_log_in() {
    let _limit = hard_limit(Duration::from_secs(120));
    let password = test_password("reload-user");
    let other = test_password("reload-other");
    // A trusted-LAN listener: AUTH without TLS, so the test needs no certificate.
    let config = |users: &str| {
        format!(
            "[[listener]]\naddress = \"127.0.0.1:2525\"\nrelay_networks = []\n\
             require_tls_for_auth = false\n\n{users}"
        )
    };
    let server =
        Server::start(&ServerOptions::new().config(&config(&user_entry("printer-3f", &other, ""))));
    let login = |user: &str, password: &str| {
        let outcomes = Smtplib::new(server.address())
            .ehlo()
            .login(user, password)
            .quit()
            .run_to_end();
        outcomes.get(1).and_then(|outcome| outcome.code)
    };
    assert_eq!(
        login("scanner-7q", &password),
        Some(535),
        "{}",
        server.log()
    );

    server.rewrite_config(&config(&format!(
        "{}{}",
        user_entry("printer-3f", &other, ""),
        user_entry("scanner-7q", &password, "")
    )));
    sighup_and_wait(&server, "configuration reloaded");
    assert!(
        server.log().contains("users=2"),
        "the reload line does not count the users:\n{}",
        server.log()
    );
    assert_eq!(
        login("scanner-7q", &password),
        Some(235),
        "{}",
        server.log()
    );
    assert_eq!(login("printer-3f", &other), Some(235), "{}", server.log());

    // A changed password: the old one, remembered by the login cache (it logged in
    // just above), no longer gets in; the new one does.
    let changed = test_password("reload-changed");
    server.rewrite_config(&config(&format!(
        "{}{}",
        user_entry("printer-3f", &changed, ""),
        user_entry("scanner-7q", &password, "")
    )));
    sighup_and_wait(&server, "configuration reloaded");
    assert_eq!(login("printer-3f", &other), Some(535), "{}", server.log());
    assert_eq!(login("printer-3f", &changed), Some(235), "{}", server.log());
    // A removed account is gone too, though it was remembered.
    server.rewrite_config(&config(&user_entry("printer-3f", &changed, "")));
    sighup_and_wait(&server, "configuration reloaded");
    assert_eq!(
        login("scanner-7q", &password),
        Some(535),
        "{}",
        server.log()
    );
    server.stop();
}
