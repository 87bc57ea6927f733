//! One event loop: a `mio::Poll`, its listeners, its connections and their sessions.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use rustls::ServerConnection;
use slab::Slab;
use tsubame_config::Config;
use tsubame_policy::{Decision, Timestamp};
use tsubame_spool::{
    CommitNotice, Envelope, MessageState, RecipientState, SpoolError, SpooledMessage,
};

use crate::conversation::{Direction, Observer};
use crate::login::{LoginDone, LoginJob, Outcome};
use crate::session::{Event, Session, SessionContext, TlsInfo, Waiting, replies};
use crate::{Listener, Policy, ServerError, Shared};

/// Pending connections the kernel queues per listener. Bursts of hundreds of clients
/// connecting at once (load tests, notification systems) must not see refused SYNs.
const LISTEN_BACKLOG: i32 = 4096;

/// Bytes read from a socket per `read` call. Large enough that a 10 KiB message arrives in
/// one read, small enough to stay in L2.
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// Pending replies to one client beyond which we stop reading its commands until it
/// reads ours (a client that pipelines without reading cannot grow our memory).
const OUTPUT_BUFFER_HIGH_BYTES: usize = 64 * 1024;

/// How often idle and slow connections are checked against their timeouts.
const TIMEOUT_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// How long a closing connection may take to accept its last replies (a 421, a 221)
/// before it is closed without them: a client that stopped reading cannot hold a slot.
const CLOSING_FLUSH_GRACE: Duration = Duration::from_secs(10);

/// Events taken from the poll at once.
const EVENTS_CAPACITY: usize = 1024;

/// After shutdown is asked, how long a loop waits for messages still being committed.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A full disk or a failing spool refuses every message until the cause is fixed: log
/// that at most once per [`SPOOL_ERROR_LOG_INTERVAL_MS`], with how many were not logged.
static SPOOL_ERROR_LOG: LogThrottle = LogThrottle::new();
const SPOOL_ERROR_LOG_INTERVAL_MS: u64 = 10_000;

