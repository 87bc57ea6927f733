//! The server side of `tsubame trace`: an [`Observer`] that hands the conversations
//! someone watches to the `tsubame trace` processes connected to `<spool>/trace.sock`.
//!
//! The event loops call [`Observer::watching`] for every event and [`Observer::line`]
//! for each line of a watched conversation; neither blocks. With nobody watching,
//! `watching` is one relaxed atomic load; with watchers, a read lock and a scan of at
//! most [`WATCHERS_MAX`] filters. `line` formats the line once and offers it to the
//! bounded queue of each watcher whose filter matches; a full queue drops the line and
//! counts it, and the count reaches the watcher as one notice line once the queue has
//! room again. One thread per connection to the socket reads its request, then writes
//! its queue to the socket until the client goes away or the server stops.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use tsubame_server::conversation::{Direction, Observer};

use super::Filter;

/// Traces running at once, counting connections still sending their request. Each
/// costs a thread and a queue of up to [`WATCHER_QUEUE_LINES_MAX`] lines; an
/// administrator watches a handful of devices, not dozens.
pub(crate) const WATCHERS_MAX: usize = 16;

/// Lines waiting for one trace's writer thread. A device's whole session is a few dozen
/// lines, so this absorbs any burst a terminal can show; with lines of at most
/// [`TEXT_BYTES_MAX`] bytes of text it bounds a queue to about 4.5 MiB.
pub(crate) const WATCHER_QUEUE_LINES_MAX: usize = 4096;

/// Longest text shown for one line; the rest is cut and counted. RFC 5321 §4.5.3.1.4
/// and §4.5.3.1.5 allow 512 bytes for a command or reply line (the server accepts
/// longer commands, up to `max_command_line_bytes`).
const TEXT_BYTES_MAX: usize = 1024;

/// Longest request line: `{"user":"NAME"}` with a 255-byte name, JSON-escaped, fits.
const REQUEST_BYTES_MAX: u64 = 2048;

/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the accept loop looks at the stop flag.
const ACCEPT_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// How often an idle trace's thread looks for a stop, a dropped-lines notice to queue,
/// and a client that went away (which only shows when it is read or written to).
const IDLE_CHECK_INTERVAL: Duration = Duration::from_millis(200);

/// How long the idle check's read waits: it only asks "closed or not".
const CLOSED_CHECK_TIMEOUT: Duration = Duration::from_millis(1);

/// Queued lines written to the socket in one `write`.
const WRITE_BATCH_BYTES_MAX: usize = 64 * 1024;

/// How long writing a refusal and reading the rest of the request may take. The accept
/// loop refuses a trace beyond the limit itself; a fresh socket's buffer takes the
/// line at once and the request is there already, and a client that is slower must
/// not hold the loop up.
const REFUSAL_TIMEOUT: Duration = Duration::from_millis(100);

/// The hub's limits; [`Limits::default`] in the server, smaller ones in tests.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) watchers_max: usize,
    pub(crate) queue_lines_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            watchers_max: WATCHERS_MAX,
            queue_lines_max: WATCHER_QUEUE_LINES_MAX,
        }
    }
}

/// The socket and its accept thread. Dropping it stops it.
#[derive(Debug)]
pub(crate) struct TraceServer {
    path: PathBuf,
    hub: TraceHub,
    accept_thread: Option<JoinHandle<()>>,
}

impl TraceServer {
    /// Serves `<spool_directory>/trace.sock` (mode 0600), replacing a stale socket file.
    pub(crate) fn start(spool_directory: &Path) -> std::io::Result<Self> {
        Self::start_with_limits(spool_directory, Limits::default())
    }

