use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tsubame_server::conversation::{Direction, Observer};

use super::{Limits, TraceHub, TraceServer, Watcher, dropped_notice, format_line, push_escaped};
use crate::trace::Filter;

/// Every wait in these tests; none should come near it.
const TIMEOUT: Duration = Duration::from_secs(10);

/// 2026-11-26T11:30:01.123Z.
const EXAMPLE_UNIX_MS: u64 = 1_795_692_601_123;

fn address(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn start(limits: Limits) -> (tempfile::TempDir, TraceServer, TraceHub) {
    let directory = tempfile::tempdir().unwrap();
    let server = TraceServer::start_with_limits(directory.path(), limits).unwrap();
    let hub = server.hub.clone();
    (directory, server, hub)
}

fn wait_until(mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + TIMEOUT;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    condition()
}

/// A `tsubame trace` client.
struct Client {
    reader: BufReader<UnixStream>,
}

impl Client {
    /// Connects and sends `request` (a line without its newline).
    fn send(spool: &Path, request: &str) -> Self {
        let mut stream = UnixStream::connect(super::super::socket_path(spool)).unwrap();
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        stream.write_all(format!("{request}\n").as_bytes()).unwrap();
        Self {
            reader: BufReader::new(stream),
        }
    }

    /// Connects with a request the hub accepts.
    fn watch(spool: &Path, filter: &Filter) -> Self {
        let mut client = Self::send(spool, filter.request_line().trim_end());
        assert_eq!(client.line(), "ok\n");
        client
    }

    /// The next line, with its newline; empty at the end of the stream.
    fn line(&mut self) -> String {
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        line
    }

    /// The next trace line without its timestamp, after checking the timestamp's shape.
    fn untimed_line(&mut self) -> String {
        let line = self.line();
        let (timestamp, rest) = line
            .split_once(' ')
            .unwrap_or_else(|| panic!("no timestamp in {line:?}"));
        assert!(
            timestamp.len() == 24
                && timestamp.ends_with('Z')
                && timestamp.as_bytes()[10] == b'T'
                && timestamp.as_bytes()[19] == b'.',
            "timestamp {timestamp:?} in {line:?}"
        );
        rest.to_string()
    }
}

#[test]
fn lines_are_formatted_with_time_client_user_and_marker() {
    let cases: &[(&str, Option<&str>, Direction, &str, &str)] = &[
        (
            "192.0.2.7:51234",
            None,
            Direction::Client,
            "EHLO printer",
            "2026-11-26T11:30:01.123Z 192.0.2.7:51234 C: EHLO printer\n",
        ),
        (
            "192.0.2.7:51234",
            Some("scanner-3f"),
            Direction::Server,
            "250 2.1.0 Ok",
            "2026-11-26T11:30:01.123Z 192.0.2.7:51234 [scanner-3f] S: 250 2.1.0 Ok\n",
        ),
        (
            "[2001:db8::7]:25",
            None,
            Direction::Note,
            "message content: 1234 bytes",
            "2026-11-26T11:30:01.123Z [2001:db8::7]:25 * message content: 1234 bytes\n",
        ),
        (
            "192.0.2.7:51234",
            Some("evil\u{1b}]0;x\u{7}"),
            Direction::Client,
            "",
            "2026-11-26T11:30:01.123Z 192.0.2.7:51234 [evil\\x1b]0;x\\x07] C: \n",
        ),
    ];
    for (client, user, direction, text, expected) in cases {
        assert_eq!(
            format_line(EXAMPLE_UNIX_MS, address(client), *user, *direction, text),
            *expected
        );
    }
}

#[test]
fn control_characters_are_escaped() {
    let cases: &[(&str, &str)] = &[
        ("EHLO printer", "EHLO printer"),
        ("\u{1b}[2J\u{1b}[31mred", "\\x1b[2J\\x1b[31mred"),
        (
            "bare\rCR and\nLF and\ttab",
            "bare\\x0dCR and\\x0aLF and\\x09tab",
        ),
        ("\u{0}\u{1f}\u{7f}", "\\x00\\x1f\\x7f"),
        // C1 controls: U+009B is a CSI to some terminals.
        ("\u{9b}31m\u{85}", "\\u{9b}31m\\u{85}"),
        // A backslash is doubled, so `\x1b` in the output always means an escape byte.
        ("C:\\x1b", "C:\\\\x1b"),
        ("Grüße 日本 ~", "Grüße 日本 ~"),
    ];
    for (text, expected) in cases {
        let mut line = String::new();
        push_escaped(&mut line, text);
        assert_eq!(line, *expected, "{text:?}");
    }
}

#[test]
fn long_text_is_cut_at_a_character_boundary_and_counted() {
    // 1023 ASCII bytes, then a 2-byte character that straddles the 1024-byte cut.
    let text = format!("{}é{}", "a".repeat(1023), "b".repeat(100));
    let line = format_line(
        EXAMPLE_UNIX_MS,
        address("192.0.2.7:1"),
        None,
        Direction::Client,
        &text,
    );
    let expected = format!(
        "2026-11-26T11:30:01.123Z 192.0.2.7:1 C: {} [... 102 more bytes]\n",
        "a".repeat(1023)
    );
    assert_eq!(line, expected);
}

#[test]
fn a_trace_shows_the_lines_of_its_client_at_any_port_and_nothing_else() {
    let (directory, _server, hub) = start(Limits::default());
    let mut client = Client::watch(directory.path(), &Filter::Client(ip("192.0.2.7")));
    assert!(hub.watching(ip("192.0.2.7"), None));
    assert!(hub.watching(ip("::ffff:192.0.2.7"), Some("anyone")));
    assert!(!hub.watching(ip("192.0.2.8"), None));

    hub.line(
        address("192.0.2.8:1"),
        None,
        Direction::Client,
        "EHLO other",
    );
    hub.line(
        address("192.0.2.7:51234"),
        None,
        Direction::Client,
        "EHLO printer",
    );
    hub.line(
        address("192.0.2.7:51234"),
        Some("scanner-3f"),
        Direction::Server,
        "235 2.7.0 Authentication successful",
    );
    hub.line(
        address("192.0.2.7:40000"),
        None,
        Direction::Note,
        "disconnected",
    );
    assert_eq!(client.untimed_line(), "192.0.2.7:51234 C: EHLO printer\n");
    assert_eq!(
        client.untimed_line(),
        "192.0.2.7:51234 [scanner-3f] S: 235 2.7.0 Authentication successful\n"
    );
    assert_eq!(client.untimed_line(), "192.0.2.7:40000 * disconnected\n");
}

#[test]
fn a_user_trace_shows_that_user_from_any_address_once_logged_in() {
    let (directory, _server, hub) = start(Limits::default());
    let mut client = Client::watch(directory.path(), &Filter::User("scanner-3f".to_string()));
    assert!(!hub.watching(ip("192.0.2.7"), None));
    assert!(hub.watching(ip("192.0.2.7"), Some("scanner-3f")));
    assert!(!hub.watching(ip("192.0.2.7"), Some("Scanner-3F")));

    hub.line(
        address("192.0.2.7:1"),
        None,
        Direction::Client,
        "EHLO before",
    );
    hub.line(
        address("192.0.2.7:1"),
        Some("other"),
        Direction::Client,
        "NOOP",
    );
    hub.line(
        address("198.51.100.1:2"),
        Some("scanner-3f"),
        Direction::Client,
        "QUIT",
    );
    assert_eq!(
        client.untimed_line(),
        "198.51.100.1:2 [scanner-3f] C: QUIT\n"
    );
}

#[test]
fn with_nobody_watching_the_hub_takes_no_lock() {
    let (_directory, _server, hub) = start(Limits::default());
    // Hold the write lock: anything that takes the read lock now waits until the end of
    // the test, and the answer below never comes.
    let guard = hub.shared.watchers.write().unwrap();
    let (answer, answered) = std::sync::mpsc::channel();
    let thread_hub = hub.clone();
    std::thread::spawn(move || {
        let watching = thread_hub.watching(ip("192.0.2.7"), Some("scanner-3f"));
        thread_hub.line(address("192.0.2.7:1"), None, Direction::Client, "EHLO x");
        let _ = answer.send(watching);
    });
    let result = answered.recv_timeout(TIMEOUT);
    drop(guard);
    assert_eq!(
        result,
        Ok(false),
        "watching() took the lock with no watcher"
    );
}

#[test]
fn a_watcher_is_removed_when_its_client_leaves() {
    let (directory, _server, hub) = start(Limits::default());
    let client = Client::watch(directory.path(), &Filter::Client(ip("192.0.2.7")));
    assert_eq!(hub.shared.watcher_count.load(Ordering::Relaxed), 1);
    drop(client);
    // Found by the idle check, with no line to write.
    assert!(wait_until(|| hub
        .shared
        .watcher_count
        .load(Ordering::Relaxed)
        == 0));
    assert!(!hub.watching(ip("192.0.2.7"), None));

    // And by a failed write, when lines keep coming.
    let client = Client::watch(directory.path(), &Filter::Client(ip("192.0.2.7")));
    drop(client);
    assert!(wait_until(|| {
        hub.line(address("192.0.2.7:1"), None, Direction::Client, "NOOP");
        hub.shared.watcher_count.load(Ordering::Relaxed) == 0
    }));
}

#[test]
fn a_malformed_request_gets_one_error_line_and_the_connection_closes() {
    let (directory, _server, hub) = start(Limits::default());
    for request in [
        "client=192.0.2.7",
        r#"{"client":"not-an-ip"}"#,
        r#"{"user":""}"#,
        r#"{"client":"192.0.2.7","user":"x"}"#,
    ] {
        let mut client = Client::send(directory.path(), request);
        let answer = client.line();
        assert!(
            answer.starts_with("error: bad request"),
            "{request}: {answer:?}"
        );
        assert_eq!(client.line(), "", "{request}: the connection stays open");
    }
    let mut stream = UnixStream::connect(super::super::socket_path(directory.path())).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream.write_all(&[b'x'; 4096]).unwrap();
    let mut client = Client {
        reader: BufReader::new(stream),
    };
    assert_eq!(
        client.line(),
        "error: the request is longer than 2048 bytes\n"
    );
    assert_eq!(hub.shared.watcher_count.load(Ordering::Relaxed), 0);
}

#[test]
fn traces_beyond_the_limit_are_refused_until_one_ends() {
    let limits = Limits {
        watchers_max: 2,
        ..Limits::default()
    };
    let (directory, _server, hub) = start(limits);
    let filter = Filter::Client(ip("192.0.2.7"));
    let first = Client::watch(directory.path(), &filter);
    let _second = Client::watch(directory.path(), &filter);
    let mut third = Client::send(directory.path(), filter.request_line().trim_end());
    assert_eq!(third.line(), "error: too many traces running (2 at most)\n");
    assert_eq!(third.line(), "");
    assert_eq!(hub.shared.watcher_count.load(Ordering::Relaxed), 2);

    drop(first);
    let mut answer = String::new();
    assert!(
        wait_until(|| {
            answer = Client::send(directory.path(), filter.request_line().trim_end()).line();
            answer == "ok\n"
        }),
        "still refused after a trace ended: {answer:?}"
    );
}

#[test]
fn a_full_queue_drops_lines_and_says_how_many_once_there_is_room() {
    let (queue, lines) = crossbeam_channel::bounded(3);
    let watcher = Watcher {
        filter: Filter::Client(ip("192.0.2.7")),
        queue,
        dropped_pending: Default::default(),
        dropped_total: Default::default(),
    };
    let offer = |text: &str| watcher.offer(&Arc::from(format!("{text}\n")));
    let received = || {
        lines
            .try_iter()
            .map(|line| line.to_string())
            .collect::<Vec<_>>()
    };
    for text in ["1", "2", "3", "4", "5"] {
        offer(text);
    }
    assert_eq!(received(), ["1\n", "2\n", "3\n"]);
    // Room again: the notice comes first, in the place of the lines it stands for.
    offer("6");
    offer("7");
    offer("8");
    offer("9");
    assert_eq!(received(), [dropped_notice(2).as_str(), "6\n", "7\n"]);
    // "8" and "9" were dropped; with no more lines, the idle writer queues the notice.
    assert!(watcher.offer_dropped_notice());
    assert_eq!(received(), [dropped_notice(2)]);
    assert!(watcher.offer_dropped_notice(), "nothing pending");
    assert_eq!(received(), Vec::<String>::new());
    // Room for the notice but not the line after it: the line is dropped, not reordered.
    for text in ["a", "b", "c", "d"] {
        offer(text);
    }
    assert_eq!(
        lines.try_recv().map(|line| line.to_string()),
        Ok("a\n".into())
    );
    offer("e");
    offer("f");
    assert_eq!(
        received(),
        ["b\n", "c\n", dropped_notice(1).as_str()],
        "d was dropped, then the notice took the one free place and f was dropped"
    );
    assert_eq!(watcher.dropped_total.load(Ordering::Relaxed), 2 + 2 + 1 + 2);
    assert_eq!(watcher.dropped_pending.load(Ordering::Relaxed), 2);
    assert_eq!(
        dropped_notice(1),
        "... 1 line dropped (the trace reader is too slow)\n"
    );
}

#[test]
fn a_slow_reader_is_told_exactly_how_many_lines_it_missed() {
    let limits = Limits {
        queue_lines_max: 4,
        ..Limits::default()
    };
    let (directory, _server, hub) = start(limits);
    let mut client = Client::watch(directory.path(), &Filter::Client(ip("192.0.2.7")));
    // Far more than the socket's buffer holds while the client reads nothing.
    const SENT: u64 = 3000;
    let padding = "x".repeat(900);
    for number in 0..SENT {
        hub.line(
            address("192.0.2.7:1"),
            None,
            Direction::Client,
            &format!("{number} {padding}"),
        );
    }
    let (mut shown, mut dropped, mut notices) = (0_u64, 0_u64, 0);
    let mut last_number = None;
    while shown + dropped < SENT {
        let line = client.line();
        assert!(!line.is_empty(), "stream ended after {shown} + {dropped}");
        if let Some(rest) = line.strip_prefix("... ") {
            let count = rest.split(' ').next().unwrap();
            dropped += count.parse::<u64>().unwrap();
            notices += 1;
            continue;
        }
        let number: u64 = line
            .split(" C: ")
            .nth(1)
            .and_then(|text| text.split(' ').next())
            .unwrap()
            .parse()
            .unwrap();
        assert!(last_number < Some(number), "out of order: {line}");
        last_number = Some(number);
        shown += 1;
    }
    assert_eq!(shown + dropped, SENT);
    assert!(
        notices > 0 && dropped > 0,
        "nothing was dropped: {shown} shown"
    );
    let watcher_dropped: u64 = hub.shared.read_watchers()[0]
        .dropped_total
        .load(Ordering::Relaxed);
    assert_eq!(watcher_dropped, dropped);
}

#[test]
fn the_socket_is_private_replaces_a_stale_file_and_goes_at_stop() {
    let directory = tempfile::tempdir().unwrap();
    let path = super::super::socket_path(directory.path());
    std::fs::write(&path, "left by a crashed server").unwrap();
    let mut server = TraceServer::start(directory.path()).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let mut client = Client::watch(directory.path(), &Filter::Client(ip("192.0.2.7")));
    let observer = server.observer();
    let stopping = Instant::now();
    server.stop();
    assert!(stopping.elapsed() < TIMEOUT);
    assert_eq!(client.line(), "", "the trace was not closed at stop");
    assert!(!path.exists());
    // The event loops may still call the observer after the hub stopped.
    assert!(!observer.watching(ip("192.0.2.7"), None));
    observer.line(
        address("192.0.2.7:1"),
        None,
        Direction::Note,
        "disconnected",
    );
}
