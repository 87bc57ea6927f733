//! `tsubame trace`: watch one device's SMTP conversation live, through the running
//! server's trace socket `<spool directory>/trace.sock` (mode 0600: only the user
//! tsubame runs as may watch).
//!
//! The protocol, one trace per connection: the client sends one JSON line,
//! `{"client":"192.0.2.7"}` or `{"user":"scanner-3f"}`. The server answers `ok`, or
//! `error: MESSAGE` and closes. After `ok` it sends each line of the conversations that
//! match, as they happen, until either side closes:
//!
//! ```text
//! 2026-11-26T11:30:01.123Z 192.0.2.7:51234 C: EHLO printer
//! 2026-11-26T11:30:01.124Z 192.0.2.7:51234 S: 250-relay.example.com
//! 2026-11-26T11:30:01.250Z 192.0.2.7:51234 [scanner-3f] * authenticated as scanner-3f
//! ... 12 lines dropped (the trace reader is too slow)
//! ```
//!
//! The timestamp is UTC with milliseconds; the user appears once the session has logged
//! in; `C:` is the client, `S:` the server, `*` a note. Control characters in the text
//! arrive escaped. The server side is [`hub`].

pub(crate) mod hub;

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::ArgGroup;

/// The socket's file name inside the spool directory.
pub(crate) const TRACE_SOCKET_NAME: &str = "trace.sock";

/// How long the client waits for the server to accept or refuse its request.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// The socket path for a spool directory.
pub(crate) fn socket_path(spool_directory: &Path) -> PathBuf {
    spool_directory.join(TRACE_SOCKET_NAME)
}

/// Which conversations a trace shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Filter {
    /// Every connection from this address, whatever its port. Invariant: canonical (an
    /// IPv4-mapped IPv6 address is held as the IPv4 address), as client addresses are
    /// compared canonical.
    Client(IpAddr),
    /// Sessions logged in as this user (exact, case-sensitive, as logins are). Invariant:
    /// a valid user name (`check_user_name`), so it holds no control characters.
    User(String),
}

impl Filter {
    /// Parses a request line (without its newline). The error is told to the client.
    pub(crate) fn parse_request(line: &str) -> Result<Self, String> {
        const EXPECTED: &str = r#"send {"client":"IP"} or {"user":"NAME"}"#;
        let value: serde_json::Value = serde_json::from_str(line)
            .map_err(|error| format!("bad request ({error}); {EXPECTED}"))?;
        let Some(object) = value.as_object() else {
            return Err(format!("bad request (not a JSON object); {EXPECTED}"));
        };
        match (object.len(), object.get("client"), object.get("user")) {
            (1, Some(serde_json::Value::String(client)), None) => client
                .parse::<IpAddr>()
                .map(|ip| Self::Client(ip.to_canonical()))
                .map_err(|_| format!("bad request: {client:?} is not an IP address")),
            (1, None, Some(serde_json::Value::String(name))) => {
                tsubame_config::users::check_user_name(name)
                    .map_err(|message| format!("bad request: {message}"))?;
                Ok(Self::User(name.clone()))
            }
            _ => Err(format!(
                "bad request: one key, client or user, with a string; {EXPECTED}"
            )),
        }
    }

    /// The request line for this filter, with its newline.
    pub(crate) fn request_line(&self) -> String {
        let request = match self {
            Self::Client(ip) => serde_json::json!({ "client": ip.to_string() }),
            Self::User(name) => serde_json::json!({ "user": name }),
        };
        format!("{request}\n")
    }

    /// Whether a conversation of `client`, logged in as `user` if at all, matches.
    pub(crate) fn matches(&self, client: IpAddr, user: Option<&str>) -> bool {
        match self {
            Self::Client(ip) => client.to_canonical() == *ip,
            Self::User(name) => user == Some(name.as_str()),
        }
    }
}

impl std::fmt::Display for Filter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Client(ip) => write!(f, "client {ip}"),
            Self::User(name) => write!(f, "user {name}"),
        }
    }
}

