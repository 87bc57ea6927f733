//! tsubame's delivery engine: what happens to a message after the client heard 250.
//!
//! ```text
//! event loops ──► [signing pool] ──Accepted──► dispatcher (owns the scheduler) ──WorkItem──► workers (per upstream)
//!                               ▲   │ journal, bounces, message done, reclaim  │
//!                               └───┴────────────────Report────────────────────┘
//! control socket ──Control──► dispatcher
//! ```
//!
//! * `routing`: which upstream each recipient goes to.
//! * `signing`: DKIM signatures and List-Unsubscribe fields, once per message, stored in
//!   the spool; only when configured.
//! * `dispatcher`: one thread, the only owner of queue state.
//! * `worker`: blocking delivery threads, `max_connections` per upstream, with
//!   connection reuse.
//! * [`control`]: the queue control socket and its client.
//! * [`delivery_log`]: one JSON line per delivery event, written by the dispatcher;
//!   read by `tsubame log`.
//! * [`quota`]: sending quotas per upstream account over a rolling day, saved in the
//!   spool directory.
//!
//! Durability: the dispatcher journals outcomes in the spool but never waits for those
//! records' sync. A crash may lose the latest outcomes; the messages are then tried
//! again (duplicates after a crash are allowed; loss is not). A bounce is appended before
//! the failure records it reports, and those wait for the bounce's commit (see
//! `dispatcher`), so a failure is never durable without its bounce.

#![forbid(unsafe_code)]

mod body;
mod bounce;
mod commit_watch;
mod connect;
pub mod control;
pub mod delivery_log;
mod dispatcher;
mod held;
mod inbox;
mod job;
mod mx;
pub mod private_file;
pub mod quota;
mod reclaim;
mod routing;
mod signing;
pub mod stats;
pub mod tokens;
mod upstream;
mod worker;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tsubame_config::Config;
use tsubame_queue::{RetrySchedule, Scheduler, SchedulerConfig};
use tsubame_spool::{Spool, SpooledMessage};

use crate::dispatcher::{Command, Dispatcher, Input, ReloadPlan};
use crate::inbox::Inbox;
use crate::job::WorkItem;
use crate::worker::WorkerContext;

