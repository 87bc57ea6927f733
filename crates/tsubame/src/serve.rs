//! `tsubame serve`.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use ipnet::IpNet;
use tsubame_config::{Config, ListenerConfig, LogFormat};
use tsubame_spool::{Spool, SpoolOptions};

#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// The TOML configuration file. Without it, the embedded default is used.
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Listen on ADDR (host:port) instead of the configured listeners. Repeatable. Port 0
    /// picks a free port; the log says which.
    #[arg(long, value_name = "ADDR")]
    listen: Vec<SocketAddr>,
    /// Spool directory, instead of the configured one.
    #[arg(long, value_name = "DIR")]
    spool: Option<PathBuf>,
    /// Clients in this network may relay (CIDR, e.g. 192.168.1.0/24). Repeatable; replaces
    /// the relay networks of every listener.
    #[arg(long, value_name = "CIDR")]
    relay_network: Vec<IpNet>,
    /// Event-loop threads (0: half the cores, at least one), instead of the configured number.
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// Log filter (info, debug, ...), instead of the configured one. RUST_LOG also works.
    #[arg(long, value_name = "FILTER")]
    log_level: Option<String>,
    /// Deliver everything through this upstream instead of the configured routes:
    /// smtp://[user[:pass]@]host[:port] (STARTTLS when offered, port 25),
    /// smtp+starttls://... (STARTTLS required, port 587), smtps://... (implicit TLS,
    /// port 465), or mx: (direct delivery by MX lookup). The password may also come from
    /// TSUBAME_UPSTREAM_PASSWORD, which keeps it out of the process list.
    #[arg(long, value_name = "URL")]
    upstream: Option<String>,
    /// Accept and spool mail but deliver nothing until restarted without this flag
    /// (maintenance, or collecting mail before the upstream is set up). `tsubame queue
    /// list` still shows the queue.
    #[arg(long)]
    hold: bool,
}

pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let started = std::time::SystemTime::now();
    let (mut config, origin) = match &args.config {
        Some(path) => (Config::load(path)?, path.display().to_string()),
        None => (Config::embedded_default()?, "embedded default".to_string()),
    };
    apply_overrides(&mut config, &args)?;
    // Dropping the guard (at return) flushes the log lines still buffered.
    let _log_guard = init_logging(&config, args.log_level.as_deref())?;
    if args.config.is_none() {
        tracing::info!(
            "no --config given: running on the embedded default configuration (loopback only); \
             see `tsubame serve --help`"
        );
    }
    raise_open_file_limit(config.limits.max_connections);
    // Read and bound before anything starts, so a bad token file or an address in use
    // stops the start with its reason before any mail is accepted.
    let admin_listener = if config.admin.enabled {
        let token = config
            .admin
            .read_token()
            .map_err(|message| anyhow::anyhow!(message))?;
        Some((crate::admin::bind(config.admin.address)?, token))
    } else {
        None
    };
    // Installed before anything is announced, so a SIGTERM that follows the "listening"
    // line at once is a graceful stop, not the default action (death by signal).
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ])
    .context("cannot install signal handlers")?;

    let options = SpoolOptions {
        segment_size_bytes: config.spool.segment_size_bytes,
    };
    let directory = config.spool.directory.clone();
    let (spool, report) = Spool::open(&directory, options)
        .with_context(|| format!("cannot open spool {}", directory.display()))?;
    tracing::info!(
        spool = %directory.display(),
        queued = report.messages.len(),
        segments = report.segment_count,
        quarantined = report.quarantined.len(),
        torn_tails = report.torn_tails.len(),
        config = origin,
        "spool recovered"
    );

    let hostname = config
        .server
        .hostname
        .clone()
        .unwrap_or_else(tsubame_server::system_hostname);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos() as u64);
    let (token_cache, tokens) = crate::tokens::build(&config)?;
    let status_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let status_writer = if config.oauth_sources.is_empty() {
        None
    } else {
        Some(
            crate::tokens::keep_status_file(
                Arc::clone(&token_cache),
                crate::tokens::status_path(&directory),
                Arc::clone(&status_stop),
            )
            .context("cannot start the OAuth status thread")?,
        )
    };
    let relay = tsubame_relay::start(
        &config,
        spool.clone(),
        report.messages,
        tsubame_relay::RelayOptions {
            hostname,
            seed,
            hold: args.hold,
            tokens,
        },
    )
    .context("cannot start delivery")?;
    tracing::info!(
        control_socket = %tsubame_relay::control::socket_path(&directory).display(),
        default_upstream = config.delivery.default_upstream,
        routes = config.routes.len(),
        "delivery started"
    );
    // We hold the spool's lock, so the trace socket in it is ours to replace.
    let mut traces = crate::trace::hub::TraceServer::start(&directory).with_context(|| {
        format!(
            "cannot serve the trace socket {}",
            crate::trace::socket_path(&directory).display()
        )
    })?;
    let config = Arc::new(config);
    let hooks = tsubame_server::Hooks {
        handoff: relay.handoff(),
        observer: traces.observer(),
    };
    let server = tsubame_server::start(Arc::clone(&config), spool.clone(), hooks)?;
    let admin = if let Some((listener, token)) = admin_listener {
        let sources = crate::admin::Sources {
            server: server.stats(),
            relay: relay.stats(),
            spool: spool.clone(),
            spool_directory: directory.clone(),
            log_path: config
                .delivery_log
                .enabled
                .then(|| config.delivery_log.path_in(&directory)),
            started,
        };
        let admin = crate::admin::start(listener, token, sources)?;
        tracing::info!(
            address = %admin.local_address,
            token = config.admin.token_file.is_some(),
            "admin HTTP listening: /metrics, /api, /healthz and the web page"
        );
        Some(admin)
    } else {
        None
    };
    let shutdown = server.shutdown_handle();
    let mut reload = args.config.clone().map(|path| ConfigReload {
        path,
        args: args.clone(),
        current: Arc::clone(&config),
        server: shutdown.clone(),
        relay: relay.reload_handle(),
    });
    std::thread::Builder::new()
        .name("signals".to_string())
        .spawn(move || {
            for signal in signals.forever() {
                if signal == signal_hook::consts::SIGHUP {
                    tracing::info!("SIGHUP: reloading certificates");
                    shutdown.reload_certificates();
                    match reload.as_mut() {
                        Some(reload) => reload.run(),
                        None => tracing::info!(
                            "no --config given: SIGHUP reloads only the certificates"
                        ),
                    }
                    continue;
                }
                tracing::info!(signal, "shutting down");
                shutdown.shutdown();
                break;
            }
        })
        .context("cannot start the signal thread")?;
    // Stop order: no new clients and finish their transactions (a trace sees them end);
    // then the traces; then let deliveries in progress finish (bounded); then the final
    // sync.
    server.wait();
    if let Some(admin) = admin {
        admin.stop();
    }
    traces.stop();
    relay.shutdown(std::time::Duration::from_secs(
        config.delivery.shutdown_timeout_secs,
    ));
    spool.shutdown();
    if let Some(writer) = status_writer {
        status_stop.store(true, std::sync::atomic::Ordering::Release);
        writer.thread().unpark();
        let _ = writer.join();
    }
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// What SIGHUP needs to reload the configuration file.
struct ConfigReload {
    path: PathBuf,
    /// The command line, whose overrides apply to the reloaded file as at start.
    args: ServeArgs,
    /// The configuration in force.
    current: Arc<Config>,
    server: tsubame_server::ShutdownHandle,
    relay: tsubame_relay::ReloadHandle,
}

impl ConfigReload {
    /// Reads the file again, checks it as a start would, and puts it in force; on any
    /// error the configuration in force stays, and the log says why.
    fn run(&mut self) {
        match self.try_run() {
            Ok(()) => {}
            Err(reason) => tracing::error!(
                file = %self.path.display(),
                "configuration not reloaded: {reason:#}; the previous configuration stays in use"
            ),
        }
    }

    fn try_run(&mut self) -> anyhow::Result<()> {
        let mut config = Config::load(&self.path)?;
        apply_overrides(&mut config, &self.args)?;
        let kept = self.current.keep_restart_only(&mut config);
        // The DKIM keys are read and checked whether or not signing runs.
        tsubame_relay::check_signing(&config)
            .map_err(|reason| anyhow::anyhow!("DKIM: {reason}"))?;
        let config = Arc::new(config);
        // Everything that can fail is checked before anything changes: the server's part
        // is only built here, delivery's is checked and then applied, and the server's
        // goes in force last (it cannot fail then).
        let prepared = self.server.prepare_reload(Arc::clone(&config))?;
        let summary = self
            .relay
            .reload(&config)
            .map_err(|reason| anyhow::anyhow!("{reason}"))?;
        self.server.install(prepared);
        if config.limits.max_connections > self.current.limits.max_connections {
            raise_open_file_limit(config.limits.max_connections);
        }
        for setting in kept {
            tracing::warn!(
                setting,
                "{setting} changes only at restart; the running value stays in use"
            );
        }
        tracing::info!(
            routes = config.routes.len(),
            upstreams = summary.upstreams,
            upstreams_kept = summary.kept,
            upstreams_added = summary.added,
            upstreams_retired = summary.retired,
            recipients_rerouted = summary.rerouted,
            users = config.users.len(),
            "configuration reloaded"
        );
        self.current = config;
        Ok(())
    }
}

