//! `tsubame trace`: a trace process against a running server, while smtplib sends.
//!
//! Each trace runs as a child process whose standard output and error are collected by
//! threads; it is stopped with SIGINT (Ctrl-C) and, failing that, killed.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tsubame_tests::cli::tsubame;
use tsubame_tests::process::{ChildGuard, Signal, hard_limit};
use tsubame_tests::server::{Server, ServerOptions};
use tsubame_tests::upstream::wait_until;

use crate::{send_with_smtplib, test_message};

/// How long a trace may take to start, to show a line, or to end.
const TRACE_TIMEOUT: Duration = Duration::from_secs(10);

/// A line of the test message's body, which a trace must never show.
const BODY_LINE: &str = "trace-e2e body line 5a1c: not for the administrator's eyes";

/// A running `tsubame trace`.
struct Trace {
    child: ChildGuard,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

fn collect(reader: Option<impl Read + Send + 'static>) -> Arc<Mutex<String>> {
    let text = Arc::new(Mutex::new(String::new()));
    let writer = Arc::clone(&text);
    std::thread::spawn(move || {
        let Some(mut reader) = reader else { return };
        let mut buffer = [0_u8; 4096];
        while let Ok(length @ 1..) = reader.read(&mut buffer) {
            writer
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push_str(&String::from_utf8_lossy(&buffer[..length]));
        }
    });
    text
}

impl Trace {
    /// Starts `tsubame trace ARGUMENTS --spool SPOOL` and waits until it says it is
    /// tracing, which it does once the server has registered the trace.
    fn start(server: &Server, arguments: &[&str]) -> Trace {
        let mut command = Command::new(tsubame_tests::binary::tsubame());
        command
            .arg("trace")
            .args(arguments)
            .arg("--spool")
            .arg(server.spool())
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = ChildGuard::spawn(&mut command, format!("tsubame trace {arguments:?}"));
        let stdout = collect(child.take_stdout());
        let stderr = collect(child.take_stderr());
        let trace = Trace {
            child,
            stdout,
            stderr,
        };
        assert!(
            wait_until(TRACE_TIMEOUT, || trace
                .stderr()
                .contains("(Ctrl-C to stop)")),
            "the trace did not start\n{}\n--- server log ---\n{}",
            trace.describe(),
            server.log()
        );
        trace
    }

    fn stdout(&self) -> String {
        self.stdout
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn describe(&self) -> String {
        format!(
            "--- {} stdout ---\n{}\n--- stderr ---\n{}",
            self.child.what(),
            self.stdout(),
            self.stderr()
        )
    }

    /// Waits until a trace line satisfies `wanted`.
    fn wait_for_line(&self, wanted: impl Fn(&TraceLine<'_>) -> bool) -> bool {
        wait_until(TRACE_TIMEOUT, || {
            self.stdout()
                .lines()
                .filter_map(TraceLine::parse)
                .any(|line| wanted(&line))
        })
    }

    /// Ctrl-C, then reap; killed if it does not end in time.
    fn interrupt(&mut self) {
        self.child.signal(Signal::INT);
        if self.child.wait_timeout(TRACE_TIMEOUT).is_none() {
            self.child.kill();
            panic!("the trace did not end on SIGINT\n{}", self.describe());
        }
    }
}

/// One line of a trace: `TIMESTAMP CLIENT [USER] MARKER TEXT`.
#[derive(Debug)]
struct TraceLine<'a> {
    client: &'a str,
    user: Option<&'a str>,
    marker: &'a str,
    text: &'a str,
}

impl<'a> TraceLine<'a> {
    fn parse(line: &'a str) -> Option<Self> {
        let (timestamp, rest) = line.split_once(' ')?;
        let (client, rest) = rest.split_once(' ')?;
        let (user, rest) = match rest.strip_prefix('[') {
            Some(bracketed) => {
                let (user, rest) = bracketed.split_once("] ")?;
                (Some(user), rest)
            }
            None => (None, rest),
        };
        let (marker, text) = rest.split_once(' ').unwrap_or((rest, ""));
        let well_formed = timestamp.len() == 24
            && timestamp.ends_with('Z')
            && timestamp.as_bytes().get(10) == Some(&b'T')
            && ["C:", "S:", "*"].contains(&marker);
        well_formed.then_some(TraceLine {
            client,
            user,
            marker,
            text,
        })
    }

