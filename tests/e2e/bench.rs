//! `tsubame bench`: the load generator against tsubame itself and against Postfix's
//! `smtp-sink`, a sink nobody here wrote.

use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tsubame_tests::cli::{inspect, tsubame};
use tsubame_tests::process::{ChildGuard, hard_limit};
use tsubame_tests::server::{Server, ServerOptions};

/// The report's `key=value` fields.
fn field(report: &str, key: &str) -> String {
    report
        .split_whitespace()
        .find_map(|pair| pair.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {report:?}"))
        .to_string()
}

#[test]
fn bench_against_tsubame_every_message_is_spooled() {
    let _limit = hard_limit(Duration::from_secs(120));
    let server = Server::start(&ServerOptions::new());
    let target = server.address().to_string();
    for per_connection in ["1", "0"] {
        let run = tsubame(&[
            "bench",
            "--target",
            &target,
            "-n",
            "150",
            "-s",
            "2048",
            "-c",
            "8",
            "--per-connection",
            per_connection,
            "--quiet",
        ]);
        assert_eq!(run.code(), Some(0), "{}", run.describe());
        let report = run.stdout_text();
        assert_eq!(field(&report, "accepted"), "150", "{report}");
        assert_eq!(field(&report, "deferred"), "0", "{report}");
        assert!(
            field(&report, "latency_ms_p99").parse::<f64>().unwrap() > 0.0,
            "{report}"
        );
    }
    let inspection = inspect(server.spool());
    assert_eq!(inspection.ids().len(), 300, "{}", inspection.json);
}

#[test]
fn bench_against_postfix_smtp_sink() {
    const SMTP_SINK: &str = "/usr/sbin/smtp-sink";
    let _limit = hard_limit(Duration::from_secs(120));
    assert!(
        std::path::Path::new(SMTP_SINK).exists(),
        "{SMTP_SINK} is missing: install the Debian package postfix (scripts/test does)"
    );
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    let mut command = Command::new(SMTP_SINK);
    command
        .args(["-c", "-u", "root", &address.to_string(), "100"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _sink = ChildGuard::spawn(&mut command, "smtp-sink");
    let started = Instant::now();
    while std::net::TcpStream::connect(address).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "smtp-sink did not start listening"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let run = tsubame(&[
        "bench",
        "--target",
        &address.to_string(),
        "-n",
        "500",
        "-c",
        "10",
        "--quiet",
    ]);
    assert_eq!(run.code(), Some(0), "{}", run.describe());
    assert_eq!(field(&run.stdout_text(), "accepted"), "500");
}

#[test]
fn bench_counts_refusals_and_exits_1() {
    let _limit = hard_limit(Duration::from_secs(60));
    let mut command = Command::new(tsubame_tests::binary::tsubame());
    command
        .args([
            "sink",
            "--listen",
            "127.0.0.1:0",
            "--quiet",
            "--permfail-rate",
            "1",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut sink = ChildGuard::spawn(&mut command, "tsubame sink");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(sink.take_stderr().unwrap()),
        &mut line,
    )
    .unwrap();
    let address = line.trim().rsplit(' ').next().unwrap().to_string();
    let run = tsubame(&[
        "bench", "--target", &address, "-n", "20", "-c", "2", "--quiet",
    ]);
    assert_eq!(run.code(), Some(1), "{}", run.describe());
    let report = run.stdout_text();
    assert_eq!(
        (field(&report, "accepted"), field(&report, "failed")),
        ("0".to_string(), "20".to_string()),
        "{report}"
    );
}

/// A message the client refuses to send (an invalid sender) fails once and the run
/// ends. (Regression: the worker reconnected and retried it forever.)
#[test]
fn bench_with_an_invalid_sender_fails_every_message_and_ends() {
    let _limit = hard_limit(Duration::from_secs(60));
    let server = Server::start(&ServerOptions::new());
    let target = server.address().to_string();
    let run = tsubame(&[
        "bench",
        "--target",
        &target,
        "-n",
        "5",
        "-c",
        "2",
        "--from",
        "not an address",
        "--quiet",
    ]);
    assert_eq!(run.code(), Some(1), "{}", run.describe());
    let report = run.stdout_text();
    assert_eq!(
        (field(&report, "accepted"), field(&report, "failed")),
        ("0".to_string(), "5".to_string()),
        "{report}"
    );
}
