//! `tsubame bench`: a load generator, so users can benchmark a relay (ours or another)
//! without Postfix's `smtp-source`.
//!
//! Each of `concurrency` threads opens a connection with [`UpstreamConnection`], sends up
//! to `messages_per_connection` messages over it, and opens the next; together they send
//! `messages` messages. Accept latency is measured per message from the start of the
//! transaction (MAIL) to the reply to its content: for a relay that syncs before it
//! answers, that is what a client waits for durability.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::client::{BodyType, Message, RecipientOutcome};
use crate::connection::{Timeouts, UpstreamConnection};

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
    /// Message `n` is not sent before `n / rate` seconds after the start (evenly paced
    /// over all sessions); `None` sends as fast as the target accepts. Finite, positive.
    pub rate_per_second: Option<f64>,
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
}

impl LoadReport {
    pub fn messages_per_second(&self) -> f64 {
        self.accepted as f64 / self.elapsed.as_secs_f64().max(f64::MIN_POSITIVE)
    }

    /// The latency below which `fraction` (0..=1) of accepted messages fall.
    pub fn latency_percentile(&self, fraction: f64) -> Option<Duration> {
        let last = self.latencies.len().checked_sub(1)?;
        let index = ((last as f64) * fraction.clamp(0.0, 1.0)).round() as usize;
        self.latencies.get(index).copied()
    }
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let millis = |fraction: f64| {
            self.latency_percentile(fraction)
                .map_or(0.0, |latency| latency.as_secs_f64() * 1000.0)
        };
        write!(
            f,
            "accepted={} deferred={} failed={} connection_errors={} elapsed_s={:.3} msgs_per_s={:.0} \
             latency_ms_p50={:.2} latency_ms_p90={:.2} latency_ms_p99={:.2} latency_ms_max={:.2}",
            self.accepted,
            self.deferred,
            self.failed,
            self.connection_errors,
            self.elapsed.as_secs_f64(),
            self.messages_per_second(),
            millis(0.5),
            millis(0.9),
            millis(0.99),
            millis(1.0)
        )
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
    let claimed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..options.concurrency.max(1))
        .map(|_| {
            let options = options.clone();
            let content = Arc::clone(&content);
            let claimed = Arc::clone(&claimed);
            let counts = Arc::clone(counts);
            std::thread::spawn(move || worker(&options, &content, &claimed, &counts, started))
        })
        .collect();
    let mut latencies: Vec<Duration> = Vec::new();
    for handle in workers {
        if let Ok(mut worker_latencies) = handle.join() {
            latencies.append(&mut worker_latencies);
        }
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    LoadReport {
        accepted: counts.accepted.load(Ordering::Relaxed),
        deferred: counts.deferred.load(Ordering::Relaxed),
        failed: counts.failed.load(Ordering::Relaxed),
        connection_errors: counts.connection_errors.load(Ordering::Relaxed),
        elapsed,
        latencies,
    }
}

/// Claims the next message number, or `None` when all are claimed.
fn claim(claimed: &AtomicU64, total: u64) -> Option<u64> {
    let number = claimed.fetch_add(1, Ordering::Relaxed);
    (number < total).then_some(number)
}

fn worker(
    options: &LoadOptions,
    content: &[u8],
    claimed: &AtomicU64,
    counts: &LoadCounts,
    started: Instant,
) -> Vec<Duration> {
    let recipients = [options.recipient.clone()];
    let mut latencies = Vec::new();
    let mut errors = 0u64;
    let mut next = claim(claimed, options.messages);
    while next.is_some() {
        let mut connection = match UpstreamConnection::connect(
            options.target,
            &options.helo,
            options.timeouts,
        ) {
            Ok(connection) => connection,
            Err(error) => {
                counts.connection_errors.fetch_add(1, Ordering::Relaxed);
                errors += 1;
                if errors >= CONNECTION_ERRORS_MAX {
                    tracing::warn!(%error, "bench worker gives up after {errors} connection errors");
                    return latencies;
                }
                std::thread::sleep(RECONNECT_PAUSE);
                continue;
            }
        };
        let mut sent_here = 0u64;
        while next.is_some() && connection.is_usable() {
            let message = Message {
                mail_from: &options.mail_from,
                recipients: &recipients,
                body_type: BodyType::SevenBit,
                smtputf8: false,
                body: content,
            };
            if let (Some(rate), Some(number)) = (options.rate_per_second, next) {
                let due = started + Duration::from_secs_f64(number as f64 / rate);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
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
                    next = claim(claimed, options.messages);
                    break;
                }
            }
            next = claim(claimed, options.messages);
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