    pub(crate) fn start_with_limits(
        spool_directory: &Path,
        limits: Limits,
    ) -> std::io::Result<Self> {
        let path = super::socket_path(spool_directory);
        // The caller holds the spool's lock.
        let listener = tsubame_relay::control::bind_private(&path)?;
        let hub = TraceHub {
            shared: Arc::new(Shared {
                watcher_count: AtomicUsize::new(0),
                watchers: RwLock::new(Vec::new()),
                queue_lines_max: limits.queue_lines_max,
                stop: AtomicBool::new(false),
            }),
        };
        let shared = Arc::clone(&hub.shared);
        let accept_thread = std::thread::Builder::new()
            .name("trace".to_string())
            .spawn(move || accept_loop(&listener, &shared, limits.watchers_max))?;
        Ok(Self {
            path,
            hub,
            accept_thread: Some(accept_thread),
        })
    }

    /// The observer to give the SMTP server.
    pub(crate) fn observer(&self) -> Arc<dyn Observer> {
        Arc::new(self.hub.clone())
    }

    /// Ends every trace (their clients see the connection close), stops accepting and
    /// removes the socket file.
    pub(crate) fn stop(&mut self) {
        self.hub.shared.stop.store(true, Ordering::Release);
        if let Some(thread) = self.accept_thread.take() {
            let _ = thread.join();
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for TraceServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The [`Observer`] the event loops call.
#[derive(Clone)]
pub(crate) struct TraceHub {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for TraceHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TraceHub")
            .field(
                "watchers",
                &self.shared.watcher_count.load(Ordering::Relaxed),
            )
            .finish_non_exhaustive()
    }
}

impl Observer for TraceHub {
    fn watching(&self, client: IpAddr, user: Option<&str>) -> bool {
        if self.shared.watcher_count.load(Ordering::Relaxed) == 0 {
            return false;
        }
        self.shared
            .read_watchers()
            .iter()
            .any(|watcher| watcher.filter.matches(client, user))
    }

    fn line(&self, client: SocketAddr, user: Option<&str>, direction: Direction, text: &str) {
        if self.shared.watcher_count.load(Ordering::Relaxed) == 0 {
            return;
        }
        let watchers = self.shared.read_watchers();
        // Formatted once, for the first watcher that wants it, and shared.
        let mut formatted: Option<Arc<str>> = None;
        for watcher in watchers
            .iter()
            .filter(|watcher| watcher.filter.matches(client.ip(), user))
        {
            let line = formatted.get_or_insert_with(|| {
                Arc::from(format_line(unix_ms_now(), client, user, direction, text))
            });
            watcher.offer(line);
        }
    }
}

#[derive(Debug)]
struct Shared {
    /// Always `watchers.len()`: stored under the `watchers` write lock, loaded without
    /// it as the fast path. A watcher that has just registered may miss an event or two.
    watcher_count: AtomicUsize,
    /// The registered traces. Invariant: at most the accept loop's `watchers_max`, since
    /// each belongs to one of its sessions.
    watchers: RwLock<Vec<Arc<Watcher>>>,
    queue_lines_max: usize,
    /// Set once, at shutdown.
    stop: AtomicBool,
}

impl Shared {
    // A panic while holding the lock leaves the list itself consistent (pushes and
    // retains do not half-happen), so a poisoned lock is used as is.
    fn read_watchers(&self) -> RwLockReadGuard<'_, Vec<Arc<Watcher>>> {
        self.watchers.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_watchers(&self) -> RwLockWriteGuard<'_, Vec<Arc<Watcher>>> {
        self.watchers
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn register(&self, filter: Filter) -> (Arc<Watcher>, Receiver<Arc<str>>) {
        let (queue, lines) = crossbeam_channel::bounded(self.queue_lines_max);
        let watcher = Arc::new(Watcher {
            filter,
            queue,
            dropped_pending: AtomicU64::new(0),
            dropped_total: AtomicU64::new(0),
        });
        let mut watchers = self.write_watchers();
        watchers.push(Arc::clone(&watcher));
        self.watcher_count.store(watchers.len(), Ordering::Relaxed);
        (watcher, lines)
    }

    fn deregister(&self, watcher: &Arc<Watcher>) {
        let mut watchers = self.write_watchers();
        watchers.retain(|registered| !Arc::ptr_eq(registered, watcher));
        self.watcher_count.store(watchers.len(), Ordering::Relaxed);
    }
}

/// One running trace, as the event loops see it.
#[derive(Debug)]
struct Watcher {
    filter: Filter,
    /// Formatted lines, each ending in `\n`, for the trace's writer thread.
    queue: Sender<Arc<str>>,
    /// Lines dropped since the last dropped-lines notice was queued.
    dropped_pending: AtomicU64,
    /// Lines dropped over the whole trace, for the log.
    dropped_total: AtomicU64,
}

impl Watcher {
    /// Queues `line`, or drops and counts it when the queue is full. Never blocks.
    fn offer(&self, line: &Arc<str>) {
        // The line goes after the notice of the lines dropped before it, or not at all.
        if !self.offer_dropped_notice() {
            self.count_dropped(1);
            return;
        }
        match self.queue.try_send(Arc::clone(line)) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(_)) => self.count_dropped(1),
        }
    }

