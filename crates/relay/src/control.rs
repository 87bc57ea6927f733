//! The queue control socket: `<spool directory>/control.sock`, a Unix stream socket
//! with mode 0600 (only the user tsubame runs as may use it). One request per
//! connection: a JSON object on one line; the answer is a JSON object on one line.
//!
//! ```text
//! {"command":"list"}                      → {"status":"ok","messages":[...]}
//! {"command":"list","filter":{"recipient_domain":"example.com","status":"deferred"}}
//! {"command":"show","id":"0000000000000001"}
//! {"command":"flush"}                     → {"status":"flushed","recipients":3}
//! {"command":"delete","id":"0000000000000001"}
//! {"command":"apply","action":"hold","ids":["0000000000000001",...]}
//!                                         → {"status":"applied","action":"hold","messages":1,"recipients":2,"missing":[]}
//! ```
//! `apply` takes at most `IDS_PER_REQUEST_MAX` ids; the client sends a long list in
//! batches (and shows its progress), so the dispatcher is never busy for long.
//! Errors: `{"status":"error","message":"..."}`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::dispatcher::{Command, Input};
use crate::inbox::Inbox;

/// The socket's file name inside the spool directory.
pub const CONTROL_SOCKET_NAME: &str = "control.sock";

/// Most message ids in one `apply` request.
pub const IDS_PER_REQUEST_MAX: usize = 1000;

/// Longest request line accepted: `IDS_PER_REQUEST_MAX` quoted ids of 16 hex digits
/// (19 bytes each with their comma) and the rest of the request fit well within it.
const REQUEST_BYTES_MAX: u64 = 64 * 1024;

/// How long a client may take to send its request, and how long we wait for the
/// dispatcher's answer: a stuck client or a busy dispatcher never blocks the socket
/// for long.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the accept loop looks at the stop flag.
const ACCEPT_POLL_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "lowercase")]
pub enum ControlRequest {
    List {
        #[serde(default)]
        filter: Filter,
        /// A page of the matching messages, in id order: skip `offset`, return at most
        /// `limit` (at most `LIST_PAGE_MAX`). Without a limit, every match.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        page: Option<Page>,
    },
    Show {
        id: String,
    },
    /// Every deferred recipient, now.
    Flush,
    Delete {
        id: String,
    },
    /// One action on each of these messages.
    Apply {
        action: Action,
        ids: Vec<String>,
    },
}

/// A page of a listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Page {
    #[serde(default)]
    pub offset: usize,
    pub limit: usize,
}

/// Most messages in one page of `list`.
pub const LIST_PAGE_MAX: usize = 1000;

/// What `apply` does to each message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Retry its deferred recipients now.
    Flush,
    /// Remove it without delivering or bouncing it (journalled).
    Delete,
    /// Attempt nothing for it until released (kept across restarts).
    Hold,
    Release,
}

impl Action {
    /// The past tense, for progress lines.
    pub fn done_word(self) -> &'static str {
        match self {
            Action::Flush => "flushed",
            Action::Delete => "deleted",
            Action::Hold => "held",
            Action::Release => "released",
        }
    }
}

/// Which messages `list` shows; every condition given must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filter {
    /// A recipient at this domain (case-insensitive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipient_domain: Option<String>,
    /// The envelope sender: an address, or `@domain` for any address there; `<>` for
    /// the null sender.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender: Option<String>,
    /// Received at least this many seconds ago.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub older_than_secs: Option<u64>,
    /// `held`, or a recipient state: queued, sending, deferred.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
}

impl Filter {
    pub fn is_empty(&self) -> bool {
        *self == Filter::default()
    }

