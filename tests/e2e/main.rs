//! End-to-end tests: the real `tsubame` binary over loopback, driven by real SMTP peers
//! (Python's smtplib, swaks) and, for byte sequences no real client sends, a raw socket.
//!
//! Every test starts with `hard_limit(...)`, its watchdog; every wait inside has its own
//! deadline. Nothing is skipped: a missing peer fails the test with what to install.

// A test binary: a panic with a message is how a test fails, so `unwrap`/`expect` on
// set-up steps (temporary directories, fixtures) are the right tool here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod admin;
mod basic;
mod bench;
mod cli;
mod crash;
mod delivery;
mod delivery_log;
mod delivery_restart;
mod disk_full;
mod dkim;
mod examples;
mod gmail;
mod limits;
mod login;
mod login_limits;
mod quota;
mod relay;
mod relay_services;
mod reload;
mod sink;
mod smuggling;
mod spool;
mod trace;

use std::net::SocketAddr;
use std::path::Path;

use tsubame_tests::cli::inspect;
use tsubame_tests::peers::Smtplib;

/// A small test message with CRLF line endings.
pub fn test_message(subject: &str, body: &str) -> Vec<u8> {
    tsubame_tests::crlf(&format!(
        "From: sender@example.com\nTo: rcpt@example.net\nSubject: {subject}\n\
         Message-Id: <{subject}@e2e.tsubame.test>\n\n{body}"
    ))
}

/// Sends one message with smtplib (EHLO, MAIL, RCPT, DATA, QUIT) and returns its id.
#[track_caller]
pub fn send_with_smtplib(address: SocketAddr, message: &[u8]) -> String {
    send_from(address, "sender@example.com", &[], message)
}

/// [`send_with_smtplib`] from `from` with MAIL parameters (`BODY=8BITMIME`).
#[track_caller]
pub fn send_from(address: SocketAddr, from: &str, parameters: &[&str], message: &[u8]) -> String {
    let outcomes = Smtplib::new(address)
        .ehlo()
        .mail(from, parameters)
        .rcpt("rcpt@example.net", &[])
        .data(message)
        .quit()
        .run();
    let data = outcomes
        .get(3)
        .unwrap_or_else(|| panic!("smtplib session ended early: {outcomes:?}"));
    data.expect(250, "2.0.0", "DATA");
    data.queued_id()
}

/// Waits for the server's log to say message `id` was delivered; fails after `timeout`.
#[track_caller]
pub fn assert_delivered_line(
    server: &tsubame_tests::server::Server,
    id: &str,
    timeout: std::time::Duration,
) {
    let logged = tsubame_tests::upstream::wait_until(timeout, || {
        server.log().contains(&format!("delivered id={id}"))
    });
    assert!(logged, "no delivered line for {id}:\n{}", server.log());
}

/// Asserts the spool holds exactly the messages `ids` (in any order).
#[track_caller]
pub fn assert_spool_ids(spool: &Path, ids: &[&str]) {
    let inspection = inspect(spool);
    let mut listed = inspection.ids();
    listed.sort();
    let mut expected: Vec<String> = ids.iter().map(|id| id.to_string()).collect();
    expected.sort();
    assert_eq!(
        listed, expected,
        "spool messages differ from the acknowledged ones; spool inspect --json:\n{}",
        inspection.json
    );
}