    /// A client command whose text starts with `prefix`, in any case (smtplib sends
    /// `mail FROM:<...>`, `data`, `quit`).
    fn is_command(&self, prefix: &str) -> bool {
        self.marker == "C:"
            && self
                .text
                .get(..prefix.len())
                .is_some_and(|start| start.eq_ignore_ascii_case(prefix))
    }

    fn is_reply(&self, code: &str) -> bool {
        self.marker == "S:" && self.text.starts_with(code)
    }
}

#[test]
fn a_client_trace_shows_the_conversation_but_not_the_message() {
    let _limit = hard_limit(Duration::from_secs(90));
    let server = Server::start(&ServerOptions::new());
    let mut trace = Trace::start(&server, &["--client", "127.0.0.1"]);
    let message = test_message("trace-e2e", &format!("{BODY_LINE}\nsecond line\n"));
    send_with_smtplib(server.address(), &message);
    let quit_answered = trace.wait_for_line(|line| line.is_reply("221"));
    trace.interrupt();
    let output = trace.stdout();
    assert!(
        quit_answered,
        "the trace never showed the reply to QUIT (the event loops must call the \
         observer)\n{}\n--- server log ---\n{}",
        trace.describe(),
        server.log()
    );
    let lines: Vec<TraceLine<'_>> = output
        .lines()
        .map(|text| {
            TraceLine::parse(text)
                .unwrap_or_else(|| panic!("not a trace line: {text:?}\n{}", trace.describe()))
        })
        .collect();
    for line in &lines {
        assert!(
            line.client.starts_with("127.0.0.1:"),
            "another client's line: {line:?}"
        );
        assert_eq!(line.user, None, "nobody logged in: {line:?}");
    }
    for secret in [BODY_LINE, "Subject: trace-e2e", "second line"] {
        assert!(
            !output.contains(secret),
            "the trace shows message content ({secret:?})\n{}",
            trace.describe()
        );
    }
    let shows = |what: &str, wanted: &dyn Fn(&TraceLine<'_>) -> bool| {
        assert!(
            lines.iter().any(wanted),
            "the trace does not show {what}\n{}",
            trace.describe()
        );
    };
    shows("the connection", &|line| {
        line.marker == "*" && line.text.starts_with("connected to 127.0.0.1:")
    });
    shows("the greeting", &|line| {
        line.is_reply("220 ") && line.text.ends_with("ESMTP tsubame")
    });
    shows("EHLO", &|line| line.is_command("EHLO "));
    shows("a 250 reply", &|line| line.is_reply("250"));
    shows("MAIL FROM", &|line| {
        line.is_command("MAIL FROM:<sender@example.com>")
    });
    shows("RCPT TO", &|line| {
        line.is_command("RCPT TO:<rcpt@example.net>")
    });
    shows("DATA", &|line| line.is_command("DATA"));
    // The size is not pinned down: as received or as spooled, it is a size.
    shows("the message content note", &|line| {
        line.marker == "*"
            && line
                .text
                .strip_prefix("message content: ")
                .and_then(|rest| rest.strip_suffix(" bytes"))
                .is_some_and(|size| size.parse::<u64>().is_ok())
    });
    shows("QUIT", &|line| line.is_command("QUIT"));
    assert!(
        wait_until(TRACE_TIMEOUT, || server
            .log()
            .contains("trace stopped client=127.0.0.1")),
        "no `trace stopped` log line\n--- server log ---\n{}",
        server.log()
    );
    server.stop();
}

#[test]
fn a_user_trace_does_not_show_another_clients_conversation() {
    let _limit = hard_limit(Duration::from_secs(90));
    let server = Server::start(&ServerOptions::new());
    let mut by_user = Trace::start(&server, &["--user", "nobody"]);
    // Shows that lines flow, so that the silence of the user trace means something.
    let mut by_client = Trace::start(&server, &["--client", "127.0.0.1"]);
    send_with_smtplib(server.address(), &test_message("trace-user", "body\n"));
    let seen = by_client.wait_for_line(|line| line.is_reply("221"));
    // Lines go to every matching trace at once; give the user trace's writer a moment.
    std::thread::sleep(Duration::from_millis(500));
    by_client.interrupt();
    by_user.interrupt();
    assert!(
        seen,
        "the client trace never showed the reply to QUIT (the event loops must call the \
         observer)\n{}\n--- server log ---\n{}",
        by_client.describe(),
        server.log()
    );
    assert_eq!(
        by_user.stdout(),
        "",
        "a trace of user nobody showed an unauthenticated client\n{}",
        by_user.describe()
    );
    server.stop();
}

#[test]
fn a_trace_starts_on_the_servers_socket_and_ends_with_the_server() {
    let _limit = hard_limit(Duration::from_secs(90));
    // Stopped without being dropped at the end: its spool directory must outlive the
    // checks after the stop.
    let mut server = Server::start(&ServerOptions::new());
    let socket = server.spool().join("trace.sock");
    let mode = std::fs::metadata(&socket)
        .unwrap_or_else(|error| panic!("{}: {error}", socket.display()))
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "{}", socket.display());