    /// Queues the notice of the lines dropped since the last one, if any. False when
    /// there are some and the queue is still full (they stay counted for the next try).
    fn offer_dropped_notice(&self) -> bool {
        if self.dropped_pending.load(Ordering::Relaxed) == 0 {
            return true;
        }
        if self.queue.is_full() {
            return false;
        }
        let dropped = self.dropped_pending.swap(0, Ordering::Relaxed);
        if dropped == 0 {
            // Another thread queued the notice in between.
            return true;
        }
        match self.queue.try_send(Arc::from(dropped_notice(dropped))) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => true,
            Err(TrySendError::Full(_)) => {
                self.dropped_pending.fetch_add(dropped, Ordering::Relaxed);
                false
            }
        }
    }

    fn count_dropped(&self, lines: u64) {
        self.dropped_pending.fetch_add(lines, Ordering::Relaxed);
        self.dropped_total.fetch_add(lines, Ordering::Relaxed);
    }
}

fn dropped_notice(lines: u64) -> String {
    let plural = if lines == 1 { "" } else { "s" };
    format!("... {lines} line{plural} dropped (the trace reader is too slow)\n")
}

/// A connection to the socket and its thread.
struct Session {
    /// A second handle on the connection, to shut it down at stop, which ends a thread
    /// blocked reading the request or writing lines.
    stream: UnixStream,
    thread: JoinHandle<()>,
}

fn accept_loop(listener: &UnixListener, shared: &Arc<Shared>, watchers_max: usize) {
    let mut sessions: Vec<Session> = Vec::new();
    while !shared.stop.load(Ordering::Acquire) {
        match listener.accept() {
            Ok((stream, _)) => {
                sessions.retain(|session| !session.thread.is_finished());
                if sessions.len() >= watchers_max {
                    refuse(
                        &stream,
                        &format!("too many traces running ({watchers_max} at most)"),
                    );
                    continue;
                }
                match start_session(stream, shared) {
                    Ok(session) => sessions.push(session),
                    Err(error) => tracing::warn!(%error, "cannot start a trace"),
                }
            }
            Err(error) if error.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(ACCEPT_POLL_INTERVAL);
            }
            Err(error) if error.kind() == ErrorKind::Interrupted => {}
            Err(error) => {
                tracing::error!(%error, "trace socket accept failed");
                std::thread::sleep(ACCEPT_POLL_INTERVAL);
            }
        }
    }
    for session in &sessions {
        let _ = session.stream.shutdown(Shutdown::Both);
    }
    for session in sessions {
        let _ = session.thread.join();
    }
}

/// Tells the client why, then reads what is left of its request: closing a Unix
/// socket with unread input resets the connection, and the client would get the reset
/// instead of the reason.
fn refuse(stream: &UnixStream, message: &str) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(REFUSAL_TIMEOUT));
    let _ = stream.set_read_timeout(Some(REFUSAL_TIMEOUT));
    let _ = (&*stream).write_all(format!("error: {message}\n").as_bytes());
    let _ = stream.shutdown(Shutdown::Write);
    let _ = std::io::copy(&mut stream.take(REQUEST_BYTES_MAX), &mut std::io::sink());
}

