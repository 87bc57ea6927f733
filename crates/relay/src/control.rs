//! The queue control socket: `<spool directory>/control.sock`, a Unix stream socket
//! with mode 0600 (only the user tsubame runs as may use it). One request per
//! connection: a JSON object on one line; the answer is a JSON object on one line.
//!
//! ```text
//! {"command":"list"}                      → {"status":"ok","messages":[...]}
//! {"command":"show","id":"0000000000000001"}
//! {"command":"flush"}                     → {"status":"flushed","recipients":3}
//! {"command":"delete","id":"0000000000000001"}
//! ```
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

/// Longest request line accepted: a command and a message id need well under 100 bytes.
const REQUEST_BYTES_MAX: u64 = 4096;

/// How long a client may take to send its request, and how long we wait for the
/// dispatcher's answer: a stuck client or a busy dispatcher never blocks the socket
/// for long.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the accept loop looks at the stop flag.
const ACCEPT_POLL_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "lowercase")]
pub enum ControlRequest {
    List,
    Show { id: String },
    Flush,
    Delete { id: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum ControlResponse {
    #[serde(rename = "ok")]
    Messages {
        messages: Vec<MessageSummary>,
    },
    Flushed {
        recipients: usize,
    },
    Deleted {
        id: String,
        recipients: usize,
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
