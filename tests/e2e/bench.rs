//! `tsubame bench`: the load generator against tsubame itself, against Postfix's
//! `smtp-sink`, a sink nobody here wrote, and over STARTTLS and implicit TLS (with AUTH)
//! against aiosmtpd with the throwaway test PKI.

use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tsubame_tests::COMMAND_TIMEOUT;
use tsubame_tests::cli::{inspect, tsubame};
use tsubame_tests::pki::TestPki;
use tsubame_tests::process::{ChildGuard, Finished, hard_limit, run};
use tsubame_tests::server::{Server, ServerOptions};
use tsubame_tests::upstream::{Aiosmtpd, free_port};

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

/// Runs `tsubame bench ARGS...` with `TSUBAME_BENCH_PASSWORD` set to `password` when
/// given (the only way `--auth` takes a password).
#[track_caller]
fn bench_with_password(arguments: &[&str], password: Option<&str>) -> Finished {
    let mut command = Command::new(tsubame_tests::binary::tsubame());
    command
        .arg("bench")
        .args(arguments)
        .env_remove("RUST_LOG")
        .env_remove("TSUBAME_BENCH_PASSWORD")
        .env("NO_COLOR", "1");
    if let Some(password) = password {
        command.env("TSUBAME_BENCH_PASSWORD", password);
    }
    run(
        &mut command,
        None,
        COMMAND_TIMEOUT,
        &format!("tsubame bench {}", arguments.join(" ")),
    )
}

/// aiosmtpd (`tests/peers/upstream.py`) with the test PKI's certificate, the given TLS
/// flags, and AUTH required for `login` when given.
fn tls_peer(pki: &TestPki, tls_flags: &[&str], login: Option<(&str, &str)>) -> Aiosmtpd {
    let certificate = pki.certificate().display().to_string();
    let key = pki.key().display().to_string();
    let mut options = vec!["--cert", certificate.as_str(), "--key", key.as_str()];
    options.extend_from_slice(tls_flags);
    let mut environment = Vec::new();
    if let Some((username, password)) = login {
        options.push("--auth");
        environment.push(("TSUBAME_TEST_SMTP_USERNAME", username));
        environment.push(("TSUBAME_TEST_SMTP_PASSWORD", password));
    }
    Aiosmtpd::start_with_env(
        SocketAddr::from(([127, 0, 0, 1], free_port())),
        &options,
        &environment,
    )
}

/// A password made up for one test run (never a real secret).
fn generated_password() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos());
    format!("bench-pw-{nanos:x}-{}", std::process::id())
}

#[test]
fn bench_starttls_with_auth_against_aiosmtpd() {
    let _limit = hard_limit(Duration::from_secs(120));
    let pki = TestPki::new();
    let password = generated_password();
    let peer = tls_peer(
        &pki,
        &["--starttls", "--require-starttls"],
        Some(("bench-device", &password)),
    );
    let target = peer.address().to_string();
    let ca = pki.ca().display().to_string();

    // Set-up only: STARTTLS, handshake, EHLO, AUTH, QUIT; the certificate unverified.
    let handshakes = bench_with_password(
        &[
            "--target",
            &target,
            "--starttls",
            "--auth",
            "bench-device",
            "--handshakes",
            "-n",
            "20",
            "-c",
            "4",
            "--timeout",
            "10",
            "--quiet",
        ],
        Some(&password),
    );
    assert_eq!(handshakes.code(), Some(0), "{}", handshakes.describe());
    let report = handshakes.stdout_text();
    assert_eq!(field(&report, "handshakes"), "20", "{report}");
    assert_eq!(field(&report, "errors"), "0", "{report}");
    assert_eq!(
        field(&report, "resumed"),
        "0",
        "full handshakes by default: {report}"
    );
    assert!(field(&report, "tls").starts_with("TLSv1."), "{report}");
    assert!(field(&report, "handshakes_per_s").parse::<f64>().unwrap() > 0.0);
    assert!(field(&report, "latency_ms_p50").parse::<f64>().unwrap() > 0.0);
    assert!(peer.received().is_empty(), "--handshakes sends no mail");

    // Messages, the certificate verified against the test CA by name (SNI localhost).
    let messages = bench_with_password(
        &[
            "--target",
            &target,
            "--starttls",
            "--tls-ca",
            &ca,
            "--tls-name",
            "localhost",
            "--auth",
            "bench-device",
            "-n",
            "12",
            "-c",
            "3",
            "--per-connection",
            "0",
            "--timeout",
            "10",
            "--quiet",
        ],
        Some(&password),
    );
    assert_eq!(messages.code(), Some(0), "{}", messages.describe());
    let report = messages.stdout_text();
    assert_eq!(field(&report, "accepted"), "12", "{report}");
    assert!(field(&report, "tls").starts_with("TLSv1."), "{report}");
    let received = peer.wait_for(12, Duration::from_secs(20));
    for message in &received {
        assert!(
            message.envelope["tls"]
                .as_str()
                .unwrap_or("")
                .starts_with("TLSv1."),
            "not over TLS: {message:?}"
        );
        assert_eq!(message.envelope["auth_login"], "bench-device");
    }
    for run in [&handshakes, &messages] {
        assert!(
            !run.stdout_text().contains(&password) && !run.stderr_text().contains(&password),
            "the password was printed: {}",
            run.describe()
        );
    }
}