fn start_session(stream: UnixStream, shared: &Arc<Shared>) -> std::io::Result<Session> {
    stream.set_nonblocking(false)?;
    let handle = stream.try_clone()?;
    let shared = Arc::clone(shared);
    let thread = std::thread::Builder::new()
        .name("trace-session".to_string())
        .spawn(move || {
            serve_trace(&stream, &shared);
            // The accept loop's handle keeps the connection open; the client must see
            // its end now.
            let _ = stream.shutdown(Shutdown::Both);
        })?;
    Ok(Session {
        stream: handle,
        thread,
    })
}

/// One trace: its request, then its lines until the client leaves or the server stops.
fn serve_trace(stream: &UnixStream, shared: &Shared) {
    let filter = match read_request(stream) {
        Ok(filter) => filter,
        Err(RequestError::Gone(error)) => {
            tracing::debug!(%error, "a trace client left before its request");
            return;
        }
        Err(RequestError::Invalid(message)) => {
            refuse(stream, &message);
            return;
        }
    };
    // Registered before the client hears `ok`, so nothing that happens after it heard
    // `ok` is missed.
    let (watcher, lines) = shared.register(filter);
    log_trace(&watcher.filter, "trace started", None);
    let written = match stream
        .set_read_timeout(Some(CLOSED_CHECK_TIMEOUT))
        .and_then(|()| (&*stream).write_all(b"ok\n"))
    {
        Ok(()) => write_lines(stream, &watcher, &lines, shared),
        Err(_) => 0,
    };
    shared.deregister(&watcher);
    let dropped = watcher.dropped_total.load(Ordering::Relaxed);
    log_trace(&watcher.filter, "trace stopped", Some((written, dropped)));
}

fn log_trace(filter: &Filter, message: &str, counts: Option<(u64, u64)>) {
    // Names were checked to hold no control characters; they are logged as the login
    // they are, never with a password (the request has none).
    match (filter, counts) {
        (Filter::Client(ip), None) => tracing::info!(client = %ip, "{message}"),
        (Filter::User(name), None) => tracing::info!(user = %name, "{message}"),
        (Filter::Client(ip), Some((lines, dropped))) => {
            tracing::info!(client = %ip, lines, dropped, "{message}");
        }
        (Filter::User(name), Some((lines, dropped))) => {
            tracing::info!(user = %name, lines, dropped, "{message}");
        }
    }
}

enum RequestError {
    /// The connection failed or closed before a request came.
    Gone(std::io::Error),
    /// Told to the client as `error: ...`.
    Invalid(String),
}

fn read_request(stream: &UnixStream) -> Result<Filter, RequestError> {
    stream
        .set_read_timeout(Some(REQUEST_TIMEOUT))
        .map_err(RequestError::Gone)?;
    let mut line = Vec::new();
    BufReader::new(stream.take(REQUEST_BYTES_MAX))
        .read_until(b'\n', &mut line)
        .map_err(RequestError::Gone)?;
    if line.is_empty() {
        return Err(RequestError::Gone(ErrorKind::UnexpectedEof.into()));
    }
    if line.last() != Some(&b'\n') && line.len() as u64 >= REQUEST_BYTES_MAX {
        return Err(RequestError::Invalid(format!(
            "the request is longer than {REQUEST_BYTES_MAX} bytes"
        )));
    }
    let text = std::str::from_utf8(&line)
        .map_err(|_| RequestError::Invalid("the request is not UTF-8".to_string()))?;
    Filter::parse_request(text.trim_end()).map_err(RequestError::Invalid)
}

