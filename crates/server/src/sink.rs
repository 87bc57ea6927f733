//! `tsubame sink`: a counting SMTP sink with fault injection, for benchmarks and tests.
//!
//! It speaks the same protocol as the relay (the same [`Session`] state machine) but keeps
//! nothing: every complete message is counted and answered 250, or, at the configured
//! rates, answered 451 or 550, answered late, or not answered at all (the connection is
//! dropped). One thread per connection with blocking sockets: simple, and fast enough to
//! absorb a relay's output at hundreds of concurrent sessions; it is a test tool, not the
//! relay's hot path.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tsubame_config::{Limits, ListenerConfig, Users};
use tsubame_smtp_proto::reply::{EnhancedCode, Reply};

use crate::rates::RatePolicy;
use crate::session::{Event, Session, SessionContext};

/// The temporary failure the sink injects.
const INJECTED_TEMPFAIL: Reply = Reply::new(
    451,
    EnhancedCode::new(4, 3, 0),
    "Temporary failure injected by tsubame sink",
);
/// The permanent failure the sink injects.
const INJECTED_PERMFAIL: Reply = Reply::new(
    550,
    EnhancedCode::new(5, 7, 0),
    "Permanent failure injected by tsubame sink",
);

/// How often the accept loop looks at the stop flag when no client connects.
const ACCEPT_POLL_INTERVAL: Duration = Duration::from_millis(10);
/// Bytes read from a socket per call.
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// What the sink does. Rates are probabilities per message, drawn in this order: drop,
/// then (if not dropped) temporary failure, then (if neither) permanent failure; so
/// `tempfail_rate = 0.5, permfail_rate = 0.5` fails half temporarily and a quarter
/// permanently.
#[derive(Debug, Clone)]
pub struct SinkOptions {
    pub listen: SocketAddr,
    pub hostname: String,
    pub limits: Limits,
    pub tempfail_rate: f64,
    pub permfail_rate: f64,
    pub drop_rate: f64,
    /// Wait this long before answering the end of each message.
    pub delay: Duration,
    /// Stop accepting connections once this many messages were accepted.
    pub stop_after_messages: Option<u64>,
    /// Seed of the fault draws, so runs can be repeated.
    pub seed: u64,
}

/// Running totals, shared by every connection thread.
#[derive(Debug, Default)]
pub struct SinkCounts {
    pub connections: AtomicU64,
    /// Messages answered 250.
    pub messages: AtomicU64,
    pub recipients: AtomicU64,
    pub bytes: AtomicU64,
    pub tempfailed: AtomicU64,
    pub permfailed: AtomicU64,
    pub dropped: AtomicU64,
}

/// A copy of the counts at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SinkSnapshot {
    pub connections: u64,
    pub messages: u64,
    pub recipients: u64,
    pub bytes: u64,
    pub tempfailed: u64,
    pub permfailed: u64,
    pub dropped: u64,
}

impl SinkCounts {
    pub fn snapshot(&self) -> SinkSnapshot {
        SinkSnapshot {
            connections: self.connections.load(Ordering::Relaxed),
            messages: self.messages.load(Ordering::Relaxed),
            recipients: self.recipients.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            tempfailed: self.tempfailed.load(Ordering::Relaxed),
            permfailed: self.permfailed.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
        }
    }
}

impl std::fmt::Display for SinkSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "messages={} recipients={} bytes={} tempfailed={} permfailed={} dropped={} connections={}",
            self.messages,
            self.recipients,
            self.bytes,
            self.tempfailed,
            self.permfailed,
            self.dropped,
            self.connections
        )
    }
}

/// A bound sink, not yet serving.
#[derive(Debug)]
pub struct Sink {
    listener: TcpListener,
    options: Arc<SinkOptions>,
    counts: Arc<SinkCounts>,
}

impl Sink {
    pub fn bind(options: SinkOptions) -> io::Result<Sink> {
        let listener = TcpListener::bind(options.listen)?;
        listener.set_nonblocking(true)?;
        Ok(Sink {
            listener,
            options: Arc::new(options),
            counts: Arc::new(SinkCounts::default()),
        })
    }