#[test]
fn bench_smtps_against_aiosmtpd() {
    let _limit = hard_limit(Duration::from_secs(120));
    let pki = TestPki::new();
    let peer = tls_peer(&pki, &["--implicit-tls"], None);
    let target = peer.address().to_string();
    let ca = pki.ca().display().to_string();
    let handshakes = tsubame(&[
        "bench",
        "--target",
        &target,
        "--smtps",
        "--tls-ca",
        &ca,
        "--handshakes",
        "-n",
        "10",
        "-c",
        "2",
        "--timeout",
        "10",
        "--quiet",
    ]);
    assert_eq!(handshakes.code(), Some(0), "{}", handshakes.describe());
    let report = handshakes.stdout_text();
    assert_eq!(field(&report, "handshakes"), "10", "{report}");
    assert!(field(&report, "tls").starts_with("TLSv1."), "{report}");
    let messages = tsubame(&[
        "bench",
        "--target",
        &target,
        "--smtps",
        "-n",
        "6",
        "-c",
        "2",
        "--timeout",
        "10",
        "--quiet",
    ]);
    assert_eq!(messages.code(), Some(0), "{}", messages.describe());
    assert_eq!(field(&messages.stdout_text(), "accepted"), "6");
    let received = peer.wait_for(6, Duration::from_secs(20));
    assert!(
        received[0].envelope["tls"]
            .as_str()
            .unwrap_or("")
            .starts_with("TLSv1.")
    );
}

/// A server without STARTTLS, a certificate from an unknown CA, or a peer that is not
/// TLS at all: each stops the run at once with the reason on stderr, exit 1, instead
/// of retrying (or falling back to plain text).
#[test]
fn bench_tls_failures_stop_the_run_with_the_reason() {
    let _limit = hard_limit(Duration::from_secs(120));
    let server = Server::start(&ServerOptions::new());
    let plain_target = server.address().to_string();

    // Plain set-up measurements against tsubame itself.
    let plain = tsubame(&[
        "bench",
        "--target",
        &plain_target,
        "--handshakes",
        "-n",
        "40",
        "-c",
        "4",
        "--timeout",
        "10",
        "--quiet",
    ]);
    assert_eq!(plain.code(), Some(0), "{}", plain.describe());
    let report = plain.stdout_text();
    assert_eq!(field(&report, "handshakes"), "40", "{report}");
    assert_eq!(field(&report, "tls"), "none", "{report}");

    let pki = TestPki::new();
    let peer = tls_peer(&pki, &["--starttls"], None);
    let other_ca = TestPki::new();
    let other_ca_file = other_ca.ca().display().to_string();
    let peer_target = peer.address().to_string();
    let cases: [(Vec<&str>, &str); 4] = [
        (
            vec!["--target", &plain_target, "--starttls", "--handshakes"],
            "does not offer STARTTLS",
        ),
        (
            vec!["--target", &plain_target, "--starttls"],
            "does not offer STARTTLS",
        ),
        (
            vec![
                "--target",
                &peer_target,
                "--starttls",
                "--tls-ca",
                &other_ca_file,
            ],
            "TLS handshake",
        ),
        (
            vec!["--target", &plain_target, "--smtps", "--handshakes"],
            "TLS handshake",
        ),
    ];
    for (arguments, reason) in cases {
        let mut arguments = arguments;
        arguments.extend(["-n", "200", "-c", "4", "--timeout", "10", "--quiet"]);
        let started = Instant::now();
        let run = bench_with_password(&arguments, None);
        assert_eq!(run.code(), Some(1), "{}", run.describe());
        assert!(
            run.stderr_text().contains("bench stopped") && run.stderr_text().contains(reason),
            "{reason:?} expected: {}",
            run.describe()
        );
        // Stopped at the first failures, not after each worker's 50 retries (5 s).
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "took {:?}: {}",
            started.elapsed(),
            run.describe()
        );
    }
    assert!(peer.received().is_empty());
    let inspection = inspect(server.spool());
    assert!(inspection.ids().is_empty(), "{}", inspection.json);
}

#[test]
fn bench_auth_needs_tls_and_a_password_from_the_environment() {
    let _limit = hard_limit(Duration::from_secs(30));
    let cases: [(&[&str], Option<&str>, &str); 3] = [
        (
            &["--auth", "someone"],
            Some("x"),
            "--auth needs --starttls or --smtps",
        ),
        (
            &["--auth", "someone", "--starttls"],
            None,
            "TSUBAME_BENCH_PASSWORD",
        ),
        (
            &["--tls-ca", "/nonexistent.pem"],
            None,
            "need --starttls or --smtps",
        ),
    ];
    for (arguments, password, message) in cases {
        // Port 9 on loopback: nothing must be sent before the options are checked.
        let mut arguments = arguments.to_vec();
        arguments.extend(["--target", "127.0.0.1:9", "-n", "1", "--quiet"]);
        let run = bench_with_password(&arguments, password);
        assert_eq!(run.code(), Some(1), "{}", run.describe());
        assert!(
            run.stderr_text().contains(message),
            "{message:?}: {}",
            run.describe()
        );
    }
}