/// Writes queued lines to the client, batching what has piled up, until the client
/// leaves or the server stops. Returns the number of lines written.
fn write_lines(
    stream: &UnixStream,
    watcher: &Watcher,
    lines: &Receiver<Arc<str>>,
    shared: &Shared,
) -> u64 {
    let mut written = 0;
    let mut batch = String::new();
    while !shared.stop.load(Ordering::Acquire) {
        match lines.recv_timeout(IDLE_CHECK_INTERVAL) {
            Ok(line) => {
                batch.clear();
                batch.push_str(&line);
                let mut count = 1;
                while batch.len() < WRITE_BATCH_BYTES_MAX {
                    let Ok(line) = lines.try_recv() else { break };
                    batch.push_str(&line);
                    count += 1;
                }
                if (&*stream).write_all(batch.as_bytes()).is_err() {
                    break;
                }
                written += count;
            }
            Err(RecvTimeoutError::Timeout) => {
                // Idle: the queue is empty, so a pending notice fits and goes out now
                // rather than with the next line, which may never come.
                watcher.offer_dropped_notice();
                if client_left(stream) {
                    break;
                }
            }
            // The watcher holds the sender; it cannot happen while we hold the watcher.
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    written
}

/// Whether the client closed its end. It sends nothing after its request, so a read
/// that finds the end of the stream (or fails) means it is gone; anything it does send
/// is ignored. The read times out after [`CLOSED_CHECK_TIMEOUT`].
fn client_left(stream: &UnixStream) -> bool {
    let mut scratch = [0_u8; 512];
    match (&*stream).read(&mut scratch) {
        Ok(0) => true,
        Ok(_) => false,
        Err(error) => !matches!(
            error.kind(),
            ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
        ),
    }
}

fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

/// `2026-11-26T11:30:01.123Z 192.0.2.7:51234 [user] C: EHLO printer\n`: the user only
/// when known; text and user escaped by [`push_escaped`] and the text cut at
/// [`TEXT_BYTES_MAX`].
fn format_line(
    unix_ms: u64,
    client: SocketAddr,
    user: Option<&str>,
    direction: Direction,
    text: &str,
) -> String {
    let shown = text.len().min(TEXT_BYTES_MAX);
    let mut line = String::with_capacity(64 + shown + shown / 4);
    line.push_str(&crate::inspect::format_unix_ms(unix_ms));
    // Writing to a String cannot fail.
    let _ = write!(line, " {client} ");
    if let Some(user) = user {
        line.push('[');
        push_escaped(&mut line, user);
        line.push_str("] ");
    }
    line.push_str(direction.marker());
    line.push(' ');
    let cut = floor_char_boundary(text, TEXT_BYTES_MAX);
    push_escaped(&mut line, text.get(..cut).unwrap_or_default());
    if cut < text.len() {
        let _ = write!(line, " [... {} more bytes]", text.len() - cut);
    }
    line.push('\n');
    line
}

/// The largest character boundary of `text` at or below `index`.
fn floor_char_boundary(text: &str, index: usize) -> usize {
    if index >= text.len() {
        return text.len();
    }
    // A UTF-8 character is at most 4 bytes, so a boundary is at most 3 bytes back;
    // 0 is always one.
    (index.saturating_sub(3)..=index)
        .rev()
        .find(|&candidate| text.is_char_boundary(candidate))
        .unwrap_or(0)
}

/// Appends `text` so that it cannot drive the reader's terminal: C0 controls and DEL
/// become `\xNN`, C1 controls (which some terminals obey as escape sequences)
/// `\u{NN}`, and a backslash `\\`, so that an escape seen is always one we made.
fn push_escaped(line: &mut String, text: &str) {
    for character in text.chars() {
        let code = u32::from(character);
        if character == '\\' {
            line.push_str("\\\\");
        } else if code < 0x20 || code == 0x7f {
            let _ = write!(line, "\\x{code:02x}");
        } else if character.is_control() {
            let _ = write!(line, "\\u{{{code:02x}}}");
        } else {
            line.push(character);
        }
    }
}

#[cfg(test)]
mod tests;