    /// Does `message` pass? `now_unix_ms` for the age.
    pub fn matches(&self, message: &MessageSummary, now_unix_ms: u64) -> bool {
        let domain_ok = self.recipient_domain.as_ref().is_none_or(|wanted| {
            message.recipients.iter().any(|recipient| {
                recipient
                    .address
                    .rsplit_once('@')
                    .is_some_and(|(_, domain)| domain.eq_ignore_ascii_case(wanted))
            })
        });
        let sender_ok = self.sender.as_ref().is_none_or(|wanted| {
            if wanted == "<>" {
                message.mail_from.is_empty()
            } else if let Some(domain) = wanted.strip_prefix('@') {
                message
                    .mail_from
                    .rsplit_once('@')
                    .is_some_and(|(_, theirs)| theirs.eq_ignore_ascii_case(domain))
            } else {
                message.mail_from.eq_ignore_ascii_case(wanted)
            }
        });
        let age_ok = self.older_than_secs.is_none_or(|secs| {
            now_unix_ms.saturating_sub(message.received_at_unix_ms) >= secs.saturating_mul(1000)
        });
        let status_ok = self.status.as_ref().is_none_or(|wanted| {
            if wanted == "held" {
                message.held
            } else {
                message
                    .recipients
                    .iter()
                    .any(|recipient| recipient.state == *wanted)
            }
        });
        domain_ok && sender_ok && age_ok && status_ok
    }
}

/// The statuses `Filter::status` takes.
pub const FILTER_STATUSES: [&str; 4] = ["queued", "sending", "deferred", "held"];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum ControlResponse {
    #[serde(rename = "ok")]
    Messages {
        messages: Vec<MessageSummary>,
        /// For a paged `list`: how many messages match in all.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        total: Option<usize>,
    },
    Flushed {
        recipients: usize,
    },
    Deleted {
        id: String,
        recipients: usize,
    },
    Applied {
        action: Action,
        /// Messages acted on.
        messages: usize,
        /// Recipients they had pending (flush: moved to ready).
        recipients: usize,
        /// Ids not (or no longer) queued, or malformed.
        missing: Vec<String>,
    },
    Error {
        message: String,
    },
}

