//! `tsubame bench`: a load generator, so users can benchmark a relay (ours or another)
//! without Postfix's `smtp-source`.
//!
//! Each of `concurrency` threads opens a connection with [`UpstreamConnection`], sends up
//! to `messages_per_connection` messages over it, and opens the next; together they send
//! `messages` messages. Accept latency is measured per message from the start of the
//! transaction (MAIL) to the reply to its content: for a relay that syncs before it
//! answers, that is what a client waits for durability.
//!
//! Connections are plain, STARTTLS (RFC 3207) or implicit TLS (RFC 8314), with AUTH
//! after TLS when there are credentials: [`UpstreamConnection::open`] does all of it,
//! the same code that delivers mail. [`run_handshakes`] measures connection set-up
//! alone: connect, greeting, EHLO, STARTTLS and the handshake, EHLO again, QUIT.
//!
//! A failure no retry can fix (STARTTLS not offered, a certificate that does not
//! verify, a refused login) stops the whole run at once with that error in the report,
//! instead of every worker retrying it.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use rustls::ClientConfig;
use rustls::client::Resumption;
use tsubame_config::TlsMode;

use crate::client::{BodyType, ClientError, Message, RecipientOutcome};
use crate::connection::{ConnectOptions, Credentials, DeliveryError, Timeouts, UpstreamConnection};
use crate::tls::{self, TlsError};

/// How every connection of the load is secured.
#[derive(Debug, Clone)]
pub enum LoadTls {
    /// Plain text; STARTTLS is never sent.
    Plain,
    /// STARTTLS on every connection, then EHLO again; a target that does not offer it
    /// ends the run.
    StartTls(Arc<ClientConfig>),
    /// TLS from the first byte (RFC 8314).
    Implicit(Arc<ClientConfig>),
}

impl LoadTls {
    fn mode(&self) -> TlsMode {
        match self {
            Self::Plain => TlsMode::None,
            Self::StartTls(_) => TlsMode::Required,
            Self::Implicit(_) => TlsMode::Implicit,
        }
    }

    fn config(&self) -> Option<Arc<ClientConfig>> {
        match self {
            Self::Plain => None,
            Self::StartTls(config) | Self::Implicit(config) => Some(Arc::clone(config)),
        }
    }
}

/// The TLS client configuration of a load run, shared by all its connections.
///
/// With `ca_file` the server's certificate must chain to a CA in it and match the
/// server name. Without it the certificate is **not verified** (the opportunistic
/// configuration of [`tls::opportunistic_config`]: handshake signatures checked, chain
/// and name not): a bench runs against a throwaway self-signed certificate, and what it
/// measures is the handshake's cost, which is the same either way.
///
/// `resume: false` disables session resumption, so every connection does a full
/// handshake: the costly case, and the same for every server whatever its session
/// cache or tickets. `true` lets rustls resume from its in-memory cache (shared by
/// all connections, as the configuration is).
pub fn tls_config(ca_file: Option<&Path>, resume: bool) -> Result<Arc<ClientConfig>, TlsError> {
    let config = match ca_file {
        Some(path) => tls::client_config(Some(path))?,
        None => tls::opportunistic_config()?,
    };
    if resume {
        return Ok(config);
    }
    let mut config = Arc::unwrap_or_clone(config);
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// What to send.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub target: SocketAddr,
    pub messages: u64,
    /// Size of each message's content, headers included (at least the headers).
    pub size_bytes: usize,
    pub concurrency: usize,
    /// Messages per connection; 0 keeps each connection for as many as it gets.
    pub messages_per_connection: u64,
    pub helo: String,
    pub mail_from: String,
    pub recipient: String,
    pub timeouts: Timeouts,
    /// Message (or, for [`run_handshakes`], connection) `n` is not started before
    /// `n / rate` seconds after the start (evenly paced over all sessions); `None` goes
    /// as fast as the target accepts. Finite, positive.
    pub rate_per_second: Option<f64>,
    pub tls: LoadTls,
    /// The name the server's certificate must match when it is verified, also sent as
    /// SNI; an IP address (the target's, usually) sends no SNI. Unused in plain text.
    pub tls_server_name: String,
    /// AUTH on every connection, after TLS (never sent in plain text).
    pub credentials: Option<Credentials>,
}

