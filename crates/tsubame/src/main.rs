//! The `tsubame` command: parses the command line, runs a subcommand, maps its result to
//! an exit code. The work lives in the library crates.
#![forbid(unsafe_code)]

mod admin;
mod bench;
mod dkim;
mod inspect;
mod log;
mod oauth;
mod queue;
mod serve;
mod sink;
mod tokens;
mod trace;
mod user;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// tsubame: a high-throughput SMTP relay with a durable spool.
///
/// Every message is written to a crash-safe spool and synced to disk before the client
/// hears 250, then delivered to a relay or straight to the recipient's MX, with retries
/// and bounces.
#[derive(Debug, Parser)]
#[command(
    name = "tsubame",
    version,
    about,
    long_about = None,
    propagate_version = true,
    after_help = "Examples:\n  \
        tsubame serve                                  start on the embedded default (127.0.0.1:2525)\n  \
        tsubame serve --config /etc/tsubame.toml\n  \
        tsubame check-config /etc/tsubame.toml\n  \
        tsubame serve --upstream smtp+starttls://user@smtp.example.net\n  \
        tsubame queue list --spool ./spool\n  \
        tsubame trace --client 192.0.2.7                watch a device's SMTP conversation live\n  \
        tsubame spool inspect --spool ./spool --json\n  \
        tsubame log search --recipient bob@example.com --status bounced\n  \
        tsubame log export --csv --since 2026-11-01 > november.csv\n  \
        tsubame sink --listen 127.0.0.1:2526 --tempfail-rate 0.05\n  \
        tsubame bench --target 127.0.0.1:2525 -n 20000 -s 1024 -c 50\n  \
        tsubame bench --target 127.0.0.1:2525 --starttls --handshakes -n 5000\n  \
        tsubame dkim keygen --domain example.com --selector s2026 --algorithm ed25519\n  \
        tsubame dkim check --domain example.com --selector s2026 --key example.com.s2026.key\n  \
        tsubame user add printer --users-file /etc/tsubame/users.toml\n  \
        tsubame oauth google authorize --client-id ID --client-secret-file FILE \\\n      \
        --account printer@example.com --token-file /etc/tsubame/oauth/printer.token\n\n\
        Every message is synced to the spool before the client hears 250."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the relay. Without --config it starts on the embedded default: listen on
    /// 127.0.0.1:2525, spool in ./spool, relay for loopback clients only, deliver by MX
    /// lookup (or through --upstream URL).
    Serve(serve::ServeArgs),
    /// Check a configuration file and print what it sets up. Exits 1 on an error, which
    /// names the line and column.
    CheckConfig {
        /// The TOML configuration file.
        file: PathBuf,
    },
    /// A load generator: sends messages to a relay over concurrent sessions, in plain
    /// text, over STARTTLS or implicit TLS, and reports messages per second and
    /// accept-latency percentiles; --handshakes measures connection set-up alone. Exits 1
    /// unless every message was accepted.
    Bench(bench::BenchArgs),
    /// A counting SMTP sink that can inject failures, for benchmarks and tests. Prints
    /// its counts when it stops (SIGINT, SIGTERM, or --count reached).
    Sink(sink::SinkArgs),
    /// Look at and act on a running server's delivery queue (list, show, flush,
    /// delete), through the control socket in its spool directory.
    Queue(queue::QueueArgs),
    /// Watch one device's SMTP conversation live (commands, replies and notes; never
    /// passwords or message content) through the running server's trace socket, while
    /// the device sends. Stop with Ctrl-C.
    Trace(trace::TraceArgs),
    /// Device accounts for SMTP AUTH: add a user or set a new password (argon2id hash
    /// in the users file), or list users and their restrictions.
    User(user::UserArgs),
    /// OAuth 2.0 for upstreams that want XOAUTH2 (smtp.gmail.com): `oauth google
    /// authorize` obtains and stores a refresh token on a server without a browser.
    Oauth(oauth::OauthArgs),
    /// DKIM signing keys: `dkim keygen` writes a new key file (mode 0600) and prints the
    /// DNS TXT record that publishes its public key; `dkim check` looks the record up
    /// and checks that it publishes the key.
    Dkim(dkim::DkimArgs),
    /// The delivery log (one line per received, delivered, deferred, bounced or
    /// expired recipient): `log search` prints the events that match, `log export
    /// --csv` writes them as CSV. Reads the files offline.
    Log(log::LogArgs),
    /// Look at a spool offline.
    Spool {
        #[command(subcommand)]
        command: SpoolCommand,
    },
}

#[derive(Debug, Subcommand)]
enum SpoolCommand {
    /// List what the spool holds (id, received time, sender, recipients, size, state)
    /// and the records recovery had to quarantine. Exits 3 when it found corruption.
    Inspect(inspect::InspectArgs),
}

/// Exit codes: 0 success, 1 error, 2 usage (clap), 3 corruption found by `spool inspect`,
/// 4 no DNS answer for `dkim check`.
pub(crate) const EXIT_ERROR: u8 = 1;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::CheckConfig { file } => check_config(&file),
        Command::Sink(args) => sink::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Queue(args) => queue::run(args),
        Command::Trace(args) => trace::run(args),
        Command::User(args) => user::run(args),
        Command::Oauth(args) => oauth::run(args),
        Command::Dkim(args) => dkim::run(args),
        Command::Log(args) => log::run(args),
        Command::Spool {
            command: SpoolCommand::Inspect(args),
        } => inspect::run(args),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("tsubame: {error:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

fn check_config(file: &std::path::Path) -> anyhow::Result<ExitCode> {
    let config = tsubame_config::Config::load(file)?;
    // The keys are read here as at start, so that a bad key file fails the check.
    let signing = tsubame_relay::check_signing(&config)
        .map_err(|error| anyhow::anyhow!("{}: {error}", file.display()))?;
    // The admin token file too, as `serve` reads it (its content is never shown).
    if config.admin.enabled {
        config
            .admin
            .read_token()
            .map_err(|error| anyhow::anyhow!("{}: {error}", file.display()))?;
    }
    println!("{}: ok", file.display());
    print!("{}", config.summary());
    for line in signing {
        println!("{line}");
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    /// check-config must refuse exactly what the spool refuses at start.
    #[test]
    fn config_and_spool_agree_on_the_largest_segment() {
        assert_eq!(
            tsubame_config::SEGMENT_SIZE_BYTES_MAX,
            tsubame_spool::MAX_SEGMENT_SIZE_BYTES
        );
    }
}