    let mut interrupted = Trace::start(&server, &["--user", "scanner-3f"]);
    assert!(
        interrupted
            .stderr()
            .starts_with("tracing user scanner-3f (Ctrl-C to stop)\n"),
        "{}",
        interrupted.describe()
    );
    assert!(
        wait_until(TRACE_TIMEOUT, || server
            .log()
            .contains("trace started user=scanner-3f")),
        "--- server log ---\n{}",
        server.log()
    );
    interrupted.interrupt();
    assert!(
        wait_until(TRACE_TIMEOUT, || server
            .log()
            .contains("trace stopped user=scanner-3f")),
        "the server did not notice the trace end\n--- server log ---\n{}",
        server.log()
    );

    let mut running = Trace::start(&server, &["--client", "::ffff:127.0.0.1"]);
    assert!(
        running
            .stderr()
            .starts_with("tracing client 127.0.0.1 (Ctrl-C to stop)\n"),
        "{}",
        running.describe()
    );
    server.send_terminate();
    let status = running.child.wait_timeout(TRACE_TIMEOUT);
    assert!(
        status.is_some_and(|status| status.success()),
        "the trace did not end with the server ({status:?})\n{}",
        running.describe()
    );
    assert!(
        running.stderr().contains("trace ended"),
        "{}",
        running.describe()
    );
    assert!(
        wait_until(TRACE_TIMEOUT, || !socket.exists()),
        "{} is left after the traces ended",
        socket.display()
    );
    no_server_is_reported_clearly(server.spool());
    let status = server.wait_exit();
    assert!(status.success(), "tsubame serve exited with {status}");
}

/// `spool` is a directory without a running server.
fn no_server_is_reported_clearly(spool: &Path) {
    let run = tsubame(&[
        "trace",
        "--client",
        "127.0.0.1",
        "--spool",
        &spool.display().to_string(),
    ]);
    run.assert_code(1);
    let expected = format!(
        "no tsubame is running with spool {} (no {})",
        spool.display(),
        spool.join("trace.sock").display()
    );
    assert!(run.stderr_text().contains(&expected), "{}", run.describe());
}

#[test]
fn trace_without_a_server_or_with_bad_arguments_fails_clearly() {
    let _limit = hard_limit(Duration::from_secs(60));
    let run = tsubame(&["trace", "--client", "127.0.0.1", "--spool", "/nonexistent"]);
    run.assert_code(1);
    assert!(
        run.stderr_text()
            .contains("no tsubame is running with spool /nonexistent (no /nonexistent/trace.sock)"),
        "{}",
        run.describe()
    );
    let cases: &[(&[&str], &str)] = &[
        (&["trace", "--client", "192.0.2.300"], "invalid IP address"),
        (&["trace", "--client", "192.0.2.7:25"], "invalid IP address"),
        (&["trace"], "--client <IP>|--user <NAME>"),
        (
            &["trace", "--client", "192.0.2.7", "--user", "scanner-3f"],
            "cannot be used with",
        ),
        (&["trace", "--user", ""], "1 to 255 bytes"),
        (
            &["trace", "--user", "a", "--spool", "/a", "--config", "/b"],
            "cannot be used with",
        ),
    ];
    for (arguments, reason) in cases {
        let run = tsubame(arguments);
        run.assert_code(2);
        assert!(run.stderr_text().contains(reason), "{}", run.describe());
    }
    let help = tsubame(&["trace", "--help"]);
    help.assert_code(0);
    for text in ["--client <IP>", "--user <NAME>", "--spool", "Ctrl-C", "***"] {
        assert!(help.stdout_text().contains(text), "{}", help.describe());
    }
}