impl LoadOptions {
    fn connect_options(&self) -> ConnectOptions<'_> {
        ConnectOptions {
            helo_name: &self.helo,
            tls: self.tls.mode(),
            server_name: &self.tls_server_name,
            tls_config: self.tls.config(),
            credentials: self.credentials.as_ref(),
            timeouts: self.timeouts,
        }
    }

    /// Waits until item `number` is due at `rate_per_second`.
    fn pace(&self, number: u64, started: Instant) {
        if let Some(rate) = self.rate_per_second {
            let due = started + Duration::from_secs_f64(number as f64 / rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
    }
}

/// Running totals, readable while the load runs.
#[derive(Debug, Default)]
pub struct LoadCounts {
    /// Messages whose every recipient was accepted.
    pub accepted: AtomicU64,
    /// Messages with a recipient deferred (4xx, or the connection was lost).
    pub deferred: AtomicU64,
    /// Messages with a recipient refused permanently (5xx).
    pub failed: AtomicU64,
    /// Connections that could not be opened or failed outside a transaction.
    pub connection_errors: AtomicU64,
}

/// The result of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadReport {
    pub accepted: u64,
    pub deferred: u64,
    pub failed: u64,
    pub connection_errors: u64,
    pub elapsed: Duration,
    /// Accept latency of each accepted message, sorted.
    pub latencies: Vec<Duration>,
    /// TLS version and cipher suite of the first encrypted connection; `None` in plain
    /// text.
    pub tls: Option<String>,
    /// The error that stopped the run early, when one did (see [`is_fatal`]).
    pub fatal: Option<String>,
}

impl LoadReport {
    pub fn messages_per_second(&self) -> f64 {
        per_second(self.accepted, self.elapsed)
    }

    /// The latency below which `fraction` (0..=1) of accepted messages fall.
    pub fn latency_percentile(&self, fraction: f64) -> Option<Duration> {
        percentile(&self.latencies, fraction)
    }
}

impl std::fmt::Display for LoadReport {
    /// One line of `key=value` fields; `tls=` only when the connections were encrypted,
    /// so that the plain-text line stays what it always was.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "accepted={} deferred={} failed={} connection_errors={} elapsed_s={:.3} msgs_per_s={:.0} ",
            self.accepted,
            self.deferred,
            self.failed,
            self.connection_errors,
            self.elapsed.as_secs_f64(),
            self.messages_per_second(),
        )?;
        write_percentiles(f, &self.latencies)?;
        if let Some(tls) = &self.tls {
            write!(f, " tls={}", report_word(tls))?;
        }
        Ok(())
    }
}

/// Running totals of [`run_handshakes`], readable while it runs.
#[derive(Debug, Default)]
pub struct HandshakeCounts {
    /// Connections set up (TLS and AUTH included, when asked) and closed with QUIT.
    pub completed: AtomicU64,
    /// Connections that failed anywhere from the connect to the reply to QUIT.
    pub errors: AtomicU64,
}

/// The result of [`run_handshakes`].
#[derive(Debug, Clone, PartialEq)]
pub struct HandshakeReport {
    pub completed: u64,
    pub errors: u64,
    /// Completed connections whose TLS handshake resumed an earlier session.
    pub resumed: u64,
    pub elapsed: Duration,
    /// Set-up latency of each completed connection, sorted: from the start of the TCP
    /// connect to the reply to the last EHLO (or to AUTH), QUIT not included.
    pub latencies: Vec<Duration>,
    /// As [`LoadReport::tls`].
    pub tls: Option<String>,
    /// As [`LoadReport::fatal`].
    pub fatal: Option<String>,
}

impl HandshakeReport {
    /// Completed connect-to-QUIT cycles per second.
    pub fn handshakes_per_second(&self) -> f64 {
        per_second(self.completed, self.elapsed)
    }

    /// The set-up latency below which `fraction` (0..=1) of completed connections fall.
    pub fn latency_percentile(&self, fraction: f64) -> Option<Duration> {
        percentile(&self.latencies, fraction)
    }
}

impl std::fmt::Display for HandshakeReport {
    /// One line of `key=value` fields, in the style of [`LoadReport`]'s; `tls=none` in
    /// plain text.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "handshakes={} errors={} resumed={} elapsed_s={:.3} handshakes_per_s={:.0} ",
            self.completed,
            self.errors,
            self.resumed,
            self.elapsed.as_secs_f64(),
            self.handshakes_per_second(),
        )?;
        write_percentiles(f, &self.latencies)?;
        write!(
            f,
            " tls={}",
            self.tls
                .as_deref()
                .map_or_else(|| "none".to_owned(), report_word)
        )
    }
}

