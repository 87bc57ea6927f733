//! `tsubame sink`: a counting SMTP sink with fault injection.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use tsubame_config::Limits;
use tsubame_server::sink::{Sink, SinkOptions};

#[derive(Debug, clap::Args)]
pub struct SinkArgs {
    /// Address to listen on. Port 0 picks a free port; the first line on stderr says which.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:2526")]
    listen: SocketAddr,
    /// Fraction of messages answered `451 4.3.0` (0.0 to 1.0).
    #[arg(long, value_name = "RATE", default_value_t = 0.0, value_parser = rate)]
    tempfail_rate: f64,
    /// Fraction of messages answered `550 5.7.0`, among those not temp-failed.
    #[arg(long, value_name = "RATE", default_value_t = 0.0, value_parser = rate)]
    permfail_rate: f64,
    /// Fraction of messages whose connection is dropped instead of answered.
    #[arg(long, value_name = "RATE", default_value_t = 0.0, value_parser = rate)]
    drop_rate: f64,
    /// Wait this many milliseconds before answering the end of each message.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    delay_ms: u64,
    /// Exit after this many messages were accepted (answered 250).
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// Seed for the fault draws, so a run can be repeated.
    #[arg(long, value_name = "N", default_value_t = 1)]
    seed: u64,
    /// No progress line every second; only the final counts.
    #[arg(long)]
    quiet: bool,
}

fn rate(text: &str) -> Result<f64, String> {
    let value: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number"))?;
    if (0.0..=1.0).contains(&value) {
        Ok(value)
    } else {
        Err(format!("{value} is not between 0 and 1"))
    }
}

/// Runs until SIGINT/SIGTERM or `--count`; prints the counts on stdout at the end.
pub fn run(args: SinkArgs) -> anyhow::Result<ExitCode> {
    let options = SinkOptions {
        listen: args.listen,
        hostname: tsubame_server::system_hostname(),
        limits: Limits::default(),
        tempfail_rate: args.tempfail_rate,
        permfail_rate: args.permfail_rate,
        drop_rate: args.drop_rate,
        delay: Duration::from_millis(args.delay_ms),
        stop_after_messages: args.count,
        seed: args.seed,
    };
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, Arc::clone(&stop))
        .context("cannot install signal handlers")?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&stop))
        .context("cannot install signal handlers")?;
    let sink = Sink::bind(options).with_context(|| format!("cannot listen on {}", args.listen))?;
    eprintln!("tsubame sink listening on {}", sink.local_address()?);
    let counts = sink.counts();
    let progress_stop = Arc::clone(&stop);
    let quiet = args.quiet;
    let progress = std::thread::Builder::new()
        .name("sink-progress".to_string())
        .spawn(move || {
            let started = Instant::now();
            let mut last = 0;
            while !progress_stop.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_secs(1));
                let now = counts.snapshot();
                if !quiet {
                    eprintln!(
                        "sink: {:.0}s {} ({}/s)",
                        started.elapsed().as_secs_f64(),
                        now,
                        now.messages.saturating_sub(last)
                    );
                }
                last = now.messages;
            }
        })?;
    let totals = sink.run(&stop)?;
    stop.store(true, Ordering::Release);
    let _ = progress.join();
    println!("{totals}");
    Ok(ExitCode::SUCCESS)
}