    pub fn local_address(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn counts(&self) -> Arc<SinkCounts> {
        Arc::clone(&self.counts)
    }

    /// Serves until `stop` is set or `stop_after_messages` is reached; connections still
    /// open then finish on their own threads.
    pub fn run(self, stop: &AtomicBool) -> io::Result<SinkSnapshot> {
        let mut connection_number: u64 = 0;
        while !stop.load(Ordering::Acquire) && !self.reached_stop_count() {
            match self.listener.accept() {
                Ok((stream, _peer)) => {
                    connection_number += 1;
                    self.counts.connections.fetch_add(1, Ordering::Relaxed);
                    let options = Arc::clone(&self.options);
                    let counts = Arc::clone(&self.counts);
                    let seed = mix(options.seed ^ connection_number);
                    std::thread::Builder::new()
                        .name("sink-connection".to_string())
                        .spawn(move || {
                            if let Err(error) = serve_connection(stream, &options, &counts, seed) {
                                tracing::debug!(%error, "sink connection ended with an error");
                            }
                        })?;
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(ACCEPT_POLL_INTERVAL)
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => {
                    tracing::warn!(%error, "sink accept failed");
                    std::thread::sleep(ACCEPT_POLL_INTERVAL);
                }
            }
        }
        Ok(self.counts.snapshot())
    }

    fn reached_stop_count(&self) -> bool {
        self.options
            .stop_after_messages
            .is_some_and(|count| self.counts.messages.load(Ordering::Relaxed) >= count)
    }
}

/// What to do with one complete message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Accept,
    TempFail,
    PermFail,
    Drop,
}

fn draw_fate(options: &SinkOptions, random: &mut u64) -> Fate {
    let mut draw = || {
        *random = mix(*random);
        (*random >> 11) as f64 / (1u64 << 53) as f64
    };
    if draw() < options.drop_rate {
        Fate::Drop
    } else if draw() < options.tempfail_rate {
        Fate::TempFail
    } else if draw() < options.permfail_rate {
        Fate::PermFail
    } else {
        Fate::Accept
    }
}

/// splitmix64: a small, good-enough mixer for fault draws.
fn mix(value: u64) -> u64 {
    let mut z = value.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn serve_connection(
    mut stream: TcpStream,
    options: &SinkOptions,
    counts: &SinkCounts,
    seed: u64,
) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(
        options.limits.command_timeout_secs,
    )))?;
    stream.set_write_timeout(Some(Duration::from_secs(
        options.limits.command_timeout_secs,
    )))?;
    let _ = stream.set_nodelay(true);
    let listener = ListenerConfig::plain(stream.local_addr()?);
    let users = Users::default();
    let rates = RatePolicy::unlimited();
    let context = SessionContext {
        hostname: &options.hostname,
        limits: &options.limits,
        may_relay: true,
        listener: &listener,
        users: &users,
        rates: &rates,
        now_unix_ms: 0,
        stamp_received: false,
    };
    let mut session = Session::new(stream.peer_addr()?);
    let mut output = Vec::new();
    Session::greeting(&options.hostname, &mut output);
    stream.write_all(&output)?;
    output.clear();
    let mut input = Vec::new();
    let mut scratch = vec![0u8; READ_CHUNK_BYTES];
    let mut random = seed;
    loop {
        let read = match stream.read(&mut scratch) {
            Ok(0) => return Ok(()),
            Ok(read) => read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        };
        input.extend_from_slice(scratch.get(..read).unwrap_or_default());
        loop {
            let (used, event) = session.process(&input, &mut output, &context);
            input.drain(..used.min(input.len()));
            match event {
                Event::NeedInput => break,
                Event::Close => {
                    stream.write_all(&output)?;
                    return Ok(());
                }
                // No certificate and no users: the session never asks for these.
                Event::AwaitingCommit | Event::StartTls | Event::Login => break,
                Event::MessageReady => {
                    let (recipients, size_bytes) = session.message().map_or((0, 0), |parts| {
                        (parts.recipients.len() as u64, parts.body.len() as u64)
                    });
                    let fate = draw_fate(options, &mut random);
                    if fate == Fate::Drop {
                        counts.dropped.fetch_add(1, Ordering::Relaxed);
                        stream.write_all(&output)?;
                        return Ok(());
                    }
                    if !options.delay.is_zero() {
                        stream.write_all(&output)?;
                        output.clear();
                        std::thread::sleep(options.delay);
                    }
                    match fate {
                        Fate::TempFail => {
                            counts.tempfailed.fetch_add(1, Ordering::Relaxed);
                            session.refuse_message(INJECTED_TEMPFAIL, &mut output, &context);
                        }
                        Fate::PermFail => {
                            counts.permfailed.fetch_add(1, Ordering::Relaxed);
                            session.refuse_message(INJECTED_PERMFAIL, &mut output, &context);
                        }
                        Fate::Accept | Fate::Drop => {
                            let number = counts.messages.fetch_add(1, Ordering::Relaxed) + 1;
                            counts.recipients.fetch_add(recipients, Ordering::Relaxed);
                            counts.bytes.fetch_add(size_bytes, Ordering::Relaxed);
                            session.spooled();
                            session.committed(&format!("sink-{number}"), &mut output);
                        }
                    }
                }
            }
        }
        if !output.is_empty() {
            stream.write_all(&output)?;
            output.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(tempfail_rate: f64, permfail_rate: f64, drop_rate: f64) -> SinkOptions {
        SinkOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            hostname: "sink.test".to_string(),
            limits: Limits::default(),
            tempfail_rate,
            permfail_rate,
            drop_rate,
            delay: Duration::ZERO,
            stop_after_messages: None,
            seed: 7,
        }
    }

    #[test]
    fn fault_rates_are_honoured_and_repeatable() {
        let draws = |options: &SinkOptions| {
            let mut random = options.seed;
            (0..10_000)
                .map(|_| draw_fate(options, &mut random))
                .collect::<Vec<_>>()
        };
        let all = |options: &SinkOptions, fate: Fate| {
            draws(options).iter().filter(|f| **f == fate).count()
        };
        assert_eq!(all(&options(0.0, 0.0, 0.0), Fate::Accept), 10_000);
        assert_eq!(all(&options(1.0, 0.0, 0.0), Fate::TempFail), 10_000);
        assert_eq!(all(&options(0.0, 1.0, 0.0), Fate::PermFail), 10_000);
        assert_eq!(all(&options(0.0, 0.0, 1.0), Fate::Drop), 10_000);
        let tempfails = all(&options(0.1, 0.0, 0.0), Fate::TempFail);
        assert!((800..1200).contains(&tempfails), "{tempfails}");
        assert_eq!(
            draws(&options(0.3, 0.3, 0.1)),
            draws(&options(0.3, 0.3, 0.1))
        );
    }
}