fn per_second(count: u64, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64().max(f64::MIN_POSITIVE)
}

/// The element of `sorted` below which `fraction` (0..=1) of them fall.
fn percentile(sorted: &[Duration], fraction: f64) -> Option<Duration> {
    let last = sorted.len().checked_sub(1)?;
    let index = ((last as f64) * fraction.clamp(0.0, 1.0)).round() as usize;
    sorted.get(index).copied()
}

fn write_percentiles(f: &mut std::fmt::Formatter<'_>, sorted: &[Duration]) -> std::fmt::Result {
    let millis = |fraction: f64| {
        percentile(sorted, fraction).map_or(0.0, |latency| latency.as_secs_f64() * 1000.0)
    };
    write!(
        f,
        "latency_ms_p50={:.2} latency_ms_p90={:.2} latency_ms_p99={:.2} latency_ms_max={:.2}",
        millis(0.5),
        millis(0.9),
        millis(0.99),
        millis(1.0)
    )
}

/// "TLSv1.3 TLS13_AES_256_GCM_SHA384" as one `key=value` word:
/// "TLSv1.3,TLS13_AES_256_GCM_SHA384".
fn report_word(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(",")
}

/// True for a connection failure that every later attempt would repeat, so the run
/// stops instead of retrying: the target cannot do the TLS or AUTH asked of it (not
/// offered, refused, a certificate that does not verify, a refused login: retrying
/// that would only feed the target's login guard), or the options themselves are
/// invalid. Everything else (refused or reset connections, timeouts, a 421 greeting
/// from a busy server) is load, counted, and retried.
pub fn is_fatal(error: &DeliveryError) -> bool {
    match error {
        DeliveryError::TlsConfigMissing { .. }
        | DeliveryError::InvalidServerName { .. }
        | DeliveryError::TlsHandshake { .. }
        | DeliveryError::StartTlsNotOffered { .. }
        | DeliveryError::StartTlsRefused { .. }
        | DeliveryError::PlaintextAfterStartTls { .. }
        | DeliveryError::AuthWithoutTls { .. }
        | DeliveryError::AuthMechanismUnsupported { .. }
        | DeliveryError::Auth { .. } => true,
        DeliveryError::Protocol { source, .. } => *source == ClientError::InvalidHeloName,
        _ => false,
    }
}

/// What the workers of one run share besides the counts.
#[derive(Debug, Default)]
struct Shared {
    /// Messages (or connections) claimed so far; may pass the total.
    claimed: AtomicU64,
    /// Set with `fatal`: every worker stops before its next connection or message.
    stopped: AtomicBool,
    /// The first fatal error.
    fatal: Mutex<Option<String>>,
    /// TLS version and cipher suite, from the first encrypted connection.
    tls: OnceLock<String>,
}

impl Shared {
    /// Claims the next number, or `None` when all `total` are claimed or the run stopped.
    fn claim(&self, total: u64) -> Option<u64> {
        if self.stopped.load(Ordering::Relaxed) {
            return None;
        }
        let number = self.claimed.fetch_add(1, Ordering::Relaxed);
        (number < total).then_some(number)
    }

    fn stop(&self, error: &DeliveryError) {
        let mut fatal = self.fatal.lock().unwrap_or_else(PoisonError::into_inner);
        if fatal.is_none() {
            *fatal = Some(error.to_string());
        }
        self.stopped.store(true, Ordering::Relaxed);
    }