#[derive(Debug, clap::Args)]
#[command(
    group(ArgGroup::new("filter").required(true).args(["client", "user"])),
    after_help = "Example, while pressing \"send\" on the device:\n  \
        $ tsubame trace --client 192.0.2.7\n  \
        tracing client 192.0.2.7 (Ctrl-C to stop)\n  \
        2026-11-26T11:30:01.101Z 192.0.2.7:51234 * connected to 192.0.2.1:25\n  \
        2026-11-26T11:30:01.102Z 192.0.2.7:51234 S: 220 relay.example.com ESMTP\n  \
        2026-11-26T11:30:01.123Z 192.0.2.7:51234 C: EHLO printer\n  \
        2026-11-26T11:30:01.124Z 192.0.2.7:51234 S: 250-relay.example.com\n  \
        ...\n  \
        2026-11-26T11:30:01.290Z 192.0.2.7:51234 C: AUTH PLAIN ***\n  \
        2026-11-26T11:30:01.301Z 192.0.2.7:51234 * authenticated as scanner-3f\n  \
        2026-11-26T11:30:01.302Z 192.0.2.7:51234 [scanner-3f] C: MAIL FROM:<scan@example.com>\n\n\
        C: is the device, S: is tsubame, * a note (connected, TLS, logged in, message \
        size, disconnected). Passwords show as *** and message content only as its size. \
        Control characters the device sends are shown escaped (\\x1b). A reader too slow \
        for the conversation is told how many lines it missed.\n\n\
        The server must be running: this connects to <spool directory>/trace.sock, which \
        only the user tsubame runs as may open. At most 16 traces run at once."
)]
pub struct TraceArgs {
    /// Watch every connection from this address (IPv4 or IPv6), whatever its port.
    #[arg(long, value_name = "IP")]
    client: Option<IpAddr>,
    /// Watch the sessions of this device account (SMTP AUTH login). A session shows from
    /// the moment it has logged in as NAME; use --client to see its start.
    #[arg(long, value_name = "NAME", value_parser = parse_user_name)]
    user: Option<String>,
    /// The running server's spool directory (its trace.sock is there).
    #[arg(long, value_name = "DIR")]
    spool: Option<PathBuf>,
    /// The running server's configuration file (its spool directory locates the socket).
    /// Without it and without --spool, the embedded default's ./spool.
    #[arg(short, long, value_name = "FILE", conflicts_with = "spool")]
    config: Option<PathBuf>,
}

fn parse_user_name(name: &str) -> Result<String, String> {
    tsubame_config::users::check_user_name(name).map(|()| name.to_string())
}

pub fn run(args: TraceArgs) -> anyhow::Result<ExitCode> {
    let filter = match (args.client, args.user) {
        (Some(ip), _) => Filter::Client(ip.to_canonical()),
        (None, Some(name)) => Filter::User(name),
        // clap's required group rules this out.
        (None, None) => anyhow::bail!("give --client IP or --user NAME"),
    };
    let directory =
        crate::queue::running_server_spool(args.spool.as_deref(), args.config.as_deref())?;
    let path = socket_path(&directory);
    let stream = match UnixStream::connect(&path) {
        Ok(stream) => stream,
        Err(error) if matches!(error.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => {
            anyhow::bail!(
                "no tsubame is running with spool {} (no {})",
                directory.display(),
                path.display()
            )
        }
        Err(error) if error.kind() == ErrorKind::ConnectionRefused => anyhow::bail!(
            "no tsubame is running with spool {} (nothing listens on {})",
            directory.display(),
            path.display()
        ),
        Err(error) => {
            return Err(error).with_context(|| format!("cannot connect to {}", path.display()));
        }
    };
    let mut reader = request_trace(&stream, &filter)
        .with_context(|| format!("trace socket {}", path.display()))?;
    eprintln!("tracing {filter} (Ctrl-C to stop)");
    copy_lines(&mut reader).with_context(|| format!("trace socket {}", path.display()))?;
    eprintln!("trace ended: the server closed it (tsubame stopped?)");
    Ok(ExitCode::SUCCESS)
}

/// Sends the request and reads the answer: the reader positioned at the first trace
/// line, or the server's refusal as the error.
fn request_trace<'stream>(
    stream: &'stream UnixStream,
    filter: &Filter,
) -> anyhow::Result<BufReader<&'stream UnixStream>> {
    stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    stream.set_write_timeout(Some(ANSWER_TIMEOUT))?;
    let mut writer = stream;
    writer.write_all(filter.request_line().as_bytes())?;
    let mut reader = BufReader::new(stream);
    let mut answer = String::new();
    match reader.read_line(&mut answer) {
        Ok(_) => {}
        Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            anyhow::bail!("the server did not answer within {ANSWER_TIMEOUT:?}")
        }
        Err(error) => return Err(error.into()),
    }
    match answer.trim_end() {
        "ok" => {}
        "" => anyhow::bail!("the server closed the connection without answering"),
        refusal => match refusal.strip_prefix("error: ") {
            Some(message) => anyhow::bail!("{message}"),
            None => anyhow::bail!("unexpected answer {refusal:?}"),
        },
    }
    // From here the stream waits for lines as long as it takes.
    stream.set_read_timeout(None)?;
    Ok(reader)
}