/// What can stop the engine from starting.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("{message}")]
    Upstream { message: String },
    #[error("invalid delivery settings: {0}")]
    Scheduler(#[from] tsubame_queue::Error),
    #[error("cannot start a delivery thread: {0}")]
    Thread(std::io::Error),
    #[error("DKIM: {0}")]
    Signing(String),
    #[error("cannot open the control socket {path}: {source}")]
    ControlSocket {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What [`start`] needs beyond the configuration.
#[derive(Debug, Clone)]
pub struct RelayOptions {
    /// Our host name: the default EHLO name and the Reporting-MTA of bounces.
    pub hostname: String,
    /// Seed for retry jitter.
    pub seed: u64,
    /// Queue everything, deliver nothing (`serve --hold`).
    pub hold: bool,
    /// Access tokens for the upstreams that log in with OAuth2, by `[[oauth]]` name.
    pub tokens: tokens::TokenSources,
}

/// The running engine.
#[derive(Debug)]
pub struct Relay {
    inbox: Arc<Inbox<Input>>,
    dispatcher: Option<std::thread::JoinHandle<()>>,
    /// Every delivery thread, those a reload started too.
    workers: Arc<std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>>,
    reloader: Arc<Reloader>,
    control: Option<control::ControlServer>,
    quotas: Arc<quota::QuotaBook>,
    /// The signing pool, when messages get added fields.
    signing: Option<signing::SigningPool>,
    stats: Arc<stats::RelayStats>,
}

/// How often shutdown looks whether a busy worker has finished its job.
const WORKER_EXIT_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Milliseconds since the Unix epoch.
pub(crate) fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

/// Starts the dispatcher, the workers and the control socket, and queues `recovered`
/// (the messages the spool's recovery found).
pub fn start(
    config: &Config,
    spool: Spool,
    recovered: Vec<SpooledMessage>,
    options: RelayOptions,
) -> Result<Relay, RelayError> {
    let upstreams = upstream::build_table(config, &options.hostname, &options.tokens)?;
    let names: Vec<String> = upstreams
        .iter()
        .map(|upstream| upstream.name().to_string())
        .collect();
    let router = routing::Router::new(config, |name| names.iter().position(|n| n == name));
    let signing = signing::Signing::load(config, router.clone()).map_err(RelayError::Signing)?;
    for warning in signing::coverage_warnings(config) {
        tracing::warn!("{warning}");
    }
    let delivery = &config.delivery;
    let retry = match &delivery.retry_schedule_secs {
        Some(delays) => RetrySchedule::Explicit {
            delays_ms: delays
                .iter()
                .map(|secs| secs.saturating_mul(1000))
                .collect(),
        },
        None => RetrySchedule::Exponential {
            initial_ms: delivery.retry_initial_secs.saturating_mul(1000),
            factor: delivery.retry_factor,
            max_ms: delivery.retry_max_secs.saturating_mul(1000),
        },
    };
    let scheduler = Scheduler::new(SchedulerConfig {
        retry: retry.clone(),
        max_age_ms: delivery.max_age_secs.saturating_mul(1000),
        jitter_fraction: tsubame_queue::DEFAULT_JITTER_FRACTION,
        seed: options.seed,
        routes: upstreams
            .iter()
            .map(|upstream| upstream.route_limits())
            .collect(),
    })?;

    let quotas = Arc::new(load_quotas(config, &upstreams));
    let inbox: Arc<Inbox<Input>> = Arc::new(Inbox::default());
    let context = Arc::new(WorkerContext {
        spool: spool.clone(),
        reports: Arc::clone(&inbox),
        upstreams: Arc::new(upstream::ActiveUpstreams::new(upstreams.clone())),
        quotas: Arc::clone(&quotas),
    });
    let mut job_queues = Vec::with_capacity(upstreams.len());
    let mut workers = Vec::new();
    for upstream in &upstreams {
        job_queues
            .push(start_workers(upstream, &context, &mut workers).map_err(RelayError::Thread)?);
    }

    let commits = Arc::new(commit_watch::CommitWatch::default());
    {
        let commits = Arc::clone(&commits);
        spool.subscribe(Box::new(move |notice| commits.on_notice(notice)));
    }
    let signing_profiles_loaded = signing.is_some();
    let signing = match signing {
        Some(signing) => Some(
            signing::SigningPool::start(
                signing,
                config.delivery.signing_threads,
                spool.clone(),
                Arc::clone(&inbox),
            )
            .map_err(RelayError::Thread)?,
        ),
        None => None,
    };
    // Recovered messages whose fields were never stored go through the pool first.
    let (recovered, to_sign): (Vec<SpooledMessage>, Vec<SpooledMessage>) =
        recovered.into_iter().partition(|message| {
            signing.is_none()
                || message.added_fields.is_some()
                || message.state == tsubame_spool::MessageState::Done
                || message
                    .recipient_states
                    .iter()
                    .all(|state| state.final_outcome.is_some())
        });
    let upstreams_at_start = upstreams.clone();
    let options_hostname = options.hostname.clone();
    let options_tokens = options.tokens.clone();
    let mut dispatcher = Dispatcher::new(
        scheduler,
        spool,
        upstreams,
        job_queues,
        router,
        Arc::clone(&inbox),
        options.hostname,
        retry,
        options.hold,
        commits,
        signing.as_ref().map(signing::SigningPool::queue),
        held::path_in(&config.spool.directory),
        delivery_log::DeliveryLog::new(&config.delivery_log, &config.spool.directory),
    );
    dispatcher.recover(recovered);
    dispatcher.restore_held();
    let stats = dispatcher.stats();
    if let Some(pool) = &signing {
        let queue = pool.queue();
        if !to_sign.is_empty() {
            tracing::info!(
                messages = to_sign.len(),
                "signing recovered messages that have no stored signature"
            );
        }
        for message in to_sign {
            let _ = queue.push(signing::Task {
                message,
                recovered: true,
            });
        }
    }
    let dispatcher = std::thread::Builder::new()
        .name("dispatcher".to_string())
        .spawn(move || dispatcher.run())
        .map_err(RelayError::Thread)?;
    let control = control::ControlServer::start(&config.spool.directory, Arc::clone(&inbox))
        .map_err(|source| RelayError::ControlSocket {
            path: control::socket_path(&config.spool.directory),
            source,
        })?;
    let workers = Arc::new(std::sync::Mutex::new(workers));
    debug_assert_eq!(signing_profiles_loaded, signing.is_some());
    let reloader = Arc::new(Reloader {
        hostname: options_hostname,
        tokens: options_tokens,
        context,
        workers: Arc::clone(&workers),
        signing: signing.as_ref().map(signing::SigningPool::current),
        quotas_at_start: upstreams_at_start
            .iter()
            .filter_map(|upstream| {
                upstream
                    .quota_limits()
                    .map(|limits| (upstream.name().to_string(), limits))
            })
            .collect(),
        table: std::sync::Mutex::new(ReloadTable {
            upstreams: upstreams_at_start,
            retired: std::collections::HashSet::new(),
        }),
    });
    Ok(Relay {
        inbox,
        dispatcher: Some(dispatcher),
        workers,
        reloader,
        control: Some(control),
        quotas,
        signing,
        stats,
    })
}

/// Starts `upstream`'s delivery threads (none for an upstream nothing routes to) and
/// returns the job queue they take from.
fn start_workers(
    upstream: &Arc<upstream::Upstream>,
    context: &Arc<WorkerContext>,
    workers: &mut Vec<std::thread::JoinHandle<()>>,
) -> std::io::Result<Arc<Inbox<WorkItem>>> {
    // The scheduler never has more than 2 × max_connections jobs in flight per
    // upstream (upstream::JOBS_PER_CONNECTION), so this queue never holds more.
    let jobs: Arc<Inbox<WorkItem>> = Arc::new(Inbox::default());
    let worker_count = if upstream.used {
        upstream.config.max_connections
    } else {
        0
    };
    for number in 0..worker_count {
        let upstream = Arc::clone(upstream);
        let thread_jobs = Arc::clone(&jobs);
        let context = Arc::clone(context);
        let spawned = std::thread::Builder::new()
            .name(format!("deliver-{}-{number}", upstream.name()))
            .spawn(move || worker::run(upstream, thread_jobs, context));
        match spawned {
            Ok(thread) => workers.push(thread),
            Err(error) => {
                // The threads already started end once their queue is closed.
                jobs.close();
                return Err(error);
            }
        }
    }
    Ok(jobs)
}

/// What a configuration reload changed in delivery, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReloadSummary {
    /// Upstreams in force (the built-in `mx` included).
    pub upstreams: usize,
    /// Upstreams whose settings did not change: same queue, same workers.
    pub kept: usize,
    /// New upstreams, and changed ones (a changed upstream is a new one that replaces
    /// the old).
    pub added: usize,
    /// Removed and replaced upstreams: no new jobs; their workers end after the jobs
    /// they have.
    pub retired: usize,
    /// Queued recipients moved off retired upstreams now (those being sent move once
    /// their attempt ends, if it is deferred).
    pub rerouted: usize,
}

/// Most entries the upstream table may reach, retired ones included: a changed upstream
/// takes a new entry (its old one stays while jobs may report against it), so each
/// reload can add a few. Far above any real number of upstreams times reloads between
/// restarts; beyond it a reload is refused and a restart starts the table afresh.
pub const UPSTREAM_TABLE_ENTRIES_MAX: usize = 4096;

/// Longest a reload waits for the dispatcher to take the new table: it handles its
/// inbox within a batch (milliseconds), so this only bounds a stuck dispatcher.
const RELOAD_REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// The whole upstream table as the dispatcher has it, and which entries are retired.
#[derive(Debug)]
struct ReloadTable {
    upstreams: Vec<Arc<upstream::Upstream>>,
    retired: std::collections::HashSet<usize>,
}

/// What a reload needs from the start; shared by [`Relay`] and its [`ReloadHandle`]s.
#[derive(Debug)]
struct Reloader {
    hostname: String,
    tokens: tokens::TokenSources,
    context: Arc<WorkerContext>,
    workers: Arc<std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>>,
    /// The signing pool's profiles and keys, when there is a pool.
    signing: Option<Arc<std::sync::RwLock<Arc<signing::Signing>>>>,
    /// Locked for a whole reload: reloads do not overlap.
    table: std::sync::Mutex<ReloadTable>,
    /// The daily quotas counted, by upstream name: fixed at start (the quota book and
    /// its file are keyed by them).
    quotas_at_start: std::collections::HashMap<String, quota::QuotaLimits>,
}

/// Reloads delivery's configuration from another thread (the signal thread).
#[derive(Debug, Clone)]
pub struct ReloadHandle {
    inbox: Arc<Inbox<Input>>,
    reloader: Arc<Reloader>,
}

impl ReloadHandle {
    /// Checks `config` as [`start`] would (upstream table, passwords, TLS settings, routes,
    /// DKIM keys) and only then puts its upstreams, routes and DKIM settings in force.
    /// Upstreams are matched by name: an unchanged one keeps its queue and workers; a
    /// new or changed one gets new ones; a removed or replaced one takes no new jobs,
    /// and its queued recipients go where the new routes say. On an error nothing
    /// changed.
    ///
    /// The retry schedule, maximum age, quotas' limits, signing threads and whether
    /// signing runs at all are fixed at start (the caller keeps their old values).
    pub fn reload(&self, config: &Config) -> Result<ReloadSummary, String> {
        let reloader = &*self.reloader;
        let mut table = reloader
            .table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let fresh = upstream::build_table(config, &reloader.hostname, &reloader.tokens)
            .map_err(|error| error.to_string())?;
        // Which old upstream each fresh one keeps, by name among those in force.
        let mut kept = Vec::with_capacity(fresh.len());
        for upstream in &fresh {
            let old = table.upstreams.iter().find(|old| {
                old.name() == upstream.name()
                    && !table.retired.contains(&old.index)
                    && old.same_settings(upstream)
            });
            kept.push(old.cloned());
        }
        let mut active = Vec::with_capacity(fresh.len());
        let mut added = Vec::new();
        let mut next_index = table.upstreams.len();
        for (upstream, old) in fresh.into_iter().zip(kept) {
            match old {
                Some(old) => active.push(old),
                None => {
                    let upstream = match Arc::try_unwrap(upstream) {
                        Ok(upstream) => Arc::new(upstream.at_index(next_index)),
                        // Nothing else holds a freshly built upstream.
                        Err(_) => return Err("internal error: a new upstream is shared".into()),
                    };
                    next_index += 1;
                    added.push(Arc::clone(&upstream));
                    active.push(upstream);
                }
            }
        }
        let retired: Vec<usize> = table
            .upstreams
            .iter()
            .filter(|old| {
                !table.retired.contains(&old.index)
                    && !active.iter().any(|upstream| upstream.index == old.index)
            })
            .map(|old| old.index)
            .collect();
        let router = routing::Router::new(config, |name| {
            active
                .iter()
                .find(|upstream| upstream.name() == name)
                .map(|upstream| upstream.index)
        });
        let signing = match &reloader.signing {
            Some(_) => Some(signing::Signing::build(config, router.clone())?),
            None => {
                let wanted = !config.dkim.is_empty()
                    || config
                        .routes
                        .iter()
                        .any(|route| route.list_unsubscribe.is_some());
                if wanted {
                    tracing::warn!(
                        "DKIM signing and List-Unsubscribe fields start only at restart: this process started without them"
                    );
                }
                None
            }
        };
        for upstream in &added {
            upstream
                .route_limits()
                .validate()
                .map_err(|error| format!("upstream {:?}: {error}", upstream.name()))?;
        }
        for upstream in &added {
            if upstream.quota_limits() != reloader.quotas_at_start.get(upstream.name()).copied() {
                tracing::warn!(
                    upstream = upstream.name(),
                    "daily quota settings change only at restart; the quotas counted at start stay in use"
                );
            }
        }
        if next_index > UPSTREAM_TABLE_ENTRIES_MAX {
            return Err(format!(
                "the upstream table would hold {next_index} entries (retired ones included), more than {UPSTREAM_TABLE_ENTRIES_MAX}; restart to apply this configuration"
            ));
        }
        // Checked: from here on the new configuration goes in force.
        let mut threads = Vec::new();
        let mut added_queues = Vec::with_capacity(added.len());
        for upstream in &added {
            match start_workers(upstream, &reloader.context, &mut threads) {
                Ok(jobs) => added_queues.push((upstream.index, jobs)),
                Err(error) => {
                    for (_, jobs) in &added_queues {
                        jobs.close();
                    }
                    return Err(format!("cannot start a delivery thread: {error}"));
                }
            }
        }
        reloader
            .workers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(threads);
        let mut whole = table.upstreams.clone();
        whole.extend(added.iter().cloned());
        let summary = ReloadSummary {
            upstreams: active.len(),
            kept: active.len() - added.len(),
            added: added.len(),
            retired: retired.len(),
            rerouted: 0,
        };
        let (reply, answer) = crossbeam_channel::bounded(1);
        let plan = ReloadPlan {
            upstreams: whole.clone(),
            added: added_queues,
            retired: retired.clone(),
            router,
        };
        if let Err(Input::Command(Command::Reload(plan, _))) = self
            .inbox
            .push(Input::Command(Command::Reload(Box::new(plan), reply)))
        {
            // The new workers end once their queues are closed.
            for (_, jobs) in &plan.added {
                jobs.close();
            }
            return Err("delivery is shutting down".into());
        }
        table.upstreams = whole;
        table.retired.extend(retired);
        reloader.context.upstreams.replace(active);
        if let (Some(current), Some(signing)) = (&reloader.signing, signing) {
            *current
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(signing);
        }
        let rerouted = match answer.recv_timeout(RELOAD_REPLY_TIMEOUT) {
            Ok(rerouted) => rerouted,
            Err(_) => {
                tracing::warn!(
                    "the dispatcher has not confirmed the reload yet; it applies it when it gets to it"
                );
                0
            }
        };
        Ok(ReloadSummary {
            rerouted,
            ..summary
        })
    }
}

/// Reads the DKIM keys of `config` as [`start`] does and describes each signing domain;
/// adds the start-up warnings (routes for sender domains without a key). For
/// `tsubame check-config`.
pub fn check_signing(config: &Config) -> Result<Vec<String>, String> {
    let mut lines = signing::Signing::describe(config)?;
    lines.extend(
        signing::coverage_warnings(config)
            .into_iter()
            .map(|warning| format!("warning: {warning}")),
    );
    Ok(lines)
}

/// Logs in to upstream `name` as `account` (for OAuth upstreams; `None` otherwise)
/// without sending mail, and says how it went: `tsubame oauth test`. The token comes
/// from `tokens` as in delivery; the session ends with QUIT.
pub fn check_login(
    config: &Config,
    hostname: &str,
    tokens: &tokens::TokenSources,
    name: &str,
    account: Option<&str>,
) -> Result<String, String> {
    let upstreams =
        upstream::build_table(config, hostname, tokens).map_err(|error| error.to_string())?;
    let upstream = upstreams
        .iter()
        .find(|upstream| upstream.name() == name)
        .ok_or_else(|| format!("no upstream {name:?} in the configuration"))?;
    if !upstream.config.kind.is_relay() {
        return Err(format!(
            "upstream {name:?} delivers by MX: there is no login to test"
        ));
    }
    let credentials = upstream
        .credentials(account)
        .map_err(|failure| failure.detail)?;
    let targets = worker::targets(upstream, "").map_err(|failure| failure.detail)?;
    let mut last_error = format!("upstream {name:?} has no address to connect to");
    for target in &targets {
        for &address in &target.addresses {
            match connect::open(upstream, &target.name, address, credentials.as_ref()) {
                Ok(connection) => {
                    let tls = connection
                        .tls_summary()
                        .unwrap_or_else(|| "no TLS".to_string());
                    let _ = connection.quit();
                    let login = match (&credentials, account) {
                        (Some(credentials), _) => format!(" as {}", credentials.username()),
                        (None, _) => " (no login configured)".to_string(),
                    };
                    return Ok(format!(
                        "{} ({address}){login}: accepted, {tls}",
                        target.name
                    ));
                }
                Err(error) => last_error = format!("{} ({address}): {error}", target.name),
            }
        }
    }
    Err(last_error)
}

/// The daily quotas of the upstreams that have one, as the last run left them.
fn load_quotas(config: &Config, upstreams: &[Arc<upstream::Upstream>]) -> quota::QuotaBook {
    let path = config.spool.directory.join(quota::FILE_NAME);
    let limits: std::collections::HashMap<String, quota::QuotaLimits> = upstreams
        .iter()
        .filter_map(|upstream| {
            upstream
                .quota_limits()
                .map(|limits| (upstream.name().to_string(), limits))
        })
        .collect();
    if limits.is_empty() {
        // Nothing to count: the file is neither read nor written.
        return quota::QuotaBook::new(quota::Quotas::new(|_| None), path);
    }
    let (quotas, outcome) = quota::Quotas::load(
        &path,
        move |key| limits.get(key.upstream()).copied(),
        now_unix_ms(),
    );
    match outcome {
        quota::LoadOutcome::Missing => {}
        quota::LoadOutcome::Loaded { accounts } => {
            tracing::info!(accounts, file = %path.display(), "sending quotas restored");
        }
        quota::LoadOutcome::Discarded { reason } => {
            tracing::warn!(file = %path.display(), reason, "sending quotas could not be read; counting starts from zero");
        }
    }
    quota::QuotaBook::new(quotas, path)
}

impl Relay {
    /// The engine's counters, for `/metrics`.
    pub fn stats(&self) -> Arc<stats::RelayStats> {
        Arc::clone(&self.stats)
    }

    /// A handle for configuration reloads (SIGHUP).
    pub fn reload_handle(&self) -> ReloadHandle {
        ReloadHandle {
            inbox: Arc::clone(&self.inbox),
            reloader: Arc::clone(&self.reloader),
        }
    }

    /// The server's handoff: queues a message once it is durable. Never blocks.
    pub fn handoff(&self) -> Arc<dyn Fn(SpooledMessage) + Send + Sync> {
        if let Some(pool) = &self.signing {
            let queue = pool.queue();
            return Arc::new(move |message: SpooledMessage| {
                // Fails only at shutdown: the message stays in the spool for the next start.
                let _ = queue.push(signing::Task {
                    message,
                    recovered: false,
                });
            });
        }
        let inbox = Arc::clone(&self.inbox);
        Arc::new(move |message: SpooledMessage| {
            // Fails only once the dispatcher has stopped (shutdown): the message stays in
            // the spool and is queued at the next start.
            let _ = inbox.push(Input::Command(Command::Accepted(message, None)));
        })
    }

    /// Stops delivery: no new attempts; those in progress get until `timeout` to finish
    /// (their outcomes are journalled), then the threads are left to the process exit.
    /// Whatever did not finish is tried again at the next start.
    pub fn shutdown(mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        if let Some(mut control) = self.control.take() {
            control.stop();
        }
        // Messages still waiting to be signed stay in the spool; the next start signs
        // and queues them. The threads finish the message they are on.
        if let Some(pool) = self.signing.take() {
            pool.stop();
        }
        let _ = self
            .inbox
            .push(Input::Command(Command::Shutdown { deadline }));
        if let Some(dispatcher) = self.dispatcher.take() {
            let _ = dispatcher.join();
        }
        // The job queues are closed: idle workers end at once, busy ones after their
        // job. Wait for them only until the deadline.
        let workers: Vec<std::thread::JoinHandle<()>> = std::mem::take(
            &mut *self
                .workers
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for worker in workers {
            while !worker.is_finished() && Instant::now() < deadline {
                std::thread::sleep(WORKER_EXIT_POLL_INTERVAL);
            }
            if worker.is_finished() {
                let _ = worker.join();
            }
        }
        self.quotas.save_now();
    }
}