impl ControlResponse {
    pub(crate) fn error(message: String) -> Self {
        Self::Error { message }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageSummary {
    pub id: String,
    /// Empty for the null sender (bounces).
    pub mail_from: String,
    pub received_at_unix_ms: u64,
    pub size_bytes: u64,
    /// On hold (`queue hold`).
    #[serde(default)]
    pub held: bool,
    pub recipients: Vec<RecipientSummary>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecipientSummary {
    pub address: String,
    pub upstream: String,
    /// queued, sending, deferred, delivered, failed.
    pub state: String,
    pub attempts: u32,
    pub last_reply: Option<String>,
}

/// The socket path for a spool directory.
pub fn socket_path(spool_directory: &Path) -> PathBuf {
    spool_directory.join(CONTROL_SOCKET_NAME)
}

/// Sends one request to a running server and returns its answer.
pub fn request(
    spool_directory: &Path,
    request: &ControlRequest,
) -> Result<ControlResponse, String> {
    let path = socket_path(spool_directory);
    let mut stream = UnixStream::connect(&path).map_err(|error| {
        format!(
            "cannot reach a running tsubame at {}: {error} (is `tsubame serve` running on this spool?)",
            path.display()
        )
    })?;
    let timeout = Some(CLIENT_TIMEOUT * 2);
    stream
        .set_read_timeout(timeout)
        .and_then(|()| stream.set_write_timeout(timeout))
        .map_err(|error| format!("control socket: {error}"))?;
    let mut line = serde_json::to_string(request).map_err(|error| error.to_string())?;
    line.push('\n');
    stream
        .write_all(line.as_bytes())
        .map_err(|error| format!("control socket: {error}"))?;
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .map_err(|error| format!("control socket: {error}"))?;
    serde_json::from_str(&answer).map_err(|error| format!("control socket: bad answer: {error}"))
}

/// A non-blocking Unix socket listening at `path`, mode 0600 (only the user tsubame
/// runs as may connect), in place of a socket file left there. The caller must hold the
/// spool's lock, so that such a file is from a process that is gone.
pub fn bind_private(path: &Path) -> std::io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// The accept loop's thread.
#[derive(Debug)]
pub(crate) struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ControlServer {
    pub fn start(spool_directory: &Path, commands: Arc<Inbox<Input>>) -> std::io::Result<Self> {
        let path = socket_path(spool_directory);
        let listener = bind_private(&path)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("control".to_string())
            .spawn(move || accept_loop(&listener, &commands, &thread_stop))?;
        Ok(Self {
            path,
            stop,
            thread: Some(thread),
        })
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(listener: &UnixListener, commands: &Inbox<Input>, stop: &AtomicBool) {
    while !stop.load(Ordering::Acquire) {
        match listener.accept() {
            Ok((stream, _)) => {
                if let Err(error) = serve_one(stream, commands) {
                    tracing::warn!(%error, "control socket client");
                }
            }
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(ACCEPT_POLL_INTERVAL);
            }
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => {
                tracing::error!(%error, "control socket accept failed");
                std::thread::sleep(ACCEPT_POLL_INTERVAL);
            }
        }
    }
}

fn serve_one(stream: UnixStream, commands: &Inbox<Input>) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new((&stream).take(REQUEST_BYTES_MAX)).read_line(&mut line)?;
    let response = match serde_json::from_str::<ControlRequest>(line.trim_end()) {
        Ok(request) => {
            let (reply, answer) = crossbeam_channel::bounded(1);
            if commands
                .push(Input::Command(Command::Control(request, reply)))
                .is_err()
            {
                ControlResponse::error("the server is shutting down".to_string())
            } else {
                answer.recv_timeout(CLIENT_TIMEOUT).unwrap_or_else(|_| {
                    ControlResponse::error("the delivery queue did not answer in time".to_string())
                })
            }
        }
        Err(error) => ControlResponse::error(format!("bad request: {error}")),
    };
    let mut text = serde_json::to_string(&response).unwrap_or_else(|_| {
        "{\"status\":\"error\",\"message\":\"cannot encode the answer\"}".to_string()
    });
    text.push('\n');
    (&stream).write_all(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(
        from: &str,
        recipients: &[(&str, &str)],
        received_at_unix_ms: u64,
    ) -> MessageSummary {
        MessageSummary {
            id: "0000000000000001".to_string(),
            mail_from: from.to_string(),
            received_at_unix_ms,
            size_bytes: 10,
            held: false,
            recipients: recipients
                .iter()
                .map(|(address, state)| RecipientSummary {
                    address: (*address).to_string(),
                    upstream: "mx".to_string(),
                    state: (*state).to_string(),
                    attempts: 0,
                    last_reply: None,
                })
                .collect(),
        }
    }

    #[test]
    fn filters_take_domain_sender_age_and_status_together() {
        let message = summary(
            "news@Shop.example",
            &[("a@x.example", "deferred"), ("b@y.example", "delivered")],
            1_000,
        );
        let matches = |filter: Filter, now: u64| filter.matches(&message, now);
        assert!(matches(Filter::default(), 0));
        let domain = |d: &str| Filter {
            recipient_domain: Some(d.to_string()),
            ..Filter::default()
        };
        assert!(matches(domain("X.example"), 0));
        assert!(!matches(domain("z.example"), 0));
        let sender = |s: &str| Filter {
            sender: Some(s.to_string()),
            ..Filter::default()
        };
        assert!(matches(sender("news@shop.example"), 0));
        assert!(matches(sender("@shop.example"), 0));
        assert!(!matches(sender("@example"), 0));
        assert!(!matches(sender("<>"), 0));
        assert!(sender("<>").matches(&summary("", &[("a@x.example", "queued")], 0), 0));
        let older = Filter {
            older_than_secs: Some(60),
            ..Filter::default()
        };
        assert!(!matches(older.clone(), 60_999));
        assert!(matches(older, 61_000));
        let status = |s: &str| Filter {
            status: Some(s.to_string()),
            ..Filter::default()
        };
        assert!(matches(status("deferred"), 0));
        assert!(!matches(status("queued"), 0));
        assert!(!matches(status("held"), 0));
        let mut held = message.clone();
        held.held = true;
        assert!(status("held").matches(&held, 0));
        // Every condition must hold.
        let both = Filter {
            recipient_domain: Some("x.example".to_string()),
            sender: Some("@other.example".to_string()),
            ..Filter::default()
        };
        assert!(!matches(both, 0));
    }

    #[test]
    fn requests_round_trip_and_old_forms_still_parse() {
        let list: ControlRequest =
            serde_json::from_str(r#"{"command":"list"}"#).unwrap_or(ControlRequest::Flush);
        assert_eq!(
            list,
            ControlRequest::List {
                filter: Filter::default(),
                page: None,
            }
        );
        let apply = ControlRequest::Apply {
            action: Action::Hold,
            ids: vec!["0000000000000001".to_string()],
        };
        let text = serde_json::to_string(&apply).unwrap_or_default();
        assert_eq!(
            text,
            r#"{"command":"apply","action":"hold","ids":["0000000000000001"]}"#
        );
    }
}
