//! `tsubame sink`: counts what real clients send it and injects the failures it is told to.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use tsubame_tests::peers::Smtplib;
use tsubame_tests::process::{ChildGuard, hard_limit};

use crate::test_message;

/// How long a sink may take to print its listening line or to exit after `--count`.
const SINK_TIMEOUT: Duration = Duration::from_secs(20);

/// Starts `tsubame sink --listen 127.0.0.1:0 ARGS...` and returns it with its address.
fn start_sink(args: &[&str]) -> (ChildGuard, SocketAddr, std::thread::JoinHandle<String>) {
    let mut command = Command::new(tsubame_tests::binary::tsubame());
    command
        .args(["sink", "--listen", "127.0.0.1:0", "--quiet"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut sink = ChildGuard::spawn(&mut command, "tsubame sink");
    let stderr = sink.take_stderr().unwrap();
    let mut stderr = BufReader::new(stderr);
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    let address = line
        .trim()
        .strip_prefix("tsubame sink listening on ")
        .unwrap_or_else(|| panic!("unexpected first line from the sink: {line:?}"))
        .parse()
        .unwrap();
    let mut stdout = sink.take_stdout().unwrap();
    let output = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut text);
        text
    });
    (sink, address, output)
}

fn send(address: SocketAddr, subject: &str) -> Vec<tsubame_tests::peers::Outcome> {
    Smtplib::new(address)
        .ehlo()
        .mail("sender@example.com", &[])
        .rcpt("rcpt@example.net", &[])
        .data(&test_message(subject, "counted\n"))
        .quit()
        .run()
}

#[test]
fn sink_counts_messages_and_exits_after_count() {
    let _limit = hard_limit(Duration::from_secs(60));
    let (mut sink, address, output) = start_sink(&["--count", "3"]);
    for number in 0..3 {
        send(address, &format!("sink-{number}"))[3].expect(250, "2.0.0", "DATA");
    }
    let status = sink
        .wait_timeout(SINK_TIMEOUT)
        .expect("the sink exits after --count");
    assert!(status.success(), "{status}");
    let totals = output.join().unwrap();
    assert!(
        totals.starts_with("messages=3 recipients=3 ")
            && totals.contains("tempfailed=0 permfailed=0 dropped=0"),
        "{totals}"
    );
}

/// Starts a sink with `args`, sends one message, expects `code enhanced` at DATA, stops
/// the sink and expects its totals to contain `totals`.
fn expect_injected(args: &[&str], code: u16, enhanced: &str, totals: &str) {
    let (mut sink, address, output) = start_sink(args);
    send(address, "injected")[3].expect(code, enhanced, &format!("DATA with {args:?}"));
    sink.signal(tsubame_tests::process::Signal::TERM);
    assert!(
        sink.wait_timeout(SINK_TIMEOUT)
            .expect("the sink stops on SIGTERM")
            .success()
    );
    let output = output.join().unwrap();
    assert!(output.contains(totals), "{args:?}: {output}");
}

#[test]
fn sink_injects_temporary_and_permanent_failures() {
    let _limit = hard_limit(Duration::from_secs(60));
    expect_injected(
        &["--tempfail-rate", "1"],
        451,
        "4.3.0",
        "messages=0 recipients=0 bytes=0 tempfailed=1 permfailed=0",
    );
    expect_injected(
        &["--permfail-rate", "1"],
        550,
        "5.7.0",
        "tempfailed=0 permfailed=1 dropped=0",
    );
}