/// Rate limit for a log line that could repeat for every message.
struct LogThrottle {
    last_logged_unix_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl LogThrottle {
    const fn new() -> Self {
        Self {
            last_logged_unix_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(number suppressed since the last line)` when this occurrence may be logged.
    fn should_log(&self) -> Option<u64> {
        let now = now_unix_ms();
        let last = self.last_logged_unix_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= SPOOL_ERROR_LOG_INTERVAL_MS
            && self
                .last_logged_unix_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// Reserved tokens: connections use their slab keys, which stay far below these.
const WAKER_TOKEN: Token = Token(usize::MAX - 1);
const LISTENER_TOKEN_BASE: usize = usize::MAX - 1024;

pub(crate) fn bind_listeners(
    config: &Config,
) -> Result<Vec<(std::net::TcpListener, usize)>, ServerError> {
    let mut listeners = Vec::new();
    for (index, listener_config) in config.listeners.iter().enumerate() {
        let address = listener_config.address;
        let bind = || -> io::Result<std::net::TcpListener> {
            let domain = socket2::Domain::for_address(address);
            let socket =
                socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
            socket.set_reuse_address(true)?;
            if address.is_ipv6() {
                socket.set_only_v6(true)?;
            }
            socket.bind(&address.into())?;
            socket.listen(LISTEN_BACKLOG)?;
            socket.set_nonblocking(true)?;
            Ok(socket.into())
        };
        let listener = bind().map_err(|source| ServerError::Bind { address, source })?;
        listeners.push((listener, index));
    }
    Ok(listeners)
}

/// What [`EventLoop::write_output`] achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Written {
    /// The connection was closed (done, or the write failed).
    Closed,
    /// Output remains; WRITABLE interest is registered.
    Pending,
    /// All output written.
    Drained,
    /// All output written, and reading had paused for it: read again.
    DrainedResumeReading,
}

/// A message appended to the spool whose commit the loop is waiting for.
#[derive(Debug)]
struct Pending {
    sequence: u64,
    token: Token,
    /// Guards against the slab key being reused by a later connection.
    connection_id: u64,
    /// What the handoff gets once the message is durable; also the "message accepted"
    /// log line's fields.
    message: SpooledMessage,
}

#[derive(Debug)]
struct Connection {
    id: u64,
    stream: TcpStream,
    peer: SocketAddr,
    /// The policy the connection was accepted under; it keeps it to the end.
    policy: Arc<Policy>,
    /// This connection's listener in `policy`.
    listener: Arc<Listener>,
    may_relay: bool,
    session: Session,
    /// The TLS session once STARTTLS or an implicit-TLS listener started one. Boxed:
    /// it is large, and most connections on a busy relay are plain.
    tls: Option<Box<ServerConnection>>,
    /// The session was told the handshake completed.
    tls_reported: bool,
    /// The 220 to STARTTLS is being written; the handshake starts once it is out.
    tls_upgrade_pending: bool,
    close_notify_sent: bool,
    /// Received bytes not yet consumed by the session (an incomplete command line, or
    /// input that arrived while a message waited for its commit).
    input: Vec<u8>,
    /// Replies not yet written. Invariant: `output_written <= output.len()`.
    output: Vec<u8>,
    output_written: usize,
    writable_registered: bool,
    last_activity: Instant,
    /// When the current DATA/BDAT transfer began.
    content_started: Option<Instant>,
    /// The session ended; close once the output is flushed.
    closing: bool,
    /// Reading stopped because too many replies were unwritten; resume once they are.
    read_paused_for_output: bool,
    /// The last read found the socket empty (a short read or WouldBlock) and no readable
    /// event has arrived since: reading again would only return WouldBlock. Saves a
    /// syscall per message when a session resumes after its commit.
    socket_drained: bool,
}

pub(crate) struct EventLoop {
    poll: Poll,
    waker: Arc<Waker>,
    shared: Arc<Shared>,
    /// The policy new connections get: `shared`'s as of `policy_generation`.
    policy: Arc<Policy>,
    policy_generation: u64,
    listeners: Vec<(TcpListener, usize)>,
    connections: Slab<Connection>,
    notices: Receiver<CommitNotice>,
    /// Checked logins come back here from the login pool.
    logins: Receiver<LoginDone>,
    login_replies: Sender<LoginDone>,
    /// Checked logins whose answer is due later (the login guard's delay).
    delayed_logins: Vec<LoginDone>,
    /// In sequence order (appends from one loop are sequential).
    pending: VecDeque<Pending>,
    scratch: Vec<u8>,
    next_connection_id: u64,
    listening: bool,
}

impl EventLoop {
    pub fn new(
        shared: Arc<Shared>,
        listeners: &[(std::net::TcpListener, usize)],
    ) -> io::Result<Self> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER_TOKEN)?);
        let mut own_listeners = Vec::new();
        for (position, (listener, index)) in listeners.iter().enumerate() {
            let mut listener = TcpListener::from_std(listener.try_clone()?);
            poll.registry().register(
                &mut listener,
                Token(LISTENER_TOKEN_BASE + position),
                Interest::READABLE,
            )?;
            own_listeners.push((listener, *index));
        }
        let (notices_sender, notices) = crossbeam_channel::unbounded();
        let subscriber_sender = notices_sender.clone();
        let subscriber_waker = Arc::clone(&waker);
        shared
            .spool
            .subscribe(Box::new(move |notice: &CommitNotice| {
                if subscriber_sender.send(notice.clone()).is_ok() {
                    let _ = subscriber_waker.wake();
                }
            }));
        let (login_replies, logins) = crossbeam_channel::unbounded();
        let policy_generation = shared.policy_generation.load(Ordering::Acquire);
        let policy = shared.current_policy();
        Ok(Self {
            poll,
            waker,
            shared,
            policy,
            policy_generation,
            listeners: own_listeners,
            connections: Slab::new(),
            notices,
            logins,
            login_replies,
            delayed_logins: Vec::new(),
            pending: VecDeque::new(),
            scratch: vec![0; READ_CHUNK_BYTES],
            next_connection_id: 0,
            listening: true,
        })
    }

    /// Takes the shared policy when a reload replaced it: one atomic load per poll
    /// iteration, the lock only after a reload.
    fn refresh_policy(&mut self) {
        let generation = self.shared.policy_generation.load(Ordering::Acquire);
        if generation != self.policy_generation {
            self.policy = self.shared.current_policy();
            self.policy_generation = generation;
        }
    }

    pub fn waker(&self) -> Arc<Waker> {
        Arc::clone(&self.waker)
    }

    pub fn run(mut self) {
        let mut events = Events::with_capacity(EVENTS_CAPACITY);
        let mut next_sweep = Instant::now() + TIMEOUT_SWEEP_INTERVAL;
        let mut shutdown_deadline: Option<Instant> = None;
        loop {
            let now = Instant::now();
            let wake_at = self
                .delayed_logins
                .iter()
                .map(|done| done.answer_at)
                .min()
                .map_or(next_sweep, |due| due.min(next_sweep));
            let timeout = wake_at.saturating_duration_since(now);
            if let Err(error) = self.poll.poll(&mut events, Some(timeout)) {
                if error.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(%error, "event loop poll failed; stopping this loop");
                break;
            }
            self.refresh_policy();
            for event in events.iter() {
                match event.token() {
                    WAKER_TOKEN => {
                        self.drain_notices();
                        while let Ok(done) = self.logins.try_recv() {
                            self.delayed_logins.push(done);
                        }
                    }
                    Token(value) if value >= LISTENER_TOKEN_BASE => {
                        self.accept(value - LISTENER_TOKEN_BASE)
                    }
                    token => {
                        if event.is_writable() {
                            self.flush(token);
                        }
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            if let Some(connection) = self.connections.get_mut(token.0) {
                                connection.socket_drained = false;
                            }
                            self.drive(token);
                        }
                    }
                }
            }
            let now = Instant::now();
            self.answer_due_logins(now);
            if now >= next_sweep {
                self.sweep_timeouts(now);
                next_sweep = now + TIMEOUT_SWEEP_INTERVAL;
            }
            if self.shared.shutdown.load(Ordering::Acquire) {
                let deadline = *shutdown_deadline.get_or_insert_with(|| {
                    self.begin_shutdown();
                    now + SHUTDOWN_GRACE
                });
                self.drain_notices();
                if self.pending.is_empty() || now >= deadline {
                    break;
                }
            }
        }
        let keys: Vec<usize> = self.connections.iter().map(|(key, _)| key).collect();
        for key in keys {
            self.close(Token(key));
        }
    }

    fn begin_shutdown(&mut self) {
        if self.listening {
            for (listener, _) in &mut self.listeners {
                let _ = self.poll.registry().deregister(listener);
            }
            self.listening = false;
        }
        let idle: Vec<usize> = self
            .connections
            .iter()
            .filter(|(_, connection)| connection.session.waiting() != Waiting::Commit)
            .map(|(key, _)| key)
            .collect();
        for key in idle {
            if let Some(connection) = self.connections.get_mut(key) {
                connection
                    .session
                    .close_with(replies::SHUTTING_DOWN, &mut connection.output);
                connection.closing = true;
            }
            self.flush(Token(key));
        }
    }

    fn accept(&mut self, position: usize) {
        loop {
            let Some((listener, listener_index)) = self.listeners.get(position) else {
                return;
            };
            let listener_index = *listener_index;
            let (mut stream, peer) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    // EMFILE and friends: leave the connection in the backlog and retry
                    // at the next event rather than spinning.
                    tracing::warn!(%error, "accept failed");
                    return;
                }
            };
            if self.shared.shutdown.load(Ordering::Acquire) {
                let mut refusal = Vec::new();
                replies::SHUTTING_DOWN.write_to(&mut refusal);
                let _ = stream.write(&refusal);
                continue;
            }
            if let Err(admission) = self.shared.admit(peer.ip(), &self.policy.config.limits) {
                self.shared
                    .stats
                    .connections_refused
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(client = %peer, ?admission, "connection refused by limit");
                let mut refusal = Vec::new();
                admission.reply().write_to(&mut refusal);
                let _ = stream.write(&refusal);
                continue;
            }
            self.shared
                .stats
                .connections_accepted
                .fetch_add(1, Ordering::Relaxed);
            let _ = stream.set_nodelay(true);
            let policy = Arc::clone(&self.policy);
            let Some(listener) = policy.listeners.get(listener_index).cloned() else {
                self.shared.release(peer.ip());
                continue;
            };
            let may_relay = listener
                .config
                .relay_networks
                .iter()
                .any(|network| network.contains(&peer.ip()));
            // Implicit TLS (RFC 8314): the handshake comes first; the greeting waits in
            // the TLS session until it completes.
            let tls = match (listener.config.mode, &listener.tls) {
                (tsubame_config::ListenerMode::Smtps, Some(tls)) => {
                    match ServerConnection::new(tls.current()) {
                        Ok(connection) => Some(Box::new(connection)),
                        Err(error) => {
                            tracing::error!(%error, client = %peer, "cannot start TLS");
                            self.shared.release(peer.ip());
                            continue;
                        }
                    }
                }
                _ => None,
            };
            let entry = self.connections.vacant_entry();
            let token = Token(entry.key());
            if let Err(error) =
                self.poll
                    .registry()
                    .register(&mut stream, token, Interest::READABLE)
            {
                tracing::warn!(%error, client = %peer, "cannot register connection");
                self.shared.release(peer.ip());
                continue;
            }
            self.next_connection_id += 1;
            let mut output = Vec::new();
            Session::greeting(&self.shared.hostname, &mut output);
            if self.shared.observer.watching(peer.ip(), None) {
                self.shared.observer.line(
                    peer,
                    None,
                    Direction::Note,
                    &format!("connected to {}", listener.config.address),
                );
                let greeting = String::from_utf8_lossy(&output);
                self.shared
                    .observer
                    .line(peer, None, Direction::Server, greeting.trim_end());
            }
            entry.insert(Connection {
                id: self.next_connection_id,
                stream,
                peer,
                policy,
                listener,
                may_relay,
                session: Session::new(peer),
                tls,
                tls_reported: false,
                tls_upgrade_pending: false,
                close_notify_sent: false,
                input: Vec::new(),
                output,
                output_written: 0,
                writable_registered: false,
                last_activity: Instant::now(),
                content_started: None,
                closing: false,
                read_paused_for_output: false,
                socket_drained: true,
            });
            tracing::debug!(client = %peer, "connected");
            self.flush(token);
        }
    }

    /// Reads, processes and writes for one connection until it would block, waits for a
    /// commit, or has too many replies unread. When reading paused for unread replies and
    /// writing then drained them all, it goes on reading: no readiness event would come
    /// for input already waiting in the socket (a loop, not recursion, however long the
    /// client's pipeline).
    fn drive(&mut self, token: Token) {
        loop {
            self.read_and_process(token);
            if self.write_output(token) != Written::DrainedResumeReading {
                return;
            }
        }
    }

    /// Writes pending output; closes the connection when it is done and closing. Resumes
    /// reading (see [`EventLoop::drive`]) when that had paused for the output.
    fn flush(&mut self, token: Token) {
        if self.write_output(token) == Written::DrainedResumeReading {
            self.drive(token);
        }
    }

    fn read_and_process(&mut self, token: Token) {
        let Self {
            connections,
            scratch,
            shared,
            pending,
            login_replies,
            delayed_logins,
            waker,
            ..
        } = self;
        let Some(connection) = connections.get_mut(token.0) else {
            return;
        };
        let listener = Arc::clone(&connection.listener);
        let policy = Arc::clone(&connection.policy);
        let context = session_context(shared, &policy, &listener, connection.may_relay);
        let observer = &*shared.observer;
        let traced = observer.watching(connection.peer.ip(), connection.session.login());
        connection.session.set_traced(traced);
        let transcript_start = connection.output.len();
        // Input left over from before (a commit just returned, or the output drained).
        let mut event = process_input(connection, &context, shared, pending, token);
        while !connection.closing && event == Event::NeedInput && !connection.socket_drained {
            if connection.output.len() - connection.output_written >= OUTPUT_BUFFER_HIGH_BYTES {
                connection.read_paused_for_output = true;
                break;
            }
            let received = receive(connection, scratch);
            if report_handshake(connection, observer, traced) {
                shared.stats.tls_handshakes.fetch_add(1, Ordering::Relaxed);
            }
            let read = match received {
                Ok(0) => {
                    connection.closing = true;
                    break;
                }
                Ok(read) => read,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    connection.socket_drained = true;
                    break;
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error)
                    if connection.tls.is_some() && error.kind() == io::ErrorKind::InvalidData =>
                {
                    // Worth an administrator's eye: an old device that offers only
                    // TLS 1.0, or a certificate the client refuses.
                    tracing::info!(client = %connection.peer, %error, "TLS failed");
                    if !connection.tls_reported {
                        shared
                            .stats
                            .tls_handshake_failures
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    if traced {
                        observer.line(
                            connection.peer,
                            connection.session.login(),
                            Direction::Note,
                            &format!("TLS failed: {error}"),
                        );
                    }
                    connection.closing = true;
                    break;
                }
                Err(error) => {
                    tracing::debug!(client = %connection.peer, %error, "read failed");
                    connection.closing = true;
                    break;
                }
            };
            connection.last_activity = Instant::now();
            // A short read means the socket buffer is empty for now. Linux's epoll raises a
            // new edge for every segment that arrives later, so we skip the read that
            // would only return WouldBlock (one syscall per command round trip). Not
            // under TLS: a short read of plaintext says nothing about the socket.
            let drained = connection.tls.is_none() && read < scratch.len();
            let received = scratch.get(..read).unwrap_or_default();
            if connection.input.is_empty() {
                // Common case: process straight from the scratch buffer, keep leftovers.
                let (used, next) =
                    connection
                        .session
                        .process(received, &mut connection.output, &context);
                connection
                    .input
                    .extend_from_slice(received.get(used..).unwrap_or_default());
                event = after_process(connection, next, &context, shared, pending, token);
            } else {
                connection.input.extend_from_slice(received);
                event = process_input(connection, &context, shared, pending, token);
            }
            if drained {
                connection.socket_drained = true;
                break;
            }
        }
        match event {
            Event::Close => connection.closing = true,
            Event::StartTls => {
                // RFC 3207 §4.2 and CVE-2011-0411: whatever the client sent after
                // STARTTLS, before the handshake, is discarded, never executed.
                if !connection.input.is_empty() {
                    tracing::info!(client = %connection.peer, bytes = connection.input.len(), "discarded input pipelined after STARTTLS");
                }
                connection.input.clear();
                connection.tls_upgrade_pending = true;
            }
            Event::Login => {
                start_login(
                    connection,
                    shared,
                    token,
                    login_replies,
                    delayed_logins,
                    waker,
                );
            }
            Event::NeedInput | Event::MessageReady | Event::AwaitingCommit => {}
        }
        if traced {
            report_transcript(connection, observer, transcript_start);
        }
    }

    /// Answers the logins whose checks are back and whose delay has passed.
    fn answer_due_logins(&mut self, now: Instant) {
        if self.delayed_logins.is_empty() {
            return;
        }
        let (due, later): (Vec<LoginDone>, Vec<LoginDone>) =
            std::mem::take(&mut self.delayed_logins)
                .into_iter()
                .partition(|done| done.answer_at <= now);
        self.delayed_logins = later;
        for done in due {
            self.answer_login(done);
        }
    }

    fn answer_login(&mut self, done: LoginDone) {
        let LoginDone {
            token,
            connection_id,
            username,
            outcome,
            ..
        } = done;
        let Some(connection) = self.connections.get_mut(token.0) else {
            return;
        };
        if connection.id != connection_id {
            return;
        }
        let shared = &*self.shared;
        let client = connection.peer;
        let now = Timestamp::from_unix_ms(now_unix_ms());
        let listener = Arc::clone(&connection.listener);
        let policy = Arc::clone(&connection.policy);
        let context = session_context(shared, &policy, &listener, connection.may_relay);
        let start = connection.output.len();
        let mut guard = policy
            .login_guard
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match outcome {
            Outcome::Accepted => {
                guard.after_success(client.ip(), &username, now);
                drop(guard);
                tracing::info!(%client, user = ?username, "login succeeded");
                connection
                    .session
                    .login_succeeded(&username, &mut connection.output);
            }
            Outcome::Rejected(reason) => {
                let next = guard.after_failure(client.ip(), Some(&username), now);
                drop(guard);
                let locked = matches!(next, Decision::Locked { .. });
                shared.stats.login_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%client, user = ?username, reason, locked, "login failed");
                connection.session.login_failed(
                    replies::AUTH_INVALID,
                    &mut connection.output,
                    &context,
                );
            }
            Outcome::LockedOut => {
                drop(guard);
                tracing::warn!(%client, user = ?username, "login refused: too many failed logins");
                shared.stats.login_lockouts.fetch_add(1, Ordering::Relaxed);
                connection.session.login_failed(
                    replies::LOCKED_OUT,
                    &mut connection.output,
                    &context,
                );
            }
            Outcome::Unavailable => {
                drop(guard);
                connection.session.login_failed(
                    replies::AUTH_TEMPORARY,
                    &mut connection.output,
                    &context,
                );
            }
        }
        let observer = &*shared.observer;
        if observer.watching(client.ip(), Some(&username)) {
            if outcome == Outcome::Accepted {
                observer.line(
                    client,
                    Some(&username),
                    Direction::Note,
                    &format!("authenticated as {username}"),
                );
            }
            report_transcript(connection, observer, start);
        }
        self.drive(token);
    }

    /// Writes as much pending output as the socket takes, closes the connection when it is
    /// closing and everything is written, and keeps the WRITABLE interest in step.
    fn write_output(&mut self, token: Token) -> Written {
        let Some(connection) = self.connections.get_mut(token.0) else {
            return Written::Closed;
        };
        let mut failed = false;
        let mut tls_pending = false;
        if let Some(tls) = connection.tls.as_deref_mut() {
            // Plaintext into the TLS session (it holds it while handshaking), records out,
            // until the output is all in or the socket would block. The session takes at
            // most its buffer limit (64 KiB) at a time: stopping while the socket still
            // takes more would wait for a writable edge that never comes (epoll raises
            // one only after a write returned WouldBlock).
            loop {
                while connection.output_written < connection.output.len() {
                    let unwritten = connection
                        .output
                        .get(connection.output_written..)
                        .unwrap_or_default();
                    match tls.writer().write(unwritten) {
                        // Its buffer is full: the socket must take records first.
                        Ok(0) => break,
                        Ok(written) => connection.output_written += written,
                        Err(_) => {
                            failed = true;
                            break;
                        }
                    }
                }
                if connection.closing
                    && connection.output_written == connection.output.len()
                    && !connection.close_notify_sent
                {
                    tls.send_close_notify();
                    connection.close_notify_sent = true;
                }
                let buffered_before = tls.wants_write();
                if flush_tls(tls, &mut connection.stream).is_err() {
                    failed = true;
                }
                tls_pending = tls.wants_write();
                // Done, failed, blocked (an edge will come), or the session takes no
                // more (still handshaking: it holds plaintext until the keys exist).
                if failed
                    || tls_pending
                    || !buffered_before
                    || connection.output_written == connection.output.len()
                {
                    break;
                }
            }
        } else {
            while connection.output_written < connection.output.len() {
                let unwritten = connection
                    .output
                    .get(connection.output_written..)
                    .unwrap_or_default();
                match connection.stream.write(unwritten) {
                    Ok(0) => {
                        failed = true;
                        break;
                    }
                    Ok(written) => connection.output_written += written,
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                    Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => {
                        failed = true;
                        break;
                    }
                }
            }
        }
        let output_done = connection.output_written == connection.output.len();
        if output_done {
            connection.output.clear();
            connection.output_written = 0;
            if connection.output.capacity() > OUTPUT_BUFFER_HIGH_BYTES {
                connection.output = Vec::new();
            }
        }
        let drained = output_done && !tls_pending;
        let mut upgraded = false;
        if drained && connection.tls_upgrade_pending && !failed && !connection.closing {
            // The 220 is out in plain text: from here on the socket speaks TLS.
            connection.tls_upgrade_pending = false;
            let started = connection
                .listener
                .tls
                .as_ref()
                .map(|tls| ServerConnection::new(tls.current()));
            match started {
                Some(Ok(tls)) => {
                    connection.tls = Some(Box::new(tls));
                    connection.session.tls_started();
                    connection.socket_drained = false;
                    upgraded = true;
                }
                Some(Err(error)) => {
                    tracing::error!(%error, client = %connection.peer, "cannot start TLS");
                    failed = true;
                }
                None => failed = true,
            }
        }
        if failed || (drained && connection.closing) {
            self.close(token);
            return Written::Closed;
        }
        let want_writable = !drained;
        if want_writable != connection.writable_registered {
            let interest = if want_writable {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            if self
                .poll
                .registry()
                .reregister(&mut connection.stream, token, interest)
                .is_err()
            {
                self.close(token);
                return Written::Closed;
            }
            connection.writable_registered = want_writable;
        }
        if !drained {
            return Written::Pending;
        }
        if std::mem::take(&mut connection.read_paused_for_output) || upgraded {
            Written::DrainedResumeReading
        } else {
            Written::Drained
        }
    }

    fn close(&mut self, token: Token) {
        if let Some(connection) = self.connections.try_remove(token.0) {
            // No deregister: closing the socket (its only descriptor) removes it from
            // the epoll set, and saves a syscall per connection.
            self.shared.release(connection.peer.ip());
            let observer = &*self.shared.observer;
            let user = connection.session.login();
            if observer.watching(connection.peer.ip(), user) {
                observer.line(connection.peer, user, Direction::Note, "disconnected");
            }
            tracing::debug!(client = %connection.peer, "disconnected");
        }
    }

    fn drain_notices(&mut self) {
        while let Ok(notice) = self.notices.try_recv() {
            while let Some(front) = self.pending.front() {
                if front.sequence > notice.through_sequence {
                    break;
                }
                let Some(done) = self.pending.pop_front() else {
                    break;
                };
                self.resolve(done, &notice);
            }
        }
    }

    /// Tells the client how its message fared and, when it is durable, hands it to
    /// delivery: also when the client has gone meanwhile, because the message is in the
    /// spool either way.
    fn resolve(&mut self, done: Pending, notice: &CommitNotice) {
        let Pending {
            token,
            connection_id,
            message,
            ..
        } = done;
        let message_id = message.id;
        let durable = notice.result.is_ok();
        let log_fields = durable.then(|| {
            (
                message.mail_from.clone(),
                message.recipients.len(),
                message.body_size_bytes,
            )
        });
        if durable {
            (self.shared.handoff)(message);
        }
        let Some(connection) = self.connections.get_mut(token.0) else {
            return;
        };
        if connection.id != connection_id {
            return;
        }
        let listener = Arc::clone(&connection.listener);
        let policy = Arc::clone(&connection.policy);
        let context = session_context(&self.shared, &policy, &listener, connection.may_relay);
        let start = connection.output.len();
        match &notice.result {
            Ok(()) => {
                let (from, recipients, size_bytes) = log_fields.unwrap_or_default();
                tracing::info!(
                    id = %message_id,
                    client = %connection.peer,
                    from,
                    recipients,
                    size_bytes,
                    "message accepted"
                );
                connection
                    .session
                    .committed(&message_id.to_string(), &mut connection.output);
            }
            Err(reason) => {
                tracing::error!(id = %message_id, client = %connection.peer, %reason, "spool sync failed; message refused with 451");
                connection.session.refuse_message(
                    replies::LOCAL_ERROR,
                    &mut connection.output,
                    &context,
                );
            }
        }
        connection.content_started = None;
        let observer = &*self.shared.observer;
        if observer.watching(connection.peer.ip(), connection.session.login()) {
            report_transcript(connection, observer, start);
        }
        self.drive(token);
    }

    fn sweep_timeouts(&mut self, now: Instant) {
        let mut expired = Vec::new();
        let mut abandoned = Vec::new();
        for (key, connection) in &self.connections {
            // Each connection's own limits: a reload does not shorten a running session.
            let limits = &connection.policy.config.limits;
            let command_timeout = Duration::from_secs(limits.command_timeout_secs);
            let block_timeout = Duration::from_secs(limits.data_block_timeout_secs);
            let total_timeout = Duration::from_secs(limits.data_total_timeout_secs);
            let idle = now.saturating_duration_since(connection.last_activity);
            if connection.closing {
                // Its last replies could not be written: the client stopped reading.
                if idle >= CLOSING_FLUSH_GRACE {
                    abandoned.push(key);
                }
                continue;
            }
            let reply = match connection.session.waiting() {
                Waiting::Command if idle >= command_timeout => Some(replies::TIMEOUT),
                Waiting::Content if idle >= block_timeout => Some(replies::TIMEOUT),
                Waiting::Content
                    if connection.content_started.is_some_and(|started| {
                        now.saturating_duration_since(started) >= total_timeout
                    }) =>
                {
                    Some(replies::DATA_TIMEOUT)
                }
                _ => None,
            };
            if let Some(reply) = reply {
                expired.push((key, reply));
            }
        }
        for (key, reply) in expired {
            if let Some(connection) = self.connections.get_mut(key) {
                tracing::info!(client = %connection.peer, reply = %reply.text, "session timed out");
                connection.session.close_with(reply, &mut connection.output);
                connection.closing = true;
                // The flush grace counts from here.
                connection.last_activity = now;
            }
            self.flush(Token(key));
        }
        for key in abandoned {
            if let Some(connection) = self.connections.get(key) {
                tracing::debug!(client = %connection.peer, "closing without flushing: the client does not read");
            }
            self.close(Token(key));
        }
    }
}

impl std::fmt::Debug for EventLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoop")
            .field("connections", &self.connections.len())
            .finish_non_exhaustive()
    }
}

/// Wall-clock time in Unix milliseconds (0 if the clock is before 1970).
fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

fn session_context<'a>(
    shared: &'a Shared,
    policy: &'a Policy,
    listener: &'a Listener,
    may_relay: bool,
) -> SessionContext<'a> {
    SessionContext {
        hostname: &shared.hostname,
        limits: &policy.config.limits,
        may_relay,
        listener: &listener.config,
        users: &policy.config.users,
        rates: &policy.rates,
        now_unix_ms: now_unix_ms(),
        stamp_received: true,
    }
}

/// Reads received plaintext into `buffer`: straight from the socket, or through the TLS
/// session (which first takes records from the socket, answers handshake messages and
/// decrypts). `Ok(0)` is the end of the stream.
fn receive(connection: &mut Connection, buffer: &mut [u8]) -> io::Result<usize> {
    let Some(tls) = connection.tls.as_deref_mut() else {
        return connection.stream.read(buffer);
    };
    loop {
        match tls.reader().read(buffer) {
            Ok(read) => return Ok(read),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(error),
        }
        if tls.read_tls(&mut connection.stream)? == 0 {
            return Ok(0);
        }
        let processed = tls.process_new_packets();
        // Handshake messages, and the alert when processing failed, go out either way.
        flush_tls(tls, &mut connection.stream)?;
        if let Err(error) = processed {
            return Err(io::Error::new(io::ErrorKind::InvalidData, error));
        }
    }
}

/// Writes the TLS session's pending records until the socket would block.
fn flush_tls(tls: &mut ServerConnection, stream: &mut TcpStream) -> io::Result<()> {
    while tls.wants_write() {
        match tls.write_tls(stream) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(_) => {}
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

/// Tells the session (and a watcher) once the TLS handshake has completed; true the
/// one time it does.
fn report_handshake(connection: &mut Connection, observer: &dyn Observer, traced: bool) -> bool {
    let Some(tls) = connection.tls.as_deref() else {
        return false;
    };
    if connection.tls_reported || tls.is_handshaking() {
        return false;
    }
    connection.tls_reported = true;
    let version = match tls.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
        _ => "TLS",
    };
    let cipher = tls
        .negotiated_cipher_suite()
        .map(|suite| format!("{:?}", suite.suite()))
        .unwrap_or_default();
    tracing::debug!(client = %connection.peer, version, cipher, "TLS established");
    if traced {
        observer.line(
            connection.peer,
            connection.session.login(),
            Direction::Note,
            &format!("TLS established: {version} {cipher}"),
        );
    }
    connection
        .session
        .tls_established(TlsInfo { version, cipher });
    true
}

/// Sends a watched session's new commands and replies to the observer, in order.
fn report_transcript(connection: &mut Connection, observer: &dyn Observer, start: usize) {
    let entries = connection.session.take_transcript();
    let user = connection.session.login();
    let peer = connection.peer;
    let mut cursor = start;
    let replies = |from: usize, to: usize| {
        let text = connection.output.get(from..to).unwrap_or_default();
        for line in text
            .split(|&byte| byte == b'\n')
            .filter(|line| !line.is_empty())
        {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            observer.line(
                peer,
                user,
                Direction::Server,
                &String::from_utf8_lossy(line),
            );
        }
    };
    for (offset, direction, text) in entries {
        let offset = offset.max(cursor);
        replies(cursor, offset);
        cursor = offset;
        observer.line(peer, user, direction, &text);
    }
    replies(cursor, connection.output.len());
}

/// Sends AUTH's credentials to the login pool, or refuses them at once when the login
/// guard has locked the client or the user out.
fn start_login(
    connection: &mut Connection,
    shared: &Shared,
    token: Token,
    replies: &Sender<LoginDone>,
    delayed: &mut Vec<LoginDone>,
    waker: &Arc<Waker>,
) {
    let Some(credentials) = connection.session.take_credentials() else {
        return;
    };
    let now = Instant::now();
    let decision = connection
        .policy
        .login_guard
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .before_attempt(
            connection.peer.ip(),
            Some(&credentials.username),
            Timestamp::from_unix_ms(now_unix_ms()),
        );
    let answer_at = match decision {
        Decision::Allow => now,
        Decision::Delay(delay) => now + delay,
        Decision::Locked { .. } => {
            delayed.push(LoginDone {
                token,
                connection_id: connection.id,
                username: credentials.username.clone(),
                outcome: Outcome::LockedOut,
                answer_at: now,
            });
            return;
        }
    };
    if shared
        .logins
        .cache
        .recalls(&credentials, now, connection.policy.accounts_epoch)
    {
        delayed.push(LoginDone {
            token,
            connection_id: connection.id,
            username: credentials.username.clone(),
            outcome: Outcome::Accepted,
            answer_at,
        });
        return;
    }
    let job = LoginJob {
        token,
        connection_id: connection.id,
        credentials,
        config: Arc::clone(&connection.policy.config),
        accounts_epoch: connection.policy.accounts_epoch,
        answer_at,
        reply: replies.clone(),
        waker: Arc::clone(waker),
    };
    if let Err(job) = shared.logins.submit(job) {
        delayed.push(LoginDone {
            token,
            connection_id: connection.id,
            username: job.credentials.username.clone(),
            outcome: Outcome::Unavailable,
            answer_at: now,
        });
    }
}

/// Feeds the connection's buffered input to its session.
fn process_input(
    connection: &mut Connection,
    context: &SessionContext<'_>,
    shared: &Shared,
    pending: &mut VecDeque<Pending>,
    token: Token,
) -> Event {
    let input = std::mem::take(&mut connection.input);
    let (used, event) = connection
        .session
        .process(&input, &mut connection.output, context);
    connection.input = input;
    connection.input.drain(..used.min(connection.input.len()));
    after_process(connection, event, context, shared, pending, token)
}

/// Acts on what the session asked for; returns the event the read loop should see.
fn after_process(
    connection: &mut Connection,
    event: Event,
    context: &SessionContext<'_>,
    shared: &Shared,
    pending: &mut VecDeque<Pending>,
    token: Token,
) -> Event {
    match connection.session.waiting() {
        Waiting::Content if connection.content_started.is_none() => {
            connection.content_started = Some(Instant::now())
        }
        Waiting::Command => connection.content_started = None,
        _ => {}
    }
    if event != Event::MessageReady {
        return event;
    }
    let Some(parts) = connection.session.message() else {
        return Event::NeedInput;
    };
    let received_at_unix_ms = now_unix_ms();
    let user = connection.session.login();
    let recipients = u32::try_from(parts.recipients.len()).unwrap_or(u32::MAX);
    if let Err(reply) = connection.policy.rates.count_message(
        connection.peer.ip(),
        user,
        recipients,
        received_at_unix_ms,
    ) {
        tracing::info!(client = %connection.peer, user = ?user, reply = %reply.text, "message refused by a rate limit");
        connection
            .session
            .refuse_message(reply, &mut connection.output, context);
        return process_input(connection, context, shared, pending, token);
    }
    let envelope = Envelope {
        received_at_unix_ms,
        client_address: connection.peer,
        helo: parts.helo,
        authenticated_user: user,
        mail_from: parts.mail_from,
        mail_parameters: parts.mail_parameters,
        recipients: parts.recipients,
    };
    match shared.spool.append_message(&envelope, parts.body) {
        Ok(receipt) => {
            pending.push_back(Pending {
                sequence: receipt.sequence,
                token,
                connection_id: connection.id,
                message: SpooledMessage {
                    id: receipt.id,
                    location: receipt.location,
                    received_at_unix_ms,
                    client_address: connection.peer.to_string(),
                    helo: parts.helo.to_string(),
                    authenticated_user: user.map(str::to_string),
                    mail_from: parts.mail_from.to_string(),
                    mail_parameters: parts.mail_parameters.to_string(),
                    recipients: parts.recipients.to_vec(),
                    body_size_bytes: parts.body.len() as u64,
                    state: MessageState::Queued,
                    recipient_states: vec![RecipientState::default(); parts.recipients.len()],
                    added_fields: None,
                },
            });
            connection.session.spooled();
            Event::AwaitingCommit
        }
        Err(error) => {
            let reply = match error {
                SpoolError::DiskFull => replies::DISK_FULL,
                _ => replies::LOCAL_ERROR,
            };
            if let Some(suppressed) = SPOOL_ERROR_LOG.should_log() {
                tracing::error!(
                    client = %connection.peer,
                    %error,
                    code = reply.code,
                    suppressed,
                    "cannot spool message; the client gets a temporary failure"
                );
            }
            connection
                .session
                .refuse_message(reply, &mut connection.output, context);
            // The session is back in command state: keep processing buffered input.
            process_input(connection, context, shared, pending, token)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::LogThrottle;

    #[test]
    fn throttle_logs_once_per_interval_and_counts_the_rest() {
        let throttle = LogThrottle::new();
        assert_eq!(throttle.should_log(), Some(0));
        assert_eq!(throttle.should_log(), None);
        assert_eq!(throttle.should_log(), None);
        // Pretend the interval passed: the next line reports the two suppressed.
        throttle
            .last_logged_unix_ms
            .store(0, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(throttle.should_log(), Some(2));
    }
}