    fn fatal(&self) -> Option<String> {
        self.fatal
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Notes the TLS parameters once; later connections cost one load.
    fn note_tls(&self, connection: &UpstreamConnection) {
        if self.tls.get().is_none()
            && let Some(summary) = connection.tls_summary()
        {
            let _ = self.tls.set(summary);
        }
    }
}

/// After a connection error, a worker waits this long before it tries again, so an
/// unreachable target costs a few attempts per second, not a busy loop.
const RECONNECT_PAUSE: Duration = Duration::from_millis(100);

/// Connection errors after which a worker gives up (the target is down or refusing).
const CONNECTION_ERRORS_MAX: u64 = 50;

/// The content every message carries: headers, then filler lines up to `size_bytes`
/// (one byte less when only one byte is left to fill).
pub fn message_content(size_bytes: usize, mail_from: &str, recipient: &str) -> Vec<u8> {
    /// One filler line: 76 characters and CRLF, under every line-length limit.
    const FILLER: &[u8] =
        b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcd\r\n";
    let mut content = format!(
        "From: <{mail_from}>\r\nTo: <{recipient}>\r\nSubject: tsubame bench\r\n\
         Message-ID: <bench@tsubame.invalid>\r\n\r\n"
    )
    .into_bytes();
    while content.len() < size_bytes {
        let room = size_bytes - content.len();
        if room >= FILLER.len() {
            content.extend_from_slice(FILLER);
        } else if room >= 2 {
            // Fill the rest with a shorter line that still ends in CRLF.
            content.extend(std::iter::repeat_n(b'x', room - 2));
            content.extend_from_slice(b"\r\n");
        } else {
            // One byte short: a line cannot be 1 byte long.
            break;
        }
    }
    content
}

/// Runs the load; `counts` can be read from another thread for progress.
pub fn run(options: &LoadOptions, counts: &Arc<LoadCounts>) -> LoadReport {
    let content = Arc::new(message_content(
        options.size_bytes,
        &options.mail_from,
        &options.recipient,
    ));
    let shared = Arc::new(Shared::default());
    let started = Instant::now();
    let workers: Vec<_> = (0..options.concurrency.max(1))
        .map(|_| {
            let options = options.clone();
            let content = Arc::clone(&content);
            let shared = Arc::clone(&shared);
            let counts = Arc::clone(counts);
            std::thread::spawn(move || worker(&options, &content, &shared, &counts, started))
        })
        .collect();
    let latencies = join_sorted(workers);
    let elapsed = started.elapsed();
    LoadReport {
        accepted: counts.accepted.load(Ordering::Relaxed),
        deferred: counts.deferred.load(Ordering::Relaxed),
        failed: counts.failed.load(Ordering::Relaxed),
        connection_errors: counts.connection_errors.load(Ordering::Relaxed),
        elapsed,
        latencies,
        tls: shared.tls.get().cloned(),
        fatal: shared.fatal(),
    }
}

/// Opens `handshakes` connections over `concurrency` sessions, each set up as
/// `options` say (TLS, AUTH) and closed with QUIT at once, and reports how many per
/// second and their set-up latency. Sends no mail: the message fields of `options`
/// are unused. Every attempt counts, completed or failed.
pub fn run_handshakes(
    options: &LoadOptions,
    handshakes: u64,
    counts: &Arc<HandshakeCounts>,
) -> HandshakeReport {
    let shared = Arc::new(Shared::default());
    let resumed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..options.concurrency.max(1))
        .map(|_| {
            let options = options.clone();
            let shared = Arc::clone(&shared);
            let counts = Arc::clone(counts);
            let resumed = Arc::clone(&resumed);
            std::thread::spawn(move || {
                handshake_worker(&options, handshakes, &shared, &counts, &resumed, started)
            })
        })
        .collect();
    let latencies = join_sorted(workers);
    let elapsed = started.elapsed();
    HandshakeReport {
        completed: counts.completed.load(Ordering::Relaxed),
        errors: counts.errors.load(Ordering::Relaxed),
        resumed: resumed.load(Ordering::Relaxed),
        elapsed,
        latencies,
        tls: shared.tls.get().cloned(),
        fatal: shared.fatal(),
    }
}

/// Joins the workers and merges their latencies, sorted. A worker that panicked
/// contributes none (its counts are still in the totals).
fn join_sorted(workers: Vec<std::thread::JoinHandle<Vec<Duration>>>) -> Vec<Duration> {
    let mut latencies: Vec<Duration> = Vec::new();
    for handle in workers {
        if let Ok(mut worker_latencies) = handle.join() {
            latencies.append(&mut worker_latencies);
        }
    }
    latencies.sort_unstable();
    latencies
}

/// Counts a failed connection attempt and decides whether the worker goes on: false
/// when the error is fatal (the whole run stops) or this worker has seen
/// [`CONNECTION_ERRORS_MAX`] errors; otherwise after [`RECONNECT_PAUSE`].
fn after_connection_error(shared: &Shared, error: &DeliveryError, errors: &mut u64) -> bool {
    if is_fatal(error) {
        shared.stop(error);
        return false;
    }
    *errors += 1;
    if *errors >= CONNECTION_ERRORS_MAX {
        tracing::warn!(%error, "bench worker gives up after {errors} connection errors");
        return false;
    }
    std::thread::sleep(RECONNECT_PAUSE);
    true
}