fn apply_overrides(config: &mut Config, args: &ServeArgs) -> anyhow::Result<()> {
    if !args.listen.is_empty() {
        // The new addresses take the first configured listener's policy.
        let template = config
            .listeners
            .first()
            .cloned()
            .unwrap_or_else(|| ListenerConfig::plain(args.listen[0]));
        config.listeners = args
            .listen
            .iter()
            .map(|address| ListenerConfig {
                address: *address,
                ..template.clone()
            })
            .collect();
    }
    if !args.relay_network.is_empty() {
        for listener in &mut config.listeners {
            listener.relay_networks = args.relay_network.clone();
        }
    }
    if let Some(spool) = &args.spool {
        config.spool.directory = spool.clone();
    }
    if let Some(threads) = args.threads {
        config.server.threads = threads;
    }
    if let Some(url) = &args.upstream {
        let mut upstream = tsubame_config::parse_upstream_url(url)
            .map_err(|message| anyhow::anyhow!("--upstream: {message}"))?;
        if upstream.username.is_some()
            && upstream.password_inline.is_none()
            && let Ok(password) = std::env::var("TSUBAME_UPSTREAM_PASSWORD")
        {
            upstream.password_inline = Some(tsubame_config::Secret::new(password));
        }
        config
            .upstreams
            .retain(|configured| configured.name != upstream.name);
        config.delivery.default_upstream = upstream.name.clone();
        config.upstreams.push(upstream);
        // The flag means "everything goes there".
        config.routes.clear();
        config
            .revalidate()
            .map_err(|message| anyhow::anyhow!("--upstream: {message}"))?;
    }
    Ok(())
}

/// Logs go to standard error through a writer thread that batches lines: the event
/// loops hand a formatted line over a channel instead of making a `write` syscall per
/// accepted message, and the thread flushes whenever it has drained the channel, so a line
/// is never held back while the relay is idle.
fn init_logging(
    config: &Config,
    override_filter: Option<&str>,
) -> anyhow::Result<tracing_appender::non_blocking::WorkerGuard> {
    /// Lines buffered between the loops and the writer thread. When the writer falls this
    /// far behind, loggers wait rather than lose lines: the send log must be complete.
    const LOG_LINES_BUFFERED_MAX: usize = 128 * 1024;
    let filter = match (override_filter, std::env::var("RUST_LOG").ok()) {
        (Some(filter), _) => filter.to_string(),
        (None, Some(filter)) if !filter.is_empty() => filter,
        _ => config.log.level.clone(),
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .with_context(|| format!("invalid log filter {filter:?}"))?;
    let ansi = std::io::stderr().is_terminal();
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(LOG_LINES_BUFFERED_MAX)
        .thread_name("log-writer")
        .finish(std::io::BufWriter::new(std::io::stderr()));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    Ok(guard)
}

/// Each connection is a file descriptor; the common soft limit of 1024 would cap us far
/// below `max_connections`. Raise the soft limit toward the hard limit.
fn raise_open_file_limit(max_connections: usize) {
    use rustix::process::{Resource, getrlimit, setrlimit};
    // Spool segments, listeners, the poll and wakers need a few beyond the connections.
    const RESERVED_DESCRIPTORS: u64 = 256;
    let mut limit = getrlimit(Resource::Nofile);
    let wanted = max_connections as u64 + RESERVED_DESCRIPTORS;
    let current = limit.current.unwrap_or(u64::MAX);
    if current >= wanted {
        return;
    }
    let target = limit.maximum.map_or(wanted, |maximum| maximum.min(wanted));
    limit.current = Some(target);
    match setrlimit(Resource::Nofile, limit) {
        Ok(()) if target >= wanted => {}
        Ok(()) | Err(_) => tracing::warn!(
            wanted,
            got = target.max(current),
            "cannot raise the open-file limit enough for max_connections; connections beyond it will be refused"
        ),
    }
}
