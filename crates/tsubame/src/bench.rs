//! `tsubame bench`: a load generator.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use tsubame_delivery::load::{HandshakeCounts, LoadCounts, LoadOptions, LoadTls};
use tsubame_delivery::{Credentials, Secret, Timeouts};

/// The environment variable `--auth` reads its password from: a password on the
/// command line would show in the process list.
const PASSWORD_ENV: &str = "TSUBAME_BENCH_PASSWORD";

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// The relay to load (host:port).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:2525")]
    target: SocketAddr,
    /// Messages to send in all (with --handshakes: connections to open).
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
    /// Send at most this many messages (with --handshakes: connections) per second in
    /// all, paced evenly, for latency measurements below the maximum rate. Default: as
    /// fast as the relay takes them.
    #[arg(long, value_name = "PER_SEC")]
    rate: Option<f64>,
    /// STARTTLS (RFC 3207) on every connection, then EHLO again; the run stops with an
    /// error if the relay does not offer it. The server's certificate is NOT verified
    /// (meant for a bench against a throwaway self-signed certificate) unless --tls-ca
    /// names the CA to verify it against.
    #[arg(long, conflicts_with = "smtps")]
    starttls: bool,
    /// Implicit TLS (RFC 8314, "SMTPS", usually port 465) on every connection.
    /// Certificate NOT verified unless --tls-ca is given, as for --starttls.
    #[arg(long)]
    smtps: bool,
    /// Verify the server's certificate against the CA certificates in this PEM file
    /// (and its name against --tls-name). With --starttls or --smtps.
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// The name the certificate must match, also sent as SNI. Default: the target's IP
    /// address (matched against the certificate's IP addresses; no SNI is sent).
    #[arg(long, value_name = "NAME")]
    tls_name: Option<String>,
    /// Resume TLS sessions from earlier connections of the run when the server allows
    /// it. Default: every connection does a full handshake.
    #[arg(long)]
    tls_resume: bool,
    /// AUTH (PLAIN, else LOGIN) as USER on every connection, after TLS (needs --starttls
    /// or --smtps). The password is read from the environment variable
    /// TSUBAME_BENCH_PASSWORD, never from the command line.
    #[arg(long, value_name = "USER")]
    auth: Option<String>,
    /// Measure connection set-up only, sending no mail: connect, greeting, EHLO,
    /// [STARTTLS, handshake, EHLO again], [AUTH], QUIT; -n connections. Reports
    /// handshakes=… handshakes_per_s=… and set-up latency percentiles (connect to the
    /// last reply before QUIT).
    #[arg(long)]
    handshakes: bool,
    /// No progress line every second; only the final report.
    #[arg(long)]
    quiet: bool,
}

/// Sends the load and prints one `key=value` report line on stdout. Exits 1 when any
/// message was not accepted (with --handshakes: any connection failed), and says on
/// stderr why when a failure stopped the run.
pub fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.concurrency > 0, "--concurrency must be at least 1");
    if let Some(rate) = args.rate {
        anyhow::ensure!(
            rate.is_finite() && rate > 0.0,
            "--rate must be a positive number per second"
        );
    }
    let encrypted = args.starttls || args.smtps;
    anyhow::ensure!(
        encrypted || (args.tls_ca.is_none() && args.tls_name.is_none() && !args.tls_resume),
        "--tls-ca, --tls-name and --tls-resume need --starttls or --smtps"
    );
    let credentials = match &args.auth {
        None => None,
        Some(username) => {
            anyhow::ensure!(
                encrypted,
                "--auth needs --starttls or --smtps: credentials are never sent in plain text"
            );
            let password = std::env::var(PASSWORD_ENV)
                .with_context(|| format!("--auth needs the password in {PASSWORD_ENV}"))?;
            Some(Credentials::Password {
                username: username.clone(),
                password: Secret::new(password),
            })
        }
    };
    let tls = if encrypted {
        let config = tsubame_delivery::load::tls_config(args.tls_ca.as_deref(), args.tls_resume)?;
        if args.smtps {
            LoadTls::Implicit(config)
        } else {
            LoadTls::StartTls(config)
        }
    } else {
        LoadTls::Plain
    };
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
        tls,
        tls_server_name: args
            .tls_name
            .unwrap_or_else(|| args.target.ip().to_string()),
        credentials,
    };
    if args.handshakes {
        run_handshakes(&options, args.messages, args.quiet)
    } else {
        run_messages(&options, args.quiet)
    }
}

fn run_messages(options: &LoadOptions, quiet: bool) -> anyhow::Result<ExitCode> {
    let counts = Arc::new(LoadCounts::default());
    let total = options.messages;
    let progress = (!quiet).then(|| {
        let counts = Arc::clone(&counts);
        Progress::start(move |seconds, last| {
            let accepted = counts.accepted.load(Ordering::Relaxed);
            let line = format!(
                "bench: {seconds:.0}s {accepted}/{total} accepted ({}/s), {} deferred, {} failed, {} connection errors",
                accepted.saturating_sub(last),
                counts.deferred.load(Ordering::Relaxed),
                counts.failed.load(Ordering::Relaxed),
                counts.connection_errors.load(Ordering::Relaxed),
            );
            (line, accepted)
        })
    });
    let report = tsubame_delivery::load::run(options, &counts);
    if let Some(progress) = progress {
        progress.finish();
    }
    println!("{report}");
    if let Some(fatal) = &report.fatal {
        eprintln!("tsubame: bench stopped: {fatal}");
    }
    Ok(if report.accepted == total {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(crate::EXIT_ERROR)
    })
}

fn run_handshakes(options: &LoadOptions, total: u64, quiet: bool) -> anyhow::Result<ExitCode> {
    let counts = Arc::new(HandshakeCounts::default());
    let progress = (!quiet).then(|| {
        let counts = Arc::clone(&counts);
        Progress::start(move |seconds, last| {
            let completed = counts.completed.load(Ordering::Relaxed);
            let line = format!(
                "bench: {seconds:.0}s {completed}/{total} handshakes ({}/s), {} errors",
                completed.saturating_sub(last),
                counts.errors.load(Ordering::Relaxed),
            );
            (line, completed)
        })
    });
    let report = tsubame_delivery::load::run_handshakes(options, total, &counts);
    if let Some(progress) = progress {
        progress.finish();
    }
    println!("{report}");
    if let Some(fatal) = &report.fatal {
        eprintln!("tsubame: bench stopped: {fatal}");
    }
    Ok(if report.completed == total {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(crate::EXIT_ERROR)
    })
}

/// A progress line on stderr every second, from a thread of its own.
struct Progress {
    done: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Progress {
    /// `line(seconds since start, count at the last line)` returns the line and the
    /// count now.
    fn start(mut line: impl FnMut(f64, u64) -> (String, u64) + Send + 'static) -> Self {
        let done = Arc::new(AtomicBool::new(false));
        let thread = {
            let done = Arc::clone(&done);
            std::thread::spawn(move || {
                let started = Instant::now();
                let mut last = 0;
                while !done.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_secs(1));
                    let (text, count) = line(started.elapsed().as_secs_f64(), last);
                    eprintln!("{text}");
                    last = count;
                }
            })
        };
        Self { done, thread }
    }

    fn finish(self) {
        self.done.store(true, Ordering::Release);
        let _ = self.thread.join();
    }
}