fn worker(
    options: &LoadOptions,
    content: &[u8],
    shared: &Shared,
    counts: &LoadCounts,
    started: Instant,
) -> Vec<Duration> {
    let recipients = [options.recipient.clone()];
    let connect = options.connect_options();
    let mut latencies = Vec::new();
    let mut errors = 0u64;
    let mut next = shared.claim(options.messages);
    while next.is_some() {
        let mut connection = match UpstreamConnection::open(options.target, &connect) {
            Ok(connection) => connection,
            Err(error) => {
                counts.connection_errors.fetch_add(1, Ordering::Relaxed);
                if after_connection_error(shared, &error, &mut errors) {
                    continue;
                }
                return latencies;
            }
        };
        shared.note_tls(&connection);
        let mut sent_here = 0u64;
        while let Some(number) = next
            && connection.is_usable()
        {
            let message = Message {
                mail_from: &options.mail_from,
                recipients: &recipients,
                body_type: BodyType::SevenBit,
                smtputf8: false,
                added_fields: &[],
                body: content,
            };
            options.pace(number, started);
            let began = Instant::now();
            match connection.send(message) {
                Ok(result) => {
                    let outcomes = &result.outcomes;
                    if outcomes
                        .iter()
                        .any(|outcome| matches!(outcome, RecipientOutcome::Failed(_)))
                    {
                        counts.failed.fetch_add(1, Ordering::Relaxed);
                    } else if outcomes
                        .iter()
                        .all(|outcome| matches!(outcome, RecipientOutcome::Delivered { .. }))
                    {
                        counts.accepted.fetch_add(1, Ordering::Relaxed);
                        latencies.push(began.elapsed());
                    } else {
                        counts.deferred.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(error) => {
                    // Refused before anything was sent (an invalid address, an unusable
                    // connection): the message fails and is not retried, so a
                    // permanent error cannot keep the worker reconnecting forever.
                    tracing::debug!(%error, "bench message not sent");
                    counts.failed.fetch_add(1, Ordering::Relaxed);
                    next = shared.claim(options.messages);
                    break;
                }
            }
            next = shared.claim(options.messages);
            sent_here += 1;
            if options.messages_per_connection != 0 && sent_here >= options.messages_per_connection
            {
                break;
            }
        }
        let _ = connection.quit();
    }
    latencies
}

fn handshake_worker(
    options: &LoadOptions,
    handshakes: u64,
    shared: &Shared,
    counts: &HandshakeCounts,
    resumed: &AtomicU64,
    started: Instant,
) -> Vec<Duration> {
    let connect = options.connect_options();
    let mut latencies = Vec::new();
    let mut errors = 0u64;
    while let Some(number) = shared.claim(handshakes) {
        options.pace(number, started);
        let began = Instant::now();
        let connection = match UpstreamConnection::open(options.target, &connect) {
            Ok(connection) => connection,
            Err(error) => {
                counts.errors.fetch_add(1, Ordering::Relaxed);
                if after_connection_error(shared, &error, &mut errors) {
                    continue;
                }
                return latencies;
            }
        };
        let set_up = began.elapsed();
        shared.note_tls(&connection);
        let was_resumed = connection.tls_resumed();
        match connection.quit() {
            Ok(()) => {
                counts.completed.fetch_add(1, Ordering::Relaxed);
                if was_resumed {
                    resumed.fetch_add(1, Ordering::Relaxed);
                }
                latencies.push(set_up);
            }
            Err(error) => {
                tracing::debug!(%error, "bench QUIT failed");
                counts.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    latencies
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_has_the_requested_size_and_crlf_lines() {
        let headers_only = message_content(0, "a@example.com", "b@example.org").len();
        for size in [0, 100, 200, 1024, 10_240, 100_000] {
            let content = message_content(size, "a@example.com", "b@example.org");
            assert_eq!(content.len(), size.max(headers_only), "size {size}");
            assert!(content.ends_with(b"\r\n"));
            assert!(
                content
                    .windows(2)
                    .filter(|pair| pair[1] == b'\n')
                    .all(|pair| pair[0] == b'\r')
            );
        }
    }

    #[test]
    fn percentiles() {
        let report = LoadReport {
            accepted: 100,
            deferred: 0,
            failed: 0,
            connection_errors: 0,
            elapsed: Duration::from_secs(2),
            latencies: (1..=100).map(Duration::from_millis).collect(),
            tls: None,
            fatal: None,
        };
        assert_eq!(
            report.latency_percentile(0.5),
            Some(Duration::from_millis(51))
        );
        assert_eq!(
            report.latency_percentile(0.99),
            Some(Duration::from_millis(99))
        );
        assert_eq!(
            report.latency_percentile(1.0),
            Some(Duration::from_millis(100))
        );
        assert_eq!(report.messages_per_second(), 50.0);
        let empty = LoadReport {
            latencies: Vec::new(),
            ..report
        };
        assert_eq!(empty.latency_percentile(0.5), None);
    }
}

#[cfg(test)]
mod session_tests {
    //! The load generator against a scripted in-process server: counts, latencies,
    //! and the early stop on a failure no retry can fix.

    use std::io::{BufRead, BufReader, Write};
    use std::net::{TcpListener, TcpStream};
    use std::thread::JoinHandle;

    use super::*;

    /// Every read of the scripted server, and its wait for all its connections, gives
    /// up after this long, so a client that goes quiet fails the test instead of
    /// hanging it.
    const SERVER_READ_TIMEOUT: Duration = Duration::from_secs(10);

    /// A server that takes `connections` connections one after the other and answers
    /// the greeting, EHLO (with `ehlo_reply`) and QUIT, then reads to EOF. Returns the
    /// commands it saw.
    fn scripted_server(
        connections: usize,
        ehlo_reply: &'static str,
    ) -> (SocketAddr, JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let mut seen = Vec::new();
            listener.set_nonblocking(true).unwrap();
            let deadline = Instant::now() + SERVER_READ_TIMEOUT;
            for _ in 0..connections {
                let stream = loop {
                    match listener.accept() {
                        Ok((stream, _)) => break stream,
                        Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                            assert!(Instant::now() < deadline, "the client never connected");
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        Err(error) => panic!("accept: {error}"),
                    }
                };
                stream.set_nonblocking(false).unwrap();
                stream.set_read_timeout(Some(SERVER_READ_TIMEOUT)).unwrap();
                serve_one(stream, ehlo_reply, &mut seen);
            }
            seen
        });
        (address, server)
    }

    fn serve_one(stream: TcpStream, ehlo_reply: &str, seen: &mut Vec<String>) {
        let mut writer = stream.try_clone().unwrap();
        let mut reader = BufReader::new(stream);
        writer.write_all(b"220 scripted ESMTP\r\n").unwrap();
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap_or(0) > 0 {
            let command = line.trim_end().to_ascii_uppercase();
            seen.push(command.split(' ').next().unwrap_or("").to_owned());
            if command.starts_with("EHLO") {
                writer.write_all(ehlo_reply.as_bytes()).unwrap();
            } else if command == "QUIT" {
                let _ = writer.write_all(b"221 2.0.0 bye\r\n");
            } else {
                writer.write_all(b"502 5.5.1 not here\r\n").unwrap();
            }
            line.clear();
        }
    }

    fn options(target: SocketAddr, tls: LoadTls) -> LoadOptions {
        LoadOptions {
            target,
            messages: 0,
            size_bytes: 0,
            concurrency: 1,
            messages_per_connection: 1,
            helo: "client.test".to_owned(),
            mail_from: "a@example.com".to_owned(),
            recipient: "b@example.org".to_owned(),
            timeouts: Timeouts::uniform(Duration::from_secs(10)),
            rate_per_second: None,
            tls,
            tls_server_name: target.ip().to_string(),
            credentials: None,
        }
    }

    #[test]
    fn plain_handshakes_are_counted_with_their_latencies() {
        let (address, server) = scripted_server(5, "250-scripted\r\n250 PIPELINING\r\n");
        let counts = Arc::new(HandshakeCounts::default());
        let report = run_handshakes(&options(address, LoadTls::Plain), 5, &counts);
        assert_eq!((report.completed, report.errors), (5, 0), "{report}");
        assert_eq!(report.latencies.len(), 5);
        assert_eq!(report.fatal, None);
        assert_eq!(report.tls, None);
        assert_eq!(
            server.join().unwrap(),
            ["EHLO", "QUIT"].repeat(5),
            "connect, EHLO, QUIT; nothing else"
        );
        let line = report.to_string();
        for key in [
            "handshakes=5 ",
            "errors=0 ",
            "handshakes_per_s=",
            "tls=none",
        ] {
            assert!(line.contains(key), "{key} missing from {line}");
        }
    }

    #[test]
    fn starttls_not_offered_stops_the_run_at_the_first_connection() {
        let (address, server) = scripted_server(1, "250-scripted\r\n250 PIPELINING\r\n");
        let config = tls_config(None, false).unwrap();
        let counts = Arc::new(HandshakeCounts::default());
        let started = Instant::now();
        let report = run_handshakes(&options(address, LoadTls::StartTls(config)), 100, &counts);
        assert!(started.elapsed() < RECONNECT_PAUSE * 5, "no retries");
        assert_eq!((report.completed, report.errors), (0, 1), "{report}");
        let fatal = report.fatal.unwrap_or_default();
        assert!(fatal.contains("does not offer STARTTLS"), "{fatal}");
        // QUIT after the refusal (RFC 5321 §3.1), no STARTTLS.
        assert_eq!(server.join().unwrap(), ["EHLO", "QUIT"]);
    }

    #[test]
    fn messages_stop_too_when_starttls_is_not_offered() {
        let (address, server) = scripted_server(1, "250 scripted\r\n");
        let config = tls_config(None, false).unwrap();
        let mut options = options(address, LoadTls::StartTls(config));
        options.messages = 50;
        let counts = Arc::new(LoadCounts::default());
        let report = run(&options, &counts);
        assert_eq!(report.accepted, 0);
        assert_eq!(report.connection_errors, 1);
        assert!(report.fatal.is_some());
        assert_eq!(server.join().unwrap(), ["EHLO", "QUIT"]);
    }

    #[test]
    fn only_failures_no_retry_can_fix_are_fatal() {
        let address = SocketAddr::from(([127, 0, 0, 1], 25));
        let cases = [
            (DeliveryError::StartTlsNotOffered { address }, true),
            (
                DeliveryError::TlsHandshake {
                    address,
                    server_name: "127.0.0.1".to_owned(),
                    reason: "invalid peer certificate".to_owned(),
                },
                true,
            ),
            (DeliveryError::AuthWithoutTls { address }, true),
            (
                DeliveryError::Protocol {
                    address,
                    source: ClientError::InvalidHeloName,
                },
                true,
            ),
            (
                DeliveryError::Connect {
                    address,
                    source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
                },
                false,
            ),
            (
                DeliveryError::TimedOut {
                    address,
                    stage: crate::ConnectionStage::TlsHandshake,
                    timeout: Duration::from_secs(1),
                },
                false,
            ),
            (
                DeliveryError::Closed {
                    address,
                    stage: crate::ConnectionStage::Greeting,
                },
                false,
            ),
        ];
        for (error, fatal) in cases {
            assert_eq!(is_fatal(&error), fatal, "{error}");
        }
    }

    #[test]
    fn tls_parameters_are_one_report_word() {
        assert_eq!(
            report_word("TLSv1.3 TLS13_AES_256_GCM_SHA384"),
            "TLSv1.3,TLS13_AES_256_GCM_SHA384"
        );
        let report = LoadReport {
            accepted: 1,
            deferred: 0,
            failed: 0,
            connection_errors: 0,
            elapsed: Duration::from_secs(1),
            latencies: vec![Duration::from_millis(2)],
            tls: None,
            fatal: None,
        };
        let plain = report.to_string();
        assert!(!plain.contains("tls="), "{plain}");
        let encrypted = LoadReport {
            tls: Some("TLSv1.2 TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256".to_owned()),
            ..report
        }
        .to_string();
        assert!(
            encrypted.ends_with(" tls=TLSv1.2,TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"),
            "{encrypted}"
        );
    }

    #[test]
    fn tls_configs_build_and_a_bad_ca_file_is_an_error() {
        for resume in [false, true] {
            tls_config(None, resume).unwrap();
        }
        let missing = Path::new("/nonexistent/tsubame-test/ca.pem");
        assert!(tls_config(Some(missing), false).is_err());
    }
}
