//! `tsubame bench`: a load generator.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tsubame_delivery::Timeouts;
use tsubame_delivery::load::{LoadCounts, LoadOptions};

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// The relay to load (host:port).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:2525")]
    target: SocketAddr,
    /// Messages to send in all.
    #[arg(short = 'n', long, value_name = "N", default_value_t = 10_000)]
    messages: u64,
    /// Size of each message in bytes, headers included.
    #[arg(short = 's', long, value_name = "BYTES", default_value_t = 1024)]
    size: usize,
    /// Concurrent sessions.
    #[arg(short = 'c', long, value_name = "N", default_value_t = 50)]
    concurrency: usize,
    /// Messages per connection; 0 keeps connections open for as many as they get.
    #[arg(long, value_name = "N", default_value_t = 1)]
    per_connection: u64,
    /// Envelope sender.
    #[arg(long, value_name = "ADDRESS", default_value = "bench@tsubame.invalid")]
    from: String,
    /// Envelope recipient.
    #[arg(long, value_name = "ADDRESS", default_value = "sink@example.invalid")]
    to: String,
    /// Seconds to wait for any one reply.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    timeout: u64,
    /// Send at most this many messages per second in all (paced evenly), for latency
    /// measurements below the maximum rate. Default: as fast as the relay takes them.
    #[arg(long, value_name = "MSGS_PER_SEC")]
    rate: Option<f64>,
    /// No progress line every second; only the final report.
    #[arg(long)]
    quiet: bool,
}

/// Sends the load and prints one `key=value` report line on stdout. Exits 1 when any
/// message was not accepted.
pub fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.concurrency > 0, "--concurrency must be at least 1");
    if let Some(rate) = args.rate {
        anyhow::ensure!(
            rate.is_finite() && rate > 0.0,
            "--rate must be a positive number of messages per second"
        );
    }
    let options = LoadOptions {
        target: args.target,
        messages: args.messages,
        size_bytes: args.size,
        concurrency: args.concurrency,
        messages_per_connection: args.per_connection,
        helo: tsubame_server::system_hostname(),
        mail_from: args.from,
        recipient: args.to,
        timeouts: Timeouts::uniform(Duration::from_secs(args.timeout)),
        rate_per_second: args.rate,
    };
    let counts = Arc::new(LoadCounts::default());
    let done = Arc::new(AtomicBool::new(false));
    let progress = (!args.quiet).then(|| {
        let counts = Arc::clone(&counts);
        let done = Arc::clone(&done);
        let total = args.messages;
        std::thread::spawn(move || {
            let started = Instant::now();
            let mut last = 0;
            while !done.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_secs(1));
                let accepted = counts.accepted.load(Ordering::Relaxed);
                eprintln!(
                    "bench: {:.0}s {accepted}/{total} accepted ({}/s), {} deferred, {} failed, {} connection errors",
                    started.elapsed().as_secs_f64(),
                    accepted.saturating_sub(last),
                    counts.deferred.load(Ordering::Relaxed),
                    counts.failed.load(Ordering::Relaxed),
                    counts.connection_errors.load(Ordering::Relaxed),
                );
                last = accepted;
            }
        })
    });
    let report = tsubame_delivery::load::run(&options, &counts);
    done.store(true, Ordering::Release);
    if let Some(progress) = progress {
        let _ = progress.join();
    }
    println!("{report}");
    Ok(if report.accepted == args.messages {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(crate::EXIT_ERROR)
    })
}