/// Copies the trace to standard output, each line as soon as it arrives, until the
/// server closes. A closed standard output (`| head`) ends it quietly.
fn copy_lines(reader: &mut BufReader<&UnixStream>) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    loop {
        let chunk = match reader.fill_buf() {
            Ok([]) => return Ok(()),
            Ok(chunk) => chunk,
            Err(error) if error.kind() == ErrorKind::Interrupted => continue,
            Err(error) => return Err(error.into()),
        };
        let length = chunk.len();
        match out.write_all(chunk).and_then(|()| out.flush()) {
            Ok(()) => reader.consume(length),
            Err(error) if error.kind() == ErrorKind::BrokenPipe => return Ok(()),
            Err(error) => return Err(error).context("writing to standard output"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_into_filters() {
        let client = |text: &str| Ok(Filter::Client(text.parse().unwrap()));
        let cases: &[(&str, Result<Filter, String>)] = &[
            (r#"{"client":"192.0.2.7"}"#, client("192.0.2.7")),
            (r#"{"client":"2001:db8::7"}"#, client("2001:db8::7")),
            // An IPv4-mapped address is the IPv4 client a dual-stack listener reports.
            (r#"{"client":"::ffff:192.0.2.7"}"#, client("192.0.2.7")),
            (
                r#"{"user":"scanner-3f"}"#,
                Ok(Filter::User("scanner-3f".to_string())),
            ),
            (
                r#"{"user":"Scanner 3F ü"}"#,
                Ok(Filter::User("Scanner 3F ü".to_string())),
            ),
        ];
        for (line, expected) in cases {
            assert_eq!(&Filter::parse_request(line), expected, "{line}");
        }
    }

    #[test]
    fn malformed_requests_are_refused_with_a_reason() {
        let cases: &[(&str, &str)] = &[
            ("", "bad request ("),
            ("client=192.0.2.7", "bad request ("),
            ("[]", "not a JSON object"),
            ("{}", "one key"),
            (r#"{"client":"192.0.2.7","user":"a"}"#, "one key"),
            (r#"{"client":"192.0.2.7","extra":1}"#, "one key"),
            (r#"{"client":7}"#, "one key"),
            (r#"{"host":"192.0.2.7"}"#, "one key"),
            (r#"{"client":"192.0.2.700"}"#, "is not an IP address"),
            (r#"{"client":"192.0.2.7:25"}"#, "is not an IP address"),
            (r#"{"user":""}"#, "1 to 255 bytes"),
            (r#"{"user":"a\u001b[31m"}"#, "control characters"),
        ];
        for (line, reason) in cases {
            match Filter::parse_request(line) {
                Ok(filter) => panic!("{line:?} parsed as {filter:?}"),
                Err(message) => assert!(
                    message.contains(reason),
                    "{line:?}: {message:?} does not say {reason:?}"
                ),
            }
        }
    }

    #[test]
    fn request_lines_round_trip() {
        for filter in [
            Filter::Client("192.0.2.7".parse().unwrap()),
            Filter::Client("2001:db8::7".parse().unwrap()),
            Filter::User("scanner \"3f\"".to_string()),
        ] {
            let line = filter.request_line();
            assert!(line.ends_with('\n') && line.matches('\n').count() == 1);
            assert_eq!(Filter::parse_request(line.trim_end()), Ok(filter));
        }
    }

    #[test]
    fn filters_match_the_ip_at_any_port_and_the_exact_user() {
        let device: IpAddr = "192.0.2.7".parse().unwrap();
        let other: IpAddr = "192.0.2.8".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        let by_client = Filter::Client(device);
        assert!(by_client.matches(device, None));
        assert!(by_client.matches(device, Some("anyone")));
        assert!(by_client.matches(mapped, None));
        assert!(!by_client.matches(other, None));
        let by_user = Filter::User("scanner-3f".to_string());
        assert!(by_user.matches(other, Some("scanner-3f")));
        assert!(!by_user.matches(device, None), "not logged in yet");
        assert!(!by_user.matches(device, Some("Scanner-3f")), "case matters");
        assert!(!by_user.matches(device, Some("scanner-3")));
    }
}
